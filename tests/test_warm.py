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

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Path]:
    sock = tmp_path / "warm.sock"
    process = subprocess.Popen(
        [sys.executable, "-m", "tollwatch.warm.server", "--socket", str(sock), "--module", "tests.support.warm_probe",
         "--no-preload"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    assert process.stdout is not None
    assert "WARM_READY" in process.stdout.readline()
    yield sock
    process.terminate()
    process.wait(timeout=10)
    assert not sock.exists()  # the server removes its socket when it stops


def client(sock: Path | None, *args: str, cwd: Path, **env: str) -> subprocess.Popen[str]:
    environ = {k: v for k, v in os.environ.items() if k != "TOLLWATCH_WARM_SOCKET"} | env
    if sock is not None:
        environ["TOLLWATCH_WARM_SOCKET"] = str(sock)
    return subprocess.Popen(
        [sys.executable, "-m", "tollwatch.warm.client", *args],
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
