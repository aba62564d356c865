"""Faults on the input side (issue 7, faults 1-4, 11, 12): what reaches Prefect, and what the table ends up with.

Everything is real except Event Grid itself: the Function app's handlers are called as the Functions host calls
them (`get_user_function()` on the built app), the events land on the session's Prefect server (with
`prefect.yaml` deployed, so its triggers create the ingest runs), state lives in Azurite, the upstream is the
mirror and the table is pyiceberg on disk. Prefect outages are a loopback proxy in front of the real server
(`FlakyPrefect`) or a port nobody listens on. "Nothing emitted" is read back with `settle` (a sentinel event
sent afterwards), never by waiting a while.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from tests.support.funcapp import (
    NEXT_SECRET,
    SAMPLE_TOPIC,
    SECRET,
    blob_created,
    body,
    closed_port,
    deliver,
    expected_id,
    json_of,
    payload,
    post_backfill,
    recorded_sequencer,
    settle,
    tick,
)
from tests.support.input_faults import (
    Fault,
    FlakyPrefect,
    eventgrid_time,
    mirror_rows,
    run_in_process,
    runs_started_by,
    snapshot_ids,
    snapshot_summary,
    stored_ids,
    table_rows,
    triggers_acted,
)
from tests.support.prefect_events import prefect_headers
from tollwatch.adapters.prefect_events import EmitError
from tollwatch.cli.main import app as cli_app
from tollwatch.contract.events import DatasetRefreshed, EventName, Window, table_resource_id
from tollwatch.contract.table import FLOW_RUN_ID, REFRESH_ID
from tollwatch.prefect.flows.ingest import ingest
from tollwatch_dev.mirror import MirrorServer

pytestmark = pytest.mark.stack

# Fixtures from tests/conftest.py: the built Function app (`app`), this test's settings (`fenv`: own upstream domain,
# so own event resource and ids), its watermark store (`state`), and prefect.yaml deployed into the session's server
# (`deployed`: its triggers).


@pytest.fixture(scope="module")
def triggers(deployed: str) -> Iterator[str]:
    """prefect.yaml deployed (its event triggers create the ingest runs) for this module only, once its
    triggers are seen acting on an event.

    Afterwards the deployments go again, with their trigger automations and the runs still Scheduled (nothing
    executes them here): events that later modules send to the shared server start no runs, as before.
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: deployed}):
        triggers_acted(deployed, domain="triggers-live.test")
    yield deployed
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with temporary_settings(updates={PREFECT_API_URL: deployed}), get_client(sync_client=True) as client:
        for name in DEPLOYMENTS:
            try:
                deployment = client.read_deployment_by_name(name)
            except ObjectNotFound:
                continue
            client.delete_resource_owned_automations(f"prefect.deployment.{deployment.id}")
            client.delete_deployment(deployment.id)


REFRESHED = EventName.DATASET_REFRESHED
REQUESTED = EventName.BACKFILL_REQUESTED
COMPLETED = EventName.INGESTION_COMPLETED
TABLE_RESOURCE = table_resource_id("tollwatch", "bronze.bnt_traffic_hourly")
SUBSCRIPTION = "tollwatch-upstream"
ROWS_PER_DAY = 11 * 2 * 24
DEPLOYMENTS = ("ingest/ingest", "run-job/run-job")  # <flow>/<deployment> of every deployment in prefect.yaml


# ---------------------------------------------------------------------------------------------- helpers


def publish_a_week(state, mirror: MirrorServer) -> tuple[int, Any, Window]:
    """The watermark at the mirror's current publish (as if announced and loaded before: the history is in the
    table, so its ledger is committed through it), then a new week published.

    Returns the watermark, the publish batch and the days it added: what a refresh must load, nothing more.
    """
    before = mirror.dataset.rows_updated_at
    seed = DatasetRefreshed(domain=state.domain, dataset_id=state.dataset_id, rows_updated_at=before)
    assert state.advance(seed, "seeded-by-the-test", state.read())
    ingest(rows_updated_at=before)
    first_new_day = mirror.dataset.published_through
    published = mirror.dataset.publish(days=7)
    return before, published, Window(start=first_new_day, stop=mirror.dataset.published_through)


def blob_created_at(epoch_s: int, **data: str) -> dict[str, Any]:
    """Microsoft's sample BlobCreated, written at `epoch_s` (the receiver announces it as that rowsUpdatedAt)."""
    event = blob_created(**data)
    event["eventTime"] = eventgrid_time(epoch_s)
    return event


def assert_table_is_the_mirror(mirror: MirrorServer, window: Window) -> None:
    """Nothing lost, nothing doubled: the table holds exactly the mirror's rows for the window, once each."""
    expected = mirror_rows(mirror, window)
    rows, count = table_rows(window)
    assert count == len(rows), f"{count - len(rows)} duplicate key(s) in the table"
    assert len(expected) == window.days * ROWS_PER_DAY
    assert rows == expected


def as_posted(event: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """A stored event back in the shape `POST /api/events` takes (optionally with changes, e.g. a new id)."""
    fields = ("id", "event", "occurred", "resource", "related", "payload")
    return {key: event[key] for key in fields if key in event} | changes


# ---------------------------------------------------------------------------------------------- fault 1


def test_one_blob_created_delivered_three_times_at_once_is_one_event_one_run_one_snapshot(
    app, fenv, state, mirror, triggers
):
    """Fault 1: Event Grid delivers the same BlobCreated three times, concurrently (at-least-once delivery).

    Expected: every delivery is answered 200 and re-sends the same deterministic event id; the Prefect server
    stores one `tollwatch.dataset.refreshed`, its deployment trigger creates one ingest run, and executing that
    run adds one Iceberg snapshot, which records the refresh and that run.
    Nothing lost: the table holds exactly the mirror's rows for the published week, with no duplicate key.
    """
    watermark, published, week = publish_a_week(state, mirror)
    delivery = body([blob_created_at(published.updated_at)])
    at_once = threading.Barrier(3)

    def deliver_when_all_are_ready(_: int):
        at_once.wait(timeout=30)
        return deliver(app, delivery)

    with ThreadPoolExecutor(3) as pool:
        responses = list(pool.map(deliver_when_all_are_ready, range(3)))

    assert [r.status_code for r in responses] == [200, 200, 200]
    event_id = expected_id(fenv)
    assert {e["event_id"] for r in responses for e in json_of(r)["emitted"]} == {event_id}
    stored = settle(fenv.api_url, fenv.resource_id, REFRESHED)
    assert stored_ids(stored) == {event_id: 1}
    assert stored[0]["payload"]["rows_updated_at"] == published.updated_at
    assert stored[0]["payload"]["previous_rows_updated_at"] == watermark

    (run,) = runs_started_by(fenv.api_url, event_id, domain=fenv.domain)
    assert run.parameters == {"rows_updated_at": published.updated_at, "previous_rows_updated_at": watermark}
    history = snapshot_ids()
    completed = run_in_process(ingest, run)

    (snapshot,) = snapshot_ids()[len(history) :]
    assert completed.snapshot_id == snapshot
    assert completed.window == week
    summary = snapshot_summary(snapshot)
    assert summary[REFRESH_ID] == completed.refresh_id
    assert summary[FLOW_RUN_ID] == str(run.id)
    assert_table_is_the_mirror(mirror, week)


# ---------------------------------------------------------------------------------------------- fault 2


@pytest.mark.parametrize("second_announcement", ["watcher-announces-the-same-publish", "redelivered-with-a-new-id"])
def test_the_same_refresh_under_another_event_id_starts_a_run_that_commits_nothing(
    app, fenv, state, mirror, triggers, second_announcement
):
    """Fault 2: the same refresh arrives again under a different event id, so Prefect cannot drop it as a
    duplicate: the watcher announces the publish Event Grid already announced, or the refresh event is
    re-delivered after Prefect's dedupe window (re-posted with a fresh id).

    Expected: the trigger starts a second ingest run; the snapshot ledger makes it a no-op (already committed,
    same snapshot id, no new snapshot, table unchanged) and its completion event has the first one's id, so
    the server keeps one completion.
    Nothing lost: the table still holds exactly the mirror's rows for the published week, no duplicate key.
    """
    watermark, published, week = publish_a_week(state, mirror)
    assert deliver(app, body([blob_created_at(published.updated_at)])).status_code == 200
    (first_event,) = settle(fenv.api_url, fenv.resource_id, REFRESHED)
    (first_run,) = runs_started_by(fenv.api_url, first_event["id"], domain=fenv.domain)
    first = run_in_process(ingest, first_run)
    snapshots, rows = snapshot_ids(), table_rows()

    if second_announcement == "watcher-announces-the-same-publish":
        tick(app)
        second_id = state.read().value.event_id
    else:
        second_id = str(uuid.uuid4())
        again = [as_posted(first_event, id=second_id)]
        httpx.post(f"{fenv.api_url}/events", json=again, timeout=30, headers=prefect_headers()).raise_for_status()
    announced = {e["id"]: e["payload"] for e in settle(fenv.api_url, fenv.resource_id, REFRESHED)}
    assert set(announced) == {first_event["id"], second_id}
    assert announced[second_id]["rows_updated_at"] == published.updated_at
    assert announced[second_id]["previous_rows_updated_at"] == watermark

    (second_run,) = runs_started_by(fenv.api_url, second_id, domain=fenv.domain)
    assert second_run.id != first_run.id
    assert second_run.parameters == first_run.parameters
    second = run_in_process(ingest, second_run)

    assert first.already_committed is False
    assert second.already_committed is True
    assert second.refresh_id == first.refresh_id
    assert second.snapshot_id == first.snapshot_id
    assert snapshot_ids() == snapshots
    assert table_rows() == rows
    assert second.event_id() == first.event_id()
    completions = settle(fenv.api_url, TABLE_RESOURCE, COMPLETED)
    assert stored_ids(completions)[str(first.event_id())] == 1
    assert_table_is_the_mirror(mirror, week)


# ---------------------------------------------------------------------------------------------- fault 3


def test_prefect_unreachable_fails_the_watcher_tick_and_the_next_tick_announces_once(
    app, fenv, state, mirror, monkeypatch
):
    """Fault 3: the Prefect API is unreachable while the watcher (timer function) emits: first nothing listens
    on its port, then the connection is dropped without an answer on every try.

    Expected: each such invocation fails (raises, so the Functions host retries it) and leaves the watermark
    exactly as it was (same value, same ETag); the next tick with the API back announces the publish once,
    and a tick after that announces nothing.
    Nothing lost: the one announcement spans the whole publish (previous = the old watermark), and ingesting
    it leaves the table equal to the mirror's rows for the published week.
    """
    monkeypatch.setenv("TOLLWATCH_EMIT_MAX_ATTEMPTS", "3")
    watermark, published, week = publish_a_week(state, mirror)
    before = state.read()

    with monkeypatch.context() as down:
        down.setenv("PREFECT_API_URL", f"http://127.0.0.1:{closed_port()}/api")
        with pytest.raises(EmitError, match="could not deliver"):
            tick(app)
    assert state.read() == before

    with FlakyPrefect(fenv.api_url) as proxy, monkeypatch.context() as flaky:
        flaky.setenv("PREFECT_API_URL", proxy.api_url)
        proxy.inject(Fault.DROP, Fault.DROP, Fault.DROP)
        with pytest.raises(EmitError, match="could not deliver"):
            tick(app)
        assert proxy.outcomes() == ["drop", "drop", "drop"]  # retried, and never reached the server
    assert state.read() == before
    assert settle(fenv.api_url, fenv.resource_id, REFRESHED) == []

    tick(app)  # the API is back
    tick(app)  # nothing new upstream

    (event,) = settle(fenv.api_url, fenv.resource_id, REFRESHED)
    after = state.read().value
    assert event["id"] == after.event_id
    assert after.rows_updated_at == event["payload"]["rows_updated_at"] == published.updated_at
    assert event["payload"]["previous_rows_updated_at"] == watermark
    ingest(**{key: event["payload"][key] for key in ("rows_updated_at", "previous_rows_updated_at")})
    assert_table_is_the_mirror(mirror, week)


# ---------------------------------------------------------------------------------------------- fault 4


def test_backfill_route_rides_out_503s_and_stores_every_chunk_once(app, fenv, monkeypatch):
    """Fault 4 (HTTP route): Prefect answers 503 for a while during a backfill emit, once after it had in fact
    stored the events (the answer was lost).

    Expected: the emitter retries within its budget and the route answers 202 with one event id per chunk;
    retrying a request the server had already stored is harmless.
    Nothing lost: every chunk's event is stored on the real server exactly once, and no other.
    """
    monkeypatch.setenv("TOLLWATCH_EMIT_MAX_ATTEMPTS", "5")
    with FlakyPrefect(fenv.api_url) as proxy:
        monkeypatch.setenv("PREFECT_API_URL", proxy.api_url)
        proxy.inject(Fault.UNAVAILABLE, Fault.UNAVAILABLE, Fault.LOST_ANSWER, Fault.UNAVAILABLE)
        response = post_backfill(
            app, {"start": "2024-01-01", "stop": "2024-04-01", "chunk": "week", "reason": "fault 4"}
        )
        outcomes = proxy.outcomes()

    assert response.status_code == 202, json_of(response)
    assert outcomes == ["503", "503", "lost-answer", "503", "forwarded 204"]
    chunk_ids = json_of(response)["event_ids"]
    assert len(chunk_ids) == len(set(chunk_ids)) == 13  # the ISO weeks of Q1 2024 (2024-01-01 is a Monday)
    stored = settle(fenv.api_url, fenv.resource_id, REQUESTED)
    assert stored_ids(stored) == dict.fromkeys(chunk_ids, 1)


def test_backfill_route_answers_503_when_prefect_stays_down_and_the_retry_stores_each_chunk_once(
    app, fenv, monkeypatch
):
    """Fault 4 (HTTP route, 503 outlasting the emitter's retries, the last one after Prefect had in fact stored
    the events): the route answers 503 with Retry-After, saying a retry is safe, and the caller's retry of the
    same request succeeds with the same ids, which the server already holds.

    Nothing lost, nothing doubled: each chunk's event is stored exactly once, with the ids the 202 lists.
    """
    monkeypatch.setenv("TOLLWATCH_EMIT_MAX_ATTEMPTS", "2")
    request = {"start": "2024-01-01", "stop": "2024-04-01", "chunk": "month"}
    with FlakyPrefect(fenv.api_url) as proxy:
        monkeypatch.setenv("PREFECT_API_URL", proxy.api_url)
        proxy.inject(Fault.UNAVAILABLE, Fault.LOST_ANSWER)
        refused = post_backfill(app, request)
        accepted = post_backfill(app, request)
        outcomes = proxy.outcomes()

    assert refused.status_code == 503
    assert refused.headers["Retry-After"] == "30"
    assert "retrying the same request is safe" in json_of(refused)["error"]
    assert accepted.status_code == 202
    assert outcomes == ["503", "lost-answer", "forwarded 204"]
    stored = settle(fenv.api_url, fenv.resource_id, REQUESTED)
    assert stored_ids(stored) == dict.fromkeys(json_of(accepted)["event_ids"], 1)
    assert len(stored) == 3


def test_cli_backfill_through_503s_emits_every_chunk_once_and_a_rerun_of_the_command_adds_nothing(fenv, monkeypatch):
    """Fault 4 (CLI path, `tollwatch backfill` through tollwatch.adapters.prefect_events): first 503 for longer than
    the emitter
    retries (the command fails with a sentence, exit 1), then the same command again meets a lost answer and
    a 503 and succeeds; a third run of the same command adds nothing (chunks whose event already started a
    run are not requested again, the others are duplicate ids Prefect drops).

    Nothing lost: each chunk's `tollwatch.backfill.requested` is stored exactly once.
    """
    monkeypatch.setenv("TOLLWATCH_EMIT_MAX_ATTEMPTS", "3")
    command = ["backfill", "--start", "2024-01-01", "--stop", "2024-04-01", "--chunk", "month", "--no-local-stack"]
    runner = CliRunner()
    with FlakyPrefect(fenv.api_url) as proxy:
        monkeypatch.setenv("TOLLWATCH_PREFECT_API_URL", proxy.api_url)
        proxy.inject(Fault.UNAVAILABLE, Fault.UNAVAILABLE, Fault.UNAVAILABLE)
        failed = runner.invoke(cli_app, command)
        assert settle(fenv.api_url, fenv.resource_id, REQUESTED) == []
        proxy.inject(Fault.LOST_ANSWER, Fault.UNAVAILABLE)
        succeeded = runner.invoke(cli_app, command)
        again = runner.invoke(cli_app, command)
        outcomes = proxy.outcomes()

    assert failed.exit_code == 1
    assert "could not deliver 3 event(s)" in failed.output
    assert "HTTP 503" in failed.output
    assert succeeded.exit_code == 0, succeeded.output
    assert again.exit_code == 0, again.output
    assert outcomes[:6] == ["503", "503", "503", "lost-answer", "503", "forwarded 204"]
    assert outcomes[6:] in ([], ["forwarded 204"])  # the third command sends only chunks without a run yet
    listed = [line.split("event ")[1].strip() for line in succeeded.output.splitlines() if "  event " in line]
    assert len(listed) == 3
    stored = settle(fenv.api_url, fenv.resource_id, REQUESTED)
    assert stored_ids(stored) == dict.fromkeys(listed, 1)


# ---------------------------------------------------------------------------------------------- fault 11


@pytest.fixture
def subscribed(fenv, monkeypatch):
    """This endpoint accepts deliveries from one Event Grid subscription (and the samples' topic, two secrets)."""
    monkeypatch.setenv("TOLLWATCH_EVENTGRID_SUBSCRIPTION_NAMES", SUBSCRIPTION)
    return fenv


def deliver_from(app, data: bytes, *, subscription: str | None = SUBSCRIPTION.upper(), **kwargs: Any):
    """A webhook delivery as Event Grid sends it: `aeg-subscription-name` (upper-cased, as Azure may) + secret."""
    headers = dict(kwargs.pop("headers", None) or {})
    if subscription is not None:
        headers["aeg-subscription-name"] = subscription
    return deliver(app, data, headers=headers, **kwargs)


def _wrong_topic() -> dict[str, Any]:
    event = blob_created(id="wrong-topic")
    event["topic"] = SAMPLE_TOPIC.replace("my-storage-account", "someone-elses-account")
    return event


def _padded(size: int) -> bytes:
    event = blob_created()
    event["data"]["storageDiagnostics"]["padding"] = "x" * size
    return body([event])


BLOB_DELETED = payload("blob-deleted.eventgrid.json")


@pytest.mark.parametrize(
    ("data", "extra", "status", "reason"),
    [
        pytest.param(
            body([blob_created()]),
            {"subscription": "SOMEONE-ELSES-SUBSCRIPTION"},
            403,
            "event subscription 'SOMEONE-ELSES-SUBSCRIPTION' is not one this endpoint accepts",
            id="unknown-subscription-name",
        ),
        pytest.param(
            body([blob_created()]),
            {"subscription": None},
            403,
            "missing aeg-subscription-name header",
            id="no-subscription-name",
        ),
        pytest.param(
            body([blob_created()]), {"secret": "last-years-secret"}, 401, "wrong shared secret", id="wrong-secret"
        ),
        pytest.param(body([blob_created()]), {"secret": None}, 401, "missing shared secret", id="no-secret"),
        pytest.param(_padded(1_100_000), {}, 413, "exceeds the 1048576-byte limit", id="oversize-body"),
        pytest.param(b"<xml>BlobCreated</xml>", {}, 400, "body is not JSON", id="non-json"),
        pytest.param(body([_wrong_topic()]), {}, 400, "topic/source", id="wrong-topic"),
        pytest.param(body(BLOB_DELETED), {}, 400, "unexpected event type", id="unexpected-event-type"),
        pytest.param(
            body([*BLOB_DELETED, _wrong_topic()]),
            {},
            400,
            "event 0: unexpected event type 'Microsoft.Storage.BlobDeleted'; only Microsoft.Storage.BlobCreated; "
            "event 1: topic/source",
            id="batch-of-only-bad-events",
        ),
        pytest.param(
            body([*payload("subscription-validation.eventgrid.json"), blob_created()]),
            {},
            400,
            "must be the only event",
            id="handshake-inside-a-batch",
        ),
        pytest.param(b"", {"method": "GET"}, 405, "method GET not allowed", id="get"),
    ],
)
def test_refused_event_grid_requests_get_their_documented_status_and_emit_nothing(
    app, subscribed, data, extra, status, reason
):
    """Fault 11: Event Grid input that must be refused — an unknown or missing subscription name, a wrong or
    missing secret, an oversize body, non-JSON, a wrong topic, an unexpected event type, a batch of only bad
    events, a handshake inside a batch, a GET.

    Expected: the documented status (401 secret, 403 subscription, 405 method, 413 size, 400 content; Event
    Grid retries none of them) with a reason naming the problem, and no traceback.
    Nothing emitted: no refresh event reaches the real Prefect server and no sequencer is recorded.
    """
    response = deliver_from(app, data, **extra)

    assert response.status_code == status, json_of(response)
    assert reason in json_of(response)["error"]
    assert "Traceback" not in response.get_body().decode()
    assert settle(subscribed.api_url, subscribed.resource_id, REFRESHED) == []
    assert recorded_sequencer(subscribed) is None


def test_replayed_handshakes_are_answered_every_time_and_emit_nothing(app, subscribed):
    """Fault 11 (handshake replayed): Event Grid repeats the SubscriptionValidationEvent and the CloudEvents
    OPTIONS handshake (e.g. after a subscription update, or because an answer was lost).

    Expected: every replay gets the same 200 answer (the validation code echoed; WebHook-Allowed-Origin
    granted); a validation from an unknown subscription is 403.
    Nothing emitted: no refresh event on the real server, no sequencer recorded.
    """
    validation = body(payload("subscription-validation.eventgrid.json"))
    handshake = {"aeg-event-type": "SubscriptionValidation"}
    answers = [deliver_from(app, validation, headers=handshake) for _ in range(3)]
    options = [
        deliver_from(app, b"", method="OPTIONS", headers={"WebHook-Request-Origin": "eventgrid.azure.net"})
        for _ in range(2)
    ]
    stranger = deliver_from(app, validation, headers=handshake, subscription="SOMEONE-ELSES-SUBSCRIPTION")

    assert [(a.status_code, json_of(a)) for a in answers] == [
        (200, {"validationResponse": "512d38b6-c7b8-40c8-89fe-f46f9e9622b6"})
    ] * 3
    assert [(o.status_code, o.headers["WebHook-Allowed-Origin"]) for o in options] == [(200, "eventgrid.azure.net")] * 2
    assert stranger.status_code == 403
    assert settle(subscribed.api_url, subscribed.resource_id, REFRESHED) == []
    assert recorded_sequencer(subscribed) is None


def test_both_secrets_work_during_a_rotation_and_the_retired_one_stops_working_after_it(app, subscribed, monkeypatch):
    """Fault 11 (secret during rotation): the subscription's secret is being rotated, so deliveries (and
    redeliveries of the same blob) arrive with the old and the new secret; afterwards only the new one is set.

    Expected: during the rotation both secrets are accepted (200) and the same blob version is one refresh;
    after it, the old secret is 401 while the new one still works.
    Nothing emitted twice: the real server stores one refresh for the blob, none for the refused delivery.
    """
    sample = body([blob_created()])
    with_old = deliver_from(app, sample, secret=SECRET)
    with_new = deliver_from(app, sample, secret=NEXT_SECRET)
    monkeypatch.setenv("TOLLWATCH_EVENTGRID_SECRETS", NEXT_SECRET)  # rotation finished: the old one retired
    newer = body([blob_created(eTag='"0x8D4BCC2E4835CE0"', sequencer="00000000000004420000000000029000")])
    retired = deliver_from(app, newer, secret=SECRET)
    after = deliver_from(app, sample, secret=NEXT_SECRET)

    assert (with_old.status_code, with_new.status_code, after.status_code) == (200, 200, 200)
    assert retired.status_code == 401
    assert json_of(with_old)["emitted"] == json_of(with_new)["emitted"] == json_of(after)["emitted"]
    stored = settle(subscribed.api_url, subscribed.resource_id, REFRESHED)
    assert stored_ids(stored) == {expected_id(subscribed): 1}


def test_a_batch_mixing_good_and_bad_events_processes_the_good_ones_once(app, subscribed):
    """Fault 11 (mixed batch): one delivery holds two good BlobCreated events and three bad ones (a
    BlobDeleted, one from a foreign topic, a non-object); Event Grid then redelivers the whole batch.

    Expected: 200 (a 4xx would make Event Grid drop the good events with the bad), the good events emitted,
    each bad one listed under `refused` with its index, id and reason; the redelivery re-sends the same ids.
    Nothing lost / nothing extra: the real server stores exactly the two good refreshes, once each, and the
    sequencer of each good blob is recorded.
    """
    other_url = "https://my-storage-account.blob.core.windows.net/testcontainer/other-file.txt"
    good_other = blob_created(url=other_url, id="good-2")
    batch = body([blob_created(), *BLOB_DELETED, _wrong_topic(), good_other, 42])

    first = deliver_from(app, batch)
    again = deliver_from(app, batch)

    assert (first.status_code, again.status_code) == (200, 200)
    answer = json_of(first)
    good_ids = {expected_id(subscribed), expected_id(subscribed, url=other_url)}
    assert {e["event_id"] for e in answer["emitted"]} == good_ids
    assert answer["received"] == 5
    refused = {r["index"]: r for r in answer["refused"]}
    assert sorted(refused) == [1, 2, 4]
    assert refused[1]["id"] == BLOB_DELETED[0]["id"]
    assert "unexpected event type 'Microsoft.Storage.BlobDeleted'" in refused[1]["reason"]
    assert refused[2]["id"] == "wrong-topic"
    assert "topic/source" in refused[2]["reason"]
    assert refused[4] == {"index": 4, "id": None, "reason": "expected a JSON object, got int"}
    assert json_of(again)["emitted"] == answer["emitted"]
    stored = settle(subscribed.api_url, subscribed.resource_id, REFRESHED)
    assert stored_ids(stored) == dict.fromkeys(good_ids, 1)
    assert recorded_sequencer(subscribed) == recorded_sequencer(subscribed, other_url) is not None


# ---------------------------------------------------------------------------------------------- fault 12

TODAY = datetime.now(UTC).date()
BAD_BACKFILLS = [
    pytest.param({"start": "2024-04-01", "stop": "2024-01-01"}, "stop", "must be after start", id="reversed"),
    pytest.param(
        {"start": str(TODAY + timedelta(days=2)), "stop": str(TODAY + timedelta(days=9))},
        "start",
        "is in the future",
        id="future",
    ),
    pytest.param({"start": "2009-12-01", "stop": "2010-02-01"}, "start", "before the dataset begins", id="before-2010"),
    pytest.param(
        {"start": "2010-01-01", "stop": "2024-01-01", "chunk": "year"},
        "stop",
        "more than the maximum of 3660",
        id="huge-range",
    ),
    pytest.param(
        {"start": "2015-01-01", "stop": "2024-01-01", "chunk": "day"}, "chunk", "more than 400", id="too-many-chunks"
    ),
    pytest.param(
        {"start": "2024-01-01", "stop": "2024-02-01", "chunk": "fortnight"},
        "chunk",
        "'day', 'week', 'month', 'year' or 'auto'",
        id="unknown-chunk",
    ),
    pytest.param(
        {"start": "2024-01-01", "stop": "2024-02-01", "priority": "high"},
        "priority",
        "unknown field",
        id="extra-field",
    ),
]


@pytest.mark.parametrize(("request_body", "field", "reason"), BAD_BACKFILLS)
def test_bad_backfill_requests_are_400_with_a_field_level_reason_and_emit_nothing(
    app, fenv, request_body, field, reason
):
    """Fault 12: a backfill request with a reversed range, dates in the future or before 2010, a range too
    long (or cut into too many chunks), an unknown chunk, or a field the API does not have.

    Expected: 400 `{"error": "invalid backfill request", "problems": [{field, reason}]}` naming the field.
    Nothing emitted: no `tollwatch.backfill.requested` reaches the real Prefect server.
    """
    response = post_backfill(app, request_body)

    assert response.status_code == 400
    answer = json_of(response)
    assert answer["error"] == "invalid backfill request"
    problems = {p["field"]: p["reason"] for p in answer["problems"]}
    assert reason in problems.get(field, ""), problems
    assert settle(fenv.api_url, fenv.resource_id, REQUESTED) == []


def test_bad_backfill_from_the_cli_names_the_field_and_emits_nothing(fenv):
    """Fault 12 (CLI path): `tollwatch backfill` applies the same rules before emitting anything.

    Expected: exit code 1 and one line naming the field and the reason, for each bad request.
    Nothing emitted: no `tollwatch.backfill.requested` reaches the real Prefect server.
    """
    runner = CliRunner()
    cases = {
        ("2024-04-01", "2024-01-01", "month"): "stop: must be after start",
        (str(TODAY + timedelta(days=2)), str(TODAY + timedelta(days=9)), "day"): "start: ",
        ("2009-12-01", "2010-02-01", "month"): "start: 2009-12-01 is before the dataset begins",
        ("2010-01-01", "2024-01-01", "year"): "stop: the range covers",
        ("2024-01-01", "2024-02-01", "fortnight"): "chunk: Input should be",
    }
    for (start, stop, chunk), reason in cases.items():
        result = runner.invoke(
            cli_app, ["backfill", "--start", start, "--stop", stop, "--chunk", chunk, "--no-local-stack"]
        )
        assert result.exit_code == 1, result.output
        assert reason in result.output, result.output
    assert settle(fenv.api_url, fenv.resource_id, REQUESTED) == []
