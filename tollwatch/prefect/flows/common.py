"""What every tollwatch flow shares: where its events go and which resources they relate to."""

from __future__ import annotations

import logging

from prefect.runtime import deployment, flow_run
from prefect.settings import get_current_settings

from tollwatch import resources
from tollwatch.adapters.prefect_events import EventSink
from tollwatch.contract.events import Resource, TollwatchEvent, deployment_resource, flow_run_resource
from tollwatch.contract.settings import Settings, load_settings
from tollwatch.resources import Resources


def flow_settings(settings: Settings | None = None) -> Settings:
    """tollwatch's settings for a flow run: its events go to the Prefect API the run reports to (unless tollwatch
    settings name another)."""
    settings = settings or load_settings()
    if settings.prefect_api_url is None:
        api = get_current_settings().api
        settings = settings.model_copy(
            update={
                "prefect_api_url": api.url,
                "prefect_api_key": api.key,
                "prefect_api_auth_string": getattr(api, "auth_string", None),
            }
        )
    return settings


def flow_resources() -> Resources:
    """The clients of one flow run, built once and handed to its tasks (`with flow_resources() as res:`)."""
    return Resources(flow_settings())


def emitter(settings: Settings) -> EventSink:
    """An event sink for one-off announcements (failure hooks), to the flow run's Prefect API."""
    return resources.event_emitter(flow_settings(settings))


def run_resources(*extra: Resource) -> tuple[Resource, ...]:
    """The given resources plus this flow run and its deployment: what lets one publish be traced end to end."""
    resources = list(extra)
    if flow_run.id:
        resources.append(flow_run_resource(flow_run.id, flow_run.name))
    if deployment.id:
        resources.append(deployment_resource(deployment.id, deployment.name))
    return tuple(resources)


def emit_quietly(settings: Settings, event: TollwatchEvent, logger: logging.Logger | logging.LoggerAdapter) -> None:
    """For failure hooks: the run already failed, so losing its event must not hide the original error."""
    try:
        emitter(settings).emit([event])
    except Exception as exc:
        logger.error("could not emit %s: %s", event.event, exc)
