"""Faults on the downstream side (issue 7, faults 13 and 14), on the real local stack: the Prefect server with its
automation services, Azurite, the Socrata mirror, pyiceberg on disk and the loopback inbox. Only the Databricks
workspace (Jobs API 2.1 and its Entra ID token endpoint) is mocked, at the HTTP layer with respx, by a stateful
fake (`tests.support.databricks_workspace.FakeWorkspace`) that keeps runs, idempotency tokens and token lifetimes as the
service does.

13: a downstream job fails → `tollwatch.job.failed` (upstream ids, reason) and the on-call notification of the
    shipped `automations/job-failed.yaml`; the ingest stays Completed; the other subscribers still run.
14: Databricks: a submit whose response is lost, runs ending SKIPPED / INTERNAL_ERROR, a 429 storm (waited out,
    and one that outlasts the retries), an OAuth token expiring during a long wait → a clear end, never a second run.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime
from typing import Any

import httpx
import pytest
import respx
from prefect.flow_engine import run_flow
from prefect.states import State

from tests.support import payloads
from tests.support.automations import (
    DATABRICKS_SUBSCRIPTION,
    GRACE_S,
    cli_apply,
    runs_of_deployment,
    shipped_copy,
    write,
)
from tests.support.databricks_workspace import (
    CANCEL,
    GET,
    RUN_NOW,
    SUBMIT,
    THROTTLED,
    Ending,
    FakeRun,
    FakeWorkspace,
)
from tests.support.prefect_events import prefect_headers, wait_for_events
from tests.support.tables import table_rows
from tollwatch import resources
from tollwatch.adapters.net import retry_after_s
from tollwatch.contract.events import EventName, IngestionCompleted, Window
from tollwatch.contract.settings import load_settings
from tollwatch.prefect.flows.ingest import ingest
from tollwatch.prefect.flows.run_job import run_job
from tollwatch_dev.synthetic import ROWS_PER_DAY

pytestmark = pytest.mark.stack

JOB_ID = 987  # the Databricks job of DATABRICKS_SUBSCRIPTION (team finance)

# Fixtures from tests/conftest.py: a loopback inbox (`inbox`), the dev blocks posting to it and a run-job deployment
# (`server`), a client on a server cleared of tollwatch automations before and after each test (`client`); the
# service-principal credentials and the Databricks blocks (`credentials`, `databricks_blocks`).


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture
def workspace(stack) -> Iterator[FakeWorkspace]:
    """The fake Databricks workspace; every other request (Prefect server, mirror, Azurite) goes through."""
    with respx.mock(assert_all_called=False) as router:
        router.route(host="127.0.0.1").pass_through()
        yield FakeWorkspace(router)


@pytest.fixture
def databricks_jobs(databricks_blocks, monkeypatch) -> dict[str, str]:
    """What a run-job run needs to start a Databricks job (the workspace's blocks, fast API settings), with the
    ingest engine left local: fault 13 needs a real load."""
    monkeypatch.setenv("TOLLWATCH_ENGINE", "local")
    monkeypatch.setenv("TOLLWATCH_DATABRICKS_API_RETRIES", "4")
    return databricks_blocks


# ------------------------------------------------------------------------------------------------- helpers


def tag() -> str:
    return uuid.uuid4().hex[:8]


def job_events(api_url: str, name: EventName, refresh_id: str, count: int = 1) -> list[dict[str, Any]]:
    """The job events (`name`) the server stored for one upstream refresh."""
    return wait_for_events(
        api_url, name, lambda e: e["payload"].get("upstream_refresh_id") == refresh_id, count=count, timeout_s=30
    )


def flow_run_state(api_url: str, flow_run_id: str) -> str:
    response = httpx.get(f"{api_url}/flow_runs/{flow_run_id}", timeout=10, headers=prefect_headers())
    response.raise_for_status()
    return str(response.json()["state"]["type"])


def run_databricks_job(refresh_id: str) -> tuple[State, IngestionCompleted]:
    """The run-job flow for the finance subscription's Databricks job, as its automation would start it."""
    completion = payloads.completion(refresh_id=refresh_id, snapshot_id=77)
    state = run_job(
        job=str(JOB_ID),
        completion=completion,
        parameters={"team": "finance"},
        databricks_job_id=JOB_ID,
        return_state=True,
    )
    return state, completion


def assert_one_run(workspace: FakeWorkspace, path: str) -> FakeRun:
    """Every request to `path` carried one idempotency token, and the workspace holds one run, started by it."""
    tokens = {c.body["idempotency_token"] for c in workspace.calls_to(path) if c.body}
    assert len(tokens) == 1, tokens
    [run] = workspace.runs.values()
    assert run.token in tokens
    return run


# ------------------------------------------------------------------------- 13: a downstream job fails


def test_a_failed_downstream_job_is_announced_and_notified_while_the_ingest_stays_completed_and_others_run(
    databricks_jobs, api, client, server, inbox, workspace, tmp_path
):
    """Fault 13: of three subscribers to one completed load, the Databricks job (team finance) ends FAILED.

    Expected: its run-job run fails and announces `tollwatch.job.failed` on `databricks.job.987` with the upstream
    snapshot and refresh ids and the Databricks state and reason; the shipped `automations/job-failed.yaml` (applied
    with `tollwatch automations apply`) posts one notification naming job, reason and load to the alerts block; the
    ingest run stays Completed; the other subscribers of the same completion still run: the city-dashboard webhook
    gets the event once, and daily_totals completes and announces `tollwatch.job.completed`.
    Nothing lost: the bronze table holds exactly the mirror's rows for the window (no duplicate key) at the
    completion's snapshot; silver holds every day of the window; the failure is visible with its reason; the
    Databricks job ran once.
    The run-job runs the automations create are executed here by Prefect's flow engine, as a worker's child process
    runs them (`python -m prefect.engine`), so that the Databricks API can be mocked in this process.
    """
    directory = shipped_copy(tmp_path)
    write(directory, "subscriptions/finance.yaml", DATABRICKS_SUBSCRIPTION)
    applied = cli_apply(directory)
    assert applied.exit_code == 0, applied.output
    assert "+ create tollwatch-job-failed" in applied.stdout.splitlines()
    assert cli_apply(directory).stdout == "no changes: 9 automations up to date\n"  # the new one included
    reason = f"Task revenue_model failed with message: AnalysisException: column vehicles_etc not found ({tag()})"
    workspace.runs_end(Ending("TERMINATED", "FAILED", reason), job_id=JOB_ID)
    window = Window(start=date(2024, 1, 8), stop=date(2024, 1, 10))

    completed = ingest(start=window.start, stop=window.stop, request_id=f"fault13-{tag()}")

    deadline = time.monotonic() + 60
    runs: list[dict[str, Any]] = []
    while len(runs) < 2 and time.monotonic() < deadline:
        runs = runs_of_deployment(api, server["run-job/run-job"], completed.refresh_id, timeout_s=5)
    by_job = {run["parameters"]["job"]: run for run in runs}
    assert sorted(by_job) == ["987", "daily_totals"], runs
    states = {
        job: run_flow(run_job, flow_run=client.read_flow_run(uuid.UUID(run["id"])), return_type="state")
        for job, run in by_job.items()
    }

    # the failing subscriber: failed, announced with the upstream ids and the reason, and notified once
    assert states["987"].is_failed()
    assert f"ended FAILED: {reason}" in str(states["987"].message)
    [failed] = job_events(api, EventName.JOB_FAILED, completed.refresh_id)
    assert failed["resource"]["prefect.resource.id"] == "databricks.job.987"
    [dbx_run] = workspace.runs.values()
    assert failed["payload"] | {"error_message": None} == {
        "job": "987",
        "databricks": True,
        "succeeded": False,
        "run_id": str(dbx_run.run_id),
        "run_page_url": workspace.describe(dbx_run)["run_page_url"],
        "upstream_snapshot_id": completed.snapshot_id,
        "upstream_refresh_id": completed.refresh_id,
        "error_message": None,
        "flow_run_id": by_job["987"]["id"],
    }
    assert f"ended FAILED: {reason}" in failed["payload"]["error_message"]
    [alert] = inbox.wait_for("/alerts", match=lambda r: completed.refresh_id in r.body)
    assert alert.json_body["subject"] == "tollwatch: downstream job 987 failed"
    assert reason in alert.json_body["body"]
    assert f"snapshot {completed.snapshot_id}" in alert.json_body["body"]
    assert workspace.describe(dbx_run)["run_page_url"] in alert.json_body["body"]

    # the others still ran, once each
    assert states["daily_totals"].is_completed()
    [done] = job_events(api, EventName.JOB_COMPLETED, completed.refresh_id)
    assert done["resource"]["prefect.resource.id"] == "local.job.daily_totals"
    assert done["payload"]["upstream_snapshot_id"] == completed.snapshot_id
    completion_id = str(completed.event_id())
    inbox.wait_for("/city-dashboard", match=lambda r: completion_id in r.body)
    time.sleep(GRACE_S)  # time for a wrong second delivery to arrive before counting
    assert len(inbox.received("/city-dashboard", match=lambda r: completion_id in r.body)) == 1
    assert len(inbox.received("/alerts", match=lambda r: completed.refresh_id in r.body)) == 1

    # the ingest stays Completed; the Databricks job ran once, on this load
    assert flow_run_state(api, str(completed.flow_run_id)) == "COMPLETED"
    assert len(workspace.calls_to(RUN_NOW)) == 1
    assert dbx_run.request["job_parameters"]["upstream_snapshot_id"] == str(completed.snapshot_id)

    # nothing lost: bronze = the mirror's rows for the window at the completion's snapshot; silver has every day
    settings = load_settings()
    bronze = resources.table_store(settings).table()
    assert bronze.current_snapshot().snapshot_id == completed.snapshot_id
    rows = table_rows(window)
    assert rows.num_rows == window.days * ROWS_PER_DAY
    keys = set(zip(*(rows.column(c).to_pylist() for c in ("plaza_id", "date", "hour", "direction")), strict=True))
    assert len(keys) == rows.num_rows
    silver = resources.table_store(settings, settings.daily_totals_table).table().scan().to_arrow()
    assert {d for d in silver.column("date").to_pylist() if window.start <= d < window.stop} == {
        date(2024, 1, 8),
        date(2024, 1, 9),
    }


# ------------------------------------------------------------------------------ 14: Databricks faults


def test_a_submit_that_times_out_after_it_arrived_is_retried_with_the_same_token_and_starts_one_run(
    databricks_blocks, workspace
):
    """Fault 14, runs/submit: the merge submit reaches the workspace (the run starts) but its response is lost
    (read timeout).

    Expected: the retry sends the same idempotency token, the workspace answers with the run the first request
    started, the ingest waits for that run and completes with its page and result.
    Nothing lost: the landing holds every mirror row of the window (rows fetched), exactly one merge run exists, and
    the completion event names that run.
    """
    workspace.lose_response(SUBMIT)
    printed = {"table": "tollwatch.bronze.bnt_traffic_hourly", "mode": "window", "refresh_id": "printed-by-the-job"}
    workspace.logs = "TOLLWATCH_RESULT=" + json.dumps(
        {**printed, "rows_read": 2 * ROWS_PER_DAY, "rows_written": 2 * ROWS_PER_DAY, "rows_rejected": 0}
        | {"snapshot_id": 4242, "touched": "2024-01-01/2024-01-03"}
    )
    request_id = f"fault14-submit-{tag()}"

    completed = ingest(start=date(2024, 1, 1), stop=date(2024, 1, 3), request_id=request_id)

    assert [c.answered for c in workspace.calls_to(SUBMIT)] == ["timeout", 200]
    run = assert_one_run(workspace, SUBMIT)
    assert len(run.token or "") in range(1, 65)  # the Jobs API takes at most 64 characters
    assert completed.run_page_url == workspace.describe(run)["run_page_url"]
    assert (completed.rows_fetched, completed.rows_written, completed.snapshot_id) == (1056, 1056, 4242)
    event = wait_for_events(
        databricks_blocks["PREFECT_API_URL"],
        EventName.INGESTION_COMPLETED,
        lambda e: e["payload"]["refresh_id"] == completed.refresh_id,
    )[0]
    assert event["payload"]["run_page_url"] == completed.run_page_url


def test_a_run_now_that_times_out_after_it_arrived_is_retried_with_the_same_token_and_starts_one_run(
    databricks_jobs, workspace
):
    """Fault 14, run-now: the downstream job's run-now reaches the workspace but its response is lost.

    Expected: the retry reuses the idempotency token, gets the run the lost request started, and the job completes.
    Nothing lost: one run of job 987 exists, and `tollwatch.job.completed` names it with the upstream ids.
    """
    refresh_id = f"fault14-run-now-{tag()}"
    workspace.lose_response(RUN_NOW)

    state, completion = run_databricks_job(refresh_id)

    assert state.is_completed(), state.message
    assert [c.answered for c in workspace.calls_to(RUN_NOW)] == ["timeout", 200]
    run = assert_one_run(workspace, RUN_NOW)
    [done] = job_events(databricks_jobs["PREFECT_API_URL"], EventName.JOB_COMPLETED, refresh_id)
    assert done["payload"]["run_id"] == str(run.run_id)
    assert done["payload"]["upstream_snapshot_id"] == completion.snapshot_id


@pytest.mark.parametrize(
    ("life_cycle", "message"),
    [
        ("SKIPPED", "Skipping this run because the limit of 1 maximum concurrent runs has been reached."),
        ("INTERNAL_ERROR", "Run failed due to an internal error in the Jobs service. Please retry."),
    ],
)
def test_a_run_that_ends_skipped_or_internal_error_fails_the_job_with_its_state_and_reason(
    databricks_jobs, workspace, life_cycle, message
):
    """Fault 14, SKIPPED / INTERNAL_ERROR: the job's run reaches that terminal life cycle.

    Expected: the run-job run fails with `ended <state>: <reason>` and the run page, announces it as
    `tollwatch.job.failed` with the upstream ids; nothing is re-submitted and nothing cancelled (the run is over).
    Nothing lost: the failure is visible with its reason on the job's resource; one run-now, one run.
    """
    refresh_id = f"fault14-{life_cycle.lower()}-{tag()}"
    workspace.runs_end(Ending(life_cycle, None, message), polls=2)

    state, completion = run_databricks_job(refresh_id)

    assert state.is_failed()
    assert f"ended {life_cycle}: {message}" in str(state.message)
    run = assert_one_run(workspace, RUN_NOW)
    assert len(workspace.calls_to(RUN_NOW)) == 1
    assert workspace.calls_to(CANCEL) == []
    [failed] = job_events(databricks_jobs["PREFECT_API_URL"], EventName.JOB_FAILED, refresh_id)
    assert failed["resource"]["prefect.resource.id"] == f"databricks.job.{JOB_ID}"
    assert f"ended {life_cycle}: {message}" in failed["payload"]["error_message"]
    assert failed["payload"]["run_page_url"] == workspace.describe(run)["run_page_url"]
    assert failed["payload"]["upstream_snapshot_id"] == completion.snapshot_id


def test_a_429_storm_is_waited_out_as_retry_after_asks_and_the_job_runs_once(databricks_jobs, workspace):
    """Fault 14, 429 storm: run-now is throttled three times and runs/get twice, each 429 with `Retry-After: 1`.

    Expected: each call is retried with backoff, never before the Retry-After it was given, then succeeds; the
    job completes.
    Nothing lost: every run-now attempt carried the same token, one run exists, `tollwatch.job.completed` names it.
    """
    refresh_id = f"fault14-storm-{tag()}"
    workspace.throttle(RUN_NOW, 3, retry_after=1)
    workspace.throttle(GET, 2, retry_after=1)

    state, _ = run_databricks_job(refresh_id)

    assert state.is_completed(), state.message
    assert [c.answered for c in workspace.calls_to(RUN_NOW)] == [429, 429, 429, 200]
    assert [c.answered for c in workspace.calls_to(GET)][:2] == [429, 429]
    assert workspace.early_retries == 0
    run = assert_one_run(workspace, RUN_NOW)
    [done] = job_events(databricks_jobs["PREFECT_API_URL"], EventName.JOB_COMPLETED, refresh_id)
    assert done["payload"]["run_id"] == str(run.run_id)


@pytest.mark.parametrize(
    ("retry_after", "answers", "gave_up"),
    [
        (1, [429, 429, 429], "(gave up after 3 attempts)"),
        (3600, [429], "(Retry-After 3600s is longer than the 120s we wait; gave up after 1 attempt)"),
    ],
    ids=["outlasts-the-retries", "asks-for-an-hour"],
)
def test_a_429_storm_beyond_what_we_wait_fails_the_job_with_a_clear_reason(
    databricks_jobs, workspace, monkeypatch, retry_after, answers, gave_up
):
    """Fault 14, a 429 storm we do not wait out: run-now answers 429 to every attempt, with `Retry-After: 1` (the
    storm outlasts TOLLWATCH_DATABRICKS_API_RETRIES=2 retries) or `Retry-After: 3600` (more than the runner's
    120 s cap on one wait: a shorter wait would only be refused again).

    Expected: bounded: the job fails after 3 attempts (each after its Retry-After), or at once, with a reason naming
    the call, the 429 REQUEST_LIMIT_EXCEEDED answer and why it gave up, announced as `tollwatch.job.failed`.
    Nothing lost: no run was started (none half-started either), and the failure is visible with its reason.
    """
    monkeypatch.setenv("TOLLWATCH_DATABRICKS_API_RETRIES", "2")
    refresh_id = f"fault14-storm-{retry_after}-{tag()}"
    workspace.throttle(RUN_NOW, None, retry_after=retry_after)

    state, _ = run_databricks_job(refresh_id)

    assert state.is_failed()
    reason = f"Databricks API POST /api/2.1/jobs/run-now answered 429 REQUEST_LIMIT_EXCEEDED: {THROTTLED['message']}"
    assert f"{reason} {gave_up}" in str(state.message)
    assert [c.answered for c in workspace.calls_to(RUN_NOW)] == answers
    assert workspace.early_retries == 0
    assert workspace.runs == {}
    [failed] = job_events(databricks_jobs["PREFECT_API_URL"], EventName.JOB_FAILED, refresh_id)
    assert f"{reason} {gave_up}" in failed["payload"]["error_message"]


def test_retry_after_is_read_as_seconds_or_as_an_http_date():
    """Fault 14, 429 storm: the header's two forms (RFC 9110 delta-seconds and HTTP-date) give the wait the runner
    honours; an absent or unreadable header gives None (the runner's own backoff applies).
    Nothing lost: not applicable (a pure reading of the header the storm tests rely on)."""
    now = datetime(2024, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert retry_after_s("7", now=now) == 7.0
    assert retry_after_s("Mon, 01 Jan 2024 12:00:30 GMT", now=now) == 30.0
    assert retry_after_s("Mon, 01 Jan 2024 11:59:00 GMT", now=now) == 0.0  # already past: retry now
    assert retry_after_s(None) is None
    assert retry_after_s("soon") is None


def test_an_oauth_token_expiring_during_a_long_wait_is_refreshed_and_the_wait_goes_on(
    databricks_jobs, workspace, monkeypatch
):
    """Fault 14, token expiry: the service principal's first Entra ID token lives 62 s (prefect-databricks renews
    60 s before expiry, so it is due 2 s in) while the job runs for 3.5 s, polled every 0.5 s.

    Expected: the token is renewed once, mid-wait; later polls carry the new token; no request is refused; the wait
    goes on to the run's end and the job completes.
    Nothing lost: one run-now, one run, the completion event names it.
    """
    monkeypatch.setenv("TOLLWATCH_DATABRICKS_POLL_S", "0.5")
    refresh_id = f"fault14-token-{tag()}"
    workspace.token_lifetimes = [62]
    workspace.runs_end(Ending(), polls=2, duration_s=3.5)

    state, _ = run_databricks_job(refresh_id)

    assert state.is_completed(), state.message
    assert list(workspace.tokens) == ["tok-1", "tok-2"]
    assert workspace.tokens_used(RUN_NOW) == ["tok-1"]
    polls = workspace.tokens_used(GET)
    assert polls[-1] == "tok-2", polls  # the poll that saw the run end
    assert polls == sorted(polls)  # renewed once, during the wait: tok-1 until the renewal, tok-2 after it
    assert workspace.unauthorised == 0
    assert len(workspace.calls_to(RUN_NOW)) == 1
    run = assert_one_run(workspace, RUN_NOW)
    [done] = job_events(databricks_jobs["PREFECT_API_URL"], EventName.JOB_COMPLETED, refresh_id)
    assert done["payload"]["run_id"] == str(run.run_id)
