"""jobs/merge_bnt.py (the Databricks merge) under local Spark, against the local pyiceberg writer.

Both writers load the SAME landed files (pages fetched from the mirror into Azurite by `fetch_and_land`, or
crafted pages put there through the landing zone): the local writer reads them from Blob, the Spark job from a
downloaded copy, with `--format parquet` (no Iceberg jars here). The tables must hold the same rows, and the
loads must report the same counts and rejection reasons.
"""

from __future__ import annotations

import gzip
import os
import sys
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pytest
from pyspark.sql import SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from jobs import merge_bnt
from tollwatch import clients, schema
from tollwatch.dev.mirror import MirrorServer
from tollwatch.events import Window
from tollwatch.ingest import IngestRequest, LoadResult, fetch_and_land, load_landing, plan_fetch
from tollwatch.landing import LandingManifest
from tollwatch.settings import load_settings
from tollwatch.socrata import Page, build_http_client
from tollwatch.table import FLOW_RUN_ID, MODE, REFRESH_ID, WINDOW

pytestmark = [pytest.mark.stack, pytest.mark.spark]

DOMAIN = "data.ny.gov"
DATASET = "qzve-kjga"
ROWS_PER_DAY = 11 * 2 * 24
ARROW_TYPES = {
    T.IntegerType(): pa.int32(),
    T.LongType(): pa.int64(),
    T.DateType(): pa.date32(),
    T.StringType(): pa.string(),
    T.TimestampType(): pa.timestamp("us", "UTC"),
}


@pytest.fixture(scope="module")
def spark() -> Iterator[SparkSession]:
    """One small local Spark for the module (the JVM start is the slow part)."""
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    session = (
        SparkSession.builder.master("local[1]")
        .appName("tollwatch-test-merge-bnt")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.shuffle.partitions", "2")
        .config("spark.sql.session.timeZone", "UTC")
        # ANSI mode (Spark 4's and Databricks serverless' default): a bad cast would fail, not turn null, so the
        # tests prove the typing never relies on failing casts
        .config("spark.sql.ansi.enabled", "true")
        .config("spark.driver.host", "127.0.0.1")
        .getOrCreate()
    )
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


def window_request(start: date, stop: date, refresh_id: str) -> IngestRequest:
    window = Window(start=start, stop=stop)
    return IngestRequest(mode="window", domain=DOMAIN, dataset_id=DATASET, refresh_id=refresh_id, window=window)


def refresh_request(refresh_id: str) -> IngestRequest:
    return IngestRequest(mode="refresh", domain=DOMAIN, dataset_id=DATASET, refresh_id=refresh_id, rows_updated_at=1)


class Writers:
    """The local writer and the Spark job over one test's landing zone, warehouse and parquet directory."""

    def __init__(self, spark: SparkSession, tmp_path: Path) -> None:
        self.spark = spark
        self.tmp = tmp_path
        self.settings = load_settings()
        self.landing = clients.landing_zone(self.settings)
        self.store = clients.table_store(self.settings)
        self.table_dir = tmp_path / "spark-table"

    # ------------------------------------------------------------------ landing

    def land(self, request: IngestRequest, page_size: int = 1000) -> LandingManifest:
        """Fetch from the mirror into Blob, as the flow does."""
        with build_http_client(str(self.settings.upstream_url), 30.0) as http:
            socrata = clients.socrata_client(self.settings, http)
            plan = plan_fetch(request, socrata, committed_through=None)
            return fetch_and_land(request, plan, socrata, self.landing, run_id="test", page_size=page_size)

    def land_pages(self, request: IngestRequest, pages: list[list[dict[str, str]]]) -> LandingManifest:
        """Put crafted pages into Blob through the landing zone, sealed with a manifest like a real landing."""
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

    def download(self, manifest: LandingManifest) -> Path:
        """The landed prefix (pages and manifest) copied to a local directory: what Spark reads."""
        target = self.tmp / "landed" / manifest.prefix
        target.mkdir(parents=True, exist_ok=True)
        container = clients.blob_service(self.settings).get_container_client(self.landing.container_name)
        for name in self.landing.list_blobs(manifest.prefix + "/"):
            (target / name.rsplit("/", 1)[-1]).write_bytes(container.download_blob(name).readall())
        return target

    # ------------------------------------------------------------------ loading

    def spark_load(self, request: IngestRequest, landed: Path, flow_run_id: str = "flow-run-1") -> dict[str, Any]:
        argv = ["--landing", str(landed), "--table", str(self.table_dir), "--format", "parquet"]
        argv += ["--mode", request.mode, "--refresh-id", request.refresh_id, "--flow-run-id", flow_run_id]
        if request.window:
            argv += ["--start", request.window.start.isoformat(), "--stop", request.window.stop.isoformat()]
        return merge_bnt.main(argv, spark=self.spark)

    def load_both(self, request: IngestRequest, manifest: LandingManifest) -> tuple[LoadResult, dict[str, Any]]:
        """Load one landing with both writers."""
        local = load_landing(request, manifest, self.landing, self.store, flow_run_id="flow-run-1")
        return local, self.spark_load(request, self.download(manifest))

    # ------------------------------------------------------------------ reading

    def local_table(self) -> pa.Table:
        return self.store.read()

    def spark_rows(self, columns: list[str]) -> list[tuple[Any, ...]]:
        df = merge_bnt.read_parquet_table(self.spark, str(self.table_dir))
        types = {f.name: f.dataType for f in df.schema}
        selected = [F.unix_micros(F.col(c)) if types[c] == T.TimestampType() else F.col(f"`{c}`") for c in columns]
        return sorted((tuple(r) for r in df.select(*selected).collect()), key=repr)

    def assert_same_tables(self) -> list[tuple[Any, ...]]:
        """Same columns (names, order, types) and the same rows in both tables; the rows, for further checks."""
        local = self.local_table()
        iceberg_fields = self.store.table().schema().fields
        job_schema = merge_bnt.ParquetFormat(self.spark, str(self.table_dir)).schema()
        assert job_schema is not None
        assert [(f.name, ARROW_TYPES[f.dataType], not f.nullable) for f in job_schema] == [
            (f.name, _small(t), i.required)
            for f, t, i in zip(local.schema, local.schema.types, iceberg_fields, strict=True)
        ]
        local_rows = sorted(zip(*(_pylist(local[c]) for c in local.column_names), strict=True), key=repr)
        spark_rows = self.spark_rows(local.column_names)
        assert len(spark_rows) == len(local_rows)
        assert spark_rows == local_rows
        return spark_rows


def _small(dtype: pa.DataType) -> pa.DataType:
    """pyiceberg reads strings as large_string; the table type is string."""
    return pa.string() if dtype == pa.large_string() else dtype


def _pylist(column: pa.ChunkedArray) -> list[Any]:
    """Timestamps as epoch microseconds (what unix_micros gives on the Spark side); everything else as is."""
    if pa.types.is_timestamp(column.type):
        return column.cast(pa.int64()).to_pylist()
    return column.to_pylist()


def assert_same_counts(local: LoadResult, printed: dict[str, Any]) -> None:
    assert printed["already_committed"] is local.already_committed
    assert printed["rows_read"] == local.rows_read
    assert printed["rows_written"] == local.rows_written
    assert printed["rows_rejected"] == local.rows_rejected
    assert printed["rejected_by_reason"] == dict(local.reject_reasons)


@pytest.fixture
def writers(env: dict[str, str], spark: SparkSession, tmp_path: Path) -> Writers:
    return Writers(spark, tmp_path)


# ---------------------------------------------------------------------------------------------- end to end


def test_window_gives_the_local_writers_rows_and_prints_its_result(writers: Writers, capsys):
    request = window_request(date(2024, 1, 1), date(2024, 1, 8), "window-1")
    manifest = writers.land(request, page_size=1000)
    assert len(manifest.pages) == 4

    local, printed = writers.load_both(request, manifest)

    assert_same_counts(local, printed)
    assert printed["rows_written"] == 7 * ROWS_PER_DAY
    assert printed["refresh_id"] == "window-1"
    assert printed["window"] == "2024-01-01/2024-01-08"
    writers.assert_same_tables()
    from tollwatch.databricks import merge_result

    assert merge_result(capsys.readouterr().out) == printed  # the flow's parser reads what the job printed
    marker = writers.table_dir / "_tollwatch" / "refresh-id=window-1.json"
    recorded = orjson.loads(marker.read_bytes())
    assert {k: recorded[k] for k in (REFRESH_ID, MODE, WINDOW, FLOW_RUN_ID)} == {
        REFRESH_ID: "window-1",
        MODE: "window",
        WINDOW: "2024-01-01/2024-01-08",
        FLOW_RUN_ID: "flow-run-1",
    }


def test_replayed_refresh_id_is_a_no_op(writers: Writers):
    request = window_request(date(2024, 1, 1), date(2024, 1, 3), "replayed")
    manifest = writers.land(request)
    writers.load_both(request, manifest)
    files = sorted(p.relative_to(writers.table_dir) for p in writers.table_dir.rglob("*"))

    local, printed = writers.load_both(request, manifest)

    assert local.already_committed is True
    assert printed["already_committed"] is True
    assert printed["rows_written"] == 0
    assert sorted(p.relative_to(writers.table_dir) for p in writers.table_dir.rglob("*")) == files
    writers.assert_same_tables()


def test_refresh_merges_changed_rows_on_the_key_like_the_local_writer(writers: Writers, mirror: MirrorServer):
    base = window_request(date(2024, 1, 1), date(2024, 1, 8), "base")
    writers.load_both(base, writers.land(base))
    before = {r[:4]: r for r in writers.assert_same_tables()}
    changed = [mirror.dataset.seq_of(date(2024, 1, 6), plaza, 9, "O") for plaza in (1, 2, 3)]
    for seq in changed:
        mirror.dataset.corrupt(seq, "vehicles_e_zpass", "424242")
    # the upstream republished Jan 6-10 (changed values for Jan 6-7, new days after): one landing, merged on the key
    landed = writers.land(window_request(date(2024, 1, 6), date(2024, 1, 11), "fetch"))
    refresh = refresh_request("refresh-1")

    local, printed = writers.load_both(refresh, landed)

    assert_same_counts(local, printed)
    assert printed["rows_written"] == 5 * ROWS_PER_DAY
    rows = writers.assert_same_tables()
    assert len(rows) == 10 * ROWS_PER_DAY
    after = {r[:4]: r for r in rows}
    updated = [k for k, r in after.items() if r[4] == 424242]
    assert sorted(updated) == sorted((plaza, date(2024, 1, 6), 9, "O") for plaza in (1, 2, 3))
    assert all(after[k] == r for k, r in before.items() if k[1] < date(2024, 1, 6))  # other days untouched


def test_schema_drift_adds_the_new_column_and_fills_the_cash_column(writers: Writers, mirror: MirrorServer):
    mirror.dataset.set_cash_until(date(2024, 1, 3))  # older rows carry vehicles_cash instead of vehicles_vtoll
    first = window_request(date(2024, 1, 1), date(2024, 1, 5), "drift-1")
    writers.load_both(first, writers.land(first))
    mirror.dataset.extra_column("vehicles_bus", "3")  # a column the tables have never seen
    second = window_request(date(2024, 2, 1), date(2024, 2, 4), "drift-2")

    local, printed = writers.load_both(second, writers.land(second))

    assert_same_counts(local, printed)
    rows = writers.assert_same_tables()
    columns = writers.local_table().column_names
    assert columns[-1] == "vehicles_bus"
    bus, cash, vtoll = (columns.index(c) for c in ("vehicles_bus", "vehicles_cash", "vehicles_vtoll"))
    january = [r for r in rows if r[1] < date(2024, 2, 1)]
    assert len(january) == 4 * ROWS_PER_DAY
    assert {r[bus] for r in january} == {None}
    assert {r[bus] for r in rows if r[1] >= date(2024, 2, 1)} == {"3"}
    early = [r for r in january if r[1] < date(2024, 1, 3)]
    assert all(r[cash] is not None and r[vtoll] is None for r in early)
    assert all(r[cash] is None and r[vtoll] is not None for r in rows if r[1] >= date(2024, 1, 3))


def test_malformed_rows_are_rejected_with_the_local_writers_reasons(writers: Writers, mirror: MirrorServer):
    day = date(2024, 1, 2)
    bad = {
        (1, "I"): ("date", "not-a-date"),
        (2, "I"): ("vehicles_e_zpass", "-5"),
        (3, "I"): ("direction", "X"),
        (4, "I"): ("vehicles_vtoll", "many"),
        (5, "I"): ("hour", None),
        (6, "I"): ("hour", "24"),
        (7, "I"): ("plaza_id", "0"),
        (8, "I"): ("date", "2024-13-01"),
        (9, "I"): ("date", "2024-01-20"),
        (1, "O"): ("plaza_id", "x1"),
    }
    for (plaza, direction), (field, value) in bad.items():
        mirror.dataset.corrupt(mirror.dataset.seq_of(day, plaza, 8, direction), field, value)
    request = window_request(date(2024, 1, 1), date(2024, 1, 4), "bad-rows")

    local, printed = writers.load_both(request, writers.land(request))

    assert_same_counts(local, printed)
    assert printed["rows_rejected"] == len(bad)
    assert printed["rejected_by_reason"] == {
        "date: not a YYYY-MM-DD date": 2,
        "date: outside the requested window [2024-01-01, 2024-01-04)": 1,
        "direction: not I or O": 1,
        "hour: missing": 1,
        "hour: not 0-23": 1,
        "plaza_id: must be >= 1": 1,
        "plaza_id: not a non-negative integer": 1,
        "vehicles_e_zpass: not a non-negative integer": 1,
        "vehicles_vtoll: not a non-negative integer": 1,
    }
    writers.assert_same_tables()


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


EDGE_PAGES = [
    [
        crafted(1, plaza_id=" 01 ", hour="\t1\n", vehicles_e_zpass="000"),  # whitespace and zeros: valid
        crafted(2, hour="023", vehicles_vtoll=None, vehicles_cash="5"),
        crafted(3, plaza_id="2", hour="3", vehicles_e_zpass="1"),  # key (2, Jan 2, 3, I): three versions
        crafted(4, plaza_id="002", hour="3", vehicles_e_zpass="2"),  # same key, later in the page: wins here
        crafted(5, date="2024-02-30", **{"vehicles_bus": "x", ":version": "9", ":other": "y"}),  # no such day
        crafted(6, date="2024-02-31T00:00:00", remarks="r"),  # no such day: not loaded as March 2
        crafted(7, date="2024-01-02T01:00:00"),  # not a midnight: rejected
        crafted(8, date="2024-1-2"),
        crafted(9, date="2024-01-00"),
        crafted(10, date="2024-01-02\n"),  # RE2's `$` does not match before a final newline (Java's does)
        crafted(11, date=""),
        crafted(12, date="2024-04-05"),  # outside the window
        crafted(13, hour="1e1"),
        crafted(14, hour="+5"),
        crafted(15, vehicles_e_zpass="5.0"),
        crafted(16, vehicles_e_zpass="\u0663"),  # an Arabic-Indic digit is not [0-9]
        crafted(17, vehicles_e_zpass="7\u000b"),  # vertical tab: not whitespace for RE2's \s
        crafted(18, vehicles_vtoll=""),
        crafted(19, direction="i"),
        crafted(20, direction=None),
        crafted(21, direction=" I"),
        crafted(22, plaza_id="0"),
        crafted(23, hour="24"),
        crafted(24, plaza_id=None, hour="99"),  # the first failing check names the reason
    ],
    [
        crafted(25, plaza_id="2", hour="3", vehicles_e_zpass="3"),  # the latest version of (2, Jan 2, 3, I)
        crafted(26, **{":updated_at": "2026-01-01T23:59:61.000Z"}),  # strptime rolls :61 over into Jan 2
        crafted(27, **{":updated_at": "2026-01-01T24:00:00.000Z"}),  # hour 24: null timestamp, row kept
        crafted(28, **{":updated_at": "2026-02-30T10:00:00"}),  # -> March 2
        crafted(29, **{":updated_at": "garbage"}),
        crafted(30, **{":updated_at": None, ":id": None}),
        crafted(31, plaza_id="3", hour="3", date="2024-01-02"),
        crafted(32, plaza_id="3", hour="3", date="2024-01-02T00:00:00.0", vehicles_e_zpass="9"),  # same key: wins
    ],
]


def test_typing_and_dedupe_edge_cases_match_the_local_writer(writers: Writers):
    base = window_request(date(2024, 1, 1), date(2024, 1, 4), "base")  # Jan 1-3 from the mirror
    writers.load_both(base, writers.land(base))
    request = window_request(date(2024, 1, 2), date(2024, 3, 4), "crafted")

    local, printed = writers.load_both(request, writers.land_pages(request, EDGE_PAGES))

    assert_same_counts(local, printed)
    assert printed["rows_read"] == sum(len(p) for p in EDGE_PAGES)
    assert printed["rejected_by_reason"]["date: not a YYYY-MM-DD date"] == 7  # incl. Feb 30 and Feb 31
    rows = writers.assert_same_tables()
    days = {r[1] for r in rows}
    assert date(2024, 1, 3) not in days  # a window day without new rows ends up empty
    assert len([r for r in rows if r[1] == date(2024, 1, 1)]) == ROWS_PER_DAY  # outside the window: kept
    assert {date(2024, 3, 1), date(2024, 3, 2)}.isdisjoint(days)  # the impossible days did not roll over
    by_key = {r[:4]: r for r in rows}
    assert by_key[(2, date(2024, 1, 2), 3, "I")][4] == 3
    assert by_key[(3, date(2024, 1, 2), 3, "I")][4] == 9


# ---------------------------------------------------------------------------------------------- job-only rules


def test_numbers_beyond_the_column_type_are_rejected_not_fatal(spark: SparkSession, tmp_path: Path):
    """A value too large for its column is one quarantined row (as in tollwatch.schema), not a failed load."""
    landed = tmp_path / "landed"
    landed.mkdir()
    rows = [
        crafted(1, hour="99999999999"),
        crafted(2, vehicles_e_zpass="9223372036854775808"),
        crafted(3, vehicles_e_zpass="09223372036854775807", plaza_id="2147483647"),
        crafted(4, plaza_id="2147483648"),
    ]
    (landed / "page-00000.json.gz").write_bytes(gzip.compress(orjson.dumps(rows)))
    manifest = {"pages": [{"blob": "raw/x/page-00000.json.gz", "rows": 4}], "columns": sorted(rows[0])}
    (landed / "manifest.json").write_bytes(orjson.dumps(manifest))
    table = tmp_path / "table"
    argv = ["--landing", str(landed), "--table", str(table), "--format", "parquet", "--mode", "window"]
    argv += ["--start", "2024-01-01", "--stop", "2024-02-01", "--refresh-id", "overflow"]

    printed = merge_bnt.main(argv, spark=spark)

    assert printed["rejected_by_reason"] == {
        "hour: out of range": 1,
        "vehicles_e_zpass: out of range": 1,
        "plaza_id: out of range": 1,
    }
    kept = merge_bnt.read_parquet_table(spark, str(table)).collect()
    assert [(r.plaza_id, r.vehicles_e_zpass) for r in kept] == [(2147483647, 2**63 - 1)]


def test_a_landing_without_manifest_is_refused(spark: SparkSession, tmp_path: Path):
    (tmp_path / "page-00000.json.gz").write_bytes(gzip.compress(b"[]"))
    argv = ["--landing", str(tmp_path), "--table", str(tmp_path / "t"), "--format", "parquet"]
    with pytest.raises(FileNotFoundError, match="no sealed landing"):
        merge_bnt.main([*argv, "--mode", "refresh", "--refresh-id", "r"], spark=spark)


def test_the_jobs_copy_of_the_rules_matches_tollwatch():
    assert merge_bnt.KEY == schema.KEY
    assert {n: ARROW_TYPES[t] for n, t in merge_bnt.REQUIRED.items()} == schema.REQUIRED
    assert {n: ARROW_TYPES[t] for n, t in merge_bnt.OPTIONAL_COUNTS.items()} == schema.OPTIONAL_COUNTS
    assert merge_bnt.SYSTEM_FIELDS == schema.SYSTEM_FIELDS
    assert merge_bnt.IGNORED_SYSTEM_FIELDS == schema.IGNORED_SYSTEM_FIELDS
    assert merge_bnt.DIRECTIONS == schema.DIRECTIONS
    assert (merge_bnt.REFRESH_ID, merge_bnt.WINDOW, merge_bnt.MODE, merge_bnt.FLOW_RUN_ID) == (
        REFRESH_ID,
        WINDOW,
        MODE,
        FLOW_RUN_ID,
    )
    seen = ["plaza_id", "date", ":id", ":created_at", ":version", ":other", "vehicles_bus", "Remarks", "hour"]
    expected = schema.target_schema(seen)
    got = merge_bnt.target_schema(seen)
    assert [(f.name, ARROW_TYPES[f.dataType], f.nullable) for f in got] == [
        (f.name, f.type, f.nullable) for f in expected
    ]


def test_landing_urls_become_uris_spark_can_list():
    blob = "https://acct.blob.core.windows.net/tollwatch/raw/qzve-kjga/mode=refresh/refresh=r/run=1/"
    assert (
        merge_bnt.hadoop_uri(blob)
        == "abfss://tollwatch@acct.dfs.core.windows.net/raw/qzve-kjga/mode=refresh/refresh=r/run=1"
    )
    dfs = "https://acct.dfs.core.usgovcloudapi.net/c/raw"
    assert merge_bnt.hadoop_uri(dfs) == "abfss://c@acct.dfs.core.usgovcloudapi.net/raw"
    assert merge_bnt.hadoop_uri("abfss://c@a.dfs.core.windows.net/raw/") == "abfss://c@a.dfs.core.windows.net/raw"
    assert merge_bnt.hadoop_uri("/tmp/landed/") == "/tmp/landed"
    with pytest.raises(ValueError, match="cannot read"):
        merge_bnt.hadoop_uri("http://127.0.0.1:10000/devstoreaccount1/c/raw")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--mode", "window", "--refresh-id", "r"], "needs --start and --stop"),
        (["--mode", "refresh", "--refresh-id", "r", "--start", "2024-01-02"], "go together"),
        (["--mode", "window", "--refresh-id", "r", "--start", "2024-01-02", "--stop", "2024-01-02"], "after"),
    ],
)
def test_bad_arguments_fail_before_spark_starts(argv: list[str], message: str, capsys):
    with pytest.raises(SystemExit):
        merge_bnt.parse_args(["--landing", "/x", "--table", "c.bronze.t", *argv])
    assert message in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- iceberg path
# No Iceberg runtime here: what can be checked without it is that Spark parses the DDL, that the overwrite
# condition selects whole months, and that the write carries the ledger properties as documented options.


def test_iceberg_ddl_parses_and_declares_the_tables_shape(spark: SparkSession):
    schema_ = merge_bnt.target_schema(["plaza_id", ":id", "vehicles_bus"])
    statements = [
        *merge_bnt.create_table_sql("cat.bronze.bnt_traffic_hourly", schema_),
        merge_bnt.add_columns_sql("cat.bronze.bnt_traffic_hourly", [T.StructField("odd `name`", T.StringType())]),
    ]
    parser = spark._jsparkSession.sessionState().sqlParser()
    for statement in statements:
        parser.parsePlan(statement)  # raises ParseException on bad syntax

    create = statements[1]
    assert "USING iceberg PARTITIONED BY (months(`date`))" in create
    assert "`plaza_id` int NOT NULL, `date` date NOT NULL, `hour` int NOT NULL" in create
    assert (
        "`vehicles_cash` bigint, `source_row_id` string, `source_updated_at` timestamp, `vehicles_bus` string" in create
    )
    assert statements[2] == "ALTER TABLE cat.bronze.bnt_traffic_hourly ADD COLUMNS (`odd ``name``` string)"


def test_iceberg_overwrite_condition_covers_whole_months(spark: SparkSession):
    days = [date(2023, 12, 31), date(2024, 1, 1), date(2024, 1, 31), date(2024, 2, 1), date(2024, 3, 15)]
    df = spark.createDataFrame([(d,) for d in days], "date date")
    months = [date(2024, 3, 1), date(2024, 1, 1)]

    kept = [r.date for r in df.where(merge_bnt.in_months(months)).collect()]

    assert kept == [date(2024, 1, 1), date(2024, 1, 31), date(2024, 3, 15)]
    assert merge_bnt.months_between(date(2024, 1, 20), date(2024, 3, 1)) == [date(2024, 1, 1), date(2024, 2, 1)]
    assert merge_bnt.months_between(date(2024, 12, 5), date(2025, 1, 2)) == [date(2024, 12, 1), date(2025, 1, 1)]


def test_iceberg_write_carries_the_ledger_properties():
    argv = ["--landing", "/l", "--table", "c.bronze.t", "--mode", "window", "--refresh-id", "r-1"]
    args = merge_bnt.parse_args([*argv, "--start", "2024-01-01", "--stop", "2024-02-01", "--flow-run-id", "fr-9"])

    assert merge_bnt.iceberg_write_options(args.properties(), 42) == {
        "snapshot-property.tollwatch.refresh-id": "r-1",
        "snapshot-property.tollwatch.mode": "window",
        "snapshot-property.tollwatch.window": "2024-01-01/2024-02-01",
        "snapshot-property.tollwatch.flow-run-id": "fr-9",
        "isolation-level": "serializable",
        "validate-from-snapshot-id": "42",
    }
    assert "isolation-level" not in merge_bnt.iceberg_write_options(args.properties(), None)
