"""What every `tollwatch` command shares: errors as one red line, the local stack's settings, logging."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, ParamSpec, TypeVar

import httpx
import typer
from pydantic import ValidationError

from tollwatch.contract.errors import ConfigurationError, TollwatchError, describe
from tollwatch.contract.settings import load_settings

P = ParamSpec("P")
R = TypeVar("R")

StateDir = Annotated[Path, typer.Option(help="where the local stack keeps its state", envvar="TOLLWATCH_STATE_DIR")]


def fail(message: str) -> None:
    typer.secho(f"error: {message}", fg="red", err=True)
    raise typer.Exit(1)


def friendly(fn: Callable[P, R]) -> Callable[P, R]:
    """Turn the errors a user can fix into one red line (`tollwatch.contract.errors.describe`) and exit code 1."""

    @wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except (TollwatchError, ValidationError, FileNotFoundError, ValueError) as exc:
            fail(describe(exc) if isinstance(exc, TollwatchError | ValidationError) else str(exc))
        except httpx.TransportError as exc:  # a server that is down or unreachable: Prefect's, most often
            fail(unreachable(exc))
        raise AssertionError("unreachable")

    return wrapper


def unreachable(exc: httpx.TransportError) -> str:
    """One sentence for a connection that could not be made, naming the Prefect API when that was the target."""
    try:
        url = exc.request.url
    except RuntimeError:  # an error raised without its request
        return f"could not connect ({exc})"
    origin = f"{url.scheme}://{url.netloc.decode()}"
    api = os.environ.get("PREFECT_API_URL", "")
    if "prefect" in sys.modules:
        from prefect.settings import get_current_settings

        api = str(get_current_settings().api.url or api)
    if api and httpx.URL(api).netloc.decode() == url.netloc.decode():
        return (
            f"could not reach the Prefect API at {api} ({exc}) — is the server up? (`make up`, or set PREFECT_API_URL)"
        )
    return f"could not reach {origin} ({exc})"


#: What a running local stack (tollwatch_dev) records in its state dir; its `env` object is the environment that
#: points tollwatch and prefect at it. The file is the whole contract between the two: the product reads it and
#: never imports the dev tools.
LOCAL_STACK_FILE = "stack.json"


def local_stack_env(state_dir: Path) -> dict[str, str]:
    """The environment a local stack under `state_dir` recorded; ConfigurationError when none is recorded."""
    path = state_dir / LOCAL_STACK_FILE
    try:
        recorded = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigurationError(
            f"no local stack is recorded in {state_dir}; run `tollwatch stack up` first (or pass --no-local-stack "
            "and set PREFECT_API_URL and the TOLLWATCH_* settings)"
        ) from None
    except (OSError, ValueError) as exc:
        raise ConfigurationError(f"cannot read {path} ({exc}); stop the stack and start it again") from exc
    env = recorded.get("env") if isinstance(recorded, dict) else None
    if not isinstance(env, dict):
        raise ConfigurationError(f"{path} records no environment; restart the stack (`tollwatch stack up`)")
    values = {str(key): str(value) for key, value in env.items()}
    for key, secret_file in (recorded.get("env_files") or {}).items():  # secrets by reference (owner-only files)
        try:
            values[str(key)] = Path(secret_file).read_text().strip()
        except OSError as exc:
            raise ConfigurationError(f"cannot read {key} for the local stack from {secret_file} ({exc})") from exc
    return values


def use_stack(state_dir: Path) -> None:
    """Point settings and prefect at the running local stack, unless the user configured them explicitly."""
    for key, value in local_stack_env(state_dir).items():
        os.environ.setdefault(key, value)


def configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for noisy in ("azure", "httpx", "urllib3", "pyiceberg"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def print_table_info() -> None:
    from tollwatch.resources import table_store

    settings = load_settings()
    for identifier in (settings.table, settings.daily_totals_table):
        info = table_store(settings, identifier).info()
        typer.echo(f"table    : {info.identifier}")
        typer.echo(f"location : {info.location}")
        typer.echo(f"rows     : {info.rows}")
        typer.echo(f"snapshot : {info.snapshot_id} ({info.snapshots} snapshots)")
