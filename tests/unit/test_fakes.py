"""The fakes (tests/support/fakes.py) are held to what they stand in for, so a unit test cannot pass on a fake that
behaves unlike production: every port's methods exist on the real class and on its fake with the parameters the
core passes; the fake table store keeps the ledger as `IcebergTableStore` does (checked on both, pyiceberg on a
temp directory); the fake upstream reads the `$where` forms the core builds with Socrata's meaning.
"""

from __future__ import annotations

import inspect
from datetime import UTC, date, datetime
from pathlib import Path

import pytest

from tests.support.fakes import (
    CountsUpstream,
    FakeJsonState,
    FakeLanding,
    FakeTableStore,
    FakeUpstream,
    RecordingSink,
    day_rows,
    matches,
    socrata_row,
)
from tests.support.tables import local_table_store
from tollwatch.adapters.blob_state import JsonBlobStore
from tollwatch.adapters.prefect_events import PrefectEventsEmitter, WebhookEmitter
from tollwatch.adapters.socrata import SocrataClient, updated_after_where, updated_between_where, window_where
from tollwatch.contract import table as contract
from tollwatch.contract.events import Window
from tollwatch.core import ports
from tollwatch.core.landing import LandingZone
from tollwatch.core.schema import convert, target_schema
from tollwatch.core.table import IcebergTableStore

#: port -> (the real classes production wires in, its fakes)
IMPLEMENTATIONS: dict[type, tuple[tuple[type, ...], tuple[type, ...]]] = {
    ports.EventSink: ((PrefectEventsEmitter, WebhookEmitter), (RecordingSink,)),
    ports.UpstreamMetadata: ((SocrataClient,), (FakeUpstream,)),
    ports.UpstreamRows: ((SocrataClient,), (FakeUpstream,)),
    ports.UpstreamCounts: ((SocrataClient,), (FakeUpstream, CountsUpstream)),
    ports.Landing: ((LandingZone,), (FakeLanding,)),
    ports.TableStore: ((IcebergTableStore,), (FakeTableStore,)),
    ports.JsonState: ((JsonBlobStore,), (FakeJsonState,)),
}


def _members(protocol: type) -> list[str]:
    return [name for name in protocol.__dict__ if not name.startswith("_")]


def _accepts(implementation: object, declared: inspect.Signature) -> list[str]:
    """What is wrong with `implementation` as a callee of `declared` (empty: the core's calls work on it)."""
    actual = inspect.signature(implementation)  # type: ignore[arg-type]
    problems = []
    for name, parameter in declared.parameters.items():
        if name == "self":
            continue
        if name not in actual.parameters:
            problems.append(f"no parameter {name!r}")
        elif actual.parameters[name].kind != parameter.kind:
            problems.append(f"{name!r} is {actual.parameters[name].kind.description}, not {parameter.kind.description}")
    for name, parameter in actual.parameters.items():
        if name not in declared.parameters and parameter.default is inspect.Parameter.empty and name != "self":
            problems.append(f"extra required parameter {name!r}")
    return problems


@pytest.mark.parametrize("port", list(IMPLEMENTATIONS), ids=lambda p: p.__name__)
def test_the_real_classes_and_the_fakes_take_every_call_the_port_declares(port):
    real, fakes = IMPLEMENTATIONS[port]
    for cls in (*real, *fakes):
        for name in _members(port):
            member = getattr(port, name)
            assert hasattr(cls, name), f"{cls.__name__} lacks {port.__name__}.{name}"
            if isinstance(member, property):
                continue
            problems = _accepts(getattr(cls, name), inspect.signature(member))
            assert problems == [], f"{cls.__name__}.{name} as {port.__name__}.{name}: {problems}"


def test_the_core_reuses_the_event_sink_of_the_events_adapter():
    from tollwatch.adapters.prefect_events import EventSink

    assert ports.EventSink is EventSink


# ---------------------------------------------------------------------------------------------- the table store

V1, V2 = 1_704_153_600, 1_704_240_000
JAN = Window(start=date(2024, 1, 1), stop=date(2024, 1, 3))


def _month(day: date, version: int) -> list[tuple[str, object]]:
    rows = day_rows(day, version=version, hours=2)
    schema = target_schema({key for row in rows for key in row})
    return [(f"{day:%Y-%m}", convert(rows, schema).good)]


@pytest.fixture(params=["fake", "iceberg"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ports.TableStore:
    return FakeTableStore() if request.param == "fake" else local_table_store(tmp_path)


def test_the_ledger_names_each_load_its_days_and_the_mark_the_same_way_on_the_fake_and_the_real_store(store):
    schema = target_schema(socrata_row(JAN.start).keys())
    assert (store.committed("w"), store.committed_load("w"), store.committed_through()) == (None, None, None)

    window_props = contract.load_properties("w", "window", (JAN.start, JAN.stop), "fr-1") | {
        contract.TOUCHED: contract.encode_days(JAN.start, JAN.stop)
    }
    window_snapshot = store.commit_window(JAN, _month(JAN.start, V1), schema, window_props, fetched_through=V1)
    assert store.committed_through() is None  # a window says nothing about versions published elsewhere

    refresh_props = contract.load_properties("r", "refresh", None, "fr-2")
    refresh_snapshot = store.commit_merge(_month(date(2024, 1, 2), V2), schema, refresh_props, through=V2)
    empty_props = contract.load_properties("r-empty", "refresh", None, None)
    store.commit_merge([], schema, empty_props, through=V1)  # changes no row: still a ledger entry, mark kept

    load = store.committed_load("w")
    assert load is not None
    assert (load.snapshot_id, load.flow_run_id, load.touched) == (window_snapshot, "fr-1", JAN)
    assert store.committed("r") == refresh_snapshot
    assert store.committed_load("r").touched is None  # type: ignore[union-attr]
    assert store.committed("r-empty") is not None
    assert store.committed_through() == V2  # never moves back
    assert store.info().snapshot_id == store.committed("r-empty")


# ---------------------------------------------------------------------------------------------- the upstream


def _at(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp())


def test_the_fake_upstream_reads_the_where_forms_the_core_builds_with_socratas_meaning():
    published = socrata_row(date(2024, 1, 2), version=_at("2024-01-10T12:00:00"))
    published[":updated_at"] = "2024-01-10T12:00:00.500Z"  # a version may carry milliseconds

    assert matches(published, window_where(date(2024, 1, 2), date(2024, 1, 3)))
    assert not matches(published, window_where(date(2024, 1, 1), date(2024, 1, 2)))  # stop is exclusive
    # a version stamped within the second of a publish belongs to that publish
    assert matches(published, updated_between_where(None, _at("2024-01-10T12:00:00")))
    assert not matches(published, updated_between_where(_at("2024-01-10T12:00:00"), _at("2024-01-11T00:00:00")))
    assert matches(published, updated_between_where(_at("2024-01-10T11:59:59"), _at("2024-01-10T12:00:00")))
    assert matches(published, updated_after_where(_at("2024-01-10T11:59:59")))
    with pytest.raises(ValueError, match="does not understand"):
        matches(published, "date in ('2024-01-02')")


def test_the_fake_upstream_pages_in_id_order_and_counts_what_it_serves():
    upstream = FakeUpstream(day_rows(date(2024, 1, 1), version=V1, hours=5))

    pages = list(upstream.pages(upstream.dataset_id, where=None, page_size=2))

    assert [(p.number, p.offset, p.row_count) for p in pages] == [(0, 0, 2), (1, 2, 2), (2, 4, 1)]
    assert upstream.count(upstream.dataset_id, where=None) == 5
    assert upstream.counts_by_day(upstream.dataset_id, where=None) == {date(2024, 1, 1): 5}
    assert upstream.metadata(upstream.dataset_id).rows_updated_at == V1
