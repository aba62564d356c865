"""The warm execution path's plumbing: a client hands its run to the pre-imported server, which forks a child
that gets the client's argv, environment, working directory and stdio; exit codes and signals travel back."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


WARM_SERVER = (sys.executable, "-m", "tollwatch_dev.warm.server")


def _serve(sock: Path, *options: str, **env: str) -> Iterator[Path]:
    process = subprocess.Popen(
        [*WARM_SERVER, "--socket", str(sock), "--module", "tests.support.warm_probe", *options],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        env=os.environ | env,
    )  # fmt: skip
    assert process.stdout is not None
    assert "WARM_READY" in process.stdout.readline()
    yield sock
    process.terminate()
    process.wait(timeout=10)
    assert not sock.exists()  # the server removes its socket when it stops


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Path]:
    yield from _serve(tmp_path / "warm.sock", "--no-preload")


@pytest.fixture
def preloaded_server(tmp_path: Path) -> Iterator[Path]:
    """With prefect imported (and its settings read) before the fork, from an API URL of the server's own."""
    yield from _serve(tmp_path / "warm.sock", PREFECT_API_URL="http://127.0.0.1:9/server-api")


def client(sock: Path | None, *args: str, cwd: Path, **env: str) -> subprocess.Popen[str]:
    environ = {k: v for k, v in os.environ.items() if k != "TOLLWATCH_WARM_SOCKET"} | env
    if sock is not None:
        environ["TOLLWATCH_WARM_SOCKET"] = str(sock)
    return subprocess.Popen(
        [sys.executable, "-m", "tollwatch_dev.warm.client", *args],
        cwd=cwd,
        env=environ | {"PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_the_child_runs_with_the_clients_argv_env_cwd_and_stdio_and_its_exit_code(server, tmp_path):
    run = client(server, "a", "b", cwd=tmp_path, WARM_PROBE="hello", WARM_PROBE_EXIT="3")
    out, err = run.communicate(timeout=30)
    assert run.returncode == 3
    assert f"argv=['a', 'b'] cwd={tmp_path} probe=hello" in out
    assert "to-stderr" in err


def test_sigterm_to_the_client_reaches_the_child(server, tmp_path):
    run = client(server, "sleep", cwd=tmp_path)
    assert run.stdout is not None
    assert "argv=['sleep']" in run.stdout.readline()  # the child is running
    run.send_signal(signal.SIGTERM)
    run.wait(timeout=30)
    assert run.returncode == 128 + signal.SIGTERM  # the child died of the forwarded SIGTERM


def test_without_a_server_the_client_becomes_prefects_engine(tmp_path):
    run = client(tmp_path / "missing.sock", "not-a-flow-run-id", cwd=tmp_path)
    _, err = run.communicate(timeout=120)
    assert run.returncode == 1
    assert "Invalid flow run id" in err  # prefect.engine's own message: the cold path ran


def test_two_runs_at_once_each_get_their_own_child(server, tmp_path):
    first = client(server, "sleep", cwd=tmp_path)
    second = client(server, "x", cwd=tmp_path, WARM_PROBE_EXIT="0")
    out, _ = second.communicate(timeout=30)
    assert second.returncode == 0  # not blocked behind the sleeping first run
    assert "argv=['x']" in out
    assert first.poll() is None  # the first child is still sleeping
    first.send_signal(signal.SIGTERM)
    first.wait(timeout=30)


def test_a_child_whose_environment_changes_prefect_settings_sees_them(preloaded_server, tmp_path):
    run = client(preloaded_server, cwd=tmp_path, WARM_PROBE_SETTINGS="1", PREFECT_API_URL="http://127.0.0.1:9/run-api")
    out, err = run.communicate(timeout=60)
    assert run.returncode == 0, err
    assert "api=http://127.0.0.1:9/run-api" in out


def test_settings_are_reread_only_when_the_prefect_settings_environment_differs():
    from tollwatch_dev.warm.server import _settings_environment

    server = {"PREFECT_API_URL": "a", "HOME": "/root"}
    run = {"PREFECT_API_URL": "a", "PREFECT__FLOW_RUN_ID": "1234", "HOME": "/tmp"}
    assert _settings_environment(run) == _settings_environment(server)  # per-run values and other vars: no
    assert _settings_environment(run | {"PREFECT_LOGGING_LEVEL": "DEBUG"}) != _settings_environment(server)


def test_a_run_from_a_worker_sharing_the_servers_environment_keeps_the_preloaded_settings(monkeypatch):
    """The local stack starts the worker and the warm server with one environment; the worker hands each run
    that environment overlaid with its settings as Prefect re-serialises them ('false' → 'False')."""
    from prefect.settings import Settings
    from prefect.workers.base import BaseJobConfiguration

    from tollwatch_dev.warm.server import _settings_environment, settings_environments

    raw = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_WORKER_PREFETCH_SECONDS": "5"}
    for name, value in raw.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr("prefect.settings.get_current_settings", Settings)  # read from this environment
    monkeypatch.setattr("prefect.workers.base.get_current_settings", Settings)
    environ = dict(os.environ)
    run = environ | BaseJobConfiguration._base_environment() | {"PREFECT__FLOW_RUN_ID": "1234"}

    known = settings_environments(environ)
    assert _settings_environment(run) != _settings_environment(environ)  # the re-serialisation is real
    assert _settings_environment(run) in known
    assert _settings_environment(run | {"PREFECT_LOGGING_LEVEL": "DEBUG"}) not in known


def test_ca_bundle_contexts_are_parsed_once_and_other_call_shapes_are_not_shared(monkeypatch):
    import ssl

    import certifi

    from tollwatch_dev.warm.server import share_ca_bundle_contexts

    monkeypatch.setattr(ssl, "create_default_context", ssl.create_default_context)  # restored after the test
    share_ca_bundle_contexts()
    first = ssl.create_default_context(cafile=certifi.where())
    assert ssl.create_default_context(cafile=certifi.where()) is first
    assert first.verify_mode == ssl.CERT_REQUIRED
    assert first.check_hostname
    assert ssl.create_default_context() is not ssl.create_default_context()  # e.g. Prefect's insecure mode edits it
    assert ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=certifi.where()) is not first
