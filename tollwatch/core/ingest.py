"""The ingest pipeline without the orchestration: fetch → land → load, each a plain function.

`tollwatch/prefect/flows/ingest.py` wraps these in Prefect tasks (retries, logs, artifacts). Keeping the logic here
means it is typed, testable without a flow run, and the flow stays a readable list of steps.

Memory is bounded by one page (fetch, land, convert) plus one month of rows (the commit): pages stream from
the upstream to Blob, then from Blob through a local parquet spool split by month, then month by month
into one Iceberg transaction. A window of any size never sits whole in memory.
"""

from __future__ import annotations

import logging
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any, Literal, Self

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, model_validator
from pyiceberg.exceptions import CommitFailedException, ValidationException
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_random_exponential

from tollwatch.adapters.socrata import updated_between_where, window_where
from tollwatch.contract import table as contract
from tollwatch.contract.errors import TollwatchError
from tollwatch.contract.events import BackfillRequested, DatasetRefreshed, Window
from tollwatch.contract.result import MergeResult
from tollwatch.core.backfill import upstream_counts_by_day
from tollwatch.core.landing import LandingManifest, LandingZone
from tollwatch.core.ports import Landing, TableStore, UpstreamCounts, UpstreamMetadata, UpstreamRows
from tollwatch.core.schema import convert, dedupe_on_key, target_schema
from tollwatch.core.table import MAIN, TOUCHED

log = logging.getLogger(__name__)


class IngestRequest(BaseModel):
    """What one ingest run loads: a refresh (rows changed after a watermark) or a window of days."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    mode: Literal["refresh", "window"]
    domain: str
    dataset_id: str
    refresh_id: str
    rows_updated_at: int | None = None
    previous_rows_updated_at: int | None = None
    window: Window | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.mode == "window" and self.window is None:
            raise ValueError("a window ingest needs start and stop")
        if self.mode == "refresh" and self.rows_updated_at is None:
            raise ValueError("a refresh ingest needs rows_updated_at")
        return self

    @classmethod
    def for_refresh(cls, event: DatasetRefreshed) -> IngestRequest:
        return cls(
            mode="refresh",
            domain=event.domain,
            dataset_id=event.dataset_id,
            refresh_id=event.refresh_id,
            rows_updated_at=event.rows_updated_at,
            previous_rows_updated_at=event.previous_rows_updated_at,
            window=event.window,
        )

    @classmethod
    def for_window(cls, event: BackfillRequested) -> IngestRequest:
        return cls(
            mode="window",
            domain=event.domain,
            dataset_id=event.dataset_id,
            refresh_id=event.refresh_id,
            window=event.window,
        )

    @property
    def days_where(self) -> str | None:
        """The upstream filter on days: the window's, or none for a refresh (it is bounded by versions instead)."""
        if self.mode == "window" and self.window:
            return window_where(self.window.start, self.window.stop)
        return None

    @property
    def landing_scope(self) -> str:
        """The landing prefix every run of this refresh shares (its runs' pages, its announcement marker)."""
        return LandingZone.refresh_prefix(self.dataset_id, self.mode, self.window, self.refresh_id)

    def snapshot_properties(self, flow_run_id: str | None) -> dict[str, str]:
        """What every snapshot of this load records (the ledger)."""
        window = (self.window.start, self.window.stop) if self.window else None
        return contract.load_properties(self.refresh_id, self.mode, window, flow_run_id)


# ----------------------------------------------------------------------------------------------- plan


class FetchPlan(BaseModel):
    """What one load asks the upstream for, decided from the table's ledger rather than from the event.

    A refresh asks for the versions published after the ledger's high-water mark (`after`) and through its own
    publish (`through`): whatever runs were missed, lost or crashed since the last commit, this fetch covers them
    (its event's `previous_rows_updated_at` is information only), and a publish while it pages is not half in it
    but left whole to the next refresh.
    A window asks for its days as they are when it pages; `through` is the upstream's `rowsUpdatedAt` read before
    paging, which tells the commit a row deleted upstream (absent from the fetch, version at or before it) from a
    row published after the fetch (newer: kept). A window query has no version ceiling on purpose: a row revised
    while the window pages must stay in it, or it would look deleted.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    where: str
    after: int | None = None
    through: int
    #: A refresh whose ceiling the ledger has already passed (a later refresh committed it): nothing to fetch.
    covered: bool = False


def plan_fetch(request: IngestRequest, socrata: UpstreamMetadata, committed_through: int | None) -> FetchPlan:
    """The upstream query for `request`, given the ledger's mark (`IcebergTableStore.committed_through`)."""
    if request.mode == "window":
        through = socrata.metadata(request.dataset_id).rows_updated_at
        assert request.days_where is not None  # a window request always has its days
        return FetchPlan(where=request.days_where, through=through)
    through = request.rows_updated_at
    assert through is not None  # IngestRequest validates a refresh has it
    after = committed_through
    if after is not None and after >= through:
        log.info(
            "refresh %s (rowsUpdatedAt %s) is already covered: the table is committed through %s",
            request.refresh_id,
            through,
            after,
        )
        return FetchPlan(where=updated_between_where(after, through), after=after, through=through, covered=True)
    if after != request.previous_rows_updated_at:
        log.warning(
            "refresh %s: the table is committed through %s while its event says the previous publish was %s; "
            "fetching from the committed mark (covers every refresh that never completed)",
            request.refresh_id,
            after,
            request.previous_rows_updated_at,
        )
    return FetchPlan(where=updated_between_where(after, through), after=after, through=through)


def ceiling(manifest: LandingManifest) -> int | None:
    """The versions a load's reconciliation counts upstream: a refresh's, through its publish (a later publish is
    the next refresh's, not a difference); a window's, all of them (its query has no version ceiling: a row
    published while it paged is in it, see FetchPlan)."""
    return manifest.through if manifest.mode == "refresh" else None


def upstream_days(socrata: UpstreamCounts, request: IngestRequest, plan: FetchPlan) -> dict[date, int]:
    """The upstream's rows per day of the days a load will touch, known before it is merged: a window's days; a
    refresh's are the days of the versions it fetches (`plan.where`), counted whole (every row of each day)."""
    if request.window is not None and request.mode == "window":
        return upstream_counts_by_day(socrata, request.dataset_id, request.window)
    days = socrata.counts_by_day(request.dataset_id, where=plan.where)
    if not days:
        return {}
    span = Window(start=min(days), stop=date.fromordinal(max(days).toordinal() + 1))
    counts = upstream_counts_by_day(socrata, request.dataset_id, span, through=plan.through)
    return {day: n for day, n in counts.items() if day in days}


# ----------------------------------------------------------------------------------------------- fetch


class UnaccountedRowsError(TollwatchError):
    """A fetch whose rows do not match the upstream's count(*) for the same query: nothing is committed."""


#: Pagings of one load when the upstream changes rows inside its query while it pages (revisions, deletions).
FETCH_ATTEMPTS = 3


def fetch_and_land(
    request: IngestRequest,
    plan: FetchPlan,
    socrata: UpstreamRows,
    landing: Landing,
    *,
    run_id: str,
    page_size: int,
) -> LandingManifest:
    """Stream matching rows from the upstream into the landing zone, one page at a time, then seal it.

    The load accounts for its rows before anything is committed: the upstream's count(*) for the same query is
    asked before and after paging. Equal counts mean the set did not change while it was paged, and the fetch must
    then hold exactly that many rows. When it changed (rows added to or removed from the query while it was paged:
    offset paging may then have skipped or repeated a row), the landing is paged again; rows that cannot be
    accounted for fail the run with both numbers, and no manifest is written for them, so nothing is committed.
    """
    landing.ensure_container()
    prefix = landing.prefix_for(request.dataset_id, request.mode, request.window, request.refresh_id, run_id)
    for attempt in range(1, FETCH_ATTEMPTS + 1):
        manifest = LandingManifest(
            dataset=request.dataset_id,
            mode=request.mode,
            refresh_id=request.refresh_id,
            run_id=run_id,
            window=request.window,
            where=plan.where,
            container=landing.container_name,
            prefix=prefix,
            after=plan.after,
            through=plan.through,
        )
        counted_before = socrata.count(request.dataset_id, where=plan.where)
        columns: set[str] = set()
        for page in socrata.pages(request.dataset_id, where=plan.where, page_size=page_size):
            manifest.pages.append(landing.put_page(prefix, page))
            columns |= page.columns
            log.info("landed page %d: %d rows (%d rows so far)", page.number, page.row_count, manifest.rows)
        counted_after = socrata.count(request.dataset_id, where=plan.where)
        if counted_before == counted_after == manifest.rows:
            manifest.columns = sorted(columns)
            manifest.upstream_rows = counted_after
            landing.put_manifest(manifest)
            log.info(
                "sealed landing %s: %d pages, %d rows = the upstream's count(*)",
                landing.uri(prefix),
                len(manifest.pages),
                manifest.rows,
            )
            return manifest
        if counted_before == counted_after:
            raise UnaccountedRowsError(
                f"fetched {manifest.rows} rows but the upstream counts {counted_after} for the same query "
                f"({plan.where}); nothing was committed"
            )
        log.warning(
            "the upstream changed rows of this query while it was paged (count %d before, %d after, %d fetched); "
            "paging again (attempt %d of %d)",
            counted_before,
            counted_after,
            manifest.rows,
            attempt,
            FETCH_ATTEMPTS,
        )
    raise UnaccountedRowsError(
        f"the upstream kept changing rows of this query while it was paged ({FETCH_ATTEMPTS} pagings; last: count "
        f"{counted_before} before, {counted_after} after, {manifest.rows} fetched); nothing was committed, a later "
        "run tries again"
    )


# ----------------------------------------------------------------------------------------------- load


@dataclass
class LoadResult:
    """What a load did, for the completion event and the artifact."""

    snapshot_id: int | None
    rows_read: int
    rows_written: int
    rows_rejected: int
    already_committed: bool = False
    reject_reasons: Counter[str] = field(default_factory=Counter)
    rows_per_day_plaza: Counter[tuple[date, int]] = field(default_factory=Counter)
    rejected_blobs: list[str] = field(default_factory=list)
    #: The days the load replaced or merged, what downstream recomputes (for a load found in the ledger: the
    #: days its commit recorded; None when that commit predates the record or wrote nothing).
    touched: Window | None = None
    #: The ledger's high-water mark after this load (see tollwatch.core.table.COMMITTED_THROUGH).
    committed_through: int | None = None
    #: A load audited where it was merged (Databricks, `tollwatch-merge --audit`): whether it reached `main`, the
    #: checks' summary, its branch, and an earlier operator settlement of this refresh.
    published: bool = True
    quality: dict[str, Any] | None = None
    branch: str | None = None
    settled: dict[str, Any] | None = None

    @classmethod
    def from_merge(cls, printed: MergeResult, rows_landed: int) -> Self:
        """What a Spark merge reported (spark-submit and Databricks alike); a replay reports the landing's rows as
        read."""
        touched = contract.decode_days(printed.touched)
        return cls(
            snapshot_id=printed.snapshot_id,
            rows_read=rows_landed if printed.already_committed else printed.rows_read,
            rows_written=printed.rows_written,
            rows_rejected=printed.rows_rejected,
            already_committed=printed.already_committed,
            reject_reasons=Counter(printed.rejected_by_reason),
            touched=Window(start=touched[0], stop=touched[1]) if touched else None,
            committed_through=printed.committed_through,
            published=printed.published,
            quality=printed.quality,
            branch=printed.branch,
            settled=printed.settled,
        )


def covered_load(store: TableStore) -> LoadResult:
    """A refresh whose publish a later load already committed: nothing to fetch or commit, and nothing new for
    subscribers (announced as already committed, at the table's current snapshot)."""
    info = store.info()
    return LoadResult(info.snapshot_id, 0, 0, 0, already_committed=True, committed_through=store.committed_through())


def previous_load(request: IngestRequest, store: TableStore, landing: Landing) -> LoadResult | None:
    """The load of this refresh already in the table, if any: a re-run commits nothing.

    `already_committed` is False only for a load with days to recompute whose completion was never announced:
    a run killed between its commit and its announcement left subscribers (which skip replays) unaware of a
    snapshot they never saw, so its re-run announces that load as news, with its snapshot and days and the same
    deterministic event id (a first announcement that did get through is dropped by Prefect as a duplicate).
    A load committed before days were recorded (an older tollwatch) stays a replay, as it was then.
    """
    load = store.committed_load(request.refresh_id)
    if load is None:
        return None
    unannounced = load.touched is not None and not landing.is_announced(request.landing_scope)
    return LoadResult(
        load.snapshot_id,
        0,
        0,
        0,
        already_committed=not unannounced,
        touched=load.touched,
        committed_through=store.committed_through(),
    )


class _MonthSpool:
    """Typed good rows split by month into local parquet files (bounded memory between pages and commit)."""

    def __init__(self, directory: Path, schema: pa.Schema) -> None:
        self._dir = directory
        self._schema = schema
        self._writers: dict[str, pq.ParquetWriter] = {}
        self.first: date | None = None
        self.last: date | None = None

    def add(self, rows: pa.Table) -> None:
        if rows.num_rows == 0:
            return
        bounds = pc.min_max(rows["date"]).as_py()  # good rows always have a date
        self.first = bounds["min"] if self.first is None else min(self.first, bounds["min"])
        self.last = bounds["max"] if self.last is None else max(self.last, bounds["max"])
        months = pc.strftime(rows["date"], format="%Y-%m")
        for month in pc.unique(months).to_pylist():
            part = rows.filter(pc.equal(months, month))
            writer = self._writers.get(month)
            if writer is None:
                writer = pq.ParquetWriter(self._dir / f"{month}.parquet", self._schema, compression="zstd")
                self._writers[month] = writer
            writer.write_table(part)

    @property
    def touched(self) -> Window | None:
        """The days the spooled rows cover (stop exclusive), None when there are none."""
        if self.first is None or self.last is None:
            return None
        return Window(start=self.first, stop=date.fromordinal(self.last.toordinal() + 1))

    def months(self) -> Iterator[tuple[str, pa.Table]]:
        """Each month (`YYYY-MM`) with its rows, deduped on the key, oldest month first."""
        for writer in self._writers.values():
            writer.close()
        for month in sorted(self._writers):
            yield month, dedupe_on_key(pq.read_table(self._dir / f"{month}.parquet", schema=self._schema))


def load_landing(
    request: IngestRequest,
    manifest: LandingManifest,
    landing: Landing,
    store: TableStore,
    *,
    flow_run_id: str | None,
    branch: str = MAIN,
) -> LoadResult:
    """Type, quarantine and commit a sealed landing in one Iceberg commit to `branch` (a load's audit branch, see
    `tollwatch.core.wap`); a replayed refresh is a no-op, and a load a crashed run left on its branch is kept."""
    previous = store.committed_load(request.refresh_id, branch)
    if previous is not None:
        log.info("refresh %s already on %s as snapshot %s", request.refresh_id, branch, previous.snapshot_id)
        return LoadResult(
            previous.snapshot_id,
            manifest.rows,
            0,
            0,
            already_committed=branch == MAIN,
            touched=previous.touched,
            committed_through=store.committed_through(ref=branch),
        )

    schema = target_schema(manifest.columns)
    result = LoadResult(snapshot_id=0, rows_read=0, rows_written=0, rows_rejected=0)
    with tempfile.TemporaryDirectory(prefix="tollwatch-spool-") as tmp:
        spool = _MonthSpool(Path(tmp), schema)
        for number, body in landing.iter_pages(manifest):
            rows = orjson.loads(body)
            converted = convert(rows, schema, request.window)
            result.rows_read += len(rows)
            if converted.rejected:
                result.rejected_blobs.append(landing.put_rejected(manifest.prefix, number, converted.rejected))
                result.rows_rejected += len(converted.rejected)
                result.reject_reasons.update(r["reason"] for r in converted.rejected)  # type: ignore[misc]
            spool.add(converted.good)
        props = request.snapshot_properties(flow_run_id)
        result.touched = request.window or spool.touched  # a window load replaces all its days, even emptied ones
        if result.touched:
            props[TOUCHED] = contract.encode_days(result.touched.start, result.touched.stop)
        through = _fetched_through(request, manifest)
        result.snapshot_id = _commit(store, request, spool, schema, props, result, through, branch)
    if result.rows_rejected:
        log.warning("quarantined %d rows: %s", result.rows_rejected, dict(result.reject_reasons))
    result.committed_through = store.committed_through(ref=branch)
    log.info(
        "committed snapshot %s to %s: %d rows written; committed through rowsUpdatedAt %s",
        result.snapshot_id,
        branch,
        result.rows_written,
        result.committed_through,
    )
    return result


def _fetched_through(request: IngestRequest, manifest: LandingManifest) -> int:
    """The ceiling of the landed fetch; a landing sealed before ceilings were recorded is bounded by its refresh's
    publish, or (a window) by the moment it was sealed, which no version it could have held is newer than."""
    if manifest.through is not None:
        return manifest.through
    if request.rows_updated_at is not None:
        return request.rows_updated_at
    return int(manifest.landed_at.timestamp())


#: A concurrent writer committed first: the catalog refused our commit (CommitFailedException), or our delete
#: would hide files the other commit just added to the same partition (ValidationException).
COMMIT_CONFLICTS = (CommitFailedException, ValidationException)
COMMIT_ATTEMPTS = 6
#: A commit to an audit branch races a commit to another branch (another load publishing) without a failed ref
#: requirement: pyiceberg (checked on 0.12.0) then refuses the snapshot it built on the old metadata with this
#: ValueError instead of CommitFailedException. It is the same conflict, and the same rebuild answers it.
STALE_SEQUENCE = "older than last sequence number"


def is_commit_conflict(error: BaseException) -> bool:
    """Whether a commit failed because another commit landed first (rebuild it on the new table state)."""
    return isinstance(error, COMMIT_CONFLICTS) or (isinstance(error, ValueError) and STALE_SEQUENCE in str(error))


def _commit(
    store: TableStore,
    request: IngestRequest,
    spool: _MonthSpool,
    schema: pa.Schema,
    props: dict[str, str],
    result: LoadResult,
    through: int,
    branch: str,
) -> int:
    """One Iceberg commit; after a conflict with a concurrent load, rebuild it on the new table state.

    Two backfill chunks of the same month commit at the same time routinely (the deployment runs two at once):
    the loser re-reads the table and commits again, instead of failing the run.
    """
    for attempt in Retrying(
        stop=stop_after_attempt(COMMIT_ATTEMPTS),
        wait=wait_random_exponential(multiplier=0.2, max=5),
        retry=retry_if_exception(is_commit_conflict),
        before_sleep=lambda state: log.warning(
            "commit conflicted with a concurrent load (%s); retrying on the new table state", state.outcome.exception()
        ),
        reraise=True,
    ):
        with attempt:
            result.rows_written = 0
            result.rows_per_day_plaza.clear()
            written = _Counted(spool.months(), result)
            if request.mode == "window" and request.window:
                return store.commit_window(
                    request.window, written, schema, props, fetched_through=through, branch=branch
                )
            return store.commit_merge(written, schema, props, through=through, branch=branch)
    raise AssertionError("unreachable: Retrying re-raises the last conflict")


class _Counted:
    """Counts rows per day and plaza as months stream into the commit (for the artifact)."""

    def __init__(self, months: Iterator[tuple[str, pa.Table]], result: LoadResult) -> None:
        self._months = months
        self._result = result

    def __iter__(self) -> Iterator[tuple[str, pa.Table]]:
        return self

    def __next__(self) -> tuple[str, pa.Table]:
        month, batch = next(self._months)
        self._result.rows_written += batch.num_rows
        counts = batch.group_by(["date", "plaza_id"], use_threads=False).aggregate([([], "count_all")])
        for day, plaza, n in zip(
            counts["date"].to_pylist(), counts["plaza_id"].to_pylist(), counts["count_all"].to_pylist(), strict=True
        ):
            self._result.rows_per_day_plaza[(day, plaza)] += n
        return month, batch
