"""The OpenAPI document (`functions/openapi.py`) against the app itself: the same routes, methods and auth as the app
registers, valid OpenAPI, served as it is built, and examples the real parsers accept. What the handlers answer is
checked against it over HTTP in tests/integration/test_fn_openapi.py."""

from __future__ import annotations

import json
from datetime import date

import azure.functions as func
import pytest
import schemathesis
from schemathesis.core.result import Ok

from functions.openapi import (
    CLOUDEVENT,
    CLOUDEVENT_BATCH,
    EXAMPLE_SUBJECT,
    EXAMPLE_TOPIC,
    EXAMPLE_VALIDATION_CODE,
    FUNCTION_KEY_SCHEMES,
    JSON,
    document,
)
from tests.support.funcapp import function, http_request
from tollwatch.adapters.eventgrid_in import WatchedLocation, parse_body, screen
from tollwatch.core.backfill import BackfillLimits, parse_backfill
from tollwatch_dev.funchost import http_routes

METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
#: What the Functions host answers for any route before a function runs (401 only for keyed routes).
HOST_REFUSALS = {"413", "429"}


def _operations(doc: dict) -> dict[tuple[str, str], dict]:
    return {
        (path, method.upper()): operation
        for path, item in doc["paths"].items()
        for method, operation in item.items()
        if method in METHODS
    }


def _needs_key(operation: dict) -> bool:
    """Keyed when every security alternative names a function-key scheme; anonymous when there is none."""
    requirements = operation.get("security", [])
    return bool(requirements) and all(set(FUNCTION_KEY_SCHEMES) & set(r) for r in requirements)


def test_the_document_has_exactly_the_routes_methods_and_auth_the_app_registers(app: func.FunctionApp):
    registered = {(r.path, method, r.needs_key) for r in http_routes(app) for method in r.methods}
    documented = {(path, method, _needs_key(op)) for (path, method), op in _operations(document()).items()}
    assert documented == registered
    assert ("/api/openapi.json", "GET", False) in documented  # the description itself is anonymous


def test_the_document_is_valid_openapi_and_every_operation_resolves():
    loaded = schemathesis.openapi.from_dict(document())
    loaded.validate()  # the OpenAPI 3.1 meta-schema
    operations = list(loaded.get_all_operations())
    assert operations
    assert all(isinstance(op, Ok) for op in operations), [op for op in operations if not isinstance(op, Ok)]
    assert len(operations) == len(_operations(document()))


def test_every_operation_declares_the_hosts_refusals_and_only_known_schemes():
    doc = document()
    schemes = set(doc["components"]["securitySchemes"])
    for (path, method), operation in _operations(doc).items():
        assert {scheme for requirement in operation["security"] for scheme in requirement} <= schemes
        host = HOST_REFUSALS | ({"401"} if _needs_key(operation) else set())
        assert set(operation["responses"]) >= host, (path, method)


def test_every_503_tells_when_to_retry():
    for operation in _operations(document()).values():
        if "503" in operation["responses"]:
            assert operation["responses"]["503"]["headers"]["Retry-After"]["required"] is True


def test_the_route_serves_the_document_it_builds(app: func.FunctionApp):
    response = function(app, "openapi_document")(http_request("GET", "openapi.json"))
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    assert json.loads(response.get_body()) == document()


def test_document_returns_a_copy_callers_may_change():
    first = document()
    first["paths"].clear()
    assert document()["paths"]


def test_the_backfill_examples_are_requests_the_handler_accepts():
    content = _operations(document())["/api/backfill", "POST"]["requestBody"]["content"][JSON]
    limits = BackfillLimits(today=date(2026, 1, 1))
    for name, example in content["examples"].items():
        request = parse_backfill(json.dumps(example["value"]), limits)
        assert request.stop > request.start, name


@pytest.mark.parametrize("media_type", [JSON, CLOUDEVENT, CLOUDEVENT_BATCH])
def test_the_event_grid_examples_are_deliveries_the_receiver_accepts(media_type):
    content = _operations(document())["/api/eventgrid", "POST"]["requestBody"]["content"][media_type]
    container = EXAMPLE_SUBJECT.split("/")[4]
    location = WatchedLocation(topics=(EXAMPLE_TOPIC,), container=container)
    for name, example in content["examples"].items():
        screening = screen(parse_body(json.dumps(example["value"]).encode(), 1_048_576), location)
        assert not screening.refused, (name, screening.refused)
        if name == "subscription_validation":
            assert screening.validation_code == EXAMPLE_VALIDATION_CODE
        else:
            assert [blob.topic for blob in screening.accepted] == [EXAMPLE_TOPIC]
