"""Prove nothing leaks (issue 17, part 5): the whole chain runs with a marker as every secret, then every place a
value could end up is searched for them.

The secrets: the Function app's key and both Event Grid shared secrets (the chain starts with a BlobCreated delivery
through the Function app's webhook on the dev host, key and secret in the query string and headers, as Event Grid
sends them), the Socrata app token (every upstream request of the ingest carries it), the storage account key
(Azurite's, in every connection string), the Prefect API key (set, though the local server takes basic auth), the
local server's basic-auth string, and the Databricks token (the double accepts only it; the merge runs there, and
the team's daily-totals job after it).

Searched: every log file of the stack (server, worker, warm server, Azurite, mirror, inbox, PostgreSQL), what the
inbox received, the warehouse (Iceberg metadata and data files), `stack.json` (which names the secrets' files);
every event, artifact, flow run (parameters, state messages), task run, flow-run log, deployment (job variables),
block document, variable and automation on the Prefect server; every blob in Azurite; the output of every CLI
command the test ran; this process's log records while the Function app answered; the Databricks runs' driver logs.
Not searched, on purpose: the owner-only files the stack keeps its secrets in (`prefect-auth`, `azurite-key`,
`storage-connection-string`) and the processes' environments (where secrets are given).
"""

from __future__ import annotations

import http.client
import io
import json
import logging
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime
from pathlib import Path
from urllib.parse import urlencode, urlsplit

import pytest
from typer.testing import CliRunner

from tests.support.databricks_double import DatabricksJobsDouble, bundle_jobs, save_workspace_blocks
from tests.support.funcapp import SAMPLE_CONTAINER, SAMPLE_TOPIC, blob_created, body
from tests.support.leaks import LeakScan
from tests.support.stacks import deployed_stack
from tollwatch import resources
from tollwatch.adapters.spark_submit import catalog_conf, find_jars
from tollwatch.contract.settings import load_settings
from tollwatch_dev.stack import LocalStack, StackEndpoints, basic_auth

pytestmark = [pytest.mark.stack, pytest.mark.spark]

ROOT = Path(__file__).resolve().parents[2]

#: One distinctive value per secret (≥ 12 characters, so a match cannot be an accident).
MARKERS = {
    "function key": "fnkey-LEAKMARK-4b1f0c77e2a9",
    "Event Grid secret (current)": "egsec-LEAKMARK-current-91ad",
    "Event Grid secret (next)": "egsec-LEAKMARK-next-5c3e0f77",
    "Socrata app token": "apptok-LEAKMARK-0e7d2b19c4",
    "Prefect API key": "pnu_LEAKMARK0123456789abcdefABCDEF",
    "Databricks token": "dapi-LEAKMARK-6f2a8c0d3e51",
}

ENV = {
    "TOLLWATCH_ENGINE": "databricks",
    "TOLLWATCH_DATABRICKS_POLL_S": "1",
    "TOLLWATCH_UPSTREAM_MAX_ATTEMPTS": "2",
    "TOLLWATCH_UPSTREAM_BACKOFF_MAX_S": "0.2",
    "TOLLWATCH_TASK_RETRIES": "0",
    "TOLLWATCH_FUNCTION_KEY": MARKERS["function key"],
    "TOLLWATCH_EVENTGRID_SECRETS": f"{MARKERS['Event Grid secret (current)']},{MARKERS['Event Grid secret (next)']}",
    "TOLLWATCH_EVENTGRID_SOURCE_TOPICS": SAMPLE_TOPIC,
    "TOLLWATCH_EVENTGRID_CONTAINER": SAMPLE_CONTAINER,
    "TOLLWATCH_UPSTREAM_APP_TOKEN": MARKERS["Socrata app token"],
    "TOLLWATCH_PREFECT_API_KEY": MARKERS["Prefect API key"],
}

SUBSCRIPTION = """\
team: finance
subscriptions:
  - name: daily-totals-on-databricks
    description: Daily totals by the bundle's Spark job after each new load
    when: {{already_committed: false}}
    action:
      type: run-databricks-job
      job_id: {job_id}
"""


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[StackEndpoints, DatabricksJobsDouble, list]]:
    """A stack of the module's own, deployed with every secret set to its marker, the double accepting only the
    Databricks marker, and the finance team's subscription applied. Yields the CLI outputs seen so far too."""
    from tollwatch.cli.main import app

    state = tmp_path_factory.mktemp("leaks")
    local = LocalStack(state, prefect_ui=False, mirror_start=date(2024, 1, 1), mirror_through=date(2024, 2, 1))
    warehouse = load_settings(warehouse_dir=state / "warehouse")
    resources.table_store(warehouse)
    conf = catalog_conf(warehouse.catalog_name, warehouse.resolved_catalog_properties())
    jobs = bundle_jobs(tmp_path_factory.mktemp("bundle"))
    double = DatabricksJobsDouble(
        jars=find_jars(ROOT / ".jars"), conf=conf, jobs=jobs, pending_s=1.0, token=MARKERS["Databricks token"]
    )
    with double, deployed_stack(local, {**ENV, **double.client_env()}) as endpoints:
        double.mount_storage(endpoints.blob_connection_string)
        save_workspace_blocks(double, load_settings().storage_container, token=MARKERS["Databricks token"])
        automations = state / "automations"
        (automations / "subscriptions").mkdir(parents=True)
        (automations / "subscriptions" / "finance.yaml").write_text(
            SUBSCRIPTION.format(job_id=double.job_id("tollwatch_daily_totals"))
        )
        applied = CliRunner().invoke(app, ["automations", "apply", "--dir", str(automations)])
        assert applied.exit_code == 0, applied.output
        yield endpoints, double, [("automations apply", applied.output)]


class _Post:
    """Requests to the dev host with the standard library (which logs nothing), as Event Grid would send them."""

    def __init__(self, base_url: str) -> None:
        parts = urlsplit(base_url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80

    def __call__(
        self, method: str, path: str, body: bytes = b"", *, query: dict | None = None, headers: dict | None = None
    ) -> tuple[int, bytes]:
        connection = http.client.HTTPConnection(self.host, self.port, timeout=60)
        try:
            target = f"{path}?{urlencode(query)}" if query else path
            connection.request(
                method, target, body=body, headers={"content-type": "application/json", **(headers or {})}
            )
            answer = connection.getresponse()
            return answer.status, answer.read()
        finally:
            connection.close()


@pytest.mark.timeout(900)
def test_no_secret_reaches_a_log_event_artifact_parameter_blob_or_cli_output(chain, app):
    from tollwatch.cli.main import app as cli
    from tollwatch_dev.demo import publish_week, wait_for_chain
    from tollwatch_dev.funchost import FunctionHost

    endpoints, double, cli_outputs = chain
    key, current, following = (
        MARKERS["function key"],
        MARKERS["Event Grid secret (current)"],
        MARKERS["Event Grid secret (next)"],
    )
    records = io.StringIO()
    handler = logging.StreamHandler(records)
    handler.setLevel(logging.DEBUG)
    root = logging.getLogger()
    previous_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        publish_week(endpoints.mirror_url)
        with FunctionHost(app, function_key=key) as host:
            post = _Post(host.url)
            # Event Grid's handshakes, the key and secret in the query as a subscription URL carries them
            options = post(
                "OPTIONS",
                "/api/eventgrid",
                query={"code": key, "secret": following},
                headers={"WebHook-Request-Origin": "eventgrid.azure.net"},
            )
            assert options[0] == 200, options
            # refusals: a wrong key, a wrong secret, a bad backfill body (their answers and logs are searched too)
            assert post("POST", "/api/eventgrid", b"[]", query={"code": "not-the-key-at-all"})[0] == 401
            wrong = post("POST", "/api/eventgrid", b"[]", headers={"x-functions-key": key, "x-tollwatch-secret": "no"})
            assert wrong[0] == 401, wrong
            assert post("POST", "/api/backfill", b'{"start": "x"}', query={"code": key})[0] == 400
            # the publish, delivered as Event Grid delivers a BlobCreated: it starts the chain
            event = blob_created(
                eTag=f"0x{uuid.uuid4().hex[:16].upper()}", sequencer=f"{time.time_ns():032x}", id=str(uuid.uuid4())
            )
            event["eventTime"] = datetime.now(UTC).isoformat()
            status, answer = post(
                "POST", "/api/eventgrid", body([event]), headers={"x-functions-key": key, "x-tollwatch-secret": current}
            )
            assert status == 200, answer
        (emitted,) = json.loads(answer)["emitted"]
        trace = wait_for_chain(uuid.UUID(emitted["event_id"]), 900, lambda _: None)
        text = trace.render()
        assert "tollwatch.ingestion.completed" in text, text
        assert "tollwatch.job.completed" in text, text
        for command in (
            ["trace", emitted["event_id"], "--no-local-stack"],
            ["status", "--no-local-stack"],
            ["stack", "status", "--state-dir", str(endpoints.state_dir)],
        ):
            ran = CliRunner().invoke(cli, command)
            assert ran.exit_code == 0, ran.output
            cli_outputs.append((" ".join(command[:1]), ran.output))
    finally:
        root.removeHandler(handler)
        root.setLevel(previous_level)

    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()  # this process's flow-run logs reach the server before it is searched
    time.sleep(2)  # the server persists events and logs asynchronously (flush interval 1 s)
    markers = {
        **MARKERS,
        "storage account key": (endpoints.state_dir / "azurite-key").read_text().strip(),
        "Prefect server basic auth": endpoints.prefect_auth_string,
    }
    scan = LeakScan(markers)
    state = endpoints.state_dir
    scan.files(state / "logs")
    for name in ("inbox", "warehouse"):
        if (state / name).exists():
            scan.files(state / name, kind=name)
    scan.bytes("stack.json", (state / "stack.json").read_bytes(), kind="stack.json")
    scan.prefect(endpoints.prefect_api_url, basic_auth(endpoints.prefect_auth_string))
    scan.blobs(endpoints.blob_connection_string)
    for command, output in cli_outputs:
        scan.text(f"`tollwatch {command}` output", output, kind="CLI output")
    scan.text("this process's log records", records.getvalue(), kind="process log")
    for run in double.runs.values():  # what the workspace was sent and what its drivers printed
        for task in run.tasks:
            seen = [*task.parameters, *task.stdout, *task.stderr, task.error or "", task.error_trace or ""]
            scan.text(f"Databricks run {run.run_id} task {task.task_key}", "\n".join(seen), kind="Databricks task")
        scan.text(f"Databricks run {run.run_id} job parameters", json.dumps(run.job_parameters), kind="Databricks task")

    print(f"\nsecret scan: {len(markers)} secrets, searched {dict(sorted(scan.coverage.items()))}")
    assert scan.found == []
    # the scan searched what the chain left, not an empty stack
    for kind, at_least in {"event": 8, "flow_runs": 2, "logs": 10, "artifacts": 1, "blob": 3, "log file": 5}.items():
        assert scan.coverage[kind] >= at_least, (kind, scan.coverage)
    assert scan.coverage["CLI output"] == 4
