"""Write, audit, publish: one load through its audit branch, without the orchestration.

`write_audit_publish` is the loop both engines go through (the flow passes the engine's write as a function):

1. write: the load commits to its audit branch (cut from `main`; an existing branch of the same refresh, left by a
   crashed run, is continued);
2. audit: the checks of `tollwatch.contract.quality` read the branch (the load's days) and `main` (the trailing
   weeks the volume check compares with);
3. publish: a load without a failing `error` check fast-forwards `main` to the branch. When another load published
   first, the branch is dropped and the load is written and audited again on the new `main`, so neither load is lost
   and each is audited as it is published. A held load stops at 2 and keeps its branch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

import pyarrow as pa
import pyarrow.compute as pc
from pyiceberg.expressions import And, GreaterThanOrEqual, LessThan

from tollwatch.contract import table as contract
from tollwatch.contract.errors import TollwatchError
from tollwatch.contract.quality import HoldRecord, QualitySpec, QualitySummary, Settlement
from tollwatch.core.branches import Branches, NotFastForward, to_settle
from tollwatch.core.ingest import LoadResult
from tollwatch.core.quality import Profile, audit
from tollwatch.core.table import MAIN, IcebergTableStore, head

log = logging.getLogger(__name__)

KEY = contract.KEY
#: The upstream row a table row came from (Socrata's `:id`).
VERSION_ID = "source_row_id"

#: Times a load is rebuilt on a `main` that moved before it could publish (each time another load published).
PUBLISH_ATTEMPTS = 5
#: Columns the checks read (a scan reads nothing else).
PROFILE_COLUMNS = ("plaza_id", "date", "hour", "direction", "vehicles_e_zpass", "vehicles_vtoll", "vehicles_cash")


class PublishContended(TollwatchError):
    """`main` kept moving: the load was rebuilt PUBLISH_ATTEMPTS times and never got to publish."""

    status = 409


@dataclass
class Audited:
    """A load after its audit: published to `main`, or held on its branch."""

    result: LoadResult
    quality: QualitySummary
    branch: str
    published: bool


def profile(store: IcebergTableStore, ref: str, start: date, stop: date) -> Profile:
    """The checks' view of one branch's days [start, stop): read one record batch at a time (bounded memory)."""
    found = Profile()
    table = store.table()
    at = head(table, ref) if table is not None else None
    if table is None or at is None:
        return found
    present = {f.name for f in table.schema().fields}
    scan = table.scan(
        row_filter=And(GreaterThanOrEqual("date", start.isoformat()), LessThan("date", stop.isoformat())),
        selected_fields=tuple(c for c in PROFILE_COLUMNS if c in present),
        snapshot_id=at.snapshot_id,
    )
    for batch in scan.to_arrow_batch_reader():
        found.add(batch)
    return found


def audit_branch(
    store: IcebergTableStore,
    branch: str,
    result: LoadResult,
    spec: QualitySpec,
    *,
    upstream_by_day: dict[date, int] | None,
    columns: list[str],
) -> QualitySummary:
    """Run the checks on the load's days of `branch`, against `main`'s trailing weeks."""
    touched = result.touched
    replaced = 0
    if touched is None:
        loaded, history = Profile(), Profile()
    else:
        loaded = profile(store, branch, touched.start, touched.stop)
        since = touched.start - timedelta(weeks=spec.volume.trailing_weeks)
        history = profile(store, MAIN, since, touched.stop)
        replaced = replaced_by_another_row(store, branch, touched.start, touched.stop)
    return audit(
        spec,
        loaded=loaded,
        history=history,
        upstream_by_day=upstream_by_day,
        rows_read=result.rows_read,
        rows_rejected=result.rows_rejected,
        columns=columns,
        rows_superseded=superseded(result) + replaced,
    )


def _keyed_ids(store: IcebergTableStore, ref: str, start: date, stop: date) -> pa.Table:
    table = store.table()
    at = head(table, ref) if table is not None else None
    if table is None or at is None:
        return pa.table({name: pa.array([], pa.string()) for name in (*KEY, VERSION_ID)})
    scan = table.scan(
        row_filter=And(GreaterThanOrEqual("date", start.isoformat()), LessThan("date", stop.isoformat())),
        selected_fields=(*KEY, VERSION_ID),
        snapshot_id=at.snapshot_id,
    )
    return scan.to_arrow()


def replaced_by_another_row(store: IcebergTableStore, branch: str, start: date, stop: date) -> int:
    """Rows of `main` whose key the branch now holds under another upstream row (`source_row_id`).

    An upstream that re-issues a corrected row as a new row may keep serving the old one too: it counts both, the
    table keeps the newest version of the key. Such rows are accounted for in the reconciliation (the count of
    rows the dedupe superseded within the fetch covers the same case inside one load).
    """
    before = _keyed_ids(store, MAIN, start, stop)
    after = _keyed_ids(store, branch, start, stop).rename_columns([*KEY, "__after"])
    if before.num_rows == 0 or after.num_rows == 0:
        return 0
    paired = before.join(after, keys=list(KEY), join_type="inner")
    return int(pc.sum(pc.not_equal(paired[VERSION_ID], paired["__after"])).as_py() or 0)


def superseded(result: LoadResult) -> int:
    """Fetched rows the dedupe dropped for a newer version of their key (0 for a load found already written: its
    counts are not known again)."""
    if result.rows_written == 0:
        return 0
    return max(result.rows_read - result.rows_rejected - result.rows_written, 0)


def write_audit_publish(
    branches: Branches,
    refresh_id: str,
    write: Callable[[str], LoadResult],
    check: Callable[[str, LoadResult], QualitySummary],
) -> Audited:
    """Write the load to its branch, audit it, publish it when it passes (see the module docstring)."""
    branch = contract.audit_branch(refresh_id)
    for attempt in range(1, PUBLISH_ATTEMPTS + 1):
        result = write(branch)
        quality = check(branch, result)
        if quality.verdict == "held":
            return Audited(result, quality, branch, published=False)
        try:
            result.snapshot_id = branches.publish(branch, refresh_id)
        except NotFastForward as exc:
            log.warning(
                "%s; rebuilding the load on the new %s (attempt %d of %d)", exc, MAIN, attempt, PUBLISH_ATTEMPTS
            )
            branches.drop(branch)
            continue
        return Audited(result, quality, branch, published=True)
    raise PublishContended(
        f"refresh {refresh_id}: {MAIN} moved {PUBLISH_ATTEMPTS} times before this load could publish; nothing of it "
        "is on main, a re-run tries again"
    )


def override(
    branches: Branches,
    refresh_id: str,
    *,
    by: str,
    reason: str,
    rebuild: Callable[[HoldRecord], None],
) -> Settlement:
    """An operator publishes a held load despite its checks; recorded with who and why. Idempotent.

    When `main` moved since the load was held (another load published), its branch is rebuilt on the new `main`
    from its landing (`rebuild` writes the load to `record.branch` again) and then published: the override never
    drops what was published meanwhile. The checks are not run again: publishing despite them is the point.
    """
    found = to_settle(branches, refresh_id, "published")
    if isinstance(found, Settlement):
        return found
    record = found
    settlement = Settlement(
        refresh_id=refresh_id, action="published", by=by, reason=reason, at=datetime.now(UTC), held=record
    )
    for attempt in range(1, PUBLISH_ATTEMPTS + 1):
        if branches.head(record.branch) is None:
            rebuild(record)
        try:
            snapshot_id = branches.publish(record.branch, refresh_id, settlement)
        except NotFastForward as exc:
            log.warning("%s; rebuilding the held load on the new %s (attempt %d)", exc, MAIN, attempt)
            branches.drop(record.branch)
            continue
        return settlement.model_copy(update={"snapshot_id": snapshot_id})
    raise PublishContended(f"refresh {refresh_id}: {MAIN} moved {PUBLISH_ATTEMPTS} times while publishing it")
