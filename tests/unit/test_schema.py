"""Typed conversion of Socrata's all-string rows: good rows typed, bad rows quarantined with a reason."""

from __future__ import annotations

from datetime import date

import pyarrow as pa

from tollwatch.core.schema import convert, dedupe_on_key, target_schema


def row(**overrides):
    base = {
        "plaza_id": "1",
        "date": "2024-01-01T00:00:00.000",
        "hour": "5",
        "direction": "I",
        "vehicles_e_zpass": "100",
        "vehicles_vtoll": "7",
        ":id": "row-1",
        ":updated_at": "2026-01-01T00:00:00.000Z",
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def test_good_rows_are_typed():
    rows = [row()]
    out = convert(rows, target_schema(rows[0]))
    assert out.rejected == []
    got = out.good.to_pylist()[0]
    assert got["plaza_id"] == 1
    assert got["date"] == date(2024, 1, 1)
    assert got["hour"] == 5
    assert got["vehicles_e_zpass"] == 100
    assert got["vehicles_vtoll"] == 7
    assert got["vehicles_cash"] is None
    assert got["source_row_id"] == "row-1"
    assert out.good.schema.field("plaza_id").type == pa.int32()


def test_each_kind_of_bad_row_is_rejected_with_its_reason():
    rows = [
        row(date="2024-13-45"),
        row(date=None),
        row(hour="24"),
        row(direction="N"),
        row(vehicles_e_zpass="-1"),
        row(vehicles_e_zpass="12.5"),
        row(vehicles_vtoll="abc"),
        row(plaza_id="0"),
        row(),
    ]
    out = convert(rows, target_schema({k for r in rows for k in r}))
    assert [r["reason"] for r in out.rejected] == [
        "date: not a YYYY-MM-DD date",
        "date: missing",
        "hour: not 0-23",
        "direction: not I or O",
        "vehicles_e_zpass: not a non-negative integer",
        "vehicles_e_zpass: not a non-negative integer",
        "vehicles_vtoll: not a non-negative integer",
        "plaza_id: must be >= 1",
    ]
    assert out.good.num_rows == 1
    assert out.rejected[0]["row"]["date"] == "2024-13-45"  # the raw row is kept for the quarantine


def test_unknown_columns_are_kept_as_text_and_missing_optional_ones_become_null():
    rows = [row(vehicles_vtoll=None, vehicles_cash="3", vehicles_bus="9")]
    schema = target_schema(rows[0])
    out = convert(rows, schema)
    got = out.good.to_pylist()[0]
    assert got["vehicles_bus"] == "9"
    assert got["vehicles_cash"] == 3
    assert got["vehicles_vtoll"] is None


def test_dedupe_keeps_the_latest_version_of_a_key():
    rows = [row(vehicles_e_zpass="1", **{":id": "row-1"}), row(hour="6"), row(vehicles_e_zpass="2", **{":id": "row-9"})]
    out = convert(rows, target_schema(rows[0]))
    deduped = dedupe_on_key(out.good).to_pylist()
    assert [(r["hour"], r["vehicles_e_zpass"]) for r in deduped] == [(6, 100), (5, 2)]


def test_numbers_too_large_for_their_column_are_quarantined_not_fatal():
    """One absurd value must not fail a whole load (it used to raise in the cast)."""
    rows = [
        row(hour="99999999999"),
        row(vehicles_e_zpass="9223372036854775808"),
        row(plaza_id="2147483648"),
        row(plaza_id="2147483647", vehicles_e_zpass="09223372036854775807"),
    ]
    out = convert(rows, target_schema(rows[0]))
    reasons = sorted(r["reason"] for r in out.rejected)
    assert reasons == ["hour: out of range", "plaza_id: out of range", "vehicles_e_zpass: out of range"]
    assert out.good.to_pylist()[0]["vehicles_e_zpass"] == 2**63 - 1
