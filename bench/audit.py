"""Figure 8: what auditing a one-year load costs (write-audit-publish), beside the same load straight to `main`.

On a stack of its own (Azurite + the mirror; no Prefect: the core functions are called directly, as the flow's
tasks call them), over the same sealed landing:

* baseline — `load_landing(..., branch=main)`: what the pipeline did before write-audit-publish;
* audited — `write_audit_publish` with the flow's write and check (`tollwatch.prefect.flows.ingest`): cut the audit
  branch (`Branches.open`), `load_landing(..., branch=branch)`, the upstream's count(*) per day
  (`upstream_counts_by_day`, as the task `audit-load` asks), `audit_branch` (profile of the branch and of `main`'s
  trailing weeks, then the checks), `Branches.publish` (fast-forward `main`).

The mirror serves the year and the six weeks before it; those six weeks are loaded into `main` first (untimed), so
the volume check has the history it judges the year's first weeks against. Each round loads into two fresh
warehouses (a SQL catalog each), baseline and audited in alternating order; the figures are the medians over the
rounds (of each part, and of each per-round difference). Every timed load starts after a `gc.collect()`, and
process CPU is recorded beside wall time (another process's work on a shared box shows in the second only). The
landing is made once (`fetch_and_land`, timed apart) and read by every load. `--quick`: one month, three rounds.

Run: `python -m bench --only 8` (about 40 s on 2 cores; `--quick` about 10 s).
"""

from __future__ import annotations

import gc
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa

from bench.common import Figure
from tollwatch.contract.events import BackfillRequested, Window
from tollwatch.contract.quality import QualitySpec, QualitySummary
from tollwatch.contract.settings import Settings
from tollwatch.core.backfill import upstream_counts_by_day
from tollwatch.core.branches import Branches, Settlement
from tollwatch.core.ingest import IngestRequest, LoadResult, fetch_and_land, load_landing, plan_fetch
from tollwatch.core.landing import LandingManifest
from tollwatch.core.schema import target_schema
from tollwatch.core.table import IcebergTableStore
from tollwatch.core.wap import audit_branch, write_audit_publish
from tollwatch.resources import Resources, table_store

GROUP = "8 audit cost"
#: The year audited (365 days); a quick run audits its first month.
YEAR = Window(start=date(2025, 1, 1), stop=date(2026, 1, 1))
QUICK = Window(start=date(2025, 1, 1), stop=date(2025, 2, 1))
#: `main`'s history before the load: the quality spec's trailing weeks (6) for the volume check.
HISTORY_WEEKS = 6
ROUNDS, QUICK_ROUNDS = 7, 3
#: The parts of the audited load besides the write itself (`load`): what the audit adds.
AUDIT_PARTS = ("branch cut", "upstream counts", "profile+checks", "publish")


def windows(quick: bool) -> tuple[Window, Window]:
    """(`main`'s history, the audited load)."""
    load = QUICK if quick else YEAR
    return Window(start=load.start - timedelta(weeks=HISTORY_WEEKS), stop=load.start), load


@dataclass
class Round:
    """One measured load: wall and CPU seconds per phase (`total`: the whole load), what it wrote, its verdict."""

    kind: str
    s: dict[str, float]
    cpu: dict[str, float]
    rows: int
    verdict: str = ""
    published: bool = False


class _Timer:
    """Wall and process-CPU seconds per named phase (summed when a phase runs more than once: a rebuilt load).

    CPU beside wall: on a shared 2-core box another process's work shows in wall time, not in this one's CPU time.
    """

    def __init__(self) -> None:
        self.s: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        began, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.s[phase] = self.s.get(phase, 0.0) + time.perf_counter() - began
            self.cpu[phase] = self.cpu.get(phase, 0.0) + time.process_time() - cpu


class _TimedBranches(Branches):
    """`Branches` with its cut and its publish timed (the production code, untouched, underneath)."""

    def __init__(self, store: IcebergTableStore, timer: _Timer) -> None:
        super().__init__(store)
        self._timer = timer

    def open(self, branch: str, schema: pa.Schema) -> int:
        with self._timer("branch cut"):
            return super().open(branch, schema)

    def publish(self, branch: str, refresh_id: str, settlement: Settlement | None = None) -> int:
        with self._timer("publish"):
            return super().publish(branch, refresh_id, settlement)


class _Bench:
    """One landing of the history and one of the load, in a container of their own; fresh stores on demand."""

    def __init__(self, res: Resources, scratch: Path, quick: bool) -> None:
        self.res = res
        self.scratch = scratch
        self.history_window, self.load_window = windows(quick)
        self.spec: QualitySpec = res.quality_spec
        self.history, self.history_manifest = self._land(self.history_window, "bench-audit-history")
        began = time.perf_counter()
        self.request, self.manifest = self._land(self.load_window, "bench-audit-load")
        self.land_s = time.perf_counter() - began
        self._stores = 0

    def _land(self, window: Window, request_id: str) -> tuple[IngestRequest, LandingManifest]:
        settings = self.res.settings
        request = IngestRequest.for_window(
            BackfillRequested(
                domain=settings.upstream_domain,
                dataset_id=settings.upstream_dataset_id,
                start=window.start,
                stop=window.stop,
                request_id=request_id,
            )
        )
        plan = plan_fetch(request, self.res.socrata, None)
        manifest = fetch_and_land(
            request, plan, self.res.socrata, self.res.landing, run_id="bench", page_size=settings.upstream_page_size
        )
        return request, manifest

    def fresh_store(self, name: str) -> IcebergTableStore:
        """A new warehouse whose `main` holds the six weeks of history (loaded untimed, straight to `main`)."""
        self._stores += 1
        warehouse = self.scratch / f"{self._stores:02d}-{name}"
        store = table_store(self.res.settings.model_copy(update={"warehouse_dir": warehouse}))
        load_landing(self.history, self.history_manifest, self.res.landing, store, flow_run_id=None)
        return store

    def baseline(self) -> Round:
        """The load straight to `main` (`load_landing` as the pipeline called it before write-audit-publish)."""
        store = self.fresh_store("baseline")
        timer = _Timer()
        gc.collect()
        with timer("total"):
            result = load_landing(self.request, self.manifest, self.res.landing, store, flow_run_id=None)
        return Round(kind="baseline", s=timer.s, cpu=timer.cpu, rows=result.rows_written)

    def audited(self) -> tuple[Round, QualitySummary]:
        """The flow's `_write_audit_publish` with the local engine, minus Prefect (see the module docstring)."""
        store = self.fresh_store("audited")
        timer = _Timer()
        branches = _TimedBranches(store, timer)
        manifest, socrata, dataset = self.manifest, self.res.socrata, self.res.settings.upstream_dataset_id

        def write(branch: str) -> LoadResult:
            branches.open(branch, target_schema(manifest.columns))
            with timer("load"):
                return load_landing(self.request, manifest, self.res.landing, store, flow_run_id=None, branch=branch)

        def check(branch: str, result: LoadResult) -> QualitySummary:
            upstream = None
            if result.touched is not None:
                with timer("upstream counts"):
                    upstream = upstream_counts_by_day(socrata, dataset, result.touched)
            with timer("profile+checks"):
                return audit_branch(
                    store, branch, result, self.spec, upstream_by_day=upstream, columns=manifest.columns
                )

        gc.collect()
        with timer("total"):
            done = write_audit_publish(branches, self.request.refresh_id, write, check)
        on_main = store.info().snapshot_id == done.result.snapshot_id
        found = Round(
            kind="audited",
            s=timer.s,
            cpu=timer.cpu,
            rows=done.result.rows_written,
            verdict=done.quality.verdict,
            published=done.published and on_main,
        )
        return found, done.quality


def measure(res: Resources, scratch: Path, quick: bool) -> tuple[list[Figure], dict[str, Any]]:
    """Land once, then `rounds` x (baseline, audited) on fresh stores, alternating which goes first."""
    bench = _Bench(res, scratch, quick)
    rounds = QUICK_ROUNDS if quick else ROUNDS
    print(
        f"  landed {bench.manifest.rows:,} rows of {bench.load_window.start} → {bench.load_window.stop} in "
        f"{bench.land_s:.1f} s (history {bench.history_manifest.rows:,} rows)",
        file=sys.stderr,
        flush=True,
    )
    pairs: list[tuple[Round, Round]] = []
    quality: QualitySummary | None = None
    for number in range(rounds):
        if number % 2 == 0:
            base = bench.baseline()
            audited, quality = bench.audited()
        else:
            audited, quality = bench.audited()
            base = bench.baseline()
        pairs.append((base, audited))
        parts = ", ".join(f"{k} {v:.2f}" for k, v in audited.s.items() if k != "total")
        print(
            f"  round {number + 1}: baseline {base.s['total']:.2f} s (cpu {base.cpu['total']:.2f}), audited "
            f"{audited.s['total']:.2f} s (cpu {audited.cpu['total']:.2f}; {parts}), verdict {audited.verdict}",
            file=sys.stderr,
            flush=True,
        )
    assert quality is not None
    extra = {
        "history": [bench.history_window.start, bench.history_window.stop],
        "load": [bench.load_window.start, bench.load_window.stop],
        "rows_landed": bench.manifest.rows,
        "land_s": bench.land_s,
        "rounds": [{"baseline": asdict(b), "audited": asdict(a)} for b, a in pairs],
        "quality": quality.brief(),
    }
    return figures(bench, pairs, quality, quick), extra


def _median(pairs: list[tuple[Round, Round]], pick: Callable[[Round, Round], float]) -> float:
    return statistics.median(pick(b, a) for b, a in pairs)


def _audit_parts(r: Round, clock: str = "s") -> float:
    """What the audit's own steps took: everything of the audited load but the write itself."""
    values = getattr(r, clock)
    return sum(values.get(name, 0.0) for name in AUDIT_PARTS)


def figures(bench: _Bench, pairs: list[tuple[Round, Round]], quality: QualitySummary, quick: bool) -> list[Figure]:
    """Medians over the rounds (of each part, and of each per-round difference: they need not add up)."""
    span = f"{bench.load_window.start} → {bench.load_window.stop}"
    label = "1 month (quick)" if quick else "1 year"
    qnote = " QUICK run: one month instead of a year." if quick else ""
    base = _median(pairs, lambda b, a: b.s["total"])
    audited = _median(pairs, lambda b, a: a.s["total"])
    added = _median(pairs, lambda b, a: a.s["total"] - b.s["total"])
    pct = _median(pairs, lambda b, a: 100 * (a.s["total"] - b.s["total"]) / b.s["total"])
    added_cpu = _median(pairs, lambda b, a: a.cpu["total"] - b.cpu["total"])
    base_cpu = _median(pairs, lambda b, a: b.cpu["total"])
    own = _median(pairs, lambda b, a: _audit_parts(a))
    own_pct = _median(pairs, lambda b, a: 100 * _audit_parts(a) / b.s["total"])
    own_cpu = _median(pairs, lambda b, a: _audit_parts(a, "cpu"))
    part = {name: _median(pairs, lambda b, a, n=name: a.s.get(n, 0.0)) for name in (*AUDIT_PARTS, "load")}
    rest = _median(pairs, lambda b, a: a.s["total"] - _audit_parts(a) - b.s["total"])
    whole = bench.land_s + base
    each = "; ".join(f"{b.s['total']:.2f}/{a.s['total']:.2f}" for b, a in pairs)
    out = [
        Figure(
            group=GROUP,
            name=f"baseline: load_landing to main, {label}",
            value=round(base, 2),
            unit="s",
            note=f"what the pipeline did before write-audit-publish. Median of {len(pairs)} rounds, each on two fresh "
            f"warehouses whose main holds the {HISTORY_WEEKS} weeks before (loaded untimed), baseline and audited "
            f"in alternating order; {bench.manifest.rows:,} rows {span}, one landing read by every load. Per round "
            f"baseline/audited s: {each}. Process CPU of the baseline {base_cpu:.2f} s.{qnote}",
        ),
        Figure(
            group=GROUP,
            name=f"audited: write-audit-publish, {label}",
            value=round(audited, 2),
            unit="s",
            baseline=round(base, 2),
            baseline_name="load to main (same run)",
            note="Branches.open + load_landing(branch=) + upstream_counts_by_day + audit_branch + Branches.publish, "
            f"through write_audit_publish as the flow chains them (the load to the branch alone: {part['load']:.2f}"
            f" s).{qnote}",
        ),
        Figure(
            group=GROUP,
            name="time added (audited - baseline)",
            value=round(added, 2),
            unit="s",
            note=f"median of the per-round differences: {pct:.0f}% of the baseline load, "
            f"{100 * added / whole:.0f}% of fetch+land+load (landing the window from the local mirror took "
            f"{bench.land_s:.1f} s); in process CPU {added_cpu:.2f} s.{qnote}",
        ),
        Figure(
            group=GROUP,
            name="time added, % of the baseline load",
            value=round(pct, 1),
            unit="%",
            note=f"median of the per-round ratios.{qnote}",
        ),
        Figure(
            group=GROUP,
            name="the audit's own steps (cut + counts + profile/checks + publish)",
            value=round(own, 2),
            unit="s",
            note=f"timed directly, so free of the load's run-to-run noise: {own_pct:.0f}% of the baseline load; "
            f"process CPU {own_cpu:.2f} s.{qnote}",
        ),
    ]
    split = [
        ("branch cut", "Branches.open: load the table, cut the branch from main (one metadata commit)"),
        ("upstream counts", "upstream_counts_by_day: the mirror's count(*) grouped by day, one query per year"),
        ("profile+checks", "audit_branch: scan the branch's days and main's trailing weeks into profiles, judge"),
        ("publish", "Branches.publish: fast-forward main to the branch and drop it (one metadata commit)"),
    ]
    for name, what in split:
        out.append(Figure(group=GROUP, name=f"added: {name}", value=round(part[name], 3), unit="s", note=what))
    out.append(
        Figure(
            group=GROUP,
            name="added: the rest (load to the branch vs to main, noise)",
            value=round(rest, 3),
            unit="s",
            note="per round: audited - the four parts above - baseline. The write itself, to a branch instead of "
            f"main; the load to the branch took {part['load']:.2f} s (median), to main {base:.2f} s.",
        )
    )
    problems = quality.failing + quality.warnings
    checks = " | ".join(
        f"{c.name} ({c.severity}): {'pass' if c.passed else 'FAIL'}{'' if c.evaluated else ', not evaluated'} — "
        f"{c.detail}" + (f" [{'; '.join(c.findings[:3])}]" if not c.passed and c.findings else "")
        for c in quality.checks
    )
    verdicts = sorted({a.verdict for _, a in pairs})
    published = all(a.published for _, a in pairs)
    same_rows = all(a.rows == b.rows for b, a in pairs)
    out.append(
        Figure(
            group=GROUP,
            name="audit verdict on clean synthetic data (failing checks)",
            value=len(problems),
            unit="checks",
            goal="verdict passed, main fast-forwarded",
            goal_met=verdicts == ["passed"] and published and same_rows,
            note=f"verdict(s) {', '.join(verdicts)}; published to main: {published}; same rows written as the "
            f"baseline: {same_rows}. {checks}",
        )
    )
    if problems:
        for c in problems:
            print(f"  check {c.name} ({c.severity}) failed: {c.detail} {c.findings[:5]}", file=sys.stderr)
    return out


def run(quick: bool) -> tuple[list[Figure], dict[str, Any]]:
    """Start Azurite + the mirror in a temp dir, measure, stop them."""
    from tollwatch_dev.stack import LocalStack

    history, load = windows(quick)
    with tempfile.TemporaryDirectory(prefix="tollwatch-bench-audit-") as tmp:
        stack = LocalStack(
            Path(tmp) / "stack", services=("azurite", "mirror"), mirror_start=history.start, mirror_through=load.stop
        )
        try:
            endpoints = stack.up()
            settings = Settings(
                upstream_base_url=endpoints.mirror_url,  # type: ignore[arg-type]
                storage_connection_string=endpoints.blob_connection_string,  # type: ignore[arg-type]
                storage_container=f"bench-audit-{uuid.uuid4().hex[:10]}",
                catalog_properties={},
                warehouse_dir=Path(tmp) / "unused-warehouse",
                quality_spec=None,
            )
            with Resources(settings) as res:
                return measure(res, Path(tmp) / "warehouses", quick)
        finally:
            stack.down()
