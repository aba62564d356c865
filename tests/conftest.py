"""Fixtures shared by the test layers that run on real components (tests/integration, tests/faults): the local stack
(Azurite + Prefect server on PostgreSQL, as production runs it) once per session, and a fresh in-process Socrata
mirror, blob container and Iceberg warehouse per test; the built Function app and its settings; prefect.yaml
deployed; the automations' server side; the Databricks blocks.

pytest finds these by name: a test asks for them as arguments and never imports this file (nor any other conftest or
test module; tests/unit/test_test_imports.py keeps it so). Helpers that are plain functions or constants live in
tests/support/. The unit layer (tests/unit) uses none of these fixtures; its own conftest refuses them.

Heavy imports (the stack, Prefect) happen inside the fixtures, so collecting the unit layer does not pay for them.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.support.funcapp import FUNCTION_KEY, NEXT_SECRET, SAMPLE_CONTAINER, SAMPLE_TOPIC, SECRET, FnEnv

if TYPE_CHECKING:
    import azure.functions as func
    from prefect.client.orchestration import SyncPrefectClient
    from prefect_databricks import DatabricksCredentials

    from tests.support.warm_driver import WarmClusters
    from tollwatch.core.watermark import WatermarkStore
    from tollwatch_dev.funchost import FunctionHost
    from tollwatch_dev.inbox import Inbox
    from tollwatch_dev.mirror import MirrorServer
    from tollwatch_dev.stack import StackEndpoints

_STACK_LOGS: list[Path] = []
_LOG_TAIL_LINES = 80


# ---------------------------------------------------------------------------------------------- the local stack


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackEndpoints]:
    """Azurite and a Prefect server on the stack's PostgreSQL, started by the project itself (loopback ports, a
    Unix socket for PostgreSQL)."""
    from tollwatch_dev.stack import LocalStack

    state_dir = tmp_path_factory.mktemp("stack")
    local = LocalStack(state_dir, services=("azurite", "prefect"), prefect_ui=False, db="postgres")
    _STACK_LOGS.append(state_dir / "logs")
    endpoints = local.up()
    # The server requires basic auth (tollwatch_dev.stack_secrets): every Prefect client of this process (and every
    # subprocess, through the environment) carries the session stack's string unless a test points elsewhere.
    prior_auth = os.environ.get("PREFECT_API_AUTH_STRING")
    os.environ["PREFECT_API_AUTH_STRING"] = endpoints.prefect_auth_string
    _refresh_prefect_settings()
    try:
        yield endpoints
    finally:
        from prefect.logging.handlers import APILogHandler

        APILogHandler().flush()  # send queued flow-run logs while the server is still up
        local.down()
        if prior_auth is None:
            os.environ.pop("PREFECT_API_AUTH_STRING", None)
        else:
            os.environ["PREFECT_API_AUTH_STRING"] = prior_auth
        _refresh_prefect_settings()


def _refresh_prefect_settings() -> None:
    """Prefect read its settings once, at import: make it re-read them from the environment."""
    from tollwatch.prefect.internals import refresh_settings

    refresh_settings()


@pytest.fixture
def mirror() -> Iterator[MirrorServer]:
    """A Socrata-compatible mirror serving January-March 2024 (deterministic synthetic data)."""
    from tollwatch_dev.mirror import MirrorServer

    with MirrorServer("qzve-kjga", date(2024, 1, 1), date(2024, 4, 1)) as server:
        yield server


@pytest.fixture
def env(
    stack: StackEndpoints, mirror: MirrorServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[dict[str, str]]:
    """Point tollwatch and prefect at the stack, with a container and warehouse of this test's own."""
    from prefect.settings import temporary_settings

    values = {
        "PREFECT_API_URL": stack.prefect_api_url,
        "PREFECT_API_AUTH_STRING": stack.prefect_auth_string,
        "TOLLWATCH_UPSTREAM_BASE_URL": mirror.url,
        "TOLLWATCH_STORAGE_CONNECTION_STRING": stack.blob_connection_string,
        "TOLLWATCH_STORAGE_CONTAINER": f"t-{uuid.uuid4().hex[:20]}",
        "TOLLWATCH_WAREHOUSE_DIR": str(tmp_path / "warehouse"),
        "TOLLWATCH_UPSTREAM_MAX_ATTEMPTS": "3",
        "TOLLWATCH_UPSTREAM_BACKOFF_MAX_S": "0.2",
        "TOLLWATCH_TASK_RETRIES": "0",
    }
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("TOLLWATCH_CATALOG_PROPERTIES", raising=False)
    with temporary_settings(updates=stack.prefect_settings()):
        yield values


# ---------------------------------------------------------------------------------------------- the Function app


@pytest.fixture(scope="session")
def app() -> func.FunctionApp:
    """The app exactly as the Functions host indexes it: `function_app.app`."""
    from tollwatch_dev.funchost import load_function_app

    return load_function_app()


@pytest.fixture
def fenv(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> FnEnv:
    """Settings that match Microsoft's sample payloads, on the stack.

    Every test gets its own upstream *domain* (it only names the dataset resource), so its events have their own
    resource id and deterministic ids on the shared Prefect server, and its own blob container (from `env`).
    """
    from tollwatch.contract.settings import load_settings

    domain = f"t{uuid.uuid4().hex[:12]}.test"
    values = {
        "TOLLWATCH_UPSTREAM_DOMAIN": domain,
        "TOLLWATCH_EMIT_MAX_ATTEMPTS": "2",
        "TOLLWATCH_EMIT_BACKOFF_MAX_S": "0.05",
        "TOLLWATCH_EVENTGRID_SOURCE_TOPICS": SAMPLE_TOPIC,
        "TOLLWATCH_EVENTGRID_CONTAINER": SAMPLE_CONTAINER,
        "TOLLWATCH_EVENTGRID_SECRETS": f"{SECRET},{NEXT_SECRET}",
        "TOLLWATCH_FUNCTION_KEY": FUNCTION_KEY,
    }
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    for key in ("TOLLWATCH_PREFECT_WEBHOOK_URL", "TOLLWATCH_EVENTGRID_TOPIC_ENDPOINT", "TOLLWATCH_WATCH_SCHEDULE"):
        monkeypatch.delenv(key, raising=False)
    settings = load_settings()
    resource = f"socrata.{domain}.{settings.upstream_dataset_id}"
    return FnEnv(api_url=env["PREFECT_API_URL"], domain=domain, resource_id=resource)


@pytest.fixture
def devhost(app: func.FunctionApp, fenv: FnEnv) -> Iterator[FunctionHost]:
    """The app's HTTP routes served on loopback with function-key auth, like `tollwatch functions serve`."""
    from tollwatch_dev.funchost import FunctionHost

    with FunctionHost(app, function_key=FUNCTION_KEY) as host:
        yield host


@pytest.fixture
def state(fenv: FnEnv) -> WatermarkStore:
    """The watermark store of this test's dataset (real Azurite)."""
    from tollwatch import resources

    return resources.watermark_store(fenv.settings())


# ---------------------------------------------------------------------------------------------- deployments


@pytest.fixture(scope="module")
def deployed(stack: StackEndpoints) -> Iterator[str]:
    """`tollwatch deploy --target local` against the session's server (no worker: runs stay scheduled).

    Afterwards the deployments go again, with their trigger automations: events that later modules send to the
    shared server start no runs, whatever order the modules run in.
    """
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import temporary_settings

    from tollwatch.prefect.deploy import deploy

    with temporary_settings(updates=stack.prefect_settings()):
        deployments = deploy("local")
    # read back from the server, not parsed from prefect's output: every deployment prefect.yaml declares
    assert [d.name for d in deployments] == ["ingest/ingest", "run-job/run-job"]
    assert {d.work_pool for d in deployments} == {"tollwatch-local"}
    yield stack.prefect_api_url
    with temporary_settings(updates=stack.prefect_settings()), get_client(sync_client=True) as client:
        for deployment in deployments:
            client.delete_resource_owned_automations(f"prefect.deployment.{deployment.id}")
            with contextlib.suppress(ObjectNotFound):  # a module may have removed it already
                client.delete_deployment(uuid.UUID(deployment.id))


# ---------------------------------------------------------------------------------------------- automations


@pytest.fixture(scope="module")
def inbox() -> Iterator[Inbox]:
    """A loopback HTTP inbox the dev blocks (webhooks, notifications) post to."""
    from tollwatch_dev.inbox import Inbox

    with Inbox() as box:
        yield box


@pytest.fixture(scope="module")
def api(stack: StackEndpoints) -> Iterator[str]:
    """The stack's Prefect API URL, set for this process (environment and Prefect settings) for the module."""
    from prefect.settings import temporary_settings

    with pytest.MonkeyPatch.context() as patch, temporary_settings(updates=stack.prefect_settings()):
        patch.setenv("PREFECT_API_URL", stack.prefect_api_url)
        patch.setenv("PREFECT_API_AUTH_STRING", stack.prefect_auth_string)
        yield stack.prefect_api_url


@pytest.fixture(scope="module")
def server(api: str, inbox: Inbox) -> dict[str, uuid.UUID]:
    """What the shipped automation files name: the dev blocks (posting to the inbox) and the `run-job/run-job` and
    `ingest/ingest` deployments (registered without a worker and without triggers: runs the automations create
    stay scheduled, which is all these tests look at)."""
    from prefect.client.orchestration import get_client

    from tollwatch_dev.local_blocks import ensure_local_blocks

    with get_client(sync_client=True) as client:
        ids = ensure_local_blocks(inbox.url, client)
        for name in ("run-job", "ingest"):
            flow_id = client.create_flow_from_name(name)
            ids[f"{name}/{name}"] = client.create_deployment(flow_id=flow_id, name=name)
    return ids


@pytest.fixture
def client(server: dict[str, uuid.UUID]) -> Iterator[SyncPrefectClient]:
    """A client on the stack; every test starts and ends without tollwatch automations on the server."""
    from prefect.client.orchestration import get_client

    from tests.support.automations import remove_test_automations

    with get_client(sync_client=True) as api_client:
        remove_test_automations(api_client)
        yield api_client
        remove_test_automations(api_client)


# ---------------------------------------------------------------------------------------------- Databricks


@pytest.fixture(scope="session")
def warm_clusters() -> Iterator[WarmClusters]:
    """The Spark drivers the Jobs API double's runs share for the whole session (tests/support/warm_driver.py): one
    JVM and SparkContext, started by the first double given them, instead of a spark-submit per run; stopped at the
    end."""
    from tests.support.warm_driver import WarmClusters

    with WarmClusters() as clusters:
        yield clusters


@pytest.fixture
def credentials() -> DatabricksCredentials:
    """A service principal with a placeholder secret (the token endpoint is mocked; nothing real is used)."""
    from prefect_databricks import DatabricksCredentials

    from tests.support.databricks_api import HOST, TENANT

    return DatabricksCredentials(
        databricks_instance=HOST, client_id="tollwatch-sp", client_secret="placeholder", tenant_id=TENANT
    )


@pytest.fixture
def databricks_blocks(
    env: dict[str, str], credentials: DatabricksCredentials, monkeypatch: pytest.MonkeyPatch
) -> dict[str, str]:
    """The blocks a production workspace would have, saved on the test server; the engine switched by setting."""
    from tests.support.databricks_api import WHEEL
    from tollwatch.prefect.blocks import AzureStorageLocation, DatabricksCompute, SparkIcebergCatalog

    credentials.save("tollwatch-databricks", overwrite=True)
    DatabricksCompute(kind="existing_cluster", existing_cluster_id="0101-123456-abcdefgh").save(
        "tollwatch", overwrite=True
    )
    AzureStorageLocation(account="tollwatchdata", container="tollwatch").save("tollwatch", overwrite=True)
    SparkIcebergCatalog(kind="hadoop", warehouse="abfss://lake@tollwatchdata.dfs.core.windows.net/warehouse").save(
        "tollwatch", overwrite=True
    )
    for key, value in {
        "TOLLWATCH_ENGINE": "databricks",
        "TOLLWATCH_DATABRICKS_POLL_S": "0",
        "TOLLWATCH_DATABRICKS_API_BACKOFF_S": "0.01",
        "TOLLWATCH_DATABRICKS_WHEEL": WHEEL,
    }.items():
        monkeypatch.setenv(key, value)
    return env


# ---------------------------------------------------------------------------------------------- hooks


def pytest_configure(config: pytest.Config) -> None:
    # Tests never talk to Prefect Cloud or phone home.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A failing stack test shows the tail of the stack's server logs in its report: a 500 seen on CI is otherwise
    only "Internal Server Error", and the traceback that explains it stays in a temp dir nobody can open."""
    outcome = yield
    report = outcome.get_result()
    if not report.failed or "stack" not in getattr(item, "fixturenames", ()):
        return
    for logs in _STACK_LOGS:
        for name in ("prefect.log", "postgres.log"):
            path = logs / name
            if path.exists():
                lines = path.read_text(errors="replace").splitlines()[-_LOG_TAIL_LINES:]
                report.sections.append((f"stack {name} (last {len(lines)} lines)", "\n".join(lines)))
