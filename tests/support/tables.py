"""Read the table the current settings point at (the test's own warehouse, see the `env` fixture)."""

from __future__ import annotations

import pyarrow as pa

from tollwatch import resources
from tollwatch.contract.events import Window
from tollwatch.contract.settings import load_settings


def table_rows(window: Window | None = None) -> pa.Table:
    """The table's rows (of `window`, or all), sorted by key."""
    return resources.table_store(load_settings()).read(window)


def snapshot_ids() -> list[int]:
    """Every snapshot id of the table, oldest first ([] before it exists)."""
    table = resources.table_store(load_settings()).table()
    return [s.snapshot_id for s in table.snapshots()] if table else []
