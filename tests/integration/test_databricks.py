"""Databricks through prefect-databricks, with the Jobs API mocked at the HTTP layer (respx) while the real
local Prefect server is passed through. Request bodies are checked against prefect-databricks' generated
Jobs API models; responses follow the Jobs API 2.1 shapes (runs/submit, runs/get, runs/get-output,
runs/cancel, run-now) and Entra ID's token endpoint.
"""

from __future__ import annotations

import json
import re
import time
from datetime import date
from typing import Any

import httpx
import pytest
import respx
from prefect import flow
from prefect_databricks.models.jobs import RunNowInput, RunSubmitSettings, RunSubmitTaskSettings

from tests.support.databricks_api import API, RUN_PAGE, TOKEN_URL, WHEEL
from tollwatch.adapters.databricks_jobs import (
    ComputeSpec,
    DatabricksRunFailed,
    DatabricksRunTimedOut,
    MergeJobArgs,
    idempotency_token,
)
from tollwatch.contract.events import Window
from tollwatch.prefect.databricks_runner import DatabricksRunner

pytestmark = pytest.mark.stack

ARGS = MergeJobArgs(
    landing="abfss://tollwatch@acct.dfs.core.windows.net/raw/qzve-kjga/window=2024-01-01_2024-02-01/",
    table="tollwatch.bronze.bnt_traffic_hourly",
    mode="window",
    refresh_id="r-1",
    start=date(2024, 1, 1),
    stop=date(2024, 2, 1),
    flow_run_id="fr-1",
)
JOB_CLUSTER = ComputeSpec(kind="job_cluster", spark_conf={"spark.sql.shuffle.partitions": "8"})


@pytest.fixture
def prefect_api(stack):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: stack.prefect_api_url}):
        yield stack.prefect_api_url


@pytest.fixture
def api(prefect_api) -> respx.MockRouter:
    """The Databricks and Entra ID endpoints; every other request (the local Prefect server) goes through."""
    with respx.mock(assert_all_called=False) as router:
        router.route(host="127.0.0.1").pass_through()
        tokens = iter(range(1, 100))
        router.post(TOKEN_URL).mock(
            side_effect=lambda request: httpx.Response(
                200, json={"token_type": "Bearer", "expires_in": 3599, "access_token": f"tok-{next(tokens)}"}
            )
        )
        yield router


def run_state(life_cycle: str, result: str | None = None, message: str = "") -> httpx.Response:
    state: dict[str, Any] = {"life_cycle_state": life_cycle, "state_message": message}
    if result:
        state["result_state"] = result
    body = {"run_id": 42, "run_page_url": RUN_PAGE, "state": state, "tasks": [{"run_id": 43, "task_key": "merge"}]}
    return httpx.Response(200, json=body)


def merge_output(result: dict[str, Any]) -> httpx.Response:
    """What `tollwatch-merge` prints, as runs/get-output returns the driver's stdout (`logs`)."""
    printed = {"table": ARGS.table, "mode": ARGS.mode, "refresh_id": ARGS.refresh_id, **result}
    logs = "spark says hi\nTOLLWATCH_RESULT=" + json.dumps(printed) + "\n"
    return httpx.Response(200, json={"logs": logs, "metadata": {"run_id": 43}})


def runner(credentials, **kwargs: Any) -> DatabricksRunner:
    return DatabricksRunner(credentials, **{"backoff_s": 0.01, "poll_s": 0.0, "max_wait_s": 30, **kwargs})


def in_flow(fn):
    """Prefect tasks report to the (real) server from inside a flow run, as in production."""
    return flow(name="databricks-test", validate_parameters=False)(fn)()


def test_merge_submits_the_wheels_entry_point_polls_to_success_and_reads_the_result(api, credentials):
    submit = api.post(f"{API}/runs/submit").mock(return_value=httpx.Response(200, json={"run_id": 42}))
    api.get(f"{API}/runs/get").mock(
        side_effect=[run_state("PENDING"), run_state("RUNNING"), run_state("TERMINATED", "SUCCESS")]
    )
    output = api.get(f"{API}/runs/get-output").mock(
        return_value=merge_output({"rows_written": 16368, "snapshot_id": 7, "already_committed": False})
    )
    token = idempotency_token("merge", "fr-1", "r-1")

    outcome, printed = in_flow(lambda: runner(credentials).merge(JOB_CLUSTER, WHEEL, ARGS, run_name="n", token=token))

    assert outcome.succeeded
    assert outcome.run_page_url == RUN_PAGE
    assert printed is not None
    assert (printed.rows_written, printed.snapshot_id, printed.already_committed) == (16368, 7, False)
    body = json.loads(submit.calls.last.request.content)
    RunSubmitSettings.model_validate({k: v for k, v in body.items() if k != "idempotency_token"})
    task = RunSubmitTaskSettings.model_validate(body["tasks"][0])
    assert body["idempotency_token"] == token
    assert len(token) <= 64
    assert (task.python_wheel_task.package_name, task.python_wheel_task.entry_point) == ("tollwatch", "tollwatch-merge")
    assert task.python_wheel_task.parameters == ARGS.argv()
    assert body["tasks"][0]["libraries"][0]["whl"] == WHEEL  # tollwatch installed on the cluster from the wheel
    assert body["tasks"][0]["new_cluster"]["custom_tags"]["tollwatch-flow-run-id"] == "fr-1"
    assert output.calls.last.request.url.params["run_id"] == "43"  # the task run, not the parent run
    assert submit.calls.last.request.headers["Authorization"] == "Bearer tok-1"


def test_a_retried_submit_reuses_the_idempotency_token_after_503_and_429(api, credentials):
    submit = api.post(f"{API}/runs/submit").mock(
        side_effect=[
            httpx.Response(503, json={"error_code": "TEMPORARILY_UNAVAILABLE"}),
            httpx.Response(429, json={"error_code": "REQUEST_LIMIT_EXCEEDED"}, headers={"Retry-After": "1"}),
            httpx.Response(200, json={"run_id": 42}),
        ]
    )
    api.get(f"{API}/runs/get").mock(return_value=run_state("TERMINATED", "SUCCESS"))
    api.get(f"{API}/runs/get-output").mock(return_value=merge_output({"rows_written": 1}))

    in_flow(lambda: runner(credentials).merge(JOB_CLUSTER, WHEEL, ARGS, run_name="n", token="tok-abc"))

    assert submit.call_count == 3
    assert {json.loads(c.request.content)["idempotency_token"] for c in submit.calls} == {"tok-abc"}


def test_a_bad_request_is_not_retried(api, credentials):
    submit = api.post(f"{API}/runs/submit").mock(
        return_value=httpx.Response(400, json={"error_code": "INVALID_PARAMETER_VALUE", "message": "bad cluster"})
    )
    with pytest.raises(httpx.HTTPStatusError, match="INVALID_PARAMETER_VALUE"):
        in_flow(lambda: runner(credentials).merge(JOB_CLUSTER, WHEEL, ARGS, run_name="n", token="t"))
    assert submit.call_count == 1


@pytest.mark.parametrize(
    ("life_cycle", "result", "named"),
    [
        ("TERMINATED", "FAILED", "FAILED"),
        ("TERMINATED", "TIMEDOUT", "TIMEDOUT"),
        ("TERMINATED", "CANCELED", "CANCELED"),
        ("INTERNAL_ERROR", None, "INTERNAL_ERROR"),
        ("SKIPPED", None, "SKIPPED"),
    ],
)
def test_every_unsuccessful_end_fails_with_its_state_and_reason(api, credentials, life_cycle, result, named):
    api.post(f"{API}/runs/submit").mock(return_value=httpx.Response(200, json={"run_id": 42}))
    api.get(f"{API}/runs/get").mock(return_value=run_state(life_cycle, result, "Task merge failed: boom"))
    error = "AnalysisException: [TABLE_OR_VIEW_NOT_FOUND] tollwatch.bronze.x"
    output = api.get(f"{API}/runs/get-output").mock(
        return_value=httpx.Response(200, json={"error": error, "metadata": {"run_id": 43}})
    )

    with pytest.raises(
        DatabricksRunFailed, match=rf"ended {named}: Task merge failed: boom; merge: {re.escape(error)}"
    ):
        in_flow(lambda: runner(credentials).merge(JOB_CLUSTER, WHEEL, ARGS, run_name="n", token="t"))
    assert output.calls.last.request.url.params["run_id"] == "43"  # the failed task run's own output


def test_waiting_longer_than_allowed_cancels_the_run(api, credentials):
    api.post(f"{API}/runs/submit").mock(return_value=httpx.Response(200, json={"run_id": 42}))
    api.get(f"{API}/runs/get").mock(return_value=run_state("RUNNING"))
    cancel = api.post(f"{API}/runs/cancel").mock(return_value=httpx.Response(200, json={}))

    slow = runner(credentials, max_wait_s=0.5, poll_s=0.1)
    with pytest.raises(DatabricksRunTimedOut, match="cancelled"):
        in_flow(lambda: slow.merge(JOB_CLUSTER, WHEEL, ARGS, run_name="n", token="t"))
    assert json.loads(cancel.calls.last.request.content) == {"run_id": 42}


def test_the_oauth_token_is_fetched_once_and_refreshed_before_it_expires(api, credentials):
    api.post(f"{API}/runs/submit").mock(return_value=httpx.Response(200, json={"run_id": 42}))
    get = api.get(f"{API}/runs/get").mock(return_value=run_state("TERMINATED", "SUCCESS"))
    api.get(f"{API}/runs/get-output").mock(return_value=merge_output({}))
    token_calls = api.routes[1]  # the token route

    in_flow(lambda: runner(credentials).merge(JOB_CLUSTER, WHEEL, ARGS, run_name="n", token="t"))
    assert token_calls.call_count == 1  # three API calls, one token

    credentials._token_expiry = time.time() + 30  # within prefect-databricks' 60 s refresh margin
    in_flow(lambda: runner(credentials).merge(JOB_CLUSTER, WHEEL, ARGS, run_name="n", token="t"))
    assert token_calls.call_count == 2
    assert get.calls.last.request.headers["Authorization"] == "Bearer tok-2"
    form = dict(httpx.QueryParams(token_calls.calls.last.request.content.decode()))
    assert form["grant_type"] == "client_credentials"
    assert form["scope"] == "2ff814a6-3304-4ab8-85cb-cd0e6f879c1d/.default"  # the Azure Databricks resource


def test_run_now_sends_string_job_parameters_and_a_token(api, credentials):
    run_now = api.post(f"{API}/run-now").mock(return_value=httpx.Response(200, json={"run_id": 42}))
    api.get(f"{API}/runs/get").mock(side_effect=[run_state("RUNNING"), run_state("TERMINATED", "SUCCESS")])

    outcome = in_flow(lambda: runner(credentials).run_now(987, {"upstream_snapshot_id": "7"}, token="tok-now"))

    assert outcome.run_page_url == RUN_PAGE
    body = json.loads(run_now.calls.last.request.content)
    parsed = RunNowInput.model_validate({k: v for k, v in body.items() if v is not None and k != "job_parameters"})
    assert parsed.job_id == 987
    assert body["idempotency_token"] == "tok-now"
    assert body["job_parameters"] == {"upstream_snapshot_id": "7"}


def test_serverless_submits_an_environment_for_its_task(api, credentials):
    submit = api.post(f"{API}/runs/submit").mock(return_value=httpx.Response(200, json={"run_id": 42}))
    api.get(f"{API}/runs/get").mock(return_value=run_state("TERMINATED", "SUCCESS"))
    api.get(f"{API}/runs/get-output").mock(return_value=merge_output({}))

    serverless = ComputeSpec(kind="serverless")
    in_flow(lambda: runner(credentials).merge(serverless, WHEEL, ARGS, run_name="n", token="t"))

    body = json.loads(submit.calls.last.request.content)
    assert body["tasks"][0]["environment_key"] == "tollwatch"
    assert body["environments"] == [{"environment_key": "tollwatch", "spec": {"client": "2", "dependencies": [WHEEL]}}]
    assert "libraries" not in body["tasks"][0]  # serverless installs from the environment
    assert "new_cluster" not in body["tasks"][0]
    assert "existing_cluster_id" not in body["tasks"][0]


# ------------------------------------------------------------------------------------ flows on Databricks


def test_ingest_merges_on_databricks_and_announces_the_run_page(databricks_blocks, api):
    from tests.support.prefect_events import wait_for_events
    from tollwatch.prefect.flows.ingest import ingest

    submit = api.post(f"{API}/runs/submit").mock(return_value=httpx.Response(200, json={"run_id": 42}))
    api.get(f"{API}/runs/get").mock(side_effect=[run_state("RUNNING"), run_state("TERMINATED", "SUCCESS")])
    api.get(f"{API}/runs/get-output").mock(
        return_value=merge_output({"rows_read": 1056, "rows_written": 1056, "rows_rejected": 0, "snapshot_id": 99})
    )

    completed = ingest(start=date(2024, 1, 1), stop=date(2024, 1, 3), request_id="dbx")

    assert completed.run_page_url == RUN_PAGE
    assert (completed.rows_fetched, completed.rows_written, completed.snapshot_id) == (1056, 1056, 99)
    body = json.loads(submit.calls.last.request.content)
    task = RunSubmitTaskSettings.model_validate(body["tasks"][0])
    argv = task.python_wheel_task.parameters
    landing = argv[argv.index("--landing") + 1]
    assert landing.startswith("abfss://tollwatch@tollwatchdata.dfs.core.windows.net/raw/qzve-kjga/")
    assert argv[argv.index("--table") + 1] == "tollwatch.bronze.bnt_traffic_hourly"
    assert argv[argv.index("--refresh-id") + 1] == completed.refresh_id
    assert task.existing_cluster_id == "0101-123456-abcdefgh"
    assert completed.flow_run_id in body["run_name"]

    event = wait_for_events(
        databricks_blocks["PREFECT_API_URL"],
        "tollwatch.ingestion.completed",
        lambda e: e["payload"]["refresh_id"] == completed.refresh_id,
    )[0]
    assert event["payload"]["run_page_url"] == RUN_PAGE
    assert "placeholder" not in json.dumps(event)  # the client secret
    assert "tok-1" not in json.dumps(event)  # the OAuth token


def test_a_refresh_merged_on_databricks_announces_the_days_it_touched(databricks_blocks, api, mirror):
    """The days a Spark refresh merged reach the completion event (jobs/merge_bnt.py never recorded them, so a refresh
    merged on Databricks announced `window=None` and every downstream job skipped it)."""
    from tollwatch.prefect.flows.ingest import ingest

    revision = mirror.dataset.revise(date(2024, 3, 5), date(2024, 3, 7))
    api.post(f"{API}/runs/submit").mock(return_value=httpx.Response(200, json={"run_id": 42}))
    api.get(f"{API}/runs/get").mock(return_value=run_state("TERMINATED", "SUCCESS"))
    api.get(f"{API}/runs/get-output").mock(
        return_value=merge_output(
            {
                "mode": "refresh",
                "rows_read": 1056,
                "rows_written": 1056,
                "snapshot_id": 100,
                "touched": "2024-03-05/2024-03-07",
                "committed_through": revision.updated_at,
            }
        )
    )

    completed = ingest(rows_updated_at=revision.updated_at, previous_rows_updated_at=revision.updated_at - 1)

    assert completed.mode == "refresh"
    assert completed.window == Window(start=date(2024, 3, 5), stop=date(2024, 3, 7))
    assert completed.committed_through == revision.updated_at


def test_ingest_fails_with_the_databricks_reason(databricks_blocks, api):
    from tollwatch.prefect.flows.ingest import ingest

    api.post(f"{API}/runs/submit").mock(return_value=httpx.Response(200, json={"run_id": 42}))
    api.get(f"{API}/runs/get").mock(return_value=run_state("TERMINATED", "FAILED", "Workload failed, see run output"))
    api.get(f"{API}/runs/get-output").mock(
        return_value=httpx.Response(200, json={"error": "AnalysisException: no table", "metadata": {"run_id": 43}})
    )

    state = ingest(start=date(2024, 1, 1), stop=date(2024, 1, 2), request_id="dbx-fail", return_state=True)

    assert state.is_failed()
    assert "ended FAILED: Workload failed, see run output; merge: AnalysisException: no table" in state.message


def test_run_job_runs_a_databricks_job_with_parameters_from_the_completion(databricks_blocks, api):
    from tests.support import payloads
    from tollwatch.prefect.flows.run_job import run_job

    run_now = api.post(f"{API}/run-now").mock(return_value=httpx.Response(200, json={"run_id": 42}))
    api.get(f"{API}/runs/get").mock(return_value=run_state("TERMINATED", "SUCCESS"))
    completion = payloads.completion(refresh_id="r-9", snapshot_id=77, landing_uri="abfss://…")

    finished = run_job(job="987", completion=completion, parameters={"team": "finance"}, databricks_job_id=987)

    assert finished.databricks
    assert finished.run_page_url == RUN_PAGE
    assert finished.resource().id == "databricks.job.987"
    body = json.loads(run_now.calls.last.request.content)
    assert body["job_id"] == 987
    assert body["job_parameters"] == {
        "upstream_table": "bronze.bnt_traffic_hourly",
        "upstream_snapshot_id": "77",
        "upstream_refresh_id": "r-9",
        "window_start": "2024-01-01",
        "window_stop": "2024-02-01",
        "team": "finance",
    }
    assert len(body["idempotency_token"]) <= 64


def test_blocks_register_with_prefects_cli(prefect_api):
    import os
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "prefect", "block", "register", "-m", "tollwatch.prefect.blocks"],
        env={**os.environ, "PREFECT_API_URL": prefect_api},
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # tollwatch's four blocks, and prefect-databricks' DatabricksCredentials (the fallback) that blocks.py imports
    assert "Successfully registered 5 blocks" in result.stdout
    assert "tollwatch Databricks identity" in result.stdout
