"""`python -m tollwatch.dev.prefect_server --host H --port P`: the local stack's Prefect server.

It is `prefect server start` (the same `create_app(final=True)` served by uvicorn, with every service) plus
one policy: a 503 carries `Retry-After`.

Why: on SQLite, a write that starts from a read snapshot another connection has since written past fails at
once with SQLITE_BUSY_SNAPSHOT ("database is locked"); Prefect's API answers 503, and Prefect's clients —
the worker, flow runs, and the automations' own in-process client that creates runs — retry after 2, 4, 8 …
s when no `Retry-After` says otherwise. The collision is over in milliseconds, so that backoff was the
largest single cost of a backfill's run creation (~1 in 20 creates collided even on an idle server; 192
monthly runs took 6.4 min, most of it in those waits). The in-process client goes through the same cached
app, so the header reaches it too. Any other status is untouched.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: Seconds a client waits before retrying a 503 (Prefect's own clients honour the header).
RETRY_AFTER_S = 0.5


class RetryAfterOn503:
    """ASGI middleware: add `Retry-After` to every 503 response that does not already have one."""

    def __init__(self, app: ASGIApp, seconds: float = RETRY_AFTER_S) -> None:
        self.app = app
        self.value = f"{seconds:g}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_retry_after(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] == 503:
                headers = list(message.get("headers", []))
                if not any(name.lower() == b"retry-after" for name, _ in headers):
                    message["headers"] = [*headers, (b"retry-after", self.value)]
            await send(message)

        await self.app(scope, receive, send_with_retry_after)


def build_app(retry_after_s: float = RETRY_AFTER_S) -> Any:
    """Prefect's server app with the policy added; `create_app()` (the server's own clients) returns it too."""
    from prefect.server.api.server import create_app

    app = create_app(final=True)
    if not any(m.cls is RetryAfterOn503 for m in app.user_middleware):
        app.add_middleware(RetryAfterOn503, seconds=retry_after_s)
    _hand_in_process_clients(app)
    return app


def _hand_in_process_clients(app: Any) -> None:
    """Make an argument-less `create_app()` return `app` at once while the settings are the ones it was built with.

    Why: every automation action builds an in-process client, whose constructor calls `create_app()`; Prefect
    then hashes every setting (serialising them all) and re-runs its logging `dictConfig` before finding the
    cached app. py-spy on the server during a 96-run backfill: 6.6 % of its CPU went there. The shortcut only
    applies while the current settings object is the one the app was built with (any other settings, or any
    argument, go to Prefect's own `create_app`), so the answer is the cached app Prefect would have returned.
    """
    import prefect.server.api.server as server_module
    from prefect.settings import get_current_settings

    original = getattr(server_module.create_app, "tollwatch_original", server_module.create_app)
    built_with = get_current_settings()

    def create_app(
        settings: Any = None,
        ephemeral: bool = False,
        webserver_only: bool = False,
        final: bool = False,
        ignore_cache: bool = False,
    ) -> Any:
        if (
            settings is None
            and not (ephemeral or webserver_only or ignore_cache)
            and get_current_settings() is built_with
        ):
            return app
        return original(settings, ephemeral, webserver_only, final, ignore_cache)

    create_app.tollwatch_original = original  # type: ignore[attr-defined]
    server_module.create_app = create_app  # type: ignore[assignment]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tollwatch.dev.prefect_server", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--retry-after", type=float, default=RETRY_AFTER_S, help="seconds, sent with every 503")
    args = parser.parse_args(argv)

    import uvicorn
    from prefect.settings import get_current_settings

    app = build_app(args.retry_after)
    server = get_current_settings().server
    print(f"prefect server (tollwatch.dev.prefect_server) on http://{args.host}:{args.port}/api", flush=True)
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level=str(server.logging_level).lower(),
        timeout_keep_alive=server.api.keepalive_timeout,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
