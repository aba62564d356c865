"""Make the server's automations match the declared ones: plan (a pure comparison), then apply.

Automations are matched by name (Prefect ids differ per server, names are what the files declare). A declared
automation that exists and differs is updated in place (same id, so its history and the UI links survive);
one that is equal is left alone, which makes a second apply a no-op. Deleting is opt-in (`prune`) and limited
to automations tagged `tollwatch:managed`: automations created by hand or by other projects are never touched.

Equality is on Prefect's own serialisation of the AutomationCore fields (`model_dump(mode="json")`), minus
what the server sets (id, created, updated, trigger ids) and with set-valued trigger fields sorted, so the
comparison does not depend on key or set order.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal
from uuid import UUID

import yaml

from tollwatch.prefect.automations.models import MANAGED_TAG

if TYPE_CHECKING:
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.events.schemas.automations import Automation, AutomationCore

ChangeKind = Literal["create", "update", "unchanged", "delete"]

#: The fields a project declares; everything else on a server automation is server state.
COMPARED_FIELDS = frozenset(
    {"name", "description", "enabled", "tags", "trigger", "actions", "actions_on_trigger", "actions_on_resolve"}
)
#: Trigger fields that are sets in Prefect's models: their JSON list order means nothing.
_SET_FIELDS = frozenset({"expect", "after", "for_each"})
_PAGE = 200
_SYMBOLS: dict[ChangeKind, str] = {"create": "+", "update": "~", "unchanged": "=", "delete": "-"}


@dataclass(frozen=True)
class Change:
    """One line of the plan: what happens to one automation, and the YAML diff for an update."""

    kind: ChangeKind
    name: str
    desired: AutomationCore | None = None
    existing: Automation | None = None
    diff: str = ""


@dataclass(frozen=True)
class Plan:
    """What an apply would do. `duplicates` and `undeclared` are reported, never changed."""

    changes: tuple[Change, ...]
    duplicates: tuple[tuple[Automation, tuple[Automation, ...]], ...] = ()
    undeclared: tuple[Automation, ...] = ()

    def of(self, kind: ChangeKind) -> list[Change]:
        return [change for change in self.changes if change.kind == kind]

    @property
    def has_changes(self) -> bool:
        return any(change.kind != "unchanged" for change in self.changes)


@dataclass
class Applied:
    """What `apply` did (or, in a dry run, would do): the printed lines and the ids it touched."""

    lines: list[str] = field(default_factory=list)
    created: dict[str, UUID] = field(default_factory=dict)
    updated: dict[str, UUID] = field(default_factory=dict)
    deleted: dict[str, UUID] = field(default_factory=dict)


def _sorted_sets(node: Any) -> Any:
    if isinstance(node, dict):
        return {
            key: sorted(value) if key in _SET_FIELDS and isinstance(value, list) else _sorted_sets(value)
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [_sorted_sets(item) for item in node]
    return node


def normalised(automation: AutomationCore) -> dict[str, Any]:
    """The comparable form of an automation (declared or read back from the server)."""
    return _sorted_sets(automation.model_dump(mode="json", include=set(COMPARED_FIELDS)))


def _diff(existing: dict[str, Any], desired: dict[str, Any], name: str) -> str:
    before = yaml.safe_dump(existing, sort_keys=True, allow_unicode=True, width=1000).splitlines()
    after = yaml.safe_dump(desired, sort_keys=True, allow_unicode=True, width=1000).splitlines()
    lines = difflib.unified_diff(before, after, fromfile=f"server: {name}", tofile=f"declared: {name}", lineterm="")
    return "\n".join(lines)


def plan(desired: Sequence[AutomationCore], existing: Sequence[Automation], *, prune: bool = False) -> Plan:
    """Compare declared automations with the server's (`existing` oldest first) and decide, by name.

    A name the server holds more than once (made by hand) is matched to the oldest; the others are reported.
    """
    by_name: dict[str, list[Automation]] = {}
    for automation in existing:
        by_name.setdefault(automation.name, []).append(automation)

    changes: list[Change] = []
    duplicates: list[tuple[Automation, tuple[Automation, ...]]] = []
    for automation in desired:
        matches = by_name.get(automation.name, [])
        if not matches:
            changes.append(Change("create", automation.name, desired=automation))
            continue
        current, extra = matches[0], tuple(matches[1:])
        if extra:
            duplicates.append((current, extra))
        want, have = normalised(automation), normalised(current)
        if want == have:
            changes.append(Change("unchanged", automation.name, desired=automation, existing=current))
        else:
            diff = _diff(have, want, automation.name)
            changes.append(Change("update", automation.name, desired=automation, existing=current, diff=diff))

    declared = {automation.name for automation in desired}
    stale = [
        automation
        for automation in existing
        if automation.name not in declared and MANAGED_TAG in (automation.tags or [])
    ]
    if prune:
        changes += [Change("delete", automation.name, existing=automation) for automation in stale]
    return Plan(changes=tuple(changes), duplicates=tuple(duplicates), undeclared=() if prune else tuple(stale))


def read_existing(client: SyncPrefectClient) -> list[Automation]:
    """All automations on the server, oldest first (paged: the API caps one response)."""
    from prefect.client.schemas.sorting import AutomationSort

    found: list[Automation] = []
    while True:
        page = client.read_automations(sort=AutomationSort.CREATED_DESC, limit=_PAGE, offset=len(found))
        found += page
        if len(page) < _PAGE:
            return list(reversed(found))


def summary(plan: Plan, *, dry_run: bool) -> str:
    """The last line of an apply: counts, or `no changes: …` when the server already matches."""
    if not plan.has_changes:
        return f"no changes: {len(plan.changes)} automations up to date"
    counts = (
        f"{len(plan.of('create'))} created, {len(plan.of('update'))} updated, "
        f"{len(plan.of('unchanged'))} unchanged, {len(plan.of('delete'))} deleted"
    )
    return f"dry run, nothing changed; would be: {counts}" if dry_run else counts


def apply(
    plan: Plan, client: SyncPrefectClient, dry_run: bool = False, *, echo: Callable[[str], None] | None = None
) -> Applied:
    """Carry out the plan (creates, updates, deletes), printing each step through `echo` as it happens.

    With nothing to change, only the `no changes` line is printed. A dry run prints the same plan and diffs
    and changes nothing.
    """
    applied = Applied()

    def say(line: str) -> None:
        applied.lines.append(line)
        if echo is not None:
            echo(line)

    if plan.has_changes:
        for change in plan.changes:
            say(f"{_SYMBOLS[change.kind]} {change.kind} {change.name}")
            if change.diff:
                for line in change.diff.splitlines():
                    say(f"    {line}")
            if not dry_run:
                _carry_out(change, client, applied)
    for kept, extra in plan.duplicates:
        ids = ", ".join(str(automation.id) for automation in extra)
        say(f"! duplicate {kept.name}: kept in sync the oldest ({kept.id}); left alone {ids} (delete by hand)")
    for automation in plan.undeclared:
        say(f"? not declared {automation.name} (tagged {MANAGED_TAG}; --prune deletes it)")
    say(summary(plan, dry_run=dry_run))
    return applied


def _carry_out(change: Change, client: SyncPrefectClient, applied: Applied) -> None:
    if change.kind == "create" and change.desired is not None:
        applied.created[change.name] = client.create_automation(change.desired)
    elif change.kind == "update" and change.desired is not None and change.existing is not None:
        client.update_automation(change.existing.id, change.desired)
        applied.updated[change.name] = change.existing.id
    elif change.kind == "delete" and change.existing is not None:
        client.delete_automation(change.existing.id)
        applied.deleted[change.name] = change.existing.id
