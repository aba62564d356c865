"""The two YAML formats under `automations/`, as strict pydantic models (an unknown key is an error, not ignored).

* `AutomationFile` (`automations/*.yaml`): one project automation, shaped like Prefect's `AutomationCore`, except
  that blocks and deployments are named (`block: custom-webhook/tollwatch-alerts`, `deployment: flow/name`)
  instead of referenced by server-specific ids, so the same file applies to any Prefect server.
* `SubscriptionFile` (`automations/subscriptions/<team>.yaml`): what a downstream team wants to happen when
  the bronze table changes, without writing Prefect triggers: one automation per subscription is generated.

Trigger and action bodies of `AutomationFile` stay plain dicts here: Prefect's own models validate them in
`tollwatch.prefect.automations.compile`, so this project never re-declares (and drifts from) Prefect's schema.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from tollwatch.contract.errors import TollwatchError
from tollwatch.contract.events import (
    INGESTION_LABELS,
    LABEL_VALUE_TYPES,
    EventName,
    IngestionCompleted,
    IngestionFailed,
    IngestionHeld,
)

#: Every automation this project applies carries both tags; only `MANAGED_TAG` ones are ever pruned.
PROJECT_TAG = "tollwatch"
MANAGED_TAG = "tollwatch:managed"

#: Subscriptions become automations named `tollwatch/sub/<team>/<name>`; project automations may not use it.
SUBSCRIPTION_PREFIX = "tollwatch/sub/"

#: The deployment a `run-local-job` subscription runs (`flow/deployment`), created by `prefect deploy --all`.
RUN_JOB_DEPLOYMENT = "run-job/run-job"
#: Block type of the block a `call-webhook` subscription names.
WEBHOOK_BLOCK_TYPE = "webhook"
#: The table subscriptions watch unless they say otherwise.
DEFAULT_TABLE = "bronze.bnt_traffic_hourly"

#: Which payload model each subscribable event carries: `when:` keys must be fields of all selected ones.
SUBSCRIBABLE_PAYLOADS: dict[str, type[BaseModel]] = {
    EventName.INGESTION_COMPLETED.value: IngestionCompleted,
    EventName.INGESTION_FAILED.value: IngestionFailed,
    EventName.INGESTION_HELD.value: IngestionHeld,
}

#: The names above as a type for a subscription's `on:` (a Literal spells its values, so YAML authors read them in
#: errors; tests/unit/test_facts_once.py keeps it equal to SUBSCRIBABLE_PAYLOADS' keys).
SubscribableEvent = Literal["tollwatch.ingestion.completed", "tollwatch.ingestion.failed", "tollwatch.ingestion.held"]
Slug = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9-]*$", max_length=64)]
TableName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_]+\.[A-Za-z0-9_]+$")]
#: `<block-type-slug>/<block-name>`, e.g. `custom-webhook/tollwatch-alerts`.
BlockRef = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9-]*/[^/\s]+$")]
#: `<flow-name>/<deployment-name>`, as `prefect deployment run` takes it.
DeploymentRef = Annotated[str, StringConstraints(pattern=r"^[^/]+/[^/]+$")]
LabelScalar = str | bool


class AutomationsConfigError(TollwatchError, ValueError):
    """The automation files are wrong; one line per problem (`<file>: <field>: <message>`), nothing applied."""

    status = 400

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(self.problems))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ------------------------------------------------------------------------------------ project automations


class ActionSpec(BaseModel):
    """One Prefect action, with `block:` / `deployment:` in place of the server-specific ids.

    Extra keys are allowed here only because they are the Prefect action's own fields: Prefect's action model
    for `type` validates them (and rejects unknown ones) when the project is loaded.
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    type: str
    block: BlockRef | None = Field(default=None, description="`<block-type-slug>/<name>`; becomes block_document_id")
    deployment: DeploymentRef | None = Field(default=None, description="`<flow>/<deployment>`; becomes deployment_id")

    @model_validator(mode="before")
    @classmethod
    def _no_raw_ids(cls, data: Any) -> Any:
        if isinstance(data, dict):
            if "block_document_id" in data:
                raise ValueError(
                    "block_document_id differs per server: name the block with `block: <type-slug>/<name>`"
                )
            if "deployment_id" in data:
                raise ValueError("deployment_id differs per server: name it with `deployment: <flow>/<deployment>`")
        return data

    def prefect_fields(self) -> dict[str, Any]:
        """The Prefect action's own fields (everything except the references)."""
        return {"type": self.type, **(self.model_extra or {})}


class AutomationFile(_Strict):
    """`automations/<name>.yaml`: one automation, as close to Prefect's `AutomationCore` as possible."""

    name: Annotated[str, StringConstraints(min_length=1, max_length=200)]
    description: str = ""
    enabled: bool = True
    tags: list[str] = Field(default_factory=list, description="extra tags; tollwatch's own are always added")
    trigger: dict[str, Any]
    actions: list[ActionSpec] = Field(min_length=1)
    actions_on_trigger: list[ActionSpec] = Field(default_factory=list)
    actions_on_resolve: list[ActionSpec] = Field(default_factory=list)

    @field_validator("name")
    @classmethod
    def _not_a_subscription_name(cls, name: str) -> str:
        if name.startswith(SUBSCRIPTION_PREFIX):
            raise ValueError(f"names starting with {SUBSCRIPTION_PREFIX!r} are reserved for subscriptions")
        return name


# ---------------------------------------------------------------------------------------- subscriptions


class RunLocalJob(_Strict):
    """Run a local downstream job through the `run-job/run-job` deployment, handing it the completion payload."""

    type: Literal["run-local-job"]
    job: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]
    parameters: dict[str, Any] = Field(
        default_factory=dict, description="extra job parameters; string values may be Jinja templates on `event`"
    )


class RunDatabricksJob(_Strict):
    """Run an existing Databricks job (run-now) through `run-job/run-job`, with job parameters from the event."""

    type: Literal["run-databricks-job"]
    job_id: int = Field(gt=0, description="the Databricks job id")
    parameters: dict[str, Any] = Field(
        default_factory=dict, description="extra job parameters; string values may be Jinja templates on `event`"
    )


class CallWebhook(_Strict):
    """POST to the team's endpoint. The URL (a secret) lives in a Prefect `webhook` block, never in this file."""

    type: Literal["call-webhook"]
    block: Annotated[str, StringConstraints(pattern=r"^[^/\s]+$")] = Field(description="name of a `webhook` block")
    payload: str | None = Field(default=None, description="Jinja template of the body; default: the event as JSON")


SubscriptionAction = Annotated[RunLocalJob | RunDatabricksJob | CallWebhook, Field(discriminator="type")]


class Subscription(_Strict):
    """What one downstream consumer wants done when the table changes."""

    name: Slug
    description: str = ""
    enabled: bool = True
    events: list[SubscribableEvent] = Field(default_factory=lambda: [EventName.INGESTION_COMPLETED.value], min_length=1)
    table: TableName = DEFAULT_TABLE
    when: dict[str, LabelScalar | list[LabelScalar]] = Field(
        default_factory=dict, description="payload conditions, matched through the labels tollwatch copies"
    )
    action: SubscriptionAction

    @field_validator("events")
    @classmethod
    def _unique_events(cls, events: list[str]) -> list[str]:
        if len(set(events)) != len(events):
            raise ValueError("events are listed twice")
        return events

    @field_validator("when")
    @classmethod
    def _known_conditions(
        cls, when: dict[str, LabelScalar | list[LabelScalar]], info: ValidationInfo
    ) -> dict[str, LabelScalar | list[LabelScalar]]:
        """Only payload fields that tollwatch copies onto the resource can be matched; values must be valid for
        the payload field, so a typo (`mode: refesh`) is an error instead of a subscription that never fires."""
        # events failed their own validation: check the keys against the default event's payload only
        events: list[str] = info.data.get("events") or [EventName.INGESTION_COMPLETED.value]
        allowed = [key for key in INGESTION_LABELS if key != "table"]
        checked: dict[str, LabelScalar | list[LabelScalar]] = {}
        for key, value in when.items():
            if key == "table":
                raise ValueError("`table` is not a condition: set the subscription's `table:` instead")
            if key not in INGESTION_LABELS:
                raise ValueError(f"unknown condition {key!r}; allowed: {', '.join(allowed)}")
            values = value if isinstance(value, list) else [value]
            if not values:
                raise ValueError(f"{key}: an empty list matches nothing")
            coerced: list[LabelScalar] = []
            for event in events:
                model = SUBSCRIBABLE_PAYLOADS[event]
                if key not in model.model_fields:
                    raise ValueError(f"{key!r} is not part of the {event} payload, so it can never match")
                adapter: TypeAdapter[Any] = TypeAdapter(LABEL_VALUE_TYPES.get(key, model.model_fields[key].annotation))
                try:
                    coerced = [adapter.validate_python(v) for v in values]
                except ValidationError as exc:
                    raise ValueError(f"{key}: {exc.errors()[0]['msg']} (got {value!r})") from None
            checked[key] = coerced if isinstance(value, list) else coerced[0]
        return checked


class SubscriptionFile(_Strict):
    """`automations/subscriptions/<team>.yaml`: one downstream team's subscriptions."""

    team: Slug
    contact: str | None = Field(default=None, description="who to ask about these subscriptions")
    subscriptions: list[Subscription] = Field(min_length=1)


def subscription_automation_name(team: str, name: str) -> str:
    """The automation a subscription becomes: `tollwatch/sub/<team>/<name>`."""
    return f"{SUBSCRIPTION_PREFIX}{team}/{name}"


# ------------------------------------------------------------------------------------------- the project

Spec = TypeVar("Spec", AutomationFile, SubscriptionFile)


@dataclass(frozen=True)
class Sourced(Generic[Spec]):
    """A validated file and where it came from (`automations/...`, as shown in every message about it)."""

    path: str
    spec: Spec


@dataclass(frozen=True)
class Project:
    """Everything declared under one `automations/` directory, already validated."""

    root: Path
    automations: tuple[Sourced[AutomationFile], ...] = ()
    subscriptions: tuple[Sourced[SubscriptionFile], ...] = ()


# ---------------------------------------------------------------------------------------------- messages

#: A field path as pydantic reports it: `("subscriptions", 0, "action", "job")`.
Loc = tuple[str | int, ...]


#: The union tags pydantic puts into an error path after each of these fields, dropped by `clean_loc`. Every member
#: of the union is listed: a missing one (`run-databricks-job`, once) shows the user a path their file does not have
#: (`action.run-databricks-job.job_id` for `action.job_id`).
_TAGS_AFTER: dict[str, frozenset[str]] = {
    "trigger": frozenset({"event", "metric", "compound", "sequence"}),
    "triggers": frozenset({"event", "metric", "compound", "sequence"}),
    "action": frozenset({"run-local-job", "run-databricks-job", "call-webhook"}),
}
_UNION_MEMBER = re.compile(r"^(function-[a-z-]+\[.*\]|[A-Z][A-Za-z]+)$")


def clean_loc(loc: Loc, *, root: str = "trigger") -> Loc:
    """Drop the union members pydantic puts into error paths (`action.run-local-job.job` → `action.job`).

    `root` names what a path starting with a union tag belongs to (a trigger validated on its own).
    """
    cleaned: list[str | int] = []
    for index, part in enumerate(loc):
        if isinstance(part, str):
            if _UNION_MEMBER.match(part):
                continue
            owner = root if index == 0 else loc[index - 1]
            if isinstance(owner, int) and index >= 2:
                owner = loc[index - 2]
            if part in _TAGS_AFTER.get(str(owner), frozenset()):
                continue
        cleaned.append(part)
    return tuple(cleaned)


def format_loc(loc: Loc) -> str:
    """`subscriptions[0].action.job`: the path a reader finds in the YAML file.

    A key that does not print on one line (a quoted YAML key holding a line break or a control character) is shown
    as its repr, `['a\\rb']`: written as it is, it split its problem into two lines of the error.
    """
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif not str(part).isprintable():
            text += f"[{str(part)!r}]"
        else:
            text += f".{part}" if text else str(part)
    return text


def problem_line(source: str, loc: Loc, message: str) -> str:
    """One line of an `AutomationsConfigError`: `<file>: <field>: <message>` (no field for whole-file problems)."""
    message = " ".join(message.removeprefix("Value error, ").split())  # one line per problem, always
    return f"{source}: {format_loc(loc)}: {message}" if loc else f"{source}: {message}"
