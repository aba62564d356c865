"""The ingest flow's merge with `TOLLWATCH_ENGINE=spark`: `spark-submit` of the wheel's `tollwatch-merge`.

The driver runs where the worker runs (client deploy mode) against `spark_master`; its progress lines reach the
run's log, the rest of Spark's output only on failure (the last lines, in the error).
"""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tollwatch.adapters import spark_submit as sparksubmit
from tollwatch.contract.settings import Settings
from tollwatch.core.ingest import IngestRequest, LoadResult
from tollwatch.core.landing import LandingManifest
from tollwatch.resources import Resources


def spark_conf(settings: Settings) -> dict[str, str]:
    """The catalog conf (pyiceberg's SQL catalog shared through Iceberg's JDBC catalog) plus `spark_conf`."""
    if settings.catalog_properties:
        return dict(settings.spark_conf)  # another catalog: its Spark conf is the operator's to give
    conf = sparksubmit.catalog_conf(settings.catalog_name, settings.resolved_catalog_properties())
    return {**conf, **settings.spark_conf}


@task(name="merge-with-spark", cache_policy=NO_CACHE)
def merge_with_spark(
    request: IngestRequest, manifest: LandingManifest, flow_run_id: str, res: Resources, branch: str | None = None
) -> LoadResult:
    """Run the Spark merge of this landing (into the load's audit `branch`, which the flow cut) and wait for it; a
    failed job fails the task with its last lines."""
    settings = res.settings
    logger = get_run_logger()
    _ = res.table  # the catalog database exists, in WAL mode, before the driver opens it
    landing_uri = res.landing.uri(manifest.prefix)
    window = request.window
    argv = ["--landing", landing_uri, "--table", f"{settings.catalog_name}.{settings.table}"]
    argv += ["--mode", request.mode, "--refresh-id", request.refresh_id, "--flow-run-id", flow_run_id]
    if branch:
        argv += ["--branch", branch]
    if window:
        argv += ["--start", window.start.isoformat(), "--stop", window.stop.isoformat()]
    command = sparksubmit.submit_command(
        settings.spark_submit,
        settings.spark_master,
        sparksubmit.find_jars(settings.spark_jars_dir),
        spark_conf(settings),
        argv,
    )
    connection_string = settings.storage_connection_string
    env = sparksubmit.landing_env(connection_string.get_secret_value() if connection_string else None, landing_uri)
    logger.info("spark-submit to %s: tollwatch-merge %s", settings.spark_master, " ".join(argv))

    def progress(line: str) -> None:
        if " tollwatch.spark: " in line:
            logger.info("spark: %s", line.split(" tollwatch.spark: ", 1)[1])

    return LoadResult.from_merge(sparksubmit.run(command, env, on_line=progress), manifest.rows)
