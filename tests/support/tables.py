"""Tables for tests: read the one the current settings point at (the test's own warehouse, see the `env` fixture),
or make one on a temp directory and load upstream rows into it (the unit layer)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from tollwatch import resources
from tollwatch.contract import table as contract
from tollwatch.contract.events import Window
from tollwatch.contract.settings import load_settings
from tollwatch.core.schema import convert, target_schema
from tollwatch.core.table import IcebergTableStore


def table_rows(window: Window | None = None) -> pa.Table:
    """The table's rows (of `window`, or all), sorted by key."""
    return resources.table_store(load_settings()).read(window)


def snapshot_ids() -> list[int]:
    """Every snapshot id of the table, oldest first ([] before it exists)."""
    table = resources.table_store(load_settings()).table()
    return [s.snapshot_id for s in table.snapshots()] if table else []


def local_table_store(directory: Path, identifier: str = "bronze.bnt_traffic_hourly") -> IcebergTableStore:
    """A table store on a pyiceberg SQL catalog (SQLite) and warehouse in `directory`: no services."""
    directory.mkdir(parents=True, exist_ok=True)
    properties = {"type": "sql", "uri": f"sqlite:///{directory}/catalog.db", "warehouse": f"file://{directory}"}
    return IcebergTableStore.from_properties("test", properties, identifier)


def commit_raw_rows(
    store: IcebergTableStore,
    window: Window,
    rows: list[dict[str, str]],
    *,
    refresh_id: str,
    through: int,
    branch: str = contract.MAIN,
) -> int:
    """Load upstream rows (Socrata's all-string form) as a window load would: typed, one commit; its snapshot id."""
    schema = target_schema({key for row in rows for key in row})
    good = convert(rows, schema, window).good
    months = sorted({day.strftime("%Y-%m") for day in good["date"].to_pylist()})
    by_month = [(m, good.filter(pc.equal(pc.strftime(good["date"], format="%Y-%m"), m))) for m in months]
    properties = contract.load_properties(refresh_id, "window", (window.start, window.stop), None)
    return store.commit_window(window, by_month, schema, properties, fetched_through=through, branch=branch)
