"""Latency and orchestration throughput through the real local Prefect server (figures 1, 2, 3a and 4).

Every number is measured on a stack of its own, started here: Azurite, a Prefect server on SQLite, the
Socrata mirror, a process worker (and, tuned, the warm server), with prefect.yaml deployed and automations/
applied — the same path production events take. Times come from Prefect's own records: the emitter's
confirmed POST on one side, the flow run's state history on the other.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx

from bench.common import Figure, cpu_by_service, summary
from tollwatch.adapters.prefect_events import PrefectEventsEmitter
from tollwatch.adapters.socrata import SocrataClient, build_http_client
from tollwatch.contract.events import BackfillRequested, DatasetRefreshed, TollwatchEvent, Window
from tollwatch.contract.settings import Settings
from tollwatch.core.backfill import Chunk, auto_chunks, chunks, upstream_counts_by_day
from tollwatch.prefect.observe import PrefectObserver, connect
from tollwatch_dev.stack import LocalStack, StackEndpoints

DOMAIN, DATASET = "data.ny.gov", "qzve-kjga"


@dataclass
class BenchStack:
    endpoints: StackEndpoints
    emitter: PrefectEventsEmitter
    state_dir: Path
    pids: dict[str, int] = field(default_factory=dict)

    def cpu_by_service(self) -> dict[str, float]:
        """CPU seconds each of the stack's services has used so far (bench.common.cpu_by_service)."""
        return cpu_by_service(self.pids)

    def server_cpu_s(self) -> float:
        """CPU seconds the Prefect server process has used so far."""
        return self.cpu_by_service().get("prefect", 0.0)

    def server_errors(self) -> dict[str, int]:
        """What the Prefect server answered with an error so far, from its log (the stack sets
        PREFECT_SERVER_LOG_RETRYABLE_ERRORS): 503s (retryable: SQLite's "database is locked", a dropped connection)
        and 500s. Counts requests from the network and from the server's own in-process clients alike."""
        log = self.state_dir / "logs" / "prefect.log"
        text = log.read_text(errors="replace") if log.exists() else ""
        return {
            "503": text.count("Encountered retryable exception in request"),
            "500": text.count("Encountered exception in request"),
        }

    def emit(self, *events: TollwatchEvent) -> float:
        """Send and return the moment the server confirmed (the start of every latency measured here)."""
        self.emitter.emit(list(events))
        return time.time()


@contextmanager
def bench_stack(
    *,
    tuned: bool,
    mirror_start: date,
    mirror_through: date,
    automations: bool = False,
    db: str = "postgres",
    plain_server: bool = False,
    overrides: dict[str, dict[str, str]] | None = None,
) -> Iterator[BenchStack]:
    """A fresh stack: tuned = 0.5 s worker polling + warm runs; untuned = Prefect's default polling, cold runs,
    and no ingest concurrency limit (see `_lift_ingest_limit`)."""
    from prefect.settings import temporary_settings

    from tollwatch.cli.automations import DEFAULT_AUTOMATIONS_DIR, run_apply
    from tollwatch.prefect.deploy import deploy, ensure_work_pool, work_pool_spec
    from tollwatch_dev.local_blocks import ensure_local_blocks

    services = ("azurite", "prefect", "mirror", "inbox", "warm", "worker") if tuned else (
        "azurite", "prefect", "mirror", "inbox", "worker")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="tollwatch-bench-") as tmp:
        stack = LocalStack(
            Path(tmp),
            services=services,
            prefect_ui=False,
            mirror_start=mirror_start,
            mirror_through=mirror_through,
            worker_tuning=tuned,
            db=db,
            plain_server=plain_server,
            overrides=overrides,
        )
        saved = dict(os.environ)
        try:
            endpoints = stack.up()
            os.environ.update(endpoints.env())
            with temporary_settings(updates=endpoints.prefect_settings()):
                deploy("local")
                if not tuned:
                    ensure_work_pool(work_pool_spec("local").model_copy(update={"warm": False}))
                    _lift_ingest_limit()
                if automations:
                    ensure_local_blocks(endpoints.inbox_url)
                    run_apply(DEFAULT_AUTOMATIONS_DIR, dry_run=False, prune=False, api_url=endpoints.prefect_api_url)
                http = httpx.Client(timeout=30)
                pids = {name: st.pid for name, st in stack.status().items() if st.pid is not None}
                yield BenchStack(
                    endpoints,
                    PrefectEventsEmitter(http, endpoints.prefect_api_url, auth_string=endpoints.prefect_auth_string),
                    Path(tmp),
                    pids,
                )
        finally:
            stack.down()
            os.environ.clear()
            os.environ.update(saved)


def _lift_ingest_limit() -> None:
    """Drop the ingest deployment's and queue's limit of 2 (the untuned baseline of figure 1 only).

    Why: with 10 s polling, the runs of one poll start together; behind a limit of 2 the rest wait for a later
    poll, and the baseline then measures queueing (p50 19 s in earlier runs) rather than polling + a cold
    process. Without the limit the baseline is the fair one, and its samples can be as close as the tuned ones.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import DeploymentUpdate

    from tollwatch_dev.stack import LOCAL_WORK_POOL

    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("ingest/ingest")
        client.update_deployment(deployment.id, DeploymentUpdate(concurrency_limit=None))
        queue = client.read_work_queue_by_name(deployment.work_queue_name or "ingest", work_pool_name=LOCAL_WORK_POOL)
        client.update_work_queue(queue.id, concurrency_limit=None)
        lifted = client.read_deployment(deployment.id)
        if lifted.global_concurrency_limit is not None or client.read_work_queue(queue.id).concurrency_limit:
            raise RuntimeError("the ingest limit is still set: the baseline would measure queueing")


def _run_of(observer: PrefectObserver, event_id: UUID, timeout_s: float = 120) -> UUID:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for action in observer.actions_on([event_id]):
            if action.flow_run_ids:
                return action.flow_run_ids[0]
        time.sleep(0.2)
    raise TimeoutError(f"no run for event {event_id} within {timeout_s}s")


def _state_time(observer: PrefectObserver, run_id: UUID, state: str, timeout_s: float = 180) -> float:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        times = observer.state_times(run_id)
        if state in times:
            return times[state].timestamp()
        if {"FAILED", "CRASHED", "CANCELLED"} & set(times):
            raise RuntimeError(f"run {run_id} ended {sorted(times)} before {state}")
        time.sleep(0.1)
    raise TimeoutError(f"run {run_id} not {state} within {timeout_s}s")


def _wait_final(observer: PrefectObserver, run_id: UUID, timeout_s: float = 300) -> str:
    deadline = time.monotonic() + timeout_s
    final = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
    while time.monotonic() < deadline:
        reached = final & set(observer.state_times(run_id))
        if reached:
            return reached.pop()
        time.sleep(0.2)
    raise TimeoutError(f"run {run_id} did not finish within {timeout_s}s")


# ------------------------------------------------------------------------------------------------ figure 1


def event_to_running(bench: BenchStack, samples: int, spacing_s: float) -> list[float]:
    """Emit `samples` refreshes `spacing_s` apart (longer than a run, so runs do not queue behind each other)
    and measure each confirmed POST → its flow run's Running state. Each refresh re-reads the mirror's one day
    (528 rows)."""
    sent: list[tuple[UUID, float]] = []
    for i in range(samples):
        event = TollwatchEvent.of(
            DatasetRefreshed(
                domain=DOMAIN, dataset_id=DATASET, rows_updated_at=2_000_000_000 + i, previous_rows_updated_at=1
            )
        )
        sent.append((event.id, bench.emit(event)))
        time.sleep(spacing_s)
    with connect() as observer:
        return [_state_time(observer, _run_of(observer, event_id), "RUNNING") - at for event_id, at in sent]


def figure_event_to_running(samples: int = 30) -> list[Figure]:
    results = {}
    spacing_s = 2.5  # > a tuned run's duration; untuned runs overlap, with no limit to queue on
    for tuned in (False, True):
        with bench_stack(tuned=tuned, mirror_start=date(2024, 1, 1), mirror_through=date(2024, 1, 2)) as bench:
            results[tuned] = summary(event_to_running(bench, samples, spacing_s))
    default, tuned = results[False], results[True]
    figures = []
    for stat, goal in (("p50", 0.8), ("p95", 1.5), ("max", None)):
        figures.append(
            Figure(
                group="1 event→Running",
                name=f"{stat} (n={int(tuned['n'])})",
                value=round(tuned[stat], 3),
                unit="s",
                baseline=round(default[stat], 3),
                baseline_name="Prefect default polling, cold process, no limit",
                goal=f"≤ {goal} s" if goal else None,
                goal_met=tuned[stat] <= goal if goal else None,
            )
        )
    return figures


# ------------------------------------------------------------------------------------------------ figure 2


def publish_to_downstream_running(samples: int = 10) -> tuple[list[float], dict[str, list[float]]]:
    """Publish a week on the mirror, tick the watcher, and measure publish → downstream run Running, with the
    per-hop breakdown from the trace."""
    from tollwatch.prefect.trace import build_trace
    from tollwatch_dev.demo import publish_week, watch_once

    totals: list[float] = []
    hops: dict[str, list[float]] = {}
    with (
        bench_stack(
            tuned=True, mirror_start=date(2024, 1, 1), mirror_through=date(2024, 1, 8), automations=True
        ) as bench,
        connect() as observer,
    ):
        watch_once()  # the first tick loads the (one-week) history: not a sample
        refreshes = []
        for _ in range(samples + 1):
            published = time.time()
            publish_week(bench.endpoints.mirror_url)
            event_id = watch_once()
            ingest_run = _run_of(observer, event_id)
            _wait_final(observer, ingest_run)
            completion = _announced(observer, ingest_run, "tollwatch.ingestion.completed")
            job_run = _run_of(observer, completion)
            running = _state_time(observer, job_run, "RUNNING")
            _wait_final(observer, job_run)
            totals.append(running - published)
            refreshes.append(event_id)
        time.sleep(1.5)  # events reach the events table within ~1 s: the traces are read once, at the end
        for event_id in refreshes[1:]:
            for hop in build_trace(observer, event_id).hops:
                step = hop.what.split(" (")[0].split(" id=")[0].split()[-1]  # "scheduled", "call-webhook", …
                hops.setdefault(f"{hop.depth}:{step}", []).append(hop.since_previous_s or 0.0)
    return totals[1:], hops  # the first publish warms the silver table up: dropped


def _announced(observer: PrefectObserver, run_id: UUID, name: str, timeout_s: float = 60) -> UUID:
    """The id of the event `name` the run emitted (events are stored within ~1 s of being sent)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = observer.emitted_by([run_id], [name])
        if run_id in found:
            return found[run_id].id
        time.sleep(0.2)
    raise TimeoutError(f"run {run_id} did not announce {name} within {timeout_s}s")


def figure_publish_to_downstream(samples: int = 10) -> list[Figure]:
    totals, hops = publish_to_downstream_running(samples)
    stats = summary(totals)
    breakdown = ", ".join(f"{k.split(':', 1)[1]} {summary(v)['p50']:.2f}s" for k, v in hops.items() if v)
    return [
        Figure(
            group="2 publish→downstream Running",
            name=f"p50 (n={len(totals)})",
            value=round(stats["p50"], 3),
            unit="s",
            goal="≤ 10 s",
            goal_met=stats["p50"] <= 10,
            note=f"p95 {stats['p95']:.2f}s; hop p50s: {breakdown}",
        )
    ]


# ------------------------------------------------------------------------------------------------ figures 3a, 4


def _plan(bench: BenchStack, start: date, stop: date, chunk: Chunk) -> list[Window]:
    """The chunks `tollwatch backfill --chunk <chunk>` would emit; `auto` counts the stack's mirror first, at the
    default target rows per run (TOLLWATCH_BACKFILL_TARGET_ROWS)."""
    if chunk is not Chunk.AUTO:
        return chunks(start, stop, chunk)
    target = Settings.model_fields["backfill_target_rows"].default
    with build_http_client(bench.endpoints.mirror_url, 60) as http:
        counts = upstream_counts_by_day(SocrataClient(http), DATASET, Window(start=start, stop=stop))
    return [c.window for c in auto_chunks(start, stop, counts, target)]


def _with_rows(observer: PrefectObserver, events: list[TollwatchEvent], outcomes: list[Any]) -> list[Any]:
    """The outcomes once every completed run's completion event is readable (the server stores events within
    ~1 s of receiving them; `follow` may end on the runs' states before the last one is in)."""
    from tollwatch.prefect.follow import chunk_outcomes

    deadline = time.monotonic() + 15
    while any(o.state == "COMPLETED" and o.rows_written is None for o in outcomes) and time.monotonic() < deadline:
        time.sleep(1)
        outcomes = chunk_outcomes(observer, events)
    return outcomes


def backfill_through_events(
    start: date,
    stop: date,
    chunk: Chunk,
    *,
    mirror_through: date,
    timeout_s: float = 1800,
    **stack: Any,
) -> dict[str, float]:
    """Emit one backfill event per chunk at once and wait until every run ended: wall time, rows, runs.
    `stack` goes to `bench_stack` (db, plain_server, overrides)."""
    from tollwatch.prefect.follow import follow

    with (
        bench_stack(tuned=True, mirror_start=start, mirror_through=mirror_through, **stack) as bench,
        connect() as observer,
    ):
        request_id = f"bench-{time.time_ns()}"
        events = [
            TollwatchEvent.of(
                BackfillRequested(domain=DOMAIN, dataset_id=DATASET, start=w.start, stop=w.stop, request_id=request_id)
            )
            for w in _plan(bench, start, stop, chunk)
        ]
        cpu_before = bench.cpu_by_service()
        began = time.time()
        bench.emit(*events)
        accepted = time.time()
        outcomes = follow(observer, events, timeout_s=timeout_s, poll_s=2.0, resend=bench.emitter.emit)
        finished = time.time()
        cpu = {name: used - cpu_before.get(name, 0.0) for name, used in bench.cpu_by_service().items()}
        outcomes = _with_rows(observer, events, outcomes)
        runs = {o.flow_run_id for o in outcomes if o.flow_run_id}
        errors = bench.server_errors()
        return {
            "server_cpu_s": cpu.get("prefect", 0.0),
            **{f"cpu_s.{name}": used for name, used in cpu.items()},
            "server_503": errors["503"],
            "server_500": errors["500"],
            "chunks": len(events),
            "runs": len(runs),
            "duplicates": sum(o.duplicate_runs for o in outcomes),
            "restarted": sum(o.restarts > 0 for o in outcomes),
            "completed": sum(o.state == "COMPLETED" for o in outcomes),
            "rows": float(sum(o.rows_written or 0 for o in outcomes)),
            "wall_s": finished - began,
            "emit_s": accepted - began,
        }


#: Figures 3 and 4 run on both databases of the local stack: PostgreSQL (the default) and SQLite (`--db sqlite`).
DATABASES = ("postgres", "sqlite")
#: Issue 13's goals for figure 3.
AUTO_ROWS_PER_S_GOAL = 40_000
PG_VS_SQLITE_GOAL = 2.0


def _result_note(result: dict[str, float]) -> str:
    cpu = {k.split(".", 1)[1]: v for k, v in result.items() if k.startswith("cpu_s.")}
    busy = sum(cpu.values()) / (result["wall_s"] * (os.cpu_count() or 1))
    return (
        f"{int(result['rows']):,} rows; runs {int(result['runs'])}/{int(result['chunks'])} chunks, "
        f"completed {int(result['completed'])}, duplicates {int(result['duplicates'])}, restarted "
        f"{int(result['restarted'])}; server 503s {int(result['server_503'])}, 500s {int(result['server_500'])}; "
        f"CPU s {', '.join(f'{n} {v:.0f}' for n, v in sorted(cpu.items(), key=lambda kv: -kv[1]))} "
        f"= {busy:.0%} of {os.cpu_count()} cores"
    )


def _no_loss(result: dict[str, float]) -> bool:
    return result["runs"] == result["chunks"] == result["completed"] and result["duplicates"] == 0


def figure_full_history(start: date, stop: date) -> tuple[list[Figure], dict[str, float]]:
    """Figure 3: the whole history through events — monthly chunks on PostgreSQL and on SQLite, and the default
    `auto` chunks on PostgreSQL. Returns the figures and the auto run's result (figure 5 sets it beside FLOOR)."""
    monthly = {db: backfill_through_events(start, stop, Chunk.MONTH, mirror_through=stop, db=db) for db in DATABASES}
    auto = backfill_through_events(start, stop, Chunk.AUTO, mirror_through=stop)
    figures = []
    for db, result in [*monthly.items(), ("postgres", auto)]:
        kind = "auto" if result is auto else "monthly"
        figures.append(
            Figure(
                group="3 full-history backfill",
                name=f"{db}: events → {int(result['chunks'])} {kind} runs, rows/s",
                value=round(result["rows"] / result["wall_s"]),
                unit="rows/s",
                better="higher",
                goal="0 lost, 0 duplicate",
                goal_met=_no_loss(result),
                note=f"wall {result['wall_s']:.1f}s; {_result_note(result)}",
            )
        )
    pg, lite = (monthly[db]["rows"] / monthly[db]["wall_s"] for db in DATABASES)
    figures.append(
        Figure(
            group="3 full-history backfill",
            name="monthly runs: PostgreSQL vs SQLite, rows/s",
            value=round(pg),
            unit="rows/s",
            better="higher",
            baseline=round(lite),
            baseline_name="SQLite (same run)",
            goal=f"≥ {PG_VS_SQLITE_GOAL:g}x SQLite",
            goal_met=pg >= PG_VS_SQLITE_GOAL * lite,
        )
    )
    return figures, {**auto, "rows_per_s": auto["rows"] / auto["wall_s"]}


def figure_fan_out(events: int = 200) -> list[Figure]:
    """Figure 4: `events` one-day backfill events at once, on each database."""
    start = date(2024, 1, 1)
    stop = date.fromordinal(start.toordinal() + events)
    figures = []
    for db in DATABASES:
        result = backfill_through_events(start, stop, Chunk.DAY, mirror_through=stop, db=db)
        figures += [
            Figure(
                group="4 fan-out",
                name=f"{db}: {events} events accepted by the emitter",
                value=round(events / max(result["emit_s"], 1e-9), 1),
                unit="events/s",
                better="higher",
            ),
            _drain_figure("4 fan-out", f"{db}: until all runs finished", result),
        ]
    return figures


def _drain_figure(group: str, name: str, result: dict[str, float]) -> Figure:
    """Wall time until every run of a burst ended, met when none was lost or duplicated."""
    return Figure(
        group=group,
        name=name,
        value=round(result["wall_s"], 1),
        unit="s",
        goal="all finished, 0 lost, 0 duplicate",
        goal_met=_no_loss(result),
        note=f"{result['chunks'] / result['wall_s']:.2f} runs/s; emitted in {result['emit_s']:.1f}s; "
        + _result_note(result),
    )


def figure_burst(events: int = 1000) -> list[Figure]:
    """Figure 6: `events` backfill chunk events emitted at once (one day each) on PostgreSQL: every run finished,
    none lost or duplicated, and the time until the last one ended."""
    start = date(2022, 1, 1)
    stop = date.fromordinal(start.toordinal() + events)
    result = backfill_through_events(start, stop, Chunk.DAY, mirror_through=stop, timeout_s=3600)
    return [_drain_figure("6 burst", f"{events} chunk events at once: time to drain", result)]
