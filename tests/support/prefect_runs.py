"""Read flow runs back from the real Prefect server's API, newest first.

The session's server collects hundreds of runs across test modules. Prefect's `/flow_runs/filter` sorts by id
by default and ids are random UUIDs, so an unsorted page of 50 misses a fresh run once the server holds more
than 50: every read here sorts by expected start time (a triggered run's is "now") and can be narrowed to one
deployment.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx

from tests.support.prefect_events import prefect_headers

Run = dict[str, Any]


def read_runs(api_url: str, *, deployment_id: uuid.UUID | str | None = None, limit: int = 200) -> list[Run]:
    """The newest `limit` flow runs (by expected start time), optionally of one deployment."""
    body: dict[str, Any] = {"limit": limit, "sort": "EXPECTED_START_TIME_DESC"}
    if deployment_id is not None:
        body["deployments"] = {"id": {"any_": [str(deployment_id)]}}
    response = httpx.post(f"{api_url.rstrip('/')}/flow_runs/filter", json=body, timeout=10, headers=prefect_headers())
    response.raise_for_status()
    return list(response.json())


def wait_for_runs(
    api_url: str,
    predicate: Callable[[Run], bool],
    *,
    deployment_id: uuid.UUID | str | None = None,
    timeout_s: float = 30.0,
) -> list[Run]:
    """Poll until some run matches `predicate`; returns the matches, or [] at the deadline (callers assert)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = [r for r in read_runs(api_url, deployment_id=deployment_id) if predicate(r)]
        if found:
            return found
        time.sleep(0.5)
    return []
