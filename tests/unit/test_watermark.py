"""The watcher's decisions (tollwatch/core/watermark.py): announce each upstream publish once, and move the watermark
only after the announcement was confirmed, whatever races, failures and late ticks happen.

In-memory ports: the upstream's metadata, the state blob (ETag-conditional writes) and the event sink. The same
promises on Azurite and the real Prefect server: tests/integration/test_fn_watch.py.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from tests.support.fakes import DATASET, DOMAIN, FakeJsonState, FakeUpstream, RecordingSink
from tollwatch.adapters.prefect_events import EmitError
from tollwatch.adapters.socrata import UpstreamError
from tollwatch.contract.events import DatasetRefreshed, EventName
from tollwatch.core.watermark import UpstreamWatcher, WatchOutcome, Watermark, WatermarkConflict, WatermarkStore

V1, V2, V3 = 1_704_153_600, 1_704_240_000, 1_704_326_400


class Watch:
    """One watcher on in-memory ports, and what the tests look at."""

    def __init__(self, rows_updated_at: int = V1) -> None:
        self.upstream = FakeUpstream(rows_updated_at=rows_updated_at)
        self.state = FakeJsonState()
        self.store = WatermarkStore(self.state, domain=DOMAIN, dataset_id=DATASET)
        self.sink = RecordingSink()
        self.watcher = UpstreamWatcher(self.upstream, self.store, self.sink)

    def watermark(self) -> int | None:
        value = self.store.read().value
        return value.rows_updated_at if value else None

    def someone_else_writes(self, rows_updated_at: int) -> None:
        """Another watcher advances the watermark between this one's read and its write."""
        other = Watermark(
            domain=DOMAIN,
            dataset_id=DATASET,
            rows_updated_at=rows_updated_at,
            event_id="other-watcher",
            advanced_at=datetime.now(UTC),
        )
        self.state.put(self.store.blob_name, other)


def test_the_first_tick_announces_the_dataset_as_a_first_sighting_and_stores_the_watermark():
    watch = Watch(rows_updated_at=V1)

    result = watch.watcher.check()

    assert result.outcome is WatchOutcome.ADVANCED
    [event] = watch.sink.emitted
    assert event.event == EventName.DATASET_REFRESHED
    assert event.payload["rows_updated_at"] == V1
    assert event.payload["previous_rows_updated_at"] is None
    assert event.payload["source"] == "watcher"
    assert result.event_id == str(event.id)
    assert watch.watermark() == V1
    assert watch.store.read().value.event_id == str(event.id)
    assert watch.store.blob_name == f"state/watermark/{DOMAIN}/{DATASET}.json"


def test_a_publish_is_announced_once_with_the_previous_watermark_and_a_quiet_tick_emits_nothing():
    watch = Watch(rows_updated_at=V1)
    watch.watcher.check()
    watch.upstream.rows_updated_at = V2

    published = watch.watcher.check()
    quiet = watch.watcher.check()

    assert [e.payload["rows_updated_at"] for e in watch.sink.emitted] == [V1, V2]
    assert watch.sink.emitted[-1].payload["previous_rows_updated_at"] == V1
    assert (published.outcome, quiet.outcome) == (WatchOutcome.ADVANCED, WatchOutcome.UNCHANGED)
    assert quiet.event_id is None
    assert watch.watermark() == V2


def test_an_upstream_that_steps_back_is_not_announced_and_the_watermark_stays():
    watch = Watch(rows_updated_at=V2)
    watch.watcher.check()
    watch.upstream.rows_updated_at = V1

    result = watch.watcher.check()

    assert result.outcome is WatchOutcome.UNCHANGED
    assert (result.rows_updated_at, result.previous_rows_updated_at) == (V1, V2)
    assert len(watch.sink.emitted) == 1
    assert watch.watermark() == V2


def test_a_failed_emit_leaves_the_watermark_so_the_next_tick_announces_the_same_publish_with_the_same_id():
    watch = Watch(rows_updated_at=V1)
    watch.watcher.check()
    watch.upstream.rows_updated_at = V2
    watch.sink.fail_next(EmitError("Prefect is down"))

    with pytest.raises(EmitError):
        watch.watcher.check()
    assert watch.watermark() == V1

    retried = watch.watcher.check()

    expected = DatasetRefreshed(domain=DOMAIN, dataset_id=DATASET, rows_updated_at=V2, previous_rows_updated_at=V1)
    assert retried.event_id == str(expected.event_id())
    assert watch.watermark() == V2


def test_an_unreachable_upstream_emits_nothing_and_moves_nothing():
    watch = Watch()
    watch.upstream.fail_next("metadata", UpstreamError("GET /api/views/qzve-kjga.json failed"))

    with pytest.raises(UpstreamError):
        watch.watcher.check()

    assert watch.sink.emitted == []
    assert watch.state.writes == []


def test_a_watcher_that_loses_the_race_to_the_same_publish_still_emits_and_leaves_the_watermark_to_the_winner():
    """Both watchers emit the same deterministic id (Prefect keeps one); only one conditional write wins."""
    watch = Watch(rows_updated_at=V2)
    watch.state.before_write(lambda: watch.someone_else_writes(V2))

    result = watch.watcher.check()

    assert result.outcome is WatchOutcome.ALREADY_ADVANCED
    assert len(watch.sink.emitted) == 1
    assert watch.store.read().value.event_id == "other-watcher"


def test_a_watcher_that_lost_to_an_older_publish_overtakes_it():
    watch = Watch(rows_updated_at=V1)
    watch.watcher.check()
    watch.upstream.rows_updated_at = V3
    watch.state.before_write(lambda: watch.someone_else_writes(V2))

    result = watch.watcher.check()

    assert result.outcome is WatchOutcome.ADVANCED
    assert watch.watermark() == V3


def test_a_watermark_that_keeps_changing_fails_the_tick_after_the_announcement():
    watch = Watch(rows_updated_at=V3)
    for older in range(V1, V1 + 5):
        watch.state.before_write(lambda older=older: watch.someone_else_writes(older))

    with pytest.raises(WatermarkConflict, match="changed 5 times"):
        watch.watcher.check()

    assert len(watch.sink.emitted) == 1  # announced; the retry announces the same id again
    assert watch.watermark() == V1 + 4


def test_a_past_due_tick_catches_up_with_one_refresh_spanning_every_missed_publish():
    watch = Watch(rows_updated_at=V1)
    watch.watcher.check()
    watch.upstream.rows_updated_at = V3  # V2 was published while no tick ran

    result = watch.watcher.check(past_due=True)

    assert result.past_due
    assert [(e.payload["previous_rows_updated_at"], e.payload["rows_updated_at"]) for e in watch.sink.emitted] == [
        (None, V1),
        (V1, V3),
    ]
