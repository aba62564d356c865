"""The local Prefect server's basic-auth string: one per stack, generated once, readable only by its owner.

Why: a Prefect server without `PREFECT_SERVER_API_AUTH_STRING` lets anything that reaches its port create runs,
read logs and delete deployments; on a shared machine or a laptop on a café network "loopback only" is not a
boundary worth betting the pipeline on. So the stack's server always requires basic auth, and the string lives
in `<state>/prefect-auth` with mode 0600 (like an SSH key), created with `O_EXCL` so two concurrent `up` calls
cannot write two different strings. Everything the stack starts gets it as `PREFECT_API_AUTH_STRING`;
`tollwatch stack env` exports it for other shells. It is a random `tollwatch:<256-bit token>`, never logged:
stack.json records only the path of this file.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from tollwatch.contract.errors import TollwatchError

AUTH_FILE = "prefect-auth"
USER = "tollwatch"
_OWNER_ONLY = 0o600


class ServerAuthError(TollwatchError):
    """The stack's auth file is unusable (empty, or readable by others); the message says what to do."""


def auth_path(state_dir: Path) -> Path:
    return state_dir / AUTH_FILE


def ensure_auth_string(state_dir: Path) -> str:
    """The stack's auth string, created on first use (0600, exclusive create) and reused afterwards."""
    path = auth_path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _OWNER_ONLY)
    except FileExistsError:
        return read_auth_string(state_dir)
    with os.fdopen(fd, "w") as handle:
        handle.write(f"{USER}:{secrets.token_urlsafe(32)}\n")
    return read_auth_string(state_dir)


def read_auth_string(state_dir: Path) -> str:
    """The recorded auth string; refuses a file that others can read (it may have been copied or exposed)."""
    path = auth_path(state_dir)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise ServerAuthError(
            f"{path} is readable by other users (mode {mode:o}); the Prefect server's password may be exposed: "
            f"stop the stack, delete the file (a new one is made at the next `up`) or `chmod 600 {path}`"
        )
    value = path.read_text().strip()
    if not value:
        raise ServerAuthError(f"{path} is empty: stop the stack and delete it; `up` makes a new one")
    return value
