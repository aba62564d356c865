"""PrefectObserver against the real local server: reads that a large backfill makes."""

from __future__ import annotations

import time
import uuid

import httpx
import pytest

from tests.support.prefect_events import prefect_headers
from tollwatch.prefect.observe import connect

pytestmark = pytest.mark.stack


def test_events_related_to_a_thousand_resources_are_all_read(env):
    """`backfill --wait` on 1,000 chunks asks for the actions related to 1,000 events at once: the filter must not
    end up in a page URL too long for httpx, nor stop at the default limit."""
    name = f"test.observe.{uuid.uuid4().hex[:8]}"
    related = [f"prefect.event.{uuid.uuid4()}" for _ in range(1200)]
    events = [
        {
            "id": str(uuid.uuid4()),
            "occurred": time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime()),
            "event": name,
            "resource": {"prefect.resource.id": f"test.observe.{i}"},
            "related": [{"prefect.resource.id": rid, "prefect.resource.role": "triggering-event"}],
            "payload": {},
        }
        for i, rid in enumerate(related)
    ]
    with httpx.Client(base_url=env["PREFECT_API_URL"], timeout=60, headers=prefect_headers()) as http:
        for start in range(0, len(events), 200):
            http.post("/events", json=events[start : start + 200]).raise_for_status()
    with connect() as observer:
        deadline = time.monotonic() + 30
        found = []
        while len(found) < len(events) and time.monotonic() < deadline:
            time.sleep(1)
            found = observer.events(names=[name], related_ids=related, limit=5000)
    assert sorted(str(e.id) for e in found) == sorted(e["id"] for e in events)
    assert [e.occurred for e in found] == sorted(e.occurred for e in found)  # oldest first, across batches


def test_flow_runs_reads_every_asked_run_beyond_the_servers_page_limit(env):
    """The server answers at most 200 runs per read: `backfill --wait` on 1,000 chunks must still see every run."""
    from prefect import flow
    from prefect.client.orchestration import get_client

    @flow(name=f"test-observe-{uuid.uuid4().hex[:8]}")
    def idle() -> None:
        """Never runs: its runs only exist to be read back."""

    with get_client(sync_client=True) as client:
        ids = [client.create_flow_run(idle).id for _ in range(230)]
    with connect() as observer:
        assert set(observer.flow_runs(ids)) == set(ids)


class _FlakyEvents:
    """A client whose events reads fail with the given errors first, then answer one empty page."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.calls = 0

    def read_events(self, *args: object, **kwargs: object) -> object:
        from types import SimpleNamespace

        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return SimpleNamespace(events=[], next_page=None)


def _server_error(status: int) -> BaseException:
    from prefect.exceptions import PrefectHTTPStatusError

    request = httpx.Request("POST", "http://127.0.0.1:4200/api/events/filter")
    response = httpx.Response(status, request=request, json={"exception_message": "Internal Server Error"})
    return PrefectHTTPStatusError.from_httpx_error(httpx.HTTPStatusError("boom", request=request, response=response))


def test_a_read_the_server_fails_with_a_5xx_is_retried(monkeypatch):
    """A loaded server times out a query (asyncpg TimeoutError -> 500, seen on CI under `backfill --wait`): a read
    changes nothing, so the observer asks again instead of failing the wait."""
    from tollwatch.prefect import observe

    monkeypatch.setattr(observe, "_READ_BACKOFF_S", 0.0)
    client = _FlakyEvents(_server_error(500), httpx.ConnectError("refused"))

    assert observe.PrefectObserver(client).events(names=["x"]) == []  # type: ignore[arg-type]
    assert client.calls == 3


def test_a_read_that_keeps_failing_or_is_refused_is_not_retried_forever(monkeypatch):
    from prefect.exceptions import PrefectHTTPStatusError

    from tollwatch.prefect import observe

    monkeypatch.setattr(observe, "_READ_BACKOFF_S", 0.0)
    refused = _FlakyEvents(_server_error(422))
    with pytest.raises(PrefectHTTPStatusError):
        observe.PrefectObserver(refused).events(names=["x"])  # type: ignore[arg-type]
    assert refused.calls == 1
    down = _FlakyEvents(*[_server_error(500) for _ in range(10)])
    with pytest.raises(PrefectHTTPStatusError):
        observe.PrefectObserver(down).events(names=["x"])  # type: ignore[arg-type]
    assert down.calls == observe._READ_ATTEMPTS
