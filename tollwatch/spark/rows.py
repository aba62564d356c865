"""Socrata's all-string rows typed and checked in Spark, by the rules of `tollwatch.contract.table`.

Each kind of check is implemented once here (as `tollwatch.core.schema` implements it for pyarrow) and the contract's
`CHECKS` are walked in order, so a rejected row gets the same first reason from either engine. Nothing here
restates a column, a pattern or a reason text.
"""

from __future__ import annotations

from datetime import date

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T
from pyspark.sql.window import Window as W

from tollwatch.contract import table as contract

SPARK_TYPES: dict[str, T.DataType] = {
    "int": T.IntegerType(),
    "long": T.LongType(),
    "date": T.DateType(),
    "string": T.StringType(),
    "timestamp": T.TimestampType(),
}
_EPOCH = date(1970, 1, 1)

REASON = "__reason"
PAGE = "__page"
POS = "__pos"


def col(name: str) -> Column:
    """A column by exact name (upstream names may hold ':' or '.')."""
    return F.col("`" + name.replace("`", "``") + "`")


def spark_schema(columns: tuple[contract.Column, ...]) -> T.StructType:
    """The table schema of these contract columns (required ones NOT NULL, as pyiceberg creates them)."""
    return T.StructType([T.StructField(c.name, SPARK_TYPES[c.type], nullable=not c.required) for c in columns])


def raw_schema(columns: tuple[contract.Column, ...]) -> T.StructType:
    """Every upstream field the columns come from, as strings (Socrata sends every value as a JSON string)."""
    return T.StructType([T.StructField(c.upstream, T.StringType()) for c in columns])


def _integer(raw: Column, column: contract.Column) -> Column:
    """Digits (leading zeros dropped) cast to the column's type when they fit; null otherwise."""
    ok = raw.rlike(contract.INTEGER_PATTERN)
    digits = F.regexp_replace(F.regexp_extract(raw, contract.INTEGER_PATTERN, 1), "^0+(?=[0-9])", "")
    limit = str(contract.INTEGER_MAX[column.type])
    fits = (F.length(digits) < len(limit)) | ((F.length(digits) == len(limit)) & (digits <= F.lit(limit)))
    return F.when(ok & fits, digits.cast(SPARK_TYPES[column.type]))


def _parts(raw: Column, pattern: str, count: int) -> tuple[Column, list[Column]]:
    ok = raw.rlike(pattern)
    return ok, [F.when(ok, F.regexp_extract(raw, pattern, i).cast("int")) for i in range(1, count + 1)]


def _day(year: Column, month: Column, day: Column, *, exact: bool) -> Column:
    """A calendar day; `exact`: a day the month does not have is null (2024-02-30 is not 2024-03-01), else it rolls
    over like strptime + timegm. Built without make_date's null-on-invalid, which ANSI mode turns into an error."""
    valid = month.between(1, 12) & day.between(1, 31)
    first = F.make_date(year, F.when(valid, month), F.lit(1))
    if exact:
        valid = valid & (day <= F.dayofmonth(F.last_day(first)))
    return F.when(valid, F.date_add(first, day - 1))


def _date(raw: Column) -> Column:
    ok, (year, month, day) = _parts(raw, contract.DATE_PATTERN, 3)
    return F.when(ok, _day(year, month, day, exact=True))


def _timestamp_utc(raw: Column) -> Column:
    """The first 19 characters as a UTC instant, from epoch seconds so the session time zone does not matter."""
    ok, (year, month, day, hour, minute, second) = _parts(raw, contract.TIMESTAMP_PATTERN, 6)
    valid = ok & hour.between(0, 23) & minute.between(0, 59) & second.between(0, 61)
    days = F.datediff(_day(year, month, day, exact=False), F.lit(_EPOCH)).cast("long")
    return F.when(valid, F.timestamp_seconds(days * 86400 + hour * 3600 + minute * 60 + second))


def _typed(column: contract.Column) -> Column:
    raw = col(column.upstream)
    if column.type in contract.INTEGER_MAX:
        return _integer(raw, column)
    if column.type == "date":
        return _date(raw)
    if column.type == "timestamp":
        return _timestamp_utc(raw)
    return raw


def _failing(check: contract.Check, typed: dict[str, Column], window: tuple[date, date] | None) -> Column | None:
    """Where `check` fails; None when it does not apply (no window)."""
    raw, value = col(contract.BY_NAME[check.column].upstream), typed[check.column]
    if check.kind == "required":
        return raw.isNull()
    if check.kind == "integer":
        return raw.isNotNull() & ~raw.rlike(contract.INTEGER_PATTERN)
    if check.kind == "fits":
        return raw.rlike(contract.INTEGER_PATTERN) & value.isNull()
    if check.kind == "between":
        return (value < check.low) | (value > check.high)
    if check.kind == "at_least":
        return value < check.low
    if check.kind == "date":
        return raw.isNotNull() & value.isNull()
    if check.kind == "in_window":
        return None if window is None else (value < F.lit(window[0])) | (value >= F.lit(window[1]))
    if check.kind == "one_of":
        return raw.isNull() | ~raw.isin(*check.values)
    raise ValueError(f"unknown check kind {check.kind!r}")


def type_rows(raw: DataFrame, columns: tuple[contract.Column, ...], window: tuple[date, date] | None) -> DataFrame:
    """The typed columns plus `__reason` (null = good): the first failing check of the contract, with its text."""
    typed = {c.name: _typed(c) for c in columns}
    reasons = []
    for check in contract.CHECKS:
        failing = _failing(check, typed, window)
        if failing is not None:
            reasons.append(F.when(failing, F.lit(check.reason_for(*(window or (None, None))))))
    selected = [typed[c.name].cast(SPARK_TYPES[c.type]).alias(c.name) for c in columns]
    return raw.select(*selected, F.coalesce(*reasons).alias(REASON), PAGE, POS)


def dedupe_on_key(good: DataFrame) -> DataFrame:
    """One row per key: the newest version, then the latest (last page, last position), as the local writer."""
    latest = W.partitionBy(*contract.KEY).orderBy(
        F.col(contract.VERSION).desc_nulls_last(), F.col(PAGE).desc(), F.col(POS).desc()
    )
    ranked = good.withColumn("__rank", F.row_number().over(latest))
    return ranked.where(F.col("__rank") == 1).drop("__rank", PAGE, POS)


def rejected_by_reason(typed: DataFrame) -> tuple[int, dict[str, int]]:
    """Rows read and rejected rows per reason, in one pass."""
    counts = typed.groupBy(REASON).count().collect()
    total = sum(int(r["count"]) for r in counts)
    return total, {r[REASON]: int(r["count"]) for r in counts if r[REASON] is not None}
