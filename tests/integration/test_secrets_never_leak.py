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
from datetime import UTC, datetime
from urllib.parse import urlencode, urlsplit

import pytest
from typer.testing import CliRunner

from tests.support.databricks_chain import databricks_chain
from tests.support.databricks_double import DatabricksJobsDouble
from tests.support.funcapp import SAMPLE_CONTAINER, SAMPLE_TOPIC, blob_created, body
from tests.support.leaks import LeakScan
from tests.support.warm_driver import WarmClusters
from tollwatch_dev.stack import StackEndpoints, basic_auth

pytestmark = [pytest.mark.stack, pytest.mark.spark]

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
    "TOLLWATCH_FUNCTION_KEY": MARKERS["function key"],
    "TOLLWATCH_EVENTGRID_SECRETS": f"{MARKERS['Event Grid secret (current)']},{MARKERS['Event Grid secret (next)']}",
    "TOLLWATCH_EVENTGRID_SOURCE_TOPICS": SAMPLE_TOPIC,
    "TOLLWATCH_EVENTGRID_CONTAINER": SAMPLE_CONTAINER,
    "TOLLWATCH_UPSTREAM_APP_TOKEN": MARKERS["Socrata app token"],
    "TOLLWATCH_PREFECT_API_KEY": MARKERS["Prefect API key"],
}


@pytest.fixture(scope="module")
def chain(
    tmp_path_factory: pytest.TempPathFactory, warm_clusters: WarmClusters
) -> Iterator[tuple[StackEndpoints, DatabricksJobsDouble, list[tuple[str, str]]]]:
    """The Databricks chain (tests/support/databricks_chain.py) with every secret set to its marker and the double
    accepting only the Databricks marker. Yields the CLI outputs seen so far too."""
    state, bundle = tmp_path_factory.mktemp("leaks"), tmp_path_factory.mktemp("bundle")
    with databricks_chain(state, bundle, warm_clusters, ENV, token=MARKERS["Databricks token"]) as ready:
        yield ready.endpoints, ready.double, [("automations apply", ready.applied)]


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
