"""The CLI against a Prefect API nobody answers: one sentence, never a traceback.

In the integration layer because it waits on real connection attempts to a closed loopback port (and on the retry
policy's backoff between them): seconds of wall time the unit layer does not spend.
"""

from __future__ import annotations

from typer.testing import CliRunner

from tests.support.funcapp import closed_port
from tollwatch.cli.main import app

runner = CliRunner()


def test_an_unreachable_prefect_api_is_one_sentence_not_a_traceback(monkeypatch):
    """`tollwatch backfill` reads which chunks already have runs from Prefect before it emits anything."""
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
