"""Fault suite, the ledger (issue 12): the table is the truth about what is loaded, versions only move forward, and a
load accounts for its rows before it commits.

Every test drives the real ingest flow in-process (`tollwatch.prefect.flows.ingest.ingest`) against the session's
Prefect server,
Azurite, the Socrata mirror and a pyiceberg warehouse on disk (fixtures in tests/conftest.py); "nothing lost" is
checked as in the rest of the fault suite: the table's rows equal the mirror's rows, every key once, each at its
latest upstream version. The end-to-end versions through the worker and the automations are in
test_faults_missed_runs.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import date
from typing import Any

import pytest

from tests.support.ingest_faults import assert_same_rows, mirror_rows, snapshot_ids, table_rows_by_key
from tests.support.prefect_events import wait_for_events
from tollwatch import resources
from tollwatch.adapters.socrata import SocrataClient
from tollwatch.contract.events import EventName
from tollwatch.contract.settings import load_settings
from tollwatch.core.ingest import IngestRequest, fetch_and_land, load_landing, plan_fetch
from tollwatch.core.landing import LandingManifest
from tollwatch.prefect.flows.ingest import build_request, ingest
from tollwatch_dev.mirror import MirrorServer
from tollwatch_dev.synthetic import ROWS_PER_DAY

pytestmark = pytest.mark.stack

PAGE = 2000


@pytest.fixture(autouse=True)
def small_pages(monkeypatch: pytest.MonkeyPatch) -> None:
    """Several pages per load, so a fault can land between two pages of one run."""
    monkeypatch.setenv("TOLLWATCH_UPSTREAM_PAGE_SIZE", str(PAGE))


def everything(mirror: MirrorServer) -> dict:
    """Every row the upstream holds now, as the table should hold it."""
    return mirror_rows(mirror, "date >= '2000-01-01T00:00:00'")


def table_days() -> list[date]:
    return sorted({key[1] for key in table_rows_by_key()})


def committed_through() -> int | None:
    return resources.table_store(load_settings()).committed_through()


def test_refreshes_that_never_ran_are_covered_by_the_next_one(env: dict[str, str], mirror: MirrorServer) -> None:
    """The issue's hole: refresh A completes; publishes B and C are announced but their runs never happen (the event
    was lost, the action failed, the run crashed before running); then publish D's refresh runs, its event naming C
    as the previous publish.
    Expected: D fetches from what the table has committed (A), not from C: every published day is in the table
    exactly once, and the ledger's mark is D's publish."""
    base = mirror.dataset.rows_updated_at
    a = mirror.dataset.publish(days=7)  # 2024-04-01..07
    ingest(rows_updated_at=a.updated_at, previous_rows_updated_at=base)
    b = mirror.dataset.publish(days=7)  # 04-08..14: its run never happened
    c = mirror.dataset.publish(days=7)  # 04-15..21: nor this one
    d = mirror.dataset.publish(days=7)  # 04-22..28

    completed = ingest(rows_updated_at=d.updated_at, previous_rows_updated_at=c.updated_at)

    assert b.updated_at < c.updated_at < d.updated_at
    assert completed.rows_fetched == 21 * ROWS_PER_DAY, "B, C and D: everything after the committed mark A"
    assert completed.committed_through == d.updated_at == committed_through()
    assert table_days()[-28:] == [date.fromordinal(date(2024, 4, 1).toordinal() + i) for i in range(28)]
    assert_same_rows(table_rows_by_key(), everything(mirror))


def test_a_late_run_of_a_refresh_a_later_one_covered_fetches_and_commits_nothing(
    env: dict[str, str], mirror: MirrorServer
) -> None:
    """Refresh B's run is late (a repair, a retry after a crash) and refresh C, which covered B's publish, has
    already committed. Expected: B asks the upstream for no rows, commits no snapshot, and announces itself as
    already committed (subscribers already heard of C); the table and the mark are C's."""
    base = mirror.dataset.rows_updated_at
    b = mirror.dataset.publish(days=7)
    c = mirror.dataset.publish(days=7)
    ingest(rows_updated_at=c.updated_at, previous_rows_updated_at=b.updated_at)
    snapshots, rows = snapshot_ids(), table_rows_by_key()
    mirror.dataset.clear_requests()

    late = ingest(rows_updated_at=b.updated_at, previous_rows_updated_at=base)

    assert late.already_committed is True
    assert late.rows_fetched == 0
    assert [r for r in mirror.dataset.requests if r.path.startswith("/resource/")] == []
    assert snapshot_ids() == snapshots
    assert table_rows_by_key() == rows
    assert committed_through() == c.updated_at


def test_a_fetch_that_cannot_account_for_its_rows_commits_nothing(env: dict[str, str], mirror: MirrorServer) -> None:
    """The upstream answers one page of a 14-day window with an empty 200 (a broken gateway, a cache): paging ends
    early with 2,000 of 7,392 rows. Expected: the load compares its rows with the upstream's count(*) for the same
    query, fails naming both numbers, and commits nothing — a window is never replaced by fewer rows than the
    upstream holds (before the fix it was replaced by 2,000 rows)."""
    ingest(start=date(2024, 3, 1), stop=date(2024, 3, 15), request_id="complete")
    snapshots, rows = snapshot_ids(), table_rows_by_key()
    # request 1 is the count before paging, request 2 page 0; the next one (page 1) gets an empty array
    mirror.dataset.after_requests(2, faults={"fail_next": [{"status": 200, "body": "[]"}]})

    state = ingest(start=date(2024, 3, 1), stop=date(2024, 3, 15), request_id="short", return_state=True)

    assert state.is_failed()
    (event,) = wait_for_events(
        env["PREFECT_API_URL"],
        EventName.INGESTION_FAILED,
        lambda e: e["payload"]["flow_run_id"] == str(state.state_details.flow_run_id),
    )
    assert event["payload"]["error_class"] == "UnaccountedRowsError"
    assert f"fetched {PAGE} rows but the upstream counts {14 * ROWS_PER_DAY}" in event["payload"]["error_message"]
    assert snapshot_ids() == snapshots
    assert table_rows_by_key() == rows


def test_the_completion_event_carries_the_committed_mark_and_the_reconciled_counts(
    env: dict[str, str], mirror: MirrorServer
) -> None:
    """The first refresh of an empty table loads the whole history (there is no committed mark to start from);
    its completion event says what the table is now committed through, and the upstream's and the table's row
    counts for the days it touched, reconciled after the commit."""
    base = mirror.dataset.rows_updated_at
    a = mirror.dataset.publish(days=1)
    completed = ingest(rows_updated_at=a.updated_at, previous_rows_updated_at=base)
    (event,) = wait_for_events(
        env["PREFECT_API_URL"],
        EventName.INGESTION_COMPLETED,
        lambda e: e["payload"]["refresh_id"] == completed.refresh_id,
    )
    assert event["payload"]["committed_through"] == a.updated_at
    assert event["payload"]["window"] == {"start": "2024-01-01", "stop": "2024-04-02"}
    assert event["payload"]["upstream_rows"] == event["payload"]["table_rows"] == 92 * ROWS_PER_DAY
    assert event["resource"]["tollwatch.refresh-id"] == completed.refresh_id


# ------------------------------------------------------------------------------------ versions only move forward


def fetch_now(parameters: dict[str, Any]) -> tuple[IngestRequest, LandingManifest]:
    """The first half of a run: plan and land (what a run that will commit late has done already)."""
    settings = load_settings()
    request = build_request(settings, parameters)
    socrata = resources.socrata_client(settings)
    plan = plan_fetch(request, socrata, resources.table_store(settings).committed_through())
    manifest = fetch_and_land(request, plan, socrata, resources.landing_zone(settings), run_id="late", page_size=PAGE)
    return request, manifest


def commit_later(request: IngestRequest, manifest: LandingManifest) -> None:
    """The second half of that run, after other loads committed."""
    settings = load_settings()
    load_landing(
        request, manifest, resources.landing_zone(settings), resources.table_store(settings), flow_run_id="late"
    )


def test_a_refresh_that_fetched_earlier_and_commits_later_does_not_revert_a_newer_one(
    env: dict[str, str], mirror: MirrorServer
) -> None:
    """Two refreshes finish out of order (the deployment runs two loads at once): X (April 1-7) has fetched; the
    upstream then corrects April 3-5 and Y's run fetches and commits that; X commits last, with the old versions.
    Expected: April 3-5 keep Y's versions (newest `:updated_at` wins per key), X's other days are merged, and the
    ledger's mark stays at Y's publish. Before the fix X's merge put the old versions back."""
    base = mirror.dataset.rows_updated_at
    ingest(rows_updated_at=base)  # the history so far: the ledger's mark
    x = mirror.dataset.publish(days=7)
    request, manifest = fetch_now({"rows_updated_at": x.updated_at, "previous_rows_updated_at": base})
    y = mirror.dataset.revise(date(2024, 4, 3), date(2024, 4, 6))
    ingest(rows_updated_at=y.updated_at, previous_rows_updated_at=x.updated_at)

    commit_later(request, manifest)

    assert_same_rows(table_rows_by_key(), everything(mirror))
    revised = [v for k, v in table_rows_by_key().items() if date(2024, 4, 3) <= k[1] < date(2024, 4, 6)]
    assert len(revised) == 3 * ROWS_PER_DAY
    assert {int(v["source_updated_at"].timestamp()) for v in revised} == {y.updated_at}
    assert committed_through() == y.updated_at


def test_a_window_that_fetched_before_a_correction_and_commits_after_it_cannot_revert_it(
    env: dict[str, str], mirror: MirrorServer
) -> None:
    """A backfill of March 1-14 has fetched; the upstream then corrects March 5-7 and that refresh commits; the
    backfill commits last. Expected: March 5-7 keep the corrected versions; nothing is deleted (every stored row the
    window did not return is newer than its fetch)."""
    ingest(rows_updated_at=mirror.dataset.rows_updated_at)
    request, manifest = fetch_now({"start": date(2024, 3, 1), "stop": date(2024, 3, 15), "request_id": "slow"})
    correction = mirror.dataset.revise(date(2024, 3, 5), date(2024, 3, 8))
    ingest(rows_updated_at=correction.updated_at)

    commit_later(request, manifest)

    assert_same_rows(table_rows_by_key(), everything(mirror))


def test_a_window_load_removes_rows_deleted_upstream_and_keeps_rows_published_after_its_fetch(
    env: dict[str, str], mirror: MirrorServer
) -> None:
    """Deletions: the upstream deletes March 10-11 and a window load of March replaces them with nothing (they are
    absent from its fetch and no newer than it: deleted upstream). A refresh does not delete (Socrata's
    `:updated_at` feed does not show deletions); `tollwatch audit` finds such days."""
    ingest(rows_updated_at=mirror.dataset.rows_updated_at)
    mirror.dataset.delete_days(date(2024, 3, 10), date(2024, 3, 12))

    result = ingest(start=date(2024, 3, 1), stop=date(2024, 4, 1), request_id="after-deletion")

    assert result.rows_fetched == 29 * ROWS_PER_DAY
    assert date(2024, 3, 10) not in table_days()
    assert_same_rows(table_rows_by_key(), everything(mirror))


def test_rows_deleted_upstream_while_a_window_pages_are_paged_again_and_nothing_is_lost(
    env: dict[str, str], mirror: MirrorServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The upstream deletes a day of the window after page 0 was served: offset paging would now skip 528 rows.
    Expected: the count(*) before and after paging differ, the window is paged again, and the table holds the
    window exactly as the upstream does (the deleted day gone, no row skipped)."""
    ingest(rows_updated_at=mirror.dataset.rows_updated_at)
    real_pages = SocrataClient.pages
    deleted: list[object] = []

    def pages_then_delete(self: SocrataClient, *args: Any, **kwargs: Any) -> Iterator[Any]:
        for number, page in enumerate(real_pages(self, *args, **kwargs)):
            yield page
            if number == 0 and not deleted:
                deleted.append(mirror.dataset.delete_days(date(2024, 3, 2), date(2024, 3, 3)))

    monkeypatch.setattr(SocrataClient, "pages", pages_then_delete)

    result = ingest(start=date(2024, 3, 1), stop=date(2024, 3, 15), request_id="deleted-while-paging")

    assert deleted, "the deletion happened mid-paging"
    assert result.rows_fetched == 13 * ROWS_PER_DAY
    assert date(2024, 3, 2) not in table_days()
    assert_same_rows(table_rows_by_key(), everything(mirror))
