"""Prefect flow `run-job`: one downstream job, started by a subscription when an ingest completes.

The subscription's automation passes the completion event's payload as `completion`; the job reads the
bronze snapshot that load committed (not whatever is newest), so a later load cannot change what this run
computes. The flow ends by announcing `tollwatch.job.completed` (or `.failed`, from the failure hook) on the
job's resource, with the upstream snapshot and refresh ids, so the next team can chain on it.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import FlowRun
from prefect.runtime import flow_run
from prefect.states import State

from tollwatch.adapters.databricks_jobs import DatabricksRunFailed, RunOutcome, idempotency_token
from tollwatch.contract.errors import describe
from tollwatch.contract.events import (
    IngestionCompleted,
    JobFinished,
    Resource,
    TollwatchEvent,
    table_resource_id,
)
from tollwatch.contract.settings import load_settings
from tollwatch.downstream import JobResult, UpstreamRef, local_job
from tollwatch.prefect.flows.common import emit_quietly, flow_resources, run_resources
from tollwatch.resources import Resources


def _related(completion: IngestionCompleted) -> tuple[Resource, ...]:
    return run_resources(Resource(id=table_resource_id(completion.catalog, completion.table), role="upstream-table"))


@task(name="run-local-job", cache_policy=NO_CACHE)
def run_local(job: str, completion: IngestionCompleted, res: Resources) -> JobResult | None:
    """Run the named job over the days the load touched (nothing to do when it touched none)."""
    logger = get_run_logger()
    if completion.window is None:
        logger.info("the load touched no days: nothing for %s to do", job)
        return None
    upstream = UpstreamRef(table=completion.table, snapshot_id=completion.snapshot_id, refresh_id=completion.refresh_id)
    return local_job(job)(res.settings, completion.window, upstream)


@task(name="announce-job", retries=3, retry_delay_seconds=[1, 5, 15], cache_policy=NO_CACHE)
def announce(event: TollwatchEvent, res: Resources) -> None:
    res.events.emit([event])


def emit_job_failed(flow: object, run: FlowRun, state: State) -> None:
    """on_failure hook: the job's subscribers hear that it failed, and why."""
    parameters = dict(run.parameters)
    error = state.result(raise_on_failure=False)
    try:
        completion: IngestionCompleted | None = IngestionCompleted.model_validate(parameters.get("completion"))
    except ValueError:
        completion = None
    # a Databricks run that ended badly is named in the event, so on-call can open its page from the alert
    outcome = error.outcome if isinstance(error, DatabricksRunFailed) else None
    payload = JobFinished(
        job=str(parameters.get("job", "unknown")),
        databricks=parameters.get("databricks_job_id") is not None,
        succeeded=False,
        run_id=str(outcome.run_id) if outcome else str(run.id),
        run_page_url=outcome.run_page_url if outcome else None,
        upstream_snapshot_id=completion.snapshot_id if completion else None,
        upstream_refresh_id=completion.refresh_id if completion else None,
        error_message=describe(error) if isinstance(error, BaseException) else (state.message or ""),
        flow_run_id=str(run.id),
    )
    related = _related(completion) if completion else run_resources()
    emit_quietly(load_settings(), TollwatchEvent.of(payload, related=related), get_run_logger())


@flow(name="run-job", on_failure=[emit_job_failed], log_prints=True)
def run_job(
    job: str,
    completion: IngestionCompleted,
    parameters: dict[str, Any] | None = None,
    databricks_job_id: int | None = None,
) -> JobFinished:
    """Run one downstream job for one completed load and announce the outcome.

    A local job (by name, `tollwatch.downstream`) runs here; with `databricks_job_id` the Databricks job runs
    (run-now, job parameters from the completion and the subscription's `parameters`) and this run waits for it.
    """
    with flow_resources() as res:
        return _run_job(res, job, completion, parameters or {}, databricks_job_id)


def _run_job(
    res: Resources, job: str, completion: IngestionCompleted, parameters: dict[str, Any], databricks_job_id: int | None
) -> JobFinished:
    """The flow's steps, with the run's clients."""
    logger = get_run_logger()
    logger.info(
        "job %s for refresh %s (snapshot %s, window %s); parameters %s",
        job,
        completion.refresh_id,
        completion.snapshot_id,
        completion.window,
        parameters,
    )
    run_id, run_page_url = (str(flow_run.id) if flow_run.id else None), None
    if databricks_job_id is not None:
        outcome = run_on_databricks(databricks_job_id, completion, parameters, res)
        run_id, run_page_url = str(outcome.run_id), outcome.run_page_url
    else:
        local_job(job)  # an unknown job fails here, before any work, with the names that exist
        result = run_local(job, completion, res)
        if result is not None:
            logger.info(
                "%s: %d rows written to %s over %d days, snapshot %s",
                job,
                result.rows_written,
                result.table,
                result.days_replaced,
                result.snapshot_id,
            )
    payload = JobFinished(
        job=job,
        databricks=databricks_job_id is not None,
        succeeded=True,
        run_id=run_id,
        run_page_url=run_page_url,
        upstream_snapshot_id=completion.snapshot_id,
        upstream_refresh_id=completion.refresh_id,
        flow_run_id=str(flow_run.id) if flow_run.id else None,
    )
    announce(TollwatchEvent.of(payload, related=_related(completion)), res)
    return payload


def job_parameters(completion: IngestionCompleted, extra: dict[str, Any]) -> dict[str, str]:
    """Databricks job parameters are strings: the upstream load first, the subscription's extras after."""
    window = completion.window
    values: dict[str, Any] = {
        "upstream_table": completion.table,
        "upstream_snapshot_id": completion.snapshot_id,
        "upstream_refresh_id": completion.refresh_id,
        "window_start": window.start.isoformat() if window else "",
        "window_stop": window.stop.isoformat() if window else "",
        **extra,
    }
    return {key: "" if value is None else str(value) for key, value in values.items()}


def run_on_databricks(job_id: int, completion: IngestionCompleted, extra: dict[str, Any], res: Resources) -> RunOutcome:
    """run-now with a token derived from this flow run: a retried call cannot start the job twice."""
    from tollwatch.prefect.databricks_runner import runner_for

    token = idempotency_token("run-now", str(flow_run.id or "local"), job_id, completion.refresh_id)
    return runner_for(res).run_now(job_id, job_parameters(completion, extra), token=token)
