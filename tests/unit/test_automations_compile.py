"""Automation files compiled without a server: the repair automations the shipped files make, the environment
references the files may hold, every problem of every file in one error, the plan's notion of "unchanged", and what
the CLI says without a Prefect API. Applying them to a real server, and what its services then do:
tests/integration/test_automations.py.
"""

from __future__ import annotations

import shutil
import uuid
from datetime import timedelta
from typing import Any

import pytest
import yaml
from prefect.events.actions import RunDeployment, SendNotification
from prefect.events.schemas.automations import Automation, AutomationCore, EventTrigger, Posture
from prefect.settings import PREFECT_API_URL, temporary_settings
from typer.testing import CliRunner

from tests.support.automations import BAD_FILES, FIXTURES, ROOT, SHIPPED, call_webhook, write
from tollwatch.cli.automations import automations_app
from tollwatch.contract.events import REFRESH_ID_LABEL
from tollwatch.prefect.automations.apply import plan
from tollwatch.prefect.automations.compile import compile_project
from tollwatch.prefect.automations.load import load_project
from tollwatch.prefect.automations.models import AutomationsConfigError

runner = CliRunner()


class _Names:
    """A resolver that knows every name (compiling without a server)."""

    def block_document_id(self, type_slug: str, name: str) -> uuid.UUID:
        return uuid.uuid5(uuid.NAMESPACE_URL, f"block/{type_slug}/{name}")

    def deployment_id(self, name: str) -> uuid.UUID:
        return uuid.uuid5(uuid.NAMESPACE_URL, f"deployment/{name}")


def _repair_automations(environ: dict[str, str]) -> dict[str, AutomationCore]:
    compiled = compile_project(load_project(SHIPPED, environ=environ), _Names())
    return {a.name: a for a in compiled if a.name.startswith("tollwatch-repair-")}


def _deployment_trigger_parameters() -> dict[str, dict[str, Any]]:
    """The parameters of ingest/ingest's own triggers in prefect.yaml, by the event each one expects."""
    [ingest] = [d for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"] if d["name"] == "ingest"]
    return {trigger["expect"][0]: trigger["parameters"] for trigger in ingest["triggers"]}


@pytest.mark.parametrize(
    ("name", "announcement", "default_s"),
    [
        ("tollwatch-repair-refresh", "tollwatch.dataset.refreshed", 3600),
        ("tollwatch-repair-backfill", "tollwatch.backfill.requested", 21600),
    ],
)
def test_a_repair_file_compiles_to_a_proactive_trigger_pairing_announcement_and_completion_per_load(
    name, announcement, default_s
):
    repair = _repair_automations({})[name]

    trigger = repair.trigger
    assert isinstance(trigger, EventTrigger)
    assert trigger.posture == Posture.Proactive
    # a held load ended too (a person settles it): it closes the watch like a completion
    assert (trigger.after, trigger.expect) == (
        {announcement},
        {"tollwatch.ingestion.completed", "tollwatch.ingestion.held"},
    )
    assert trigger.for_each == {REFRESH_ID_LABEL}  # the label both the announcement and the completion carry
    assert trigger.match.root == {"prefect.resource.id": ["socrata.*", "iceberg.*"]}  # type: ignore[union-attr]
    assert (trigger.threshold, trigger.within) == (1, timedelta(seconds=default_s))
    run, notify = repair.actions
    assert isinstance(run, RunDeployment)
    assert (run.source, run.deployment_id) == ("selected", _Names().deployment_id("ingest/ingest"))
    assert run.parameters == _deployment_trigger_parameters()[announcement]  # the same run as the first one
    assert isinstance(notify, SendNotification)
    assert notify.block_document_id == _Names().block_document_id("custom-webhook", "tollwatch-alerts")
    assert "event.resource['tollwatch.refresh-id']" in notify.body  # names the load


def test_the_repair_times_are_read_from_the_environment_when_the_files_are_loaded():
    repairs = _repair_automations(
        {"TOLLWATCH_REPAIR_REFRESH_AFTER_S": "12", "TOLLWATCH_REPAIR_BACKFILL_AFTER_S": " 45 "}
    )

    assert repairs["tollwatch-repair-refresh"].trigger.within == timedelta(seconds=12)  # type: ignore[union-attr]
    assert repairs["tollwatch-repair-backfill"].trigger.within == timedelta(seconds=45)  # type: ignore[union-attr]
    # an empty variable is unset: the file's default
    empty = _repair_automations({"TOLLWATCH_REPAIR_REFRESH_AFTER_S": ""})
    assert empty["tollwatch-repair-refresh"].trigger.within == timedelta(seconds=3600)  # type: ignore[union-attr]


def test_environment_references_are_limited_to_tollwatch_settings_and_text_takes_them_verbatim(tmp_path):
    directory = tmp_path / "automations"
    notify = {"type": "send-notification", "block": "custom-webhook/tollwatch-alerts", "body": "x"}
    trigger = {"type": "event", "posture": "Reactive", "expect": ["tollwatch.ingestion.failed"]}
    write(
        directory,
        "texts.yaml",
        {
            "name": "texts",
            "trigger": {**trigger, "threshold": "${TOLLWATCH_TEST_THRESHOLD:-3}"},
            "actions": [{**notify, "body": "for ${TOLLWATCH_TEST_TEAM:-nobody} (${TOLLWATCH_TEST_THRESHOLD:-3})"}],
        },
    )

    project = load_project(directory, environ={"TOLLWATCH_TEST_TEAM": "ops", "HOME": "/root"})
    [texts] = project.automations
    assert texts.spec.trigger["threshold"] == 3  # a whole value: an int, from the default
    assert texts.spec.actions[0].model_extra == {"body": "for ops (3)"}  # inside text: the text

    secret = {"name": "secret", "trigger": trigger, "actions": [{**notify, "body": "${HOME}"}]}
    unset = {"name": "unset", "trigger": {**trigger, "threshold": "${TOLLWATCH_TEST_N}"}, "actions": [notify]}
    write(directory, "secret.yaml", secret)
    write(directory, "unset.yaml", unset)
    with pytest.raises(AutomationsConfigError) as caught:
        load_project(directory, environ={"HOME": "/root"})
    assert str(caught.value).splitlines() == [
        "automations/secret.yaml: actions[0].body: ${HOME}: only TOLLWATCH_* environment variables can be named",
        "automations/unset.yaml: trigger.threshold: TOLLWATCH_TEST_N is not set and has no default (write "
        "${TOLLWATCH_TEST_N:-<default>})",
    ]


def test_every_problem_of_every_file_is_reported_in_one_error(tmp_path):
    directory = tmp_path / "automations"
    shutil.copytree(FIXTURES / "good", directory)
    shutil.copytree(FIXTURES / "bad", directory, dirs_exist_ok=True)
    write(directory, "subscriptions/twice.yaml", {"team": "twice", "subscriptions": [call_webhook("a", "x")] * 2})

    with pytest.raises(AutomationsConfigError) as caught:
        load_project(directory)

    lines = str(caught.value).splitlines()
    for _, expected in BAD_FILES:
        assert any(line.startswith(expected) for line in lines), expected
    assert (
        "automations/subscriptions/twice.yaml: subscriptions[1].name: 'tollwatch/sub/twice/a' is already declared "
        "in automations/subscriptions/twice.yaml"
    ) in lines
    assert len(lines) == len(BAD_FILES) + 1


def test_without_a_prefect_api_the_cli_says_how_to_get_one(tmp_path, monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        result = runner.invoke(automations_app, ["apply", "--dir", str(SHIPPED), "--state-dir", str(tmp_path)])

    assert result.exit_code == 1
    assert result.stderr == (
        "error: PREFECT_API_URL is not set and no local stack is running: set it, or start one (`tollwatch stack up`)\n"
    )


def test_plan_ignores_set_order_and_server_ids():
    trigger = {"type": "event", "posture": "Reactive", "expect": ["b.x", "a.x", "c.x"], "within": 0}
    declared = AutomationCore.model_validate({"name": "n", "trigger": trigger, "actions": [{"type": "do-nothing"}]})
    server_copy = Automation.model_validate(
        {
            **declared.model_dump(mode="json"),
            "id": str(uuid.uuid4()),
            "trigger": {**trigger, "expect": ["c.x", "a.x", "b.x"]},
        }
    )
    changed = Automation.model_validate({**server_copy.model_dump(mode="json"), "description": "edited in the UI"})

    assert [c.kind for c in plan([declared], [server_copy]).changes] == ["unchanged"]
    [update] = plan([declared], [changed]).changes
    assert update.kind == "update"
    assert "-description: edited in the UI" in update.diff.splitlines()


def test_a_subscription_can_require_a_passed_audit_and_a_typo_in_the_verdict_is_refused():
    """`when: {quality: passed}` compiles to the completion event's `tollwatch.quality` label; an unknown verdict is
    an error at load time, not a subscription that never fires."""
    from pydantic import ValidationError

    from tollwatch.contract.events import INGESTION_LABELS
    from tollwatch.prefect.automations.compile import subscription_trigger
    from tollwatch.prefect.automations.models import Subscription

    action = {"type": "run-local-job", "job": "daily_totals"}
    strict = Subscription(name="only-audited", when={"quality": ["passed", "warned"]}, action=action)
    assert subscription_trigger(strict)["match"][INGESTION_LABELS["quality"]] == ["passed", "warned"]
    with pytest.raises(ValidationError, match="quality"):
        Subscription(name="typo", when={"quality": "pased"}, action=action)
