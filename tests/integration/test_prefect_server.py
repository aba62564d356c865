"""The SQLite stack's Prefect server policy: 503s carry Retry-After, for the network and in-process clients alike."""

from __future__ import annotations

import asyncio

import httpx
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from tollwatch_dev.prefect_server import RetryAfterOn503, build_app


def _app(status: int, headers: dict[str, str] | None = None) -> Starlette:
    async def endpoint(_request: object) -> PlainTextResponse:
        return PlainTextResponse("x", status_code=status, headers=headers)

    return Starlette(routes=[Route("/", endpoint)])


def _get(app: object) -> httpx.Response:
    async def call() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:  # type: ignore[arg-type]
            return await client.get("/")

    return asyncio.run(call())


def test_a_503_gets_retry_after_and_other_answers_are_untouched():
    assert _get(RetryAfterOn503(_app(503), seconds=0.25)).headers["retry-after"] == "0.25"
    assert "retry-after" not in _get(RetryAfterOn503(_app(200))).headers
    assert "retry-after" not in _get(RetryAfterOn503(_app(500))).headers


def test_a_retry_after_the_app_chose_is_kept():
    assert _get(RetryAfterOn503(_app(503, {"Retry-After": "7"}))).headers["retry-after"] == "7"


def test_prefects_own_clients_get_the_same_app_with_the_policy():
    """The automations create runs through `create_app()` in-process: Prefect's cache hands them the decorated app."""
    from prefect.server.api.server import create_app

    app = build_app(0.25)
    assert create_app() is app
    assert [m.cls for m in app.user_middleware].count(RetryAfterOn503) == 1
    assert build_app(0.25) is app  # building twice does not stack the middleware
    assert [m.cls for m in app.user_middleware].count(RetryAfterOn503) == 1
