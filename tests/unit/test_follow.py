"""How `tollwatch backfill --wait` classifies chunks from the server's records (a recorded observer stands in
for the Prefect API here; tests/integration/test_chain.py runs the same code against a real server)."""

from __future__ import annotations

from datetime import UTC, date, datetime
from uuid import UUID, uuid4

from prefect.client.schemas.objects import FlowRun, State, StateType

from tollwatch.contract.events import BackfillRequested, TollwatchEvent
from tollwatch.prefect.follow import START_FAILED, chunk_outcomes, follow
from tollwatch.prefect.observe import ActionTaken


class RecordedObserver:
    """Answers with what a busy SQLite server recorded: the automation's run-deployment action failed (503)."""

    def __init__(self, actions: list[ActionTaken], runs: dict[UUID, FlowRun] | None = None) -> None:
        self.actions = actions
        self.runs = runs or {}

    def actions_on(self, event_ids):
        return [a for a in self.actions if a.triggering_event_id in set(event_ids)]

    def flow_runs(self, ids):
        return {i: self.runs[i] for i in ids if i in self.runs}

    def emitted_by(self, flow_run_ids, names):
        return {}


def _chunk_event(request_id: str = "r") -> TollwatchEvent:
    return TollwatchEvent.of(
        BackfillRequested(
            domain="data.ny.gov",
            dataset_id="qzve-kjga",
            start=date(2013, 1, 1),
            stop=date(2013, 2, 1),
            request_id=request_id,
        )
    )


def _action(event_id: UUID, run_id: UUID | None = None) -> ActionTaken:
    return ActionTaken(
        automation="ingest-on-backfill-requested",
        action_type="run-deployment",
        triggering_event_id=event_id,
        flow_run_ids=(run_id,) if run_id else (),
        at=datetime.now(UTC),
        failed=run_id is None,
        reason="" if run_id else "Unexpected status from 'run-deployment' action: 503",
    )


def _run(state: StateType, message: str = "", name: str = "run") -> FlowRun:
    return FlowRun(id=uuid4(), name=name, flow_id=uuid4(), state=State(type=state, message=message))


def test_a_chunk_whose_run_could_not_start_is_requested_again_under_a_new_id_with_the_same_payload():
    event = _chunk_event()
    observer = RecordedObserver([_action(event.id)])
    resent: list[TollwatchEvent] = []

    def resend(events: list[TollwatchEvent]) -> None:  # the server accepts the restart and runs it to completion
        resent.extend(events)
        for again in events:
            run = _run(StateType.COMPLETED, name="second-try")
            observer.runs[run.id] = run
            observer.actions.append(_action(again.id, run.id))

    [outcome] = follow(observer, [event], timeout_s=5, poll_s=0, resend=resend)  # type: ignore[arg-type]

    assert [e.payload for e in resent] == [event.payload]
    assert resent[0].id != event.id
    assert outcome.state == "COMPLETED"
    assert outcome.succeeded
    assert outcome.restarts == 1
    assert outcome.flow_run_name == "second-try"


def test_a_run_cancelled_for_a_lost_concurrency_slot_is_requested_again_and_a_user_cancel_is_not():
    """After a server restart Prefect cancels a Pending run whose slot lease it no longer has (its code never
    ran); a run a user cancelled stays cancelled."""
    lost, chosen = _chunk_event("restarted-server"), _chunk_event("user")
    lost_run = _run(StateType.CANCELLED, "Deployment concurrency slot lost during provisioning - no slots available")
    chosen_run = _run(StateType.CANCELLED, "Cancelled by user")
    observer = RecordedObserver(
        [_action(lost.id, lost_run.id), _action(chosen.id, chosen_run.id)],
        {lost_run.id: lost_run, chosen_run.id: chosen_run},
    )
    resent: list[TollwatchEvent] = []

    def resend(events: list[TollwatchEvent]) -> None:
        resent.extend(events)
        for again in events:
            run = _run(StateType.COMPLETED, name="second-try")
            observer.runs[run.id] = run
            observer.actions.append(_action(again.id, run.id))

    relaunched, left = follow(observer, [lost, chosen], timeout_s=5, poll_s=0, resend=resend)  # type: ignore[arg-type]

    assert [e.payload for e in resent] == [lost.payload]
    assert (relaunched.state, relaunched.restarts, relaunched.flow_run_name) == ("COMPLETED", 1, "second-try")
    assert (left.state, left.restarts) == ("CANCELLED", 0)


def test_restarts_are_bounded_and_the_chunk_then_ends_start_failed():
    event = _chunk_event()
    observer = RecordedObserver([_action(event.id)])
    resent: list[TollwatchEvent] = []

    def resend(events: list[TollwatchEvent]) -> None:  # every attempt is refused again
        resent.extend(events)
        observer.actions.extend(_action(e.id) for e in events)

    [outcome] = follow(observer, [event], timeout_s=5, poll_s=0, resend=resend, max_restarts=2)  # type: ignore[arg-type]

    assert len(resent) == 2
    assert len({e.id for e in resent} | {event.id}) == 3
    assert outcome.state == START_FAILED
    assert outcome.restarts == 2
    assert not outcome.succeeded


def test_a_chunk_whose_run_could_not_be_started_is_done_and_says_why():
    event = _chunk_event()
    failed = _action(event.id)

    [outcome] = chunk_outcomes(RecordedObserver([failed]), [event])  # type: ignore[arg-type]

    assert outcome.state == START_FAILED
    assert outcome.done
    assert not outcome.succeeded
    assert "503" in outcome.message


def test_a_chunk_without_any_action_yet_is_still_waiting():
    event = _chunk_event()
    [outcome] = chunk_outcomes(RecordedObserver([]), [event])  # type: ignore[arg-type]
    assert not outcome.done


def test_the_lost_slot_message_is_the_one_prefects_server_writes():
    """The restart classification keys on Prefect's own wording: an upgrade that changes it fails here."""
    from importlib.util import find_spec
    from pathlib import Path

    from tollwatch.prefect.follow import SLOT_LOST

    spec = find_spec("prefect.server.orchestration.core_policy")  # read, not imported (it has import cycles)
    assert spec is not None
    assert spec.origin is not None
    assert SLOT_LOST in Path(spec.origin).read_text()


def test_a_chunk_whose_load_was_held_by_its_audit_is_done_held_and_not_a_success():
    from types import SimpleNamespace

    from tollwatch.contract.events import EventName
    from tollwatch.prefect.follow import HELD

    event = _chunk_event()
    run = _run(StateType.COMPLETED)
    held = SimpleNamespace(
        event=EventName.INGESTION_HELD.value,
        payload={"refresh_id": "r-1", "quality": {"failing": ["completeness", "volume"]}},
    )

    class HeldObserver(RecordedObserver):
        def emitted_by(self, flow_run_ids, names):
            assert EventName.INGESTION_HELD in names
            return {run.id: held}

    [outcome] = chunk_outcomes(HeldObserver([_action(event.id, run.id)], {run.id: run}), [event])

    assert outcome.state == HELD
    assert outcome.done
    assert not outcome.succeeded
    assert "completeness, volume failed" in outcome.message
    assert "tollwatch publish|discard r-1" in outcome.message
