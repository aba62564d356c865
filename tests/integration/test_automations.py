"""Automations and subscriptions as code, on a real Prefect server: validation before anything is applied,
idempotent apply / update / prune, and what the server's automation services then actually do (webhook calls,
notifications, deployment runs, the proactive freshness SLA) as seen by a loopback inbox."""

from __future__ import annotations

import shutil
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prefect.blocks.webhook import Webhook
from prefect.client.orchestration import SyncPrefectClient
from prefect.events.actions import CallWebhook, DoNothing, RunDeployment, SendNotification
from prefect.events.schemas.automations import Automation, AutomationCore, EventTrigger, Posture
from pydantic import SecretStr
from typer.testing import CliRunner

from tests.support import payloads
from tests.support.automations import (
    BAD_FILES,
    DATABRICKS_SUBSCRIPTION,
    FIXTURES,
    GRACE_S,
    HAND_MADE,
    SHIPPED,
    call_webhook,
    cli_apply,
    runs_of_deployment,
    shipped_copy,
    write,
)
from tests.support.prefect_events import prefect_auth_string, wait_for_events
from tests.support.prefect_runs import read_runs
from tollwatch.adapters.prefect_events import PrefectEventsEmitter
from tollwatch.contract.events import (
    DatasetRefreshed,
    IngestionCompleted,
    IngestionFailed,
    TollwatchEvent,
)
from tollwatch.prefect.automations.apply import normalised
from tollwatch.prefect.automations.compile import DEFAULT_WEBHOOK_PAYLOAD, PrefectResolver, compile_project
from tollwatch.prefect.automations.load import load_project
from tollwatch.prefect.automations.models import MANAGED_TAG, PROJECT_TAG, AutomationsConfigError
from tollwatch.prefect.observe import connect
from tollwatch_dev.inbox import Inbox, Received

pytestmark = pytest.mark.stack

SHIPPED_NAMES = [
    "tollwatch-freshness-sla",
    "tollwatch-ingest-failed",
    "tollwatch-ingest-held",
    "tollwatch-job-failed",
    "tollwatch-repair-backfill",
    "tollwatch-repair-refresh",
    "tollwatch/sub/city-dashboard/refresh-tiles",
    "tollwatch/sub/traffic-analytics/daily-totals",
]

runner = CliRunner()


# ------------------------------------------------------------------------------------------------- helpers


def managed(client: SyncPrefectClient) -> dict[str, Automation]:
    return {a.name: a for a in client.read_automations() if MANAGED_TAG in a.tags}


def emit(api: str, *events: TollwatchEvent) -> None:
    PrefectEventsEmitter(httpx.Client(timeout=10), api, auth_string=prefect_auth_string()).emit(list(events))


def completed(refresh_id: str, *, already_committed: bool = False) -> IngestionCompleted:
    return payloads.completion(
        catalog="local",
        mode="refresh",
        window=None,
        refresh_id=refresh_id,
        rows_fetched=24,
        rows_written=0 if already_committed else 24,
        snapshot_id=7,
        landing_uri="memory://landing/x.parquet",
        already_committed=already_committed,
    )


def webhook_to(inbox: Inbox, name: str) -> str:
    """A `webhook` block named `name` that POSTs to `<inbox>/<name>`; returns that path."""
    Webhook(
        url=SecretStr(f"{inbox.url}/{name}"),
        headers={"Content-Type": "application/json"},  # type: ignore[arg-type]
        allow_private_urls=True,
    ).save(name, overwrite=True)
    return f"/{name}"


# ------------------------------------------------------------------------------------- loading, compiling


def test_shipped_directory_loads_and_compiles_against_the_real_server(server, client):
    desired = {a.name: a for a in compile_project(load_project(SHIPPED), PrefectResolver(client))}

    assert sorted(desired) == SHIPPED_NAMES  # automations/webhooks/ is not read
    assert all({PROJECT_TAG, MANAGED_TAG} <= set(a.tags) for a in desired.values())

    failed = desired["tollwatch-ingest-failed"]
    assert isinstance(failed.trigger, EventTrigger)
    assert (failed.trigger.posture, failed.trigger.expect) == (Posture.Reactive, {"tollwatch.ingestion.failed"})
    [notify] = failed.actions
    assert isinstance(notify, SendNotification)
    assert notify.block_document_id == server["custom-webhook/tollwatch-alerts"]

    held = desired["tollwatch-ingest-held"]  # write-audit-publish: a held load alerts the same channel
    assert isinstance(held.trigger, EventTrigger)
    assert (held.trigger.posture, held.trigger.expect) == (Posture.Reactive, {"tollwatch.ingestion.held"})
    assert held.actions[0].block_document_id == server["custom-webhook/tollwatch-alerts"]  # type: ignore[union-attr]

    sla = desired["tollwatch-freshness-sla"]
    assert isinstance(sla.trigger, EventTrigger)
    assert (sla.trigger.posture, sla.trigger.within) == (Posture.Proactive, timedelta(days=8))
    assert sla.trigger.expect == {"tollwatch.dataset.refreshed"}
    assert sla.trigger.match.root == {"prefect.resource.id": "socrata.*"}  # type: ignore[union-attr]
    assert sla.actions[0].block_document_id == server["custom-webhook/tollwatch-alerts"]  # type: ignore[union-attr]

    daily = desired["tollwatch/sub/traffic-analytics/daily-totals"]
    assert isinstance(daily.trigger, EventTrigger)
    assert daily.trigger.match.root == {  # type: ignore[union-attr]
        "prefect.resource.id": "iceberg.*",
        "tollwatch.table": "bronze.bnt_traffic_hourly",
        "tollwatch.already-committed": "false",
    }
    [run] = daily.actions
    assert isinstance(run, RunDeployment)
    assert (run.source, run.deployment_id) == ("selected", server["run-job/run-job"])
    assert run.parameters == {"job": "daily_totals", "completion": "{{ event.payload }}", "parameters": {}}

    [hook] = desired["tollwatch/sub/city-dashboard/refresh-tiles"].actions
    assert isinstance(hook, CallWebhook)
    assert hook.block_document_id == server["webhook/city-dashboard-webhook"]
    assert hook.payload == DEFAULT_WEBHOOK_PAYLOAD


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (
            "soon",
            "automations/repair-refresh.yaml: trigger.within: TOLLWATCH_REPAIR_REFRESH_AFTER_S='soon' (from the "
            "environment) is not a whole number",
        ),
        (
            "-30",
            "automations/repair-refresh.yaml: trigger.within: TOLLWATCH_REPAIR_REFRESH_AFTER_S='-30' (from the "
            "environment) is not a whole number",
        ),
        (
            "5",
            "automations/repair-refresh.yaml: trigger: `within` for Proactive triggers must be greater than or "
            "equal to 10 seconds (trigger.within is TOLLWATCH_REPAIR_REFRESH_AFTER_S='5' (from the environment))",
        ),
    ],
    ids=["not-a-number", "negative", "below-prefects-minimum"],
)
def test_a_bad_repair_time_is_named_with_its_variable_and_nothing_is_applied(
    client, tmp_path, monkeypatch, value, expected
):
    with pytest.raises(AutomationsConfigError) as caught:
        load_project(SHIPPED, environ={"TOLLWATCH_REPAIR_REFRESH_AFTER_S": value})
    assert str(caught.value) == expected

    monkeypatch.setenv("TOLLWATCH_REPAIR_REFRESH_AFTER_S", value)
    result = cli_apply(shipped_copy(tmp_path))
    assert result.exit_code == 1
    assert result.stderr == f"error: {expected}\n"
    assert managed(client) == {}


@pytest.mark.parametrize(("bad_file", "expected"), BAD_FILES, ids=[Path(f).stem for f, _ in BAD_FILES])
def test_a_bad_file_is_named_with_its_field_and_nothing_is_applied(client, tmp_path, bad_file, expected):
    directory = tmp_path / "automations"
    shutil.copytree(FIXTURES / "good", directory)
    shutil.copy(FIXTURES / "bad" / bad_file, directory / bad_file)
    before = sorted(str(a.id) for a in client.read_automations())

    result = cli_apply(directory)

    assert result.exit_code == 1
    assert result.stderr.startswith("error: ")
    assert expected in result.stderr
    assert "Traceback" not in result.output
    assert sorted(str(a.id) for a in client.read_automations()) == before
    # the valid file beside it was held back only because of the bad one
    (directory / bad_file).unlink()
    assert cli_apply(directory).stdout.splitlines() == [
        "+ create tollwatch/sub/good-team/notify",
        "1 created, 0 updated, 0 unchanged, 0 deleted",
    ]


def test_missing_block_and_deployment_are_named_with_how_to_create_them(client, tmp_path):
    directory = tmp_path / "automations"
    write(
        directory,
        "needs-deployment.yaml",
        {
            "name": "needs-deployment",
            "trigger": {"type": "event", "posture": "Reactive", "expect": ["tollwatch.ingestion.failed"]},
            "actions": [{"type": "run-deployment", "deployment": "nope/nope"}],
        },
    )
    write(directory, "subscriptions/qa.yaml", {"team": "qa", "subscriptions": [call_webhook("hook", "no-such-hook")]})

    result = cli_apply(directory)

    assert result.exit_code == 1
    assert (
        "automations/needs-deployment.yaml: actions[0].deployment: deployment nope/nope does not exist on the "
        "Prefect server; deploy first: prefect deploy --all"
    ) in result.stderr
    assert (
        "automations/subscriptions/qa.yaml: subscriptions[0].action.block: block webhook/no-such-hook does not "
        "exist on the Prefect server; create it first: `prefect block create webhook`"
    ) in result.stderr
    assert managed(client) == {}


# ---------------------------------------------------------------------------------------------- applying


def test_apply_is_idempotent_updates_with_a_diff_and_dry_run_changes_nothing(client, tmp_path):
    directory = shipped_copy(tmp_path)

    first = cli_apply(directory)
    assert first.exit_code == 0, first.output
    assert first.stdout.splitlines() == [
        *(f"+ create {name}" for name in SHIPPED_NAMES),
        "8 created, 0 updated, 0 unchanged, 0 deleted",
    ]
    created = managed(client)
    assert sorted(created) == SHIPPED_NAMES

    second = cli_apply(directory)
    assert second.stdout == "no changes: 8 automations up to date\n"
    after_second = managed(client)
    assert {n: a.id for n, a in after_second.items()} == {n: a.id for n, a in created.items()}
    assert {n: normalised(a) for n, a in after_second.items()} == {n: normalised(a) for n, a in created.items()}

    dashboard = directory / "subscriptions" / "city-dashboard.yaml"
    dashboard.write_text(dashboard.read_text().replace("enabled: true", "enabled: false"))
    dry = cli_apply(directory, "--dry-run")
    lines = dry.stdout.splitlines()
    assert "~ update tollwatch/sub/city-dashboard/refresh-tiles" in lines
    assert [line for line in lines if "enabled:" in line] == ["    -enabled: true", "    +enabled: false"]
    assert "= unchanged tollwatch-ingest-failed" in lines
    assert lines[-1] == "dry run, nothing changed; would be: 0 created, 1 updated, 7 unchanged, 0 deleted"
    assert managed(client)["tollwatch/sub/city-dashboard/refresh-tiles"].enabled is True

    real = cli_apply(directory)
    assert real.stdout.splitlines()[-1] == "0 created, 1 updated, 7 unchanged, 0 deleted"
    updated = managed(client)["tollwatch/sub/city-dashboard/refresh-tiles"]
    assert (updated.id, updated.enabled) == (created[updated.name].id, False)
    assert cli_apply(directory).stdout == "no changes: 8 automations up to date\n"


def test_prune_deletes_only_managed_automations_no_file_declares(client, tmp_path):
    directory = shipped_copy(tmp_path)
    assert cli_apply(directory).exit_code == 0
    hand_made = client.create_automation(
        AutomationCore(
            name="made-by-hand",
            tags=[PROJECT_TAG, HAND_MADE],  # tollwatch-related, but not managed by these files
            trigger=EventTrigger(expect={"tollwatch.job.failed"}),
            actions=[DoNothing()],
        )
    )
    (directory / "freshness-sla.yaml").unlink()

    kept = cli_apply(directory)
    assert kept.stdout.splitlines() == [
        "? not declared tollwatch-freshness-sla (tagged tollwatch:managed; --prune deletes it)",
        "no changes: 7 automations up to date",
    ]
    assert "tollwatch-freshness-sla" in managed(client)

    pruned = cli_apply(directory, "--prune")
    assert "- delete tollwatch-freshness-sla" in pruned.stdout.splitlines()
    assert pruned.stdout.splitlines()[-1] == "0 created, 0 updated, 7 unchanged, 1 deleted"
    names = {a.name: a.id for a in client.read_automations()}
    assert "tollwatch-freshness-sla" not in names
    assert names["made-by-hand"] == hand_made


def test_a_name_held_twice_on_the_server_updates_the_oldest_and_reports_the_rest(client, tmp_path):
    directory = shipped_copy(tmp_path)
    assert cli_apply(directory).exit_code == 0
    original = managed(client)["tollwatch-ingest-failed"]
    copy = client.create_automation(AutomationCore.model_validate(original.model_dump(exclude={"id"})))
    failed = directory / "ingest-failed.yaml"
    failed.write_text(failed.read_text().replace("Tell the on-call channel", "Page the on-call channel"))

    result = cli_apply(directory)

    assert f"! duplicate tollwatch-ingest-failed: kept in sync the oldest ({original.id}); left alone {copy}" in (
        result.stdout
    )
    assert result.stdout.splitlines()[-1] == "0 created, 1 updated, 7 unchanged, 0 deleted"
    assert client.read_automation(original.id).description.startswith("Page")  # type: ignore[union-attr]
    assert client.read_automation(copy).description.startswith("Tell")  # type: ignore[union-attr]


# ----------------------------------------------------------------------- behaviour on the server's services


def test_call_webhook_subscription_posts_the_event_once_per_event_id(api, client, inbox, tmp_path):
    tag = uuid.uuid4().hex[:8]
    path = webhook_to(inbox, f"qa-{tag}")
    directory = tmp_path / "automations"
    write(directory, "subscriptions/qa.yaml", {"team": "qa", "subscriptions": [call_webhook("hook", f"qa-{tag}")]})
    assert cli_apply(directory).exit_code == 0
    event = TollwatchEvent.of(completed(f"once-{tag}"))

    emit(api, event)
    emit(api, event)  # a retried emit: same id, so Prefect drops it
    inbox.wait_for(path)
    time.sleep(GRACE_S)

    [delivery] = inbox.received(path)
    body = delivery.json_body
    assert body["id"] == str(event.id)
    assert body["event"] == "tollwatch.ingestion.completed"
    assert body["payload"] == event.payload
    assert body["resource"]["prefect.resource.id"] == "iceberg.local.bronze.bnt_traffic_hourly"
    assert body["resource"]["tollwatch.already-committed"] == "false"


def test_disabled_and_conditional_subscriptions_stay_quiet(api, client, inbox, tmp_path):
    tag = uuid.uuid4().hex[:8]
    witness = webhook_to(inbox, f"witness-{tag}")
    disabled = webhook_to(inbox, f"disabled-{tag}")
    new_only = webhook_to(inbox, f"new-only-{tag}")
    subscriptions = [
        call_webhook("witness", f"witness-{tag}"),
        call_webhook("disabled", f"disabled-{tag}", enabled=False),
        call_webhook("new-only", f"new-only-{tag}", when={"already_committed": False}),
    ]
    directory = tmp_path / "automations"
    write(directory, "subscriptions/qa.yaml", {"team": "qa", "subscriptions": subscriptions})
    assert cli_apply(directory).exit_code == 0

    emit(api, TollwatchEvent.of(completed(f"replay-{tag}", already_committed=True)))
    inbox.wait_for(witness)  # the event was evaluated...
    time.sleep(GRACE_S)
    assert inbox.received(disabled) == []  # ...but the disabled subscription did nothing
    assert inbox.received(new_only) == []  # ...and the replay did not match `already_committed: false`

    emit(api, TollwatchEvent.of(completed(f"new-{tag}")))
    [delivery] = inbox.wait_for(new_only)  # a new load does match it
    assert delivery.json_body["payload"]["refresh_id"] == f"new-{tag}"
    inbox.wait_for(witness, count=2)
    time.sleep(GRACE_S)
    assert inbox.received(disabled) == []


def test_run_local_job_subscription_starts_run_job_with_the_payload_as_a_dict(api, client, server, tmp_path):
    tag = uuid.uuid4().hex[:8]
    directory = tmp_path / "automations"
    (directory / "subscriptions").mkdir(parents=True)
    shutil.copy(SHIPPED / "subscriptions" / "traffic-analytics.yaml", directory / "subscriptions")
    assert cli_apply(directory).exit_code == 0
    payload = completed(f"job-{tag}")

    emit(api, TollwatchEvent.of(payload))

    [run] = runs_of_deployment(api, server["run-job/run-job"], f"job-{tag}")
    assert run["parameters"] == {
        "job": "daily_totals",
        "completion": payload.model_dump(mode="json"),  # JSON types kept: a dict, ints, null
        "parameters": {},
    }


def _alert(text: str):
    def matches(request: Received) -> bool:
        return isinstance(request.json_body, dict) and text in f"{request.json_body}"

    return matches


def test_ingest_failed_automation_sends_the_error_to_the_alerts_block(api, client, inbox, tmp_path):
    tag = uuid.uuid4().hex[:8]
    assert cli_apply(shipped_copy(tmp_path)).exit_code == 0
    flow_run_id = str(uuid.uuid4())
    failure = IngestionFailed(
        table="bronze.bnt_traffic_hourly",
        catalog="local",
        mode="window",
        window=None,
        refresh_id=None,
        error_class="UpstreamError",
        error_message=f"socrata answered 503 ({tag})",
        flow_run_id=flow_run_id,
    )

    emit(api, TollwatchEvent.of(failure))

    [alert] = inbox.wait_for("/alerts", match=_alert(tag))
    assert alert.json_body == {
        "subject": "tollwatch: ingest failed (window)",
        "body": f"UpstreamError: socrata answered 503 ({tag}) (flow run {flow_run_id})",
    }


@pytest.mark.timeout(180)
def test_freshness_sla_fires_when_no_refresh_arrives(client, inbox, tmp_path):
    """The shipped proactive trigger, with `within` cut to the minimum Prefect accepts for a proactive trigger
    (10 s: EventTrigger.enforce_minimum_within_for_proactive_triggers)."""
    sla = yaml.safe_load((SHIPPED / "freshness-sla.yaml").read_text())
    sla["trigger"]["within"] = 10
    sla["actions"][0]["subject"] = subject = f"freshness test {uuid.uuid4().hex[:8]}"
    directory = tmp_path / "automations"
    write(directory, "freshness-sla.yaml", sla)
    started = time.monotonic()
    assert cli_apply(directory).exit_code == 0

    [alert, *_] = inbox.wait_for("/alerts", match=_alert(subject), timeout_s=90)

    print(f"freshness SLA (within=10s) fired {time.monotonic() - started:.1f}s after the apply")
    assert alert.json_body["body"].startswith("No tollwatch.dataset.refreshed event matched socrata.*")


def test_run_databricks_job_subscription_starts_run_job_with_the_job_id(api, client, server, tmp_path):
    tag = uuid.uuid4().hex[:8]
    directory = tmp_path / "automations"
    write(directory, "subscriptions/finance.yaml", DATABRICKS_SUBSCRIPTION)
    assert cli_apply(directory).exit_code == 0
    payload = completed(f"dbx-{tag}")

    emit(api, TollwatchEvent.of(payload))

    [run] = runs_of_deployment(api, server["run-job/run-job"], f"dbx-{tag}")
    assert run["parameters"]["databricks_job_id"] == 987
    assert run["parameters"]["job"] == "987"
    assert run["parameters"]["parameters"] == {"rows": payload.rows_written}


def _action_failed_on(api: str, event_id: uuid.UUID, automation: str) -> list[dict[str, Any]]:
    def about(event: dict[str, Any]) -> bool:
        related = {r["prefect.resource.id"] for r in event["related"]}
        return f"prefect.event.{event_id}" in related and event["resource"].get("prefect.resource.name") == automation

    return wait_for_events(api, "prefect.automation.action.failed", about, timeout_s=30)


@pytest.mark.timeout(180)
def test_repair_refresh_reruns_only_the_refresh_whose_completion_never_came(
    api, client, server, inbox, tmp_path, monkeypatch
):
    """The shipped repair automation on the server's own services, with Prefect's minimum time (10 s).

    Three refreshes are announced at once: one completes in time (nothing happens), one never completes (a run
    of ingest/ingest with the announcement's parameters, JSON types kept, and a notification naming it), and one
    whose completion arrives after the time (dated 11 s ahead, so deterministically before Prefect's periodic
    evaluation): Prefect fires the trigger on the completion itself, the run's parameters cannot be rendered from
    a completion's payload, so no run is created (the action fails) and the notification says it completed late.
    """
    monkeypatch.setenv("TOLLWATCH_REPAIR_REFRESH_AFTER_S", "10")
    directory = tmp_path / "automations"
    directory.mkdir()
    shutil.copy(SHIPPED / "repair-refresh.yaml", directory)
    assert cli_apply(directory).exit_code == 0
    domain = f"repair-{uuid.uuid4().hex[:8]}.example"  # refresh ids of this test only
    now = datetime.now(UTC)

    def refresh(rows_updated_at: int) -> DatasetRefreshed:
        return DatasetRefreshed(
            domain=domain, dataset_id="qzve-kjga", rows_updated_at=rows_updated_at, previous_rows_updated_at=100
        )

    in_time, missing, late = refresh(201), refresh(202), refresh(203)
    late_completion = TollwatchEvent.of(completed(late.refresh_id), occurred=now + timedelta(seconds=11))
    emit(api, *(TollwatchEvent.of(r) for r in (in_time, missing, late)))
    # Prefect's trigger service evaluates events on two concurrent consumers: a completion sent right behind its
    # announcement could be evaluated first and not count. A real completion comes seconds later (a run); here
    # the announcements are stored (so also evaluated) first.
    wait_for_events(
        api, "tollwatch.dataset.refreshed", lambda e: domain in e["resource"]["prefect.resource.id"], count=3
    )
    emit(api, TollwatchEvent.of(completed(in_time.refresh_id)), late_completion)

    def ours(run: dict[str, Any]) -> bool:
        return run["parameters"].get("rows_updated_at") in (201, 202, 203)

    [alert, *_] = inbox.wait_for("/alerts", match=_alert(missing.refresh_id), timeout_s=60)
    assert (
        alert.json_body["subject"] == f"tollwatch: refresh {missing.refresh_id} did not complete; ingest started again"
    )
    assert "(rowsUpdatedAt 202, previous 100," in alert.json_body["body"]
    assert "within 0:00:10" in alert.json_body["body"]
    [late_alert, *_] = inbox.wait_for("/alerts", match=_alert(late.refresh_id), timeout_s=30)
    assert late_alert.json_body["subject"] == f"tollwatch: refresh {late.refresh_id} completed late"
    assert _action_failed_on(api, late_completion.id, "tollwatch-repair-refresh")
    time.sleep(GRACE_S)

    def repair_runs() -> list[dict[str, Any]]:
        """Runs the repair created (a deployment of prefect.yaml on this server would add runs of its own)."""
        with connect() as observer:
            return [
                r["parameters"]
                for r in read_runs(api, deployment_id=server["ingest/ingest"])
                if r["parameters"].get("rows_updated_at") in (201, 202, 203)
                and (action := observer.action_starting(uuid.UUID(r["id"]))) is not None
                and action.automation == "tollwatch-repair-refresh"
            ]

    deadline = time.monotonic() + 30
    while not (runs := repair_runs()) and time.monotonic() < deadline:
        time.sleep(0.5)
    # On SQLite a firing can be acted on twice (the bucket's delete after acting hits "database is locked" and the
    # event is evaluated again): every run and alert is then the same one again, never another refresh's.
    assert runs
    assert all(r == {"rows_updated_at": 202, "previous_rows_updated_at": 100} for r in runs), runs
    assert inbox.received("/alerts", match=_alert(in_time.refresh_id)) == []
    alerts = {r.refresh_id: len(inbox.received("/alerts", match=_alert(r.refresh_id))) for r in (missing, late)}
    print(f"repair runs: {len(runs)}; alerts: {alerts[missing.refresh_id]} (missing), {alerts[late.refresh_id]} (late)")
