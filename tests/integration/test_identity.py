"""Secretless in production: Storage, Event Grid publishing and Databricks authenticate as a managed identity.

What runs: a managed identity endpoint in this process (tests/support/entra.py: the App Service / Functions /
Container Apps protocol, IDENTITY_ENDPOINT + IDENTITY_HEADER, API version 2019-08-01), with azure-identity's
`DefaultAzureCredential` narrowed to that one credential (AZURE_TOKEN_CREDENTIALS=ManagedIdentityCredential: no
developer login, no IMDS probe, no real metadata address). Every service checks the tokens it minted, each for its
own audience:
- Storage: Azurite over HTTPS with `--oauth basic` (audience https://storage.azure.com, issuer, lifetime); it refuses
  an anonymous request, a token for another audience and an expired one;
- Event Grid: a topic endpoint over HTTPS (audience https://eventgrid.azure.net);
- Databricks: the Jobs API double (tests/support/databricks_double.py, its drivers a stand-in spark-submit), or
  respx routes for the whole ingest flow, both accepting only unexpired tokens minted for the Azure Databricks
  resource.
No key, connection string, PAT or client secret is set anywhere: every such variable is removed first and the
environment is checked for them (`entra.secrets_in`), and the saved Databricks block holds a host only.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any

import httpx
import pytest
import respx
from azure.core.credentials import AccessToken
from azure.core.exceptions import ClientAuthenticationError, HttpResponseError
from azure.storage.blob import BlobServiceClient
from prefect import flow
from prefect_databricks.jobs import jobs_runs_get, jobs_runs_submit
from prefect_databricks.models.jobs import RunSubmitTaskSettings

from tests.support import entra
from tests.support.databricks_api import API, RUN_PAGE, WHEEL
from tests.support.databricks_api import HOST as WORKSPACE
from tests.support.databricks_double import DatabricksJobsDouble, TlsFiles, make_tls
from tests.support.funcapp import tick
from tests.support.payloads import completion
from tollwatch import resources
from tollwatch.adapters.databricks_jobs import ComputeSpec, MergeJobArgs
from tollwatch.adapters.eventgrid_out import PublishError
from tollwatch.contract.events import TollwatchEvent
from tollwatch.contract.settings import load_settings
from tollwatch.prefect.blocks import AzureStorageLocation, DatabricksCompute, DatabricksIdentity, SparkIcebergCatalog
from tollwatch.prefect.databricks_runner import DatabricksRunner, workspace_auth
from tollwatch.resources import Resources

pytestmark = pytest.mark.stack

IDENTITY_SLUG = DatabricksIdentity.get_block_type_slug()
EXISTING_CLUSTER = "0101-000000-identity"
#: A driver for the double's "clusters": prints the result line a merge prints (no JVM: this module is about auth).
FAKE_SPARK_SUBMIT = f"""#!{sys.executable}
print('TOLLWATCH_RESULT={{"table": "tollwatch.bronze.bnt_traffic_hourly", "mode": "window", "refresh_id": "r-1", '
      '"rows_written": 3}}', flush=True)
"""
JOB = {
    "name": "tollwatch daily totals",
    "tasks": [
        {
            "task_key": "daily_totals",
            "existing_cluster_id": EXISTING_CLUSTER,
            "python_wheel_task": {"package_name": "tollwatch", "entry_point": "tollwatch-daily-totals"},
        }
    ],
}
MERGE_TASK = RunSubmitTaskSettings.model_validate(
    {
        "task_key": "merge",
        "existing_cluster_id": EXISTING_CLUSTER,
        "python_wheel_task": {"package_name": "tollwatch", "entry_point": "tollwatch-merge"},
    }
)
ARGS = MergeJobArgs(
    landing="abfss://tollwatch@tollwatchdata.dfs.core.windows.net/raw/qzve-kjga/window=2024-01-01_2024-01-02/",
    table="tollwatch.bronze.bnt_traffic_hourly",
    mode="window",
    refresh_id="r-1",
    start=date(2024, 1, 1),
    stop=date(2024, 1, 2),
    flow_run_id="fr-identity",
)


class StaticToken:
    """A credential that always presents one token (to show what the services refuse)."""

    def __init__(self, token: str) -> None:
        self.token = token

    def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        return AccessToken(self.token, int(time.time()) + 3600)


def token_for(audience: str, *, expired: bool = False) -> str:
    """A token the identity endpoint never issued, shaped like one: for the refusal checks."""
    now = int(time.time()) - (7200 if expired else 0)
    return entra.jwt({"aud": audience, "iss": entra.ISSUER, "iat": now, "nbf": now, "exp": now + 3600})


def in_flow(fn: Any) -> Any:
    """Prefect tasks report to the (real) server from inside a flow run, as in production."""
    return flow(name="identity-test", validate_parameters=False)(fn)()


def save_block(block: Any, prefix: str) -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    block.save(name, overwrite=True)
    return name


# ------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture
def tls(tmp_path: Path) -> TlsFiles:
    """A throwaway CA and a certificate for 127.0.0.1 (Azurite's and the topic's), trusted by the Azure SDK's
    transport (requests reads REQUESTS_CA_BUNDLE: certifi's CAs plus this one)."""
    directory = tmp_path / "tls"
    directory.mkdir()
    return make_tls(directory)


@pytest.fixture
def identity(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[entra.ManagedIdentityEndpoint]:
    """This process as an Azure process with a system-assigned managed identity, and no secret of any kind."""
    for name in (*entra.SECRET_VARIABLES, *entra.OTHER_IDENTITY_VARIABLES):
        monkeypatch.delenv(name, raising=False)
    with entra.ManagedIdentityEndpoint() as endpoint:
        for key, value in endpoint.env().items():
            monkeypatch.setenv(key, value)
        yield endpoint


@pytest.fixture
def azurite(tmp_path: Path, tls: TlsFiles, identity: entra.ManagedIdentityEndpoint, monkeypatch) -> Iterator[str]:
    """Azurite over HTTPS with OAuth, as TOLLWATCH_STORAGE_ACCOUNT_URL (no connection string)."""
    with entra.OAuthAzurite(tmp_path / "azurite", tls) as running:
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tls.bundle))
        monkeypatch.setenv("TOLLWATCH_STORAGE_ACCOUNT_URL", running.account_url)
        yield running.account_url


@pytest.fixture
def topic(tls: TlsFiles, identity: entra.ManagedIdentityEndpoint, monkeypatch) -> Iterator[entra.EventGridTopic]:
    """An Event Grid topic over HTTPS, as TOLLWATCH_EVENTGRID_TOPIC_ENDPOINT (no topic key)."""
    with entra.EventGridTopic(tls, identity.accepts(entra.EVENT_GRID)) as running:
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tls.bundle))
        monkeypatch.setenv("TOLLWATCH_EVENTGRID_TOPIC_ENDPOINT", f"{running.url}/api/events")
        yield running


@pytest.fixture
def workspace(
    identity: entra.ManagedIdentityEndpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[DatabricksJobsDouble]:
    """The Jobs API double, accepting only Entra ID tokens minted for the Azure Databricks resource; its drivers a
    stand-in spark-submit."""
    driver = tmp_path / "spark-submit"
    driver.write_text(FAKE_SPARK_SUBMIT)
    driver.chmod(0o755)
    with DatabricksJobsDouble(
        jars=[], conf={}, jobs={"daily": JOB}, token=identity.accepts(entra.DATABRICKS), spark_submit=str(driver)
    ) as running:
        for key, value in running.client_env().items():
            monkeypatch.setenv(key, value)
        name = save_block(DatabricksIdentity(databricks_instance=running.host), "identity")
        monkeypatch.setenv("TOLLWATCH_DATABRICKS_CREDENTIALS_BLOCK", f"{IDENTITY_SLUG}/{name}")
        yield running


# ---------------------------------------------------------------------------------------------------- storage


def test_the_functions_state_blobs_are_written_with_the_identitys_storage_token(
    app, azurite: str, identity: entra.ManagedIdentityEndpoint, mirror, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("TOLLWATCH_UPSTREAM_DOMAIN", f"t{uuid.uuid4().hex[:12]}.test")
    settings = load_settings()
    assert settings.storage_connection_string is None
    assert entra.secrets_in(os.environ) == []
    resources.blob_service(settings).create_container(settings.storage_container)
    identity.issued.clear()  # count the handlers' tokens only

    tick(app)  # the timer handler: reads the upstream, emits, writes the watermark blob
    mirror.dataset.publish(days=1)
    tick(app)

    # the handlers build their clients per invocation: one token per invocation, for storage only
    assert len(identity.issued_for(entra.STORAGE)) == 2, identity.issued
    assert {entra.claims_of(t.token)["aud"] for t in identity.issued} == {"https://storage.azure.com"}
    assert identity.refused == []
    stored = resources.watermark_store(settings).read().value
    assert stored.rows_updated_at == mirror.dataset.rows_updated_at

    # Azurite checks the bearer: no token, another audience's, an expired one are all refused
    container = settings.storage_container
    with pytest.raises(HttpResponseError, match="failed to authenticate"):
        BlobServiceClient(azurite).get_container_client(container).upload_blob("anonymous.json", b"{}")
    for token in (token_for(entra.EVENT_GRID), token_for(entra.STORAGE, expired=True)):
        other = BlobServiceClient(azurite, credential=StaticToken(token))
        with pytest.raises(ClientAuthenticationError, match="failed to authenticate"):
            other.get_container_client(container).upload_blob("other.json", b"{}")


# -------------------------------------------------------------------------------------------------- Event Grid


def test_a_completion_is_published_to_the_topic_with_the_identitys_event_grid_token(
    topic: entra.EventGridTopic, identity: entra.ManagedIdentityEndpoint
):
    settings = load_settings()
    assert settings.eventgrid_topic_key is None
    assert entra.secrets_in(os.environ) == []
    event = TollwatchEvent.of(completion())

    with Resources(settings) as res:
        publisher = res.completion_publisher
        assert publisher is not None
        publisher.publish(event)
        publisher.publish(TollwatchEvent.of(completion(refresh_id="r-2")))

    [token] = identity.issued_for(entra.EVENT_GRID)  # one token for both publishes
    assert [r.headers["authorization"] for r in topic.requests] == [f"Bearer {token.token}"] * 2
    first = topic.requests[0]
    assert first.path == "/api/events?api-version=2018-01-01"
    assert first.headers["content-type"].startswith("application/cloudevents-batch+json")
    assert "aeg-sas-key" not in first.headers
    [cloud] = first.json()
    assert (cloud["id"], cloud["type"], cloud["specversion"]) == (str(event.id), "tollwatch.ingestion.completed", "1.0")
    assert cloud["data"] == event.payload

    # the topic checks the bearer: a token for storage is refused, and the publisher says so without the token
    wrong = token_for(entra.STORAGE)
    client = resources.completion_publisher(settings, StaticToken(wrong))
    assert client is not None
    with pytest.raises(PublishError) as refused:
        client.publish(event)
    assert "401" in str(refused.value) or "Unauthorized" in str(refused.value)
    assert wrong not in str(refused.value)


# -------------------------------------------------------------------------------------------------- Databricks


def test_databricks_calls_carry_the_identitys_token_fetched_once_and_again_when_it_nears_expiry(
    workspace: DatabricksJobsDouble, identity: entra.ManagedIdentityEndpoint
):
    """Token A lives 5 min + 5 s: cached for the first calls, then due for refresh 5 s after it was minted (MSAL
    refreshes a managed identity token within 5 min of expiry). Token B (an hour) then serves a whole merge and a
    job run: two token requests for every call of both."""
    identity.mint_next(305)
    with Resources(load_settings()) as res:
        auth = workspace_auth(res)
        assert isinstance(auth, DatabricksIdentity)

        async def three_calls() -> None:
            submitted = await jobs_runs_submit.fn(databricks_credentials=auth, tasks=[MERGE_TASK], run_name="early")
            for _ in range(2):
                await jobs_runs_get.fn(run_id=submitted["run_id"], databricks_credentials=auth)

        asyncio.run(three_calls())
        [first] = identity.issued_for(entra.DATABRICKS)
        time.sleep(max(0.0, first.refresh_due - time.time()) + 1.5)  # into the refresh window (not yet expired)

        runner = DatabricksRunner(auth, backoff_s=0.01, poll_s=0.2, max_wait_s=120)
        compute = ComputeSpec(kind="existing_cluster", existing_cluster_id=EXISTING_CLUSTER)
        outcome, printed = in_flow(lambda: runner.merge(compute, WHEEL, ARGS, run_name="merge", token="identity-merge"))
        job = in_flow(lambda: runner.run_now(workspace.job_id("daily"), {}, token="identity-job"))

    assert outcome.succeeded
    assert job.succeeded
    assert printed is not None
    assert printed.rows_written == 3
    first, second = identity.issued_for(entra.DATABRICKS)
    assert (first.client_id, second.client_id) == (None, None)  # the system-assigned identity
    sent = [call.authorization for call in workspace.calls]
    assert sent[:3] == [f"Bearer {first.token}"] * 3
    assert sent[3:] == [f"Bearer {second.token}"] * (len(sent) - 3)
    assert len(sent) - 3 >= 5  # submit, polls, output, run-now, polls: one token for all of them
    assert {call.status for call in workspace.calls} == {200}
    assert len(identity.issued) == 2
    print(f"Databricks: {len(sent)} Jobs API calls, {len(identity.issued)} token requests")

    # the workspace checks the bearer: a storage token, or one not minted by the identity, is refused
    for token in (token_for(entra.DATABRICKS), identity_token(identity, entra.STORAGE)):
        answer = httpx.get(
            f"{workspace.url}/api/2.1/jobs/runs/get?run_id=1", headers={"Authorization": f"Bearer {token}"}
        )
        assert answer.status_code == 403


def identity_token(identity: entra.ManagedIdentityEndpoint, resource: str) -> str:
    """A real token of the identity, for another resource."""
    with resources.azure_credential() as credential:
        return str(credential.get_token(f"{resource}/.default").token)


def test_a_user_assigned_identity_is_asked_for_by_its_client_id(
    workspace: DatabricksJobsDouble, identity: entra.ManagedIdentityEndpoint
):
    name = save_block(
        DatabricksIdentity(databricks_instance=workspace.host, managed_identity_client_id="placeholder-uami-client-id"),
        "uami",
    )
    settings = load_settings(databricks_credentials_block=f"{IDENTITY_SLUG}/{name}")
    with Resources(settings) as res:
        auth = workspace_auth(res)
        submitted = asyncio.run(jobs_runs_submit.fn(databricks_credentials=auth, tasks=[MERGE_TASK], run_name="uami"))

    assert submitted["run_id"] in workspace.runs
    [issued] = identity.issued_for(entra.DATABRICKS)
    assert issued.client_id == "placeholder-uami-client-id"  # not the process's (system-assigned) identity
    assert entra.claims_of(issued.token)["appid"] == "placeholder-uami-client-id"
    assert workspace.calls[-1].authorization == f"Bearer {issued.token}"


# ------------------------------------------------------------------------------------------------- end to end


def test_ingest_on_databricks_runs_with_no_secret_anywhere(
    azurite: str, topic: entra.EventGridTopic, identity: entra.ManagedIdentityEndpoint, monkeypatch
):
    """The ingest flow with TOLLWATCH_ENGINE=databricks: the landing written to Azurite with a storage token, the
    merge submitted with a Databricks token, the completion published with an Event Grid token — one token per
    resource for the whole run (one credential per process) — and no secret in the environment or the blocks."""
    from prefect.client.orchestration import get_client

    from tests.support.prefect_events import wait_for_events
    from tollwatch.prefect.flows.ingest import ingest

    blocks = {
        "CREDENTIALS": f"{IDENTITY_SLUG}/" + save_block(DatabricksIdentity(databricks_instance=WORKSPACE), "identity"),
        "COMPUTE": save_block(DatabricksCompute(kind="existing_cluster", existing_cluster_id=EXISTING_CLUSTER), "c"),
        "STORAGE": save_block(AzureStorageLocation(account="tollwatchdata", container="tollwatch"), "s"),
        "CATALOG": save_block(
            SparkIcebergCatalog(kind="hadoop", warehouse="abfss://lake@tollwatchdata.dfs.core.windows.net/wh"), "k"
        ),
    }
    for kind, name in blocks.items():
        monkeypatch.setenv(f"TOLLWATCH_DATABRICKS_{kind}_BLOCK", name)
    for key, value in {
        "TOLLWATCH_ENGINE": "databricks",
        "TOLLWATCH_DATABRICKS_POLL_S": "0",
        "TOLLWATCH_DATABRICKS_WHEEL": WHEEL,
    }.items():
        monkeypatch.setenv(key, value)
    settings = load_settings()
    resources.blob_service(settings).create_container(settings.storage_container)
    identity.issued.clear()  # count the flow run's tokens only
    accepted = identity.accepts(entra.DATABRICKS)

    def checked(answer: httpx.Response) -> Any:
        def respond(request: httpx.Request) -> httpx.Response:
            return answer if accepted(entra.bearer(request.headers) or "") else httpx.Response(403, json={})

        return respond

    printed = {"table": ARGS.table, "mode": "window", "refresh_id": "x", "rows_read": 528, "rows_written": 528}
    with respx.mock(assert_all_called=False) as api:
        api.route(host="127.0.0.1").pass_through()  # the Prefect server and the mirror
        submit = api.post(f"{API}/runs/submit").mock(side_effect=checked(httpx.Response(200, json={"run_id": 42})))
        state = {"life_cycle_state": "TERMINATED", "result_state": "SUCCESS"}
        run = {"run_id": 42, "run_page_url": RUN_PAGE, "state": state, "tasks": [{"run_id": 43, "task_key": "merge"}]}
        get = api.get(f"{API}/runs/get").mock(side_effect=checked(httpx.Response(200, json=run)))
        logs = "TOLLWATCH_RESULT=" + json.dumps(printed) + "\n"
        output = api.get(f"{API}/runs/get-output").mock(side_effect=checked(httpx.Response(200, json={"logs": logs})))

        completed = ingest(start=date(2024, 1, 1), stop=date(2024, 1, 2), request_id="secretless")

    assert completed.run_page_url == RUN_PAGE
    assert completed.rows_written == 528
    # one token per resource for the whole run
    by_resource = {resource: len(identity.issued_for(resource)) for resource in (entra.STORAGE, entra.DATABRICKS)}
    assert by_resource | {entra.EVENT_GRID: len(identity.issued_for(entra.EVENT_GRID))} == {
        entra.STORAGE: 1,
        entra.DATABRICKS: 1,
        entra.EVENT_GRID: 1,
    }, identity.issued
    [storage_token] = identity.issued_for(entra.STORAGE)
    [databricks_token] = identity.issued_for(entra.DATABRICKS)
    [event_grid_token] = identity.issued_for(entra.EVENT_GRID)
    # the landing is in the OAuth Azurite, written with the storage token (Azurite accepts nothing else)
    landed = [
        b.name for b in resources.blob_service(settings).get_container_client(settings.storage_container).list_blobs()
    ]
    assert any(name.endswith("manifest.json") for name in landed), landed
    # every Jobs API call carried the Databricks token
    calls = [*submit.calls, *get.calls, *output.calls]
    assert {call.request.headers["Authorization"] for call in calls} == {f"Bearer {databricks_token.token}"}
    assert len(calls) >= 3
    # the completion reached the topic with the Event Grid token
    [published] = topic.requests
    assert published.headers["authorization"] == f"Bearer {event_grid_token.token}"
    assert published.json()[0]["data"]["refresh_id"] == completed.refresh_id
    # and Prefect's copy of the event holds no token
    [event] = wait_for_events(
        os.environ["PREFECT_API_URL"],
        "tollwatch.ingestion.completed",
        lambda e: e["payload"]["refresh_id"] == completed.refresh_id,
    )
    assert not {storage_token.token, databricks_token.token, event_grid_token.token} & set(json.dumps(event).split('"'))

    # nothing secret anywhere: the environment, and the blocks the run loaded
    assert entra.secrets_in(os.environ) == []
    with get_client(sync_client=True) as client:
        stored = client.read_block_document_by_name(blocks["CREDENTIALS"].split("/")[1], IDENTITY_SLUG)
    assert set(stored.data) == {"databricks_instance", "managed_identity_client_id"}
    assert stored.data["managed_identity_client_id"] is None
    for block in (DatabricksIdentity, DatabricksCompute, AzureStorageLocation, SparkIcebergCatalog):
        assert block.model_json_schema()["secret_fields"] == [], block
