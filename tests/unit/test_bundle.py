"""The Databricks bundle (databricks.yml + resources/), validated offline: no CLI, no workspace, no network.

The Python resources are built the way `databricks bundle validate/deploy` builds them: the CLI writes the
configuration (target selected, every variable's value set) to a file and runs `python -m databricks.bundles.build
--phase load_resources` in the bundle root; the jobs it returns are then read back through databricks-bundles'
typed models, which reject unknown fields and missing required ones.
"""

from __future__ import annotations

import json
import re
import tomllib
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from databricks.bundles.jobs import Job

from tests.support.bundle import REQUIRED, bundle_config, load_resources
from tollwatch.contract import compute

ROOT = Path(__file__).resolve().parents[2]
BUNDLE_YML = ROOT / "databricks.yml"
RESOURCE_FILES = sorted((ROOT / "resources").glob("*.py"))
ENTRY_POINTS = {"tollwatch_merge": "tollwatch-merge", "tollwatch_daily_totals": "tollwatch-daily-totals"}
MERGE_PARAMETERS = {"landing", "table", "mode", "start", "stop", "refresh_id", "flow_run_id", "audit"}
PARAMETER_REF = re.compile(r"\{\{job\.parameters\.([\w.-]+)\}\}")
VARIABLE_REF = re.compile(r"\$\{var\.(\w+)\}")


@pytest.fixture(scope="module")
def jobs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The jobs of the default target with every defaultable variable left at its default."""
    return load_resources(tmp_path_factory.mktemp("bundle"))


def cluster(job: dict[str, Any]) -> dict[str, Any]:
    (job_cluster,) = job["job_clusters"]
    return job_cluster["new_cluster"]


def wheel_task(job: dict[str, Any]) -> dict[str, Any]:
    (task,) = job["tasks"]
    return task


def parameter_names(job: dict[str, Any]) -> set[str]:
    return {parameter["name"] for parameter in job["parameters"]}


# -- databricks.yml


def test_bundle_has_dev_and_prod_targets_and_builds_the_wheel_as_an_artifact() -> None:
    config = bundle_config()
    assert config["bundle"]["name"] == "tollwatch"
    targets = config["targets"]
    assert set(targets) == {"dev", "prod"}
    assert targets["dev"]["mode"] == "development"
    assert [name for name, target in targets.items() if target.get("default")] == ["dev"]
    assert targets["prod"]["mode"] == "production"
    # production mode refuses to deploy without an explicit root (one copy of the jobs only)
    assert targets["prod"]["workspace"]["root_path"].startswith("/Workspace/")

    (artifact,) = config["artifacts"].values()
    assert artifact["type"] == "whl"
    assert (ROOT / artifact["path"] / "pyproject.toml").is_file()
    assert "wheel" in artifact["build"]
    assert "dist" in artifact["build"], "the jobs install dist/*.whl: the build must write the wheel there"

    python = config["python"]
    assert python["resources"] == ["resources:load_resources"]
    assert (ROOT / python["venv_path"] / "bin" / "python").exists(), "the CLI runs the loader in this venv"


def test_every_variable_is_described_used_and_defaulted_unless_per_workspace() -> None:
    config = bundle_config()
    variables = config["variables"]
    assert all(spec.get("description") for spec in variables.values())
    assert {name for name, spec in variables.items() if "default" not in spec} == set(REQUIRED)
    sources = BUNDLE_YML.read_text() + "".join(path.read_text() for path in RESOURCE_FILES)
    referenced = set(VARIABLE_REF.findall(sources))
    assert referenced <= set(variables), f"undeclared variables: {referenced - set(variables)}"
    for name in variables:
        used = f"${{var.{name}}}" in sources or f'"{name}"' in "".join(p.read_text() for p in RESOURCE_FILES)
        assert used, f"variable {name} is declared but nothing uses it"


def test_bundle_files_do_not_restate_tollwatchs_compute_defaults() -> None:
    """The compute and catalog defaults live in tollwatch/contract/compute.py only; the bundle imports them."""
    texts = {path.name: path.read_text() for path in [BUNDLE_YML, *RESOURCE_FILES]}
    for value in (
        compute.SPARK_VERSION,
        compute.NODE_TYPE_ID,
        compute.ICEBERG_SPARK_RUNTIME,
        compute.ICEBERG_SPARK_CATALOG,
    ):
        restated = [name for name, text in texts.items() if value in text]
        assert not restated, f"{value!r} is restated in {restated}"


# -- the jobs, as the CLI loads them


def test_python_resources_load_as_the_cli_loads_them_and_round_trip_through_the_typed_models(
    jobs: dict[str, Any],
) -> None:
    assert set(jobs) == set(ENTRY_POINTS)
    for key, job in jobs.items():
        assert Job.from_dict(job).as_dict() == job, key


def test_typed_models_reject_a_job_the_workspace_would_reject(jobs: dict[str, Any]) -> None:
    """The round trip above is a check only if the models refuse what is wrong."""
    broken = json.loads(json.dumps(jobs["tollwatch_merge"]))
    broken["tasks"][0]["python_wheel_task"]["parmeters"] = broken["tasks"][0]["python_wheel_task"].pop("parameters")
    with pytest.raises(ValueError, match="parmeters"):
        Job.from_dict(broken)
    del broken["tasks"][0]["python_wheel_task"]["entry_point"]
    with pytest.raises((TypeError, ValueError)):
        Job.from_dict(broken)


def test_wheel_tasks_run_entry_points_the_wheel_declares(jobs: dict[str, Any]) -> None:
    """Fails until pyproject's [project.scripts] declares both entry points."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    scripts = project.get("scripts", {})
    for key, entry_point in ENTRY_POINTS.items():
        task = wheel_task(jobs[key])["python_wheel_task"]
        assert task["package_name"] == project["name"]
        assert task["entry_point"] == entry_point
        assert entry_point in scripts, f"pyproject [project.scripts] has no {entry_point!r} ({key})"
        assert scripts[entry_point].startswith("tollwatch."), "the entry point must be in the tollwatch package"


def test_tasks_run_on_the_job_cluster_with_iceberg_and_the_wheel(jobs: dict[str, Any]) -> None:
    for key, job in jobs.items():
        task = wheel_task(job)
        assert task["job_cluster_key"] == job["job_clusters"][0]["job_cluster_key"], key
        assert {"maven": {"coordinates": compute.ICEBERG_SPARK_RUNTIME}} in task["libraries"], key
        # Python resources' paths are relative to the bundle root, where the artifact writes dist/
        assert {"whl": "dist/*.whl"} in task["libraries"], key
        assert job["max_concurrent_runs"] == 1, key
        assert job["queue"] == {"enabled": True}, "a run started while another runs must queue, not be skipped"


def test_job_clusters_take_tollwatchs_compute_and_catalog_defaults(jobs: dict[str, Any]) -> None:
    for key, job in jobs.items():
        new_cluster = cluster(job)
        assert new_cluster["spark_version"] == compute.SPARK_VERSION, key
        assert new_cluster["node_type_id"] == compute.NODE_TYPE_ID, key
        assert new_cluster["num_workers"] == compute.NUM_WORKERS, key
        assert new_cluster["spark_conf"] == compute.hadoop_catalog_spark_conf("${var.warehouse}", compute.CATALOG)
        assert new_cluster["spark_conf"][f"spark.sql.catalog.{compute.CATALOG}"] == compute.ICEBERG_SPARK_CATALOG
    assert {"name": "table", "default": "tollwatch.bronze.bnt_traffic_hourly"} in jobs["tollwatch_merge"]["parameters"]


def test_bundle_variables_override_the_defaults(tmp_path: Path) -> None:
    jobs = load_resources(
        tmp_path,
        "prod",
        spark_version="16.4.x-scala2.12",
        node_type_id="Standard_E8ds_v5",
        num_workers="4",
        iceberg_spark_runtime="org.apache.iceberg:iceberg-spark-runtime-3.5_2.12:1.10.3",
        catalog="lake",
    )
    for key, job in jobs.items():
        new_cluster = cluster(job)
        assert new_cluster["spark_version"] == "${var.spark_version}", key
        assert new_cluster["node_type_id"] == "${var.node_type_id}", key
        assert new_cluster["num_workers"] == "${var.num_workers}", key
        assert {"maven": {"coordinates": "${var.iceberg_spark_runtime}"}} in wheel_task(job)["libraries"], key
        assert new_cluster["spark_conf"]["spark.sql.catalog.lake"] == compute.ICEBERG_SPARK_CATALOG, key
        assert Job.from_dict(job).as_dict() == job, key
    assert {"name": "table", "default": "lake.bronze.bnt_traffic_hourly"} in jobs["tollwatch_merge"]["parameters"]


# -- what the tasks are given


def test_task_arguments_read_only_defined_job_parameters(jobs: dict[str, Any]) -> None:
    assert parameter_names(jobs["tollwatch_merge"]) == MERGE_PARAMETERS
    for key, job in jobs.items():
        arguments = wheel_task(job)["python_wheel_task"]["parameters"]
        referenced = {name for argument in arguments for name in PARAMETER_REF.findall(argument)}
        assert referenced, key
        assert referenced <= parameter_names(job), f"{key} reads undefined job parameters"
        assert all(re.fullmatch(r"--[a-z][a-z-]*=\{\{job\.parameters\.\w+\}\}", a) for a in arguments), arguments


def test_merge_task_passes_the_flags_a_one_time_submit_passes(jobs: dict[str, Any]) -> None:
    """The job and runs/submit start the same entry point: its argv must not depend on which one did."""
    from tollwatch.adapters.databricks_jobs import MergeJobArgs

    submitted = MergeJobArgs(
        landing="abfss://c@a.dfs.core.windows.net/raw/x",
        table="tollwatch.bronze.bnt_traffic_hourly",
        mode="window",
        refresh_id="r",
        start=date(2024, 1, 1),
        stop=date(2024, 2, 1),
        flow_run_id="f",
    ).argv()
    submit_flags = {argument for argument in submitted if argument.startswith("--")}
    arguments = wheel_task(jobs["tollwatch_merge"])["python_wheel_task"]["parameters"]
    job_flags = {argument.split("=", 1)[0] for argument in arguments}
    assert job_flags <= submit_flags, f"flags the submit path does not use: {job_flags - submit_flags}"
    assert submit_flags - job_flags <= {"--format"}, f"flags the job never passes: {submit_flags - job_flags}"


def test_daily_totals_job_defines_the_parameters_run_now_sends(jobs: dict[str, Any]) -> None:
    """run-now passes job parameters by name: the names must be those tollwatch/prefect/flows/run_job.py sends for a
    completion."""
    from tollwatch.contract.events import IngestionCompleted, Window
    from tollwatch.prefect.flows.run_job import job_parameters

    completion = IngestionCompleted(
        table="bronze.bnt_traffic_hourly",
        catalog="tollwatch",
        mode="window",
        window=Window(start=date(2024, 1, 1), stop=date(2024, 2, 1)),
        refresh_id="r",
        rows_fetched=1,
        rows_written=1,
        rows_rejected=0,
        snapshot_id=1,
        landing_uri="abfss://c@a.dfs.core.windows.net/raw/x",
    )
    sent = job_parameters(completion, {})
    assert parameter_names(jobs["tollwatch_daily_totals"]) == set(sent)
    arguments = wheel_task(jobs["tollwatch_daily_totals"])["python_wheel_task"]["parameters"]
    by_flag = dict(argument.split("=", 1) for argument in arguments)
    assert by_flag == {
        "--table": "{{job.parameters.upstream_table}}",
        "--snapshot-id": "{{job.parameters.upstream_snapshot_id}}",
        "--refresh-id": "{{job.parameters.upstream_refresh_id}}",
        "--start": "{{job.parameters.window_start}}",
        "--stop": "{{job.parameters.window_stop}}",
    }


def test_the_blocks_defaults_are_the_contracts() -> None:
    """The Prefect blocks and the core compute model default to what the bundle's clusters get."""
    from tollwatch.adapters.databricks_jobs import ComputeSpec
    from tollwatch.prefect.blocks import DatabricksCompute, SparkIcebergCatalog

    for spec in (ComputeSpec(), DatabricksCompute().spec()):
        assert (spec.spark_version, spec.node_type_id, spec.num_workers) == (
            compute.SPARK_VERSION,
            compute.NODE_TYPE_ID,
            compute.NUM_WORKERS,
        )
        assert spec.serverless_environment_version == compute.SERVERLESS_ENVIRONMENT_VERSION
    warehouse = "abfss://landing@tollwatchprod.dfs.core.windows.net/warehouse"
    catalog = SparkIcebergCatalog(warehouse=warehouse)
    assert catalog.catalog == compute.CATALOG
    assert catalog.spark_conf() == compute.hadoop_catalog_spark_conf(warehouse)


# -- no secrets in the bundle

SECRET_PATTERNS = {
    "Databricks personal access token": re.compile(r"dapi[0-9a-f]{32}"),
    "storage account key": re.compile(r"[A-Za-z0-9+/]{86}=="),
    "connection string key": re.compile(r"(?i)AccountKey=|SharedAccessSignature=|[?&]sig="),
    "credential assignment": re.compile(
        r"(?i)\b(token|password|secret|client_secret|account_key|access_key|api_key)\b\s*[:=]\s*['\"]?(?!\{\{secrets/)"
        r"[^\s'\"{$][^\s'\"]{7,}"
    ),
}


def secrets_in(text: str) -> list[str]:
    return [name for name, pattern in SECRET_PATTERNS.items() if pattern.search(text)]


def test_the_secret_scan_finds_planted_secrets() -> None:
    """The scan below proves nothing unless it catches these (and lets secret references through)."""
    assert secrets_in("token: dapi" + "0123456789abcdef" * 2) != []
    assert secrets_in("AccountKey=" + "A" * 86 + "==") != []
    assert secrets_in('client_secret = "s3cr3t-value-123"') != []
    assert secrets_in("password: hunter2hunter2") != []
    assert secrets_in("fs.azure.account.key: {{secrets/tollwatch/storage-key}}") == []


def test_no_secret_literal_in_the_bundle(jobs: dict[str, Any]) -> None:
    for path in [BUNDLE_YML, *RESOURCE_FILES]:
        assert secrets_in(path.read_text()) == [], path.name
    assert secrets_in(json.dumps(jobs)) == []
