"""The one outbound retry policy (tollwatch.adapters.net), on real httpx requests to an in-process transport."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import NoReturn

import httpx
import pytest

from tollwatch.adapters.net import RetryPolicy, retry_after_of, retry_after_s

log = logging.getLogger("test-net")


class GaveUp(Exception):
    pass


def give_up(error: BaseException, why: str) -> NoReturn:
    raise GaveUp(why) from error


def server(*answers: httpx.Response | Exception) -> tuple[httpx.Client, list[httpx.Request]]:
    """A client whose server answers `answers` in order (an exception is a broken connection)."""
    seen: list[httpx.Request] = []
    queue = list(answers)

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        answer = queue.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    return httpx.Client(transport=httpx.MockTransport(handle), base_url="http://upstream.test"), seen


def get(client: httpx.Client) -> int:
    response = client.get("/x")
    response.raise_for_status()
    return response.status_code


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The pauses the policy takes (recorded instead of slept)."""
    taken: list[float] = []
    monkeypatch.setattr("tenacity.nap.time.sleep", taken.append)
    return taken


def test_transient_answers_and_broken_connections_are_retried_until_success(sleeps):
    client, seen = server(httpx.Response(503), httpx.ConnectError("refused"), httpx.Response(429), httpx.Response(200))
    assert RetryPolicy(max_attempts=5).call(get, client, what="GET /x", give_up=give_up, logger=log) == 200
    assert len(seen) == 4
    assert len(sleeps) == 3


def test_a_final_answer_is_not_retried():
    client, seen = server(httpx.Response(404))
    with pytest.raises(httpx.HTTPStatusError):
        RetryPolicy().call(get, client, what="GET /x", give_up=give_up, logger=log)
    assert len(seen) == 1


def test_the_pause_is_what_retry_after_asks_longer_or_shorter_than_the_backoff(sleeps):
    client, _ = server(
        httpx.Response(429, headers={"Retry-After": "3"}),
        httpx.Response(503, headers={"Retry-After": "0.1"}),
        httpx.Response(200),
    )
    RetryPolicy(initial_s=1.0, max_delay_s=10).call(get, client, what="GET /x", give_up=give_up, logger=log)
    assert sleeps == [3.0, 0.1]


def test_a_retry_after_longer_than_the_longest_wait_ends_the_retries_at_once(sleeps):
    client, seen = server(httpx.Response(429, headers={"Retry-After": "3600"}), httpx.Response(200))
    with pytest.raises(GaveUp, match=r"Retry-After 3600s is longer than the 8s we wait; gave up after 1 attempt$"):
        RetryPolicy(max_delay_s=8).call(get, client, what="GET /x", give_up=give_up, logger=log)
    assert (len(seen), sleeps) == (1, [])


def test_the_attempts_run_out_and_the_caller_says_how(sleeps, caplog):
    client, seen = server(*[httpx.Response(502)] * 3)
    with caplog.at_level(logging.WARNING, "test-net"), pytest.raises(GaveUp, match="gave up after 3 attempts"):
        RetryPolicy(max_attempts=3).call(get, client, what="GET /x", give_up=give_up, logger=log)
    assert len(seen) == 3
    assert [r.getMessage().split(";")[0] for r in caplog.records] == ["GET /x failed (HTTP 502: )"] * 2


def test_backoff_grows_with_jitter_and_stays_under_the_cap():
    policy = RetryPolicy(initial_s=1.0, max_delay_s=5.0)
    for attempt, (low, high) in enumerate([(0.5, 1.5), (1.0, 3.0), (2.0, 5.0), (2.5, 5.0), (2.5, 5.0)], start=1):
        assert all(low <= policy.delay(attempt, None) <= high for _ in range(50)), attempt


def test_retry_after_is_delta_seconds_or_an_http_date():
    now = datetime(2024, 1, 1, 12, 0, tzinfo=UTC)
    assert retry_after_s("7", now=now) == 7.0
    assert retry_after_s("Mon, 01 Jan 2024 12:00:30 GMT", now=now) == 30.0
    assert retry_after_s("Mon, 01 Jan 2024 11:59:00 GMT", now=now) == 0.0
    assert retry_after_s(None) is None
    assert retry_after_s("soon") is None


def test_a_clients_own_error_can_carry_its_retry_after_and_say_it_is_transient():
    class Busy(Exception):
        transient = True
        retry_after = 2

    assert RetryPolicy().transient(Busy())
    assert retry_after_of(Busy()) == 2.0
