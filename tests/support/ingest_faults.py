"""What the ingest fault tests share: "nothing lost", read from the real mirror and the real Iceberg table.

The expected side is the mirror's own answer to the same query the ingest asks (its query engine in-process,
which consumes no injected fault and counts toward no scheduled change); the actual side is the table as
pyiceberg reads it. A row the upstream served twice under one natural key (a correction republished as a new
row) is expected once, with the values of its latest `:id`, which is what the table promises to keep.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Collection, Mapping
from datetime import date, datetime
from pathlib import Path
from typing import Any

import pytest

from tollwatch import resources
from tollwatch.adapters.socrata import updated_after_where, window_where
from tollwatch.contract.events import Window
from tollwatch.contract.settings import load_settings
from tollwatch.core.table import FLOW_RUN_ID, REFRESH_ID
from tollwatch_dev.mirror import MAX_LIMIT, MirrorServer

REPO = Path(__file__).resolve().parents[2]

#: The natural key as the table types it: (plaza_id, date, hour, direction).
Key = tuple[int, date, int, str]
COUNTS = ("vehicles_e_zpass", "vehicles_vtoll", "vehicles_cash")


def _count(value: str | None) -> int | None:
    return None if value is None else int(value)


def mirror_rows(
    mirror: MirrorServer, where: str, *, extra: Collection[str] = (), skip_ids: Collection[str] = ()
) -> dict[Key, dict[str, Any]]:
    """The mirror's rows for `where` as the table should hold them, keyed by the natural key (latest `:id` wins).

    `extra`: upstream columns the table keeps verbatim as strings; `skip_ids`: rows expected in quarantine.
    """
    rows: dict[Key, dict[str, Any]] = {}
    offset = 0
    while True:
        page = mirror.dataset.query(
            {"$select": ":*, *", "$order": ":id", "$where": where, "$limit": str(MAX_LIMIT), "$offset": str(offset)}
        )
        for raw in page:
            if raw[":id"] in skip_ids:
                continue
            key = (int(raw["plaza_id"]), date.fromisoformat(raw["date"][:10]), int(raw["hour"]), raw["direction"])
            rows[key] = {
                **{name: _count(raw.get(name)) for name in COUNTS},
                **{name: raw.get(name) for name in extra},
                "source_row_id": raw[":id"],
                "source_updated_at": datetime.fromisoformat(raw[":updated_at"].replace("Z", "+00:00")),
            }
        if len(page) < MAX_LIMIT:
            return rows
        offset += len(page)


def window_rows(mirror: MirrorServer, window: Window, **options: Any) -> dict[Key, dict[str, Any]]:
    """`mirror_rows` for the days of a window (what a window ingest asks for)."""
    return mirror_rows(mirror, window_where(window.start, window.stop), **options)


def updated_rows(mirror: MirrorServer, after_epoch: int, **options: Any) -> dict[Key, dict[str, Any]]:
    """`mirror_rows` changed after a watermark (what a refresh ingest asks for)."""
    return mirror_rows(mirror, updated_after_where(after_epoch), **options)


def table_rows_by_key(window: Window | None = None, *, extra: Collection[str] = ()) -> dict[Key, dict[str, Any]]:
    """The table's rows (of a window), keyed like `mirror_rows`; fails on a duplicated natural key."""
    data = resources.table_store(load_settings()).read(window)
    if data.num_rows == 0:
        return {}
    rows = data.to_pylist()
    counts = Counter((r["plaza_id"], r["date"], r["hour"], r["direction"]) for r in rows)
    doubled = sorted(k for k, n in counts.items() if n > 1)
    assert not doubled, f"{len(doubled)} natural keys are in the table more than once, e.g. {doubled[:3]}"
    names = (*COUNTS, *extra, "source_row_id", "source_updated_at")
    return {(r["plaza_id"], r["date"], r["hour"], r["direction"]): {n: r[n] for n in names} for r in rows}


def assert_same_rows(actual: Mapping[Key, dict[str, Any]], expected: Mapping[Key, dict[str, Any]]) -> None:
    """Same keys (nothing missing, nothing extra) and, per key, the same values (right columns, right version)."""
    missing = sorted(expected.keys() - actual.keys())
    extra = sorted(actual.keys() - expected.keys())
    assert not missing, f"{len(missing)} upstream rows are missing from the table, e.g. {missing[:3]}"
    assert not extra, f"{len(extra)} table rows are not upstream rows, e.g. {extra[:3]}"
    differing = [k for k in sorted(expected) if actual[k] != expected[k]]
    assert not differing, (
        f"{len(differing)} rows differ, e.g. {differing[0]}: table {actual[differing[0]]} != "
        f"upstream {expected[differing[0]]}"
    )


def snapshot_ids() -> list[int]:
    """Every snapshot of the table, oldest first (empty before the first commit)."""
    table = resources.table_store(load_settings()).table()
    return [s.snapshot_id for s in table.snapshots()] if table else []


def committing_runs(refresh_id: str) -> set[str]:
    """The flow runs whose commits carry this refresh in the snapshot ledger: one commit = one run."""
    table = resources.table_store(load_settings()).table()
    if table is None:
        return set()
    return {
        s.summary[FLOW_RUN_ID]
        for s in table.snapshots()
        if s.summary is not None and s.summary.get(REFRESH_ID) == refresh_id
    }


def landings(refresh_id: str) -> dict[str, list[str]]:
    """Blobs landed for a refresh, by run id (the `run=` part of the landing prefix)."""
    by_run: dict[str, list[str]] = {}
    for name in resources.landing_zone(load_settings()).list_blobs("raw/"):
        if f"/refresh={refresh_id}/run=" in name:
            run = name.split("/run=", 1)[1].split("/", 1)[0]
            by_run.setdefault(run, []).append(name.rsplit("/", 1)[1])
    return by_run


def run_ingest_in_child(kill_at: str, parameters: Mapping[str, Any], timeout_s: float = 180) -> str:
    """Run one ingest flow in a child process that SIGKILLs itself at `kill_at`; returns its stdout.

    The child inherits this process's environment (the `env` fixture's stack, container and warehouse).
    """
    done = subprocess.run(
        [sys.executable, "-m", "tests.faults._ingest_kill_driver", kill_at, json.dumps(dict(parameters), default=str)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    assert done.returncode == -9, (
        f"the child was to be SIGKILLed at {kill_at}; it exited {done.returncode}\n"
        f"stdout: {done.stdout[-2000:]}\nstderr: {done.stderr[-4000:]}"
    )
    return done.stdout


def completeness_warns(directory: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Use a team's quality spec in which a missing hour warns instead of holding the load.

    For tests about paging, quarantine and dedupe: the mirror's faults there leave hours empty (a quarantined row,
    a row re-issued under another day), which the default checks hold (tests/integration/test_wap.py covers that);
    these tests check that such a load is complete and correct once published.
    """
    spec = directory / "quality.yaml"
    spec.write_text("completeness: {severity: warn}\n")
    monkeypatch.setenv("TOLLWATCH_QUALITY_SPEC", str(spec))
