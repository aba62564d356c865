"""prefect.yaml on a real Prefect server: event triggers create ingest runs with typed parameters (no schedules)."""

from __future__ import annotations

import time
from datetime import date
from pathlib import Path

import httpx
import pytest

from tests.support.prefect_events import prefect_auth_string, prefect_headers
from tests.support.prefect_runs import wait_for_runs
from tollwatch.adapters.prefect_events import PrefectEventsEmitter
from tollwatch.contract.events import BackfillRequested, DatasetRefreshed, TollwatchEvent

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.stack


def test_deploy_creates_one_queue_per_deployment_with_its_concurrency_limit(deployed):
    """The worker is only handed runs that can start (no rejected Pending proposals while a backfill queues)."""
    queues = httpx.post(
        f"{deployed}/work_pools/tollwatch-local/queues/filter", json={}, timeout=10, headers=prefect_headers()
    ).json()
    limits = {q["name"]: q["concurrency_limit"] for q in queues}
    assert limits["ingest"] == 2
    assert limits["jobs"] == 4
    deployments = httpx.post(f"{deployed}/deployments/filter", json={}, timeout=10, headers=prefect_headers()).json()
    queue_of = {d["name"]: d["work_queue_name"] for d in deployments}
    assert (queue_of["ingest"], queue_of["run-job"]) == ("ingest", "jobs")


def runs_of(api: str, key: str, value: object) -> list[dict]:
    return wait_for_runs(api, lambda run: run["parameters"].get(key) == value)


def emit(api: str, payload) -> None:
    PrefectEventsEmitter(httpx.Client(timeout=10), api, auth_string=prefect_auth_string()).emit(
        [TollwatchEvent.of(payload)]
    )


def test_dataset_refreshed_starts_an_ingest_run_with_typed_parameters(deployed):
    emit(deployed, DatasetRefreshed(domain="data.ny.gov", dataset_id="qzve-kjga", rows_updated_at=1_800_000_123))
    runs = runs_of(deployed, "rows_updated_at", 1_800_000_123)
    assert len(runs) == 1
    assert runs[0]["parameters"] == {"rows_updated_at": 1_800_000_123, "previous_rows_updated_at": None}
    assert runs[0]["deployment_id"] is not None


def test_backfill_requested_starts_a_window_run_and_a_duplicate_event_does_not(deployed):
    chunk = BackfillRequested(
        domain="data.ny.gov",
        dataset_id="qzve-kjga",
        start=date(2024, 5, 1),
        stop=date(2024, 6, 1),
        request_id="deploy-test",
    )
    emit(deployed, chunk)
    emit(deployed, chunk)  # a retried emit: same deterministic id, dropped by Prefect
    runs = runs_of(deployed, "request_id", "deploy-test")
    time.sleep(3)  # give a (wrong) second run the chance to appear before counting
    runs = runs_of(deployed, "request_id", "deploy-test")
    assert len(runs) == 1
    assert runs[0]["parameters"] == {"start": "2024-05-01", "stop": "2024-06-01", "request_id": "deploy-test"}
