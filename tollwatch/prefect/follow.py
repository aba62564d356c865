"""Follow the ingest runs a backfill's chunk events started, until each one has ended.

A chunk's run is found through the automation action the server took on that chunk's event (see
`tollwatch.prefect.observe`), never by guessing from parameters, so a re-sent request finds the runs its
first delivery started and a rerun finds only its own.

A chunk whose run never started (the automation's create call was refused, e.g. a 503 from a busy SQLite
server) or crashed before it ran (the worker could not submit it) is requested again, a bounded number of
times, with a restart event: the same payload under a new id (`restart_event`). The same payload means the
same refresh id, so if the first attempt did commit after all, the ingest's snapshot ledger makes the restart a
no-op rather than a duplicate load.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import date
from uuid import UUID

from pydantic import BaseModel, ConfigDict

from tollwatch.contract.events import EventName, TollwatchEvent, deterministic_id
from tollwatch.prefect.internals import SLOT_LOST_MESSAGE
from tollwatch.prefect.observe import PrefectObserver

#: A run that completed but whose load failed its audit (write-audit-publish): not on `main`, not announced.
HELD = "HELD"
TERMINAL = frozenset({"COMPLETED", "FAILED", "CRASHED", "CANCELLED", HELD})
#: States of a chunk that never got (or lost) its run.
NO_RUN = "NO RUN"
#: The automation tried to create the run and the server refused (e.g. 503 from a busy SQLite server).
START_FAILED = "START FAILED"
NOT_STARTED = "WAITING"
#: States after which a chunk is requested again: its run never started or never got to run its code.
RESTARTABLE = frozenset({START_FAILED, "CRASHED"})
#: How Prefect cancels a run whose deployment concurrency slot lease vanished before it could start (a server
#: restart loses them). No user chose that and the run's code never ran, so the chunk is requested again like a
#: CRASHED one; a run a user cancelled carries another message and is left alone.
SLOT_LOST = SLOT_LOST_MESSAGE


class ChunkOutcome(BaseModel):
    """Where one chunk stands: its event, its run (if any yet), the run's state and what it loaded."""

    model_config = ConfigDict(frozen=True)

    start: date
    stop: date
    event_id: UUID
    flow_run_id: UUID | None = None
    flow_run_name: str | None = None
    state: str = NOT_STARTED
    rows_written: int | None = None
    already_committed: bool = False
    duration_s: float | None = None
    message: str = ""
    duplicate_runs: int = 0
    restarts: int = 0

    @property
    def done(self) -> bool:
        return self.state in TERMINAL or self.state in (NO_RUN, START_FAILED)

    @property
    def restartable(self) -> bool:
        """Its run never started or never ran its code, and nobody chose that: safe to request again."""
        return self.state in RESTARTABLE or (self.state == "CANCELLED" and self.message.startswith(SLOT_LOST))

    @property
    def succeeded(self) -> bool:
        return self.state == "COMPLETED" and self.duplicate_runs == 0


def chunk_outcomes(observer: PrefectObserver, events: list[TollwatchEvent]) -> list[ChunkOutcome]:
    """One outcome per chunk event, from the server's records right now."""
    runs_by_event: dict[UUID, list[UUID]] = {}
    start_failures: dict[UUID, str] = {}
    for action in observer.actions_on([event.id for event in events]):
        runs_by_event.setdefault(action.triggering_event_id, []).extend(action.flow_run_ids)
        if action.failed:
            start_failures[action.triggering_event_id] = action.reason or "the automation action failed"
    all_runs = [run_id for run_ids in runs_by_event.values() for run_id in run_ids]
    runs = observer.flow_runs(all_runs)
    completions = observer.emitted_by(
        all_runs, [EventName.INGESTION_COMPLETED, EventName.INGESTION_FAILED, EventName.INGESTION_HELD]
    )
    outcomes = []
    for event in events:
        start, stop = event.payload["start"], event.payload["stop"]
        base = ChunkOutcome(start=start, stop=stop, event_id=event.id)
        run_ids = runs_by_event.get(event.id, [])
        run = runs.get(run_ids[0]) if run_ids else None
        if run is None:
            failure = start_failures.get(event.id)
            outcomes.append(base.model_copy(update={"state": START_FAILED, "message": failure}) if failure else base)
            continue
        state = run.state.type.value if run.state else "UNKNOWN"
        completion = completions.get(run.id)
        payload = completion.payload if completion is not None else {}
        message = (run.state.message or "") if run.state and state != "COMPLETED" else ""
        if completion is not None and completion.event == EventName.INGESTION_HELD:
            failing = ", ".join(payload.get("quality", {}).get("failing", []))
            state, message = HELD, f"{failing} failed; `tollwatch publish|discard {payload.get('refresh_id')}`"
        outcomes.append(
            base.model_copy(
                update={
                    "flow_run_id": run.id,
                    "flow_run_name": run.name,
                    "state": state,
                    "rows_written": payload.get("rows_written"),
                    "already_committed": bool(payload.get("already_committed", False)),
                    "duration_s": run.total_run_time.total_seconds() if state in TERMINAL else None,
                    "message": message,
                    "duplicate_runs": len(set(run_ids)) - 1,
                }
            )
        )
    return outcomes


def restart_event(event: TollwatchEvent, attempt: int) -> TollwatchEvent:
    """The same chunk request under a new deterministic id (the server deduplicates the original id)."""
    return event.model_copy(update={"id": deterministic_id("restart", event.id, attempt)})


def follow(
    observer: PrefectObserver,
    events: list[TollwatchEvent],
    *,
    timeout_s: float,
    poll_s: float = 1.0,
    on_progress: Callable[[list[ChunkOutcome]], None] | None = None,
    resend: Callable[[list[TollwatchEvent]], object] | None = None,
    max_restarts: int = 2,
) -> list[ChunkOutcome]:
    """Poll until every chunk's run has ended, or the timeout passes (chunks still without a run: NO RUN).

    With `resend`, a chunk that ends START FAILED, CRASHED or cancelled for a lost concurrency slot (see
    `ChunkOutcome.restartable`) is requested again with `restart_event`, at most
    `max_restarts` times; its outcome is then that of its latest request, with `restarts` counting them.
    """
    deadline = time.monotonic() + timeout_s
    current = list(events)  # the latest request of each chunk
    restarts = [0] * len(events)
    while True:
        found = chunk_outcomes(observer, current)
        outcomes = [o.model_copy(update={"restarts": n}) for o, n in zip(found, restarts, strict=True)]
        again = [i for i, o in enumerate(outcomes) if o.restartable and o.restarts < max_restarts]
        if resend is not None and again:
            for i in again:
                restarts[i] += 1
                current[i] = restart_event(events[i], restarts[i])
                outcomes[i] = outcomes[i].model_copy(update={"state": NOT_STARTED, "restarts": restarts[i]})
            resend([current[i] for i in again])
        if on_progress is not None:
            on_progress(outcomes)
        if all(outcome.done for outcome in outcomes):
            return outcomes
        if time.monotonic() >= deadline:
            return [
                outcome.model_copy(update={"state": NO_RUN, "message": "no run was started for this chunk"})
                if outcome.flow_run_id is None
                else outcome
                for outcome in outcomes
            ]
        time.sleep(poll_s)
