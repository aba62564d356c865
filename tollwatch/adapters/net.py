"""The one retry policy for every outbound HTTP call tollwatch makes: Socrata, Prefect (events and reads), Databricks.

Why one: each client had grown its own (three backoffs, two Retry-After parsers, one client that ignored it),
so the same 429 was waited out differently depending on who got it. The rules, for everyone:

- **What is retried**: a broken connection, and an answer whose status is in the policy's `statuses`
  (`TRANSIENT_STATUS` by default; a client may add its own, e.g. Socrata's "still processing" 202). Any other
  answer is final: repeating a request the server refused cannot succeed.
- **How long to wait**: what the server's `Retry-After` asks for (delta-seconds or an HTTP-date, RFC 9110
  §10.2.3) — no sooner, and no later either: the server said when it can answer. Without one, exponential
  backoff from `initial_s`, doubling per attempt, with jitter (times 0.5 to 1.5) so that many clients throttled
  at once do not come back at once, capped at `max_delay_s`.
- **When to stop**: after `max_attempts`, or at once when `Retry-After` asks for more than `max_delay_s`
  (waiting less would be refused again, waiting longer would stall the caller). The caller turns the last
  failure into its own error, with the attempts and the reason.
- Every retry is logged: what failed, attempt n of N, and the pause.
"""

from __future__ import annotations

import functools
import logging
import random
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, NoReturn, TypeVar

import httpx
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt, stop_any

R = TypeVar("R")

#: Answers worth another try: timeout, throttling, and the server errors that mean "not now".
TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})

#: Called when the policy stops retrying, with the last failure and why it stopped (for the caller's message);
#: it raises the caller's own error (or the failure itself).
GiveUp = Callable[[BaseException, str], NoReturn]


@functools.cache
def tls_context() -> ssl.SSLContext:
    """The TLS settings of every outbound httpx client, made once per process: httpx's own default (certifi's CA
    bundle, or SSL_CERT_FILE / SSL_CERT_DIR), passed as `verify=`.

    Why: a client made without it parses the whole CA bundle again (~24 ms of CPU). The Function app makes its
    clients per invocation (their connections close with it), so every Event Grid delivery, handshake and backfill
    request paid that: on two shared cores the handshake, which does no I/O, answered 10 times a second (bench
    figure 9). A configured context is safe to share between clients and threads; nothing changes it afterwards.
    """
    return httpx.create_ssl_context()


def retry_after_s(value: str | None, *, now: datetime | None = None) -> float | None:
    """The wait a `Retry-After` header asks for, in seconds (delta-seconds or an HTTP-date); None when the header is
    absent or unreadable (the policy then uses its own backoff)."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def status_of(error: BaseException) -> int | None:
    """The HTTP status an error carries (httpx's and Prefect's status errors, or a client's own with `.status`)."""
    response = getattr(error, "response", None)
    if isinstance(response, httpx.Response):
        return response.status_code
    status = getattr(error, "status", None)
    return status if isinstance(status, int) else None


def retry_after_of(error: BaseException) -> float | None:
    """The server's `Retry-After` for a failed request: from the response, or a client error's `.retry_after`."""
    carried = getattr(error, "retry_after", None)
    if isinstance(carried, int | float):
        return max(0.0, float(carried))
    response = getattr(error, "response", None)
    if isinstance(response, httpx.Response):
        return retry_after_s(response.headers.get("Retry-After"))
    return None


def describe_http_error(error: BaseException) -> str:
    """`HTTP 503: <first 300 characters of the body>`, a transport error's class and message, or a client's own
    error's message (it already says what happened)."""
    if isinstance(error, httpx.HTTPStatusError):
        return f"HTTP {error.response.status_code}: {error.response.text[:300]}"
    if isinstance(error, httpx.HTTPError) or not str(error):
        return f"{type(error).__name__}: {error}"
    return str(error)


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently one client retries (see the module docstring for the rules)."""

    max_attempts: int = 5
    initial_s: float = 0.25
    max_delay_s: float = 8.0
    statuses: frozenset[int] = TRANSIENT_STATUS

    def transient(self, error: BaseException) -> bool:
        """A broken connection, a status in `statuses`, or a client's own error that says so (`.transient`)."""
        if isinstance(error, httpx.TransportError) or getattr(error, "transient", False) is True:
            return True
        status = status_of(error)
        return status is not None and status in self.statuses

    def delay(self, attempt: int, retry_after: float | None) -> float:
        """The pause after failed attempt `attempt` (1-based): what the server's `Retry-After` asked for, else
        jittered exponential backoff; never more than `max_delay_s`."""
        if retry_after is not None:
            return min(retry_after, self.max_delay_s)
        backoff = min(self.initial_s * 2 ** (attempt - 1), self.max_delay_s) * random.uniform(0.5, 1.5)
        return min(backoff, self.max_delay_s)

    def asks_too_long(self, error: BaseException | None) -> bool:
        wanted = retry_after_of(error) if error is not None else None
        return wanted is not None and wanted > self.max_delay_s

    def why_stopped(self, error: BaseException, attempts: int) -> str:
        """`gave up after 3 attempts`, or that the server asked for a longer wait than this policy allows."""
        plural = "s" if attempts > 1 else ""
        wanted = retry_after_of(error)
        if wanted is not None and wanted > self.max_delay_s:
            return (
                f"Retry-After {wanted:.0f}s is longer than the {self.max_delay_s:.0f}s we wait; "
                f"gave up after {attempts} attempt{plural}"
            )
        return f"gave up after {attempts} attempt{plural}"

    def call(
        self,
        fn: Callable[..., R],
        *args: Any,
        what: str,
        give_up: GiveUp,
        logger: logging.Logger | logging.LoggerAdapter[Any],
        **kwargs: Any,
    ) -> R:
        """`fn(*args, **kwargs)`, retried by this policy. When the retries end, `give_up` raises the caller's error;
        a failure that is not transient (a 4xx the server meant) propagates unchanged at once."""

        def failure(state: RetryCallState) -> BaseException:
            error = state.outcome.exception() if state.outcome else None
            return error if error is not None else RuntimeError("no outcome")

        def before_sleep(state: RetryCallState) -> None:
            pause = state.next_action.sleep if state.next_action else 0.0
            logger.warning(
                "%s failed (%s); attempt %d of %d, next in %.1fs",
                what,
                describe_http_error(failure(state)),
                state.attempt_number,
                self.max_attempts,
                pause,
            )

        def stop(state: RetryCallState) -> NoReturn:
            error = failure(state)
            give_up(error, self.why_stopped(error, state.attempt_number))

        retrying = Retrying(
            retry=retry_if_exception(self.transient),
            stop=stop_any(
                stop_after_attempt(self.max_attempts),
                lambda state: self.asks_too_long(state.outcome.exception() if state.outcome else None),
            ),
            wait=lambda state: self.delay(
                state.attempt_number, retry_after_of(failure(state)) if state.outcome else None
            ),
            before_sleep=before_sleep,
            retry_error_callback=stop,
        )
        return retrying(fn, *args, **kwargs)  # a final (non-transient) failure propagates as it is
