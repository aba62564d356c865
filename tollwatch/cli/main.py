"""`tollwatch` command line: the local stack, ingest runs, and the table — errors as sentences, never tracebacks."""

from __future__ import annotations

import json
import sys
from datetime import date
from typing import Annotated, Any

import typer

from tollwatch.cli.common import StateDir, configure_logging, fail, friendly, use_stack
from tollwatch.contract.settings import DEFAULT_STATE_DIR, load_settings

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
stack_app = typer.Typer(no_args_is_help=True, help="Start, inspect and stop the local stack.")
app.add_typer(stack_app, name="stack")

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
    from tollwatch_dev.stack import LocalStack

    stack = LocalStack(
        state_dir,
        mirror_start=date.fromisoformat(mirror_start),
        mirror_through=date.fromisoformat(mirror_through),
        db=db,
    )
    endpoints = stack.up()
    typer.echo(f"Prefect UI/API : {endpoints.prefect_api_url.removesuffix('/api')}")
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
    from tollwatch_dev.stack import LocalStack

    for key, value in sorted(LocalStack(state_dir).endpoints().env().items()):
        typer.echo(f"export {key}={json.dumps(value)}")


@stack_app.command("status")
@friendly
def stack_status(state_dir: StateDir = DEFAULT_STATE_DIR) -> None:
    """Show whether each local service is alive and healthy."""
    from tollwatch_dev.stack import LocalStack

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
    from tollwatch_dev.stack import LocalStack

    LocalStack(state_dir).down()
    typer.echo("local stack stopped")


# ---------------------------------------------------------------------------------------------- ingest


def _run_ingest(params: dict[str, Any]) -> Any:
    from tollwatch.prefect.flows.ingest import ingest

    return ingest(**params)


@app.command()
@friendly
def ingest(
    start: Annotated[str | None, typer.Option(help="first day (YYYY-MM-DD) of a window")] = None,
    stop: Annotated[str | None, typer.Option(help="day after the last one (exclusive)")] = None,
    rows_updated_at: Annotated[int | None, typer.Option(help="refresh mode: the publish's rowsUpdatedAt")] = None,
    previous_rows_updated_at: Annotated[int | None, typer.Option(help="refresh mode: the previous watermark")] = None,
    request_id: Annotated[str, typer.Option(help="window mode: groups a backfill's chunks")] = "manual",
    local_stack: Annotated[bool, typer.Option(help="use the running local stack for unset settings")] = True,
    state_dir: StateDir = DEFAULT_STATE_DIR,
    verbose: bool = False,
) -> None:
    """Run the ingest flow once, in this process, and print what it committed."""
    configure_logging(verbose)
    if local_stack:
        use_stack(state_dir)
    params: dict[str, Any] = {"request_id": request_id}
    if start or stop:
        if not (start and stop):
            fail("--start and --stop go together")
        from tollwatch.contract.events import Window

        window = Window(start=date.fromisoformat(start), stop=date.fromisoformat(stop))  # type: ignore[arg-type]
        params |= {"start": window.start, "stop": window.stop}
    if rows_updated_at is not None:
        params |= {"rows_updated_at": rows_updated_at, "previous_rows_updated_at": previous_rows_updated_at}
    completed = _run_ingest(params)
    typer.echo(completed.model_dump_json(indent=2))


@app.command()
@friendly
def demo(
    state_dir: StateDir = DEFAULT_STATE_DIR,
    timeout: Annotated[float, typer.Option(help="seconds to wait for the ingest and downstream runs")] = 300.0,
) -> None:
    """The main job: stack up, deploy, apply automations, publish a week upstream, and follow it downstream."""
    from tollwatch_dev.demo import run_demo

    configure_logging(False)
    result = run_demo(state_dir, timeout_s=timeout, say=typer.echo)
    typer.echo("")
    typer.echo(result.trace.render())
    typer.echo("")
    _print_table_info()
    typer.echo(f"Prefect UI: {result.prefect_ui}  (run again to publish one more week; stop with `make down`)")
    if not result.succeeded:
        fail("the chain did not end in tollwatch.job.completed: see the trace above and the Prefect UI")


def _print_table_info() -> None:
    from tollwatch.resources import table_store

    settings = load_settings()
    for identifier in (settings.table, settings.daily_totals_table):
        info = table_store(settings, identifier).info()
        typer.echo(f"table    : {info.identifier}")
        typer.echo(f"location : {info.location}")
        typer.echo(f"rows     : {info.rows}")
        typer.echo(f"snapshot : {info.snapshot_id} ({info.snapshots} snapshots)")


@app.command("table")
@friendly
def table_info(state_dir: StateDir = DEFAULT_STATE_DIR) -> None:
    """Where the bronze table is, how many rows it has, its current snapshot."""
    if (state_dir / "stack.json").exists():
        use_stack(state_dir)
    _print_table_info()


def _register_operating_commands() -> None:
    from tollwatch.cli import ops as cli_ops
    from tollwatch.cli.automations import automations_app

    app.command("deploy")(friendly(cli_ops.deploy))
    app.command("backfill")(friendly(cli_ops.backfill))
    app.command("trace")(friendly(cli_ops.trace))
    app.command("audit")(friendly(cli_ops.audit))
    app.command("status")(friendly(cli_ops.status))
    app.add_typer(automations_app, name="automations")


_register_operating_commands()


def main() -> None:
    """Console entry point."""
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


# ---------------------------------------------------------------------------------------------- functions
# The Azure Function app, locally: serve its HTTP routes, run its timer once (tollwatch_dev.funchost).

functions_app = typer.Typer(no_args_is_help=True, help="Run the Azure Function app's handlers locally.")
app.add_typer(functions_app, name="functions")


@functions_app.command("serve")
@friendly
def functions_serve(
    port: Annotated[int, typer.Option(help="loopback port to listen on")] = 7071,
    local_stack: Annotated[bool, typer.Option(help="use the running local stack for unset settings")] = True,
    state_dir: StateDir = DEFAULT_STATE_DIR,
    verbose: bool = False,
) -> None:
    """Serve the app's HTTP routes on 127.0.0.1 with function-key auth (key: TOLLWATCH_FUNCTION_KEY)."""
    from tollwatch_dev.funchost import FunctionHost, FunctionHostError, load_function_app

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


@app.command("watch")
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
    from tollwatch_dev.funchost import FunctionHostError, find_function, load_function_app

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
