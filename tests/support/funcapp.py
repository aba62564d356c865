"""Helpers for the Function app tests: invoke handlers, read events back, and stand-ins for *remote* endpoints.

The settings the tests give the app (`SAMPLE_TOPIC`, the secrets, the function key; the `fenv` fixture in
tests/conftest.py sets them) match Microsoft's sample payloads in tests/support/eventgrid_samples/.

Only what cannot run here is emulated: an Azure Event Grid topic (a loopback receiver that records what the
SDK sends) and a Prefect Cloud webhook (a loopback endpoint that renders the shipped template with Jinja2,
as Prefect Cloud does, and forwards the result to the real local Prefect server). Everything else is real.
"""

from __future__ import annotations

import copy
import json
import socket
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import azure.functions as func
import httpx
import yaml
from azure.functions.timer import TimerRequest

from tests.support.prefect_events import prefect_headers
from tollwatch.adapters.prefect_events import EventSink
from tollwatch.contract.events import BlobRef, DatasetRefreshed, TollwatchEvent
from tollwatch.contract.settings import Settings, load_settings
from tollwatch_dev.funchost import indexed_functions

PAYLOADS = Path(__file__).resolve().parent / "eventgrid_samples"
SENTINEL = "tollwatch.test.sentinel"

#: The `topic` / `source` of Microsoft's BlobCreated samples, accepted as-is.
SAMPLE_TOPIC = (
    "/subscriptions/{subscription-id}/resourceGroups/Storage/providers/Microsoft.Storage/storageAccounts/"
    "my-storage-account"
)
#: The container of the samples' `subject` (what the receiver watches).
SAMPLE_CONTAINER = "test-container"
SECRET = "current-secret-0123456789"
NEXT_SECRET = "next-secret-9876543210"
FUNCTION_KEY = "local-function-key-abcdef"


@dataclass(frozen=True)
class FnEnv:
    """What a Function app test needs to know about its environment (the `fenv` fixture)."""

    api_url: str
    domain: str
    resource_id: str

    def settings(self) -> Settings:
        return load_settings()


# ---------------------------------------------------------------------------------------------- payloads


def payload(name: str) -> list[dict[str, Any]]:
    """A Microsoft sample payload (tests/support/eventgrid_samples/README.md), as parsed JSON (a fresh copy)."""
    return json.loads((PAYLOADS / name).read_text())


def blob_created(schema: str = "eventgrid", **data_changes: str) -> dict[str, Any]:
    """The sample BlobCreated event, with only `data` fields (eTag, sequencer) and the id changed if asked."""
    event = copy.deepcopy(payload(f"blob-created.{schema}.json")[0])
    event_id = data_changes.pop("id", None)
    event["data"].update(data_changes)
    if event_id:
        event["id"] = event_id
    return event


def body(events: dict[str, Any] | list[dict[str, Any]]) -> bytes:
    return json.dumps(events).encode()


# ---------------------------------------------------------------------------------------------- handlers


def function(app: func.FunctionApp, name: str) -> Any:
    """The Python function the app registered as `name`."""
    for fn in indexed_functions(app):
        if fn.get_function_name() == name:
            return fn.get_user_function()
    raise LookupError(name)


def http_request(
    method: str,
    route: str,
    body: bytes = b"",
    *,
    headers: dict[str, str] | None = None,
    params: dict[str, str] | None = None,
) -> func.HttpRequest:
    return func.HttpRequest(
        method=method,
        url=f"http://localhost:7071/api/{route}",
        headers=headers or {},
        params=params or {},
        route_params={},
        body=body,
    )


def json_of(response: func.HttpResponse) -> Any:
    return json.loads(response.get_body()) if response.get_body() else None


def deliver(
    app: func.FunctionApp,
    data: bytes,
    *,
    secret: str | None = SECRET,
    method: str = "POST",
    headers: dict[str, str] | None = None,
    params: dict[str, str] | None = None,
) -> func.HttpResponse:
    """Call the Event Grid webhook handler the way the Functions host would, with the shared secret as a header."""
    all_headers = {"content-type": "application/json", "aeg-event-type": "Notification", **(headers or {})}
    if secret is not None:
        all_headers["x-tollwatch-secret"] = secret
    request = http_request(method, "eventgrid", data, headers=all_headers, params=params)
    return function(app, "eventgrid_webhook")(request)


def post_backfill(app: func.FunctionApp, request: object, *, raw: bytes | None = None) -> func.HttpResponse:
    """POST a backfill request (`request` as JSON, or `raw` bytes as they are) to the `request_backfill` handler."""
    data = raw if raw is not None else json.dumps(request).encode()
    return function(app, "request_backfill")(http_request("POST", "backfill", data))


def tick(app: func.FunctionApp, *, past_due: bool = False) -> None:
    """One timer invocation of the `watch_upstream` handler."""
    function(app, "watch_upstream")(TimerRequest(past_due=past_due))


# ---------------------------------------------------------------------------------------------- expectations

_SAMPLE = payload("blob-created.eventgrid.json")[0]
SAMPLE_URL: str = _SAMPLE["data"]["url"]
SAMPLE_ETAG: str = _SAMPLE["data"]["eTag"]


def expected_id(fenv: FnEnv, url: str = SAMPLE_URL, etag: str = SAMPLE_ETAG, sequencer: str = "") -> str:
    """The id of the refresh a BlobCreated of `url` at `etag` announces (it does not depend on the sequencer)."""
    blob = BlobRef(url=url, etag=etag, sequencer=sequencer)
    refreshed = DatasetRefreshed(domain=fenv.domain, dataset_id="qzve-kjga", rows_updated_at=0, blob=blob)
    return str(refreshed.event_id())


def recorded_sequencer(fenv: FnEnv, url: str = SAMPLE_URL) -> str | None:
    """The sequencer the receiver recorded for `url` in the test's state container (Azurite), if any."""
    from tollwatch import resources
    from tollwatch.core.receiver import SequencerStore

    settings = fenv.settings()
    mark = SequencerStore(resources.state_blobs(settings), state_prefix=settings.state_prefix).read(url).value
    return mark.sequencer if mark else None


# ---------------------------------------------------------------------------------------------- prefect


def events_for(api_url: str, resource_id: str, name: str | None = None) -> list[dict[str, Any]]:
    """Events the real Prefect server stored for one resource (optionally one name), newest first."""
    flt: dict[str, Any] = {"resource": {"id": [resource_id]}}
    if name:
        flt["event"] = {"name": [name]}
    body = {"limit": 50, "filter": flt}
    response = httpx.post(f"{api_url.rstrip('/')}/events/filter", json=body, timeout=30, headers=prefect_headers())
    response.raise_for_status()
    return list(response.json()["events"])


def settle(api_url: str, resource_id: str, name: str, *, timeout_s: float = 30.0) -> list[dict[str, Any]]:
    """Every `name` event for the resource once everything sent so far is stored.

    The server persists events asynchronously, so "no event arrived" cannot be seen by reading once. A sentinel
    event is sent *after* the actions under test; once it is readable, events sent before it are too.
    """
    sentinel = str(uuid.uuid4())
    httpx.post(
        f"{api_url.rstrip('/')}/events",
        json=[
            {
                "id": sentinel,
                "event": SENTINEL,
                "occurred": datetime.now(UTC).isoformat(),
                "resource": {"prefect.resource.id": resource_id},
                "payload": {},
            }
        ],
        timeout=30,
        headers=prefect_headers(),
    ).raise_for_status()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(e["id"] == sentinel for e in events_for(api_url, resource_id, SENTINEL)):
            return events_for(api_url, resource_id, name)
        time.sleep(0.25)
    raise AssertionError(f"sentinel event for {resource_id} not stored within {timeout_s}s")


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ---------------------------------------------------------------------------------------------- sinks


class BarrierSink:
    """An `EventSink` that waits until all parties reach it, then delivers through the real emitter.

    Used to make two watchers race deterministically: both have read the watermark before either emits.
    """

    def __init__(self, inner: EventSink, barrier: threading.Barrier) -> None:
        self._inner = inner
        self._barrier = barrier

    def emit(self, events: Sequence[TollwatchEvent]) -> None:
        self._barrier.wait(timeout=60)
        self._inner.emit(events)


# ---------------------------------------------------------------------------------------------- loopback endpoints


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class _Behaviour:
    statuses: list[int] = field(default_factory=list)  # answered in order before normal processing
    requests: list[Recorded] = field(default_factory=list)


class _Loopback:
    """A ThreadingHTTPServer on 127.0.0.1 that records requests; subclasses decide the answer."""

    def __init__(self) -> None:
        self.behaviour = _Behaviour()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                data = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                record = Recorded("POST", self.path, {k.lower(): v for k, v in self.headers.items()}, data)
                outer.behaviour.requests.append(record)
                status, answer = outer.answer(record)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_port}"

    @property
    def requests(self) -> list[Recorded]:
        return self.behaviour.requests

    def fail_next(self, *statuses: int) -> None:
        self.behaviour.statuses.extend(statuses)

    def answer(self, record: Recorded) -> tuple[int, bytes]:
        if self.behaviour.statuses:
            return self.behaviour.statuses.pop(0), b'{"error": "injected"}'
        return self.handle(record)

    def handle(self, record: Recorded) -> tuple[int, bytes]:
        raise NotImplementedError

    def __enter__(self) -> _Loopback:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


class EventGridTopicReceiver(_Loopback):
    """Stands in for an Azure Event Grid topic endpoint (`POST /api/events?api-version=…` → 200)."""

    def handle(self, record: Recorded) -> tuple[int, bytes]:
        return 200, b""


class PrefectCloudWebhookEmulator(_Loopback):
    """Stands in for a Prefect Cloud webhook: renders the shipped template, forwards the event to a real server.

    Like Prefect Cloud: a template that does not render to a JSON object is a 400; success is a 204.
    """

    def __init__(self, template_path: Path, prefect_api_url: str) -> None:
        super().__init__()
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        spec = yaml.safe_load(template_path.read_text())
        self.template = ImmutableSandboxedEnvironment().from_string(spec["template"])
        self._api = prefect_api_url.rstrip("/")

    def handle(self, record: Recorded) -> tuple[int, bytes]:
        try:
            parsed_body: Any = json.loads(record.body)
        except ValueError:
            parsed_body = record.body.decode(errors="replace")
        rendered = self.template.render(body=parsed_body, headers=record.headers, method=record.method)
        try:
            event = json.loads(rendered)
        except ValueError:
            return 400, b'{"error": "template did not render JSON"}'
        if not isinstance(event, dict):
            return 400, b'{"error": "template did not render an object"}'
        response = httpx.post(f"{self._api}/events", json=[event], timeout=30, headers=prefect_headers())
        return (204 if response.is_success else 400), b""
