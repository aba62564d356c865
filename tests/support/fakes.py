"""In-memory stand-ins for the core's ports (tollwatch/core/ports.py), for the unit layer. Never in the product.

Each fake keeps what a test asserts on in plain attributes (what was emitted, landed, committed, written) and has a
knob for each way the real thing misbehaves that the core must survive (a failed emit, a race on a state blob, a
commit conflict, an upstream that changes while it is paged). They implement the ports, not the adapters: no
HTTP, no Blob Storage, no Iceberg. tests/unit/test_fakes.py holds them to the same contract as the real classes
where that can run offline (the table store) and to the ports' signatures.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import TypeVar

import orjson
import pyarrow as pa
from pydantic import BaseModel
from pyiceberg.exceptions import CommitFailedException

from tollwatch.adapters.blob_state import Versioned
from tollwatch.adapters.socrata import DatasetMetadata, Page, socrata_timestamp
from tollwatch.contract import table as contract
from tollwatch.contract.events import TollwatchEvent, Window
from tollwatch.core.landing import LandedPage, LandingManifest, LandingZone
from tollwatch.core.table import CommittedLoad, TableInfo

M = TypeVar("M", bound=BaseModel)

DATASET = "qzve-kjga"
DOMAIN = "data.ny.gov"


# ---------------------------------------------------------------------------------------------- events


class RecordingSink:
    """An `EventSink` that keeps every event it confirmed; `fail_next` makes the next emits raise instead."""

    def __init__(self) -> None:
        self.emitted: list[TollwatchEvent] = []
        self.batches: list[list[TollwatchEvent]] = []
        self._failures: list[BaseException] = []

    def fail_next(self, *errors: BaseException) -> None:
        """The next `len(errors)` calls raise these, in order, and deliver nothing."""
        self._failures.extend(errors)

    def emit(self, events: Sequence[TollwatchEvent]) -> None:
        if self._failures:
            raise self._failures.pop(0)
        self.batches.append(list(events))
        self.emitted.extend(events)

    @property
    def ids(self) -> list[str]:
        return [str(e.id) for e in self.emitted]

    def payloads(self) -> list[dict[str, object]]:
        return [e.payload for e in self.emitted]


# ---------------------------------------------------------------------------------------------- the upstream


def socrata_row(
    day: date,
    hour: int = 0,
    *,
    plaza: int = 1,
    direction: str = "I",
    e_zpass: int | str = 100,
    vtoll: int | str | None = 7,
    version: int = 1_700_000_000,
    row_id: str | None = None,
    **extra: str,
) -> dict[str, str]:
    """One upstream row as Socrata serves it: every value a string, with the `:id` and `:updated_at` system fields
    (`version` is the epoch second it was published at)."""
    row = {
        ":id": row_id or f"row-{plaza}-{day}-{hour:02d}-{direction}",
        ":updated_at": socrata_timestamp(version),
        "plaza_id": str(plaza),
        "date": f"{day.isoformat()}T00:00:00.000",
        "hour": str(hour),
        "direction": direction,
        "vehicles_e_zpass": str(e_zpass),
        **extra,
    }
    if vtoll is not None:
        row["vehicles_vtoll"] = str(vtoll)
    return row


def day_rows(day: date, *, version: int, hours: int = 24, **fields: object) -> list[dict[str, str]]:
    """Every hour of one plaza, one direction, on `day` (`hours` rows), all published at `version`."""
    return [socrata_row(day, hour, version=version, **fields) for hour in range(hours)]  # type: ignore[arg-type]


_CLAUSE = re.compile(r"^(?P<field>[:\w]+) (?P<op>>=|<=|>|<|=) '(?P<value>[^']*)'$")
_OPS: dict[str, Callable[[object, object], bool]] = {
    ">=": lambda a, b: a >= b,  # type: ignore[operator]
    "<=": lambda a, b: a <= b,  # type: ignore[operator]
    ">": lambda a, b: a > b,  # type: ignore[operator]
    "<": lambda a, b: a < b,  # type: ignore[operator]
    "=": lambda a, b: a == b,
}


def _typed(field_name: str, text: str) -> object:
    if field_name == "date":
        return date.fromisoformat(text[:10])
    if field_name in {":updated_at", ":created_at"}:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)
    return text


def matches(row: dict[str, str], where: str | None) -> bool:
    """Whether `row` satisfies a `$where` made of `field op 'literal'` clauses joined by AND (the forms the core
    builds: `window_where`, `updated_between_where`, `updated_after_where`). Anything else is refused, so a test
    never passes on a filter the fake did not understand."""
    if not where:
        return True
    for clause in where.split(" AND "):
        parsed = _CLAUSE.match(clause.strip())
        if parsed is None:
            raise ValueError(f"the fake upstream does not understand the $where clause {clause!r}")
        name, op, literal = parsed["field"], parsed["op"], parsed["value"]
        if name not in row or not _OPS[op](_typed(name, row[name]), _typed(name, literal)):
            return False
    return True


class FakeUpstream:
    """One Socrata dataset in memory: `UpstreamMetadata`, `UpstreamRows` and `UpstreamCounts`.

    Rows are served in `:id` order, paged like the real API; `requests` records every call as `(method, where)`.
    Knobs: `fail_next(method, error)`; `while_paging(action)` runs `action()` once the first page of the next
    paging is served (the upstream changing under a fetch); `hide_from_pages(row_id)` makes a row that counts
    see but paging never returns (rows a fetch cannot account for).
    """

    def __init__(self, rows: Iterable[dict[str, str]] = (), *, dataset_id: str = DATASET, rows_updated_at: int = 0):
        self.dataset_id = dataset_id
        self.rows: list[dict[str, str]] = list(rows)
        self.rows_updated_at = rows_updated_at or max((self._version(r) for r in self.rows), default=1)
        self.requests: list[tuple[str, str | None]] = []
        self._failures: dict[str, list[BaseException]] = {}
        self._while_paging: list[Callable[[], None]] = []
        self._hidden: set[str] = set()

    # ------------------------------------------------------------------ test controls

    @staticmethod
    def _version(row: dict[str, str]) -> int:
        return int(_typed(":updated_at", row[":updated_at"]).timestamp())  # type: ignore[attr-defined]

    def publish(self, rows: Iterable[dict[str, str]], at: int) -> None:
        """New or revised rows published at `at` (a revision replaces the row with the same `:id`)."""
        stamped = [{**row, ":updated_at": socrata_timestamp(at)} for row in rows]
        ids = {r[":id"] for r in stamped}
        self.rows = [r for r in self.rows if r[":id"] not in ids] + stamped
        self.rows_updated_at = at

    def delete(self, day: date, at: int) -> None:
        """Every row of `day` deleted upstream at `at`."""
        self.rows = [r for r in self.rows if _typed("date", r["date"]) != day]
        self.rows_updated_at = at

    def fail_next(self, method: str, *errors: BaseException) -> None:
        self._failures.setdefault(method, []).extend(errors)

    def while_paging(self, action: Callable[[], None]) -> None:
        self._while_paging.append(action)

    def hide_from_pages(self, row_id: str) -> None:
        self._hidden.add(row_id)

    def _call(self, method: str, dataset_id: str, where: str | None) -> list[dict[str, str]]:
        assert dataset_id == self.dataset_id, f"asked for {dataset_id}, this upstream serves {self.dataset_id}"
        self.requests.append((method, where))
        failures = self._failures.get(method)
        if failures:
            raise failures.pop(0)
        return sorted((r for r in self.rows if matches(r, where)), key=lambda r: r[":id"])

    # ------------------------------------------------------------------ the ports

    def metadata(self, dataset_id: str) -> DatasetMetadata:
        self._call("metadata", dataset_id, None)
        return DatasetMetadata(id=dataset_id, name="Hourly Traffic", rows_updated_at=self.rows_updated_at)

    def pages(self, dataset_id: str, *, where: str | None, page_size: int = 50_000) -> Iterator[Page]:
        rows = [r for r in self._call("pages", dataset_id, where) if r[":id"] not in self._hidden]
        for number, offset in enumerate(range(0, len(rows), page_size)):
            part = rows[offset : offset + page_size]
            yield Page(
                number=number,
                offset=offset,
                body=orjson.dumps(part),
                row_count=len(part),
                columns=frozenset(k for row in part for k in row),
            )
            if number == 0 and self._while_paging:
                self._while_paging.pop(0)()

    def count(self, dataset_id: str, *, where: str | None) -> int:
        return len(self._call("count", dataset_id, where))

    def counts_by_day(self, dataset_id: str, *, where: str | None) -> dict[date, int]:
        counts: dict[date, int] = {}
        for row in self._call("counts_by_day", dataset_id, where):
            day = _typed("date", row["date"])
            counts[day] = counts.get(day, 0) + 1  # type: ignore[index]
        return counts


class CountsUpstream:
    """`UpstreamCounts` from a fixed table of rows per day (for planning over years of history in memory)."""

    def __init__(self, counts: dict[date, int], *, dataset_id: str = DATASET) -> None:
        self.counts = dict(counts)
        self.dataset_id = dataset_id
        self.wheres: list[str | None] = []
        self._failures: list[BaseException] = []

    def fail_next(self, *errors: BaseException) -> None:
        self._failures.extend(errors)

    def counts_by_day(self, dataset_id: str, *, where: str | None) -> dict[date, int]:
        assert dataset_id == self.dataset_id
        self.wheres.append(where)
        if self._failures:
            raise self._failures.pop(0)
        probe = {day: {"date": f"{day.isoformat()}T00:00:00.000"} for day in self.counts}
        return {day: n for day, n in self.counts.items() if matches(probe[day], where)}


# ---------------------------------------------------------------------------------------------- the landing zone


class FakeLanding:
    """The landing zone of one container in memory (`Landing`): pages, manifests, quarantine, announcements.

    Blob names are the real zone's (`LandingZone.prefix_for`), so what a test reads is what production writes.
    """

    container_name = "landing"

    def __init__(self) -> None:
        self.pages: dict[str, bytes] = {}
        self.manifests: dict[str, LandingManifest] = {}
        self.rejected: dict[str, list[dict[str, object]]] = {}
        self.announced: set[str] = set()
        self.containers_ensured = 0

    def ensure_container(self) -> None:
        self.containers_ensured += 1

    def prefix_for(self, dataset: str, mode: str, window: Window | None, refresh_id: str, run_id: str) -> str:
        return LandingZone.prefix_for(dataset, mode, window, refresh_id, run_id)

    def uri(self, prefix: str) -> str:
        return f"memory://{self.container_name}/{prefix.strip('/')}/"

    def put_page(self, prefix: str, page: Page) -> LandedPage:
        name = f"{prefix}/page-{page.number:05d}.json"
        self.pages[name] = page.body
        return LandedPage(blob=name, rows=page.row_count, bytes_raw=len(page.body), bytes_stored=len(page.body))

    def put_manifest(self, manifest: LandingManifest) -> str:
        self.manifests[manifest.prefix] = manifest.model_copy(deep=True)
        return f"{manifest.prefix}/manifest.json"

    def iter_pages(self, manifest: LandingManifest) -> Iterator[tuple[int, bytes]]:
        for number, page in enumerate(manifest.pages):
            yield number, self.pages[page.blob]

    def put_rejected(self, prefix: str, page_number: int, rejected: list[dict[str, object]]) -> str:
        name = f"{prefix.replace('raw/', 'rejected/', 1)}/page-{page_number:05d}.ndjson"
        self.rejected[name] = list(rejected)
        return name

    def is_announced(self, refresh_prefix: str) -> bool:
        return refresh_prefix.rstrip("/") in self.announced

    # what the flow does after announcing (not a port of the core's)
    def mark_announced(self, refresh_prefix: str) -> None:
        self.announced.add(refresh_prefix.rstrip("/"))


# ---------------------------------------------------------------------------------------------- the table


@dataclass
class Commit:
    """One commit the fake table store accepted: what a load wrote and what its snapshot records."""

    snapshot_id: int
    kind: str  # "window" | "merge"
    properties: dict[str, str]
    rows: pa.Table | None
    window: Window | None = None
    through: int | None = None
    months: list[str] = field(default_factory=list)
    branch: str = contract.MAIN


class FakeTableStore:
    """The table's ledger in memory (`TableStore`): one snapshot per commit with the properties it records.

    It keeps what was written (`commits`), not a merged table: merging rows is `IcebergTableStore`'s job and has
    its own tests (tests/unit/test_versions.py). Like the real store, every snapshot carries the ledger's
    high-water mark (a window commit carries the current one forward, a merge raises it to its `through`).
    `conflict_next(n)`: the next `n` commits lose to a concurrent writer (pyiceberg's CommitFailedException)
    after consuming their rows, as a real commit attempt does.
    """

    identifier = "bronze.bnt_traffic_hourly"

    def __init__(self) -> None:
        self.commits: list[Commit] = []
        self.attempts = 0
        self._conflicts = 0
        self._ids = itertools.count(1001)

    def conflict_next(self, times: int = 1) -> None:
        self._conflicts += times

    # ------------------------------------------------------------------ test setup

    def record(self, properties: dict[str, str], *, through: int | None = None) -> int:
        """A commit made earlier (by another load or engine): just its ledger entry."""
        props = dict(properties)
        self._carry_mark(props, through)
        commit = Commit(next(self._ids), "seed", props, None, through=through)
        self.commits.append(commit)
        return commit.snapshot_id

    # ------------------------------------------------------------------ the port

    def info(self) -> TableInfo:
        last = self.commits[-1] if self.commits else None
        rows = sum(c.rows.num_rows for c in self.commits if c.rows is not None)
        return TableInfo(
            self.identifier, "memory://warehouse", last.snapshot_id if last else None, rows, len(self.commits)
        )

    def committed(self, refresh_id: str) -> int | None:
        load = self.committed_load(refresh_id)
        return None if load is None else load.snapshot_id

    def committed_load(self, refresh_id: str, ref: str = contract.MAIN) -> CommittedLoad | None:
        found = [c for c in self.commits if c.properties.get(contract.REFRESH_ID) == refresh_id and c.branch == ref]
        if not found:
            return None
        latest = found[-1]
        touched = contract.decode_days(latest.properties.get(contract.TOUCHED))
        return CommittedLoad(
            snapshot_id=latest.snapshot_id,
            flow_run_id=latest.properties.get(contract.FLOW_RUN_ID),
            touched=Window(start=touched[0], stop=touched[1]) if touched else None,
        )

    def committed_through(self, table: object = None, ref: str = contract.MAIN) -> int | None:
        for commit in reversed(self.commits):
            if commit.properties.get(contract.COMMITTED_THROUGH):
                return int(commit.properties[contract.COMMITTED_THROUGH])
        return None

    def commit_window(
        self,
        window: Window,
        months: Iterable[tuple[str, pa.Table]],
        schema: pa.Schema,
        properties: dict[str, str],
        *,
        fetched_through: int,
        branch: str = contract.MAIN,
    ) -> int:
        return self._commit("window", months, properties, window=window, through=fetched_through, branch=branch)

    def commit_merge(
        self,
        months: Iterable[tuple[str, pa.Table]],
        schema: pa.Schema,
        properties: dict[str, str],
        *,
        through: int,
        branch: str = contract.MAIN,
    ) -> int:
        return self._commit("merge", months, properties, through=through, branch=branch)

    # ------------------------------------------------------------------ internals

    def _carry_mark(self, properties: dict[str, str], raise_to: int | None) -> None:
        marks = [m for m in (self.committed_through(), raise_to) if m is not None]
        if marks:
            properties[contract.COMMITTED_THROUGH] = str(max(marks))
        else:
            properties.pop(contract.COMMITTED_THROUGH, None)

    def _commit(
        self,
        kind: str,
        months: Iterable[tuple[str, pa.Table]],
        properties: dict[str, str],
        *,
        window: Window | None = None,
        through: int,
        branch: str = contract.MAIN,
    ) -> int:
        self.attempts += 1
        consumed = list(months)
        if self._conflicts:
            self._conflicts -= 1
            raise CommitFailedException("a concurrent load committed first (injected by FakeTableStore)")
        self._carry_mark(properties, through if kind == "merge" else None)  # on the caller's dict, as the real one
        props = dict(properties)
        tables = [t for _, t in consumed]
        rows = pa.concat_tables(tables, promote_options="default") if tables else None
        commit = Commit(
            next(self._ids),
            kind,
            props,
            rows,
            window=window,
            through=through,
            months=[m for m, _ in consumed],
            branch=branch,
        )
        self.commits.append(commit)
        return commit.snapshot_id


# ---------------------------------------------------------------------------------------------- state


class FakeJsonState:
    """`JsonState` in memory: documents with an ETag that changes on every write; conditional writes as Blob
    Storage does them (`expected_etag=None` creates only if absent).

    Knobs: `before_write(action)` runs `action()` right before the next write is judged (another writer getting
    there first); `fail_next(error)` makes the next read or write raise (storage unreachable).
    """

    def __init__(self) -> None:
        self.docs: dict[str, tuple[str, str]] = {}
        self.writes: list[str] = []
        self._etags = itertools.count(1)
        self._before_write: list[Callable[[], None]] = []
        self._failures: list[BaseException] = []

    def before_write(self, action: Callable[[], None]) -> None:
        self._before_write.append(action)

    def fail_next(self, *errors: BaseException) -> None:
        self._failures.extend(errors)

    def put(self, name: str, value: BaseModel) -> str:
        """Store a document unconditionally (test setup, or another writer); returns its new ETag."""
        etag = f'"etag-{next(self._etags)}"'
        self.docs[name] = (value.model_dump_json(), etag)
        return etag

    def read(self, name: str, model: type[M]) -> Versioned[M]:
        if self._failures:
            raise self._failures.pop(0)
        if name not in self.docs:
            return Versioned(None, None)
        text, etag = self.docs[name]
        return Versioned(model.model_validate_json(text), etag)

    def write(self, name: str, value: BaseModel, *, expected_etag: str | None) -> bool:
        if self._failures:
            raise self._failures.pop(0)
        if self._before_write:
            self._before_write.pop(0)()
        current = self.docs.get(name)
        if (expected_etag is None and current is not None) or (
            expected_etag is not None and (current is None or current[1] != expected_etag)
        ):
            return False
        self.put(name, value)
        self.writes.append(name)
        return True
