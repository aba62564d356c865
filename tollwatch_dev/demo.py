"""The main job, locally: a publish upstream flows through events, automations and runs to a downstream job.

Steps (each idempotent, so running the demo again just publishes and ingests one more week):
stack up (Azurite, Prefect server, Socrata mirror, inbox, worker) → deploy prefect.yaml into the local pool →
local notification/webhook blocks → `automations apply` → publish a week on the mirror → run the watcher
once (it emits `tollwatch.dataset.refreshed`) → wait until the chain settled (ingest run, completion event,
downstream run, job event) → return the trace and the tables.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from uuid import UUID

import httpx

from tollwatch.contract.errors import TollwatchError
from tollwatch.prefect.trace import Trace

#: The chain is complete once one of these ends it.
_FINAL_EVENTS = ("tollwatch.job.completed", "tollwatch.job.failed", "tollwatch.ingestion.failed")


class DemoError(TollwatchError):
    """A step of the demo failed; the message says which and what to look at."""


@dataclass(frozen=True)
class DemoResult:
    prefect_ui: str
    refresh_event_id: UUID
    rows_published: int
    trace: Trace
    succeeded: bool


def publish_week(mirror_url: str) -> int:
    """Ask the local mirror to publish the next 7 days; returns the number of new rows."""
    response = httpx.post(f"{mirror_url}/admin/publish", json={"days": 7}, timeout=30)
    response.raise_for_status()
    batch = response.json()
    return int(batch["end_seq"]) - int(batch["start_seq"])


def watch_once() -> UUID:
    """One tick of the upstream watcher (the Function app's timer core); the id of the event it emitted."""
    from tollwatch import resources
    from tollwatch.contract.settings import load_settings

    with resources.upstream_watcher(load_settings()) as watcher:
        result = watcher.check()
    if result.event_id is None:
        raise DemoError(f"the watcher saw no new publish (upstream rowsUpdatedAt {result.rows_updated_at})")
    return UUID(result.event_id)


def wait_for_chain(event_id: UUID, timeout_s: float, on_wait: Callable[[Trace | None], None]) -> Trace:
    """Rebuild the trace until it ends in a job event (or an ingest failure), or the time is up."""
    from tollwatch.prefect.observe import connect
    from tollwatch.prefect.trace import TraceError, build_trace

    deadline = time.monotonic() + timeout_s
    trace: Trace | None = None
    with connect() as observer:
        while time.monotonic() < deadline:
            try:
                trace = build_trace(observer, event_id)
            except TraceError:
                trace = None
            on_wait(trace)
            if trace is not None and any(final in hop.what for hop in trace.hops for final in _FINAL_EVENTS):
                time.sleep(2)  # let the last run's final state land, then take the finished picture
                return build_trace(observer, event_id)
            time.sleep(1)
    if trace is None:
        raise DemoError(f"nothing happened for event {event_id} within {timeout_s:.0f}s: is the worker running?")
    return trace


def run_demo(state_dir: Path, *, timeout_s: float = 300, say: Callable[[str], None] = print) -> DemoResult:
    from tollwatch.cli.automations import DEFAULT_AUTOMATIONS_DIR, run_apply
    from tollwatch.prefect.deploy import deploy
    from tollwatch_dev.local_blocks import ensure_local_blocks
    from tollwatch_dev.stack import LocalStack

    say("starting the local stack (Azurite, Prefect server, Socrata mirror, inbox, warm server, worker) …")
    endpoints = LocalStack(state_dir).up()
    for key, value in endpoints.env().items():
        os.environ[key] = value
    say("deploying prefect.yaml into work pool tollwatch-local …")
    deploy("local")
    ensure_local_blocks(endpoints.inbox_url)
    say("applying automations/ (tollwatch automations apply) …")
    run_apply(DEFAULT_AUTOMATIONS_DIR, dry_run=False, prune=False, api_url=endpoints.prefect_api_url)
    rows = publish_week(endpoints.mirror_url)
    say(f"published a new week on the mirror ({rows:,} rows); running the watcher once …")
    event_id = watch_once()
    say(f"watcher emitted tollwatch.dataset.refreshed {event_id}; waiting for ingest and the downstream job …")
    seen: set[str] = set()

    def progress(trace: Trace | None) -> None:
        for hop in trace.hops if trace else []:
            if hop.what not in seen:
                seen.add(hop.what)
                say(f"  … {hop.what}")

    trace = wait_for_chain(event_id, timeout_s, progress)
    succeeded = any("tollwatch.job.completed" in hop.what for hop in trace.hops)
    return DemoResult(
        prefect_ui=endpoints.prefect_api_url.removesuffix("/api"),
        refresh_event_id=event_id,
        rows_published=rows,
        trace=trace,
        succeeded=succeeded,
    )
