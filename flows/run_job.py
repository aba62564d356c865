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

from flows.common import emit_quietly, emitter, run_resources
from tollwatch.events import (
    IngestionCompleted,
    JobFinished,
    Resource,
    TollwatchEvent,
    table_resource_id,
)
from tollwatch.jobs import JobResult, UpstreamRef, local_job
from tollwatch.settings import load_settings


def _related(completion: IngestionCompleted) -> tuple[Resource, ...]:
    return run_resources(Resource(id=table_resource_id(completion.catalog, completion.table), role="upstream-table"))


@task(name="run-local-job", cache_policy=NO_CACHE)
def run_local(job: str, completion: IngestionCompleted) -> JobResult | None:
    """Run the named job over the days the load touched (nothing to do when it touched none)."""
    logger = get_run_logger()
    if completion.window is None:
        logger.info("the load touched no days: nothing for %s to do", job)
        return None
    upstream = UpstreamRef(table=completion.table, snapshot_id=completion.snapshot_id, refresh_id=completion.refresh_id)
    return local_job(job)(load_settings(), completion.window, upstream)


@task(name="announce-job", retries=3, retry_delay_seconds=[1, 5, 15], cache_policy=NO_CACHE)
def announce(event: TollwatchEvent) -> None:
    emitter(load_settings()).emit([event])


def emit_job_failed(flow: object, run: FlowRun, state: State) -> None:
    """on_failure hook: the job's subscribers hear that it failed, and why."""
    parameters = dict(run.parameters)
    error = state.result(raise_on_failure=False)
    try:
        completion: IngestionCompleted | None = IngestionCompleted.model_validate(parameters.get("completion"))
    except ValueError:
        completion = None
    payload = JobFinished(
        job=str(parameters.get("job", "unknown")),
        succeeded=False,
        run_id=str(run.id),
        upstream_snapshot_id=completion.snapshot_id if completion else None,
        upstream_refresh_id=completion.refresh_id if completion else None,
        error_message=(f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else state.message or "")[
            :2000
        ],
        flow_run_id=str(run.id),
    )
    related = _related(completion) if completion else run_resources()
    emit_quietly(load_settings(), TollwatchEvent.of(payload, related=related), get_run_logger())


@flow(name="run-job", on_failure=[emit_job_failed], log_prints=True)
def run_job(job: str, completion: IngestionCompleted, parameters: dict[str, Any] | None = None) -> JobFinished:
    """Run one downstream job for one completed load and announce the outcome.

    `parameters` are the subscription's extra (event-templated) parameters; the local jobs take none today,
    and they are logged so a team can see what its subscription passed.
    """
    logger = get_run_logger()
    logger.info(
        "job %s for refresh %s (snapshot %s, window %s); parameters %s",
        job,
        completion.refresh_id,
        completion.snapshot_id,
        completion.window,
        parameters or {},
    )
    local_job(job)  # an unknown job fails here, before any work, with the names that exist
    result = run_local(job, completion)
    payload = JobFinished(
        job=job,
        succeeded=True,
        run_id=str(flow_run.id) if flow_run.id else None,
        upstream_snapshot_id=completion.snapshot_id,
        upstream_refresh_id=completion.refresh_id,
        flow_run_id=str(flow_run.id) if flow_run.id else None,
    )
    announce(TollwatchEvent.of(payload, related=_related(completion)))
    if result is not None:
        logger.info(
            "%s: %d rows written to %s over %d days, snapshot %s",
            job,
            result.rows_written,
            result.table,
            result.days_replaced,
            result.snapshot_id,
        )
    return payload
