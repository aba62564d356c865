"""Event Grid in: an HTTP webhook route and an Event Grid trigger, sharing one receiver (`tollwatch.core.receiver`).

Use the webhook (`POST|OPTIONS /api/eventgrid`) when the subscription should carry a shared secret or use the
CloudEvents schema; use the trigger when the Functions host should handle the handshake and authentication
(system key). Either way the same validation, stale-sequencer check, emit and sequencer bookkeeping run.
"""

from __future__ import annotations

import logging
from typing import Any

import azure.functions as func

from functions._http import respond
from tollwatch import resources
from tollwatch.contract.settings import Settings, load_settings
from tollwatch.contract.webio import InboundRequest, Reply

log = logging.getLogger(__name__)

bp = func.Blueprint()


@bp.function_name("eventgrid_webhook")
@bp.route(route="eventgrid", methods=["POST", "OPTIONS"])
def eventgrid_webhook(req: func.HttpRequest) -> func.HttpResponse:
    """Handshakes and deliveries; the status code tells Event Grid whether to retry (503) or not (4xx)."""
    return respond(req, _receive)


def _receive(request: InboundRequest, settings: Settings) -> Reply:
    with resources.eventgrid_receiver(settings) as receiver:
        return receiver.handle_http(request)


@bp.function_name("eventgrid_trigger")
@bp.event_grid_trigger(arg_name="event")
def eventgrid_trigger(event: func.EventGridEvent) -> None:
    """One event from the host: invalid ones are logged and dropped, transient failures raise (retry)."""
    settings = load_settings()
    with resources.eventgrid_receiver(settings) as receiver:
        result = receiver.handle_trigger(as_eventgrid_schema(event))
    if result is not None:
        log.info("eventgrid_trigger: %s", result.model_dump_json())


def as_eventgrid_schema(event: func.EventGridEvent) -> dict[str, Any]:
    """The trigger's event object back in the Event Grid schema, so the receiver validates one shape."""
    return {
        "id": event.id,
        "topic": event.topic,
        "subject": event.subject,
        "eventType": event.event_type,
        "eventTime": event.event_time.isoformat() if event.event_time else None,
        "data": event.get_json(),
        "dataVersion": event.data_version,
    }
