"""The chain once with `TOLLWATCH_ENGINE=databricks`, through the real worker, Spark run by the Jobs API double.

publish → watcher → tollwatch.dataset.refreshed → ingest run (worker) → runs/submit of the wheel's `tollwatch-merge`
→ Spark merges the landing from Azurite into the Iceberg table → tollwatch.ingestion.completed with the run page →
the team's `run-databricks-job` subscription → run-job run → run-now of the bundle's `tollwatch_daily_totals` job →
Spark writes the daily totals → tollwatch.job.completed on `databricks.job.<id>`.

The double (tests/support/databricks_double.py) is started before the stack, so the worker, the warm server and
every flow run inherit `SSL_CERT_FILE` (its CA) and the engine setting; its clusters share the stack's catalog
database (Iceberg's JDBC catalog on pyiceberg's catalog.db under the stack's warehouse) and mount its Azurite.
Two Spark runs, the merge and the daily totals, in the session's warm driver (`warm_clusters`): no JVM start of their
own once a test has started it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import date

import pytest

from tests.support.databricks_chain import databricks_chain
from tests.support.databricks_double import DatabricksJobsDouble
from tests.support.warm_driver import WarmClusters
from tollwatch import resources
from tollwatch.contract.events import EventName
from tollwatch.contract.settings import load_settings
from tollwatch_dev.stack import StackEndpoints

pytestmark = [pytest.mark.stack, pytest.mark.spark]

ROWS_PER_DAY = 11 * 2 * 24
DAILY_ROWS_PER_DAY = 11 * 2  # plazas x directions


@pytest.fixture(scope="module")
def chain(
    tmp_path_factory: pytest.TempPathFactory, warm_clusters: WarmClusters
) -> Iterator[tuple[StackEndpoints, DatabricksJobsDouble, float]]:
    """The double, then a stack of the module's own deployed with the databricks engine, then the subscription."""
    began = time.monotonic()
    state, bundle = tmp_path_factory.mktemp("chain-databricks"), tmp_path_factory.mktemp("bundle")
    with databricks_chain(state, bundle, warm_clusters) as ready:
        yield ready.endpoints, ready.double, time.monotonic() - began


@pytest.mark.timeout(1200)
def test_publish_merges_with_spark_on_the_double_then_the_databricks_daily_totals_job_runs(chain):
    from tollwatch.prefect.observe import connect
    from tollwatch_dev.demo import publish_week, wait_for_chain, watch_once

    endpoints, double, setup_s = chain
    started = time.monotonic()
    publish_week(endpoints.mirror_url)
    event_id = watch_once()
    trace = wait_for_chain(event_id, 900, lambda _: None)
    chain_s = time.monotonic() - started
    text = trace.render()

    assert "tollwatch.ingestion.completed" in text, text
    assert "tollwatch.job.completed" in text, text
    job_id = double.job_id("tollwatch_daily_totals")
    merge_run, totals_run = sorted(double.runs.values(), key=lambda r: r.run_id)
    assert (merge_run.run_type, totals_run.run_type) == ("SUBMIT_RUN", "JOB_RUN")
    assert (totals_run.job_id, totals_run.result_state) == (job_id, "SUCCESS")
    # the merge on the workspace's all-purpose cluster, the daily totals on the job's cluster
    assert [(r.cluster, r.entry_point) for r in double.warm_runs] == [
        ("0101-000000-double", "tollwatch-merge"),
        ("tollwatch", "tollwatch-daily-totals"),
    ]
    assert double.spark_submits == []
    with connect() as obs:
        ingest_runs = [run for action in obs.actions_on([event_id]) for run in action.flow_run_ids]
        assert len(ingest_runs) == 1
        completion = obs.emitted_by(ingest_runs, [EventName.INGESTION_COMPLETED])[ingest_runs[0]]
        assert completion.payload["engine"] == "databricks"
        assert completion.payload["run_page_url"] == double.run_page_url(merge_run)
        job_runs = [run for action in obs.actions_on([completion.id]) for run in action.flow_run_ids]
        assert len(job_runs) == 1
        states = {run.id: run.state.type.value for run in obs.flow_runs([*ingest_runs, *job_runs]).values()}
        assert set(states.values()) == {"COMPLETED"}, states
        job_event = obs.emitted_by(job_runs, [EventName.JOB_COMPLETED])[job_runs[0]]
        assert job_event.resource.id == f"databricks.job.{job_id}"
        assert job_event.payload["run_page_url"] == double.run_page_url(totals_run)
        assert job_event.payload["upstream_snapshot_id"] == completion.payload["snapshot_id"]

    # run-now carried the completion: the snapshot and the window the merge touched
    window = completion.payload["window"]
    values = {p["name"]: p["value"] for p in totals_run.job_parameters or []}
    assert values["upstream_snapshot_id"] == str(completion.payload["snapshot_id"])
    assert (values["window_start"], values["window_stop"]) == (window["start"], window["stop"])
    # both Spark jobs wrote to the catalog the flow's side reads with pyiceberg
    settings = load_settings()
    bronze = resources.table_store(settings).table()
    assert bronze is not None
    assert bronze.current_snapshot().snapshot_id == completion.payload["snapshot_id"]
    assert bronze.scan().to_arrow().num_rows == completion.payload["rows_written"]
    silver = resources.table_store(settings, settings.daily_totals_table).table().scan().to_arrow()
    days = (date.fromisoformat(window["stop"]) - date.fromisoformat(window["start"])).days
    assert silver.num_rows == days * DAILY_ROWS_PER_DAY
    assert len({d for d in silver.column("date").to_pylist() if d >= date(2024, 2, 1)}) == 7  # the published week
    assert sum(silver.column("hours").to_pylist()) == completion.payload["rows_written"]
    print(
        f"chain on the Databricks double: stack up + deploy + apply {setup_s:.0f}s, publish → job.completed "
        f"{chain_s:.0f}s (merge run {(merge_run.end_time - merge_run.start_time) / 1000:.0f}s, "
        f"daily totals run {(totals_run.end_time - totals_run.start_time) / 1000:.0f}s)"
    )
