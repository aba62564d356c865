"""The sample downstream job `daily_totals` on a real pyiceberg SQL catalog on disk (no Prefect, no Azurite).

Bronze is seeded through the same `IcebergTableStore.commit_window` the ingest flow uses, from the synthetic
rows the mirror serves; expected totals are computed independently, row by row, from those raw rows.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import date, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from pydantic import ValidationError

from tollwatch import resources
from tollwatch.contract.events import Window
from tollwatch.contract.settings import Settings, load_settings
from tollwatch.core.schema import base_schema, convert
from tollwatch.core.table import REFRESH_ID, WINDOW, IcebergTableStore
from tollwatch.downstream import LOCAL_JOBS, UnknownJobError, UpstreamNotFoundError, UpstreamRef, local_job
from tollwatch.downstream.daily_totals import GROUP, aggregate, daily_totals, output_schema
from tollwatch.downstream.models import UPSTREAM_REFRESH_ID, UPSTREAM_SNAPSHOT_ID, UPSTREAM_TABLE
from tollwatch_dev.synthetic import ROWS_PER_DAY, SyntheticTable

DAY1, DAY2, DAY3 = date(2024, 1, 1), date(2024, 1, 2), date(2024, 1, 3)
THREE_DAYS = Window(start=DAY1, stop=DAY3 + timedelta(days=1))
GROUPS_PER_DAY = 11 * 2  # plazas x directions

Raw = list[dict[str, str]]


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Default table names, with a catalog and warehouse of this test's own."""
    monkeypatch.setenv("TOLLWATCH_WAREHOUSE_DIR", str(tmp_path / "warehouse"))
    for name in ("TOLLWATCH_CATALOG_PROPERTIES", "TOLLWATCH_TABLE", "TOLLWATCH_DAILY_TOTALS_TABLE"):
        monkeypatch.delenv(name, raising=False)
    return load_settings()


# ------------------------------------------------------------------------------------------------ helpers


def raw_rows(*days: date, seed: int = 42, cash_until: date | None = None) -> Raw:
    """The mirror's all-string rows for whole days (a different seed = a republished day with new counts)."""
    synthetic = SyntheticTable(start=DAY1, seed=seed, cash_until=cash_until)
    rows: Raw = []
    for day in days:
        first = synthetic.seq_of(day, 1, 0, "I")
        rows += synthetic.rows(first, first + ROWS_PER_DAY)
    return rows


def bronze(settings: Settings) -> IcebergTableStore:
    return resources.table_store(settings)


def load(settings: Settings, window: Window, rows: Raw, refresh_id: str) -> int:
    """Replace `window` in bronze with `rows`, as the ingest flow does; returns the bronze snapshot id."""
    batch = convert(rows, base_schema()).good
    properties = {REFRESH_ID: refresh_id, WINDOW: f"{window.start}/{window.stop}"}
    months = pc.strftime(batch["date"], format="%Y-%m")
    parts = [(month, batch.filter(pc.equal(months, month))) for month in pc.unique(months).to_pylist()]
    # fetched "now": every row stored before is older than this load, so the window is replaced
    return bronze(settings).commit_window(window, parts, base_schema(), properties, fetched_through=2**31)


def run(settings: Settings, window: Window, snapshot_id: int | None = None, refresh_id: str = "r"):
    upstream = UpstreamRef(table=settings.table, snapshot_id=snapshot_id, refresh_id=refresh_id)
    return daily_totals(settings, window, upstream)


def silver(settings: Settings) -> pa.Table:
    table = resources.table_store(settings, settings.daily_totals_table).table()
    assert table is not None
    return table.scan().to_arrow().sort_by([(name, "ascending") for name in GROUP])


def of_day(rows: pa.Table, day: date) -> pa.Table:
    return rows.filter(pc.equal(rows["date"], pa.scalar(day, pa.date32())))


def expected(rows: Raw, day: date, plaza_id: int, direction: str) -> dict[str, object]:
    """The totals of one group, summed in plain Python from the raw rows (the oracle)."""
    group = [
        r
        for r in rows
        if r["date"].startswith(day.isoformat()) and r["plaza_id"] == str(plaza_id) and r["direction"] == direction
    ]

    def total(column: str) -> int | None:
        values = [int(r[column]) for r in group if column in r]
        return sum(values) if values else None

    sums = {c: total(c) for c in ("vehicles_e_zpass", "vehicles_vtoll", "vehicles_cash")}
    return {
        "date": day,
        "plaza_id": plaza_id,
        "direction": direction,
        **sums,
        "vehicles_total": sum(v or 0 for v in sums.values()),
        "hours": len(group),
    }


def row_of(rows: pa.Table, day: date, plaza_id: int, direction: str) -> Mapping[str, object]:
    found = [r for r in rows.to_pylist() if (r["date"], r["plaza_id"], r["direction"]) == (day, plaza_id, direction)]
    assert len(found) == 1, f"expected one row for {day} {plaza_id} {direction}, got {found}"
    return found[0]


# ------------------------------------------------------------------------------------------------ tests


def test_totals_equal_hand_computed_sums(settings: Settings):
    rows = raw_rows(DAY1, DAY2, DAY3)
    load(settings, THREE_DAYS, rows, "r1")

    result = run(settings, THREE_DAYS)

    out = silver(settings)
    assert result.job == "daily_totals"
    assert result.table == "silver.bnt_daily_totals"
    assert result.rows_written == out.num_rows == 3 * GROUPS_PER_DAY
    assert result.days_replaced == 3
    assert result.window == THREE_DAYS
    assert out.schema.names == output_schema().names
    assert set(out["hours"].to_pylist()) == {24}
    for day, plaza_id, direction in [(DAY1, 1, "I"), (DAY2, 7, "O"), (DAY3, 11, "I")]:
        assert row_of(out, day, plaza_id, direction) == expected(rows, day, plaza_id, direction)


def test_second_run_on_the_same_window_gives_an_identical_table(settings: Settings):
    load(settings, THREE_DAYS, raw_rows(DAY1, DAY2, DAY3), "r1")

    first = run(settings, THREE_DAYS)
    after_first = silver(settings)
    second = run(settings, THREE_DAYS)

    assert second.snapshot_id != first.snapshot_id
    assert silver(settings).equals(after_first)
    assert second.rows_written == first.rows_written == after_first.num_rows


def test_a_changed_bronze_day_changes_only_that_day(settings: Settings):
    load(settings, THREE_DAYS, raw_rows(DAY1, DAY2, DAY3), "r1")
    run(settings, THREE_DAYS)
    before = silver(settings)
    republished = raw_rows(DAY2, seed=7)
    day2 = Window(start=DAY2, stop=DAY3)
    snapshot_id = load(settings, day2, republished, "r2")

    run(settings, day2, snapshot_id=snapshot_id, refresh_id="r2")

    after = silver(settings)
    assert after.num_rows == before.num_rows
    for day in (DAY1, DAY3):
        assert of_day(after, day).equals(of_day(before, day))
    assert not of_day(after, DAY2).equals(of_day(before, DAY2))
    assert row_of(after, DAY2, 4, "O") == expected(republished, DAY2, 4, "O")


def test_a_day_gone_from_bronze_is_removed_from_silver(settings: Settings):
    load(settings, THREE_DAYS, raw_rows(DAY1, DAY2, DAY3), "r1")
    run(settings, THREE_DAYS)
    before = silver(settings)
    load(settings, Window(start=DAY2, stop=DAY3), [], "r2")  # upstream withdrew day 2

    result = run(settings, THREE_DAYS)

    after = silver(settings)
    assert result.rows_written == 2 * GROUPS_PER_DAY
    assert of_day(after, DAY2).num_rows == 0
    for day in (DAY1, DAY3):
        assert of_day(after, day).equals(of_day(before, day))


def test_reads_the_upstream_snapshot_it_is_given(settings: Settings):
    original = raw_rows(DAY1, DAY2, DAY3)
    first_load = load(settings, THREE_DAYS, original, "r1")
    load(settings, Window(start=DAY2, stop=DAY3), raw_rows(DAY2, seed=7), "r2")  # a later load

    run(settings, THREE_DAYS, snapshot_id=first_load, refresh_id="r1")

    table = resources.table_store(settings, settings.daily_totals_table).table()
    assert table is not None
    assert table.current_snapshot().summary[UPSTREAM_SNAPSHOT_ID] == str(first_load)
    assert row_of(silver(settings), DAY2, 4, "O") == expected(original, DAY2, 4, "O")


def test_snapshot_summary_records_the_upstream(settings: Settings):
    snapshot_id = load(settings, THREE_DAYS, raw_rows(DAY1, DAY2, DAY3), "r1")

    result = run(settings, THREE_DAYS, snapshot_id=snapshot_id, refresh_id="refresh-1")

    table = resources.table_store(settings, settings.daily_totals_table).table()
    assert table is not None
    snapshot = table.current_snapshot()
    assert snapshot is not None
    assert snapshot.snapshot_id == result.snapshot_id
    summary = snapshot.summary
    assert summary[UPSTREAM_SNAPSHOT_ID] == str(snapshot_id)
    assert summary[UPSTREAM_REFRESH_ID] == "refresh-1"
    assert summary[UPSTREAM_TABLE] == settings.table
    assert summary[WINDOW] == "2024-01-01/2024-01-04"


def test_without_a_snapshot_id_the_current_one_is_read_and_recorded(settings: Settings):
    load(settings, THREE_DAYS, raw_rows(DAY1, DAY2, DAY3), "r1")
    current = load(settings, Window(start=DAY2, stop=DAY3), raw_rows(DAY2, seed=7), "r2")

    run(settings, THREE_DAYS)

    table = resources.table_store(settings, settings.daily_totals_table).table()
    assert table is not None
    assert table.current_snapshot().summary[UPSTREAM_SNAPSHOT_ID] == str(current)


def test_output_table_is_created_partitioned_by_month(settings: Settings):
    load(settings, THREE_DAYS, raw_rows(DAY1), "r1")

    run(settings, THREE_DAYS)

    table = resources.table_store(settings, settings.daily_totals_table).table()
    assert table is not None
    assert [(f.name, str(f.transform)) for f in table.spec().fields] == [("date_month", "month")]


def test_output_identifier_comes_from_the_setting(settings: Settings, monkeypatch: pytest.MonkeyPatch):
    load(settings, THREE_DAYS, raw_rows(DAY1), "r1")
    monkeypatch.setenv("TOLLWATCH_DAILY_TOTALS_TABLE", "gold.daily")
    custom = load_settings()

    result = run(custom, THREE_DAYS)

    assert result.table == "gold.daily"
    assert silver(custom).num_rows == GROUPS_PER_DAY


def test_output_table_cannot_be_the_bronze_table(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("TOLLWATCH_DAILY_TOTALS_TABLE", "bronze.bnt_traffic_hourly")
    monkeypatch.delenv("TOLLWATCH_TABLE", raising=False)

    with pytest.raises(ValidationError, match="must differ"):
        load_settings()


def test_renamed_count_column_sums_stay_null_when_never_reported(settings: Settings):
    rows = raw_rows(DAY1, DAY2, cash_until=DAY2)  # day 1 reports vehicles_cash, day 2 vehicles_vtoll
    load(settings, THREE_DAYS, rows, "r1")

    run(settings, THREE_DAYS)

    out = silver(settings)
    day1, day2 = row_of(out, DAY1, 2, "I"), row_of(out, DAY2, 2, "I")
    assert day1["vehicles_vtoll"] is None
    assert day2["vehicles_cash"] is None
    assert day1 == expected(rows, DAY1, 2, "I")
    assert day2 == expected(rows, DAY2, 2, "I")


def test_aggregate_counts_nulls_as_zero_only_in_the_total():
    hourly = pa.table(
        {
            "date": pa.array([DAY1, DAY1, DAY1], pa.date32()),
            "plaza_id": pa.array([5, 5, 6], pa.int32()),
            "direction": ["I", "I", "O"],
            "vehicles_e_zpass": pa.array([100, 50, 10], pa.int64()),
            "vehicles_vtoll": pa.array([5, None, None], pa.int64()),
        }
    )

    out = aggregate(hourly).to_pylist()

    assert out == [
        {
            "date": DAY1,
            "plaza_id": 5,
            "direction": "I",
            "vehicles_e_zpass": 150,
            "vehicles_vtoll": 5,
            "vehicles_cash": None,
            "vehicles_total": 155,
            "hours": 2,
        },
        {
            "date": DAY1,
            "plaza_id": 6,
            "direction": "O",
            "vehicles_e_zpass": 10,
            "vehicles_vtoll": None,
            "vehicles_cash": None,
            "vehicles_total": 10,
            "hours": 1,
        },
    ]


def test_unknown_upstream_snapshot_is_an_error_not_an_empty_read(settings: Settings):
    load(settings, THREE_DAYS, raw_rows(DAY1), "r1")

    with pytest.raises(UpstreamNotFoundError, match="snapshot 12345"):
        run(settings, THREE_DAYS, snapshot_id=12345)


def test_missing_upstream_table_is_an_error(settings: Settings):
    with pytest.raises(UpstreamNotFoundError, match="does not exist"):
        run(settings, THREE_DAYS)


def test_upstream_must_be_the_table_the_job_reads(settings: Settings):
    upstream = UpstreamRef(table="bronze.other", snapshot_id=None, refresh_id="r")

    with pytest.raises(ValueError, match=r"bronze\.other"):
        daily_totals(settings, THREE_DAYS, upstream)


def test_jobs_are_looked_up_by_name():
    assert local_job("daily_totals") is daily_totals
    assert set(LOCAL_JOBS) == {"daily_totals"}


def test_unknown_job_name_lists_the_known_ones():
    with pytest.raises(UnknownJobError, match="known jobs: daily_totals") as caught:
        local_job("daily_total")

    assert isinstance(caught.value, ValueError)
    assert "'daily_total'" in str(caught.value)
