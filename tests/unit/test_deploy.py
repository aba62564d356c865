"""Deploy configuration: work pool definitions from prefect.yaml and the `checkout` pull step."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from tollwatch.prefect.deploy import DeployError, checkout, deploy_environment, deployment_queues, work_pool_spec

ROOT = Path(__file__).resolve().parents[2]


def test_prefect_yaml_defines_a_local_process_pool_and_a_git_backed_production_pool():
    local = work_pool_spec("local")
    production = work_pool_spec("production")
    assert (local.name, local.type, local.git) == ("tollwatch-local", "process", None)
    assert production.git is not None
    assert production.git.branch == "main"
    with pytest.raises(DeployError, match=r"no definitions\.work_pools\.staging"):
        work_pool_spec("staging")


def test_deploy_environment_points_local_runs_at_this_checkout(monkeypatch):
    monkeypatch.delenv("TOLLWATCH_GIT_REPOSITORY", raising=False)
    env = deploy_environment(work_pool_spec("local"), ROOT)
    assert env["TOLLWATCH_WORK_POOL"] == "tollwatch-local"
    assert env["TOLLWATCH_PROJECT_DIR"] == str(ROOT)
    assert env["TOLLWATCH_GIT_REPOSITORY"] == ""

    monkeypatch.setenv("TOLLWATCH_GIT_REPOSITORY", "https://example.org/fork.git")
    assert (
        deploy_environment(work_pool_spec("production"))["TOLLWATCH_GIT_REPOSITORY"] == "https://example.org/fork.git"
    )


def test_checkout_without_a_repository_uses_the_project_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert checkout(directory=str(ROOT)) == {"directory": str(ROOT)}
    assert Path.cwd() == ROOT


def test_checkout_clones_the_repository_the_way_a_production_worker_does(tmp_path, monkeypatch):
    """A production worker clones the configured branch; here the repository is this very checkout."""
    branch = subprocess.run(
        ["git", "rev-parse", "--abbrev-ref", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    monkeypatch.chdir(tmp_path)
    output = checkout(repository=f"file://{ROOT}", branch=branch)
    cloned = Path(output["directory"])
    assert cloned.is_absolute() or (tmp_path / cloned).exists()
    assert (tmp_path / cloned / "tollwatch" / "prefect" / "flows" / "ingest.py").exists()


@pytest.mark.parametrize("field", ["directory", "repository", "branch"])
def test_checkout_refuses_variables_that_were_not_set_at_deploy_time(field):
    with pytest.raises(DeployError, match=f"{field} is"):
        checkout(**{"directory": str(ROOT), field: "{{ $TOLLWATCH_GIT_REPOSITORY }}"})


def test_checkout_without_any_source_says_so():
    with pytest.raises(DeployError, match="neither a git repository nor a project directory"):
        checkout()


def test_deploy_refuses_to_run_without_a_prefect_api(monkeypatch):
    """Without PREFECT_API_URL prefect would deploy into a temporary server that vanishes with the command."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tollwatch.prefect.deploy import deploy

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with temporary_settings(updates={PREFECT_API_URL: None}), pytest.raises(DeployError, match="PREFECT_API_URL"):
        deploy("local")


def test_the_local_pool_starts_runs_through_the_warm_client_and_production_cold():
    from tollwatch.prefect.deploy import base_job_template

    local = base_job_template(work_pool_spec("local"))["variables"]["properties"]["command"]["default"]
    production = base_job_template(work_pool_spec("production"))["variables"]["properties"]["command"]["default"]
    assert local.endswith(" -m tollwatch_dev.warm.client")
    assert production is None  # Prefect's own `python -m prefect.engine`


def test_each_deployment_gets_a_queue_limited_like_the_deployment():
    queues = {q.name: (q.concurrency_limit, q.deployments) for q in deployment_queues(ROOT / "prefect.yaml")}
    assert queues == {"ingest": (2, ("ingest",)), "jobs": (4, ("run-job",))}


def test_two_limited_deployments_cannot_share_a_queue(tmp_path):
    shared = {"name": "pool", "work_queue_name": "q"}
    (tmp_path / "prefect.yaml").write_text(
        yaml.safe_dump(
            {
                "deployments": [
                    {"name": "a", "work_pool": shared, "concurrency_limit": {"limit": 2}},
                    {"name": "b", "work_pool": shared},
                ]
            }
        )
    )
    with pytest.raises(DeployError, match="a and b share work queue 'q'"):
        deployment_queues(tmp_path / "prefect.yaml")


def _keys(node: object) -> set[str]:
    if isinstance(node, dict):
        return set(node) | {k for v in node.values() for k in _keys(v)}
    if isinstance(node, list):
        return {k for v in node for k in _keys(v)}
    return set()


def test_prefect_yaml_has_no_schedule_or_cron():
    config = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    assert not {"schedule", "schedules", "cron", "rrule", "interval"} & _keys(config)
    triggers = {d["name"]: d.get("triggers", []) for d in config["deployments"]}
    # ingest is started by events; run-job only by the subscription automations (tollwatch automations apply)
    assert {t["expect"][0] for t in triggers["ingest"]} == {
        "tollwatch.dataset.refreshed",
        "tollwatch.backfill.requested",
    }
    assert triggers["run-job"] == []
