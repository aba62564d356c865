"""Helpers for tests that apply automation files to the real Prefect server (tests/integration/test_automations.py,
the downstream fault tests): the shipped directory, writing files, `tollwatch automations apply`, reading the runs
an automation started. The server-side fixtures (`inbox`, `api`, `server`, `client`) are in tests/conftest.py.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from typer.testing import CliRunner, Result

from tests.support.prefect_runs import wait_for_runs

if TYPE_CHECKING:
    from prefect.client.orchestration import SyncPrefectClient

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "automations"
HAND_MADE = "tollwatch-test:hand-made"  # tag of automations a test creates by hand (cleaned up, never pruned)
GRACE_S = 3  # after the expected delivery, how long a wrong extra one gets to show up before counting

#: A team subscription that runs Databricks job 987 with the completion's row count.
DATABRICKS_SUBSCRIPTION = """\
team: finance
subscriptions:
  - name: revenue-model
    action:
      type: run-databricks-job
      job_id: 987
      parameters: {rows: "{{ event.payload.rows_written }}"}
"""

_runner = CliRunner()


def cli_apply(directory: Path, *args: str) -> Result:
    """`tollwatch automations apply --dir <directory> ...`, in process."""
    from tollwatch.cli.automations import automations_app

    return _runner.invoke(automations_app, ["apply", "--dir", str(directory), *args])


def shipped_copy(tmp_path: Path) -> Path:
    """A copy of the shipped automations/ directory a test may change."""
    directory = tmp_path / "automations"
    shutil.copytree(SHIPPED, directory)
    return directory


def write(directory: Path, relative: str, content: Any) -> Path:
    """Write `content` (text, or data dumped as YAML) to `directory/relative`."""
    path = directory / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content, sort_keys=False))
    return path


def runs_of_deployment(api: str, deployment_id: uuid.UUID, refresh_id: str, timeout_s: float = 30) -> list[dict]:
    """The runs of `deployment_id` an automation started for the completion of `refresh_id` ([] at the deadline)."""

    def ours(run: dict) -> bool:
        return (run["parameters"].get("completion") or {}).get("refresh_id") == refresh_id

    return wait_for_runs(api, ours, deployment_id=deployment_id, timeout_s=timeout_s)


def remove_test_automations(client: SyncPrefectClient) -> None:
    """Delete every automation these files manage or a test made by hand (the server is shared by the session)."""
    from tollwatch.prefect.automations.models import MANAGED_TAG

    for automation in client.read_automations():
        if {MANAGED_TAG, HAND_MADE} & set(automation.tags):
            client.delete_automation(automation.id)
