"""Write-audit-publish on the bronze table: a load's audit branch, its publication to `main`, held loads.

Every load commits to its own branch (`tollwatch.contract.table.audit_branch`, cut from `main`), the checks read
that branch, and a passing load is published by fast-forwarding `main` to the branch's head: one atomic metadata
commit that also removes the branch. Readers of `main` never see a row that was not audited.

Fast-forward only: when `main` moved since the branch was cut (another load published first), publishing this
branch would drop that load, so `publish` refuses (`NotFastForward`) and the caller rebuilds the load on the new
`main` (`tollwatch.core.wap.write_audit_publish`). Two loads audited at once therefore publish one after the other,
each containing the other's rows, never one over the other.

A held load keeps its branch, and a table property `tollwatch.held.<refresh id>` records why (its `HoldRecord`).
An operator settles it: `publish` (an override, recorded with who and why in `tollwatch.settled.<refresh id>`) or
`discard` (the branch is removed; its snapshots expire with the table's snapshot expiry). Keeping this state in the
table's own metadata makes it change atomically with the refs it describes: no second store to disagree with.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TypeVar

import pyarrow as pa
from pydantic import ValidationError
from pyiceberg.exceptions import CommitFailedException
from pyiceberg.table import Table
from pyiceberg.table.update.snapshot import ManageSnapshots
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_random_exponential

from tollwatch.contract import table as contract
from tollwatch.contract.errors import TollwatchError
from tollwatch.contract.quality import HoldRecord, Settlement
from tollwatch.core.table import MAIN, IcebergTableStore, head, lineage

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Metadata commits (branch, publish, hold, settle) that lost a race with another commit are re-read and retried.
METADATA_ATTEMPTS = 6


class NotFastForward(TollwatchError):
    """`main` moved since the load's branch was cut: publishing it would drop what was published since."""

    status = 409


class NoSuchLoad(TollwatchError):
    """No held or published load has this refresh id."""

    status = 404


def to_settle(branches: Branches, refresh_id: str, action: str) -> HoldRecord | Settlement:
    """The held load an operator is about to settle, or the earlier settlement when the same decision was made
    before (settling is idempotent: the first record stands); a load settled the other way, or never held, is
    refused with a sentence."""
    previous = branches.settled(refresh_id)
    if previous is not None:
        if previous.action != action:
            done = f"{previous.action} by {previous.by}"
            raise NoSuchLoad(f"refresh {refresh_id} was already {done}: it cannot be {action}")
        return previous
    held = branches.held(refresh_id)
    if not held:
        raise NoSuchLoad(f"refresh {refresh_id} is not held (see `tollwatch status`)")
    return held[0]


class Branches:
    """The table's audit branches and the held/settled records beside them."""

    def __init__(self, store: IcebergTableStore) -> None:
        self.store = store

    def _table(self) -> Table:
        table = self.store.table()
        if table is None:
            raise NoSuchLoad(f"table {self.store.identifier} does not exist yet")
        return table

    def _retrying(self, what: str, action: Callable[[], T]) -> T:
        """Run a metadata commit again on the new table state when a concurrent commit won the race."""
        for attempt in Retrying(
            stop=stop_after_attempt(METADATA_ATTEMPTS),
            wait=wait_random_exponential(multiplier=0.1, max=2),
            retry=retry_if_exception_type(CommitFailedException),
            before_sleep=lambda state: log.info("%s raced another commit (%s); retrying", what, state.outcome),
            reraise=True,
        ):
            with attempt:
                return action()
        raise AssertionError("unreachable: Retrying re-raises")

    # ------------------------------------------------------------------ branches

    def open(self, branch: str, schema: pa.Schema) -> int:
        """Cut `branch` from `main` (creating the table, and an empty first snapshot for it to branch from, on first
        use); an existing branch is kept, so a re-run after a crash continues it. Returns the branch's head."""
        self.store.ensure(schema)

        def cut() -> int:
            table = self._table()
            existing = head(table, branch)
            if existing is not None:
                return existing.snapshot_id
            base = table.current_snapshot()
            if base is None:  # nothing to branch from: an empty, data-less snapshot changes nothing readers see
                table.append(table.schema().as_arrow().empty_table())
                table = self._table()
                base = table.current_snapshot()
                assert base is not None
            table.manage_snapshots().create_branch(base.snapshot_id, branch).commit()
            log.info("cut audit branch %s of %s at snapshot %s", branch, self.store.identifier, base.snapshot_id)
            return base.snapshot_id

        return self._retrying(f"cutting {branch}", cut)

    def drop(self, branch: str) -> None:
        """Remove a branch (nothing when it is gone already); its snapshots leave every lineage."""

        def remove() -> None:
            table = self._table()
            if branch in table.metadata.refs:
                table.manage_snapshots().remove_branch(branch).commit()

        self._retrying(f"dropping {branch}", remove)

    def head(self, branch: str) -> int | None:
        found = head(self._table(), branch)
        return found.snapshot_id if found is not None else None

    def publish(self, branch: str, refresh_id: str, settlement: Settlement | None = None) -> int:
        """Fast-forward `main` to the branch's head and remove the branch, in one commit; the published snapshot.

        Idempotent: a load already on `main` (a re-run after the publish) returns its snapshot. Raises
        `NotFastForward` when `main` moved since the branch was cut. `settlement` records an operator's override.
        """

        def fast_forward() -> int:
            table = self._table()
            target = head(table, branch)
            if target is None:
                published = self.store.committed_load(refresh_id)
                if published is not None:
                    return published.snapshot_id
                raise NoSuchLoad(f"refresh {refresh_id} has no audit branch {branch} and is not on {MAIN}")
            current = table.current_snapshot()
            if current is not None and current.snapshot_id not in {s.snapshot_id for s in lineage(table, branch)}:
                raise NotFastForward(
                    f"{MAIN} moved to snapshot {current.snapshot_id} since {branch} was cut; the load must be "
                    "rebuilt on it"
                )
            with table.transaction() as txn:
                refs = ManageSnapshots(txn)
                refs.set_current_snapshot(snapshot_id=target.snapshot_id)  # asserts main is still `current`
                refs.remove_branch(branch)
                refs.commit()
                key = contract.HELD_PREFIX + refresh_id
                if key in table.properties:
                    txn.remove_properties(key)
                if settlement is not None:
                    settled = settlement.model_copy(update={"snapshot_id": target.snapshot_id})
                    txn.set_properties({contract.SETTLED_PREFIX + refresh_id: settled.model_dump_json()})
            log.info("published %s: %s now at snapshot %s", branch, MAIN, target.snapshot_id)
            return target.snapshot_id

        return self._retrying(f"publishing {branch}", fast_forward)

    # ------------------------------------------------------------------ held loads

    def hold(self, record: HoldRecord) -> None:
        """Record that a load is held (its branch stays for an operator to publish or discard)."""
        self._retrying(
            f"holding {record.branch}",
            lambda: (
                self._table()
                .transaction()
                .set_properties({contract.HELD_PREFIX + record.refresh_id: record.model_dump_json()})
                .commit_transaction()
            ),
        )
        log.warning("held refresh %s on branch %s: %s", record.refresh_id, record.branch, ", ".join(record.failing))

    def held(self, refresh_id: str | None = None) -> list[HoldRecord]:
        """Held loads (one, or all), oldest first; a record that cannot be read is skipped with a warning."""
        table = self.store.table()
        if table is None:
            return []
        records = []
        for key, value in table.properties.items():
            if not key.startswith(contract.HELD_PREFIX):
                continue
            if refresh_id is not None and key != contract.HELD_PREFIX + refresh_id:
                continue
            try:
                records.append(HoldRecord.model_validate_json(value))
            except ValidationError as exc:
                log.warning("ignoring unreadable hold record %s: %s", key, exc.errors()[0]["msg"])
        return sorted(records, key=lambda r: r.held_at)

    def settled(self, refresh_id: str) -> Settlement | None:
        table = self.store.table()
        value = table.properties.get(contract.SETTLED_PREFIX + refresh_id) if table is not None else None
        return Settlement.model_validate_json(value) if value else None

    def discard(self, refresh_id: str, *, by: str, reason: str) -> Settlement:
        """Drop a held load's branch and record who discarded it and why; idempotent (the first record stays)."""
        found = to_settle(self, refresh_id, "discarded")
        if isinstance(found, Settlement):
            return found
        settlement = Settlement(
            refresh_id=refresh_id, action="discarded", by=by, reason=reason, at=datetime.now(UTC), held=found
        )

        def drop() -> None:
            table = self._table()
            with table.transaction() as txn:
                if found.branch in table.metadata.refs:
                    refs = ManageSnapshots(txn)
                    refs.remove_branch(found.branch)
                    refs.commit()
                txn.remove_properties(contract.HELD_PREFIX + refresh_id)
                txn.set_properties({contract.SETTLED_PREFIX + refresh_id: settlement.model_dump_json()})

        self._retrying(f"discarding {refresh_id}", drop)
        log.warning("discarded held refresh %s (%s: %s)", refresh_id, by, reason)
        return settlement
