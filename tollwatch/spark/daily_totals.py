"""`tollwatch-daily-totals`: the downstream job in Spark — vehicles per day, plaza and direction, bronze → silver.

The Spark twin of `tollwatch.downstream.daily_totals` (same output columns, same rules), run by Databricks as a
`python_wheel_task` when a completion event's subscription starts it with run-now:

    tollwatch-daily-totals --snapshot-id 123 --start 2024-01-01 --stop 2024-02-01 \\
        [--table tollwatch.bronze.bnt_traffic_hourly] [--output tollwatch.silver.bnt_daily_totals] [--refresh-id <id>]

- it reads bronze at the snapshot that triggered it (empty `--snapshot-id`: the current one), so a re-run sees
  exactly that load; an unknown snapshot is an error, not an empty read that would delete the window's days;
- it replaces the window's days in one commit: the months the window touches are rewritten with their other days
  unchanged (a filter that matches part of a data file cannot be an Iceberg overwrite condition), so a re-run gives
  the same table and a day that vanished upstream vanishes here;
- its snapshot summary records the upstream table, snapshot and refresh (the output's history is its lineage).

A per-column sum is null only when every hour of the group is null for that column; `vehicles_total` counts nulls
as 0; drifted upstream string columns are not counted.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import date
from functools import reduce
from typing import Any

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from tollwatch.contract import table as contract
from tollwatch.spark.entry import log_to_driver, print_result
from tollwatch.spark.iceberg import IcebergTable, conform, months_between, retry_conflicts
from tollwatch.spark.rows import SPARK_TYPES

log = logging.getLogger("tollwatch.spark")

JOB_NAME = "daily_totals"
GROUP = ("date", "plaza_id", "direction")
COUNT_COLUMNS = tuple(c.name for c in contract.INTEGER_COLUMNS if c.name.startswith("vehicles_"))


def _optional(text: str) -> str | None:
    """Job parameters a run does not set arrive empty (`--start=`): empty means not given."""
    return text.strip() or None


def _qualified(name: str) -> str:
    """`namespace.table` (how completion events name the table) in tollwatch's catalog; 3 parts are kept."""
    return name if name.count(".") >= 2 else f"{contract.CATALOG}.{name}"


@dataclass(frozen=True)
class Args:
    table: str
    output: str
    snapshot_id: int | None
    start: date
    stop: date
    refresh_id: str | None


def parse_args(argv: Sequence[str]) -> Args:
    parser = argparse.ArgumentParser(prog="tollwatch-daily-totals", description="Daily totals of a bronze window.")
    parser.add_argument("--table", type=_optional, default=None, help="bronze: catalog.namespace.table")
    parser.add_argument("--output", type=_optional, default=None, help="silver: catalog.namespace.table")
    parser.add_argument(
        "--snapshot-id", type=_optional, default=None, help="bronze snapshot to read (default: current)"
    )
    parser.add_argument("--start", type=_optional, required=True, help="first day (ISO date)")
    parser.add_argument("--stop", type=_optional, required=True, help="day after the last (exclusive)")
    parser.add_argument("--refresh-id", type=_optional, default=None, help="the load that triggered the run")
    ns = parser.parse_args(list(argv))
    if ns.start is None or ns.stop is None:
        parser.error("--start and --stop are required (the window the completion event carries)")
    try:
        start, stop = date.fromisoformat(ns.start), date.fromisoformat(ns.stop)
        snapshot = None if ns.snapshot_id is None else int(ns.snapshot_id)
    except ValueError as exc:
        parser.error(str(exc))
    if stop <= start:
        parser.error(f"--stop ({stop}) must be after --start ({start}); stop is exclusive")
    return Args(
        table=_qualified(ns.table or contract.TABLE),
        output=_qualified(ns.output or contract.DAILY_TOTALS_TABLE),
        snapshot_id=snapshot,
        start=start,
        stop=stop,
        refresh_id=ns.refresh_id,
    )


def output_schema() -> T.StructType:
    """The silver table: the group key, one sum per count column, the total and the hours counted."""
    fields = [T.StructField(n, SPARK_TYPES[contract.BY_NAME[n].type], nullable=False) for n in GROUP]
    fields += [T.StructField(n, T.LongType()) for n in COUNT_COLUMNS]
    fields += [T.StructField("vehicles_total", T.LongType(), False), T.StructField("hours", T.LongType(), False)]
    return T.StructType(fields)


def aggregate(hourly: DataFrame) -> DataFrame:
    """Daily totals of hourly rows in `output_schema()`; count columns the snapshot lacks are null."""
    present = [c for c in COUNT_COLUMNS if c in hourly.columns]
    sums = [F.sum(c).alias(c) for c in present]
    grouped = hourly.groupBy(*GROUP).agg(*sums, F.count(F.lit(1)).alias("hours"))
    total = reduce(lambda a, b: a + b, [F.coalesce(F.col(c), F.lit(0)) for c in present], F.lit(0).cast("long"))
    return conform(grouped.withColumn("vehicles_total", total), output_schema())


@dataclass
class Result:
    job: str
    table: str
    rows_written: int
    days_replaced: int
    snapshot_id: int | None
    window: str


def run(spark: SparkSession, args: Args) -> Result:
    source = IcebergTable(spark, args.table)
    if not source.exists():
        raise LookupError(f"upstream table {args.table} does not exist yet: nothing to aggregate")
    snapshot = args.snapshot_id if args.snapshot_id is not None else source.current_snapshot()
    if snapshot is None or snapshot not in source.snapshot_ids():
        raise LookupError(f"snapshot {snapshot} of {args.table} not found (expired?); omit --snapshot-id")
    day = F.col("date")
    hourly = source.read(snapshot).where((day >= F.lit(args.start)) & (day < F.lit(args.stop)))
    totals = aggregate(hourly).localCheckpoint(eager=True)  # read once; the rewrite below reads silver too
    properties = {
        contract.JOB: JOB_NAME,
        contract.UPSTREAM_TABLE: args.table,
        contract.UPSTREAM_SNAPSHOT_ID: str(snapshot),
        contract.WINDOW: contract.encode_days(args.start, args.stop),
    }
    if args.refresh_id:
        properties[contract.UPSTREAM_REFRESH_ID] = args.refresh_id
    output = IcebergTable(spark, args.output)
    schema = output.ensure(output_schema())
    months = months_between(args.start, args.stop)

    def replace(existing: DataFrame) -> DataFrame:
        outside = existing.where((day < F.lit(args.start)) | (day >= F.lit(args.stop)))
        return conform(outside, schema).unionByName(conform(totals, schema))

    retry_conflicts(lambda: output.rewrite(months, replace, properties))
    rows = totals.count()
    written = output.current_snapshot()
    log.info(
        "%s: %d rows for [%s, %s) from %s@%s into %s",
        JOB_NAME,
        rows,
        args.start,
        args.stop,
        args.table,
        snapshot,
        args.output,
    )
    return Result(JOB_NAME, args.output, rows, (args.stop - args.start).days, written, properties[contract.WINDOW])


def main(argv: Sequence[str] | None = None, spark: SparkSession | None = None) -> dict[str, Any]:
    """Entry point (Databricks passes the task's parameters as argv); prints and returns the result."""
    log_to_driver()
    args = parse_args(sys.argv[1:] if argv is None else argv)
    session = spark or SparkSession.builder.appName("tollwatch-daily-totals").getOrCreate()
    return print_result(asdict(run(session, args)))


if __name__ == "__main__":
    main()
