"""The dev tools' commands, added to the `tollwatch` CLI through the entry-point group `tollwatch.cli`.

`tollwatch stack up|env|status|down` (the local stack), `tollwatch demo` (the main job, end to end),
`tollwatch functions serve` and `tollwatch watch --once` (the Function app's handlers, locally). They live here
because they start development services; the product's CLI (tollwatch.cli) finds them by entry point and never
imports this package.
"""

from __future__ import annotations

import json
from datetime import date
from typing import Annotated

import typer

from tollwatch.cli.common import StateDir, configure_logging, fail, friendly, print_table_info, use_stack
from tollwatch.contract.settings import DEFAULT_STATE_DIR, load_settings
from tollwatch_dev.demo import run_demo
from tollwatch_dev.funchost import FunctionHost, FunctionHostError, find_function, load_function_app
from tollwatch_dev.stack import LocalStack
from tollwatch_dev.stack_secrets import auth_path

stack_app = typer.Typer(no_args_is_help=True, help="Start, inspect and stop the local stack.")

# ---------------------------------------------------------------------------------------------- stack


@stack_app.command("up")
@friendly
def stack_up(
    state_dir: StateDir = DEFAULT_STATE_DIR,
    mirror_start: Annotated[str, typer.Option(help="first day the mirror serves")] = "2024-01-01",
    mirror_through: Annotated[str, typer.Option(help="day after the last one the mirror serves")] = "2025-01-01",
    db: Annotated[
        str, typer.Option(help="the Prefect server's database: postgres (as in production) or sqlite (lightest)")
    ] = "postgres",
) -> None:
    """Start PostgreSQL, Azurite, a Prefect server, the Socrata mirror, the inbox and a worker on loopback."""
    stack = LocalStack(
        state_dir,
        mirror_start=date.fromisoformat(mirror_start),
        mirror_through=date.fromisoformat(mirror_through),
        db=db,
    )
    endpoints = stack.up()
    typer.echo(f"Prefect UI/API : {endpoints.prefect_api_url.removesuffix('/api')}")
    typer.echo(f"Prefect login  : the password is in {auth_path(endpoints.state_dir)} (owner-only; basic auth)")
    typer.echo(f"Prefect DB     : {endpoints.prefect_database_url}")
    typer.echo(f"Azurite blob   : {endpoints.blob_url}")
    typer.echo(f"Socrata mirror : {endpoints.mirror_url}")
    typer.echo('Environment for other shells (eval "$(tollwatch stack env)"):')
    for key in sorted(endpoints.env()):
        typer.echo(f"  {key}")


@stack_app.command("env")
@friendly
def stack_env(state_dir: StateDir = DEFAULT_STATE_DIR) -> None:
    """Print `export` lines that point tollwatch and prefect at the running stack."""
    for key, value in sorted(LocalStack(state_dir).endpoints().env().items()):
        typer.echo(f"export {key}={json.dumps(value)}")


@stack_app.command("status")
@friendly
def stack_status(state_dir: StateDir = DEFAULT_STATE_DIR) -> None:
    """Show whether each local service is alive and healthy."""
    statuses = LocalStack(state_dir).status()
    for status in statuses.values():
        state = "healthy" if status.healthy else ("alive" if status.alive else "down")
        database = f"database {status.database}" if status.database else ""
        parts = [f"{status.name:8} {state:8}", status.url or "", database, status.detail]
        typer.echo(" ".join(part for part in parts if part))
    if not all(s.healthy for s in statuses.values()):
        raise typer.Exit(1)


@stack_app.command("down")
@friendly
def stack_down(state_dir: StateDir = DEFAULT_STATE_DIR) -> None:
    """Stop every local service and forget the stack (data under the state dir is kept)."""
    LocalStack(state_dir).down()
    typer.echo("local stack stopped")


@friendly
def demo(
    state_dir: StateDir = DEFAULT_STATE_DIR,
    timeout: Annotated[float, typer.Option(help="seconds to wait for the ingest and downstream runs")] = 300.0,
) -> None:
    """The main job: stack up, deploy, apply automations, publish a week upstream, and follow it downstream."""
    configure_logging(False)
    result = run_demo(state_dir, timeout_s=timeout, say=typer.echo)
    typer.echo("")
    typer.echo(result.trace.render())
    typer.echo("")
    print_table_info()
    typer.echo(f"Prefect UI: {result.prefect_ui}  (run again to publish one more week; stop with `make down`)")
    typer.echo(f"Prefect UI login: the password is in {auth_path(state_dir.resolve())}")
    if not result.succeeded:
        fail("the chain did not end in tollwatch.job.completed: see the trace above and the Prefect UI")


# ---------------------------------------------------------------------------------------------- functions
# The Azure Function app, locally: serve its HTTP routes, run its timer once (tollwatch_dev.funchost).

functions_app = typer.Typer(no_args_is_help=True, help="Run the Azure Function app's handlers locally.")


@functions_app.command("serve")
@friendly
def functions_serve(
    port: Annotated[int, typer.Option(help="loopback port to listen on")] = 7071,
    local_stack: Annotated[bool, typer.Option(help="use the running local stack for unset settings")] = True,
    state_dir: StateDir = DEFAULT_STATE_DIR,
    verbose: bool = False,
) -> None:
    """Serve the app's HTTP routes on 127.0.0.1 with function-key auth (key: TOLLWATCH_FUNCTION_KEY)."""
    configure_logging(verbose)
    if local_stack and (state_dir / "stack.json").exists():
        use_stack(state_dir)
    settings = load_settings()
    key = settings.function_key.get_secret_value() if settings.function_key else None
    try:
        host = FunctionHost(load_function_app(), function_key=key, port=port)
    except (FunctionHostError, OSError) as exc:
        fail(str(exc))
        return
    for route in host.routes.values():
        auth = "function key" if route.needs_key else "anonymous"
        typer.echo(f"  {','.join(sorted(route.methods)):13} {host.url}{route.path}  ({route.function_name}, {auth})")
    typer.echo("send the key as header x-functions-key or query ?code=… ; Ctrl-C stops")
    try:
        host.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        host.stop()


@friendly
def watch(
    once: Annotated[bool, typer.Option("--once", help="run the watch_upstream timer handler once")] = False,
    past_due: Annotated[bool, typer.Option(help="tell the handler the tick is late (it logs the catch-up)")] = False,
    local_stack: Annotated[bool, typer.Option(help="use the running local stack for unset settings")] = True,
    state_dir: StateDir = DEFAULT_STATE_DIR,
    verbose: bool = False,
) -> None:
    """Run the upstream watcher (the Function app's timer handler) in this process."""
    from azure.core.exceptions import AzureError
    from azure.functions.timer import TimerRequest  # the concrete class (func.TimerRequest is the abstract type)

    from tollwatch.core.watermark import WatermarkConflict

    if not once:
        fail("only --once is supported here: the schedule runs in Azure Functions (TOLLWATCH_WATCH_SCHEDULE)")
    configure_logging(verbose)
    if local_stack and (state_dir / "stack.json").exists():
        use_stack(state_dir)
    try:
        handler = find_function(load_function_app(), "watch_upstream")
        handler(TimerRequest(past_due=past_due))
    except (FunctionHostError, WatermarkConflict) as exc:
        fail(str(exc))
    except AzureError as exc:
        fail(f"blob storage: {type(exc).__name__}: {exc.message}")


def register(app: typer.Typer) -> None:
    """Entry point (`tollwatch.cli`): add the dev commands to the product's app."""
    app.add_typer(stack_app, name="stack")
    app.add_typer(functions_app, name="functions")
    app.command("demo")(demo)
    app.command("watch")(watch)
