"""Read back what the pipeline did from Prefect itself: which runs an event started, what a run announced.

Prefect records the causal links we need, so tollwatch keeps no bookkeeping of its own:
- when an automation (a deployment trigger or a subscription) acts on an event, the server emits
  `prefect.automation.action.executed` whose related resources include `prefect.event.<triggering id>`
  (role `triggering-event`) and, for run-deployment actions, `prefect.flow-run.<id>` (role `flow-run`);
- every tollwatch event a flow emits relates to `prefect.flow-run.<id>` of the run that emitted it;
- a flow run's state history gives when it was scheduled, started and finished.

`PrefectObserver` wraps those reads behind small typed methods, used by `tollwatch backfill --wait`,
`tollwatch trace` and `tollwatch status`. It takes a Prefect client, so tests use the real server.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, NoReturn, ParamSpec, TypeVar
from uuid import UUID

from pydantic import BaseModel, ConfigDict

from tollwatch.adapters.net import RetryPolicy

if TYPE_CHECKING:
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.objects import FlowRun
    from prefect.events.schemas.events import ReceivedEvent

ACTION_TRIGGERED = "prefect.automation.action.triggered"
ACTION_EXECUTED = "prefect.automation.action.executed"
ACTION_FAILED = "prefect.automation.action.failed"
_PAGE = 50  # the events API refuses larger pages
#: Ids per events query: the server encodes the whole filter into each next-page URL, and 1,000 related ids made
#: it longer than httpx accepts (InvalidURL, seen by a 1,000-chunk backfill); larger sets go in batches.
_IDS_PER_QUERY = 100
#: Tries per read. A loaded server can time out a query (Prefect answers 500 when its database call exceeds
#: PREFECT_SERVER_DATABASE_TIMEOUT, seen on CI while 1,200 events were being processed); a read changes nothing, so
#: it is asked again, with a pause that doubles, before the caller sees the error.
_READ_ATTEMPTS = 4
_READ_BACKOFF_S = 1.0


log = logging.getLogger(__name__)
P = ParamSpec("P")
R = TypeVar("R")


def _read(call: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    """One read from the Prefect API, retried by the outbound policy (tollwatch.adapters.net) on a transient failure
    (see _READ_ATTEMPTS); when the tries run out the last error is raised as it is."""
    policy = RetryPolicy(max_attempts=_READ_ATTEMPTS, initial_s=_READ_BACKOFF_S, max_delay_s=8 * _READ_BACKOFF_S)

    def give_up(error: BaseException, why: str) -> NoReturn:
        log.warning("Prefect API read failed (%s); %s", error, why)
        raise error

    return policy.call(call, *args, what="Prefect API read", give_up=give_up, logger=log, **kwargs)


class ActionTaken(BaseModel):
    """One automation action the server took because of one event."""

    model_config = ConfigDict(frozen=True)

    automation: str
    action_type: str
    triggering_event_id: UUID
    flow_run_ids: tuple[UUID, ...]
    at: datetime
    failed: bool = False
    reason: str = ""


def _related_ids(event: ReceivedEvent, role: str) -> list[str]:
    return [r.id for r in event.related if r.role == role]


def _uuid_after(resource_id: str, prefix: str) -> UUID | None:
    if not resource_id.startswith(prefix):
        return None
    try:
        return UUID(resource_id[len(prefix) :])
    except ValueError:
        return None


def _invocation(event: ReceivedEvent) -> tuple[str, str]:
    return str(event.payload.get("invocation", "")), str(event.payload.get("action_index", ""))


class PrefectObserver:
    """Typed reads of events, automation actions and flow runs from one Prefect API."""

    def __init__(self, client: SyncPrefectClient, *, lookback: timedelta = timedelta(days=30)) -> None:
        self.client = client
        self.lookback = lookback

    # -- events

    def events(
        self,
        *,
        names: Sequence[str] | None = None,
        ids: Iterable[UUID] | None = None,
        related_ids: Iterable[str] | None = None,
        since: datetime | None = None,
        newest_first: bool = False,
        limit: int = 1000,
    ) -> list[ReceivedEvent]:
        """Events matching all given criteria, oldest first unless asked (follows pagination up to `limit`).

        More than _IDS_PER_QUERY `ids` or `related_ids` are asked for in batches, merged and ordered again.
        """
        id_list = None if ids is None else list(ids)
        related_list = None if related_ids is None else list(related_ids)
        batched = id_list if id_list is not None and len(id_list) > _IDS_PER_QUERY else None
        if batched is None and related_list is not None and len(related_list) > _IDS_PER_QUERY:
            batched = related_list
        if batched is None:
            return self._events_page_by_page(names, id_list, related_list, since, newest_first, limit)
        found: dict[UUID, ReceivedEvent] = {}
        for start in range(0, len(batched), _IDS_PER_QUERY):
            part = batched[start : start + _IDS_PER_QUERY]
            for event in self._events_page_by_page(
                names,
                part if batched is id_list else id_list,
                part if batched is related_list else related_list,
                since,
                newest_first,
                limit,
            ):
                found[event.id] = event
        ordered = sorted(found.values(), key=lambda e: (e.occurred, str(e.id)), reverse=newest_first)
        return ordered[:limit]

    def _events_page_by_page(
        self,
        names: Sequence[str] | None,
        ids: list[UUID] | None,
        related_ids: list[str] | None,
        since: datetime | None,
        newest_first: bool,
        limit: int,
    ) -> list[ReceivedEvent]:
        from prefect.events.filters import (
            EventFilter,
            EventIDFilter,
            EventNameFilter,
            EventOccurredFilter,
            EventOrder,
            EventRelatedFilter,
        )

        now = datetime.now(UTC)
        criteria: dict[str, object] = {
            "occurred": EventOccurredFilter(since=since or now - self.lookback, until=now + timedelta(1)),
            "order": EventOrder.DESC if newest_first else EventOrder.ASC,
        }
        if names:
            criteria["event"] = EventNameFilter(name=list(names))
        if ids is not None:
            criteria["id"] = EventIDFilter(id=ids)
        if related_ids is not None:
            criteria["related"] = EventRelatedFilter(id=related_ids)
        page = _read(self.client.read_events, EventFilter(**criteria), limit=min(limit, _PAGE))
        found = list(page.events)
        while page.next_page and len(found) < limit:
            page = _read(self.client.read_events_page, str(page.next_page))
            found.extend(page.events)
        return found[:limit]

    def event(self, event_id: UUID) -> ReceivedEvent | None:
        found = self.events(ids=[event_id], limit=1)
        return found[0] if found else None

    def actions_on(self, event_ids: Iterable[UUID]) -> list[ActionTaken]:
        """What automations did because of these events (run a deployment, call a webhook, notify)."""
        wanted = [f"prefect.event.{event_id}" for event_id in event_ids]
        if not wanted:
            return []
        actions = []
        # a chunk's actions: triggered + executed/failed, and again for each restart: leave room for them all
        found = self.events(
            names=[ACTION_TRIGGERED, ACTION_EXECUTED, ACTION_FAILED], related_ids=wanted, limit=10 * len(wanted) + 1000
        )
        # `triggered` carries when the trigger fired; `executed`/`failed` (same invocation) what came of it
        fired = {_invocation(e): e.occurred for e in found if e.event == ACTION_TRIGGERED}
        for event in (e for e in found if e.event != ACTION_TRIGGERED):
            triggering = [_uuid_after(r, "prefect.event.") for r in _related_ids(event, "triggering-event")]
            runs = [_uuid_after(r, "prefect.flow-run.") for r in _related_ids(event, "flow-run")]
            if not triggering or triggering[0] is None:
                continue
            actions.append(
                ActionTaken(
                    automation=event.resource.get("prefect.resource.name", event.resource.id),
                    action_type=str(event.payload.get("action_type", "")),
                    triggering_event_id=triggering[0],
                    flow_run_ids=tuple(run for run in runs if run is not None),
                    at=fired.get(_invocation(event), event.occurred),
                    failed=event.event == ACTION_FAILED,
                    reason=str(event.payload.get("reason", "")),
                )
            )
        return actions

    def action_starting(self, flow_run_id: UUID) -> ActionTaken | None:
        """The automation action that created this flow run, if one did."""
        for event in self.events(names=[ACTION_EXECUTED], related_ids=[f"prefect.flow-run.{flow_run_id}"]):
            triggering = [_uuid_after(r, "prefect.event.") for r in _related_ids(event, "triggering-event")]
            if triggering and triggering[0] is not None:
                return ActionTaken(
                    automation=event.resource.get("prefect.resource.name", event.resource.id),
                    action_type=str(event.payload.get("action_type", "")),
                    triggering_event_id=triggering[0],
                    flow_run_ids=(flow_run_id,),
                    at=event.occurred,
                )
        return None

    def emitted_by(self, flow_run_ids: Iterable[UUID], names: Sequence[str]) -> dict[UUID, ReceivedEvent]:
        """The (first) event of `names` each flow run emitted, by flow run id."""
        runs = {f"prefect.flow-run.{run_id}": run_id for run_id in flow_run_ids}
        if not runs:
            return {}
        found: dict[UUID, ReceivedEvent] = {}
        for event in self.events(names=names, related_ids=list(runs), limit=5 * len(runs) + 1000):
            for resource_id in _related_ids(event, "flow-run"):
                run_id = runs.get(resource_id)
                if run_id is not None:
                    found.setdefault(run_id, event)
        return found

    # -- flow runs

    def flow_runs(self, ids: Iterable[UUID]) -> dict[UUID, FlowRun]:
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        wanted = list(ids)
        found: dict[UUID, FlowRun] = {}
        for start in range(0, len(wanted), _IDS_PER_QUERY):  # the server answers at most 200 runs per read
            part = wanted[start : start + _IDS_PER_QUERY]
            runs = _read(self.client.read_flow_runs, flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=part)))
            found.update({run.id: run for run in runs})
        return found

    def state_times(self, flow_run_id: UUID) -> dict[str, datetime]:
        """When the run first entered each state type (SCHEDULED, PENDING, RUNNING, COMPLETED, …)."""
        times: dict[str, datetime] = {}
        for state in sorted(_read(self.client.read_flow_run_states, flow_run_id), key=lambda s: s.timestamp):
            times.setdefault(state.type.value, state.timestamp)
        return times

    def latest_runs(self, flow_name: str, limit: int = 1) -> list[FlowRun]:
        """The newest runs of one flow (by creation)."""
        from prefect.client.schemas.filters import FlowFilter, FlowFilterName
        from prefect.client.schemas.sorting import FlowRunSort

        return _read(
            self.client.read_flow_runs,
            flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
            sort=FlowRunSort.EXPECTED_START_TIME_DESC,
            limit=limit,
        )


@contextmanager
def connect() -> Iterator[PrefectObserver]:
    """An observer on the Prefect API the environment points at (PREFECT_API_URL), closed afterwards."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        yield PrefectObserver(client)
