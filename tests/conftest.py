"""Fixtures that start real components: the local stack (Azurite + Prefect server on PostgreSQL, as production
runs it) once per session, and a fresh in-process Socrata mirror, blob container and Iceberg warehouse per test."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import pytest

from tollwatch_dev.mirror import MirrorServer
from tollwatch_dev.stack import LocalStack, StackEndpoints

_STACK_LOGS: list[Path] = []
_LOG_TAIL_LINES = 80


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackEndpoints]:
    """Azurite and a Prefect server on the stack's PostgreSQL, started by the project itself (loopback ports, a
    Unix socket for PostgreSQL)."""
    state_dir = tmp_path_factory.mktemp("stack")
    local = LocalStack(state_dir, services=("azurite", "prefect"), prefect_ui=False, db="postgres")
    _STACK_LOGS.append(state_dir / "logs")
    endpoints = local.up()
    try:
        yield endpoints
    finally:
        from prefect.logging.handlers import APILogHandler

        APILogHandler().flush()  # send queued flow-run logs while the server is still up
        local.down()


@pytest.fixture
def mirror() -> Iterator[MirrorServer]:
    """A Socrata-compatible mirror serving January-March 2024 (deterministic synthetic data)."""
    with MirrorServer("qzve-kjga", date(2024, 1, 1), date(2024, 4, 1)) as server:
        yield server


@pytest.fixture
def env(
    stack: StackEndpoints, mirror: MirrorServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[dict[str, str]]:
    """Point tollwatch and prefect at the stack, with a container and warehouse of this test's own."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    values = {
        "PREFECT_API_URL": stack.prefect_api_url,
        "TOLLWATCH_UPSTREAM_BASE_URL": mirror.url,
        "TOLLWATCH_STORAGE_CONNECTION_STRING": stack.blob_connection_string,
        "TOLLWATCH_STORAGE_CONTAINER": f"t-{uuid.uuid4().hex[:20]}",
        "TOLLWATCH_WAREHOUSE_DIR": str(tmp_path / "warehouse"),
        "TOLLWATCH_UPSTREAM_MAX_ATTEMPTS": "3",
        "TOLLWATCH_UPSTREAM_BACKOFF_MAX_S": "0.2",
        "TOLLWATCH_TASK_RETRIES": "0",
    }
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("TOLLWATCH_CATALOG_PROPERTIES", raising=False)
    with temporary_settings(updates={PREFECT_API_URL: stack.prefect_api_url}):
        yield values


def pytest_configure(config: pytest.Config) -> None:
    # Tests never talk to Prefect Cloud or phone home.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A failing stack test shows the tail of the stack's server logs in its report: a 500 seen on CI is otherwise
    only "Internal Server Error", and the traceback that explains it stays in a temp dir nobody can open."""
    outcome = yield
    report = outcome.get_result()
    if not report.failed or "stack" not in getattr(item, "fixturenames", ()):
        return
    for logs in _STACK_LOGS:
        for name in ("prefect.log", "postgres.log"):
            path = logs / name
            if path.exists():
                lines = path.read_text(errors="replace").splitlines()[-_LOG_TAIL_LINES:]
                report.sections.append((f"stack {name} (last {len(lines)} lines)", "\n".join(lines)))
