"""Backfill requests (tollwatch/core/backfill.py): which requests are refused and why (field by field), how a window
is cut into runs (calendar chunks, or `auto` chunks sized by the upstream's rows per day), and the events a plan
emits, whose ids depend only on what was asked.

The upstream's counts come from an in-memory `UpstreamCounts`. The same requests through the Function app and the
CLI, on the real stack and the mirror: tests/integration/test_fn_backfill.py and test_backfill_auto.py.
"""

from __future__ import annotations

import itertools
from datetime import date, timedelta

import pytest

from tests.support.fakes import DATASET, DOMAIN, CountsUpstream
from tollwatch.adapters.socrata import UpstreamError, window_where
from tollwatch.contract.events import BackfillRequested, EventName, Window
from tollwatch.core.backfill import (
    BackfillLimits,
    BackfillRejected,
    Chunk,
    SizedChunk,
    UpstreamCountsUnavailable,
    auto_chunks,
    chunks,
    parse_backfill,
    plan_backfill,
    read_upstream_counts,
    upstream_counts_by_day,
    validate_backfill,
)

# ---------------------------------------------------------------------------------------------- calendar chunks


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


# ---------------------------------------------------------------------------------------------- validation

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


def test_auto_requests_pass_validation_and_calendar_sizes_still_plan_calendar_chunks():
    limits = BackfillLimits(today=date(2025, 6, 15), max_days=400, max_chunks=3)
    auto = validate_backfill({"start": "2024-01-01", "stop": "2024-12-01", "chunk": "auto"}, limits)
    month = validate_backfill({"start": "2024-01-01", "stop": "2024-03-15", "chunk": "month"}, limits)

    with pytest.raises(ValueError, match="counts"):
        plan_backfill(auto, domain="d", dataset_id="qzve-kjga", requested_by="test")
    plan = plan_backfill(month, domain="d", dataset_id="qzve-kjga", requested_by="test")
    assert plan.chunks == chunks(date(2024, 1, 1), date(2024, 3, 15), Chunk.MONTH)
    assert plan.rows is None


# ---------------------------------------------------------------------------------------------- plans and their events


def month_request(**values: object):
    return validate_backfill({"start": "2024-01-01", "stop": "2024-04-01", "chunk": "month", **values}, LIMITS)


def test_a_plan_is_one_backfill_event_per_chunk_carrying_the_request():
    plan = plan_backfill(month_request(reason="reprocess Q1"), domain=DOMAIN, dataset_id=DATASET, requested_by="http")

    assert [e.event for e in plan.events] == [EventName.BACKFILL_REQUESTED] * 3
    assert [(e.payload["start"], e.payload["stop"]) for e in plan.events] == [
        ("2024-01-01", "2024-02-01"),
        ("2024-02-01", "2024-03-01"),
        ("2024-03-01", "2024-04-01"),
    ]
    assert {(e.payload["request_id"], e.payload["requested_by"], e.payload["reason"]) for e in plan.events} == {
        (plan.request_id, "http", "reprocess Q1")
    }
    assert plan.summary() == {
        "request_id": plan.request_id,
        "event_ids": [str(e.id) for e in plan.events],
        "chunks": [{"start": c["start"], "stop": c["stop"]} for c in (e.payload for e in plan.events)],
    }


def test_the_same_request_plans_the_same_event_ids_and_a_rerun_plans_new_ones():
    """A client retrying the same POST must not start the runs twice (Prefect drops the duplicate ids)."""

    def plan(**values: object):
        return plan_backfill(month_request(**values), domain=DOMAIN, dataset_id=DATASET, requested_by="cli")

    first, again, rerun = plan(), plan(), plan(rerun=True)

    assert again.summary() == first.summary()
    assert rerun.chunks == first.chunks
    assert rerun.request_id != first.request_id
    assert set(map(str, (e.id for e in rerun.events))).isdisjoint(str(e.id) for e in first.events)
    expected = BackfillRequested(
        domain=DOMAIN, dataset_id=DATASET, start=date(2024, 1, 1), stop=date(2024, 2, 1), request_id=first.request_id
    )
    assert first.events[0].id == expected.event_id()  # an id depends on the chunk and the request only
    assert plan(reason="other").request_id != first.request_id  # ... and the request is what was asked


# ---------------------------------------------------------------------------------------------- auto chunks


def daily(start: date, stop: date, rows: int) -> dict[date, int]:
    return {start + timedelta(days=i): rows for i in range((stop - start).days)}


def test_auto_chunks_pack_whole_months_in_order_up_to_the_target():
    counts = daily(date(2024, 1, 1), date(2025, 1, 1), 100)  # ~3,000 rows a month

    sized = auto_chunks(date(2024, 1, 1), date(2025, 1, 1), counts, target_rows=10_000)

    assert [c.window for c in sized] == [
        Window(start=date(2024, 1, 1), stop=date(2024, 4, 1)),  # 9,100 rows; April would make 12,100
        Window(start=date(2024, 4, 1), stop=date(2024, 7, 1)),
        Window(start=date(2024, 7, 1), stop=date(2024, 10, 1)),
        Window(start=date(2024, 10, 1), stop=date(2025, 1, 1)),
    ]
    assert [c.rows for c in sized] == [9_100, 9_100, 9_200, 9_200]


def test_a_month_above_the_target_is_a_chunk_of_its_own_and_only_the_window_may_cut_a_month():
    counts = daily(date(2024, 1, 15), date(2024, 4, 10), 10) | {date(2024, 2, 10): 50_000}

    sized = auto_chunks(date(2024, 1, 15), date(2024, 4, 10), counts, target_rows=1_000)

    assert [c.window for c in sized] == [
        Window(start=date(2024, 1, 15), stop=date(2024, 2, 1)),
        Window(start=date(2024, 2, 1), stop=date(2024, 3, 1)),
        Window(start=date(2024, 3, 1), stop=date(2024, 4, 10)),
    ]
    assert sized[1].rows == 50_000 + 28 * 10
    for before, after in itertools.pairwise(sized):
        assert before.window.stop == after.window.start  # no gap, no overlap


def test_days_the_upstream_does_not_have_are_covered_like_any_other():
    """Loading an empty range is how rows deleted upstream leave the table."""
    counts = daily(date(2024, 1, 1), date(2024, 2, 1), 100) | daily(date(2024, 6, 1), date(2024, 7, 1), 100)

    sized = auto_chunks(date(2024, 1, 1), date(2024, 7, 1), counts, target_rows=1_000_000)

    assert sized == [SizedChunk(window=Window(start=date(2024, 1, 1), stop=date(2024, 7, 1)), rows=6_100)]
    assert auto_chunks(date(2024, 3, 5), date(2024, 3, 9), {}, 10) == [
        SizedChunk(window=Window(start=date(2024, 3, 5), stop=date(2024, 3, 9)), rows=0)
    ]


def test_a_target_below_one_row_is_refused():
    with pytest.raises(ValueError, match="target_rows must be at least 1"):
        auto_chunks(date(2024, 1, 1), date(2024, 2, 1), {}, 0)


def test_an_auto_plan_records_the_rows_each_chunk_is_expected_to_load():
    request = validate_backfill({"start": "2024-01-01", "stop": "2024-03-01", "chunk": "auto"}, LIMITS)
    counts = daily(date(2024, 1, 1), date(2024, 3, 1), 528)

    plan = plan_backfill(
        request, domain=DOMAIN, dataset_id=DATASET, requested_by="cli", counts_by_day=counts, target_rows=20_000
    )

    assert plan.chunks == [
        Window(start=date(2024, 1, 1), stop=date(2024, 2, 1)),
        Window(start=date(2024, 2, 1), stop=date(2024, 3, 1)),
    ]
    assert plan.rows == [31 * 528, 29 * 528]
    assert plan.total_rows == 60 * 528
    assert plan.summary()["rows"] == plan.rows


# ---------------------------------------------------------------------------------------------- the upstream's counts


def test_the_upstream_is_counted_one_calendar_year_per_query():
    upstream = CountsUpstream(daily(date(2022, 12, 1), date(2025, 3, 1), 1))

    counts = upstream_counts_by_day(upstream, DATASET, Window(start=date(2023, 6, 15), stop=date(2025, 2, 1)))

    assert upstream.wheres == [
        window_where(date(2023, 6, 15), date(2024, 1, 1)),
        window_where(date(2024, 1, 1), date(2025, 1, 1)),
        window_where(date(2025, 1, 1), date(2025, 2, 1)),
    ]
    assert min(counts) == date(2023, 6, 15)
    assert max(counts) == date(2025, 1, 31)
    assert sum(counts.values()) == (date(2025, 2, 1) - date(2023, 6, 15)).days


def test_days_counted_zero_are_absent():
    upstream = CountsUpstream({date(2024, 1, 1): 5, date(2024, 1, 2): 0})

    assert upstream_counts_by_day(upstream, DATASET, Window(start=date(2024, 1, 1), stop=date(2024, 2, 1))) == {
        date(2024, 1, 1): 5
    }


def test_counts_that_cannot_be_read_are_one_sentence_and_no_plan():
    upstream = CountsUpstream({})
    upstream.fail_next(UpstreamError("GET /resource/qzve-kjga.json failed (gave up after 2 attempts)"))

    with pytest.raises(UpstreamCountsUnavailable) as unavailable:
        read_upstream_counts(upstream, DATASET, Window(start=date(2024, 1, 1), stop=date(2024, 2, 1)))

    assert str(unavailable.value) == (
        "the upstream's row counts could not be read (GET /resource/qzve-kjga.json failed (gave up after 2 attempts))"
    )
    assert unavailable.value.status == 503
