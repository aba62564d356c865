"""`request_backfill` (HTTP POST /api/backfill): validate, plan one event per chunk, emit, answer 202.

The rules live in `tollwatch.core.backfill` (shared with the CLI). Statuses: 202 with `{request_id, event_ids,
chunks}`; 400 with field-level `problems`; 503 when Prefect did not confirm the events (retrying the same
request is safe: the ids are deterministic unless `rerun` is set).

`chunk` defaults to `auto`, as on the CLI: the plan reads the upstream's rows per day first (one grouped count
per year, at most two attempts each) and answers 503 with Retry-After when it cannot, having emitted nothing.
"""

from __future__ import annotations

import logging

import azure.functions as func

from functions._http import respond
from tollwatch import resources
from tollwatch.adapters.prefect_events import EmitError
from tollwatch.contract.settings import Settings
from tollwatch.contract.webio import InboundRequest, Reply
from tollwatch.core.backfill import (
    BackfillLimits,
    BackfillRejected,
    Chunk,
    UpstreamCountsUnavailable,
    parse_backfill,
    plan_backfill,
    read_upstream_counts,
)

log = logging.getLogger(__name__)

bp = func.Blueprint()

#: Seconds a caller waits before asking again when the upstream could not be counted or Prefect not reached.
RETRY_AFTER_S = 30


@bp.function_name("request_backfill")
@bp.route(route="backfill", methods=["POST"])
def request_backfill(req: func.HttpRequest) -> func.HttpResponse:
    """`{start, stop, chunk, reason, rerun?}` in; 202 with the chunk event ids, 400 with reasons, or 503."""
    return respond(req, _backfill)


def _backfill(request: InboundRequest, settings: Settings) -> Reply:
    try:
        backfill = parse_backfill(request.body, BackfillLimits.from_settings(settings))
    except BackfillRejected as rejected:
        log.warning("backfill request refused: %s", rejected)
        return Reply.with_json(400, rejected.refusal().model_dump())
    counts = None
    if backfill.chunk is Chunk.AUTO:
        try:
            with resources.planning_socrata(settings) as socrata:
                counts = read_upstream_counts(socrata, settings.upstream_dataset_id, backfill.window)
        except UpstreamCountsUnavailable as exc:
            log.error("backfill %s: %s", backfill.window, exc)
            return Reply.error(
                503,
                f"could not plan auto chunks: {exc}; nothing was emitted. Retry later, or choose a calendar chunk "
                "(day, week, month, year)",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
    plan = plan_backfill(
        backfill,
        domain=settings.upstream_domain,
        dataset_id=settings.upstream_dataset_id,
        requested_by="http",
        counts_by_day=counts,
        target_rows=settings.backfill_target_rows,
    )
    try:
        with resources.emitter_for_invocation(settings) as emitter:
            emitter.emit(plan.events)
    except EmitError as exc:
        log.error("%s", exc)
        return Reply.error(
            503,
            "could not deliver the backfill events to Prefect; retrying the same request is safe",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )
    log.info("backfill %s: %d chunk event(s) emitted", plan.request_id, len(plan.events))
    return Reply.with_json(202, plan.summary())
