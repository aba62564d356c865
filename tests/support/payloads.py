"""One completion payload for tests that need "some load that committed"; each test overrides what it asserts on."""

from __future__ import annotations

from datetime import date
from typing import Any

from tollwatch.contract.events import IngestionCompleted, Window


def completion(**overrides: Any) -> IngestionCompleted:
    values: dict[str, Any] = {
        "table": "bronze.bnt_traffic_hourly",
        "catalog": "tollwatch",
        "mode": "window",
        "window": Window(start=date(2024, 1, 1), stop=date(2024, 2, 1)),
        "refresh_id": "r-1",
        "rows_fetched": 10,
        "rows_written": 10,
        "rows_rejected": 0,
        "snapshot_id": 42,
        "landing_uri": "http://x/raw/",
    }
    return IngestionCompleted(**(values | overrides))
