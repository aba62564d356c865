"""Managed background processes: spawn into their own session, find them again by pid, stop the whole group.

The local stack outlives the Python process that started it (`tollwatch dev up` returns, the services keep
running), so everything here works from a bare pid recorded in a state file, not from a `Popen` object:

* Each service is started with `start_new_session=True`, so its pid is also its process-group id and `down`
  can signal the whole tree (node workers, uvicorn children) at once.
* A pid alone is not an identity: after a reboot or a long idle time the kernel may hand it to an unrelated
  process. `ProcessRef` therefore pairs it with the process start time from `/proc`, and a mismatch counts
  as "not our process" instead of something to kill.
* Zombies count as dead. The init of some containers does not reap orphans, and a service started from
  this very process stays a zombie until it is reaped; `os.kill(pid, 0)` would call both alive.

Linux gives the strongest guarantees (via `/proc`); elsewhere the same calls degrade to plain signal checks.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

_PROC = Path("/proc")
#: Popen objects of the services this process started. Kept so they can be reaped (no zombies while the
#: starter lives on, e.g. a test session) and so `Popen.__del__` never warns about a still-running child.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


@dataclass(frozen=True)
class ProcessRef:
    """A pid plus the kernel's start time for it, so a recycled pid is never mistaken for our process."""

    pid: int
    start_time: str | None = None

    @classmethod
    def of(cls, pid: int) -> ProcessRef:
        """Reference the process that has `pid` right now."""
        return cls(pid=pid, start_time=_proc_start_time(pid))

    def recycled(self) -> bool:
        """True if `pid` now belongs to a different process than the one this ref was taken of."""
        if self.start_time is None:
            return False  # no /proc: cannot tell, assume ours
        current = _proc_start_time(self.pid)
        return current is not None and current != self.start_time

    def alive(self) -> bool:
        """True if this very process (same pid, same start time) runs and is not a zombie."""
        if self.recycled():
            return False
        _reap(self.pid)
        return _pid_exists(self.pid) and _proc_state(self.pid) != "Z"


def spawn(
    argv: Sequence[str],
    *,
    log_path: Path,
    env: Mapping[str, str],
    cwd: Path | None = None,
    user: str | None = None,
) -> ProcessRef:
    """Start `argv` detached in its own session with stdout+stderr appended to `log_path`.

    stdin is /dev/null so no service ever waits on a terminal prompt, and the log is opened in append mode so
    restarts keep the history of earlier attempts next to the failure being debugged. `user` (needs root) runs
    the process as that user and its primary group only, e.g. a server that refuses to run as root; the log
    stays the caller's file, written through the inherited descriptor.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    identity: dict[str, object] = {}
    if user is not None:
        entry = pwd.getpwnam(user)
        identity = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
    with log_path.open("ab") as log:
        proc = subprocess.Popen(  # a list argv built by the caller from fixed parts: never a shell
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(env),
            cwd=cwd,
            start_new_session=True,
            **identity,  # type: ignore[arg-type]
        )
    _CHILDREN[proc.pid] = proc
    return ProcessRef.of(proc.pid)


def terminate_group(ref: ProcessRef, *, timeout: float = 10.0, leader_signal: signal.Signals | None = None) -> None:
    """Stop the process group led by `ref`: SIGTERM, wait up to `timeout` seconds, then SIGKILL.

    The group is signalled even if its leader already died: children may outlive it, and the kernel never
    recycles a pid while it still names a process group, so whatever is left there is ours. If the pid was
    recycled, nothing of ours is left and nothing is signalled; calling this twice or on a stale state file
    is safe.

    `leader_signal` is for servers that stop their own children: that signal goes to the living leader alone
    (PostgreSQL: SIGINT to the postmaster is a fast shutdown, whereas SIGTERM to every process of the group
    at once would end its auxiliary processes behind its back), and the group is killed only if it is not gone
    within `timeout`.
    """
    if ref.recycled():
        return
    if leader_signal is not None and ref.alive():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(ref.pid, leader_signal)
    else:
        _kill_group(ref.pid, signal.SIGTERM)
    if _wait_group_gone(ref.pid, timeout):
        return
    _kill_group(ref.pid, signal.SIGKILL)
    _wait_group_gone(ref.pid, 5.0)


def group_alive(pgid: int) -> bool:
    """True while any non-zombie process is left in process group `pgid` (reaps the leader if our child)."""
    _reap(pgid)
    if _PROC.is_dir():
        return bool(_live_group_members(pgid))
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on `host`.

    Racy by nature (someone may take it before the service binds it); callers retry on bind failure, and
    services that can report their own port (`--port 0`) should be preferred.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def tail(path: Path, lines: int = 40) -> str:
    """The last `lines` lines of a log file (empty if it does not exist), for error messages."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _kill_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _wait_group_gone(pgid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not group_alive(pgid):
            return True
        time.sleep(0.05)
    return not group_alive(pgid)


def _reap(pid: int) -> None:
    """Collect the exit status if `pid` is a child this process spawned, so it stops being a zombie.

    Only children from `spawn` are polled (through their `Popen`), never an arbitrary pid: a blind
    `waitpid` could steal the exit status of an unrelated subprocess of the caller.
    """
    child = _CHILDREN.get(pid)
    if child is not None and child.poll() is not None:
        del _CHILDREN[pid]


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (which may itself contain spaces and parens)."""
    try:
        raw = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    return raw[raw.rfind(")") + 2 :].split()


def _proc_state(pid: int) -> str | None:
    fields = _stat_fields(pid)
    return fields[0] if fields else None


def _proc_start_time(pid: int) -> str | None:
    fields = _stat_fields(pid)
    return fields[19] if fields and len(fields) > 19 else None  # field 22 of stat: starttime in clock ticks


def _live_group_members(pgid: int) -> list[int]:
    members = []
    for entry in _PROC.iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields and len(fields) > 2 and fields[2] == str(pgid) and fields[0] != "Z":
            members.append(int(entry.name))
    return members
