"""Backfill requests: validate a `{start, stop, chunk, reason}` request and plan one event per chunk.

UI-agnostic on purpose: the HTTP function and the CLI both call `parse_backfill` (or build a
`BackfillRequest` directly) and `plan_backfill`, then emit `plan.events` with whatever `EventSink` they
have. Refusals are field-level (`BackfillRejected.problems`) so any front end can point at the bad field.

Ids: the `request_id` is derived from the request itself, so a client that retries the same POST produces
the same chunk events and Prefect drops the duplicates; `rerun: true` asks for a fresh `request_id`, hence
new event ids and new runs, for when a window must be loaded again on purpose.
Calendar chunks are aligned to calendar boundaries (ISO weeks start on Monday), so the same day always falls
into the same chunk: `2024-01-15..2024-04-01` by month is `[01-15, 02-01) [02-01, 03-01) [03-01, 04-01)`.

`auto` chunks are sized by the upstream's rows per day (`upstream_counts_by_day`, one grouped `count(*)` per
year): whole months, contiguous, packed in order while a chunk stays at or under the target rows
per run (`TOLLWATCH_BACKFILL_TARGET_ROWS`); a month above the target is a chunk of its own. Only the window's own
first and last month may be partial. Days the upstream does not have belong to a chunk like any other (loading an
empty range removes rows deleted upstream), so the chunks cover the window with no gap or overlap. The same
counts give the same chunks, hence the same event ids; counts that changed (a publish, a deletion) may move the
boundaries after the change, and a moved chunk is a new event.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping
from datetime import UTC, date, datetime, timedelta
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from tollwatch.adapters.socrata import updated_between_where, window_where
from tollwatch.contract.errors import TollwatchError
from tollwatch.contract.events import DATASET_EPOCH, BackfillRequested, TollwatchEvent, Window, deterministic_id
from tollwatch.contract.settings import Settings
from tollwatch.core.ports import UpstreamCounts


class Chunk(StrEnum):
    """How a backfill window is split into runs: a calendar size, or `auto` (by the upstream's row counts)."""

    DAY = "day"
    WEEK = "week"
    MONTH = "month"
    YEAR = "year"
    AUTO = "auto"


class BackfillLimits(BaseModel):
    """What a request is checked against; `today` is explicit so validation is reproducible."""

    model_config = ConfigDict(frozen=True)

    today: date
    max_days: int = Field(3660, ge=1)
    max_chunks: int = Field(400, ge=1)

    @classmethod
    def from_settings(cls, settings: Settings, today: date | None = None) -> BackfillLimits:
        return cls(
            today=today or datetime.now(UTC).date(),
            max_days=settings.backfill_max_days,
            max_chunks=settings.backfill_max_chunks,
        )


#: How a request writes a date (ISO 8601 calendar date); anything else is refused, see `_written_as_iso_date`.
_ISO_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


def _limits(info: ValidationInfo) -> BackfillLimits:
    context = info.context
    if isinstance(context, BackfillLimits):
        return context
    return BackfillLimits(today=datetime.now(UTC).date())


def _problem(message: str, **values: Any) -> PydanticCustomError:
    return PydanticCustomError("backfill", message, values)


class BackfillRequest(BaseModel):
    """A request to (re)load `[start, stop)` in chunks. Validate with `BackfillLimits` as context."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    start: date = Field(description="first day to load (YYYY-MM-DD)")
    stop: date = Field(description="day after the last one to load (exclusive)")
    chunk: Chunk = Field(
        Chunk.AUTO, description="auto (runs sized by the upstream's row counts) or one run per day, week, month or year"
    )
    reason: str = Field("", max_length=500, description="why; shown on every chunk event")
    rerun: bool = Field(False, description="new request id: load again even if this exact request was made")

    @field_validator("start", "stop", mode="before")
    @classmethod
    def _written_as_iso_date(cls, value: Any) -> Any:
        """A date given as text must be written YYYY-MM-DD, as documented.

        Why: pydantic also reads a string of digits as epoch seconds or milliseconds, so `"1704067200"` was planned as
        2024-01-01 although the number 1704067200 is refused, and `"0"` was refused as "1970-01-01 is before the
        dataset begins", a date nobody wrote (found by tests/unit/test_fuzz_intake.py).
        """
        if not isinstance(value, str):
            return value  # a date (from Python), or a type the strict check refuses
        try:
            if _ISO_DATE.fullmatch(value):  # parsed here: strict mode takes text for a date from JSON only
                return date.fromisoformat(value)
        except ValueError:
            pass
        raise PydanticCustomError("date_parsing", "Input should be a valid date in the format YYYY-MM-DD")

    @field_validator("start")
    @classmethod
    def _start_in_history(cls, start: date, info: ValidationInfo) -> date:
        limits = _limits(info)
        if start < DATASET_EPOCH:
            raise _problem("{start} is before the dataset begins ({epoch})", start=str(start), epoch=str(DATASET_EPOCH))
        if start > limits.today:
            raise _problem("{start} is in the future (today is {today})", start=str(start), today=str(limits.today))
        return start

    @field_validator("stop")
    @classmethod
    def _stop_after_start(cls, stop: date, info: ValidationInfo) -> date:
        limits = _limits(info)
        latest = limits.today + timedelta(days=1)
        if stop > latest:
            raise _problem(
                "{stop} is in the future: stop is exclusive, so the latest is {latest} (through today)",
                stop=str(stop),
                latest=str(latest),
            )
        start = info.data.get("start")
        if start is None:  # start itself was invalid; its error already says why
            return stop
        if stop <= start:
            raise _problem("must be after start ({start}); stop is exclusive", start=str(start))
        days = (stop - start).days
        if days > limits.max_days:
            raise _problem(
                "the range covers {days} days, more than the maximum of {max_days} (TOLLWATCH_BACKFILL_MAX_DAYS)",
                days=days,
                max_days=limits.max_days,
            )
        return stop

    @field_validator("chunk")
    @classmethod
    def _not_too_many_chunks(cls, chunk: Chunk, info: ValidationInfo) -> Chunk:
        start, stop = info.data.get("start"), info.data.get("stop")
        if start is None or stop is None or chunk is Chunk.AUTO:  # auto: at most one chunk per month
            return chunk
        count = len(chunks(start, stop, chunk))
        limits = _limits(info)
        if count > limits.max_chunks:
            raise _problem(
                "{chunk} chunks would start {count} runs, more than {max_chunks} (TOLLWATCH_BACKFILL_MAX_CHUNKS); "
                "use a larger chunk",
                chunk=str(chunk),
                count=count,
                max_chunks=limits.max_chunks,
            )
        return chunk

    @property
    def window(self) -> Window:
        return Window(start=self.start, stop=self.stop)

    def request_id(self, domain: str, dataset_id: str) -> str:
        """Deterministic from what was asked (a retried POST dedupes); random for a deliberate rerun."""
        if self.rerun:
            return str(uuid.uuid4())
        return str(
            deterministic_id("backfill-request", domain, dataset_id, self.start, self.stop, self.chunk, self.reason)
        )


class FieldProblem(BaseModel):
    """One reason a request was refused, and the field it is about (`body` for the request as a whole)."""

    field: str
    reason: str


class BackfillRefusal(BaseModel):
    """The 400 body of a refused request: a fixed headline and every field-level problem."""

    error: str = Field(description="always 'invalid backfill request'")
    problems: list[FieldProblem] = Field(min_length=1, description="each refused field and why")


class BackfillRejected(TollwatchError, ValueError):
    """The request is invalid; `problems` say which fields and why."""

    status = 400

    def __init__(self, problems: list[FieldProblem]) -> None:
        super().__init__("; ".join(f"{p.field}: {p.reason}" for p in problems))
        self.problems = problems

    def refusal(self) -> BackfillRefusal:
        """What the HTTP function answers with (400)."""
        return BackfillRefusal(error="invalid backfill request", problems=self.problems)


def parse_backfill(body: bytes | str, limits: BackfillLimits) -> BackfillRequest:
    """Parse and validate a JSON request body; `BackfillRejected` with field-level reasons otherwise."""
    try:
        return BackfillRequest.model_validate_json(body, context=limits)
    except ValidationError as exc:
        raise BackfillRejected([_field_problem(error) for error in exc.errors()]) from None


def validate_backfill(values: dict[str, Any], limits: BackfillLimits) -> BackfillRequest:
    """The same checks for values that are not JSON (CLI options); dates may be ISO strings."""
    try:
        return BackfillRequest.model_validate_json(_to_json(values), context=limits)
    except ValidationError as exc:
        raise BackfillRejected([_field_problem(error) for error in exc.errors()]) from None


def _to_json(values: dict[str, Any]) -> str:
    return json.dumps({k: (v.isoformat() if isinstance(v, date) else v) for k, v in values.items()})


def _field_problem(error: Any) -> FieldProblem:
    kind, loc = error["type"], error["loc"]
    if kind == "json_invalid":
        return FieldProblem(field="body", reason=f"not valid JSON ({error['ctx'].get('error', 'parse error')})")
    if kind == "model_type":
        return FieldProblem(field="body", reason="must be a JSON object with start, stop, chunk and reason")
    field = ".".join(map(str, loc)) or "body"
    if kind == "extra_forbidden":
        return FieldProblem(field=field, reason="unknown field; expected start, stop, chunk, reason, rerun")
    if kind in {"date_from_datetime_parsing", "date_parsing", "date_type", "date_from_datetime_inexact"}:
        return FieldProblem(field=field, reason="must be a date as YYYY-MM-DD")
    return FieldProblem(field=field, reason=error["msg"])


# ---------------------------------------------------------------------------------------------- chunks


def _next_boundary(day: date, chunk: Chunk) -> date:
    if chunk is Chunk.AUTO:
        raise ValueError("auto chunks depend on the upstream's row counts: plan them with auto_chunks")
    if chunk is Chunk.DAY:
        return day + timedelta(days=1)
    if chunk is Chunk.WEEK:
        return day + timedelta(days=7 - day.weekday())  # next Monday
    if chunk is Chunk.MONTH:
        return date(day.year + 1, 1, 1) if day.month == 12 else date(day.year, day.month + 1, 1)
    return date(day.year + 1, 1, 1)


def chunks(start: date, stop: date, chunk: Chunk) -> list[Window]:
    """`[start, stop)` cut at calendar boundaries; the first and last chunk may be partial."""
    windows = []
    current = start
    while current < stop:
        following = min(_next_boundary(current, chunk), stop)
        windows.append(Window(start=current, stop=following))
        current = following
    return windows


class SizedChunk(BaseModel):
    """One `auto` chunk and the upstream rows it is expected to load."""

    model_config = ConfigDict(frozen=True)

    window: Window
    rows: int


def auto_chunks(start: date, stop: date, counts_by_day: Mapping[date, int], target_rows: int) -> list[SizedChunk]:
    """`[start, stop)` cut into contiguous runs of whole months, each at or under `target_rows` upstream rows.

    Months are packed in order; the next month starts a new chunk when it would take the current one over the
    target, so only a month that alone exceeds the target makes a chunk above it. Days absent from
    `counts_by_day` count 0 and are covered all the same.
    """
    if target_rows < 1:
        raise ValueError(f"target_rows must be at least 1, not {target_rows}")
    by_month: dict[tuple[int, int], int] = {}
    for day, n in counts_by_day.items():
        if start <= day < stop:
            by_month[day.year, day.month] = by_month.get((day.year, day.month), 0) + n
    sized: list[SizedChunk] = []
    first: date | None = None
    rows = 0
    for month in chunks(start, stop, Chunk.MONTH):
        month_rows = by_month.get((month.start.year, month.start.month), 0)
        if first is not None and rows + month_rows > target_rows:
            sized.append(SizedChunk(window=Window(start=first, stop=month.start), rows=rows))
            first, rows = None, 0
        if first is None:
            first = month.start
        rows += month_rows
    if first is not None:
        sized.append(SizedChunk(window=Window(start=first, stop=stop), rows=rows))
    return sized


#: The upstream is counted one calendar year per grouped query (at most 366 groups: one page).
COUNT_CHUNK = Chunk.YEAR
#: Attempts per count query when a person (CLI) or a caller (HTTP) waits for the plan: an unreachable upstream is
#: reported in seconds, not after the ingest's full retry budget.
PLANNING_ATTEMPTS = 2


class UpstreamCountsUnavailable(TollwatchError):
    """The upstream's row counts could not be read, so no `auto` plan could be made (nothing was emitted)."""

    status = 503


def upstream_counts_by_day(
    socrata: UpstreamCounts, dataset_id: str, window: Window, *, through: int | None = None
) -> dict[date, int]:
    """The upstream's rows per day of `window`: one grouped count query per calendar year; empty days absent.

    `through` (epoch seconds): only rows whose current version was published by then — the upstream as a load
    fetched it, so a publish after the fetch does not show as a difference in that load's audit.
    """
    counts: dict[date, int] = {}
    for part in chunks(window.start, window.stop, COUNT_CHUNK):
        where = window_where(part.start, part.stop)
        if through is not None:
            where = f"{where} AND {updated_between_where(None, through)}"
        for day, n in socrata.counts_by_day(dataset_id, where=where).items():
            if part.start <= day < part.stop and n:
                counts[day] = counts.get(day, 0) + n
    return counts


def read_upstream_counts(socrata: UpstreamCounts, dataset_id: str, window: Window) -> dict[date, int]:
    """`upstream_counts_by_day` for a planner someone waits on (`resources.planning_socrata` gives a client that
    tries each query at most PLANNING_ATTEMPTS times).

    Raises UpstreamCountsUnavailable with the cause in one sentence for any failure: the callers answer with it
    (CLI: exit 1; HTTP: 503 with Retry-After) and emit nothing.
    """
    try:
        return upstream_counts_by_day(socrata, dataset_id, window)
    except Exception as exc:  # every way of failing to count means the same to the caller: no plan yet
        raise UpstreamCountsUnavailable(f"the upstream's row counts could not be read ({exc})") from exc


# ---------------------------------------------------------------------------------------------- plan


class BackfillSummary(BaseModel):
    """What a requester is told about a plan (the HTTP function's 202 body)."""

    request_id: str = Field(description="deterministic from the request unless `rerun` was set")
    event_ids: list[str] = Field(description="one tollwatch.backfill.requested id per chunk, in chunk order")
    chunks: list[Window] = Field(description="the windows, contiguous, covering [start, stop)")
    rows: list[int] | None = Field(None, description="auto plans only: the upstream rows each chunk should load")


class BackfillPlan(BaseModel):
    """The events to emit for one request, and the summary to show the requester."""

    model_config = ConfigDict(frozen=True)

    request_id: str
    chunks: list[Window]
    events: list[TollwatchEvent]
    rows: list[int] | None = None
    """`auto` plans: the upstream rows each chunk is expected to load (None for calendar chunks)."""

    @property
    def total_rows(self) -> int | None:
        return None if self.rows is None else sum(self.rows)

    def summary(self) -> dict[str, Any]:
        """`{request_id, event_ids, chunks}` (+ `rows` per chunk for auto plans): what the HTTP function answers
        with 202."""
        summary = BackfillSummary(
            request_id=self.request_id, event_ids=[str(e.id) for e in self.events], chunks=self.chunks, rows=self.rows
        )
        return summary.model_dump(mode="json", exclude_none=True)


def chunk_event(
    window: Window, *, domain: str, dataset_id: str, request_id: str, requested_by: str, reason: str
) -> TollwatchEvent:
    """The `tollwatch.backfill.requested` of one chunk; its id depends only on the chunk and the request id."""
    return TollwatchEvent.of(
        BackfillRequested(
            domain=domain,
            dataset_id=dataset_id,
            start=window.start,
            stop=window.stop,
            request_id=request_id,
            requested_by=requested_by,
            reason=reason,
        )
    )


def plan_backfill(
    request: BackfillRequest,
    *,
    domain: str,
    dataset_id: str,
    requested_by: str,
    counts_by_day: Mapping[date, int] | None = None,
    target_rows: int | None = None,
) -> BackfillPlan:
    """One `tollwatch.backfill.requested` per chunk, with ids that depend only on chunk and request id.

    An `auto` request needs the upstream's `counts_by_day` over the request's window and the `target_rows`.
    """
    request_id = request.request_id(domain, dataset_id)
    rows: list[int] | None = None
    if request.chunk is Chunk.AUTO:
        if counts_by_day is None or target_rows is None:
            raise ValueError("an auto backfill plan needs the upstream's counts per day and the target rows per run")
        sized = auto_chunks(request.start, request.stop, counts_by_day, target_rows)
        windows, rows = [c.window for c in sized], [c.rows for c in sized]
    else:
        windows = chunks(request.start, request.stop, request.chunk)
    events = [
        chunk_event(
            window,
            domain=domain,
            dataset_id=dataset_id,
            request_id=request_id,
            requested_by=requested_by,
            reason=request.reason,
        )
        for window in windows
    ]
    return BackfillPlan(request_id=request_id, chunks=windows, events=events, rows=rows)
