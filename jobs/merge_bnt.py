"""Merge one landing of MTA B&T hourly traffic into the bronze table with Spark (a Databricks `spark_python_task`).

This is the Spark twin of tollwatch's local writer (`tollwatch.ingest.load_landing` + `tollwatch.table`): the same
landed pages must give the same table rows whichever engine merges them. It runs on a cluster where tollwatch is
not installed, so it imports pyspark and the standard library only, and restates the few rules it shares with
`tollwatch.schema` (the tests check both copies agree and that both writers produce the same rows).

    python merge_bnt.py --landing abfss://c@acct.dfs.core.windows.net/raw/…/run=<id> \\
        --table cat.bronze.bnt_traffic_hourly --mode window --start 2024-01-01 --stop 2024-02-01 \\
        --refresh-id <id> [--flow-run-id <id>] [--format iceberg|parquet]

Steps, and why:

1. Ledger: a refresh id already committed is a no-op (a retried or redelivered load must not apply twice).
   Iceberg: a snapshot whose summary has `tollwatch.refresh-id` = id. Parquet: a marker file written last.
2. Read the sealed landing (its `manifest.json` is written last, so an unsealed landing is refused) with an
   explicit all-string schema: Socrata sends every value as a JSON string.
3. Type and validate exactly like `tollwatch.schema.convert`; a failing row is dropped and counted under its
   first reason. Rows outside the requested window (--start/--stop, in either mode) are rejected too, as the
   local writer does (nobody would ever delete them). A number too large for its column is rejected as
   `<column>: out of range`, as in the local writer.
4. Dedupe on the natural key like `dedupe_on_key`: the latest row (page order, then position in the page) wins.
5. Write. Window: every row of the window is replaced (a day with no new rows ends up empty). Refresh: merge
   on the key (existing rows whose key is not in the load, plus the load). Both rewrite whole months: the table
   is partitioned by month(date), and an Iceberg overwrite-by-filter that matches only part of a data file
   fails ("Cannot delete file where some, but not all, rows match filter"), so the filter is month-aligned and
   the months' other rows are carried over unchanged.
6. Print one `TOLLWATCH_RESULT=<json>` line (the flow reads it from the run output) and return the same dict.

Formats: `iceberg` (production) writes through DataFrameWriterV2 `overwrite(condition)` with
`snapshot-property.<key>` write options, one atomic commit per load. SQL `MERGE INTO` is not used on purpose:
from PySpark its snapshot summary cannot carry our properties (Iceberg's `CommitMetadata.withCommitProperties`
is a Java thread-local API), and the ledger depends on them. `parquet` is a stand-in with the same semantics
for environments without Iceberg jars (the tests): `<table>/date_month=YYYY-MM/*.parquet`, the table schema
in `<table>/_tollwatch/schema.json` and one ledger marker per load in `<table>/_tollwatch/`. It is not
atomic: a crash mid-write leaves touched months incomplete, and because the marker is written last the
retry rewrites them.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime
from functools import reduce
from typing import Any, Protocol
from urllib.parse import urlsplit

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T
from pyspark.sql.window import Window as W

log = logging.getLogger("tollwatch.merge_bnt")

# ------------------------------------------------------------------------------ rules shared with tollwatch.schema

#: The natural key of a row: one count per plaza, day, hour and direction.
KEY = ("plaza_id", "date", "hour", "direction")
#: Columns every row must have, with their table types (tollwatch.schema.REQUIRED, in Spark types).
REQUIRED: dict[str, T.DataType] = {
    "plaza_id": T.IntegerType(),
    "date": T.DateType(),
    "hour": T.IntegerType(),
    "direction": T.StringType(),
    "vehicles_e_zpass": T.LongType(),
}
#: Known optional count columns (`vehicles_cash` in older exports, `vehicles_vtoll` now).
OPTIONAL_COUNTS: dict[str, T.DataType] = {"vehicles_vtoll": T.LongType(), "vehicles_cash": T.LongType()}
#: Socrata system fields kept for lineage, renamed (Iceberg column names cannot start with ':').
SYSTEM_FIELDS = {":id": "source_row_id", ":updated_at": "source_updated_at"}
IGNORED_SYSTEM_FIELDS = frozenset({":created_at", ":version"})
DIRECTIONS = ("I", "O")

#: Snapshot summary keys (tollwatch.table): the table's own history is the ledger.
REFRESH_ID = "tollwatch.refresh-id"
WINDOW = "tollwatch.window"
MODE = "tollwatch.mode"
FLOW_RUN_ID = "tollwatch.flow-run-id"
RESULT_MARKER = "TOLLWATCH_RESULT="

#: Partition column of the parquet stand-in (the Iceberg partition field of month(date) has the same name).
MONTH_COLUMN = "date_month"

# Java regexes equivalent to tollwatch.schema's RE2 ones: RE2's `\s` is [\t\n\f\r ] (Java's also has \x0B),
# and RE2's `$` is the end of the text while Java's also matches before a final line break, hence `\z`.
_WS = "[\\t\\n\\f\\r ]"
_INT_RE = f"^{_WS}*([0-9]+){_WS}*\\z"
_DATE_RE = "^([0-9]{4})-([0-9]{2})-([0-9]{2})(T00:00:00(\\.0+)?)?\\z"
_TS_RE = "^([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})"
#: Largest value per integer type: a longer number is rejected instead of failing the cast.
_INT_MAX = {T.IntegerType(): str(2**31 - 1), T.LongType(): str(2**63 - 1)}
_EPOCH = date(1970, 1, 1)

_REASON = "__reason"
_PAGE = "__page"
_POS = "__pos"

# ------------------------------------------------------------------------------ arguments and result


@dataclass(frozen=True)
class Args:
    """What to merge, where, and how (the `parameters` of the spark_python_task)."""

    landing: str
    table: str
    format: str
    mode: str
    refresh_id: str
    start: date | None
    stop: date | None
    flow_run_id: str | None

    @property
    def window(self) -> tuple[date, date] | None:
        return (self.start, self.stop) if self.start and self.stop else None

    def properties(self) -> dict[str, str]:
        """What every snapshot of this load records, exactly as `IngestRequest.snapshot_properties`."""
        props = {REFRESH_ID: self.refresh_id, MODE: self.mode}
        if self.window:
            props[WINDOW] = f"{self.start}/{self.stop}"
        if self.flow_run_id:
            props[FLOW_RUN_ID] = self.flow_run_id
        return props


def parse_args(argv: Sequence[str] | None) -> Args:
    """Parse and check the arguments; a bad combination fails before Spark does any work."""
    parser = argparse.ArgumentParser(prog="merge_bnt", description="Merge one tollwatch landing into the bronze table.")
    parser.add_argument("--landing", required=True, help="directory of the landed pages (abfss://, https://, path)")
    parser.add_argument("--table", required=True, help="catalog.namespace.table (iceberg) or a directory (parquet)")
    parser.add_argument("--format", choices=("iceberg", "parquet"), default="iceberg")
    parser.add_argument("--mode", choices=("window", "refresh"), required=True)
    parser.add_argument("--start", type=date.fromisoformat, help="first day of the window (ISO date)")
    parser.add_argument("--stop", type=date.fromisoformat, help="day after the window (exclusive)")
    parser.add_argument("--refresh-id", required=True)
    parser.add_argument("--flow-run-id")
    ns = parser.parse_args(argv)
    if (ns.start is None) != (ns.stop is None):
        parser.error("--start and --stop go together")
    if ns.start is not None and ns.stop <= ns.start:
        parser.error(f"--stop ({ns.stop}) must be after --start ({ns.start}); stop is exclusive")
    if ns.mode == "window" and ns.start is None:
        parser.error("--mode window needs --start and --stop")
    if ns.format == "iceberg" and not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*){1,2}", ns.table):
        parser.error(f"--table {ns.table!r} is not a [catalog.]namespace.table name")
    if not ns.refresh_id.strip():
        parser.error("--refresh-id must not be empty")
    return Args(
        landing=hadoop_uri(ns.landing),
        table=ns.table,
        format=ns.format,
        mode=ns.mode,
        refresh_id=ns.refresh_id,
        start=ns.start,
        stop=ns.stop,
        flow_run_id=ns.flow_run_id or None,
    )


def hadoop_uri(uri: str) -> str:
    """A landing URI Spark can list: Azure Blob https:// URLs become abfss:// (Spark has no https filesystem)."""
    uri = uri.rstrip("/")
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https"):
        return uri  # abfss://, dbfs:/, file://, or a path
    host = parts.hostname or ""
    match = re.fullmatch(r"([a-z0-9]+)\.(?:blob|dfs)\.(.+)", host)
    container, _, path = parts.path.lstrip("/").partition("/")
    if parts.scheme != "https" or not match or not container:
        raise ValueError(f"cannot read {uri} with Spark: give an abfss:// URI, an Azure Blob https:// URL or a path")
    account, suffix = match.groups()
    return f"abfss://{container}@{account}.dfs.{suffix}/{path}".rstrip("/")


@dataclass
class MergeResult:
    """What the load did: printed as the TOLLWATCH_RESULT line (the flow builds its LoadResult from it)."""

    table: str
    format: str
    mode: str
    refresh_id: str
    window: str | None
    already_committed: bool = False
    snapshot_id: int | None = None
    rows_read: int = 0
    rows_written: int = 0
    rows_rejected: int = 0
    rejected_by_reason: dict[str, int] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "table": self.table,
            "format": self.format,
            "mode": self.mode,
            "refresh_id": self.refresh_id,
            "window": self.window,
            "already_committed": self.already_committed,
            "snapshot_id": self.snapshot_id,
            "rows_read": self.rows_read,
            "rows_written": self.rows_written,
            "rows_rejected": self.rows_rejected,
            "rejected_by_reason": dict(sorted((self.rejected_by_reason or {}).items())),
        }


# ------------------------------------------------------------------------------ reading the landing


@dataclass(frozen=True)
class Manifest:
    """The part of tollwatch's LandingManifest the merge needs: page files in order and the columns seen."""

    pages: tuple[str, ...]
    columns: tuple[str, ...]
    rows: int
    #: The fetch's `rowsUpdatedAt` ceiling (epoch s): a stored row of a window the fetch did not return is deleted
    #: upstream when no newer than it (tollwatch.table.newest_per_key). None: a landing sealed before it was recorded.
    through: int | None = None


def read_manifest(spark: SparkSession, landing: str) -> Manifest:
    """The landing's manifest; a landing without one is incomplete (a crashed fetch) and is never loaded."""
    path = f"{landing}/manifest.json"
    try:
        text = spark.read.text(path, wholetext=True).first()
    except Exception as exc:  # AnalysisException (path not found) differs across Spark versions
        raise FileNotFoundError(f"no sealed landing at {landing} (manifest.json missing or unreadable)") from exc
    if text is None:
        raise FileNotFoundError(f"empty manifest at {path}")
    data = json.loads(text[0])
    pages = tuple(str(p["blob"]).rsplit("/", 1)[-1] for p in data.get("pages", []))
    rows = sum(int(p.get("rows", 0)) for p in data.get("pages", []))
    through = data.get("through")
    if through is None and data.get("landed_at"):  # older landings: no version in them is newer than their seal
        through = int(datetime.fromisoformat(str(data["landed_at"]).replace("Z", "+00:00")).timestamp())
    return Manifest(
        pages=pages,
        columns=tuple(data.get("columns", [])),
        rows=rows,
        through=None if through is None else int(through),
    )


def target_schema(columns_seen: Iterable[str]) -> T.StructType:
    """The table schema of a landing (`tollwatch.schema.target_schema`): base columns, then unknown ones as strings."""
    fields = [T.StructField(n, t, nullable=False) for n, t in REQUIRED.items()]
    fields += [T.StructField(n, t) for n, t in OPTIONAL_COUNTS.items()]
    fields += [T.StructField("source_row_id", T.StringType()), T.StructField("source_updated_at", T.TimestampType())]
    known = set(REQUIRED) | set(OPTIONAL_COUNTS) | set(SYSTEM_FIELDS) | IGNORED_SYSTEM_FIELDS
    for name in sorted(set(columns_seen) - known):
        if not name.startswith(":"):
            fields.append(T.StructField(name, T.StringType()))
    return T.StructType(fields)


def raw_schema(schema: T.StructType) -> T.StructType:
    """Every upstream field the target needs, as strings (lineage columns under their Socrata names)."""
    lineage = {v: k for k, v in SYSTEM_FIELDS.items()}
    return T.StructType([T.StructField(lineage.get(f.name, f.name), T.StringType()) for f in schema])


def read_pages(spark: SparkSession, landing: str, manifest: Manifest, schema: T.StructType) -> DataFrame:
    """The landed rows as strings, with their page number and position in the page (for the dedupe).

    Each page is one gzip'd JSON array, read whole (multiLine); a corrupt page fails the job (FAILFAST) as it
    fails the local writer. The position comes from monotonically_increasing_id right after the scan: a page is
    never split, so ids increase with the row's place in its page.
    """
    raw = raw_schema(schema)
    if not manifest.pages:
        empty = spark.createDataFrame([], raw)
        return empty.withColumn(_PAGE, F.lit(0)).withColumn(_POS, F.lit(0).cast("long"))
    paths = [f"{landing}/{name}" for name in manifest.pages]
    order = F.create_map(*[F.lit(x) for i, name in enumerate(manifest.pages) for x in (name, i)])
    scanned = (
        spark.read.schema(raw)
        .option("multiLine", True)
        .option("mode", "FAILFAST")
        .json(paths)
        .select("*", F.col("_metadata.file_path").alias("__file"))
        .withColumn(_POS, F.monotonically_increasing_id())
    )
    basename = F.regexp_extract(F.col("__file"), r"([^/]+)$", 1)
    return scanned.withColumn(_PAGE, order[basename]).drop("__file")


# ------------------------------------------------------------------------------ typing and validation


def _c(name: str) -> Column:
    """A column by exact name (upstream names may hold ':' or '.')."""
    return F.col("`" + name.replace("`", "``") + "`")


def _reason(condition: Column, text: str) -> Column:
    return F.when(condition, F.lit(text))


def _integer(raw: Column, name: str, dtype: T.DataType) -> tuple[list[Column], Column]:
    """Reasons and value of an integer column: digits with optional whitespace, like `_INT_RE` + trim + cast."""
    ok = raw.rlike(_INT_RE)
    digits = F.regexp_replace(F.regexp_extract(raw, _INT_RE, 1), "^0+(?=[0-9])", "")
    limit = _INT_MAX[dtype]
    fits = (F.length(digits) < len(limit)) | ((F.length(digits) == len(limit)) & (digits <= F.lit(limit)))
    reasons = [_reason(raw.isNull(), f"{name}: missing")] if name in REQUIRED else []
    reasons.append(_reason(raw.isNotNull() & ~ok, f"{name}: not a non-negative integer"))
    reasons.append(_reason(ok & ~fits, f"{name}: out of range"))
    return reasons, F.when(ok & fits, digits.cast(dtype))


def _day(year: Column, month: Column, day: Column, *, exact: bool = False) -> Column:
    """A calendar day like strptime + timegm: month 1-12, day 1-31, and Feb 30 rolls over into March.

    `exact`: a day the month does not have is invalid instead (null), as `tollwatch.schema` types the `date`
    column: a mis-dated row must not be loaded as another day's count. Built without relying on make_date's
    null-on-invalid, which ANSI mode turns into an error.
    """
    valid = month.between(1, 12) & day.between(1, 31)
    first = F.make_date(year, F.when(valid, month), F.lit(1))
    if exact:
        valid = valid & (day <= F.dayofmonth(F.last_day(first)))
    return F.when(valid, F.date_add(first, day - 1))


def _parts(raw: Column, pattern: str, count: int) -> tuple[Column, list[Column]]:
    ok = raw.rlike(pattern)
    return ok, [F.when(ok, F.regexp_extract(raw, pattern, i).cast("int")) for i in range(1, count + 1)]


def _date(raw: Column) -> Column:
    """`YYYY-MM-DD`, optionally followed by a floating midnight `T00:00:00(.000)`; null when invalid."""
    ok, (year, month, day) = _parts(raw, _DATE_RE, 3)
    return F.when(ok, _day(year, month, day, exact=True))


def _timestamp_utc(raw: Column) -> Column:
    """The first 19 characters as a UTC instant (like strptime %H 0-23, %M 0-59, %S 0-61); null when invalid.

    Built from epoch seconds, so the session time zone does not matter (Socrata system times are UTC).
    """
    ok, (year, month, day, hour, minute, second) = _parts(raw, _TS_RE, 6)
    valid = ok & hour.between(0, 23) & minute.between(0, 59) & second.between(0, 61)
    days = F.datediff(_day(year, month, day), F.lit(_EPOCH)).cast("long")
    seconds = days * 86400 + hour * 3600 + minute * 60 + second
    return F.when(valid, F.timestamp_seconds(seconds))


def type_rows(raw: DataFrame, schema: T.StructType, window: tuple[date, date] | None) -> DataFrame:
    """Typed columns of `schema` plus `__reason` (null = good), with the checks and reason texts of `convert`.

    The reason is the first failing check in `convert`'s order, so rejected counts per reason match.
    """
    reasons: list[Column] = []
    typed: dict[str, Column] = {}
    integers = {**{n: REQUIRED[n] for n in ("plaza_id", "hour", "vehicles_e_zpass")}, **OPTIONAL_COUNTS}
    for name, dtype in integers.items():
        checks, typed[name] = _integer(_c(name), name, dtype)
        reasons += checks
    reasons.append(_reason((typed["hour"] < 0) | (typed["hour"] > 23), "hour: not 0-23"))
    reasons.append(_reason(typed["plaza_id"] < 1, "plaza_id: must be >= 1"))
    typed["date"] = _date(_c("date"))
    reasons.append(_reason(_c("date").isNull(), "date: missing"))
    reasons.append(_reason(_c("date").isNotNull() & typed["date"].isNull(), "date: not a YYYY-MM-DD date"))
    direction = _c("direction")
    reasons.append(_reason(direction.isNull() | ~direction.isin(*DIRECTIONS), "direction: not I or O"))
    typed["direction"] = direction
    typed["source_updated_at"] = _timestamp_utc(_c(":updated_at"))
    typed["source_row_id"] = _c(":id")
    if window:
        start, stop = window
        outside = (typed["date"] < F.lit(start)) | (typed["date"] >= F.lit(stop))
        reasons.append(_reason(outside, f"date: outside the requested window [{start}, {stop})"))
    columns = [typed.get(f.name, _c(f.name)).cast(f.dataType).alias(f.name) for f in schema]
    return raw.select(*columns, F.coalesce(*reasons).alias(_REASON), _PAGE, _POS)


def dedupe_on_key(good: DataFrame) -> DataFrame:
    """One row per key: the newest version, then the latest (last page, last position), as
    `tollwatch.schema.dedupe_on_key`."""
    latest = W.partitionBy(*KEY).orderBy(
        F.col("source_updated_at").desc_nulls_last(), F.col(_PAGE).desc(), F.col(_POS).desc()
    )
    ranked = good.withColumn("__rank", F.row_number().over(latest))
    return ranked.where(F.col("__rank") == 1).drop("__rank", _PAGE, _POS)


def rejected_by_reason(typed: DataFrame) -> tuple[int, dict[str, int]]:
    """Rows read and rejected rows per reason, in one pass."""
    counts = typed.groupBy(_REASON).count().collect()
    total = sum(int(r["count"]) for r in counts)
    return total, {r[_REASON]: int(r["count"]) for r in counts if r[_REASON] is not None}


# ------------------------------------------------------------------------------ merge semantics (both formats)


def month_start(day: date) -> date:
    return day.replace(day=1)


def next_month(day: date) -> date:
    return date(day.year + day.month // 12, day.month % 12 + 1, 1)


def months_between(start: date, stop: date) -> list[date]:
    """First days of the months touching [start, stop)."""
    months, current = [], month_start(start)
    while current < stop:
        months.append(current)
        current = next_month(current)
    return months


def scope_months(rows: DataFrame, mode: str, window: tuple[date, date] | None) -> list[date]:
    """The months a load rewrites: the window's months, or (refresh) the months of the loaded rows."""
    if mode == "window" and window:
        return months_between(*window)
    found = rows.select(F.trunc("date", "month").alias("m")).distinct().collect()
    return sorted(r["m"] for r in found)


def in_months(months: Sequence[date]) -> Column:
    """`date` within the given months, as month-aligned ranges (Iceberg can then drop whole files)."""
    ranges: list[tuple[date, date]] = []
    for month in sorted(months):
        if ranges and ranges[-1][1] == month:
            ranges[-1] = (ranges[-1][0], next_month(month))
        else:
            ranges.append((month, next_month(month)))
    if not ranges:
        raise ValueError("a rewrite needs at least one month")
    conditions = [(F.col("date") >= F.lit(lo)) & (F.col("date") < F.lit(hi)) for lo, hi in ranges]
    return reduce(lambda a, b: a | b, conditions)


def conform(df: DataFrame, schema: T.StructType) -> DataFrame:
    """Exactly the table's columns in its order; columns the load does not have are null (as `table.conform`)."""
    present = set(df.columns)
    return df.select(
        *[(_c(f.name) if f.name in present else F.lit(None)).cast(f.dataType).alias(f.name) for f in schema]
    )


def merged(
    existing: DataFrame, new: DataFrame, mode: str, window: tuple[date, date] | None, through: int | None
) -> DataFrame:
    """The new content of the rewritten months; versions only move forward (`tollwatch.table.newest_per_key`).

    Per key, the stored and the loaded row compete by `source_updated_at` (the loaded one wins a tie). Window: the
    months' rows outside the window stay; a stored row of the window the load lacks was deleted upstream when it is
    no newer than the fetch (`through`) and goes, a newer one stays. Refresh: stored rows the load lacks stay.
    """
    if mode == "window" and window:
        start, stop = window
        inside = (F.col("date") >= F.lit(start)) & (F.col("date") < F.lit(stop))
        outside = existing.where(~inside)
        stored = existing.where(inside)
        present = stored.join(new.select(*KEY), on=list(KEY), how="left_semi")
        absent = stored.join(new.select(*KEY), on=list(KEY), how="left_anti")
        if through is not None:
            newer = F.col("source_updated_at") >= F.lit(datetime.fromtimestamp(through + 1, UTC))
            absent = absent.where(newer)
        else:
            absent = absent.limit(0)
        competing, kept = present.unionByName(absent), outside
    else:
        competing = existing.join(new.select(*KEY), on=list(KEY), how="left_semi")
        kept = existing.join(new.select(*KEY), on=list(KEY), how="left_anti")
    both = competing.withColumn("__incoming", F.lit(0)).unionByName(new.withColumn("__incoming", F.lit(1)))
    newest = W.partitionBy(*KEY).orderBy(F.col("source_updated_at").desc_nulls_last(), F.col("__incoming").desc())
    winners = both.withColumn("__rank", F.row_number().over(newest)).where(F.col("__rank") == 1)
    return kept.unionByName(winners.drop("__rank", "__incoming"))


# ------------------------------------------------------------------------------ table formats


@dataclass(frozen=True)
class Committed:
    """A load found in the ledger (Iceberg knows its snapshot; the parquet stand-in has none)."""

    snapshot_id: int | None


class TableFormat(Protocol):
    """A bronze table in one storage format: the ledger, schema evolution and the month rewrite."""

    def committed(self, refresh_id: str) -> Committed | None:
        """The ledger entry of this refresh id, or None if it was never committed."""
        ...

    def ensure(self, schema: T.StructType) -> T.StructType:
        """Create or evolve the table for a load's schema; the table schema."""
        ...

    def rewrite(
        self, new: DataFrame, months: Sequence[date], args: Args, schema: T.StructType, through: int | None
    ) -> int | None:
        """Replace the months with their merged content; the snapshot id when the format has one."""
        ...

    def finish(self, args: Args, result: MergeResult) -> None:
        """Whatever must come after the data (the parquet ledger marker)."""
        ...


def _quote(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


def _column_ddl(field: T.StructField) -> str:
    not_null = " NOT NULL" if not field.nullable else ""
    return f"{_quote(field.name)} {field.dataType.simpleString()}{not_null}"


def create_table_sql(name: str, schema: T.StructType) -> list[str]:
    """DDL of a new bronze table: its namespace, then the table partitioned by months(date) (format v2).

    Required columns are NOT NULL, as in the pyiceberg-created table; Spark adds runtime null checks on write.
    """
    columns = ", ".join(_column_ddl(f) for f in schema)
    return [
        f"CREATE NAMESPACE IF NOT EXISTS {name.rsplit('.', 1)[0]}",
        f"CREATE TABLE IF NOT EXISTS {name} ({columns}) USING iceberg "
        "PARTITIONED BY (months(`date`)) TBLPROPERTIES ('format-version' = '2')",
    ]


def add_columns_sql(name: str, fields: Sequence[T.StructField]) -> str:
    """Schema evolution: new upstream columns, nullable (rows written before read them as null)."""
    added = ", ".join(_column_ddl(T.StructField(f.name, f.dataType)) for f in fields)
    return f"ALTER TABLE {name} ADD COLUMNS ({added})"


def iceberg_write_options(properties: dict[str, str], base_snapshot: int | None) -> dict[str, str]:
    """DataFrameWriterV2 options: the ledger properties into the snapshot summary, and conflict detection.

    `snapshot-property.<key>` adds `<key>` to the summary of the snapshot the write commits; with
    `isolation-level=serializable` from the snapshot the existing rows were read at, a commit to the same
    months in between fails this one instead of being overwritten
    (https://iceberg.apache.org/docs/latest/spark-configuration/#write-options).
    """
    options = {f"snapshot-property.{key}": value for key, value in properties.items()}
    if base_snapshot is not None:
        options |= {"isolation-level": "serializable", "validate-from-snapshot-id": str(base_snapshot)}
    return options


class IcebergFormat:
    """The production path: an Iceberg table in a Spark catalog (Hadoop catalog on abfss, or Unity Catalog).

    Not executable in the tests (no Iceberg runtime jar there); it uses only documented Iceberg-Spark
    features: CREATE TABLE … USING iceberg PARTITIONED BY (months(date)), ALTER TABLE ADD COLUMNS, the
    `<table>.snapshots` metadata table, reads pinned with the `snapshot-id` read option, and DataFrameWriterV2
    `overwrite(condition)` with the `snapshot-property.<key>`, `isolation-level` and `validate-from-snapshot-id`
    write options (https://iceberg.apache.org/docs/latest/spark-configuration/#write-options).
    """

    def __init__(self, spark: SparkSession, name: str) -> None:
        self.spark = spark
        self.name = name

    def exists(self) -> bool:
        return bool(self.spark.catalog.tableExists(self.name))

    def committed(self, refresh_id: str) -> Committed | None:
        """The latest snapshot recording this refresh id, or None (the ledger is the table's own history)."""
        if not self.exists():
            return None
        found = (
            self.spark.table(f"{self.name}.snapshots")
            .where(F.col("summary").getItem(REFRESH_ID) == F.lit(refresh_id))
            .orderBy(F.col("committed_at").desc())
            .select("snapshot_id")
            .limit(1)
            .collect()
        )
        return Committed(int(found[0]["snapshot_id"])) if found else None

    def current_snapshot(self) -> int | None:
        """The table's current snapshot: the latest entry of its history (a rollback adds one too)."""
        history = self.spark.table(f"{self.name}.history").orderBy(F.col("made_current_at").desc()).limit(1)
        rows = history.select("snapshot_id").collect()
        return int(rows[0]["snapshot_id"]) if rows else None

    def ensure(self, schema: T.StructType) -> T.StructType:
        """Create the table partitioned by months(date), or add the load's new upstream columns (nullable)."""
        if not self.exists():
            for statement in create_table_sql(self.name, schema):
                self.spark.sql(statement)
            log.info("created Iceberg table %s partitioned by months(date)", self.name)
        current = self.spark.table(self.name).schema
        new = [f for f in schema if f.name not in current.fieldNames()]
        if new:
            self.spark.sql(add_columns_sql(self.name, new))
            log.info("evolved %s: added columns %s", self.name, [f.name for f in new])
            current = self.spark.table(self.name).schema
        return current

    def rewrite(
        self, new: DataFrame, months: Sequence[date], args: Args, schema: T.StructType, through: int | None
    ) -> int | None:
        """One atomic overwrite of the months, carrying the ledger properties in its snapshot summary.

        The existing rows are read at a pinned snapshot (`snapshot-id` read option) and the write validates
        from it, so a concurrent commit to these months fails this one instead of being lost.
        """
        base = self.current_snapshot()
        reader = self.spark.read if base is None else self.spark.read.option("snapshot-id", str(base))
        existing = conform(reader.table(self.name).where(in_months(months)), schema)
        content = merged(existing, conform(new, schema), args.mode, args.window, through)
        writer = content.writeTo(self.name).options(**iceberg_write_options(args.properties(), base))
        writer.overwrite(in_months(months))  # month-aligned: whole data files match, so no partial-file error
        committed = self.committed(args.refresh_id)
        return committed.snapshot_id if committed else None

    def finish(self, args: Args, result: MergeResult) -> None:
        """Nothing: the snapshot summary already is the ledger entry."""


class ParquetFormat:
    """The test stand-in: plain parquet under a directory, same semantics, not atomic (see the module doc)."""

    def __init__(self, spark: SparkSession, root: str) -> None:
        self.spark = spark
        self.root = root.rstrip("/")
        self.meta = f"{self.root}/_tollwatch"

    def _path(self, path: str) -> tuple[Any, Any]:
        jvm = self.spark.sparkContext._jvm  # Hadoop FileSystem: works for file://, abfss://, dbfs:/
        jpath = jvm.org.apache.hadoop.fs.Path(path)  # type: ignore[union-attr]
        return jpath.getFileSystem(self.spark.sparkContext._jsc.hadoopConfiguration()), jpath  # type: ignore[union-attr]

    def _exists(self, path: str) -> bool:
        fs, jpath = self._path(path)
        return bool(fs.exists(jpath))

    def _write_text(self, path: str, text: str) -> None:
        fs, jpath = self._path(path)
        out = fs.create(jpath, True)
        try:
            out.write(bytearray(text.encode()))
        finally:
            out.close()

    def _marker(self, refresh_id: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9._-]+", refresh_id):
            raise ValueError(f"refresh id {refresh_id!r} cannot name a ledger file (letters, digits, . _ - only)")
        return f"{self.meta}/refresh-id={refresh_id}.json"

    def committed(self, refresh_id: str) -> Committed | None:
        return Committed(None) if self._exists(self._marker(refresh_id)) else None

    def schema(self) -> T.StructType | None:
        path = f"{self.meta}/schema.json"
        if not self._exists(path):
            return None
        text = self.spark.read.text(path, wholetext=True).first()[0]  # type: ignore[index]
        return T.StructType.fromJson(json.loads(text))

    def ensure(self, schema: T.StructType) -> T.StructType:
        """The table schema (created from the first load; new upstream columns appended, nullable)."""
        current = self.schema()
        if current is None:
            current = schema
        else:
            for field in schema:
                if field.name not in current.fieldNames():
                    current = current.add(T.StructField(field.name, field.dataType))
        self._write_text(f"{self.meta}/schema.json", current.json())
        return current

    def read(self, schema: T.StructType) -> DataFrame:
        """Every row, typed by the table schema (files from before a column existed read it as null)."""
        full = T.StructType([*schema.fields, T.StructField(MONTH_COLUMN, T.StringType())])
        return self.spark.read.schema(full).parquet(self.root)

    def rewrite(
        self, new: DataFrame, months: Sequence[date], args: Args, schema: T.StructType, through: int | None
    ) -> int | None:
        """Compute the months' new content (materialised first: it reads the files it replaces), then swap it in."""
        labels = [m.strftime("%Y-%m") for m in months]
        existing = self.read(schema).where(F.col(MONTH_COLUMN).isin(labels)).drop(MONTH_COLUMN)
        content = merged(conform(existing, schema), conform(new, schema), args.mode, args.window, through)
        content = content.withColumn(MONTH_COLUMN, F.date_format("date", "yyyy-MM")).localCheckpoint(eager=True)
        for label in labels:  # the content is materialised: the old files can go
            fs, jpath = self._path(f"{self.root}/{MONTH_COLUMN}={label}")
            fs.delete(jpath, True)
        content.repartition(MONTH_COLUMN).write.mode("append").partitionBy(MONTH_COLUMN).parquet(self.root)
        return None

    def finish(self, args: Args, result: MergeResult) -> None:
        """The ledger marker, written last: its presence means the load is complete."""
        self._write_text(self._marker(args.refresh_id), json.dumps({**args.properties(), **result.as_dict()}))


def read_parquet_table(spark: SparkSession, root: str) -> DataFrame:
    """The rows of a parquet stand-in table (for tests and inspection)."""
    table = ParquetFormat(spark, root)
    schema = table.schema()
    if schema is None:
        raise FileNotFoundError(f"no tollwatch parquet table at {root}")
    return table.read(schema).drop(MONTH_COLUMN)


# ------------------------------------------------------------------------------ the job


@contextmanager
def cached(df: DataFrame) -> Iterator[DataFrame]:
    """Cache a frame that several steps read (counts, months, write) so the pages are parsed once.

    Databricks serverless refuses caching APIs; there the frame is simply recomputed, which gives the same rows
    (the page scan, and so the positions, are deterministic).
    """
    try:
        persisted = df.persist()
    except Exception as exc:  # serverless: NOT_SUPPORTED_WITH_SERVERLESS and the like
        log.info("cannot cache (%s); recomputing instead", exc.__class__.__name__)
        yield df
        return
    try:
        yield persisted
    finally:
        persisted.unpersist()


def load(spark: SparkSession, args: Args) -> MergeResult:
    """Ledger check, then read, type, dedupe and write: the whole merge of one landing."""
    result = MergeResult(args.table, args.format, args.mode, args.refresh_id, args.properties().get(WINDOW))
    table: TableFormat = (
        IcebergFormat(spark, args.table) if args.format == "iceberg" else ParquetFormat(spark, args.table)
    )
    previous = table.committed(args.refresh_id)
    if previous is not None:
        result.already_committed = True
        result.snapshot_id = previous.snapshot_id
        log.info("refresh %s already committed in %s: nothing to do", args.refresh_id, args.table)
        return result

    manifest = read_manifest(spark, args.landing)
    log.info("landing %s: %d pages, %d rows", args.landing, len(manifest.pages), manifest.rows)
    schema = target_schema(manifest.columns)
    with cached(type_rows(read_pages(spark, args.landing, manifest, schema), schema, args.window)) as typed:
        result.rows_read, reasons = rejected_by_reason(typed)
        result.rejected_by_reason, result.rows_rejected = reasons, sum(reasons.values())
        with cached(dedupe_on_key(typed.where(F.col(_REASON).isNull()).drop(_REASON))) as new:
            result.rows_written = new.count()
            write(table, new, schema, args, result, manifest.through)
    return result


def write(
    table: TableFormat, new: DataFrame, schema: T.StructType, args: Args, result: MergeResult, through: int | None
) -> None:
    """Create or evolve the table, rewrite the load's months, then close the ledger entry."""
    if args.mode == "refresh" and result.rows_written == 0:
        log.info("refresh %s brought no valid rows: nothing to write", args.refresh_id)
        return  # as the local writer: no commit, so no ledger entry either
    table_schema = table.ensure(schema)
    months = scope_months(new, args.mode, args.window)
    result.snapshot_id = table.rewrite(new, months, args, table_schema, through)
    table.finish(args, result)
    log.info("wrote %d rows into %s (%d rejected)", result.rows_written, args.table, result.rows_rejected)


def main(argv: list[str] | None = None, spark: SparkSession | None = None) -> dict[str, Any]:
    """Entry point (Databricks passes the task's `parameters` as argv); prints and returns the result."""
    if not log.handlers:  # the job's own progress lines on stderr (driver log), without touching Spark's logging
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    args = parse_args(sys.argv[1:] if argv is None else argv)
    session = spark or SparkSession.builder.appName("tollwatch-merge-bnt").getOrCreate()
    result = load(session, args).as_dict()
    print(RESULT_MARKER + json.dumps(result, sort_keys=True), flush=True)
    return result


if __name__ == "__main__":
    main()
