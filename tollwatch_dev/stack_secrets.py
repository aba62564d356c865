"""The local stack's secrets: generated once per stack, kept in the state dir, readable only by their owner.

Why: a Prefect server without `PREFECT_SERVER_API_AUTH_STRING` lets anything that reaches its port create runs,
read logs and delete deployments, and an Azurite with the published development key lets anything read and
overwrite the landing; on a shared machine or a laptop on a café network "loopback only" is not a boundary worth
betting the pipeline on. So each stack makes its own:

- `prefect-auth`: the Prefect server's basic-auth string, `tollwatch:<256 random bits>`;
- `azurite-key`: the storage account key Azurite is started with (`AZURITE_ACCOUNTS`), 64 random bytes base64'd
  like an Azure account key, in place of the key published in Microsoft's Azurite documentation.

Each is created with mode 0600 and `O_EXCL` (two concurrent `up` calls cannot write two different values) and
reused by every later `up`; a file others can read is refused (like an SSH key). Values derived from them for
other processes (the storage connection string, whose port changes on a restart) are written the same way by
`write_secret`. stack.json records the paths of these files, never their contents.
"""

from __future__ import annotations

import base64
import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path

from tollwatch.contract.errors import TollwatchError

AUTH_FILE = "prefect-auth"
STORAGE_KEY_FILE = "azurite-key"
USER = "tollwatch"
_OWNER_ONLY = 0o600


class StackSecretError(TollwatchError):
    """A stack secret's file is unusable (empty, or readable by others); the message says what to do."""


def secret_path(state_dir: Path, name: str) -> Path:
    return state_dir / name


def auth_path(state_dir: Path) -> Path:
    return secret_path(state_dir, AUTH_FILE)


def ensure_secret(state_dir: Path, name: str, make: Callable[[], str]) -> str:
    """The secret `name` of the stack, made by `make` on first use (0600, exclusive create) and reused afterwards."""
    path = secret_path(state_dir, name)
    state_dir.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _OWNER_ONLY)
    except FileExistsError:
        return read_secret(state_dir, name)
    with os.fdopen(fd, "w") as handle:
        handle.write(f"{make()}\n")
    return read_secret(state_dir, name)


def write_secret(state_dir: Path, name: str, value: str) -> Path:
    """Replace the secret file `name` atomically, owner-only from its first byte."""
    path = secret_path(state_dir, name)
    tmp = path.with_name(f".{name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _OWNER_ONLY)
    with os.fdopen(fd, "w") as handle:
        handle.write(f"{value}\n")
    os.replace(tmp, path)
    return path


def read_secret(state_dir: Path, name: str) -> str:
    """The recorded secret; refuses a file that others can read (it may have been copied or exposed)."""
    path = secret_path(state_dir, name)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise StackSecretError(
            f"{path} is readable by other users (mode {mode:o}); the stack's secret may be exposed: stop the "
            f"stack, delete the file (a new one is made at the next `up`) or `chmod 600 {path}`"
        )
    value = path.read_text().strip()
    if not value:
        raise StackSecretError(f"{path} is empty: stop the stack and delete it; `up` makes a new one")
    return value


def ensure_auth_string(state_dir: Path) -> str:
    """The Prefect server's basic-auth string."""
    return ensure_secret(state_dir, AUTH_FILE, lambda: f"{USER}:{secrets.token_urlsafe(32)}")


def read_auth_string(state_dir: Path) -> str:
    return read_secret(state_dir, AUTH_FILE)


def ensure_storage_key(state_dir: Path) -> str:
    """Azurite's account key for this stack (the shape of an Azure storage account key)."""
    return ensure_secret(state_dir, STORAGE_KEY_FILE, lambda: base64.b64encode(secrets.token_bytes(64)).decode())
