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
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from uuid import UUID

import httpx

from bench.common import Figure, summary
from tollwatch.backfill import Chunk, chunks
from tollwatch.dev.stack import LocalStack, StackEndpoints
from tollwatch.emit import PrefectEventsEmitter
from tollwatch.events import BackfillRequested, DatasetRefreshed, TollwatchEvent
from tollwatch.observe import PrefectObserver, connect

DOMAIN, DATASET = "data.ny.gov", "qzve-kjga"


@dataclass
class BenchStack:
    endpoints: StackEndpoints
    emitter: PrefectEventsEmitter

    def emit(self, *events: TollwatchEvent) -> float:
        """Send and return the moment the server confirmed (the start of every latency measured here)."""
        self.emitter.emit(list(events))
        return time.time()


@contextmanager
def bench_stack(
    *, tuned: bool, mirror_start: date, mirror_through: date, automations: bool = False
) -> Iterator[BenchStack]:
    """A fresh stack: tuned = 0.5 s worker polling + warm runs; untuned = Prefect's default polling, cold runs,
    and no ingest concurrency limit (see `_lift_ingest_limit`)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tollwatch.cli_automations import DEFAULT_AUTOMATIONS_DIR, run_apply
    from tollwatch.deploy import deploy, ensure_work_pool, work_pool_spec
    from tollwatch.dev.blocks import ensure_local_blocks

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
        )
        saved = dict(os.environ)
        try:
            endpoints = stack.up()
            os.environ.update(endpoints.env())
            with temporary_settings(updates={PREFECT_API_URL: endpoints.prefect_api_url}):
                deploy("local")
                if not tuned:
                    ensure_work_pool(work_pool_spec("local").model_copy(update={"warm": False}))
                    _lift_ingest_limit()
                if automations:
                    ensure_local_blocks(endpoints.inbox_url)
                    run_apply(DEFAULT_AUTOMATIONS_DIR, dry_run=False, prune=False, api_url=endpoints.prefect_api_url)
                http = httpx.Client(timeout=30)
                yield BenchStack(endpoints, PrefectEventsEmitter(http, endpoints.prefect_api_url))
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

    from tollwatch.dev.stack import LOCAL_WORK_POOL

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
    for stat, goal in (("p50", 1.5), ("p95", 3.0), ("max", None)):
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
    from tollwatch.demo import publish_week, watch_once
    from tollwatch.trace import build_trace

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


def backfill_through_events(
    start: date, stop: date, chunk: Chunk, *, mirror_through: date, timeout_s: float = 1800
) -> dict[str, float]:
    """Emit one backfill event per chunk at once and wait until every run ended: wall time, rows, runs."""
    from tollwatch.follow import follow

    with bench_stack(tuned=True, mirror_start=start, mirror_through=mirror_through) as bench, connect() as observer:
        request_id = f"bench-{time.time_ns()}"
        events = [
            TollwatchEvent.of(
                BackfillRequested(domain=DOMAIN, dataset_id=DATASET, start=w.start, stop=w.stop, request_id=request_id)
            )
            for w in chunks(start, stop, chunk)
        ]
        began = time.time()
        bench.emit(*events)
        accepted = time.time()
        outcomes = follow(observer, events, timeout_s=timeout_s, poll_s=2.0, resend=bench.emitter.emit)
        finished = time.time()
        runs = {o.flow_run_id for o in outcomes if o.flow_run_id}
        return {
            "chunks": len(events),
            "runs": len(runs),
            "duplicates": sum(o.duplicate_runs for o in outcomes),
            "restarted": sum(o.restarts > 0 for o in outcomes),
            "completed": sum(o.state == "COMPLETED" for o in outcomes),
            "rows": float(sum(o.rows_written or 0 for o in outcomes)),
            "wall_s": finished - began,
            "emit_s": accepted - began,
        }


def figure_full_history(start: date, stop: date) -> tuple[list[Figure], dict[str, float]]:
    result = backfill_through_events(start, stop, Chunk.MONTH, mirror_through=stop)
    rows_per_s = result["rows"] / result["wall_s"]
    return [
        Figure(
            group="3 full-history backfill",
            name=f"events → {int(result['chunks'])} monthly runs, wall",
            value=round(result["wall_s"], 1),
            unit="s",
            note=f"{int(result['rows']):,} rows; {int(result['completed'])}/{int(result['chunks'])} completed",
        ),
        Figure(
            group="3 full-history backfill",
            name="runs = chunks (no lost or duplicate runs)",
            value=result["runs"],
            unit="runs",
            goal=f"= {int(result['chunks'])}, 0 duplicates",
            goal_met=result["runs"] == result["chunks"] and result["duplicates"] == 0,
            note=f"{int(result['restarted'])} chunk(s) requested again after their run could not start "
            "(SQLite 503s); a restart is the same refresh id, so it cannot load twice",
        ),
    ], {**result, "rows_per_s": rows_per_s}


def figure_fan_out(events: int = 200) -> list[Figure]:
    start = date(2024, 1, 1)
    stop = date.fromordinal(start.toordinal() + events)
    result = backfill_through_events(start, stop, Chunk.DAY, mirror_through=stop)
    return [
        Figure(
            group="4 fan-out",
            name=f"{events} events accepted by the emitter",
            value=round(events / max(result["emit_s"], 1e-9), 1),
            unit="events/s",
            better="higher",
        ),
        Figure(
            group="4 fan-out",
            name="until all runs finished",
            value=round(result["wall_s"], 1),
            unit="s",
            goal="0 lost, 0 duplicate",
            goal_met=result["runs"] == events and result["duplicates"] == 0 and result["completed"] == events,
            note=f"runs {int(result['runs'])}, completed {int(result['completed'])}, duplicates "
            f"{int(result['duplicates'])}, restarted {int(result['restarted'])}",
        ),
    ]
