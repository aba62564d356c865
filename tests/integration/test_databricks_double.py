"""The Databricks runner end to end against a Jobs API 2.1 double that EXECUTES the submitted work.

`tests/support/databricks_double.py` serves the Jobs API over loopback HTTPS and runs each `python_wheel_task` with
`spark-submit` of the wheel's entry point (local[1], the Iceberg runtime jars, Iceberg's JDBC catalog on this test's
pyiceberg catalog database), reading the landing from Azurite through its "storage mount" (abfss:// → Azurite).

Two kinds of tests:
- the double's own contract (no stack, no JVM): TLS trust through SSL_CERT_FILE, validation, life cycle, output,
  idempotency, cancel — with a stand-in `spark-submit` that records what it was given;
- `stack` + `spark`: the ingest flow in this process with TOLLWATCH_ENGINE=databricks, prefect-databricks calling the
  double, the merge run by real Spark; and run-now of the bundle's merge job. The Spark runs share the session's warm
  driver (`warm_clusters`, tests/support/warm_driver.py): one JVM start (~15-25 s on two cores) for all of them, each
  run in a Spark session of its own; the last test cancels a run on it (which ends that driver).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any

import httpx
import pytest
from prefect_databricks import DatabricksCredentials
from prefect_databricks.jobs import jobs_run_now, jobs_runs_get, jobs_runs_get_output, jobs_runs_submit
from prefect_databricks.models.jobs import RunSubmitTaskSettings

from tests.support.databricks_double import PLACEHOLDER_PAT, DatabricksJobsDouble, bundle_jobs, save_workspace_blocks
from tests.support.warm_driver import WarmClusters
from tollwatch import resources
from tollwatch.adapters.socrata import build_http_client
from tollwatch.adapters.spark_submit import catalog_conf, find_jars, read_result
from tollwatch.contract import table as contract
from tollwatch.contract.events import Window
from tollwatch.contract.settings import load_settings
from tollwatch.core.ingest import IngestRequest, fetch_and_land, plan_fetch

ROOT = Path(__file__).resolve().parents[2]
JARS_DIR = ROOT / ".jars"
PAT = PLACEHOLDER_PAT
AZURITE = (
    "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=placeholder;"
    "BlobEndpoint=http://127.0.0.1:10000/devstoreaccount1;"
)
ROWS_PER_DAY = 11 * 2 * 24
WHEEL = "/Workspace/Shared/tollwatch/artifacts/.internal/tollwatch-0.1.0-py3-none-any.whl"

#: A stand-in for spark-submit (the double's contract tests start no JVM): prints what it was given as JSON, then a
#: result line; `--sleep` waits to be cancelled, `--fail` dies with a traceback the way a failing driver does. It runs
#: for at least a second, as any driver does: a poller (an HTTPS call each) on a loaded machine must be able to see
#: RUNNING (it missed it twice in six runs when the stand-in ended within ~0.1 s).
FAKE_SPARK_SUBMIT = f"""#!{sys.executable}
import json, os, sys, time
args = sys.argv[1:]
at = next(i for i, a in enumerate(args) if a.endswith(".py"))
app = args[at + 1 :]
seen = {{
    "options": args[:at],
    "script": args[at],
    "argv": app,
    "storage": os.environ.get("TOLLWATCH_STORAGE_CONNECTION_STRING"),
    "engine": os.environ.get("TOLLWATCH_ENGINE"),
    "pid": os.getpid(),
}}
print("FAKE_SUBMIT=" + json.dumps(seen), flush=True)
print("25/01/01 00:00:00 INFO SparkContext: Running Spark version 3.5", file=sys.stderr, flush=True)
if "--sleep" in app:
    time.sleep(600)
time.sleep(1.0)
if "--fail" in app:
    raise FileNotFoundError("no sealed landing at abfss://x (manifest.json missing or unreadable)")
print('TOLLWATCH_RESULT={{"table": "t.b.c", "mode": "window", "refresh_id": "r", "rows_written": 3}}', flush=True)
"""

WHEEL_TASK = {
    "task_key": "merge",
    "existing_cluster_id": "0101-000000-double",
    "python_wheel_task": {
        "package_name": "tollwatch",
        "entry_point": "tollwatch-merge",
        "parameters": ["--landing", "abfss://landing@devstoreaccount1.dfs.core.windows.net/raw/x/", "--mode", "window"],
    },
    "libraries": [{"whl": WHEEL}],
}

#: A job as the bundle defines one (resources/jobs.py): flags filled from job parameters by dynamic value references.
JOB = {
    "name": "tollwatch daily totals",
    "max_concurrent_runs": 1,
    "queue": {"enabled": True},
    "parameters": [{"name": "window_start", "default": ""}, {"name": "upstream_table", "default": "bronze.t"}],
    "tasks": [
        {
            "task_key": "daily_totals",
            "job_cluster_key": "tollwatch",
            "python_wheel_task": {
                "package_name": "tollwatch",
                "entry_point": "tollwatch-daily-totals",
                "parameters": ["--start={{job.parameters.window_start}}", "--table={{job.parameters.upstream_table}}"],
            },
        }
    ],
}


def headers(token: str = PAT) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def wait_until(predicate: Any, timeout_s: float = 30, message: str = "condition") -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"{message} not reached within {timeout_s}s")


def fake_seen(logs: str) -> dict[str, Any]:
    line = next(line for line in logs.splitlines() if line.startswith("FAKE_SUBMIT="))
    return json.loads(line.removeprefix("FAKE_SUBMIT="))


# ------------------------------------------------------------------------------ the double's own contract (no JVM)


@pytest.fixture
def fake_spark_submit(tmp_path: Path) -> str:
    path = tmp_path / "spark-submit"
    path.write_text(FAKE_SPARK_SUBMIT)
    path.chmod(0o755)
    return str(path)


@pytest.fixture
def double(fake_spark_submit: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[DatabricksJobsDouble]:
    monkeypatch.setenv("TOLLWATCH_ENGINE", "databricks")  # the caller's settings: the "cluster" must not see them
    conf = {"spark.sql.catalog.tollwatch.uri": "jdbc:sqlite:/nowhere/catalog.db"}
    with DatabricksJobsDouble(
        jars=[],
        conf=conf,
        storage_connection_string=AZURITE,
        jobs={"daily": JOB},
        token=PAT,
        spark_submit=fake_spark_submit,
    ) as running:
        for key, value in running.client_env().items():
            monkeypatch.setenv(key, value)
        yield running


@pytest.fixture
def api(double: DatabricksJobsDouble) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"{double.url}/api/2.1/jobs", headers=headers(), timeout=30) as client:
        yield client


def test_clients_trust_the_double_through_ssl_cert_file(double: DatabricksJobsDouble, monkeypatch: pytest.MonkeyPatch):
    """httpx (prefect-databricks' client) reads SSL_CERT_FILE with trust_env, its default; without it the throwaway
    CA is unknown and the handshake fails."""
    assert httpx.get(f"{double.url}/api/2.1/jobs/runs/get?run_id=1").status_code == 401  # trusted: the API answers
    monkeypatch.delenv("SSL_CERT_FILE")
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{double.url}/api/2.1/jobs/runs/get?run_id=1")
    bundle = double.ca_bundle.read_text()
    assert bundle.count("BEGIN CERTIFICATE") > 100, "certifi's CAs stay trusted for every other host"


def test_requests_are_authenticated_and_validated(double: DatabricksJobsDouble, api: httpx.Client):
    anonymous = httpx.post(f"{double.url}/api/2.1/jobs/runs/submit", json={"tasks": [WHEEL_TASK]})
    assert anonymous.status_code == 401
    assert api.post("runs/submit", json={"tasks": [WHEEL_TASK]}, headers=headers("other")).status_code == 403

    def refused(response: httpx.Response, *words: str) -> None:
        assert response.status_code == 400, response.text
        body = response.json()
        assert body["error_code"] == "INVALID_PARAMETER_VALUE", body
        assert all(word in body["message"] for word in words), body

    refused(api.post("runs/submit", json={"tasks": "merge"}), "tasks")
    refused(api.post("runs/submit", json={"tasks": [{**WHEEL_TASK, "task_key": None}]}), "task_key")
    refused(api.post("runs/submit", json={"tasks": []}), "At least one task")
    no_wheel = {k: v for k, v in WHEEL_TASK.items() if k != "python_wheel_task"} | {
        "notebook_task": {"notebook_path": "/x"}
    }
    refused(api.post("runs/submit", json={"tasks": [no_wheel]}), "python_wheel_task")
    no_compute = {k: v for k, v in WHEEL_TASK.items() if k != "existing_cluster_id"}
    refused(api.post("runs/submit", json={"tasks": [no_compute]}), "existing_cluster_id")
    refused(api.post("runs/submit", json={"tasks": [WHEEL_TASK], "idempotency_token": "x" * 65}), "64")
    refused(api.post("run-now", json={"job_id": 1}), "Job 1 does not exist")
    refused(api.post("run-now", json={"job_id": "x"}), "job_id")
    job = double.job_id("daily")
    refused(api.post("run-now", json={"job_id": job, "job_parameters": {"window_start": 7}}), "job_parameters")
    refused(api.get("runs/get", params={"run_id": 424242}), "Run 424242 does not exist")
    assert api.get("runs/list").json()["error_code"] == "ENDPOINT_NOT_FOUND"
    assert double.runs == {}, "nothing invalid was started"
    assert [c.status for c in double.calls].count(400) == 10


def test_a_submitted_wheel_task_runs_through_prefect_databricks_with_its_life_cycle_and_output(
    double: DatabricksJobsDouble,
):
    """prefect-databricks' own tasks (with a PAT: no Entra ID token endpoint) against the double."""
    credentials = DatabricksCredentials(databricks_instance=double.host, token=PAT)
    task = RunSubmitTaskSettings.model_validate(WHEEL_TASK)

    async def submit_and_poll() -> tuple[dict[str, Any], list[str]]:
        submitted = await jobs_runs_submit.fn(
            databricks_credentials=credentials, tasks=[task], run_name="n", idempotency_token="tok-1"
        )
        seen: list[str] = []
        while True:
            run = await jobs_runs_get.fn(run_id=submitted["run_id"], databricks_credentials=credentials)
            if not seen or seen[-1] != run["state"]["life_cycle_state"]:
                seen.append(run["state"]["life_cycle_state"])
            if run["state"]["life_cycle_state"] == "TERMINATED":
                return run, seen
            await asyncio.sleep(0.05)

    run, seen = asyncio.run(submit_and_poll())

    assert seen == ["PENDING", "RUNNING", "TERMINATED"]
    assert run["state"]["result_state"] == "SUCCESS"
    assert run["run_type"] == "SUBMIT_RUN"
    assert run["run_page_url"] == f"https://{double.host}/?o=0#job/{run['job_id']}/run/{run['run_id']}"
    [task_run] = run["tasks"]
    assert task_run["task_key"] == "merge"
    assert task_run["run_id"] != run["run_id"]
    # (prefect-databricks sends a list's models with their unset fields as nulls)
    assert [{k: v for k, v in lib.items() if v is not None} for lib in task_run["libraries"]] == [{"whl": WHEEL}]

    output = asyncio.run(jobs_runs_get_output.fn(run_id=task_run["run_id"], databricks_credentials=credentials))
    assert output["logs_truncated"] is False
    assert read_result(output["logs"]).rows_written == 3  # the driver's stdout is the task's logs
    assert "INFO SparkContext" not in output["logs"]  # stderr (Spark's own log) is not
    assert "error" not in output
    sent = fake_seen(output["logs"])
    # the entry point's module file, on local[1], named after the entry point
    assert sent["script"].endswith("tollwatch/spark/merge.py")
    assert sent["options"][:4] == ["--master", "local[1]", "--name", "tollwatch-merge"]
    assert "spark.sql.catalog.tollwatch.uri=jdbc:sqlite:/nowhere/catalog.db" in sent["options"]
    # the storage mount: abfss:// of the Azurite account as its blob URL, the connection string in the environment
    assert sent["argv"] == ["--landing", "http://127.0.0.1:10000/devstoreaccount1/landing/raw/x/", "--mode", "window"]
    assert sent["storage"] == AZURITE
    assert sent["engine"] is None  # the caller's TOLLWATCH_* settings stay with the caller
    # the API reports the parameters as the task was given them
    assert task_run["python_wheel_task"]["parameters"] == WHEEL_TASK["python_wheel_task"]["parameters"]
    assert {c.authorization for c in double.calls} == {f"Bearer {PAT}"}

    with pytest.raises(httpx.HTTPStatusError, match="multiple tasks"):  # output is per task run, as on Databricks
        asyncio.run(jobs_runs_get_output.fn(run_id=run["run_id"], databricks_credentials=credentials))


def test_one_idempotency_token_one_run_even_when_both_requests_race(double: DatabricksJobsDouble, api: httpx.Client):
    body = {"run_name": "n", "tasks": [WHEEL_TASK], "idempotency_token": "same-token"}

    async def twice() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=api.base_url, headers=headers(), timeout=30) as client:
            return list(await asyncio.gather(*(client.post("runs/submit", json=body) for _ in range(2))))

    first, second = asyncio.run(twice())
    run_id = first.json()["run_id"]
    assert second.json()["run_id"] == run_id
    double.wait(run_id)
    assert api.post("runs/submit", json=body).json()["run_id"] == run_id  # also after it finished
    assert len(double.runs) == 1
    assert len(double.spark_submits) == 1
    other = api.post("runs/submit", json={**body, "idempotency_token": "another"}).json()["run_id"]
    assert other != run_id


def test_a_failing_driver_fails_the_run_and_its_output_says_why(double: DatabricksJobsDouble, api: httpx.Client):
    failing = json.loads(json.dumps(WHEEL_TASK))
    failing["python_wheel_task"]["parameters"].append("--fail")
    run_id = api.post("runs/submit", json={"tasks": [failing]}).json()["run_id"]

    run = double.wait(run_id)

    assert run["state"]["life_cycle_state"] == "TERMINATED"
    assert run["state"]["result_state"] == "FAILED"
    # as Databricks words it: the reason is in the task's output, not in the run's state
    assert run["state"]["state_message"] == (
        "Task merge failed with message: Workload failed, see run output for details. This caused all downstream "
        "tasks to get skipped."
    )
    output = api.get("runs/get-output", params={"run_id": run["tasks"][0]["run_id"]}).json()
    assert output["error"] == "FileNotFoundError: no sealed landing at abfss://x (manifest.json missing or unreadable)"
    assert output["error_trace"].startswith("Traceback (most recent call last):")
    assert "INFO SparkContext" not in output["error_trace"]


def test_an_unknown_entry_point_is_an_internal_error(double: DatabricksJobsDouble, api: httpx.Client):
    unknown = json.loads(json.dumps(WHEEL_TASK))
    unknown["python_wheel_task"]["entry_point"] = "tollwatch-nothing"
    run = double.wait(api.post("runs/submit", json={"tasks": [unknown]}).json()["run_id"])
    assert run["state"]["life_cycle_state"] == "INTERNAL_ERROR"
    assert run["state"]["result_state"] == "FAILED"
    assert "has no entry point 'tollwatch-nothing'" in run["state"]["state_message"]
    assert double.spark_submits == []


def test_cancel_kills_the_driver_and_the_run_ends_canceled(double: DatabricksJobsDouble, api: httpx.Client):
    sleeping = json.loads(json.dumps(WHEEL_TASK))
    sleeping["python_wheel_task"]["parameters"].append("--sleep")
    run_id = api.post("runs/submit", json={"tasks": [sleeping]}).json()["run_id"]
    task_run_id = double.runs[run_id].tasks[0].run_id

    def driver_pid() -> int | None:
        logs = api.get("runs/get-output", params={"run_id": task_run_id}).json()["logs"]
        return fake_seen(logs)["pid"] if "FAKE_SUBMIT=" in logs else None

    pid = wait_until(driver_pid, message="the driver running")
    assert api.get("runs/get", params={"run_id": run_id}).json()["state"]["life_cycle_state"] == "RUNNING"

    assert api.post("runs/cancel", json={"run_id": run_id}).json() == {}
    run = double.wait(run_id, timeout_s=30)

    assert (run["state"]["life_cycle_state"], run["state"]["result_state"]) == ("TERMINATED", "CANCELED")
    assert run["state"]["user_cancelled_or_timedout"] is True
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert api.post("runs/cancel", json={"run_id": run_id}).json() == {}  # cancelling a finished run is a no-op


def test_run_now_fills_the_tasks_parameters_from_the_jobs_parameters(double: DatabricksJobsDouble, api: httpx.Client):
    job_id = double.job_id("daily")
    assert double.job_id("tollwatch daily totals") == job_id
    body = {"job_id": job_id, "job_parameters": {"window_start": "2024-01-01"}, "idempotency_token": "now-1"}

    run_id = api.post("run-now", json=body).json()["run_id"]
    assert api.post("run-now", json=body).json()["run_id"] == run_id
    run = double.wait(run_id)

    assert run["run_type"] == "JOB_RUN"
    assert run["job_id"] == job_id
    assert run["run_page_url"] == f"https://{double.host}/?o=0#job/{job_id}/run/{run_id}"
    assert run["job_parameters"] == [
        {"name": "window_start", "default": "", "value": "2024-01-01"},
        {"name": "upstream_table", "default": "bronze.t", "value": "bronze.t"},
    ]
    [task_run] = run["tasks"]
    assert task_run["python_wheel_task"]["parameters"] == ["--start=2024-01-01", "--table=bronze.t"]
    logs = api.get("runs/get-output", params={"run_id": task_run["run_id"]}).json()["logs"]
    sent = fake_seen(logs)
    assert sent["script"].endswith("tollwatch/spark/daily_totals.py")
    assert sent["options"][2:4] == ["--name", "tollwatch-daily-totals"]
    assert sent["argv"] == ["--start=2024-01-01", "--table=bronze.t"]
    assert len(double.spark_submits) == 1


# --------------------------------------------------------------------------- the ingest flow, Spark through the double


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """The bundle's jobs as the Databricks CLI loads them from resources/."""
    return bundle_jobs(tmp_path_factory.mktemp("bundle"))


@pytest.fixture
def workspace(
    env: dict[str, str],
    bundle: dict[str, dict[str, Any]],
    warm_clusters: WarmClusters,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[DatabricksJobsDouble]:
    """A workspace whose clusters see this test's catalog (Iceberg's JDBC catalog on pyiceberg's catalog.db) and
    whose storage mount is this test's Azurite, its runs in the session's warm driver; this process trusts its
    certificate."""
    settings = load_settings()
    resources.table_store(settings)  # the catalog database exists, in WAL mode, before a driver opens it
    conf = catalog_conf(settings.catalog_name, settings.resolved_catalog_properties())
    with DatabricksJobsDouble(
        jars=find_jars(JARS_DIR),
        conf=conf,
        storage_connection_string=env["TOLLWATCH_STORAGE_CONNECTION_STRING"],
        jobs=bundle,
        token=PAT,
        clusters=warm_clusters,
    ) as running:
        for key, value in running.client_env().items():
            monkeypatch.setenv(key, value)
        yield running


@pytest.fixture
def on_databricks(
    workspace: DatabricksJobsDouble, env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> DatabricksJobsDouble:
    save_workspace_blocks(workspace, env["TOLLWATCH_STORAGE_CONTAINER"])
    monkeypatch.setenv("TOLLWATCH_ENGINE", "databricks")
    monkeypatch.setenv("TOLLWATCH_DATABRICKS_POLL_S", "0.5")
    return workspace


def table_rows() -> int:
    table = resources.table_store(load_settings()).table()
    return 0 if table is None else table.scan().to_arrow().num_rows


@pytest.mark.stack
@pytest.mark.spark
def test_ingest_merges_with_spark_through_the_double_and_a_replay_is_already_committed(
    on_databricks: DatabricksJobsDouble,
):
    from tollwatch.prefect.flows.ingest import ingest

    started = time.monotonic()
    completed = ingest(start=date(2024, 1, 1), stop=date(2024, 1, 4), request_id="double")
    first_s = time.monotonic() - started

    [run] = on_databricks.runs.values()
    [task_run_id] = [task.run_id for task in run.tasks]
    assert completed.engine == "databricks"
    assert completed.run_page_url == on_databricks.run_page_url(run)
    assert completed.run_page_url.startswith(f"https://{on_databricks.host}/?o=0#job/")
    assert (completed.rows_fetched, completed.rows_written, completed.rows_rejected) == (3 * ROWS_PER_DAY,) * 2 + (0,)
    assert completed.window == Window(start=date(2024, 1, 1), stop=date(2024, 1, 4))
    # the rows Spark wrote, read back with pyiceberg from the catalog both engines share
    store = resources.table_store(load_settings())
    table = store.table()
    assert table is not None
    assert table.scan().to_arrow().num_rows == 3 * ROWS_PER_DAY
    assert completed.snapshot_id == table.current_snapshot().snapshot_id
    summary = table.current_snapshot().summary.additional_properties
    assert summary[contract.REFRESH_ID] == completed.refresh_id
    assert summary[contract.FLOW_RUN_ID] == completed.flow_run_id
    # what the flow submitted: the wheel's entry point, the landing on abfss, the workspace's wheel installed
    [submit] = on_databricks.calls_to("POST", "runs/submit")
    task = submit.body["tasks"][0]
    assert (task["python_wheel_task"]["entry_point"], task["existing_cluster_id"]) == (
        "tollwatch-merge",
        "0101-000000-double",
    )
    assert {k: v for k, v in task["libraries"][0].items() if v is not None} == {"whl": load_settings().databricks_wheel}
    argv = task["python_wheel_task"]["parameters"]
    assert argv[argv.index("--landing") + 1].startswith(
        f"abfss://{load_settings().storage_container}@devstoreaccount1.dfs.core.windows.net/raw/qzve-kjga/"
    )
    # the same body with the same idempotency token (a retried submit): the same run, no second Spark run
    again = httpx.post(f"{on_databricks.url}/api/2.1/jobs/runs/submit", json=submit.body, headers=headers())
    assert again.json()["run_id"] == run.run_id
    [warm] = on_databricks.warm_runs  # in the cluster's warm driver (no spark-submit), with the mounted landing
    assert (warm.cluster, warm.entry_point, warm.task_run_id) == ("0101-000000-double", "tollwatch-merge", task_run_id)
    assert warm.argv[warm.argv.index("--landing") + 1].startswith("http://127.0.0.1:")
    assert on_databricks.spark_submits == []
    # the task's logs are what the entry point wrote (its result line, its progress), not the JVM's log4j
    output = httpx.get(
        f"{on_databricks.url}/api/2.1/jobs/runs/get-output", params={"run_id": task_run_id}, headers=headers()
    ).json()
    assert read_result(output["logs"]).snapshot_id == completed.snapshot_id
    assert f"INFO tollwatch.spark: wrote {3 * ROWS_PER_DAY} rows" in output["logs"]
    assert "SparkContext" not in output["logs"]
    assert "JdbcCatalog" not in output["logs"]

    started = time.monotonic()
    replay = ingest(start=date(2024, 1, 1), stop=date(2024, 1, 4), request_id="double")
    replay_s = time.monotonic() - started

    assert replay.refresh_id == completed.refresh_id
    assert replay.already_committed
    assert replay.snapshot_id == completed.snapshot_id
    assert len(on_databricks.warm_runs) == 2  # the replay ran Spark, whose ledger check found the refresh
    assert len(list(store.table().snapshots())) == len(list(table.snapshots()))
    assert table_rows() == 3 * ROWS_PER_DAY
    print(f"ingest on the double: first {first_s:.1f}s, replay {replay_s:.1f}s")


@pytest.mark.stack
@pytest.mark.spark
def test_a_failing_run_fails_the_flow_with_the_drivers_reason(on_databricks: DatabricksJobsDouble, env: dict[str, str]):
    """The cluster is told the landing is in a container that does not exist (a storage block pointing at the
    wrong container): the driver fails reading it, the run ends FAILED, the flow fails."""
    from tollwatch.prefect.blocks import AzureStorageLocation
    from tollwatch.prefect.flows.ingest import ingest

    missing = f"missing-{uuid.uuid4().hex[:12]}"
    AzureStorageLocation(account="devstoreaccount1", container=missing).save("tollwatch", overwrite=True)

    state = ingest(start=date(2024, 1, 1), stop=date(2024, 1, 2), request_id="double-fails", return_state=True)

    assert state.is_failed()
    [run] = on_databricks.runs.values()
    assert f"Databricks run {run.run_id} ended FAILED" in state.message
    assert on_databricks.run_page_url(run) in state.message
    [task] = run.tasks
    output = httpx.get(
        f"{on_databricks.url}/api/2.1/jobs/runs/get-output", params={"run_id": task.run_id}, headers=headers()
    ).json()
    assert "ContainerNotFound" in output["error_trace"] or "container does not exist" in output["error"], output
    assert table_rows() == 0
    assert output["error"] in state.message  # the driver's reason, not Databricks' generic "see run output"


@pytest.mark.stack
@pytest.mark.spark
def test_run_now_of_the_bundles_merge_job_twice_with_one_token_starts_one_spark_run(
    workspace: DatabricksJobsDouble, env: dict[str, str]
):
    """The bundle's `tollwatch_merge` job (as resources/jobs.py defines it) on a landing put into Azurite by
    tollwatch's own fetch_and_land; run-now sent twice at once with one idempotency token."""
    settings = load_settings()
    window = Window(start=date(2024, 2, 1), stop=date(2024, 2, 3))
    request = IngestRequest(
        mode="window", domain="data.ny.gov", dataset_id="qzve-kjga", refresh_id="run-now-once", window=window
    )
    with build_http_client(str(settings.upstream_url), 30.0) as http:
        socrata = resources.socrata_client(settings, http)
        plan = plan_fetch(request, socrata, committed_through=None)
        manifest = fetch_and_land(
            request, plan, socrata, resources.landing_zone(settings), run_id="test", page_size=1000
        )
    landing = f"abfss://{settings.storage_container}@devstoreaccount1.dfs.core.windows.net/{manifest.prefix}"
    parameters = {
        "landing": landing,
        "mode": "window",
        "start": "2024-02-01",
        "stop": "2024-02-03",
        "refresh_id": "run-now-once",
    }
    credentials = DatabricksCredentials(databricks_instance=workspace.host, token=PAT)
    job_id = workspace.job_id("tollwatch_merge")

    async def twice() -> list[dict[str, Any]]:
        call = jobs_run_now.fn(
            databricks_credentials=credentials,
            job_id=job_id,
            idempotency_token="tok-run-now",
            job_parameters=parameters,
        )
        again = jobs_run_now.fn(
            databricks_credentials=credentials,
            job_id=job_id,
            idempotency_token="tok-run-now",
            job_parameters=parameters,
        )
        return list(await asyncio.gather(call, again))

    first, second = asyncio.run(twice())
    assert first["run_id"] == second["run_id"]
    run = workspace.wait(first["run_id"], timeout_s=300)

    assert (run["state"]["life_cycle_state"], run["state"]["result_state"]) == ("TERMINATED", "SUCCESS"), run
    [warm] = workspace.warm_runs  # the job's cluster (`tollwatch`): one Spark run for the two requests
    assert (warm.cluster, warm.entry_point) == ("tollwatch", "tollwatch-merge")
    values = {p["name"]: p["value"] for p in run["job_parameters"]}
    assert values["table"] == "tollwatch.bronze.bnt_traffic_hourly"  # the job's default
    assert values["flow_run_id"] == ""
    [task] = run["tasks"]
    assert f"--landing={landing}" in task["python_wheel_task"]["parameters"]
    assert "--flow-run-id=" in task["python_wheel_task"]["parameters"]  # not set: empty, read as "not given"
    output = asyncio.run(jobs_runs_get_output.fn(run_id=task["run_id"], databricks_credentials=credentials))
    printed = read_result(output["logs"])
    assert printed is not None
    assert (printed.rows_written, printed.refresh_id, printed.already_committed) == (
        2 * ROWS_PER_DAY,
        "run-now-once",
        False,
    )
    table = resources.table_store(settings).table()
    assert table is not None
    assert table.current_snapshot().snapshot_id == printed.snapshot_id
    assert table_rows() == 2 * ROWS_PER_DAY


@pytest.mark.stack
@pytest.mark.spark
def test_on_databricks_the_audit_runs_on_the_cluster_holds_a_bad_load_and_publishes_a_good_one(
    on_databricks: DatabricksJobsDouble, mirror
):
    """Where the flow cannot read the table, `tollwatch-merge --audit` branches, judges and publishes on the cluster
    with the same checks; the flow announces what it decided (held: no completion; passed: the quality summary)."""
    from tollwatch.contract.events import IngestionCompleted, IngestionHeld
    from tollwatch.prefect.flows.ingest import ingest

    mirror.dataset.corrupt(mirror.dataset.seq_of(date(2024, 1, 2), 4, 5, "O"), "hour", None)

    held = ingest(start=date(2024, 1, 1), stop=date(2024, 1, 4), request_id="double-held")

    assert isinstance(held, IngestionHeld), held
    assert held.quality.failing == ["completeness"]
    store = resources.table_store(load_settings())
    table = store.table()
    assert table.scan().to_arrow().num_rows == 0  # main: only the empty base the branch was cut from
    assert held.branch == contract.audit_branch(held.refresh_id)
    assert held.branch in table.metadata.refs
    assert contract.HELD_PREFIX + held.refresh_id in table.properties  # the record the CLI lists
    argv = on_databricks.calls_to("POST", "runs/submit")[0].body["tasks"][0]["python_wheel_task"]["parameters"]
    assert "--audit" in argv

    # a replay of the held load stays held (tests/integration/test_wap.py proves it locally; the cluster reads the
    # same record: `tollwatch.spark.merge.load_audited` returns it before loading anything)

    done = ingest(start=date(2024, 1, 4), stop=date(2024, 1, 6), request_id="double-clean")

    assert isinstance(done, IngestionCompleted), done
    assert done.quality is not None
    assert done.quality.verdict == "passed"
    checks = {c["name"]: c for c in done.quality.checks}
    assert checks["reconciliation"]["evaluated"] is True  # the upstream's counts the flow left in the landing
    table = store.table()
    assert table.scan().to_arrow().num_rows == 2 * ROWS_PER_DAY
    assert done.snapshot_id == table.current_snapshot().snapshot_id
    assert set(table.metadata.refs) == {contract.MAIN, held.branch}  # the published branch went, the held one stays


@pytest.mark.stack
@pytest.mark.spark
def test_a_cancel_ends_the_warm_driver_and_the_next_run_starts_another(workspace: DatabricksJobsDouble):
    """A cancel ends a run in the warm driver by ending the driver (its JVM with it): the run is CANCELED, no process
    of the driver's group is left, and the next run starts a new driver (here cancelled while it starts up).

    The run is held where it reads its landing: the storage mount points at a server that accepts the connection and
    never answers. Last in this module: the session's next Spark run on the double (if any) starts a new driver."""
    import base64
    import socket

    silent = socket.create_server(("127.0.0.1", 0))  # listens (the kernel accepts), never answers
    port = silent.getsockname()[1]
    key = base64.b64encode(b"placeholder, not a secret").decode()  # the SDK signs requests with it: base64
    workspace.mount_storage(
        f"DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey={key};"
        f"BlobEndpoint=http://127.0.0.1:{port}/devstoreaccount1;"
    )
    argv = ["--landing", "abfss://landing@devstoreaccount1.dfs.core.windows.net/raw/held/", "--table"]
    argv += ["tollwatch.bronze.bnt_traffic_hourly", "--mode", "refresh", "--refresh-id", "held"]
    task = {**WHEEL_TASK, "python_wheel_task": {**WHEEL_TASK["python_wheel_task"], "parameters": argv}}
    task.pop("libraries")
    driver = workspace.warm_driver()

    def submit() -> int:
        answer = httpx.post(f"{workspace.url}/api/2.1/jobs/runs/submit", json={"tasks": [task]}, headers=headers())
        return int(answer.json()["run_id"])

    def cancel(run_id: int) -> dict[str, Any]:
        httpx.post(f"{workspace.url}/api/2.1/jobs/runs/cancel", json={"run_id": run_id}, headers=headers())
        return workspace.wait(run_id, timeout_s=60)

    try:
        held = submit()
        task_run = workspace.runs[held].tasks[0]
        wait_until(lambda: task_run.life_cycle_state != "PENDING", 300, "the task starting")
        assert task_run.life_cycle_state == "RUNNING", (task_run.state_message, task_run.stdout[-20:])
        pid, starts = driver.pid, driver.starts
        assert pid is not None
        time.sleep(1)  # into the landing's download, which does not return
        assert task_run.life_cycle_state == "RUNNING", (task_run.state_message, task_run.stdout[-20:])

        run = cancel(held)

        assert (run["state"]["life_cycle_state"], run["state"]["result_state"]) == ("TERMINATED", "CANCELED")
        assert run["tasks"][0]["state"]["result_state"] == "CANCELED"
        with pytest.raises(ProcessLookupError):
            os.killpg(pid, 0)  # the Python driver and its JVM
        assert driver.pid is None

        starting = submit()
        new_pid = wait_until(lambda: driver.pid, 60, "a new driver starting")
        assert new_pid != pid
        assert driver.starts == starts + 1
        run = cancel(starting)
        assert (run["state"]["life_cycle_state"], run["state"]["result_state"]) == ("TERMINATED", "CANCELED")
        with pytest.raises(ProcessLookupError):
            os.killpg(new_pid, 0)
    finally:
        silent.close()
