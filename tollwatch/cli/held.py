"""Settling held loads: `tollwatch publish <refresh-id>` (an operator's override) and `tollwatch discard <refresh-id>`,
and the held loads `tollwatch status` lists.

A held load failed an `error` check on its audit branch (see `tollwatch.core.wap`): `main` and subscribers never saw
it. Publishing it anyway fast-forwards `main` (rebuilding the load on a `main` that moved since), records who and
why, and announces it like any completed load, so subscribers run once; discarding drops its branch. Both are
idempotent: repeating one repeats its events with the same ids (Prefect drops them) and changes nothing.
"""

from __future__ import annotations

import getpass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Annotated

import typer

from tollwatch.cli.common import StateDir, configure_logging, use_stack
from tollwatch.contract.settings import DEFAULT_STATE_DIR, load_settings

if TYPE_CHECKING:
    from tollwatch.contract.events import TollwatchEvent
    from tollwatch.contract.quality import HoldRecord, Settlement
    from tollwatch.contract.settings import Settings
    from tollwatch.resources import Resources

RefreshId = Annotated[str, typer.Argument(help="the refresh id of the held load (`tollwatch status` lists them)")]
Reason = Annotated[str, typer.Option("--reason", help="why (recorded with the decision and sent in its event)")]
By = Annotated[str | None, typer.Option("--by", help="who decides (default: the current user)")]
LocalStack = Annotated[bool, typer.Option(help="use the running local stack for unset settings")]


def _resources(local_stack: bool, state_dir: StateDir) -> Resources:
    from tollwatch.resources import Resources

    configure_logging(False)
    if local_stack:
        use_stack(state_dir)
    return Resources(load_settings())


def publish(
    refresh_id: RefreshId,
    reason: Reason,
    by: By = None,
    local_stack: LocalStack = True,
    state_dir: StateDir = DEFAULT_STATE_DIR,
) -> None:
    """Publish a held load despite its failed checks (an override, recorded with who and why) and announce it."""
    from tollwatch.core.wap import override

    with _resources(local_stack, state_dir) as res:
        _refuse_out_of_reach(res.settings, refresh_id)
        settlement = override(
            res.branches, refresh_id, by=by or getpass.getuser(), reason=reason, rebuild=lambda r: _rebuild(res, r)
        )
        completed = _completed_event(res, settlement)
        res.events.emit([_settled_event(res.settings, settlement), completed])
        if res.completion_publisher is not None:
            res.completion_publisher.publish(completed)
    typer.echo(
        f"published refresh {refresh_id}: main is at snapshot {settlement.snapshot_id} "
        f"(override by {settlement.by} at {settlement.at:%Y-%m-%d %H:%M} UTC: {settlement.reason})"
    )


def discard(
    refresh_id: RefreshId,
    reason: Reason,
    by: By = None,
    local_stack: LocalStack = True,
    state_dir: StateDir = DEFAULT_STATE_DIR,
) -> None:
    """Discard a held load: its audit branch is dropped, `main` is unchanged, and a later publish can load again."""
    with _resources(local_stack, state_dir) as res:
        _refuse_out_of_reach(res.settings, refresh_id)
        settlement = res.branches.discard(refresh_id, by=by or getpass.getuser(), reason=reason)
        res.events.emit([_settled_event(res.settings, settlement)])
    typer.echo(f"discarded refresh {refresh_id} ({settlement.by} at {settlement.at:%Y-%m-%d %H:%M} UTC)")


def held_lines(held: list[HoldRecord], now: datetime | None = None, committed_through: int | None = None) -> list[str]:
    """One line per held load for `tollwatch status`: when, what, why, and the two commands that settle it.

    A held refresh whose publish `main` is already committed past (a later refresh covered its rows, e.g. the
    corrected republish) is marked superseded: discarding it loses nothing.
    """
    now = now or datetime.now(UTC)
    lines = []
    for record in held:
        days = record.touched or record.window
        covered = record.rows_updated_at is not None and (committed_through or 0) >= record.rows_updated_at
        lines.append(
            f"{record.refresh_id}  {record.mode} {days or ''}  held {_age(now - record.held_at)} ago on "
            f"{record.branch}: {', '.join(record.failing)} failed"
            + ("  (superseded: main is committed past its publish; discard it)" if covered else "")
        )
    if held:
        lines.append("settle each with `tollwatch publish <refresh-id> --reason …` or `tollwatch discard … --reason …`")
    return lines


# ---------------------------------------------------------------------------------------------- internals


def _age(delta: timedelta) -> str:
    minutes = int(delta.total_seconds() // 60)
    if minutes < 60:
        return f"{minutes} min"
    return f"{minutes // 60} h" if minutes < 48 * 60 else f"{minutes // 1440} days"


def _refuse_out_of_reach(settings: Settings, refresh_id: str) -> None:
    """engine=databricks: the table (its branches and hold records) is in Spark's catalog, which this process does
    not open; say how to settle the load there instead of failing on a catalog it cannot read."""
    if settings.ledger_in_reach:
        return
    from tollwatch.contract.table import HELD_PREFIX, audit_branch

    table, branch = f"{settings.catalog_name}.{settings.table}", audit_branch(refresh_id)
    raise typer.BadParameter(
        "engine=databricks: the held load is on a branch of the table in Spark's catalog; settle it from a "
        f"notebook or SQL warehouse: publish with CALL {settings.catalog_name}.system.fast_forward('{settings.table}', "
        f"'main', '{branch}'), discard with ALTER TABLE {table} DROP BRANCH {branch}; then ALTER TABLE {table} "
        f"UNSET TBLPROPERTIES ('{HELD_PREFIX}{refresh_id}')"
    )


def _rebuild(res: Resources, record: HoldRecord) -> None:
    """Write the held load again, from its landing, onto a branch cut from the current `main` (pyiceberg: both
    local engines write the same table alike, tests/integration/test_engines.py)."""
    from tollwatch.core.ingest import IngestRequest, load_landing
    from tollwatch.core.schema import target_schema

    if record.landing_prefix is None:
        raise typer.BadParameter(f"refresh {record.refresh_id}: its hold record names no landing to rebuild from")
    manifest = res.landing.read_manifest(record.landing_prefix)
    request = IngestRequest(
        mode=record.mode,
        domain=res.settings.upstream_domain,
        dataset_id=res.settings.upstream_dataset_id,
        refresh_id=record.refresh_id,
        rows_updated_at=record.rows_updated_at,
        window=record.window,
    )
    res.branches.open(record.branch, target_schema(manifest.columns))
    load_landing(request, manifest, res.landing, res.table, flow_run_id=record.flow_run_id, branch=record.branch)


def _settled_event(settings: Settings, settlement: Settlement) -> TollwatchEvent:
    from tollwatch.contract.events import LoadSettled, TollwatchEvent

    payload = LoadSettled(
        table=settings.table,
        catalog=settings.catalog_name,
        refresh_id=settlement.refresh_id,
        action=settlement.action,
        by=settlement.by,
        reason=settlement.reason,
        snapshot_id=settlement.snapshot_id,
    )
    return TollwatchEvent.of(payload)


def _completed_event(res: Resources, settlement: Settlement) -> TollwatchEvent:
    """The completion subscribers wait for, as the flow would have announced it, with quality `overridden`."""
    from tollwatch.contract.events import IngestionCompleted, QualityOutcome, TollwatchEvent

    record = settlement.held
    assert record is not None  # a published settlement always records the hold it settled
    settings = res.settings
    completed = IngestionCompleted(
        table=settings.table,
        catalog=settings.catalog_name,
        mode=record.mode,
        window=record.touched or record.window,
        refresh_id=record.refresh_id,
        rows_fetched=record.rows_fetched,
        rows_written=record.rows_written,
        rows_rejected=record.rows_rejected,
        snapshot_id=settlement.snapshot_id,
        landing_uri=res.landing.uri(record.landing_prefix) if record.landing_prefix else "",
        flow_run_id=record.flow_run_id,
        engine=settings.engine,
        committed_through=res.table.committed_through(),
        quality=QualityOutcome.model_validate(
            {
                **record.quality,
                "verdict": "overridden",
                "overridden_by": settlement.by,
                "override_reason": settlement.reason,
            }
        ),
    )
    return TollwatchEvent.of(completed)
