"""How `tollwatch backfill --wait` classifies chunks from the server's records (a recorded observer stands in
for the Prefect API here; tests/test_chain.py runs the same code against a real server)."""

from __future__ import annotations

from datetime import UTC, date, datetime

from tollwatch.events import BackfillRequested, TollwatchEvent
from tollwatch.follow import START_FAILED, chunk_outcomes
from tollwatch.observe import ActionTaken


class RecordedObserver:
    """Answers with what a busy SQLite server recorded: the automation's run-deployment action failed (503)."""

    def __init__(self, actions: list[ActionTaken]) -> None:
        self.actions = actions

    def actions_on(self, event_ids):
        return [a for a in self.actions if a.triggering_event_id in set(event_ids)]

    def flow_runs(self, ids):
        return {}

    def emitted_by(self, flow_run_ids, names):
        return {}


def test_a_chunk_whose_run_could_not_be_started_is_done_and_says_why():
    event = TollwatchEvent.of(
        BackfillRequested(
            domain="data.ny.gov", dataset_id="qzve-kjga", start=date(2013, 1, 1), stop=date(2013, 2, 1), request_id="r"
        )
    )
    failed = ActionTaken(
        automation="ingest-on-backfill-requested",
        action_type="run-deployment",
        triggering_event_id=event.id,
        flow_run_ids=(),
        at=datetime.now(UTC),
        failed=True,
        reason="Unexpected status from 'run-deployment' action: 503",
    )

    [outcome] = chunk_outcomes(RecordedObserver([failed]), [event])  # type: ignore[arg-type]

    assert outcome.state == START_FAILED
    assert outcome.done
    assert not outcome.succeeded
    assert "503" in outcome.message


def test_a_chunk_without_any_action_yet_is_still_waiting():
    event = TollwatchEvent.of(
        BackfillRequested(
            domain="data.ny.gov", dataset_id="qzve-kjga", start=date(2013, 1, 1), stop=date(2013, 2, 1), request_id="r"
        )
    )
    [outcome] = chunk_outcomes(RecordedObserver([]), [event])  # type: ignore[arg-type]
    assert not outcome.done
