"""The Iceberg table `bronze.bnt_traffic_hourly`, written through pyiceberg.

One load = one Iceberg commit (a transaction that may hold several snapshots: schema change, delete of the
window, one append per month). Every snapshot of a load carries `tollwatch.refresh-id` in its summary, so
the table's own history is the ledger that makes a replayed refresh a no-op.

Why not `Table.upsert`: it builds one filter term per key and crashed the interpreter at ~10k rows here.
Replacing a window (`delete` + `append`) or, for refreshes, overwriting just the affected days with
"existing rows minus changed keys plus changed rows" gives the same merge-on-key result and scales.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime

import pyarrow as pa
import pyarrow.compute as pc
from pyiceberg.catalog import Catalog, load_catalog
from pyiceberg.exceptions import NamespaceAlreadyExistsError, NoSuchTableError, TableAlreadyExistsError
from pyiceberg.expressions import And, BooleanExpression, GreaterThanOrEqual, In, LessThan
from pyiceberg.table import Table
from pyiceberg.table.snapshots import Snapshot
from pyiceberg.transforms import MonthTransform

from tollwatch.contract import table as contract
from tollwatch.contract.events import Window
from tollwatch.core.schema import KEY

log = logging.getLogger(__name__)

# The ledger's snapshot-property keys (see tollwatch.contract.table): TOUCHED is what a re-run needs to announce a
# load it found committed but never announced (`tollwatch.core.ingest.previous_load`); COMMITTED_THROUGH is the ledger's
# high-water mark, carried by every snapshot tollwatch writes (a window load carries it forward unchanged), so a
# refresh fetches from it, not from the `previous_rows_updated_at` of its event, and no missed run leaves a hole.
REFRESH_ID = contract.REFRESH_ID
WINDOW = contract.WINDOW
MODE = contract.MODE
FLOW_RUN_ID = contract.FLOW_RUN_ID
TOUCHED = contract.TOUCHED
COMMITTED_THROUGH = contract.COMMITTED_THROUGH
MAIN = contract.MAIN


def head(table: Table, ref: str = MAIN) -> Snapshot | None:
    """The snapshot a branch points at (None: no such branch, or `main` of a table without a snapshot)."""
    found = table.metadata.refs.get(ref)
    return table.snapshot_by_id(found.snapshot_id) if found is not None else None


def lineage(table: Table, ref: str = MAIN) -> Iterator[Snapshot]:
    """A branch's snapshots, newest first: what a reader of that branch sees the history of.

    The ledger reads `main`'s lineage only: a load committed to an audit branch is not in the table until it is
    published, and a discarded branch's snapshots (kept until they expire) are in no lineage at all.
    """
    snapshot = head(table, ref)
    while snapshot is not None:
        yield snapshot
        snapshot = table.snapshot_by_id(snapshot.parent_snapshot_id) if snapshot.parent_snapshot_id else None


@dataclass(frozen=True)
class CommittedLoad:
    """A load in the snapshot ledger: its latest snapshot, the flow run that committed it and its days."""

    snapshot_id: int
    flow_run_id: str | None
    touched: Window | None


@dataclass(frozen=True)
class TableInfo:
    """A summary for humans: where the table is and what is in it."""

    identifier: str
    location: str
    snapshot_id: int | None
    rows: int
    snapshots: int
    committed_at: datetime | None = None


def window_filter(window: Window) -> BooleanExpression:
    return And(GreaterThanOrEqual("date", window.start.isoformat()), LessThan("date", window.stop.isoformat()))


def days_filter(days: Iterable[date]) -> BooleanExpression:
    return In("date", {d.isoformat() for d in days})


def conform(batch: pa.Table, schema: pa.Schema) -> pa.Table:
    """Give a batch exactly the table's columns (missing optional ones as nulls), in the table's order."""
    columns = [
        batch[f.name].cast(f.type) if f.name in batch.column_names else pa.nulls(batch.num_rows, f.type) for f in schema
    ]
    return pa.Table.from_arrays(columns, schema=schema)


class IcebergTableStore:
    """Creates, evolves and writes the bronze table; reads the snapshot ledger."""

    def __init__(self, catalog: Catalog, identifier: str, catalog_name: str) -> None:
        self.catalog = catalog
        self.identifier = identifier
        self.catalog_name = catalog_name

    @classmethod
    def from_properties(cls, catalog_name: str, properties: dict[str, str], identifier: str) -> IcebergTableStore:
        return cls(load_catalog(catalog_name, **properties), identifier, catalog_name)

    # ------------------------------------------------------------------ table lifecycle

    def table(self) -> Table | None:
        try:
            return self.catalog.load_table(self.identifier)
        except NoSuchTableError:
            return None

    def ensure(self, schema: pa.Schema) -> Table:
        """Load the table, creating it (partitioned by month of `date`) on first use."""
        table = self.table()
        if table is not None:
            return table
        namespace = self.identifier.split(".")[0]
        with contextlib.suppress(NamespaceAlreadyExistsError):
            self.catalog.create_namespace(namespace)
        try:
            txn = self.catalog.create_table_transaction(self.identifier, schema=schema)
            with txn.update_spec() as spec:
                spec.add_field("date", MonthTransform(), "date_month")
            txn.commit_transaction()
            log.info("created Iceberg table %s partitioned by month(date)", self.identifier)
        except TableAlreadyExistsError:
            log.info("table %s was created concurrently; using it", self.identifier)
        return self.catalog.load_table(self.identifier)

    # ------------------------------------------------------------------ ledger

    def committed(self, refresh_id: str) -> int | None:
        """The latest snapshot id written for this refresh, or None if it was never committed."""
        load = self.committed_load(refresh_id)
        return None if load is None else load.snapshot_id

    def committed_load(self, refresh_id: str, ref: str = MAIN) -> CommittedLoad | None:
        """The ledger entry of this refresh on `ref` (from its latest snapshot there), or None if it is not on it.

        On `main` this is a published load; on a load's audit branch, a load committed but not yet published.
        """
        table = self.table()
        if table is None:
            return None
        found = next(
            (s for s in lineage(table, ref) if s.summary is not None and s.summary[REFRESH_ID] == refresh_id), None
        )
        if found is None or found.summary is None:
            return None
        touched = contract.decode_days(found.summary[TOUCHED])
        return CommittedLoad(
            snapshot_id=found.snapshot_id,
            flow_run_id=found.summary[FLOW_RUN_ID],
            touched=Window(start=touched[0], stop=touched[1]) if touched else None,
        )

    def committed_through(self, table: Table | None = None, ref: str = MAIN) -> int | None:
        """The ledger's high-water mark (see COMMITTED_THROUGH) on `ref` (`main`: what is published), or None when
        no refresh ever committed there.

        Read from the newest snapshot of the branch's lineage that records it, so a snapshot written by another tool
        (compaction, a manual fix) neither hides nor moves it.
        """
        table = table if table is not None else self.table()
        if table is None:
            return None
        for snapshot in lineage(table, ref):
            value = snapshot.summary[COMMITTED_THROUGH] if snapshot.summary is not None else None
            if value:
                return int(value)
        return None

    # ------------------------------------------------------------------ writes

    def commit_window(
        self,
        window: Window,
        months: Iterable[tuple[str, pa.Table]],
        schema: pa.Schema,
        properties: dict[str, str],
        *,
        fetched_through: int,
        branch: str = MAIN,
    ) -> int:
        """Make the table's `window` what the upstream held at `fetched_through`, in one commit; versions only move
        forward.

        `months` are the fetched rows per month (`YYYY-MM`, deduped per key). Per month of the window, a key keeps the
        newer of its stored and fetched versions; a stored key the fetch did not return is a row deleted upstream when
        its version is one the fetch would have returned (stamped at or before `fetched_through`) and is removed, but
        kept when it is newer than the fetch (a refresh committed it after this window was fetched). The ledger's
        high-water mark is carried forward unchanged: a window says nothing about other days. The commit goes to
        `branch` (a load's audit branch; see `tollwatch.core.branches`) and reads the rows it merges from there.
        """
        table = self.ensure(schema)
        fetched = dict(months)
        base = head(table, branch)
        with table.transaction() as txn:
            self.evolve(txn, table, schema)
            self._carry_mark(table, properties, None, branch)
            target = txn.table_metadata.schema().as_arrow()
            wrote = False
            for month, part in _months_of(window):
                incoming = conform(fetched.get(month, target.empty_table()), target)
                stored = conform(_scan(table, window_filter(part), base), target)
                if incoming.num_rows == 0 and stored.num_rows == 0:
                    continue
                merged = newest_per_key(stored, incoming, drop_absent_through=fetched_through)
                with warnings.catch_warnings():  # "did not match any records" is expected on a first load
                    warnings.simplefilter("ignore", UserWarning)
                    txn.overwrite(
                        merged, overwrite_filter=window_filter(part), snapshot_properties=properties, branch=branch
                    )
                wrote = True
            if not wrote:
                self._record_empty_load(txn, target, properties, branch)
        return self._snapshot_for(properties[REFRESH_ID], branch)

    def commit_merge(
        self,
        months: Iterable[tuple[str, pa.Table]],
        schema: pa.Schema,
        properties: dict[str, str],
        *,
        through: int,
        branch: str = MAIN,
    ) -> int:
        """Merge a refresh (every upstream version published after the ledger's mark and through `through`) in one
        commit: per month, the touched days are overwritten with, per key, the newer of the stored and fetched
        versions, so a refresh committing after a newer one cannot put an older version back. The ledger's mark
        moves to `through` (never back). The commit goes to `branch`, as `commit_window`'s.
        """
        table = self.ensure(schema)
        base = head(table, branch)
        with table.transaction() as txn:
            self.evolve(txn, table, schema)
            self._carry_mark(table, properties, through, branch)
            target = txn.table_metadata.schema().as_arrow()
            wrote = False
            for _, batch in months:
                if not batch.num_rows:
                    continue
                days = set(pc.unique(batch["date"]).to_pylist())
                existing = _scan(table, days_filter(days), base)
                merged = newest_per_key(conform(existing, target), conform(batch, target))
                with warnings.catch_warnings():  # new days match nothing yet: expected
                    warnings.simplefilter("ignore", UserWarning)
                    txn.overwrite(
                        merged, overwrite_filter=days_filter(days), snapshot_properties=properties, branch=branch
                    )
                wrote = True
            if not wrote:
                self._record_empty_load(txn, target, properties, branch)
        return self._snapshot_for(properties[REFRESH_ID], branch)

    def _carry_mark(self, table: Table, properties: dict[str, str], through: int | None, branch: str) -> None:
        """Set the ledger's high-water mark this commit records: the table's current one, raised to `through`.

        Computed from the table state this attempt builds on; a concurrent commit fails ours (optimistic
        concurrency) and the retry recomputes it, so the mark recorded is never one the table has already passed.
        """
        current = self.committed_through(table, branch)
        marks = [m for m in (current, through) if m is not None]
        if marks:
            properties[COMMITTED_THROUGH] = str(max(marks))
        else:
            properties.pop(COMMITTED_THROUGH, None)

    @staticmethod
    def _record_empty_load(txn: object, target: pa.Schema, properties: dict[str, str], branch: str) -> None:
        """A load that changed no row still commits a (data-less) snapshot: it is the ledger entry that makes a
        replay a no-op and, for a refresh, the record that the mark moved (a publish can change nothing we keep)."""
        txn.append(target.empty_table(), snapshot_properties=properties, branch=branch)  # type: ignore[attr-defined]

    @staticmethod
    def evolve(txn: object, table: Table, schema: pa.Schema) -> None:
        """Add upstream columns the table does not have yet (Iceberg add-column; old rows read as null)."""
        current = {f.name for f in table.schema().fields}
        new = [f for f in schema if f.name not in current]
        if new:
            with txn.update_schema() as update:  # type: ignore[attr-defined]
                update.union_by_name(pa.schema(f.with_nullable(True) for f in new))
            log.info("evolved %s: added columns %s", table.name(), [f.name for f in new])

    def _snapshot_for(self, refresh_id: str, branch: str) -> int:
        load = self.committed_load(refresh_id, branch)
        if load is None:
            raise RuntimeError(f"commit of refresh {refresh_id} left no snapshot on {self.identifier}@{branch}")
        return load.snapshot_id

    # ------------------------------------------------------------------ reads

    def info(self) -> TableInfo:
        table = self.table()
        if table is None:
            return TableInfo(self.identifier, "(not created yet)", None, 0, 0)
        snapshot = table.current_snapshot()
        rows = int(snapshot.summary["total-records"] or 0) if snapshot and snapshot.summary else 0
        return TableInfo(
            identifier=self.identifier,
            location=table.location(),
            snapshot_id=snapshot.snapshot_id if snapshot else None,
            rows=rows,
            snapshots=len(table.snapshots()),
            committed_at=datetime.fromtimestamp(snapshot.timestamp_ms / 1000, UTC) if snapshot else None,
        )

    def read(self, window: Window | None = None) -> pa.Table:
        """Rows (optionally of one window), sorted by key: for tests, status and the artifact."""
        table = self.table()
        if table is None:
            return pa.table({})
        scan = table.scan(row_filter=window_filter(window)) if window else table.scan()
        data = scan.to_arrow()
        return data.sort_by([(k, "ascending") for k in KEY])


def _scan(table: Table, row_filter: BooleanExpression, at: Snapshot | None) -> pa.Table:
    """The rows matching `row_filter` at a snapshot (a branch's head); none when there is no snapshot yet."""
    if at is None:
        return table.schema().as_arrow().empty_table()
    return table.scan(row_filter=row_filter, snapshot_id=at.snapshot_id).to_arrow()


#: Sort rank of a row without a version (older tollwatch rows, a malformed `:updated_at`): older than any version.
_NO_VERSION = -(2**62)


def _ranked(rows: pa.Table, incoming: bool) -> pa.Table:
    """`rows` with `__rank`: its version in microseconds, doubled, plus 1 for incoming rows (they win a tie)."""
    version = pc.fill_null(pc.cast(rows["source_updated_at"], pa.int64()), _NO_VERSION)
    rank = pc.add(pc.multiply(version, 2), 1 if incoming else 0)
    return rows.append_column("__rank", rank)


def newest_per_key(stored: pa.Table, incoming: pa.Table, *, drop_absent_through: int | None = None) -> pa.Table:
    """Per natural key, the row with the newest upstream version (`source_updated_at`); incoming wins a tie.

    With `drop_absent_through` (epoch seconds; a window load's fetch ceiling), a stored key that `incoming` lacks is
    dropped when its version was published at or before it: the fetch would have returned it had it still existed
    upstream, so it was deleted there. A newer stored row was published after the fetch and stays.
    """
    if stored.num_rows == 0:
        return incoming
    if drop_absent_through is not None:
        keys = incoming.select(list(KEY))
        present = stored.join(keys, keys=list(KEY), join_type="left semi")
        absent = stored.join(keys, keys=list(KEY), join_type="left anti")
        newer = pc.greater_equal(
            absent["source_updated_at"], pa.scalar(datetime.fromtimestamp(drop_absent_through + 1, UTC))
        )
        stored = pa.concat_tables([present, absent.filter(pc.fill_null(newer, False))])
        if stored.num_rows == 0:
            return incoming
    if incoming.num_rows == 0:
        return stored
    both = pa.concat_tables([_ranked(stored, incoming=False), _ranked(conform(incoming, stored.schema), incoming=True)])
    newest = both.group_by(list(KEY), use_threads=False).aggregate([("__rank", "max")])
    newest = newest.rename_columns([*KEY, "__rank"])
    kept = both.join(newest, keys=[*KEY, "__rank"], join_type="inner")
    return conform(kept, incoming.schema)


def _months_of(window: Window) -> Iterator[tuple[str, Window]]:
    """The window cut at month boundaries: (`YYYY-MM`, the part of the window in that month)."""
    start = window.start
    while start < window.stop:
        next_month = date(start.year + start.month // 12, start.month % 12 + 1, 1)
        stop = min(next_month, window.stop)
        yield f"{start:%Y-%m}", Window(start=start, stop=stop)
        start = stop
