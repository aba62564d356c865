"""The sample downstream job: vehicles per day, plaza and direction, from bronze to `silver.bnt_daily_totals`.

It is small on purpose; what it shows is how a job triggered by an ingestion stays correct:

- it reads bronze at the snapshot that triggered it, so a run (or re-run) sees exactly that load, even if
  later loads have committed since;
- it replaces the days of its window in one commit (an overwrite filtered on the window's dates), so a
  re-run gives the same table, a day that changed upstream changes here, and a day that vanished upstream
  vanishes here, while days outside the window are not touched;
- its snapshot summary records the upstream table, snapshot and refresh, so the output's history is its
  lineage.

Nulls: a per-column sum skips nulls and is null only when every hourly row of the group is null for that
column (the upstream renamed `vehicles_cash` to `vehicles_vtoll`; "not reported" should not read as 0).
`vehicles_total` counts nulls as 0. Only the integer count columns tollwatch knows (`tollwatch.core.schema`) are
summed: drifted upstream columns are kept in bronze as unvalidated strings and are not counted.
"""

from __future__ import annotations

import logging
import warnings
from functools import reduce

import pyarrow as pa
import pyarrow.compute as pc
from pyiceberg.table import Table

from tollwatch import resources
from tollwatch.contract.events import Window
from tollwatch.contract.settings import Settings
from tollwatch.core.schema import OPTIONAL_COUNTS, REQUIRED
from tollwatch.core.table import WINDOW, IcebergTableStore, conform, window_filter
from tollwatch.downstream.models import (
    JOB,
    UPSTREAM_REFRESH_ID,
    UPSTREAM_SNAPSHOT_ID,
    UPSTREAM_TABLE,
    JobResult,
    UpstreamNotFoundError,
    UpstreamRef,
)

log = logging.getLogger(__name__)

JOB_NAME = "daily_totals"

#: One output row per day, plaza and direction.
GROUP = ("date", "plaza_id", "direction")

#: The count columns summed: the typed `vehicles_*` columns of the bronze schema.
COUNT_COLUMNS = tuple(name for name in (*REQUIRED, *OPTIONAL_COUNTS) if name.startswith("vehicles_"))


def output_schema() -> pa.Schema:
    """The silver table: the group key, one sum per count column, the total and the hours counted."""
    fields = [pa.field(name, REQUIRED[name], nullable=False) for name in GROUP]
    fields += [pa.field(name, pa.int64()) for name in COUNT_COLUMNS]
    fields += [pa.field("vehicles_total", pa.int64(), nullable=False), pa.field("hours", pa.int64(), nullable=False)]
    return pa.schema(fields)


def daily_totals(settings: Settings, window: Window, upstream: UpstreamRef) -> JobResult:
    """Recompute the daily totals of `window` from the upstream snapshot and replace those days in silver."""
    if upstream.table != settings.table:
        raise ValueError(f"{JOB_NAME} reads {settings.table}, but was triggered by a load of {upstream.table}")
    source = _source_table(resources.table_store(settings), upstream)
    snapshot_id = _snapshot_to_read(source, upstream)
    totals = aggregate(read_hourly(source, window, snapshot_id))
    properties = {
        JOB: JOB_NAME,
        UPSTREAM_TABLE: upstream.table,
        UPSTREAM_SNAPSHOT_ID: str(snapshot_id),
        UPSTREAM_REFRESH_ID: upstream.refresh_id,
        WINDOW: f"{window.start}/{window.stop}",
    }
    output = resources.table_store(settings, settings.daily_totals_table)
    written = replace_days(output, window, totals, properties)
    log.info(
        "%s: %d rows for %s from %s@%d into %s (snapshot %s)",
        JOB_NAME,
        totals.num_rows,
        window,
        upstream.table,
        snapshot_id,
        output.identifier,
        written,
    )
    return JobResult(
        job=JOB_NAME,
        table=output.identifier,
        rows_written=totals.num_rows,
        days_replaced=window.days,
        snapshot_id=written,
        window=window,
    )


def _source_table(store: IcebergTableStore, upstream: UpstreamRef) -> Table:
    table = store.table()
    if table is None:
        raise UpstreamNotFoundError(f"upstream table {upstream.table} does not exist yet: nothing to aggregate")
    return table


def _snapshot_to_read(table: Table, upstream: UpstreamRef) -> int:
    """The snapshot the job reads: the one that triggered it, else the current one (recorded either way).

    An unknown id is an error, not an empty read: reading nothing would delete the window's silver days.
    """
    if upstream.snapshot_id is None:
        current = table.current_snapshot()
        if current is None:
            raise UpstreamNotFoundError(f"upstream table {upstream.table} has no snapshot yet: nothing to aggregate")
        return current.snapshot_id
    if table.snapshot_by_id(upstream.snapshot_id) is None:
        raise UpstreamNotFoundError(
            f"snapshot {upstream.snapshot_id} of {upstream.table} not found (expired?); "
            "run without a snapshot id to read the current one"
        )
    return upstream.snapshot_id


def read_hourly(table: Table, window: Window, snapshot_id: int) -> pa.Table:
    """Bronze rows of `window` as of `snapshot_id`: only the group key and the count columns that snapshot has."""
    scan = table.scan(row_filter=window_filter(window), snapshot_id=snapshot_id)
    present = {field.name for field in scan.projection().fields}  # the schema as of that snapshot
    return scan.select(*GROUP, *(c for c in COUNT_COLUMNS if c in present)).to_arrow()


def aggregate(hourly: pa.Table) -> pa.Table:
    """Daily totals of hourly rows, sorted by the group key, in `output_schema()` (vectorised group-by)."""
    counts = [c for c in COUNT_COLUMNS if c in hourly.column_names]
    grouped = hourly.group_by(list(GROUP), use_threads=False).aggregate(
        [(c, "sum") for c in counts] + [([], "count_all")]
    )
    sums = {c: grouped[f"{c}_sum"] for c in counts}
    zero = pa.repeat(pa.scalar(0, pa.int64()), grouped.num_rows)
    total = reduce(pc.add_checked, (pc.fill_null(s, 0) for s in sums.values()), zero)
    columns = {
        **{name: grouped[name] for name in GROUP},
        **sums,  # count columns the snapshot lacks are added as nulls by `conform`
        "vehicles_total": total,
        "hours": grouped["count_all"],
    }
    totals = conform(pa.table(columns), output_schema())
    return totals.sort_by([(name, "ascending") for name in GROUP])


def replace_days(store: IcebergTableStore, window: Window, totals: pa.Table, properties: dict[str, str]) -> int | None:
    """Replace every row of `window` with `totals` in one commit; returns the table's snapshot after it.

    An overwrite filtered on the window's dates: rows of other days stay (files spanning the boundary are
    rewritten), and a window with no totals leaves its days empty. The table is created (partitioned by
    month of `date`, like bronze) on first use, and gains columns that `output_schema()` has grown.
    """
    table = store.ensure(totals.schema)
    with table.transaction() as txn:
        store.evolve(txn, table, totals.schema)
        target = txn.table_metadata.schema().as_arrow()
        with warnings.catch_warnings():  # "did not match any records": the first run over these days
            warnings.simplefilter("ignore", UserWarning)
            txn.overwrite(
                conform(totals, target), overwrite_filter=window_filter(window), snapshot_properties=properties
            )
    snapshot = table.current_snapshot()
    return snapshot.snapshot_id if snapshot else None
