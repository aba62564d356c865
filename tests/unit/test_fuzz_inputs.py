"""Property-based fuzzing of the data and config boundaries (issue 17, part 1), in process, no services.

1. **Socrata pages → typing** (`core.schema.convert`): pages of rows as Socrata sends them (JSON text, loaded by orjson
   as `core.ingest.load_landing` does), with odd unicode, huge numbers, dates of every shape, missing, extra, null and
   duplicated keys. Never an exception; every row good or rejected with a reason of `contract.CHECKS`; a good row only
   holds values the table (and its ledger) can hold; and, differentially, each row gets the same verdict and the same
   typed values from `reference`, a plain-Python reading of the contract written here without regular expressions
   (so a divergence between RE2 and Python, e.g. over digits of other scripts, shows).
2. **Automation and subscription YAML** (`load_project`): valid projects load and compile (`compile_project`) into
   automations that serialize to the JSON an apply sends; mutated ones (wrong types, unknown keys, deep nesting,
   huge/unicode names, alias bombs of bounded size, recursive aliases, non-mapping documents, tabs, duplicate keys,
   huge numbers, broken Unicode) never raise anything but `AutomationsConfigError`, whose every line names a file.
3. **`prefect event emit`-shaped backfill events**: payloads around `BackfillRequested`'s fields and the flow
   parameters the deployment trigger in prefect.yaml templates from them (`start`, `stop`, `request_id`) →
   `build_request` and `BackfillRequested.model_validate`: a request whose window is `[start, stop)` with stop > start,
   or a plain ValueError / pydantic ValidationError, never another exception.

Profiles (tests/unit/conftest.py): 60 examples per property in `make test`, 3000 in `make fuzz`. What the fuzzers
found is pinned by `@example`s and plain tests beside each property.
"""

from __future__ import annotations

import math
import tempfile
import uuid
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import yaml
from hypothesis import event, example, given
from hypothesis import strategies as st
from pydantic import ValidationError

from tollwatch.contract import table as contract
from tollwatch.contract.events import BackfillRequested, QualityVerdict, TollwatchEvent, Window
from tollwatch.contract.settings import Settings
from tollwatch.core.schema import convert, target_schema
from tollwatch.prefect.automations.compile import compile_project
from tollwatch.prefect.automations.load import load_project
from tollwatch.prefect.automations.models import (
    SUBSCRIBABLE_PAYLOADS,
    AutomationFile,
    AutomationsConfigError,
    SubscriptionFile,
)
from tollwatch.prefect.flows.ingest import build_request

pytestmark = pytest.mark.fuzz

# =========================================================================== 1. Socrata pages → typing

#: The contract's whitespace around an integer, stated here independently of its pattern.
ASCII_SPACE = "\t\n\f\r "
EPOCH_ORDINAL = date(1970, 1, 1).toordinal()
#: The zero of digit sets Python's `int()` reads but the contract must not: full-width, Arabic-Indic, extended
#: Arabic-Indic, Devanagari, Bengali, mathematical bold and monospace.
OTHER_ZEROS = (0xFF10, 0x0660, 0x06F0, 0x0966, 0x09E6, 0x1D7CE, 0x1D7F6)
#: Space-like characters: ASCII ones the contract allows around a number, and others it must not.
SPACES = st.sampled_from(
    [
        *["", "", "", "", " ", "  ", "\t", "\n", "\r\n", "\f", "\v", "\u00a0", "\u200b", "\u2007", "\u202f"],
        *["\u3000", "\ufeff", "\x85", "\u2028", "\x00"],
    ]
)
#: Combining marks, direction marks and joiners that may cling to a value.
MARKS = st.sampled_from(["", "", "", "", "", "\u0301", "\u200f", "\u200e", "\u202e", "\u200d", "\u0300\u0301"])
INTEGER_EDGES = [0, 1, 23, 24, 2**31 - 1, 2**31, 2**32, 2**63 - 1, 2**63, 2**64, 10**30, 10**100]


def other_digits(text: str, zero: int) -> str:
    """`text` with its ASCII digits written in the digit set starting at `zero`."""
    return "".join(chr(zero + int(ch)) if "0" <= ch <= "9" else ch for ch in text)


@st.composite
def integer_texts(draw: st.DrawFn) -> str:
    """Integers as text, well-formed or nearly: signs, zeros, exponents, fractions, separators, other scripts."""
    number = draw(
        st.one_of(st.integers(0, 40), st.integers(0, 2**70), st.sampled_from(INTEGER_EDGES), st.integers(-(2**70), -1))
    )
    sign, digits = ("-", str(number)[1:]) if number < 0 else ("", str(number))
    digits = draw(st.sampled_from(["", "", "", "0", "000", "0" * 30])) + digits
    form = draw(st.sampled_from(["plain"] * 6 + ["plus", "minus-zero", "exponent", "fraction", "dot", "separator"]))
    if form == "plus":
        sign = "+"
    elif form == "minus-zero":
        sign, digits = "-", "0"
    elif form == "exponent":
        digits += draw(st.sampled_from(["e", "E", "e+", "e-"])) + str(draw(st.integers(0, 400)))
    elif form == "fraction":
        digits += "." + draw(st.sampled_from(["0", "00", "5", "000001"]))
    elif form == "dot":
        digits += "."
    elif form == "separator" and len(digits) > 1:
        cut = draw(st.integers(1, len(digits) - 1))
        digits = digits[:cut] + draw(st.sampled_from([",", "_", " ", "'", "\u066c"])) + digits[cut:]
    text = sign + digits
    if draw(st.integers(0, 4)) == 0:
        text = other_digits(text, draw(st.sampled_from(OTHER_ZEROS)))
    return draw(SPACES) + draw(MARKS) + text + draw(MARKS) + draw(SPACES)


DATE_EDGES = [
    "9999-12-31",
    "9999-12-30",
    "9998-12-31",
    "0000-01-01",
    "0000-00-00",
    "0001-01-01",
    "2024-02-29",
    "2023-02-29",
    "2024-02-30",
    "1900-02-29",
    "2000-02-29",
    "2024-04-31",
    "2024-00-10",
    "2024-13-01",
]
DATE_SUFFIXES = ["", "", "", "", "T00:00:00", "T00:00:00.000", "T00:00:00.0", "T00:00:00.", "T00:00:00.001"]
DATE_SUFFIXES += ["T12:00:00", "T00:00:00Z", "T00:00:00+05:00", "T00:00:00.000-04:00", " 00:00:00", "T00:00"]
DATE_SUFFIXES += ["T24:00:00", "\n", " ", "T00:00:00\n", "T00:00:00.000\u0301"]


@st.composite
def date_texts(draw: st.DrawFn) -> str:
    """Calendar days as text: real ones (mostly near the dataset's years), impossible ones, edge years, other shapes."""
    shape = draw(st.sampled_from(["near"] * 3 + ["any", "edge", "parts", "unpadded", "slashes"]))
    if shape == "near":
        text = draw(st.dates(date(2009, 6, 1), date(2026, 6, 1))).isoformat()
    elif shape == "any":
        text = draw(st.dates()).isoformat()
    elif shape == "edge":
        text = draw(st.sampled_from(DATE_EDGES))
    else:
        year = draw(st.one_of(st.integers(0, 9999), st.sampled_from([0, 1, 1970, 2010, 2024, 9998, 9999, 10000])))
        month, day = draw(st.integers(0, 13)), draw(st.integers(0, 32))
        template = {"parts": "{:04d}-{:02d}-{:02d}", "unpadded": "{}-{}-{}", "slashes": "{:04d}/{:02d}/{:02d}"}
        text = template[shape].format(year, month, day)
    text += draw(st.sampled_from(DATE_SUFFIXES))
    if draw(st.integers(0, 6)) == 0:
        text = other_digits(text, draw(st.sampled_from(OTHER_ZEROS)))
    if draw(st.integers(0, 6)) == 0:
        text = draw(SPACES) + draw(MARKS) + text + draw(MARKS) + draw(SPACES)
    return text


DIRECTION_TEXTS = st.sampled_from(
    ["I", "O"] * 6 + ["i", "o", "I ", " O", "I\n", "\uff29", "\u0399", "IO", "", "N", "In"]
)
TIMESTAMP_TEXTS = st.one_of(
    st.datetimes(timezones=st.none()).map(lambda moment: moment.isoformat(timespec="milliseconds") + "Z"),
    date_texts(),
    st.sampled_from(["0000-01-01T00:00:00.000Z", "9999-12-31T23:59:59.999Z", "2024-01-01T23:59:60.000Z"]),
)
#: JSON values that are not strings: Socrata sends booleans (checkbox columns) and objects (location columns); Spark
#: reads any of them into a string column as its JSON text.
OTHER_JSON = st.one_of(
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.lists(st.integers(0, 9), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(0, 9), max_size=2),
)
ANY_TEXT = st.text(max_size=12)


def mostly(main: st.SearchStrategy[Any], *others: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """`main` three times in four, else one of `others`."""
    return st.integers(0, 3).flatmap(lambda n: main if n else st.one_of(*others))


#: What each upstream field's value is drawn from when it is fuzzed.
UPSTREAM_VALUES: dict[str, st.SearchStrategy[Any]] = {
    c.upstream: mostly(
        {"int": integer_texts(), "long": integer_texts(), "date": date_texts(), "timestamp": TIMESTAMP_TEXTS}.get(
            c.type, DIRECTION_TEXTS if c.name == "direction" else ANY_TEXT
        ),
        integer_texts(),
        date_texts(),
        ANY_TEXT,
        OTHER_JSON,
    )
    for c in contract.COLUMNS
}


def counts(low: int, high: int) -> st.SearchStrategy[str]:
    """Integers the contract accepts, with the leading zeros and ASCII whitespace it allows."""
    number = st.one_of(st.integers(low, min(high, low + 30)), st.integers(low, high))
    pad = st.sampled_from(["", "", "", " ", "\t", "\n", "\r\n "])
    return st.tuples(pad, st.sampled_from(["", "", "", "0", "000"]), number, pad).map(
        lambda parts: f"{parts[0]}{parts[1]}{parts[2]}{parts[3]}"
    )


#: What each upstream field's value is drawn from when it is not fuzzed: values the contract accepts, so that most
#: rows get past the first checks and every later check (and the differential) sees rows it decides.
VALID_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "plaza_id": counts(1, contract.INTEGER_MAX["int"]),
    "hour": counts(0, 23),
    "direction": st.sampled_from(contract.DIRECTIONS),
    "date": st.tuples(
        st.dates(date(2009, 6, 1), date(2026, 6, 1)), st.sampled_from(["", "T00:00:00.000", "T00:00:00"])
    ).map(lambda parts: parts[0].isoformat() + parts[1]),
    ":id": ANY_TEXT,
    ":updated_at": TIMESTAMP_TEXTS,
    **{c.upstream: counts(0, contract.INTEGER_MAX[c.type]) for c in contract.COLUMNS if c.name.startswith("vehicles")},
}
EXTRA_NAMES = st.one_of(
    st.sampled_from([":created_at", ":version", ":other", ":@computed_region_x", "vehicles_bus", "Remarks", ""]),
    st.sampled_from(["date ", "Plaza_ID", "plaza id", "é", "direction\u200b", "hour", "vehicles_cash"]),
    st.text(max_size=6),
)

#: One row as Socrata's JSON would hold it: (key, value) pairs in order, a key possibly given twice.
RawRow = list[tuple[str, Any]]


@st.composite
def raw_rows(draw: st.DrawFn) -> RawRow:
    """A row with up to three fields fuzzed (a value, null, or absent) and the others valid."""
    fuzzed = draw(st.sets(st.sampled_from(sorted(UPSTREAM_VALUES)), max_size=3))
    pairs: RawRow = []
    for upstream, values in UPSTREAM_VALUES.items():
        if upstream not in fuzzed:
            pairs.append((upstream, draw(VALID_VALUES[upstream])))
            continue
        presence = draw(st.sampled_from(["value"] * 4 + ["null", "absent"]))
        if presence != "absent":
            pairs.append((upstream, None if presence == "null" else draw(values)))
    pairs += draw(st.lists(st.tuples(EXTRA_NAMES, st.one_of(st.none(), ANY_TEXT, OTHER_JSON)), max_size=3))
    if pairs and draw(st.integers(0, 5)) == 0:  # a key given twice: JSON parsers keep the last one
        key = draw(st.sampled_from([k for k, _ in pairs]))
        pairs.append((key, draw(UPSTREAM_VALUES.get(key, ANY_TEXT))))
    return list(draw(st.permutations(pairs)))


@st.composite
def windows(draw: st.DrawFn) -> Window | None:
    kind = draw(st.sampled_from(["none", "none", "near", "near", "edge"]))
    if kind == "none":
        return None
    if kind == "edge":
        return draw(
            st.sampled_from(
                [
                    Window(start=date(9999, 12, 30), stop=date(9999, 12, 31)),
                    Window(start=date(1, 1, 1), stop=date(1, 1, 2)),
                    Window(start=date(2010, 1, 1), stop=date(9999, 12, 31)),
                ]
            )
        )
    days = st.dates(date(2009, 6, 1), date(2026, 6, 1))
    start, stop = sorted(draw(st.lists(days, min_size=2, max_size=2, unique=True)))
    return Window(start=start, stop=stop)


def page_json(page: list[RawRow]) -> bytes:
    """The JSON text of a page, keeping keys given twice."""
    dumps = orjson.dumps
    rows = [b"{" + b",".join(dumps(k) + b":" + dumps(v) for k, v in row) + b"}" for row in page]
    return b"[" + b",".join(rows) + b"]"


# ---- the reference: the contract read in plain Python, without regular expressions


def ref_text(value: object) -> str | None:
    """A raw value as a string column holds it: text as is, another JSON value as its JSON text (as Spark reads
    it), null as null."""
    if value is None or isinstance(value, str):
        return value
    return orjson.dumps(value).decode()


def ascii_digits(text: str) -> bool:
    return bool(text) and all("0" <= ch <= "9" for ch in text)


def ref_integer(text: str | None, column_type: str) -> tuple[int | None, str | None]:
    """(value, failed check kind): digits with ASCII spaces around, no larger than the column type holds."""
    if text is None:
        return None, None
    digits = text.strip(ASCII_SPACE)
    if not ascii_digits(digits):
        return None, "integer"
    value = int(digits)
    return (None, "fits") if value > contract.INTEGER_MAX[column_type] else (value, None)


def ref_date(text: str | None) -> date | None:
    """`YYYY-MM-DD`, optionally followed by a floating midnight `T00:00:00[.0…]`: an existing day of years 0001-9998
    (year 0 is no Python date, and a load records the days it touched stop-exclusive: 9999-12-31 has no stop)."""
    if text is None:
        return None
    head, tail = text[:10], text[10:]
    midnight = tail.startswith("T00:00:00") and (tail == "T00:00:00" or (tail[9:10] == "." and ascii_digits(tail[10:])))
    if tail and not (midnight and set(tail[10:]) <= {"0"}):
        return None
    if len(head) != 10 or head[4] != "-" or head[7] != "-":
        return None
    year, month, day = head[:4], head[5:7], head[8:]
    if not (ascii_digits(year) and ascii_digits(month) and ascii_digits(day)):
        return None
    try:
        typed = date(int(year), int(month), int(day))
    except ValueError:
        return None
    return typed if typed.year <= 9998 else None


def reference(row: dict[str, Any], schema: pa.Schema, window: Window | None) -> tuple[str | None, dict[str, Any]]:
    """The rejection reason of `row` (None: good) and its typed values (the version column left out), by walking
    the contract's CHECKS with plain Python."""
    upstream = {c.name: c.upstream for c in contract.COLUMNS}
    text = {name: ref_text(row.get(upstream.get(name, name))) for name in schema.names}
    typed: dict[str, Any] = dict(text)
    failed: dict[str, str | None] = {}
    for column in contract.INTEGER_COLUMNS:
        typed[column.name], failed[column.name] = ref_integer(text[column.name], column.type)
    typed["date"] = ref_date(text["date"])
    typed.pop(contract.VERSION)
    start, stop = (window.start, window.stop) if window else (None, None)
    for check in contract.CHECKS:
        raw, value = text[check.column], typed[check.column]
        if check.kind == "required":
            failing = raw is None
        elif check.kind in ("integer", "fits"):
            failing = failed[check.column] == check.kind
        elif check.kind == "between":
            failing = value is not None and not check.low <= value <= check.high  # type: ignore[operator]
        elif check.kind == "at_least":
            failing = value is not None and value < check.low  # type: ignore[operator]
        elif check.kind == "date":
            failing = raw is not None and value is None
        elif check.kind == "in_window":
            failing = window is not None and value is not None and not start <= value < stop  # type: ignore[operator]
        else:
            assert check.kind == "one_of"
            failing = raw not in check.values
        if failing:
            return check.reason_for(start, stop), typed
    return None, typed


def day_of(days: int | None) -> date | str | None:
    """A date32 value as a date, or a marker when Python has no such date (what a ledger could not record)."""
    if days is None:
        return None
    ordinal = EPOCH_ORDINAL + days
    return date.fromordinal(ordinal) if 1 <= ordinal <= date.max.toordinal() else f"no Python date: {days} days"


def typed_rows(good: pa.Table) -> list[dict[str, Any]]:
    """The good rows as Python values, without the version column and without failing on an impossible date."""
    columns: dict[str, list[Any]] = {}
    for field in good.schema:
        if field.name == contract.VERSION:
            continue
        column = good.column(field.name)
        if pa.types.is_date32(field.type):
            columns[field.name] = [day_of(d) for d in pc.cast(column, pa.int32()).to_pylist()]
        else:
            columns[field.name] = column.to_pylist()
    return [dict(zip(columns, values, strict=True)) for values in zip(*columns.values(), strict=True)]


def assert_holdable(good: pa.Table, window: Window | None) -> None:
    """Typing never accepts a value the table (and its ledger) cannot hold."""
    for column in contract.COLUMNS:
        if column.required:
            assert good.column(column.name).null_count == 0, f"a good row without {column.name}"
    for column in contract.INTEGER_COLUMNS:
        values = [v for v in good.column(column.name).to_pylist() if v is not None]
        assert all(0 <= v <= contract.INTEGER_MAX[column.type] for v in values), (column.name, values)
    assert all(0 <= h <= 23 for h in good.column("hour").to_pylist())
    assert all(p >= 1 for p in good.column("plaza_id").to_pylist())
    assert set(good.column("direction").to_pylist()) <= set(contract.DIRECTIONS)
    for days in pc.cast(good.column("date"), pa.int32()).to_pylist():
        day = day_of(days)
        assert isinstance(day, date), day
        # the load's touched days are recorded stop-exclusive (contract.encode_days, Window): the next day must exist
        assert day < date.max, day
        Window(start=day, stop=day + timedelta(days=1))
        if window is not None:
            assert window.start <= day < window.stop, (day, window)


def typed_page(page: list[RawRow], window: Window | None) -> None:
    body = page_json(page)
    rows = orjson.loads(body)  # as core.ingest.load_landing reads a landed page
    assert rows == [dict(row) for row in page]  # a key given twice: the last value counts (Spark's reader too)
    schema = target_schema(frozenset(key for row in rows for key in row))  # as the fetch records the columns

    out = convert(rows, schema, window)

    assert out.good.num_rows + len(out.rejected) == len(rows)
    assert out.good.schema == schema
    start, stop = (window.start, window.stop) if window else (None, None)
    reasons = {check.reason_for(start, stop) for check in contract.CHECKS}
    assert {r["reason"] for r in out.rejected} <= reasons
    assert_holdable(out.good, window)
    expected = [reference(row, schema, window) for row in rows]
    assert [(r["reason"], r["row"]) for r in out.rejected] == [
        (reason, row) for row, (reason, _) in zip(rows, expected, strict=True) if reason is not None
    ]
    assert typed_rows(out.good) == [typed for reason, typed in expected if reason is None]
    kinds = {check.reason_for(start, stop): f"{check.column}: {check.kind}" for check in contract.CHECKS}
    for kind in sorted({kinds[r["reason"]] for r in out.rejected}) or ["nothing rejected"]:
        event(f"rejected: {kind}" if kind != "nothing rejected" else kind)


def _row(**values: Any) -> RawRow:
    base = {
        "plaza_id": "1",
        "date": "2024-01-01T00:00:00.000",
        "hour": "5",
        "direction": "I",
        "vehicles_e_zpass": "100",
        ":id": "row-1",
        ":updated_at": "2026-01-01T00:00:00.000Z",
    }
    return list((base | values).items())


@given(page=st.lists(raw_rows(), max_size=12), window=windows())
# found while writing this fuzzer's edge dates (then by its differential): year 0000 was typed (date32 -719528), a
# day Python cannot hold, so a refresh's touched range (`pc.min_max(...).as_py()` locally, `.first()` on Spark) failed
# the whole load
@example(page=[_row(date="0000-01-01")], window=None)
# found by this fuzzer (profile fuzz): 9999-12-31 was typed, and a refresh touching it failed computing its
# stop-exclusive range (year 10000)
@example(page=[_row(date="9999-12-31T00:00:00")], window=None)
# found by this fuzzer: a value that is not a JSON string (a checkbox column's boolean) failed the whole page with
# ArrowTypeError, where Spark reads its JSON text
@example(page=[[*_row(), ("accessible", True)], _row(plaza_id=12)], window=None)
# digits of other scripts: int() reads them, the contract does not (RE2 and java.util.regex: [0-9] is ASCII only)
@example(page=[_row(plaza_id="\uff11\uff12", hour="\u0663", vehicles_e_zpass="\u00a012")], window=None)
def test_socrata_pages_type_into_values_the_table_can_hold_as_the_contract_says(
    page: list[RawRow], window: Window | None
) -> None:
    typed_page(page, window)


def test_digits_of_other_scripts_are_not_integers_though_python_reads_them() -> None:
    """The pyarrow typing (RE2) and the Spark typing (java.util.regex) share INTEGER_PATTERN, whose `[0-9]` is ASCII
    in both: a full-width or Arabic-Indic count is quarantined by either engine, not read as Python's int() would."""
    texts = ["\uff11\uff12", "\u0661\u0662", "\u06f1\u06f2", "\u0967\u0968", "\U0001d7cf\U0001d7d0"]
    assert [int(t) for t in texts] == [12] * len(texts)  # the trap
    rows = [dict(_row(vehicles_e_zpass=t)) for t in texts]
    out = convert(rows, target_schema(rows[0]))
    assert out.good.num_rows == 0
    assert {r["reason"] for r in out.rejected} == {"vehicles_e_zpass: not a non-negative integer"}


# =========================================================================== 2. automation and subscription YAML


class _Names:
    """A resolver that knows every block and deployment (compiling without a server)."""

    def block_document_id(self, type_slug: str, name: str) -> uuid.UUID:
        return uuid.uuid5(uuid.NAMESPACE_URL, f"block/{type_slug}/{name}")

    def deployment_id(self, name: str) -> uuid.UUID:
        return uuid.uuid5(uuid.NAMESPACE_URL, f"deployment/{name}")


SLUGS = st.from_regex(r"[a-z0-9][a-z0-9-]{0,15}", fullmatch=True)
PLAIN = st.text(st.characters(codec="ascii", categories=("L", "N")), min_size=1, max_size=12)
VERDICTS: tuple[str, ...] = QualityVerdict.__args__  # type: ignore[attr-defined]
CONDITION_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "mode": st.sampled_from(["refresh", "window"]),
    "already_committed": st.booleans(),
    "quality": st.sampled_from(VERDICTS),
}


@st.composite
def subscriptions(draw: st.DrawFn, name: str) -> dict[str, Any]:
    """One valid subscription."""
    sub: dict[str, Any] = {"name": name}
    if draw(st.booleans()):
        sub["description"] = draw(st.text(max_size=40).filter(lambda t: "${" not in t))
    if draw(st.booleans()):
        sub["enabled"] = draw(st.booleans())
    events = draw(st.lists(st.sampled_from(sorted(SUBSCRIBABLE_PAYLOADS)), min_size=1, max_size=3, unique=True))
    if draw(st.booleans()) or events != ["tollwatch.ingestion.completed"]:
        sub["events"] = events
    if draw(st.booleans()):
        sub["table"] = draw(st.from_regex(r"[A-Za-z0-9_]{1,10}\.[A-Za-z0-9_]{1,10}", fullmatch=True))
    common = [k for k in CONDITION_VALUES if all(k in SUBSCRIBABLE_PAYLOADS[e].model_fields for e in events)]
    when = {}
    for key in draw(st.lists(st.sampled_from(common), unique=True)) if common else []:
        values = CONDITION_VALUES[key]
        when[key] = draw(st.one_of(values, st.lists(values, min_size=1, max_size=2)))
    if when:
        sub["when"] = when
    kind = draw(st.sampled_from(["run-local-job", "run-databricks-job", "call-webhook"]))
    parameters = draw(
        st.dictionaries(
            PLAIN, st.one_of(st.integers(-5, 5), PLAIN, st.just("{{ event.payload.rows_written }}")), max_size=2
        )
    )
    if kind == "run-local-job":
        sub["action"] = {"type": kind, "job": draw(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,12}", fullmatch=True))}
        sub["action"] |= {"parameters": parameters} if parameters else {}
    elif kind == "run-databricks-job":
        sub["action"] = {"type": kind, "job_id": draw(st.integers(1, 2**53)), "parameters": parameters}
    else:
        sub["action"] = {"type": kind, "block": draw(SLUGS)}
        if draw(st.booleans()):
            sub["action"]["payload"] = draw(st.sampled_from(["{{ event | tojson }}", "done: {{ event.payload.mode }}"]))
    return sub


@st.composite
def subscription_files(draw: st.DrawFn, team: str) -> dict[str, Any]:
    names = draw(st.lists(SLUGS, min_size=1, max_size=3, unique=True))
    data: dict[str, Any] = {"team": team}
    if draw(st.booleans()):
        data["contact"] = draw(st.emails())
    data["subscriptions"] = [draw(subscriptions(name)) for name in names]
    return data


@st.composite
def automation_files(draw: st.DrawFn, name: str) -> dict[str, Any]:
    """One valid project automation, shaped like the shipped ones."""
    events = draw(st.lists(st.sampled_from(["tollwatch.ingestion.failed", "tollwatch.job.failed"]), min_size=1))
    actions = []
    for kind in draw(st.lists(st.sampled_from(["send-notification", "run-deployment", "do-nothing"]), min_size=1)):
        if kind == "send-notification":
            actions.append({"type": kind, "block": "custom-webhook/alerts", "subject": "x", "body": "{{ event.id }}"})
        elif kind == "run-deployment":
            actions.append({"type": kind, "deployment": "ingest/ingest", "parameters": {"start": "{{ event.id }}"}})
        else:
            actions.append({"type": kind})
    return {
        "name": name,
        "description": draw(st.text(max_size=30).filter(lambda t: "${" not in t)),
        "trigger": {
            "type": "event",
            "posture": "Reactive",
            "expect": sorted(set(events)),
            "match": {"prefect.resource.id": "iceberg.*"},
            "threshold": draw(st.integers(1, 5)),
            "within": draw(st.sampled_from([0, 60, "${TOLLWATCH_WITHIN_S:-3600}"])),
        },
        "actions": actions,
    }


@st.composite
def projects(draw: st.DrawFn) -> dict[str, dict[str, Any]]:
    """A valid automations/ directory: relative path → document."""
    files: dict[str, dict[str, Any]] = {}
    names = draw(st.lists(st.text(min_size=1, max_size=30).map(str.strip).filter(bool), max_size=2, unique=True))
    for index, name in enumerate(names):
        files[f"auto-{index}.yaml"] = draw(automation_files(f"auto-{index} {name}"))
    for team in draw(st.lists(SLUGS, min_size=0 if files else 1, max_size=2, unique=True)):
        files[f"subscriptions/{team}.yaml"] = draw(subscription_files(team))
    return files


def declared(files: dict[str, dict[str, Any]]) -> int:
    return sum(len(data["subscriptions"]) if "team" in data else 1 for data in files.values())


def write_project(root: Path, texts: dict[str, str]) -> None:
    (root / "subscriptions").mkdir(parents=True)
    for relative, text in texts.items():
        (root / relative).write_text(text, encoding="utf-8")


def dump(data: Any, *, unicode: bool = True) -> str:
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=unicode, width=float("inf"))


def load_outcome(texts: dict[str, str], environ: dict[str, str], tmp: Path) -> list[str] | int:
    """Load (and, if that succeeds, compile) a project of these files: the problem lines, or how many automations
    it compiled to. Anything but AutomationsConfigError fails the test."""
    with tempfile.TemporaryDirectory(dir=tmp) as directory:
        root = Path(directory) / "automations"
        write_project(root, texts)
        try:
            project = load_project(root, environ=environ)
        except AutomationsConfigError as exc:
            problems = list(exc.problems)
        else:
            automations = compile_project(project, _Names())
            for automation in automations:
                automation.model_dump_json()  # what `apply` sends: it must be JSON (valid UTF-8 included)
            return len(automations)
    sources = [f"automations/{relative}" for relative in texts]
    assert problems
    for line in problems:
        assert len(line.splitlines()) == 1, f"a problem spans lines: {line!r}"
        assert any(line.startswith(f"{source}: ") for source in sources), f"names no file: {line!r}"
        for tag in ("run-local-job", "run-databricks-job", "call-webhook"):
            assert f".{tag}." not in line.partition(": ")[2].partition(": ")[0], f"a union tag in a path: {line!r}"
        if "YAML syntax error" in line:
            assert " at line " in line, line
    return problems


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("automations")


@given(files=projects(), unicode=st.booleans(), within=st.sampled_from([{}, {"TOLLWATCH_WITHIN_S": "120"}]))
def test_valid_automation_files_load_and_compile(
    files: dict[str, dict[str, Any]], unicode: bool, within: dict[str, str], tmp: Path
) -> None:
    texts = {relative: dump(data, unicode=unicode) for relative, data in files.items()}
    assert load_outcome(texts, within, tmp) == declared(files)


# ---- mutations: each returns the new text and whether the file can no longer be valid


def _paths(node: Any, here: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [here]
    if isinstance(node, dict):
        for key, value in node.items():
            found += _paths(value, (*here, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += _paths(value, (*here, index))
    return found


def _replace(node: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    head, *rest = path
    copy = dict(node) if isinstance(node, dict) else list(node)
    copy[head] = _replace(node[head], tuple(rest), value) if rest else value
    return copy


def _nested(depth: int) -> Any:
    value: Any = "x"
    for level in range(depth):
        value = [value] if level % 2 else {"k": value}
    return value


WRONG_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from([0, -1, 2**80, 1.5, math.inf, math.nan, "", "x", [], {}]),
    st.text(min_size=200, max_size=400),  # huge, any unicode
    st.text(max_size=8),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=3),
    st.integers(1, 60).map(_nested),  # deep nesting, as data
    st.sampled_from(["${TOLLWATCH_X}", "${TOLLWATCH_X:-5}", "${HOME}", "${TOLLWATCH_X:-soon}", "${", "{{ event", "{%"]),
)


def bomb(levels: int, width: int) -> str:
    """A bounded alias bomb (width**levels values) as a flow sequence under anchors `&b0` … `&b<levels>`."""
    text = "&b0 [" + ", ".join(["lol"] * width) + "]"
    for level in range(1, levels + 1):
        text = f"[{text}, &b{level} [" + ", ".join([f"*b{level - 1}"] * width) + "]]"
    return text


#: Top-level keys the two formats know: a key outside these is an error in either.
KNOWN_KEYS = frozenset(AutomationFile.model_fields) | frozenset(SubscriptionFile.model_fields)
REQUIRED_KEYS = frozenset({"name", "trigger", "actions", "team", "subscriptions"})


def _templated(data: dict[str, Any], template: str) -> dict[str, Any]:
    """`data` with `template` where a template is expected: a webhook's payload, a notification's subject."""
    for path in _paths(data):
        node: Any = data
        for part in path:
            node = node[part]
        if isinstance(node, dict) and node.get("type") == "call-webhook":
            return _replace(data, (*path, "payload"), template)
        if isinstance(node, dict) and node.get("type") == "send-notification":
            return _replace(data, (*path, "subject"), template)
    return {**data, "description": template}


@st.composite
def mutated(draw: st.DrawFn, data: dict[str, Any]) -> tuple[str, bool]:
    """One mutation of a valid document: (the file's text, whether it can no longer be valid)."""
    kind = draw(
        st.sampled_from(
            [
                *["retype", "retype", "unknown-key", "drop-key", "rename", "tab", "duplicate-key", "not-a-mapping"],
                *["bomb", "cycle", "deep", "huge-number", "surrogate", "garbage", "template"],
            ]
        )
    )
    event(f"mutation: {kind}")
    top = list(data)
    if kind == "retype":
        path = draw(st.sampled_from(_paths(data)[1:]))
        return dump(_replace(data, path, draw(WRONG_VALUES))), False
    if kind == "unknown-key":
        key = draw(st.text(max_size=20).filter(lambda k: k not in KNOWN_KEYS))
        return dump({**data, key: draw(WRONG_VALUES)}), True
    if kind == "drop-key":
        key = draw(st.sampled_from(top))
        return dump({k: v for k, v in data.items() if k != key}), key in REQUIRED_KEYS
    if kind == "rename":
        key = "team" if "team" in data else "name"
        return dump({**data, key: draw(st.one_of(st.text(min_size=150, max_size=300), st.text(max_size=8)))}), False
    if kind == "template":  # Jinja nested up to hundreds of levels where a template is expected
        depth = draw(st.integers(1, 400))
        return dump(_templated(data, "{{ " + "(" * depth + "event.id" + ")" * depth + " }}")), False
    text = dump(data, unicode=draw(st.booleans()))
    lines = text.splitlines(keepends=True)
    if kind == "tab":
        index = draw(st.integers(0, len(lines) - 1))
        lines[index] = "\t" + lines[index].lstrip(" ")
        return "".join(lines), False
    if kind == "duplicate-key":
        return lines[0] + text, True
    if kind == "not-a-mapping":
        return draw(st.sampled_from(["- a\n- b\n", "42\n", "", "~\n", "'text'\n", "--- a\n--- b\n", "[{]\n"])), True
    if kind == "bomb":  # an unknown key holding up to 6**7 values through aliases
        value = bomb(draw(st.integers(1, 6)), draw(st.integers(2, 6)))
        return text + f"{draw(st.sampled_from(top))}_bomb: {value}\n", True
    if kind == "cycle":  # an alias inside the value it names
        key = draw(st.sampled_from(["extra", "contact" if "team" in data else "description"]))
        return text + f"{key}: " + draw(st.sampled_from(["&loop [1, *loop]", "&loop {a: *loop}"])) + "\n", True
    if kind == "deep":
        depth = draw(st.one_of(st.integers(1, 100), st.integers(100, 5000)))
        return text + f"{top[-1]}_deep: " + "[" * depth + "]" * depth + "\n", True
    if kind == "huge-number":
        digits = "9" * draw(st.integers(4000, 6000))
        return text.replace(f"{top[0]}:", f"{top[0]}: {digits}\nwas_{top[0]}:", 1), True
    if kind == "surrogate":  # a YAML escape that makes a string no UTF-8 text can hold
        return text + ('contact: "\\udfff"\n' if "team" in data else 'description: "\\ud800 lone"\n'), True
    position = draw(st.integers(0, len(text)))
    return text[:position] + draw(st.text(max_size=10)) + text[position:], False


@given(data=st.data(), environ=st.dictionaries(st.sampled_from(["TOLLWATCH_WITHIN_S", "TOLLWATCH_X"]), st.text()))
def test_mutated_automation_files_are_refused_with_their_file_named_never_crash(
    data: st.DataObject, environ: dict[str, str], tmp: Path
) -> None:
    files = data.draw(projects())
    target = data.draw(st.sampled_from(sorted(files)))
    texts = {relative: dump(document) for relative, document in files.items()}
    texts[target], invalid = data.draw(mutated(files[target]))
    environ = {k: v for k, v in environ.items() if "\x00" not in v}
    outcome = load_outcome(texts, environ, tmp)
    event("refused" if isinstance(outcome, list) else "loaded and compiled")
    if invalid:
        assert isinstance(outcome, list), f"{target} was accepted:\n{texts[target][:2000]}"
        assert any(line.startswith(f"automations/{target}: ") for line in outcome), outcome


SUBSCRIPTION = "team: t\nsubscriptions:\n  - name: x\n    action: {type: call-webhook, block: b}\n"
LOCAL_JOB = "team: t\nsubscriptions:\n  - name: x\n    action: {type: run-local-job, job: j, parameters: {}}\n"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        # Found by the mutation fuzzer (each raised something other than AutomationsConfigError): a recursive alias
        # (RecursionError), nesting PyYAML cannot read (RecursionError), a number past int()'s 4300 digits (ValueError)
        ("team: t\nsubscriptions: &a [*a]\n", "refers to a value that contains it"),
        (SUBSCRIPTION + "contact: &a {x: *a}\n", "refers to a value that contains it"),
        (SUBSCRIPTION + "x: " + "[" * 3000 + "]" * 3000 + "\n", "nested"),
        (SUBSCRIPTION + f"contact: {'9' * 5000}\n", "cannot read a number"),
        # found by it: a control character's ReaderError became a problem of two lines (and no line number) …
        ("\x1f" + SUBSCRIPTION, "YAML syntax error at line 1, column 1: character #x001f"),
        (SUBSCRIPTION + "contact: a\x07b\n", "YAML syntax error at line 5, column 11: character #x0007"),
        # … and so did a key holding a line break, written as it is
        (SUBSCRIPTION + '"a\\rb": 1\n', "t.yaml: ['a\\rb']: Extra inputs are not permitted"),
        # Found while writing its mutations: a value nested 300 levels, which PyYAML reads, failed Prefect's check on
        # pydantic's serialization depth (ValueError); an alias bomb was walked and copied value by value (9**6 here:
        # 1 s; 9**10 in 12 lines: most of an hour and gigabytes); a lone surrogate (a `\ud800` escape) was accepted and
        # compiled, then failed the apply's JSON encoding half-way through; a template nested 300 levels deep hit
        # RecursionError in Prefect's template check (Jinja's parser)
        (LOCAL_JOB.replace("{}", "{a: " + "[" * 300 + "]" * 300 + "}"), "nested"),
        (SUBSCRIPTION + "x: " + bomb(5, 9) + "\n", "more than"),
        (SUBSCRIPTION + 'contact: "\\ud800"\n', "not valid Unicode"),
        (SUBSCRIPTION.replace("block: b}", "block: b, payload: '{{ " + "(" * 300 + "1" + ")" * 300 + " }}'}"), "deep"),
        (
            SUBSCRIPTION.replace("block: b}", "block: b, payload: '" + "{% if 1 %}" * 300 + "{% endif %}" * 300 + "'}"),
            "deep",
        ),
    ],
)
def test_what_fuzzing_the_yaml_found_is_a_config_error_naming_the_file(text: str, problem: str, tmp: Path) -> None:
    problems = load_outcome({"subscriptions/t.yaml": text}, {}, tmp)
    assert isinstance(problems, list)
    assert any(line.startswith("automations/subscriptions/t.yaml: ") and problem in line for line in problems), problems


def test_a_huge_number_from_the_environment_is_a_config_error(tmp: Path) -> None:
    """Found probing the references: a `${TOLLWATCH_…}` whole number past int()'s 4300 digits raised ValueError."""
    text = SUBSCRIPTION.replace("block: b}", "block: b}\n    enabled: true") + "contact: x\n"
    automation = {
        "name": "a",
        "trigger": {"type": "event", "expect": ["x"], "within": "${TOLLWATCH_WITHIN_S}", "posture": "Reactive"},
        "actions": [{"type": "do-nothing"}],
    }
    problems = load_outcome(
        {"subscriptions/t.yaml": text, "a.yaml": dump(automation)}, {"TOLLWATCH_WITHIN_S": "9" * 5000}, tmp
    )
    assert isinstance(problems, list)
    assert any(line.startswith("automations/a.yaml: trigger.within: TOLLWATCH_WITHIN_S (") for line in problems), (
        problems
    )


def test_a_databricks_action_problem_names_the_field_as_written() -> None:
    """Found probing wrong types: `action.run-databricks-job.job_id`, a union tag in the path, for `action.job_id`."""
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory) / "automations"
        write_project(
            root,
            {
                "subscriptions/t.yaml": SUBSCRIPTION.replace(
                    "{type: call-webhook, block: b}", "{type: run-databricks-job, job_id: x}"
                )
            },
        )
        with pytest.raises(AutomationsConfigError) as raised:
            load_project(root, environ={})
    assert raised.value.problems[0].startswith("automations/subscriptions/t.yaml: subscriptions[0].action.job_id: ")


# =========================================================================== 3. backfill events → requests

SETTINGS = Settings.model_construct()
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | ANY_TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(ANY_TEXT, inner, max_size=3),
    max_leaves=6,
)
OFFSETS = st.sampled_from([None, UTC, timezone(timedelta(hours=5)), timezone(timedelta(hours=-4, minutes=-30))])
DAY_VALUES = st.one_of(
    st.dates().map(date.isoformat),
    st.dates(),  # the flow's typed parameters (`start: date | None`)
    st.builds(lambda moment, tz: moment.replace(tzinfo=tz).isoformat(), st.datetimes(), OFFSETS),
    st.builds(lambda day, tz: datetime(day.year, day.month, day.day, tzinfo=tz).isoformat(), st.dates(), OFFSETS),
    date_texts(),
    integer_texts(),
    st.integers(),
    st.floats(),
    JSON_VALUES,
)
TEXT_VALUES = st.one_of(st.text(max_size=30), JSON_VALUES)
PAYLOAD_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "domain": TEXT_VALUES,
    "dataset_id": TEXT_VALUES,
    "start": DAY_VALUES,
    "stop": DAY_VALUES,
    "request_id": TEXT_VALUES,
    "requested_by": TEXT_VALUES,
    "reason": TEXT_VALUES,
}
MISSING = object()


@st.composite
def payloads(draw: st.DrawFn) -> dict[str, Any]:
    """A `tollwatch.backfill.requested` payload: up to three fields fuzzed (or absent), sometimes an unknown one."""
    valid = draw(st.dates(max_value=date(9999, 12, 30)))
    stop = valid + timedelta(days=draw(st.integers(1, 400))) if valid < date(9998, 1, 1) else date(9999, 12, 31)
    payload: dict[str, Any] = {
        "domain": "data.ny.gov",
        "dataset_id": "qzve-kjga",
        "start": valid.isoformat(),
        "stop": stop.isoformat(),
        "request_id": str(draw(st.uuids())),
        "requested_by": "fuzz",
    }
    for name in draw(st.sets(st.sampled_from(sorted(PAYLOAD_FIELDS)), max_size=3)):
        value = draw(st.one_of(st.just(MISSING), PAYLOAD_FIELDS[name]))
        if value is MISSING:
            payload.pop(name, None)
        else:
            payload[name] = value
    if draw(st.integers(0, 6)) == 0:
        payload[draw(st.text(max_size=10))] = draw(JSON_VALUES)
    return payload


def ascii_day(value: Any) -> date | None:
    """The day a `YYYY-MM-DD` text or a date names (None when it is anything else)."""
    if isinstance(value, date) and not isinstance(value, datetime):
        return value
    if (
        isinstance(value, str)
        and len(value) == 10
        and value[4] == value[7] == "-"
        and ascii_digits(value.replace("-", ""))
    ):
        try:
            return date.fromisoformat(value)
        except ValueError:
            return None
    return None


def assert_clean(call: Callable[[], Any]) -> Any:
    """The call's result, or None when it raised exactly ValueError or pydantic's ValidationError."""
    try:
        return call()
    except (ValueError, ValidationError) as exc:
        if type(exc) in (ValueError, ValidationError):
            return None
        raise AssertionError(f"{type(exc).__name__}: {exc}") from exc


@given(payload=payloads())
def test_a_backfill_payload_is_a_valid_request_or_a_validation_error(payload: dict[str, Any]) -> None:
    requested = assert_clean(lambda: BackfillRequested.model_validate(payload))
    event("valid" if requested else "refused")
    if requested is None:
        return
    assert requested.stop > requested.start
    assert requested.window == Window(start=requested.start, stop=requested.stop)
    for name in ("start", "stop"):
        day = ascii_day(payload[name])
        assert day is None or getattr(requested, name) == day
    envelope = TollwatchEvent.of(requested)  # what is emitted …
    assert BackfillRequested.model_validate(envelope.payload) == requested  # … is what a consumer reads back
    assert envelope.id == requested.event_id() == TollwatchEvent.of(BackfillRequested(**requested.model_dump())).id


ROWS_UPDATED_AT = st.one_of(st.integers(0, 2**40), st.integers(0, 2**40).map(str), integer_texts(), JSON_VALUES)
REFRESH_PARAMETERS = st.one_of(
    st.just({}),
    st.fixed_dictionaries({"rows_updated_at": ROWS_UPDATED_AT}, optional={"previous_rows_updated_at": ROWS_UPDATED_AT}),
)


@given(
    payload=payloads(),
    missing=st.sampled_from([MISSING, None, ""]),
    refresh=REFRESH_PARAMETERS,
    backfill=st.booleans(),
)
# found by this fuzzer: a parameter left out raised KeyError; found probing its refresh values: `int(rows_updated_at)`
# raised TypeError for a list and OverflowError for infinity, cut 1.5 to 1 and read Arabic-Indic digits, all of which
# the flow's own signature (pydantic) refuses
@example(payload={"start": "2024-01-01"}, missing=MISSING, refresh={}, backfill=True)
@example(payload={"stop": "2024-01-01"}, missing=MISSING, refresh={}, backfill=True)
@example(payload={}, missing=MISSING, refresh={"rows_updated_at": [1]}, backfill=False)
@example(payload={}, missing=MISSING, refresh={"rows_updated_at": math.inf}, backfill=False)
@example(payload={}, missing=MISSING, refresh={"rows_updated_at": 1.5}, backfill=False)
@example(payload={}, missing=MISSING, refresh={"rows_updated_at": "\u0661\u0662"}, backfill=False)
def test_the_deployment_trigger_parameters_build_a_window_request_or_a_clean_error(
    payload: dict[str, Any], missing: Any, refresh: dict[str, Any], backfill: bool
) -> None:
    """prefect.yaml's backfill trigger passes `{{ event.payload.start }}`, `stop` and `request_id` (single
    expressions keep their JSON type); a field the payload lacks arrives as null or empty text, or not at all to a
    direct caller. The refresh trigger passes `rows_updated_at` (and the previous one) the same way."""
    parameters: dict[str, Any] = dict(refresh)
    for name in ("start", "stop", "request_id") if backfill else ():
        value = payload.get(name, missing)
        if value is not MISSING:
            parameters[name] = value
    request = assert_clean(lambda: build_request(SETTINGS, parameters))
    event(f"{request.mode} request" if request else "refused")
    if request is None:
        return
    if request.mode == "window":
        assert request.window is not None
        assert request.window.stop > request.window.start
        for name in ("start", "stop"):
            day = ascii_day(parameters[name])
            assert day is None or getattr(request.window, name) == day
        expected = BackfillRequested(
            domain=SETTINGS.upstream_domain,
            dataset_id=SETTINGS.upstream_dataset_id,
            start=request.window.start,
            stop=request.window.stop,
            request_id=parameters.get("request_id") or "manual",
        )
        assert request.refresh_id == expected.refresh_id
        return
    given_value = parameters["rows_updated_at"]
    assert isinstance(request.rows_updated_at, int)
    assert not isinstance(given_value, list | dict)
    if isinstance(given_value, float):
        assert given_value == request.rows_updated_at  # never a cut fraction
    if isinstance(given_value, str):  # no digit of another script read as a number
        assert all(ch.isascii() for ch in given_value if ch.isdigit()), (
            f"{given_value!r} read as {request.rows_updated_at}"
        )
