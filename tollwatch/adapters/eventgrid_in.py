"""Event Grid deliveries in: authentication, handshakes, parsing and validation. Pure functions, no I/O.

Event Grid does not retry 400, 401, 403 or 413, so every refusal here is final and must be right: a request
is checked *completely* (secret, subscription, size, JSON, every event of the batch) before anything is
emitted, and a refusal names its reason so it is readable in Event Grid's dead-letter log.

Two kinds of refusal. A problem with the *request* (secret, subscription name, size, JSON, mixed schemas, a
handshake inside a batch) refuses all of it. A problem with *one event* of a batch (its envelope, topic,
type, subject or data) refuses that event only (`RefusedEvent`): Event Grid answers for a batch as a whole
and does not retry a 4xx, so refusing the batch for one bad event would drop the good ones with it. The
receiver processes the accepted events and answers 200 listing the refused ones, or 400 when none is left.

Both delivery schemas are understood, single events and batches:

* Event Grid schema (`application/json`, always an array): `id, topic, subject, eventType, eventTime, data,
  dataVersion, metadataVersion`; the subscription is proven by echoing a `SubscriptionValidationEvent` code.
* CloudEvents 1.0 structured mode (`application/cloudevents+json` or `…-batch+json`): `specversion, id,
  source, type, subject, time, data`; the subscription is proven by the HTTP OPTIONS abuse-protection
  handshake (`WebHook-Request-Origin` → `WebHook-Allowed-Origin`).

The receiver (`tollwatch.core.receiver`) turns the validated `BlobCreated` events into refresh events.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import orjson
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from tollwatch.contract.errors import TollwatchError
from tollwatch.contract.webio import InboundRequest, Reply

BLOB_CREATED = "Microsoft.Storage.BlobCreated"
SUBSCRIPTION_VALIDATION = "Microsoft.EventGrid.SubscriptionValidationEvent"
SECRET_HEADER = "x-tollwatch-secret"  # noqa: S105 (a header name, not a secret)
SECRET_QUERY = "secret"  # noqa: S105 (a parameter name)
#: Set by Event Grid on every webhook POST (handshake and deliveries): the event subscription's name.
SUBSCRIPTION_HEADER = "aeg-subscription-name"
#: The CloudEvents webhook handshake (HTTP OPTIONS): the origin asking, and the answer granting it.
REQUEST_ORIGIN_HEADER = "WebHook-Request-Origin"
#: What a `WebHook-Request-Origin` may be: a DNS host name (CloudEvents webhook spec: "eventemitter.example.com"),
#: optionally with a port. It is echoed in the answer's headers, so anything else (a line break, a space) is refused.
ORIGIN_PATTERN = re.compile(
    r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*(?::[0-9]{1,5})?"
)
ALLOWED_ORIGIN_HEADER = "WebHook-Allowed-Origin"
ALLOWED_RATE_HEADER = "WebHook-Allowed-Rate"

_SUBJECT = re.compile(r"^/blobServices/default/containers/(?P<container>[^/]+)/blobs/(?P<blob>.+)$")


class Rejected(TollwatchError):
    """A request refused for good: the status Event Grid will see and the reason it will log."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason

    def reply(self) -> Reply:
        return Reply.error(self.status, self.reason)


class _EventRefused(Exception):
    """One event of a delivery cannot be accepted; the rest of its batch is judged on its own."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# ---------------------------------------------------------------------------------------------- models


def _utc_if_naive(value: datetime) -> datetime:
    """An event time without an offset is read as UTC, the zone Event Grid writes (`…Z`).

    Why: Python takes a naive datetime for local time, so the refresh's `rows_updated_at` (`.timestamp()`) depended
    on the host's zone, and at the start of the calendar (`"eventTime": "0001-01-01T00:00:00"`) it raised ValueError:
    a 500 for the whole batch, which Event Grid retries until it dead-letters it (found by
    tests/unit/test_fuzz_intake.py).
    """
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


#: An envelope's time, always with an offset (see `_utc_if_naive`).
EventTime = Annotated[datetime, AfterValidator(_utc_if_naive)]


class _Envelope(BaseModel):
    # Event Grid adds envelope fields over time; unknown ones are ignored, the ones we use are required.
    model_config = ConfigDict(extra="ignore", populate_by_name=True, frozen=True)


class EventGridSchemaEvent(_Envelope):
    """One event in the Event Grid schema, as delivered to a webhook."""

    id: str = Field(min_length=1)
    topic: str = Field(min_length=1)
    subject: str
    event_type: str = Field(alias="eventType", min_length=1)
    event_time: EventTime = Field(alias="eventTime")
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
    time: EventTime | None = None
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

    def check_topic(self, topic: str) -> None:
        if self.topics and topic.lower() not in {t.lower() for t in self.topics}:
            raise _EventRefused(f"topic/source {topic!r} is not one this endpoint accepts")


class RefusedEvent(BaseModel):
    """One event of a delivery that was not accepted, and why (nothing is emitted for it)."""

    model_config = ConfigDict(frozen=True)

    index: int = Field(description="position in the delivered batch (0 for a single event)")
    id: str | None = Field(default=None, description="the event's id, when it has a readable one")
    reason: str

    def describe(self) -> str:
        return f"event {self.index}: {self.reason}"


class SubscriptionValidationResponse(BaseModel):
    """The answer to an Event Grid schema SubscriptionValidationEvent: its code echoed, which proves the endpoint."""

    model_config = ConfigDict(frozen=True, populate_by_name=True)

    validation_response: str = Field(alias="validationResponse", min_length=1)


class Screening(BaseModel):
    """A delivery judged event by event: a handshake, or the accepted BlobCreated events and the refused rest."""

    model_config = ConfigDict(frozen=True)

    validation_code: str | None = None
    accepted: tuple[BlobCreated, ...] = ()
    refused: tuple[RefusedEvent, ...] = ()

    def refusal(self) -> Rejected:
        """The 400 for a delivery with nothing to accept, naming every event's reason."""
        return Rejected(400, "; ".join(r.describe() for r in self.refused) or "no events")


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


def check_subscription(request: InboundRequest, names: Sequence[str]) -> None:
    """The delivering Event Grid subscription (`aeg-subscription-name`) must be one of `names`.

    The shared secret proves the caller knows the endpoint's secret, not which subscription it is: another
    subscription given the same URL (another team's topic, a stale copy of this one) would otherwise deliver
    here. With no names configured any subscription may deliver. Names compare case-insensitively (Azure
    resource names are; Event Grid may send them upper-cased). 403: Event Grid does not retry it.
    """
    if not names:
        return
    provided = request.header(SUBSCRIPTION_HEADER)
    if not provided:
        raise Rejected(403, f"missing {SUBSCRIPTION_HEADER} header: only known Event Grid subscriptions deliver here")
    if provided.strip().lower() not in {name.lower() for name in names}:
        raise Rejected(
            403,
            f"event subscription {provided!r} is not one this endpoint accepts "
            "(TOLLWATCH_EVENTGRID_SUBSCRIPTION_NAMES)",
        )


def abuse_protection(request: InboundRequest, allowed_origins: Sequence[str]) -> Reply:
    """CloudEvents webhook OPTIONS handshake: grant delivery to an allowed `WebHook-Request-Origin`."""
    origin = request.header(REQUEST_ORIGIN_HEADER)
    if not origin:
        raise Rejected(400, f"OPTIONS without {REQUEST_ORIGIN_HEADER}: not a CloudEvents webhook handshake")
    if len(origin) > 260 or not ORIGIN_PATTERN.fullmatch(origin):
        raise Rejected(
            400, f"{REQUEST_ORIGIN_HEADER} must be a host name such as eventgrid.azure.net, got {origin[:80]!r}"
        )
    if "*" not in allowed_origins and origin.lower() not in {o.lower() for o in allowed_origins}:
        raise Rejected(403, f"origin {origin!r} is not allowed to deliver events here")
    return Reply(
        status=200,
        headers={ALLOWED_ORIGIN_HEADER: origin, ALLOWED_RATE_HEADER: "*", "Allow": "POST, OPTIONS"},
    )


# ---------------------------------------------------------------------------------------------- parsing


def parse_body(body: bytes, max_bytes: int) -> list[Any]:
    """The delivery as a list of JSON values (a single event becomes a batch of one); each is judged later."""
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
    return items


def screen(items: Sequence[Any], location: WatchedLocation) -> Screening:
    """Judge a delivery: request-level problems raise `Rejected`; each event is accepted or refused alone."""
    schemas = {_schema_of(item) for item in items} - {None}
    if len(schemas) > 1:
        raise Rejected(400, "batch mixes Event Grid and CloudEvents schema events")
    parsed: list[tuple[int, GridEvent]] = []
    refused: list[RefusedEvent] = []
    for index, item in enumerate(items):
        try:
            parsed.append((index, _parse_event(item)))
        except _EventRefused as problem:
            refused.append(RefusedEvent(index=index, id=_id_of(item), reason=problem.reason))
    code = _validation_code([event for _, event in parsed], batch_size=len(items))
    if code is not None:
        return Screening(validation_code=code)
    accepted: list[BlobCreated] = []
    for index, event in parsed:
        try:
            accepted.append(_blob_created(event, location))
        except _EventRefused as problem:
            refused.append(RefusedEvent(index=index, id=event.id, reason=problem.reason))
    return Screening(accepted=tuple(accepted), refused=tuple(sorted(refused, key=lambda r: r.index)))


def _schema_of(item: Any) -> str | None:
    if not isinstance(item, dict):
        return None
    if "specversion" in item:
        return "cloudevents"
    if "eventType" in item:
        return "eventgrid"
    return None


def _id_of(item: Any) -> str | None:
    value = item.get("id") if isinstance(item, dict) else None
    return value if isinstance(value, str) and value else None


def _parse_event(item: Any) -> GridEvent:
    """One event's envelope, in whichever schema it declares."""
    if not isinstance(item, dict):
        raise _EventRefused(f"expected a JSON object, got {type(item).__name__}")
    schema = _schema_of(item)
    if schema is None:
        raise _EventRefused("neither Event Grid schema (eventType) nor CloudEvents 1.0 (specversion)")
    model = CloudEventSchemaEvent if schema == "cloudevents" else EventGridSchemaEvent
    try:
        return model.model_validate(item).normalised()
    except ValidationError as exc:
        raise _EventRefused(_describe(exc)) from None


def _validation_code(events: Sequence[GridEvent], *, batch_size: int) -> str | None:
    """The code to echo if this is a subscription validation request (which Event Grid sends alone)."""
    if not any(e.type == SUBSCRIPTION_VALIDATION for e in events):
        return None
    if batch_size != 1:
        raise Rejected(400, "a SubscriptionValidationEvent must be the only event of its request")
    code = events[0].data.get("validationCode")
    if not isinstance(code, str) or not code:
        raise Rejected(400, "event 0: SubscriptionValidationEvent without a data.validationCode")
    return code


def _blob_created(event: GridEvent, location: WatchedLocation) -> BlobCreated:
    """A BlobCreated from an accepted topic for the watched container and prefix, or a refusal saying why not."""
    location.check_topic(event.topic)
    if event.type != BLOB_CREATED:
        raise _EventRefused(f"unexpected event type {event.type!r}; only {BLOB_CREATED}")
    match = _SUBJECT.match(event.subject)
    if match is None:
        raise _EventRefused(f"subject {event.subject!r} does not name a blob")
    container, blob = match["container"], match["blob"]
    if container != location.container or not blob.startswith(location.prefix):
        raise _EventRefused(
            f"blob {container}/{blob} is outside the watched location {location.container}/{location.prefix}*"
        )
    try:
        data = BlobCreatedData.model_validate(event.data)
    except ValidationError as exc:
        raise _EventRefused(_describe(exc)) from None
    return BlobCreated(event_id=event.id, topic=event.topic, container=container, blob=blob, time=event.time, data=data)


def _describe(exc: ValidationError) -> str:
    """Field-level reasons without echoing input values (they may be large, or someone's secret)."""
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'event'}: {e['msg']}" for e in exc.errors())
