"""`tollwatch automations …`: apply the automations and subscriptions under `automations/` to a Prefect server.

Kept apart from `tollwatch.cli.main` (which registers `automations_app`); errors print as one red line
(`tollwatch.cli.common.fail`) with exit code 1.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer

from tollwatch.cli.common import LOCAL_STACK_FILE, fail, local_stack_env, use_stack
from tollwatch.contract.errors import ConfigurationError
from tollwatch.contract.settings import DEFAULT_STATE_DIR
from tollwatch.prefect.automations.models import AutomationsConfigError

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_AUTOMATIONS_DIR = PROJECT_ROOT / "automations"

automations_app = typer.Typer(no_args_is_help=True, help="Prefect automations and downstream subscriptions as code.")


@automations_app.callback()
def _group() -> None:
    """Prefect automations and downstream subscriptions as code (files under `automations/`)."""


def _api_url(local_stack: bool, state_dir: Path) -> str:
    """PREFECT_API_URL if configured; else the running local stack's (like the other tollwatch commands).

    Never Prefect's ephemeral in-process server: automations applied there would vanish with the process.
    """
    from prefect.settings import PREFECT_API_URL

    configured = PREFECT_API_URL.value()
    if configured:
        return str(configured)
    if local_stack and (state_dir / LOCAL_STACK_FILE).exists():
        try:
            url = local_stack_env(state_dir).get("PREFECT_API_URL")
            use_stack(state_dir)  # its auth string too (run_apply reads it from the environment)
        except ConfigurationError as exc:
            raise AutomationsConfigError([str(exc)]) from None
        if url:
            return url
    raise AutomationsConfigError(
        ["PREFECT_API_URL is not set and no local stack is running: set it, or start one (`tollwatch stack up`)"]
    )


def run_apply(directory: Path, *, dry_run: bool, prune: bool, api_url: str) -> None:
    """Load and validate every file, resolve names, compare with the server, then apply (or only print)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    from tollwatch.prefect.automations.apply import apply, plan, read_existing
    from tollwatch.prefect.automations.compile import PrefectResolver, compile_project
    from tollwatch.prefect.automations.load import load_project

    project = load_project(directory)  # raises before any server call if any file is wrong
    updates: dict[Any, str] = {PREFECT_API_URL: api_url}
    if not PREFECT_API_AUTH_STRING.value() and os.environ.get("PREFECT_API_AUTH_STRING"):  # set after prefect's import
        updates[PREFECT_API_AUTH_STRING] = os.environ["PREFECT_API_AUTH_STRING"]
    with temporary_settings(updates=updates), get_client(sync_client=True) as client:
        desired = compile_project(project, PrefectResolver(client))
        changes = plan(desired, read_existing(client), prune=prune)
        apply(changes, client, dry_run=dry_run, echo=typer.echo)


@automations_app.command("apply")
def apply_command(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the plan and diffs; change nothing")] = False,
    prune: Annotated[
        bool, typer.Option("--prune", help="delete tollwatch-managed automations no file declares any more")
    ] = False,
    directory: Annotated[Path, typer.Option("--dir", help="the automations directory")] = DEFAULT_AUTOMATIONS_DIR,
    local_stack: Annotated[
        bool, typer.Option(help="without PREFECT_API_URL, use the running local stack's server")
    ] = True,
    state_dir: Annotated[
        Path, typer.Option(help="where the local stack keeps its state", envvar="TOLLWATCH_STATE_DIR")
    ] = DEFAULT_STATE_DIR,
) -> None:
    """Create, update (and with --prune delete) Prefect automations so they match the files; idempotent."""
    try:
        run_apply(directory, dry_run=dry_run, prune=prune, api_url=_api_url(local_stack, state_dir))
    except AutomationsConfigError as exc:
        fail(str(exc))
    except httpx.HTTPStatusError as exc:
        fail(f"the Prefect API refused {exc.request.method} {exc.request.url.path}: {exc.response.text[:500]}")
    except httpx.HTTPError as exc:
        fail(f"cannot reach the Prefect API: {type(exc).__name__}: {exc}")
