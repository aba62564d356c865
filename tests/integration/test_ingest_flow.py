"""The ingest flow end to end on real components: Prefect server, Azurite, the mirror, pyiceberg on disk."""

from __future__ import annotations

import gzip
from datetime import date

import orjson
import pyarrow.compute as pc
import pytest

from tests.support.prefect_events import wait_for_events
from tests.support.tables import snapshot_ids, table_rows
from tollwatch import resources
from tollwatch.contract.events import EventName, Window
from tollwatch.contract.settings import load_settings
from tollwatch.prefect.flows.ingest import ingest
from tollwatch_dev.mirror import MirrorServer

JAN = Window(start=date(2024, 1, 1), stop=date(2024, 2, 1))
ROWS_PER_DAY = 11 * 2 * 24

pytestmark = pytest.mark.stack


def test_window_ingested_twice_gives_an_identical_table(env):
    first = ingest(start=JAN.start, stop=JAN.stop, request_id="a")
    rows_after_first = table_rows()
    second = ingest(start=JAN.start, stop=JAN.stop, request_id="b")  # a re-run: new request, same window
    rows_after_second = table_rows()

    assert first.rows_written == second.rows_written == 31 * ROWS_PER_DAY
    assert second.snapshot_id != first.snapshot_id
    assert rows_after_second.num_rows == 31 * ROWS_PER_DAY
    assert rows_after_second.drop_columns(["source_updated_at"]).equals(
        rows_after_first.drop_columns(["source_updated_at"])
    )


def test_replayed_refresh_adds_no_snapshot(env, mirror: MirrorServer):
    watermark = mirror.dataset.rows_updated_at
    ingest(rows_updated_at=watermark)  # the history so far: the ledger is committed through `watermark`
    published = mirror.dataset.publish(days=7)
    first = ingest(rows_updated_at=published.updated_at, previous_rows_updated_at=watermark)
    snapshots = snapshot_ids()
    replay = ingest(rows_updated_at=published.updated_at, previous_rows_updated_at=watermark)

    assert first.rows_written == 7 * ROWS_PER_DAY
    assert first.window == Window(start=date(2024, 4, 1), stop=date(2024, 4, 8))
    assert replay.already_committed is True
    assert replay.snapshot_id == first.snapshot_id
    assert snapshot_ids() == snapshots


def test_refresh_merges_changed_rows_on_the_key(env, mirror: MirrorServer):
    watermark = mirror.dataset.rows_updated_at
    ingest(rows_updated_at=watermark)  # the history so far: the ledger is committed through `watermark`
    before = table_rows(JAN)
    total_before = table_rows().num_rows
    published = mirror.dataset.publish(days=3)  # April 1-3 are new rows

    ingest(rows_updated_at=published.updated_at, previous_rows_updated_at=watermark)

    after = table_rows()
    assert after.num_rows == total_before + 3 * ROWS_PER_DAY
    assert table_rows(JAN).drop_columns(["source_updated_at"]).equals(before.drop_columns(["source_updated_at"]))


def test_schema_drift_adds_the_column_and_old_rows_read_null(env, mirror: MirrorServer):
    ingest(start=JAN.start, stop=JAN.stop, request_id="jan")
    mirror.dataset.extra_column("vehicles_bus", "3")  # a column the table has never seen
    feb = Window(start=date(2024, 2, 1), stop=date(2024, 2, 8))

    result = ingest(start=feb.start, stop=feb.stop, request_id="feb")

    rows = table_rows()
    assert "vehicles_bus" in rows.column_names
    assert result.rows_written == 7 * ROWS_PER_DAY
    assert table_rows(JAN)["vehicles_bus"].null_count == 31 * ROWS_PER_DAY
    assert set(table_rows(feb)["vehicles_bus"].to_pylist()) == {"3"}


def test_older_exports_with_vehicles_cash_load_into_the_cash_column(env, mirror: MirrorServer):
    mirror.dataset.set_cash_until(date(2024, 1, 16))

    ingest(start=JAN.start, stop=JAN.stop, request_id="drift")

    rows = table_rows()
    early = rows.filter(pc.less(rows["date"], date(2024, 1, 16)))
    late = rows.filter(pc.greater_equal(rows["date"], date(2024, 1, 16)))
    assert early.num_rows == 15 * ROWS_PER_DAY
    assert late.num_rows == 16 * ROWS_PER_DAY
    assert early["vehicles_vtoll"].null_count == early.num_rows
    assert early["vehicles_cash"].null_count == 0
    assert late["vehicles_cash"].null_count == late.num_rows
    assert late["vehicles_vtoll"].null_count == 0


def test_malformed_rows_are_quarantined_counted_and_good_rows_loaded(env, mirror: MirrorServer, tmp_path, monkeypatch):
    """With completeness at `warn` (a team's choice in its spec), a load missing the rejected rows' hours is
    published with a warning; by default it is held (tests/integration/test_wap.py)."""
    spec = tmp_path / "quality.yaml"
    spec.write_text("completeness: {severity: warn}\n")
    monkeypatch.setenv("TOLLWATCH_QUALITY_SPEC", str(spec))
    day = date(2024, 1, 10)
    bad = {
        mirror.dataset.seq_of(day, 1, 8, "I"): ("date", "not-a-date"),
        mirror.dataset.seq_of(day, 2, 8, "I"): ("vehicles_e_zpass", "-5"),
        mirror.dataset.seq_of(day, 3, 8, "I"): ("direction", "X"),
        mirror.dataset.seq_of(day, 4, 8, "I"): ("vehicles_vtoll", "many"),
    }
    for seq, (field, value) in bad.items():
        mirror.dataset.corrupt(seq, field, value)

    result = ingest(start=JAN.start, stop=JAN.stop, request_id="bad-rows")

    assert result.rows_fetched == 31 * ROWS_PER_DAY
    assert result.rows_rejected == 4
    assert result.quality is not None
    assert (result.quality.verdict, result.quality.warnings) == ("warned", ["completeness"])
    assert result.rows_written == 31 * ROWS_PER_DAY - 4
    assert table_rows().num_rows == 31 * ROWS_PER_DAY - 4
    landing = resources.landing_zone(load_settings())
    rejected = [b for b in landing.list_blobs("rejected/")]
    assert len(rejected) == 1
    container = resources.blob_service(load_settings()).get_container_client(landing.container_name)
    lines = gzip.decompress(container.download_blob(rejected[0]).readall()).splitlines()
    reasons = sorted(orjson.loads(line)["reason"] for line in lines)
    assert reasons == [
        "date: not a YYYY-MM-DD date",
        "direction: not I or O",
        "vehicles_e_zpass: not a non-negative integer",
        "vehicles_vtoll: not a non-negative integer",
    ]


def test_throttled_upstream_is_retried_and_fully_loaded(env, mirror: MirrorServer):
    mirror.dataset.fail_next([{"status": 429, "retry_after": 0}, {"status": 503}])

    result = ingest(start=JAN.start, stop=JAN.stop, request_id="throttled")

    assert result.rows_written == 31 * ROWS_PER_DAY
    statuses = [r.status for r in mirror.dataset.requests if r.path.startswith("/resource/")]
    assert statuses[:3] == [429, 503, 200]


def test_upstream_failing_forever_fails_the_flow_and_emits_ingestion_failed(env, mirror: MirrorServer):
    mirror.dataset.fail_always({"status": 500})

    state = ingest(start=JAN.start, stop=JAN.stop, request_id="doomed", return_state=True)

    assert state.is_failed()
    events = wait_for_events(
        env["PREFECT_API_URL"],
        EventName.INGESTION_FAILED,
        lambda e: (
            e["payload"]["window"] == {"start": "2024-01-01", "stop": "2024-02-01"}
            and e["payload"]["error_class"] == "UpstreamError"
        ),
    )
    payload = events[0]["payload"]
    assert "HTTP 500" in payload["error_message"]
    assert "after 3 attempts" in payload["error_message"]
    related = {r["prefect.resource.role"]: r["prefect.resource.id"] for r in events[0]["related"]}
    assert related["flow-run"] == f"prefect.flow-run.{payload['flow_run_id']}"
    assert resources.table_store(load_settings()).table() is None  # nothing committed


def test_completion_event_matches_the_committed_snapshot(env):
    result = ingest(start=JAN.start, stop=JAN.stop, request_id="announce")

    events = wait_for_events(
        env["PREFECT_API_URL"], EventName.INGESTION_COMPLETED, lambda e: e["payload"]["refresh_id"] == result.refresh_id
    )
    event = events[0]
    table = resources.table_store(load_settings()).table()
    snapshot = table.current_snapshot()
    assert event["payload"]["snapshot_id"] == snapshot.snapshot_id
    assert snapshot.summary["tollwatch.refresh-id"] == result.refresh_id
    assert event["payload"]["rows_written"] == int(snapshot.summary["total-records"]) == 31 * ROWS_PER_DAY
    assert event["resource"]["prefect.resource.id"] == "iceberg.tollwatch.bronze.bnt_traffic_hourly"
    assert event["id"] == str(result.event_id())
    roles = {r["prefect.resource.role"] for r in event["related"]}
    assert {"flow-run", "dataset"} <= roles


def test_a_commit_that_loses_a_race_with_a_concurrent_load_is_rebuilt_not_failed(env, monkeypatch):
    """Two backfill chunks of one month commit at once: the loser's delete would hide the winner's new files
    (pyiceberg raises a conflict); it must retry on the new table state, and both days end up in the table."""
    import tollwatch.core.table

    # January as one data file: a day's replace rewrites that file, so two day-chunks of January truly conflict
    ingest(start=JAN.start, stop=JAN.stop, request_id="seed")
    real_conform = tollwatch.core.table.conform
    raced = []

    def conform_then_lose_the_race(batch, schema):
        if not raced:  # our delete is staged, our append not yet: another run commits Jan 9 meanwhile
            raced.append("winner")
            ingest(start=date(2024, 1, 9), stop=date(2024, 1, 10), request_id="winner")
        return real_conform(batch, schema)

    monkeypatch.setattr(tollwatch.core.table, "conform", conform_then_lose_the_race)
    loser = ingest(start=date(2024, 1, 8), stop=date(2024, 1, 9), request_id="loser")

    assert raced  # the race really happened
    assert loser.rows_written == ROWS_PER_DAY
    rows = table_rows()
    assert rows.num_rows == 31 * ROWS_PER_DAY  # nothing lost, nothing doubled
    assert len(pc.unique(rows["date"])) == 31
