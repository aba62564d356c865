"""The BNT hourly-traffic schema and the typed conversion of Socrata's all-string rows.

Socrata returns every value as a JSON string, and the dataset's columns changed over its life
(`vehicles_cash` in older exports, `vehicles_vtoll` now). Conversion is vectorised with pyarrow compute so
a 50,000-row page costs milliseconds, and every row that fails a check is kept with a reason instead of
being dropped: good rows go to the table, bad rows to quarantine, both counted.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import orjson
import pyarrow as pa
import pyarrow.compute as pc

from tollwatch.contract import table as contract
from tollwatch.contract.events import Window

#: Arrow type of each contract column type.
ARROW_TYPES: dict[str, pa.DataType] = {
    "int": pa.int32(),
    "long": pa.int64(),
    "date": pa.date32(),
    "string": pa.string(),
    "timestamp": pa.timestamp("us", "UTC"),
}

#: The natural key of a row: one count per plaza, day, hour and direction.
KEY = contract.KEY
#: Columns every row must have, with their table types.
REQUIRED: dict[str, pa.DataType] = {c.name: ARROW_TYPES[c.type] for c in contract.COLUMNS if c.required}
#: Known optional count columns (they come and go across the dataset's history).
OPTIONAL_COUNTS: dict[str, pa.DataType] = {
    c.name: ARROW_TYPES[c.type] for c in contract.INTEGER_COLUMNS if not c.required
}
#: Socrata system fields we keep for lineage, upstream name -> column.
SYSTEM_FIELDS = {c.source: c.name for c in contract.COLUMNS if c.source}
DIRECTIONS = contract.DIRECTIONS


def _arrow_schema(columns: Iterable[contract.Column]) -> pa.Schema:
    return pa.schema([pa.field(c.name, ARROW_TYPES[c.type], nullable=not c.required) for c in columns])


def base_schema() -> pa.Schema:
    """The table schema before any drift: required columns, known optional counts, lineage."""
    return _arrow_schema(contract.COLUMNS)


def target_schema(columns_seen: Iterable[str]) -> pa.Schema:
    """The base schema plus one string column per unknown upstream column (nothing silently dropped)."""
    return _arrow_schema(contract.target_columns(frozenset(columns_seen)))


@dataclass(frozen=True)
class Converted:
    """A page split into typed good rows and raw rejected rows with their reasons."""

    good: pa.Table
    rejected: list[dict[str, object]]


def _strings(rows: list[Mapping[str, object]], name: str) -> pa.Array:
    """One upstream field of a page as strings.

    Socrata sends text, but not always: a checkbox column's value is a JSON boolean, a location's an object. Such a
    value is kept as its JSON text, which is what Spark's JSON reader gives a string column; pyarrow refused the
    whole page instead (ArrowTypeError), so one drifted column failed every local load while Spark loaded it.
    """
    values = [row.get(name) for row in rows]
    try:
        return pa.array(values, type=pa.string())
    except (pa.ArrowTypeError, pa.ArrowInvalid):
        return pa.array([_json_text(value) for value in values], type=pa.string())


def _json_text(value: object) -> str | None:
    return value if value is None or isinstance(value, str) else orjson.dumps(value).decode()


def _first_reason(reasons: list[pa.Array], length: int) -> pa.Array:
    """Per row, the first non-null reason (null = the row is good)."""
    if not reasons:
        return pa.nulls(length, pa.string())
    return pc.coalesce(*reasons)


def _reason(bad: pa.Array, text: str) -> pa.Array:
    return pc.if_else(pc.fill_null(bad, False), pa.scalar(text), pa.scalar(None, pa.string()))


def _typed_integer(raw: pa.Array, dtype: pa.DataType) -> pa.Array:
    """The value of an integer column: null unless it matches the pattern and fits its type."""
    ok = pc.fill_null(pc.match_substring_regex(raw, contract.INTEGER_PATTERN), False)
    clean = pc.if_else(ok, pc.utf8_trim_whitespace(raw), None)
    return pc.cast(pc.if_else(_fits(clean, dtype), clean, None), dtype)


def _typed_date(raw: pa.Array) -> pa.Array:
    """The calendar day of a `date` value: null unless it matches the pattern and the day exists.

    Arrow's strptime rolls an impossible day over (2024-02-30 parses as 2024-03-01): a date is valid only if it formats
    back to the text it came from, else a bad date would be loaded as another day's count.
    """
    ok = pc.fill_null(pc.match_substring_regex(raw, contract.DATE_PATTERN), False)
    text = pc.if_else(ok, pc.utf8_slice_codeunits(raw, 0, 10), None)
    parsed = pc.strptime(text, format="%Y-%m-%d", unit="s", error_is_null=True)
    exact = pc.equal(pc.strftime(parsed, format="%Y-%m-%d"), text)
    return pc.cast(pc.if_else(pc.fill_null(exact, False), parsed, None), pa.date32())


def _typed_timestamp(raw: pa.Array) -> pa.Array:
    """A system time's first 19 characters as UTC; null when it does not match (no version, not a rejection)."""
    ok = pc.fill_null(pc.match_substring_regex(raw, contract.TIMESTAMP_PATTERN), False)
    text = pc.if_else(ok, pc.utf8_slice_codeunits(raw, 0, 19), None)
    parsed = pc.strptime(text, format="%Y-%m-%dT%H:%M:%S", unit="us", error_is_null=True)
    return pc.cast(parsed, pa.timestamp("us", "UTC"))


def _failing(
    check: contract.Check, raw: dict[str, pa.Array], typed: dict[str, pa.Array], window: Window | None
) -> pa.Array | None:
    """Where `check` fails (true), for the rows of one page; None when it does not apply (no window)."""
    value, text = typed[check.column], raw[contract.BY_NAME[check.column].upstream]
    if check.kind == "required":
        return pc.is_null(text)
    if check.kind == "integer":
        return pc.and_kleene(pc.is_valid(text), pc.invert(pc.match_substring_regex(text, contract.INTEGER_PATTERN)))
    if check.kind == "fits":
        ok = pc.fill_null(pc.match_substring_regex(text, contract.INTEGER_PATTERN), False)
        return pc.and_(ok, pc.is_null(value))
    if check.kind == "between":
        return pc.or_(pc.less(value, check.low), pc.greater(value, check.high))
    if check.kind == "at_least":
        return pc.less(value, check.low)
    if check.kind == "date":
        return pc.and_kleene(pc.is_valid(text), pc.is_null(value))
    if check.kind == "in_window":
        if window is None:
            return None
        start, stop = pa.scalar(window.start, pa.date32()), pa.scalar(window.stop, pa.date32())
        return pc.or_(pc.less(value, start), pc.greater_equal(value, stop))
    if check.kind == "one_of":
        return pc.invert(pc.is_in(text, pa.array(check.values)))
    raise ValueError(f"unknown check kind {check.kind!r}")


def convert(rows: list[Mapping[str, object]], schema: pa.Schema, window: Window | None = None) -> Converted:
    """Type one page of raw Socrata rows into `schema`, quarantining rows that fail a check of the contract.

    With `window`, a row dated outside it is quarantined too: a window load replaces exactly its window, so
    such a row would be deleted by nobody (and a mis-dated upstream row is evidence worth keeping raw).
    """
    n = len(rows)
    upstream = {c.name: c.upstream for c in contract.COLUMNS}
    raw = {upstream.get(f.name, f.name): _strings(rows, upstream.get(f.name, f.name)) for f in schema}
    typed: dict[str, pa.Array] = {}
    for field in schema:
        text = raw[upstream.get(field.name, field.name)]
        if field.type in (pa.int32(), pa.int64()):
            typed[field.name] = _typed_integer(text, field.type)
        elif field.type == pa.date32():
            typed[field.name] = _typed_date(text)
        elif field.type == pa.timestamp("us", "UTC"):
            typed[field.name] = _typed_timestamp(text)
        else:
            typed[field.name] = text  # strings, and unknown upstream columns kept verbatim
    reasons = []
    for check in contract.CHECKS:
        failing = _failing(check, raw, typed, window)
        if failing is not None:
            reasons.append(_reason(failing, check.reason_for(window and window.start, window and window.stop)))
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
