"""The Event Grid receiver's decisions (tollwatch/core/receiver.py) on Microsoft's sample deliveries: what it answers,
what it emits, what it drops as stale and what it refuses, and that a sequencer is recorded only after its refresh
was confirmed.

In-memory ports: the state blobs (sequencers, the watcher's watermark) and the event sink. The same deliveries through
the Function app, Azurite and the real Prefect server: tests/integration/test_fn_eventgrid.py.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from azure.core.exceptions import ServiceRequestError

from tests.support.fakes import DATASET, DOMAIN, FakeJsonState, RecordingSink
from tests.support.funcapp import (
    NEXT_SECRET,
    SAMPLE_CONTAINER,
    SAMPLE_ETAG,
    SAMPLE_TOPIC,
    SAMPLE_URL,
    SECRET,
    blob_created,
    body,
    payload,
)
from tollwatch.adapters.eventgrid_in import WatchedLocation
from tollwatch.adapters.prefect_events import EmitError
from tollwatch.contract.events import BlobRef, DatasetRefreshed, EventName
from tollwatch.contract.webio import InboundRequest, Reply
from tollwatch.core.receiver import EventGridReceiver, ReceiverPolicy, SequencerStore, TransientFailure
from tollwatch.core.watermark import Watermark, WatermarkStore

SAMPLE = payload("blob-created.eventgrid.json")[0]
SAMPLE_SEQUENCER = SAMPLE["data"]["sequencer"]
SAMPLE_TIME = datetime(2017, 6, 26, 18, 41, 0, 958410, UTC)


class Receiver:
    """A receiver on in-memory ports, and what the tests look at."""

    def __init__(self, **policy: Any) -> None:
        self.state = FakeJsonState()
        self.sink = RecordingSink()
        self.sequencers = SequencerStore(self.state)
        self.watermarks = WatermarkStore(self.state, domain=DOMAIN, dataset_id=DATASET)
        location = WatchedLocation(topics=(SAMPLE_TOPIC,), container=SAMPLE_CONTAINER)
        values = {"domain": DOMAIN, "dataset_id": DATASET, "location": location, "secrets": (SECRET, NEXT_SECRET)}
        self.receiver = EventGridReceiver(
            ReceiverPolicy(**(values | policy)), self.sequencers, self.watermarks, self.sink
        )

    def post(self, data: bytes, *, secret: str | None = SECRET, method: str = "POST", **headers: str) -> Reply:
        all_headers = {"content-type": "application/json", "aeg-event-type": "Notification", **headers}
        if secret is not None:
            all_headers["x-tollwatch-secret"] = secret
        return self.receiver.handle_http(InboundRequest.build(method, headers=all_headers, body=data))

    def recorded(self, url: str = SAMPLE_URL) -> str | None:
        mark = self.sequencers.read(url).value
        return mark.sequencer if mark else None


def expected_id(etag: str = SAMPLE_ETAG, url: str = SAMPLE_URL) -> str:
    blob = BlobRef(url=url, etag=etag, sequencer="")
    return str(DatasetRefreshed(domain=DOMAIN, dataset_id=DATASET, rows_updated_at=0, blob=blob).event_id())


# ---------------------------------------------------------------------------------------------- handshakes


def test_a_subscription_validation_is_answered_with_its_code_and_nothing_else_happens():
    receiver = Receiver()

    reply = receiver.post(
        body(payload("subscription-validation.eventgrid.json")), **{"aeg-event-type": "SubscriptionValidation"}
    )

    assert (reply.status, reply.body) == (200, {"validationResponse": "512d38b6-c7b8-40c8-89fe-f46f9e9622b6"})
    assert receiver.sink.emitted == []
    assert receiver.state.writes == []


def test_the_cloudevents_handshake_grants_an_allowed_origin_only():
    receiver = Receiver()

    granted = receiver.post(b"", method="OPTIONS", **{"WebHook-Request-Origin": "eventgrid.azure.net"})
    stranger = receiver.post(b"", method="OPTIONS", **{"WebHook-Request-Origin": "evil.example"})

    assert granted.status == 200
    assert granted.headers["WebHook-Allowed-Origin"] == "eventgrid.azure.net"
    assert stranger.status == 403
    assert receiver.sink.emitted == []


# ---------------------------------------------------------------------------------------------- BlobCreated


def test_a_blob_created_emits_one_refresh_and_records_its_sequencer_after_the_emit():
    receiver = Receiver()
    receiver.state.put(
        receiver.watermarks.blob_name,
        Watermark(
            domain=DOMAIN, dataset_id=DATASET, rows_updated_at=1_500_000_000, event_id="e", advanced_at=SAMPLE_TIME
        ),
    )

    reply = receiver.post(body(payload("blob-created.eventgrid.json")))

    assert reply.status == 200
    assert reply.body["received"] == 1
    assert [e["event_id"] for e in reply.body["emitted"]] == [expected_id()]
    [event] = receiver.sink.emitted
    assert event.event == EventName.DATASET_REFRESHED
    assert event.payload["source"] == "eventgrid"
    assert event.payload["blob"] == {"url": SAMPLE_URL, "etag": SAMPLE_ETAG, "sequencer": SAMPLE_SEQUENCER}
    assert event.payload["rows_updated_at"] == int(SAMPLE_TIME.timestamp())  # published when the blob was written
    assert event.payload["previous_rows_updated_at"] == 1_500_000_000  # the watcher's watermark, read not moved
    assert receiver.recorded() == SAMPLE_SEQUENCER
    assert receiver.watermarks.read().value.rows_updated_at == 1_500_000_000


def test_both_delivery_schemas_announce_the_same_refresh():
    receiver = Receiver()

    grid = receiver.post(body(payload("blob-created.eventgrid.json")))
    cloud = receiver.post(
        body(payload("blob-created.cloudevents.json")), **{"content-type": "application/cloudevents-batch+json"}
    )

    assert grid.body["emitted"][0]["event_id"] == cloud.body["emitted"][0]["event_id"] == expected_id()


def test_a_redelivery_is_emitted_again_with_the_same_id_for_prefect_to_drop():
    """The first attempt may have died between its emit and its answer: skipping the redelivery could lose it."""
    receiver = Receiver()

    receiver.post(body([blob_created()]))
    receiver.post(body([blob_created()]))

    assert receiver.sink.ids == [expected_id(), expected_id()]


def test_a_new_blob_version_is_a_new_refresh_and_an_older_sequencer_is_dropped_as_stale():
    receiver = Receiver()
    receiver.post(body([blob_created(eTag='"0x2"', sequencer="00000000000004420000000000028970")]))

    stale = receiver.post(body([blob_created(eTag='"0x1"', sequencer="00000000000004420000000000028963")]))

    assert receiver.sink.ids == [expected_id('"0x2"')]
    assert stale.status == 200
    assert stale.body["emitted"] == []
    assert stale.body["dropped_stale"] == [
        {
            "blob": SAMPLE_URL,
            "sequencer": "00000000000004420000000000028963",
            "newer_sequencer": "00000000000004420000000000028970",
        }
    ]
    assert receiver.recorded() == "00000000000004420000000000028970"


def test_within_one_batch_only_the_newest_delivery_per_blob_counts():
    receiver = Receiver()
    older = blob_created(id="a", eTag='"0x1"', sequencer="0001")
    newer = blob_created(id="b", eTag='"0x2"', sequencer="0002")

    reply = receiver.post(body([newer, older]))

    assert reply.body["received"] == 2
    assert receiver.sink.ids == [expected_id('"0x2"')]
    assert [d["sequencer"] for d in reply.body["dropped_stale"]] == ["0001"]


def test_a_bad_event_is_refused_alone_and_the_rest_of_its_batch_is_processed():
    receiver = Receiver()
    foreign = blob_created(id="foreign", eTag='"0x9"')
    foreign["topic"] = foreign["topic"].replace("my-storage-account", "someone-else")

    reply = receiver.post(body([foreign, blob_created()]))

    assert reply.status == 200
    assert reply.body["received"] == 2
    assert receiver.sink.ids == [expected_id()]
    [refused] = reply.body["refused"]
    assert (refused["index"], refused["id"]) == (0, "foreign")
    assert "topic/source" in refused["reason"]


@pytest.mark.parametrize(
    ("data", "status", "reason"),
    [
        pytest.param(b"{not json", 400, "not JSON", id="not-json"),
        pytest.param(body(payload("blob-deleted.eventgrid.json")), 400, "unexpected event type", id="blob-deleted"),
        pytest.param(b"[" + b" " * 1_048_577 + b"]", 413, "exceeds the 1048576-byte limit", id="too-large"),
    ],
)
def test_a_delivery_with_nothing_acceptable_is_refused_with_its_reason_and_emits_nothing(data, status, reason):
    receiver = Receiver()

    reply = receiver.post(data)

    assert reply.status == status
    assert reason in reply.body["error"]
    assert receiver.sink.emitted == []
    assert receiver.state.writes == []


# ---------------------------------------------------------------------------------------------- who may deliver


@pytest.mark.parametrize(("secret", "status"), [(None, 401), ("wrong", 401), (SECRET, 200), (NEXT_SECRET, 200)])
def test_only_a_configured_secret_delivers_and_both_are_valid_during_a_rotation(secret, status):
    receiver = Receiver()

    reply = receiver.post(body([blob_created()]), secret=secret)

    assert reply.status == status
    assert len(receiver.sink.emitted) == (1 if status == 200 else 0)


def test_the_secret_may_come_as_a_query_parameter():
    receiver = Receiver()
    request = InboundRequest.build("POST", query={"secret": NEXT_SECRET}, body=body([blob_created()]))

    assert receiver.receiver.handle_http(request).status == 200


def test_only_named_subscriptions_deliver_when_names_are_configured():
    receiver = Receiver(subscription_names=("tollwatch-upstream",))

    unnamed = receiver.post(body([blob_created()]))
    other = receiver.post(body([blob_created()]), **{"aeg-subscription-name": "someone-elses"})
    ours = receiver.post(body([blob_created()]), **{"aeg-subscription-name": "TOLLWATCH-UPSTREAM"})

    assert (unnamed.status, other.status, ours.status) == (403, 403, 200)
    assert len(receiver.sink.emitted) == 1


def test_only_post_delivers():
    assert Receiver().post(b"", method="GET").status == 405


# ---------------------------------------------------------------------------------------------- transient failures


def test_prefect_unreachable_is_a_503_and_the_sequencer_waits_for_the_redelivery():
    receiver = Receiver()
    receiver.sink.fail_next(EmitError("could not deliver 1 event(s)"))

    failed = receiver.post(body([blob_created()]))

    assert failed.status == 503
    assert failed.headers["Retry-After"] == "30"
    assert "Prefect" in failed.body["error"]
    assert receiver.recorded() is None  # not advanced: the redelivery is processed in full

    retried = receiver.post(body([blob_created()]))

    assert retried.status == 200
    assert receiver.sink.ids == [expected_id()]
    assert receiver.recorded() == SAMPLE_SEQUENCER


def test_state_storage_unreachable_is_a_503_and_emits_nothing():
    receiver = Receiver()
    receiver.state.fail_next(ServiceRequestError("connection refused"))

    reply = receiver.post(body([blob_created()]))

    assert (reply.status, reply.body) == (503, {"error": "state storage is unavailable; retry later"})
    assert receiver.sink.emitted == []


# ---------------------------------------------------------------------------------------------- the trigger


def test_the_trigger_emits_the_same_refresh_as_the_webhook():
    receiver = Receiver()

    result = receiver.receiver.handle_trigger(blob_created())

    assert result is not None
    assert [e.event_id for e in result.emitted] == [expected_id()]


def test_the_trigger_drops_what_a_retry_could_not_fix_and_raises_on_what_it_could():
    receiver = Receiver()
    foreign = blob_created()
    foreign["topic"] = "/subscriptions/x/resourceGroups/y/providers/Microsoft.Storage/storageAccounts/z"

    assert receiver.receiver.handle_trigger(foreign) is None
    assert receiver.receiver.handle_trigger(payload("subscription-validation.eventgrid.json")[0]) is None
    receiver.sink.fail_next(EmitError("Prefect is down"))
    with pytest.raises(TransientFailure):
        receiver.receiver.handle_trigger(blob_created())
    assert receiver.sink.emitted == []
