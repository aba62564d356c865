"""Throughput and memory of the ingest path, each beside a baseline measured in the same run (figures 3b and 5).

Why subprocesses: peak RSS is a per-process high-water mark, so every measured run gets a fresh interpreter
(`python -m bench.throughput baseline|floor|production …`) that reports its own `ru_maxrss`, its timings and
an RSS trace per phase as JSON. The parent only plans, starts children and turns their reports into figures.

What is measured, over the same mirror and the same dates:

* BASELINE — what the crontab script this project replaces did: one request loop, every row in one list of
  dicts, one JSON blob to Blob, one pyiceberg append. Not how anything here works; it is the yardstick.
  It runs twice: as specified (Socrata's default 6 columns) and with production's 9 (`$select=:*, *`).
* FLOOR — the least work that can move these rows: the production Socrata client streaming pages straight
  into parquet (typed by `tollwatch.core.schema.convert`), no Blob, no Iceberg, no Prefect. No complete pipeline
  moving the same columns can beat it here, so "production within 3x of FLOOR" bounds what orchestration and
  landing cost. On the local mirror it is upstream-bound (the mirror renders rows in Python).
* production — `tollwatch.prefect.flows.ingest.ingest` called directly in a fresh process against the stack's
  Prefect server, for windows of a day, a week, a month, a year and four years (figure 5: cost must not grow with
  the window).

Run standalone (starts its own Azurite + Prefect + mirror)::

    .venv/bin/python -m bench.throughput --quick      # smoke run, ~30 s
    .venv/bin/python -m bench.throughput              # full run (2010-01-01 → 2026-01-01, ~3.1 M rows)
    .venv/bin/python -m bench.throughput --profile    # + the 1-year window under pyinstrument

Nothing here runs in the test suite. Memory is reported in MiB (ru_maxrss / 1024), as in the README.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from calendar import monthrange
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

from pydantic import BaseModel, Field

from bench.common import RESULTS, ROOT, Figure, machine

DATASET = "qzve-kjga"
FULL_START = date(2010, 1, 1)
FULL_STOP = date(2026, 1, 1)

GROUP_BACKFILL = "3 full-history backfill"
GROUP_GROWTH = "5 cost growth"

#: The crontab script asked for the largest page Socrata serves.
BASELINE_PAGE_SIZE = 50_000
#: What production uses (`Settings.upstream_page_size`), so FLOOR pays the same number of round trips.
FLOOR_PAGE_SIZE = 10_000

RSS_GOAL_MIB = 400.0
#: "Flat rows/s": the largest window keeps at least this share of the 1-month window's rate.
FLAT_SHARE = 0.7
VS_BASELINE_GOAL = 5.0
VS_FLOOR_GOAL = 3.0

PROFILE_PATH = RESULTS / "profile-ingest-year.txt"
#: A child that takes longer than this is killed and the run fails (the whole full run takes ~2.5 min).
CHILD_TIMEOUT_S = 600.0
_RSS_SAMPLE_S = 0.01


# ------------------------------------------------------------------------------------------------ the plan


class ThroughputContext(BaseModel):
    """What `run` needs: a running stack (Azurite + Prefect server), a mirror that serves the range, scratch."""

    env: dict[str, str] = Field(
        description="StackEndpoints.env() of a running stack: PREFECT_API_URL, TOLLWATCH_STORAGE_CONNECTION_STRING"
    )
    mirror_url: str = Field(description="base URL of a tollwatch_dev.mirror serving at least [start, stop)")
    start: date = FULL_START
    stop: date = Field(FULL_STOP, description="exclusive")
    scratch: Path = Field(description="warehouses, parquet and child logs go here (the caller deletes it)")
    quick: bool = Field(False, description="smoke run: two months for BASELINE/FLOOR, windows up to a month")
    profile: bool = Field(False, description=f"also run the 1-year window under pyinstrument → {PROFILE_PATH}")
    baseline_start: date | None = Field(
        None,
        description="measure BASELINE from here instead of `start` (a sub-range, for when the whole range would "
        "need more than ~8 GB RAM or 4 minutes); rows/s stays the comparable number",
    )
    dataset: str = DATASET


@dataclass(frozen=True)
class Span:
    """A named range of days [start, stop)."""

    key: str
    label: str
    start: date
    stop: date

    @property
    def days(self) -> int:
        return (self.stop - self.start).days


def months_before(day: date, months: int) -> date:
    """The same day `months` calendar months earlier (clamped to the month's length)."""
    year, month0 = divmod(day.year * 12 + day.month - 1 - months, 12)
    return date(year, month0 + 1, min(day.day, monthrange(year, month0 + 1)[1]))


def windows(ctx: ThroughputContext) -> list[Span]:
    """The production windows, all ending at the range's end (the latest N days, as a backfill of recent data)."""
    stop = ctx.stop
    spans = [
        Span("day", "1 day", stop - timedelta(days=1), stop),
        Span("week", "1 week", stop - timedelta(days=7), stop),
        Span("month", "1 month", months_before(stop, 1), stop),
    ]
    if not ctx.quick:
        spans += [
            Span("year", "1 year", months_before(stop, 12), stop),
            Span("4years", "4 years", months_before(stop, 48), stop),
        ]
    return [Span(s.key, s.label, max(s.start, ctx.start), s.stop) for s in spans]


def backfill_span(ctx: ThroughputContext) -> Span:
    """FLOOR's range: the whole range, or its last two months in a quick run."""
    if ctx.quick:
        return Span("backfill", "2 months (quick)", max(ctx.start, months_before(ctx.stop, 2)), ctx.stop)
    return Span("backfill", "full range", ctx.start, ctx.stop)


def baseline_span(ctx: ThroughputContext) -> Span:
    """BASELINE's range: FLOOR's, unless `baseline_start` cuts it to a sub-range."""
    full = backfill_span(ctx)
    if ctx.baseline_start is None or ctx.baseline_start <= full.start:
        return full
    return Span("baseline", "sub-range", ctx.baseline_start, full.stop)


def select_span(ctx: ThroughputContext) -> Span:
    """The fairness check's range (BASELINE with production's columns): BASELINE's last two years.

    It is a second BASELINE pass over the same pages with wider rows; rows/s is what is compared, and over the
    whole range it cost ~50 s of every `make bench` for the same number.
    """
    full = baseline_span(ctx)
    return Span("baseline-select", "last 2 years", max(full.start, months_before(full.stop, 24)), full.stop)


# ------------------------------------------------------------------------------------------------ reports


class Measured(BaseModel):
    """What one child process reports (plus `process_s`, timed by the parent around the whole process)."""

    kind: str
    start: date
    stop: date
    rows: int = Field(description="rows read from the upstream")
    rows_written: int = 0
    work_s: float = Field(description="wall time of the work itself, timed inside the process (no startup)")
    process_s: float = 0.0
    import_s: float = 0.0
    peak_rss_mib: float = Field(description="ru_maxrss of the child: its whole life, imports included")
    phase_s: dict[str, float] = Field(default_factory=dict)
    phase_rss_mib: dict[str, float] = Field(default_factory=dict, description="highest sampled RSS per phase")
    extra: dict[str, float | int | str] = Field(default_factory=dict)

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.work_s if self.work_s > 0 else 0.0


def _maxrss_mib() -> float:
    """This process's peak RSS so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _RssSampler:
    """Samples this process's RSS every 10 ms and keeps the peak per named phase.

    ru_maxrss gives the overall peak; the per-phase peaks say *which step* set it (imports, fetch, load…),
    which is what a memory cut needs.
    """

    def __init__(self) -> None:
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._lock = threading.Lock()
        self._phase = "import"
        self._peaks: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)

    def start(self) -> _RssSampler:
        self._thread.start()
        return self

    def mark(self, phase: str) -> None:
        """Close the current phase with one last sample, then attribute samples to `phase`."""
        self._sample()
        with self._lock:
            self._phase = phase

    def stop(self) -> dict[str, float]:
        self._sample()
        self._stop.set()
        self._thread.join(timeout=1)
        return {name: round(value, 1) for name, value in self._peaks.items()}

    def _rss_mib(self) -> float:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * self._page / 2**20

    def _sample(self) -> None:
        rss = self._rss_mib()
        with self._lock:
            self._peaks[self._phase] = max(self._peaks.get(self._phase, 0.0), rss)

    def _loop(self) -> None:
        while not self._stop.wait(_RSS_SAMPLE_S):
            self._sample()


# ------------------------------------------------------------------------------------------------ children


def baseline_child(args: argparse.Namespace) -> Measured:
    """BASELINE — what the crontab script this project replaces did. Deliberately naive; not production code.

    One process, one request loop (plain httpx, `$limit=50000`, `$order=:id`, Socrata's default columns),
    every row appended to one list of dicts, the list dumped as ONE JSON blob to Blob, then ONE pyiceberg
    append of `pa.Table.from_pylist(rows)` to a fresh table. Two things favour it, so a ratio against it is
    conservative: it asks for no system fields (6 columns instead of production's 9) and types nothing
    (every column stays a string, nothing is validated or quarantined). `--select` removes the first
    advantage (production's `:*, *`), to show how much of its speed is the narrower request.
    """
    sampler = _RssSampler().start()
    import httpx
    import pyarrow as pa
    from azure.storage.blob import BlobServiceClient
    from pyiceberg.catalog.sql import SqlCatalog

    imported = time.perf_counter()
    sampler.mark("fetch")
    where = f"date >= '{args.start}T00:00:00' AND date < '{args.stop}T00:00:00'"
    # --select: the fairness check: exactly production's columns (system fields too), so the same bytes per row
    select = {"$select": ":*, *"} if args.select else {}
    rows: list[dict[str, str]] = []
    with httpx.Client(base_url=args.mirror_url, timeout=300.0) as http:
        offset = 0
        while True:
            response = http.get(
                f"/resource/{args.dataset}.json",
                params={"$limit": BASELINE_PAGE_SIZE, "$offset": offset, "$order": ":id", "$where": where, **select},
            )
            response.raise_for_status()
            page = response.json()
            rows.extend(page)
            if len(page) < BASELINE_PAGE_SIZE:
                break
            offset += len(page)
    fetched = time.perf_counter()

    sampler.mark("land")
    service = BlobServiceClient.from_connection_string(os.environ["TOLLWATCH_STORAGE_CONNECTION_STRING"])
    container = service.get_container_client(args.container)
    container.create_container()
    container.upload_blob(f"{args.dataset}/{args.start}_{args.stop}.json", json.dumps(rows), overwrite=True)
    landed = time.perf_counter()

    sampler.mark("load")
    warehouse = Path(args.scratch) / "warehouse"
    warehouse.mkdir(parents=True, exist_ok=True)
    catalog = SqlCatalog("baseline", uri=f"sqlite:///{warehouse / 'catalog.db'}", warehouse=warehouse.as_uri())
    catalog.create_namespace("bronze")
    data = pa.Table.from_pylist(rows)
    table = catalog.create_table("bronze.bnt_traffic_hourly", schema=data.schema)
    table.append(data)
    loaded = time.perf_counter()

    phases = sampler.stop()
    return Measured(
        kind="baseline",
        start=args.start,
        stop=args.stop,
        rows=len(rows),
        rows_written=data.num_rows,
        work_s=loaded - imported,
        import_s=imported - args.t0,
        peak_rss_mib=_maxrss_mib(),
        phase_s={"fetch": fetched - imported, "land": landed - fetched, "load": loaded - landed},
        phase_rss_mib=phases,
    )


def floor_child(args: argparse.Namespace) -> Measured:
    """FLOOR — the least work that moves these rows: production's client and typing, straight to parquet.

    The production Socrata client (10k-row pages, `:*, *`), `orjson` + `tollwatch.core.schema.convert` per page,
    a zstd `ParquetWriter` (a new file only when the upstream's columns change). No Blob, no Iceberg, no
    Prefect, no month spool: an upper bound for the rows/s any complete pipeline can reach here.
    """
    sampler = _RssSampler().start()
    import orjson
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tollwatch.adapters.socrata import SocrataClient, build_http_client, window_where
    from tollwatch.core.schema import convert, target_schema

    imported = time.perf_counter()
    sampler.mark("stream")
    out = Path(args.scratch) / "floor"
    out.mkdir(parents=True, exist_ok=True)
    rows = written = files = 0
    fetch_s = 0.0
    writer: pq.ParquetWriter | None = None
    schema: pa.Schema | None = None
    with build_http_client(args.mirror_url, 60.0) as http:
        pages = SocrataClient(http).pages(
            args.dataset, where=window_where(args.start, args.stop), page_size=FLOOR_PAGE_SIZE
        )
        while True:
            asked = time.perf_counter()
            page = next(pages, None)
            fetch_s += time.perf_counter() - asked
            if page is None:
                break
            wanted = target_schema(page.columns)
            if writer is None or schema is None or not wanted.equals(schema):
                if writer is not None:
                    writer.close()
                schema = wanted
                writer = pq.ParquetWriter(out / f"part-{files:05d}.parquet", schema, compression="zstd")
                files += 1
            good = convert(orjson.loads(page.body), schema).good
            writer.write_table(good)
            rows += page.row_count
            written += good.num_rows
    if writer is not None:
        writer.close()
    done = time.perf_counter()
    phases = sampler.stop()
    return Measured(
        kind="floor",
        start=args.start,
        stop=args.stop,
        rows=rows,
        rows_written=written,
        work_s=done - imported,
        import_s=imported - args.t0,
        peak_rss_mib=_maxrss_mib(),
        phase_s={"fetch (in the page iterator)": fetch_s, "parse+type+write": done - imported - fetch_s},
        phase_rss_mib=phases,
        extra={"files": files},
    )


class _PhaseMarks(logging.Handler):
    """Moves the RSS sampler to the next phase when `tollwatch.core.ingest` logs the end of landing and of commit.

    Reading the pipeline's own log lines keeps the production path untouched (no wrapper, no patch).
    """

    def __init__(self, sampler: _RssSampler, began: float) -> None:
        super().__init__(logging.INFO)
        self._sampler = sampler
        self._began = began
        self.at: dict[str, float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        message = str(record.msg)
        if message.startswith("sealed landing"):
            self.at["landed"] = time.perf_counter() - self._began
            self._sampler.mark("load+commit")
        elif message.startswith("committed snapshot"):
            self.at["committed"] = time.perf_counter() - self._began
            self._sampler.mark("announce")


def production_child(args: argparse.Namespace) -> Measured:
    """Production: `tollwatch.prefect.flows.ingest.ingest(start, stop, request_id)` called directly, as a deployment
    run would.

    Settings come from the environment the parent prepared (the stack's Prefect server and Azurite, the
    mirror, a fresh container and warehouse). `work_s` is the flow's own `durations.total_s` (fetch+land,
    load+commit); the flow call with its Prefect bookkeeping and the whole process are reported beside it.
    """
    sampler = _RssSampler().start()
    from tollwatch.prefect.flows.ingest import ingest

    imported = time.perf_counter()
    import_rss = _maxrss_mib()
    sampler.mark("flow start+fetch/land")
    marks = _PhaseMarks(sampler, imported)
    ingest_log = logging.getLogger("tollwatch.core.ingest")
    ingest_log.setLevel(logging.INFO)
    ingest_log.propagate = False  # the marks need INFO records; the console must not get them
    ingest_log.addHandler(marks)

    request_id = f"bench-{uuid.uuid4().hex[:12]}"
    if args.profile:
        from pyinstrument import Profiler

        profiler = Profiler(interval=0.001)
        with profiler:
            completed = ingest(start=args.start, stop=args.stop, request_id=request_id)
        _write_profile(profiler, Path(args.profile), args)
    else:
        completed = ingest(start=args.start, stop=args.stop, request_id=request_id)
    called = time.perf_counter()
    phases = sampler.stop()
    durations = completed.durations
    return Measured(
        kind="production",
        start=args.start,
        stop=args.stop,
        rows=completed.rows_fetched,
        rows_written=completed.rows_written,
        work_s=durations.total_s,
        import_s=imported - args.t0,
        peak_rss_mib=_maxrss_mib(),
        phase_s={"fetch+land": durations.fetch_s, "load+commit": durations.load_s, "flow call": called - imported},
        phase_rss_mib=phases,
        extra={
            "rows_rejected": completed.rows_rejected,
            "rss_after_imports_mib": round(import_rss, 1),
            "snapshot_id": str(completed.snapshot_id),
        },
    )


def _write_profile(profiler: object, path: Path, args: argparse.Namespace) -> None:
    """The call tree (where the time goes) and the flat self-time list (what to optimise) in one text file."""
    tree = profiler.output_text(unicode=True, color=False, show_all=False)  # type: ignore[attr-defined]
    flat = profiler.output_text(unicode=True, color=False, flat=True, flat_time="self")  # type: ignore[attr-defined]
    path.parent.mkdir(parents=True, exist_ok=True)
    header = (
        f"# pyinstrument profile of tollwatch.prefect.flows.ingest.ingest, window {args.start} → {args.stop}"
        " (python -m bench.throughput --profile)\n# main thread only (tasks of a sync flow run there);"
        " Prefect's background log/event threads are not shown\n\n"
    )
    path.write_text(header + "## call tree\n\n" + tree + "\n## self time, flat\n\n" + flat)


_CHILDREN: dict[str, Callable[[argparse.Namespace], Measured]] = {
    "baseline": baseline_child,
    "floor": floor_child,
    "production": production_child,
}


# ------------------------------------------------------------------------------------------------ the parent


def _spawn(ctx: ThroughputContext, kind: str, span: Span, name: str, env: dict[str, str], *extra: str) -> Measured:
    """Run one child to completion and read its report; a failure raises with the child's log tail."""
    out = ctx.scratch / "reports" / f"{name}.json"
    log = ctx.scratch / "logs" / f"{name}.log"
    out.parent.mkdir(parents=True, exist_ok=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    argv = [
        sys.executable, "-m", "bench.throughput", kind,
        "--start", span.start.isoformat(),
        "--stop", span.stop.isoformat(),
        "--mirror-url", ctx.mirror_url,
        "--dataset", ctx.dataset,
        "--scratch", str(ctx.scratch / name),
        "--out", str(out),
        *extra,
    ]  # fmt: skip
    began = time.perf_counter()
    with log.open("wb") as sink:
        done = subprocess.run(argv, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT, timeout=CHILD_TIMEOUT_S)
    elapsed = time.perf_counter() - began
    if done.returncode != 0 or not out.exists():
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{name} ({kind} {span.start} → {span.stop}) exited {done.returncode}; log {log}:\n{tail}")
    measured = Measured.model_validate_json(out.read_text())
    measured.process_s = elapsed
    print(
        f"  {name:<16} {measured.rows:>9,} rows  {measured.work_s:7.1f} s work  {measured.process_s:6.1f} s process"
        f"  {measured.rows_per_s:>9,.0f} rows/s  peak {measured.peak_rss_mib:6.0f} MiB",
        file=sys.stderr,
        flush=True,
    )
    return measured


def _child_env(ctx: ThroughputContext, **overrides: str) -> dict[str, str]:
    """The caller's environment plus the stack's, with Prefect's home in scratch (never the user's ~/.prefect)."""
    env = {
        **os.environ,
        **ctx.env,
        "TOLLWATCH_UPSTREAM_BASE_URL": ctx.mirror_url,
        "TOLLWATCH_UPSTREAM_DATASET_ID": ctx.dataset,
        "PREFECT_HOME": str(ctx.scratch / "prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PYTHONUNBUFFERED": "1",
        **overrides,
    }
    env.pop("TOLLWATCH_CATALOG_PROPERTIES", None)  # the default SQL catalog under the scratch warehouse
    return env


def _container_name(name: str) -> str:
    return f"bench-{name.replace('_', '-')}-{uuid.uuid4().hex[:10]}"


def _drop_container(ctx: ThroughputContext, container: str) -> None:
    """Free Azurite's disk after a run (the BASELINE blob of the full range is ~0.4 GB)."""
    from azure.core.exceptions import ResourceNotFoundError
    from azure.storage.blob import BlobServiceClient

    service = BlobServiceClient.from_connection_string(ctx.env["TOLLWATCH_STORAGE_CONNECTION_STRING"])
    with service, contextlib.suppress(ResourceNotFoundError):
        service.delete_container(container)


def _check_mirror(ctx: ThroughputContext, needed: Sequence[Span]) -> None:
    """Fail early and clearly when the mirror does not serve every day the plan reads."""
    import httpx

    state = httpx.get(f"{ctx.mirror_url.rstrip('/')}/admin/state", timeout=10.0, trust_env=False).json()
    served = (date.fromisoformat(state["history_start"]), date.fromisoformat(state["published_through"]))
    first, last = min(s.start for s in needed), max(s.stop for s in needed)
    if state.get("dataset") != ctx.dataset or first < served[0] or last > served[1]:
        raise ValueError(
            f"the mirror at {ctx.mirror_url} serves {state.get('dataset')} {served[0]} → {served[1]}; "
            f"this benchmark reads {ctx.dataset} {first} → {last}"
        )


def measure_baseline(ctx: ThroughputContext, *, select: bool = False) -> Measured:
    """BASELINE in a fresh process (see `baseline_child`); `select` asks for production's columns as well."""
    name = "baseline-select" if select else "baseline"
    container = _container_name(name)
    extra = ("--container", container, *(("--select",) if select else ()))
    try:
        span = select_span(ctx) if select else baseline_span(ctx)
        return _spawn(ctx, "baseline", span, name, _child_env(ctx), *extra)
    finally:
        _drop_container(ctx, container)


def measure_floor(ctx: ThroughputContext) -> Measured:
    """FLOOR in a fresh process (see `floor_child`)."""
    return _spawn(ctx, "floor", backfill_span(ctx), "floor", _child_env(ctx))


def measure_production(ctx: ThroughputContext, span: Span, *, profile: Path | None = None) -> Measured:
    """One ingest flow run in a fresh process, with a container and warehouse of its own (an empty table)."""
    name = f"production-{span.key}" + ("-profiled" if profile else "")
    container = _container_name(name)
    env = _child_env(
        ctx, TOLLWATCH_STORAGE_CONTAINER=container, TOLLWATCH_WAREHOUSE_DIR=str(ctx.scratch / name / "warehouse")
    )
    extra = ("--profile", str(profile)) if profile else ()
    try:
        return _spawn(ctx, "production", span, name, env, *extra)
    finally:
        _drop_container(ctx, container)


def run(ctx: ThroughputContext) -> list[Figure]:
    """Measure BASELINE, FLOOR and the production windows on the caller's stack; return figures 3b and 5."""
    ctx.scratch.mkdir(parents=True, exist_ok=True)
    spans = windows(ctx)
    _check_mirror(ctx, [baseline_span(ctx), backfill_span(ctx), *spans])
    baseline = measure_baseline(ctx)
    baseline_select = measure_baseline(ctx, select=True)
    floor = measure_floor(ctx)
    production = {span.key: measure_production(ctx, span) for span in spans}
    if ctx.profile:
        year = next((s for s in spans if s.key == "year"), spans[-1])
        measure_production(ctx, year, profile=PROFILE_PATH)
        print(f"  profile written to {PROFILE_PATH}", file=sys.stderr)
    return figures(ctx, baseline, baseline_select, floor, production, spans)


# ------------------------------------------------------------------------------------------------ figures


def _describe(m: Measured) -> str:
    phases = ", ".join(f"{k} {v:.1f} s" for k, v in m.phase_s.items())
    rss = ", ".join(f"{k} {v:.0f}" for k, v in m.phase_rss_mib.items())
    return (
        f"{m.rows:,} rows {m.start} → {m.stop}; work {m.work_s:.1f} s ({phases}); process {m.process_s:.1f} s; "
        f"peak RSS {m.peak_rss_mib:.0f} MiB, by phase (MiB): {rss}"
    )


def figures(
    ctx: ThroughputContext,
    baseline: Measured,
    baseline_select: Measured,
    floor: Measured,
    production: dict[str, Measured],
    spans: Sequence[Span],
) -> list[Figure]:
    """Turn the measurements into figures; goals are judged here, from numbers of this run only."""
    quick = " QUICK run: ranges shrunk for a smoke test, verdicts not meaningful." if ctx.quick else ""
    sub = baseline.start > floor.start
    sub_note = (
        f" Measured on a sub-range ({baseline.start} → {baseline.stop}) because the whole range would not fit the"
        " memory/time budget; rows/s is the comparable number."
        if sub
        else ""
    )
    out: list[Figure] = [
        Figure(
            group=GROUP_BACKFILL,
            name="BASELINE crontab script rows/s",
            value=baseline.rows_per_s,
            unit="rows/s",
            better="higher",
            note=f"BASELINE (one list, one JSON blob, one append). {_describe(baseline)}.{sub_note}{quick}",
        ),
        Figure(
            group=GROUP_BACKFILL,
            name="BASELINE crontab script peak RSS",
            value=baseline.peak_rss_mib,
            unit="MiB",
            note=f"BASELINE over {baseline.rows:,} rows: memory grows with the range.{sub_note}{quick}",
        ),
        Figure(
            group=GROUP_BACKFILL,
            name="BASELINE crontab script rows/s, production's columns",
            value=baseline_select.rows_per_s,
            unit="rows/s",
            better="higher",
            note="BASELINE again with `$select=:*, *` (9 columns, as production asks): the fairness check for the"
            f" default BASELINE, which moves 6; over BASELINE's last two years (rows/s is the comparable number)."
            f" {_describe(baseline_select)}.{quick}",
        ),
        Figure(
            group=GROUP_BACKFILL,
            name="FLOOR client→parquet rows/s",
            value=floor.rows_per_s,
            unit="rows/s",
            better="higher",
            note=f"FLOOR (production client + convert → parquet, nothing else). {_describe(floor)}.{quick}",
        ),
        Figure(
            group=GROUP_BACKFILL,
            name="FLOOR client→parquet peak RSS",
            value=floor.peak_rss_mib,
            unit="MiB",
            note=f"FLOOR over {floor.rows:,} rows.{quick}",
        ),
    ]

    by_key = {s.key: s for s in spans}
    for span in spans:
        m = production[span.key]
        out.append(
            Figure(
                group=GROUP_GROWTH,
                name=f"production rows/s, {span.label} window",
                value=m.rows_per_s,
                unit="rows/s",
                better="higher",
                note=f"rows / flow durations.total_s. {_describe(m)}.{quick}",
            )
        )
    for span in spans:
        m = production[span.key]
        out.append(
            Figure(
                group=GROUP_GROWTH,
                name=f"production peak RSS, {span.label} window",
                value=m.peak_rss_mib,
                unit="MiB",
                goal=f"≤ {RSS_GOAL_MIB:.0f} MiB",
                goal_met=m.peak_rss_mib <= RSS_GOAL_MIB,
                note=f"whole process; {m.extra.get('rss_after_imports_mib')} MiB after imports.{quick}",
            )
        )

    largest = spans[-1]
    reference = by_key["month"] if largest.key != "month" else by_key["week"]
    big, ref = production[largest.key], production[reference.key]
    flat = big.rows_per_s >= FLAT_SHARE * ref.rows_per_s
    over = [s.label for s in spans if production[s.key].peak_rss_mib > RSS_GOAL_MIB]
    all_rss_ok = not over
    worst = max(production.values(), key=lambda m: m.peak_rss_mib)
    out.append(
        Figure(
            group=GROUP_GROWTH,
            name=f"rows/s flatness, {largest.label} vs {reference.label}",
            value=big.rows_per_s,
            unit="rows/s",
            baseline=ref.rows_per_s,
            baseline_name=f"production, {reference.label} window (same run)",
            better="higher",
            goal=f"flat rows/s ({largest.label} ≥ {FLAT_SHARE:.0%} of {reference.label}); "
            f"peak RSS ≤ {RSS_GOAL_MIB:.0f} MiB for every window",
            goal_met=flat and all_rss_ok,
            note=f"rows/s part {'met' if flat else 'NOT met'}; RSS part "
            f"{'met' if all_rss_ok else 'NOT met (' + ', '.join(over) + ')'}; highest peak RSS"
            f" {worst.peak_rss_mib:.0f} MiB ({worst.start} → {worst.stop}).{quick}",
        )
    )

    compared = by_key.get("year", largest)
    prod = production[compared.key]
    select_ratio = prod.rows_per_s / baseline_select.rows_per_s if baseline_select.rows_per_s else 0.0
    out += [
        Figure(
            group=GROUP_BACKFILL,
            name=f"production ({compared.label} window) vs BASELINE, rows/s",
            value=prod.rows_per_s,
            unit="rows/s",
            baseline=baseline.rows_per_s,
            baseline_name="BASELINE crontab script (same run)",
            better="higher",
            goal=f"≥ {VS_BASELINE_GOAL:g}x BASELINE",
            goal_met=prod.rows_per_s >= VS_BASELINE_GOAL * baseline.rows_per_s,
            note=f"production {prod.rows:,} rows in {prod.work_s:.1f} s (flow total_s); BASELINE {baseline.rows:,}"
            f" rows in {baseline.work_s:.1f} s; against BASELINE with production's columns"
            f" ({baseline_select.rows_per_s:,.0f} rows/s) the ratio is {select_ratio:.2f}x.{sub_note}{quick}",
        ),
        Figure(
            group=GROUP_BACKFILL,
            name=f"production ({compared.label} window) vs FLOOR, rows/s",
            value=prod.rows_per_s,
            unit="rows/s",
            baseline=floor.rows_per_s,
            baseline_name="FLOOR client→parquet (same run)",
            better="higher",
            goal=f"within {VS_FLOOR_GOAL:g}x of FLOOR (≥ FLOOR / {VS_FLOOR_GOAL:g})",
            goal_met=prod.rows_per_s >= floor.rows_per_s / VS_FLOOR_GOAL,
            note=f"ratio < 1 is expected: FLOOR skips Blob, the month spool, Iceberg and Prefect.{quick}",
        ),
        Figure(
            group=GROUP_BACKFILL,
            name=f"production ({compared.label} window) vs BASELINE, peak RSS",
            value=prod.peak_rss_mib,
            unit="MiB",
            baseline=baseline.peak_rss_mib,
            baseline_name="BASELINE crontab script (same run)",
            note=f"production {prod.rows:,} rows, BASELINE {baseline.rows:,} rows.{quick}",
        ),
    ]
    return out


def table(figures: Sequence[Figure]) -> str:
    """A plain-text table of the figures (what the standalone run prints)."""

    def number(value: float | None, unit: str) -> str:
        if value is None:
            return ""
        return f"{value:,.0f} {unit}" if abs(value) >= 100 else f"{value:,.2f} {unit}"

    lines = []
    for f in figures:
        ratio = f"{f.ratio:.2f}x" if f.ratio is not None else ""
        met = {True: "met", False: "NOT met", None: ""}[f.goal_met]
        lines.append(
            f"{f.group:<24} {f.name:<52} {number(f.value, f.unit):>16} {number(f.baseline, f.unit):>16}"
            f" {ratio:>7}  {f.goal or '':<40} {met}"
        )
    header = f"{'group':<24} {'figure':<52} {'value':>16} {'baseline':>16} {'ratio':>7}  {'goal':<40} verdict"
    return "\n".join([header, "-" * len(header), *lines])


# ------------------------------------------------------------------------------------------------ CLI


def _child_main(kind: str, argv: list[str]) -> int:
    """Entry of a measured child: do the work, write the report, exit (the parent reads the file)."""
    t0 = time.perf_counter()
    parser = argparse.ArgumentParser(prog=f"python -m bench.throughput {kind}")
    parser.add_argument("--start", type=date.fromisoformat, required=True)
    parser.add_argument("--stop", type=date.fromisoformat, required=True)
    parser.add_argument("--mirror-url", required=True)
    parser.add_argument("--dataset", default=DATASET)
    parser.add_argument("--scratch", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--container", default=None, help="BASELINE's blob container")
    parser.add_argument("--select", action="store_true", help="BASELINE: ask for production's columns (:*, *)")
    parser.add_argument("--profile", default=None, help="production: write a pyinstrument profile here")
    args = parser.parse_args(argv)
    args.t0 = t0
    measured = _CHILDREN[kind](args)
    Path(args.out).write_text(measured.model_dump_json(indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone: start a local stack in a temp dir, run, print the table, store the figures as JSON."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in _CHILDREN:
        return _child_main(argv[0], argv[1:])
    parser = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: small ranges (~1 min)")
    parser.add_argument("--profile", action="store_true", help=f"also profile the 1-year window → {PROFILE_PATH}")
    parser.add_argument("--start", type=date.fromisoformat, default=FULL_START)
    parser.add_argument("--stop", type=date.fromisoformat, default=FULL_STOP, help="exclusive")
    parser.add_argument("--baseline-start", type=date.fromisoformat, default=None, help="BASELINE on a sub-range")
    parser.add_argument("--keep", type=Path, default=None, help="use this scratch dir and keep it (logs, reports)")
    args = parser.parse_args(argv)

    from tollwatch_dev.stack import LocalStack

    with tempfile.TemporaryDirectory(prefix="tollwatch-bench-") as tmp:
        scratch = args.keep or Path(tmp) / "scratch"
        probe = ThroughputContext(
            env={}, mirror_url="", start=args.start, stop=args.stop, scratch=scratch, quick=args.quick
        )
        first = min(s.start for s in [backfill_span(probe), *windows(probe)])
        stack = LocalStack(
            Path(tmp) / "stack",
            services=("azurite", "prefect", "mirror"),
            mirror_start=first,
            mirror_through=args.stop,
            prefect_ui=False,
        )
        print(f"starting a local stack in {tmp} (mirror {first} → {args.stop})", file=sys.stderr, flush=True)
        endpoints = stack.up()
        try:
            ctx = ThroughputContext(
                env=endpoints.env(),
                mirror_url=endpoints.mirror_url,
                start=first,
                stop=args.stop,
                scratch=scratch,
                quick=args.quick,
                profile=args.profile,
                baseline_start=args.baseline_start,
            )
            figs = run(ctx)
        finally:
            stack.down()
    print(table(figs))
    RESULTS.mkdir(parents=True, exist_ok=True)
    stored = RESULTS / ("throughput-quick.json" if args.quick else "throughput.json")
    stored.write_text(
        json.dumps({"machine": machine(), "figures": [f.model_dump() for f in figs]}, indent=2, default=str)
    )
    print(f"\nstored {stored}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
