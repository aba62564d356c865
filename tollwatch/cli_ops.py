"""Operating commands: `deploy`, `backfill`, `trace`, `status` (registered on the main app in tollwatch.cli)."""

from __future__ import annotations

import getpass
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Annotated
from uuid import UUID

import typer

from tollwatch.cli_common import StateDir, configure_logging, fail, use_stack
from tollwatch.observe import PrefectObserver, connect
from tollwatch.settings import DEFAULT_STATE_DIR, load_settings

if TYPE_CHECKING:
    from collections.abc import Callable

    from tollwatch.events import TollwatchEvent
    from tollwatch.follow import ChunkOutcome

LocalStackOption = Annotated[bool, typer.Option(help="use the running local stack for unset settings")]


def _maybe_stack(local_stack: bool, state_dir: StateDir) -> None:
    if local_stack and (state_dir / "stack.json").exists():
        use_stack(state_dir)


# ---------------------------------------------------------------------------------------------- deploy


def deploy(
    target: Annotated[str, typer.Option(help="work pool definition in prefect.yaml: local or production")] = "local",
    local_stack: LocalStackOption = True,
    state_dir: StateDir = DEFAULT_STATE_DIR,
) -> None:
    """Create/update the target's work pool and deploy every deployment of prefect.yaml into it."""
    from tollwatch.deploy import deploy as run_deploy

    _maybe_stack(local_stack, state_dir)
    output = run_deploy(target)
    names = [line.split("'")[1] for line in output.splitlines() if "Deployment '" in line and "'" in line]
    typer.echo(f"deployed {', '.join(dict.fromkeys(names)) or '(see prefect output)'} to target {target}")


# ---------------------------------------------------------------------------------------------- backfill


def backfill(
    start: Annotated[str, typer.Option(help="first day to load (YYYY-MM-DD)")],
    stop: Annotated[str, typer.Option(help="day after the last one (exclusive)")],
    chunk: Annotated[str, typer.Option(help="one run per day, week, month or year")] = "month",
    reason: Annotated[str, typer.Option(help="why; shown on every chunk event")] = "",
    rerun: Annotated[bool, typer.Option(help="new request id: load again even if this exact request was made")] = False,
    wait: Annotated[bool, typer.Option(help="follow the runs until they end; exit 1 if any chunk failed")] = False,
    timeout: Annotated[float, typer.Option(help="seconds --wait waits for all chunks")] = 3600.0,
    local_stack: LocalStackOption = True,
    state_dir: StateDir = DEFAULT_STATE_DIR,
) -> None:
    """Request a backfill: one tollwatch.backfill.requested event per chunk (validated like POST /api/backfill)."""
    from tollwatch import clients
    from tollwatch.backfill import BackfillLimits, plan_backfill, validate_backfill

    _maybe_stack(local_stack, state_dir)
    settings = load_settings()
    request = validate_backfill(
        {"start": start, "stop": stop, "chunk": chunk, "reason": reason, "rerun": rerun},
        BackfillLimits.from_settings(settings),
    )
    plan = plan_backfill(
        request,
        domain=settings.upstream_domain,
        dataset_id=settings.upstream_dataset_id,
        requested_by=f"cli:{getpass.getuser()}",
    )
    emitter = clients.event_emitter(settings)
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


def _chunks_with_runs(events: list[TollwatchEvent]) -> set[UUID]:
    """Ids of the chunk events that already started a run: the same command again must not start them twice.

    Prefect also drops an event id it has seen, but only while it remembers (in memory: a server restart
    forgets); the runs themselves are on record.
    """
    from tollwatch.follow import chunk_outcomes

    with connect() as obs:
        return {o.event_id for o in chunk_outcomes(obs, events) if o.flow_run_id is not None}


def _follow_with_progress(
    events: list, timeout_s: float, resend: Callable[[list[TollwatchEvent]], object]
) -> list[ChunkOutcome]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from tollwatch.follow import follow

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
    from tollwatch.trace import build_trace

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
    from tollwatch.trace import TraceError, build_trace

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


# ---------------------------------------------------------------------------------------------- status


def status(local_stack: LocalStackOption = True, state_dir: StateDir = DEFAULT_STATE_DIR) -> None:
    """Watermark, last refresh event, last ingest run, table snapshot and how far behind the upstream we are."""
    from tollwatch import clients
    from tollwatch.events import EventName
    from tollwatch.socrata import UpstreamError

    configure_logging(False)
    _maybe_stack(local_stack, state_dir)
    settings = load_settings()
    now = datetime.now(UTC)

    watermark = clients.watermark_store(settings).read().value
    if watermark is None:
        typer.echo("watermark      : none yet (the watcher has not announced a publish)")
    else:
        announced = datetime.fromtimestamp(watermark.rows_updated_at, UTC)
        typer.echo(f"watermark      : rowsUpdatedAt {watermark.rows_updated_at} ({announced:%Y-%m-%d %H:%M}Z)")
    try:
        upstream = clients.socrata_client(settings).metadata(settings.upstream_dataset_id).rows_updated_at
        behind = "" if watermark is None or upstream <= watermark.rows_updated_at else "  ← not announced yet"
        typer.echo(f"upstream       : rowsUpdatedAt {upstream}{behind}")
    except UpstreamError as exc:
        typer.echo(f"upstream       : unreachable ({exc})")

    with connect() as obs:
        refreshed = obs.events(names=[EventName.DATASET_REFRESHED], newest_first=True, limit=1)
        if refreshed:
            event = refreshed[0]
            typer.echo(f"last refresh   : {event.occurred:%Y-%m-%d %H:%M:%S}Z event {event.id}")
        else:
            typer.echo("last refresh   : no tollwatch.dataset.refreshed event stored")
        runs = obs.latest_runs("ingest")
        if runs:
            run = runs[0]
            state = run.state.type.value if run.state else "?"
            typer.echo(f"last ingest    : {run.name} {state} at {run.start_time or run.expected_start_time}")
        else:
            typer.echo("last ingest    : no ingest run yet")

    info = clients.table_store(settings).info()
    if info.snapshot_id is None:
        typer.echo(f"table          : {info.identifier} not created yet")
        return
    lag = f" ({_ago(now - info.committed_at)} ago)" if info.committed_at else ""
    typer.echo(f"table          : {info.identifier} snapshot {info.snapshot_id}, {info.rows:,} rows{lag}")


def _ago(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h"
