"""Write-audit-publish end to end on real components (Prefect server, Azurite, the mirror, pyiceberg on disk): a load
that fails its checks is held on its audit branch and `main` never changes; one that passes is published and
announced with what the checks found; operators settle held loads with `tollwatch publish` / `tollwatch discard`."""

from __future__ import annotations

from collections.abc import Callable
from datetime import date, timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.support import duckdb_iceberg
from tests.support.prefect_events import wait_for_events
from tests.support.tables import table_rows
from tollwatch import resources
from tollwatch.contract import table as contract
from tollwatch.contract.events import EventName, IngestionCompleted, IngestionHeld, LoadSettled, Window
from tollwatch.contract.settings import load_settings
from tollwatch.core.branches import Branches
from tollwatch.core.table import lineage
from tollwatch.prefect.flows.ingest import ingest
from tollwatch_dev.mirror import MirrorServer

ROWS_PER_DAY = 11 * 2 * 24
#: Six weeks in `main` first: the volume check compares each loaded plaza-day with the same weekday there.
BASELINE = Window(start=date(2024, 1, 1), stop=date(2024, 2, 12))
WEEK = Window(start=date(2024, 2, 12), stop=date(2024, 2, 19))
DAY = date(2024, 2, 14)

pytestmark = pytest.mark.stack


def _main_state() -> tuple[int | None, int]:
    """`main`'s snapshot and row count: what every reader of the table sees."""
    info = resources.table_store(load_settings()).info()
    return info.snapshot_id, table_rows().num_rows


def _branches() -> Branches:
    return Branches(resources.table_store(load_settings()))


def _cli(*args: str) -> tuple[int, str]:
    from tollwatch.cli.main import app

    result = CliRunner().invoke(app, [*args, "--no-local-stack"])
    return result.exit_code, result.output


# -------------------------------------------------------------------------------- faults that must hold a load


def _missing_hour(mirror: MirrorServer, monkeypatch: pytest.MonkeyPatch | None = None) -> None:
    mirror.dataset.corrupt(mirror.dataset.seq_of(DAY, 4, 5, "O"), "hour", None)  # rejected: hour 5 is gone


def _plaza_at_zero(mirror: MirrorServer, monkeypatch: pytest.MonkeyPatch) -> None:
    for hour in range(24):
        for direction in ("I", "O"):
            seq = mirror.dataset.seq_of(DAY, 7, hour, direction)
            mirror.dataset.corrupt(seq, "vehicles_e_zpass", "0")
            mirror.dataset.corrupt(seq, "vehicles_vtoll", "0")


def _reject_burst(mirror: MirrorServer, monkeypatch: pytest.MonkeyPatch) -> None:
    for plaza in range(1, 12):  # 88 of the week's 3,696 rows (2.4%): every hour 8-11 of DAY
        for hour in range(8, 12):
            for direction in ("I", "O"):
                mirror.dataset.corrupt(mirror.dataset.seq_of(DAY, plaza, hour, direction), "vehicles_e_zpass", "n/a")


def _count_mismatch(mirror: MirrorServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """The upstream withdraws a day while the load is being audited: its rows are on the branch, the upstream counts
    none for it (a row a typing rejects or a dedupe supersedes is accounted for; these are not)."""
    import tollwatch.prefect.flows.ingest as flow

    real = flow.load_landing

    def load_then_withdraw(*args: object, **kwargs: object) -> object:
        result = real(*args, **kwargs)
        mirror.dataset.delete_days(DAY, DAY + timedelta(days=1))
        return result

    monkeypatch.setattr(flow, "load_landing", load_then_withdraw)


HOLDING_FAULTS: dict[str, tuple[Callable[[MirrorServer, pytest.MonkeyPatch], None], str]] = {
    "missing hour": (_missing_hour, "completeness"),
    "plaza at zero": (_plaza_at_zero, "volume"),
    "reject burst": (_reject_burst, "reject_rate"),
    "upstream count mismatch": (_count_mismatch, "reconciliation"),
}


@pytest.mark.parametrize("fault", HOLDING_FAULTS)
def test_a_load_failing_an_error_check_is_held_and_main_is_unchanged(
    env, mirror: MirrorServer, monkeypatch: pytest.MonkeyPatch, fault: str
):
    make, check = HOLDING_FAULTS[fault]
    ingest(start=BASELINE.start, stop=BASELINE.stop, request_id="baseline")
    before = _main_state()
    make(mirror, monkeypatch)

    held = ingest(start=WEEK.start, stop=WEEK.stop, request_id=f"audited-{fault}")  # its own ids on the shared server

    assert isinstance(held, IngestionHeld), held
    assert check in held.quality.failing, held.quality.model_dump_json(indent=1)
    assert _main_state() == before  # no reader of main sees any of it
    records = _branches().held(held.refresh_id)
    assert [r.branch for r in records] == [contract.audit_branch(held.refresh_id)]
    assert _branches().head(records[0].branch) == held.snapshot_id  # the load waits on its branch
    events = wait_for_events(
        env["PREFECT_API_URL"], EventName.INGESTION_HELD, lambda e: e["payload"]["refresh_id"] == held.refresh_id
    )
    assert check in events[0]["payload"]["quality"]["failing"]
    assert events[0]["resource"]["tollwatch.quality"] == "held"


def test_a_passing_load_is_published_and_its_event_carries_the_checks(env, mirror: MirrorServer):
    ingest(start=BASELINE.start, stop=BASELINE.stop, request_id="baseline")

    done = ingest(start=WEEK.start, stop=WEEK.stop, request_id="clean")

    assert isinstance(done, IngestionCompleted), done
    assert done.quality is not None
    assert done.quality.verdict == "passed"
    checks = {c["name"]: c for c in done.quality.checks}
    assert set(checks) == {"reconciliation", "completeness", "volume", "reject_rate", "schema_drift"}
    assert all(c["passed"] for c in checks.values())
    assert checks["volume"]["evaluated"] is True  # six weeks of history in main
    assert table_rows(WEEK).num_rows == 7 * ROWS_PER_DAY
    table = resources.table_store(load_settings()).table()
    assert set(table.metadata.refs) == {contract.MAIN}  # the audit branch went with the publish
    assert done.snapshot_id == table.current_snapshot().snapshot_id
    event = wait_for_events(
        env["PREFECT_API_URL"], EventName.INGESTION_COMPLETED, lambda e: e["payload"]["refresh_id"] == done.refresh_id
    )[0]
    assert event["payload"]["quality"] == done.quality.model_dump(mode="json")
    assert event["resource"]["tollwatch.quality"] == "passed"


def test_a_warn_check_publishes_with_a_warning(env, mirror: MirrorServer):
    mirror.dataset.extra_column("vehicles_bus", "3")  # schema drift is `warn` by default

    done = ingest(start=WEEK.start, stop=WEEK.stop, request_id="drift")

    assert isinstance(done, IngestionCompleted)
    assert done.quality is not None
    assert (done.quality.verdict, done.quality.warnings) == ("warned", ["schema_drift"])
    assert table_rows(WEEK).num_rows == 7 * ROWS_PER_DAY


def test_a_held_refresh_replays_held_and_a_corrected_republish_passes(env, mirror: MirrorServer):
    watermark = mirror.dataset.rows_updated_at
    ingest(rows_updated_at=watermark)  # the history so far
    bad = mirror.dataset.seq_of(date(2024, 4, 3), 3, 8, "I")
    mirror.dataset.corrupt(bad, "hour", None)
    published = mirror.dataset.publish(days=7)  # April 1-7, one hour missing
    before = _main_state()

    held = ingest(rows_updated_at=published.updated_at, previous_rows_updated_at=watermark)
    requests = len(mirror.dataset.requests)
    replay = ingest(rows_updated_at=published.updated_at, previous_rows_updated_at=watermark)

    assert isinstance(held, IngestionHeld)
    assert held.quality.failing == ["completeness"]
    assert isinstance(replay, IngestionHeld)
    assert replay.snapshot_id == held.snapshot_id
    assert len(mirror.dataset.requests) == requests  # a held replay fetches nothing and loads nothing
    assert _main_state() == before
    assert resources.table_store(load_settings()).committed_through() == watermark  # main's mark did not move

    mirror.dataset.corrupt(bad, "hour", "8")  # the upstream fixes the row and republishes the day
    fixed = mirror.dataset.revise(date(2024, 4, 3), date(2024, 4, 4))
    done = ingest(rows_updated_at=fixed.updated_at, previous_rows_updated_at=published.updated_at)

    assert isinstance(done, IngestionCompleted)
    assert done.quality is not None
    assert done.quality.verdict == "passed"
    assert table_rows(Window(start=date(2024, 4, 1), stop=date(2024, 4, 8))).num_rows == 7 * ROWS_PER_DAY
    assert resources.table_store(load_settings()).committed_through() == fixed.updated_at

    # the superseded hold stays listed until an operator settles it
    code, status = _cli("status")
    print(status)  # how a held load looks to an operator (pytest -s shows it)
    assert held.refresh_id in status, status
    assert "completeness failed" in status, status
    assert "superseded" in status, status  # the corrected republish covered it: main is committed past it
    code, out = _cli("discard", held.refresh_id, "--reason", "superseded by the corrected republish", "--by", "ops")
    assert code == 0, out
    again_code, again = _cli("discard", held.refresh_id, "--reason", "twice", "--by", "someone-else")
    assert again_code == 0, again
    assert "ops" in again, again  # idempotent: the first decision stands
    assert _branches().held() == []
    assert contract.audit_branch(held.refresh_id) not in resources.table_store(load_settings()).table().metadata.refs
    code, status = _cli("status")
    assert "none (every audited load passed" in status, status
    discarded = wait_for_events(
        env["PREFECT_API_URL"],
        EventName.INGESTION_DISCARDED,
        lambda e: e["payload"]["refresh_id"] == held.refresh_id,
    )
    assert len(discarded) == 1
    assert discarded[0]["payload"]["by"] == "ops"
    # a replay of a discarded refresh loads nothing
    settled = ingest(rows_updated_at=published.updated_at, previous_rows_updated_at=watermark)
    assert isinstance(settled, LoadSettled)
    assert settled.action == "discarded"


def test_publish_overrides_a_hold_after_main_moved_and_is_idempotent(env, mirror: MirrorServer):
    ingest(start=BASELINE.start, stop=BASELINE.stop, request_id="baseline")
    _missing_hour(mirror)
    held = ingest(start=WEEK.start, stop=WEEK.stop, request_id="override")
    assert isinstance(held, IngestionHeld)
    march = Window(start=date(2024, 3, 4), stop=date(2024, 3, 11))
    ingest(start=march.start, stop=march.stop, request_id="meanwhile")  # main moves past the held branch's base

    code, out = _cli("publish", held.refresh_id, "--reason", "plaza 4 counter outage, confirmed", "--by", "ops")

    assert code == 0, out
    assert table_rows(WEEK).num_rows == 7 * ROWS_PER_DAY - 1  # the held load, rebuilt on the new main …
    assert table_rows(march).num_rows == 7 * ROWS_PER_DAY  # … without dropping what was published meanwhile
    main = [s.summary[contract.REFRESH_ID] for s in lineage(resources.table_store(load_settings()).table())]
    assert held.refresh_id in main
    assert _branches().held() == []
    settled = _branches().settled(held.refresh_id)
    assert settled is not None
    assert (settled.action, settled.by) == ("published", "ops")
    completed = wait_for_events(
        env["PREFECT_API_URL"],
        EventName.INGESTION_COMPLETED,
        lambda e: e["payload"]["refresh_id"] == held.refresh_id,
    )
    quality = completed[0]["payload"]["quality"]
    assert (quality["verdict"], quality["overridden_by"]) == ("overridden", "ops")
    assert completed[0]["payload"]["snapshot_id"] == settled.snapshot_id
    published = wait_for_events(
        env["PREFECT_API_URL"], EventName.INGESTION_PUBLISHED, lambda e: e["payload"]["refresh_id"] == held.refresh_id
    )
    assert published[0]["payload"]["reason"] == "plaza 4 counter outage, confirmed"

    snapshot = _main_state()
    code, again = _cli("publish", held.refresh_id, "--reason", "again", "--by", "someone-else")
    assert code == 0, again
    assert "ops" in again, again
    assert _main_state() == snapshot


def test_settling_an_unknown_load_is_a_clear_refusal(env):
    code, out = _cli("publish", "no-such-refresh", "--reason", "x")
    assert code != 0, out
    assert "is not held" in out, out
    code, out = _cli("discard", "no-such-refresh", "--reason", "x")
    assert code != 0, out
    assert "is not held" in out, out
    assert "Traceback" not in out


def test_readers_of_main_never_see_branch_rows(env, mirror: MirrorServer, tmp_path: Path):
    ingest(start=BASELINE.start, stop=BASELINE.stop, request_id="baseline")
    _missing_hour(mirror)
    held = ingest(start=WEEK.start, stop=WEEK.stop, request_id="readers")
    assert isinstance(held, IngestionHeld)
    store = resources.table_store(load_settings())
    table = store.table()

    # pyiceberg: main has none of the week; the branch has all of it but the rejected row
    assert table.scan(row_filter=f"date >= '{WEEK.start}'").to_arrow().num_rows == 0
    branch = table.scan(row_filter=f"date >= '{WEEK.start}'", snapshot_id=held.snapshot_id).to_arrow()
    assert branch.num_rows == 7 * ROWS_PER_DAY - 1
    # DuckDB reads the table by its metadata file, as an outside reader would: the current snapshot is main's
    with duckdb_iceberg.connect() as conn:
        scan = duckdb_iceberg.scan_sql(table.metadata_location)
        week = conn.sql(f"SELECT count(*) FROM {scan} WHERE date >= DATE '{WEEK.start}'").fetchone()  # noqa: S608 (a test-built scan)
        everything = conn.sql(f"SELECT count(*) FROM {scan}").fetchone()  # noqa: S608
    assert week == (0,)
    assert everything == (BASELINE.days * ROWS_PER_DAY,)
