"""What tollwatch asks of Databricks, as plain models: compute, the merge job's arguments, run outcomes.

No HTTP here: requests go through prefect-databricks (tollwatch/prefect/databricks_runner.py). This module
decides what to send and how to read what comes back, so those rules are testable without any client:
- idempotency tokens are derived from the flow run (≤ 64 chars, as the Jobs API requires), so a retried
  submit returns the run the first attempt started instead of starting a second one;
- a run is successful only when TERMINATED with result SUCCESS; every other end is a failure with a reason;
- a call that keeps failing (after the retries of `tollwatch.adapters.net`) ends in a `DatabricksApiError` that
  says which call, how it failed and how often it was tried.
"""

from __future__ import annotations

from datetime import date
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tollwatch.contract import compute
from tollwatch.contract.errors import TollwatchError
from tollwatch.contract.events import deterministic_id

#: Life-cycle states after which a run never changes again.
TERMINAL_LIFE_CYCLES = frozenset({"TERMINATED", "SKIPPED", "INTERNAL_ERROR"})
#: Entra ID scope of the Azure Databricks resource (its first-party application id, the same in every tenant):
#: what a managed identity asks a token for to call a workspace's REST APIs.
AZURE_DATABRICKS_SCOPE = "2ff814a6-3304-4ab8-85cb-cd0e6f879c1d/.default"


class DatabricksRunFailed(TollwatchError):
    """The Databricks run ended in anything but TERMINATED/SUCCESS (the message names the state and reason).

    `outcome` is the run as last seen, so a failure event can link the run page (None when it is unknown).
    """

    def __init__(self, message: str, outcome: RunOutcome | None = None) -> None:
        super().__init__(message)
        self.outcome = outcome


class DatabricksRunTimedOut(DatabricksRunFailed):
    """We stopped waiting (and cancelled the run)."""


class DatabricksApiError(TollwatchError):
    """A Jobs API call kept failing (throttled, unavailable, unreachable) through every retry, or asked us to wait
    longer than we allow. The message names the call, the last answer and the number of attempts."""


class DatabricksAuthError(TollwatchError):
    """No Entra ID token for Azure Databricks: the identity is missing, unreachable or refused (the message says which
    identity and azure-identity's reason; it never holds a token)."""


class ComputeSpec(BaseModel):
    """Where a Spark task runs; exactly the fields its `kind` needs."""

    model_config = ConfigDict(frozen=True)

    kind: Literal["existing_cluster", "job_cluster", "serverless"] = "job_cluster"
    existing_cluster_id: str | None = None
    spark_version: str = compute.SPARK_VERSION
    node_type_id: str = compute.NODE_TYPE_ID
    num_workers: int = Field(compute.NUM_WORKERS, ge=0)
    spark_conf: dict[str, str] = Field(default_factory=dict)
    libraries: list[dict[str, Any]] = Field(default_factory=list)
    serverless_environment_version: str = compute.SERVERLESS_ENVIRONMENT_VERSION

    @model_validator(mode="after")
    def _needs(self) -> Self:
        if self.kind == "existing_cluster" and not self.existing_cluster_id:
            raise ValueError("kind=existing_cluster needs existing_cluster_id")
        if self.kind == "serverless" and self.libraries:
            raise ValueError("serverless tasks take dependencies in their environment, not cluster libraries")
        return self


class MergeJobArgs(BaseModel):
    """The arguments of the wheel's `tollwatch-merge` entry point (a `python_wheel_task` receives them as argv)."""

    model_config = ConfigDict(frozen=True)

    landing: str = Field(description="abfss:// URI of the landed pages of this load")
    table: str = Field(description="catalog.namespace.table")
    mode: Literal["window", "refresh"]
    refresh_id: str
    start: date | None = None
    stop: date | None = None
    flow_run_id: str | None = None
    #: Write-audit-publish on the cluster: the merge commits to an audit branch and publishes only a passing load.
    audit: bool = True

    def argv(self) -> list[str]:
        args = ["--landing", self.landing, "--table", self.table]
        args += ["--mode", self.mode, "--refresh-id", self.refresh_id]
        if self.start and self.stop:
            args += ["--start", self.start.isoformat(), "--stop", self.stop.isoformat()]
        if self.flow_run_id:
            args += ["--flow-run-id", self.flow_run_id]
        if self.audit:
            args += ["--audit"]
        return args


def idempotency_token(purpose: str, flow_run_id: str, *parts: object) -> str:
    """Stable for one flow run (its retries reuse it), different across runs; 36 chars ≤ the API's 64."""
    return str(deterministic_id("databricks", purpose, flow_run_id, *parts))


class RunOutcome(BaseModel):
    """What a finished run looked like, read from `jobs/runs/get`."""

    run_id: int
    run_page_url: str | None = None
    life_cycle_state: str
    result_state: str | None = None
    state_message: str = ""

    @classmethod
    def from_run(cls, run: dict[str, Any]) -> RunOutcome:
        state = run.get("state") or {}
        return cls(
            run_id=int(run["run_id"]),
            run_page_url=run.get("run_page_url"),
            life_cycle_state=str(state.get("life_cycle_state", "")),
            result_state=state.get("result_state"),
            state_message=str(state.get("state_message", "")),
        )

    @property
    def finished(self) -> bool:
        return self.life_cycle_state in TERMINAL_LIFE_CYCLES

    @property
    def succeeded(self) -> bool:
        return self.life_cycle_state == "TERMINATED" and self.result_state == "SUCCESS"

    def raise_for_failure(self, detail: str = "") -> None:
        """FAILED, TIMEDOUT, CANCELED (result states) and SKIPPED, INTERNAL_ERROR (life cycles) fail the caller;
        `detail` is what the task itself reported (the driver's error), added to the run's state message."""
        if self.succeeded:
            return
        ended = self.result_state if self.life_cycle_state == "TERMINATED" else self.life_cycle_state
        reason = "; ".join(part for part in (self.state_message, detail) if part)
        reason = f": {reason}" if reason else ""
        raise DatabricksRunFailed(
            f"Databricks run {self.run_id} ended {ended}{reason} ({self.run_page_url or 'no url'})", self
        )
