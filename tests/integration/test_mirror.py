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

from tollwatch.adapters.socrata import SocrataClient, build_http_client, updated_after_where, updated_between_where
from tollwatch_dev.mirror import DEFAULT_BASE_EPOCH, MirrorServer
from tollwatch_dev.synthetic import (
    BASE_COLUMNS,
    PLAZAS,
    ROWS_PER_DAY,
    SyntheticTable,
    hourly_counts,
    iso_utc,
    position,
    revised_ezpass,
    row_id,
)

DATASET = "qzve-kjga"
RESOURCE = f"/resource/{DATASET}.json"
VIEW = f"/api/views/{DATASET}.json"
START = date(2024, 1, 1)
THROUGH = date(2024, 1, 15)  # 14 days -> 7,392 rows: big enough to page, small enough to read whole
TOTAL = 14 * ROWS_PER_DAY
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def mirror() -> Iterator[MirrorServer]:
    with MirrorServer(DATASET, START, THROUGH, seed=42) as server:
        yield server


@pytest.fixture
def client(mirror: MirrorServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=mirror.url, timeout=30) as http:
        yield http


@pytest.fixture
def socrata(mirror: MirrorServer) -> Iterator[SocrataClient]:
    """tollwatch's own client on the mirror: what the count answers must satisfy in the end."""
    with build_http_client(mirror.url, 30) as http:
        yield SocrataClient(http, app_token="tok", max_attempts=3, backoff_max_s=0.05)


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


# ---------------------------------------------------------------------------------------------- revisions, deletions


class Oracle:
    """What the upstream should hold, kept independently of the mirror's version map: each live seq's
    current `:updated_at` (epoch s) and revision count. Small histories only (one dict entry per row)."""

    def __init__(self, start: date, through: date) -> None:
        self.start = start
        self.stamp = dict.fromkeys(range((through - start).days * ROWS_PER_DAY), DEFAULT_BASE_EPOCH)
        self.revisions = dict.fromkeys(self.stamp, 0)

    def seqs(self, lo: date, hi: date) -> range:
        return range((lo - self.start).days * ROWS_PER_DAY, (hi - self.start).days * ROWS_PER_DAY)

    def publish(self, start_seq: int, end_seq: int, stamp: int) -> None:
        for seq in range(start_seq, end_seq):
            self.stamp[seq], self.revisions[seq] = stamp, 0

    def revise(self, lo: date, hi: date, stamp: int) -> None:
        for seq in self.seqs(lo, hi):
            self.stamp[seq] = stamp
            self.revisions[seq] += 1

    def delete(self, lo: date, hi: date) -> None:
        for seq in self.seqs(lo, hi):
            self.stamp.pop(seq, None)

    def ids(
        self, *, after: int | None = None, through: int | None = None, days: tuple[date, date] | None = None
    ) -> list[str]:
        """`:id`s of live rows with after < stamp <= through and date in [days), in `:id` order."""
        window = self.seqs(*days) if days else None
        return [
            row_id(seq)
            for seq, stamp in sorted(self.stamp.items())
            if (after is None or stamp > after)
            and (through is None or stamp <= through)
            and (window is None or seq in window)
        ]


def paged_rows(client: httpx.Client, where: str | None, page_size: int) -> list[dict[str, str]]:
    """Every row a client paging by `$offset` sees (the way `SocrataClient.pages` pages)."""
    seen: list[dict[str, str]] = []
    while True:
        params: dict[str, str | int] = {"_select": ":*, *", "_order": ":id", "_limit": page_size, "_offset": len(seen)}
        if where:
            params["_where"] = where
        page = rows(client, **params)
        seen.extend(page)
        if len(page) < page_size:
            return seen


def paged_ids(client: httpx.Client, where: str | None, page_size: int) -> list[str]:
    """`:id`s of every row a client paging by `$offset` sees."""
    return [r[":id"] for r in paged_rows(client, where, page_size)]


def test_revision_changes_values_and_updated_at_but_not_id(mirror: MirrorServer, client: httpx.Client) -> None:
    window_where = window(date(2024, 1, 2), date(2024, 1, 6))
    before = rows(client, _select=":*, *", _where=window_where, _limit=50_000)
    watermark = client.get(VIEW).json()["rowsUpdatedAt"]

    answer = client.post("/admin/revise", json={"start": "2024-01-03", "stop": "2024-01-05", "now": watermark + 60})
    assert answer.status_code == 200, answer.text
    first = (date(2024, 1, 3) - START).days * ROWS_PER_DAY
    assert answer.json() == {
        "rowsUpdatedAt": watermark + 60,
        "revision": 1,
        "start": "2024-01-03",
        "stop": "2024-01-05",
        "days": 2,
        "rows": 2 * ROWS_PER_DAY,
        "start_seq": first,
        "end_seq": first + 2 * ROWS_PER_DAY,
        "updated_at": watermark + 60,
        "first_id": row_id(first),
        "last_id": row_id(first + 2 * ROWS_PER_DAY - 1),
    }
    assert client.get(VIEW).json()["rowsUpdatedAt"] == watermark + 60

    after = rows(client, _select=":*, *", _where=window_where, _limit=50_000)
    assert [r[":id"] for r in after] == [r[":id"] for r in before]
    revised = range(ROWS_PER_DAY, 3 * ROWS_PER_DAY)  # positions of Jan 3-4 inside the Jan 2-5 window
    for index, (old, new) in enumerate(zip(before, after, strict=True)):
        assert new[":created_at"] == old[":created_at"] == iso_utc(DEFAULT_BASE_EPOCH)
        unchanged = {k: v for k, v in new.items() if k not in (":updated_at", "vehicles_e_zpass")}
        assert unchanged == {k: v for k, v in old.items() if k not in (":updated_at", "vehicles_e_zpass")}
        if index in revised:
            assert new[":updated_at"] == iso_utc(watermark + 60)
            assert new["vehicles_e_zpass"] == str(revised_ezpass(int(old["vehicles_e_zpass"]), 1))
            assert new["vehicles_e_zpass"] != old["vehicles_e_zpass"]
        else:
            assert new == old

    # "what changed since the watermark" is exactly the revised rows
    changed = rows(client, _select=":*, *", _where=updated_after_where(watermark), _limit=50_000)
    assert [r[":id"] for r in changed] == [row_id(seq) for seq in range(first, first + 2 * ROWS_PER_DAY)]

    # a second revision of the same days is a third version, and moves the watermark again
    second = mirror.dataset.revise(date(2024, 1, 3), date(2024, 1, 5), now=0)
    assert (second.number, second.updated_at) == (2, watermark + 61)
    third = rows(client, _select=":*, *", _where=updated_after_where(watermark + 60), _limit=50_000)
    assert [r[":id"] for r in third] == [r[":id"] for r in changed]
    assert [int(r["vehicles_e_zpass"]) for r in third] == [int(r["vehicles_e_zpass"]) + 1 for r in changed]
    assert {r[":updated_at"] for r in third} == {iso_utc(watermark + 61)}
    assert mirror.dataset.query({"$where": updated_after_where(watermark + 61)}) == []


def test_updated_at_ranges_select_exactly_each_change(mirror: MirrorServer, client: httpx.Client) -> None:
    """Publishes and overlapping revisions: every stamp range returns exactly the rows whose *current* version
    falls in it, alone and combined with date conditions."""
    oracle = Oracle(START, THROUGH)
    stamps = [DEFAULT_BASE_EPOCH]
    batch = mirror.dataset.publish(days=2, now=DEFAULT_BASE_EPOCH + 100)  # Jan 15-16
    oracle.publish(batch.start_seq, batch.end_seq, batch.updated_at)
    stamps.append(batch.updated_at)
    # Jan 3-5; then Jan 5-15, overtaking Jan 5 and crossing into the second publish; then Jan 1 (the default clock)
    for lo, hi, now in ((3, 6, 0), (5, 16, DEFAULT_BASE_EPOCH + 200), (1, 2, None)):
        first, last = date(2024, 1, lo), date(2024, 1, hi)
        revision = mirror.dataset.revise(first, last, now=now)
        oracle.revise(first, last, revision.updated_at)
        stamps.append(revision.updated_at)
    batch = mirror.dataset.publish(days=1, now=0)  # Jan 17
    oracle.publish(batch.start_seq, batch.end_seq, batch.updated_at)
    stamps.append(batch.updated_at)
    assert stamps[:4] == [
        DEFAULT_BASE_EPOCH,
        DEFAULT_BASE_EPOCH + 100,
        DEFAULT_BASE_EPOCH + 101,
        DEFAULT_BASE_EPOCH + 200,
    ]
    assert stamps == sorted(set(stamps))

    # each change's own range, as the client writes it (`>= after+1s AND < through+1s`)
    for previous, stamp in zip([None, *stamps], stamps, strict=False):
        where = updated_between_where(previous, stamp)
        expected = oracle.ids(after=previous, through=stamp)
        assert expected
        assert paged_ids(client, where, page_size=50_000) == expected
        in_process = mirror.dataset.query({"$select": ":id", "$where": where, "$limit": "50000"})
        assert [r[":id"] for r in in_process] == expected
    # the first revision's rows were overtaken where the second overlapped them: only Jan 3-4 stay at its stamp
    assert oracle.ids(after=stamps[1], through=stamps[2]) == [
        row_id(seq) for seq in oracle.seqs(date(2024, 1, 3), date(2024, 1, 5))
    ]

    days = (date(2024, 1, 2), date(2024, 1, 17))  # base Jan 2, rev 1 Jan 3-4, rev 2 Jan 5-15, publish Jan 16
    cases = [
        (f":updated_at > '{iso_utc(stamps[2])}'", {"after": stamps[2]}),
        (f":updated_at >= '{iso_utc(stamps[3])}'", {"after": stamps[2]}),  # no stamp lies between the two
        (f":updated_at < '{iso_utc(stamps[2])}'", {"through": stamps[1]}),
        (f":updated_at <= '{iso_utc(stamps[3])}'", {"through": stamps[3]}),
        (
            f":updated_at > '{iso_utc(stamps[0])}' AND :updated_at <= '{iso_utc(stamps[2])}'",
            {"after": stamps[0], "through": stamps[2]},
        ),
    ]
    for condition, bounds in cases:
        expected = oracle.ids(days=days, **bounds)
        assert expected  # each case selects something, so the comparison cannot pass vacuously
        assert paged_ids(client, f"{window(*days)} AND {condition}", page_size=50_000) == expected


def test_paging_across_disjoint_ranges_yields_every_row_once(mirror: MirrorServer, client: httpx.Client) -> None:
    oracle = Oracle(START, THROUGH)
    watermark = mirror.dataset.rows_updated_at
    for lo, hi in (
        (date(2024, 1, 2), date(2024, 1, 3)),
        (date(2024, 1, 5), date(2024, 1, 8)),
        (date(2024, 1, 11), date(2024, 1, 12)),
    ):
        oracle.revise(lo, hi, mirror.dataset.revise(lo, hi).updated_at)
    mirror.dataset.delete_days(date(2024, 1, 6), date(2024, 1, 7))
    oracle.delete(date(2024, 1, 6), date(2024, 1, 7))
    batch = mirror.dataset.publish(days=1)
    oracle.publish(batch.start_seq, batch.end_seq, batch.updated_at)

    changed = oracle.ids(after=watermark)
    assert len(changed) == 5 * ROWS_PER_DAY  # Jan 2, 5, 7, 11 and the new Jan 15, in four disjoint ranges
    got = paged_ids(client, updated_after_where(watermark), page_size=97)  # pages straddle range boundaries
    assert got == changed
    assert len(set(got)) == len(got)
    # the complement, and everything, page the same way
    assert paged_ids(client, f":updated_at <= '{iso_utc(watermark)}'", page_size=1000) == oracle.ids(through=watermark)
    assert paged_ids(client, None, page_size=1000) == oracle.ids()


def test_deleted_days_vanish_and_rows_updated_at_moves(mirror: MirrorServer, client: httpx.Client) -> None:
    watermark = client.get(VIEW).json()["rowsUpdatedAt"]
    answer = client.post("/admin/delete", json={"start": "2024-01-04", "stop": "2024-01-06", "now": watermark + 5})
    assert answer.status_code == 200, answer.text
    assert answer.json() == {
        "rowsUpdatedAt": watermark + 5,
        "start": "2024-01-04",
        "stop": "2024-01-06",
        "days": 2,
        "rows": 2 * ROWS_PER_DAY,
        "start_seq": 3 * ROWS_PER_DAY,
        "end_seq": 5 * ROWS_PER_DAY,
        "updated_at": watermark + 5,
        "live_rows": TOTAL - 2 * ROWS_PER_DAY,
    }
    assert client.get(VIEW).json()["rowsUpdatedAt"] == watermark + 5

    everything = rows(client, _select=":*, *", _limit=50_000)
    kept = [seq for seq in range(TOTAL) if not 3 * ROWS_PER_DAY <= seq < 5 * ROWS_PER_DAY]
    assert [r[":id"] for r in everything] == [row_id(seq) for seq in kept]  # other rows keep their ids
    assert {r["date"][:10] for r in everything}.isdisjoint({"2024-01-04", "2024-01-05"})
    assert rows(client, _where=window(date(2024, 1, 4), date(2024, 1, 6))) == []
    assert len(rows(client, _where=window(date(2024, 1, 3), date(2024, 1, 7)), _limit=50_000)) == 2 * ROWS_PER_DAY
    # a deletion has no rows to show: a watermark query sees nothing (why loads reconcile counts too)
    assert rows(client, _where=updated_after_where(watermark)) == []

    state = client.get("/admin/state").json()
    assert state["rows"] == TOTAL - 2 * ROWS_PER_DAY
    assert [d["start"] for d in state["deleted"]] == ["2024-01-04"]

    # deleting an overlapping range removes only what is left; a range with nothing left is refused
    again = mirror.dataset.delete_days("2024-01-05", "2024-01-07", now=0)
    assert (again.rows, again.updated_at) == (ROWS_PER_DAY, watermark + 6)
    refused = client.post("/admin/delete", json={"start": "2024-01-04", "stop": "2024-01-07"})
    assert refused.status_code == 400
    assert "nothing to delete" in refused.json()["message"]
    # revising a deleted day is refused and changes nothing; revising live days next to it works
    refused = client.post("/admin/revise", json={"start": "2024-01-03", "stop": "2024-01-05"})
    assert refused.status_code == 400
    assert "[2024-01-04, 2024-01-05) deleted" in refused.json()["message"]
    assert mirror.dataset.rows_updated_at == watermark + 6
    assert mirror.dataset.revisions == ()
    assert mirror.dataset.revise("2024-01-07", "2024-01-08", now=0).updated_at == watermark + 7

    # later days still publish after the history, with fresh ids
    batch = mirror.dataset.publish(days=1, now=0)
    assert (batch.start_seq, batch.updated_at) == (TOTAL, watermark + 8)
    assert rows(client, _select=":id", _where=updated_after_where(watermark + 7), _limit=50_000) == [
        {":id": row_id(seq)} for seq in range(TOTAL, TOTAL + ROWS_PER_DAY)
    ]


def test_reset_drops_revisions_and_deletions(mirror: MirrorServer, client: httpx.Client) -> None:
    original = rows(client, _select=":*, *", _limit=50_000)
    mirror.dataset.revise(START, START + timedelta(3))
    mirror.dataset.delete_days(START + timedelta(5), START + timedelta(7))
    state = client.get("/admin/state").json()
    assert [r["revision"] for r in state["revisions"]] == [1]
    assert [(d["start"], d["stop"], d["rows"]) for d in state["deleted"]] == [("2024-01-06", "2024-01-08", 1056)]
    assert state["rows"] == TOTAL - 2 * ROWS_PER_DAY

    state = client.post("/admin/reset").json()
    assert (state["revisions"], state["deleted"], state["rows"]) == ([], [], TOTAL)
    assert state["rowsUpdatedAt"] == DEFAULT_BASE_EPOCH
    assert rows(client, _select=":*, *", _limit=50_000) == original


@pytest.mark.parametrize(
    ("route", "body", "reason"),
    [
        ("/admin/revise", {"start": "2024-01-02"}, "stop"),
        ("/admin/revise", {"start": "2024-01-02", "stop": "2024-13-01"}, "month"),
        ("/admin/revise", {"start": "2024-1-2", "stop": "2024-01-05"}, "YYYY-MM-DD"),
        ("/admin/revise", {"start": 20240102, "stop": "2024-01-05"}, "YYYY-MM-DD"),
        ("/admin/revise", {"start": "2024-01-05", "stop": "2024-01-05"}, "before stop"),
        ("/admin/revise", {"start": "2023-12-31", "stop": "2024-01-05"}, "published days"),
        ("/admin/revise", {"start": "2024-01-10", "stop": "2024-01-16"}, "published days"),
        ("/admin/revise", {"start": "2024-01-02", "stop": "2024-01-05", "now": "soon"}, "epoch seconds"),
        ("/admin/revise", {"start": "2024-01-02", "stop": "2024-01-05", "days": 3}, "unknown"),
        ("/admin/delete", {"stop": "2024-01-05"}, "start"),
        ("/admin/delete", {"start": "2024-01-06", "stop": "2024-01-05"}, "before stop"),
        ("/admin/delete", {"start": "2024-01-02", "stop": "2024-01-05", "now": True}, "epoch seconds"),
    ],
)
def test_revise_and_delete_refuse_malformed_bodies(
    mirror: MirrorServer, client: httpx.Client, route: str, body: dict[str, object], reason: str
) -> None:
    response = client.post(route, json=body)
    assert response.status_code == 400
    assert reason in response.json()["message"]
    assert client.get("/admin/state").json()["rowsUpdatedAt"] == DEFAULT_BASE_EPOCH  # nothing happened
    assert (mirror.dataset.revisions, mirror.dataset.deletions) == ((), ())


# ---------------------------------------------------------------------------------------------- counts


def count_of(client: httpx.Client, where: str | None) -> list[dict[str, str]]:
    """The raw answer to the client's `count(*)` request."""
    return rows(client, _select="count(*) AS n", **({"_where": where} if where else {}))


def counts_per_date(client: httpx.Client, where: str | None, **paging: int) -> list[dict[str, str]]:
    """The raw answer to the client's per-date count request (one page)."""
    params: dict[str, str | int] = {"_select": "date, count(*) AS n", "_group": "date", "_order": "date"}
    params |= {"_limit": 50_000, "_offset": 0} | {f"_{k}": v for k, v in paging.items()}
    return rows(client, **params, **({"_where": where} if where else {}))


def change_everything(mirror: MirrorServer) -> int:
    """Publish, revise (overlapping, across publishes), delete: the returned watermark (the stamp before)
    splits the rows into untouched originals and several disjoint ranges of changed ones."""
    dataset = mirror.dataset
    watermark = dataset.rows_updated_at
    dataset.publish(days=3, now=0)  # Jan 15-17
    dataset.revise("2024-01-03", "2024-01-06", now=0)
    dataset.revise("2024-01-05", "2024-01-16", now=0)
    dataset.delete_days("2024-01-08", "2024-01-10", now=0)
    dataset.revise("2024-01-12", "2024-01-13", now=0)  # a third version of Jan 12
    dataset.delete_days("2024-01-17", "2024-01-18", now=0)
    return watermark


@pytest.mark.parametrize("changed", [False, True], ids=["as-constructed", "after-changes"])
@pytest.mark.parametrize(
    "where",
    [
        None,
        window(date(2024, 1, 4), date(2024, 1, 14)),
        updated_after_where(DEFAULT_BASE_EPOCH),
        updated_between_where(None, DEFAULT_BASE_EPOCH),
        f"{window(date(2024, 1, 2), date(2024, 1, 13))} AND {updated_after_where(DEFAULT_BASE_EPOCH + 1)}",
        f":updated_at >= '{iso_utc(DEFAULT_BASE_EPOCH + 2)}' AND :updated_at < '{iso_utc(DEFAULT_BASE_EPOCH + 4)}'",
        updated_after_where(DEFAULT_BASE_EPOCH + 10_000),
    ],
    ids=["all", "window", "updated-after", "originals", "window-and-updated", "stamp-range", "nothing"],
)
def test_counts_equal_the_rows_the_data_query_pages_through(
    mirror: MirrorServer, client: httpx.Client, socrata: SocrataClient, where: str | None, changed: bool
) -> None:
    if changed:
        assert change_everything(mirror) == DEFAULT_BASE_EPOCH
    served = paged_rows(client, where, page_size=997)
    per_day: dict[str, int] = {}
    for row in served:
        per_day[row["date"]] = per_day.get(row["date"], 0) + 1

    assert count_of(client, where) == [{"n": str(len(served))}]
    assert counts_per_date(client, where) == [{"date": day, "n": str(n)} for day, n in sorted(per_day.items())]
    assert socrata.count(DATASET, where=where) == len(served)
    assert socrata.counts_by_day(DATASET, where=where, page_size=4) == {
        date.fromisoformat(day[:10]): n for day, n in per_day.items()
    }
    in_process = {"$select": "count(*) AS n"} | ({"$where": where} if where else {})
    assert mirror.dataset.query(in_process) == [{"n": str(len(served))}]


def test_counts_see_changes_as_the_data_does(mirror: MirrorServer, client: httpx.Client) -> None:
    """The scenario of the parametrized test, spelled out: what each count must be after each change."""
    assert count_of(client, None) == [{"n": str(TOTAL)}]
    watermark = change_everything(mirror)
    assert count_of(client, None) == [{"n": str(TOTAL)}]  # three days published (Jan 15-17), three deleted
    # changed since the watermark: Jan 3-7, 10-16 (Jan 8-9 and 17 deleted)
    assert count_of(client, updated_after_where(watermark)) == [{"n": str(12 * ROWS_PER_DAY)}]
    per_date = counts_per_date(client, window(date(2024, 1, 6), date(2024, 1, 12)))
    assert [(d["date"][:10], d["n"]) for d in per_date] == [
        ("2024-01-06", "528"),
        ("2024-01-07", "528"),
        ("2024-01-10", "528"),
        ("2024-01-11", "528"),
    ]
    assert client.get(VIEW).json()["rowsUpdatedAt"] == watermark + 6


def test_count_answer_shapes(mirror: MirrorServer, client: httpx.Client) -> None:
    assert rows(client, _select="count(*)") == [{"count": str(TOTAL)}]  # no alias: Socrata's `count`
    assert rows(client, _select="COUNT( * ) as total") == [{"total": str(TOTAL)}]
    assert rows(client, _select="count(*) AS n", _offset=1) == []  # one object, paged like any answer
    assert count_of(client, window(date(2024, 2, 1), date(2024, 3, 1))) == [{"n": "0"}]

    reversed_keys = rows(client, _select="count(*) AS n, date", _group="date", _order="date ASC", _limit=2)
    assert [list(r) for r in reversed_keys] == [["n", "date"], ["n", "date"]]  # keys in $select order
    page = counts_per_date(client, None, limit=5, offset=3)
    assert [r["date"] for r in page] == [f"2024-01-{d:02d}T00:00:00.000" for d in range(4, 9)]
    assert all(r["n"] == "528" and isinstance(r["n"], str) for r in page)
    assert counts_per_date(client, None, offset=14) == []
    unordered = rows(client, _select="`date`, count(*) AS n", _group="`date`", _limit=50_000)
    assert unordered == counts_per_date(client, None)


def test_per_date_counts_follow_a_corrupted_date(
    mirror: MirrorServer, client: httpx.Client, socrata: SocrataClient
) -> None:
    seq = mirror.dataset.seq_of("2024-01-02", 4, 9, "O")
    mirror.dataset.corrupt(seq, "date", "2024-01-05")  # another valid date, written differently
    mirror.dataset.corrupt(seq + 1, "date", "2024-01-05T00:00:00.000")
    by_day = socrata.counts_by_day(DATASET, where=None)
    assert (by_day[date(2024, 1, 2)], by_day[date(2024, 1, 5)]) == (ROWS_PER_DAY - 2, ROWS_PER_DAY + 2)
    assert sum(by_day.values()) == socrata.count(DATASET, where=None) == TOTAL
    # the data query filters on the row's position (its published date) and serves the corrupted value; the
    # per-date count of the same filter follows what is served
    jan2 = window(date(2024, 1, 2), date(2024, 1, 3))
    served_dates = {r["date"] for r in rows(client, _where=jan2, _limit=50_000)}
    assert served_dates == {"2024-01-02T00:00:00.000", "2024-01-05", "2024-01-05T00:00:00.000"}
    assert counts_per_date(client, jan2) == [
        {"date": "2024-01-02T00:00:00.000", "n": str(ROWS_PER_DAY - 2)},
        {"date": "2024-01-05T00:00:00.000", "n": "2"},
    ]
    # a date that is not a date is grouped under its text; a dropped date (null) has no key and sorts last
    mirror.dataset.corrupt(seq + 2, "date", "not-a-date")
    mirror.dataset.corrupt(seq + 3, "date", None)
    tail = counts_per_date(client, jan2)[-2:]
    assert tail == [{"date": "not-a-date", "n": "1"}, {"n": "1"}]
    assert sum(int(r["n"]) for r in counts_per_date(client, jan2)) == ROWS_PER_DAY


def test_count_requests_share_the_fault_queue_and_request_log(mirror: MirrorServer, socrata: SocrataClient) -> None:
    mirror.dataset.fail_next([{"status": 429, "retry_after": 0}, {"truncate": True}])
    assert socrata.count(DATASET, where=None) == TOTAL  # retried through a 429 and a truncated body
    logged = [(r.status, r.params, r.app_token) for r in mirror.dataset.requests]
    assert logged == [(429, {"$select": "count(*) AS n"}, "tok"), *[(200, {"$select": "count(*) AS n"}, "tok")] * 2]

    # count requests also count down scheduled changes, like any /resource request
    mirror.dataset.after_requests(1, publish_days=2)
    assert socrata.count(DATASET, where=None) == TOTAL  # answered before the change
    assert socrata.count(DATASET, where=None) == TOTAL + 2 * ROWS_PER_DAY


@pytest.mark.parametrize(
    ("params", "reason"),
    [
        ({"$select": "sum(vehicles_e_zpass)"}, "only count(*)"),
        ({"$select": "count(date) AS n"}, "only count(*)"),
        ({"$select": "plaza_id, count(*) AS n", "$group": "plaza_id"}, "groups only by date"),
        ({"$select": "date", "$group": "date"}, "without count(*)"),
        ({"$select": "date, count(*) AS n"}, "$group=date"),
        ({"$select": "count(*) AS n", "$group": "date"}, "needs date in $select"),
        ({"$select": "date, count(*) AS n", "$group": "date", "$order": "date DESC"}, "$order=date"),
        ({"$select": "date, count(*) AS n", "$group": "date", "$order": "n"}, "$order=date"),
        ({"$select": "count(*) AS n", "$order": ":id"}, "$order=date"),
        ({"$select": "count(*) n"}, "could not parse"),
        ({"$select": "count(*) AS n, count(*) AS m"}, "one count(*)"),
        ({"$select": "date, count(*) AS date", "$group": "date"}, "collides"),
        ({"$select": ":id, count(*) AS n"}, "selects only date"),
        ({"$select": "count(*) AS n", "$having": "n > 1"}, "Unrecognized"),
        ({"$select": "count(*) AS n", "$where": "plaza_id = '1'"}, "$where"),
    ],
)
def test_malformed_aggregate_queries_are_400_with_a_reason(
    client: httpx.Client, params: dict[str, str], reason: str
) -> None:
    response = client.get(RESOURCE, params=params)
    assert response.status_code == 400
    assert response.json()["error"] is True
    assert reason in response.json()["message"]


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
        # counts over the whole history, without rendering it
        assert count_of(client, None) == [{"n": str(total)}]
        per_date = counts_per_date(client, None)
        assert len(per_date) == (date(2026, 1, 1) - date(2010, 1, 1)).days == 5844
        assert (per_date[0]["date"], per_date[-1]["date"]) == ("2010-01-01T00:00:00.000", "2025-12-31T00:00:00.000")
        assert {r["n"] for r in per_date} == {str(ROWS_PER_DAY)}
        mirror.dataset.revise("2012-02-28", "2012-03-02", now=0)
        mirror.dataset.delete_days("2020-01-01", "2021-01-01", now=0)
        assert count_of(client, None) == [{"n": str(total - 366 * ROWS_PER_DAY)}]
        assert count_of(client, updated_after_where(DEFAULT_BASE_EPOCH)) == [{"n": str(3 * ROWS_PER_DAY)}]


# ---------------------------------------------------------------------------------------------- process


def test_module_entry_point_prints_url_and_stops_on_sigterm() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    argv = [
        sys.executable,
        "-m",
        "tollwatch_dev.mirror",
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
