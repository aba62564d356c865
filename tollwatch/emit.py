"""Confirmed, synchronous delivery of tollwatch events to Prefect over plain HTTP.

Why not `prefect.events.emit_event`: it queues the event to a background websocket and returns before the
server has it, and importing prefect costs seconds of cold start in the Function app. Here a POST either
returns 2xx (the event is stored) or raises, so the caller can keep its watermark and fail the invocation.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

import httpx
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from tollwatch.events import TollwatchEvent

log = logging.getLogger(__name__)


class EmitError(RuntimeError):
    """Events could not be delivered; nothing after this point may assume they were."""


class EventSink(Protocol):
    """Anything that can deliver events with confirmation (the Prefect API, a webhook, a recorder in tests)."""

    def emit(self, events: Sequence[TollwatchEvent]) -> None: ...


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, httpx.TransportError):
        return True
    return isinstance(exc, httpx.HTTPStatusError) and (
        exc.response.status_code >= 500 or exc.response.status_code in (408, 429)
    )


class PrefectEventsEmitter:
    """POSTs events to `{api_url}/events` (OSS server or Prefect Cloud workspace API)."""

    def __init__(
        self,
        http: httpx.Client,
        api_url: str,
        *,
        api_key: str | None = None,
        auth_string: str | None = None,
        max_attempts: int = 5,
        backoff_initial_s: float = 0.25,
        backoff_max_s: float = 8.0,
    ) -> None:
        self._http = http
        self._url = f"{api_url.rstrip('/')}/events"
        self._headers: dict[str, str] = {}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._auth = tuple(auth_string.split(":", 1)) if auth_string else None
        self._retrying = Retrying(
            stop=stop_after_attempt(max_attempts),
            wait=wait_exponential_jitter(initial=backoff_initial_s, max=backoff_max_s),
            retry=retry_if_exception(_is_transient),
            reraise=True,
        )

    def emit(self, events: Sequence[TollwatchEvent]) -> None:
        """Deliver all events in one request; raise `EmitError` if the server did not confirm."""
        if not events:
            return
        body = [e.to_prefect() for e in events]
        try:
            self._retrying(self._post, body)
        except httpx.HTTPError as exc:
            raise EmitError(f"could not deliver {len(events)} event(s) to {self._url}: {_describe(exc)}") from exc
        for event in events:
            log.info("emitted %s id=%s resource=%s", event.event, event.id, event.resource.id)

    def _post(self, body: list[dict[str, object]]) -> None:
        response = self._http.post(self._url, json=body, headers=self._headers, auth=self._auth)  # type: ignore[arg-type]
        response.raise_for_status()


def _describe(exc: httpx.HTTPError) -> str:
    if isinstance(exc, httpx.HTTPStatusError):
        return f"HTTP {exc.response.status_code}: {exc.response.text[:300]}"
    return f"{type(exc).__name__}: {exc}"
