"""The bronze table in a Spark Iceberg catalog: the ledger, schema evolution and one atomic rewrite per load.

The same Iceberg table the local writer commits to (locally through Iceberg's JDBC catalog on pyiceberg's catalog
database; on Databricks through Unity Catalog or a Hadoop catalog on abfss). Only documented Iceberg-Spark features:
CREATE TABLE … USING iceberg PARTITIONED BY (months(date)), ALTER TABLE ADD COLUMNS, the `snapshots` and `history`
metadata tables, reads pinned with the `snapshot-id` read option, and DataFrameWriterV2 `overwrite(condition)` /
`append()` with the `snapshot-property.<key>`, `isolation-level` and `validate-from-snapshot-id` write options
(https://iceberg.apache.org/docs/latest/spark-configuration/#write-options).

SQL `MERGE INTO` is not used on purpose: from PySpark its snapshot summary cannot carry our properties (Iceberg's
`CommitMetadata.withCommitProperties` is a Java thread-local API), and the ledger depends on them.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date
from functools import reduce
from typing import TypeVar

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from tollwatch.contract import table as contract
from tollwatch.spark.rows import col

log = logging.getLogger("tollwatch.spark")

#: Java exceptions that mean "a concurrent commit won": the load is rebuilt on the new table state and retried.
CONFLICTS = ("org.apache.iceberg.exceptions.ValidationException", "org.apache.iceberg.exceptions.CommitFailedException")
COMMIT_ATTEMPTS = 6
T_ = TypeVar("T_")


@dataclass(frozen=True)
class Committed:
    """A load found in the ledger: its latest snapshot and the days it recorded."""

    snapshot_id: int
    touched: tuple[date, date] | None


def _quote(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


def _column_ddl(field: T.StructField) -> str:
    return f"{_quote(field.name)} {field.dataType.simpleString()}{'' if field.nullable else ' NOT NULL'}"


def create_table_sql(name: str, schema: T.StructType) -> list[str]:
    """DDL of a new bronze table: its namespace, then the table partitioned by the contract's partition (v2)."""
    columns = ", ".join(_column_ddl(f) for f in schema)
    partition = contract.PARTITION
    return [
        f"CREATE NAMESPACE IF NOT EXISTS {name.rsplit('.', 1)[0]}",
        f"CREATE TABLE IF NOT EXISTS {name} ({columns}) USING iceberg "
        f"PARTITIONED BY ({partition.transform}s({_quote(partition.source)})) TBLPROPERTIES ('format-version' = '2')",
    ]


def add_columns_sql(name: str, fields: Sequence[T.StructField]) -> str:
    """Schema evolution: new upstream columns, nullable (rows written before read them as null)."""
    added = ", ".join(_column_ddl(T.StructField(f.name, f.dataType)) for f in fields)
    return f"ALTER TABLE {name} ADD COLUMNS ({added})"


def write_options(properties: dict[str, str], base_snapshot: int | None) -> dict[str, str]:
    """The ledger properties into the commit's snapshot summary, and conflict detection from the snapshot read.

    With `isolation-level=serializable` from the snapshot the existing rows were read at, a commit to the same
    months in between fails this one (ValidationException) instead of being overwritten.
    """
    options = {f"snapshot-property.{key}": value for key, value in properties.items()}
    if base_snapshot is not None:
        options |= {"isolation-level": "serializable", "validate-from-snapshot-id": str(base_snapshot)}
    return options


def is_conflict(error: BaseException) -> bool:
    """Whether a Spark/py4j error is Iceberg refusing our commit because another one landed first."""
    java = getattr(error, "java_exception", None)
    text = str(java) if java is not None else str(error)
    return any(name in text for name in CONFLICTS)


def retry_conflicts(commit: Callable[[], T_], *, attempts: int = COMMIT_ATTEMPTS) -> T_:
    """Run `commit` again after a conflicting concurrent commit (re-reading the table each time), like the local
    writer: two loads of the same month committing at once is routine, not a failure."""
    for attempt in range(1, attempts + 1):
        try:
            return commit()
        except Exception as error:
            if not is_conflict(error) or attempt == attempts:
                raise
            delay = random.uniform(0, min(5.0, 0.2 * 2**attempt))
            log.warning("commit conflicted with a concurrent load; retry %d in %.1fs", attempt, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def next_month(day: date) -> date:
    return date(day.year + day.month // 12, day.month % 12 + 1, 1)


def months_between(start: date, stop: date) -> list[date]:
    """First days of the months touching [start, stop)."""
    months, current = [], start.replace(day=1)
    while current < stop:
        months.append(current)
        current = next_month(current)
    return months


def in_months(months: Sequence[date]) -> Column:
    """`date` within the given months, as month-aligned ranges: an Iceberg overwrite-by-filter that matches only
    part of a data file fails ("Cannot delete file where some, but not all, rows match filter"), and the table is
    partitioned by month, so whole-month filters always match whole files."""
    ranges: list[tuple[date, date]] = []
    for month in sorted(months):
        if ranges and ranges[-1][1] == month:
            ranges[-1] = (ranges[-1][0], next_month(month))
        else:
            ranges.append((month, next_month(month)))
    if not ranges:
        raise ValueError("a rewrite needs at least one month")
    day = F.col(contract.PARTITION.source)
    return reduce(lambda a, b: a | b, [(day >= F.lit(lo)) & (day < F.lit(hi)) for lo, hi in ranges])


def conform(df: DataFrame, schema: T.StructType) -> DataFrame:
    """Exactly the table's columns in its order; columns the frame lacks are null."""
    present = set(df.columns)
    return df.select(
        *[(col(f.name) if f.name in present else F.lit(None)).cast(f.dataType).alias(f.name) for f in schema]
    )


class IcebergTable:
    """One Iceberg table in the session's catalog (`catalog.namespace.table`), seen through one branch.

    `branch` is `main` or a load's audit branch (write-audit-publish: the flow cuts the branch, the merge writes to
    it, the flow audits and publishes it). The ledger reads and the rewrite all go through that branch's lineage.
    """

    def __init__(self, spark: SparkSession, name: str, branch: str = contract.MAIN) -> None:
        self.spark = spark
        self.name = name
        self.branch = branch

    @property
    def target(self) -> str:
        """What writes go to: the table, or `<table>.branch_<branch>` (Iceberg's Spark identifier of a branch)."""
        return self.name if self.branch == contract.MAIN else f"{self.name}.branch_{self.branch}"

    def exists(self) -> bool:
        return bool(self.spark.catalog.tableExists(self.name))

    def _snapshots(self) -> DataFrame:
        return self.spark.read.table(f"{self.name}.snapshots")

    def committed(self, refresh_id: str) -> Committed | None:
        """The ledger entry of this refresh (its latest snapshot), or None if it was never committed.

        The `snapshots` metadata table lists snapshots in the order the table's metadata logs them; one commit can
        hold several snapshots with the same timestamp, so the last row wins (as pyiceberg's `snapshots()`).
        """
        if not self.exists():
            return None
        found = {
            int(row["snapshot_id"]): row["touched"]
            for row in self._snapshots()
            .where(F.col("summary").getItem(contract.REFRESH_ID) == F.lit(refresh_id))
            .select("snapshot_id", F.col("summary").getItem(contract.TOUCHED).alias("touched"))
            .collect()
        }
        for snapshot_id in reversed(self._lineage()):
            if snapshot_id in found:
                return Committed(snapshot_id, contract.decode_days(found[snapshot_id]))
        return None

    def _lineage(self) -> list[int]:
        """Snapshot ids of the branch's ancestry, oldest first: from the branch's head (the `refs` metadata table)
        through each snapshot's parent. A snapshot outside it (a dropped audit branch's) is in no ledger."""
        refs = self.spark.read.table(f"{self.name}.refs").where(F.col("name") == F.lit(self.branch)).collect()
        if not refs:
            return []
        parents = {
            int(row["snapshot_id"]): row["parent_id"]
            for row in self._snapshots().select("snapshot_id", "parent_id").collect()
        }
        lineage: list[int] = []
        current: int | None = int(refs[0]["snapshot_id"])
        while current is not None:
            lineage.append(current)
            parent = parents.get(current)
            current = int(parent) if parent is not None else None
        return lineage[::-1]

    def snapshot_ids(self) -> set[int]:
        return {int(row["snapshot_id"]) for row in self._snapshots().select("snapshot_id").collect()}

    def current_snapshot(self) -> int | None:
        """The table's current snapshot."""
        lineage = self._lineage()
        return lineage[-1] if lineage else None

    def committed_through(self) -> int | None:
        """The ledger's high-water mark: from the newest snapshot of the current lineage that records it, so a
        snapshot written by another tool (compaction, a manual fix) neither hides nor moves it."""
        if not self.exists():
            return None
        marks = {
            int(row["snapshot_id"]): row["mark"]
            for row in self._snapshots()
            .select("snapshot_id", F.col("summary").getItem(contract.COMMITTED_THROUGH).alias("mark"))
            .where(F.col("mark").isNotNull())
            .collect()
        }
        for snapshot_id in reversed(self._lineage()):
            if snapshot_id in marks:
                return int(marks[snapshot_id])
        return None

    def ensure(self, schema: T.StructType) -> T.StructType:
        """Create the table, or add the load's new upstream columns (nullable); the table's schema."""
        if not self.exists():
            for statement in create_table_sql(self.name, schema):
                self.spark.sql(statement)
            log.info("created Iceberg table %s partitioned by months(date)", self.name)
        current = self.spark.read.table(self.name).schema
        new = [f for f in schema if f.name not in current.fieldNames()]
        if new:
            self.spark.sql(add_columns_sql(self.name, new))
            log.info("evolved %s: added columns %s", self.name, [f.name for f in new])
            current = self.spark.read.table(self.name).schema
        return current

    def read(self, snapshot: int | None = None) -> DataFrame:
        """The table at a snapshot (a branch's head), or as `main` is now."""
        reader = self.spark.read if snapshot is None else self.spark.read.option("snapshot-id", str(snapshot))
        return reader.table(self.name)

    def rewrite(
        self, months: Sequence[date], content: Callable[[DataFrame], DataFrame], properties: dict[str, str]
    ) -> None:
        """One atomic overwrite of whole months with `content(existing rows of those months)`.

        The existing rows are read at a pinned snapshot and the write validates from it, so a concurrent commit to
        these months fails this one (and `retry_conflicts` rebuilds it) instead of being lost.
        """
        base = self.current_snapshot()
        if base is None:
            # A table without a snapshot has nothing to validate from, and Iceberg then validates against whatever
            # is current when it commits: a load committed meanwhile would be overwritten unseen. An empty first
            # snapshot gives this write a base (a replay of it is harmless: it adds nothing).
            self.spark.createDataFrame([], self.spark.read.table(self.name).schema).writeTo(self.target).append()
            base = self.current_snapshot()
        existing = self.read(base).where(in_months(months))
        writer = content(existing).writeTo(self.target).options(**write_options(properties, base))
        writer.overwrite(in_months(months))

    def ensure_branch(self) -> None:
        """Cut this table's branch from `main`'s head unless it exists (an empty first snapshot on `main` when the
        table has none yet: a branch needs a snapshot to point at, and an empty one changes nothing readers see)."""
        if self.branch == contract.MAIN:
            return
        main = IcebergTable(self.spark, self.name)
        if main.current_snapshot() is None:
            self.spark.createDataFrame([], self.spark.read.table(self.name).schema).writeTo(self.name).append()
        self.spark.sql(f"ALTER TABLE {self.name} CREATE BRANCH IF NOT EXISTS {_quote(self.branch)}")

    def record_empty(self, schema: T.StructType, properties: dict[str, str]) -> None:
        """A load that changed no row still commits a (data-less) snapshot: the ledger entry that makes a replay a
        no-op and, for a refresh, the record that the mark moved."""
        empty = self.spark.createDataFrame([], schema)
        empty.writeTo(self.target).options(**write_options(properties, None)).append()
