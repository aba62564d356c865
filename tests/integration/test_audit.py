"""`tollwatch audit` and `tollwatch status` on real components: the in-process Socrata mirror, the session's
Prefect server and Azurite, a pyiceberg warehouse of each test's own (tests/conftest.py `env`).

Data gets into the table only through the real ingest flow (`tollwatch.prefect.flows.ingest.ingest`, in-process); a day
goes
missing from the table through pyiceberg's own `delete`, and from the upstream through the mirror's
`delete_days`. Repair events are read back from the Prefect server, and loaded by running the flow with exactly
the parameters the ingest deployment's trigger takes from them (start, stop, request_id).
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest
from pyiceberg.expressions import EqualTo
from typer.testing import CliRunner, Result

from tests.support.prefect_events import read_events, wait_for_events
from tollwatch import resources
from tollwatch.contract.events import DatasetRefreshed, EventName, Window
from tollwatch.contract.settings import load_settings
from tollwatch.core.audit import reconcile
from tollwatch.prefect.flows.ingest import ingest
from tollwatch_dev.mirror import MirrorServer
from tollwatch_dev.synthetic import ROWS_PER_DAY

pytestmark = pytest.mark.stack

JAN = Window(start=date(2024, 1, 1), stop=date(2024, 2, 1))
DATASET = "qzve-kjga"


@pytest.fixture
def mirror() -> Iterator[MirrorServer]:
    """January 2024 only (31 days): every test loads all of it, so a smaller upstream is a faster test."""
    with MirrorServer(DATASET, JAN.start, JAN.stop) as server:
        yield server


def cli(*args: str) -> Result:
    from tollwatch.cli.main import app

    result = CliRunner().invoke(app, [*args, "--no-local-stack"])
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def audit(*args: str) -> Result:
    return cli("audit", *args)


def load(window: Window, request_id: str) -> Any:
    return ingest(start=window.start, stop=window.stop, request_id=request_id)


def delete_from_table(day: date) -> None:
    table = resources.table_store(load_settings()).table()
    assert table is not None
    table.delete(EqualTo("date", day.isoformat()))


def table_days() -> dict[date, int]:
    data = resources.table_store(load_settings()).read()
    counts: dict[date, int] = {}
    for day in data.column("date").to_pylist():
        counts[day] = counts.get(day, 0) + 1
    return counts


def group_requests(mirror: MirrorServer) -> list[dict[str, str]]:
    """The per-day count queries the mirror answered."""
    return [r.params for r in mirror.dataset.requests if r.params.get("$group") == "date"]


def repair_request_of(output: str) -> tuple[str, list[str]]:
    """The request id and event ids `audit --repair` printed."""
    request_id = re.search(r"^repair (\S+):", output, re.MULTILINE)
    assert request_id, output
    return request_id.group(1), re.findall(r"event ([0-9a-f-]{36})", output)


def repair_events_stored(api_url: str, request_id: str, count: int = 1) -> list[dict[str, Any]]:
    """The backfill events of one repair request the Prefect server holds (waits until `count` are there)."""
    wait_for_events(
        api_url, EventName.BACKFILL_REQUESTED, lambda e: e["payload"]["request_id"] == request_id, count=count
    )
    return [e for e in read_events(api_url, EventName.BACKFILL_REQUESTED) if e["payload"]["request_id"] == request_id]


def tomorrow() -> date:
    return datetime.now(UTC).date() + timedelta(days=1)


# ------------------------------------------------------------------------------------------------ audit


def test_an_audit_of_a_fully_loaded_table_reports_no_difference_and_exits_0(
    env: dict[str, str], mirror: MirrorServer
) -> None:
    """January loaded by the flow; the default window runs from the table's first day to tomorrow (the upstream
    has nothing after January, so the days after it are 0 on both sides and not listed). The upstream is asked
    one grouped count per calendar year of the window: a window across a new year is two queries."""
    load(JAN, "full")
    mirror.dataset.clear_requests()

    result = audit()

    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        f"audit [2024-01-01, {tomorrow()}): all {(tomorrow() - JAN.start).days:,} day(s) match; "
        f"upstream {31 * ROWS_PER_DAY:,} rows, table {31 * ROWS_PER_DAY:,} rows"
    ]
    years = [p["$where"] for p in group_requests(mirror)]
    assert len(years) == tomorrow().year - 2024 + 1
    assert "2024-01-01T00:00:00" in years[0]
    assert "2025-01-01T00:00:00" in years[0]

    mirror.dataset.clear_requests()
    across = audit("--start", "2023-12-15", "--stop", "2024-01-15")
    assert across.exit_code == 0, across.output
    assert f"upstream {14 * ROWS_PER_DAY:,} rows, table {14 * ROWS_PER_DAY:,} rows" in across.output
    assert len(group_requests(mirror)) == 2


def test_a_day_deleted_from_the_table_is_found_repaired_by_one_event_and_a_second_audit_is_clean(
    env: dict[str, str], mirror: MirrorServer
) -> None:
    """2024-01-09 deleted from the table (pyiceberg delete): the audit lists exactly that day with both counts and
    exits 1; `--repair` emits exactly one backfill event, for [01-09, 01-10), read back from Prefect; the flow run
    for that event's window makes the next audit clean."""
    load(JAN, "full")
    missing = date(2024, 1, 9)
    delete_from_table(missing)

    found = audit("--start", "2024-01-01", "--stop", "2024-02-01")

    assert found.exit_code == 1, found.output
    assert found.output.splitlines() == [
        "2024-01-09  upstream 528  table 0  (missing 528)",
        "audit [2024-01-01, 2024-02-01): 1 of 31 day(s) differ (528 row(s) missing from the table, 0 extra); "
        f"upstream {31 * ROWS_PER_DAY:,} rows, table {30 * ROWS_PER_DAY:,} rows",
    ]

    repaired = audit("--start", "2024-01-01", "--stop", "2024-02-01", "--repair")

    assert repaired.exit_code == 1, repaired.output  # the days still differ: their load is requested, not done
    request_id, printed = repair_request_of(repaired.output)
    assert f"repair {request_id}: 1 backfill event(s) emitted" in repaired.output
    assert "  [2024-01-09, 2024-01-10)  event " in repaired.output
    (event,) = repair_events_stored(env["PREFECT_API_URL"], request_id)
    assert [event["id"]] == printed
    payload = event["payload"]
    assert (payload["start"], payload["stop"]) == ("2024-01-09", "2024-01-10")
    assert payload["requested_by"].startswith("audit:cli:")
    assert (
        "1 day(s) of [2024-01-09, 2024-01-10) differ from the upstream (528 rows upstream, 0 in the table)"
        in (payload["reason"])
    )

    completed = ingest(
        start=date.fromisoformat(payload["start"]),
        stop=date.fromisoformat(payload["stop"]),
        request_id=payload["request_id"],
    )

    assert completed.rows_written == ROWS_PER_DAY
    clean = audit("--start", "2024-01-01", "--stop", "2024-02-01")
    assert clean.exit_code == 0, clean.output
    assert "all 31 day(s) match" in clean.output
    assert table_days() == dict.fromkeys((JAN.start + timedelta(days=i) for i in range(31)), ROWS_PER_DAY)


def test_repair_is_idempotent_for_the_same_state_and_requests_again_after_a_new_commit(
    env: dict[str, str], mirror: MirrorServer
) -> None:
    """`--repair` twice on an unchanged table: the second emits nothing and Prefect holds one event. After the
    repair's load committed, the day is deleted again: the next `--repair` is a new request (new ids), and its load
    is a real load, not a ledger replay of the first one."""
    load(JAN, "full")
    day = date(2024, 1, 20)
    delete_from_table(day)
    api = env["PREFECT_API_URL"]

    first = audit("--repair")
    request_id, (event_id,) = repair_request_of(first.output)
    (stored,) = repair_events_stored(api, request_id)  # the server persists events asynchronously
    again = audit("--repair")

    assert first.exit_code == again.exit_code == 1
    assert stored["id"] == event_id
    assert repair_request_of(again.output) == (request_id, [event_id])
    assert f"repair {request_id}: 0 backfill event(s) emitted, 1 requested before (not again)" in again.output
    assert f"event {event_id}  requested before; no run yet" in again.output
    assert [e["id"] for e in repair_events_stored(api, request_id)] == [event_id]

    ingest(start=day, stop=day + timedelta(days=1), request_id=request_id)
    assert audit().exit_code == 0
    delete_from_table(day)

    later = audit("--repair")

    assert later.exit_code == 1, later.output
    later_request, (later_event,) = repair_request_of(later.output)
    assert later_request != request_id
    assert later_event != event_id
    assert "1 backfill event(s) emitted" in later.output
    (event,) = repair_events_stored(api, later_request)
    assert (event["payload"]["start"], event["payload"]["stop"]) == ("2024-01-20", "2024-01-21")
    reloaded = ingest(start=day, stop=day + timedelta(days=1), request_id=later_request)
    assert not reloaded.already_committed
    assert reloaded.rows_written == ROWS_PER_DAY
    assert audit().exit_code == 0


def test_days_deleted_upstream_are_found_as_extra_rows_and_a_window_load_removes_them(
    env: dict[str, str], mirror: MirrorServer
) -> None:
    """Two days deleted upstream after they were loaded: the table holds more than the upstream (extra 528 each);
    the repair is one event for both (contiguous, one month), and its window load removes the rows."""
    load(JAN, "full")
    mirror.dataset.delete_days(date(2024, 1, 14), date(2024, 1, 16))

    found = audit("--start", "2024-01-01", "--stop", "2024-02-01", "--repair")

    assert found.exit_code == 1, found.output
    lines = found.output.splitlines()
    assert lines[:3] == [
        "2024-01-14  upstream 0  table 528  (extra 528)",
        "2024-01-15  upstream 0  table 528  (extra 528)",
        "audit [2024-01-01, 2024-02-01): 2 of 31 day(s) differ (0 row(s) missing from the table, 1,056 extra); "
        f"upstream {29 * ROWS_PER_DAY:,} rows, table {31 * ROWS_PER_DAY:,} rows",
    ]
    request_id, _ = repair_request_of(found.output)
    (event,) = repair_events_stored(env["PREFECT_API_URL"], request_id)
    assert (event["payload"]["start"], event["payload"]["stop"]) == ("2024-01-14", "2024-01-16")

    ingest(start=date(2024, 1, 14), stop=date(2024, 1, 16), request_id=request_id)

    assert audit("--start", "2024-01-01", "--stop", "2024-02-01").exit_code == 0
    days = table_days()
    assert date(2024, 1, 14) not in days
    assert date(2024, 1, 15) not in days
    assert sum(days.values()) == 29 * ROWS_PER_DAY


def test_reconcile_of_an_empty_table_lists_every_upstream_day_as_missing(
    env: dict[str, str], mirror: MirrorServer
) -> None:
    settings = load_settings()
    window = Window(start=date(2023, 12, 30), stop=date(2024, 1, 3))

    found = reconcile(resources.socrata_client(settings), resources.table_store(settings), DATASET, window)

    assert found.table_snapshot_id is None
    assert (found.upstream_rows, found.table_rows) == (2 * ROWS_PER_DAY, 0)
    assert [(d.day, d.upstream, d.table) for d in found.differing_days] == [
        (date(2024, 1, 1), ROWS_PER_DAY, 0),
        (date(2024, 1, 2), ROWS_PER_DAY, 0),
    ]


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (["--start", "2024-13-01"], "'2024-13-01' is not a date as YYYY-MM-DD"),
        (["--stop", "soon"], "'soon' is not a date as YYYY-MM-DD"),
        (["--start", "2024-02-01", "--stop", "2024-01-01"], "2024-01-01 is not after 2024-02-01"),
        (["--start", "2024-01-01", "--stop", "2024-01-01", "--repair"], "2024-01-01 is not after 2024-01-01"),
    ],
    ids=["bad-start", "bad-stop", "reversed", "empty"],
)
def test_a_bad_window_exits_2_with_a_sentence_and_asks_nothing(
    env: dict[str, str], mirror: MirrorServer, args: list[str], reason: str
) -> None:
    result = audit(*args)

    assert result.exit_code == 2, result.output
    assert reason in " ".join(result.output.replace("│", " ").split())
    assert group_requests(mirror) == []


def test_an_unreachable_upstream_exits_3_naming_it(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOLLWATCH_UPSTREAM_BASE_URL", f"http://127.0.0.1:{closed_port()}")

    result = audit("--start", "2024-01-01", "--stop", "2024-02-01")

    assert result.exit_code == 3, result.output
    assert "error: could not audit: failed to read the upstream (UpstreamError: GET /resource/" in result.output


# ------------------------------------------------------------------------------------------------ status


def test_status_shows_the_committed_announced_and_upstream_marks_says_it_is_behind_and_names_a_gap(
    env: dict[str, str], mirror: MirrorServer
) -> None:
    """A refresh committed January (the ledger's mark = its publish); the watcher announced that publish; then
    the upstream published a week more and two days went missing from the table. `status` shows all three marks
    (epoch and UTC), says the table is behind by the week's row versions and where the next refresh fetches from,
    and names the gap with the command that repairs it."""
    settings = load_settings()
    published = mirror.dataset.rows_updated_at
    ingest(rows_updated_at=published, previous_rows_updated_at=None)
    watermarks = resources.watermark_store(settings)
    refresh = DatasetRefreshed(domain=settings.upstream_domain, dataset_id=DATASET, rows_updated_at=published)
    assert watermarks.advance(refresh, str(refresh.event_id()), watermarks.read())
    newer = mirror.dataset.publish(7).updated_at
    delete_from_table(date(2024, 1, 9))
    delete_from_table(date(2024, 1, 10))

    result = cli("status")

    assert result.exit_code == 0, result.output
    at = f"{datetime.fromtimestamp(published, UTC):%Y-%m-%d %H:%M:%S}Z"
    newer_at = f"{datetime.fromtimestamp(newer, UTC):%Y-%m-%d %H:%M:%S}Z"
    lines = {line.split(":", 1)[0].strip(): line.split(":", 1)[1].strip() for line in result.output.splitlines()}
    assert lines["announced"] == f"rowsUpdatedAt {published} ({at})  the last publish the watcher announced (watermark)"
    assert lines["committed"] == (
        f"rowsUpdatedAt {published} ({at})  every row version through it is in the table (ledger)"
    )
    assert lines["upstream"] == f"rowsUpdatedAt {newer} ({newer_at})  ← not announced yet"
    assert lines["lag"].startswith(
        f"committed through {at}, upstream at {newer_at}: the table is behind by {7 * ROWS_PER_DAY:,} row versions"
    )
    assert lines["lag"].endswith(f"the next refresh will fetch from {at}")
    assert lines["table"].startswith(f"{settings.table} snapshot ")
    assert f", {29 * ROWS_PER_DAY:,} rows (" in lines["table"]
    assert lines["table"].endswith("; days 2024-01-01 … 2024-01-31")
    assert lines["gaps"] == (
        "2 day(s) without rows between 2024-01-01 and 2024-01-31, in 1 range(s): [2024-01-09, 2024-01-11) — "
        "compare with the upstream and request them again: tollwatch audit --repair"
    )


def test_status_of_a_complete_table_says_it_is_not_behind_and_has_no_gaps(
    env: dict[str, str], mirror: MirrorServer
) -> None:
    ingest(rows_updated_at=mirror.dataset.rows_updated_at, previous_rows_updated_at=None)

    result = cli("status")

    assert result.exit_code == 0, result.output
    assert "announced      : none yet (the watcher has not announced a publish)" in result.output
    assert "lag            : none: committed through the upstream publish (rowsUpdatedAt " in result.output
    assert "gaps           : none: every day from 2024-01-01 to 2024-01-31 holds rows" in result.output


def test_status_names_each_unreachable_source_and_still_answers(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    """Blob storage, the table's catalog, the upstream and Prefect all unreachable: one sentence each, exit 0."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    dead = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setenv("TOLLWATCH_UPSTREAM_BASE_URL", dead)
    monkeypatch.setenv("TOLLWATCH_UPSTREAM_MAX_ATTEMPTS", "1")
    monkeypatch.setenv(
        "TOLLWATCH_STORAGE_CONNECTION_STRING",
        f"DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey={'A' * 88};BlobEndpoint={dead}/x;",
    )
    monkeypatch.setenv("TOLLWATCH_STORAGE_RETRY_TOTAL", "0")
    monkeypatch.setenv(
        "TOLLWATCH_CATALOG_PROPERTIES",
        f'{{"type": "sql", "uri": "sqlite:///{tmp_path}/missing/dir/catalog.db", "warehouse": "{tmp_path.as_uri()}"}}',
    )
    monkeypatch.setenv("PREFECT_API_URL", f"{dead}/api")

    with temporary_settings(updates={PREFECT_API_URL: f"{dead}/api"}):
        result = cli("status")

    assert result.exit_code == 0, result.output
    assert "announced      : unknown: blob storage unreachable (" in result.output
    assert "committed      : unknown: the table is unreachable (" in result.output
    assert "upstream       : unknown: the upstream is unreachable (UpstreamError" in result.output
    assert f"prefect        : unreachable at {dead}/api (ConnectError: " in result.output
    assert "table          : unknown: the table is unreachable (" in result.output


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
