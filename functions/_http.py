"""The seam between `azure.functions` HTTP objects and the core's transport-neutral `InboundRequest`/`Reply`.

`respond` also owns the last line of defence: whatever goes wrong, the caller gets a JSON sentence and a
status code, never a traceback (that goes to the function log, with the invocation).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import azure.functions as func
from pydantic import ValidationError

from tollwatch.contract.errors import ConfigurationError, TollwatchError, describe
from tollwatch.contract.settings import Settings, load_settings
from tollwatch.contract.webio import InboundRequest, Reply

log = logging.getLogger(__name__)

Handler = Callable[[InboundRequest, Settings], Reply]


def to_inbound(req: func.HttpRequest) -> InboundRequest:
    """The request as the core sees it (header names lower-cased)."""
    return InboundRequest.build(req.method, headers=dict(req.headers), query=dict(req.params), body=req.get_body())


def to_response(reply: Reply) -> func.HttpResponse:
    """A JSON `HttpResponse` (no body, no content type, for body-less replies such as handshakes)."""
    body = reply.body_bytes()
    return func.HttpResponse(
        body=body,
        status_code=reply.status,
        headers=reply.headers,
        mimetype="application/json" if body else None,
        charset="utf-8",
    )


def respond(req: func.HttpRequest, handler: Handler) -> func.HttpResponse:
    """Load settings, run `handler`, and turn any failure into a JSON error without internals."""
    try:
        settings = load_settings()
    except ValidationError as exc:  # `describe` names fields and problems only: input values could be secrets
        log.error("settings are invalid: %s", describe(exc))
        return to_response(Reply.error(500, f"function app is misconfigured: {describe(exc)}"))
    try:
        return to_response(handler(to_inbound(req), settings))
    except ConfigurationError as exc:
        log.error("%s", describe(exc))
        return to_response(Reply.error(500, f"function app is misconfigured: {describe(exc)}"))
    except TollwatchError as exc:  # raised on purpose: its status and its sentence
        log.error("%s", describe(exc))
        return to_response(Reply.error(exc.status, describe(exc)))
    except Exception:  # the last line of defence: log the traceback, answer a sentence
        log.exception("unhandled error in %s (%s)", getattr(handler, "__name__", "handler"), req.method)
        return to_response(Reply.error(500, "internal error; details are in the function log"))
