"""Prefect flow `ingest`: fetch → land raw in Blob → merge into Iceberg → announce.

Thin on purpose: every step is a function in `tollwatch.core.ingest`; this module adds what Prefect is for —
retries per step, logs, a run artifact, and the completion/failure events that chain downstream work.

Two ways to call it (both are parameters of one flow, so one deployment serves both triggers):
- refresh mode, from `tollwatch.dataset.refreshed`: `rows_updated_at` (+ `previous_rows_updated_at`)
- window mode, from `tollwatch.backfill.requested`: `start`, `stop` (exclusive) and `request_id`
"""

from __future__ import annotations

import time
from datetime import UTC, date, datetime
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import FlowRun
from prefect.runtime import flow_run
from prefect.states import State

from tollwatch.contract.errors import describe
from tollwatch.contract.events import (
    BackfillRequested,
    DatasetRefreshed,
    Durations,
    EventName,
    IngestionCompleted,
    IngestionFailed,
    IngestionHeld,
    LoadSettled,
    QualityOutcome,
    Resource,
    TollwatchEvent,
    Window,
    dataset_resource_id,
)
from tollwatch.contract.quality import HoldRecord, QualitySummary, Settlement
from tollwatch.contract.settings import Settings, load_settings
from tollwatch.core.audit import Reconciliation, reconcile
from tollwatch.core.backfill import upstream_counts_by_day
from tollwatch.core.ingest import (
    FetchPlan,
    IngestRequest,
    LoadResult,
    ceiling,
    covered_load,
    fetch_and_land,
    load_landing,
    plan_fetch,
    previous_load,
    upstream_days,
)
from tollwatch.core.landing import LandingManifest
from tollwatch.core.schema import target_schema
from tollwatch.core.wap import Audited, audit_branch, write_audit_publish
from tollwatch.prefect.flows.common import emit_quietly, flow_resources, run_resources
from tollwatch.prefect.flows.report import ingest_report
from tollwatch.prefect.quality_report import quality_description, quality_markdown
from tollwatch.resources import Resources


def build_request(settings: Settings, parameters: dict[str, Any]) -> IngestRequest:
    """Turn flow parameters into a validated request (exactly one of refresh / window).

    Every value is typed by the event models (pydantic, as the flow's own signature types them), so a bad one is a
    ValueError or ValidationError naming the field. `int(rows_updated_at)` used to raise TypeError for a list and
    OverflowError for infinity, cut 1.5 to 1 and read Arabic-Indic digits; a missing `start` or `stop` was a KeyError.
    """
    has_window = parameters.get("start") is not None or parameters.get("stop") is not None
    has_refresh = parameters.get("rows_updated_at") is not None
    if has_window == has_refresh:
        raise ValueError("give either rows_updated_at (refresh) or start and stop (window), not both or neither")
    common = {"domain": settings.upstream_domain, "dataset_id": settings.upstream_dataset_id}
    if has_refresh:
        return IngestRequest.for_refresh(
            DatasetRefreshed(
                **common,
                rows_updated_at=parameters["rows_updated_at"],
                previous_rows_updated_at=parameters.get("previous_rows_updated_at"),
            )
        )
    return IngestRequest.for_window(
        BackfillRequested(
            **common,
            start=parameters.get("start"),
            stop=parameters.get("stop"),
            request_id=parameters.get("request_id") or "manual",
        )
    )


def related(settings: Settings) -> tuple[Resource, ...]:
    """The dataset, this flow run and its deployment."""
    return run_resources(
        Resource(id=dataset_resource_id(settings.upstream_domain, settings.upstream_dataset_id), role="dataset")
    )


@task(name="plan-fetch", retries=2, retry_delay_seconds=[1, 5], cache_policy=NO_CACHE)
def plan(request: IngestRequest, res: Resources) -> FetchPlan:
    """What to ask the upstream for: a refresh starts where the table's ledger says it is committed through."""
    # On Databricks the ledger lives in Spark's catalog, out of this process's reach: the event's previous publish
    # is the best floor there is (a known limit, see README). Locally both engines commit to one catalog.
    mark = res.table.committed_through() if res.settings.ledger_in_reach else request.previous_rows_updated_at
    return plan_fetch(request, res.socrata, mark)


@task(name="fetch-and-land", cache_policy=NO_CACHE)
def land(request: IngestRequest, fetch: FetchPlan, res: Resources) -> LandingManifest:
    """Stream the upstream into Blob and reconcile it with the upstream's count; each request retries itself."""
    return fetch_and_land(
        request,
        fetch,
        res.socrata,
        res.landing,
        run_id=str(flow_run.id or "local"),
        page_size=res.settings.upstream_page_size,
    )


@task(name="load-into-branch", cache_policy=NO_CACHE)
def load(request: IngestRequest, manifest: LandingManifest, res: Resources, branch: str) -> LoadResult:
    """Commit the landing to the load's audit branch; a retry re-reads the same landed files."""
    return load_landing(request, manifest, res.landing, res.table, flow_run_id=flow_run.id, branch=branch)


@task(name="audit-load", retries=2, retry_delay_seconds=[1, 5], cache_policy=NO_CACHE)
def audit_load(branch: str, result: LoadResult, manifest: LandingManifest, res: Resources) -> QualitySummary:
    """The checks on the load's branch: the upstream's count(*) per loaded day, then the table-side checks."""
    upstream = (
        upstream_counts_by_day(res.socrata, res.settings.upstream_dataset_id, result.touched, through=ceiling(manifest))
        if result.touched is not None
        else None
    )
    quality = audit_branch(
        res.table, branch, result, res.quality_spec, upstream_by_day=upstream, columns=manifest.columns
    )
    logger = get_run_logger()
    for check in quality.checks:
        if not check.passed:
            logger.warning("check %s (%s) failed: %s", check.name, check.severity, check.detail)
    logger.info("audit of %s: %s", branch, quality.verdict)
    return quality


@task(name="check-held", retries=2, retry_delay_seconds=[1, 5], cache_policy=NO_CACHE)
def held_or_settled(request: IngestRequest, res: Resources) -> HoldRecord | Settlement | None:
    """A replay of a held load stays held (it is not loaded or audited again); a discarded one is not reloaded."""
    held = res.branches.held(request.refresh_id)
    if held:
        return held[0]
    settled = res.branches.settled(request.refresh_id)
    return settled if settled is not None and settled.action == "discarded" else None


@task(name="check-ledger", retries=2, retry_delay_seconds=[1, 5], cache_policy=NO_CACHE)
def committed_load(request: IngestRequest, res: Resources) -> LoadResult | None:
    """The load that already holds this refresh: a replay is not fetched again (it commits nothing)."""
    previous = previous_load(request, res.table, res.landing)
    if previous is not None:
        get_run_logger().info(
            "refresh %s already committed as snapshot %s: no-op%s",
            request.refresh_id,
            previous.snapshot_id,
            "" if previous.already_committed else " (its completion was never announced: announcing it now)",
        )
    return previous


@task(name="announce", retries=3, retry_delay_seconds=[1, 5, 15], cache_policy=NO_CACHE)
def announce(event: TollwatchEvent, request: IngestRequest, res: Resources) -> None:
    """Tell Prefect (automations, subscriptions) and, when a topic is configured, Event Grid subscribers."""
    res.events.emit([event])
    publisher = res.completion_publisher
    if publisher is not None and event.event == EventName.INGESTION_COMPLETED:
        publisher.publish(event)  # same id as the Prefect event, so subscribers can dedupe across both
    try:  # after the announcement: a lost marker costs at most a second announcement (same event id) later
        res.landing.mark_announced(request.landing_scope, str(event.id), event.payload["snapshot_id"])
    except Exception as exc:
        get_run_logger().warning("announced, but could not record it (a re-run will announce again): %s", exc)


@task(name="reconcile-touched-days", retries=2, retry_delay_seconds=[1, 5], cache_policy=NO_CACHE)
def reconcile_touched(window: Window, res: Resources) -> Reconciliation | None:
    """After the commit, the upstream's count(*) per day against the table's for the days this load touched.

    Information for the completion event and the artifact, not a gate (the gate is the count check before the
    commit): a publish since the fetch shows here as a difference the next refresh closes. `tollwatch audit`
    reconciles any range on demand. A reconciliation that cannot be made is logged, never fails a committed load.
    """
    try:
        counts = reconcile(res.socrata, res.table, res.settings.upstream_dataset_id, window)
    except Exception as exc:
        get_run_logger().warning("could not reconcile %s after the commit: %s", window, exc)
        return None
    if not counts.matches:
        get_run_logger().warning(
            "after the commit the table holds %d rows of %s, the upstream %d (%d days differ; `tollwatch audit`)",
            counts.table_rows,
            window,
            counts.upstream_rows,
            len(counts.differing_days),
        )
    return counts


def emit_failure(flow: object, run: FlowRun, state: State) -> None:
    """on_failure hook: tell subscribers this load failed, and why (the table is unchanged by it)."""
    logger = get_run_logger()
    settings = load_settings()
    error = state.result(raise_on_failure=False)
    request: IngestRequest | None
    try:
        request = build_request(settings, dict(run.parameters))
    except ValueError:
        request = None
    payload = IngestionFailed(
        table=settings.table,
        catalog=settings.catalog_name,
        mode=request.mode if request else ("window" if run.parameters.get("start") else "refresh"),
        window=request.window if request else None,
        refresh_id=request.refresh_id if request else None,
        error_class=type(error).__name__ if isinstance(error, BaseException) else "Failed",
        error_message=describe(error) if isinstance(error, BaseException) else (state.message or ""),
        flow_run_id=str(run.id),
    )
    emit_quietly(settings, TollwatchEvent.of(payload, related=related(settings)), logger)


@flow(name="ingest", on_failure=[emit_failure], log_prints=True)
def ingest(
    rows_updated_at: int | None = None,
    previous_rows_updated_at: int | None = None,
    start: date | None = None,
    stop: date | None = None,
    request_id: str | None = None,
) -> IngestionCompleted | IngestionHeld | LoadSettled:
    """Load one refresh or one window of MTA B&T hourly traffic into the bronze Iceberg table: written to an audit
    branch, checked, and published to `main` and announced only when it passes (else held and alerted)."""
    with flow_resources() as res:
        return _ingest(
            res,
            {
                "rows_updated_at": rows_updated_at,
                "previous_rows_updated_at": previous_rows_updated_at,
                "start": start,
                "stop": stop,
                "request_id": request_id,
            },
        )


def _ingest(res: Resources, parameters: dict[str, Any]) -> IngestionCompleted | IngestionHeld | LoadSettled:
    """The flow's steps, with the run's clients."""
    logger = get_run_logger()
    settings = res.settings
    request = build_request(settings, parameters)
    logger.info("ingest %s refresh_id=%s window=%s", request.mode, request.refresh_id, request.window)

    began = time.perf_counter()
    retry = {"retries": settings.task_retries, "retry_delay_seconds": settings.task_retry_delay_s}
    run_page_url = None
    quality: QualitySummary | None = None
    # On Databricks the table lives in Spark's catalog: the merge job checks the ledger itself.
    previous = committed_load(request, res) if settings.ledger_in_reach else None
    if previous is None and settings.ledger_in_reach:
        settled = held_or_settled(request, res)
        if isinstance(settled, HoldRecord):
            return _hold(res, request, settled)
        if settled is not None:
            logger.warning("refresh %s was %s by %s: nothing to do", request.refresh_id, settled.action, settled.by)
            return _settlement(settings, settled)
    fetch = plan(request, res) if previous is None else None
    if fetch is not None and fetch.covered:
        logger.info("refresh %s: a later load already committed its publish; nothing to fetch", request.refresh_id)
        previous = covered_load(res.table)
    if previous is None:
        assert fetch is not None
        logger.info("fetching %s (versions after %s, through %s)", fetch.where, fetch.after, fetch.through)
        manifest = land.with_options(**retry)(request, fetch, res)
        fetched = time.perf_counter()
        if settings.engine == "databricks":
            from tollwatch.prefect.databricks_runner import merge_on_databricks

            count_upstream_days(request, fetch, manifest, res)
            result, run_page_url = merge_on_databricks(res, request, manifest, str(flow_run.id or "local"))
            if result.settled is not None:
                return _settlement(settings, Settlement.model_validate(result.settled))
            quality = QualitySummary.model_validate(result.quality) if result.quality else None
            if not result.published:  # held on the cluster, which recorded the hold in the table
                record = _cluster_hold_record(request, result, manifest)
                return _hold(res, request, record, quality, persist=False)
        else:
            audited = _write_audit_publish(res, request, manifest, retry)
            if not audited.published:
                return _hold(res, request, _hold_record(request, audited, manifest), audited.quality, persist=True)
            result, quality = audited.result, audited.quality
        rows_fetched, landing_uri = manifest.rows, res.landing.uri(manifest.prefix)
    else:
        fetched = time.perf_counter()
        result = previous
        rows_fetched, landing_uri = 0, ""
    loaded = time.perf_counter()
    touched = request.window or result.touched or _touched(result)
    counts = reconcile_touched(touched, res) if touched is not None and settings.ledger_in_reach else None

    completed = IngestionCompleted(
        table=settings.table,
        catalog=settings.catalog_name,
        mode=request.mode,
        window=touched,
        refresh_id=request.refresh_id,
        rows_fetched=rows_fetched,
        rows_written=result.rows_written,
        rows_rejected=result.rows_rejected,
        snapshot_id=result.snapshot_id,
        landing_uri=landing_uri,
        already_committed=result.already_committed,
        flow_run_id=str(flow_run.id) if flow_run.id else None,
        durations=Durations(fetch_s=fetched - began, load_s=loaded - fetched, total_s=loaded - began),
        run_page_url=run_page_url,
        engine=settings.engine,
        committed_through=result.committed_through,
        upstream_rows=counts.upstream_rows if counts else None,
        table_rows=counts.table_rows if counts else None,
        quality=outcome(quality),
    )
    create_markdown_artifact(
        key="ingest-report",
        markdown=ingest_report(completed, result, counts, quality),
        description=quality_description(quality) if quality is not None else "rows per day and plaza",
    )
    announce(TollwatchEvent.of(completed, related=related(settings)), request, res)
    logger.info(
        "done: %d rows fetched, %d written, %d rejected, snapshot %s, quality %s",
        completed.rows_fetched,
        completed.rows_written,
        completed.rows_rejected,
        completed.snapshot_id,
        completed.quality,
    )
    return completed


def _write_audit_publish(
    res: Resources, request: IngestRequest, manifest: LandingManifest, retry: dict[str, Any]
) -> Audited:
    """The load through its audit branch with the configured engine (see `tollwatch.core.wap`)."""
    flow_run_id = str(flow_run.id or "local")

    def write(branch: str) -> LoadResult:
        res.branches.open(branch, target_schema(manifest.columns))
        if res.settings.engine == "spark":
            from tollwatch.prefect.flows.merge_spark import merge_with_spark

            return merge_with_spark.with_options(**retry)(request, manifest, flow_run_id, res, branch)
        return load.with_options(**retry)(request, manifest, res, branch)

    def check(branch: str, result: LoadResult) -> QualitySummary:
        return audit_load(branch, result, manifest, res)

    return write_audit_publish(res.branches, request.refresh_id, write, check)


def _hold_record(request: IngestRequest, audited: Audited, manifest: LandingManifest) -> HoldRecord:
    result = audited.result
    return HoldRecord(
        refresh_id=request.refresh_id,
        branch=audited.branch,
        snapshot_id=audited.result.snapshot_id or 0,
        mode=request.mode,
        window=request.window,
        touched=audited.result.touched,
        rows_updated_at=request.rows_updated_at,
        flow_run_id=str(flow_run.id) if flow_run.id else None,
        landing_prefix=manifest.prefix,
        rows_fetched=manifest.rows,
        rows_written=result.rows_written,
        rows_rejected=result.rows_rejected,
        committed_through=result.committed_through,
        held_at=datetime.now(UTC),
        failing=[c.name for c in audited.quality.failing],
        quality=audited.quality.brief(),
    )


def _hold(
    res: Resources,
    request: IngestRequest,
    record: HoldRecord,
    quality: QualitySummary | None = None,
    *,
    persist: bool = False,
) -> IngestionHeld:
    """Record the hold (`persist`: a first hold here; a replay, or a hold the cluster recorded, is on record
    already), report it, and tell the alert automation."""
    settings = res.settings
    if persist:
        res.branches.hold(record)
    if quality is not None:
        create_markdown_artifact(
            key="ingest-report",
            markdown=quality_markdown(quality, title=f"Ingest {request.mode} {request.window or record.touched or ''}"),
            description=quality_description(quality),
        )
    held = IngestionHeld(
        table=settings.table,
        catalog=settings.catalog_name,
        mode=request.mode,
        window=record.touched or request.window,
        refresh_id=request.refresh_id,
        branch=record.branch,
        snapshot_id=record.snapshot_id,
        quality=QualityOutcome.model_validate({**record.quality, "verdict": "held"}),
        flow_run_id=record.flow_run_id,
    )
    res.events.emit([TollwatchEvent.of(held, related=related(settings))])
    get_run_logger().warning(
        "refresh %s held on branch %s (failing: %s); main is unchanged, nothing was announced. Settle it with "
        "`tollwatch publish %s` or `tollwatch discard %s`",
        request.refresh_id,
        record.branch,
        ", ".join(record.failing),
        request.refresh_id,
        request.refresh_id,
    )
    return held


def _cluster_hold_record(request: IngestRequest, result: LoadResult, manifest: LandingManifest) -> HoldRecord:
    """The hold as the cluster recorded it, for the event (the flow cannot read Databricks' catalog)."""
    quality = result.quality or {}
    return HoldRecord(
        refresh_id=request.refresh_id,
        branch=result.branch or "",
        snapshot_id=result.snapshot_id or 0,
        mode=request.mode,
        window=request.window,
        touched=result.touched,
        rows_updated_at=request.rows_updated_at,
        flow_run_id=str(flow_run.id) if flow_run.id else None,
        landing_prefix=manifest.prefix,
        rows_fetched=manifest.rows,
        rows_written=result.rows_written,
        rows_rejected=result.rows_rejected,
        held_at=datetime.now(UTC),
        failing=list(quality.get("failing", [])),
        quality=quality,
    )


@task(name="count-upstream-days", retries=2, retry_delay_seconds=[1, 5], cache_policy=NO_CACHE)
def count_upstream_days(request: IngestRequest, fetch: FetchPlan, manifest: LandingManifest, res: Resources) -> None:
    """For an audit on the cluster: the upstream's rows per day of the load, left beside the landing's manifest."""
    counts = upstream_days(res.socrata, request, fetch)
    res.landing.put_upstream_days(manifest.prefix, counts)
    get_run_logger().info("upstream counts of %d days left for the audit on the cluster", len(counts))


def _settlement(settings: Settings, settled: Settlement) -> LoadSettled:
    return LoadSettled(
        table=settings.table,
        catalog=settings.catalog_name,
        refresh_id=settled.refresh_id,
        action=settled.action,
        by=settled.by,
        reason=settled.reason,
        snapshot_id=settled.snapshot_id,
    )


def outcome(quality: QualitySummary | None) -> QualityOutcome | None:
    """The audit as the completion event carries it (None for a replay: its audit was announced before)."""
    return QualityOutcome.model_validate(quality.brief()) if quality is not None else None


def _touched(result: LoadResult) -> Window | None:
    """For refreshes: the days the load actually touched."""
    days = [day for day, _ in result.rows_per_day_plaza]
    if not days:
        return None
    return Window(start=min(days), stop=date.fromordinal(max(days).toordinal() + 1))
