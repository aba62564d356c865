"""Versions only move forward: whatever order loads commit in, every key ends at its newest upstream version.

Pure pyarrow (`newest_per_key`, `dedupe_on_key`) under hypothesis, then the same promises through a real pyiceberg
table on disk (`IcebergTableStore.commit_merge` / `commit_window`) and the ledger's high-water mark.
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from pathlib import Path

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tollwatch.contract.events import Window
from tollwatch.core.schema import base_schema, dedupe_on_key
from tollwatch.core.table import COMMITTED_THROUGH, REFRESH_ID, IcebergTableStore, newest_per_key

SCHEMA = base_schema()
DAY = date(2024, 1, 1)

#: (hour, version) pairs: the key is (1, DAY, hour, "I"); the row's count encodes its version so a test can tell.
Row = tuple[int, int]


def rows(specs: list[Row], day: date = DAY) -> pa.Table:
    return pa.Table.from_pylist(
        [
            {
                "plaza_id": 1,
                "date": day,
                "hour": hour,
                "direction": "I",
                "vehicles_e_zpass": version,
                "vehicles_vtoll": None,
                "vehicles_cash": None,
                "source_row_id": f"row-{hour}-{version}",
                "source_updated_at": datetime.fromtimestamp(version, UTC),
            }
            for hour, version in specs
        ],
        schema=SCHEMA,
    )


def versions(table: pa.Table) -> dict[int, int]:
    """hour -> version, failing on a key held twice."""
    found = [(r["hour"], r["vehicles_e_zpass"]) for r in table.to_pylist()]
    assert len({h for h, _ in found}) == len(found), f"a key is held twice: {sorted(found)}"
    assert all(r["source_updated_at"] == datetime.fromtimestamp(r["vehicles_e_zpass"], UTC) for r in table.to_pylist())
    return dict(found)


# A load: some keys (hours 0-5) at some versions (1-50); one version per key within a load (loads are deduped).
loads = st.lists(st.dictionaries(st.integers(0, 5), st.integers(1, 50), min_size=1, max_size=6), min_size=1, max_size=5)


@settings(max_examples=150, deadline=None)
@given(loads=loads, order=st.randoms(use_true_random=False))
def test_merging_loads_in_any_order_keeps_each_keys_newest_version(loads: list[dict[int, int]], order) -> None:
    """Refreshes commit in whatever order their runs finish: the result is the newest version per key, always."""
    shuffled = list(loads)
    order.shuffle(shuffled)
    table = rows([])
    for load in shuffled:
        table = newest_per_key(table, rows(sorted(load.items())))
    expected: dict[int, int] = {}
    for load in loads:
        for hour, version in load.items():
            expected[hour] = max(version, expected.get(hour, 0))
    assert versions(table) == expected


@settings(max_examples=150, deadline=None)
@given(
    stored=st.dictionaries(st.integers(0, 7), st.integers(1, 50)),
    fetched=st.dictionaries(st.integers(0, 7), st.integers(1, 50)),
    ceiling=st.integers(1, 50),
)
def test_a_window_keeps_newer_rows_and_drops_only_rows_the_fetch_would_have_returned(
    stored: dict[int, int], fetched: dict[int, int], ceiling: int
) -> None:
    """A window fetched through `ceiling`: keys it returned end at the newer version; a stored key it did not
    return was deleted upstream if its version is one the fetch saw (<= ceiling), and is kept if newer."""
    fetched = {hour: min(version, ceiling) for hour, version in fetched.items()}  # a fetch sees nothing newer
    result = versions(
        newest_per_key(rows(sorted(stored.items())), rows(sorted(fetched.items())), drop_absent_through=ceiling)
    )
    expected = {hour: max(version, stored.get(hour, 0)) for hour, version in fetched.items()}
    expected |= {hour: version for hour, version in stored.items() if hour not in fetched and version > ceiling}
    assert result == expected


def test_dedupe_keeps_the_newest_version_then_the_latest_position() -> None:
    """Within one load: a correction with a newer stamp wins wherever it stands; equal stamps, the later row."""
    page = pa.concat_tables([rows([(0, 30), (1, 10)]), rows([(0, 20), (1, 10)])])
    page = page.set_column(
        page.schema.get_field_index("source_row_id"), "source_row_id", pa.array(["a", "b", "c", "d"])
    )
    kept = dedupe_on_key(page)
    assert {(r["hour"], r["vehicles_e_zpass"], r["source_row_id"]) for r in kept.to_pylist()} == {
        (0, 30, "a"),
        (1, 10, "d"),
    }


# ------------------------------------------------------------------------------------ through a real table


@pytest.fixture
def store(tmp_path: Path) -> IcebergTableStore:
    warehouse = tmp_path / "warehouse"
    warehouse.mkdir()
    return IcebergTableStore.from_properties(
        "test",
        {"type": "sql", "uri": f"sqlite:///{warehouse}/catalog.db", "warehouse": f"file://{warehouse}"},
        "bronze.versions",
    )


def month(table: pa.Table) -> list[tuple[str, pa.Table]]:
    return [(f"{DAY:%Y-%m}", table)]


def props(refresh_id: str) -> dict[str, str]:
    return {REFRESH_ID: refresh_id}


def stored_versions(store: IcebergTableStore) -> dict[int, int]:
    return versions(store.read())


def test_refreshes_committing_out_of_order_never_put_an_older_version_back(store: IcebergTableStore) -> None:
    """The newer refresh (through 200) commits first, the older one (through 100) after: the table keeps the newer
    versions, takes the older refresh's rows only where they are news, and the mark stays at 200."""
    store.commit_merge(month(rows([(0, 150), (1, 180)])), SCHEMA, props("newer"), through=200)
    store.commit_merge(month(rows([(0, 90), (2, 80)])), SCHEMA, props("older"), through=100)
    assert stored_versions(store) == {0: 150, 1: 180, 2: 80}
    assert store.committed_through() == 200


def test_a_window_fetched_before_a_refresh_and_committed_after_it_cannot_revert_it(store: IcebergTableStore) -> None:
    """A window fetched through 100 (hours 0-2 at their old versions; hour 3 deleted upstream) commits after a
    refresh through 200 revised hour 1 and added hour 4: hours 1 and 4 keep the refresh's versions, hour 3 goes."""
    store.commit_merge(month(rows([(0, 50), (1, 50), (2, 50), (3, 50)])), SCHEMA, props("first"), through=60)
    store.commit_merge(month(rows([(1, 150), (4, 160)])), SCHEMA, props("refresh"), through=200)
    window = Window(start=DAY, stop=date(2024, 1, 2))
    store.commit_window(window, month(rows([(0, 50), (1, 50), (2, 95)])), SCHEMA, props("window"), fetched_through=100)
    assert stored_versions(store) == {0: 50, 1: 150, 2: 95, 4: 160}
    assert store.committed_through() == 200, "a window carries the mark forward, it never moves it"


def test_a_window_whose_days_were_all_deleted_upstream_empties_them(store: IcebergTableStore) -> None:
    store.commit_merge(month(rows([(0, 50), (1, 50)])), SCHEMA, props("first"), through=60)
    store.commit_window(Window(start=DAY, stop=date(2024, 1, 2)), [], SCHEMA, props("window"), fetched_through=100)
    assert stored_versions(store) == {}
    assert store.committed("window") is not None, "the window's commit is in the ledger"


def test_a_refresh_that_changes_no_row_still_records_its_load_and_moves_the_mark(store: IcebergTableStore) -> None:
    store.commit_merge(month(rows([(0, 50)])), SCHEMA, props("first"), through=60)
    store.commit_merge([], SCHEMA, props("nothing-new"), through=70)
    assert store.committed("nothing-new") is not None
    assert store.committed_through() == 70
    assert stored_versions(store) == {0: 50}


def test_the_mark_is_read_from_the_newest_snapshot_that_records_it(store: IcebergTableStore) -> None:
    """A snapshot written by another tool (no tollwatch properties) neither hides nor moves the mark."""
    assert store.committed_through() is None
    store.commit_merge(month(rows([(0, 50)])), SCHEMA, props("first"), through=60)
    table = store.table()
    assert table is not None
    table.append(rows([(5, 55)]))  # e.g. a manual fix, summary without tollwatch.* keys
    table = store.table()
    assert table is not None
    assert table.current_snapshot().summary[COMMITTED_THROUGH] is None
    assert store.committed_through() == 60
