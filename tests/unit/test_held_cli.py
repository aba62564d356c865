"""`tollwatch publish` / `discard` where the table is out of this process's reach (Databricks): a clear refusal that
says how to settle the load in Spark, never a traceback."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from tollwatch.cli.main import app


@pytest.mark.parametrize("command", ["publish", "discard"])
def test_on_databricks_settling_says_how_to_do_it_in_spark(command: str, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("TOLLWATCH_ENGINE", "databricks")

    result = CliRunner().invoke(app, [command, "r-1", "--reason", "x", "--no-local-stack"])

    assert result.exit_code == 2, result.output
    assert "system.fast_forward" in result.output
    assert "audit_r_1" in result.output
    assert "Traceback" not in result.output
