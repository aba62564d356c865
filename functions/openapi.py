"""`openapi_document` (HTTP GET /api/openapi.json, anonymous): the OpenAPI 3.1 document of the app's HTTP routes.

Why built from code: the request and reply schemas are the JSON schemas of the pydantic models the handlers really
parse and answer with (`BackfillRequest`, `BackfillSummary`, `DeliveryResult`, ...), so a field added to a model is
in the document without anyone editing it, and no validation rule is written twice. What pydantic cannot know — the
routes, every status each one answers and the headers that come with it, the Functions host's own refusals (401
without the function key, 413 over 100 MB) — is stated once here, and tests keep it honest:
tests/unit/test_fn_openapi_doc.py (the routes and their auth equal what the app registers; the document is valid
OpenAPI) and tests/integration/test_fn_openapi.py (every status the handlers answer in the scenarios the other tests
cover is declared, and schemathesis finds no server error and no answer that disagrees with the document).

The document is the same for every deployment: it describes the strictest configuration (Event Grid shared secret
set) and says in words what settings change; it never reveals which settings are in force.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import azure.functions as func
import orjson
from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from tollwatch.adapters.eventgrid_in import (
    ALLOWED_ORIGIN_HEADER,
    ALLOWED_RATE_HEADER,
    REQUEST_ORIGIN_HEADER,
    SECRET_HEADER,
    SECRET_QUERY,
    SUBSCRIPTION_HEADER,
    CloudEventSchemaEvent,
    EventGridSchemaEvent,
    SubscriptionValidationResponse,
)
from tollwatch.contract.webio import (
    FUNCTION_KEY_HEADER,
    FUNCTION_KEY_QUERY,
    HOST_MAX_BODY_BYTES,
    ROUTE_PREFIX,
    ErrorBody,
)
from tollwatch.core.backfill import BackfillRefusal, BackfillRequest, BackfillSummary
from tollwatch.core.receiver import DeliveryResult

OPENAPI_VERSION = "3.1.0"
#: The version of this document (OpenAPI `info.version`): bump it when a route's contract changes.
DOCUMENT_VERSION = "1.0.0"
JSON = "application/json"
CLOUDEVENT = "application/cloudevents+json"
CLOUDEVENT_BATCH = "application/cloudevents-batch+json"

#: A `$ref` to a model's schema in `components/schemas`, for the side of the wire it is on.
Ref = Callable[[type[BaseModel], JsonSchemaMode], dict[str, Any]]

#: Every model that appears in the document, with the side of the wire it is on.
_MODELS: tuple[tuple[type[BaseModel], JsonSchemaMode], ...] = (
    (BackfillRequest, "validation"),
    (BackfillSummary, "serialization"),
    (BackfillRefusal, "serialization"),
    (EventGridSchemaEvent, "validation"),
    (CloudEventSchemaEvent, "validation"),
    (DeliveryResult, "serialization"),
    (SubscriptionValidationResponse, "serialization"),
    (ErrorBody, "serialization"),
)

#: Security schemes, by name. The function key is checked by the Functions host, the shared secret by the handler.
FUNCTION_KEY_SCHEMES = ("functionKeyHeader", "functionKeyQuery")
SECRET_SCHEMES = ("eventGridSecretHeader", "eventGridSecretQuery")

# Examples a reader can paste (and schemathesis sends as they are): a placeholder storage account, the default
# container `upstream` (TOLLWATCH_EVENTGRID_CONTAINER) — a deployment accepts them only if its settings match.
EXAMPLE_TOPIC = (
    "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/tollwatch/providers/"
    "Microsoft.Storage/storageAccounts/tollwatchupstream"
)
EXAMPLE_SUBJECT = "/blobServices/default/containers/upstream/blobs/publishes/2024-01-08.json"
_EXAMPLE_BLOB_DATA = {
    "api": "PutBlockList",
    "url": "https://tollwatchupstream.blob.core.windows.net/upstream/publishes/2024-01-08.json",
    "eTag": '"0x8D4BCC2E4835CD0"',
    "sequencer": "00000000000004420000000000028963",
    "contentLength": 524288,
}
EXAMPLE_VALIDATION_CODE = "512d38b6-c7b8-40c8-89fe-f46f9e9622b6"


def document() -> dict[str, Any]:
    """A fresh copy of the document (callers, schemathesis among them, may change what they are given)."""
    return orjson.loads(document_json())


@functools.cache
def document_json() -> bytes:
    """The document, serialised once per process (it depends on code only)."""
    refs, definitions = models_json_schema(_MODELS, ref_template="#/components/schemas/{model}")

    def ref(model: type[BaseModel], mode: JsonSchemaMode) -> dict[str, Any]:
        return dict(refs[model, mode])

    paths = {
        _path("backfill"): {"post": _backfill(ref)},
        _path("eventgrid"): {"post": _eventgrid_post(ref), "options": _eventgrid_options(ref)},
        _path("openapi.json"): {"get": _openapi_get()},
    }
    doc = {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "tollwatch Function app",
            "version": DOCUMENT_VERSION,
            "description": (
                "The HTTP routes of tollwatch's Azure Function app (function_app.py). Every refusal and failure a "
                "handler answers with is a JSON `{error}` sentence; the Functions host's own answers have no body: "
                "401 without a valid function key, 404 for a path not listed here, 413 for a body over 100 MB, 429 "
                "when the host throttles; a method not listed for its path is refused before any function runs (the "
                "dev host, `tollwatch functions serve`: 405 with `Allow`)."
            ),
        },
        "paths": paths,
        "components": {"schemas": definitions.get("$defs", {}), "securitySchemes": _security_schemes()},
    }
    return orjson.dumps(doc)


def _path(route: str) -> str:
    return f"/{ROUTE_PREFIX}/{route}"


# ---------------------------------------------------------------------------------------------- operations


def _backfill(ref: Ref) -> dict[str, Any]:
    return {
        "operationId": "request_backfill",
        "summary": "Plan a backfill of [start, stop) and emit one tollwatch.backfill.requested per chunk",
        "description": (
            "Validated like `tollwatch backfill`: start from the dataset's first day to today, stop exclusive and at "
            "most tomorrow, at most TOLLWATCH_BACKFILL_MAX_DAYS days and TOLLWATCH_BACKFILL_MAX_CHUNKS chunks. "
            "`auto` (the default) reads the upstream's rows per day first. The same request twice has the same "
            "event ids, so a retry is safe; `rerun: true` asks for new ones."
        ),
        "security": _requirements(FUNCTION_KEY_SCHEMES),
        "requestBody": {
            "required": True,
            "content": {
                JSON: {
                    "schema": ref(BackfillRequest, "validation"),
                    "examples": {
                        "by_month": {
                            "summary": "January to March 2024, one run per month",
                            "value": {"start": "2024-01-01", "stop": "2024-04-01", "chunk": "month", "reason": "Q1"},
                        },
                        "auto": {
                            "summary": "a week, chunks sized by the upstream's row counts",
                            "value": {"start": "2024-01-08", "stop": "2024-01-15"},
                        },
                    },
                }
            },
        },
        "responses": {
            "202": _json(
                "planned and emitted: the request id, one event id per chunk, the chunks",
                ref(BackfillSummary, "serialization"),
            ),
            "400": _json("refused, nothing emitted: every field-level problem", ref(BackfillRefusal, "serialization")),
            **_host_refusals(),
            "500": _json(
                "the app is misconfigured or failed; the same request again is safe (deterministic ids)",
                ref(ErrorBody, "serialization"),
            ),
            "503": _json(
                "the upstream could not be counted (auto) or Prefect did not confirm the events; nothing emitted, "
                "the same request again is safe",
                ref(ErrorBody, "serialization"),
                headers=_retry_after(),
            ),
        },
    }


def _eventgrid_post(ref: Ref) -> dict[str, Any]:
    def batch(model: type[BaseModel]) -> dict[str, Any]:
        return {"type": "array", "minItems": 1, "items": ref(model, "validation")}

    blob_created_eventgrid = {
        "id": "831e1650-001e-001b-66ab-eeb76e069631",
        "topic": EXAMPLE_TOPIC,
        "subject": EXAMPLE_SUBJECT,
        "eventType": "Microsoft.Storage.BlobCreated",
        "eventTime": "2024-01-08T06:00:00Z",
        "data": _EXAMPLE_BLOB_DATA,
        "dataVersion": "",
        "metadataVersion": "1",
    }
    blob_created_cloudevent = {
        "specversion": "1.0",
        "id": "831e1650-001e-001b-66ab-eeb76e069632",
        "source": EXAMPLE_TOPIC,
        "subject": EXAMPLE_SUBJECT,
        "type": "Microsoft.Storage.BlobCreated",
        "time": "2024-01-08T06:00:00Z",
        "data": _EXAMPLE_BLOB_DATA,
    }
    validation = {
        "id": "2d1781af-3a4c-4d7c-bd0c-e34b19da4e66",
        "topic": "/subscriptions/00000000-0000-0000-0000-000000000000",
        "subject": "",
        "eventType": "Microsoft.EventGrid.SubscriptionValidationEvent",
        "eventTime": "2024-01-08T06:00:00Z",
        "data": {"validationCode": EXAMPLE_VALIDATION_CODE},
        "dataVersion": "1",
        "metadataVersion": "1",
    }
    error = ref(ErrorBody, "serialization")
    return {
        "operationId": "eventgrid_webhook",
        "summary": "Event Grid deliveries: BlobCreated for the watched container becomes tollwatch.dataset.refreshed",
        "description": (
            "Both delivery schemas, single events and batches. The handler reads the body, not its Content-Type: "
            "an Event Grid schema event may also come alone, and a CloudEvent in `application/json`. A request is "
            "refused as a whole (secret, subscription, size, JSON, mixed schemas, a handshake inside a batch); one "
            "bad event of a batch is listed under `refused` and the others are processed. Event Grid does not retry "
            "a 4xx and retries a 503."
        ),
        "security": _requirements(FUNCTION_KEY_SCHEMES, SECRET_SCHEMES),
        "parameters": [
            {
                "name": SUBSCRIPTION_HEADER,
                "in": "header",
                "required": False,
                "description": (
                    "set by Event Grid: the event subscription's name; when TOLLWATCH_EVENTGRID_SUBSCRIPTION_NAMES "
                    "is set it must be one of them (403 otherwise)"
                ),
                "schema": {"type": "string"},
            }
        ],
        "requestBody": {
            "required": True,
            "content": {
                JSON: {
                    "schema": batch(EventGridSchemaEvent),
                    "examples": {
                        "blob_created": {"value": [blob_created_eventgrid]},
                        "subscription_validation": {"value": [validation]},
                    },
                },
                CLOUDEVENT: {
                    "schema": ref(CloudEventSchemaEvent, "validation"),
                    "examples": {"blob_created": {"value": blob_created_cloudevent}},
                },
                CLOUDEVENT_BATCH: {
                    "schema": batch(CloudEventSchemaEvent),
                    "examples": {"blob_created": {"value": [blob_created_cloudevent]}},
                },
            },
        },
        "responses": {
            "200": _json(
                "a subscription validation answered (its code echoed), or a delivery processed: what was emitted, "
                "dropped as stale and refused",
                {
                    "oneOf": [
                        ref(DeliveryResult, "serialization"),
                        ref(SubscriptionValidationResponse, "serialization"),
                    ]
                },
            ),
            "400": _json("nothing acceptable in the request (the reason names every event's problem)", error),
            "401": _json(
                "missing or wrong shared secret (the Functions host's own 401, without a function key, has no body)",
                error,
            ),
            "403": _json("the delivering subscription is not one this endpoint accepts", error),
            "413": _json(
                "body over TOLLWATCH_EVENTGRID_MAX_BODY_BYTES (1 MB by default; the host's own 413, over 100 MB, "
                "has no body)",
                error,
            ),
            "429": _host_refusals()["429"],
            "500": _json("the app is misconfigured or failed; Event Grid retries", error),
            "503": _json(
                "storage or Prefect unreachable; nothing lost, Event Grid retries", error, headers=_retry_after()
            ),
        },
    }


def _eventgrid_options(ref: Ref) -> dict[str, Any]:
    error = ref(ErrorBody, "serialization")
    granted = {"schema": {"type": "string", "minLength": 1}, "required": True}
    return {
        "operationId": "eventgrid_webhook_handshake",
        "summary": "The CloudEvents webhook handshake (abuse protection): grant an allowed origin",
        "security": _requirements(FUNCTION_KEY_SCHEMES, SECRET_SCHEMES),
        "parameters": [
            {
                "name": REQUEST_ORIGIN_HEADER,
                "in": "header",
                "required": True,
                "description": "the origin asking to deliver; allowed: TOLLWATCH_EVENTGRID_ALLOWED_ORIGINS",
                "schema": {"type": "string", "minLength": 1},
                "example": "eventgrid.azure.net",
            }
        ],
        "responses": {
            "200": {
                "description": "granted: no body",
                "headers": {
                    ALLOWED_ORIGIN_HEADER: {**granted, "description": "the requesting origin, echoed"},
                    ALLOWED_RATE_HEADER: {**granted, "description": "`*`: no rate limit asked"},
                    "Allow": {**granted, "description": "the methods of this route"},
                },
            },
            "400": _json(f"no {REQUEST_ORIGIN_HEADER} header: not a handshake", error),
            "401": _json(
                "missing or wrong shared secret (the Functions host's own 401, without a function key, has no body)",
                error,
            ),
            "403": _json("the origin is not allowed to deliver here", error),
            **_host_refusals(keyed=False),
            "500": _json("the app is misconfigured or failed", error),
        },
    }


def _openapi_get() -> dict[str, Any]:
    return {
        "operationId": "openapi_document",
        "summary": "This document",
        "security": [],
        "responses": {
            "200": _json(
                "the OpenAPI document of the app's HTTP routes",
                {"type": "object", "required": ["openapi", "info", "paths"]},
            ),
            **_host_refusals(keyed=False),
        },
    }


# ---------------------------------------------------------------------------------------------- parts


def _json(description: str, schema: dict[str, Any], headers: dict[str, Any] | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {"description": description, "content": {JSON: {"schema": schema}}}
    if headers:
        response["headers"] = headers
    return response


def _retry_after() -> dict[str, Any]:
    return {
        "Retry-After": {
            "description": "seconds to wait before asking again",
            "required": True,
            "schema": {"type": "integer", "minimum": 0},
        }
    }


def _host_refusals(*, keyed: bool = True) -> dict[str, Any]:
    """What the Functions host answers before a function runs (no body); 401 only where a key is needed."""
    key = {"401": {"description": "the Functions host: no function key, or a wrong one (no body)"}} if keyed else {}
    return {
        **key,
        "413": {"description": f"the Functions host: a body over {HOST_MAX_BODY_BYTES // (1024 * 1024)} MB (no body)"},
        "429": {
            "description": "the Functions host throttles (host.json maxOutstandingRequests, dynamic throttles; no body)"
        },
    }


def _requirements(*alternatives: tuple[str, ...]) -> list[dict[str, list[str]]]:
    """Every combination of one scheme from each group: all groups are required, any scheme of a group will do."""
    combos: list[dict[str, list[str]]] = [{}]
    for group in alternatives:
        combos = [{**combo, scheme: []} for combo in combos for scheme in group]
    return combos


def _security_schemes() -> dict[str, Any]:
    key = "the function key (checked by the Functions host; `tollwatch functions serve`: TOLLWATCH_FUNCTION_KEY)"
    shared = (
        "the Event Grid shared secret (TOLLWATCH_EVENTGRID_SECRETS, two during a rotation), checked by the handler; "
        "with no secret configured only the function key protects the route"
    )
    return {
        "functionKeyHeader": {"type": "apiKey", "in": "header", "name": FUNCTION_KEY_HEADER, "description": key},
        "functionKeyQuery": {"type": "apiKey", "in": "query", "name": FUNCTION_KEY_QUERY, "description": key},
        "eventGridSecretHeader": {"type": "apiKey", "in": "header", "name": SECRET_HEADER, "description": shared},
        "eventGridSecretQuery": {"type": "apiKey", "in": "query", "name": SECRET_QUERY, "description": shared},
    }


# ---------------------------------------------------------------------------------------------- the route

bp = func.Blueprint()


@bp.function_name("openapi_document")
@bp.route(route="openapi.json", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
def openapi_document(req: func.HttpRequest) -> func.HttpResponse:
    """The document; anonymous, like any API description, and the same for every caller."""
    return func.HttpResponse(body=document_json(), status_code=200, mimetype=JSON, charset="utf-8")
