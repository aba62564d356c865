"""Event Grid deliveries in: authentication, handshakes, parsing and validation. Pure functions, no I/O.

Event Grid does not retry 400, 401, 403 or 413, so every refusal here is final and must be right: a request
is checked *completely* (secret, size, JSON, every event of the batch) before anything is emitted, and a
refusal names its reason so it is readable in Event Grid's dead-letter log.

Both delivery schemas are understood, single events and batches:

* Event Grid schema (`application/json`, always an array): `id, topic, subject, eventType, eventTime, data,
  dataVersion, metadataVersion`; the subscription is proven by echoing a `SubscriptionValidationEvent` code.
* CloudEvents 1.0 structured mode (`application/cloudevents+json` or `…-batch+json`): `specversion, id,
  source, type, subject, time, data`; the subscription is proven by the HTTP OPTIONS abuse-protection
  handshake (`WebHook-Request-Origin` → `WebHook-Allowed-Origin`).

The receiver (`tollwatch.receiver`) turns the validated `BlobCreated` events into refresh events.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tollwatch.webio import InboundRequest, Reply

BLOB_CREATED = "Microsoft.Storage.BlobCreated"
SUBSCRIPTION_VALIDATION = "Microsoft.EventGrid.SubscriptionValidationEvent"
SECRET_HEADER = "x-tollwatch-secret"  # noqa: S105 (a header name, not a secret)
SECRET_QUERY = "secret"  # noqa: S105 (a parameter name)

_SUBJECT = re.compile(r"^/blobServices/default/containers/(?P<container>[^/]+)/blobs/(?P<blob>.+)$")


class Rejected(Exception):
    """A request refused for good: the status Event Grid will see and the reason it will log."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason

    def reply(self) -> Reply:
        return Reply.error(self.status, self.reason)


# ---------------------------------------------------------------------------------------------- models


class _Envelope(BaseModel):
    # Event Grid adds envelope fields over time; unknown ones are ignored, the ones we use are required.
    model_config = ConfigDict(extra="ignore", populate_by_name=True, frozen=True)


class EventGridSchemaEvent(_Envelope):
    """One event in the Event Grid schema, as delivered to a webhook."""

    id: str = Field(min_length=1)
    topic: str = Field(min_length=1)
    subject: str
    event_type: str = Field(alias="eventType", min_length=1)
    event_time: datetime = Field(alias="eventTime")
    data: dict[str, Any] = Field(default_factory=dict)
    data_version: str = Field(alias="dataVersion")
    metadata_version: str | None = Field(default=None, alias="metadataVersion")

    def normalised(self) -> GridEvent:
        return GridEvent(
            kind="eventgrid",
            id=self.id,
            topic=self.topic,
            subject=self.subject,
            type=self.event_type,
            time=self.event_time,
            data=self.data,
        )


class CloudEventSchemaEvent(_Envelope):
    """One CloudEvents 1.0 event in structured mode (JSON)."""

    specversion: Literal["1.0"]
    id: str = Field(min_length=1)
    source: str = Field(min_length=1)
    type: str = Field(min_length=1)
    subject: str = ""
    time: datetime | None = None
    data: dict[str, Any] = Field(default_factory=dict)

    def normalised(self) -> GridEvent:
        return GridEvent(
            kind="cloudevents",
            id=self.id,
            topic=self.source,
            subject=self.subject,
            type=self.type,
            time=self.time,
            data=self.data,
        )


class GridEvent(BaseModel):
    """Either schema, normalised: what the rest of tollwatch reads."""

    model_config = ConfigDict(frozen=True)

    kind: Literal["eventgrid", "cloudevents"] = Field(description="the delivery schema it arrived in")
    id: str
    topic: str
    subject: str
    type: str
    time: datetime | None
    data: dict[str, Any]


class BlobCreatedData(_Envelope):
    """The part of `Microsoft.Storage.BlobCreated` data tollwatch relies on."""

    url: str = Field(min_length=1)
    etag: str = Field(alias="eTag", min_length=1)
    sequencer: str = Field(min_length=1)
    api: str | None = None
    content_length: int | None = Field(default=None, alias="contentLength")


class BlobCreated(BaseModel):
    """A validated BlobCreated for the watched location."""

    model_config = ConfigDict(frozen=True)

    event_id: str
    topic: str
    container: str
    blob: str
    time: datetime | None
    data: BlobCreatedData


class WatchedLocation(BaseModel):
    """Which deliveries this endpoint accepts (from settings)."""

    model_config = ConfigDict(frozen=True)

    topics: tuple[str, ...] = ()
    container: str
    prefix: str = ""

    def check_topic(self, index: int, topic: str) -> None:
        if self.topics and topic.lower() not in {t.lower() for t in self.topics}:
            raise Rejected(400, f"event {index}: topic/source {topic!r} is not one this endpoint accepts")


# ---------------------------------------------------------------------------------------------- auth


def check_secret(request: InboundRequest, secrets: Sequence[str]) -> None:
    """The optional shared secret, from the `X-Tollwatch-Secret` header or the `secret` query parameter.

    With no secrets configured only the function key (checked by the Functions host) protects the route.
    Every configured secret is compared in constant time, so two can be valid during a rotation.
    """
    if not secrets:
        return
    provided = request.header(SECRET_HEADER) or request.query.get(SECRET_QUERY)
    if not provided:
        raise Rejected(401, f"missing shared secret (header {SECRET_HEADER} or query parameter {SECRET_QUERY!r})")
    matches = [hmac.compare_digest(provided.encode(), secret.encode()) for secret in secrets]
    if not any(matches):
        raise Rejected(401, "wrong shared secret")


def abuse_protection(request: InboundRequest, allowed_origins: Sequence[str]) -> Reply:
    """CloudEvents webhook OPTIONS handshake: grant delivery to an allowed `WebHook-Request-Origin`."""
    origin = request.header("webhook-request-origin")
    if not origin:
        raise Rejected(400, "OPTIONS without WebHook-Request-Origin: not a CloudEvents webhook handshake")
    if "*" not in allowed_origins and origin.lower() not in {o.lower() for o in allowed_origins}:
        raise Rejected(403, f"origin {origin!r} is not allowed to deliver events here")
    return Reply(
        status=200,
        headers={"WebHook-Allowed-Origin": origin, "WebHook-Allowed-Rate": "*", "Allow": "POST, OPTIONS"},
    )


# ---------------------------------------------------------------------------------------------- parsing


def parse_body(body: bytes, max_bytes: int) -> list[dict[str, Any]]:
    """The delivery as a list of JSON objects (a single event becomes a batch of one)."""
    if len(body) > max_bytes:
        raise Rejected(413, f"body of {len(body)} bytes exceeds the {max_bytes}-byte limit")
    if not body.strip():
        raise Rejected(400, "empty body: expected an event or a JSON array of events")
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise Rejected(400, f"body is not JSON: {exc}") from None
    items = parsed if isinstance(parsed, list) else [parsed]
    if not items:
        raise Rejected(400, "empty batch: the JSON array holds no events")
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise Rejected(400, f"event {index}: expected a JSON object, got {type(item).__name__}")
    return items


def parse_events(items: Sequence[dict[str, Any]]) -> list[GridEvent]:
    """Validate every event's envelope; one schema per batch (Event Grid never mixes them)."""
    schemas = {_schema_of(index, item) for index, item in enumerate(items)}
    if len(schemas) > 1:
        raise Rejected(400, "batch mixes Event Grid and CloudEvents schema events")
    events = []
    for index, item in enumerate(items):
        try:
            schema = CloudEventSchemaEvent if "specversion" in item else EventGridSchemaEvent
            events.append(schema.model_validate(item).normalised())
        except ValidationError as exc:
            raise Rejected(400, f"event {index}: {_describe(exc)}") from None
    return events


def _schema_of(index: int, item: dict[str, Any]) -> str:
    if "specversion" in item:
        return "cloudevents"
    if "eventType" in item:
        return "eventgrid"
    raise Rejected(400, f"event {index}: neither Event Grid schema (eventType) nor CloudEvents 1.0 (specversion)")


def validation_code(events: Sequence[GridEvent]) -> str | None:
    """The code to echo if this is a subscription validation request (which Event Grid sends alone)."""
    if not any(e.type == SUBSCRIPTION_VALIDATION for e in events):
        return None
    if len(events) != 1:
        raise Rejected(400, "a SubscriptionValidationEvent must be the only event of its request")
    code = events[0].data.get("validationCode")
    if not isinstance(code, str) or not code:
        raise Rejected(400, "event 0: SubscriptionValidationEvent without a data.validationCode")
    return code


def blob_created_events(events: Sequence[GridEvent], location: WatchedLocation) -> list[BlobCreated]:
    """Every event must be a BlobCreated from an accepted topic for the watched container and prefix."""
    accepted = []
    for index, event in enumerate(events):
        location.check_topic(index, event.topic)
        if event.type != BLOB_CREATED:
            raise Rejected(400, f"event {index}: unexpected event type {event.type!r}; only {BLOB_CREATED}")
        match = _SUBJECT.match(event.subject)
        if match is None:
            raise Rejected(400, f"event {index}: subject {event.subject!r} does not name a blob")
        container, blob = match["container"], match["blob"]
        if container != location.container or not blob.startswith(location.prefix):
            raise Rejected(
                400,
                f"event {index}: blob {container}/{blob} is outside the watched location "
                f"{location.container}/{location.prefix}*",
            )
        try:
            data = BlobCreatedData.model_validate(event.data)
        except ValidationError as exc:
            raise Rejected(400, f"event {index}: {_describe(exc)}") from None
        accepted.append(
            BlobCreated(
                event_id=event.id, topic=event.topic, container=container, blob=blob, time=event.time, data=data
            )
        )
    return accepted


def _describe(exc: ValidationError) -> str:
    """Field-level reasons without echoing input values (they may be large, or someone's secret)."""
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'event'}: {e['msg']}" for e in exc.errors())
