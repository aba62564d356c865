"""The chain on the Databricks engine, set up once for a test module: the Jobs API double (on the session's warm
Spark drivers), a stack of the module's own deployed with the databricks engine, the workspace blocks, and the
finance team's daily-totals subscription applied.

Shared by tests/integration/test_chain_databricks.py (the chain itself) and test_secrets_never_leak.py (the same
chain with a marker as every secret), which differ only in the environment and the workspace's token.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from typer.testing import CliRunner

from tests.support.databricks_double import PLACEHOLDER_PAT, DatabricksJobsDouble, bundle_jobs, save_workspace_blocks
from tests.support.stacks import deployed_stack
from tests.support.warm_driver import WarmClusters
from tollwatch import resources
from tollwatch.adapters.spark_submit import catalog_conf, find_jars
from tollwatch.contract.settings import load_settings
from tollwatch_dev.stack import LocalStack, StackEndpoints

ROOT = Path(__file__).resolve().parents[2]

ENGINE = {
    "TOLLWATCH_ENGINE": "databricks",
    "TOLLWATCH_DATABRICKS_POLL_S": "1",
    "TOLLWATCH_UPSTREAM_MAX_ATTEMPTS": "2",
    "TOLLWATCH_UPSTREAM_BACKOFF_MAX_S": "0.2",
    "TOLLWATCH_TASK_RETRIES": "0",
}

SUBSCRIPTION = """\
team: finance
subscriptions:
  - name: daily-totals-on-databricks
    description: Daily totals by the Spark job of the bundle, run on Databricks after each new load
    when: {{already_committed: false}}
    action:
      type: run-databricks-job
      job_id: {job_id}
"""


@dataclass(frozen=True)
class DatabricksChain:
    endpoints: StackEndpoints
    double: DatabricksJobsDouble
    #: What `tollwatch automations apply` printed for the subscription.
    applied: str


@contextmanager
def databricks_chain(
    state: Path,
    bundle: Path,
    clusters: WarmClusters,
    env: Mapping[str, str] | None = None,
    token: str = PLACEHOLDER_PAT,
) -> Iterator[DatabricksChain]:
    """Everything up, deployed and applied; stopped afterwards. `env` adds settings (the worker and every flow run
    inherit them); `token` is the only one the double's workspace accepts, and the one the blocks carry."""
    from tollwatch.cli.main import app

    local = LocalStack(state, prefect_ui=False, mirror_start=date(2024, 1, 1), mirror_through=date(2024, 2, 1))
    # the stack's warehouse (StackEndpoints.env: <state>/warehouse): its catalog database exists, in WAL mode,
    # before a driver opens it; the double's clusters share it through Iceberg's JDBC catalog
    warehouse = load_settings(warehouse_dir=state / "warehouse")
    resources.table_store(warehouse)
    conf = catalog_conf(warehouse.catalog_name, warehouse.resolved_catalog_properties())
    double = DatabricksJobsDouble(
        jars=find_jars(ROOT / ".jars"),
        conf=conf,
        jobs=bundle_jobs(bundle),
        pending_s=1.0,
        clusters=clusters,
        token=token,
    )
    with double, deployed_stack(local, {**ENGINE, **(env or {}), **double.client_env()}) as endpoints:
        double.mount_storage(endpoints.blob_connection_string)
        save_workspace_blocks(double, load_settings().storage_container, token=token)
        automations = state / "automations"
        (automations / "subscriptions").mkdir(parents=True)
        job_id = double.job_id("tollwatch_daily_totals")
        (automations / "subscriptions" / "finance.yaml").write_text(SUBSCRIPTION.format(job_id=job_id))
        applied = CliRunner().invoke(app, ["automations", "apply", "--dir", str(automations)])
        assert applied.exit_code == 0, applied.output
        yield DatabricksChain(endpoints, double, applied.output)
