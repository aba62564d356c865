"""The smoke test of `tollwatch stack up --db sqlite`: one publish through the real worker on a SQLite Prefect server.

The full chain (subscriptions, repair automations, exactly-once downstream) is proven on PostgreSQL, the local
default, in tests/test_chain.py. On SQLite the server's trigger service can act on one firing twice or drop an event
after Prefect's in-memory messaging retried it 3 times at once ("database is locked"; README Known limits), so this
module asks only what that option must keep doing: prefect.yaml deploys, the deployment's own trigger starts the
ingest run for a published week, the run completes and the week is in the table.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import date

import pytest

from tests.support.stacks import deployed_stack
from tollwatch.dev.stack import LocalStack, StackEndpoints
from tollwatch.events import EventName

pytestmark = pytest.mark.stack


@pytest.fixture(scope="module")
def sqlite_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackEndpoints]:
    local = LocalStack(
        tmp_path_factory.mktemp("chain-sqlite"),
        prefect_ui=False,
        mirror_start=date(2024, 1, 1),
        mirror_through=date(2024, 2, 1),
        db="sqlite",
    )
    with deployed_stack(local, {"TOLLWATCH_TASK_RETRIES": "0"}) as endpoints:
        yield endpoints


def test_a_publish_is_ingested_through_the_worker_on_a_sqlite_server(sqlite_stack: StackEndpoints) -> None:
    from tollwatch import clients
    from tollwatch.demo import publish_week, watch_once
    from tollwatch.observe import connect
    from tollwatch.settings import load_settings
    from tollwatch.trace import TraceError, build_trace

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
    days = set(clients.table_store(load_settings()).read().column("date").to_pylist())
    assert all(date(2024, 2, d) in days for d in range(1, 8)), "the published week is in the table"
