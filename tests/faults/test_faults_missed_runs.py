"""Issue 12: a run that never happens loses nothing.

A stack of this module's own (Azurite, Prefect server on SQLite with its automation services, Socrata mirror,
inbox, warm server, process worker), deployed from prefect.yaml, with automations/ as shipped applied through
`tollwatch automations apply` (the team subscriptions left out: they would only add downstream runs). The
mirror starts with 2024-01-01..07, which the fixture loads with a first watcher tick; the tests publish weeks
after it, so the table and the watermark carry over from test to test, and "nothing lost" is checked against
the stack's mirror itself, over its Socrata API.

The repair automations' times (TOLLWATCH_REPAIR_*_AFTER_S) are read when the automations are applied: the
tests of "the next refresh covers it" apply the shipped defaults (an hour and more, so no repair can interfere),
the repair tests apply Prefect's minimum for a proactive trigger, 10 s.

A run is made to end CRASHED before it runs as in the issue: the work pool is paused before the announcement,
the run the deployment trigger creates stays Scheduled, and it is set Crashed through the Prefect client.
"""

from __future__ import annotations

import re
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from uuid import UUID

import httpx
import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from tests.support.ingest_faults import assert_same_rows, committing_runs, mirror_rows, table_rows_by_key
from tests.support.stacks import deployed_stack
from tollwatch import resources
from tollwatch.adapters.socrata import window_where
from tollwatch.contract.events import REFRESH_ID_LABEL, DatasetRefreshed, TollwatchEvent, Window
from tollwatch.contract.settings import load_settings
from tollwatch.prefect.observe import connect
from tollwatch_dev.inbox import Received
from tollwatch_dev.stack import LocalStack, StackEndpoints

if TYPE_CHECKING:
    from prefect.client.schemas.objects import FlowRun

pytestmark = pytest.mark.stack

ROOT = Path(__file__).resolve().parents[2]
MIRROR_START, MIRROR_THROUGH = date(2024, 1, 1), date(2024, 1, 8)
POOL = "tollwatch-local"
REPAIR_S = 10  # Prefect's minimum `within` for a proactive trigger
REPAIR_VARIABLES = ("TOLLWATCH_REPAIR_REFRESH_AFTER_S", "TOLLWATCH_REPAIR_BACKFILL_AFTER_S")
FAIL_FAST = {
    "TOLLWATCH_UPSTREAM_MAX_ATTEMPTS": "2",
    "TOLLWATCH_UPSTREAM_BACKOFF_MAX_S": "0.2",
    "TOLLWATCH_TASK_RETRIES": "0",
}
T = TypeVar("T")


@dataclass(frozen=True)
class Missed:
    endpoints: StackEndpoints
    automations: Path
    ingest_deployment: UUID


@pytest.fixture(scope="module")
def missed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Missed]:
    from prefect.client.orchestration import get_client

    from tollwatch_dev.local_blocks import ensure_local_blocks

    state = tmp_path_factory.mktemp("missed")
    local = LocalStack(state, prefect_ui=False, mirror_start=MIRROR_START, mirror_through=MIRROR_THROUGH)
    automations = state / "automations"
    shutil.copytree(ROOT / "automations", automations, ignore=shutil.ignore_patterns("subscriptions"))
    with deployed_stack(local, FAIL_FAST) as endpoints:
        ensure_local_blocks(endpoints.inbox_url)
        with get_client(sync_client=True) as client:
            deployment = client.read_deployment_by_name("ingest/ingest").id
        stack = Missed(endpoints, automations, deployment)
        _apply(stack, repair_s=None)
        history = _watch_once()  # an empty watermark: the first tick announces the whole history
        _wait_state(_run_started_by(history, 60).id, "COMPLETED", 120)
        yield stack


# ------------------------------------------------------------------------------------------------ helpers


def _cli():
    from tollwatch.cli.main import app

    return app


def _wait(probe: Callable[[], T | None], timeout_s: float, what: str, poll_s: float = 0.5) -> T:
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not within {timeout_s:.0f} s")
        time.sleep(poll_s)


def _apply(stack: Missed, *, repair_s: int | None) -> None:
    """`tollwatch automations apply` with the repair times set to `repair_s` (None: the files' defaults)."""
    with pytest.MonkeyPatch.context() as patch:
        for name in REPAIR_VARIABLES:
            if repair_s is None:
                patch.delenv(name, raising=False)
            else:
                patch.setenv(name, str(repair_s))
        applied = CliRunner().invoke(_cli(), ["automations", "apply", "--dir", str(stack.automations)])
    assert applied.exit_code == 0, applied.output


def _publish_week(stack: Missed) -> dict[str, Any]:
    """`POST /admin/publish {"days": 7}` on the stack's mirror: the new rowsUpdatedAt and published_through."""
    response = httpx.post(f"{stack.endpoints.mirror_url}/admin/publish", json={"days": 7}, timeout=30)
    response.raise_for_status()
    return dict(response.json())


def _published(stack: Missed) -> Window:
    state = httpx.get(f"{stack.endpoints.mirror_url}/admin/state", timeout=30).json()
    return Window(start=MIRROR_START, stop=date.fromisoformat(state["published_through"]))


def _watch_once() -> UUID:
    """One watcher tick (`tollwatch_dev.demo.watch_once`: the watcher the CLI and the Function build)."""
    from tollwatch_dev.demo import watch_once

    return watch_once()


def _watch_once_through_the_cli() -> None:
    result = CliRunner().invoke(_cli(), ["watch", "--once", "--no-local-stack"])
    assert result.exit_code == 0, result.output


class _RemoteMirror:
    """The stack's mirror as `mirror_rows` reads one (`.dataset.query`), over its Socrata API."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.dataset = self

    def query(self, params: dict[str, str]) -> list[dict[str, str]]:
        response = httpx.get(
            f"{self.url}/resource/{load_settings().upstream_dataset_id}.json", params=params, timeout=60
        )
        response.raise_for_status()
        return list(response.json())


def _expected(stack: Missed, window: Window) -> dict:
    return mirror_rows(_RemoteMirror(stack.endpoints.mirror_url), window_where(window.start, window.stop))  # type: ignore[arg-type]


def _days(window: Window | None = None) -> str:
    """The table's days as ranges, with rows per day: what the closing note shows."""
    data = resources.table_store(load_settings()).read(window)
    per_day = Counter(data.column("date").to_pylist()) if data.num_rows else Counter()
    ranges: list[list[date]] = []
    for day in sorted(per_day):
        if ranges and (day - ranges[-1][-1]).days == 1:
            ranges[-1].append(day)
        else:
            ranges.append([day])
    sizes = sorted(set(per_day.values()))
    text = ", ".join(f"{r[0]}..{r[-1]}" if len(r) > 1 else f"{r[0]}" for r in ranges)
    return f"{text} ({len(per_day)} days, {'/'.join(map(str, sizes))} rows per day)"


def _ingest_runs(stack: Missed, **parameters: Any) -> list[FlowRun]:
    """Runs of ingest/ingest whose parameters include `parameters`, oldest first."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[stack.ingest_deployment])),
            sort=FlowRunSort.EXPECTED_START_TIME_DESC,
            limit=100,
        )
    ours = [r for r in runs if all(r.parameters.get(k) == v for k, v in parameters.items())]
    return sorted(ours, key=lambda r: r.created or r.expected_start_time)  # type: ignore[arg-type,return-value]


def _run_started_by(event_id: UUID, timeout_s: float) -> FlowRun:
    """The run an automation created for this event (read from the server's action records)."""

    def probe() -> FlowRun | None:
        with connect() as obs:
            run_ids = [run for action in obs.actions_on([event_id]) for run in action.flow_run_ids]
            return next(iter(obs.flow_runs(run_ids[:1]).values()), None) if run_ids else None

    return _wait(probe, timeout_s, f"a run for event {event_id}")


def _state(run_id: UUID) -> str:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(run_id)
    return run.state.type.value if run.state else "UNKNOWN"


def _wait_state(run_id: UUID, wanted: str, timeout_s: float) -> None:
    def probe() -> bool:
        state = _state(run_id)
        if state in ("FAILED", "CRASHED", "CANCELLED") and state != wanted:
            raise AssertionError(f"run {run_id} ended {state}, expected {wanted}")
        return state == wanted

    _wait(probe, timeout_s, f"run {run_id} {wanted}")


@contextmanager
def _pool_paused() -> Iterator[None]:
    """The work pool paused (the worker is handed no run), resumed afterwards whatever happens."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolUpdate

    with get_client(sync_client=True) as client:
        client.update_work_pool(POOL, WorkPoolUpdate(is_paused=True))
    try:
        yield
    finally:
        with get_client(sync_client=True) as client:
            client.update_work_pool(POOL, WorkPoolUpdate(is_paused=False))


def _crash_before_it_runs(run: FlowRun) -> float:
    """End a Scheduled run CRASHED (as the worker does when it cannot submit a run); returns when (monotonic)."""
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    assert run.state is not None
    assert run.state.type.value == "SCHEDULED", f"run {run.id} was to be crashed before running: {run.state}"
    message = "Flow run could not be submitted to infrastructure: simulated (tests/faults/test_faults_missed_runs.py)"
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(run.id, Crashed(message=message), force=True)
    crashed = time.monotonic()
    assert _state(run.id) == "CRASHED"
    return crashed


def _alerts(stack: Missed, text: str) -> list[Received]:
    """Notifications the alerts block posted that mention `text` (the stack's inbox log `alerts.jsonl`)."""
    log = stack.endpoints.state_dir / "inbox" / "alerts.jsonl"
    alerts = []
    for line in log.read_text().splitlines() if log.exists() else []:
        try:
            alert = Received.model_validate_json(line)
        except ValidationError:
            continue  # a line being written right now: complete at the next read
        if text in alert.body:
            alerts.append(alert)
    return alerts


def _repairs(stack: Missed, crashed: FlowRun, automation: str, announcement: UUID) -> list[FlowRun]:
    """The runs `automation` started for `announcement` besides the crashed one, once all have completed: the
    same parameters as the crashed run. Normally one; on SQLite Prefect sometimes acts on one firing twice (see
    automations/repair-refresh.yaml), and the ledger makes the second a no-op."""
    runs = [run for run in _ingest_runs(stack, **crashed.parameters) if run.id != crashed.id]
    assert runs, f"no run besides the crashed one has the parameters {crashed.parameters}"
    with connect() as obs:
        for run in runs:
            started_by = obs.action_starting(run.id)
            assert started_by is not None, f"run {run.id} was not started by an automation"
            assert (started_by.automation, started_by.triggering_event_id) == (automation, announcement)
    for run in runs:
        _wait_state(run.id, "COMPLETED", 60)
    return runs


def _refresh_id(rows_updated_at: int) -> str:
    settings = load_settings()
    return DatasetRefreshed(
        domain=settings.upstream_domain, dataset_id=settings.upstream_dataset_id, rows_updated_at=rows_updated_at
    ).refresh_id


# ------------------------------------------------------------------ the next refresh covers what was missed


def test_a_refresh_whose_run_crashed_before_running_is_covered_by_the_next_refresh(missed):
    """The issue's reproduction: pool paused, a week published, `tollwatch watch --once` → its refresh run ends
    CRASHED before it runs; pool resumed, another week published, `watch --once` → that refresh completes.
    Expected: every published day is in the table exactly once, with the upstream's rows (before issue 12 the
    crashed refresh's week was missing for good)."""
    _apply(missed, repair_s=None)  # no repair within this test: only the next refresh may cover the week
    with _pool_paused():
        crashed_week = _publish_week(missed)
        _watch_once_through_the_cli()
        [run] = _wait(lambda: _ingest_runs(missed, rows_updated_at=crashed_week["rowsUpdatedAt"]), 60, "its run")
        _crash_before_it_runs(run)
    next_week = _publish_week(missed)
    _watch_once_through_the_cli()
    [following] = _wait(lambda: _ingest_runs(missed, rows_updated_at=next_week["rowsUpdatedAt"]), 60, "next run")
    _wait_state(following.id, "COMPLETED", 120)

    published = _published(missed)
    print(f"\npublished {published}; table: {_days()}")
    assert_same_rows(table_rows_by_key(published), _expected(missed, published))


def test_a_lost_announcement_and_a_failed_run_deployment_action_are_covered_by_the_next_refresh(missed, monkeypatch):
    """Fault: a publish whose refresh event went nowhere (the watcher's emit reached no server, the watermark
    advanced anyway), then a publish whose event arrived but whose run-deployment action failed (the server
    refused to create the run: here because the payload does not fit the deployment's parameter schema), then
    an ordinary publish and refresh.
    Expected: the third refresh completes and every published day is in the table exactly once."""
    _apply(missed, repair_s=None)
    real_emitter = resources.event_emitter

    class Nowhere:
        def emit(self, events: list[TollwatchEvent]) -> None:
            pass

    class Refused:
        def __init__(self, settings: Any, http: Any = None) -> None:
            self.inner = real_emitter(settings, http)

        def emit(self, events: list[TollwatchEvent]) -> None:
            self.inner.emit(
                [e.model_copy(update={"payload": {**e.payload, "rows_updated_at": "refused"}}) for e in events]
            )

    _publish_week(missed)
    with monkeypatch.context() as patch:
        patch.setattr(resources, "event_emitter", lambda settings, http=None: Nowhere())
        _watch_once()
    _publish_week(missed)
    with monkeypatch.context() as patch:
        patch.setattr(resources, "event_emitter", Refused)
        refused = _watch_once()

    def failed_action() -> bool:
        with connect() as obs:
            return any(action.failed and not action.flow_run_ids for action in obs.actions_on([refused]))

    _wait(failed_action, 60, f"a failed run-deployment action for event {refused}")

    _publish_week(missed)
    _wait_state(_run_started_by(_watch_once(), 60).id, "COMPLETED", 120)

    published = _published(missed)
    print(f"\npublished {published}; table: {_days()}")
    assert_same_rows(table_rows_by_key(published), _expected(missed, published))


# -------------------------------------------------------------------------------- the repair automations


def _until_loaded(window: Window, expected: dict, started: float, timeout_s: float) -> float:
    """Poll the table until the window holds exactly the upstream's rows; returns when (monotonic)."""

    def loaded() -> bool:
        try:
            assert_same_rows(table_rows_by_key(window), expected)
        except AssertionError:
            return False
        return True

    _wait(loaded, timeout_s, f"the table complete for {window} ({time.monotonic() - started:.0f} s after the crash)")
    return time.monotonic()


def test_the_repair_automation_reruns_a_refresh_whose_run_crashed_and_the_table_ends_complete(missed):
    """Fault: a refresh's run ends CRASHED before it runs, and nothing else is published.
    Expected: after the repair time (10 s here) the shipped repair-refresh automation runs ingest/ingest again
    with the announcement's parameters; that run commits the week (the ledger names it), the table holds every
    row of the week exactly once, and the alerts channel is told which refresh it was. Prints the time from the
    crash (and from the announcement) to the complete table."""
    _apply(missed, repair_s=REPAIR_S)
    with _pool_paused():
        batch = _publish_week(missed)
        announced_at = time.monotonic()
        announcement = _watch_once()
        crashed_run = _run_started_by(announcement, 60)
        crashed_at = _crash_before_it_runs(crashed_run)
    through = date.fromisoformat(batch["published_through"])
    week = Window(start=through - timedelta(days=7), stop=through)
    expected = _expected(missed, week)

    complete_at = _until_loaded(week, expected, crashed_at, 120)

    refresh_id = _refresh_id(batch["rowsUpdatedAt"])
    repairs = _repairs(missed, crashed_run, "tollwatch-repair-refresh", announcement)
    assert len(committing_runs(refresh_id)) == 1
    assert committing_runs(refresh_id) <= {str(run.id) for run in repairs}
    alerts = _wait(lambda: _alerts(missed, refresh_id), 30, f"a notification naming refresh {refresh_id}")
    assert alerts[0].json_body["subject"] == f"tollwatch: refresh {refresh_id} did not complete; ingest started again"
    # on SQLite Prefect sometimes acts on one firing twice (see automations/repair-refresh.yaml): the same alert
    assert {a.body for a in alerts} == {alerts[0].body}, [a.body for a in alerts]
    print(
        f"\nrepair of refresh {refresh_id} (repair time {REPAIR_S} s): crash → complete table "
        f"{complete_at - crashed_at:.1f} s, announcement → complete table {complete_at - announced_at:.1f} s; "
        f"{len(repairs)} repair run(s), {len(alerts)} notification(s); table: {_days(week)}"
    )


_CHUNK_LINE = re.compile(r"^\s*\[(\S+), (\S+)\)\s+event ([0-9a-f-]{36})\s*$", re.MULTILINE)


def test_the_repair_automation_reruns_a_backfill_chunk_whose_run_crashed_and_the_window_ends_complete(missed):
    """Fault: a one-chunk backfill sent without --wait (nobody follows it); its run ends CRASHED before it runs.
    Expected: after the repair time the shipped repair-backfill automation runs ingest/ingest again for the same
    window and request; that run commits the chunk (the ledger names it), the window holds exactly the
    upstream's rows, and a notification names the chunk."""
    _apply(missed, repair_s=REPAIR_S)
    window = Window(start=MIRROR_START, stop=MIRROR_THROUGH)
    with _pool_paused():
        sent = CliRunner().invoke(
            _cli(),
            ["backfill", "--start", str(window.start), "--stop", str(window.stop), "--chunk", "week",
             "--reason", "missed-runs test", "--no-local-stack"],
        )  # fmt: skip
        assert sent.exit_code == 0, sent.output
        [(start, stop, event_id)] = _CHUNK_LINE.findall(sent.output)
        assert (start, stop) == (str(window.start), str(window.stop)), sent.output
        chunk_event = UUID(event_id)
        crashed_run = _run_started_by(chunk_event, 60)
        crashed_at = _crash_before_it_runs(crashed_run)
    with connect() as obs:
        event = obs.event(chunk_event)
    assert event is not None
    refresh_id = event.resource[REFRESH_ID_LABEL]

    committed = _wait(lambda: committing_runs(refresh_id), 120, f"a commit of chunk {window} (refresh {refresh_id})")
    complete_at = time.monotonic()

    repairs = _repairs(missed, crashed_run, "tollwatch-repair-backfill", chunk_event)
    assert len(committed) == 1
    assert committed <= {str(run.id) for run in repairs}
    assert_same_rows(table_rows_by_key(window), _expected(missed, window))
    alerts = _wait(lambda: _alerts(missed, refresh_id), 30, f"a notification naming chunk {window}")
    assert alerts[0].json_body["subject"] == (
        f"tollwatch: backfill chunk {window.start}..{window.stop} did not complete; ingest started again"
    )
    print(
        f"\nrepair of backfill chunk {window} (repair time {REPAIR_S} s): crash → committed "
        f"{complete_at - crashed_at:.1f} s; {len(repairs)} repair run(s), {len(alerts)} notification(s)"
    )
