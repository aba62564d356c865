"""Operating commands: `deploy`, `backfill`, `trace`, `audit`, `status` (registered on the app in
tollwatch.cli.main)."""

from __future__ import annotations

import getpass
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Annotated, TypeVar
from uuid import UUID

import typer

from tollwatch.cli.common import LOCAL_STACK_FILE, StateDir, configure_logging, fail, use_stack
from tollwatch.cli.held import held_lines
from tollwatch.contract.settings import DEFAULT_STATE_DIR, load_settings
from tollwatch.prefect.observe import PrefectObserver, connect

if TYPE_CHECKING:
    from collections.abc import Callable

    from tollwatch.adapters.socrata import SocrataClient
    from tollwatch.contract.events import TollwatchEvent, Window
    from tollwatch.contract.quality import HoldRecord
    from tollwatch.contract.settings import Settings
    from tollwatch.core.audit import Reconciliation
    from tollwatch.core.table import TableInfo
    from tollwatch.prefect.follow import ChunkOutcome

R = TypeVar("R")

LocalStackOption = Annotated[bool, typer.Option(help="use the running local stack for unset settings")]


def _maybe_stack(local_stack: bool, state_dir: StateDir) -> None:
    if local_stack and (state_dir / LOCAL_STACK_FILE).exists():
        use_stack(state_dir)


# ---------------------------------------------------------------------------------------------- deploy


def deploy(
    target: Annotated[str, typer.Option(help="work pool definition in prefect.yaml: local or production")] = "local",
    local_stack: LocalStackOption = True,
    state_dir: StateDir = DEFAULT_STATE_DIR,
) -> None:
    """Create/update the target's work pool and deploy every deployment of prefect.yaml into it."""
    from tollwatch.prefect.deploy import deploy as run_deploy

    _maybe_stack(local_stack, state_dir)
    deployed = run_deploy(target)
    typer.echo(f"deployed {', '.join(d.name for d in deployed)} to target {target} (work pool {deployed[0].work_pool})")


# ---------------------------------------------------------------------------------------------- backfill


def backfill(
    start: Annotated[str, typer.Option(help="first day to load (YYYY-MM-DD)")],
    stop: Annotated[str, typer.Option(help="day after the last one (exclusive)")],
    chunk: Annotated[
        str,
        typer.Option(
            help="auto: whole months per run up to TOLLWATCH_BACKFILL_TARGET_ROWS upstream rows (asks the upstream "
            "for its counts); or one run per day, week, month or year"
        ),
    ] = "auto",
    reason: Annotated[str, typer.Option(help="why; shown on every chunk event")] = "",
    rerun: Annotated[bool, typer.Option(help="new request id: load again even if this exact request was made")] = False,
    wait: Annotated[bool, typer.Option(help="follow the runs until they end; exit 1 if any chunk failed")] = False,
    timeout: Annotated[float, typer.Option(help="seconds --wait waits for all chunks")] = 3600.0,
    local_stack: LocalStackOption = True,
    state_dir: StateDir = DEFAULT_STATE_DIR,
) -> None:
    """Request a backfill: one tollwatch.backfill.requested event per chunk (validated like POST /api/backfill).

    With `--chunk auto` (the default) the chunks are sized by the upstream's rows per day, and the plan is printed
    before anything is emitted.
    """
    from tollwatch import resources
    from tollwatch.core.backfill import BackfillLimits, Chunk, plan_backfill, validate_backfill

    _maybe_stack(local_stack, state_dir)
    settings = load_settings()
    request = validate_backfill(
        {"start": start, "stop": stop, "chunk": chunk, "reason": reason, "rerun": rerun},
        BackfillLimits.from_settings(settings),
    )
    counts = _upstream_counts_by_day(settings, request.window) if request.chunk is Chunk.AUTO else None
    plan = plan_backfill(
        request,
        domain=settings.upstream_domain,
        dataset_id=settings.upstream_dataset_id,
        requested_by=f"cli:{getpass.getuser()}",
        counts_by_day=counts,
        target_rows=settings.backfill_target_rows,
    )
    if plan.rows is not None:
        typer.echo(
            f"plan {request.window}: {len(plan.chunks)} auto chunk(s), {plan.total_rows:,} upstream rows "
            f"(target {settings.backfill_target_rows:,} rows per run, TOLLWATCH_BACKFILL_TARGET_ROWS)"
        )
        for window, rows in zip(plan.chunks, plan.rows, strict=True):
            typer.echo(f"  {window}  {rows:,} rows")
    emitter = resources.event_emitter(settings)
    started = _chunks_with_runs(plan.events)
    emitter.emit([event for event in plan.events if event.id not in started])
    typer.echo(
        f"backfill {plan.request_id}: {len(plan.events) - len(started)} {request.chunk} chunk event(s) emitted for "
        f"{request.window}{' (rerun)' if rerun else ''}"
        + (f"; {len(started)} chunk(s) already have a run (not requested again)" if started else "")
    )
    if not wait:
        for window, event in zip(plan.chunks, plan.events, strict=True):
            typer.echo(f"  {window}  event {event.id}")
        return
    outcomes = _follow_with_progress(plan.events, timeout, resend=emitter.emit)
    _print_outcomes(outcomes)
    failed = [o for o in outcomes if not o.succeeded]
    if failed:
        hint = ""
        if any(o.restartable for o in failed):
            hint = "; runs that could not start were requested again twice already: try again later with --rerun"
        fail(f"{len(failed)} of {len(outcomes)} chunk(s) did not complete{hint}")


def _upstream_counts_by_day(settings: Settings, window: Window) -> dict[date, int]:
    """The upstream's rows per day of `window`, for an auto plan; unreachable: one sentence, exit 1."""
    from tollwatch import resources
    from tollwatch.core.backfill import UpstreamCountsUnavailable, read_upstream_counts

    try:
        with resources.planning_socrata(settings) as socrata:
            return read_upstream_counts(socrata, settings.upstream_dataset_id, window)
    except UpstreamCountsUnavailable as exc:
        fail(
            f"could not plan auto chunks: {exc}; nothing was emitted — try again later, or choose a calendar size "
            "with --chunk month"
        )
        raise AssertionError("unreachable") from exc


def _chunks_with_runs(events: list[TollwatchEvent]) -> set[UUID]:
    """Ids of the chunk events that already started a run: the same command again must not start them twice.

    Prefect also drops an event id it has seen, but only while it remembers (in memory: a server restart
    forgets); the runs themselves are on record.
    """
    from tollwatch.prefect.follow import chunk_outcomes

    with connect() as obs:
        return {o.event_id for o in chunk_outcomes(obs, events) if o.flow_run_id is not None}


def _follow_with_progress(
    events: list, timeout_s: float, resend: Callable[[list[TollwatchEvent]], object]
) -> list[ChunkOutcome]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from tollwatch.prefect.follow import follow

    with (
        connect() as obs,
        Progress(
            TextColumn("[bold]chunks"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.description}"),
            transient=False,
        ) as progress,
    ):
        task = progress.add_task("", total=len(events))

        def update(outcomes: list[ChunkOutcome]) -> None:
            states = Counter(o.state.lower() for o in outcomes)
            progress.update(
                task,
                completed=sum(o.done for o in outcomes),
                description=", ".join(f"{n} {s}" for s, n in sorted(states.items())),
            )

        return follow(obs, events, timeout_s=timeout_s, on_progress=update, resend=resend)


def _print_outcomes(outcomes: list[ChunkOutcome]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="backfill")
    for column in ("chunk", "state", "rows", "duration", "flow run"):
        table.add_column(column, justify="right" if column in ("rows", "duration") else "left")
    for o in outcomes:
        rows = "" if o.rows_written is None else f"{o.rows_written:,}" + (" (replay)" if o.already_committed else "")
        state = o.state + (f" ({o.duplicate_runs + 1} runs)" if o.duplicate_runs else "")
        state += f" (requested {o.restarts + 1}x)" if o.restarts else ""
        table.add_row(
            f"[{o.start}, {o.stop})",
            state + (f": {o.message}" if o.message else ""),
            rows,
            "" if o.duration_s is None else f"{o.duration_s:.1f}s",
            o.flow_run_name or "",
        )
    Console().print(table)


# ---------------------------------------------------------------------------------------------- trace


def trace(
    some_id: Annotated[str, typer.Argument(metavar="ID", help="an event id or a flow run id along the chain")],
    wait: Annotated[float, typer.Option(help="seconds to wait for the chain to settle (0: print what exists)")] = 0,
    local_stack: LocalStackOption = True,
    state_dir: StateDir = DEFAULT_STATE_DIR,
) -> None:
    """Follow one publish or backfill chunk through events, automations and runs; print hop latencies."""
    from tollwatch.prefect.trace import build_trace

    try:
        wanted = UUID(some_id)
    except ValueError:
        fail(f"{some_id!r} is not an event or flow run id (a UUID)")
        return
    _maybe_stack(local_stack, state_dir)
    with connect() as obs:
        typer.echo(build_trace(obs, wanted).render() if not wait else settled_trace(obs, wanted, wait))


def settled_trace(obs: PrefectObserver, some_id: UUID, wait_s: float) -> str:
    """The trace once it stopped growing for a few seconds (or when `wait_s` is up)."""
    from tollwatch.prefect.trace import TraceError, build_trace

    deadline = time.monotonic() + wait_s
    rendered, stable_since = "", time.monotonic()
    while time.monotonic() < deadline:
        try:
            current = build_trace(obs, some_id).render()
        except TraceError:
            current = ""
        if current != rendered:
            rendered, stable_since = current, time.monotonic()
        elif rendered and time.monotonic() - stable_since > 3:
            break
        time.sleep(1)
    return rendered or build_trace(obs, some_id).render()


# ---------------------------------------------------------------------------------------------- audit

#: `tollwatch audit` exit codes, so a pipeline can gate on it.
AUDIT_MATCHES, AUDIT_DIFFERS, AUDIT_BAD_INPUT, AUDIT_COULD_NOT = 0, 1, 2, 3


def audit(
    start: Annotated[
        str | None, typer.Option(help="first day to audit (YYYY-MM-DD); default: the table's first day")
    ] = None,
    stop: Annotated[str | None, typer.Option(help="day after the last one (exclusive); default: tomorrow")] = None,
    repair: Annotated[bool, typer.Option(help="emit backfill events for exactly the days that differ")] = False,
    local_stack: LocalStackOption = True,
    state_dir: StateDir = DEFAULT_STATE_DIR,
) -> None:
    """Row counts per day, upstream against the table: list every day that differs; --repair requests them again.

    Exit code 0: every day matches; 1: days differ (also with --repair: their loads are requested, not done);
    2: a bad --start/--stop; 3: the audit could not be made (the upstream, the table or Prefect unreachable).
    """
    from tollwatch import resources
    from tollwatch.adapters.socrata import UpstreamError
    from tollwatch.contract.events import DATASET_EPOCH, Window
    from tollwatch.core.audit import first_day, reconcile

    first, last = _day_option(start, "--start"), _day_option(stop, "--stop")
    configure_logging(False)
    _maybe_stack(local_stack, state_dir)
    settings = load_settings()
    store = resources.table_store(settings)
    if first is None:
        first = _or_could_not("read the table", lambda: first_day(store)) or DATASET_EPOCH
    last = last or datetime.now(UTC).date() + timedelta(days=1)
    if last <= first:
        raise typer.BadParameter(
            f"{last} is not after {first}: the window [start, stop) is empty (stop is exclusive, default tomorrow)",
            param_hint="'--stop'",
        )
    window = Window(start=first, stop=last)

    def run() -> Reconciliation:
        try:
            return reconcile(resources.socrata_client(settings), store, settings.upstream_dataset_id, window)
        except UpstreamError as exc:
            raise _Unreachable("read the upstream", exc) from exc

    found = _or_could_not("read the table", run)
    for day in found.differing_days:
        typer.echo(f"{day.day}  upstream {day.upstream:,}  table {day.table:,}  ({day.describe()})")
    missing = sum(d.missing for d in found.differing_days if d.missing > 0)
    extra = sum(-d.missing for d in found.differing_days if d.missing < 0)
    totals = f"upstream {found.upstream_rows:,} rows, table {found.table_rows:,} rows"
    if found.matches:
        typer.echo(f"audit {window}: all {window.days:,} day(s) match; {totals}")
        if repair:
            typer.echo("nothing to repair")
        return
    typer.echo(
        f"audit {window}: {len(found.differing_days):,} of {window.days:,} day(s) differ "
        f"({missing:,} row(s) missing from the table, {extra:,} extra); {totals}"
    )
    if repair:
        _request_repair(settings, found)
    raise typer.Exit(AUDIT_DIFFERS)


class _Unreachable(Exception):
    def __init__(self, what: str, cause: BaseException) -> None:
        super().__init__(_why(cause))
        self.what = what


def _or_could_not(what: str, read: Callable[[], R]) -> R:
    """`read()`, or exit 3 with a sentence saying what could not be reached (never a traceback)."""
    try:
        return read()
    except typer.Exit:
        raise
    except _Unreachable as exc:
        what, why = exc.what, str(exc)
    except Exception as exc:  # any failure to reach a source ends the audit with a sentence, not a traceback
        why = _why(exc)
    typer.secho(f"error: could not audit: failed to {what} ({why})", fg="red", err=True)
    raise typer.Exit(AUDIT_COULD_NOT)


def _day_option(value: str | None, name: str) -> date | None:
    if value is None:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not a date as YYYY-MM-DD", param_hint=f"'{name}'") from None


def _request_repair(settings: Settings, found: Reconciliation) -> None:
    """Emit the repair events not requested before; print each with its id, window and what came of it so far."""
    from tollwatch import resources
    from tollwatch.adapters.prefect_events import EmitError
    from tollwatch.core.audit import repair_events, repair_request_id

    events = repair_events(
        found, settings.upstream_domain, settings.upstream_dataset_id, requested_by=f"audit:cli:{getpass.getuser()}"
    )
    earlier = _or_could_not("read Prefect's events", lambda: _earlier_requests(events))
    new = [event for event in events if event.id not in earlier]
    try:
        resources.event_emitter(settings).emit(new)
    except EmitError as exc:
        typer.secho(f"error: could not request the repair: {exc}", fg="red", err=True)
        raise typer.Exit(AUDIT_COULD_NOT) from None
    request_id = repair_request_id(found, settings.upstream_domain, settings.upstream_dataset_id)
    typer.echo(
        f"repair {request_id}: {len(new)} backfill event(s) emitted"
        + (f", {len(events) - len(new)} requested before (not again)" if earlier else "")
    )
    for event in events:
        window = f"[{event.payload['start']}, {event.payload['stop']})"
        typer.echo(f"  {window}  event {event.id}" + (f"  {earlier[event.id]}" if event.id in earlier else ""))


def _earlier_requests(events: list[TollwatchEvent]) -> dict[UUID, str]:
    """The events of this repair Prefect already holds (the same audit findings on the same table snapshot were
    requested before), each with what became of it."""
    from tollwatch.prefect.follow import TERMINAL, chunk_outcomes

    with connect() as obs:
        stored = {e.id for e in obs.events(ids=[e.id for e in events], limit=len(events))}
        outcomes = chunk_outcomes(obs, [e for e in events if e.id in stored]) if stored else []
    earlier = {}
    for o in outcomes:
        if o.flow_run_id is None:
            earlier[o.event_id] = "requested before; no run yet"
        elif o.state in TERMINAL and o.state != "COMPLETED":
            earlier[o.event_id] = (
                f"requested before; run {o.flow_run_name} ended {o.state}: request it again with "
                f"`tollwatch backfill --start {o.start} --stop {o.stop} --rerun`"
            )
        else:
            earlier[o.event_id] = f"requested before; run {o.flow_run_name} {o.state}"
    return earlier


# ---------------------------------------------------------------------------------------------- status

#: How many empty ranges `status` names before it summarises the rest.
GAPS_SHOWN = 5


@dataclass(frozen=True)
class _TableState:
    info: TableInfo
    committed_through: int | None
    days: dict[date, int]
    held: list[HoldRecord]


def status(local_stack: LocalStackOption = True, state_dir: StateDir = DEFAULT_STATE_DIR) -> None:
    """Announced, committed and upstream publish marks, the last refresh and ingest, the table; says when the table
    is behind the upstream or has days without rows.

    Each source (blob storage, the table, the upstream, Prefect) is read on its own: one that cannot be reached is
    named on its line and the rest is still shown.
    """
    from tollwatch import resources
    from tollwatch.core.audit import table_counts_by_day
    from tollwatch.core.branches import Branches

    configure_logging(False)
    _maybe_stack(local_stack, state_dir)
    settings = load_settings()
    now = datetime.now(UTC)
    # an interactive command: do not wait out the ingest's full retry budget for an unreachable upstream
    socrata = resources.socrata_client(
        settings.model_copy(update={"upstream_max_attempts": min(settings.upstream_max_attempts, 2)})
    )

    def read_table() -> _TableState:
        store = resources.table_store(settings)
        info = store.info()
        days = table_counts_by_day(store)[0] if info.snapshot_id is not None else {}
        return _TableState(info, store.committed_through(), days, Branches(store).held())

    def read_watermark() -> int | None:
        mark = resources.watermark_store(settings).read().value
        return None if mark is None else mark.rows_updated_at

    announced, announced_error = _reading(read_watermark)
    table, table_error = _reading(read_table)
    upstream, upstream_error = _reading(lambda: socrata.metadata(settings.upstream_dataset_id).rows_updated_at)

    if announced_error:
        _line("announced", f"unknown: blob storage unreachable ({announced_error})")
    elif announced is None:
        _line("announced", "none yet (the watcher has not announced a publish)")
    else:
        _line("announced", f"{_mark(announced)}  the last publish the watcher announced (watermark)")
    if table_error or table is None:
        _line("committed", f"unknown: the table is unreachable ({table_error})")
    elif table.committed_through is None:
        _line("committed", "none yet (no refresh has committed to the table)")
    else:
        _line("committed", f"{_mark(table.committed_through)}  every row version through it is in the table (ledger)")
    if upstream_error or upstream is None:
        _line("upstream", f"unknown: the upstream is unreachable ({upstream_error})")
    else:
        behind = "" if announced is None or upstream <= announced else "  ← not announced yet"
        _line("upstream", f"{_mark(upstream)}{behind}")

    _print_prefect_state()

    if table is None:
        _line("table", f"unknown: the table is unreachable ({table_error})")
        return
    info = table.info
    if info.snapshot_id is None:
        _line("table", f"{info.identifier} not created yet")
    else:
        lag = f" ({_ago(now - info.committed_at)} ago)" if info.committed_at else ""
        days = f"; days {min(table.days)} … {max(table.days)}" if table.days else ""
        _line("table", f"{info.identifier} snapshot {info.snapshot_id}, {info.rows:,} rows{lag}{days}")
    _print_lag(table.committed_through, upstream, announced, socrata, settings.upstream_dataset_id)
    if table.held:
        _line("held", f"{len(table.held)} load(s) failed their checks and are not published:")
        for line in held_lines(table.held, now, table.committed_through):
            typer.echo(f"    {line}")
    else:
        _line("held", "none (every audited load passed and is published)")
    if table.days:
        _print_gaps(table.days)


def _print_prefect_state() -> None:
    from tollwatch.contract.events import EventName

    try:
        with connect() as obs:
            refreshed = obs.events(names=[EventName.DATASET_REFRESHED], newest_first=True, limit=1)
            if refreshed:
                event = refreshed[0]
                _line("last refresh", f"{event.occurred:%Y-%m-%d %H:%M:%S}Z event {event.id}")
            else:
                _line("last refresh", "no tollwatch.dataset.refreshed event stored")
            runs = obs.latest_runs("ingest")
            if runs:
                run = runs[0]
                state = run.state.type.value if run.state else "?"
                _line("last ingest", f"{run.name} {state} at {run.start_time or run.expected_start_time}")
            else:
                _line("last ingest", "no ingest run yet")
    except Exception as exc:  # status reports on each source; one unreachable must not hide the others
        from prefect.settings import PREFECT_API_URL

        where = PREFECT_API_URL.value() or "(ephemeral)"
        _line("prefect", f"unreachable at {where} ({_why(exc)}): last refresh and last ingest unknown")


def _print_lag(
    committed: int | None, upstream: int | None, announced: int | None, socrata: SocrataClient, dataset_id: str
) -> None:
    """Whether the table holds every publish: the ledger's mark against the upstream's (or, unreachable, the
    announced one)."""
    from tollwatch.adapters.socrata import UpstreamError, updated_between_where

    latest, whose = (upstream, "upstream") if upstream is not None else (announced, "announced")
    if latest is None:
        return
    if committed is not None and committed >= latest:
        _line("lag", f"none: committed through the {whose} publish ({_mark(latest)})")
        return
    try:
        versions = f"{socrata.count(dataset_id, where=updated_between_where(committed, latest)):,} row versions"
    except UpstreamError:
        versions = "publishes the upstream could not count"
    if committed is None:
        _line("lag", f"no refresh committed yet: the next refresh will fetch every row version ({versions})")
        return
    _line(
        "lag",
        f"committed through {_utc(committed)}, {whose} at {_utc(latest)}: the table is behind by {versions}, "
        f"{_ago(timedelta(seconds=latest - committed))} of publishes — the next refresh will fetch from "
        f"{_utc(committed)}",
    )


def _print_gaps(days: dict[date, int]) -> None:
    """Days without rows between the table's first and last day: found from the table alone, no upstream asked."""
    from tollwatch.core.audit import empty_ranges

    first, last = min(days), max(days)
    gaps = empty_ranges(days)
    if not gaps:
        _line("gaps", f"none: every day from {first} to {last} holds rows")
        return
    shown = ", ".join(str(w) for w in gaps[:GAPS_SHOWN])
    more = f" and {len(gaps) - GAPS_SHOWN} more" if len(gaps) > GAPS_SHOWN else ""
    _line(
        "gaps",
        f"{sum(w.days for w in gaps):,} day(s) without rows between {first} and {last}, in {len(gaps)} range(s): "
        f"{shown}{more} — compare with the upstream and request them again: tollwatch audit --repair",
    )


def _reading(read: Callable[[], R]) -> tuple[R | None, str | None]:
    """`(value, None)`, or `(None, why)` when the source could not be read."""
    try:
        return read(), None
    except Exception as exc:  # status reports on each source; one unreachable must not hide the others
        return None, _why(exc)


def _why(exc: BaseException) -> str:
    """An error in one line: its type and the first line of its message."""
    message = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {message[0]}" if message else type(exc).__name__


def _line(label: str, text: str) -> None:
    typer.echo(f"{label:<15}: {text}")


def _utc(epoch_s: int) -> str:
    return f"{datetime.fromtimestamp(epoch_s, UTC):%Y-%m-%d %H:%M:%S}Z"


def _mark(epoch_s: int) -> str:
    """A publish mark as epoch seconds and UTC time."""
    return f"rowsUpdatedAt {epoch_s} ({_utc(epoch_s)})"


def _ago(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    if seconds < 2 * 86400:
        return f"{seconds // 3600}h"
    return f"{seconds // 86400}d"
