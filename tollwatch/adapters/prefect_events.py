"""Confirmed, synchronous delivery of tollwatch events to Prefect over plain HTTP.

Why not `prefect.events.emit_event`: it queues the event to a background websocket and returns before the
server has it, and importing prefect costs seconds of cold start in the Function app. Here a POST either
returns 2xx (the event is stored) or raises, so the caller can keep its watermark and fail the invocation.

Two transports, one retry policy (connection errors, 408/429 and 5xx are retried with jittered exponential
backoff; any other 4xx is final, because repeating a request the server refused cannot succeed):

* `PrefectEventsEmitter`: `POST {api}/events` with a list (OSS server, or a Prefect Cloud workspace API with a
  Bearer API key, or a self-hosted server behind basic auth).
* `WebhookEmitter`: one `POST` per event to a Prefect Cloud webhook whose template passes the body through
  (`automations/webhooks/eventgrid-passthrough.yaml`), for producers that should hold no workspace API key.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Protocol
from urllib.parse import urlsplit

import httpx
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from tollwatch.contract.events import TollwatchEvent

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


def _retrying(max_attempts: int, backoff_initial_s: float, backoff_max_s: float) -> Retrying:
    """The one delivery retry policy: transient failures only, then re-raise the last error."""
    return Retrying(
        stop=stop_after_attempt(max_attempts),
        wait=wait_exponential_jitter(initial=backoff_initial_s, max=backoff_max_s),
        retry=retry_if_exception(_is_transient),
        reraise=True,
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
        self._retrying = _retrying(max_attempts, backoff_initial_s, backoff_max_s)

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


class _RedactSecretPath(logging.Filter):
    """Masks a secret URL path in the `httpx` logger's records (httpx logs every request URL at INFO)."""

    def __init__(self, secret_path: str) -> None:
        super().__init__()
        self._secret = secret_path

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and any(self._secret in str(arg) for arg in record.args):
            record.args = tuple(
                str(arg).replace(self._secret, "/<redacted>") if self._secret in str(arg) else arg
                for arg in record.args
            )
        if self._secret in str(record.msg):
            record.msg = str(record.msg).replace(self._secret, "/<redacted>")
        return True


_REDACTED: set[str] = set()
_REDACT_LOCK = threading.Lock()


def _redact_in_httpx_logs(url: str) -> None:
    """Install (once per URL) a filter so the webhook's secret path never reaches a log handler."""
    path = urlsplit(url).path
    if not path or path == "/":
        return
    with _REDACT_LOCK:
        if path not in _REDACTED:
            logging.getLogger("httpx").addFilter(_RedactSecretPath(path))
            _REDACTED.add(path)


class WebhookEmitter:
    """POSTs each event to a Prefect Cloud webhook whose template is the pass-through `{{ body|tojson }}`.

    A webhook makes one event per request, so events go one by one, in order; the first that cannot be
    delivered raises (the ones before it are stored, and deterministic ids make a re-send harmless). The
    webhook URL is itself a credential: it never appears in logs or error messages.
    """

    def __init__(
        self,
        http: httpx.Client,
        webhook_url: str,
        *,
        api_key: str | None = None,
        max_attempts: int = 5,
        backoff_initial_s: float = 0.25,
        backoff_max_s: float = 8.0,
    ) -> None:
        self._http = http
        self._url = webhook_url
        _redact_in_httpx_logs(webhook_url)
        self._headers = {"Content-Type": "application/json"}
        if api_key:  # webhooks bound to a service account require its key (Prefect Cloud Pro/Enterprise)
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._retrying = _retrying(max_attempts, backoff_initial_s, backoff_max_s)

    def emit(self, events: Sequence[TollwatchEvent]) -> None:
        """Deliver every event (one request each); raise `EmitError` at the first one not confirmed."""
        for number, event in enumerate(events, start=1):
            try:
                self._retrying(self._post, event.to_prefect())
            except httpx.HTTPError as exc:
                # `from None`: httpx errors carry the request URL, which is the webhook's secret.
                raise EmitError(
                    f"could not deliver event {number}/{len(events)} ({event.event} id={event.id}) to the Prefect "
                    f"Cloud webhook: {_describe(exc)}"
                ) from None
            log.info("emitted %s id=%s resource=%s via webhook", event.event, event.id, event.resource.id)

    def _post(self, body: dict[str, object]) -> None:
        response = self._http.post(self._url, json=body, headers=self._headers)
        response.raise_for_status()


def _describe(exc: httpx.HTTPError) -> str:
    if isinstance(exc, httpx.HTTPStatusError):
        return f"HTTP {exc.response.status_code}: {exc.response.text[:300]}"
    return f"{type(exc).__name__}: {exc}"
