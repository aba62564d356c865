"""`python -m bench` (= `make bench`): every figure of the benchmark issue, each beside its same-run baseline.

Prints one table and writes `bench/results/latest.json`. `--quick` shrinks every figure for a smoke run;
`--only 1,3` runs a subset. Nothing here runs inside the test suite.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from collections.abc import Callable
from datetime import date
from pathlib import Path

from bench.common import RESULTS, Figure, FigureFailed, machine


def _table(figures: list[Figure]) -> str:
    rows = [("figure", "measure", "value", "baseline", "ratio", "goal", "met")]
    for f in figures:
        ratio = f"{f.ratio:.1f}x" if f.ratio else ""
        baseline = f"{f.baseline:g} {f.unit} ({f.baseline_name})" if f.baseline is not None else ""
        met = "" if f.goal_met is None else ("yes" if f.goal_met else "NO")
        rows.append((f.group, f.name, f"{f.value:g} {f.unit}", baseline, ratio, f.goal or "", met))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    notes = [f"  {f.group} / {f.name}: {f.note}" for f in figures if f.note]
    return "\n".join(lines + (["", "notes:", *notes] if notes else []))


def _throughput(history: tuple[date, date], quick: bool, events_rows_per_s: float | None) -> list[Figure]:
    """BASELINE, FLOOR and cost growth on a stack of their own; the event-driven rate set beside them."""
    import tempfile
    from pathlib import Path

    from bench import throughput
    from tollwatch_dev.stack import LocalStack

    with tempfile.TemporaryDirectory(prefix="tollwatch-bench-") as tmp:
        stack = LocalStack(
            Path(tmp) / "stack",
            services=("azurite", "prefect", "mirror"),
            prefect_ui=False,
            mirror_start=history[0],
            mirror_through=history[1],
        )
        try:
            endpoints = stack.up()
            context = throughput.ThroughputContext(
                env=endpoints.env(),
                mirror_url=endpoints.mirror_url,
                start=history[0],
                stop=history[1],
                scratch=Path(tmp) / "scratch",
                quick=quick,
                profile=not quick,
            )
            figures = throughput.run(context)
        finally:
            stack.down()
    floor = next((f for f in figures if f.name.startswith("FLOOR") and f.unit == "rows/s"), None)
    if events_rows_per_s is None or floor is None:  # figure 3's event-driven backfill was not run
        return figures
    from bench.latency import AUTO_ROWS_PER_S_GOAL

    figures.append(
        Figure(
            group="3 full-history backfill",
            name="through events (auto runs, PostgreSQL) vs FLOOR",
            value=round(events_rows_per_s),
            unit="rows/s",
            better="higher",
            baseline=floor.value,
            baseline_name="FLOOR (same run)",
            goal=f"≥ {AUTO_ROWS_PER_S_GOAL:,} rows/s and within 3x of FLOOR",
            goal_met=events_rows_per_s >= AUTO_ROWS_PER_S_GOAL and events_rows_per_s >= floor.value / 3,
        )
    )
    return figures


def _write(path: Path, figures: list[Figure], extra: dict[str, object], about: dict[str, str]) -> None:
    """The results so far: written after every figure, so a failure late in a long run keeps what was measured."""
    payload = {"machine": machine() | about, "figures": [f.model_dump() | {"ratio": f.ratio} for f in figures]}
    path.write_text(json.dumps(payload | {"extra": extra}, indent=2, default=str) + "\n")


def _audit(quick: bool, extra: dict[str, object]) -> list[Figure]:
    """The cost of auditing a one-year load (write-audit-publish) on a stack of its own (Azurite + the mirror)."""
    from bench import audit

    found, measured = audit.run(quick)
    extra["audit"] = measured
    return found


def _intake(quick: bool, extra: dict[str, object]) -> list[Figure]:
    """Load on the Function app's intake (Event Grid deliveries, backfill requests) on a stack of its own."""
    from bench import intake

    found, measured = intake.run(quick)
    extra["intake"] = measured
    return found


def _spark_merge() -> list[Figure]:
    from bench.spark import figure_spark_merge

    return figure_spark_merge()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run in a few minutes")
    parser.add_argument(
        "--only",
        default="1,2,3,4,5,6,7,8,9",
        help="comma-separated figure numbers (5 also measures 3's BASELINE and FLOOR)",
    )
    args = parser.parse_args(argv)
    wanted = {part.strip() for part in args.only.split(",")}

    from bench import latency

    quick = args.quick
    history = (date(2023, 1, 1), date(2024, 1, 1)) if quick else (date(2010, 1, 1), date(2026, 1, 1))
    figures: list[Figure] = []
    extra: dict[str, object] = {}

    def full_history() -> list[Figure]:
        found, result = latency.figure_full_history(*history)
        extra["full_history"] = result
        return found

    steps: list[tuple[str, Callable[[], list[Figure]]]] = [
        ("1", lambda: latency.figure_event_to_running(samples=5 if quick else 30)),
        ("2", lambda: latency.figure_publish_to_downstream(samples=3 if quick else 10)),
        ("3", full_history),
        ("4", lambda: latency.figure_fan_out(events=20 if quick else 200)),
        ("5", lambda: _throughput(history, quick, extra.get("full_history", {}).get("rows_per_s"))),  # type: ignore[union-attr]
        ("6", lambda: latency.figure_burst(events=50 if quick else 1000)),
        ("7", _spark_merge),
        ("8", lambda: _audit(quick, extra)),
        ("9", lambda: _intake(quick, extra)),
    ]
    began = time.monotonic()
    failed: list[str] = []
    out = RESULTS / ("quick.json" if quick else "latest.json")
    RESULTS.mkdir(parents=True, exist_ok=True)
    for number, step in steps:
        if number in wanted:
            started = time.monotonic()
            print(f"figure {number} …", file=sys.stderr, flush=True)
            try:
                figures += step()
            except FigureFailed as missed:  # measured, but a goal that must hold did not: show it, fail the run
                print(f"figure {number}: {missed}", file=sys.stderr, flush=True)
                figures += missed.figures
                failed.append(number)
            except Exception:  # one figure's failure must not lose the others: report it and go on
                traceback.print_exc()
                failed.append(number)
            print(f"figure {number} took {time.monotonic() - started:.0f}s", file=sys.stderr, flush=True)
            _write(out, figures, extra, {"partial": "yes", "failed": ",".join(failed)})
    took = time.monotonic() - began
    about = machine() | {"bench_s": f"{took:.0f}", "quick": str(quick), "failed": ",".join(failed)}
    print(f"tollwatch bench — {about['date']}, commit {about['commit']}, {about['cpus']} cores, "
          f"Python {about['python']}, {took / 60:.1f} min{' (quick)' if quick else ''}")  # fmt: skip
    print(_table(figures))
    _write(out, figures, extra, about)
    if failed:
        print(f"figure(s) {', '.join(failed)} failed (traceback above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
