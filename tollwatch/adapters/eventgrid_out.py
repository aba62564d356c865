"""Completion events out to an Azure Event Grid topic, for subscribers that do not live in Prefect.

`tollwatch.ingestion.completed` is published as a CloudEvent 1.0 whose `id` is the Prefect event's id, so
a subscriber that hears about a load both ways (a Prefect automation and the topic) can tell it is one
fact, and a retried publish is recognisable as a repeat. Publishing happens only when
`TOLLWATCH_EVENTGRID_TOPIC_ENDPOINT` is set (see `tollwatch.resources.completion_publisher`); the topic is
reached with its access key (`AzureKeyCredential`, header `aeg-sas-key`) or with Entra ID
(`DefaultAzureCredential`, which the SDK only sends over https).
"""

from __future__ import annotations

import logging

from azure.core.exceptions import AzureError
from azure.core.messaging import CloudEvent
from azure.eventgrid import EventGridPublisherClient

from tollwatch.contract.errors import TollwatchError
from tollwatch.contract.events import EventName, TollwatchEvent

log = logging.getLogger(__name__)


class PublishError(TollwatchError):
    """The topic did not accept the event; the message says which event and why (never the key)."""


class CompletionPublisher:
    """Publishes completion events to one Event Grid topic (CloudEvents schema)."""

    def __init__(self, client: EventGridPublisherClient, *, source: str) -> None:
        self._client = client
        self._source = source

    @staticmethod
    def to_cloud_event(event: TollwatchEvent, source: str) -> CloudEvent:
        """The CloudEvent for a tollwatch event: same id, name as `type`, table resource as `subject`."""
        return CloudEvent(
            source=source,
            type=str(event.event),
            data=event.payload,
            id=str(event.id),
            time=event.occurred,
            subject=event.resource.id,
            datacontenttype="application/json",
        )

    def publish(self, event: TollwatchEvent) -> None:
        """Send one completion event; raise `PublishError` if the topic refused it or was unreachable."""
        if event.event != EventName.INGESTION_COMPLETED:
            raise ValueError(f"only {EventName.INGESTION_COMPLETED} is published to Event Grid, not {event.event}")
        try:
            self._client.send([self.to_cloud_event(event, self._source)])
        except AzureError as exc:
            raise PublishError(
                f"Event Grid topic did not accept {event.event} id={event.id}: {type(exc).__name__}: {exc.message}"
            ) from exc
        log.info("published %s id=%s to Event Grid", event.event, event.id)
