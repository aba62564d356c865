"""The ingest's decisions (tollwatch/core/ingest.py) with in-memory ports: what a load asks the upstream for, when a
fetch is sealed or refused, what a commit writes and records in the ledger, and when a re-run commits nothing.

The real pieces (Socrata, Blob Storage, Iceberg) are in tests/integration and tests/faults; the row merge itself is
tests/unit/test_versions.py.
"""

from __future__ import annotations

from datetime import UTC, date, datetime

import pytest

from tests.support.fakes import DATASET, DOMAIN, FakeLanding, FakeTableStore, FakeUpstream, day_rows, socrata_row
from tollwatch.adapters.socrata import updated_between_where, window_where
from tollwatch.contract import table as contract
from tollwatch.contract.events import BackfillRequested, DatasetRefreshed, Window
from tollwatch.core.ingest import (
    FETCH_ATTEMPTS,
    FetchPlan,
    IngestRequest,
    UnaccountedRowsError,
    covered_load,
    fetch_and_land,
    load_landing,
    plan_fetch,
    previous_load,
)
from tollwatch.core.landing import LandingManifest

JAN_1, JAN_2, JAN_3, FEB_1 = date(2024, 1, 1), date(2024, 1, 2), date(2024, 1, 3), date(2024, 2, 1)
#: Upstream publishes (rowsUpdatedAt, epoch seconds), oldest first.
V1, V2, V3 = 1_704_153_600, 1_704_240_000, 1_704_326_400


def window_request(start: date = JAN_1, stop: date = JAN_3, request_id: str = "req-1") -> IngestRequest:
    event = BackfillRequested(domain=DOMAIN, dataset_id=DATASET, start=start, stop=stop, request_id=request_id)
    return IngestRequest.for_window(event)


def refresh_request(rows_updated_at: int, previous: int | None = None) -> IngestRequest:
    event = DatasetRefreshed(
        domain=DOMAIN, dataset_id=DATASET, rows_updated_at=rows_updated_at, previous_rows_updated_at=previous
    )
    return IngestRequest.for_refresh(event)


def land(request: IngestRequest, upstream: FakeUpstream, landing: FakeLanding, committed_through: int | None = None):
    plan = plan_fetch(request, upstream, committed_through)
    return fetch_and_land(request, plan, upstream, landing, run_id="run-1", page_size=10)


# ---------------------------------------------------------------------------------------------- plan


def test_a_window_asks_for_its_days_and_bounds_versions_by_the_publish_read_before_paging():
    upstream = FakeUpstream(day_rows(JAN_1, version=V1), rows_updated_at=V2)

    plan = plan_fetch(window_request(), upstream, committed_through=V1)

    assert plan == FetchPlan(where=window_where(JAN_1, JAN_3), through=V2)
    assert upstream.requests == [("metadata", None)]


def test_a_first_refresh_asks_for_every_version_up_to_its_publish():
    plan = plan_fetch(refresh_request(V1), FakeUpstream(), committed_through=None)

    assert plan == FetchPlan(where=updated_between_where(None, V1), after=None, through=V1)


def test_a_refresh_fetches_from_the_ledgers_mark_not_from_its_events_previous_publish():
    """Refreshes V1 and V2 were announced but never committed: the ledger says V1 is the last committed publish,
    so the refresh of V3 (whose event says the previous publish was V2) also fetches what V2 published."""
    upstream = FakeUpstream()

    plan = plan_fetch(refresh_request(V3, previous=V2), upstream, committed_through=V1)

    assert (plan.after, plan.through, plan.covered) == (V1, V3, False)
    assert plan.where == updated_between_where(V1, V3)
    assert upstream.requests == []  # a refresh's bounds come from its event and the ledger, not the upstream


@pytest.mark.parametrize("mark", [V2, V3])
def test_a_refresh_the_ledger_has_already_passed_is_covered(mark):
    plan = plan_fetch(refresh_request(V2, previous=V1), FakeUpstream(), committed_through=mark)

    assert plan.covered


# ---------------------------------------------------------------------------------------------- fetch and land


def test_a_fetch_whose_rows_match_the_upstreams_count_is_landed_page_by_page_and_sealed():
    upstream = FakeUpstream([*day_rows(JAN_1, version=V1), *day_rows(JAN_2, version=V1), *day_rows(JAN_3, version=V1)])
    landing = FakeLanding()
    request = window_request()

    manifest = land(request, upstream, landing)

    assert manifest.rows == manifest.upstream_rows == 48  # Jan 1 and 2, not Jan 3: stop is exclusive
    assert [p.rows for p in manifest.pages] == [10, 10, 10, 10, 8]
    assert manifest.prefix == f"{request.landing_scope}/run=run-1"
    assert (manifest.where, manifest.through, manifest.after) == (window_where(JAN_1, JAN_3), V1, None)
    assert {":id", ":updated_at", "plaza_id", "date", "vehicles_e_zpass"} <= set(manifest.columns)
    assert landing.manifests == {manifest.prefix: manifest}  # sealed: what the load will read
    assert [m for m, _ in upstream.requests] == ["metadata", "count", "pages", "count"]


def test_rows_the_fetch_cannot_account_for_fail_it_with_both_numbers_and_nothing_is_sealed():
    upstream = FakeUpstream(day_rows(JAN_1, version=V1))
    upstream.hide_from_pages(day_rows(JAN_1, version=V1)[5][":id"])
    landing = FakeLanding()

    with pytest.raises(UnaccountedRowsError, match=r"fetched 23 rows but the upstream counts 24") as refused:
        land(window_request(), upstream, landing)

    assert "nothing was committed" in str(refused.value)
    assert landing.manifests == {}


def test_a_publish_while_the_window_is_paged_makes_the_fetch_page_again_and_the_seal_holds_the_new_rows():
    upstream = FakeUpstream(day_rows(JAN_1, version=V1))
    upstream.while_paging(lambda: upstream.publish(day_rows(JAN_2, version=V2), at=V2))
    landing = FakeLanding()

    manifest = land(window_request(), upstream, landing)

    assert manifest.rows == manifest.upstream_rows == 48
    assert [m for m, _ in upstream.requests].count("pages") == 2
    assert list(landing.manifests) == [manifest.prefix]


def test_an_upstream_that_keeps_changing_under_the_fetch_fails_it_after_the_last_paging():
    upstream = FakeUpstream(day_rows(JAN_1, version=V1))
    for hour in range(FETCH_ATTEMPTS):
        upstream.while_paging(lambda hour=hour: upstream.publish([socrata_row(JAN_2, hour, version=V2)], at=V2))
    landing = FakeLanding()

    with pytest.raises(UnaccountedRowsError, match="kept changing rows of this query while it was paged "):
        land(window_request(), upstream, landing)

    assert [m for m, _ in upstream.requests].count("pages") == FETCH_ATTEMPTS
    assert landing.manifests == {}


# ---------------------------------------------------------------------------------------------- load


def landed(
    request: IngestRequest, rows: list[dict[str, str]], *, through: int = V2
) -> tuple[LandingManifest, FakeLanding]:
    upstream = FakeUpstream(rows, rows_updated_at=through)
    landing = FakeLanding()
    plan = plan_fetch(request, upstream, None)
    return fetch_and_land(request, plan, upstream, landing, run_id="run-1", page_size=1000), landing


def test_a_window_load_replaces_its_days_in_one_commit_that_records_the_load_in_the_ledger():
    request = window_request(JAN_1, FEB_1)
    manifest, landing = landed(request, [*day_rows(JAN_1, version=V1), *day_rows(JAN_2, version=V1)])
    store = FakeTableStore()

    result = load_landing(request, manifest, landing, store, flow_run_id="fr-1")

    [commit] = store.commits
    assert commit.kind == "window"
    assert (commit.window, commit.through, commit.months) == (Window(start=JAN_1, stop=FEB_1), V2, ["2024-01"])
    assert commit.rows.num_rows == result.rows_written == result.rows_read == 48
    assert commit.properties[contract.REFRESH_ID] == request.refresh_id
    assert commit.properties[contract.MODE] == "window"
    assert commit.properties[contract.FLOW_RUN_ID] == "fr-1"
    # a window load replaces every day of its window, even days the upstream no longer has
    assert commit.properties[contract.TOUCHED] == "2024-01-01/2024-02-01"
    assert result.touched == Window(start=JAN_1, stop=FEB_1)
    assert (result.snapshot_id, result.already_committed, result.rows_rejected) == (commit.snapshot_id, False, 0)
    assert result.rows_per_day_plaza == {(JAN_1, 1): 24, (JAN_2, 1): 24}


def test_a_refresh_merges_the_days_it_fetched_and_moves_the_ledgers_mark_to_its_publish():
    request = refresh_request(V2, previous=V1)
    manifest, landing = landed(request, day_rows(JAN_2, version=V2), through=V2)
    store = FakeTableStore()
    store.record({contract.REFRESH_ID: "earlier", contract.MODE: "refresh"}, through=V1)

    result = load_landing(request, manifest, landing, store, flow_run_id="fr-2")

    commit = store.commits[-1]
    assert (commit.kind, commit.through) == ("merge", V2)
    assert commit.properties[contract.TOUCHED] == "2024-01-02/2024-01-03"  # the days its rows are on
    assert commit.properties[contract.COMMITTED_THROUGH] == str(V2)
    assert contract.WINDOW not in commit.properties
    assert result.committed_through == V2
    assert result.touched == Window(start=JAN_2, stop=JAN_3)


def test_bad_rows_are_quarantined_with_their_reason_and_the_good_rows_still_load():
    rows = [
        *day_rows(JAN_1, version=V1, hours=3),
        socrata_row(JAN_1, 3, version=V1, direction="N"),
        socrata_row(JAN_1, 4, version=V1, e_zpass="lots"),
        socrata_row(JAN_2, 24, version=V1),
    ]
    request = window_request(JAN_1, JAN_3)
    manifest, landing = landed(request, rows)
    store = FakeTableStore()

    result = load_landing(request, manifest, landing, store, flow_run_id=None)

    assert (result.rows_read, result.rows_written, result.rows_rejected) == (6, 3, 3)
    assert result.reject_reasons == {
        "direction: not I or O": 1,
        "vehicles_e_zpass: not a non-negative integer": 1,
        "hour: not 0-23": 1,
    }
    [(name, quarantined)] = landing.rejected.items()
    assert name.startswith("rejected/")
    assert result.rejected_blobs == [name]
    # each raw row as received, with the reason it was refused
    assert sorted((q["row"][":id"], q["reason"]) for q in quarantined) == sorted(
        zip(
            [r[":id"] for r in rows[3:]],
            ["direction: not I or O", "vehicles_e_zpass: not a non-negative integer", "hour: not 0-23"],
            strict=True,
        )
    )
    assert store.commits[-1].rows.num_rows == 3
    assert contract.FLOW_RUN_ID not in store.commits[-1].properties


def test_a_key_fetched_twice_is_written_once_with_its_newest_version():
    newer = socrata_row(JAN_1, 0, version=V2, e_zpass=555, row_id="row-b")
    request = window_request()
    manifest, landing = landed(request, [socrata_row(JAN_1, 0, version=V1, row_id="row-a"), newer])
    store = FakeTableStore()

    result = load_landing(request, manifest, landing, store, flow_run_id=None)

    written = store.commits[-1].rows.to_pylist()
    assert [(r["hour"], r["vehicles_e_zpass"], r["source_row_id"]) for r in written] == [(0, 555, "row-b")]
    assert result.rows_written == 1


def test_a_replayed_refresh_commits_nothing_and_names_the_snapshot_that_has_it():
    request = refresh_request(V2, previous=V1)
    manifest, landing = landed(request, day_rows(JAN_2, version=V2))
    store = FakeTableStore()
    first = load_landing(request, manifest, landing, store, flow_run_id="fr-1")

    again = load_landing(request, manifest, landing, store, flow_run_id="fr-2")

    assert len(store.commits) == 1
    assert (again.snapshot_id, again.already_committed, again.rows_written) == (first.snapshot_id, True, 0)


def test_a_commit_that_loses_to_a_concurrent_load_is_rebuilt_and_its_rows_are_counted_once():
    request = window_request()
    manifest, landing = landed(request, day_rows(JAN_1, version=V1))
    store = FakeTableStore()
    store.conflict_next(1)

    result = load_landing(request, manifest, landing, store, flow_run_id=None)

    assert store.attempts == 2
    assert len(store.commits) == 1
    assert result.rows_written == store.commits[0].rows.num_rows == 24
    assert result.rows_per_day_plaza == {(JAN_1, 1): 24}


# ---------------------------------------------------------------------------------------------- re-runs


def test_a_load_the_ledger_does_not_have_is_not_a_previous_load():
    assert previous_load(window_request(), FakeTableStore(), FakeLanding()) is None


def test_a_committed_load_whose_completion_was_never_announced_is_news_for_its_rerun():
    request = window_request()
    store = FakeTableStore()
    props = request.snapshot_properties("fr-1") | {contract.TOUCHED: "2024-01-01/2024-01-03"}
    snapshot = store.record(props, through=V1)
    landing = FakeLanding()

    unannounced = previous_load(request, store, landing)
    landing.mark_announced(request.landing_scope)
    announced = previous_load(request, store, landing)

    assert unannounced is not None
    assert announced is not None
    assert (unannounced.snapshot_id, unannounced.already_committed) == (snapshot, False)
    assert unannounced.touched == Window(start=JAN_1, stop=JAN_3)
    assert unannounced.committed_through == V1
    assert announced.already_committed


def test_a_load_committed_before_days_were_recorded_stays_a_replay():
    request = window_request()
    store = FakeTableStore()
    store.record(request.snapshot_properties("fr-old"))

    found = previous_load(request, store, FakeLanding())

    assert found is not None
    assert found.already_committed
    assert found.touched is None


def test_a_covered_refresh_is_announced_as_already_committed_at_the_current_snapshot():
    store = FakeTableStore()
    store.record({contract.REFRESH_ID: "r-older"}, through=V1)
    current = store.record({contract.REFRESH_ID: "r-later"}, through=V3)

    result = covered_load(store)

    assert (result.snapshot_id, result.already_committed, result.committed_through) == (current, True, V3)
    assert (result.rows_read, result.rows_written) == (0, 0)


def test_requests_refuse_what_cannot_be_loaded():
    with pytest.raises(ValueError, match="a window ingest needs start and stop"):
        IngestRequest(mode="window", domain=DOMAIN, dataset_id=DATASET, refresh_id="x")
    with pytest.raises(ValueError, match="a refresh ingest needs rows_updated_at"):
        IngestRequest(mode="refresh", domain=DOMAIN, dataset_id=DATASET, refresh_id="x")


def test_the_same_publish_is_the_same_load_and_its_ledger_entry_names_it():
    one, two = refresh_request(V2, previous=V1), refresh_request(V2, previous=None)
    assert one.refresh_id == two.refresh_id  # the previous publish is information only
    assert one.snapshot_properties(None) == {contract.REFRESH_ID: one.refresh_id, contract.MODE: "refresh"}
    assert datetime.fromtimestamp(V2, UTC).date() == JAN_3  # the fixtures' versions are January 2024
