"""The whole chain on a real local stack: Prefect server with its automation services, a process worker,
Azurite, the Socrata mirror and the loopback inbox — deployed from prefect.yaml and automations/ as shipped.

This module's stack runs the Prefect server on PostgreSQL, as production does. The smoke test of the lighter
`--db sqlite` option is tests/integration/test_chain_sqlite.py: on SQLite, Prefect's trigger service sometimes acts
on one firing twice or drops an event after retrying it at once ("database is locked"), so the exactly-once
promises of this module are a PostgreSQL matter (seen here: two downstream runs for one completion on SQLite).

publish → watcher → tollwatch.dataset.refreshed → ingest run → tollwatch.ingestion.completed → subscriptions
(run-job → tollwatch.job.completed; a team webhook) and failures → notification. Backfills go through the
`tollwatch backfill` CLI and Prefect's own `prefect event emit`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from uuid import UUID

import httpx
import pytest
from typer.testing import CliRunner

from tests.support.stacks import deployed_stack
from tollwatch.contract.events import EventName
from tollwatch.prefect.observe import connect
from tollwatch_dev.stack import LocalStack, StackEndpoints

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.stack

SUBSCRIPTION_DISABLED = """\
team: chain-test
subscriptions:
  - name: disabled-daily-totals
    enabled: false
    action:
      type: run-local-job
      job: daily_totals
"""


#: The Prefect server's database for this module: PostgreSQL, the local default
#: (SQLite: tests/integration/test_chain_sqlite.py).
CHAIN_DB = "postgres"

FAIL_FAST = {
    "TOLLWATCH_UPSTREAM_MAX_ATTEMPTS": "2",
    "TOLLWATCH_UPSTREAM_BACKOFF_MAX_S": "0.2",
    "TOLLWATCH_TASK_RETRIES": "0",
}


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackEndpoints]:
    """A stack of its own (its automations must not see other tests' events), deployed and applied."""
    from tollwatch_dev.local_blocks import ensure_local_blocks

    state = tmp_path_factory.mktemp("chain")
    local = LocalStack(
        state,
        prefect_ui=False,
        mirror_start=date(2024, 1, 1),
        mirror_through=date(2024, 2, 1),
        db=CHAIN_DB,
    )
    automations = state / "automations"
    shutil.copytree(ROOT / "automations", automations)
    (automations / "subscriptions" / "chain-test.yaml").write_text(SUBSCRIPTION_DISABLED)
    # the worker (and every flow run it starts) inherits FAIL_FAST: an upstream failure fails fast
    with deployed_stack(local, FAIL_FAST) as endpoints:
        ensure_local_blocks(endpoints.inbox_url)
        applied = CliRunner().invoke(_cli(), ["automations", "apply", "--dir", str(automations)])
        assert applied.exit_code == 0, applied.output
        yield endpoints


def _cli():
    from tollwatch.cli.main import app

    return app


def _inbox(endpoints: StackEndpoints, path: str) -> list[dict]:
    received = httpx.get(f"{endpoints.inbox_url}/_received", timeout=10).json()
    return [r for r in received if r["path"].startswith(path)]


def _wait(predicate, timeout_s: float = 120, message: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(1)
    raise AssertionError(f"{message} not reached within {timeout_s}s")


def _backfill(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(_cli(), ["backfill", *args, "--no-local-stack", "--timeout", "240"])
    return result.exit_code, result.output


def test_publish_runs_ingest_then_the_downstream_job_and_the_team_webhook(chain):
    """One publish upstream: ingest, run-job and the webhook subscription each happen once, all Completed."""
    from tollwatch_dev.demo import publish_week, wait_for_chain, watch_once

    publish_week(chain.mirror_url)
    event_id = watch_once()
    trace = wait_for_chain(event_id, 240, lambda _: None)
    text = trace.render()

    assert "tollwatch.ingestion.completed" in text, text
    assert "tollwatch.job.completed" in text, text
    with connect() as obs:
        ingest_runs = [run for a in obs.actions_on([event_id]) for run in a.flow_run_ids]
        assert len(ingest_runs) == 1
        completion = obs.emitted_by(ingest_runs, [EventName.INGESTION_COMPLETED])[ingest_runs[0]]
        downstream = obs.actions_on([completion.id])
        job_runs = [run for a in downstream for run in a.flow_run_ids]
        assert len(job_runs) == 1  # the disabled subscription started nothing
        assert not any("disabled" in a.automation for a in downstream)
        states = {run.id: run.state.type.value for run in obs.flow_runs([*ingest_runs, *job_runs]).values()}
        assert set(states.values()) == {"COMPLETED"}, states
        job_event = obs.emitted_by(job_runs, [EventName.JOB_COMPLETED])[job_runs[0]]
        assert job_event.payload["upstream_snapshot_id"] == completion.payload["snapshot_id"]
        assert job_event.resource.id == "local.job.daily_totals"

    # the team webhook got this completion event exactly once (give a wrong second call time to arrive)
    calls = _wait(lambda: [c for c in _inbox(chain, "/city-dashboard") if str(completion.id) in c["body"]])
    time.sleep(3)
    calls = [c for c in _inbox(chain, "/city-dashboard") if str(completion.id) in c["body"]]
    assert len(calls) == 1

    # the downstream job wrote the days of the published week
    from tollwatch.contract.settings import load_settings
    from tollwatch.resources import table_store

    settings = load_settings()
    silver = table_store(settings, settings.daily_totals_table).table().scan().to_arrow()
    published = {d for d in silver.column("date").to_pylist() if d >= date(2024, 2, 1)}
    assert len(published) == 7


def test_backfill_three_chunks_three_runs_within_the_concurrency_limit_and_no_reruns_by_accident(chain):
    code, output = _backfill("--start", "2024-01-08", "--stop", "2024-01-11", "--chunk", "day", "--wait")
    assert code == 0, output
    assert output.count("COMPLETED") == 3, output

    with connect() as obs:
        runs = [r for r in obs.latest_runs("ingest", limit=50) if (r.parameters.get("start") or "") >= "2024-01-08"]
        runs = [r for r in runs if (r.parameters.get("stop") or "") <= "2024-01-11"]
        assert len(runs) == 3
        # never more than 2 ran at once (deployment concurrency limit 2, ENQUEUE)
        spans = [(r.start_time, r.end_time) for r in runs]
        for start, _ in spans:
            running = sum(1 for s, e in spans if s <= start < e)
            assert running <= 2, spans

    # the same request again: same event ids, Prefect drops them, no new runs; the CLI reports the same runs
    code, again = _backfill("--start", "2024-01-08", "--stop", "2024-01-11", "--chunk", "day", "--wait")
    assert code == 0, again
    with connect() as obs:
        assert len([r for r in obs.latest_runs("ingest", limit=50) if r.parameters.get("start") == "2024-01-08"]) == 1

    # --rerun: a new request id, new events, one new run per chunk
    code, rerun = _backfill("--start", "2024-01-08", "--stop", "2024-01-11", "--chunk", "day", "--wait", "--rerun")
    assert code == 0, rerun
    with connect() as obs:
        assert len([r for r in obs.latest_runs("ingest", limit=50) if r.parameters.get("start") == "2024-01-08"]) == 2


def test_ingest_failure_emits_the_failure_event_and_the_notification(chain):
    httpx.post(f"{chain.mirror_url}/admin/faults", json={"fail_always": {"status": 500}}, timeout=10).raise_for_status()
    try:
        code, output = _backfill("--start", "2024-01-20", "--stop", "2024-01-21", "--chunk", "day", "--wait")
    finally:
        httpx.post(f"{chain.mirror_url}/admin/faults", json={"clear": True}, timeout=10)
    assert code == 1, output
    assert "FAILED" in output

    with connect() as obs:
        failed = _wait(lambda: obs.events(names=[EventName.INGESTION_FAILED]), message="ingestion.failed event")
        assert failed[-1].payload["window"] == {"start": "2024-01-20", "stop": "2024-01-21"}
    alerts = _wait(lambda: _inbox(chain, "/alerts"), message="notification in the inbox")
    assert any("UpstreamError" in alert["body"] or "500" in alert["body"] for alert in alerts), alerts


def test_prefect_event_emit_starts_a_backfill_run(chain):
    """Prefect's own CLI is a supported way in: `prefect event emit tollwatch.backfill.requested …`."""
    payload = {
        "domain": "data.ny.gov",
        "dataset_id": "qzve-kjga",
        "start": "2024-01-25",
        "stop": "2024-01-26",
        "request_id": "prefect-cli",
    }
    env = {**os.environ, **chain.env()}
    command = [sys.executable, "-m", "prefect", "event", "emit", "tollwatch.backfill.requested"]
    subprocess.run(
        [*command, "--resource-id", "socrata.data.ny.gov.qzve-kjga", "--payload", json.dumps(payload)],
        env=env,
        check=True,
        capture_output=True,
        cwd=ROOT,
    )

    def completed_run():
        with connect() as obs:
            runs = [r for r in obs.latest_runs("ingest", limit=50) if r.parameters.get("request_id") == "prefect-cli"]
            return [r for r in runs if r.state and r.state.is_final()]

    runs = _wait(completed_run, 180, "the ingest run for the prefect-emitted event")
    assert len(runs) == 1
    assert runs[0].state.type.value == "COMPLETED"
    assert runs[0].parameters == {"start": "2024-01-25", "stop": "2024-01-26", "request_id": "prefect-cli"}


def test_trace_by_flow_run_id_finds_the_same_chain(chain):
    from tollwatch.prefect.trace import build_trace

    with connect() as obs:
        job_run = next(r for r in obs.latest_runs("run-job", limit=20) if r.state and r.state.is_completed())
        trace = build_trace(obs, job_run.id)
        # the chain starts at the announcement: a publish, or a backfill request
        announcements = (EventName.DATASET_REFRESHED, EventName.BACKFILL_REQUESTED)
        assert any(str(name) in trace.hops[0].what for name in announcements)
        assert any(str(job_run.id) in hop.what for hop in trace.hops)
        assert isinstance(trace.origin_event_id, UUID)


def test_trace_and_status_commands_print_the_chain_and_the_pipeline_state(chain):
    with connect() as obs:
        refreshed = obs.events(names=[EventName.DATASET_REFRESHED], newest_first=True, limit=1)[0]
    traced = CliRunner().invoke(_cli(), ["trace", str(refreshed.id), "--no-local-stack"])
    assert traced.exit_code == 0, traced.output
    assert "tollwatch.ingestion.completed" in traced.output
    assert "end to end:" in traced.output

    status = CliRunner().invoke(_cli(), ["status", "--no-local-stack"])
    assert status.exit_code == 0, status.output
    assert f"event {refreshed.id}" in status.output
    assert "rowsUpdatedAt" in status.output
    assert "bronze.bnt_traffic_hourly snapshot" in status.output
    # the refreshes above committed: the ledger's mark is shown beside the announced and the upstream ones
    for label in ("announced", "committed", "upstream"):
        assert re.search(rf"^{label} +: rowsUpdatedAt \d+ \(\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\dZ\)", status.output, re.M)
    assert re.search(r"^lag +: ", status.output, re.M)
    assert re.search(r"^gaps +: ", status.output, re.M)

    unknown = CliRunner().invoke(_cli(), ["trace", "not-a-uuid", "--no-local-stack"])
    assert unknown.exit_code == 1
    assert "is not an event or flow run id" in unknown.output


def test_a_held_publish_alerts_runs_nothing_downstream_until_an_operator_publishes_it(chain):
    """Write-audit-publish through the deployed chain: a publish with a missing hour is held (alert, no completion,
    no downstream run); `tollwatch publish` moves main and the subscribers run once, and only once."""
    from tollwatch_dev.demo import publish_week, watch_once
    from tollwatch_dev.synthetic import ROWS_PER_DAY, slot_of

    state = httpx.get(f"{chain.mirror_url}/admin/state", timeout=10).json()
    first_new_day = (date.fromisoformat(state["published_through"]) - date.fromisoformat(state["history_start"])).days
    seq = (first_new_day + 2) * ROWS_PER_DAY + slot_of(4, 5, "O")  # the new week's third day, plaza 4, 05:00 O
    corrupt = {"corrupt": [{"seq": seq, "field": "hour", "value": None}]}
    httpx.post(f"{chain.mirror_url}/admin/faults", json=corrupt, timeout=10).raise_for_status()
    publish_week(chain.mirror_url)
    watch_once()

    with connect() as obs:
        held = _wait(lambda: obs.events(names=[EventName.INGESTION_HELD]), 240, "ingestion.held event")[-1]
    refresh_id = held.payload["refresh_id"]
    assert held.payload["quality"]["failing"] == ["completeness"]
    alerts = _wait(lambda: [a for a in _inbox(chain, "/alerts") if refresh_id in a["body"]], message="held alert")
    assert "completeness" in alerts[0]["body"]
    time.sleep(3)  # a wrong completion would have been emitted by now
    with connect() as obs:
        completions = obs.events(names=[EventName.INGESTION_COMPLETED], newest_first=True, limit=50)
        assert not [e for e in completions if e.payload.get("refresh_id") == refresh_id]

    published = CliRunner().invoke(
        _cli(), ["publish", refresh_id, "--reason", "plaza 4 counter outage", "--by", "ops", "--no-local-stack"]
    )
    assert published.exit_code == 0, published.output

    with connect() as obs:

        def completion():
            found = obs.events(names=[EventName.INGESTION_COMPLETED], newest_first=True, limit=50)
            return [e for e in found if e.payload.get("refresh_id") == refresh_id]

        event = _wait(completion, message="the override's completion event")[0]
        assert event.payload["quality"]["verdict"] == "overridden"

        def job_runs():
            return [run for a in obs.actions_on([event.id]) for run in a.flow_run_ids]

        _wait(job_runs, message="the downstream job run")
        again = CliRunner().invoke(_cli(), ["publish", refresh_id, "--reason", "again", "--no-local-stack"])
        assert again.exit_code == 0, again.output
        time.sleep(5)  # a second run would have started by now
        runs = job_runs()
        assert len(runs) == 1, runs
        finished = _wait(
            lambda: [r for r in obs.flow_runs(runs).values() if r.state and r.state.is_final()], message="job done"
        )
        assert finished[0].state.type.value == "COMPLETED"
