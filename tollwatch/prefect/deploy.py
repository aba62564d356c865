"""Deploy the project: create/update its work pool, `prefect deploy --all` from `prefect.yaml`, read the result back.

`prefect.yaml` declares the work pools under `definitions.work_pools` (`local`: a process pool on this
machine running this checkout; `production`: a pool whose workers fetch the code from git for every run).
`tollwatch deploy --target <name>` reads that definition, makes the pool exist with that spec, and runs
Prefect's own deploy with the environment `prefect.yaml` templates from (`TOLLWATCH_WORK_POOL`,
`TOLLWATCH_PROJECT_DIR`, `TOLLWATCH_GIT_REPOSITORY`, `TOLLWATCH_GIT_BRANCH`).

Also home of the pull step `checkout`, which runs on the worker before each flow run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from tollwatch.contract.errors import TollwatchError

PROJECT_ROOT = Path(__file__).resolve().parents[2]
PREFECT_FILE = PROJECT_ROOT / "prefect.yaml"


class DeployError(TollwatchError):
    """Deploying failed; the message says which step and why."""


class GitSource(BaseModel):
    """Where production workers fetch the code from (the repository URL may come from the environment)."""

    model_config = ConfigDict(extra="forbid")

    repository: str = Field(description="clone URL; TOLLWATCH_GIT_REPOSITORY overrides it")
    branch: str = "main"
    access_token_secret: str = Field(
        default="", description="name of a Prefect Secret block holding a token for private repositories"
    )


class WorkPoolSpec(BaseModel):
    """One entry of `definitions.work_pools` in prefect.yaml."""

    model_config = ConfigDict(extra="forbid")

    name: str
    type: Literal["process"] = Field(
        default="process", description="container pools (ACI, Kubernetes) need their worker package installed"
    )
    description: str = ""
    concurrency_limit: int | None = Field(default=None, ge=1)
    git: GitSource | None = Field(default=None, description="None: workers run the checkout they were started in")
    run_module: str | None = Field(
        default=None,
        description="the module a worker runs for each flow run (`python -m <module> <flow-run-id>`) instead of "
        "Prefect's `prefect.engine`; opt-in tuning such as the dev tools' warm runner (tollwatch_dev.warm.client)",
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$",
    )


def base_job_template(spec: WorkPoolSpec) -> dict[str, Any]:
    """Prefect's process template; a pool with a `run_module` defaults its `command` to that module."""
    from prefect.workers.process import ProcessWorker

    template = ProcessWorker.get_default_base_job_template()
    if spec.run_module:
        template["variables"]["properties"]["command"]["default"] = f"{sys.executable} -m {spec.run_module}"
    return template


def work_pool_spec(target: str, prefect_file: Path = PREFECT_FILE) -> WorkPoolSpec:
    """The named work pool definition from prefect.yaml."""
    config = yaml.safe_load(prefect_file.read_text()) or {}
    pools: dict[str, Any] = (config.get("definitions") or {}).get("work_pools") or {}
    if target not in pools:
        raise DeployError(f"{prefect_file.name}: no definitions.work_pools.{target} (have: {', '.join(pools)})")
    return WorkPoolSpec.model_validate(pools[target])


class QueueSpec(BaseModel):
    """A work queue a deployment runs from, limited like the deployment itself."""

    model_config = ConfigDict(frozen=True)

    name: str
    concurrency_limit: int | None
    deployments: tuple[str, ...]


def deployment_queues(prefect_file: Path = PREFECT_FILE) -> list[QueueSpec]:
    """One queue per deployment (`work_pool.work_queue_name`), with the deployment's concurrency limit.

    Why: Prefect enforces a deployment concurrency limit when a worker proposes Pending, so with 190 runs
    queued behind a limit of 2 the worker fetches and proposes every one of them each poll and the server
    rejects 188 (a write and an event each): on SQLite that churn starves the automations creating runs. A
    queue limit is applied inside the scheduled-runs query instead, so the worker is only handed runs that
    can start. The deployment limit stays the guarantee (it also covers runs started outside this pool).
    """
    config = yaml.safe_load(prefect_file.read_text()) or {}
    queues: dict[str, QueueSpec] = {}
    for deployment in config.get("deployments") or []:
        name = deployment.get("name", "?")
        queue = ((deployment.get("work_pool") or {}).get("work_queue_name")) or "default"
        limit = (deployment.get("concurrency_limit") or {}).get("limit")
        limit = limit if isinstance(limit, int) else None
        if queue in queues:
            known = queues[queue]
            if known.concurrency_limit is not None or limit is not None:
                raise DeployError(
                    f"{prefect_file.name}: deployments {', '.join(known.deployments)} and {name} share work queue "
                    f"{queue!r}, but a queue limit can only mirror one deployment's concurrency limit"
                )
            queues[queue] = known.model_copy(update={"deployments": (*known.deployments, name)})
        else:
            queues[queue] = QueueSpec(name=queue, concurrency_limit=limit, deployments=(name,))
    return list(queues.values())


def deploy_environment(spec: WorkPoolSpec, project_dir: Path = PROJECT_ROOT) -> dict[str, str]:
    """The variables prefect.yaml is templated from, for this pool (an explicit environment value wins)."""
    git = spec.git
    return {
        "TOLLWATCH_WORK_POOL": spec.name,
        "TOLLWATCH_PROJECT_DIR": str(project_dir),
        "TOLLWATCH_GIT_REPOSITORY": os.environ.get("TOLLWATCH_GIT_REPOSITORY", git.repository if git else ""),
        "TOLLWATCH_GIT_BRANCH": os.environ.get("TOLLWATCH_GIT_BRANCH", git.branch if git else ""),
        "TOLLWATCH_GIT_TOKEN_SECRET": git.access_token_secret if git else "",
    }


def ensure_work_pool(spec: WorkPoolSpec, queues: list[QueueSpec] | None = None) -> None:
    """Create the pool and its queues, or bring existing ones in line with the spec (idempotent)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectAlreadyExists

    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(
                WorkPoolCreate(
                    name=spec.name,
                    type=spec.type,
                    description=spec.description,
                    concurrency_limit=spec.concurrency_limit,
                    base_job_template=base_job_template(spec),
                )
            )
        except ObjectAlreadyExists:
            client.update_work_pool(
                spec.name,
                WorkPoolUpdate(
                    description=spec.description,
                    concurrency_limit=spec.concurrency_limit,
                    base_job_template=base_job_template(spec),
                ),
            )
        for queue in queues or []:
            _ensure_work_queue(client, spec.name, queue)


def _ensure_work_queue(client: Any, pool: str, queue: QueueSpec) -> None:
    from prefect.exceptions import ObjectAlreadyExists

    description = f"runs of {', '.join(queue.deployments)}"
    try:
        client.create_work_queue(
            name=queue.name, work_pool_name=pool, concurrency_limit=queue.concurrency_limit, description=description
        )
    except ObjectAlreadyExists:
        existing = client.read_work_queue_by_name(queue.name, work_pool_name=pool)
        client.update_work_queue(existing.id, concurrency_limit=queue.concurrency_limit, description=description)


class Deployed(BaseModel):
    """One deployment as the Prefect server has it after a deploy (read back through the client API)."""

    model_config = ConfigDict(frozen=True)

    name: str
    id: str
    work_pool: str | None


def deploy(target: str, *, project_dir: Path = PROJECT_ROOT) -> list[Deployed]:
    """Ensure the target's work pool, apply prefect.yaml with Prefect's own `prefect deploy --all`, then read every
    deployment it declares back from the server.

    Why the CLI for the apply: prefect.yaml (triggers, pull steps, `{{ $VAR }}` templating, concurrency limits) is
    Prefect's declarative interface and `prefect deploy` is the public way to apply it; Prefect's Python API
    (`flow.deploy`) does not read it. Why the read-back: what was deployed is learned from the server, never by
    parsing the command's text, and a deployment that did not land in the target's pool is an error.
    """
    from prefect.settings import get_current_settings

    api_url = get_current_settings().api.url
    if not api_url:  # prefect would deploy into a temporary server that vanishes with the command
        raise DeployError("PREFECT_API_URL is not set: start the local stack (`make up`) or point it at your server")
    spec = work_pool_spec(target, project_dir / "prefect.yaml")
    ensure_work_pool(spec, deployment_queues(project_dir / "prefect.yaml"))
    env = {**os.environ, **deploy_environment(spec, project_dir), "PREFECT_API_URL": str(api_url)}
    result = subprocess.run(
        [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"],
        cwd=project_dir,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise DeployError(f"prefect deploy failed (exit {result.returncode}):\n{result.stdout}\n{result.stderr}")
    return read_deployed(declared_deployments(project_dir / "prefect.yaml"), spec.name)


def declared_deployments(prefect_file: Path = PREFECT_FILE) -> list[str]:
    """The deployment names prefect.yaml declares, in its order."""
    config = yaml.safe_load(prefect_file.read_text()) or {}
    return [str(d["name"]) for d in config.get("deployments") or [] if isinstance(d, dict) and d.get("name")]


def read_deployed(names: list[str], work_pool: str) -> list[Deployed]:
    """The named deployments as the server has them; DeployError when one is missing or in another pool."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    with get_client(sync_client=True) as client:
        found = client.read_deployments(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=names)))
        flows = {flow.id: flow.name for flow in client.read_flows()} if found else {}
    deployed = [
        Deployed(name=f"{flows.get(d.flow_id, '?')}/{d.name}", id=str(d.id), work_pool=d.work_pool_name) for d in found
    ]
    missing = sorted(set(names) - {d.name.rpartition("/")[2] for d in deployed})
    elsewhere = sorted(d.name for d in deployed if d.work_pool != work_pool)
    if missing or elsewhere:
        problems = [f"not on the server after the deploy: {', '.join(missing)}"] if missing else []
        problems += [f"not in work pool {work_pool}: {', '.join(elsewhere)}"] if elsewhere else []
        raise DeployError("prefect deploy reported success, but " + "; ".join(problems))
    return sorted(deployed, key=lambda d: names.index(d.name.rpartition("/")[2]))


# ------------------------------------------------------------------------------------------------ pull step


def checkout(directory: str = "", repository: str = "", branch: str = "", token_secret: str = "") -> dict[str, str]:
    """Pull step: fetch the code the worker runs.

    With a repository, clone it (Prefect's own `git_clone`, optionally with a token from a Secret block) and
    return its directory, which Prefect makes the working directory; without one, use `directory` — the
    checkout a local worker was started from. Values still looking like `{{ $VAR }}` were not set at deploy
    time: that is an error, not a silent fallback to some other code.
    """
    from prefect.deployments.steps import git_clone, set_working_directory

    for name, value in (("directory", directory), ("repository", repository), ("branch", branch)):
        if "{{" in value:
            raise DeployError(f"pull step: {name} is {value!r}; deploy with `tollwatch deploy` or set the variable")
    if repository:
        token = None
        if token_secret:
            from prefect.blocks.system import Secret

            token = Secret.load(token_secret).get()
        return git_clone(repository=repository, branch=branch or None, access_token=token)
    if not directory:
        raise DeployError("pull step: neither a git repository nor a project directory was configured")
    set_working_directory(directory)
    return {"directory": directory}
