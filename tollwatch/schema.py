"""The BNT hourly-traffic schema and the typed conversion of Socrata's all-string rows.

Socrata returns every value as a JSON string, and the dataset's columns changed over its life
(`vehicles_cash` in older exports, `vehicles_vtoll` now). Conversion is vectorised with pyarrow compute so
a 50,000-row page costs milliseconds, and every row that fails a check is kept with a reason instead of
being dropped: good rows go to the table, bad rows to quarantine, both counted.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from tollwatch.events import Window

#: The natural key of a row: one count per plaza, day, hour and direction.
KEY = ("plaza_id", "date", "hour", "direction")

#: Columns every row must have, with their table types.
REQUIRED: dict[str, pa.DataType] = {
    "plaza_id": pa.int32(),
    "date": pa.date32(),
    "hour": pa.int32(),
    "direction": pa.string(),
    "vehicles_e_zpass": pa.int64(),
}

#: Known optional count columns (they come and go across the dataset's history).
OPTIONAL_COUNTS: dict[str, pa.DataType] = {
    "vehicles_vtoll": pa.int64(),
    "vehicles_cash": pa.int64(),
}

#: Socrata system fields we keep for lineage (renamed: Iceberg column names cannot start with ':').
SYSTEM_FIELDS = {":id": "source_row_id", ":updated_at": "source_updated_at"}
IGNORED_SYSTEM_FIELDS = frozenset({":created_at", ":version"})

DIRECTIONS = ("I", "O")
_INT_RE = r"^\s*\d+\s*$"
_DATE_RE = r"^\d{4}-\d{2}-\d{2}(T00:00:00(\.0+)?)?$"
_TS_RE = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}"


def base_schema() -> pa.Schema:
    """The table schema before any drift: required columns, known optional counts, lineage."""
    fields = [pa.field(n, t, nullable=False) for n, t in REQUIRED.items()]
    fields += [pa.field(n, t) for n, t in OPTIONAL_COUNTS.items()]
    fields += [pa.field("source_row_id", pa.string()), pa.field("source_updated_at", pa.timestamp("us", "UTC"))]
    return pa.schema(fields)


def target_schema(columns_seen: Iterable[str]) -> pa.Schema:
    """The base schema plus one string column per unknown upstream column (nothing silently dropped)."""
    schema = base_schema()
    known = set(REQUIRED) | set(OPTIONAL_COUNTS) | set(SYSTEM_FIELDS) | IGNORED_SYSTEM_FIELDS
    for name in sorted(set(columns_seen) - known):
        if name.startswith(":"):
            continue
        schema = schema.append(pa.field(name, pa.string()))
    return schema


@dataclass(frozen=True)
class Converted:
    """A page split into typed good rows and raw rejected rows with their reasons."""

    good: pa.Table
    rejected: list[dict[str, object]]


def _strings(rows: list[Mapping[str, object]], name: str) -> pa.Array:
    return pa.array([row.get(name) for row in rows], type=pa.string())


def _first_reason(reasons: list[pa.Array], length: int) -> pa.Array:
    """Per row, the first non-null reason (null = the row is good)."""
    if not reasons:
        return pa.nulls(length, pa.string())
    return pc.coalesce(*reasons)


def _reason(bad: pa.Array, text: str) -> pa.Array:
    return pc.if_else(pc.fill_null(bad, False), pa.scalar(text), pa.scalar(None, pa.string()))


def convert(rows: list[Mapping[str, object]], schema: pa.Schema, window: Window | None = None) -> Converted:
    """Type one page of raw Socrata rows into `schema`, quarantining rows that fail a check.

    With `window`, a row dated outside it is quarantined too: a window load replaces exactly its window, so
    such a row would be deleted by nobody (and a mis-dated upstream row is evidence worth keeping raw).
    """
    n = len(rows)
    raw = {name: _strings(rows, name) for name in _raw_names(schema)}
    reasons: list[pa.Array] = []
    typed: dict[str, pa.Array] = {}

    for name in ("plaza_id", "hour", "vehicles_e_zpass", *OPTIONAL_COUNTS):
        col = raw[name]
        ok_format = pc.match_substring_regex(col, _INT_RE)
        required = name in REQUIRED
        if required:
            reasons.append(_reason(pc.is_null(col), f"{name}: missing"))
        reasons.append(
            _reason(pc.and_kleene(pc.is_valid(col), pc.invert(ok_format)), f"{name}: not a non-negative integer")
        )
        clean = pc.if_else(pc.fill_null(ok_format, False), pc.utf8_trim_whitespace(col), None)
        fits = _fits(clean, schema.field(name).type)
        reasons.append(_reason(pc.invert(fits), f"{name}: out of range"))
        typed[name] = pc.cast(pc.if_else(fits, clean, None), schema.field(name).type)

    reasons.append(_reason(pc.or_(pc.less(typed["hour"], 0), pc.greater(typed["hour"], 23)), "hour: not 0-23"))
    reasons.append(_reason(pc.less(typed["plaza_id"], 1), "plaza_id: must be >= 1"))

    date_raw = raw["date"]
    date_ok = pc.match_substring_regex(date_raw, _DATE_RE)
    reasons.append(_reason(pc.is_null(date_raw), "date: missing"))
    date_txt = pc.if_else(pc.fill_null(date_ok, False), pc.utf8_slice_codeunits(date_raw, 0, 10), None)
    parsed_date = pc.strptime(date_txt, format="%Y-%m-%d", unit="s", error_is_null=True)
    # Arrow's strptime rolls an impossible day over (2024-02-30 parses as 2024-03-01): a date is valid only
    # if it formats back to the text it came from, else a bad date would be loaded as another day's count.
    exact = pc.equal(pc.strftime(parsed_date, format="%Y-%m-%d"), date_txt)
    parsed_date = pc.if_else(pc.fill_null(exact, False), parsed_date, None)
    reasons.append(
        _reason(pc.and_kleene(pc.is_valid(date_raw), pc.is_null(parsed_date)), "date: not a YYYY-MM-DD date")
    )
    typed["date"] = pc.cast(parsed_date, pa.date32())
    if window is not None:
        outside = pc.or_(
            pc.less(typed["date"], pa.scalar(window.start, pa.date32())),
            pc.greater_equal(typed["date"], pa.scalar(window.stop, pa.date32())),
        )
        reasons.append(_reason(outside, f"date: outside the requested window {window}"))

    direction = raw["direction"]
    reasons.append(_reason(pc.invert(pc.is_in(direction, pa.array(DIRECTIONS))), "direction: not I or O"))
    typed["direction"] = direction

    updated = raw[":updated_at"]
    ts_txt = pc.if_else(
        pc.fill_null(pc.match_substring_regex(updated, _TS_RE), False), pc.utf8_slice_codeunits(updated, 0, 19), None
    )
    typed["source_updated_at"] = pc.cast(
        pc.strptime(ts_txt, format="%Y-%m-%dT%H:%M:%S", unit="us", error_is_null=True), pa.timestamp("us", "UTC")
    )
    typed["source_row_id"] = raw[":id"]

    for field in schema:
        if field.name not in typed:
            typed[field.name] = raw[field.name]  # unknown upstream columns: kept verbatim as strings

    reason = _first_reason(reasons, n)
    good_mask = pc.is_null(reason)
    table = pa.table({f.name: typed[f.name] for f in schema}, schema=_nullable(schema))
    good = table.filter(good_mask).cast(schema)
    rejected = _rejected_rows(rows, reason)
    return Converted(good=good, rejected=rejected)


def _fits(digits: pa.Array, dtype: pa.DataType) -> pa.Array:
    """Whether each decimal string fits `dtype` (null stays null): a value too large for its column is one bad
    row to quarantine, not a cast error that fails the whole load."""
    limit = str(2 ** (dtype.bit_width - 1) - 1)
    significant = pc.replace_substring_regex(digits, r"^0+([0-9])", r"\1")
    length = pc.utf8_length(significant)
    same_length = pc.and_(pc.equal(length, len(limit)), pc.less_equal(significant, limit))
    return pc.fill_null(pc.or_(pc.less(length, len(limit)), same_length), True)


def _raw_names(schema: pa.Schema) -> list[str]:
    lineage = {v: k for k, v in SYSTEM_FIELDS.items()}
    return [lineage.get(f.name, f.name) for f in schema]


def _nullable(schema: pa.Schema) -> pa.Schema:
    """The same schema with every field nullable: rows are checked before the strict cast."""
    return pa.schema([f.with_nullable(True) for f in schema])


def _rejected_rows(rows: list[Mapping[str, object]], reason: pa.Array) -> list[dict[str, object]]:
    bad_idx = pc.indices_nonzero(pc.is_valid(reason)).to_pylist()
    reasons = reason.to_pylist()
    return [{"reason": reasons[i], "row": dict(rows[i])} for i in bad_idx]


def dedupe_on_key(table: pa.Table) -> pa.Table:
    """Keep one row per natural key: the newest upstream version (`source_updated_at`), then the latest position.

    The version decides because a load can hold two versions of a row (a correction republished under a new `:id`);
    among equal versions, pages are read in `:id` order, so the later position is the later row.
    """
    if table.num_rows == 0:
        return table
    version = pc.fill_null(pc.cast(table["source_updated_at"], pa.int64()), -(2**62))
    indexed = table.append_column("__pos", pa.array(range(table.num_rows), pa.int64())).append_column(
        "__version", version
    )
    newest = indexed.group_by(list(KEY), use_threads=False).aggregate([("__version", "max")])
    if newest.num_rows == table.num_rows:
        return table
    candidates = indexed.join(newest.rename_columns([*KEY, "__version"]), keys=[*KEY, "__version"], join_type="inner")
    latest = candidates.group_by(list(KEY), use_threads=False).aggregate([("__pos", "max")])
    keep = pc.sort_indices(latest["__pos_max"])
    return table.take(pc.take(latest["__pos_max"], keep))
