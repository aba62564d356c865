"""Write-audit-publish on a real Iceberg table (pyiceberg, SQL catalog on a temp dir; no services): branches keep
loads from readers of `main` until they publish, and two loads audited at once both end up on `main`."""

from __future__ import annotations

import threading
from collections import Counter
from datetime import date, timedelta
from pathlib import Path

import pytest

from tests.support.fakes import day_rows
from tests.support.tables import commit_raw_rows, local_table_store
from tollwatch.contract import table as contract
from tollwatch.contract.events import Window
from tollwatch.contract.quality import HoldRecord, QualitySummary
from tollwatch.core.branches import Branches, NoSuchLoad, NotFastForward
from tollwatch.core.ingest import LoadResult, is_commit_conflict
from tollwatch.core.schema import target_schema
from tollwatch.core.table import IcebergTableStore, lineage
from tollwatch.core.wap import write_audit_publish

VERSION = 1_704_153_600
SCHEMA = target_schema([c.upstream for c in contract.COLUMNS])


def _rows(window: Window) -> list[dict[str, str]]:
    return [row for i in range(window.days) for row in day_rows(window.start + timedelta(days=i), version=VERSION)]


def _write(store: IcebergTableStore, refresh_id: str, window: Window, branch: str) -> LoadResult:
    Branches(store).open(branch, SCHEMA)
    for _ in range(10):  # as load_landing does: a commit that lost a race with another branch's is rebuilt
        try:
            snapshot = commit_raw_rows(
                store, window, _rows(window), refresh_id=refresh_id, through=VERSION, branch=branch
            )
            break
        except Exception as exc:
            if not is_commit_conflict(exc):
                raise
    else:
        raise AssertionError(f"{refresh_id}: every commit conflicted")
    return LoadResult(snapshot_id=snapshot, rows_read=0, rows_written=0, rows_rejected=0, touched=window)


def _days(store: IcebergTableStore) -> set[date]:
    return set(store.read()["date"].to_pylist()) if store.table() is not None else set()


@pytest.fixture
def store(tmp_path: Path) -> IcebergTableStore:
    return local_table_store(tmp_path)


def test_a_branch_write_is_invisible_on_main_until_published(store: IcebergTableStore):
    week = Window(start=date(2024, 1, 1), stop=date(2024, 1, 8))
    branch = contract.audit_branch("r1")

    _write(store, "r1", week, branch)

    assert _days(store) == set()  # main: only the empty base snapshot the branch was cut from
    assert store.committed("r1") is None  # the ledger of main does not know the load yet
    assert store.committed_load("r1", branch) is not None
    published = Branches(store).publish(branch, "r1")
    assert len(_days(store)) == 7
    assert store.committed("r1") == published
    assert set(store.table().metadata.refs) == {contract.MAIN}
    assert Branches(store).publish(branch, "r1") == published  # idempotent: a re-run after the publish


def test_publishing_a_branch_main_moved_past_is_refused(store: IcebergTableStore):
    first, second = (
        Window(start=date(2024, 1, 1), stop=date(2024, 1, 8)),
        Window(start=date(2024, 1, 8), stop=date(2024, 1, 15)),
    )
    _write(store, "a", first, contract.audit_branch("a"))
    _write(store, "b", second, contract.audit_branch("b"))
    Branches(store).publish(contract.audit_branch("a"), "a")

    with pytest.raises(NotFastForward, match="moved"):
        Branches(store).publish(contract.audit_branch("b"), "b")
    assert _days(store) == {first.start + timedelta(days=i) for i in range(7)}  # b did not replace a


def test_two_loads_audited_at_once_publish_in_order_without_losing_either(store: IcebergTableStore):
    """Both write and pass their audit before either publishes: one publishes, the other is rebuilt on the new main
    and then publishes; both weeks (of the same month: the same partition) are on main, neither twice."""
    windows = {
        "first": Window(start=date(2024, 1, 1), stop=date(2024, 1, 8)),
        "second": Window(start=date(2024, 1, 8), stop=date(2024, 1, 15)),
    }
    Branches(store).open(contract.audit_branch("seed"), SCHEMA)  # the table and its base exist before the race
    both_written = threading.Barrier(2, timeout=60)
    writes: Counter[str] = Counter()
    outcomes: dict[str, bool] = {}
    errors: list[BaseException] = []

    def load(refresh_id: str) -> None:
        def write(branch: str) -> LoadResult:
            writes[refresh_id] += 1
            return _write(store, refresh_id, windows[refresh_id], branch)

        def check(branch: str, result: LoadResult) -> QualitySummary:
            if writes[refresh_id] == 1:
                both_written.wait()  # neither publishes before both were written and audited
            return QualitySummary(verdict="passed", checks=[])

        try:
            outcomes[refresh_id] = write_audit_publish(Branches(store), refresh_id, write, check).published
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=load, args=(rid,)) for rid in windows]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)

    assert errors == []
    assert outcomes == {"first": True, "second": True}
    assert sorted(writes.values()) == [1, 2]  # the one that lost the race was rebuilt once
    assert len(_days(store)) == 14
    assert store.read().num_rows == 14 * 24
    on_main = [s.summary[contract.REFRESH_ID] for s in lineage(store.table()) if s.summary is not None]
    assert {"first", "second"} <= set(on_main)


def test_hold_and_discard_are_recorded_in_the_table(store: IcebergTableStore):
    week = Window(start=date(2024, 1, 1), stop=date(2024, 1, 8))
    branch = contract.audit_branch("held")
    result = _write(store, "held", week, branch)
    branches = Branches(store)
    from datetime import UTC, datetime

    branches.hold(
        HoldRecord(
            refresh_id="held",
            branch=branch,
            snapshot_id=result.snapshot_id or 0,
            mode="window",
            window=week,
            held_at=datetime.now(UTC),
            failing=["volume"],
        )
    )
    assert [r.failing for r in branches.held()] == [["volume"]]

    settled = branches.discard("held", by="ops", reason="bad upstream day")
    assert branches.discard("held", by="other", reason="again") == settled  # the first decision stands
    assert branches.held() == []
    assert branch not in store.table().metadata.refs
    assert _days(store) == set()
    with pytest.raises(NoSuchLoad):
        branches.discard("never-held", by="ops", reason="x")
