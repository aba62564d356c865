"""`request_backfill`: validation, calendar chunking, deterministic ids, and the events on the real server."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta

import httpx
import pytest

from tests.functions.conftest import FUNCTION_KEY
from tests.support.funcapp import closed_port, function, http_request, json_of, settle
from tollwatch.contract.events import BackfillRequested, EventName, Window
from tollwatch.core.backfill import BackfillLimits, BackfillRejected, Chunk, chunks, parse_backfill, validate_backfill

REQUESTED = EventName.BACKFILL_REQUESTED
TODAY = datetime.now(UTC).date()


def post(app, payload: object, *, raw: bytes | None = None):
    data = raw if raw is not None else json.dumps(payload).encode()
    return function(app, "request_backfill")(http_request("POST", "backfill", data))


# ---------------------------------------------------------------------------------------------- pure: chunks


def w(start: str, stop: str) -> Window:
    return Window(start=date.fromisoformat(start), stop=date.fromisoformat(stop))


@pytest.mark.parametrize(
    ("start", "stop", "chunk", "expected"),
    [
        (
            "2024-01-01",
            "2024-04-01",
            Chunk.MONTH,
            [w("2024-01-01", "2024-02-01"), w("2024-02-01", "2024-03-01"), w("2024-03-01", "2024-04-01")],
        ),
        (
            "2024-01-15",
            "2024-03-10",
            Chunk.MONTH,
            [w("2024-01-15", "2024-02-01"), w("2024-02-01", "2024-03-01"), w("2024-03-01", "2024-03-10")],
        ),
        (
            "2024-01-03",
            "2024-01-20",
            Chunk.WEEK,  # 2024-01-08 and 2024-01-15 are Mondays
            [w("2024-01-03", "2024-01-08"), w("2024-01-08", "2024-01-15"), w("2024-01-15", "2024-01-20")],
        ),
        (
            "2024-02-28",
            "2024-03-02",
            Chunk.DAY,
            [w("2024-02-28", "2024-02-29"), w("2024-02-29", "2024-03-01"), w("2024-03-01", "2024-03-02")],
        ),
        (
            "2023-12-03",
            "2025-02-01",
            Chunk.YEAR,
            [w("2023-12-03", "2024-01-01"), w("2024-01-01", "2025-01-01"), w("2025-01-01", "2025-02-01")],
        ),
        ("2024-12-31", "2025-01-01", Chunk.MONTH, [w("2024-12-31", "2025-01-01")]),
    ],
)
def test_chunks_align_to_calendar_boundaries(start, stop, chunk, expected):
    assert chunks(date.fromisoformat(start), date.fromisoformat(stop), chunk) == expected


LIMITS = BackfillLimits(today=date(2025, 6, 15), max_days=400, max_chunks=100)


@pytest.mark.parametrize(
    ("body", "field", "reason"),
    [
        pytest.param(b'{"start": "2024-04-01", "stop": "2024-01-01"}', "stop", "must be after start", id="stop<start"),
        pytest.param(b'{"start": "2024-04-01", "stop": "2024-04-01"}', "stop", "stop is exclusive", id="stop=start"),
        pytest.param(b'{"start": "2025-06-20", "stop": "2025-06-21"}', "start", "in the future", id="future-start"),
        pytest.param(b'{"start": "2025-06-01", "stop": "2025-07-01"}', "stop", "in the future", id="future-stop"),
        pytest.param(
            b'{"start": "2009-12-01", "stop": "2010-02-01"}', "start", "before the dataset begins", id="before-2010"
        ),
        pytest.param(
            b'{"start": "2020-01-01", "stop": "2024-01-01"}', "stop", "more than the maximum of 400", id="too-long"
        ),
        pytest.param(
            b'{"start": "2024-01-01", "stop": "2024-12-01", "chunk": "day"}',
            "chunk",
            "more than 100",
            id="too-many-chunks",
        ),
        pytest.param(
            b'{"start": "2024-01-01", "stop": "2024-02-01", "priority": "high"}',
            "priority",
            "unknown field",
            id="unknown-field",
        ),
        pytest.param(
            b'{"start": "2024-01-01", "stop": "2024-02-01", "chunk": "fortnight"}', "chunk", "'month'", id="bad-chunk"
        ),
        pytest.param(b'{"start": "01/01/2024", "stop": "2024-02-01"}', "start", "YYYY-MM-DD", id="bad-date"),
        pytest.param(b'{"start": 1704067200, "stop": "2024-02-01"}', "start", "YYYY-MM-DD", id="epoch-date"),
        pytest.param(b'{"stop": "2024-02-01"}', "start", "Field required", id="missing-start"),
        pytest.param(b"start=2024-01-01&stop=2024-02-01", "body", "not valid JSON", id="form-encoded"),
        pytest.param(b"", "body", "not valid JSON", id="empty"),
        pytest.param(b'["2024-01-01", "2024-02-01"]', "body", "must be a JSON object", id="array"),
    ],
)
def test_invalid_requests_name_the_field_and_the_reason(body, field, reason):
    with pytest.raises(BackfillRejected) as rejected:
        parse_backfill(body, LIMITS)
    problems = {p.field: p.reason for p in rejected.value.problems}
    assert field in problems, problems
    assert reason in problems[field]


def test_the_last_allowed_stop_is_tomorrow_and_cli_values_go_through_the_same_rules():
    ok = validate_backfill({"start": date(2025, 6, 1), "stop": date(2025, 6, 16), "chunk": "week"}, LIMITS)
    assert ok.stop == LIMITS.today + timedelta(days=1)
    with pytest.raises(BackfillRejected, match="stop"):
        validate_backfill({"start": date(2025, 6, 1), "stop": date(2025, 6, 17)}, LIMITS)


# ---------------------------------------------------------------------------------------------- the function


@pytest.mark.stack
def test_request_by_month_emits_one_event_per_chunk_with_deterministic_ids(app, fenv):
    request = {"start": "2024-01-01", "stop": "2024-04-01", "chunk": "month", "reason": "reprocess Q1"}

    response = post(app, request)

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


@pytest.mark.stack
def test_the_same_request_twice_has_the_same_ids_and_rerun_changes_them(app, fenv):
    request = {"start": "2024-01-01", "stop": "2024-04-01", "chunk": "month"}

    first = json_of(post(app, request))
    again = json_of(post(app, request))
    rerun = json_of(post(app, {**request, "rerun": True}))

    assert again == first
    assert rerun["chunks"] == first["chunks"]
    assert rerun["request_id"] != first["request_id"]
    assert set(rerun["event_ids"]).isdisjoint(first["event_ids"])
    events = settle(fenv.api_url, fenv.resource_id, REQUESTED)
    assert sorted(e["id"] for e in events) == sorted(first["event_ids"] + rerun["event_ids"])  # 6, not 9


@pytest.mark.stack
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
    response = post(app, payload)

    assert response.status_code == 400
    answer = json_of(response)
    assert answer["error"] == "invalid backfill request"
    assert field in {p["field"] for p in answer["problems"]}
    assert settle(fenv.api_url, fenv.resource_id, REQUESTED) == []


@pytest.mark.stack
def test_non_json_is_400(app, fenv):
    response = post(app, None, raw=b"<backfill start='2024-01-01'/>")
    assert response.status_code == 400
    assert json_of(response)["problems"][0]["field"] == "body"


@pytest.mark.stack
def test_max_days_comes_from_settings(app, fenv, monkeypatch):
    monkeypatch.setenv("TOLLWATCH_BACKFILL_MAX_DAYS", "31")
    too_long = post(app, {"start": "2024-01-01", "stop": "2024-03-01"})
    fits = post(app, {"start": "2024-01-01", "stop": "2024-02-01"})
    assert too_long.status_code == 400
    assert "maximum of 31" in json_of(too_long)["problems"][0]["reason"]
    assert fits.status_code == 202


@pytest.mark.stack
def test_prefect_down_is_503_and_the_retry_succeeds_with_the_same_ids(app, fenv, monkeypatch):
    request = {"start": "2024-01-01", "stop": "2024-01-08", "chunk": "day"}
    with monkeypatch.context() as down:
        down.setenv("PREFECT_API_URL", f"http://127.0.0.1:{closed_port()}/api")
        failed = post(app, request)
    assert failed.status_code == 503
    assert "retrying the same request is safe" in json_of(failed)["error"]

    retried = post(app, request)

    assert retried.status_code == 202
    events = settle(fenv.api_url, fenv.resource_id, REQUESTED)
    assert sorted(e["id"] for e in events) == sorted(json_of(retried)["event_ids"])
    assert len(events) == 7


@pytest.mark.stack
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
