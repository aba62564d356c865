"""The audit (tollwatch/core/audit.py): which days differ between the upstream and the table, and the backfill events
that repair them, with ids that repeat for the same findings on the same snapshot and change after any commit.

The upstream's counts are in memory; the table is a real pyiceberg table on a temp directory (the audit scans it),
seeded once for the module. `tollwatch audit` on the stack and the mirror: tests/integration/test_audit.py.
"""

from __future__ import annotations

from datetime import date, timedelta
from pathlib import Path

import pytest

from tests.support.fakes import DATASET, DOMAIN, CountsUpstream, day_rows
from tests.support.tables import commit_raw_rows, local_table_store
from tollwatch.contract.events import EventName, Window
from tollwatch.core.audit import (
    DayCount,
    Reconciliation,
    empty_ranges,
    first_day,
    reconcile,
    repair_events,
    repair_windows,
)
from tollwatch.core.table import IcebergTableStore

ROWS_PER_DAY = 24  # tests.support.fakes.day_rows: one plaza, one direction, every hour
JAN = [date(2024, 1, d) for d in range(1, 32)]
WEEK = Window(start=JAN[0], stop=JAN[7])  # Jan 1-7


@pytest.fixture(scope="module")
def table(tmp_path_factory: pytest.TempPathFactory) -> tuple[IcebergTableStore, int]:
    """The table holds Jan 1-5, 24 rows a day (one window load); returns the store and that load's snapshot."""
    store = local_table_store(Path(tmp_path_factory.mktemp("audit")))
    rows = [row for day in JAN[:5] for row in day_rows(day, version=1_704_153_600)]
    snapshot = commit_raw_rows(store, Window(start=JAN[0], stop=JAN[5]), rows, refresh_id="seed", through=1_704_153_600)
    return store, snapshot


def test_days_that_differ_are_listed_with_both_counts_and_days_empty_on_both_sides_are_not(table):
    store, snapshot = table
    upstream = CountsUpstream(
        {
            JAN[0]: 24,
            JAN[1]: 24,
            JAN[2]: 20,  # 4 rows deleted upstream (or loaded twice)
            # JAN[3]: the whole day deleted upstream
            JAN[4]: 24,
            JAN[5]: 24,  # never loaded
        }
    )

    found = reconcile(upstream, store, DATASET, WEEK)

    assert not found.matches
    assert [(d.day, d.upstream, d.table, d.describe()) for d in found.differing_days] == [
        (JAN[2], 20, 24, "extra 4"),
        (JAN[3], 0, 24, "extra 24"),
        (JAN[5], 24, 0, "missing 24"),
    ]
    assert (found.upstream_rows, found.table_rows) == (116, 120)
    assert found.table_snapshot_id == snapshot
    assert found.window == WEEK


def test_a_table_that_holds_what_the_upstream_holds_matches(table):
    store, _ = table
    upstream = CountsUpstream({day: ROWS_PER_DAY for day in JAN[:5]})

    found = reconcile(upstream, store, DATASET, WEEK)

    assert found.matches
    assert found.differing_days == []
    assert repair_events(found, DOMAIN, DATASET, requested_by="audit") == []


def test_only_the_audited_window_is_read_on_both_sides(table):
    store, _ = table
    upstream = CountsUpstream({day: ROWS_PER_DAY for day in JAN})

    found = reconcile(upstream, store, DATASET, Window(start=JAN[3], stop=JAN[6]))

    assert [(d.day, d.upstream, d.table) for d in found.differing_days] == [(JAN[5], 24, 0)]
    assert found.table_rows == 2 * ROWS_PER_DAY


def test_a_table_not_created_yet_lacks_every_upstream_day(tmp_path):
    upstream = CountsUpstream({JAN[0]: 24, JAN[1]: 24})

    found = reconcile(upstream, local_table_store(tmp_path), DATASET, WEEK)

    assert found.table_snapshot_id is None
    assert [(d.day, d.missing) for d in found.differing_days] == [(JAN[0], 24), (JAN[1], 24)]


def test_the_first_day_comes_from_the_files_bounds_and_gaps_are_the_empty_runs_between_days(table, tmp_path):
    store, _ = table

    assert first_day(store) == JAN[0]
    assert first_day(local_table_store(tmp_path)) is None
    assert empty_ranges({JAN[0]: 1, JAN[1]: 1, JAN[4]: 1, JAN[9]: 1}) == [
        Window(start=JAN[2], stop=JAN[4]),
        Window(start=JAN[5], stop=JAN[9]),
    ]


# ---------------------------------------------------------------------------------------------- repair


def findings(days: list[date], snapshot: int | None = 7) -> Reconciliation:
    return Reconciliation(
        window=Window(start=date(2024, 1, 1), stop=date(2024, 4, 1)),
        upstream_rows=len(days) * ROWS_PER_DAY,
        table_rows=0,
        differing_days=[DayCount(day=d, upstream=ROWS_PER_DAY, table=0) for d in days],
        table_snapshot_id=snapshot,
    )


def test_repair_windows_join_contiguous_days_and_split_them_at_month_boundaries() -> None:
    """The grouping alone: contiguous differing days are one window, cut where a month ends; one request id for
    all of one audit's events, derived from its findings and the snapshot it read."""
    found = findings([date(2024, 1, 30), date(2024, 1, 31), date(2024, 2, 1), date(2024, 2, 3), date(2024, 3, 10)])

    assert [str(w) for w in repair_windows(found)] == [
        "[2024-01-30, 2024-02-01)",
        "[2024-02-01, 2024-02-02)",
        "[2024-02-03, 2024-02-04)",
        "[2024-03-10, 2024-03-11)",
    ]
    events = repair_events(found, DOMAIN, DATASET, requested_by="test")
    assert len({e.payload["request_id"] for e in events}) == 1
    assert [e.id for e in events] == [e.id for e in repair_events(found, DOMAIN, DATASET, requested_by="x")]
    other_snapshot = found.model_copy(update={"table_snapshot_id": 8})
    assert {e.id for e in repair_events(other_snapshot, DOMAIN, DATASET, "test")}.isdisjoint(e.id for e in events)
    assert repair_events(found.model_copy(update={"differing_days": []}), DOMAIN, DATASET, "test") == []


def test_a_repair_event_is_a_backfill_of_its_window_that_says_what_the_audit_found():
    found = findings([date(2024, 1, 14), date(2024, 1, 15)], snapshot=42)

    [event] = repair_events(found, DOMAIN, DATASET, requested_by="tollwatch audit --repair")

    assert event.event == EventName.BACKFILL_REQUESTED
    assert (event.payload["start"], event.payload["stop"]) == ("2024-01-14", "2024-01-16")
    assert event.payload["requested_by"] == "tollwatch audit --repair"
    assert event.payload["reason"] == (
        "tollwatch audit at table snapshot 42: 2 day(s) of [2024-01-14, 2024-01-16) differ from the upstream "
        "(48 rows upstream, 0 in the table)"
    )


def test_different_findings_on_the_same_snapshot_are_a_different_request():
    one = findings([date(2024, 1, 14)])
    two = findings([date(2024, 1, 14) + timedelta(days=1)])

    assert (
        repair_events(one, DOMAIN, DATASET, "a")[0].payload["request_id"]
        != (repair_events(two, DOMAIN, DATASET, "a")[0].payload["request_id"])
    )
