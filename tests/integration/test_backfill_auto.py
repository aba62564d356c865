"""`auto` backfill chunking: whole months sized by the upstream's row counts, on the real mirror and Prefect server."""

from __future__ import annotations

import itertools
import re
import uuid
from collections.abc import Iterator
from datetime import date

import pytest
from typer.testing import CliRunner

from tests.support.funcapp import closed_port, function, http_request, json_of, settle
from tollwatch.adapters.socrata import SocrataClient, build_http_client
from tollwatch.cli.main import app as cli_app
from tollwatch.contract.events import EventName, Window
from tollwatch.contract.settings import Settings
from tollwatch.core.backfill import (
    BackfillLimits,
    Chunk,
    SizedChunk,
    auto_chunks,
    chunks,
    plan_backfill,
    upstream_counts_by_day,
    validate_backfill,
)
from tollwatch_dev.mirror import MirrorServer

REQUESTED = EventName.BACKFILL_REQUESTED
DEFAULT_TARGET = Settings.model_fields["backfill_target_rows"].default
HISTORY = Window(start=date(2010, 1, 1), stop=date(2026, 1, 1))


def counts_of(mirror: MirrorServer, window: Window) -> dict[date, int]:
    with build_http_client(mirror.url, 60) as http:
        return upstream_counts_by_day(SocrataClient(http), mirror.dataset.dataset_id, window)


def month_rows(counts: dict[date, int], window: Window) -> list[int]:
    return [
        sum(n for d, n in counts.items() if m.start <= d < m.stop)
        for m in chunks(window.start, window.stop, Chunk.MONTH)
    ]


def assert_well_formed(sized: list[SizedChunk], window: Window, counts: dict[date, int], target: int) -> None:
    """Cover the window exactly, contiguous, cut only at month starts, at or under target unless one month."""
    assert sized[0].window.start == window.start
    assert sized[-1].window.stop == window.stop
    for before, after in itertools.pairwise(sized):
        assert before.window.stop == after.window.start  # no gap, no overlap
        assert after.window.start.day == 1  # only the window itself starts or ends mid-month
    for chunk in sized:
        assert chunk.rows == sum(n for d, n in counts.items() if chunk.window.start <= d < chunk.window.stop)
        months = chunks(chunk.window.start, chunk.window.stop, Chunk.MONTH)
        assert chunk.rows <= target or len(months) == 1, chunk
    assert sum(c.rows for c in sized) == sum(n for d, n in counts.items() if window.start <= d < window.stop)


@pytest.fixture(scope="module")
def history() -> Iterator[MirrorServer]:
    """16 years of the dataset on the mirror (3.1M rows; only counts are read)."""
    with MirrorServer("qzve-kjga", HISTORY.start, HISTORY.stop) as server:
        yield server


# ---------------------------------------------------------------------------------------------- the chunker


def test_sixteen_years_at_the_default_target_are_four_runs_instead_of_192(history):
    counts = counts_of(history, HISTORY)

    sized = auto_chunks(HISTORY.start, HISTORY.stop, counts, DEFAULT_TARGET)

    assert DEFAULT_TARGET == 1_000_000
    assert sum(counts.values()) == 3_085_632
    assert_well_formed(sized, HISTORY, counts, DEFAULT_TARGET)
    assert len(sized) == 4
    assert len(chunks(HISTORY.start, HISTORY.stop, Chunk.MONTH)) == 192
    # packed in order: each chunk but the last is full enough that the next month would not have fitted
    months = dict(zip(chunks(HISTORY.start, HISTORY.stop, Chunk.MONTH), month_rows(counts, HISTORY), strict=True))
    for chunk in sized[:-1]:
        following = next(m for m in months if m.start == chunk.window.stop)
        assert chunk.rows + months[following] > DEFAULT_TARGET


@pytest.mark.parametrize("target", [200_000, 40_000, 16_000, 1])
def test_any_target_gives_month_aligned_chunks_that_cover_the_window(history, target):
    window = Window(start=date(2013, 3, 17), stop=date(2016, 8, 9))  # starts and ends mid-month
    counts = counts_of(history, window)

    sized = auto_chunks(window.start, window.stop, counts, target)

    assert_well_formed(sized, window, counts, target)
    if target == 1:  # every month is above the target: one chunk per month, calendar months exactly
        assert [c.window for c in sized] == chunks(window.start, window.stop, Chunk.MONTH)


def test_the_same_counts_give_the_same_chunks_and_event_ids(history):
    request = validate_backfill(
        {"start": "2016-01-01", "stop": "2024-01-01", "chunk": "auto"}, BackfillLimits(today=date(2026, 1, 1))
    )

    def plan():
        return plan_backfill(
            request,
            domain="data.ny.gov",
            dataset_id="qzve-kjga",
            requested_by="test",
            counts_by_day=counts_of(history, request.window),  # read again each time
            target_rows=DEFAULT_TARGET,
        )

    first, again = plan(), plan()

    assert [str(e.id) for e in again.events] == [str(e.id) for e in first.events]
    assert again.chunks == first.chunks
    assert again.rows == first.rows
    assert len(first.chunks) == 2  # 8 years, ~1.54M rows
    assert first.request_id == request.request_id("data.ny.gov", "qzve-kjga")


def test_a_window_inside_one_month_is_one_chunk(history):
    window = Window(start=date(2019, 7, 4), stop=date(2019, 7, 20))
    counts = counts_of(history, window)

    assert auto_chunks(window.start, window.stop, counts, DEFAULT_TARGET) == [
        SizedChunk(window=window, rows=sum(counts.values()))
    ]
    assert auto_chunks(window.start, window.stop, counts, 1)[0].window == window  # even above the target


def test_days_deleted_upstream_are_still_covered():
    with MirrorServer("qzve-kjga", "2023-01-01", "2025-01-01") as mirror:
        mirror.dataset.delete_days("2023-05-10", "2023-09-01")
        whole = Window(start=date(2023, 1, 1), stop=date(2025, 1, 1))
        inside = Window(start=date(2023, 6, 1), stop=date(2023, 8, 15))  # nothing left upstream
        counts, counts_inside = counts_of(mirror, whole), counts_of(mirror, inside)

    assert not any(date(2023, 5, 10) <= d < date(2023, 9, 1) for d in counts)
    sized = auto_chunks(whole.start, whole.stop, counts, 100_000)
    assert_well_formed(sized, whole, counts, 100_000)
    assert any(c.window.start <= date(2023, 6, 1) and date(2023, 9, 1) <= c.window.stop for c in sized)
    assert counts_inside == {}
    assert auto_chunks(inside.start, inside.stop, counts_inside, 100_000) == [SizedChunk(window=inside, rows=0)]


# ---------------------------------------------------------------------------------------------- CLI and route


@pytest.fixture
def dataset(env, monkeypatch) -> str:
    """A domain of this test's own (so its events have their own resource id); returns that resource id."""
    domain = f"t{uuid.uuid4().hex[:12]}.test"
    monkeypatch.setenv("TOLLWATCH_UPSTREAM_DOMAIN", domain)
    monkeypatch.setenv("TOLLWATCH_EMIT_MAX_ATTEMPTS", "2")
    monkeypatch.setenv("TOLLWATCH_EMIT_BACKOFF_MAX_S", "0.05")
    return f"socrata.{domain}.qzve-kjga"


def backfill(*args: str):
    return CliRunner().invoke(cli_app, ["backfill", *args, "--no-local-stack"])


@pytest.mark.stack
def test_cli_prints_the_auto_plan_before_emitting_and_the_same_command_again_adds_nothing(
    env, dataset, mirror, monkeypatch
):
    monkeypatch.setenv("TOLLWATCH_BACKFILL_TARGET_ROWS", "33000")  # January + February 2024 fit, March does not
    args = ("--start", "2024-01-01", "--stop", "2024-04-01")
    counts = counts_of(mirror, Window(start=date(2024, 1, 1), stop=date(2024, 4, 1)))
    with monkeypatch.context() as down:  # Prefect unreachable: the plan is printed all the same, nothing emitted
        down.setenv("PREFECT_API_URL", f"http://127.0.0.1:{closed_port()}/api")
        down.setenv("TOLLWATCH_PREFECT_API_URL", f"http://127.0.0.1:{closed_port()}/api")
        unsent = backfill(*args)

    first = backfill(*args)
    again = backfill(*args)

    assert unsent.exit_code == 1
    for result in (unsent, first):
        assert "plan [2024-01-01, 2024-04-01): 2 auto chunk(s)" in result.output
        assert f"{sum(counts.values()):,} upstream rows (target 33,000 rows per run" in result.output
        assert "[2024-01-01, 2024-03-01)" in result.output
        assert "[2024-03-01, 2024-04-01)" in result.output
    assert first.exit_code == 0, first.output
    assert first.output.index("plan [") < first.output.index("chunk event(s) emitted")
    assert again.exit_code == 0, again.output
    events = settle(env["PREFECT_API_URL"], dataset, REQUESTED)
    assert sorted((e["payload"]["start"], e["payload"]["stop"]) for e in events) == [
        ("2024-01-01", "2024-03-01"),
        ("2024-03-01", "2024-04-01"),
    ]  # two events, each stored once, though the command ran twice
    ids = set(re.findall(r"event ([0-9a-f-]{36})", first.output))
    assert ids == set(re.findall(r"event ([0-9a-f-]{36})", again.output)) == {e["id"] for e in events}


@pytest.mark.stack
def test_cli_chunk_month_still_gives_calendar_months(env, dataset):
    result = backfill("--start", "2024-01-15", "--stop", "2024-04-01", "--chunk", "month")

    assert result.exit_code == 0, result.output
    assert "plan [" not in result.output
    assert "3 month chunk event(s) emitted" in result.output
    events = settle(env["PREFECT_API_URL"], dataset, REQUESTED)
    assert sorted((e["payload"]["start"], e["payload"]["stop"]) for e in events) == [
        ("2024-01-15", "2024-02-01"),
        ("2024-02-01", "2024-03-01"),
        ("2024-03-01", "2024-04-01"),
    ]


@pytest.mark.stack
def test_cli_auto_with_the_upstream_unreachable_is_one_sentence_and_emits_nothing(env, dataset, monkeypatch):
    monkeypatch.setenv("TOLLWATCH_UPSTREAM_BASE_URL", f"http://127.0.0.1:{closed_port()}")

    result = backfill("--start", "2024-01-01", "--stop", "2024-04-01")

    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: could not plan auto chunks: the upstream's row counts could not be read")
    assert "nothing was emitted" in lines[0]
    assert "--chunk month" in lines[0]
    assert "Traceback" not in result.output
    assert settle(env["PREFECT_API_URL"], dataset, REQUESTED) == []


@pytest.mark.stack
def test_route_defaults_to_auto_and_answers_the_plan_with_rows_per_chunk(env, dataset, mirror, monkeypatch):
    from tollwatch_dev.funchost import load_function_app

    monkeypatch.setenv("TOLLWATCH_BACKFILL_TARGET_ROWS", "33000")  # January + February 2024 fit, March does not
    route = function(load_function_app(), "request_backfill")
    counts = counts_of(mirror, Window(start=date(2024, 1, 1), stop=date(2024, 4, 1)))

    default = route(http_request("POST", "backfill", b'{"start": "2024-01-01", "stop": "2024-04-01"}'))
    month = route(http_request("POST", "backfill", b'{"start": "2024-01-01", "stop": "2024-03-01", "chunk": "month"}'))

    assert default.status_code == 202
    answer = json_of(default)
    assert answer["chunks"] == [
        {"start": "2024-01-01", "stop": "2024-03-01"},
        {"start": "2024-03-01", "stop": "2024-04-01"},
    ]
    assert answer["rows"] == [
        sum(n for d, n in counts.items() if d < date(2024, 3, 1)),
        sum(n for d, n in counts.items() if d >= date(2024, 3, 1)),
    ]
    assert month.status_code == 202
    assert "rows" not in json_of(month)  # calendar chunks are not counted
    assert len(json_of(month)["chunks"]) == 2
    events = settle(env["PREFECT_API_URL"], dataset, REQUESTED)
    assert sorted(e["id"] for e in events) == sorted(answer["event_ids"] + json_of(month)["event_ids"])


@pytest.mark.stack
def test_route_with_the_upstream_unreachable_is_503_with_retry_after_and_emits_nothing(env, dataset, monkeypatch):
    from tollwatch_dev.funchost import load_function_app

    monkeypatch.setenv("TOLLWATCH_UPSTREAM_BASE_URL", f"http://127.0.0.1:{closed_port()}")
    route = function(load_function_app(), "request_backfill")

    refused = route(http_request("POST", "backfill", b'{"start": "2024-01-01", "stop": "2024-04-01"}'))

    assert refused.status_code == 503
    assert refused.headers["Retry-After"] == "30"
    error = json_of(refused)["error"]
    assert error.startswith("could not plan auto chunks: the upstream's row counts could not be read")
    assert "nothing was emitted" in error
    assert "calendar chunk" in error
    assert settle(env["PREFECT_API_URL"], dataset, REQUESTED) == []
