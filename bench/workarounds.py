"""`python -m bench.workarounds`: what each of the local server's departures from `prefect server start` buys.

Each variant is the same event-driven backfill (one event per month, every chunk through the automation, the
worker and the warm runs) on a fresh stack, with one setting or patch taken away. It reports wall time, rows/s,
and what the server answered with 503/500 (from its own log), so a workaround is kept only with a number.
Runs in about 2 min per variant; `--only` picks variants, `--years` sizes the backfill.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import date
from typing import Any

from pydantic import BaseModel, Field

from bench.common import RESULTS, machine
from tollwatch.core.backfill import Chunk


class Variant(BaseModel):
    """One stack configuration: which server command, which database, which settings replaced."""

    name: str
    description: str
    db: str = "postgres"
    plain_server: bool = False
    overrides: dict[str, dict[str, str]] = Field(default_factory=dict)


#: The settings the stack used to change on every database, at their old values (prefect 3.9.1's defaults are
#: 30 s, 15 s and 5 tries): on PostgreSQL each is measured against the shipped stack, which uses Prefect's.
OLD_SETTINGS = {
    "slot_wait": {"PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS": "1"},
    "late_runs": {"PREFECT_SERVER_SERVICES_LATE_RUNS_AFTER_SECONDS": "600"},
    "server_retries": {"PREFECT_CLIENT_MAX_RETRIES": "20"},
    "client_retries": {"PREFECT_CLIENT_MAX_RETRIES": "8"},
}

VARIANTS: tuple[Variant, ...] = (
    Variant(name="pg-stack", description="PostgreSQL as shipped: `prefect server start`, Prefect's settings"),
    Variant(
        name="pg-slot-wait-1",
        description="as pg-stack, a run queued behind the concurrency limit re-offered after 1 s (Prefect: 30 s)",
        overrides={"prefect": OLD_SETTINGS["slot_wait"]},
    ),
    Variant(
        name="pg-late-600",
        description="as pg-stack, runs marked Late after 600 s (Prefect: 15 s)",
        overrides={"prefect": OLD_SETTINGS["late_runs"]},
    ),
    Variant(
        name="pg-retries-8-20",
        description="as pg-stack, 20 client retries in the server, 8 in the worker and runs (Prefect: 5)",
        overrides={
            "prefect": OLD_SETTINGS["server_retries"],
            "worker": OLD_SETTINGS["client_retries"],
            "warm": OLD_SETTINGS["client_retries"],
        },
    ),
    Variant(
        name="sqlite-stack",
        description="SQLite, the stack as shipped: Retry-After on 503s, 20/8 client retries, Late after 600 s",
        db="sqlite",
    ),
    Variant(
        name="sqlite-plain",
        description="SQLite, `prefect server start` with Prefect's settings",
        db="sqlite",
        plain_server=True,
    ),
)


def measure(variant: Variant, start: date, stop: date) -> dict[str, Any]:
    from bench.latency import backfill_through_events

    began = time.time()
    result = backfill_through_events(
        start,
        stop,
        Chunk.MONTH,
        mirror_through=stop,
        db=variant.db,
        plain_server=variant.plain_server,
        overrides=variant.overrides,
    )
    return {
        "variant": variant.name,
        "description": variant.description,
        **result,
        "rows_per_s": result["rows"] / result["wall_s"],
        "total_s": time.time() - began,
    }


def _table(results: list[dict[str, Any]]) -> str:
    head = ("variant", "wall s", "rows/s", "server CPU s", "runs/chunks", "dup", "restarted", "503s", "500s")
    rows = [head] + [
        (
            r["variant"],
            f"{r['wall_s']:.1f}",
            f"{r['rows_per_s']:,.0f}",
            f"{r['server_cpu_s']:.1f}",
            f"{int(r['runs'])}/{int(r['chunks'])}",
            str(int(r["duplicates"])),
            str(int(r["restarted"])),
            str(int(r["server_503"])),
            str(int(r["server_500"])),
        )
        for r in results
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.workarounds", description=__doc__)
    parser.add_argument("--only", default=",".join(v.name for v in VARIANTS), help="comma-separated variant names")
    parser.add_argument("--years", type=int, default=4, help="monthly chunks over this many years (from 2021)")
    parser.add_argument("--repeat", type=int, default=1, help="measure each variant this many times, interleaved")
    args = parser.parse_args(argv)
    wanted = [v for v in VARIANTS if v.name in set(args.only.split(","))]
    if not wanted:
        parser.error(f"no such variant; choose from {', '.join(v.name for v in VARIANTS)}")
    start, stop = date(2021, 1, 1), date(2021 + args.years, 1, 1)
    results = []
    for _ in range(args.repeat):
        for variant in wanted:
            print(f"... {variant.name}: {variant.description}", flush=True)
            results.append(measure(variant, start, stop))
            print(_table(results[-1:]), flush=True)
    print("\n" + _table(results))
    out = RESULTS / "workarounds.json"
    report = {"machine": machine(), "start": str(start), "stop": str(stop), "results": results}
    out.write_text(json.dumps(report, indent=2))
    print(f"\nwritten: {out.relative_to(RESULTS.parent.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
