"""tollwatch's two Databricks jobs: python_wheel_tasks of the tollwatch wheel on a job cluster that has Iceberg's
Spark runtime and the Iceberg catalog tollwatch writes through.

- `tollwatch_merge` merges one landing into the bronze table (entry point `tollwatch-merge`);
- `tollwatch_daily_totals` is the downstream job a completion event starts (entry point `tollwatch-daily-totals`).

Callers pass job parameters by name (run-now's `job_parameters`). Each task turns them into its entry point's
argv with dynamic value references (`--flag={{job.parameters.name}}`), the same flags a one-time runs/submit
passes, so an entry point parses one command line whichever way it was started. A parameter a run does not set
arrives empty (`--start=`), which the entry points must read as "not given".

Compute and catalog defaults come from `tollwatch.contract.compute`; a bundle variable (databricks.yml) that is set
overrides one, an empty one leaves tollwatch's default.
"""

from __future__ import annotations

from typing import TypeVar

from databricks.bundles.core import Bundle, Variable
from databricks.bundles.jobs import (
    ClusterSpec,
    Job,
    JobCluster,
    JobParameterDefinition,
    Library,
    MavenLibrary,
    PythonWheelTask,
    QueueSettings,
    Task,
)

from tollwatch.contract import compute
from tollwatch.contract.settings import Settings

PACKAGE = "tollwatch"
MERGE_ENTRY_POINT = "tollwatch-merge"
DAILY_TOTALS_ENTRY_POINT = "tollwatch-daily-totals"
#: The artifact's wheel. Paths in Python-defined resources are relative to the bundle root (YAML resources'
#: paths are relative to their own file, hence `../dist/*.whl` in the bundle templates).
WHEEL = "dist/*.whl"
CLUSTER_KEY = "tollwatch"

_T = TypeVar("_T")

#: Merge job parameter → the entry point's flag (as `tollwatch.adapters.databricks_jobs.MergeJobArgs.argv` spells it).
MERGE_FLAGS = {
    "landing": "--landing",
    "table": "--table",
    "mode": "--mode",
    "start": "--start",
    "stop": "--stop",
    "refresh_id": "--refresh-id",
    "flow_run_id": "--flow-run-id",
    "audit": "--audit",
}
#: Daily-totals job parameters: the names `tollwatch/prefect/flows/run_job.py` sends with run-now for a completion
#: event. Those that the entry point reads map to its flag; the others are defined so that run-now accepts them.
DAILY_TOTALS_FLAGS = {
    "upstream_table": "--table",
    "upstream_snapshot_id": "--snapshot-id",
    "upstream_refresh_id": "--refresh-id",
    "window_start": "--start",
    "window_stop": "--stop",
}


def _is_set(bundle: Bundle, name: str) -> bool:
    """True when databricks.yml, the target or `--var` gives the variable a value (empty means tollwatch's default)."""
    return bundle.variables.get(name) not in (None, "")


def _setting(bundle: Bundle, name: str, default: _T, kind: type[_T]) -> Variable[_T] | _T:
    """A reference to the variable when it is set (the CLI resolves it), else tollwatch's default."""
    return Variable(path=f"var.{name}", type=kind) if _is_set(bundle, name) else default


def catalog(bundle: Bundle) -> str:
    """The Spark catalog name, resolved now: it is part of Spark conf keys, where no reference is resolved."""
    return str(bundle.variables["catalog"]) if _is_set(bundle, "catalog") else compute.CATALOG


def job_cluster(bundle: Bundle) -> JobCluster:
    return JobCluster(
        job_cluster_key=CLUSTER_KEY,
        new_cluster=ClusterSpec(
            spark_version=_setting(bundle, "spark_version", compute.SPARK_VERSION, str),
            node_type_id=_setting(bundle, "node_type_id", compute.NODE_TYPE_ID, str),
            num_workers=_setting(bundle, "num_workers", compute.NUM_WORKERS, int),
            spark_conf=compute.hadoop_catalog_spark_conf("${var.warehouse}", catalog(bundle)),
            custom_tags={"project": "tollwatch"},
        ),
    )


def libraries(bundle: Bundle) -> list[Library]:
    runtime = _setting(bundle, "iceberg_spark_runtime", compute.ICEBERG_SPARK_RUNTIME, str)
    return [Library(maven=MavenLibrary(coordinates=runtime)), Library(whl=WHEEL)]


def argv(flags: dict[str, str | None]) -> list[str]:
    return [f"{flag}={{{{job.parameters.{name}}}}}" for name, flag in flags.items() if flag]


def wheel_task(bundle: Bundle, task_key: str, entry_point: str, flags: dict[str, str | None]) -> Task:
    return Task(
        task_key=task_key,
        job_cluster_key=CLUSTER_KEY,
        python_wheel_task=PythonWheelTask(package_name=PACKAGE, entry_point=entry_point, parameters=argv(flags)),
        libraries=libraries(bundle),
    )


def parameters(defaults: dict[str, str]) -> list[JobParameterDefinition]:
    return [JobParameterDefinition(name=name, default=value) for name, value in defaults.items()]


def merge_job(bundle: Bundle) -> Job:
    table = f"{catalog(bundle)}.{Settings.model_fields['table'].default}"
    # write-audit-publish on the cluster unless a run says `audit=no`
    defaults = {name: "" for name in MERGE_FLAGS} | {"table": table, "audit": "yes"}
    return Job(
        name="tollwatch merge",
        description="Merge one tollwatch landing into the bronze Iceberg table (started by the ingest flow).",
        tags={"project": "tollwatch"},
        # Merges commit to one table: one at a time, the next queued (not skipped) while one runs.
        max_concurrent_runs=1,
        queue=QueueSettings(enabled=True),
        parameters=parameters(defaults),
        job_clusters=[job_cluster(bundle)],
        tasks=[wheel_task(bundle, "merge", MERGE_ENTRY_POINT, MERGE_FLAGS)],
    )


def daily_totals_job(bundle: Bundle) -> Job:
    defaults = {name: "" for name in DAILY_TOTALS_FLAGS} | {"upstream_table": Settings.model_fields["table"].default}
    return Job(
        name="tollwatch daily totals",
        description="Replace the daily totals of the days a completed tollwatch load touched (downstream job).",
        tags={"project": "tollwatch"},
        # It replaces days of its output table: runs apply in the order completions arrived.
        max_concurrent_runs=1,
        queue=QueueSettings(enabled=True),
        parameters=parameters(defaults),
        job_clusters=[job_cluster(bundle)],
        tasks=[wheel_task(bundle, "daily_totals", DAILY_TOTALS_ENTRY_POINT, DAILY_TOTALS_FLAGS)],
    )
