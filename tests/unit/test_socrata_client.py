"""The Socrata client (tollwatch/adapters/socrata.py) against SODA answers mocked at the HTTP layer with respx: what it
asks for, what it makes of the answers, what it retries and what it refuses. The same client against the mirror (a
real HTTP server with Socrata's query semantics): tests/integration/test_socrata.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import date

import httpx
import orjson
import pytest
import respx

from tests.support.fakes import DATASET, day_rows
from tollwatch.adapters.socrata import SocrataClient, UpstreamError, build_http_client, window_where

BASE = "https://data.ny.gov"
ROWS = f"{BASE}/resource/{DATASET}.json"


@pytest.fixture
def api() -> Iterator[respx.MockRouter]:
    with respx.mock(base_url=BASE, assert_all_called=False) as router:
        yield router


@pytest.fixture
def client() -> Iterator[SocrataClient]:
    with build_http_client(BASE, 5) as http:
        yield SocrataClient(http, app_token="app-token", max_attempts=3, backoff_initial_s=0.001, backoff_max_s=0.01)


def rows_answer(request: httpx.Request, rows: list[dict[str, str]]) -> httpx.Response:
    """Serve `rows` the way SODA pages them: `$limit` rows from `$offset`."""
    offset, limit = int(request.url.params["$offset"]), int(request.url.params["$limit"])
    return httpx.Response(200, content=orjson.dumps(rows[offset : offset + limit]))


def test_pages_are_asked_in_id_order_and_kept_as_the_upstream_sent_them(api, client):
    rows = day_rows(date(2024, 1, 1), version=1_704_153_600)
    route = api.get(ROWS).mock(side_effect=lambda request: rows_answer(request, rows))
    where = window_where(date(2024, 1, 1), date(2024, 1, 2))

    pages = list(client.pages(DATASET, where=where, page_size=10))

    assert [(p.number, p.offset, p.row_count) for p in pages] == [(0, 0, 10), (1, 10, 10), (2, 20, 4)]
    assert b"".join(p.body for p in pages) == b"".join(orjson.dumps(rows[i : i + 10]) for i in (0, 10, 20))
    assert pages[0].columns == frozenset(rows[0])
    params = [call.request.url.params for call in route.calls]
    assert [p["$offset"] for p in params] == ["0", "10", "20"]  # stops at the first short page
    assert {(p["$order"], p["$select"], p["$where"]) for p in params} == {(":id", ":*, *", where)}
    assert {call.request.headers["X-App-Token"] for call in route.calls} == {"app-token"}


def test_a_count_and_the_counts_per_day_are_read_from_their_grouped_answers(api, client):
    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.params["$select"] == "count(*) AS n":
            return httpx.Response(200, json=[{"n": "48"}])
        assert (request.url.params["$group"], request.url.params["$order"]) == ("date", "date")
        return httpx.Response(
            200, json=[{"date": "2024-01-01T00:00:00.000", "n": "24"}, {"date": "2024-01-02T00:00:00.000", "n": "24"}]
        )

    api.get(ROWS).mock(side_effect=answer)

    assert client.count(DATASET, where=None) == 48
    assert client.counts_by_day(DATASET, where=None) == {date(2024, 1, 1): 24, date(2024, 1, 2): 24}


def test_an_answer_that_is_not_a_count_is_an_error_that_shows_it(api, client):
    api.get(ROWS).mock(return_value=httpx.Response(200, json=[{"count": "48"}]))

    with pytest.raises(UpstreamError, match=r"count\(\*\) for qzve-kjga answered \[\{'count': '48'\}\]"):
        client.count(DATASET, where=None)


def test_still_preparing_and_truncated_answers_are_asked_again(api, client):
    route = api.get(ROWS).mock(
        side_effect=[
            httpx.Response(202, json={"message": "still preparing"}),
            httpx.Response(200, content=b'[{"n": "4'),  # the connection dropped mid-body
            httpx.Response(200, json=[{"n": "42"}]),
        ]
    )

    assert client.count(DATASET, where=None) == 42
    assert route.call_count == 3


def test_a_refused_query_is_not_asked_again_and_the_error_names_it(api, client):
    route = api.get(ROWS).mock(return_value=httpx.Response(400, json={"message": "no such column: datee"}))

    with pytest.raises(UpstreamError, match=r"GET /resource/qzve-kjga.json → HTTP 400: .*no such column"):
        client.count(DATASET, where="datee > '2024-01-01'")

    assert route.call_count == 1


def test_an_upstream_that_keeps_failing_ends_in_one_error_after_the_last_attempt(api, client):
    route = api.get(ROWS).mock(return_value=httpx.Response(503, text="maintenance"))

    with pytest.raises(UpstreamError, match="failed") as failed:
        client.count(DATASET, where=None)

    assert route.call_count == 3
    assert "503" in str(failed.value)


def test_metadata_gives_the_publish_watermark_and_refuses_another_shape(api, client):
    views = api.get(f"{BASE}/api/views/{DATASET}.json")
    views.mock(return_value=httpx.Response(200, content=json.dumps({"id": DATASET, "rowsUpdatedAt": 1_704_153_600})))

    assert client.metadata(DATASET).rows_updated_at == 1_704_153_600

    views.mock(return_value=httpx.Response(200, json={"id": DATASET}))
    with pytest.raises(UpstreamError, match="is not what Socrata returns"):
        client.metadata(DATASET)
