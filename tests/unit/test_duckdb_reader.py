# ruff: noqa: S608  (SQL is built from `scan_sql`, which quotes the location, and constants)
"""DuckDB reads tollwatch's Iceberg table offline, and agrees with pyiceberg about what is in it.

The table is written by tollwatch's own writer (`IcebergTableStore`, the `local` engine) on a pyiceberg SQL catalog
in a temp dir: a full load of January-February 2024, a window reload of February that drops a plaza and corrects the
rest (whole-partition overwrite), and a refresh that merges two January days (data files rewritten inside a
partition). pyiceberg writes no delete files (its deletes are copy-on-write), so what DuckDB must honour is the
manifests' DELETED entries and the snapshot the metadata file names: a reader that read every data file ever
written, or an older snapshot, gets other totals. The expected numbers are worked out by hand below.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest

from tests.support import duckdb_iceberg
from tests.support.duckdb_iceberg import Totals, arrow_totals, connect, read_table, scan_sql, totals
from tollwatch.contract.events import Window
from tollwatch.core.schema import base_schema, target_schema
from tollwatch.core.table import REFRESH_ID, IcebergTableStore

JAN, FEB, MAR = date(2024, 1, 1), date(2024, 2, 1), date(2024, 3, 1)
PLAZAS, HOURS, DIRECTIONS = (1, 2), (7, 17), ("I", "O")
V1 = datetime(2024, 3, 1, tzinfo=UTC)  # the full load's upstream version
V2 = datetime(2024, 3, 5, tzinfo=UTC)  # February republished
V3 = datetime(2024, 3, 9, tzinfo=UTC)  # a refresh of two January days
MERGED_DAYS = (date(2024, 1, 10), date(2024, 1, 11))

Row = dict[str, object]


def days(start: date, stop: date) -> list[date]:
    return [start + timedelta(days=i) for i in range((stop - start).days)]


def row(plaza: int, day: date, hour: int, direction: str, e_zpass: int, vtoll: int | None, version: datetime) -> Row:
    return {
        "plaza_id": plaza,
        "date": day,
        "hour": hour,
        "direction": direction,
        "vehicles_e_zpass": e_zpass,
        "vehicles_vtoll": vtoll,
        "vehicles_cash": None,
        "source_row_id": f"row-{plaza}-{day}-{hour}-{direction}",
        "source_updated_at": version,
    }


def upstream(span: list[date], plazas: tuple[int, ...], version: datetime, bump: int = 0) -> list[Row]:
    """Rows of `span`: e_zpass = plaza*1000 + hour*10 + day-of-month (+ bump); vtoll = plaza*100 + hour, except
    outbound at 17h (null: the sum must coalesce)."""
    return [
        row(
            plaza,
            day,
            hour,
            direction,
            plaza * 1000 + hour * 10 + day.day + bump,
            None if (direction, hour) == ("O", 17) else plaza * 100 + hour,
            version,
        )
        for day in span
        for plaza in plazas
        for hour in HOURS
        for direction in DIRECTIONS
    ]


def arrow(rows: list[Row], schema: pa.Schema | None = None) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=schema or base_schema())


def month_of(rows: list[Row]) -> list[tuple[str, pa.Table]]:
    months = sorted({f"{r['date']:%Y-%m}" for r in rows})
    return [(m, arrow([r for r in rows if f"{r['date']:%Y-%m}" == m])) for m in months]


def epoch(moment: datetime) -> int:
    return int(moment.timestamp())


@pytest.fixture
def store(tmp_path: Path) -> IcebergTableStore:
    """tollwatch's writer on a pyiceberg SQL catalog (SQLite) with a `file://` warehouse of this test's own."""
    return IcebergTableStore.from_properties(
        "tollwatch",
        {"type": "sql", "uri": f"sqlite:///{tmp_path}/catalog.db", "warehouse": tmp_path.as_uri()},
        "bronze.bnt_traffic_hourly",
    )


@pytest.fixture
def conn() -> Iterator[duckdb.DuckDBPyConnection]:
    connection = connect()
    try:
        yield connection
    finally:
        connection.close()


def metadata_location(store: IcebergTableStore) -> str:
    """The table's current metadata file, as the catalog reports it now (a `file://` URI)."""
    return store.catalog.load_table(store.identifier).metadata_location


def pyiceberg_totals(store: IcebergTableStore) -> Totals:
    return arrow_totals(store.catalog.load_table(store.identifier).scan().to_arrow())


def load_three_commits(store: IcebergTableStore) -> str:
    """Full load, February reload, January refresh; returns the metadata file as it was after the full load."""
    full = upstream(days(JAN, MAR), PLAZAS, V1)
    store.commit_window(
        Window(start=JAN, stop=MAR), month_of(full), base_schema(), {REFRESH_ID: "full"}, fetched_through=epoch(V1)
    )
    after_full = metadata_location(store)
    # February republished: plaza 2 gone upstream, plaza 1 corrected (+1).
    february = upstream(days(FEB, MAR), (1,), V2, bump=1)
    store.commit_window(
        Window(start=FEB, stop=MAR), month_of(february), base_schema(), {REFRESH_ID: "feb"}, fetched_through=epoch(V2)
    )
    # A refresh of two January days: plaza 1 at 7h corrected (+100), one new key (plaza 1, Jan 10, 12h, inbound).
    corrected = [
        {**r, "vehicles_e_zpass": int(r["vehicles_e_zpass"]) + 100, "source_updated_at": V3}
        for r in upstream(list(MERGED_DAYS), (1,), V1)
        if r["hour"] == 7
    ]
    new_key = row(1, MERGED_DAYS[0], 12, "I", 1000 + 120 + 10, None, V3)
    store.commit_merge(month_of([*corrected, new_key]), base_schema(), {REFRESH_ID: "refresh"}, through=epoch(V3))
    return after_full


#: By hand. Full load, per day: 8 rows; e_zpass = 2 directions x [(1000+2000)x2 hours + (70+170)x2 plazas + 4xday]
#: = 12960 + 8xday; vtoll (3 non-null per plaza) = (300+31) + (600+31) = 962.
#: After the February reload: 4 rows a day, e_zpass = 2 x (2000 + 240 + 2xday + 2) = 4484 + 4xday, vtoll = 331.
#: After the refresh: +2 rows x 100 on each merged day, one more row (e_zpass 1130, vtoll null) on January 10.
FULL = Totals(
    rows=60 * 8,
    distinct_keys=60 * 8,
    vehicles_e_zpass=sum(12960 + 8 * d.day for d in days(JAN, MAR)),  # 405728 + 379320 = 785048
    vehicles_vtoll=60 * 962,
    rows_per_day=dict.fromkeys(days(JAN, MAR), 8),
)
CURRENT = Totals(
    rows=31 * 8 + 1 + 29 * 4,
    distinct_keys=31 * 8 + 1 + 29 * 4,
    vehicles_e_zpass=405728 + 131776 + 2 * 200 + 1130,
    vehicles_vtoll=31 * 962 + 29 * 331,
    rows_per_day={**dict.fromkeys(days(JAN, FEB), 8), MERGED_DAYS[0]: 9, **dict.fromkeys(days(FEB, MAR), 4)},
)


def test_connect_loads_the_three_extensions_from_their_wheels_with_autoinstall_and_autoload_off(
    conn: duckdb.DuckDBPyConnection,
) -> None:
    settings = conn.sql(
        "SELECT current_setting('autoinstall_known_extensions'), current_setting('autoload_known_extensions')"
    ).fetchone()
    assert settings == (False, False)
    state = dict(
        conn.sql(
            "SELECT extension_name, loaded FROM duckdb_extensions() "
            "WHERE extension_name IN ('parquet', 'avro', 'iceberg')"
        ).fetchall()
    )
    assert state == {"parquet": True, "avro": True, "iceberg": True}
    for name in duckdb_iceberg.EXTENSIONS:
        path = duckdb_iceberg.extension_path(name)
        assert path.name == f"{name}.duckdb_extension"
        assert f"duckdb_extension_{name}" in path.parts
        assert path.parent.name == f"v{duckdb.__version__}"


def test_a_missing_extension_wheel_is_an_error_that_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(duckdb_iceberg, "EXTENSIONS", ("parquet", "avro", "no_such_ext"))
    wanted = re.escape(f"duckdb-extension-no_such_ext=={duckdb.__version__}")
    with pytest.raises(duckdb_iceberg.MissingExtensionWheel, match=wanted):
        connect()


def test_scan_sql_quotes_the_location() -> None:
    assert scan_sql("file:///tmp/it's/v1.metadata.json") == "iceberg_scan('file:///tmp/it''s/v1.metadata.json')"


def test_duckdb_reads_the_current_snapshot_only_and_agrees_with_pyiceberg(
    store: IcebergTableStore, conn: duckdb.DuckDBPyConnection
) -> None:
    after_full = load_three_commits(store)
    current = metadata_location(store)
    assert current.startswith("file://")
    assert current.endswith(".metadata.json")

    seen = totals(conn, current)
    assert seen == CURRENT
    assert seen == pyiceberg_totals(store)
    # A plain path reads the same table as the `file://` URI pyiceberg reports.
    assert totals(conn, current.removeprefix("file://")) == CURRENT
    # The metadata file of the first commit still reads as the full load: DuckDB reads the snapshot it is given.
    assert totals(conn, after_full) == FULL


def test_duckdb_rows_match_pyiceberg_rows_and_filter_on_the_month_partition(
    store: IcebergTableStore, conn: duckdb.DuckDBPyConnection
) -> None:
    load_three_commits(store)
    location = metadata_location(store)
    key = [(k, "ascending") for k in duckdb_iceberg.KEY]
    ours = read_table(conn, location).to_arrow_table().sort_by(key)
    theirs = store.catalog.load_table(store.identifier).scan().to_arrow().sort_by(key)
    assert ours.column_names == theirs.column_names
    assert ours.to_pylist() == theirs.to_pylist()
    # A filter on the partition source column (month(date)) neither loses nor keeps the rows it should not.
    february = conn.sql(f"SELECT count(*) FROM {scan_sql(location)} WHERE date >= DATE '2024-02-01'").fetchone()
    assert february == (29 * 4,)


def test_a_column_added_later_reads_as_null_for_older_rows(
    store: IcebergTableStore, conn: duckdb.DuckDBPyConnection
) -> None:
    january = upstream(days(JAN, FEB), PLAZAS, V1)
    store.commit_window(
        Window(start=JAN, stop=FEB), month_of(january), base_schema(), {REFRESH_ID: "jan"}, fetched_through=epoch(V1)
    )
    # February arrives with a column the table has never seen: tollwatch adds it (Iceberg add-column) and writes it.
    evolved = target_schema([*base_schema().names, "lane_group"])
    february = [{**r, "lane_group": f"L{r['plaza_id']}"} for r in upstream(days(FEB, MAR), PLAZAS, V1)]
    store.commit_window(
        Window(start=FEB, stop=MAR),
        [("2024-02", arrow(february, evolved))],
        evolved,
        {REFRESH_ID: "feb"},
        fetched_through=epoch(V1),
    )
    location = metadata_location(store)
    columns = dict(
        conn.sql(f"SELECT column_name, column_type FROM (DESCRIBE SELECT * FROM {scan_sql(location)})").fetchall()
    )
    assert columns["lane_group"] == "VARCHAR"
    by_month = conn.sql(
        f"""
        SELECT month(date) AS m, lane_group, count(*) FROM {scan_sql(location)}
        GROUP BY ALL ORDER BY m, lane_group NULLS FIRST
        """
    ).fetchall()
    assert by_month == [(1, None, 31 * 8), (2, "L1", 29 * 4), (2, "L2", 29 * 4)]
    assert totals(conn, location) == pyiceberg_totals(store)
