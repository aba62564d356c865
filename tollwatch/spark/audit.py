"""Write-audit-publish inside the Spark merge, for where the flow cannot read the table (Databricks).

Locally the flow cuts the audit branch, audits and publishes with pyiceberg (`tollwatch.core.wap`), and Spark only
writes to the branch. On Databricks the table lives in Spark's catalog, out of the flow's reach, so `tollwatch-merge
--audit` does the whole loop on the cluster with the same rules and the same checks:

1. the ledger of `main`: a published refresh is a replay; a held one stays held (its table property); a
   discarded one is not loaded again;
2. cut `audit_<refresh id>` from `main` (`ALTER TABLE … CREATE BRANCH`), merge the landing into it;
3. profile the branch's loaded days and `main`'s trailing weeks with one aggregation each (per plaza, day and
   direction: vehicles, rows, a bit mask of hours) and run `tollwatch.core.quality.audit` on the driver, with the
   upstream's per-day counts the flow left in the landing (`upstream-days.json`);
4. held: record the hold (`tollwatch.held.<refresh id>`, the same `HoldRecord` the CLI reads) and stop; passed:
   `CALL <catalog>.system.fast_forward(<table>, 'main', <branch>)`, then drop the branch. When `main` moved since
   the cut (another load published first), the branch is dropped and the load written and audited again.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, date, datetime, timedelta
from typing import Any

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from tollwatch.contract import table as contract
from tollwatch.contract.events import Window
from tollwatch.contract.quality import HoldRecord, QualitySpec, QualitySummary, Settlement
from tollwatch.core.quality import DayProfile, Profile, audit
from tollwatch.spark.iceberg import IcebergTable, is_conflict

log = logging.getLogger("tollwatch.spark")

#: Times a load is written and audited again on a `main` that moved before it could publish.
PUBLISH_ATTEMPTS = 5
COUNTS = ("vehicles_e_zpass", "vehicles_vtoll", "vehicles_cash")


class MainMoved(Exception):
    """`main` is no longer an ancestor of the branch's head: publishing would drop what was published since."""


def sql_string(text: str) -> str:
    """A Spark SQL string literal (backslash escapes are on by default in Spark's parser)."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _quoted(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


class SparkBranches:
    """The table's audit branches and held/settled records, through Spark SQL (Iceberg's SQL extensions)."""

    def __init__(self, spark: SparkSession, name: str) -> None:
        self.spark = spark
        self.name = name
        self.main = IcebergTable(spark, name)

    def cut(self, branch: str) -> None:
        """Create `branch` at `main`'s head (see `IcebergTable.ensure_branch`)."""
        IcebergTable(self.spark, self.name, branch).ensure_branch()

    def drop(self, branch: str) -> None:
        self.spark.sql(f"ALTER TABLE {self.name} DROP BRANCH IF EXISTS {_quoted(branch)}")

    def publish(self, branch: str) -> int:
        """Fast-forward `main` to the branch's head, then remove the branch; the published snapshot."""
        head = IcebergTable(self.spark, self.name, branch).current_snapshot()
        current = self.main.current_snapshot()
        lineage = IcebergTable(self.spark, self.name, branch)._lineage()
        if head is None:
            raise MainMoved(f"{branch} does not exist")
        if current is not None and current not in lineage:
            raise MainMoved(f"main moved to snapshot {current} since {branch} was cut")
        catalog, _, identifier = self.name.partition(".") if self.name.count(".") == 2 else ("", "", self.name)
        procedure = f"{catalog}.system.fast_forward" if catalog else "system.fast_forward"
        try:
            self.spark.sql(f"CALL {procedure}({sql_string(identifier)}, 'main', {sql_string(branch)})")
        except Exception as exc:
            if is_conflict(exc) or "ancestor" in str(exc):
                raise MainMoved(str(exc).splitlines()[0]) from exc
            raise
        self.drop(branch)
        return head

    def properties(self) -> dict[str, str]:
        rows = self.spark.sql(f"SHOW TBLPROPERTIES {self.name}").collect()
        return {str(row["key"]): str(row["value"]) for row in rows}

    def hold(self, record: HoldRecord) -> None:
        key = contract.HELD_PREFIX + record.refresh_id
        self.spark.sql(
            f"ALTER TABLE {self.name} SET TBLPROPERTIES ({sql_string(key)} = {sql_string(record.model_dump_json())})"
        )

    def held(self, refresh_id: str) -> HoldRecord | None:
        value = self.properties().get(contract.HELD_PREFIX + refresh_id)
        return HoldRecord.model_validate_json(value) if value else None

    def settled(self, refresh_id: str) -> Settlement | None:
        value = self.properties().get(contract.SETTLED_PREFIX + refresh_id)
        return Settlement.model_validate_json(value) if value else None


def profile(spark: SparkSession, name: str, ref: str, start: date, stop: date) -> Profile:
    """The checks' view of one branch's days [start, stop), aggregated by Spark: one row per plaza, day, direction."""
    reader = spark.read if ref == contract.MAIN else spark.read.option("branch", ref)
    rows = reader.table(name).where((F.col("date") >= F.lit(start)) & (F.col("date") < F.lit(stop)))
    present = set(rows.columns)
    vehicles = sum((F.coalesce(F.col(c).cast("long"), F.lit(0)) for c in COUNTS if c in present), F.lit(0).cast("long"))
    # `shiftleft`'s Python form takes a constant shift only: the per-row shift is the SQL function's
    hour_bit = F.when(F.col("hour").between(0, 23), F.expr("shiftleft(CAST(1 AS BIGINT), hour)"))
    grouped = rows.groupBy("plaza_id", "date", "direction").agg(
        F.sum(vehicles).alias("total"), F.count(F.lit(1)).alias("rows"), F.bit_or(hour_bit).alias("hours")
    )
    found = Profile()
    for row in grouped.collect():
        if row["plaza_id"] is None or row["date"] is None:
            continue
        day = found.days.setdefault((int(row["plaza_id"]), row["date"]), DayProfile())
        day.total += int(row["total"] or 0)
        day.rows += int(row["rows"])
        if row["direction"] is not None and row["hours"]:
            day.hours[row["direction"]] = day.hours.get(row["direction"], 0) | int(row["hours"])
    return found


def read_upstream_days(spark: SparkSession, landing: str) -> dict[date, int] | None:
    """The upstream's rows per day of the load, as the flow wrote them beside the manifest; None when absent."""
    try:
        text = spark.read.text(f"{landing}/{contract.UPSTREAM_DAYS}", wholetext=True).first()
    except Exception:  # not written (an older flow, or a run by hand): reconciliation is not evaluated
        return None
    if text is None:
        return None
    return {date.fromisoformat(day): int(n) for day, n in json.loads(text[0]).items()}


def judge(
    spark: SparkSession,
    name: str,
    branch: str,
    touched: tuple[date, date] | None,
    spec: QualitySpec,
    *,
    upstream_by_day: dict[date, int] | None,
    rows_read: int,
    rows_rejected: int,
    columns: list[str],
    rows_written: int = 0,
) -> QualitySummary:
    """The checks on the branch's loaded days, against `main`'s trailing weeks (as `core.wap.audit_branch`)."""
    replaced = 0
    if touched is None:
        loaded, history = Profile(), Profile()
    else:
        start, stop = touched
        loaded = profile(spark, name, branch, start, stop)
        history = profile(spark, name, contract.MAIN, start - timedelta(weeks=spec.volume.trailing_weeks), stop)
        replaced = replaced_by_another_row(spark, name, branch, start, stop)
    return audit(
        spec,
        loaded=loaded,
        history=history,
        upstream_by_day=upstream_by_day,
        rows_read=rows_read,
        rows_rejected=rows_rejected,
        columns=columns,
        rows_superseded=(max(rows_read - rows_rejected - rows_written, 0) if rows_written else 0) + replaced,
    )


def replaced_by_another_row(spark: SparkSession, name: str, branch: str, start: date, stop: date) -> int:
    """Rows of `main` whose key the branch holds under another upstream row (as `core.wap.replaced_by_another_row`):
    an upstream that re-issues a correction as a new row may still count the old one."""

    def keyed(ref: str) -> DataFrame:
        reader = spark.read if ref == contract.MAIN else spark.read.option("branch", ref)
        rows = reader.table(name).where((F.col("date") >= F.lit(start)) & (F.col("date") < F.lit(stop)))
        return rows.select(*contract.KEY, "source_row_id")

    after = keyed(branch).withColumnRenamed("source_row_id", "__after")
    paired = keyed(contract.MAIN).join(after, on=list(contract.KEY), how="inner")
    return int(paired.where(F.col("source_row_id") != F.col("__after")).count())


def hold_record(
    refresh_id: str,
    branch: str,
    snapshot_id: int,
    mode: str,
    window: tuple[date, date] | None,
    touched: tuple[date, date] | None,
    quality: QualitySummary,
    extra: dict[str, Any],
) -> HoldRecord:
    """What `tollwatch status` and the settle commands read about a load held on the cluster."""
    return HoldRecord(
        refresh_id=refresh_id,
        branch=branch,
        snapshot_id=snapshot_id,
        mode=mode,  # type: ignore[arg-type]
        window=Window(start=window[0], stop=window[1]) if window else None,
        touched=Window(start=touched[0], stop=touched[1]) if touched else None,
        held_at=datetime.now(UTC),
        failing=[c.name for c in quality.failing],
        quality=quality.brief(),
        **extra,
    )
