"""`request_backfill` on the real server: the events a request emits, their deterministic ids, its refusals and
outages. The request rules and the chunking themselves are unit-tested (tests/unit/test_backfill_requests.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import httpx
import pytest

from tests.support.funcapp import FUNCTION_KEY, closed_port, json_of, post_backfill, settle
from tollwatch.contract.events import BackfillRequested, EventName

pytestmark = pytest.mark.stack

REQUESTED = EventName.BACKFILL_REQUESTED
TODAY = datetime.now(UTC).date()


# ---------------------------------------------------------------------------------------------- the function


def test_request_by_month_emits_one_event_per_chunk_with_deterministic_ids(app, fenv):
    request = {"start": "2024-01-01", "stop": "2024-04-01", "chunk": "month", "reason": "reprocess Q1"}

    response = post_backfill(app, request)

    assert response.status_code == 202
    answer = json_of(response)
    assert answer["chunks"] == [
        {"start": "2024-01-01", "stop": "2024-02-01"},
        {"start": "2024-02-01", "stop": "2024-03-01"},
        {"start": "2024-03-01", "stop": "2024-04-01"},
    ]
    expected = [
        str(
            BackfillRequested(
                domain=fenv.domain,
                dataset_id="qzve-kjga",
                start=c["start"],
                stop=c["stop"],
                request_id=answer["request_id"],
                requested_by="http",
                reason="reprocess Q1",
            ).event_id()
        )
        for c in answer["chunks"]
    ]
    assert answer["event_ids"] == expected
    events = settle(fenv.api_url, fenv.resource_id, REQUESTED)
    assert sorted(e["id"] for e in events) == sorted(expected)
    assert {(e["payload"]["start"], e["payload"]["stop"]) for e in events} == {
        (c["start"], c["stop"]) for c in answer["chunks"]
    }
    assert {e["payload"]["request_id"] for e in events} == {answer["request_id"]}
    assert {e["payload"]["reason"] for e in events} == {"reprocess Q1"}


def test_the_same_request_twice_has_the_same_ids_and_rerun_changes_them(app, fenv):
    request = {"start": "2024-01-01", "stop": "2024-04-01", "chunk": "month"}

    first = json_of(post_backfill(app, request))
    again = json_of(post_backfill(app, request))
    rerun = json_of(post_backfill(app, {**request, "rerun": True}))

    assert again == first
    assert rerun["chunks"] == first["chunks"]
    assert rerun["request_id"] != first["request_id"]
    assert set(rerun["event_ids"]).isdisjoint(first["event_ids"])
    events = settle(fenv.api_url, fenv.resource_id, REQUESTED)
    assert sorted(e["id"] for e in events) == sorted(first["event_ids"] + rerun["event_ids"])  # 6, not 9


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"start": "2024-04-01", "stop": "2024-01-01"}, "stop"),
        ({"start": str(TODAY + timedelta(days=3)), "stop": str(TODAY + timedelta(days=5))}, "start"),
        ({"start": "2009-06-01", "stop": "2010-02-01"}, "start"),
        ({"start": "2010-01-01", "stop": "2024-01-01"}, "stop"),  # over TOLLWATCH_BACKFILL_MAX_DAYS (3660)
        ({"start": "2024-01-01", "stop": "2024-02-01", "force": True}, "force"),
    ],
)
def test_invalid_request_is_400_with_field_problems_and_emits_nothing(app, fenv, payload, field):
    response = post_backfill(app, payload)

    assert response.status_code == 400
    answer = json_of(response)
    assert answer["error"] == "invalid backfill request"
    assert field in {p["field"] for p in answer["problems"]}
    assert settle(fenv.api_url, fenv.resource_id, REQUESTED) == []


def test_non_json_is_400(app, fenv):
    response = post_backfill(app, None, raw=b"<backfill start='2024-01-01'/>")
    assert response.status_code == 400
    assert json_of(response)["problems"][0]["field"] == "body"


def test_max_days_comes_from_settings(app, fenv, monkeypatch):
    monkeypatch.setenv("TOLLWATCH_BACKFILL_MAX_DAYS", "31")
    too_long = post_backfill(app, {"start": "2024-01-01", "stop": "2024-03-01"})
    fits = post_backfill(app, {"start": "2024-01-01", "stop": "2024-02-01"})
    assert too_long.status_code == 400
    assert "maximum of 31" in json_of(too_long)["problems"][0]["reason"]
    assert fits.status_code == 202


def test_prefect_down_is_503_and_the_retry_succeeds_with_the_same_ids(app, fenv, monkeypatch):
    request = {"start": "2024-01-01", "stop": "2024-01-08", "chunk": "day"}
    with monkeypatch.context() as down:
        down.setenv("PREFECT_API_URL", f"http://127.0.0.1:{closed_port()}/api")
        failed = post_backfill(app, request)
    assert failed.status_code == 503
    assert "retrying the same request is safe" in json_of(failed)["error"]

    retried = post_backfill(app, request)

    assert retried.status_code == 202
    events = settle(fenv.api_url, fenv.resource_id, REQUESTED)
    assert sorted(e["id"] for e in events) == sorted(json_of(retried)["event_ids"])
    assert len(events) == 7


def test_backfill_over_the_dev_host(devhost, fenv):
    url = f"{devhost.url}/api/backfill"
    request = {"start": "2024-01-01", "stop": "2024-04-01", "chunk": "month", "reason": "curl"}
    with httpx.Client(timeout=30) as http:
        unauthorised = http.post(url, json=request)
        wrong_method = http.get(url, headers={"x-functions-key": FUNCTION_KEY})
        accepted = http.post(url, json=request, headers={"x-functions-key": FUNCTION_KEY})
        refused = http.post(url, params={"code": FUNCTION_KEY}, content=b"not json")

    assert unauthorised.status_code == 401
    assert wrong_method.status_code == 405
    assert accepted.status_code == 202
    assert len(accepted.json()["event_ids"]) == 3
    assert refused.status_code == 400
    assert refused.json()["problems"] == [
        {"field": "body", "reason": "not valid JSON (expected ident at line 1 column 2)"}
    ]
    events = settle(fenv.api_url, fenv.resource_id, REQUESTED)
    assert sorted(e["id"] for e in events) == sorted(accepted.json()["event_ids"])
