"""The Function app as the host sees it: what it imports, what it registers, and its host files."""

from __future__ import annotations

import ast
import functools
import json
import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import azure.functions as func
from packaging.requirements import Requirement

from tollwatch_dev.funchost import indexed_functions

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("prefect", "pyarrow", "pyiceberg", "typer", "fastapi", "sqlalchemy")


def _import_in_fresh_interpreter(extra_env: dict[str, str] | None = None) -> dict[str, object]:
    """Import function_app like the Python worker does (cwd = app root) and report what got loaded.

    One interpreter per distinct `extra_env` for the session (a fresh import reports the same thing every time)."""
    return _fresh_import(tuple(sorted((extra_env or {}).items())))


@functools.cache
def _fresh_import(extra_env: tuple[tuple[str, str], ...]) -> dict[str, object]:
    probe = (
        "import json, sys\n"
        "import function_app\n"
        "fns = {f.get_function_name(): json.loads(f.get_function_json()) for f in function_app.app.get_functions()}\n"
        "print(json.dumps({'modules': sorted(sys.modules), 'functions': fns}))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TOLLWATCH_", "PREFECT_"))}
    env |= dict(extra_env)
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=True
    )
    return json.loads(out.stdout)


def test_importing_the_app_loads_no_prefect_and_no_table_stack():
    loaded = _import_in_fresh_interpreter()["modules"]
    heavy = sorted(m for m in loaded if m.split(".")[0] in HEAVY)  # type: ignore[union-attr]
    assert heavy == []
    handlers = {"functions.watch", "functions.eventgrid", "functions.backfill", "functions.openapi"}
    assert handlers <= set(loaded)  # type: ignore[arg-type]


def test_every_distribution_the_app_imports_is_installed_by_requirements_txt():
    loaded = _import_in_fresh_interpreter()["modules"]
    owners = metadata.packages_distributions()
    imported = {
        dist.lower().replace("_", "-")
        for name in loaded  # type: ignore[union-attr]
        if name != "_distutils_hack"  # setuptools' .pth hook in this venv, not an import of the app
        for dist in owners.get(name.split(".")[0], [])
        if dist.lower() != "tollwatch"
    }
    # Extras count as covered: httpx imports click/rich/zstandard only if they happen to be installed.
    required = _closure(_requirement_names(ROOT / "requirements.txt"), with_extras=True)
    assert imported - required == set(), "add these to requirements.txt"
    assert not {"prefect", "pyarrow", "pyiceberg", "pyiceberg-core"} & _requirement_names(ROOT / "requirements.txt")


def _requirement_names(path: Path) -> set[str]:
    lines = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    return {Requirement(line).name.lower().replace("_", "-") for line in lines if line}


def _closure(names: set[str], *, with_extras: bool) -> set[str]:
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            specs = metadata.requires(name) or []
        except metadata.PackageNotFoundError:  # an extra's package that is not installed here
            continue
        for spec in specs:
            requirement = Requirement(spec)
            if requirement.marker is None or with_extras or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name.lower().replace("_", "-"))
    return seen


def test_timer_schedule_defaults_to_every_15_minutes_and_follows_the_app_setting():
    default = _import_in_fresh_interpreter()["functions"]["watch_upstream"]  # type: ignore[index]
    configured = _import_in_fresh_interpreter({"TOLLWATCH_WATCH_SCHEDULE": "0 */5 * * * *"})["functions"]
    assert default["bindings"][0]["schedule"] == "0 */15 * * * *"
    assert configured["watch_upstream"]["bindings"][0]["schedule"] == "%TOLLWATCH_WATCH_SCHEDULE%"  # type: ignore[index]


def test_registered_functions_triggers_auth_and_retry(app: func.FunctionApp):
    functions = {f.get_function_name(): f for f in indexed_functions(app)}
    assert set(functions) == {
        "watch_upstream",
        "eventgrid_webhook",
        "eventgrid_trigger",
        "request_backfill",
        "openapi_document",
    }

    timer = json.loads(functions["watch_upstream"].get_function_json())["bindings"][0]
    assert timer["type"] == "timerTrigger"
    assert timer["runOnStartup"] is False
    retry = functions["watch_upstream"].get_setting("retry_policy").get_dict_repr()  # type: ignore[union-attr]
    assert retry == {
        "setting_name": "retry_policy",
        "strategy": "fixed_delay",
        "max_retry_count": "3",
        "delay_interval": "00:00:30",
    }

    webhook = json.loads(functions["eventgrid_webhook"].get_function_json())["bindings"][0]
    backfill = json.loads(functions["request_backfill"].get_function_json())["bindings"][0]
    route = ("route", "methods", "authLevel")
    assert [webhook[k] for k in route] == ["eventgrid", ["POST", "OPTIONS"], "FUNCTION"]
    assert [backfill[k] for k in route] == ["backfill", ["POST"], "FUNCTION"]
    openapi = json.loads(functions["openapi_document"].get_function_json())["bindings"][0]
    assert [openapi[k] for k in route] == ["openapi.json", ["GET"], "ANONYMOUS"]
    assert json.loads(functions["eventgrid_trigger"].get_function_json())["bindings"][0]["type"] == "eventGridTrigger"


def test_function_app_module_only_builds_and_registers():
    tree = ast.parse((ROOT / "function_app.py").read_text())
    code = [
        ast.unparse(node)
        for node in tree.body
        if not isinstance(node, ast.Import | ast.ImportFrom)
        and not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant))  # the docstring
    ]
    assert code == [
        "app = func.FunctionApp(http_auth_level=func.AuthLevel.FUNCTION)",
        "app.register_functions(watch.bp)",
        "app.register_functions(eventgrid.bp)",
        "app.register_functions(backfill.bp)",
        "app.register_functions(openapi.bp)",
    ]


def test_host_json():
    host = json.loads((ROOT / "host.json").read_text())
    assert host["version"] == "2.0"
    assert host["extensionBundle"] == {"id": "Microsoft.Azure.Functions.ExtensionBundle", "version": "[4.*, 5.0.0)"}
    assert re.fullmatch(r"\d\d:\d\d:\d\d", host["functionTimeout"])
    http = host["extensions"]["http"]
    assert http["routePrefix"] == "api"
    assert 1 <= http["maxConcurrentRequests"] <= 100
    assert host["logging"]["logLevel"]["default"] == "Information"


def test_local_settings_example_holds_placeholders_only():
    values = json.loads((ROOT / "local.settings.example.json").read_text())["Values"]
    secretish = [k for k in values if re.search(r"SECRET|KEY|TOKEN|WEBHOOK_URL|PASSWORD", k)]
    assert secretish
    for key in secretish:
        assert re.fullmatch(r"<[^<>]*>(,<[^<>]*>)*", values[key]), key
    assert all("AccountKey=" not in v for v in values.values())
    assert values["FUNCTIONS_WORKER_RUNTIME"] == "python"


def test_funcignore_keeps_tests_and_dev_tools_out_of_the_package():
    ignored = {line.strip() for line in (ROOT / ".funcignore").read_text().splitlines()}
    assert {"tests/", "tollwatch_dev/", "local.settings.json", ".venv/", "tollwatch/prefect/"} <= ignored
