"""`watch_upstream`: the timer handler against the mirror, Azurite and the real Prefect server."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from typer.testing import CliRunner

from tests.support.funcapp import BarrierSink, closed_port, settle, tick
from tollwatch import resources
from tollwatch.adapters.prefect_events import EmitError
from tollwatch.cli.main import app as cli_app
from tollwatch.contract.events import EventName
from tollwatch.core.watermark import UpstreamWatcher, WatchOutcome
from tollwatch_dev.mirror import MirrorServer

pytestmark = pytest.mark.stack

REFRESHED = EventName.DATASET_REFRESHED


def test_first_tick_announces_the_dataset_and_stores_the_watermark(app, fenv, state, mirror: MirrorServer):
    tick(app)

    (event,) = settle(fenv.api_url, fenv.resource_id, REFRESHED)
    assert event["payload"]["rows_updated_at"] == mirror.dataset.rows_updated_at
    assert event["payload"]["previous_rows_updated_at"] is None  # first sighting
    assert event["payload"]["source"] == "watcher"
    stored = state.read().value
    assert stored.rows_updated_at == mirror.dataset.rows_updated_at
    assert stored.event_id == event["id"]


def test_a_publish_is_announced_once_with_the_previous_watermark(app, fenv, state, mirror: MirrorServer):
    tick(app)
    before = mirror.dataset.rows_updated_at
    published = mirror.dataset.publish(days=7)

    tick(app)
    tick(app)  # nothing new: no event, watermark untouched

    events = settle(fenv.api_url, fenv.resource_id, REFRESHED)
    assert sorted(e["payload"]["rows_updated_at"] for e in events) == [before, published.updated_at]
    latest = next(e for e in events if e["payload"]["rows_updated_at"] == published.updated_at)
    assert latest["payload"]["previous_rows_updated_at"] == before
    assert state.read().value.rows_updated_at == published.updated_at


def test_two_watchers_racing_emit_one_refresh_and_advance_the_watermark_once(fenv, state, mirror: MirrorServer):
    settings = fenv.settings()
    barrier = threading.Barrier(2)  # both have read the watermark before either emits

    def watcher_run():
        watcher = UpstreamWatcher(
            resources.socrata_client(settings),
            resources.watermark_store(settings),
            BarrierSink(resources.event_emitter(settings), barrier),
        )
        return watcher.check()

    with ThreadPoolExecutor(2) as pool:
        results = [f.result() for f in [pool.submit(watcher_run), pool.submit(watcher_run)]]

    assert sorted(r.outcome for r in results) == sorted([WatchOutcome.ADVANCED, WatchOutcome.ALREADY_ADVANCED])
    assert results[0].event_id == results[1].event_id  # the same deterministic id from both
    (event,) = settle(fenv.api_url, fenv.resource_id, REFRESHED)
    assert event["id"] == results[0].event_id
    assert state.read().value.rows_updated_at == mirror.dataset.rows_updated_at


def test_prefect_down_fails_the_invocation_and_keeps_the_watermark(app, fenv, state, mirror, monkeypatch):
    tick(app)
    watermark = state.read()
    published = mirror.dataset.publish(days=1)

    with monkeypatch.context() as down:
        down.setenv("PREFECT_API_URL", f"http://127.0.0.1:{closed_port()}/api")
        with pytest.raises(EmitError, match="could not deliver"):
            tick(app)
    assert state.read() == watermark  # same value, same ETag: not written

    tick(app)  # the API is back: the same publish is announced now, once
    tick(app)

    events = settle(fenv.api_url, fenv.resource_id, REFRESHED)
    assert [e["payload"]["rows_updated_at"] for e in events].count(published.updated_at) == 1
    assert state.read().value.rows_updated_at == published.updated_at


def test_a_past_due_tick_catches_up_in_one_refresh(app, fenv, state, mirror: MirrorServer):
    tick(app)
    baseline = mirror.dataset.rows_updated_at
    for _ in range(3):  # three publishes while ticks were missed
        latest = mirror.dataset.publish(days=1)

    tick(app, past_due=True)
    tick(app)

    events = settle(fenv.api_url, fenv.resource_id, REFRESHED)
    catch_up = [e for e in events if e["payload"]["previous_rows_updated_at"] is not None]
    assert len(events) == 2
    assert len(catch_up) == 1
    assert catch_up[0]["payload"]["previous_rows_updated_at"] == baseline
    assert catch_up[0]["payload"]["rows_updated_at"] == latest.updated_at


def test_upstream_down_fails_the_invocation_without_emitting(app, fenv, state, monkeypatch):
    monkeypatch.setenv("TOLLWATCH_UPSTREAM_BASE_URL", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setenv("TOLLWATCH_UPSTREAM_MAX_ATTEMPTS", "1")
    from tollwatch.adapters.socrata import UpstreamError

    with pytest.raises(UpstreamError):
        tick(app)
    assert state.read().value is None
    assert settle(fenv.api_url, fenv.resource_id, REFRESHED) == []


def test_cli_watch_once_runs_the_timer_handler(fenv, state, mirror: MirrorServer):
    result = CliRunner().invoke(cli_app, ["watch", "--once", "--no-local-stack"])

    assert result.exit_code == 0, result.output
    (event,) = settle(fenv.api_url, fenv.resource_id, REFRESHED)
    assert state.read().value.event_id == event["id"]
