"""No test imports another test module or a conftest.

Importing a test module runs its module-level code and drags its fixtures (and their scopes) into the importer;
importing a conftest does the same behind pytest's back. Shared helpers live in tests/support/ (plain modules), shared
fixtures in a conftest.py that pytest discovers. Read from the source with `ast`, so an import inside a function
counts too, as do `importlib.import_module("...")` / `__import__("...")` with a literal name and `pytest_plugins`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
ROOT = TESTS.parent


def _is_test_module(name: str) -> bool:
    """`tests.test_x`, `tests.layer.test_x`, a bare `test_x` (pytest puts test directories on sys.path), or any
    `conftest`."""
    parts = name.split(".")
    if "conftest" in parts:
        return True
    if parts[0] == "tests":
        return any(part.startswith("test_") for part in parts[1:])
    return parts[0].startswith("test_")


def _package(path: Path) -> list[str]:
    return list(path.relative_to(ROOT).parent.parts)


def _imported(path: Path, source: str) -> list[tuple[int, str]]:
    """Every module name `source` imports (relative imports resolved against `path`), with its line."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source, filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = _package(path)[: len(_package(path)) - node.level + 1]
                base = ".".join([*package, *([node.module] if node.module else [])])
            found.append((node.lineno, base))
            # `from tests import test_x` / `from tests.layer import conftest` import the modules they name
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names if alias.name != "*"]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            callee = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if callee in {"import_module", "__import__"} and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value))
        elif isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "pytest_plugins" for t in node.targets):
            values = node.value.elts if isinstance(node.value, ast.List | ast.Tuple) else [node.value]
            names = [v.value for v in values if isinstance(v, ast.Constant) and isinstance(v.value, str)]
            found += [(node.lineno, name) for name in names]
    return found


def violations(path: Path, source: str | None = None) -> list[str]:
    """`file:line imports module` for every import of a test module or a conftest in `path`."""
    text = path.read_text() if source is None else source
    where = path.relative_to(ROOT)
    return [f"{where}:{line} imports {name}" for line, name in _imported(path, text) if _is_test_module(name)]


def test_no_file_under_tests_imports_a_test_module_or_a_conftest():
    files = sorted(TESTS.rglob("*.py"))
    assert len(files) > 50  # the walk found the suite
    found = [v for path in files for v in violations(path)]
    assert found == [], "move what is shared to tests/support/ (helpers) or a conftest.py (fixtures):\n" + "\n".join(
        found
    )


@pytest.mark.parametrize(
    "source",
    [
        "import tests.test_events",
        "from tests.integration.test_automations import cli_apply",
        "from tests import test_deployments",
        "from tests.faults import conftest",
        "from tests.conftest import FnEnv",
        "import test_events",
        "from . import conftest",
        "from .test_ingest_flow import ROWS_PER_DAY",
        "def later():\n    from tests.integration.test_fn_watch import tick",
        "import importlib\nimportlib.import_module('tests.integration.test_databricks')",
        "pytest_plugins = ['tests.integration.test_automations']",
    ],
)
def test_the_check_catches_each_way_of_importing_a_test_module(source):
    here = TESTS / "faults" / "test_example.py"
    assert violations(here, source), source


@pytest.mark.parametrize(
    "source",
    [
        "from tests.support.funcapp import deliver",
        "from tests.support import payloads",
        "import tollwatch.core.ingest",
        "from . import something_else",
        "import testing_tools",
    ],
)
def test_helpers_and_product_imports_pass(source):
    here = TESTS / "faults" / "test_example.py"
    assert violations(here, source) == [], source
