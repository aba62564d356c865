"""Declarations → Prefect `AutomationCore` objects, validated by Prefect's own models (client and server side).

Two steps, so that every file can be checked before anything touches a server:

1. `declarations(project)`: each automation file and each subscription becomes a `Declaration`, an
   AutomationCore-shaped dict whose block and deployment ids are still symbolic `Reference`s;
2. `compile_project(project, resolver)`: references become ids (through a `Resolver`, normally the Prefect
   API), then Prefect's models build the final objects.

`check_declaration` runs Prefect's validation on step 1's output with a stand-in id, which is what lets
`load_project` report a bad template or a wrong trigger field without a server.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import TYPE_CHECKING, Any, Literal, Protocol, get_args
from uuid import UUID

from pydantic import BaseModel, RootModel, TypeAdapter, ValidationError

from tollwatch.contract.events import INGESTION_LABELS, label_value
from tollwatch.prefect.automations.models import (
    MANAGED_TAG,
    PROJECT_TAG,
    RUN_JOB_DEPLOYMENT,
    WEBHOOK_BLOCK_TYPE,
    AutomationFile,
    AutomationsConfigError,
    CallWebhook,
    Loc,
    Project,
    RunDatabricksJob,
    RunLocalJob,
    Subscription,
    SubscriptionFile,
    clean_loc,
    problem_line,
    subscription_automation_name,
)

if TYPE_CHECKING:
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.events.schemas.automations import AutomationCore

#: The whole triggering event as JSON. The server's template environment replaces Jinja's `tojson` with one
#: that dumps pydantic models (`prefect.server.utilities.user_templates._tojson`), so the event object
#: renders as its JSON form (id, event, occurred, resource, related, payload, received).
DEFAULT_WEBHOOK_PAYLOAD = "{{ event | tojson }}"

#: Single-expression template: Prefect renders it with `| tojson` and parses it back, so the job gets a dict.
COMPLETION_PARAMETER = "{{ event.payload }}"

_ACTION_LISTS = ("actions", "actions_on_trigger", "actions_on_resolve")
#: A stand-in id used only to run Prefect's validation before references are resolved.
_UNRESOLVED = UUID("00000000-0000-4000-8000-000000000000")


@dataclass(frozen=True)
class Reference:
    """A block (`<type-slug>/<name>`) or deployment (`<flow>/<deployment>`) named in a file."""

    kind: Literal["block", "deployment"]
    name: str

    def missing(self) -> str:
        """Why the apply cannot continue, and how to fix it."""
        if self.kind == "deployment":
            return f"deployment {self.name} does not exist on the Prefect server; deploy first: prefect deploy --all"
        slug = self.name.partition("/")[0]
        return (
            f"block {self.name} does not exist on the Prefect server; create it first: "
            f"`prefect block create {slug}` or the UI's Blocks page (on the local stack, `tollwatch demo` creates "
            "the blocks the example automations use)"
        )


class Resolver(Protocol):
    """Finds the server-side ids of named blocks and deployments (None: no such thing)."""

    def block_document_id(self, type_slug: str, name: str) -> UUID | None: ...

    def deployment_id(self, name: str) -> UUID | None: ...


class PrefectResolver:
    """Looks names up through the Prefect API (`get_client(sync_client=True)`), each name once."""

    def __init__(self, client: SyncPrefectClient) -> None:
        self._client = client
        self._blocks: dict[tuple[str, str], UUID | None] = {}
        self._deployments: dict[str, UUID | None] = {}

    def block_document_id(self, type_slug: str, name: str) -> UUID | None:
        from prefect.exceptions import ObjectNotFound

        key = (type_slug, name)
        if key not in self._blocks:
            try:
                document = self._client.read_block_document_by_name(name, type_slug, include_secrets=False)
                self._blocks[key] = document.id
            except ObjectNotFound:
                self._blocks[key] = None
        return self._blocks[key]

    def deployment_id(self, name: str) -> UUID | None:
        from prefect.exceptions import ObjectNotFound

        if name not in self._deployments:
            try:
                self._deployments[name] = self._client.read_deployment_by_name(name).id
            except ObjectNotFound:
                self._deployments[name] = None
        return self._deployments[name]


@dataclass(frozen=True)
class Declaration:
    """One automation to apply: its AutomationCore fields, with `Reference`s where server ids go.

    `file_locs` maps paths in `body` back to the file's own paths (longest prefix wins), so a problem found in
    the generated automation is reported where the user can fix it.
    """

    name: str
    source: str
    body: dict[str, Any]
    file_locs: tuple[tuple[Loc, Loc], ...] = field(default=())

    def file_loc(self, loc: Loc) -> Loc:
        for prefix, replacement in sorted(self.file_locs, key=lambda rule: -len(rule[0])):
            if loc[: len(prefix)] == prefix:
                return replacement + loc[len(prefix) :]
        return loc

    def references(self) -> list[tuple[Loc, Reference]]:
        """Every reference in the body, with its path in the body."""
        return list(_walk_references(self.body, ()))

    def resolved(self, ids: Callable[[Reference], UUID]) -> dict[str, Any]:
        """The body with every reference replaced by its id."""
        return _replace_references(self.body, ids)


def _walk_references(node: Any, loc: Loc) -> Iterator[tuple[Loc, Reference]]:
    if isinstance(node, Reference):
        yield loc, node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from _walk_references(value, (*loc, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _walk_references(value, (*loc, index))


def _replace_references(node: Any, ids: Callable[[Reference], UUID]) -> Any:
    if isinstance(node, Reference):
        return str(ids(node))
    if isinstance(node, dict):
        return {key: _replace_references(value, ids) for key, value in node.items()}
    if isinstance(node, list):
        return [_replace_references(value, ids) for value in node]
    return node


# ------------------------------------------------------------------------------------------ declarations


def _tags(extra: list[str]) -> list[str]:
    return list(dict.fromkeys([PROJECT_TAG, MANAGED_TAG, *extra]))


def _automation_declaration(source: str, spec: AutomationFile) -> Declaration:
    body: dict[str, Any] = {
        "name": spec.name,
        "description": spec.description,
        "enabled": spec.enabled,
        "tags": _tags(spec.tags),
        "trigger": spec.trigger,
    }
    rules: list[tuple[Loc, Loc]] = []
    for key in _ACTION_LISTS:
        body[key] = []
        for index, action in enumerate(getattr(spec, key)):
            fields = action.prefect_fields()
            if action.block is not None:
                fields["block_document_id"] = Reference("block", action.block)
                rules.append(((key, index, "block_document_id"), (key, index, "block")))
            if action.deployment is not None:
                fields["deployment_id"] = Reference("deployment", action.deployment)
                fields.setdefault("source", "selected")
                rules.append(((key, index, "deployment_id"), (key, index, "deployment")))
            body[key].append(fields)
    return Declaration(name=spec.name, source=source, body=body, file_locs=tuple(rules))


def subscription_trigger(subscription: Subscription) -> dict[str, Any]:
    """Reactive event trigger on the table's resource, narrowed by the labels of the `when:` conditions."""
    match: dict[str, str | list[str]] = {
        "prefect.resource.id": "iceberg.*",
        INGESTION_LABELS["table"]: subscription.table,
    }
    for key, value in subscription.when.items():
        match[INGESTION_LABELS[key]] = (
            [label_value(v) for v in value] if isinstance(value, list) else label_value(value)
        )
    return {
        "type": "event",
        "posture": "Reactive",
        "expect": list(subscription.events),
        "match": match,
        "threshold": 1,
        "within": 0,
    }


def _subscription_action(action: RunLocalJob | RunDatabricksJob | CallWebhook) -> dict[str, Any]:
    if isinstance(action, RunLocalJob | RunDatabricksJob):
        parameters: dict[str, Any] = {"completion": COMPLETION_PARAMETER, "parameters": action.parameters}
        if isinstance(action, RunLocalJob):
            parameters["job"] = action.job
        else:
            parameters |= {"job": str(action.job_id), "databricks_job_id": action.job_id}
        return {
            "type": "run-deployment",
            "source": "selected",
            "deployment_id": Reference("deployment", RUN_JOB_DEPLOYMENT),
            "parameters": parameters,
        }
    return {
        "type": "call-webhook",
        "block_document_id": Reference("block", f"{WEBHOOK_BLOCK_TYPE}/{action.block}"),
        "payload": action.payload if action.payload is not None else DEFAULT_WEBHOOK_PAYLOAD,
    }


def subscription_declaration(source: str, team: SubscriptionFile, index: int, sub: Subscription) -> Declaration:
    name = subscription_automation_name(team.team, sub.name)
    contact = f", contact {team.contact}" if team.contact else ""
    description = f"{sub.description or sub.name} (subscription of team {team.team}{contact})"
    here: Loc = ("subscriptions", index)
    action: Loc = (*here, "action")
    rules: list[tuple[Loc, Loc]] = [
        ((), here),
        (("actions", 0), action),
        (("actions", 0, "deployment_id"), action),
        (("actions", 0, "block_document_id"), (*action, "block")),
        (("actions", 0, "parameters", "parameters"), (*action, "parameters")),
    ]
    body = {
        "name": name,
        "description": description,
        "enabled": sub.enabled,
        "tags": _tags([f"tollwatch:team:{team.team}"]),
        "trigger": subscription_trigger(sub),
        "actions": [_subscription_action(sub.action)],
        "actions_on_trigger": [],
        "actions_on_resolve": [],
    }
    return Declaration(name=name, source=source, body=body, file_locs=tuple(rules))


def declarations(project: Project) -> list[Declaration]:
    """Every automation the project declares, in file order (automations first, then subscriptions)."""
    found = [_automation_declaration(item.path, item.spec) for item in project.automations]
    for item in project.subscriptions:
        found += [
            subscription_declaration(item.path, item.spec, index, sub)
            for index, sub in enumerate(item.spec.subscriptions)
        ]
    return found


# -------------------------------------------------------------------------------- validation by Prefect


def _unknown_keys(raw: Any, model: BaseModel, loc: Loc) -> list[tuple[Loc, str]]:
    """Keys Prefect's models silently ignore (they accept unknown fields for forward compatibility); in a file
    written by hand they are typos, so they are errors here."""
    if isinstance(model, RootModel) or not isinstance(raw, dict):
        return []
    fields = type(model).model_fields
    known = set(fields) | {info.alias for info in fields.values() if info.alias}
    problems = [((*loc, key), "Extra inputs are not permitted") for key in raw if key not in known]
    for name, info in fields.items():
        key = name if name in raw else info.alias
        if key not in raw:
            continue
        value, given = getattr(model, name), raw[key]
        if isinstance(value, BaseModel):
            problems += _unknown_keys(given, value, (*loc, key))
        elif isinstance(value, list) and isinstance(given, list):
            for index, (item, item_given) in enumerate(zip(value, given, strict=False)):
                if isinstance(item, BaseModel):
                    problems += _unknown_keys(item_given, item, (*loc, key, index))
    return problems


@cache
def _client_models() -> tuple[TypeAdapter[Any], dict[str, type[BaseModel]]]:
    from prefect.events.actions import ActionTypes
    from prefect.events.schemas.automations import TriggerTypes

    actions = {cls.model_fields["type"].default: cls for cls in get_args(ActionTypes)}
    return TypeAdapter(TriggerTypes), actions


def _server_models() -> tuple[type[BaseModel], dict[str, type[BaseModel]]]:
    """The server's schemas validate what the client's do not (Jinja templates, deployment parameters,
    run-deployment loops); checking them here means the server cannot refuse an automation half-way through
    an apply."""
    from tollwatch.prefect.internals import server_automation_models

    return server_automation_models()


def _errors(exc: ValidationError, prefix: Loc) -> list[tuple[Loc, str]]:
    return [((*prefix, *clean_loc(tuple(error["loc"]))), error["msg"]) for error in exc.errors()]


def _trigger_problems(raw: Any) -> list[tuple[Loc, str]]:
    trigger_adapter, _ = _client_models()
    try:
        trigger = trigger_adapter.validate_python(raw)
    except ValidationError as exc:
        return _errors(exc, ("trigger",))
    return _unknown_keys(raw, trigger, ("trigger",))


def _action_problems(raw: dict[str, Any], loc: Loc) -> list[tuple[Loc, str]]:
    _, action_classes = _client_models()
    _, server_actions = _server_models()
    cls = action_classes.get(raw.get("type"))  # type: ignore[arg-type]
    if cls is None:
        return [((*loc, "type"), f"unknown action type {raw.get('type')!r}; one of: {', '.join(action_classes)}")]
    try:
        action = cls.model_validate(raw)
    except ValidationError as exc:
        return _errors(exc, loc)
    problems = _unknown_keys(raw, action, loc)
    try:
        server_actions[raw["type"]].model_validate(action.model_dump(mode="json"))
    except ValidationError as exc:
        problems += _errors(exc, loc)
    return problems


def _validate_parts(body: Mapping[str, Any]) -> list[tuple[Loc, str]]:
    problems = _trigger_problems(body["trigger"])
    for key in _ACTION_LISTS:
        for index, raw in enumerate(body.get(key, [])):
            problems += _action_problems(raw, (key, index))
    return problems


def trigger_problems(raw: Any) -> list[tuple[Loc, str]]:
    """Problems Prefect's models find in a trigger alone (for a file whose other parts are wrong)."""
    return _trigger_problems(raw)


def _build(body: Mapping[str, Any]) -> AutomationCore:
    """Prefect's AutomationCore from a valid body, with every field explicitly set: the client's update sends
    only set fields (`exclude_unset`), and the server keeps the old value of any field left out.
    `owner_resource` stays unset: the server's update schema forbids it."""
    from prefect.events.schemas.automations import AutomationCore

    core = AutomationCore.model_validate(body)
    full = core.model_dump(mode="json", exclude={"owner_resource"})
    server_core, _ = _server_models()
    server_core.model_validate(full)
    return AutomationCore.model_validate(full)


def declaration_problems(declaration: Declaration) -> list[tuple[Loc, str]]:
    """Problems Prefect's models find in one declaration (before its references are resolved), as
    `(field in the file, message)`."""
    body = declaration.resolved(lambda _reference: _UNRESOLVED)
    try:
        problems = _validate_parts(body)
        if not problems:
            try:
                _build(body)
            except ValidationError as exc:
                problems = _errors(exc, ())
    except RecursionError:
        # Prefect checks each Jinja template by parsing it, and Jinja's parser recurses once per nested expression
        # or block: a template nested a few hundred levels deep exhausted Python's stack instead of being reported.
        problems = [((), "a template or value nested too deep for Prefect to check")]
    return [(declaration.file_loc(loc), message) for loc, message in problems]


def check_declaration(declaration: Declaration) -> list[str]:
    """`declaration_problems` as problem lines (`<file>: <field>: <message>`)."""
    return [problem_line(declaration.source, loc, message) for loc, message in declaration_problems(declaration)]


def compile_project(project: Project, resolver: Resolver) -> list[AutomationCore]:
    """The automations to apply, with block and deployment names resolved to this server's ids.

    Every missing block or deployment is reported (one line each, naming file and field) before anything is
    built, so the user fixes them all in one go.
    """
    found = declarations(project)
    ids: dict[Reference, UUID | None] = {}
    problems: list[str] = []
    for declaration in found:
        for loc, reference in declaration.references():
            if reference not in ids:
                if reference.kind == "block":
                    slug, _, name = reference.name.partition("/")
                    ids[reference] = resolver.block_document_id(slug, name)
                else:
                    ids[reference] = resolver.deployment_id(reference.name)
            if ids[reference] is None:
                problems.append(problem_line(declaration.source, declaration.file_loc(loc), reference.missing()))
    if problems:
        raise AutomationsConfigError(problems)
    built: list[AutomationCore] = []
    for declaration in found:
        body = declaration.resolved(lambda reference: ids[reference])  # type: ignore[arg-type,return-value]
        try:
            built.append(_build(body))
        except ValidationError as exc:
            raise AutomationsConfigError(
                [problem_line(declaration.source, declaration.file_loc(loc), msg) for loc, msg in _errors(exc, ())]
            ) from None
    return built
