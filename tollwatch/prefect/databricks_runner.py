"""Run Spark work on Databricks through prefect-databricks: one-time merge runs and downstream jobs.

Every REST call is a prefect-databricks task (`jobs_runs_submit`, `jobs_run_now`, `jobs_runs_get`,
`jobs_runs_get_output`, `jobs_runs_cancel`). A throttled (429), failing (5xx) or unreachable API is retried by
the one outbound policy (`tollwatch.adapters.net`), each attempt its own task run in the run's task list; a retry
never comes sooner than the `Retry-After` the API sent (Prefect's task retries can only wait fixed delays), and a
call that fails through every retry ends in a `DatabricksApiError` naming the call, the last answer and the
attempts. A retried submit carries the same idempotency token, so Databricks returns the run the first attempt
started (also when that attempt's response was lost to a timeout after the request arrived).
The workspace is called as the worker's managed identity (`tollwatch.prefect.blocks.DatabricksIdentity`, an Entra ID
token) or, as a fallback, with prefect-databricks' `DatabricksCredentials` (client secret or PAT): the setting
`databricks_credentials_block` says which (`workspace_auth`).
Waiting polls `jobs/runs/get` until a terminal life cycle; past `max_wait_s` the run is cancelled, so nothing
keeps running (and billing) after we gave up on it.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, NoReturn

import httpx
from prefect import Task, get_run_logger, task
from prefect_databricks import DatabricksCredentials
from prefect_databricks.jobs import (
    jobs_run_now,
    jobs_runs_cancel,
    jobs_runs_get,
    jobs_runs_get_output,
    jobs_runs_submit,
)
from prefect_databricks.models.jobs import NewCluster, PythonWheelTask, RunSubmitTaskSettings
from prefect_databricks.rest import HTTPMethod, execute_endpoint

from tollwatch.adapters.databricks_jobs import (
    ComputeSpec,
    DatabricksApiError,
    DatabricksRunTimedOut,
    MergeJobArgs,
    RunOutcome,
    idempotency_token,
)
from tollwatch.adapters.net import RetryPolicy
from tollwatch.adapters.spark_submit import read_result
from tollwatch.contract.errors import ConfigurationError
from tollwatch.contract.result import MergeResult
from tollwatch.core.ingest import IngestRequest, LoadResult
from tollwatch.core.landing import LandingManifest

if TYPE_CHECKING:
    from tollwatch.prefect.blocks import DatabricksIdentity
    from tollwatch.resources import Resources

    #: What prefect-databricks' tasks accept as `databricks_credentials`: anything with its `get_client()`.
    WorkspaceAuth = DatabricksCredentials | DatabricksIdentity

MERGE_TASK_KEY = "merge"
#: The wheel's merge entry point (pyproject `[project.scripts]`), the same one spark-submit runs.
PACKAGE = "tollwatch"
MERGE_ENTRY_POINT = "tollwatch-merge"


def describe_failure(error: BaseException, call: str) -> str:
    """`POST /api/2.1/jobs/run-now answered 429 REQUEST_LIMIT_EXCEEDED: <message>`, or the transport error."""
    try:
        request = error.request if isinstance(error, httpx.HTTPStatusError | httpx.RequestError) else None
    except RuntimeError:  # a transport error raised without its request
        request = None
    where = f"{request.method} {request.url.path}" if request is not None else call
    if isinstance(error, httpx.HTTPStatusError):
        response = error.response
        try:
            body = response.json()
        except ValueError:
            body = None
        code = body.get("error_code", "") if isinstance(body, dict) else ""
        message = body.get("message", "") if isinstance(body, dict) else response.text[:200]
        answer = " ".join(part for part in (str(response.status_code), str(code)) if part)
        return f"Databricks API {where} answered {answer}" + (f": {message}" if message else "")
    return f"Databricks API {where} failed: {type(error).__name__}: {error}"


class DatabricksRunner:
    """Submit, wait, cancel — with one credentials object, so an Entra ID / OAuth token is fetched once and
    refreshed only when it is about to expire (by azure-identity for an identity, by prefect-databricks for a
    client secret)."""

    def __init__(
        self,
        credentials: WorkspaceAuth,
        *,
        retries: int = 4,
        backoff_s: float = 2.0,
        poll_s: float = 10.0,
        max_wait_s: float = 3600,
        max_retry_delay_s: float = 120.0,
    ) -> None:
        self.credentials = credentials
        self.policy = RetryPolicy(max_attempts=retries + 1, initial_s=backoff_s, max_delay_s=max_retry_delay_s)
        self.poll_s = poll_s
        self.max_wait_s = max_wait_s

    def _call(self, task: Task[..., Any], **kwargs: Any) -> Any:
        """One Jobs API call, each attempt a task run of its own, retried by the one outbound policy
        (tollwatch.adapters.net): throttling, 5xx and broken connections, never sooner than `Retry-After`.

        Gives up with `DatabricksApiError` when the retries are spent, or at once when `Retry-After` asks for
        more than `max_retry_delay_s` (waiting less would only be refused again). A final 4xx is raised as is.
        """

        def give_up(error: BaseException, why: str) -> NoReturn:
            raise DatabricksApiError(f"{describe_failure(error, task.name)} ({why})") from error

        def attempt() -> Any:
            return task.submit(databricks_credentials=self.credentials, **kwargs).result()

        return self.policy.call(attempt, what=f"Databricks API {task.name}", give_up=give_up, logger=get_run_logger())

    # -- one-time merge run

    def merge(
        self, compute: ComputeSpec, wheel: str, args: MergeJobArgs, *, run_name: str, token: str
    ) -> tuple[RunOutcome, MergeResult | None]:
        """Submit the wheel's `tollwatch-merge` as a python_wheel_task, wait, and read the result line it printed."""
        task = merge_task(compute, wheel, args)
        if compute.kind == "serverless":
            submitted = self._call(
                _submit_serverless, body=serverless_body(task, compute, wheel, run_name, token, self.max_wait_s)
            )
        else:
            submitted = self._call(
                jobs_runs_submit,
                tasks=[RunSubmitTaskSettings.model_validate(task)],
                run_name=run_name,
                idempotency_token=token,
                timeout_seconds=int(self.max_wait_s),
            )
        outcome, run = self.wait(int(submitted["run_id"]))
        self._raise_for_failure(outcome, run)
        task_runs = [t for t in run.get("tasks", []) if t.get("task_key") == MERGE_TASK_KEY]
        output = self._call(jobs_runs_get_output, run_id=int(task_runs[0]["run_id"])) if task_runs else {}
        return outcome, read_result(output.get("logs"))

    # -- an existing job

    def run_now(self, job_id: int, job_parameters: dict[str, str], *, token: str) -> RunOutcome:
        started = self._call(jobs_run_now, job_id=job_id, idempotency_token=token, job_parameters=job_parameters)
        outcome, run = self.wait(int(started["run_id"]))
        self._raise_for_failure(outcome, run)
        return outcome

    def _raise_for_failure(self, outcome: RunOutcome, run: dict[str, Any]) -> None:
        """Fail with the run's end state and the driver's own reason: a failed task's `state_message` is often only
        "Workload failed, see run output for details"; the reason is the task run's `error` in runs/get-output."""
        if outcome.succeeded:
            return
        reasons = []
        for task_run in run.get("tasks", []):
            if (task_run.get("state") or {}).get("result_state") == "SUCCESS" or "run_id" not in task_run:
                continue
            try:
                output = self._call(jobs_runs_get_output, run_id=int(task_run["run_id"]))
            except (DatabricksApiError, httpx.HTTPStatusError) as error:
                get_run_logger().warning(
                    "could not read the output of failed task run %s: %s", task_run["run_id"], error
                )
                continue
            if isinstance(output, dict) and output.get("error"):
                reasons.append(f"{task_run.get('task_key', task_run['run_id'])}: {output['error']}")
        outcome.raise_for_failure(detail="; ".join(reasons))

    # -- waiting

    def wait(self, run_id: int) -> tuple[RunOutcome, dict[str, Any]]:
        """Poll until the run is in a terminal life cycle; past max_wait_s, cancel it and raise."""
        logger = get_run_logger()
        deadline = time.monotonic() + self.max_wait_s
        last = ""
        seen: RunOutcome | None = None
        while True:
            try:
                run = self._call(jobs_runs_get, run_id=run_id)
            except DatabricksApiError as error:
                where = seen.run_page_url if seen and seen.run_page_url else "no url"
                raise DatabricksApiError(
                    f"{error}; stopped waiting for Databricks run {run_id}, last seen {last or 'not yet'} "
                    f"({where}): it may still be running"
                ) from error
            outcome = seen = RunOutcome.from_run(run)
            state = f"{outcome.life_cycle_state}/{outcome.result_state or '-'}"
            if state != last:
                logger.info("Databricks run %s: %s %s", run_id, state, outcome.run_page_url or "")
                last = state
            if outcome.finished:
                return outcome, run
            if time.monotonic() >= deadline:
                self._call(jobs_runs_cancel, run_id=run_id)
                raise DatabricksRunTimedOut(
                    f"Databricks run {run_id} still {outcome.life_cycle_state} after {self.max_wait_s:.0f}s: "
                    f"cancelled ({outcome.run_page_url or 'no url'})",
                    outcome,
                )
            time.sleep(self.poll_s)


def merge_task(compute: ComputeSpec, wheel: str, args: MergeJobArgs) -> dict[str, Any]:
    """The one task of a merge run, as the Jobs API takes it (validated by prefect-databricks' models): the wheel's
    entry point with tollwatch installed from `wheel` (on serverless, through the task's environment instead)."""
    wheel_task = PythonWheelTask(package_name=PACKAGE, entry_point=MERGE_ENTRY_POINT, parameters=args.argv())
    task: dict[str, Any] = {"task_key": MERGE_TASK_KEY, "python_wheel_task": wheel_task.model_dump(exclude_none=True)}
    if compute.kind == "existing_cluster":
        task["existing_cluster_id"] = compute.existing_cluster_id
    elif compute.kind == "job_cluster":
        cluster = NewCluster(
            spark_version=compute.spark_version,
            node_type_id=compute.node_type_id,
            num_workers=compute.num_workers,
            spark_conf=compute.spark_conf or None,
            custom_tags={"tollwatch-flow-run-id": args.flow_run_id or "none", "tollwatch-refresh-id": args.refresh_id},
        )
        task["new_cluster"] = cluster.model_dump(mode="json", exclude_none=True)
    else:
        task["environment_key"] = "tollwatch"
        return task  # serverless tasks take their libraries from the environment (serverless_body)
    task["libraries"] = [{"whl": wheel}, *compute.libraries]
    return task


def serverless_body(
    task: dict[str, Any], compute: ComputeSpec, wheel: str, run_name: str, token: str, timeout_s: float
) -> dict[str, Any]:
    """runs/submit for serverless: prefect-databricks' models predate `environments`, so this one body is
    built here and sent through its generic `execute_endpoint`."""
    return {
        "run_name": run_name,
        "idempotency_token": token,
        "timeout_seconds": int(timeout_s),
        "tasks": [task],
        "environments": [
            {
                "environment_key": "tollwatch",
                "spec": {"client": compute.serverless_environment_version, "dependencies": [wheel]},
            }
        ],
    }


@task(name="jobs_runs_submit (serverless)")
async def _submit_serverless(databricks_credentials: WorkspaceAuth, body: dict[str, Any]) -> dict[str, Any]:
    response = await execute_endpoint.fn(
        "/2.1/jobs/runs/submit", databricks_credentials, http_method=HTTPMethod.POST, json=body
    )
    response.raise_for_status()
    return dict(response.json())


def workspace_auth(res: Resources) -> WorkspaceAuth:
    """The block `databricks_credentials_block` names, as Prefect addresses blocks: `<block type slug>/<name>`.

    `tollwatch-databricks-identity/<name>` is the managed identity (no secret), given the process's credential
    for its identity (`Resources.identity`); a bare name, or `databricks-credentials/<name>`, is prefect-databricks'
    `DatabricksCredentials` (client secret or PAT), the fallback.
    """
    from tollwatch.prefect.blocks import DatabricksIdentity

    reference = res.settings.databricks_credentials_block
    slug, _, name = reference.rpartition("/")
    if slug == DatabricksIdentity.get_block_type_slug():
        identity = DatabricksIdentity.load(name)
        return identity.use_credential(res.identity(identity.managed_identity_client_id))
    if slug in ("", DatabricksCredentials.get_block_type_slug()):
        return DatabricksCredentials.load(name)
    raise ConfigurationError(
        f"TOLLWATCH_DATABRICKS_CREDENTIALS_BLOCK={reference!r}: the block type must be "
        f"{DatabricksIdentity.get_block_type_slug()!r} (managed identity) or "
        f"{DatabricksCredentials.get_block_type_slug()!r} (client secret or PAT), not {slug!r}"
    )


def runner_for(res: Resources) -> DatabricksRunner:
    """The runner with the workspace credentials block named in settings."""
    settings = res.settings
    return DatabricksRunner(
        workspace_auth(res),
        retries=settings.databricks_api_retries,
        backoff_s=settings.databricks_api_backoff_s,
        poll_s=settings.databricks_poll_s,
        max_wait_s=settings.databricks_max_wait_s,
    )


def merge_on_databricks(
    res: Resources, request: IngestRequest, manifest: LandingManifest, flow_run_id: str
) -> tuple[LoadResult, str | None]:
    """Merge one landing with the wheel's `tollwatch-merge` on Databricks; the load result and the run page URL."""
    from tollwatch.prefect.blocks import AzureStorageLocation, DatabricksCompute, SparkIcebergCatalog

    settings = res.settings

    storage = AzureStorageLocation.load(settings.databricks_storage_block)
    catalog = SparkIcebergCatalog.load(settings.databricks_catalog_block)
    compute = DatabricksCompute.load(settings.databricks_compute_block).spec()
    if catalog.spark_conf() and compute.kind == "job_cluster":
        compute = compute.model_copy(update={"spark_conf": {**catalog.spark_conf(), **compute.spark_conf}})
    window = request.window
    args = MergeJobArgs(
        landing=storage.abfss(manifest.prefix),
        table=catalog.table(settings.table),
        mode=request.mode,
        refresh_id=request.refresh_id,
        start=window.start if window else None,
        stop=window.stop if window else None,
        flow_run_id=flow_run_id,
    )
    outcome, printed = runner_for(res).merge(
        compute,
        settings.databricks_wheel,
        args,
        run_name=f"tollwatch merge {request.mode} refresh={request.refresh_id[:8]} flow-run={flow_run_id}",
        token=idempotency_token("merge", flow_run_id, request.refresh_id),
    )
    if printed is None:
        raise DatabricksApiError(
            f"Databricks run {outcome.run_page_url or ''} succeeded but printed no TOLLWATCH_RESULT line: "
            "is the task running tollwatch's `tollwatch-merge` entry point?"
        )
    result = LoadResult.from_merge(printed, manifest.rows)
    get_run_logger().info("merged on Databricks: %s", outcome.run_page_url)
    return result, outcome.run_page_url
