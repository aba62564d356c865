"""The upstream watermark and the watcher that moves it: read → compare → emit → advance.

The watermark is the `rowsUpdatedAt` of the last publish announced to Prefect, kept as a small JSON blob.
The order of the steps is the whole design:

1. read the watermark *with its ETag*;
2. read the upstream metadata;
3. if `rowsUpdatedAt` moved forward, emit `tollwatch.dataset.refreshed` and wait for the server's 2xx;
4. only then advance the watermark, conditionally on the ETag read in step 1.

An emit failure raises before step 4, so the watermark stays and the next tick (or the Functions retry)
announces the same publish again. Two watchers racing both emit the *same* deterministic event id — Prefect
keeps one — and only one conditional write wins; the loser sees `412` and re-reads to confirm that someone
else advanced it. A tick that ran late (past due) or after missed ticks compares the stored watermark with
the current `rowsUpdatedAt`, so it catches up with one refresh spanning everything missed.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

from tollwatch.adapters.blob_state import Versioned
from tollwatch.contract.errors import TollwatchError
from tollwatch.contract.events import DatasetRefreshed, TollwatchEvent
from tollwatch.core.ports import EventSink, JsonState, UpstreamMetadata

log = logging.getLogger(__name__)

#: Conditional-write rounds before giving up; each lost round means another writer made progress.
_MAX_WRITE_ROUNDS = 5


class WatermarkConflict(TollwatchError):
    """The watermark kept changing under us; the invocation fails and the retry starts from a fresh read."""


class Watermark(BaseModel):
    """The stored document: which publish of which dataset was last announced, and by which event."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    domain: str
    dataset_id: str
    rows_updated_at: int = Field(description="Socrata rowsUpdatedAt (epoch s) of the last announced publish")
    event_id: str = Field(description="the tollwatch.dataset.refreshed event that announced it")
    advanced_at: datetime


class WatermarkStore:
    """One watermark blob per dataset: `<state_prefix>/watermark/<domain>/<dataset_id>.json`."""

    def __init__(self, blobs: JsonState, *, domain: str, dataset_id: str, state_prefix: str = "state") -> None:
        self._blobs = blobs
        self.domain = domain
        self.dataset_id = dataset_id
        self.blob_name = f"{state_prefix.strip('/')}/watermark/{domain}/{dataset_id}.json"

    def read(self) -> Versioned[Watermark]:
        """The watermark and its ETag (empty on the very first run)."""
        return self._blobs.read(self.blob_name, Watermark)

    def advance(self, refresh: DatasetRefreshed, event_id: str, read: Versioned[Watermark]) -> bool:
        """Move the watermark to `refresh.rows_updated_at` if it is still what `read` saw.

        Returns True if this call wrote it, False if another writer already moved it at least as far.
        A writer that moved it less far (an older publish) is overtaken: re-read and try again.
        """
        new = Watermark(
            domain=self.domain,
            dataset_id=self.dataset_id,
            rows_updated_at=refresh.rows_updated_at,
            event_id=event_id,
            advanced_at=datetime.now(UTC),
        )
        current = read
        for _ in range(_MAX_WRITE_ROUNDS):
            if self._blobs.write(self.blob_name, new, expected_etag=current.etag):
                return True
            current = self.read()
            if current.value is not None and current.value.rows_updated_at >= new.rows_updated_at:
                log.info(
                    "watermark of %s already at %s (advanced by event %s): nothing to write",
                    self.dataset_id,
                    current.value.rows_updated_at,
                    current.value.event_id,
                )
                return False
        raise WatermarkConflict(
            f"the watermark blob {self.blob_name} changed {_MAX_WRITE_ROUNDS} times while advancing it to "
            f"{new.rows_updated_at}; the next attempt starts from a fresh read"
        )


class WatchOutcome(StrEnum):
    """What one tick did."""

    UNCHANGED = "unchanged"  # rowsUpdatedAt did not move forward: nothing emitted
    ADVANCED = "advanced"  # emitted, and this tick advanced the watermark
    ALREADY_ADVANCED = "already-advanced"  # emitted (a duplicate Prefect drops), another watcher advanced it


class WatchResult(BaseModel):
    """The outcome of one tick, for logs and the CLI."""

    model_config = ConfigDict(frozen=True)

    outcome: WatchOutcome
    dataset: str
    rows_updated_at: int
    previous_rows_updated_at: int | None
    event_id: str | None = None
    past_due: bool = False


class UpstreamWatcher:
    """Announces each upstream publish exactly once (in effect), whatever the number of watchers or retries."""

    def __init__(self, socrata: UpstreamMetadata, watermarks: WatermarkStore, emitter: EventSink) -> None:
        self._socrata = socrata
        self._watermarks = watermarks
        self._emitter = emitter

    def check(self, *, past_due: bool = False) -> WatchResult:
        """One tick. Raises (EmitError, UpstreamError, storage errors) rather than advance on a failure."""
        read = self._watermarks.read()
        previous = read.value.rows_updated_at if read.value else None
        metadata = self._socrata.metadata(self._watermarks.dataset_id)
        current = metadata.rows_updated_at
        dataset = f"{self._watermarks.domain}/{self._watermarks.dataset_id}"
        if past_due:
            log.info("tick for %s is past due: catching up from watermark %s in one refresh", dataset, previous)

        if previous is not None and current <= previous:
            if current < previous:
                log.warning(
                    "%s: upstream rowsUpdatedAt %s is older than the watermark %s; not announcing a step back",
                    dataset,
                    current,
                    previous,
                )
            return WatchResult(
                outcome=WatchOutcome.UNCHANGED,
                dataset=dataset,
                rows_updated_at=current,
                previous_rows_updated_at=previous,
                past_due=past_due,
            )

        refresh = DatasetRefreshed(
            domain=self._watermarks.domain,
            dataset_id=self._watermarks.dataset_id,
            rows_updated_at=current,
            previous_rows_updated_at=previous,
            source="watcher",
        )
        event = TollwatchEvent.of(refresh)
        self._emitter.emit([event])  # raises on failure: the watermark below is never reached
        advanced = self._watermarks.advance(refresh, str(event.id), read)
        outcome = WatchOutcome.ADVANCED if advanced else WatchOutcome.ALREADY_ADVANCED
        log.info("%s: refresh %s → %s announced as %s (%s)", dataset, previous, current, event.id, outcome)
        return WatchResult(
            outcome=outcome,
            dataset=dataset,
            rows_updated_at=current,
            previous_rows_updated_at=previous,
            event_id=str(event.id),
            past_due=past_due,
        )
