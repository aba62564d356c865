"""The write-audit-publish loop (`tollwatch.core.wap`) with a fake branch store: what is published, what is held,
what happens when `main` moved, and the operator's override."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from tollwatch.contract import table as contract
from tollwatch.contract.quality import CheckResult, HoldRecord, QualitySummary, Settlement
from tollwatch.core.branches import NoSuchLoad, NotFastForward
from tollwatch.core.ingest import LoadResult
from tollwatch.core.wap import PUBLISH_ATTEMPTS, PublishContended, override, write_audit_publish

RID = "refresh-1"
BRANCH = contract.audit_branch(RID)


class FakeBranches:
    """Branches that refuse to fast-forward `moves` times (another load published first)."""

    def __init__(self, moves: int = 0) -> None:
        self.moves = moves
        self.published: list[tuple[str, Settlement | None]] = []
        self.dropped: list[str] = []
        self.heads: dict[str, int] = {}
        self.held_records: list[HoldRecord] = []
        self.settlements: dict[str, Settlement] = {}

    def publish(self, branch: str, refresh_id: str, settlement: Settlement | None = None) -> int:
        if self.moves:
            self.moves -= 1
            raise NotFastForward("main moved")
        self.published.append((branch, settlement))
        if settlement is not None:
            self.settlements[refresh_id] = settlement.model_copy(update={"snapshot_id": 42})
            self.held_records = []
        return 42

    def drop(self, branch: str) -> None:
        self.dropped.append(branch)
        self.heads.pop(branch, None)

    def head(self, branch: str) -> int | None:
        return self.heads.get(branch)

    def held(self, refresh_id: str | None = None) -> list[HoldRecord]:
        return [r for r in self.held_records if refresh_id in (None, r.refresh_id)]

    def settled(self, refresh_id: str) -> Settlement | None:
        return self.settlements.get(refresh_id)


def _quality(verdict: str) -> QualitySummary:
    failing = verdict == "held"
    check = CheckResult(name="completeness", severity="error", passed=not failing)
    return QualitySummary(verdict=verdict, checks=[check])  # type: ignore[arg-type]


def _run(branches: FakeBranches, verdict: str = "passed") -> tuple[object, list[str]]:
    writes: list[str] = []

    def write(branch: str) -> LoadResult:
        writes.append(branch)
        branches.heads[branch] = len(writes)
        return LoadResult(snapshot_id=len(writes), rows_read=10, rows_written=10, rows_rejected=0)

    audited = write_audit_publish(branches, RID, write, lambda branch, result: _quality(verdict))  # type: ignore[arg-type]
    return audited, writes


def test_a_passing_load_is_written_once_and_published():
    branches = FakeBranches()
    audited, writes = _run(branches)
    assert writes == [BRANCH]
    assert audited.published is True
    assert audited.result.snapshot_id == 42  # the published snapshot, what the completion event names
    assert branches.published == [(BRANCH, None)]


def test_a_held_load_is_not_published_and_keeps_its_branch():
    branches = FakeBranches()
    audited, _ = _run(branches, "held")
    assert audited.published is False
    assert branches.published == []
    assert branches.dropped == []


def test_a_warned_load_is_published():
    audited, _ = _run(FakeBranches(), "warned")
    assert audited.published is True


def test_main_moving_rebuilds_the_load_on_the_new_main():
    branches = FakeBranches(moves=2)
    audited, writes = _run(branches)
    assert writes == [BRANCH] * 3  # written and audited again after each refusal
    assert branches.dropped == [BRANCH] * 2
    assert audited.published is True


def test_main_moving_forever_fails_without_publishing():
    branches = FakeBranches(moves=PUBLISH_ATTEMPTS)
    with pytest.raises(PublishContended, match="moved"):
        _run(branches)
    assert branches.published == []


def _held(branches: FakeBranches) -> HoldRecord:
    record = HoldRecord(
        refresh_id=RID,
        branch=BRANCH,
        snapshot_id=7,
        mode="window",
        held_at=datetime.now(UTC),
        failing=["completeness"],
    )
    branches.held_records = [record]
    branches.heads[BRANCH] = 7
    return record


def test_override_publishes_the_held_branch_with_who_and_why():
    branches = FakeBranches()
    _held(branches)
    rebuilt: list[HoldRecord] = []
    settlement = override(branches, RID, by="ops", reason="known outage", rebuild=rebuilt.append)  # type: ignore[arg-type]
    assert (settlement.action, settlement.by, settlement.reason, settlement.snapshot_id) == (
        "published",
        "ops",
        "known outage",
        42,
    )
    assert rebuilt == []  # main had not moved: the audited branch itself is published


def test_override_after_main_moved_rebuilds_from_the_landing_then_publishes():
    branches = FakeBranches(moves=1)
    record = _held(branches)
    rebuilt: list[HoldRecord] = []

    def rebuild(held: HoldRecord) -> None:
        rebuilt.append(held)
        branches.heads[held.branch] = 8

    settlement = override(branches, RID, by="ops", reason="r", rebuild=rebuild)  # type: ignore[arg-type]
    assert rebuilt == [record]
    assert branches.dropped == [BRANCH]
    assert settlement.snapshot_id == 42


def test_override_is_idempotent_and_refuses_what_is_not_held():
    branches = FakeBranches()
    _held(branches)
    first = override(branches, RID, by="ops", reason="r", rebuild=lambda r: None)  # type: ignore[arg-type]
    again = override(branches, RID, by="someone-else", reason="again", rebuild=lambda r: None)  # type: ignore[arg-type]
    assert again == first
    assert len(branches.published) == 1
    with pytest.raises(NoSuchLoad, match="is not held"):
        override(branches, "never-held", by="ops", reason="r", rebuild=lambda r: None)  # type: ignore[arg-type]


def test_the_audit_branch_name_is_a_plain_identifier_per_refresh():
    assert contract.audit_branch("5b0f3c1e-7d1a-4c5e") == "audit_5b0f3c1e_7d1a_4c5e"
    assert contract.audit_branch("a") != contract.audit_branch("b")
    assert contract.audit_branch("ümlaut id").isidentifier()
