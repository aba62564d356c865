"""Event delivery out: the Prefect Cloud webhook transport and completion events to an Event Grid topic.

Prefect Cloud webhooks and Event Grid topics cannot run here, so each is a loopback stand-in
(tests/support/funcapp.py): the webhook one renders the shipped template and forwards to the real Prefect
server; the topic one records what azure-eventgrid sends.
"""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path

import httpx
import pytest

from tests.support.funcapp import (
    EventGridTopicReceiver,
    PrefectCloudWebhookEmulator,
    closed_port,
    function,
    http_request,
    json_of,
    settle,
)
from tests.support.payloads import completion
from tollwatch import resources
from tollwatch.adapters.eventgrid_out import CompletionPublisher, PublishError
from tollwatch.adapters.prefect_events import EmitError, PrefectEventsEmitter, WebhookEmitter
from tollwatch.contract.events import DatasetRefreshed, EventName, TollwatchEvent

pytestmark = pytest.mark.stack

TEMPLATE = Path(__file__).resolve().parents[2] / "automations" / "webhooks" / "eventgrid-passthrough.yaml"


def refreshed_event(domain: str, rows_updated_at: int = 1_767_225_600) -> TollwatchEvent:
    return TollwatchEvent.of(DatasetRefreshed(domain=domain, dataset_id="qzve-kjga", rows_updated_at=rows_updated_at))


# ---------------------------------------------------------------------------------------------- webhook transport


def test_settings_switch_the_emitter_to_the_webhook(fenv, monkeypatch):
    assert isinstance(resources.event_emitter(fenv.settings()), PrefectEventsEmitter)
    monkeypatch.setenv("TOLLWATCH_PREFECT_WEBHOOK_URL", "http://127.0.0.1:9/hooks/abc")
    assert isinstance(resources.event_emitter(fenv.settings()), WebhookEmitter)


def test_webhook_transport_delivers_through_the_passthrough_template(fenv, monkeypatch):
    with PrefectCloudWebhookEmulator(TEMPLATE, fenv.api_url) as hook:
        monkeypatch.setenv("TOLLWATCH_PREFECT_WEBHOOK_URL", f"{hook.base_url}/hooks/{uuid.uuid4().hex}")
        monkeypatch.setenv("TOLLWATCH_PREFECT_API_KEY", "service-account-key")
        events = [refreshed_event(fenv.domain, 1), refreshed_event(fenv.domain, 2)]

        resources.event_emitter(fenv.settings()).emit(events)

    assert len(hook.requests) == 2  # one event per request, as webhooks take them
    assert hook.requests[0].headers["authorization"] == "Bearer service-account-key"
    stored = settle(fenv.api_url, fenv.resource_id, EventName.DATASET_REFRESHED)
    assert sorted(e["id"] for e in stored) == sorted(str(e.id) for e in events)  # ids survive the template


def test_the_whole_function_app_can_emit_through_the_webhook(app, fenv, monkeypatch):
    with PrefectCloudWebhookEmulator(TEMPLATE, fenv.api_url) as hook:
        monkeypatch.setenv("TOLLWATCH_PREFECT_WEBHOOK_URL", f"{hook.base_url}/hooks/{uuid.uuid4().hex}")
        request = b'{"start": "2024-01-01", "stop": "2024-03-01", "chunk": "month"}'
        response = function(app, "request_backfill")(http_request("POST", "backfill", request))

    assert response.status_code == 202
    stored = settle(fenv.api_url, fenv.resource_id, EventName.BACKFILL_REQUESTED)
    assert sorted(e["id"] for e in stored) == sorted(json_of(response)["event_ids"])


def test_webhook_4xx_is_not_retried_and_names_no_url(fenv, caplog):
    secret_path = f"/hooks/{uuid.uuid4().hex}"
    foreign = refreshed_event(fenv.domain).model_copy(update={"event": "prefect.flow-run.Completed"})
    with PrefectCloudWebhookEmulator(TEMPLATE, fenv.api_url) as hook, httpx.Client() as http:
        emitter = WebhookEmitter(http, f"{hook.base_url}{secret_path}", max_attempts=4, backoff_max_s=0.01)
        with caplog.at_level(logging.DEBUG), pytest.raises(EmitError, match="HTTP 400") as failure:
            emitter.emit([foreign])  # the template refuses non-tollwatch events: Prefect Cloud answers 400

    assert len(hook.requests) == 1
    assert secret_path not in str(failure.value)
    assert failure.value.__cause__ is None
    assert secret_path not in caplog.text


def test_webhook_5xx_is_retried_with_backoff_then_delivered(fenv):
    event = refreshed_event(fenv.domain)
    with PrefectCloudWebhookEmulator(TEMPLATE, fenv.api_url) as hook, httpx.Client() as http:
        hook.fail_next(503, 502)
        WebhookEmitter(http, f"{hook.base_url}/hooks/x", max_attempts=4, backoff_max_s=0.01).emit([event])

    assert len(hook.requests) == 3
    (stored,) = settle(fenv.api_url, fenv.resource_id, EventName.DATASET_REFRESHED)
    assert stored["id"] == str(event.id)


def test_webhook_raises_after_the_last_try(fenv):
    with PrefectCloudWebhookEmulator(TEMPLATE, fenv.api_url) as hook, httpx.Client() as http:
        hook.fail_next(503, 503, 503)
        with pytest.raises(EmitError, match="HTTP 503"):
            WebhookEmitter(http, f"{hook.base_url}/hooks/x", max_attempts=3, backoff_max_s=0.01).emit(
                [refreshed_event(fenv.domain)]
            )
    assert len(hook.requests) == 3


def test_connection_errors_are_retried_then_raise_for_both_transports():
    dead = f"http://127.0.0.1:{closed_port()}"
    event = refreshed_event("example.test")
    with httpx.Client() as http:
        for emitter in (
            WebhookEmitter(http, f"{dead}/hooks/x", max_attempts=2, backoff_max_s=0.01),
            PrefectEventsEmitter(http, f"{dead}/api", max_attempts=2, backoff_max_s=0.01),
        ):
            with pytest.raises(EmitError, match="ConnectError"):
                emitter.emit([event])


def test_prefect_api_4xx_is_not_retried(fenv):
    """A 404 from the real server is final: the same request cannot succeed on a retry."""
    sent: list[httpx.Request] = []
    with httpx.Client(event_hooks={"request": [sent.append]}) as http:
        emitter = PrefectEventsEmitter(
            http,
            f"{fenv.api_url}/not-the-api",
            auth_string=os.environ["PREFECT_API_AUTH_STRING"],
            max_attempts=4,
            backoff_max_s=0.01,
        )
        with pytest.raises(EmitError, match="HTTP 404"):
            emitter.emit([refreshed_event("x.test")])
    assert len(sent) == 1


# ---------------------------------------------------------------------------------------------- Event Grid out


def completed_event() -> TollwatchEvent:
    return TollwatchEvent.of(completion())


def test_no_topic_configured_means_no_publisher(fenv):
    assert resources.completion_publisher(fenv.settings()) is None


def test_completion_is_published_as_a_cloudevent_with_the_prefect_event_id(fenv, monkeypatch):
    event = completed_event()
    with EventGridTopicReceiver() as topic:
        monkeypatch.setenv("TOLLWATCH_EVENTGRID_TOPIC_ENDPOINT", f"{topic.base_url}/api/events")
        monkeypatch.setenv("TOLLWATCH_EVENTGRID_TOPIC_KEY", "topic-key-123")
        publisher = resources.completion_publisher(fenv.settings())
        assert publisher is not None
        publisher.publish(event)

    (request,) = topic.requests
    assert request.path == "/api/events?api-version=2018-01-01"
    assert request.headers["aeg-sas-key"] == "topic-key-123"
    assert request.headers["content-type"].startswith("application/cloudevents-batch+json")
    (cloud,) = request.json()
    assert cloud["id"] == str(event.id)
    assert cloud["specversion"] == "1.0"
    assert cloud["type"] == "tollwatch.ingestion.completed"
    assert cloud["source"] == "/tollwatch"
    assert cloud["subject"] == "iceberg.tollwatch.bronze.bnt_traffic_hourly"
    assert cloud["data"] == event.payload
    assert cloud["data"]["snapshot_id"] == 42


def test_a_refused_publish_raises_without_the_key(fenv, monkeypatch):
    with EventGridTopicReceiver() as topic:
        topic.fail_next(401)
        monkeypatch.setenv("TOLLWATCH_EVENTGRID_TOPIC_ENDPOINT", f"{topic.base_url}/api/events")
        monkeypatch.setenv("TOLLWATCH_EVENTGRID_TOPIC_KEY", "topic-key-123")
        publisher = resources.completion_publisher(fenv.settings())
        assert publisher is not None
        with pytest.raises(PublishError) as failure:
            publisher.publish(completed_event())
    assert "topic-key-123" not in str(failure.value)


def test_only_completions_are_published():
    with EventGridTopicReceiver() as topic:
        from azure.core.credentials import AzureKeyCredential
        from azure.eventgrid import EventGridPublisherClient

        client = EventGridPublisherClient(f"{topic.base_url}/api/events", AzureKeyCredential("k"))
        with pytest.raises(ValueError, match=r"only tollwatch\.ingestion\.completed"):
            CompletionPublisher(client, source="/tollwatch").publish(refreshed_event("x.test"))
    assert topic.requests == []
