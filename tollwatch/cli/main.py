"""`tollwatch` command line: ingest runs, the table, operations — errors as sentences, never tracebacks.

Other distributions add commands through the entry-point group `tollwatch.cli` (each entry point is a function
that takes the app): the dev tools add `stack`, `demo`, `functions` and `watch` that way (tollwatch_dev.cli),
so the product never imports them.
"""

from __future__ import annotations

import sys
from datetime import date
from importlib.metadata import entry_points
from typing import Annotated, Any

import typer

from tollwatch.cli.common import (
    LOCAL_STACK_FILE,
    StateDir,
    configure_logging,
    fail,
    friendly,
    print_table_info,
    use_stack,
)
from tollwatch.contract.settings import DEFAULT_STATE_DIR

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)

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


@app.command("table")
@friendly
def table_info(state_dir: StateDir = DEFAULT_STATE_DIR) -> None:
    """Where the bronze table is, how many rows it has, its current snapshot."""
    if (state_dir / LOCAL_STACK_FILE).exists():
        use_stack(state_dir)
    print_table_info()


def _register_operating_commands() -> None:
    from tollwatch.cli import held as cli_held
    from tollwatch.cli import ops as cli_ops
    from tollwatch.cli.automations import automations_app

    app.command("deploy")(friendly(cli_ops.deploy))
    app.command("backfill")(friendly(cli_ops.backfill))
    app.command("trace")(friendly(cli_ops.trace))
    app.command("audit")(friendly(cli_ops.audit))
    app.command("status")(friendly(cli_ops.status))
    app.command("publish")(friendly(cli_held.publish))
    app.command("discard")(friendly(cli_held.discard))
    app.add_typer(automations_app, name="automations")


_register_operating_commands()


def _register_plugins() -> None:
    """Commands of other installed distributions (entry-point group `tollwatch.cli`)."""
    for entry_point in entry_points(group=CLI_PLUGINS):
        entry_point.load()(app)


CLI_PLUGINS = "tollwatch.cli"
_register_plugins()


def main() -> None:
    """Console entry point."""
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
