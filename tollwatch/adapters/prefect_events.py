"""Confirmed, synchronous delivery of tollwatch events to Prefect over plain HTTP.

Why not `prefect.events.emit_event`: it queues the event to a background websocket and returns before the
server has it, and importing prefect costs seconds of cold start in the Function app. Here a POST either
returns 2xx (the event is stored) or raises, so the caller can keep its watermark and fail the invocation.

Two transports, retried by the one outbound policy (`tollwatch.adapters.net`: connection errors, 408/429 and 5xx,
jittered exponential backoff never sooner than `Retry-After`; any other 4xx is final):

* `PrefectEventsEmitter`: `POST {api}/events` with a list (OSS server, or a Prefect Cloud workspace API with a
  Bearer API key, or a self-hosted server behind basic auth).
* `WebhookEmitter`: one `POST` per event to a Prefect Cloud webhook whose template passes the body through
  (`automations/webhooks/eventgrid-passthrough.yaml`), for producers that should hold no workspace API key.
"""

from __future__ import annotations

import base64
import logging
import threading
from collections.abc import Sequence
from typing import NoReturn, Protocol
from urllib.parse import urlsplit

import httpx

from tollwatch.adapters.net import RetryPolicy, describe_http_error
from tollwatch.contract.errors import TollwatchError
from tollwatch.contract.events import TollwatchEvent

log = logging.getLogger(__name__)


class EmitError(TollwatchError):
    """Events could not be delivered; nothing after this point may assume they were."""

    status = 503


class EventSink(Protocol):
    """Anything that can deliver events with confirmation (the Prefect API, a webhook, a recorder in tests)."""

    def emit(self, events: Sequence[TollwatchEvent]) -> None: ...


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
        if auth_string:  # as Prefect's own clients send it: the whole string, base64'd (it need not be `user:pass`)
            self._headers["Authorization"] = f"Basic {base64.b64encode(auth_string.encode()).decode()}"
        elif api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._retry = RetryPolicy(max_attempts=max_attempts, initial_s=backoff_initial_s, max_delay_s=backoff_max_s)

    def emit(self, events: Sequence[TollwatchEvent]) -> None:
        """Deliver all events in one request; raise `EmitError` if the server did not confirm."""
        if not events:
            return
        body = [e.to_prefect() for e in events]
        failed = f"could not deliver {len(events)} event(s) to {self._url}"

        def give_up(error: BaseException, why: str) -> NoReturn:
            raise EmitError(f"{failed}: {describe_http_error(error)} ({why})") from error

        try:
            self._retry.call(self._post, body, what=f"POST {self._url}", give_up=give_up, logger=log)
        except httpx.HTTPError as exc:  # a final answer (4xx): not retried
            raise EmitError(f"{failed}: {describe_http_error(exc)}") from exc
        for event in events:
            log.info("emitted %s id=%s resource=%s", event.event, event.id, event.resource.id)

    def _post(self, body: list[dict[str, object]]) -> None:
        response = self._http.post(self._url, json=body, headers=self._headers)
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
        self._retry = RetryPolicy(max_attempts=max_attempts, initial_s=backoff_initial_s, max_delay_s=backoff_max_s)

    def emit(self, events: Sequence[TollwatchEvent]) -> None:
        """Deliver every event (one request each); raise `EmitError` at the first one not confirmed."""
        for number, event in enumerate(events, start=1):
            failed = (
                f"could not deliver event {number}/{len(events)} ({event.event} id={event.id}) to the Prefect "
                "Cloud webhook"
            )

            def give_up(error: BaseException, why: str, failed: str = failed) -> NoReturn:
                # `from None`: httpx errors carry the request URL, which is the webhook's secret.
                raise EmitError(f"{failed}: {describe_http_error(error)} ({why})") from None

            try:
                self._retry.call(
                    self._post, event.to_prefect(), what="POST <Prefect Cloud webhook>", give_up=give_up, logger=log
                )
            except httpx.HTTPError as exc:  # a final answer (4xx): not retried
                raise EmitError(f"{failed}: {describe_http_error(exc)}") from None
            log.info("emitted %s id=%s resource=%s via webhook", event.event, event.id, event.resource.id)

    def _post(self, body: dict[str, object]) -> None:
        response = self._http.post(self._url, json=body, headers=self._headers)
        response.raise_for_status()
