"""The architecture's import rules (ARCHITECTURE.md), checked on every import statement, lazy ones included.

Each product package may import only the packages listed for it; the dev tools (tollwatch_dev), the tests and the
benches are never imported by the product. Read from the source with `ast`, so a rule holds even for an import
inside a function that no test happens to execute.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: package -> the tollwatch packages its modules may import (besides itself). `tollwatch.resources` is the wiring.
ALLOWED: dict[str, frozenset[str]] = {
    "tollwatch.contract": frozenset(),
    "tollwatch.adapters": frozenset({"tollwatch.contract"}),
    "tollwatch.core": frozenset({"tollwatch.contract", "tollwatch.adapters"}),
    "tollwatch.spark": frozenset({"tollwatch.contract"}),
    "tollwatch.resources": frozenset({"tollwatch.contract", "tollwatch.adapters", "tollwatch.core"}),
    "tollwatch.downstream": frozenset(
        {"tollwatch.contract", "tollwatch.adapters", "tollwatch.core", "tollwatch.resources"}
    ),
    "tollwatch.prefect": frozenset(
        {"tollwatch.contract", "tollwatch.adapters", "tollwatch.core", "tollwatch.resources", "tollwatch.downstream"}
    ),
    "functions": frozenset({"tollwatch.contract", "tollwatch.adapters", "tollwatch.core", "tollwatch.resources"}),
    "function_app": frozenset({"functions"}),
    "tollwatch.cli": frozenset(
        {
            "tollwatch.contract",
            "tollwatch.adapters",
            "tollwatch.core",
            "tollwatch.resources",
            "tollwatch.downstream",
            "tollwatch.prefect",
        }
    ),
}
#: The load checks are pure (the contract and pyarrow): the Spark side audits a Databricks load with them on the
#: cluster, so they are a package of their own that both the core and the Spark side may import.
CHECKS = "tollwatch.core.quality"
ALLOWED = {key: allowed | {CHECKS} if "tollwatch.core" in allowed else allowed for key, allowed in ALLOWED.items()}
ALLOWED[CHECKS] = frozenset({"tollwatch.contract"})
ALLOWED["tollwatch.core"] |= {CHECKS}
ALLOWED["tollwatch.spark"] |= {CHECKS}
#: Never imported by any product module.
DEV_ONLY = ("tollwatch_dev", "tests", "bench")
FIRST_PARTY = ("tollwatch", "functions", "function_app", *DEV_ONLY)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _package_of(module: str) -> str | None:
    """The rule a first-party module falls under (the longest ALLOWED key it is in)."""
    matches = [key for key in ALLOWED if module == key or module.startswith(key + ".")]
    return max(matches, key=len) if matches else None


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every first-party module `path` imports, with the line (relative imports resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = _module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            # `from tollwatch import resources` imports the module tollwatch.resources
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
            found.append((node.lineno, module))
    return [(line, name) for line, name in found if name.split(".")[0] in FIRST_PARTY]


def _product_files() -> list[Path]:
    files = sorted((ROOT / "tollwatch").rglob("*.py")) + sorted((ROOT / "functions").rglob("*.py"))
    return [*files, ROOT / "function_app.py"]


def _target_package(name: str) -> str | None:
    """The ALLOWED key (or dev-only root) an imported name belongs to; None for `tollwatch` itself."""
    if name.split(".")[0] in DEV_ONLY:
        return name.split(".")[0]
    if name == "tollwatch":
        return None
    return _package_of(name)


def violations() -> list[str]:
    found = []
    for path in _product_files():
        source = _package_of(_module_name(path))
        if source is None:
            if path.name == "__init__.py" and path.parent.name == "tollwatch":
                continue  # the distribution's root package: a docstring and the version
            found.append(f"{path.relative_to(ROOT)}: belongs to no package of the architecture")
            continue
        for line, name in _imports(path):
            target = _target_package(name)
            if target is None or target == source:
                continue
            if target in DEV_ONLY or target not in ALLOWED[source]:
                found.append(f"{path.relative_to(ROOT)}:{line}: {source} may not import {name}")
    return sorted(set(found))


def test_every_product_import_follows_the_architecture():
    assert violations() == []


@pytest.mark.parametrize(
    ("source", "imported"),
    [("tollwatch.core", "tollwatch.prefect.flows.ingest"), ("tollwatch.cli", "tollwatch_dev.stack")],
)
def test_the_checker_catches_a_forbidden_import(tmp_path, monkeypatch, source, imported):
    """The rule check itself can fail: a module that breaks a rule is reported."""
    module = ROOT / (source.replace(".", "/") + "/_probe_forbidden.py")
    module.write_text(f"import {imported}\n")
    try:
        assert any("_probe_forbidden.py:1" in v and imported in v for v in violations())
    finally:
        module.unlink()


def test_the_spark_side_needs_only_the_contract_and_pyspark():
    """On a cluster only pyspark and the wheel exist: the Spark package imports nothing heavier than the contract,
    and the contract's modules import no third-party package at module level (the errors module imports pydantic
    lazily)."""
    third_party = set()
    for path in sorted((ROOT / "tollwatch" / "contract").glob("*.py")):
        if path.stem in {"events", "settings", "webio", "quality"}:  # the flow-side contract: pydantic models
            continue
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                third_party |= {
                    n for n in names if n.split(".")[0] not in {"tollwatch", "__future__"} and not _stdlib(n)
                }
    assert third_party == set()


def _stdlib(name: str) -> bool:
    import sys

    return name.split(".")[0] in sys.stdlib_module_names
