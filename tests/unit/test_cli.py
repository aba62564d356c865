"""The CLI answers mistakes with one line and exit code 1, never a traceback."""

from __future__ import annotations

from typer.testing import CliRunner

from tollwatch.cli.main import app

runner = CliRunner()


def test_reversed_window_is_refused_before_any_run(tmp_path):
    result = runner.invoke(app, ["ingest", "--start", "2024-02-01", "--stop", "2024-01-01", "--no-local-stack"])
    assert result.exit_code == 1
    assert "stop (2024-01-01) must be after start (2024-02-01)" in result.output
    assert "Traceback" not in result.output


def test_half_a_window_is_refused(tmp_path):
    result = runner.invoke(app, ["ingest", "--start", "2024-02-01", "--no-local-stack"])
    assert result.exit_code == 1
    assert "--start and --stop go together" in result.output


def test_missing_stack_is_explained(tmp_path):
    result = runner.invoke(
        app, ["ingest", "--start", "2024-01-01", "--stop", "2024-01-02", "--state-dir", str(tmp_path)]
    )
    assert result.exit_code == 1
    assert f"no local stack is recorded in {tmp_path}" in result.output


def test_bad_date_is_explained(tmp_path):
    result = runner.invoke(app, ["ingest", "--start", "2024-02-30", "--stop", "2024-03-01", "--no-local-stack"])
    assert result.exit_code == 1
    assert "day is out of range" in result.output
