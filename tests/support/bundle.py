"""The Databricks bundle (databricks.yml + resources/*.py) loaded offline, the way the Databricks CLI loads it.

The CLI is not installable here; databricks-bundles' own loader is, and the CLI runs it as a process in the bundle
root with a JSON input. tests/unit/test_bundle.py checks what it loads; the Jobs API double
(tests/support/databricks_double.py) runs the jobs it defines.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
BUNDLE_YML = ROOT / "databricks.yml"
#: Per-workspace facts with no sensible default: the only variables a deploy must be given.
REQUIRED = {"storage_account": "tollwatchprod", "storage_container": "landing"}


def bundle_config() -> dict[str, Any]:
    return yaml.safe_load(BUNDLE_YML.read_text())


def cli_input(target: str, overrides: dict[str, str]) -> dict[str, Any]:
    """What the CLI hands the Python loader: the YAML, `bundle.target` set, each variable with its `value`
    (`--var` first, then the target's value, then the default)."""
    config = bundle_config()
    target_values = config["targets"][target].get("variables", {})
    variables = {}
    for name, spec in config.get("variables", {}).items():
        value = overrides.get(name, target_values.get(name, spec.get("default")))
        assert value is not None, f"variable {name} has no value: the CLI would refuse to load the bundle"
        variables[name] = {**spec, "value": value}
    return {**config, "bundle": {**config["bundle"], "target": target}, "variables": variables}


def load_resources(tmp: Path, target: str = "dev", **overrides: str) -> dict[str, Any]:
    """Run databricks-bundles' loader as the CLI does (a process in the bundle root); its jobs, by resource key."""
    paths = {name: tmp / f"{name}.json" for name in ("input", "output", "diagnostics", "locations")}
    paths["input"].write_text(json.dumps(cli_input(target, REQUIRED | overrides)))
    command = [sys.executable, "-m", "databricks.bundles.build", "--phase", "load_resources"]
    for name, path in paths.items():
        command += [f"--{name}", str(path)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    diagnostics = [json.loads(line) for line in paths["diagnostics"].read_text().splitlines() if line.strip()]
    assert done.returncode == 0, f"loader failed: {diagnostics}\n{done.stderr[-3000:]}"
    assert diagnostics == [], diagnostics
    locations = [json.loads(line) for line in paths["locations"].read_text().splitlines()]
    assert {entry["file"] for entry in locations} <= {"resources/__init__.py", "resources/jobs.py"}, locations
    return json.loads(paths["output"].read_text())["resources"]["jobs"]
