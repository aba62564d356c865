"""`tollwatch trace`: one publish or backfill chunk, followed through every hop, with the latency of each.

Start from any id along the chain — the origin event, the ingest run, a downstream run — walk back to the
origin event, then forward: event → automation action → flow run (scheduled, running, ended) → the event the
run announced → the automations that acted on it → … until nothing more happened.
"""

from __future__ import annotations

from datetime import datetime
from uuid import UUID

from pydantic import BaseModel, ConfigDict

from tollwatch.contract.errors import TollwatchError
from tollwatch.contract.events import EventName
from tollwatch.prefect.observe import PrefectObserver

#: Events the flows announce; a run's first of these continues the chain.
ANNOUNCED = tuple(
    name.value
    for name in (
        EventName.INGESTION_COMPLETED,
        EventName.INGESTION_FAILED,
        EventName.INGESTION_HELD,
        EventName.JOB_COMPLETED,
        EventName.JOB_FAILED,
    )
)
_RUN_STATES = ("SCHEDULED", "PENDING", "RUNNING", "COMPLETED", "FAILED", "CRASHED", "CANCELLED")


class TraceError(TollwatchError, ValueError):
    """The id is neither a stored event nor a flow run an automation started."""


class Hop(BaseModel):
    """One step of the chain; `depth` nests the steps one event caused."""

    model_config = ConfigDict(frozen=True)

    at: datetime
    depth: int
    what: str
    since_previous_s: float | None = None


class Trace(BaseModel):
    """The hops in causal order, and the end-to-end time."""

    origin_event_id: UUID
    hops: list[Hop]

    @property
    def total_s(self) -> float:
        """From the origin event to the last thing that happened because of it."""
        return (max(h.at for h in self.hops) - self.hops[0].at).total_seconds() if self.hops else 0.0

    def render(self) -> str:
        lines = [f"{'time (UTC)':<14}{'+hop':>9}  step"]
        for hop in self.hops:
            delta = "" if hop.since_previous_s is None else f"+{hop.since_previous_s:.3f}s"
            lines.append(f"{hop.at.strftime('%H:%M:%S.%f')[:-3]:<14}{delta:>9}  {'  ' * hop.depth}{hop.what}")
        lines.append(f"end to end: {self.total_s:.3f}s over {len(self.hops)} steps")
        return "\n".join(lines)


class _Builder:
    def __init__(self, observer: PrefectObserver) -> None:
        self.observer = observer
        self.hops: list[Hop] = []

    def add(self, at: datetime, depth: int, what: str, previous: datetime | None) -> datetime:
        since = None if previous is None else (at - previous).total_seconds()
        self.hops.append(Hop(at=at, depth=depth, what=what, since_previous_s=since))
        return at

    def event(self, event_id: UUID, depth: int, previous: datetime | None) -> None:
        event = self.observer.event(event_id)
        if event is None:
            return
        what = f"event {event.event} ({event.resource.id}) id={event.id}{_merged_by(event.payload)}"
        at = self.add(event.occurred, depth, what, previous)
        for action in sorted(self.observer.actions_on([event.id]), key=lambda a: a.at):
            outcome = f"failed: {action.reason}" if action.failed else action.action_type
            acted = self.add(action.at, depth + 1, f'automation "{action.automation}": {outcome}', at)
            for run_id in action.flow_run_ids:
                self.flow_run(run_id, depth + 2, acted)

    def flow_run(self, run_id: UUID, depth: int, previous: datetime) -> None:
        run = self.observer.flow_runs([run_id]).get(run_id)
        name = run.name if run is not None else str(run_id)
        last = previous
        states = sorted(self.observer.state_times(run_id).items(), key=lambda item: item[1])
        for state, at in states:
            if state in _RUN_STATES:
                last = self.add(at, depth, f"flow run {name} {state.lower()} (id={run_id})", last)
        announced = self.observer.emitted_by([run_id], ANNOUNCED).get(run_id)
        if announced is not None:
            # the run announces before it reports its final state: measure from the state it was in
            during = max((at for _, at in states if at <= announced.occurred), default=previous)
            self.event(announced.id, depth + 1, during)


def _merged_by(payload: dict[str, object]) -> str:
    """` merged by spark` for a load a Spark engine merged (with its Databricks run page when there is one)."""
    engine = payload.get("engine")
    if engine in (None, "local"):
        return ""
    page = payload.get("run_page_url")
    return f" merged by {engine}" + (f" {page}" if page else "")


def origin_of(observer: PrefectObserver, some_id: UUID) -> UUID:
    """Walk back from an event or flow run id to the event that started the chain."""
    event = observer.event(some_id)
    run_id = None if event is not None else some_id
    for _ in range(10):  # chains are short (publish → ingest → job); a bound keeps a cycle from hanging
        if event is not None:
            emitters = [r.id for r in event.related if r.role == "flow-run"]
            if not emitters:
                return event.id
            run_id = UUID(emitters[0].removeprefix("prefect.flow-run."))
        action = observer.action_starting(run_id) if run_id is not None else None
        if action is None:
            if event is not None:
                return event.id
            raise TraceError(f"{some_id} is neither a stored event nor a flow run started by an automation")
        event = observer.event(action.triggering_event_id)
        if event is None:
            return action.triggering_event_id
    raise TraceError(f"the chain behind {some_id} is longer than 10 hops")


def build_trace(observer: PrefectObserver, some_id: UUID) -> Trace:
    """The whole chain `some_id` belongs to, from its origin event forward."""
    origin = origin_of(observer, some_id)
    builder = _Builder(observer)
    builder.event(origin, 0, None)
    if not builder.hops:
        raise TraceError(f"event {origin} is not stored (yet?): the server persists events within a few seconds")
    return Trace(origin_event_id=origin, hops=builder.hops)  # causal (depth-first) order, siblings by time
