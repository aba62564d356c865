"""The local stack against real processes: Azurite, a Prefect server on SQLite and the Socrata mirror.

Nothing is mocked: these tests are what proves that the pinned Azurite, this venv's Prefect and the mirror
start, answer, and go away again on this machine. One stack is shared by the module (a cold Prefect start
runs its migrations, ~8 s); tests that stop or break services use stacks of their own.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from azure.storage.blob import BlobServiceClient

from tollwatch.dev import stack as stack_module
from tollwatch.dev.procs import ProcessRef, group_alive
from tollwatch.dev.stack import LocalStack, StackEndpoints, StackError

pytestmark = pytest.mark.stack

FAST = {"prefect_ui": False}  # the UI build is not needed to test the API


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalStack, StackEndpoints]]:
    local = LocalStack(tmp_path_factory.mktemp("stack"), **FAST)
    endpoints = local.up()
    yield local, endpoints
    local.down()


def _client(**kwargs: object) -> httpx.Client:
    return httpx.Client(timeout=10.0, trust_env=False, **kwargs)  # type: ignore[arg-type]


def _pids(state_dir: Path) -> dict[str, ProcessRef]:
    raw = json.loads((state_dir / "stack.json").read_text())
    return {name: ProcessRef(e["pid"], e["start_time"]) for name, e in raw["services"].items()}


# ------------------------------------------------------------------------------------------ the services


def test_blob_roundtrip_through_connection_string(shared: tuple[LocalStack, StackEndpoints]) -> None:
    _, endpoints = shared
    service = BlobServiceClient.from_connection_string(endpoints.blob_connection_string)
    container = service.create_container(f"test-{uuid.uuid4().hex[:8]}")
    container.upload_blob("dir/hello.txt", b"hello tollwatch")

    assert container.download_blob("dir/hello.txt").readall() == b"hello tollwatch"
    assert endpoints.blob_url.endswith("/devstoreaccount1")
    assert f"BlobEndpoint={endpoints.blob_url};" in endpoints.blob_connection_string


def test_prefect_health(shared: tuple[LocalStack, StackEndpoints]) -> None:
    _, endpoints = shared
    with _client() as client:
        response = client.get(f"{endpoints.prefect_api_url}/health")
    assert response.status_code == 200
    assert response.json() is True


def test_prefect_event_roundtrip(shared: tuple[LocalStack, StackEndpoints]) -> None:
    """An event posted over HTTP comes back from `events/filter` (persisted asynchronously, so poll)."""
    _, endpoints = shared
    event_id = str(uuid.uuid4())
    event = {
        "id": event_id,
        "occurred": datetime.now(UTC).isoformat(),
        "event": "tollwatch.test",
        "resource": {"prefect.resource.id": "test.1"},
        "payload": {},
        "related": [],
    }
    query = {"filter": {"event": {"name": ["tollwatch.test"]}}, "limit": 10}
    with _client(base_url=endpoints.prefect_api_url) as client:
        assert client.post("/events", json=[event]).status_code == 204
        deadline = time.monotonic() + 30
        found: list[dict[str, Any]] = []
        while time.monotonic() < deadline and not found:
            page = client.post("/events/filter", json=query)
            assert page.status_code == 200, page.text
            found = [e for e in page.json()["events"] if e["id"] == event_id]
            time.sleep(0.25)
    assert found, "event never showed up in events/filter"
    assert found[0]["event"] == "tollwatch.test"
    assert found[0]["resource"]["prefect.resource.id"] == "test.1"


def test_mirror_serves_the_dataset(shared: tuple[LocalStack, StackEndpoints]) -> None:
    _, endpoints = shared
    with _client(base_url=endpoints.mirror_url) as client:
        rows = client.get("/resource/qzve-kjga.json", params={"$limit": "3", "$order": ":id"})
        state = client.get("/admin/state")
    assert rows.status_code == 200
    assert len(rows.json()) == 3
    assert state.status_code == 200


def test_env_points_at_the_stack(shared: tuple[LocalStack, StackEndpoints]) -> None:
    local, endpoints = shared
    env = endpoints.env()
    assert env == {
        "PREFECT_API_URL": endpoints.prefect_api_url,
        "TOLLWATCH_UPSTREAM_BASE_URL": endpoints.mirror_url,
        "TOLLWATCH_STORAGE_CONNECTION_STRING": endpoints.blob_connection_string,
        "TOLLWATCH_WAREHOUSE_DIR": str(local.state_dir / "warehouse"),
    }
    assert endpoints.prefect_api_url.startswith("http://127.0.0.1:")
    assert endpoints.prefect_api_url.endswith("/api")
    assert (local.state_dir / "warehouse").is_dir()
    for name in ("azurite", "prefect", "mirror"):
        assert (local.state_dir / "logs" / f"{name}.log").is_file()


# ------------------------------------------------------------------------------------------ idempotency


def test_up_twice_reuses_running_services(shared: tuple[LocalStack, StackEndpoints]) -> None:
    local, endpoints = shared
    before = _pids(local.state_dir)

    again = local.up()

    assert again == endpoints
    assert _pids(local.state_dir) == before


def test_status_from_a_second_instance(shared: tuple[LocalStack, StackEndpoints]) -> None:
    local, endpoints = shared
    other = LocalStack(local.state_dir)

    statuses = other.status()

    assert set(statuses) == {"azurite", "prefect", "mirror", "inbox", "warm", "worker"}
    assert all(s.alive and s.healthy for s in statuses.values()), statuses
    assert statuses["prefect"].url == endpoints.prefect_api_url
    assert other.endpoints() == endpoints


# ------------------------------------------------------------------------------------------ lifecycle


def test_down_stops_every_process_and_up_replaces_dead_services(tmp_path: Path) -> None:
    local = LocalStack(tmp_path / "stack", services=("azurite", "prefect"), **FAST)
    first = local.up()
    refs = _pids(local.state_dir)
    assert set(refs) == {"azurite", "prefect"}
    assert first.mirror_url == ""
    assert "TOLLWATCH_UPSTREAM_BASE_URL" not in first.env()

    # A crashed service is detected and replaced; the healthy one is kept.
    os.killpg(refs["azurite"].pid, signal.SIGKILL)
    _wait_dead(refs["azurite"])
    assert local.status()["azurite"].alive is False
    second = local.up()
    after = _pids(local.state_dir)
    assert after["prefect"] == refs["prefect"]
    assert after["azurite"] != refs["azurite"]
    assert second.prefect_api_url == first.prefect_api_url
    BlobServiceClient.from_connection_string(second.blob_connection_string).get_service_properties()

    local.down()

    for ref in after.values():
        assert not ref.alive()
        assert not group_alive(ref.pid)
    assert not (local.state_dir / "stack.json").exists()
    assert {name: s.alive for name, s in local.status().items()} == {"azurite": False, "prefect": False}
    local.down()  # idempotent


def test_prefect_relaunches_when_its_port_is_taken(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The free-port race, provoked: the first port handed to Prefect is already bound by someone else."""
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        ports = iter([taken])
        real_free_port = stack_module.free_port
        monkeypatch.setattr(stack_module, "free_port", lambda host: next(ports, None) or real_free_port(host))

        with LocalStack(tmp_path / "stack", services=("prefect",), **FAST) as endpoints:
            assert f":{taken}/" not in endpoints.prefect_api_url
            assert httpx.get(f"{endpoints.prefect_api_url}/health", trust_env=False).status_code == 200
    assert "already in use" in (tmp_path / "stack" / "logs" / "prefect.log").read_text()


def test_context_manager_and_mirror_parameters(tmp_path: Path) -> None:
    """Only the mirror, with a custom range; a changed range on `up` restarts it instead of reusing it."""
    state = tmp_path / "stack"
    with LocalStack(state, services=("mirror",), mirror_start=date(2024, 3, 1), seed=7) as endpoints:
        first = _pids(state)["mirror"]
        assert _mirror_state(endpoints.mirror_url)["history_start"] == "2024-03-01"

        moved = LocalStack(state, services=("mirror",), mirror_start=date(2024, 3, 2), seed=7).up()

        assert _pids(state)["mirror"] != first
        assert not first.alive()
        assert _mirror_state(moved.mirror_url)["history_start"] == "2024-03-02"
    assert not (state / "stack.json").exists()


def test_missing_node_modules_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stack_module, "PROJECT_ROOT", tmp_path / "checkout")
    with pytest.raises(StackError, match="npm ci"):
        LocalStack(tmp_path / "stack", services=("azurite",)).up()


def test_unknown_service_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(StackError, match="unknown service"):
        LocalStack(tmp_path, services=("azurite", "redis"))


# ------------------------------------------------------------------------------------------ helpers


def _mirror_state(url: str) -> dict[str, object]:
    response = httpx.get(f"{url}/admin/state", trust_env=False)
    response.raise_for_status()
    return dict(response.json())


def _wait_dead(ref: ProcessRef, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while ref.alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not ref.alive()


def test_worker_runs_with_the_stack_endpoints_and_fast_polling(shared: tuple[LocalStack, StackEndpoints]) -> None:
    """Flow runs inherit the worker's environment: it must point at this stack's services."""
    local, endpoints = shared
    environ = _environ_of(_pids(local.state_dir)["worker"].pid)
    assert environ["PREFECT_API_URL"] == endpoints.prefect_api_url
    assert environ["TOLLWATCH_UPSTREAM_BASE_URL"] == endpoints.mirror_url
    assert environ["TOLLWATCH_STORAGE_CONNECTION_STRING"] == endpoints.blob_connection_string
    assert environ["PREFECT_WORKER_QUERY_SECONDS"] == "0.5"


def _environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_text().split("\0")
    return dict(item.split("=", 1) for item in raw if "=" in item)


def test_server_and_worker_retry_sqlite_busy_503s_longer_than_prefects_default(
    shared: tuple[LocalStack, StackEndpoints],
) -> None:
    """The automations (inside the server) and the worker both create/submit runs through Prefect's client."""
    local, _ = shared
    pids = _pids(local.state_dir)
    assert _environ_of(pids["prefect"].pid)["PREFECT_CLIENT_MAX_RETRIES"] == "20"
    assert _environ_of(pids["worker"].pid)["PREFECT_CLIENT_MAX_RETRIES"] == "8"


def test_inbox_records_what_it_is_sent(shared: tuple[LocalStack, StackEndpoints]) -> None:
    _, endpoints = shared
    with _client() as client:
        assert client.post(f"{endpoints.inbox_url}/alerts", json={"subject": "s"}).status_code == 204
        received = client.get(f"{endpoints.inbox_url}/_received").json()
    assert [r["path"] for r in received if r["path"] == "/alerts"] == ["/alerts"]


def test_warm_server_is_ready_and_its_socket_is_in_the_worker_environment(
    shared: tuple[LocalStack, StackEndpoints],
) -> None:
    """Runs the worker starts reach the warm server through TOLLWATCH_WARM_SOCKET (else they run cold)."""
    local, _ = shared
    worker = _pids(local.state_dir)["worker"]
    environ = dict(
        item.split("=", 1) for item in Path(f"/proc/{worker.pid}/environ").read_text().split("\0") if "=" in item
    )
    assert Path(environ["TOLLWATCH_WARM_SOCKET"]).is_socket()
    assert local.status()["warm"].healthy


def test_queued_runs_are_not_marked_late_within_ten_minutes(shared: tuple[LocalStack, StackEndpoints]) -> None:
    """Runs waiting behind a backfill's concurrency limit are not late; marking each one was a write storm."""
    local, _ = shared
    assert (
        _environ_of(_pids(local.state_dir)["prefect"].pid)["PREFECT_SERVER_SERVICES_LATE_RUNS_AFTER_SECONDS"] == "600"
    )
