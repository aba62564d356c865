"""`request_backfill` (HTTP POST /api/backfill): validate, plan one event per chunk, emit, answer 202.

The rules live in `tollwatch.backfill` (shared with the CLI). Statuses: 202 with `{request_id, event_ids,
chunks}`; 400 with field-level `problems`; 503 when Prefect did not confirm the events (retrying the same
request is safe: the ids are deterministic unless `rerun` is set).

Chunks here are calendar sizes only (default `month`). `auto` is refused with a 400 that points at the CLI: its
plan needs the upstream's counts per day from `tollwatch.audit.upstream_counts_by_day`, and that module imports
pyarrow, which this app does not ship (requirements.txt; tests/functions/test_fn_app.py).
"""

from __future__ import annotations

import logging

import azure.functions as func

from functions._http import respond
from tollwatch import clients
from tollwatch.backfill import BackfillLimits, BackfillRejected, Chunk, FieldProblem, parse_backfill, plan_backfill
from tollwatch.emit import EmitError
from tollwatch.settings import Settings
from tollwatch.webio import InboundRequest, Reply

log = logging.getLogger(__name__)

bp = func.Blueprint()

AUTO_REFUSED = (
    "auto chunking needs the upstream's row counts, which this app does not read: use day, week, month or year, "
    "or plan auto chunks with `tollwatch backfill --chunk auto`"
)


@bp.function_name("request_backfill")
@bp.route(route="backfill", methods=["POST"])
def request_backfill(req: func.HttpRequest) -> func.HttpResponse:
    """`{start, stop, chunk, reason, rerun?}` in; 202 with the chunk event ids, 400 with reasons, or 503."""
    return respond(req, _backfill)


def _backfill(request: InboundRequest, settings: Settings) -> Reply:
    try:
        backfill = parse_backfill(request.body, BackfillLimits.from_settings(settings))
        if backfill.chunk is Chunk.AUTO:
            raise BackfillRejected([FieldProblem(field="chunk", reason=AUTO_REFUSED)])
    except BackfillRejected as rejected:
        log.warning("backfill request refused: %s", rejected)
        return Reply.with_json(
            400,
            {"error": "invalid backfill request", "problems": [p.model_dump() for p in rejected.problems]},
        )
    plan = plan_backfill(
        backfill, domain=settings.upstream_domain, dataset_id=settings.upstream_dataset_id, requested_by="http"
    )
    try:
        with clients.emitter_for_invocation(settings) as emitter:
            emitter.emit(plan.events)
    except EmitError as exc:
        log.error("%s", exc)
        return Reply.error(
            503,
            "could not deliver the backfill events to Prefect; retrying the same request is safe",
            headers={"Retry-After": "30"},
        )
    log.info("backfill %s: %d chunk event(s) emitted", plan.request_id, len(plan.events))
    return Reply.with_json(202, plan.summary())
