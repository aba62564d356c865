"""The one door to Prefect's internals: everything private or server-side that tollwatch relies on.

Why one module: a Prefect minor release may rename or reshape anything below its public client API. Each
access here names what it relies on, `tests/integration/test_prefect_internals.py` checks each one against the installed
Prefect, and every access first asks `require_checked()`, which refuses a Prefect series nobody checked with
a sentence saying what to do — instead of an AttributeError deep inside a flow run or the warm server.

Checked on Prefect 3.9.1 (see CHECKED_ON). To admit a new release: install it, run
`pytest tests/integration/test_prefect_internals.py`, and add its version here when every access passes.

Public APIs are used directly elsewhere (clients, schemas, settings, `prefect deploy`); only what has no
public equivalent lives here:

- `server_app`: the SQLite stack's server wraps Prefect's app (`prefect.server.api.server.create_app(final=True)`);
- `server_automation_models`: validate automations as the server will (`prefect.server.events` schemas);
- `refresh_settings`: a forked warm child re-reads its settings (`prefect.context.refresh_global_settings_context`);
- `ENGINE_MODULE`: what a process worker runs per flow run (`python -m prefect.engine`, run as `__main__`);
- `flush_at_exit`: a forked child flushes its logs and events (Prefect's `atexit` handlers);
- `block_schema_checksum`, `block_document`: save a block through a given client (`Block._calculate_schema_checksum`,
  `Block._to_block_document`);
- `SLOT_LOST_MESSAGE`: recognise a run that lost its concurrency slot (`prefect.server.orchestration.core_policy`);
- `share_ca_bundle_contexts`: one parsed CA bundle for all of Prefect's HTTP clients in a process (a patch of
  `ssl.create_default_context`, the one patch tollwatch makes; the warm runner applies it).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import ssl
from functools import cache
from typing import TYPE_CHECKING, Any
from uuid import UUID

from tollwatch.contract.errors import TollwatchError

if TYPE_CHECKING:
    from prefect.blocks.core import Block
    from prefect.client.schemas.objects import BlockDocument
    from pydantic import BaseModel

#: Every Prefect release the accesses below were checked against (tests/integration/test_prefect_internals.py passed).
CHECKED_ON: tuple[str, ...] = ("3.9.1",)
#: The release series admitted: a patch release of a checked series keeps its internals (Prefect's own policy
#: for patch releases), a new minor one must be checked first.
CHECKED_SERIES: frozenset[str] = frozenset(".".join(v.split(".")[:2]) for v in CHECKED_ON)

#: `python -m prefect.engine <flow-run-id>` is the command of Prefect's process worker; the warm server runs the
#: same module as `__main__` in a forked child (tollwatch_dev.warm.server).
ENGINE_MODULE = "prefect.engine"

#: How Prefect cancels a run whose deployment concurrency slot lease vanished before it could start (leases
#: live in the server's memory, so a server restart loses them): `tollwatch.prefect.follow` requests such a chunk again.
SLOT_LOST_MESSAGE = "Deployment concurrency slot lost during provisioning"


class PrefectInternalsError(TollwatchError):
    """The installed Prefect is not one whose internals tollwatch was checked against."""


def prefect_version() -> str:
    import prefect

    return str(prefect.__version__)


def require_checked(access: str, version: str | None = None) -> None:
    """Raise PrefectInternalsError unless `version` (default: the installed one) is of a checked series."""
    version = version or prefect_version()
    series = ".".join(version.split(".")[:2])
    if series not in CHECKED_SERIES:
        raise PrefectInternalsError(
            f"{access} relies on Prefect internals checked on Prefect {', '.join(CHECKED_ON)}, but Prefect "
            f"{version} is installed: install a checked version (pyproject.toml pins one), or run "
            "`pytest tests/integration/test_prefect_internals.py` against this one and add it to CHECKED_ON in "
            "tollwatch/prefect/internals.py"
        )


def server_app() -> Any:
    """The server's FastAPI app exactly as `prefect server start` serves it (cached by Prefect, so the server's
    own in-process clients — the automations creating runs — go through the same app and its middleware)."""
    require_checked("serving Prefect's server app with a middleware (the SQLite stack)")
    from prefect.server.api.server import create_app

    return create_app(final=True)


@cache
def server_automation_models() -> tuple[type[BaseModel], dict[str, type[BaseModel]]]:
    """The server's automation schema and its action classes by `type`.

    The server validates more than the client's schemas do (Jinja templates, deployment parameters,
    run-deployment loops); validating with its models before applying means the server cannot refuse an
    automation half-way through an apply.
    """
    from typing import get_args

    require_checked("validating automations with the server's schemas")
    from prefect.server.events.actions import ServerActionTypes
    from prefect.server.events.schemas.automations import AutomationCore

    actions = {cls.model_fields["type"].default: cls for cls in get_args(ServerActionTypes)}
    return AutomationCore, actions


def refresh_settings() -> None:
    """Rebuild Prefect's settings from the current environment (a forked warm child that took a run's
    environment; Prefect read its settings once, at import, from the warm server's)."""
    require_checked("refreshing Prefect's settings in a warm child")
    from prefect.context import refresh_global_settings_context

    refresh_global_settings_context()


def flush_at_exit() -> None:
    """Run the process's exit handlers now: Prefect flushes its log and event workers there. A forked child
    ends with `os._exit` (it must not run the parent's cleanup twice), which would otherwise skip them."""
    require_checked("flushing Prefect's log and event workers before a warm child exits")
    atexit._run_exitfuncs()  # the only way to run them without exiting


def block_schema_checksum(block: Block) -> str:
    """The checksum `Block.save` looks the block's schema up by (for saving through a client of our choice:
    `Block.save` always uses the global settings' API)."""
    require_checked("saving a block through an explicit client")
    return str(block._calculate_schema_checksum())


def block_document(block: Block, *, name: str, block_schema_id: UUID, block_type_id: UUID) -> BlockDocument:
    """The block's document with its secrets, as `Block.save` builds it."""
    require_checked("saving a block through an explicit client")
    return block._to_block_document(
        name=name, block_schema_id=block_schema_id, block_type_id=block_type_id, include_secrets=True
    )


def share_ca_bundle_contexts() -> None:
    """Make `ssl.create_default_context(cafile=F)` parse F once per process and return that context after.

    A patch of the standard library made for Prefect: each of Prefect's HTTP clients builds its own context from
    certifi's bundle (~20 ms of parsing every time), which dominated a warm child's start. The warm runner
    (tollwatch_dev.warm.server) calls it once, before it forks.

    Only that exact call shape is shared (server authentication from a CA file, nothing else): Prefect's
    clients and httpx make it with certifi's bundle and never change the context afterwards; every other call
    shape — including Prefect's insecure mode, which edits the context it gets — still gets a new context.
    Warm children inherit the parsed contexts through the fork. The bundle file's mtime is part of the key.
    """
    require_checked("sharing parsed CA bundles between Prefect's HTTP clients (the warm runner)")
    original = ssl.create_default_context
    if getattr(original, "tollwatch_shared", False):
        return
    shared: dict[tuple[str, float], ssl.SSLContext] = {}

    def create_default_context(
        purpose: ssl.Purpose = ssl.Purpose.SERVER_AUTH, *, cafile: Any = None, capath: Any = None, cadata: Any = None
    ) -> ssl.SSLContext:
        if purpose is not ssl.Purpose.SERVER_AUTH or cafile is None or capath is not None or cadata is not None:
            return original(purpose, cafile=cafile, capath=capath, cadata=cadata)
        key = (os.fspath(cafile), os.stat(cafile).st_mtime)
        if key not in shared:
            shared[key] = original(purpose, cafile=cafile)
        return shared[key]

    create_default_context.tollwatch_shared = True  # type: ignore[attr-defined]
    ssl.create_default_context = create_default_context  # type: ignore[assignment]
    with contextlib.suppress(ImportError):  # parse certifi's bundle now, before any fork
        import certifi

        ssl.create_default_context(cafile=certifi.where())
