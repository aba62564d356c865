"""Event Grid in: Microsoft's sample deliveries through the webhook handler, the trigger, and the dev host.

"Nothing emitted" is checked on the real Prefect server with `settle` (a sentinel sent afterwards), and the
sequencer state on Azurite, never by waiting for a while.
"""

from __future__ import annotations

from datetime import UTC, datetime

import azure.functions as func
import httpx
import pytest
from azure.core.credentials import AzureKeyCredential
from azure.eventgrid import EventGridEvent, EventGridPublisherClient

from tests.support.funcapp import (
    FUNCTION_KEY,
    NEXT_SECRET,
    SAMPLE_ETAG,
    SAMPLE_TOPIC,
    SAMPLE_URL,
    SECRET,
    blob_created,
    body,
    closed_port,
    deliver,
    expected_id,
    function,
    json_of,
    payload,
    recorded_sequencer,
    settle,
)
from tollwatch.contract.events import EventName

pytestmark = pytest.mark.stack

REFRESHED = EventName.DATASET_REFRESHED
SAMPLE = payload("blob-created.eventgrid.json")[0]


# ---------------------------------------------------------------------------------------------- handshakes


def test_subscription_validation_echoes_the_code(app, fenv):
    validation = body(payload("subscription-validation.eventgrid.json"))
    response = deliver(app, validation, headers={"aeg-event-type": "SubscriptionValidation"})
    assert response.status_code == 200
    assert json_of(response) == {"validationResponse": "512d38b6-c7b8-40c8-89fe-f46f9e9622b6"}
    assert settle(fenv.api_url, fenv.resource_id, REFRESHED) == []


def test_cloudevents_abuse_protection_handshake(app, fenv):
    response = deliver(app, b"", method="OPTIONS", headers={"WebHook-Request-Origin": "eventgrid.azure.net"})

    assert response.status_code == 200
    assert response.headers["WebHook-Allowed-Origin"] == "eventgrid.azure.net"
    assert response.headers["WebHook-Allowed-Rate"] == "*"


def test_abuse_protection_refuses_unknown_origins_and_non_handshakes(app, fenv):
    stranger = deliver(app, b"", method="OPTIONS", headers={"WebHook-Request-Origin": "evil.example"})
    bare = deliver(app, b"", method="OPTIONS")

    assert stranger.status_code == 403
    assert "WebHook-Allowed-Origin" not in stranger.headers
    assert bare.status_code == 400


# ---------------------------------------------------------------------------------------------- BlobCreated


def test_blob_created_event_grid_schema_emits_one_refresh(app, fenv, state):
    response = deliver(app, body(payload("blob-created.eventgrid.json")))

    assert response.status_code == 200
    result = json_of(response)
    assert result["received"] == 1
    assert [e["event_id"] for e in result["emitted"]] == [expected_id(fenv)]
    (event,) = settle(fenv.api_url, fenv.resource_id, REFRESHED)
    assert event["id"] == expected_id(fenv)
    assert event["payload"]["source"] == "eventgrid"
    assert event["payload"]["blob"] == {
        "url": SAMPLE_URL,
        "etag": SAMPLE_ETAG,
        "sequencer": SAMPLE["data"]["sequencer"],
    }
    assert event["payload"]["rows_updated_at"] == int(datetime(2017, 6, 26, 18, 41, 0, 958410, UTC).timestamp())
    assert recorded_sequencer(fenv) == SAMPLE["data"]["sequencer"]
    assert state.read().value is None  # the Event Grid path never moves the watcher's watermark


def test_blob_created_cloudevents_schema_is_the_same_refresh(app, fenv):
    cloud = deliver(
        app,
        body(payload("blob-created.cloudevents.json")),
        headers={"content-type": "application/cloudevents-batch+json; charset=utf-8"},
    )
    grid = deliver(app, body(payload("blob-created.eventgrid.json")))

    assert cloud.status_code == grid.status_code == 200
    assert json_of(cloud)["emitted"][0]["event_id"] == json_of(grid)["emitted"][0]["event_id"] == expected_id(fenv)
    assert len(settle(fenv.api_url, fenv.resource_id, REFRESHED)) == 1


def test_single_cloudevent_object_is_accepted(app, fenv):
    response = deliver(
        app, body(payload("blob-created.cloudevents.json")[0]), headers={"content-type": "application/cloudevents+json"}
    )
    assert response.status_code == 200
    assert json_of(response)["emitted"][0]["event_id"] == expected_id(fenv)


def test_redelivery_has_the_same_id_and_is_stored_once(app, fenv):
    first = deliver(app, body(payload("blob-created.eventgrid.json")))
    again = deliver(app, body(payload("blob-created.eventgrid.json")))

    assert json_of(first)["emitted"] == json_of(again)["emitted"]
    (event,) = settle(fenv.api_url, fenv.resource_id, REFRESHED)
    assert event["id"] == expected_id(fenv)


def test_a_new_blob_version_is_a_new_refresh_and_a_stale_sequencer_is_dropped(app, fenv):
    newer = blob_created(eTag='"0x8D4BCC2E4835CD1"', sequencer="00000000000004420000000000028970", id="newer")
    older = blob_created(eTag='"0x8D4BCC2E4835CCF"', sequencer="00000000000004420000000000028950", id="older")

    assert deliver(app, body(payload("blob-created.eventgrid.json"))).status_code == 200
    assert deliver(app, body([newer])).status_code == 200
    stale = deliver(app, body([older]))

    assert stale.status_code == 200  # accepted (no retry wanted) but dropped
    assert json_of(stale)["emitted"] == []
    assert json_of(stale)["dropped_stale"] == [
        {"blob": SAMPLE_URL, "sequencer": older["data"]["sequencer"], "newer_sequencer": newer["data"]["sequencer"]}
    ]
    ids = {e["id"] for e in settle(fenv.api_url, fenv.resource_id, REFRESHED)}
    assert ids == {expected_id(fenv), expected_id(fenv, etag=newer["data"]["eTag"])}
    assert recorded_sequencer(fenv) == newer["data"]["sequencer"]


def test_within_one_batch_only_the_newest_delivery_per_blob_counts(app, fenv):
    newer = blob_created(eTag='"0x2"', sequencer="00000000000004420000000000028999", id="b")
    response = deliver(app, body([blob_created(), newer]))

    assert [e["event_id"] for e in json_of(response)["emitted"]] == [expected_id(fenv, etag='"0x2"')]
    assert [d["sequencer"] for d in json_of(response)["dropped_stale"]] == [SAMPLE["data"]["sequencer"]]


# ---------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("secret", [None, "wrong-secret", ""])
def test_missing_or_wrong_secret_is_401_and_emits_nothing(app, fenv, secret):
    response = deliver(app, body(payload("blob-created.eventgrid.json")), secret=secret)

    assert response.status_code == 401
    assert "secret" in json_of(response)["error"]
    assert settle(fenv.api_url, fenv.resource_id, REFRESHED) == []
    assert recorded_sequencer(fenv) is None


def test_both_secrets_are_accepted_during_rotation_also_as_query_parameter(app, fenv):
    by_header = deliver(app, body(payload("blob-created.eventgrid.json")), secret=NEXT_SECRET)
    by_query = deliver(app, body(payload("blob-created.eventgrid.json")), secret=None, params={"secret": SECRET})
    assert by_header.status_code == by_query.status_code == 200


def test_without_configured_secrets_the_function_key_alone_protects_the_route(app, fenv, monkeypatch):
    monkeypatch.setenv("TOLLWATCH_EVENTGRID_SECRETS", "")
    assert deliver(app, body(payload("blob-created.eventgrid.json")), secret=None).status_code == 200


def test_oversize_body_is_413(app, fenv, monkeypatch):
    monkeypatch.setenv("TOLLWATCH_EVENTGRID_MAX_BODY_BYTES", "2048")
    padded = blob_created()
    padded["data"]["storageDiagnostics"]["padding"] = "x" * 4096

    response = deliver(app, body([padded]))

    assert response.status_code == 413
    assert settle(fenv.api_url, fenv.resource_id, REFRESHED) == []


def _topic_changed() -> list[dict]:
    event = blob_created()
    event["topic"] = SAMPLE_TOPIC.replace("my-storage-account", "someone-elses-account")
    return [event]


def _outside_container() -> list[dict]:
    event = blob_created()
    event["subject"] = "/blobServices/default/containers/other-container/blobs/new-file.txt"
    return [event]


def _missing_etag() -> list[dict]:
    event = blob_created()
    del event["data"]["eTag"]
    return [event]


def _mixed_schemas() -> list[dict]:
    return [blob_created("eventgrid"), blob_created("cloudevents")]


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        pytest.param(b"{not json", "not JSON", id="non-json"),
        pytest.param(b"", "empty body", id="empty"),
        pytest.param(b"[]", "empty batch", id="empty-batch"),
        pytest.param(b"[42]", "expected a JSON object", id="not-an-object"),
        pytest.param(b'[{"hello": "world"}]', "neither Event Grid schema", id="unknown-schema"),
        pytest.param(body(_topic_changed()), "topic/source", id="wrong-topic"),
        pytest.param(body(payload("blob-deleted.eventgrid.json")), "unexpected event type", id="unexpected-type"),
        pytest.param(body(_mixed_schemas()), "mixes Event Grid and CloudEvents", id="mixed-schemas"),
        pytest.param(body(_outside_container()), "outside the watched location", id="other-container"),
        pytest.param(body(_missing_etag()), "eTag", id="missing-etag"),
        pytest.param(
            body(payload("subscription-validation.eventgrid.json") + payload("blob-created.eventgrid.json")),
            "must be the only event",
            id="validation-in-a-batch",
        ),
    ],
)
def test_malformed_or_unexpected_deliveries_are_400_with_a_reason_and_emit_nothing(app, fenv, data, reason):
    response = deliver(app, data)

    assert response.status_code == 400
    assert reason in json_of(response)["error"]
    assert "Traceback" not in response.get_body().decode()
    assert settle(fenv.api_url, fenv.resource_id, REFRESHED) == []
    assert recorded_sequencer(fenv) is None


def test_get_is_refused(app, fenv):
    assert deliver(app, b"", method="GET").status_code == 405


# ---------------------------------------------------------------------------------------------- transient failures


def test_prefect_down_is_503_then_the_redelivery_emits_once(app, fenv, monkeypatch):
    with monkeypatch.context() as down:
        down.setenv("PREFECT_API_URL", f"http://127.0.0.1:{closed_port()}/api")
        failed = deliver(app, body(payload("blob-created.eventgrid.json")))
    assert failed.status_code == 503
    assert "Prefect" in json_of(failed)["error"]
    assert recorded_sequencer(fenv) is None  # not advanced: the retry is processed in full

    retried = deliver(app, body(payload("blob-created.eventgrid.json")))

    assert retried.status_code == 200
    (event,) = settle(fenv.api_url, fenv.resource_id, REFRESHED)
    assert event["id"] == expected_id(fenv)


def test_storage_down_is_503_and_emits_nothing(app, fenv, monkeypatch):
    azurite = fenv.settings().storage_connection_string.get_secret_value()
    port = azurite.split("BlobEndpoint=http://127.0.0.1:")[1].split("/")[0]
    dead = azurite.replace(f"127.0.0.1:{port}", f"127.0.0.1:{closed_port()}")
    monkeypatch.setenv("TOLLWATCH_STORAGE_CONNECTION_STRING", dead)
    monkeypatch.setenv("TOLLWATCH_STORAGE_RETRY_TOTAL", "0")

    response = deliver(app, body(payload("blob-created.eventgrid.json")))

    assert response.status_code == 503
    assert json_of(response) == {"error": "state storage is unavailable; retry later"}
    assert settle(fenv.api_url, fenv.resource_id, REFRESHED) == []


def test_misconfigured_settings_are_a_500_that_names_the_setting_but_not_its_value(app, fenv, monkeypatch):
    monkeypatch.setenv("TOLLWATCH_EVENTGRID_SECRETS", "s1-very-secret,s2-very-secret,s3-very-secret")

    response = deliver(app, body(payload("blob-created.eventgrid.json")))

    assert response.status_code == 500
    assert "eventgrid_secrets" in json_of(response)["error"]
    assert "very-secret" not in response.get_body().decode()


# ---------------------------------------------------------------------------------------------- the trigger


def trigger_event(event: dict) -> func.EventGridEvent:
    """What the Python worker hands the Event Grid trigger for a delivery in the Event Grid schema."""
    return func.EventGridEvent(
        id=event["id"],
        data=event["data"],
        topic=event["topic"],
        subject=event["subject"],
        event_type=event["eventType"],
        event_time=datetime.fromisoformat(event["eventTime"]),
        data_version=event["dataVersion"],
    )


def test_trigger_shares_the_handler_and_emits_the_same_refresh(app, fenv):
    function(app, "eventgrid_trigger")(trigger_event(payload("blob-created.eventgrid.json")[0]))
    deliver(app, body(payload("blob-created.eventgrid.json")))  # same blob version via the webhook

    (event,) = settle(fenv.api_url, fenv.resource_id, REFRESHED)
    assert event["id"] == expected_id(fenv)
    assert recorded_sequencer(fenv) == SAMPLE["data"]["sequencer"]


def test_trigger_drops_invalid_events_without_raising(app, fenv):
    function(app, "eventgrid_trigger")(trigger_event(payload("blob-deleted.eventgrid.json")[0]))
    assert settle(fenv.api_url, fenv.resource_id, REFRESHED) == []


def test_trigger_raises_when_prefect_is_down_so_event_grid_retries(app, fenv, monkeypatch):
    from tollwatch.core.receiver import TransientFailure

    monkeypatch.setenv("PREFECT_API_URL", f"http://127.0.0.1:{closed_port()}/api")
    with pytest.raises(TransientFailure):
        function(app, "eventgrid_trigger")(trigger_event(payload("blob-created.eventgrid.json")[0]))
    assert recorded_sequencer(fenv) is None


# ---------------------------------------------------------------------------------------------- over HTTP


def test_dev_host_serves_the_handshakes_and_deliveries_with_the_function_key(devhost, fenv):
    url = f"{devhost.url}/api/eventgrid"
    keyed = {"x-functions-key": FUNCTION_KEY, "x-tollwatch-secret": SECRET}
    with httpx.Client(timeout=30) as http:
        sample = body(payload("blob-created.eventgrid.json"))
        no_key = http.post(url, content=sample, headers={"x-tollwatch-secret": SECRET})
        wrong_key = http.post(url, params={"code": "nope"}, content=b"[]")
        validation = http.post(url, content=body(payload("subscription-validation.eventgrid.json")), headers=keyed)
        options = http.options(url, headers={**keyed, "WebHook-Request-Origin": "eventgrid.azure.net"})
        created = http.post(
            url,
            params={"code": FUNCTION_KEY, "secret": NEXT_SECRET},
            content=body(payload("blob-created.cloudevents.json")),
            headers={"content-type": "application/cloudevents-batch+json; charset=utf-8"},
        )
        bad = http.post(url, content=b"{", headers=keyed)

    assert (no_key.status_code, wrong_key.status_code) == (401, 401)
    assert validation.json() == {"validationResponse": "512d38b6-c7b8-40c8-89fe-f46f9e9622b6"}
    assert options.status_code == 200
    assert options.headers["webhook-allowed-origin"] == "eventgrid.azure.net"
    assert created.status_code == 200
    assert created.headers["content-type"].startswith("application/json")
    assert created.json()["emitted"][0]["event_id"] == expected_id(fenv)
    assert bad.status_code == 400
    assert "not JSON" in bad.json()["error"]
    (event,) = settle(fenv.api_url, fenv.resource_id, REFRESHED)
    assert event["id"] == expected_id(fenv)


def test_event_grid_sdk_can_deliver_to_the_dev_host(devhost, fenv):
    """EventGridPublisherClient speaks the Event Grid schema; pointed at the dev host it delivers a BlobCreated."""
    sample = payload("blob-created.eventgrid.json")[0]
    client = EventGridPublisherClient(
        f"{devhost.url}/api/eventgrid?code={FUNCTION_KEY}&secret={SECRET}", AzureKeyCredential("unused-by-the-route")
    )
    client.send(
        EventGridEvent(
            subject=sample["subject"],
            event_type=sample["eventType"],
            data=sample["data"],
            data_version=sample["dataVersion"] or "1",
            topic=sample["topic"],
            id=sample["id"],
        )
    )

    (event,) = settle(fenv.api_url, fenv.resource_id, REFRESHED)
    assert event["id"] == expected_id(fenv)
    assert event["payload"]["blob"]["url"] == SAMPLE_URL
