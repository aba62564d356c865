"""Fault 15: the Prefect server restarts in the middle of a backfill.

A stack of its own (Azurite, Prefect server on SQLite, mirror, warm server, process worker), deployed from
prefect.yaml. The backfill goes through the `tollwatch backfill` CLI, as an operator would run it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import date
from typing import TYPE_CHECKING

import pytest
from typer.testing import CliRunner

from tests.faults._ingest_support import assert_same_rows, table_rows_by_key, window_rows
from tests.support.stacks import deployed_stack
from tollwatch.dev.mirror import MirrorServer
from tollwatch.dev.stack import LocalStack, StackEndpoints
from tollwatch.events import Window
from tollwatch.observe import connect

if TYPE_CHECKING:
    from prefect.client.schemas.objects import FlowRun

pytestmark = pytest.mark.stack

START, STOP = date(2024, 1, 1), date(2024, 7, 1)  # six monthly chunks
ARGS = ["backfill", "--start", str(START), "--stop", str(STOP), "--chunk", "month", "--no-local-stack"]


@pytest.fixture(scope="module")
def restartable(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalStack, StackEndpoints]]:
    local = LocalStack(
        tmp_path_factory.mktemp("restart"),
        services=("azurite", "prefect", "mirror", "warm", "worker"),
        prefect_ui=False,
        mirror_start=START,
        mirror_through=STOP,
    )
    with deployed_stack(local) as endpoints:
        yield local, endpoints


def _ingest_runs() -> list[FlowRun]:
    with connect() as obs:
        return obs.latest_runs("ingest", limit=50)


def test_a_server_restart_mid_backfill_ends_with_every_chunk_completed_once_by_the_same_command(restartable):
    """Fault: the Prefect server is restarted (same port, same SQLite database) while a 6-chunk monthly
    backfill is being created and run; the automations' in-memory queue and event dedupe are lost.
    Expected: running the same `tollwatch backfill` command again (with --wait) requests only the chunks that
    never got a run, and ends with every chunk COMPLETED by exactly one run (no "(2 runs)").
    Nothing lost: the table equals the mirror's rows for the six months, with no duplicate key."""
    local, endpoints = restartable
    cli = _cli()

    first = CliRunner().invoke(cli, ARGS)
    assert first.exit_code == 0, first.output
    assert "6 month chunk event(s) emitted" in first.output

    deadline = time.monotonic() + 120
    while not _ingest_runs() and time.monotonic() < deadline:  # restart once the backfill is under way
        time.sleep(0.2)
    assert _ingest_runs(), "the backfill started no run within 120 s"
    restarted = local.restart("prefect")
    assert restarted.prefect_api_url == endpoints.prefect_api_url  # clients keep their URL

    again = CliRunner().invoke(cli, [*ARGS, "--wait", "--timeout", "300"])

    assert again.exit_code == 0, again.output
    assert again.output.count("COMPLETED") == 6, again.output
    assert "runs)" not in again.output  # no chunk with a second run
    runs = [r for r in _ingest_runs() if r.state and r.state.type.value == "COMPLETED"]
    windows = sorted((r.parameters["start"], r.parameters["stop"]) for r in runs)
    assert len(windows) == len(set(windows)) == 6, windows
    with MirrorServer("qzve-kjga", START, STOP) as mirror:  # the stack's mirror, deterministically the same
        assert_same_rows(
            table_rows_by_key(Window(start=START, stop=STOP)), window_rows(mirror, Window(start=START, stop=STOP))
        )


def _cli():
    from tollwatch.cli import app

    return app
