"""Read events back from the real Prefect server's events API (what automations and the UI see)."""

from __future__ import annotations

import time
from typing import Any

import httpx


def prefect_auth_string() -> str | None:
    """The basic-auth string Prefect's clients would use now (the current settings: the stack under test)."""
    from prefect.settings import get_current_settings

    auth = get_current_settings().api.auth_string
    return auth.get_secret_value() if auth else None


def prefect_headers() -> dict[str, str]:
    """The `Authorization` header Prefect's own clients would send now (the stacks' servers require basic auth):
    from the current Prefect settings, so a test pointed at another stack's server sends that server's string."""
    from tollwatch_dev.stack import basic_auth

    auth = prefect_auth_string()
    return basic_auth(auth) if auth else {}


def read_events(api_url: str, name: str | None = None, *, limit: int = 50) -> list[dict[str, Any]]:
    """Events stored by the server, optionally of one name (newest first, as the API returns them)."""
    body: dict[str, Any] = {"limit": limit, "filter": {}}
    if name:
        body["filter"]["event"] = {"name": [name]}
    response = httpx.post(f"{api_url.rstrip('/')}/events/filter", json=body, timeout=30, headers=prefect_headers())
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
