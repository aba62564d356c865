"""The two writers agree: pyarrow + pyiceberg (`local`) and Spark (`tollwatch.spark.merge`) on ONE Iceberg table.

Real Spark with the real Iceberg runtime (the jars `make jars` fetches), Iceberg's JDBC catalog on the very SQLite
catalog database pyiceberg's SQL catalog uses, landings fetched from the mirror into Azurite by the flow's own
`fetch_and_land` (the Spark writer reads them from Azurite, as `TOLLWATCH_ENGINE=spark` does), and DuckDB as a third,
independent reader of the final table. Write-audit-publish on Spark: a merge with `--branch` into a load's audit branch
(cut and published by `tollwatch.core.branches`) is seen by no reader of `main` until it is published.
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pytest
from pyspark.sql import SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from tests.support import duckdb_iceberg
from tollwatch import resources
from tollwatch.adapters.socrata import Page, build_http_client
from tollwatch.adapters.spark_submit import catalog_conf, find_jars
from tollwatch.contract import table as contract
from tollwatch.contract.events import Window
from tollwatch.contract.settings import load_settings
from tollwatch.core.branches import Branches, NotFastForward
from tollwatch.core.ingest import IngestRequest, LoadResult, fetch_and_land, load_landing, plan_fetch
from tollwatch.core.landing import LandingManifest
from tollwatch.core.schema import target_schema
from tollwatch.core.table import head, lineage
from tollwatch.spark import merge as spark_merge
from tollwatch.spark.iceberg import Committed, IcebergTable
from tollwatch_dev.mirror import MirrorServer

pytestmark = [pytest.mark.stack, pytest.mark.spark]

DOMAIN = "data.ny.gov"
DATASET = "qzve-kjga"
ROWS_PER_DAY = 11 * 2 * 24
JARS_DIR = Path(__file__).resolve().parents[2] / ".jars"
#: Spark conf for the tests' small merges: no UI, loopback, few shuffle partitions (200 by default: a task each, for
#: a few thousand rows) and the JVM's quick-start JIT; none of it changes what a merge writes.
SMALL_JOB_CONF = {
    "spark.ui.enabled": "false",
    "spark.driver.host": "127.0.0.1",
    "spark.sql.shuffle.partitions": "2",
    "spark.driver.extraJavaOptions": "-XX:TieredStopAtLevel=1",
}


def window_request(start: date, stop: date, refresh_id: str) -> IngestRequest:
    window = Window(start=start, stop=stop)
    return IngestRequest(mode="window", domain=DOMAIN, dataset_id=DATASET, refresh_id=refresh_id, window=window)


def refresh_request(refresh_id: str, rows_updated_at: int) -> IngestRequest:
    return IngestRequest(
        mode="refresh", domain=DOMAIN, dataset_id=DATASET, refresh_id=refresh_id, rows_updated_at=rows_updated_at
    )


@pytest.fixture(scope="module")
def warehouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One catalog database + warehouse for the module: the Spark catalog is bound to it when the JVM starts."""
    path = tmp_path_factory.mktemp("engines") / "warehouse"
    path.mkdir()
    resources.share_sqlite_catalog(path / "catalog.db")
    return path


@pytest.fixture(scope="module")
def spark(warehouse: Path) -> Iterator[SparkSession]:
    """A local Spark with the Iceberg runtime, its catalog `tollwatch` on pyiceberg's catalog database."""
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    properties = {"type": "sql", "uri": f"sqlite:///{warehouse / 'catalog.db'}", "warehouse": warehouse.as_uri()}
    jars = find_jars(JARS_DIR)
    builder = (
        SparkSession.builder.master("local[2]")
        .appName("tollwatch-test-engines")
        .config("spark.jars", ",".join(str(j) for j in jars))
        .config("spark.driver.extraClassPath", os.pathsep.join(str(j) for j in jars))
        .config("spark.ui.enabled", "false")
        .config("spark.sql.shuffle.partitions", "2")
        .config("spark.driver.extraJavaOptions", SMALL_JOB_CONF["spark.driver.extraJavaOptions"])
        .config("spark.sql.session.timeZone", "UTC")
        # ANSI mode (Spark 4's and Databricks serverless' default): the typing must never rely on failing casts
        .config("spark.sql.ansi.enabled", "true")
        .config("spark.driver.host", "127.0.0.1")
    )
    for key, value in catalog_conf(contract.CATALOG, properties).items():
        builder = builder.config(key, value)
    session = builder.getOrCreate()
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


class Engines:
    """Both writers over one test's table (in the module's catalog), landing zone and mirror."""

    def __init__(self, spark: SparkSession) -> None:
        self.spark = spark
        self.settings = load_settings()
        self.landing = resources.landing_zone(self.settings)
        self.store = resources.table_store(self.settings)
        self.spark_table = f"{contract.CATALOG}.{self.settings.table}"

    def other_table(self) -> Engines:
        """The same engines on a second table of the same catalog."""
        os.environ["TOLLWATCH_TABLE"] = f"bronze.t_{uuid.uuid4().hex[:12]}"
        return Engines(self.spark)

    # ------------------------------------------------------------------ landing

    def land(self, request: IngestRequest, page_size: int = 1000) -> LandingManifest:
        """Fetch from the mirror into Azurite, as the flow does."""
        with build_http_client(str(self.settings.upstream_url), 30.0) as http:
            socrata = resources.socrata_client(self.settings, http)
            plan = plan_fetch(request, socrata, committed_through=None)
            return fetch_and_land(request, plan, socrata, self.landing, run_id="test", page_size=page_size)

    def land_pages(self, request: IngestRequest, pages: list[list[dict[str, str]]]) -> LandingManifest:
        """Crafted pages put into Azurite through the landing zone, sealed like a real landing."""
        self.landing.ensure_container()
        prefix = self.landing.prefix_for(DATASET, request.mode, request.window, request.refresh_id, "crafted")
        manifest = LandingManifest(
            dataset=DATASET,
            mode=request.mode,
            refresh_id=request.refresh_id,
            run_id="crafted",
            window=request.window,
            where=None,
            container=self.landing.container_name,
            prefix=prefix,
            through=1,
        )
        columns: set[str] = set()
        offset = 0
        for number, rows in enumerate(pages):
            names = frozenset(k for row in rows for k in row)
            page = Page(number=number, offset=offset, body=orjson.dumps(rows), row_count=len(rows), columns=names)
            manifest.pages.append(self.landing.put_page(prefix, page))
            columns |= names
            offset += len(rows)
        manifest.columns = sorted(columns)
        self.landing.put_manifest(manifest)
        return manifest

    # ------------------------------------------------------------------ loading

    def local(self, request: IngestRequest, manifest: LandingManifest, flow_run_id: str = "flow-run-1") -> LoadResult:
        return load_landing(request, manifest, self.landing, self.store, flow_run_id=flow_run_id)

    def with_spark(
        self,
        request: IngestRequest,
        manifest: LandingManifest,
        flow_run_id: str = "flow-run-1",
        branch: str | None = None,
    ) -> dict[str, Any]:
        """The Spark writer on the landing where the flow put it (Azurite, read over HTTP by the driver); into the
        load's audit `branch` when given (the flow's `--branch`)."""
        argv = ["--landing", self.landing.uri(manifest.prefix), "--table", self.spark_table]
        argv += ["--mode", request.mode, "--refresh-id", request.refresh_id, "--flow-run-id", flow_run_id]
        if branch is not None:
            argv += ["--branch", branch]
        if request.window:
            argv += ["--start", request.window.start.isoformat(), "--stop", request.window.stop.isoformat()]
        return spark_merge.main(argv, spark=self.spark)

    # ------------------------------------------------------------------ reading

    def rows(self) -> list[tuple[Any, ...]]:
        """The table's rows as pyiceberg reads them, sorted (timestamps as epoch microseconds)."""
        table = self.store.read()
        columns = [_plain(table[c]) for c in table.column_names]
        return sorted(zip(*columns, strict=True), key=repr)

    def spark_rows(self, columns: list[str]) -> list[tuple[Any, ...]]:
        """The same table as Spark reads it, in the same shape as `rows`."""
        df = self.spark.read.table(self.spark_table)
        types = {f.name: f.dataType for f in df.schema}
        selected = [F.unix_micros(F.col(c)) if types[c] == T.TimestampType() else F.col(f"`{c}`") for c in columns]
        return sorted((tuple(r) for r in df.select(*selected).collect()), key=repr)

    def columns(self) -> list[str]:
        return [f.name for f in self.store.table().schema().fields]

    def schema(self) -> list[tuple[str, str, bool]]:
        return [(f.name, str(f.field_type), f.required) for f in self.store.table().schema().fields]

    def ledger(self) -> list[dict[str, str]]:
        """The tollwatch properties of every snapshot that records a load, oldest first (Spark's empty first snapshot
        of a new table records none)."""
        summaries = [s.summary.additional_properties if s.summary else {} for s in self.store.table().snapshots()]
        ledger = [{k: v for k, v in summary.items() if k.startswith("tollwatch.")} for summary in summaries]
        return [entry for entry in ledger if entry]

    def spark_days(self, branch: str | None = None) -> dict[date, int]:
        """Rows per day as Spark reads `main` (the table) or a branch (Iceberg's `branch` read option)."""
        reader = self.spark.read if branch is None else self.spark.read.option("branch", branch)
        return {r["date"]: r["count"] for r in reader.table(self.spark_table).groupBy("date").count().collect()}

    def iceberg_days(self, ref: str = contract.MAIN) -> dict[date, int]:
        """Rows per day as pyiceberg reads `main` (a plain scan: the current snapshot) or a branch's head."""
        table = self.store.table()
        if ref == contract.MAIN:
            scan = table.scan(selected_fields=("date",))
        else:
            at = head(table, ref)
            assert at is not None, f"no branch {ref}"
            scan = table.scan(selected_fields=("date",), snapshot_id=at.snapshot_id)
        return dict(Counter(scan.to_arrow()["date"].to_pylist()))

    def spark_ledger(self, branch: str = contract.MAIN) -> IcebergTable:
        """The Spark merge's view of the table (its ledger) through `branch`."""
        return IcebergTable(self.spark, self.spark_table, branch)

    def duckdb_totals(self) -> duckdb_iceberg.Totals:
        with duckdb_iceberg.connect() as conn:
            return duckdb_iceberg.totals(conn, self.store.table().metadata_location)

    def assert_one_row_per_key(self) -> list[tuple[Any, ...]]:
        rows = self.rows()
        assert len({r[:4] for r in rows}) == len(rows)
        return rows


def _plain(column: pa.ChunkedArray) -> list[Any]:
    if pa.types.is_timestamp(column.type):
        return column.cast(pa.int64()).to_pylist()
    return column.to_pylist()


def days(start: date, stop: date) -> dict[date, int]:
    """Rows per day of the mirror's full days [start, stop)."""
    return {start + timedelta(days=n): ROWS_PER_DAY for n in range((stop - start).days)}


def counts(local: LoadResult) -> dict[str, Any]:
    return {
        "rows_read": local.rows_read,
        "rows_written": local.rows_written,
        "rows_rejected": local.rows_rejected,
        "rejected_by_reason": dict(local.reject_reasons),
    }


@pytest.fixture
def engines(env: dict[str, str], spark: SparkSession, warehouse: Path, monkeypatch: pytest.MonkeyPatch) -> Engines:
    monkeypatch.setenv("TOLLWATCH_WAREHOUSE_DIR", str(warehouse))
    monkeypatch.setenv("TOLLWATCH_TABLE", f"bronze.t_{uuid.uuid4().hex[:12]}")
    return Engines(spark)


# ---------------------------------------------------------------------------------------------- the same landing


def test_the_same_landing_gives_the_same_table_whichever_engine_loads_it(engines: Engines, mirror: MirrorServer):
    """Rows, schema, partitioning, counts and the ledger's snapshot properties are the same from either engine."""
    day = date(2024, 1, 2)
    for (plaza, direction), (field, value) in {
        (1, "I"): ("date", "not-a-date"),
        (2, "I"): ("vehicles_e_zpass", "-5"),
        (3, "I"): ("direction", "X"),
        (5, "I"): ("hour", None),
        (7, "I"): ("plaza_id", "0"),
        (9, "I"): ("date", "2024-01-20"),
    }.items():
        mirror.dataset.corrupt(mirror.dataset.seq_of(day, plaza, 8, direction), field, value)
    request = window_request(date(2024, 1, 1), date(2024, 1, 8), "same-landing")
    manifest = engines.land(request)
    spark_side = engines.other_table()

    local = engines.local(request, manifest)
    printed = spark_side.with_spark(request, manifest)

    assert {k: printed[k] for k in counts(local)} == counts(local)
    assert printed["rows_rejected"] == 6
    assert printed["touched"] == contract.encode_days(date(2024, 1, 1), date(2024, 1, 8))
    assert spark_side.schema() == engines.schema()
    assert spark_side.store.table().spec().fields == engines.store.table().spec().fields
    assert spark_side.rows() == engines.rows()
    assert len(engines.rows()) == 7 * ROWS_PER_DAY - 6
    assert spark_side.ledger() == engines.ledger()
    assert engines.ledger()[-1] == {
        contract.REFRESH_ID: "same-landing",
        contract.MODE: "window",
        contract.WINDOW: "2024-01-01/2024-01-08",
        contract.FLOW_RUN_ID: "flow-run-1",
        contract.TOUCHED: "2024-01-01/2024-01-08",
    }


EDGE_PAGES: list[list[dict[str, str]]] = []  # filled below (crafted rows need the helper)


def crafted(seq: int, **fields: str | None) -> dict[str, str]:
    """A row as Socrata sends it (every value a string); None leaves the field out."""
    row: dict[str, str | None] = {
        ":id": f"row-{seq:012d}",
        ":created_at": "2026-01-01T00:00:00.000Z",
        ":updated_at": "2026-01-01T00:00:00.000Z",
        "plaza_id": "1",
        "date": "2024-01-02T00:00:00.000",
        "hour": str(seq % 24),
        "direction": "I",
        "vehicles_e_zpass": str(100 + seq),
        "vehicles_vtoll": "7",
    }
    row.update(fields)
    return {k: v for k, v in row.items() if v is not None}


EDGE_PAGES += [
    [
        crafted(1, plaza_id=" 01 ", hour="\t1\n", vehicles_e_zpass="000"),  # whitespace and zeros: valid
        crafted(2, hour="023", vehicles_vtoll=None, vehicles_cash="5"),
        crafted(3, plaza_id="2", hour="3", vehicles_e_zpass="1"),  # key (2, Jan 2, 3, I): three versions
        crafted(4, plaza_id="002", hour="3", vehicles_e_zpass="2"),
        crafted(5, date="2024-02-30", **{"vehicles_bus": "x", ":version": "9", ":other": "y"}),  # no such day
        crafted(6, date="2024-02-31T00:00:00", remarks="r"),
        crafted(7, date="2024-01-02T01:00:00"),  # not a midnight
        crafted(8, date="2024-1-2"),
        crafted(9, date="2024-01-00"),
        crafted(10, date="2024-01-02\n"),  # RE2's and Java's `$` differ before a final newline: `\z` does not
        crafted(11, date=""),
        crafted(12, date="2024-04-05", direction="X"),  # outside the window AND a bad direction: window first
        crafted(13, hour="1e1"),
        crafted(14, hour="+5"),
        crafted(15, vehicles_e_zpass="5.0"),
        crafted(16, vehicles_e_zpass="\u0663"),  # an Arabic-Indic digit is not [0-9]
        crafted(17, vehicles_e_zpass="7\u000b"),  # vertical tab: not whitespace in either engine
        crafted(18, vehicles_vtoll=""),
        crafted(19, direction="i"),
        crafted(20, direction=None),
        crafted(21, direction=" I"),
        crafted(22, plaza_id="0"),
        crafted(23, hour="24"),
        crafted(24, plaza_id=None, hour="99"),  # the first failing check names the reason
        crafted(33, hour="99999999999"),
        crafted(34, vehicles_e_zpass="9223372036854775808"),
        crafted(35, vehicles_e_zpass="09223372036854775807", plaza_id="2147483647"),
        crafted(36, plaza_id="2147483648"),
    ],
    [
        crafted(25, plaza_id="2", hour="3", vehicles_e_zpass="3"),  # the latest version of (2, Jan 2, 3, I)
        crafted(26, **{":updated_at": "2026-01-01T23:59:61.000Z"}),  # strptime rolls :61 over into Jan 2
        crafted(27, **{":updated_at": "2026-01-01T24:00:00.000Z"}),  # hour 24: no version, row kept
        crafted(28, **{":updated_at": "2026-02-30T10:00:00"}),  # -> March 2
        crafted(29, **{":updated_at": "garbage"}),
        crafted(30, **{":updated_at": None, ":id": None}),
        crafted(31, plaza_id="3", hour="3", date="2024-01-02"),
        crafted(32, plaza_id="3", hour="3", date="2024-01-02T00:00:00.0", vehicles_e_zpass="9"),  # same key: wins
    ],
]


def test_typing_and_dedupe_edge_cases_agree(engines: Engines):
    """Every typing rule of the contract, at its edges, gives the same rows and the same first reasons."""
    request = window_request(date(2024, 1, 2), date(2024, 3, 4), "crafted")
    manifest = engines.land_pages(request, EDGE_PAGES)
    spark_side = engines.other_table()

    local = engines.local(request, manifest)
    printed = spark_side.with_spark(request, manifest)

    assert {k: printed[k] for k in counts(local)} == counts(local)
    reasons = printed["rejected_by_reason"]
    assert reasons["date: not a YYYY-MM-DD date"] == 7  # incl. Feb 30 and Feb 31
    assert reasons["date: outside the requested window [2024-01-02, 2024-03-04)"] == 1
    assert reasons["hour: out of range"] == reasons["plaza_id: out of range"] == 1
    assert spark_side.schema() == engines.schema()
    rows = engines.assert_one_row_per_key()
    assert spark_side.rows() == rows
    by_key = {r[:4]: r for r in rows}
    assert by_key[(2, date(2024, 1, 2), 3, "I")][4] == 3
    assert by_key[(3, date(2024, 1, 2), 3, "I")][4] == 9
    assert by_key[(2147483647, date(2024, 1, 2), 11, "I")][4] == 2**63 - 1


# ---------------------------------------------------------------------------------------------- one table, two engines


def test_engines_alternating_on_one_table_end_correct(engines: Engines, mirror: MirrorServer):
    """Local loads January, Spark loads February and a refresh that changes January rows, local replays February:
    the table is right, one row per key, and pyiceberg, Spark and DuckDB read the same numbers."""
    january = window_request(date(2024, 1, 1), date(2024, 2, 1), "january")
    february = window_request(date(2024, 2, 1), date(2024, 3, 1), "february")
    engines.local(january, engines.land(january, page_size=5000))
    february_landing = engines.land(february, page_size=5000)
    engines.with_spark(february, february_landing)
    revision = mirror.dataset.revise(date(2024, 1, 10), date(2024, 1, 12))
    refresh = refresh_request("revised", revision.updated_at)
    fetched = engines.land(window_request(date(2024, 1, 10), date(2024, 1, 12), "fetch-revised"))

    printed = engines.with_spark(refresh, fetched)
    replay = engines.local(february, february_landing)
    again = window_request(date(2024, 2, 1), date(2024, 3, 1), "february-again")
    engines.local(again, engines.land(again, page_size=5000))

    assert printed["touched"] == "2024-01-10/2024-01-12"
    assert printed["rows_written"] == 2 * ROWS_PER_DAY
    assert replay.already_committed is True
    rows = engines.assert_one_row_per_key()
    assert len(rows) == (31 + 29) * ROWS_PER_DAY
    assert engines.spark_rows(engines.columns()) == rows
    stamp_us = revision.updated_at * 1_000_000
    revised = [r for r in rows if r[-1] == stamp_us]
    assert {r[1] for r in revised} == {date(2024, 1, 10), date(2024, 1, 11)}
    assert len(revised) == 2 * ROWS_PER_DAY
    table = engines.store.read()
    assert engines.duckdb_totals() == duckdb_iceberg.arrow_totals(table)
    assert engines.duckdb_totals().rows == len(rows)
    assert engines.store.committed_through() == revision.updated_at  # the Spark refresh moved the ledger's mark


def test_a_load_committed_by_one_engine_is_a_no_op_for_the_other(engines: Engines):
    first = window_request(date(2024, 1, 1), date(2024, 1, 4), "first")
    second = window_request(date(2024, 1, 4), date(2024, 1, 6), "second")
    first_landing, second_landing = engines.land(first), engines.land(second)
    engines.local(first, first_landing)
    snapshots = len(engines.ledger())

    printed = engines.with_spark(first, first_landing)

    assert printed["already_committed"] is True
    assert printed["snapshot_id"] == engines.store.committed("first")
    assert printed["touched"] == "2024-01-01/2024-01-04"
    assert len(engines.ledger()) == snapshots
    spark_first = engines.with_spark(second, second_landing)
    local_again = engines.local(second, second_landing)
    assert local_again.already_committed is True
    assert local_again.snapshot_id == spark_first["snapshot_id"]
    assert len(engines.assert_one_row_per_key()) == 5 * ROWS_PER_DAY


def test_schema_drift_added_by_one_engine_is_read_by_the_other(engines: Engines, mirror: MirrorServer):
    mirror.dataset.extra_column("vehicles_bus", "3")
    by_spark = window_request(date(2024, 1, 1), date(2024, 1, 3), "drift-spark")
    engines.with_spark(by_spark, engines.land(by_spark))
    mirror.dataset.extra_column("lane_group", "north")
    by_local = window_request(date(2024, 1, 3), date(2024, 1, 5), "drift-local")

    engines.local(by_local, engines.land(by_local))

    assert engines.columns()[-2:] == ["vehicles_bus", "lane_group"]
    spark_columns = engines.spark.read.table(engines.spark_table).columns
    assert spark_columns == engines.columns()
    rows = engines.spark_rows(engines.columns())
    assert engines.rows() == rows
    lane, bus = engines.columns().index("lane_group"), engines.columns().index("vehicles_bus")
    assert {(r[1] < date(2024, 1, 3), r[lane], r[bus]) for r in rows} == {(True, None, "3"), (False, "north", "3")}


def test_concurrent_commits_from_both_engines_resolve(engines: Engines, monkeypatch: pytest.MonkeyPatch):
    """A local commit lands between Spark's read and its write, and a Spark commit lands inside a local commit:
    each loser re-reads the table and commits again; nothing is lost."""
    a = window_request(date(2024, 1, 1), date(2024, 1, 5), "a")
    b = window_request(date(2024, 1, 5), date(2024, 1, 9), "b")
    c = window_request(date(2024, 1, 9), date(2024, 1, 13), "c")
    d = window_request(date(2024, 1, 13), date(2024, 1, 17), "d")
    landings = {r.refresh_id: engines.land(r) for r in (a, b, c, d)}
    calls: list[str] = []
    original_merged = spark_merge.merged

    def merged_with_a_local_commit_in_between(*args: Any, **kwargs: Any) -> Any:
        calls.append("spark")
        if calls.count("spark") == 1:  # Spark has read the table at its base snapshot: commit locally now
            engines.local(b, landings["b"])
        return original_merged(*args, **kwargs)

    monkeypatch.setattr(spark_merge, "merged", merged_with_a_local_commit_in_between)
    engines.with_spark(a, landings["a"])
    assert calls == ["spark", "spark"]  # the first Spark commit conflicted and was rebuilt
    monkeypatch.setattr(spark_merge, "merged", original_merged)

    original_commit_window = engines.store.commit_window
    attempts: list[int] = []

    def commit_window_racing_spark(window: Window, months: Any, *args: Any, **kwargs: Any) -> Any:
        attempts.append(1)

        def months_with_a_spark_commit_first() -> Iterator[Any]:
            if len(attempts) == 1:  # inside the local transaction: it has read the table, not committed yet
                engines.with_spark(d, landings["d"])
            yield from months

        return original_commit_window(window, months_with_a_spark_commit_first(), *args, **kwargs)

    monkeypatch.setattr(engines.store, "commit_window", commit_window_racing_spark)
    engines.local(c, landings["c"])

    assert len(attempts) == 2  # the local commit conflicted with Spark's and was rebuilt on the new table state
    rows = engines.assert_one_row_per_key()
    assert len(rows) == 16 * ROWS_PER_DAY
    assert {r[1] for r in rows} == {date(2024, 1, d) for d in range(1, 17)}
    loads = [e[contract.REFRESH_ID] for e in engines.ledger() if contract.REFRESH_ID in e]
    assert loads == ["b", "a", "d", "c"]


# ---------------------------------------------------------------------------------------------- write-audit-publish


def test_a_spark_load_on_its_audit_branch_is_invisible_on_main_until_published(engines: Engines):
    """As the flow runs it: the load's branch cut by `Branches.open`, the Spark merge with `--branch`, then
    `Branches.publish`. Before the publish, Spark, pyiceberg and DuckDB readers of `main` see none of the load (only
    a reader of the branch does); after it, all three see it, the branch is gone and Spark's ledger of `main` has
    the load (a replay on `main` is a no-op)."""
    published = window_request(date(2024, 1, 1), date(2024, 1, 4), "wap-published")
    engines.local(published, engines.land(published))
    request = window_request(date(2024, 1, 4), date(2024, 1, 6), "wap-spark")
    manifest = engines.land(request)
    branch = contract.audit_branch(request.refresh_id)
    branches = Branches(engines.store)
    main_before = engines.store.committed(published.refresh_id)
    cut = branches.open(branch, target_schema(manifest.columns))

    printed = engines.with_spark(request, manifest, branch=branch)

    on_main, loaded = days(date(2024, 1, 1), date(2024, 1, 4)), days(date(2024, 1, 1), date(2024, 1, 6))
    assert cut == main_before
    assert (printed["already_committed"], printed["rows_written"]) == (False, 2 * ROWS_PER_DAY)
    assert printed["snapshot_id"] == branches.head(branch) != cut
    assert engines.store.table().current_snapshot().snapshot_id == main_before
    assert engines.spark_days() == on_main
    assert engines.spark_days(branch) == loaded
    assert engines.spark.read.table(f"{engines.spark_table}.branch_{branch}").count() == sum(loaded.values())
    assert engines.iceberg_days() == on_main
    assert engines.iceberg_days(branch) == loaded
    assert engines.duckdb_totals().rows_per_day == on_main
    assert engines.store.committed(request.refresh_id) is None
    assert engines.spark_ledger().committed(request.refresh_id) is None
    on_branch = Committed(printed["snapshot_id"], (date(2024, 1, 4), date(2024, 1, 6)))
    assert engines.spark_ledger(branch).committed(request.refresh_id) == on_branch

    snapshot = branches.publish(branch, request.refresh_id)

    assert snapshot == printed["snapshot_id"]
    assert engines.spark_days() == loaded
    assert engines.iceberg_days() == loaded
    assert engines.duckdb_totals().rows_per_day == loaded
    assert engines.spark_rows(engines.columns()) == engines.assert_one_row_per_key()
    assert branches.head(branch) is None
    assert set(engines.store.table().metadata.refs) == {contract.MAIN}
    assert {r["name"] for r in engines.spark.read.table(f"{engines.spark_table}.refs").collect()} == {contract.MAIN}
    assert engines.spark_ledger().committed(request.refresh_id) == Committed(snapshot, on_branch.touched)
    assert engines.store.committed(request.refresh_id) == snapshot
    replay = engines.with_spark(request, manifest)
    assert (replay["already_committed"], replay["snapshot_id"]) == (True, snapshot)


def test_a_spark_replay_on_a_dropped_and_recut_branch_loads_again(engines: Engines):
    """A re-run on the load's existing branch (a crashed run's) keeps what is there; once the branch was dropped
    (a discard, or a rebuild after main moved) its snapshots are in no lineage, so the same refresh on the branch cut
    again is not "already committed": the merge writes its rows again, on the new cut."""
    request = window_request(date(2024, 1, 1), date(2024, 1, 3), "wap-recut")
    manifest = engines.land(request)
    branch = contract.audit_branch(request.refresh_id)
    branches = Branches(engines.store)
    schema = target_schema(manifest.columns)
    base = branches.open(branch, schema)  # a new table: created by pyiceberg, with an empty snapshot to cut from
    first = engines.with_spark(request, manifest, branch=branch)
    snapshots = len(engines.store.table().snapshots())
    rerun = engines.with_spark(request, manifest, branch=branch)
    assert (rerun["already_committed"], rerun["rows_written"]) == (False, 0)
    assert rerun["snapshot_id"] == first["snapshot_id"]
    assert len(engines.store.table().snapshots()) == snapshots
    branches.drop(branch)
    assert engines.spark_ledger(branch).committed(request.refresh_id) is None
    recut = branches.open(branch, schema)

    again = engines.with_spark(request, manifest, branch=branch)

    loaded = days(date(2024, 1, 1), date(2024, 1, 3))
    assert first["rows_written"] == 2 * ROWS_PER_DAY
    assert recut == base  # main never moved
    assert (again["already_committed"], again["rows_written"]) == (False, 2 * ROWS_PER_DAY)
    assert again["snapshot_id"] not in (None, first["snapshot_id"])
    assert branches.head(branch) == again["snapshot_id"]
    table = engines.store.table()
    assert table.snapshot_by_id(again["snapshot_id"]).parent_snapshot_id == base
    assert table.snapshot_by_id(first["snapshot_id"]) is not None  # kept until it expires, in no lineage
    assert first["snapshot_id"] not in {s.snapshot_id for s in lineage(table, branch)}
    assert engines.iceberg_days(branch) == engines.spark_days(branch) == loaded
    assert engines.iceberg_days() == engines.spark_days() == {}
    assert branches.publish(branch, request.refresh_id) == again["snapshot_id"]
    assert engines.spark_days() == engines.iceberg_days() == loaded
    assert len(engines.assert_one_row_per_key()) == 2 * ROWS_PER_DAY


def test_a_spark_load_on_a_branch_cut_before_main_moved_is_not_fast_forwarded(engines: Engines):
    """Another load publishes while the Spark merge writes its branch: the merge builds on its branch's base only
    (not on the moved `main`), `publish` refuses (`NotFastForward`) and leaves `main` as it was; dropped, cut again
    and merged again (as `write_audit_publish` rebuilds), the load publishes and both loads are on `main`."""
    base = window_request(date(2024, 1, 1), date(2024, 1, 3), "wap-base")
    engines.local(base, engines.land(base))
    a = window_request(date(2024, 1, 3), date(2024, 1, 5), "wap-a")
    b = window_request(date(2024, 1, 5), date(2024, 1, 7), "wap-b")
    landing_a, landing_b = engines.land(a), engines.land(b)
    branches = Branches(engines.store)
    branch_a, branch_b = contract.audit_branch(a.refresh_id), contract.audit_branch(b.refresh_id)
    schema = target_schema(landing_a.columns)
    cut_a = branches.open(branch_a, schema)
    branches.open(branch_b, schema)
    load_landing(b, landing_b, engines.landing, engines.store, flow_run_id="flow-run-b", branch=branch_b)
    moved = branches.publish(branch_b, b.refresh_id)

    printed = engines.with_spark(a, landing_a, branch=branch_a)

    table = engines.store.table()
    assert table.snapshot_by_id(printed["snapshot_id"]).parent_snapshot_id == cut_a
    with_a = days(date(2024, 1, 1), date(2024, 1, 5))
    assert engines.iceberg_days(branch_a) == engines.spark_days(branch_a) == with_a
    with pytest.raises(NotFastForward):
        branches.publish(branch_a, a.refresh_id)
    with_b = days(date(2024, 1, 1), date(2024, 1, 3)) | days(date(2024, 1, 5), date(2024, 1, 7))
    assert engines.store.table().current_snapshot().snapshot_id == moved
    assert engines.iceberg_days() == engines.spark_days() == with_b
    assert engines.duckdb_totals().rows_per_day == with_b
    assert branches.head(branch_a) == printed["snapshot_id"]

    branches.drop(branch_a)
    assert branches.open(branch_a, schema) == moved
    again = engines.with_spark(a, landing_a, branch=branch_a)
    assert again["rows_written"] == 2 * ROWS_PER_DAY
    assert branches.publish(branch_a, a.refresh_id) == again["snapshot_id"]
    everything = days(date(2024, 1, 1), date(2024, 1, 7))
    assert engines.iceberg_days() == engines.spark_days() == everything
    assert engines.duckdb_totals().rows_per_day == everything
    loads = [e[contract.REFRESH_ID] for e in engines.ledger() if contract.REFRESH_ID in e]
    assert loads[-1] == "wap-a"
    assert engines.spark_ledger().committed("wap-b") is not None


# ---------------------------------------------------------------------------------------------- the entry point's edges


def test_a_landing_without_manifest_is_refused(spark: SparkSession, tmp_path: Path):
    """An unsealed landing (a fetch that crashed before its manifest) is never loaded."""
    import gzip

    (tmp_path / "page-00000.json.gz").write_bytes(gzip.compress(b"[]"))
    argv = ["--landing", str(tmp_path), "--table", "tollwatch.bronze.never", "--mode", "refresh", "--refresh-id", "r"]
    with pytest.raises(FileNotFoundError, match="no sealed landing"):
        spark_merge.main(argv, spark=spark)


# ---------------------------------------------------------------------------------------------- TOLLWATCH_ENGINE=spark


@pytest.fixture
def spark_engine(engines: Engines, monkeypatch: pytest.MonkeyPatch) -> Engines:
    """The ingest flow switched to `spark-submit` of the wheel's entry point (a JVM of its own per merge)."""
    monkeypatch.setenv("TOLLWATCH_ENGINE", "spark")
    monkeypatch.setenv("TOLLWATCH_SPARK_MASTER", "local[1]")
    monkeypatch.setenv("TOLLWATCH_SPARK_JARS_DIR", str(JARS_DIR))
    monkeypatch.setenv("TOLLWATCH_SPARK_CONF", json.dumps(SMALL_JOB_CONF))
    return engines


def test_the_ingest_flow_merges_with_spark_submit_and_announces_what_spark_did(
    spark_engine: Engines, mirror: MirrorServer
):
    """A window, then a refresh, merged by spark-submit from the flow: the completion events carry Spark's numbers,
    the refresh's touched days (so downstream jobs run) and the ledger's mark; the table is the local writer's."""
    from tests.support.prefect_events import wait_for_events
    from tollwatch.prefect.flows.ingest import ingest

    backfill = ingest(start=date(2024, 1, 1), stop=date(2024, 1, 8), request_id="spark-window")
    revision = mirror.dataset.revise(date(2024, 1, 3), date(2024, 1, 5))
    refresh = ingest(rows_updated_at=revision.updated_at, previous_rows_updated_at=None)
    replay = ingest(rows_updated_at=revision.updated_at, previous_rows_updated_at=None)

    assert (backfill.rows_written, backfill.rows_rejected) == (7 * ROWS_PER_DAY, 0)
    assert backfill.window == Window(start=date(2024, 1, 1), stop=date(2024, 1, 8))
    assert refresh.window == Window(start=date(2024, 1, 1), stop=date(2024, 4, 1))  # every version, first refresh
    assert refresh.committed_through == revision.updated_at
    assert replay.already_committed is True
    assert replay.snapshot_id == refresh.snapshot_id
    assert refresh.upstream_rows == refresh.table_rows  # the flow reconciled the days Spark touched
    rows = spark_engine.assert_one_row_per_key()
    assert len(rows) == (31 + 29 + 31) * ROWS_PER_DAY
    ledger = spark_engine.ledger()
    assert ledger[-1][contract.FLOW_RUN_ID] == refresh.flow_run_id
    assert ledger[-1][contract.COMMITTED_THROUGH] == str(revision.updated_at)
    event = wait_for_events(
        spark_engine.settings.prefect_api_url or os.environ["PREFECT_API_URL"],
        "tollwatch.ingestion.completed",
        lambda e: e["payload"]["refresh_id"] == refresh.refresh_id,
    )[0]
    assert event["payload"]["window"] == {"start": "2024-01-01", "stop": "2024-04-01"}
    assert event["payload"]["engine"] == "spark"


def test_a_failing_spark_job_fails_the_flow_with_the_drivers_reason(spark_engine: Engines, monkeypatch):
    from tollwatch.prefect.flows.ingest import ingest

    monkeypatch.setenv("TOLLWATCH_SPARK_JARS_DIR", str(JARS_DIR.parent / "no-such-jars"))
    state = ingest(start=date(2024, 1, 1), stop=date(2024, 1, 2), request_id="no-jars", return_state=True)
    assert state.is_failed()
    assert "make jars" in state.message or "make jars" in str(state.result(raise_on_failure=False))


def test_daily_totals_in_spark_equal_the_local_jobs(engines: Engines, mirror: MirrorServer):
    """The downstream job's Spark version (`tollwatch-daily-totals`) gives the local job's rows, reads the snapshot
    it was given, and replaces only its window's days."""
    from tollwatch.downstream.daily_totals import aggregate, read_hourly
    from tollwatch.spark import daily_totals

    mirror.dataset.set_cash_until(date(2024, 1, 3))  # a null column on some days: sums stay null, totals count 0
    january = window_request(date(2024, 1, 1), date(2024, 2, 1), "dt-january")
    engines.local(january, engines.land(january, page_size=5000))
    snapshot = engines.store.committed("dt-january")
    assert snapshot is not None
    output = f"{contract.CATALOG}.silver.dt_{uuid.uuid4().hex[:8]}"
    argv = ["--table", engines.spark_table, "--output", output, "--snapshot-id", str(snapshot)]

    first = daily_totals.main(
        [*argv, "--start=2024-01-01", "--stop=2024-01-11", "--refresh-id=dt-january"], engines.spark
    )
    daily_totals.main([*argv, "--start=2024-01-05", "--stop=2024-01-08", "--refresh-id=dt-january"], engines.spark)

    expected = aggregate(
        read_hourly(engines.store.table(), Window(start=date(2024, 1, 1), stop=date(2024, 1, 11)), snapshot)
    )
    got = engines.spark.read.table(output).orderBy("date", "plaza_id", "direction").collect()
    assert [tuple(r) for r in got] == list(zip(*(expected[c].to_pylist() for c in expected.column_names), strict=True))
    assert first["rows_written"] == 10 * 11 * 2
    history = engines.spark.read.table(f"{output}.snapshots").collect()
    assert history[-1]["summary"][contract.UPSTREAM_SNAPSHOT_ID] == str(snapshot)
    assert history[-1]["summary"][contract.WINDOW] == "2024-01-05/2024-01-08"
