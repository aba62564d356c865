"""Reconcile the table with the upstream, day by day, and plan the backfill events that repair what differs.

`tollwatch audit` (and anything else that needs to know whether the table holds what the upstream holds) calls
`reconcile`: per day of a window, the upstream's row count (`$select=date, count(*)` … `$group=date`, one query per
calendar year of the window) against the table's (a scan of the `date` column only, counted with pyarrow). A day is
listed when the two differ: fewer rows in the table (a load never happened or lost rows) or more (rows deleted
upstream, or loaded twice). Counts cannot see a row whose values changed without its count changing; that is what
versions (`source_updated_at`) and the ledger are for.

`repair_events` turns the differing days into `tollwatch.backfill.requested` events: contiguous days form one
window, cut at month boundaries (one ingest run per month at most, as a monthly backfill would). Their request id
is derived from what the audit found and the table snapshot it read, so repeating `--repair` on an unchanged table
produces the same event ids (Prefect drops them; `tollwatch audit` also skips events that already started a run),
while an audit after any new commit that still finds differences produces new ids — and so new refresh ids, which
the ingest's ledger has not seen and therefore loads rather than skips as a replay.

No Prefect here: callers pass the clients and emit the events with whatever sink they have.
"""

from __future__ import annotations

from collections import Counter
from datetime import date, timedelta
from itertools import pairwise
from typing import TYPE_CHECKING

import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict

from tollwatch.contract.events import TollwatchEvent, Window, deterministic_id
from tollwatch.core.backfill import Chunk, chunk_event, chunks, upstream_counts_by_day

if TYPE_CHECKING:
    from tollwatch.core.ports import UpstreamCounts
    from tollwatch.core.table import IcebergTableStore

#: Differing days are repaired at most one month per ingest run.
REPAIR_CHUNK = Chunk.MONTH


class DayCount(BaseModel):
    """One day's row count on both sides."""

    model_config = ConfigDict(frozen=True)

    day: date
    upstream: int
    table: int

    @property
    def missing(self) -> int:
        """Rows the table lacks (negative when it holds more than the upstream)."""
        return self.upstream - self.table

    def describe(self) -> str:
        """`missing 528` or `extra 528`: what the table would need to match the upstream."""
        return f"missing {self.missing:,}" if self.missing > 0 else f"extra {-self.missing:,}"


class Reconciliation(BaseModel):
    """The upstream against the table over `window` (stop exclusive), and the days where they differ."""

    model_config = ConfigDict(frozen=True)

    window: Window
    upstream_rows: int
    table_rows: int
    differing_days: list[DayCount]
    table_snapshot_id: int | None = None
    """The snapshot the table side was read at (None: no table, or no snapshot yet)."""

    @property
    def matches(self) -> bool:
        return not self.differing_days


# ---------------------------------------------------------------------------------------------- counts


def table_counts_by_day(store: IcebergTableStore, window: Window | None = None) -> tuple[dict[date, int], int | None]:
    """The table's rows per day (of `window`, or all of it) and the snapshot they were read at.

    Reads the `date` column only, one record batch at a time (memory: one batch and one counter per day).
    """
    from pyiceberg.expressions import AlwaysTrue

    from tollwatch.core.table import window_filter

    table = store.table()
    snapshot = table.current_snapshot() if table is not None else None
    if table is None or snapshot is None:
        return {}, None
    scan = table.scan(
        row_filter=window_filter(window) if window is not None else AlwaysTrue(),
        selected_fields=("date",),
        snapshot_id=snapshot.snapshot_id,
    )
    counts: Counter[date] = Counter()
    for batch in scan.to_arrow_batch_reader():
        for item in pc.value_counts(batch.column("date")).to_pylist():
            if item["values"] is not None:
                counts[item["values"]] += item["counts"]
    return dict(counts), snapshot.snapshot_id


def first_day(store: IcebergTableStore) -> date | None:
    """The earliest `date` in the table, from the data files' column bounds (no data read); None when empty."""
    from pyiceberg.conversions import from_bytes
    from pyiceberg.types import DateType

    table = store.table()
    if table is None or table.current_snapshot() is None:
        return None
    field_id = table.schema().find_field("date").field_id
    lows: list[date] = []
    for task in table.scan(selected_fields=("date",)).plan_files():
        bound = (task.file.lower_bounds or {}).get(field_id)
        if bound is None:  # a file written without column stats: count it the slow way
            counts, _ = table_counts_by_day(store)
            return min(counts, default=None)
        lows.append(date(1970, 1, 1) + timedelta(days=from_bytes(DateType(), bound)))
    return min(lows, default=None)


def empty_ranges(days: set[date] | dict[date, int]) -> list[Window]:
    """The runs of days without rows between the first and the last day that have rows."""
    present = sorted(days)
    return [
        Window(start=before + timedelta(days=1), stop=after)
        for before, after in pairwise(present)
        if (after - before).days > 1
    ]


# ---------------------------------------------------------------------------------------------- reconcile


def reconcile(socrata: UpstreamCounts, store: IcebergTableStore, dataset_id: str, window: Window) -> Reconciliation:
    """Per day of `window`, the upstream's row count against the table's; days with 0 on both sides are not listed.

    The table is read first, then the upstream: a publish or a commit while the audit runs can show as a
    difference that the next audit no longer finds.
    """
    table, snapshot_id = table_counts_by_day(store, window)
    upstream = upstream_counts_by_day(socrata, dataset_id, window)
    differing = [
        DayCount(day=day, upstream=upstream.get(day, 0), table=table.get(day, 0))
        for day in sorted(upstream.keys() | table.keys())
        if upstream.get(day, 0) != table.get(day, 0)
    ]
    return Reconciliation(
        window=window,
        upstream_rows=sum(upstream.values()),
        table_rows=sum(table.values()),
        differing_days=differing,
        table_snapshot_id=snapshot_id,
    )


# ---------------------------------------------------------------------------------------------- repair


def repair_windows(reconciliation: Reconciliation) -> list[Window]:
    """Contiguous differing days as windows, cut at month boundaries."""
    runs: list[list[date]] = []
    for day in (d.day for d in reconciliation.differing_days):
        if runs and day == runs[-1][-1] + timedelta(days=1):
            runs[-1].append(day)
        else:
            runs.append([day])
    return [part for run in runs for part in chunks(run[0], run[-1] + timedelta(days=1), REPAIR_CHUNK)]


def repair_request_id(reconciliation: Reconciliation, domain: str, dataset_id: str) -> str:
    """Derived from what the audit found and the table snapshot it read (not from the audit's window or time).

    The same findings on the same snapshot give the same id (a repeated `--repair` requests nothing new); any
    commit since gives a new one, so days that still differ after it are requested again and loaded.
    """
    findings = ";".join(f"{d.day}:{d.upstream}:{d.table}" for d in reconciliation.differing_days)
    return str(deterministic_id("audit-repair", domain, dataset_id, reconciliation.table_snapshot_id, findings))


def repair_events(
    reconciliation: Reconciliation, domain: str, dataset_id: str, requested_by: str
) -> list[TollwatchEvent]:
    """One `tollwatch.backfill.requested` per repair window (see `repair_windows`); none when everything matches."""
    request_id = repair_request_id(reconciliation, domain, dataset_id)
    events = []
    for window in repair_windows(reconciliation):
        found = [d for d in reconciliation.differing_days if window.start <= d.day < window.stop]
        upstream, table = sum(d.upstream for d in found), sum(d.table for d in found)
        reason = (
            f"tollwatch audit at table snapshot {reconciliation.table_snapshot_id}: {len(found)} day(s) of {window} "
            f"differ from the upstream ({upstream:,} rows upstream, {table:,} in the table)"
        )
        events.append(
            chunk_event(
                window,
                domain=domain,
                dataset_id=dataset_id,
                request_id=request_id,
                requested_by=requested_by,
                reason=reason,
            )
        )
    return events
