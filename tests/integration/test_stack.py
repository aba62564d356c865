"""The local stack against real processes: PostgreSQL, Azurite, a Prefect server on PostgreSQL (and on SQLite,
the lighter option) and the Socrata mirror.

Nothing is mocked: these tests are what proves that the pinned Azurite, this venv's Prefect and PostgreSQL and
the mirror start, answer, keep their state across `down`/`up`, and go away again on this machine. One stack is
shared by the module (a cold Prefect start runs its migrations, ~9 s); tests that stop or break services use
stacks of their own.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import stat
import subprocess
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from azure.core.exceptions import HttpResponseError
from azure.storage.blob import BlobServiceClient

from tollwatch.cli.common import local_stack_env
from tollwatch_dev import postgres
from tollwatch_dev import stack as stack_module
from tollwatch_dev.mirror import MirrorServer
from tollwatch_dev.procs import ProcessRef, group_alive
from tollwatch_dev.stack import (
    SQLITE_CLIENT_POLICY,
    SQLITE_SERVER_POLICY,
    LocalStack,
    StackEndpoints,
    StackError,
    basic_auth,
)
from tollwatch_dev.stack_secrets import StackSecretError, ensure_auth_string, read_auth_string

pytestmark = pytest.mark.stack

#: The development key published in Microsoft's Azurite documentation (the same in every default Azurite).
PUBLISHED_AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="

FAST = {"prefect_ui": False}  # the UI build is not needed to test the API


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalStack, StackEndpoints]]:
    local = LocalStack(tmp_path_factory.mktemp("stack"), **FAST)
    endpoints = local.up()
    yield local, endpoints
    local.down()


def _client(**kwargs: object) -> httpx.Client:
    return httpx.Client(timeout=10.0, trust_env=False, **kwargs)  # type: ignore[arg-type]


def _prefect_client(endpoints: StackEndpoints) -> httpx.Client:
    """A client of the stack's Prefect API with the stack's basic auth (its server requires it)."""
    return _client(base_url=endpoints.prefect_api_url, headers=basic_auth(endpoints.prefect_auth_string))


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
    event = _event(event_id, resource="test.1")
    query = {"filter": {"event": {"name": ["tollwatch.test"]}}, "limit": 10}
    with _prefect_client(endpoints) as client:
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
        "PREFECT_API_AUTH_STRING": endpoints.prefect_auth_string,
        "TOLLWATCH_UPSTREAM_BASE_URL": endpoints.mirror_url,
        "TOLLWATCH_STORAGE_CONNECTION_STRING": endpoints.blob_connection_string,
        "TOLLWATCH_WAREHOUSE_DIR": str(local.state_dir / "warehouse"),
    }
    assert endpoints.prefect_api_url.startswith("http://127.0.0.1:")
    assert endpoints.prefect_api_url.endswith("/api")
    assert (local.state_dir / "warehouse").is_dir()
    for name in ("postgres", "azurite", "prefect", "mirror"):
        assert (local.state_dir / "logs" / f"{name}.log").is_file()


# ------------------------------------------------------------------------------------------ basic auth


def test_the_prefect_server_refuses_every_api_call_without_the_stacks_basic_auth(
    shared: tuple[LocalStack, StackEndpoints],
) -> None:
    """Issue 17 part 6: not open by default. Only `/health` answers anonymously (probes); the string is the stack's
    own, in an owner-only file, never in stack.json, and given to every process the stack starts."""
    local, endpoints = shared
    auth = endpoints.prefect_auth_string
    with _client(base_url=endpoints.prefect_api_url) as anonymous:
        assert anonymous.get("/health").status_code == 200
        assert anonymous.post("/flows/filter", json={}).status_code == 401
        assert anonymous.post("/events", json=[_event(str(uuid.uuid4()), resource="t")]).status_code == 401
        wrong = anonymous.post("/flows/filter", json={}, headers=basic_auth(f"tollwatch:{'x' * 43}"))
        assert wrong.status_code == 401
    with _prefect_client(endpoints) as client:
        assert client.post("/flows/filter", json={}).status_code == 200

    path = local.state_dir / "prefect-auth"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().strip() == auth
    user, _, password = auth.partition(":")
    assert (user, len(password)) == ("tollwatch", 43)  # 256 random bits, url-safe
    recorded = (local.state_dir / "stack.json").read_text()
    assert auth not in recorded
    assert password not in recorded
    assert json.loads(recorded)["env_files"]["PREFECT_API_AUTH_STRING"] == str(path)
    assert local_stack_env(local.state_dir)["PREFECT_API_AUTH_STRING"] == auth
    pids = _pids(local.state_dir)
    assert _environ_of(pids["prefect"].pid)["PREFECT_SERVER_API_AUTH_STRING"] == auth
    for started in ("worker", "warm"):
        assert _environ_of(pids[started].pid)["PREFECT_API_AUTH_STRING"] == auth


def test_azurite_runs_with_the_stacks_own_account_key_not_the_published_one(
    shared: tuple[LocalStack, StackEndpoints],
) -> None:
    """The key in Microsoft's Azurite docs opens every default Azurite: the stack's Azurite refuses it and takes
    only the stack's own key, which lives owner-only beside the auth string and never in stack.json."""
    local, endpoints = shared
    key_file = local.state_dir / "azurite-key"
    key = key_file.read_text().strip()
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert len(base64.b64decode(key)) == 64
    assert f"AccountKey={key};" in endpoints.blob_connection_string
    published = endpoints.blob_connection_string.replace(key, PUBLISHED_AZURITE_KEY)
    with pytest.raises(HttpResponseError) as refused:
        BlobServiceClient.from_connection_string(published, retry_total=0).get_service_properties()
    assert refused.value.status_code == 403
    BlobServiceClient.from_connection_string(endpoints.blob_connection_string).get_service_properties()
    recorded = (local.state_dir / "stack.json").read_text()
    assert key not in recorded
    files = json.loads(recorded)["env_files"]
    connection_file = Path(files["TOLLWATCH_STORAGE_CONNECTION_STRING"])
    assert connection_file.read_text().strip() == endpoints.blob_connection_string
    assert stat.S_IMODE(connection_file.stat().st_mode) == 0o600
    assert local_stack_env(local.state_dir)["TOLLWATCH_STORAGE_CONNECTION_STRING"] == endpoints.blob_connection_string


def test_stack_env_exports_the_auth_string_and_status_checks_it(shared: tuple[LocalStack, StackEndpoints]) -> None:
    """`eval "$(tollwatch stack env)"` gives another shell everything, auth included; `status` proves the recorded
    string still opens the server (an authenticated call, not only /health)."""
    from typer.testing import CliRunner

    from tollwatch.cli.main import app

    local, endpoints = shared
    exported = CliRunner().invoke(app, ["stack", "env", "--state-dir", str(local.state_dir)])
    assert exported.exit_code == 0, exported.output
    assert f"export PREFECT_API_AUTH_STRING={json.dumps(endpoints.prefect_auth_string)}" in exported.output.splitlines()
    assert stack_module._check_prefect(_record(local.state_dir, "prefect")) is None


def test_an_exposed_auth_file_is_refused_with_what_to_do(tmp_path: Path) -> None:
    path = tmp_path / "prefect-auth"
    first = ensure_auth_string(tmp_path)
    assert ensure_auth_string(tmp_path) == first  # one string per stack, kept across `up`s
    path.chmod(0o644)
    with pytest.raises(StackSecretError, match=r"readable by other users .*chmod 600"):
        read_auth_string(tmp_path)


def _record(state_dir: Path, name: str) -> stack_module.ServiceRecord:
    raw = json.loads((state_dir / "stack.json").read_text())
    return stack_module.ServiceRecord(**raw["services"][name])


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

    assert set(statuses) == {"postgres", "azurite", "prefect", "mirror", "inbox", "warm", "worker"}
    assert all(s.alive and s.healthy for s in statuses.values()), statuses
    assert statuses["prefect"].url == endpoints.prefect_api_url
    assert statuses["prefect"].database == endpoints.prefect_database_url
    assert other.endpoints() == endpoints


# ------------------------------------------------------------------------------------------ PostgreSQL


def test_prefect_runs_migrated_on_the_stacks_postgres(shared: tuple[LocalStack, StackEndpoints]) -> None:
    """The server's database is the stack's PostgreSQL, through the socket in the state dir, migrated (with
    pg_trgm) and written to: a flow created over the API is a row in PostgreSQL."""
    local, endpoints = shared
    socket_dir = local.state_dir / "postgres" / "run"
    assert endpoints.prefect_database_url == f"postgresql+asyncpg://postgres@/prefect?host={socket_dir}"
    assert endpoints.postgres_url == f"postgresql://postgres@/prefect?host={socket_dir}"
    assert _environ_of(_pids(local.state_dir)["prefect"].pid)["PREFECT_SERVER_DATABASE_CONNECTION_URL"] == (
        endpoints.prefect_database_url
    )
    assert (socket_dir / ".s.PGSQL.5432").is_socket()
    assert not (local.state_dir / "prefect" / "prefect.db").exists()
    name = f"pg-{uuid.uuid4().hex[:8]}"
    with _prefect_client(endpoints) as client:
        assert client.post("/flows/", json={"name": name}).status_code in (200, 201)

    assert name in _sql(endpoints.postgres_url, "SELECT name FROM flow").splitlines()
    assert _sql(endpoints.postgres_url, "SELECT extname FROM pg_extension WHERE extname = 'pg_trgm'") == "pg_trgm"
    assert _sql(endpoints.postgres_url, "SELECT count(*) FROM alembic_version") == "1"


def test_down_and_up_keep_the_state_of_every_service(tmp_path: Path) -> None:
    """`down` stops PostgreSQL cleanly; `up` again finds the flow run and event made before (Prefect on
    PostgreSQL), the blob (Azurite) and the weeks the mirror published (its history file), and publishes on."""
    state = tmp_path / "stack"
    local = LocalStack(state, services=("azurite", "prefect", "mirror"), **FAST)
    first = local.up()
    event_id = str(uuid.uuid4())
    with _prefect_client(first) as client:
        flow = client.post("/flows/", json={"name": "kept-across-restarts"}).json()
        run = client.post("/flow_runs/", json={"flow_id": flow["id"], "name": "kept-run"}).json()
        assert client.post("/events", json=[_event(event_id)]).status_code == 204
        assert _wait_for_event(client, event_id), "event never showed up in events/filter"
    container = BlobServiceClient.from_connection_string(first.blob_connection_string).create_container("kept")
    container.upload_blob("hello.txt", b"kept")
    with _client(base_url=first.mirror_url) as client:
        published = client.post("/admin/publish", json={"days": 7}).json()
        state_before = client.get("/admin/state").json()
    postmaster = _pids(state)["postgres"]

    local.down()

    assert not postmaster.alive()
    assert not group_alive(postmaster.pid)
    assert "database system is shut down" in (state / "logs" / "postgres.log").read_text()
    assert (state / "postgres" / "data" / "PG_VERSION").is_file()
    assert (
        json.loads((state / "mirror" / "history.json").read_text())["changes"][-1]["at"] == (published["rowsUpdatedAt"])
    )

    second = local.up()

    assert _pids(state)["postgres"] != postmaster
    assert "was shut down at" in (state / "logs" / "postgres.log").read_text().split("starting PostgreSQL")[-1]
    with _prefect_client(second) as client:
        kept = client.get(f"/flow_runs/{run['id']}")
        assert kept.status_code == 200, kept.text
        assert kept.json()["name"] == "kept-run"
        assert _wait_for_event(client, event_id)
    blobs = BlobServiceClient.from_connection_string(second.blob_connection_string)
    assert blobs.get_container_client("kept").download_blob("hello.txt").readall() == b"kept"
    with _client(base_url=second.mirror_url) as client:
        assert client.get("/admin/state").json() == state_before
        metadata = client.get("/api/views/qzve-kjga.json").json()
        assert metadata["rowsUpdatedAt"] == published["rowsUpdatedAt"]
        again = client.post("/admin/publish", json={"days": 7}).json()
    assert again["start_seq"] == published["end_seq"]  # the next week, not the same one again
    assert again["published_through"] > published["published_through"]
    local.down()


def test_stack_up_db_sqlite_runs_prefect_without_postgres(tmp_path: Path) -> None:
    """`tollwatch stack up --db sqlite`: the whole stack but no PostgreSQL, the server on a SQLite file;
    `stack status` shows that database and does not call the missing PostgreSQL a failure."""
    from typer.testing import CliRunner

    from tollwatch.cli.main import app

    state = tmp_path / "stack"
    runner = CliRunner()
    up = runner.invoke(app, ["stack", "up", "--state-dir", str(state), "--db", "sqlite"])
    try:
        assert up.exit_code == 0, up.output
        database = state / "prefect" / "prefect.db"
        assert f"Prefect DB     : sqlite+aiosqlite:///{database}" in up.output
        endpoints = LocalStack(state).endpoints()
        with _prefect_client(endpoints) as client:
            assert client.post("/flows/", json={"name": "on-sqlite"}).status_code in (200, 201)
        assert endpoints.postgres_url == ""
        assert database.is_file()
        assert set(_pids(state)) == {"azurite", "prefect", "mirror", "inbox", "warm", "worker"}
        assert not (state / "postgres").exists()

        status = runner.invoke(app, ["stack", "status", "--state-dir", str(state)])

        assert status.exit_code == 0, status.output
        assert not [line for line in status.output.splitlines() if line.startswith("postgres")]
        assert f"database sqlite+aiosqlite:///{database}" in status.output
    finally:
        assert runner.invoke(app, ["stack", "down", "--state-dir", str(state)]).exit_code == 0


def test_the_database_choice_decides_whether_postgres_is_a_service(tmp_path: Path) -> None:
    assert LocalStack(tmp_path).services == stack_module.SERVICES
    assert "postgres" not in LocalStack(tmp_path, db="sqlite").services
    assert LocalStack(tmp_path, services=("azurite", "prefect")).services == ("postgres", "azurite", "prefect")
    assert LocalStack(tmp_path, services=("azurite", "prefect"), db="sqlite").services == ("azurite", "prefect")
    assert LocalStack(tmp_path, services=("mirror",)).services == ("mirror",)


def test_unknown_database_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(StackError, match="unknown database 'mysql'"):
        LocalStack(tmp_path, db="mysql")


@pytest.mark.parametrize("breakage", ["incompatible data dir", "data dir is a file", "data dir held by a stray server"])
def test_a_postgres_that_cannot_start_is_one_sentence(tmp_path: Path, breakage: str) -> None:
    """`tollwatch stack up` exits 1 with one line that says why; nothing else is started, nothing of this stack is
    left running. A stray server: a postmaster of this data dir that the state file no longer records (it also
    answers on the stack's socket, so only its pid tells it apart from the one `up` launched)."""
    from typer.testing import CliRunner

    from tollwatch.cli.main import app

    state = tmp_path / "stack"
    data = state / "postgres" / "data"
    stray: ProcessRef | None = None
    if breakage == "data dir is a file":
        data.parent.mkdir(parents=True)
        data.write_text("not a directory\n")
        expected = "PostgreSQL cannot start: cannot prepare PostgreSQL's directory"
    else:  # a real cluster first
        LocalStack(state, services=("postgres",)).up()
        stray = _pids(state)["postgres"]
        (state / "stack.json").unlink()
        if breakage == "incompatible data dir":  # then marked as made by another major version
            stack_module._stop("postgres", stray)
            stray = None
            (data / "PG_VERSION").write_text("9.6\n")
            expected = "PostgreSQL did not start: database files are incompatible with server"
        else:
            expected = (
                'PostgreSQL did not start: lock file "postmaster.pid" already exists: '
                f"is another postmaster (PID {stray.pid}) running"
            )

    try:
        up = CliRunner().invoke(app, ["stack", "up", "--state-dir", str(state)])

        assert up.exit_code == 1, up.output
        assert up.output.startswith(f"error: {expected}"), up.output
        assert up.output.count("\n") == 1, up.output  # one line
        assert str(state / "postgres") in up.output
        assert json.loads((state / "stack.json").read_text())["services"] == {}
        assert not (state / "logs" / "prefect.log").exists()  # the server was never launched
        assert _processes_using(state) == ([stray.pid] if stray else [])
    finally:
        LocalStack(state).down()  # whatever this `up` left recorded
        if stray is not None:
            stack_module._stop("postgres", stray)


def test_postgres_listens_on_loopback_when_the_socket_path_is_too_long(tmp_path: Path) -> None:
    """A socket path is at most 107 bytes; under a deeper state dir PostgreSQL takes a free loopback port."""
    state = tmp_path / ("d" * 60) / ("e" * 60) / "stack"
    with LocalStack(state, services=("postgres",)) as endpoints:
        assert endpoints.postgres_url.startswith("postgresql://postgres@127.0.0.1:")
        assert endpoints.postgres_url.endswith("/prefect")
        assert postgres.is_ready(endpoints.postgres_url) is None
        assert _sql(endpoints.postgres_url, "SELECT current_database()") == "prefect"
    assert not _processes_using(state)


def test_mirror_history_file_replays_publishes_revisions_and_deletions(tmp_path: Path) -> None:
    """The mirror's `--state` file: a new mirror on it serves what the old one served, stamps included; a
    file written for another range is another upstream and is ignored."""
    history = tmp_path / "history.json"
    with MirrorServer("qzve-kjga", "2024-01-01", "2024-02-01", state_file=history) as first:
        first.dataset.publish(7)
        first.dataset.revise("2024-01-03", "2024-01-05")
        first.dataset.delete_days("2024-01-10", "2024-01-11")
        before = first.dataset.state()

    with MirrorServer("qzve-kjga", "2024-01-01", "2024-02-01", state_file=history) as second:
        assert second.restored
        assert second.dataset.state() == before
        assert second.dataset.query({"$select": "count(*) AS n"}) == first.dataset.query({"$select": "count(*) AS n"})

    with MirrorServer("qzve-kjga", "2024-01-02", "2024-02-01", state_file=history) as other:
        assert not other.restored
        assert other.dataset.state()["published_through"] == "2024-02-01"


# ------------------------------------------------------------------------------------------ lifecycle


def test_down_stops_every_process_and_up_replaces_dead_services(tmp_path: Path) -> None:
    local = LocalStack(tmp_path / "stack", services=("azurite", "prefect"), **FAST)
    first = local.up()
    refs = _pids(local.state_dir)
    assert set(refs) == {"postgres", "azurite", "prefect"}
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
    assert {name: s.alive for name, s in local.status().items()} == {
        "postgres": False,
        "azurite": False,
        "prefect": False,
    }
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
        httpx.post(f"{endpoints.mirror_url}/admin/publish", json={"days": 7}, trust_env=False).raise_for_status()

        moved = LocalStack(state, services=("mirror",), mirror_start=date(2024, 3, 2), seed=7).up()

        assert _pids(state)["mirror"] != first
        assert not first.alive()
        assert _mirror_state(moved.mirror_url)["history_start"] == "2024-03-02"
        # another range is another upstream: the week published on the old one is not replayed on it
        assert _mirror_state(moved.mirror_url)["published_through"] == "2025-01-01"
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


def _sql(libpq_url: str, query: str) -> str:
    """One value from the stack's PostgreSQL, through the wheel's own psql."""
    result = subprocess.run(
        [str(postgres.bin_dir() / "psql"), "-X", "-tA", "-d", libpq_url, "-c", query],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return result.stdout.strip()


def _event(event_id: str, resource: str = "test.kept") -> dict[str, Any]:
    """A minimal event for the Prefect events API."""
    return {
        "id": event_id,
        "occurred": datetime.now(UTC).isoformat(),
        "event": "tollwatch.test",
        "resource": {"prefect.resource.id": resource},
        "payload": {},
        "related": [],
    }


def _wait_for_event(client: httpx.Client, event_id: str, timeout: float = 30.0) -> bool:
    query = {"filter": {"event": {"name": ["tollwatch.test"]}}, "limit": 50}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        page = client.post("/events/filter", json=query)
        assert page.status_code == 200, page.text
        if any(e["id"] == event_id for e in page.json()["events"]):
            return True
        time.sleep(0.25)
    return False


def _processes_using(state: Path) -> list[int]:
    """Pids of live processes whose command line names the state dir (a leftover server would)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(state) in cmdline and ProcessRef.of(int(entry.name)).alive():
            found.append(int(entry.name))
    return found


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


def test_the_postgres_stacks_server_is_prefect_server_start_with_prefects_own_policies(
    shared: tuple[LocalStack, StackEndpoints],
) -> None:
    """No SQLite workaround on PostgreSQL: Prefect's own command, retries and Late-run marking (README numbers)."""
    local, _ = shared
    pids = _pids(local.state_dir)
    cmdline = Path(f"/proc/{pids['prefect'].pid}/cmdline").read_text().split("\0")
    assert cmdline[1:5] == ["-m", "prefect", "server", "start"]
    server, worker = _environ_of(pids["prefect"].pid), _environ_of(pids["worker"].pid)
    for setting in SQLITE_SERVER_POLICY:
        assert setting not in server
    for setting in SQLITE_CLIENT_POLICY:
        assert setting not in worker
    assert server["PREFECT_SERVER_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")


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


def test_a_worker_started_with_other_tollwatch_settings_is_restarted_not_reused(tmp_path: Path, monkeypatch):
    """`TOLLWATCH_ENGINE=spark make demo` on a stack started with the local engine must not reuse a worker (or warm
    server) whose flow runs would still merge locally; the config holds a digest, never the values (secrets)."""
    endpoints = {"PREFECT_API_URL": "http://127.0.0.1:1/api", "TOLLWATCH_UPSTREAM_BASE_URL": "http://127.0.0.1:2"}
    monkeypatch.delenv("TOLLWATCH_ENGINE", raising=False)
    services = [
        stack_module._Worker("worker", tmp_path, endpoint_env=endpoints),
        stack_module._Warm("warm", tmp_path, endpoint_env=endpoints),
    ]
    before = [s.config() for s in services]
    monkeypatch.setenv("TOLLWATCH_UPSTREAM_BASE_URL", "http://127.0.0.1:3")  # the stack's own endpoint: ignored
    assert [s.config() for s in services] == before
    monkeypatch.setenv("TOLLWATCH_ENGINE", "spark")
    monkeypatch.setenv("TOLLWATCH_UPSTREAM_APP_TOKEN", "marker-secret-value")
    after = [s.config() for s in services]
    assert all(a != b for a, b in zip(after, before, strict=True))
    assert "marker-secret-value" not in json.dumps(after)
