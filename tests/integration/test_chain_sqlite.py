"""The smoke test of `tollwatch stack up --db sqlite`: one publish through the real worker on a SQLite Prefect server.

The full chain (subscriptions, repair automations, exactly-once downstream) is proven on PostgreSQL, the local
default, in tests/integration/test_chain.py. On SQLite the server's trigger service can act on one firing twice or
drop an event after Prefect's in-memory messaging retried it 3 times at once ("database is locked"; README Known
limits), so this module asks only what that option must keep doing: prefect.yaml deploys, the deployment's own
trigger starts the ingest run for a published week, the run completes and the week is in the table.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import pytest

from tests.support.stacks import deployed_stack
from tollwatch.contract.events import EventName
from tollwatch_dev.stack import SQLITE_CLIENT_POLICY, SQLITE_SERVER_POLICY, LocalStack, StackEndpoints

pytestmark = pytest.mark.stack


@pytest.fixture(scope="module")
def sqlite_local(tmp_path_factory: pytest.TempPathFactory) -> LocalStack:
    return LocalStack(
        tmp_path_factory.mktemp("chain-sqlite"),
        prefect_ui=False,
        mirror_start=date(2024, 1, 1),
        mirror_through=date(2024, 2, 1),
        db="sqlite",
    )


@pytest.fixture(scope="module")
def sqlite_stack(sqlite_local: LocalStack) -> Iterator[StackEndpoints]:
    with deployed_stack(sqlite_local, {"TOLLWATCH_TASK_RETRIES": "0"}) as endpoints:
        yield endpoints


def _process(state_dir: Path, service: str) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of a recorded service's process."""
    pid = json.loads((state_dir / "stack.json").read_text())["services"][service]["pid"]
    environ = Path(f"/proc/{pid}/environ").read_text().split("\0")
    return Path(f"/proc/{pid}/cmdline").read_text().split("\0"), dict(i.split("=", 1) for i in environ if "=" in i)


def test_the_sqlite_server_carries_the_sqlite_policy(sqlite_local: LocalStack, sqlite_stack: StackEndpoints) -> None:
    """Retry-After on 503s, more client retries, late runs after 600 s: what SQLite's write collisions need."""
    cmdline, server = _process(sqlite_local.state_dir, "prefect")
    _, worker = _process(sqlite_local.state_dir, "worker")
    assert cmdline[1:3] == ["-m", "tollwatch_dev.prefect_server"]
    assert server["PREFECT_SERVER_DATABASE_CONNECTION_URL"].startswith("sqlite+aiosqlite:///")
    assert {k: server[k] for k in SQLITE_SERVER_POLICY} == SQLITE_SERVER_POLICY
    assert {k: worker[k] for k in SQLITE_CLIENT_POLICY} == SQLITE_CLIENT_POLICY


def test_a_publish_is_ingested_through_the_worker_on_a_sqlite_server(sqlite_stack: StackEndpoints) -> None:
    from tollwatch import resources
    from tollwatch.contract.settings import load_settings
    from tollwatch.prefect.observe import connect
    from tollwatch.prefect.trace import TraceError, build_trace
    from tollwatch_dev.demo import publish_week, watch_once

    publish_week(sqlite_stack.mirror_url)
    event_id = watch_once()
    rendered = ""
    deadline = time.monotonic() + 180  # no subscriptions here: the chain ends at the ingest's completion
    with connect() as obs:
        while EventName.INGESTION_COMPLETED not in rendered and time.monotonic() < deadline:
            time.sleep(1)
            try:
                rendered = build_trace(obs, event_id).render()
            except TraceError:
                rendered = ""
    assert EventName.INGESTION_COMPLETED in rendered, rendered or "no trace of the refresh event"
    with connect() as obs:
        runs = [run for action in obs.actions_on([event_id]) for run in action.flow_run_ids]
        assert runs, "the deployment's trigger started no ingest run"
        states = {run.state.type.value for run in obs.flow_runs(runs).values() if run.state}
        assert "COMPLETED" in states, states
    days = set(resources.table_store(load_settings()).read().column("date").to_pylist())
    assert all(date(2024, 2, d) in days for d in range(1, 8)), "the published week is in the table"
