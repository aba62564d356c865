"""The Socrata mirror behaves like the parts of SODA 2.x tollwatch relies on, deterministically.

Every test starts its own mirror on port 0 (fresh state, no port clashes) and talks to it over real HTTP,
because the point of the mirror is to exercise the client's transport: paging, headers, faults.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import date, timedelta
from pathlib import Path

import httpx
import pytest

from tollwatch.dev.mirror import DEFAULT_BASE_EPOCH, MirrorServer
from tollwatch.dev.synthetic import (
    BASE_COLUMNS,
    PLAZAS,
    ROWS_PER_DAY,
    SyntheticTable,
    hourly_counts,
    position,
    row_id,
)

DATASET = "qzve-kjga"
RESOURCE = f"/resource/{DATASET}.json"
VIEW = f"/api/views/{DATASET}.json"
START = date(2024, 1, 1)
THROUGH = date(2024, 1, 15)  # 14 days -> 7,392 rows: big enough to page, small enough to read whole
TOTAL = 14 * ROWS_PER_DAY
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def mirror() -> Iterator[MirrorServer]:
    with MirrorServer(DATASET, START, THROUGH, seed=42) as server:
        yield server


@pytest.fixture
def client(mirror: MirrorServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=mirror.url, timeout=30) as http:
        yield http


def rows(client: httpx.Client, **params: str | int) -> list[dict[str, str]]:
    """GET /resource with SODA params, asserting success."""
    # keyword `_where=` stands for `$where=` (a `$` cannot start a Python keyword)
    response = client.get(RESOURCE, params={("$" + k[1:] if k.startswith("_") else k): v for k, v in params.items()})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    return response.json()


def window(lo: date, hi: date) -> str:
    return f"date >= '{lo.isoformat()}T00:00:00' AND date < '{hi.isoformat()}T00:00:00'"


# ---------------------------------------------------------------------------------------------- metadata


def test_metadata_describes_the_dataset(client: httpx.Client) -> None:
    meta = client.get(VIEW).json()
    assert meta["id"] == DATASET
    assert meta["rowsUpdatedAt"] == DEFAULT_BASE_EPOCH
    assert meta["viewLastModified"] >= meta["rowsUpdatedAt"]
    assert [c["fieldName"] for c in meta["columns"]] == list(BASE_COLUMNS)
    assert all(c["dataTypeName"] for c in meta["columns"])


def test_unknown_view_and_path_are_404_json(client: httpx.Client) -> None:
    missing = client.get("/api/views/abcd-1234.json")
    assert missing.status_code == 404
    assert missing.json()["error"] is True
    assert "abcd-1234" in missing.json()["message"]
    assert client.get("/nothing/here").status_code == 404
    assert client.get("/resource/abcd-1234.json").status_code == 404


# ---------------------------------------------------------------------------------------------- rows


def test_window_returns_every_row_of_those_days_once(client: httpx.Client) -> None:
    got = rows(client, _where=window(date(2024, 1, 3), date(2024, 1, 10)), _limit=50_000)
    assert len(got) == 7 * ROWS_PER_DAY
    keys = {(r["date"], r["plaza_id"], r["hour"], r["direction"]) for r in got}
    assert len(keys) == len(got)
    assert {r["date"][:10] for r in got} == {(date(2024, 1, 3) + timedelta(d)).isoformat() for d in range(7)}
    assert {r["plaza_id"] for r in got} == {str(p.plaza_id) for p in PLAZAS}
    assert {r["hour"] for r in got} == {str(h) for h in range(24)}
    assert {r["direction"] for r in got} == {"I", "O"}
    for row in got:
        assert set(row) == set(BASE_COLUMNS)
        assert all(isinstance(v, str) for v in row.values())
        assert int(row["vehicles_e_zpass"]) >= 0
        assert int(row["vehicles_vtoll"]) >= 0
    assert got[0]["date"] == "2024-01-03T00:00:00.000"


@pytest.mark.parametrize(
    ("where", "expected_days"),
    [
        ("date >= '2024-01-14'", 1),
        ("date > '2024-01-13T00:00:00.000'", 1),
        ("date > '2024-01-12T12:00:00'", 2),
        ("date <= '2024-01-02T00:00:00'", 2),
        ("date < '2024-01-02T00:00:01'", 2),
        ("date >= '2023-01-01' and date < '2030-01-01'", 14),
        ("(date >= '2024-01-02') AND (date < '2024-01-04')", 2),
        ("date >= '2024-01-10' AND date < '2024-01-05'", 0),
    ],
)
def test_date_comparisons_map_to_whole_days(client: httpx.Client, where: str, expected_days: int) -> None:
    assert len(rows(client, _where=where, _limit=50_000)) == expected_days * ROWS_PER_DAY


def test_default_limit_is_1000_and_order_is_by_id(client: httpx.Client) -> None:
    got = rows(client, _select=":*, *")
    assert [r[":id"] for r in got] == [row_id(i) for i in range(1000)]


def test_paging_with_offset_covers_every_row_exactly_once(client: httpx.Client) -> None:
    seen: list[str] = []
    page_size = 997  # not a divisor of the total, so the last page is short
    while True:
        page = rows(client, _select=":*, *", _order=":id", _limit=page_size, _offset=len(seen))
        seen.extend(r[":id"] for r in page)
        if len(page) < page_size:
            break
    assert seen == [row_id(i) for i in range(TOTAL)]
    assert rows(client, _offset=TOTAL, _limit=10) == []


def test_system_fields_only_with_colon_star(client: httpx.Client) -> None:
    plain = rows(client, _limit=5)
    assert all(not key.startswith(":") for row in plain for key in row)
    full = rows(client, _select=":*, *", _limit=5)
    assert set(full[0]) == {":id", ":created_at", ":updated_at", *BASE_COLUMNS}
    assert full[0][":updated_at"] == "2026-01-01T00:00:00.000Z"
    assert full[0][":created_at"] == "2026-01-01T00:00:00.000Z"
    assert [{k: v for k, v in r.items() if not k.startswith(":")} for r in full] == plain
    system_only = rows(client, _select=":*", _limit=1)
    assert set(system_only[0]) == {":id", ":created_at", ":updated_at"}
    picked = rows(client, _select="date, :id", _limit=1)
    assert picked == [{"date": "2024-01-01T00:00:00.000", ":id": row_id(0)}]


def test_rows_are_deterministic_and_independent_of_history_start() -> None:
    early = SyntheticTable(date(2010, 1, 1), seed=42)
    late = SyntheticTable(date(2024, 1, 1), seed=42)
    day = date(2024, 3, 5)
    a = early.row(early.seq_of(day, 10, 8, "I"))
    b = late.row(late.seq_of(day, 10, 8, "I"))
    assert a == b
    assert a == SyntheticTable(date(2010, 1, 1), seed=42).row(early.seq_of(day, 10, 8, "I"))
    other_seed = SyntheticTable(date(2024, 1, 1), seed=7)
    assert list(other_seed.rows(0, ROWS_PER_DAY)) != list(late.rows(0, ROWS_PER_DAY))
    assert list(late.rows(100, 700)) == [late.row(seq) for seq in range(100, 700)]
    for seq in (0, 1, 47, 48, 527, 528, 3_085_631):
        pos = position(seq)
        assert late.seq_of(late.day(pos.day_index), pos.plaza_id, pos.hour, pos.direction) == seq


def test_counts_look_like_traffic() -> None:
    tuesday, saturday = date(2024, 3, 5), date(2024, 3, 9)

    def total(day: date, plaza: int, hour: int, direction: str) -> int:
        return sum(hourly_counts(42, day, plaza, hour, direction))

    def daily(day: date, plaza: int) -> int:
        return sum(total(day, plaza, h, d) for h in range(24) for d in "IO")

    for plaza in (1, 3, 11):
        assert total(tuesday, plaza, 8, "I") > 1.5 * total(tuesday, plaza, 8, "O")  # AM inbound rush
        assert total(tuesday, plaza, 17, "O") > 1.5 * total(tuesday, plaza, 17, "I")  # PM outbound rush
        assert total(tuesday, plaza, 3, "I") < 0.2 * total(tuesday, plaza, 8, "I")  # night trough
        assert daily(saturday, plaza) < daily(tuesday, plaza)
    assert daily(tuesday, 11) > 5 * daily(tuesday, 6)  # Verrazzano dwarfs Cross Bay
    counts = [
        hourly_counts(42, tuesday + timedelta(d), p, h, x)
        for d in range(7)
        for p in range(1, 12)
        for h in range(24)
        for x in "IO"
    ]
    ezpass, other = sum(c[0] for c in counts), sum(c[1] for c in counts)
    assert 0.90 <= ezpass / (ezpass + other) <= 0.95
    assert min(min(c) for c in counts) >= 0


# ---------------------------------------------------------------------------------------------- publishing


def test_publish_moves_watermark_and_updated_filter_returns_only_the_new_batch(
    mirror: MirrorServer, client: httpx.Client
) -> None:
    answer = client.post("/admin/publish", json={"days": 2, "now": DEFAULT_BASE_EPOCH + 3600}).json()
    assert answer["rowsUpdatedAt"] == DEFAULT_BASE_EPOCH + 3600
    assert (answer["start_seq"], answer["end_seq"]) == (TOTAL, TOTAL + 2 * ROWS_PER_DAY)
    assert answer["published_through"] == "2024-01-17"
    assert client.get(VIEW).json()["rowsUpdatedAt"] == DEFAULT_BASE_EPOCH + 3600

    new = rows(client, _select=":*, *", _where=":updated_at > '2026-01-01T00:00:00.000Z'", _limit=50_000)
    assert [r[":id"] for r in new] == [row_id(i) for i in range(TOTAL, TOTAL + 2 * ROWS_PER_DAY)]
    assert {r[":updated_at"] for r in new} == {"2026-01-01T01:00:00.000Z"}
    assert {r["date"][:10] for r in new} == {"2024-01-15", "2024-01-16"}

    # the same watermark written other ways, and the complementary query
    for literal in ("2026-01-01T00:00:00", "2026-01-01T00:00:00Z", "2026-01-01T00:59:59.999"):
        where = f":updated_at > '{literal}'"
        assert len(rows(client, _where=where, _limit=50_000)) == 2 * ROWS_PER_DAY
    old = rows(client, _where=":updated_at <= '2026-01-01T00:00:00.000Z'", _limit=50_000)
    assert len(old) == TOTAL
    assert rows(client, _where=":updated_at > '2026-01-01T01:00:00.000Z'") == []

    # a clock behind the last stamp still moves the watermark forward
    batch = mirror.dataset.publish(days=1, now=0)
    assert batch.updated_at == DEFAULT_BASE_EPOCH + 3601
    assert client.get(VIEW).json()["rowsUpdatedAt"] == batch.updated_at
    combined = f"{window(date(2024, 1, 16), date(2024, 2, 1))} AND :updated_at >= '2026-01-01T01:00:00Z'"
    assert len(rows(client, _where=combined, _limit=50_000)) == 2 * ROWS_PER_DAY


# ---------------------------------------------------------------------------------------------- faults


def test_corrupt_serves_raw_values_and_can_drop_fields(mirror: MirrorServer, client: httpx.Client) -> None:
    seq = mirror.dataset.seq_of("2024-01-02", 3, 7, "I")
    mirror.dataset.corrupt(seq, "date", "not-a-date")
    mirror.dataset.corrupt(seq + 1, "vehicles_e_zpass", None)
    reply = client.post(
        "/admin/faults",
        json={
            "corrupt": [
                {"seq": seq + 2, "field": "direction", "value": "X"},
                {"seq": seq + 3, "field": "vehicles_e_zpass", "value": "-5"},
            ]
        },
    )
    assert reply.status_code == 200
    assert reply.json()["corrupted_rows"] == [seq, seq + 1, seq + 2, seq + 3]
    got = rows(client, _select=":*, *", _offset=seq, _limit=5)
    assert got[0][":id"] == row_id(seq)
    assert got[0]["date"] == "not-a-date"
    assert "vehicles_e_zpass" not in got[1]
    assert got[2]["direction"] == "X"
    assert got[3]["vehicles_e_zpass"] == "-5"
    assert got[4] == rows(client, _select=":*, *", _offset=seq + 4, _limit=1)[0]
    assert got[4]["date"] == "2024-01-02T00:00:00.000"


def test_fail_next_answers_in_order_then_recovers(mirror: MirrorServer, client: httpx.Client) -> None:
    mirror.dataset.fail_next([{"status": 429, "retry_after": 3}, 503])
    client.post("/admin/faults", json={"fail_next": [{"truncate": True}, {"status": 202}]})
    params = {"$limit": "10"}

    throttled = client.get(RESOURCE, params=params)
    assert throttled.status_code == 429
    assert throttled.headers["Retry-After"] == "3"
    assert client.get(VIEW).status_code == 200  # metadata never consumes injected failures
    unavailable = client.get(RESOURCE, params=params)
    assert unavailable.status_code == 503
    assert "Retry-After" not in unavailable.headers
    truncated = client.get(RESOURCE, params=params)
    assert truncated.status_code == 200
    with pytest.raises(json.JSONDecodeError):
        json.loads(truncated.content)
    processing = client.get(RESOURCE, params=params)
    assert processing.status_code == 202
    assert "processing" in processing.json()["message"]
    assert len(rows(client, _limit=10)) == 10
    assert [r.status for r in mirror.dataset.requests] == [429, 200, 503, 200, 202, 200]


def test_fail_always_until_cleared(mirror: MirrorServer, client: httpx.Client) -> None:
    client.post("/admin/faults", json={"fail_always": {"status": 500, "body": "upstream exploded"}})
    for _ in range(3):
        failing = client.get(RESOURCE)
        assert failing.status_code == 500
        assert failing.text == "upstream exploded"
    client.post("/admin/faults", json={"fail_always": None})
    assert len(rows(client, _limit=3)) == 3
    mirror.dataset.fail_always(502)
    assert client.get(RESOURCE).status_code == 502
    mirror.dataset.clear_faults()
    assert client.get(RESOURCE).status_code == 200


# ---------------------------------------------------------------------------------------------- drift


def test_cash_until_serves_the_old_column_before_the_boundary() -> None:
    with (
        MirrorServer(DATASET, START, THROUGH, cash_until="2024-01-05") as mirror,
        httpx.Client(base_url=mirror.url) as client,
    ):
        before = rows(client, _where=window(date(2024, 1, 4), date(2024, 1, 5)), _limit=50_000)
        after = rows(client, _where=window(date(2024, 1, 5), date(2024, 1, 6)), _limit=50_000)
        assert all("vehicles_cash" in r and "vehicles_vtoll" not in r for r in before)
        assert all("vehicles_vtoll" in r and "vehicles_cash" not in r for r in after)
        fields = [c["fieldName"] for c in client.get(VIEW).json()["columns"]]
        assert "vehicles_cash" in fields
        assert "vehicles_vtoll" in fields
        # same counts, only the name drifted
        plain = SyntheticTable(START, seed=42).row(3 * ROWS_PER_DAY)
        assert before[0]["vehicles_cash"] == plain["vehicles_vtoll"]

        client.post("/admin/faults", json={"cash_until": None})
        assert "vehicles_cash" not in rows(client, _limit=1)[0]


def test_extra_columns_appear_on_every_row(mirror: MirrorServer, client: httpx.Client) -> None:
    meta_before = client.get(VIEW).json()
    mirror.dataset.extra_column("lane_group", lambda seq, row: f"{row['plaza_id']}-{seq % 3}")
    client.post("/admin/faults", json={"extra_columns": {"source_system": "v2"}})
    got = rows(client, _limit=4)
    assert [r["lane_group"] for r in got] == ["1-0", "1-1", "1-2", "1-0"]
    assert {r["source_system"] for r in got} == {"v2"}
    meta = client.get(VIEW).json()
    assert [c["fieldName"] for c in meta["columns"]][-2:] == ["lane_group", "source_system"]
    assert meta["viewLastModified"] > meta_before["viewLastModified"]
    client.post("/admin/faults", json={"extra_columns": {"source_system": None}})
    assert "source_system" not in rows(client, _limit=1)[0]


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "params",
    [
        {"$where": "date >= '2024-01-01' OR date < '2024-02-01'"},
        {"$where": "plaza_id = '1'"},
        {"$where": "date >= 2024-01-01"},
        {"$where": "date >= 'not-a-date'"},
        {"$where": "(date >= '2024-01-01'"},
        {"$limit": "50001"},
        {"$limit": "abc"},
        {"$offset": "-1"},
        {"$order": "date"},
        {"$order": ":id DESC"},
        {"$select": "nope"},
        {"$group": "plaza_id"},
        {"plaza_id": "1"},
    ],
)
def test_unsupported_or_invalid_queries_are_400(client: httpx.Client, params: dict[str, str]) -> None:
    response = client.get(RESOURCE, params=params)
    assert response.status_code == 400
    body = response.json()
    assert body["error"] is True
    assert body["message"]


def test_limit_at_maximum_is_allowed(client: httpx.Client) -> None:
    assert len(rows(client, _limit=50_000, _order=":id ASC")) == TOTAL  # fewer rows than the limit exist


# ---------------------------------------------------------------------------------------------- admin


def test_request_log_records_paging_params_and_app_token(mirror: MirrorServer, client: httpx.Client) -> None:
    client.get(RESOURCE, params={"$limit": "5", "$offset": "10"}, headers={"X-App-Token": "tok-123"})
    client.get(VIEW)
    logged = client.get("/admin/requests").json()["requests"]
    assert logged[0]["path"] == RESOURCE
    assert logged[0]["params"] == {"$limit": "5", "$offset": "10"}
    assert logged[0]["app_token"] == "tok-123"
    assert logged[0]["status"] == 200
    assert logged[1]["path"] == VIEW
    assert logged[1]["app_token"] is None
    assert len(logged) == 2  # admin calls are not logged
    client.post("/admin/requests/clear")
    assert mirror.dataset.requests == []


def test_reset_restores_the_construction_state(mirror: MirrorServer, client: httpx.Client) -> None:
    mirror.dataset.publish(days=7, now=DEFAULT_BASE_EPOCH + 10)
    mirror.dataset.corrupt(0, "date", "bad")
    mirror.dataset.fail_next([500, 500])
    mirror.dataset.extra_column("x", "1")
    state = client.post("/admin/reset").json()
    assert state["rows"] == TOTAL
    assert state["rowsUpdatedAt"] == DEFAULT_BASE_EPOCH
    assert state["pending_failures"] == []
    assert state["corrupted_rows"] == []
    assert state["extra_columns"] == []
    assert rows(client, _limit=1)[0]["date"] == "2024-01-01T00:00:00.000"
    assert mirror.dataset.requests[-1].status == 200


def test_admin_rejects_malformed_documents(client: httpx.Client) -> None:
    assert client.post("/admin/faults", json={"fail_nxt": []}).status_code == 400
    assert client.post("/admin/faults", json={"fail_next": [{"status": 99}]}).status_code == 400
    assert client.post("/admin/publish", json={"days": 0}).status_code == 400
    assert client.post("/admin/publish", content=b"{not json").status_code == 400


def test_concurrent_requests_are_served_consistently(client: httpx.Client) -> None:
    def page(offset: int) -> list[dict[str, str]]:
        return rows(client, _select=":*, *", _limit=500, _offset=offset)

    with ThreadPoolExecutor(max_workers=6) as pool:
        pages = list(pool.map(page, range(0, 6000, 500)))
    assert [r[":id"] for p in pages for r in p] == [row_id(i) for i in range(6000)]


# ---------------------------------------------------------------------------------------------- scale


def test_full_history_serves_a_high_offset_page_without_materialising() -> None:
    """2010..2026 is ~3.1 M rows; the last page must be exactly the last rows of 2025-12-31."""
    with (
        MirrorServer(DATASET, "2010-01-01", "2026-01-01") as mirror,
        httpx.Client(base_url=mirror.url, timeout=60) as client,
    ):
        total = (date(2026, 1, 1) - date(2010, 1, 1)).days * ROWS_PER_DAY
        assert total == mirror.dataset.total_rows == 3_085_632
        last = rows(client, _select=":*, *", _order=":id", _limit=50_000, _offset=total - 50_000)
        assert len(last) == 50_000
        assert last[-1][":id"] == row_id(total - 1)
        assert (last[-1]["date"], last[-1]["plaza_id"], last[-1]["hour"], last[-1]["direction"]) == (
            "2025-12-31T00:00:00.000",
            "11",
            "23",
            "O",
        )
        assert [r[":id"] for r in last[:2]] == [row_id(total - 50_000), row_id(total - 49_999)]
        final_day = rows(client, _where="date >= '2025-12-31T00:00:00'", _limit=50_000)
        assert len(final_day) == ROWS_PER_DAY
        assert final_day == [{k: v for k, v in r.items() if not k.startswith(":")} for r in last[-528:]]
        assert rows(client, _offset=total) == []


# ---------------------------------------------------------------------------------------------- process


def test_module_entry_point_prints_url_and_stops_on_sigterm() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    argv = [
        sys.executable,
        "-m",
        "tollwatch.dev.mirror",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--dataset",
        DATASET,
        "--start",
        "2024-01-01",
        "--through",
        "2024-02-01",
        "--seed",
        "42",
    ]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO, env=env, text=True)
    try:
        line = _read_line(proc, timeout_s=30)
        assert line.startswith("MIRROR_URL=http://127.0.0.1:")
        url = line.removeprefix("MIRROR_URL=")
        meta = httpx.get(f"{url}{VIEW}", timeout=10).json()
        assert meta["id"] == DATASET
        assert len(httpx.get(f"{url}{RESOURCE}", params={"$limit": "3"}, timeout=10).json()) == 3
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        assert proc.stdout is not None
        assert proc.stdout.read() == ""  # exactly one line on stdout
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _read_line(proc: subprocess.Popen[str], timeout_s: float) -> str:
    """First stdout line of a child, failing (not hanging) if it never comes."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout_s
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if selector.select(timeout=0.2):
                return proc.stdout.readline().strip()
            if proc.poll() is not None:
                stderr = proc.stderr.read() if proc.stderr else ""
                pytest.fail(f"mirror exited early with {proc.returncode}: {stderr}")
    pytest.fail("mirror did not print MIRROR_URL in time")
