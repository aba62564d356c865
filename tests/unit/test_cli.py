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


def test_an_unreachable_prefect_api_is_one_sentence_not_a_traceback(monkeypatch):
    """`tollwatch backfill` reads which chunks already have runs from Prefect before it emits anything."""
    from tests.support.funcapp import closed_port

    url = f"http://127.0.0.1:{closed_port()}/api"
    monkeypatch.setenv("PREFECT_API_URL", url)
    monkeypatch.setenv("TOLLWATCH_PREFECT_API_URL", url)
    monkeypatch.setenv("PREFECT_CLIENT_MAX_RETRIES", "0")
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: url}):
        result = runner.invoke(
            app, ["backfill", "--start", "2024-01-01", "--stop", "2024-02-01", "--chunk", "month", "--no-local-stack"]
        )
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith(f"error: could not reach the Prefect API at {url} (")
    assert "Connection refused" in lines[0]
    assert lines[0].endswith("is the server up? (`make up`, or set PREFECT_API_URL)")
