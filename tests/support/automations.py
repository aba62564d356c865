"""Helpers for the automation files' tests (tests/unit/test_automations_compile.py, tests/integration/
test_automations.py, the downstream fault tests): the shipped directory and the hand-written fixtures, writing
files, `tollwatch automations apply`, reading the runs an automation started. The server-side fixtures (`inbox`,
`api`, `server`, `client`) are in tests/conftest.py.
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
#: Hand-written automation files: a valid project (good/) and one mistake per file (bad/).
FIXTURES = Path(__file__).resolve().parent / "automations_fixtures"
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

#: Each bad file of FIXTURES and the line `tollwatch automations apply` must report for it.
BAD_FILES = [
    (
        "subscriptions/missing-job.yaml",
        "automations/subscriptions/missing-job.yaml: subscriptions[0].action.job: Field required",
    ),
    (
        "subscriptions/unknown-key.yaml",
        "automations/subscriptions/unknown-key.yaml: subscriptions[0].colour: Extra inputs are not permitted",
    ),
    (
        "subscriptions/bad-event.yaml",
        "automations/subscriptions/bad-event.yaml: subscriptions[0].events[0]: Input should be "
        "'tollwatch.ingestion.completed', 'tollwatch.ingestion.failed' or 'tollwatch.ingestion.held'",
    ),
    (
        "subscriptions/bad-when.yaml",
        "automations/subscriptions/bad-when.yaml: subscriptions[0].when: unknown condition 'status'; "
        "allowed: mode, already_committed",
    ),
    (
        "subscriptions/bad-template.yaml",
        "automations/subscriptions/bad-template.yaml: subscriptions[0].action.payload: 'payload' is not a valid "
        "template",
    ),
    (
        "subscriptions/syntax-error.yaml",
        "automations/subscriptions/syntax-error.yaml: YAML syntax error at line 5, column 1",
    ),
    (
        "unknown-trigger-key.yaml",
        "automations/unknown-trigger-key.yaml: trigger.expct: Extra inputs are not permitted",
    ),
]

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


def call_webhook(name: str, block: str, **extra: Any) -> dict[str, Any]:
    """A subscription entry that calls the `webhook` block named `block`."""
    return {"name": name, **extra, "action": {"type": "call-webhook", "block": block}}


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
