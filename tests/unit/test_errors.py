"""One error base, one formatter (tollwatch.contract.errors): what a person reads, wherever the error surfaces."""

from __future__ import annotations

import json

import azure.functions as func
import pytest
from pydantic import BaseModel, SecretStr, ValidationError

from functions._http import respond
from tollwatch.adapters.prefect_events import EmitError
from tollwatch.adapters.socrata import UpstreamError
from tollwatch.contract.errors import MAX_MESSAGE, ConfigurationError, TollwatchError, describe
from tollwatch.contract.settings import Settings
from tollwatch.contract.webio import InboundRequest, Reply
from tollwatch.core.backfill import BackfillRejected, UpstreamCountsUnavailable


class Secretive(BaseModel):
    token: SecretStr
    port: int


def test_an_error_raised_on_purpose_is_shown_as_its_sentence():
    assert describe(UpstreamError("GET /x failed (gave up after 3 attempts)")) == (
        "GET /x failed (gave up after 3 attempts)"
    )


def test_a_validation_error_names_fields_and_problems_never_the_values():
    with pytest.raises(ValidationError) as caught:
        Secretive.model_validate({"token": 12345, "port": "hunter2"})
    text = describe(caught.value)
    assert "token:" in text
    assert "port:" in text
    assert "hunter2" not in text
    assert "12345" not in text


def test_anything_else_is_named_by_its_class_and_kept_short():
    assert describe(KeyError("plaza_id")) == "KeyError: 'plaza_id'"
    assert describe(RuntimeError()) == "RuntimeError"
    assert len(describe(RuntimeError("x" * 10_000))) == MAX_MESSAGE


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (BackfillRejected([]), 400),
        (UpstreamCountsUnavailable("the upstream's row counts could not be read"), 503),
        (EmitError("could not deliver 1 event(s)"), 503),
        (ConfigurationError("no blob storage configured"), 500),
    ],
)
def test_every_error_raised_on_purpose_shares_the_base_and_knows_its_http_status(error, status):
    assert isinstance(error, TollwatchError)
    assert error.status == status


def _handler_raising(error: BaseException):
    def handler(request: InboundRequest, settings: Settings) -> Reply:
        raise error

    return handler


def _post() -> func.HttpRequest:
    return func.HttpRequest(method="POST", url="/api/backfill", body=b"{}", headers={})


@pytest.mark.parametrize(
    ("error", "status", "reason"),
    [
        (EmitError("could not deliver 2 event(s) to http://prefect/api/events"), 503, "could not deliver 2 event(s)"),
        (ConfigurationError("no blob storage configured"), 500, "function app is misconfigured: no blob storage"),
        (ZeroDivisionError("division by zero"), 500, "internal error; details are in the function log"),
    ],
)
def test_an_http_route_answers_with_the_errors_status_and_sentence(error, status, reason, monkeypatch):
    monkeypatch.setenv("TOLLWATCH_STORAGE_CONNECTION_STRING", "UseDevelopmentStorage=true")
    response = respond(_post(), _handler_raising(error))
    assert response.status_code == status
    body = json.loads(response.get_body())
    assert reason in json.dumps(body)
    assert "Traceback" not in json.dumps(body)
