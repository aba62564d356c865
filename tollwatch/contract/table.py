"""The bronze table's contract, stated once as data: both writers (pyarrow + pyiceberg, and Spark) are built on it.

Columns and types, the natural key, the partitioning, the typing checks in the order they decide a row's rejection
reason (and the reasons' texts), the ledger's snapshot-property keys and the touched-days encoding. A writer
implements each *kind* of check once for its engine and walks `CHECKS` in order; it never restates a column list,
a reason text or a property key. Standard library only: a Databricks runtime imports this beside pyspark.

Patterns are written in the common subset of RE2 (pyarrow compute) and java.util.regex (Spark): explicit character
classes instead of `\\s`/`\\d` (their whitespace and digit sets differ) and `\\z` for the end of the text (Java's
`$` also matches before a final line break).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from typing import Literal

from tollwatch.contract.compute import CATALOG as CATALOG  # re-exported: stated once, in compute

ColumnType = Literal["int", "long", "date", "string", "timestamp"]
CheckKind = Literal["required", "integer", "fits", "between", "at_least", "date", "in_window", "one_of"]

# CATALOG: the Iceberg catalog tollwatch writes through. The Spark catalog has the same name as pyiceberg's: Iceberg's
# JDBC catalog keys its rows by catalog name, so both engines see one table in one catalog database.
TABLE = "bronze.bnt_traffic_hourly"
DAILY_TOTALS_TABLE = "silver.bnt_daily_totals"


@dataclass(frozen=True)
class Column:
    """One table column; `source` is the upstream (Socrata) field it comes from when the names differ."""

    name: str
    type: ColumnType
    required: bool = False
    source: str | None = None

    @property
    def upstream(self) -> str:
        return self.source or self.name


#: The table's columns before any drift, in table order. Unknown upstream columns are appended as strings.
COLUMNS: tuple[Column, ...] = (
    Column("plaza_id", "int", required=True),
    Column("date", "date", required=True),
    Column("hour", "int", required=True),
    Column("direction", "string", required=True),
    Column("vehicles_e_zpass", "long", required=True),
    # optional counts: `vehicles_cash` in older exports, `vehicles_vtoll` now
    Column("vehicles_vtoll", "long"),
    Column("vehicles_cash", "long"),
    # Socrata system fields kept for lineage (Iceberg column names cannot start with ':')
    Column("source_row_id", "string", source=":id"),
    Column("source_updated_at", "timestamp", source=":updated_at"),
)
BY_NAME = {c.name: c for c in COLUMNS}

#: The natural key of a row: one count per plaza, day, hour and direction.
KEY: tuple[str, ...] = ("plaza_id", "date", "hour", "direction")
#: The row version: per key, the newest version wins, whichever engine or order loads commit in.
VERSION = "source_updated_at"
#: Upstream system fields that are neither kept nor turned into columns.
IGNORED_UPSTREAM = frozenset({":created_at", ":version"})


@dataclass(frozen=True)
class Partition:
    """`month(date)`, named `date_month` (the name Iceberg's Spark DDL `months(date)` gives it too)."""

    source: str = "date"
    transform: Literal["month"] = "month"
    name: str = "date_month"


PARTITION = Partition()

# ----------------------------------------------------------------------------------------- typing

WHITESPACE = "[\\t\\n\\f\\r ]"
#: A non-negative integer, surrounding whitespace allowed; group 1 is the digits.
INTEGER_PATTERN = f"^{WHITESPACE}*([0-9]+){WHITESPACE}*\\z"
#: The years a loaded day may have, 0001-9998. Year 0000 is no date to Python (the flow, and a Spark driver collecting
#: a load's first and last day), and 9999-12-31 has no next day to end the stop-exclusive range a load records as
#: touched (`encode_days`, `Window`): either day, typed by both engines before, failed its whole refresh load.
YEAR_PATTERN = "(000[1-9]|00[1-9][0-9]|0[1-9][0-9]{2}|[1-8][0-9]{3}|9[0-8][0-9]{2}|99[0-8][0-9]|999[0-8])"
#: `YYYY-MM-DD` of a year in YEAR_PATTERN, optionally with a floating midnight (Socrata's calendar dates); groups 1-3
#: are year, month, day.
DATE_PATTERN = f"^{YEAR_PATTERN}-([0-9]{{2}})-([0-9]{{2}})(T00:00:00(\\.0+)?)?\\z"
#: A Socrata system time: its first 19 characters are read as UTC; groups 1-6. Not matching means no version
#: (null), never a rejection: the version only orders rows.
TIMESTAMP_PATTERN = "^([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})"
DIRECTIONS: tuple[str, ...] = ("I", "O")
#: Largest value per integer column type: a longer number is `out of range`, not a failed cast.
INTEGER_MAX = {"int": 2**31 - 1, "long": 2**63 - 1}


@dataclass(frozen=True)
class Check:
    """One typing rule. A row's rejection reason is the reason of the first check in `CHECKS` it fails.

    Kinds: `required` (no value), `integer` (a value not matching INTEGER_PATTERN), `fits` (an integer too large for
    its column type), `between` (typed value outside [low, high]), `at_least` (typed value below low), `date` (a
    value not an existing calendar day of a year 0001-9998 by DATE_PATTERN: 2024-02-30 is rejected, not rolled over),
    `in_window` (a typed date outside the load's window, when it has one), `one_of` (a value, or no value, not in
    `values`).
    """

    kind: CheckKind
    column: str
    reason: str
    low: int | None = None
    high: int | None = None
    values: tuple[str, ...] = ()

    def reason_for(self, start: date | None = None, stop: date | None = None) -> str:
        """The reason text; `in_window`'s names the window (`[start, stop)`, as `tollwatch.contract.events.Window`
        prints)."""
        return self.reason.format(start=start, stop=stop)


def _integer_checks(column: Column) -> tuple[Check, ...]:
    name = column.name
    checks = (Check("required", name, f"{name}: missing"),) if column.required else ()
    return (
        *checks,
        Check("integer", name, f"{name}: not a non-negative integer"),
        Check("fits", name, f"{name}: out of range"),
    )


#: Integer columns, typed and checked in this order.
INTEGER_COLUMNS: tuple[Column, ...] = tuple(c for c in COLUMNS if c.type in INTEGER_MAX)

CHECKS: tuple[Check, ...] = (
    *(check for column in INTEGER_COLUMNS for check in _integer_checks(column)),
    Check("between", "hour", "hour: not 0-23", low=0, high=23),
    Check("at_least", "plaza_id", "plaza_id: must be >= 1", low=1),
    Check("required", "date", "date: missing"),
    Check("date", "date", "date: not a YYYY-MM-DD date"),
    Check("in_window", "date", "date: outside the requested window [{start}, {stop})"),
    Check("one_of", "direction", "direction: not I or O", values=DIRECTIONS),
)


def target_columns(columns_seen: tuple[str, ...] | list[str] | frozenset[str]) -> tuple[Column, ...]:
    """The base columns plus one string column per unknown upstream column, sorted (nothing silently dropped)."""
    known = {c.upstream for c in COLUMNS} | {c.name for c in COLUMNS} | IGNORED_UPSTREAM
    extra = sorted(name for name in set(columns_seen) - known if not name.startswith(":"))
    return (*COLUMNS, *(Column(name, "string") for name in extra))


# ----------------------------------------------------------------------------------------- the ledger

#: Snapshot-summary keys: every snapshot a load commits carries them, so the table's history is the ledger.
REFRESH_ID = "tollwatch.refresh-id"
WINDOW = "tollwatch.window"
MODE = "tollwatch.mode"
FLOW_RUN_ID = "tollwatch.flow-run-id"
#: The days a load replaced or merged, `start/stop` (stop exclusive).
TOUCHED = "tollwatch.touched"
#: The upstream `rowsUpdatedAt` (epoch seconds) through which every published version is committed.
COMMITTED_THROUGH = "tollwatch.committed-through"


def encode_days(start: date, stop: date) -> str:
    """`2024-01-01/2024-02-01`: how WINDOW and TOUCHED record days (stop exclusive)."""
    return f"{start.isoformat()}/{stop.isoformat()}"


def decode_days(text: str | None) -> tuple[date, date] | None:
    """The (start, stop) of an encoded range; None for no value."""
    if not text:
        return None
    start, _, stop = text.partition("/")
    return date.fromisoformat(start), date.fromisoformat(stop)


def load_properties(
    refresh_id: str, mode: str, window: tuple[date, date] | None, flow_run_id: str | None
) -> dict[str, str]:
    """What every snapshot of a load records, whichever engine commits it."""
    properties = {REFRESH_ID: refresh_id, MODE: mode}
    if window is not None:
        properties[WINDOW] = encode_days(*window)
    if flow_run_id:
        properties[FLOW_RUN_ID] = flow_run_id
    return properties


# ----------------------------------------------------------------------------------------- write-audit-publish

#: The branch readers read: a load reaches it only by a fast-forward after its audit passed.
MAIN = "main"
#: Prefix of a load's audit branch (one per refresh, so concurrent loads never write to each other's branch).
AUDIT_BRANCH_PREFIX = "audit_"
#: Table properties: a held load's record (`<prefix><refresh id>` → JSON), and how an operator settled one.
HELD_PREFIX = "tollwatch.held."
SETTLED_PREFIX = "tollwatch.settled."


#: The blob beside a landing's manifest with the upstream's row count per day of the load, for an audit that runs
#: where the flow cannot (`tollwatch-merge --audit` on Databricks): `{"YYYY-MM-DD": rows, …}`.
UPSTREAM_DAYS = "upstream-days.json"


def audit_branch(refresh_id: str) -> str:
    """The audit branch of a load: `audit_` + the refresh id with every character outside [A-Za-z0-9] as `_`, so
    the name is also a plain Spark identifier part (`<table>.branch_audit_…`)."""
    return AUDIT_BRANCH_PREFIX + "".join(ch if ch.isascii() and ch.isalnum() else "_" for ch in refresh_id)


# Lineage of a downstream table: the snapshot summary of each output commit names the load it was computed from.
JOB = "tollwatch.job"
UPSTREAM_TABLE = "tollwatch.upstream-table"
UPSTREAM_SNAPSHOT_ID = "tollwatch.upstream-snapshot-id"
UPSTREAM_REFRESH_ID = "tollwatch.upstream-refresh-id"

#: The line a Spark merge prints its result on (the flow reads it from the driver's output or the run output).
RESULT_MARKER = "TOLLWATCH_RESULT="
