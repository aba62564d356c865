"""What every `tollwatch` command shares: errors as one red line, the local stack's settings, logging."""

from __future__ import annotations

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
        from tollwatch.adapters.prefect_events import EmitError
        from tollwatch.adapters.socrata import UpstreamError
        from tollwatch.prefect.deploy import DeployError
        from tollwatch.resources import ConfigurationError
        from tollwatch_dev.stack import StackError

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


def use_stack(state_dir: Path) -> None:
    """Point settings and prefect at the running local stack, unless the user configured them explicitly."""
    from tollwatch_dev.stack import LocalStack

    endpoints = LocalStack(state_dir).endpoints()
    for key, value in endpoints.env().items():
        os.environ.setdefault(key, value)


def configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for noisy in ("azure", "httpx", "urllib3", "pyiceberg"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
