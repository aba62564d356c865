"""What every `tollwatch` command shares: errors as one red line, the local stack's settings, logging."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, ParamSpec, TypeVar

import typer
from pydantic import ValidationError

P = ParamSpec("P")
R = TypeVar("R")

StateDir = Annotated[Path, typer.Option(help="where the local stack keeps its state", envvar="TOLLWATCH_STATE_DIR")]


def fail(message: str) -> None:
    typer.secho(f"error: {message}", fg="red", err=True)
    raise typer.Exit(1)


def friendly(fn: Callable[P, R]) -> Callable[P, R]:
    """Turn the errors a user can fix into one red line and exit code 1."""

    @wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        from tollwatch.clients import ConfigurationError
        from tollwatch.deploy import DeployError
        from tollwatch.dev.stack import StackError
        from tollwatch.emit import EmitError
        from tollwatch.socrata import UpstreamError

        try:
            return fn(*args, **kwargs)
        except ValidationError as exc:
            fail("; ".join(f"{'.'.join(map(str, e['loc'])) or 'input'}: {e['msg']}" for e in exc.errors()))
        except (
            ConfigurationError,
            DeployError,
            StackError,
            EmitError,
            UpstreamError,
            FileNotFoundError,
            ValueError,
        ) as exc:
            fail(str(exc))
        raise AssertionError("unreachable")

    return wrapper


def use_stack(state_dir: Path) -> None:
    """Point settings and prefect at the running local stack, unless the user configured them explicitly."""
    from tollwatch.dev.stack import LocalStack

    endpoints = LocalStack(state_dir).endpoints()
    for key, value in endpoints.env().items():
        os.environ.setdefault(key, value)


def configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for noisy in ("azure", "httpx", "urllib3", "pyiceberg"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
