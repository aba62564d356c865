"""Read and validate every file under `automations/` before anything is applied.

All problems of all files are collected and raised together as one `AutomationsConfigError`, one line each
(`automations/subscriptions/foo.yaml: subscriptions[0].action.job: Field required`): a team fixing its file
sees every mistake at once, and a bad file can never leave the server half-updated, because the apply only
starts once the whole directory is valid.

Layout: `<root>/*.yaml` are project automations, `<root>/subscriptions/*.yaml` are team subscriptions.
Anything else (e.g. `<root>/webhooks/`, Prefect Cloud webhook templates) is not read.

**Settings from the environment.** A value in any file may name a setting as `${TOLLWATCH_NAME:-default}` (or
`${TOLLWATCH_NAME}`, which then must be set). It is read when the files are loaded, i.e. when `tollwatch
automations apply` runs: the server keeps the value that was applied, so changing the variable takes another
apply. The rules, kept few on purpose:

* only `TOLLWATCH_*` variables can be named (an automation file must not be able to copy a credential into a
  notification); a variable that is unset or empty takes the default;
* a value that is nothing but one reference must be a whole number (digits only) and becomes an int: this is
  for durations and counts, e.g. the repair automations' `within: ${TOLLWATCH_REPAIR_REFRESH_AFTER_S:-3600}`;
* a reference inside longer text is replaced by its text; `${` always starts a reference (Jinja uses `{{`).

A bad value is reported like any other problem, at the field that uses it (`automations/repair-refresh.yaml:
trigger.within: TOLLWATCH_REPAIR_REFRESH_AFTER_S='soon' (from the environment) is not a whole number`), and a
problem Prefect finds in a field filled from a variable names the variable and where its value came from
(e.g. Prefect's 10-second minimum for a proactive trigger's `within`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from tollwatch.prefect.automations.compile import (
    declaration_problems,
    declarations,
    subscription_declaration,
    trigger_problems,
)
from tollwatch.prefect.automations.models import (
    AutomationFile,
    AutomationsConfigError,
    Loc,
    Project,
    Sourced,
    Subscription,
    SubscriptionFile,
    clean_loc,
    format_loc,
    problem_line,
    subscription_automation_name,
)

#: `${NAME}` or `${NAME:-default}`.
_REFERENCE = re.compile(r"\$\{(?P<name>[^}:]*)(?::-(?P<default>[^}]*))?\}")
#: The only variables a file may name.
_SETTING = re.compile(r"^TOLLWATCH_[A-Z0-9_]+$")
_WHOLE_NUMBER = re.compile(r"^[0-9]+$")
#: The most digits a `${TOLLWATCH_…}` whole number may have: longer is no count or duration (and int() refuses text
#: past 4300 digits with an error of its own).
_MAX_DIGITS = 100
#: How deep a file's values may nest, and how many values its aliases (`&name` … `*name`) may expand it to. A few
#: levels and a few hundred values make a real automation file; what the limits keep out is a file that the checks
#: cannot walk: a value nested hundreds of levels (Python's recursion limit, pydantic's serialization depth) or an
#: alias bomb, 12 lines that expand to billions of values, each walked and copied.
MAX_DEPTH = 64
MAX_VALUES = 100_000


@dataclass(frozen=True)
class Substitution:
    """One `${TOLLWATCH_…}` reference in a file, as it was resolved."""

    loc: Loc
    name: str
    value: str
    origin: Literal["environment", "default"]

    def described(self) -> str:
        where = "from the environment" if self.origin == "environment" else "the default in the file"
        return f"{self.name}={self.value!r} ({where})"


def substitute(
    node: Any, environ: Mapping[str, str], loc: Loc = ()
) -> tuple[Any, list[Substitution], list[tuple[Loc, str]]]:
    """`node` (parsed YAML) with every `${TOLLWATCH_…}` reference in its string values resolved (see the module
    docstring), the substitutions made, and the problems found (`(field, message)`)."""
    if isinstance(node, dict):
        result: dict[Any, Any] = {}
        found: list[Substitution] = []
        problems: list[tuple[Loc, str]] = []
        for key, value in node.items():
            result[key], more, wrong = substitute(value, environ, (*loc, key))
            found += more
            problems += wrong
        return result, found, problems
    if isinstance(node, list):
        items: list[Any] = []
        found, problems = [], []
        for index, value in enumerate(node):
            item, more, wrong = substitute(value, environ, (*loc, index))
            items.append(item)
            found += more
            problems += wrong
        return items, found, problems
    if not isinstance(node, str) or "${" not in node:
        return node, [], []
    return _substitute_text(node, environ, loc)


def _substitute_text(
    text: str, environ: Mapping[str, str], loc: Loc
) -> tuple[Any, list[Substitution], list[tuple[Loc, str]]]:
    found: list[Substitution] = []
    problems: list[tuple[Loc, str]] = []

    def resolve(match: re.Match[str]) -> str:
        name, default = match["name"], match["default"]
        if not _SETTING.match(name):
            problems.append((loc, f"${{{name}}}: only TOLLWATCH_* environment variables can be named"))
            return match[0]
        if environ.get(name):
            found.append(Substitution(loc, name, environ[name], "environment"))
        elif default is not None:
            found.append(Substitution(loc, name, default, "default"))
        else:
            problems.append((loc, f"{name} is not set and has no default (write ${{{name}:-<default>}})"))
            return match[0]
        return found[-1].value

    whole = _REFERENCE.fullmatch(text.strip())
    replaced = _REFERENCE.sub(resolve, text)
    if whole is None or problems:
        return replaced, found, problems
    [used] = found
    if not _WHOLE_NUMBER.match(used.value.strip()):
        return text, found, [(loc, f"{used.described()} is not a whole number")]
    digits = len(used.value.strip())
    if digits > _MAX_DIGITS:  # int() refuses text past 4300 digits with a ValueError of its own
        where = "from the environment" if used.origin == "environment" else "the default in the file"
        return text, found, [(loc, f"{used.name} ({where}) has {digits} digits, more than {_MAX_DIGITS}")]
    return int(used.value), found, []


def _related(problem: Loc, substituted: Loc) -> bool:
    """A problem at `problem` may be caused by the value at `substituted` (one path contains the other)."""
    shorter = min(len(problem), len(substituted))
    return bool(problem) and problem[:shorter] == substituted[:shorter]


def _lines(source: str, problems: Sequence[tuple[Loc, str]], substitutions: Sequence[Substitution]) -> list[str]:
    """Problem lines; one about a field filled from a variable says which, with what value, from where."""
    lines = []
    for loc, message in problems:
        notes = [f"{format_loc(sub.loc)} is {sub.described()}" for sub in substitutions if _related(loc, sub.loc)]
        lines.append(problem_line(source, loc, f"{message} ({'; '.join(notes)})" if notes else message))
    return lines


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
        text = path.read_text(encoding="utf-8")
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        return None, [f"{source}: YAML syntax error at {where}{exc.problem}"]
    except yaml.reader.ReaderError as exc:
        # A character YAML does not allow (a control character): PyYAML's message spans two lines and gives an
        # offset, not a line; this is one problem line with the line and column, like the syntax errors above.
        line = text.count("\n", 0, exc.position) + 1
        column = exc.position - text.rfind("\n", 0, exc.position)
        code = f" #x{exc.character:04x}" if isinstance(exc.character, int) else ""
        return None, [f"{source}: YAML syntax error at line {line}, column {column}: character{code}: {exc.reason}"]
    except (yaml.YAMLError, OSError, UnicodeDecodeError) as exc:
        return None, [f"{source}: cannot read: {' '.join(str(exc).split())}"]
    except ValueError as exc:  # PyYAML's int() of a number past 4300 digits
        return None, [f"{source}: cannot read a number: {str(exc).partition(';')[0]}"]
    except RecursionError:  # PyYAML's parser recurses once per level: a few hundred levels exhaust Python's stack
        return None, [f"{source}: values nested deeper than {MAX_DEPTH} levels"]
    if data is None:
        return None, [f"{source}: the file is empty"]
    if not isinstance(data, dict):
        return None, [f"{source}: expected a mapping at the top level, found {type(data).__name__}"]
    problem = _shape_problem(data)
    return (None, [f"{source}: {problem}"]) if problem else (data, [])


def _shape_problem(data: Any) -> str | None:
    """Why a parsed file cannot be checked, if it cannot: every later step (substitution, pydantic, Prefect's
    models, the JSON an apply sends) walks its values, so they must be finite, shallow, not too many, and text
    UTF-8 can hold. PyYAML builds an alias as the very object it names, so a walk here, with the path's containers
    as the cycle check, costs at most MAX_VALUES steps whatever the aliases expand to."""
    count = 0
    enclosing: set[int] = set()  # the containers around the value being walked
    pending: list[tuple[Any, int, bool]] = [(data, 1, False)]
    while pending:
        value, depth, leaving = pending.pop()
        if leaving:
            enclosing.discard(id(value))
            continue
        count += 1
        if count > MAX_VALUES:
            return f"more than {MAX_VALUES} values (YAML aliases `*name` repeat the value they name)"
        if isinstance(value, str) and not _is_utf8(value):
            return f"text that is not valid Unicode ({value[:40]!r}: a lone surrogate, from a \\u escape)"
        if not isinstance(value, dict | list | tuple | set | frozenset):
            continue
        if id(value) in enclosing:
            return "an alias (`*name`) refers to a value that contains it: the value never ends"
        if depth > MAX_DEPTH:
            return f"values nested deeper than {MAX_DEPTH} levels"
        enclosing.add(id(value))
        pending.append((value, depth, True))
        children = [*value.keys(), *value.values()] if isinstance(value, dict) else list(value)
        pending.extend((child, depth + 1, False) for child in children)
    return None


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


M = TypeVar("M", bound=BaseModel)


def _validate(model: type[M], data: dict[str, Any]) -> tuple[M | None, list[tuple[Loc, str]]]:
    try:
        return model.model_validate(data), []
    except ValidationError as exc:
        return None, [(clean_loc(tuple(e["loc"])), e["msg"]) for e in exc.errors()]


def _resolved(
    data: Any, source: str, environ: Mapping[str, str], substitutions: dict[str, list[Substitution]]
) -> tuple[Any, list[str]]:
    """The file's data with its `${TOLLWATCH_…}` references resolved; None (and why) if one cannot be: a file
    whose values are unknown is not checked any further."""
    if data is None:
        return None, []
    data, substitutions[source], problems = substitute(data, environ)
    if problems:
        return None, [problem_line(source, loc, message) for loc, message in problems]
    return data, []


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


def _check_valid_subscriptions(data: dict[str, Any], source: str, substitutions: Sequence[Substitution]) -> list[str]:
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
        declaration = subscription_declaration(source, team, index, subscription)
        problems += _lines(source, declaration_problems(declaration), substitutions)
    return problems


def load_project(root: Path, environ: Mapping[str, str] | None = None) -> Project:
    """Every automation and subscription under `root`, validated (by tollwatch's rules and Prefect's models).

    `${TOLLWATCH_…}` references are resolved from `environ` (default: `os.environ`; see the module docstring).
    Raises `AutomationsConfigError` listing every problem in every file; paths in it start with `root`'s name
    (`automations/...`), as the user sees them in the repository.
    """
    root = Path(root)
    if not root.is_dir():
        raise AutomationsConfigError([f"{root}: no such directory"])
    environ = os.environ if environ is None else environ
    shown = Path(root.resolve().name)
    problems: list[str] = []
    substitutions: dict[str, list[Substitution]] = {}

    automations: list[Sourced[AutomationFile]] = []
    for path in _yaml_files(root):
        source = (shown / path.name).as_posix()
        data, errors = _read_yaml(path, source)
        data, unresolved = _resolved(data, source, environ, substitutions)
        spec, invalid = _validate(AutomationFile, data) if data is not None else (None, [])
        problems += errors + unresolved + _lines(source, invalid, substitutions.get(source, []))
        if spec is not None:
            automations.append(Sourced(source, spec))
        elif isinstance(data, dict) and isinstance(data.get("trigger"), dict):
            # report Prefect's findings in the same run
            problems += _lines(source, trigger_problems(data["trigger"]), substitutions[source])

    subscriptions: list[Sourced[SubscriptionFile]] = []
    for path in _yaml_files(root / "subscriptions"):
        source = (shown / "subscriptions" / path.name).as_posix()
        data, errors = _read_yaml(path, source)
        data, unresolved = _resolved(data, source, environ, substitutions)
        team, invalid = _validate(SubscriptionFile, data) if data is not None else (None, [])
        problems += errors + unresolved + _lines(source, invalid, substitutions.get(source, []))
        if team is None:
            problems += _check_valid_subscriptions(data, source, substitutions[source]) if data is not None else []
            continue
        if team.team != path.stem:
            problems.append(problem_line(source, ("team",), f"must match the file name ({path.stem!r})"))
            continue
        subscriptions.append(Sourced(source, team))

    project = Project(root=root, automations=tuple(automations), subscriptions=tuple(subscriptions))
    problems += _duplicate_names(project)
    for declaration in declarations(project):
        problems += _lines(
            declaration.source, declaration_problems(declaration), substitutions.get(declaration.source, [])
        )
    if problems:
        # grouped by file, in the order found within each file
        raise AutomationsConfigError(sorted(problems, key=lambda line: line.partition(": ")[0]))
    return project
