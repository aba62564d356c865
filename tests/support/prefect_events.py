"""Read events back from the real Prefect server's events API (what automations and the UI see)."""

from __future__ import annotations

import time
from typing import Any

import httpx


def read_events(api_url: str, name: str | None = None, *, limit: int = 50) -> list[dict[str, Any]]:
    """Events stored by the server, optionally of one name (newest first, as the API returns them)."""
    body: dict[str, Any] = {"limit": limit, "filter": {}}
    if name:
        body["filter"]["event"] = {"name": [name]}
    response = httpx.post(f"{api_url.rstrip('/')}/events/filter", json=body, timeout=30)
    response.raise_for_status()
    return list(response.json()["events"])


def wait_for_events(
    api_url: str, name: str, predicate: Any = None, *, count: int = 1, timeout_s: float = 30.0
) -> list[dict[str, Any]]:
    """Poll until at least `count` events named `name` (matching `predicate`) are stored.

    The server persists events asynchronously after accepting them, so a read right after a 204 may miss one.
    """
    deadline = time.monotonic() + timeout_s
    found: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        found = [e for e in read_events(api_url, name) if predicate is None or predicate(e)]
        if len(found) >= count:
            return found
        time.sleep(0.25)
    raise AssertionError(f"expected {count} {name} event(s) within {timeout_s}s, found {len(found)}")
