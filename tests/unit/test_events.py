"""The event contract: deterministic ids, validation and the exact body Prefect's events API takes."""

from __future__ import annotations

import uuid
from datetime import date

import pytest
from pydantic import ValidationError

from tests.support.payloads import completion
from tollwatch.contract.events import (
    BackfillRequested,
    DatasetRefreshed,
    EventName,
    TollwatchEvent,
    Window,
    flow_run_resource,
)


def refreshed(rows_updated_at: int = 1_767_225_600, **kw) -> DatasetRefreshed:
    return DatasetRefreshed(domain="data.ny.gov", dataset_id="qzve-kjga", rows_updated_at=rows_updated_at, **kw)


def test_the_same_publish_always_gets_the_same_event_id():
    assert refreshed().event_id() == refreshed(previous_rows_updated_at=5, source="eventgrid").event_id()
    assert refreshed().event_id() != refreshed(rows_updated_at=1_767_225_601).event_id()


def test_backfill_chunk_ids_depend_on_window_and_request():
    a = BackfillRequested(
        domain="d", dataset_id="abcd-efgh", start=date(2024, 1, 1), stop=date(2024, 2, 1), request_id="r1"
    )
    again = a.model_copy()
    rerun = a.model_copy(update={"request_id": "r2"})
    assert a.event_id() == again.event_id()
    assert a.event_id() != rerun.event_id()
    assert a.refresh_id != rerun.refresh_id


@pytest.mark.parametrize(
    ("start", "stop"), [(date(2024, 2, 1), date(2024, 1, 1)), (date(2024, 1, 1), date(2024, 1, 1))]
)
def test_windows_must_move_forward(start, stop):
    with pytest.raises(ValidationError, match="stop is exclusive"):
        Window(start=start, stop=stop)
    with pytest.raises(ValidationError):
        BackfillRequested(domain="d", dataset_id="abcd-efgh", start=start, stop=stop, request_id="r")


def test_payloads_reject_unknown_fields():
    with pytest.raises(ValidationError, match="extra"):
        DatasetRefreshed(domain="d", dataset_id="x", rows_updated_at=1, surprise=True)


def test_prefect_body_has_the_shape_of_the_events_api():
    run = uuid.uuid4()
    event = TollwatchEvent.of(refreshed(previous_rows_updated_at=1), related=(flow_run_resource(run, "a-run"),))
    body = event.to_prefect()
    assert body["event"] == "tollwatch.dataset.refreshed" == EventName.DATASET_REFRESHED
    assert body["id"] == str(refreshed().event_id())
    assert body["resource"] == {
        "prefect.resource.id": "socrata.data.ny.gov.qzve-kjga",
        "prefect.resource.role": "dataset",
        "tollwatch.refresh-id": refreshed().refresh_id,  # pairs this announcement with its load's completion
    }
    assert body["related"] == [
        {
            "prefect.resource.id": f"prefect.flow-run.{run}",
            "prefect.resource.name": "a-run",
            "prefect.resource.role": "flow-run",
        }
    ]
    assert body["payload"]["rows_updated_at"] == 1_767_225_600
    assert body["payload"]["previous_rows_updated_at"] == 1


def test_completion_resource_names_the_table_and_id_follows_the_refresh():
    done = completion(
        window=Window(start=date(2024, 1, 1), stop=date(2024, 1, 2)),
        refresh_id="r",
        rows_fetched=1,
        rows_written=1,
        snapshot_id=7,
    )
    event = TollwatchEvent.of(done)
    assert event.resource.id == "iceberg.tollwatch.bronze.bnt_traffic_hourly"
    assert event.id == done.model_copy(update={"rows_written": 2}).event_id()  # a replay announces the same fact
    assert event.payload["window"] == {"start": "2024-01-01", "stop": "2024-01-02"}
    # Triggers match resource labels only: the fields subscriptions filter on are copied there.
    labels = event.to_prefect()["resource"]
    assert labels["tollwatch.table"] == "bronze.bnt_traffic_hourly"
    assert labels["tollwatch.mode"] == "window"
    assert labels["tollwatch.already-committed"] == "false"
