"""`python -m tollwatch_dev.prefect_server --host H --port P`: the local stack's Prefect server on SQLite.

It is `prefect server start` (the same `create_app(final=True)` served by uvicorn, with every service) plus
one policy: a 503 carries `Retry-After`. The PostgreSQL stack (the default) runs `prefect server start` itself:
there no 503 was seen in any measured burst (bench/workarounds.py).

Why: on SQLite, a write that starts from a read snapshot another connection has since written past fails at
once with SQLITE_BUSY_SNAPSHOT ("database is locked"); Prefect's API answers 503, and Prefect's clients —
the worker, flow runs, and the automations' own in-process client that creates runs — retry after 2, 4, 8 …
s when no `Retry-After` says otherwise. The collision is over in milliseconds, so that backoff was the
largest single cost of a backfill's run creation (~1 in 20 creates collided even on an idle server; 192
monthly runs took 6.4 min, most of it in those waits; bench/workarounds.py on prefect 3.9.1, 48 monthly runs:
98.3 s without the header, 64.2 s with it). The in-process client goes through the same cached app, so the header
reaches it too. Any other status is untouched.
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
    """Prefect's server app (the one `create_app()` caches, so the server's in-process clients use it too) with
    the policy added once."""
    from tollwatch.prefect.internals import server_app

    app = server_app()
    if not any(m.cls is RetryAfterOn503 for m in app.user_middleware):
        app.add_middleware(RetryAfterOn503, seconds=retry_after_s)
    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tollwatch_dev.prefect_server", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--retry-after", type=float, default=RETRY_AFTER_S, help="seconds, sent with every 503")
    args = parser.parse_args(argv)

    import uvicorn
    from prefect.settings import get_current_settings

    app = build_app(args.retry_after)
    server = get_current_settings().server
    print(f"prefect server (tollwatch_dev.prefect_server) on http://{args.host}:{args.port}/api", flush=True)
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
