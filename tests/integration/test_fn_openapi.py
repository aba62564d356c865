"""The OpenAPI document against the handlers answering over HTTP: the dev host on loopback, the session's real stack.

Two ways. The scenarios the other Function app tests cover (tests/integration/test_fn_backfill.py,
test_fn_eventgrid.py, test_fn_devhost.py) are replayed and every answer is validated against the document — status,
content type, body schema, headers — and every status the document declares must be among them (only the host's
throttling 429 cannot be provoked here). Then schemathesis generates requests from the document (its examples,
boundary and negative cases, random ones; undeclared methods; each request without and with a wrong credential) and
checks that none is a server error and every answer is one the document describes.
"""

from __future__ import annotations

import http.client
import json
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)

from functions.openapi import CLOUDEVENT, CLOUDEVENT_BATCH, EXAMPLE_SUBJECT, EXAMPLE_TOPIC, JSON, document
from tests.support.funcapp import FUNCTION_KEY, SECRET, closed_port
from tollwatch.contract.webio import HOST_MAX_BODY_BYTES
from tollwatch_dev.funchost import FunctionHost

pytestmark = pytest.mark.stack

SCHEMA = schemathesis.openapi.from_dict(document())
CREDENTIALS = {"x-functions-key": FUNCTION_KEY, "x-tollwatch-secret": SECRET}
#: Every answer must conform to the document.
CONFORMANCE = [
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]
#: ... and, under schemathesis, also: no 5xx, requests outside the schema refused, the credentials enforced, 405 for
#: undeclared methods. Never a response-time check: a slow answer on a busy machine is not a wrong one.
CHECKS = [not_a_server_error, *CONFORMANCE, negative_data_rejection, ignored_auth, unsupported_method]
#: Statuses the document declares that no request can provoke here: the Functions host's throttling.
UNREPRODUCIBLE = {"429"}
#: Generated requests per operation and phase (explicit examples and coverage cases come on top).
MAX_EXAMPLES = 25


@pytest.fixture
def served(devhost: FunctionHost, monkeypatch: pytest.MonkeyPatch) -> FunctionHost:
    """The dev host with the receiver watching where the document's examples point (their topic and container)."""
    monkeypatch.setenv("TOLLWATCH_EVENTGRID_SOURCE_TOPICS", EXAMPLE_TOPIC)
    monkeypatch.setenv("TOLLWATCH_EVENTGRID_CONTAINER", EXAMPLE_SUBJECT.split("/")[4])
    return devhost


# ---------------------------------------------------------------------------------------------- scenarios


def _example(path: str, method: str, media_type: str, name: str) -> bytes:
    content = document()["paths"][path][method]["requestBody"]["content"][media_type]
    return json.dumps(content["examples"][name]["value"]).encode()


BACKFILL = ("/api/backfill", "POST")
DELIVER = ("/api/eventgrid", "POST")
HANDSHAKE = ("/api/eventgrid", "OPTIONS")
DESCRIBE = ("/api/openapi.json", "GET")
ORIGIN = {"WebHook-Request-Origin": "eventgrid.azure.net"}
MISCONFIGURED = {"TOLLWATCH_EVENTGRID_CONTAINER": "Not A Container"}


@dataclass(frozen=True)
class Scenario:
    """One request a test elsewhere makes, and the status it gets."""

    operation: tuple[str, str]
    status: int
    body: bytes = b""
    media_type: str = JSON
    headers: dict[str, str] = field(default_factory=dict)
    credentials: dict[str, str] = field(default_factory=lambda: dict(CREDENTIALS))
    query: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)


def _scenarios() -> dict[str, Scenario]:
    blob_created = _example("/api/eventgrid", "post", JSON, "blob_created")
    validation = _example("/api/eventgrid", "post", JSON, "subscription_validation")
    cloudevent = _example("/api/eventgrid", "post", CLOUDEVENT, "blob_created")
    cloudevents = _example("/api/eventgrid", "post", CLOUDEVENT_BATCH, "blob_created")
    good_and_bad = json.dumps([*json.loads(blob_created), {"eventType": "x"}]).encode()
    by_month = _example("/api/backfill", "post", JSON, "by_month")
    auto = _example("/api/backfill", "post", JSON, "auto")
    down = f"http://127.0.0.1:{closed_port()}"
    key_only = {"x-functions-key": FUNCTION_KEY}
    return {
        "backfill by month": Scenario(BACKFILL, 202, by_month),
        "backfill auto": Scenario(BACKFILL, 202, auto),
        "backfill reversed": Scenario(BACKFILL, 400, b'{"start": "2024-04-01", "stop": "2024-01-01"}'),
        "backfill unknown field": Scenario(BACKFILL, 400, b'{"start": "2024-01-01", "stop": "2024-02-01", "x": 1}'),
        "backfill not JSON": Scenario(BACKFILL, 400, b"<backfill start='2024-01-01'/>"),
        "backfill without key": Scenario(BACKFILL, 401, by_month, credentials={}),
        "backfill wrong key in query": Scenario(BACKFILL, 401, by_month, credentials={}, query={"code": "wrong"}),
        "backfill misconfigured": Scenario(BACKFILL, 500, by_month, env=MISCONFIGURED),
        "backfill, Prefect down": Scenario(BACKFILL, 503, by_month, env={"PREFECT_API_URL": f"{down}/api"}),
        "backfill auto, upstream down": Scenario(BACKFILL, 503, auto, env={"TOLLWATCH_UPSTREAM_BASE_URL": down}),
        "subscription validation": Scenario(DELIVER, 200, validation),
        "BlobCreated, Event Grid schema": Scenario(DELIVER, 200, blob_created),
        "BlobCreated, CloudEvent": Scenario(DELIVER, 200, cloudevent, media_type=CLOUDEVENT),
        "BlobCreated, CloudEvents batch": Scenario(DELIVER, 200, cloudevents, media_type=CLOUDEVENT_BATCH),
        "a batch with a bad event": Scenario(DELIVER, 200, good_and_bad),
        "delivery not JSON": Scenario(DELIVER, 400, b"not json"),
        "delivery without secret": Scenario(DELIVER, 401, blob_created, credentials=key_only),
        "delivery wrong secret in query": Scenario(
            DELIVER, 401, blob_created, credentials=key_only, query={"secret": "wrong"}
        ),
        "delivery without key": Scenario(DELIVER, 401, blob_created, credentials={"x-tollwatch-secret": SECRET}),
        "unknown subscription": Scenario(
            DELIVER,
            403,
            blob_created,
            headers={"aeg-subscription-name": "someone-else"},
            env={"TOLLWATCH_EVENTGRID_SUBSCRIPTION_NAMES": "tollwatch-upstream"},
        ),
        "delivery too large": Scenario(
            DELIVER,
            413,
            json.dumps([json.loads(blob_created)[0]] * 4).encode(),
            env={"TOLLWATCH_EVENTGRID_MAX_BODY_BYTES": "1024"},
        ),
        "delivery misconfigured": Scenario(DELIVER, 500, blob_created, env=MISCONFIGURED),
        "delivery, Prefect down": Scenario(DELIVER, 503, blob_created, env={"PREFECT_API_URL": f"{down}/api"}),
        "handshake": Scenario(HANDSHAKE, 200, headers=ORIGIN),
        "handshake without origin": Scenario(HANDSHAKE, 400),
        "handshake from a stranger": Scenario(HANDSHAKE, 403, headers={"WebHook-Request-Origin": "evil.example"}),
        "handshake without secret": Scenario(HANDSHAKE, 401, headers=ORIGIN, credentials=key_only),
        "handshake misconfigured": Scenario(HANDSHAKE, 500, headers=ORIGIN, env=MISCONFIGURED),
        "the document": Scenario(DESCRIBE, 200, credentials={}),
    }


def test_every_answer_of_the_other_tests_scenarios_is_one_the_document_declares(
    served: FunctionHost, monkeypatch: pytest.MonkeyPatch
):
    observed: dict[tuple[str, str], set[str]] = defaultdict(set)
    for name, scenario in _scenarios().items():
        path, method = scenario.operation
        headers = {**scenario.credentials, **scenario.headers}
        if scenario.body:
            headers["content-type"] = scenario.media_type
        with monkeypatch.context() as patch:
            for key, value in scenario.env.items():
                patch.setenv(key, value)
            response = httpx.request(
                method, f"{served.url}{path}", headers=headers, params=scenario.query, content=scenario.body, timeout=60
            )
        assert response.status_code == scenario.status, (name, response.text)
        observed[scenario.operation].add(str(response.status_code))
        if response.status_code == 401 and "x-functions-key" not in headers:
            assert not response.content  # the host's own 401 (declared), without the JSON body of a handler's 401
            continue
        case = SCHEMA[path][method].Case(headers=headers, query=scenario.query or None)
        case.validate_response(response, checks=CONFORMANCE)
    for path, method in [BACKFILL, DELIVER, HANDSHAKE, DESCRIBE]:  # the host's own 413: before any function runs
        assert _claim_a_huge_body(served.url, method, path) == 413
        observed[path, method].add("413")

    declared = {
        (path, method.upper()): set(operation["responses"])
        for path, item in document()["paths"].items()
        for method, operation in item.items()
    }
    assert set(observed) == set(declared)
    for operation, statuses in declared.items():
        assert observed[operation] <= statuses, operation
        assert statuses - observed[operation] <= UNREPRODUCIBLE, (operation, statuses - observed[operation])


@pytest.mark.parametrize("method", ["DELETE", "TRACE", "PROPFIND"])
def test_the_dev_host_refuses_undeclared_paths_and_methods_with_what_the_document_says(served: FunctionHost, method):
    """Any method, not only those http.server has a handler for: TRACE was a 501 (found by schemathesis)."""
    with httpx.Client(base_url=served.url, headers=CREDENTIALS) as http:
        assert http.request(method, "/api/nowhere").status_code == 404
        for path, item in document()["paths"].items():
            refused = http.request(method, path)
            assert refused.status_code == 405
            assert set(refused.headers["Allow"].split(", ")) == {method.upper() for method in item}


def _claim_a_huge_body(url: str, method: str, path: str) -> int:
    """Announce a body over the host's limit and send none of it: the host must refuse before reading."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=30)
    try:
        connection.putrequest(method, path)
        connection.putheader("Content-Length", str(HOST_MAX_BODY_BYTES + 1))
        for key, value in CREDENTIALS.items():
            connection.putheader(key, value)
        connection.endheaders()
        return connection.getresponse().status
    finally:
        connection.close()


# ---------------------------------------------------------------------------------------------- schemathesis


@pytest.fixture
def exchanges(served: FunctionHost) -> Iterator[Counter[int]]:
    """Statuses of the requests one operation's run sent. A run that reached no handler proves nothing (every
    answer a 401 conforms too), so each operation must have had an accepted (2xx) and a refused (4xx) answer."""
    statuses: Counter[int] = Counter()
    yield statuses
    total = sum(statuses.values())
    print(f"schemathesis: {total} requests, statuses {dict(sorted(statuses.items()))}")
    assert any(200 <= s < 300 for s in statuses), statuses
    assert any(400 <= s < 500 for s in statuses), statuses


@SCHEMA.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_schemathesis_finds_no_server_error_and_no_answer_outside_the_document(case, served, exchanges):
    response = case.call_and_validate(base_url=served.url, headers=CREDENTIALS, checks=CHECKS)
    exchanges[response.status_code] += 1
