"""Read and validate every file under `automations/` before anything is applied.

All problems of all files are collected and raised together as one `AutomationsConfigError`, one line each
(`automations/subscriptions/foo.yaml: subscriptions[0].action.job: Field required`): a team fixing its file
sees every mistake at once, and a bad file can never leave the server half-updated, because the apply only
starts once the whole directory is valid.

Layout: `<root>/*.yaml` are project automations, `<root>/subscriptions/*.yaml` are team subscriptions.
Anything else (e.g. `<root>/webhooks/`, Prefect Cloud webhook templates) is not read.
"""

from __future__ import annotations

from collections.abc import Hashable
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from tollwatch.automations.compile import check_declaration, check_trigger, declarations, subscription_declaration
from tollwatch.automations.models import (
    AutomationFile,
    AutomationsConfigError,
    Loc,
    Project,
    Sourced,
    Subscription,
    SubscriptionFile,
    clean_loc,
    problem_line,
    subscription_automation_name,
)


class _StrictLoader(yaml.SafeLoader):
    """A YAML loader that refuses a key given twice in one mapping (PyYAML silently keeps the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Hashable] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            if isinstance(key, Hashable):
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        "while reading a mapping", node.start_mark, f"key {key!r} is given twice", key_node.start_mark
                    )
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path, source: str) -> tuple[Any, list[str]]:
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_StrictLoader)  # noqa: S506 (a SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        return None, [f"{source}: YAML syntax error at {where}{exc.problem}"]
    except (yaml.YAMLError, OSError, UnicodeDecodeError) as exc:
        return None, [f"{source}: cannot read: {exc}"]
    if data is None:
        return None, [f"{source}: the file is empty"]
    if not isinstance(data, dict):
        return None, [f"{source}: expected a mapping at the top level, found {type(data).__name__}"]
    return data, []


M = TypeVar("M", bound=BaseModel)


def _validate(model: type[M], data: dict[str, Any], source: str) -> tuple[M | None, list[str]]:
    try:
        return model.model_validate(data), []
    except ValidationError as exc:
        return None, [problem_line(source, clean_loc(tuple(e["loc"])), e["msg"]) for e in exc.errors()]


def _yaml_files(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix in (".yaml", ".yml"))


def _duplicate_names(project: Project) -> list[str]:
    """Automation names must be unique across all files: apply upserts by name."""
    seen: dict[str, str] = {}
    problems: list[str] = []
    named: list[tuple[str, str, Loc]] = [(item.spec.name, item.path, ("name",)) for item in project.automations]
    for item in project.subscriptions:
        named += [
            (subscription_automation_name(item.spec.team, sub.name), item.path, ("subscriptions", index, "name"))
            for index, sub in enumerate(item.spec.subscriptions)
        ]
    for name, source, loc in named:
        if name in seen:
            problems.append(problem_line(source, loc, f"{name!r} is already declared in {seen[name]}"))
        else:
            seen[name] = source
    return problems


def _check_valid_subscriptions(data: dict[str, Any], source: str) -> list[str]:
    """Prefect's checks for the subscriptions that are fine on their own, in a file with problems elsewhere,
    so one run reports everything that is wrong in it."""
    raw_subscriptions = data.get("subscriptions")
    if not isinstance(raw_subscriptions, list):
        return []
    team = SubscriptionFile.model_construct(team=str(data.get("team")), contact=None, subscriptions=[])
    problems: list[str] = []
    for index, raw in enumerate(raw_subscriptions):
        try:
            subscription = Subscription.model_validate(raw)
        except ValidationError:
            continue  # already reported
        problems += check_declaration(subscription_declaration(source, team, index, subscription))
    return problems


def load_project(root: Path) -> Project:
    """Every automation and subscription under `root`, validated (by tollwatch's rules and Prefect's models).

    Raises `AutomationsConfigError` listing every problem in every file; paths in it start with `root`'s name
    (`automations/...`), as the user sees them in the repository.
    """
    root = Path(root)
    if not root.is_dir():
        raise AutomationsConfigError([f"{root}: no such directory"])
    shown = Path(root.resolve().name)
    problems: list[str] = []

    automations: list[Sourced[AutomationFile]] = []
    for path in _yaml_files(root):
        source = (shown / path.name).as_posix()
        data, errors = _read_yaml(path, source)
        spec, invalid = _validate(AutomationFile, data, source) if data is not None else (None, [])
        problems += errors + invalid
        if spec is not None:
            automations.append(Sourced(source, spec))
        elif isinstance(data, dict) and isinstance(data.get("trigger"), dict):
            problems += check_trigger(source, data["trigger"])  # report Prefect's findings in the same run

    subscriptions: list[Sourced[SubscriptionFile]] = []
    for path in _yaml_files(root / "subscriptions"):
        source = (shown / "subscriptions" / path.name).as_posix()
        data, errors = _read_yaml(path, source)
        team, invalid = _validate(SubscriptionFile, data, source) if data is not None else (None, [])
        problems += errors + invalid
        if team is None:
            problems += _check_valid_subscriptions(data, source) if data is not None else []
            continue
        if team.team != path.stem:
            problems.append(problem_line(source, ("team",), f"must match the file name ({path.stem!r})"))
            continue
        subscriptions.append(Sourced(source, team))

    project = Project(root=root, automations=tuple(automations), subscriptions=tuple(subscriptions))
    problems += _duplicate_names(project)
    for declaration in declarations(project):
        problems += check_declaration(declaration)
    if problems:
        # grouped by file, in the order found within each file
        raise AutomationsConfigError(sorted(problems, key=lambda line: line.partition(": ")[0]))
    return project
