"""Helpers for tests/faults/test_faults_inputs.py: faults in front of the real Prefect API, the runs its deployment
triggers created for an event, and the table compared with the mirror.

`FlakyPrefect` is a loopback HTTP proxy, not a mock: requests it lets through reach the session's real Prefect
server unchanged, so what is stored (and deduplicated) is decided by Prefect itself.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from enum import StrEnum
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import httpx

from tests.support.prefect_events import prefect_auth_string
from tollwatch.adapters.prefect_events import PrefectEventsEmitter
from tollwatch.adapters.socrata import window_where
from tollwatch.contract.events import DatasetRefreshed, TollwatchEvent, Window
from tollwatch_dev.mirror import MirrorServer

# ---------------------------------------------------------------------------------------------- the proxy


class Fault(StrEnum):
    """What the proxy does to one request instead of simply forwarding it."""

    UNAVAILABLE = "503"  # answers 503 itself: the server never sees the request
    DROP = "drop"  # closes the connection without an answer: the server never sees the request
    LOST_ANSWER = "lost-answer"  # forwards (the server stores the events), then answers 503 instead of the 2xx


@dataclass(frozen=True)
class Seen:
    """One request that reached the proxy, and what was done with it."""

    method: str
    path: str
    outcome: str  # a Fault value, or "forwarded <status>"


class FlakyPrefect:
    """A loopback proxy in front of a real Prefect API: queued faults first (one per request), then forwarding."""

    def __init__(self, upstream_api_url: str) -> None:
        upstream = urlsplit(upstream_api_url.rstrip("/"))
        self._origin = f"{upstream.scheme}://{upstream.netloc}"
        self._api_path = upstream.path
        self._faults: deque[Fault] = deque()
        self._lock = threading.Lock()
        self.seen: list[Seen] = []
        self._http = httpx.Client(base_url=self._origin, timeout=30)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                proxy._handle(self)

            def do_GET(self) -> None:
                proxy._handle(self)

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def api_url(self) -> str:
        """Use this as PREFECT_API_URL / TOLLWATCH_PREFECT_API_URL."""
        return f"http://127.0.0.1:{self._server.server_port}{self._api_path}"

    def inject(self, *faults: Fault) -> None:
        """Apply these faults to the next requests, in order; later requests are forwarded."""
        with self._lock:
            self._faults.extend(faults)

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._faults)

    def outcomes(self) -> list[str]:
        with self._lock:
            return [s.outcome for s in self.seen]

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        with self._lock:
            fault = self._faults.popleft() if self._faults else None
        if fault is Fault.DROP:
            self._record(handler, Fault.DROP)
            handler.close_connection = True  # no status line at all: the client sees a dropped connection
            return
        if fault is Fault.UNAVAILABLE:
            self._record(handler, Fault.UNAVAILABLE)
            self._answer(handler, 503, b'{"detail": "injected: service unavailable"}', "application/json")
            return
        headers = {k: v for k, v in handler.headers.items() if k.lower() in ("content-type", "authorization")}
        response = self._http.request(handler.command, handler.path, content=body, headers=headers)
        if fault is Fault.LOST_ANSWER:
            self._record(handler, Fault.LOST_ANSWER)
            self._answer(handler, 503, b'{"detail": "injected: answer lost"}', "application/json")
            return
        self._record(handler, f"forwarded {response.status_code}")
        self._answer(handler, response.status_code, response.content, response.headers.get("content-type"))

    def _record(self, handler: BaseHTTPRequestHandler, outcome: str) -> None:
        with self._lock:
            self.seen.append(Seen(handler.command, handler.path, str(outcome)))

    @staticmethod
    def _answer(handler: BaseHTTPRequestHandler, status: int, body: bytes, content_type: str | None) -> None:
        handler.send_response(status)
        if content_type:
            handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    def __enter__(self) -> FlakyPrefect:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._http.close()


# ---------------------------------------------------------------------------------------------- what the server did

#: How long one marker may take to start its run before another is sent (one sent before the trigger was live
#: never starts one). Creating a run takes 0.2-2 s on the SQLite server (README, "What bounds event -> Running").
MARKER_PATIENCE_S = 8.0


def stored_ids(events: Iterable[dict[str, Any]]) -> Counter[str]:
    """How many times each event id is stored (Prefect keeps one per id: every count must be 1)."""
    return Counter(e["id"] for e in events)


def triggers_acted(api_url: str, *, domain: str, dataset_id: str = "qzve-kjga", timeout_s: float = 60.0) -> None:
    """Emit a marker refresh and return once a deployment trigger has created its run.

    The marker's resource is a sibling of the dataset's (`<domain>.marker`), so it never counts as one of the
    dataset's refreshes; its run stays Scheduled (no worker). Used two ways: after a deploy, to know the
    triggers are live (the server's trigger service loads new automations shortly after they are created, and
    an event arriving before that starts nothing, hence a new marker when one is not acted on in time); after
    events under test, to know the server has acted on them (trigger and action services work in arrival order).
    """
    from tollwatch.prefect.observe import connect

    deadline = time.monotonic() + timeout_s
    with connect() as observer, httpx.Client(timeout=30) as http:
        while time.monotonic() < deadline:
            marker = TollwatchEvent.of(
                DatasetRefreshed(
                    domain=f"{domain}.marker",
                    dataset_id=dataset_id,
                    rows_updated_at=4_000_000_000 + random.randrange(1_000_000_000),
                    source="test-marker",
                )
            )
            PrefectEventsEmitter(http, api_url, auth_string=prefect_auth_string()).emit([marker])
            patience = min(deadline, time.monotonic() + MARKER_PATIENCE_S)
            while time.monotonic() < patience:
                if any(a.flow_run_ids for a in observer.actions_on([marker.id])):
                    return
                time.sleep(0.25)
    raise AssertionError(f"no deployment trigger acted on a marker event within {timeout_s}s")


def runs_started_by(
    api_url: str, event_id: str, *, domain: str, dataset_id: str = "qzve-kjga", timeout_s: float = 60.0
) -> list[Any]:
    """The flow runs the deployment triggers created for `event_id`, counted once the server has acted on it and
    on a later event.

    First the event's own action must show (creating a run can wait out a SQLite lock for ~2 s, so a later
    event's run may appear first); then a marker (`triggers_acted`) gives a run for a duplicate delivery every
    chance to show before counting. Each firing of a trigger is also recorded as
    `prefect.automation.action.triggered` (at firing time, before its action runs), so a double firing is
    caught even if its run were slower still.
    """
    from tollwatch.prefect.observe import ACTION_TRIGGERED, connect

    wanted = uuid.UUID(event_id)
    deadline = time.monotonic() + timeout_s
    with connect() as observer:
        while not observer.actions_on([wanted]):
            if time.monotonic() > deadline:
                raise AssertionError(f"no deployment trigger acted on event {event_id} within {timeout_s}s")
            time.sleep(0.25)
    triggers_acted(api_url, domain=domain, dataset_id=dataset_id)
    with connect() as observer:
        mine = observer.actions_on([wanted])
        fired = observer.events(names=[ACTION_TRIGGERED], related_ids=[f"prefect.event.{event_id}"])
        assert len(fired) == len(mine), f"trigger fired {len(fired)}x but {len(mine)} action(s) ran"
        run_ids = [run_id for action in mine for run_id in action.flow_run_ids]
        runs = observer.flow_runs(run_ids)
    return [runs[run_id] for run_id in run_ids]


def run_in_process(flow: Any, flow_run: Any) -> Any:
    """Execute a flow run the trigger created (it stays Scheduled without a worker) here, with its parameters."""
    from prefect.flow_engine import run_flow

    return run_flow(flow, flow_run=flow_run, parameters=dict(flow_run.parameters))


# ---------------------------------------------------------------------------------------------- table vs mirror

Key = tuple[int, date, int, str]
Values = tuple[int | None, int | None, int | None]


def _int(value: object) -> int | None:
    return None if value is None else int(value)  # type: ignore[call-overload]


def mirror_rows(mirror: MirrorServer, window: Window) -> dict[Key, Values]:
    """What the upstream holds for the window, keyed like the table (plaza_id, date, hour, direction)."""
    rows = mirror.dataset.query({"$where": window_where(window.start, window.stop), "$limit": "50000"})
    assert len(rows) < 50_000, "window too large for one mirror query"
    return {
        (int(r["plaza_id"]), date.fromisoformat(r["date"][:10]), int(r["hour"]), r["direction"]): (
            _int(r.get("vehicles_e_zpass")),
            _int(r.get("vehicles_vtoll")),
            _int(r.get("vehicles_cash")),
        )
        for r in rows
    }


def table_rows(window: Window | None = None) -> tuple[dict[Key, Values], int]:
    """The bronze table's rows (optionally one window) keyed like `mirror_rows`, and the row count (duplicates
    would make the count exceed the number of keys)."""
    from tollwatch import resources
    from tollwatch.contract.settings import load_settings

    data = resources.table_store(load_settings()).read(window).to_pylist()
    keyed = {
        (r["plaza_id"], r["date"], r["hour"], r["direction"]): (
            r["vehicles_e_zpass"],
            r["vehicles_vtoll"],
            r.get("vehicles_cash"),
        )
        for r in data
    }
    return keyed, len(data)


def snapshot_ids() -> list[int]:
    """Every snapshot of the bronze table, oldest first (empty before the first commit)."""
    from tollwatch import resources
    from tollwatch.contract.settings import load_settings

    table = resources.table_store(load_settings()).table()
    return [s.snapshot_id for s in table.snapshots()] if table else []


def snapshot_summary(snapshot_id: int) -> Any:
    """A snapshot's summary: the ledger entries (`tollwatch.refresh-id`, `tollwatch.flow-run-id`, ...)."""
    from tollwatch import resources
    from tollwatch.contract.settings import load_settings

    return resources.table_store(load_settings()).table().snapshot_by_id(snapshot_id).summary


def eventgrid_time(epoch_s: int) -> str:
    """An Event Grid `eventTime` for an epoch second (the receiver turns it back into `rows_updated_at`)."""
    return datetime.fromtimestamp(epoch_s, UTC).isoformat().replace("+00:00", "Z")
