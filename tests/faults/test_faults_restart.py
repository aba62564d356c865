"""Fault 15: the Prefect server, or the PostgreSQL under it, restarts in the middle of a backfill.

A stack of its own (PostgreSQL, Azurite, Prefect server, mirror, warm server, process worker), deployed from
prefect.yaml. The backfill goes through the `tollwatch backfill` CLI, as an operator would run it. Each variant
backfills its own six months, so the two share the stack without seeing each other's runs.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import date
from typing import TYPE_CHECKING

import httpx
import pytest
from typer.testing import CliRunner

from tests.support.ingest_faults import assert_same_rows, table_rows_by_key, window_rows
from tests.support.prefect_events import prefect_headers
from tests.support.stacks import deployed_stack
from tollwatch.contract.events import Window
from tollwatch.prefect.observe import connect
from tollwatch_dev.mirror import MirrorServer
from tollwatch_dev.stack import LocalStack, StackEndpoints

if TYPE_CHECKING:
    from prefect.client.schemas.objects import FlowRun

pytestmark = pytest.mark.stack

MIRROR_START, MIRROR_THROUGH = date(2024, 1, 1), date(2025, 1, 1)
#: Six monthly chunks per variant: the service restarted mid-backfill -> its window.
WINDOWS: dict[str, Window] = {
    "prefect": Window(start=date(2024, 1, 1), stop=date(2024, 7, 1)),
    "postgres": Window(start=date(2024, 7, 1), stop=date(2025, 1, 1)),
}


def _args(window: Window) -> list[str]:
    return [
        "backfill",
        "--start",
        str(window.start),
        "--stop",
        str(window.stop),
        "--chunk",
        "month",
        "--no-local-stack",
    ]


@pytest.fixture(scope="module")
def restartable(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalStack, StackEndpoints]]:
    local = LocalStack(
        tmp_path_factory.mktemp("restart"),
        services=("azurite", "prefect", "mirror", "warm", "worker"),
        prefect_ui=False,
        mirror_start=MIRROR_START,
        mirror_through=MIRROR_THROUGH,
    )
    with deployed_stack(local) as endpoints:
        yield local, endpoints


def _ingest_runs(window: Window) -> list[FlowRun]:
    with connect() as obs:
        runs = obs.latest_runs("ingest", limit=50)
    return [r for r in runs if window.start.isoformat() <= str(r.parameters.get("start", "")) < window.stop.isoformat()]


class _Outage:
    """Polls a database-backed endpoint of the Prefect server every 50 ms and records when it failed."""

    def __init__(self, api_url: str) -> None:
        self._url = f"{api_url}/flow_runs/count"
        self._headers = prefect_headers()  # read here: the poller's thread does not see this test's settings
        self._stop = threading.Event()
        self.failures: list[float] = []
        self.errors: Counter[str] = Counter()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> _Outage:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def _poll(self) -> None:
        with httpx.Client(timeout=5, headers=self._headers) as client:
            while not self._stop.is_set():
                try:
                    response = client.post(self._url, json={})
                    failed = None if response.status_code == 200 else f"HTTP {response.status_code}"
                except httpx.HTTPError as exc:
                    failed = type(exc).__name__
                if failed is not None:
                    self.failures.append(time.monotonic())
                    self.errors[failed] += 1
                time.sleep(0.05)

    def report(self) -> str:
        if not self.failures:
            return "no failed request"
        span = self.failures[-1] - self.failures[0]
        kinds = ", ".join(f"{kind} x{count}" for kind, count in sorted(self.errors.items()))
        return f"{len(self.failures)} failed requests over {span:.2f}s ({kinds})"


@pytest.mark.parametrize("restarted", ["prefect", "postgres"])
def test_a_server_restart_mid_backfill_ends_with_every_chunk_completed_once_by_the_same_command(
    restartable, restarted: str
):
    """Fault: `prefect` — the Prefect server is restarted (same port, same database) while a 6-chunk monthly
    backfill is being created and run; the automations' in-memory queue and event dedupe are lost.
    `postgres` — PostgreSQL is restarted (fast shutdown: the server's connections are closed), and with it the
    Prefect server on it (`LocalStack.restart` stops the server first and starts it last): a server left running
    on a vanished database answers 500, which Prefect's clients do not retry, and drops events it cannot persist.
    Both: no request to the API gets a 500 while it happens (a stopped server is a connection error, retried).
    Expected: running the same `tollwatch backfill` command again (with --wait) requests only the chunks that
    never got a run, and ends with every chunk COMPLETED by exactly one run (no "(2 runs)").
    Nothing lost: the table equals the mirror's rows for the six months, with no duplicate key."""
    local, endpoints = restartable
    window = WINDOWS[restarted]
    cli = _cli()
    prefect_pid = local.status()["prefect"].pid

    first = CliRunner().invoke(cli, _args(window))
    assert first.exit_code == 0, first.output
    assert "6 month chunk event(s) emitted" in first.output

    deadline = time.monotonic() + 120
    while not _ingest_runs(window) and time.monotonic() < deadline:  # restart once the backfill is under way
        time.sleep(0.2)
    assert _ingest_runs(window), "the backfill started no run within 120 s"
    with _Outage(endpoints.prefect_api_url) as outage:
        began = time.monotonic()
        after = local.restart(restarted)
        print(f"restart of {restarted}: {time.monotonic() - began:.2f}s")
        time.sleep(2)
    print(f"while {restarted} restarted, the Prefect API had {outage.report()}")
    assert after.prefect_api_url == endpoints.prefect_api_url  # clients keep their URL
    assert local.status()["prefect"].pid != prefect_pid  # restarting PostgreSQL restarts the server on it too
    assert "HTTP 500" not in outage.errors  # never the code Prefect's clients do not retry

    began = time.monotonic()
    again = CliRunner().invoke(cli, [*_args(window), "--wait", "--timeout", "300"])
    print(f"second backfill command: {time.monotonic() - began:.1f}s\n{again.output}")

    assert again.exit_code == 0, again.output
    assert again.output.count("COMPLETED") == 6, again.output
    assert "runs)" not in again.output  # no chunk with a second run
    runs = [r for r in _ingest_runs(window) if r.state and r.state.type.value == "COMPLETED"]
    windows = sorted((r.parameters["start"], r.parameters["stop"]) for r in runs)
    assert len(windows) == len(set(windows)) == 6, windows
    with MirrorServer("qzve-kjga", MIRROR_START, MIRROR_THROUGH) as mirror:  # the stack's mirror, the same rows
        assert_same_rows(table_rows_by_key(window), window_rows(mirror, window))


def _cli():
    from tollwatch.cli.main import app

    return app
