"""The Event Grid receiver: validated BlobCreated deliveries in, `tollwatch.dataset.refreshed` out.

One receiver serves both entry points of the Function app — the HTTP webhook route (`handle_http`, which
also answers the handshakes and picks the status code) and the Event Grid trigger (`handle_trigger`, where
the Functions host has done the handshake and authentication already). Processing order:

1. validate the whole request (`tollwatch.adapters.eventgrid_in`): a refused request emits nothing; in a batch, each
   event is accepted or refused on its own, so one bad event neither blocks nor lets through the others;
2. drop stale deliveries: Event Grid may deliver out of order, so a BlobCreated whose `sequencer` is older
   than the last one seen for the same blob (kept in a small state blob per blob URL) is ignored;
3. emit one refresh per remaining blob; the event id derives from blob URL + eTag, so a redelivery of the
   same blob version is dropped by Prefect as a duplicate;
4. record each blob's sequencer, conditionally (ETag), only after the emit was confirmed.

Storage or Prefect being unreachable is transient: the HTTP route answers 503 (Event Grid retries), the
trigger raises (the host reports failure and Event Grid retries). Steps 3 and 4 are idempotent, so a retry
after a partial failure re-sends the same ids and moves the same sequencers.

The Event Grid path does not move the watcher's watermark (it does not know Socrata's `rowsUpdatedAt`); it
reads it, as `previous_rows_updated_at`, so the ingest fetches what changed since the last announced publish.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from azure.core.exceptions import AzureError
from pydantic import BaseModel, ConfigDict, Field

from tollwatch.adapters.blob_state import Versioned
from tollwatch.adapters.eventgrid_in import (
    SUBSCRIPTION_HEADER,
    BlobCreated,
    RefusedEvent,
    Rejected,
    SubscriptionValidationResponse,
    WatchedLocation,
    abuse_protection,
    check_secret,
    check_subscription,
    parse_body,
    screen,
)
from tollwatch.adapters.prefect_events import EmitError
from tollwatch.contract.errors import TollwatchError
from tollwatch.contract.events import BlobRef, DatasetRefreshed, TollwatchEvent
from tollwatch.contract.settings import Settings
from tollwatch.contract.webio import InboundRequest, Reply
from tollwatch.core.ports import EventSink, JsonState
from tollwatch.core.watermark import WatermarkStore

log = logging.getLogger(__name__)

_MAX_WRITE_ROUNDS = 5


class TransientFailure(TollwatchError):
    """Storage or Prefect could not be reached: the delivery must be retried, and nothing was lost."""

    status = 503


# ---------------------------------------------------------------------------------------------- sequencers


class SequencerMark(BaseModel):
    """The newest delivery seen for one blob URL."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: str
    sequencer: str
    etag: str
    event_id: str
    recorded_at: datetime


class SequencerStore:
    """Last seen `sequencer` per blob, one small blob each: `<prefix>/eventgrid/sequencer/<sha256(url)>.json`."""

    def __init__(self, blobs: JsonState, *, state_prefix: str = "state") -> None:
        self._blobs = blobs
        self._prefix = f"{state_prefix.strip('/')}/eventgrid/sequencer"

    def blob_name(self, url: str) -> str:
        return f"{self._prefix}/{hashlib.sha256(url.encode()).hexdigest()}.json"

    def read(self, url: str) -> Versioned[SequencerMark]:
        return self._blobs.read(self.blob_name(url), SequencerMark)

    def advance(self, mark: SequencerMark) -> None:
        """Record `mark` unless an equal or newer sequencer is already there (a concurrent delivery)."""
        for _ in range(_MAX_WRITE_ROUNDS):
            current = self.read(mark.url)
            if current.value is not None and current.value.sequencer >= mark.sequencer:
                return
            if self._blobs.write(self.blob_name(mark.url), mark, expected_etag=current.etag):
                return
        raise TransientFailure(f"sequencer state for a blob kept changing ({_MAX_WRITE_ROUNDS} rounds); retry")


# ---------------------------------------------------------------------------------------------- receiver


class ReceiverPolicy(BaseModel):
    """What the receiver accepts and which dataset a publish refreshes (from settings)."""

    model_config = ConfigDict(frozen=True)

    domain: str
    dataset_id: str
    location: WatchedLocation
    secrets: tuple[str, ...] = Field(default=(), repr=False)
    subscription_names: tuple[str, ...] = ()
    allowed_origins: tuple[str, ...] = ("eventgrid.azure.net",)
    max_body_bytes: int = 1_048_576

    @classmethod
    def from_settings(cls, settings: Settings) -> ReceiverPolicy:
        return cls(
            domain=settings.upstream_domain,
            dataset_id=settings.upstream_dataset_id,
            location=WatchedLocation(
                topics=tuple(settings.eventgrid_source_topics),
                container=settings.eventgrid_container,
                prefix=settings.eventgrid_blob_prefix,
            ),
            secrets=tuple(s.get_secret_value() for s in settings.eventgrid_secrets),
            subscription_names=tuple(settings.eventgrid_subscription_names),
            allowed_origins=tuple(settings.eventgrid_allowed_origins),
            max_body_bytes=settings.eventgrid_max_body_bytes,
        )


class Emitted(BaseModel):
    event_id: str
    blob: str
    sequencer: str


class Dropped(BaseModel):
    blob: str
    sequencer: str
    newer_sequencer: str


class DeliveryResult(BaseModel):
    """What one delivery did (the 200 body of the webhook route)."""

    received: int = Field(description="events in the delivery, accepted or refused")
    emitted: list[Emitted] = Field(default_factory=list)
    dropped_stale: list[Dropped] = Field(default_factory=list)
    refused: list[RefusedEvent] = Field(
        default_factory=list, description="events of the batch not accepted (nothing emitted for them), with why"
    )


class EventGridReceiver:
    """Validates deliveries, drops stale ones, emits refreshes, records sequencers."""

    def __init__(
        self, policy: ReceiverPolicy, sequencers: SequencerStore, watermarks: WatermarkStore, emitter: EventSink
    ) -> None:
        self._policy = policy
        self._sequencers = sequencers
        self._watermarks = watermarks
        self._emitter = emitter

    # ------------------------------------------------------------------ entry points

    def handle_http(self, request: InboundRequest) -> Reply:
        """The webhook route: every answer is a deliberate status code Event Grid acts on.

        401 secret, 403 subscription or origin, 405 method, 413 size, 400 for a request with nothing
        acceptable in it, 503 (with Retry-After) when storage or Prefect is unreachable, else 200 with what
        was emitted, dropped as stale and refused (a batch's bad events do not cost its good ones).
        """
        try:
            checked = self._validate_http(request)
        except Rejected as rejected:
            log.warning("Event Grid delivery refused with %d: %s", rejected.status, rejected.reason)
            return rejected.reply()
        if isinstance(checked, Reply):  # a handshake
            return checked
        blobs, refused = checked
        try:
            result = self.deliver(blobs)
        except TransientFailure as exc:
            log.error("Event Grid delivery not processed, Event Grid will retry: %s", exc)
            return Reply.error(503, str(exc), headers={"Retry-After": "30"})
        result.received += len(refused)  # every event of the request, accepted or not
        result.refused.extend(refused)
        return Reply.with_json(200, result.model_dump(mode="json"))

    def handle_trigger(self, event: dict[str, Any]) -> DeliveryResult | None:
        """The Event Grid trigger: refusals are logged and dropped (a retry could not fix them),
        transient failures raise so the host reports the invocation failed and Event Grid retries."""
        try:
            screening = screen([event], self._policy.location)
        except Rejected as rejected:
            log.error("Event Grid event %s dropped: %s", event.get("id"), rejected.reason)
            return None
        if screening.validation_code is not None:  # the host answers handshakes itself
            return None
        if screening.refused:
            log.error("Event Grid event %s dropped: %s", event.get("id"), screening.refusal().reason)
            return None
        return self.deliver(screening.accepted)

    # ------------------------------------------------------------------ steps

    def _validate_http(self, request: InboundRequest) -> tuple[list[BlobCreated], list[RefusedEvent]] | Reply:
        """A handshake reply, or the accepted BlobCreated events and the refused ones (at least one accepted)."""
        check_secret(request, self._policy.secrets)
        if request.method == "OPTIONS":  # the CloudEvents handshake carries no aeg-* headers
            return abuse_protection(request, self._policy.allowed_origins)
        if request.method != "POST":
            raise Rejected(405, f"method {request.method} not allowed; Event Grid delivers with POST")
        check_subscription(request, self._policy.subscription_names)
        screening = screen(parse_body(request.body, self._policy.max_body_bytes), self._policy.location)
        if screening.validation_code is not None:
            log.info("answering Event Grid subscription validation for %s", request.header(SUBSCRIPTION_HEADER))
            answer = SubscriptionValidationResponse(validation_response=screening.validation_code)
            return Reply.with_json(200, answer.model_dump(by_alias=True))
        if not screening.accepted:
            raise screening.refusal()
        for refused in screening.refused:
            log.warning("Event Grid event refused, the rest of its batch is processed: %s", refused.describe())
        return list(screening.accepted), list(screening.refused)

    def deliver(self, blobs: Sequence[BlobCreated]) -> DeliveryResult:
        """Steps 2 to 4 for an already validated batch."""
        result = DeliveryResult(received=len(blobs))
        try:
            fresh = self._drop_stale(blobs, result)
            if not fresh:
                return result
            watermark = self._watermarks.read().value
            previous = watermark.rows_updated_at if watermark else None
            events = [TollwatchEvent.of(self._refresh(blob, previous)) for blob in fresh]
            self._emitter.emit(events)
            for blob, event in zip(fresh, events, strict=True):
                self._sequencers.advance(
                    SequencerMark(
                        url=blob.data.url,
                        sequencer=blob.data.sequencer,
                        etag=blob.data.etag,
                        event_id=str(event.id),
                        recorded_at=datetime.now(UTC),
                    )
                )
                result.emitted.append(
                    Emitted(event_id=str(event.id), blob=blob.data.url, sequencer=blob.data.sequencer)
                )
        except EmitError as exc:
            log.error("%s", exc)
            raise TransientFailure("could not deliver the refresh event(s) to Prefect; retry later") from exc
        except AzureError as exc:
            log.error("state storage error: %s", exc)
            raise TransientFailure("state storage is unavailable; retry later") from exc
        return result

    def _drop_stale(self, blobs: Sequence[BlobCreated], result: DeliveryResult) -> list[BlobCreated]:
        """Keep, per blob URL, only the newest delivery, and only if it is not older than the recorded one.

        An equal sequencer is a redelivery of the recorded event: it is emitted again (same id, so Prefect
        drops it) rather than skipped, because the earlier attempt may have died between emit and answer.

        Within a batch, an equal sequencer with another eTag is not older either, so it is kept too (one refresh
        per eTag), as it would be in a delivery of its own. Why: it used to be neither emitted nor reported, lost
        without a word (found by tests/unit/test_fuzz_intake.py); exact duplicates still make one refresh.
        """
        newest: dict[str, list[BlobCreated]] = {}  # per blob URL: its events at the highest sequencer, one per eTag
        for blob in blobs:
            top = newest.get(blob.data.url)
            if top is None or blob.data.sequencer > top[0].data.sequencer:
                result.dropped_stale.extend(_dropped(seen, blob.data.sequencer) for seen in top or ())
                newest[blob.data.url] = [blob]
            elif blob.data.sequencer < top[0].data.sequencer:
                result.dropped_stale.append(_dropped(blob, top[0].data.sequencer))
            elif all(seen.data.etag != blob.data.etag for seen in top):
                top.append(blob)
        fresh = []
        for url, top in newest.items():
            recorded = self._sequencers.read(url).value
            sequencer = top[0].data.sequencer
            if recorded is not None and sequencer < recorded.sequencer:
                log.info("stale BlobCreated for %s dropped: sequencer %s < %s", url, sequencer, recorded.sequencer)
                result.dropped_stale.extend(_dropped(blob, recorded.sequencer) for blob in top)
            else:
                fresh.extend(top)
        return fresh

    def _refresh(self, blob: BlobCreated, previous: int | None) -> DatasetRefreshed:
        published = blob.time or datetime.now(UTC)
        return DatasetRefreshed(
            domain=self._policy.domain,
            dataset_id=self._policy.dataset_id,
            rows_updated_at=int(published.timestamp()),
            previous_rows_updated_at=previous,
            source="eventgrid",
            blob=BlobRef(url=blob.data.url, etag=blob.data.etag, sequencer=blob.data.sequencer),
        )


def _dropped(blob: BlobCreated, newer: str) -> Dropped:
    return Dropped(blob=blob.data.url, sequencer=blob.data.sequencer, newer_sequencer=newer)
