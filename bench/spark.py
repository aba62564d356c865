"""Figure 7: one year's landing merged by the Spark engine (`spark-submit` of `tollwatch-merge`, local[2]) beside the
pyiceberg writer, on the same landing in the same run.

Both start from the same sealed landing in Azurite (fetched once from the mirror by the flow's own `fetch_and_land`)
and write an empty table of their own. Each runs in a fresh process under `/usr/bin/time -v`: the wall time includes
process start (and the JVM's, for Spark), the peak RSS is the largest process of the run (for Spark: the driver JVM
or its Python side). No goal to beat the local writer on two cores: the figure says what a Spark merge costs here.

    python -m bench.spark            # prints the figure (also part of `make bench`, figure 7)
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import date
from pathlib import Path

from bench.common import Figure

ROOT = Path(__file__).resolve().parents[1]
YEAR = (date(2024, 1, 1), date(2025, 1, 1))


def _timed(argv: list[str], env: dict[str, str], log: Path) -> tuple[float, float, str]:
    """Wall seconds, peak RSS (MiB) and output of one command run under GNU time."""
    began = time.perf_counter()
    done = subprocess.run(
        ["/usr/bin/time", "-v", *argv], cwd=ROOT, env=env, capture_output=True, text=True, check=False, timeout=1800
    )
    wall = time.perf_counter() - began
    log.write_text(done.stdout + "\n--- stderr ---\n" + done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"{argv[0]} exited {done.returncode}; log {log}:\n{done.stderr[-3000:]}")
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    return wall, (int(peak.group(1)) / 1024 if peak else float("nan")), done.stdout


def local_child(args: argparse.Namespace) -> None:
    """The pyiceberg writer on the landing (settings from the environment the parent prepared)."""
    from tollwatch import resources
    from tollwatch.contract.events import Window
    from tollwatch.contract.settings import load_settings
    from tollwatch.core.ingest import IngestRequest, load_landing
    from tollwatch.core.landing import LandingManifest

    settings = load_settings()
    manifest = LandingManifest.model_validate_json(Path(args.manifest).read_text())
    window = Window(start=YEAR[0], stop=YEAR[1])
    request = IngestRequest(
        mode="window", domain="data.ny.gov", dataset_id=manifest.dataset, refresh_id=manifest.refresh_id, window=window
    )
    result = load_landing(
        request, manifest, resources.landing_zone(settings), resources.table_store(settings), flow_run_id=None
    )
    print(f"ROWS={result.rows_written}", flush=True)


def figure_spark_merge() -> list[Figure]:
    from tollwatch import resources
    from tollwatch.adapters import spark_submit as sparksubmit
    from tollwatch.adapters.socrata import build_http_client
    from tollwatch.contract.events import Window
    from tollwatch.contract.settings import load_settings
    from tollwatch.core.ingest import IngestRequest, fetch_and_land, plan_fetch
    from tollwatch_dev.stack import LocalStack

    with tempfile.TemporaryDirectory(prefix="tollwatch-bench-spark-") as tmp:
        scratch = Path(tmp)
        stack = LocalStack(
            scratch / "stack", services=("azurite", "mirror"), mirror_start=YEAR[0], mirror_through=YEAR[1]
        )
        endpoints = stack.up()
        try:
            env = {
                **os.environ,
                **endpoints.env(),
                "TOLLWATCH_STORAGE_CONTAINER": f"bench-spark-{uuid.uuid4().hex[:10]}",
                "PYTHONUNBUFFERED": "1",
            }
            env.pop("TOLLWATCH_CATALOG_PROPERTIES", None)
            os.environ.update({k: v for k, v in env.items() if k.startswith("TOLLWATCH_")})
            settings = load_settings()
            window = Window(start=YEAR[0], stop=YEAR[1])
            request = IngestRequest(
                mode="window", domain=settings.upstream_domain, dataset_id=settings.upstream_dataset_id,
                refresh_id=f"bench-{uuid.uuid4().hex[:8]}", window=window,
            )  # fmt: skip
            landing = resources.landing_zone(settings)
            with build_http_client(str(settings.upstream_url), 60.0) as http:
                socrata = resources.socrata_client(settings, http)
                plan = plan_fetch(request, socrata, committed_through=None)
                manifest = fetch_and_land(request, plan, socrata, landing, run_id="bench", page_size=50_000)
            (scratch / "manifest.json").write_text(manifest.model_dump_json())

            local_env = {**env, "TOLLWATCH_WAREHOUSE_DIR": str(scratch / "local-warehouse")}
            local_wall, local_rss, out = _timed(
                [sys.executable, "-m", "bench.spark", "local", "--manifest", str(scratch / "manifest.json")],
                local_env,
                scratch / "local.log",
            )
            local_rows = int(re.search(r"ROWS=(\d+)", out).group(1))  # type: ignore[union-attr]

            warehouse = scratch / "spark-warehouse"
            spark_settings = load_settings(warehouse_dir=warehouse)
            resources.table_store(spark_settings)  # the catalog database (WAL) the JDBC catalog opens
            conf = sparksubmit.catalog_conf(spark_settings.catalog_name, spark_settings.resolved_catalog_properties())
            conf |= {"spark.ui.enabled": "false", "spark.driver.host": "127.0.0.1"}
            argv = ["--landing", landing.uri(manifest.prefix), "--table", f"tollwatch.{settings.table}"]
            argv += ["--mode", "window", "--refresh-id", request.refresh_id]
            argv += ["--start", YEAR[0].isoformat(), "--stop", YEAR[1].isoformat()]
            command = sparksubmit.submit_command(
                "spark-submit", "local[2]", sparksubmit.find_jars(ROOT / ".jars"), conf, argv
            )
            spark_env = {**env, "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable}
            spark_wall, spark_rss, out = _timed(command, spark_env, scratch / "spark.log")
            printed = sparksubmit.read_result(out)
            if printed is None or printed.rows_written != local_rows:
                raise RuntimeError(f"the engines disagree: local {local_rows} rows, Spark {printed}")
        finally:
            stack.down()

    rows = manifest.rows
    return [
        Figure(
            group="7 spark merge",
            name="one year's landing: Spark (local[2]) vs pyiceberg writer",
            value=round(rows / spark_wall),
            unit="rows/s",
            baseline=round(rows / local_wall),
            baseline_name="pyiceberg writer",
            better="higher",
            goal=None,
            note=f"{rows:,} rows; wall incl. process start: Spark {spark_wall:.1f} s (JVM and all), pyiceberg "
            f"{local_wall:.1f} s; peak RSS: Spark driver {spark_rss:.0f} MiB, pyiceberg {local_rss:.0f} MiB",
        )
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.spark")
    sub = parser.add_subparsers(dest="kind")
    child = sub.add_parser("local")
    child.add_argument("--manifest", required=True)
    args = parser.parse_args(argv)
    if args.kind == "local":
        local_child(args)
        return 0
    for figure in figure_spark_merge():
        print(figure.model_dump_json(indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
