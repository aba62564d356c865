"""A loopback HTTP "inbox" that records every request it gets: the local stand-in for a team's webhook endpoint
or an alerting channel.

Why: automations end in HTTP calls made by the Prefect server (notification blocks, webhook blocks). Tests and
the local stack need a receiver that proves what was sent, how often, and with which body, without any
external service. Every request is answered at once (204; `GET /_received` returns what was recorded as JSON)
and recorded; with a log directory each request is also appended as one JSON line to
`<log_dir>/<first path segment>.jsonl` (`root.jsonl` for `/`), readable by another process.

In-process::

    with Inbox() as inbox:
        ...  # point a block at f"{inbox.url}/alerts"
        [alert] = inbox.wait_for("/alerts")

As a service: `python -m tollwatch_dev.inbox --port 0 --log-dir DIR` prints `INBOX_URL=http://127.0.0.1:<port>`
and serves until SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import Any, Self
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict

log = logging.getLogger(__name__)

RECEIVED_PATH = "/_received"
_SAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]")


class Received(BaseModel):
    """One recorded request."""

    model_config = ConfigDict(frozen=True)

    method: str
    path: str
    query: str = ""
    headers: dict[str, str]
    body: str
    json_body: Any = None
    received_at: datetime

    @property
    def is_json(self) -> bool:
        return self.json_body is not None


def log_name(path: str) -> str:
    """`/alerts/x` → `alerts`; `/` → `root`: the JSON-lines file a request is appended to (no path tricks)."""
    first = path.lstrip("/").split("/", 1)[0]
    name = _SAFE_NAME.sub("_", first)
    return "root" if name in ("", ".", "..") else name


class Inbox:
    """A threaded HTTP server on a loopback port that records requests; use as a context manager."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, log_dir: Path | None = None) -> None:
        self._host, self._port = host, port
        self._log_dir = Path(log_dir) if log_dir is not None else None
        self._received: list[Received] = []
        self._changed = threading.Condition()
        self._log_lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle

    def start(self) -> Self:
        if self._log_dir is not None:
            self._log_dir.mkdir(parents=True, exist_ok=True)
        self._server = ThreadingHTTPServer((self._host, self._port), _handler_for(self))
        self._server.daemon_threads = True
        server = self._server
        self._thread = threading.Thread(
            target=lambda: server.serve_forever(poll_interval=0.1), name="inbox", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """`http://host:port`, without a trailing slash."""
        if self._server is None:
            raise RuntimeError("the inbox is not running")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # -- what was received

    def received(self, path_prefix: str = "/", match: Callable[[Received], bool] | None = None) -> list[Received]:
        """Requests whose path starts with `path_prefix` (and that satisfy `match`), oldest first."""
        with self._changed:
            return [r for r in self._received if r.path.startswith(path_prefix) and (match is None or match(r))]

    def wait_for(
        self,
        path: str,
        count: int = 1,
        timeout_s: float = 30.0,
        *,
        match: Callable[[Received], bool] | None = None,
    ) -> list[Received]:
        """Block until at least `count` requests under `path` (satisfying `match`) arrived; return them all.

        Raises TimeoutError (listing what did arrive) if they do not come in time.
        """
        with self._changed:
            arrived = self._changed.wait_for(lambda: len(self.received(path, match)) >= count, timeout=timeout_s)
            found = self.received(path, match)
        if not arrived:
            seen = ", ".join(f"{r.method} {r.path}" for r in self.received()) or "nothing"
            raise TimeoutError(f"expected {count} request(s) to {path} within {timeout_s}s, got {len(found)}: {seen}")
        return found

    def record(self, request: Received) -> None:
        """Store one request (and append it to the JSON-lines log)."""
        if self._log_dir is not None:
            line = request.model_dump_json() + "\n"
            with self._log_lock, (self._log_dir / f"{log_name(request.path)}.jsonl").open("a") as handle:
                handle.write(line)
        with self._changed:
            self._received.append(request)
            self._changed.notify_all()


def _handler_for(inbox: Inbox) -> type[BaseHTTPRequestHandler]:
    class _Handler(BaseHTTPRequestHandler):
        server_version = "tollwatch-inbox/1"

        def _body(self) -> bytes:
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
                    if size == 0:
                        self.rfile.readline()  # the blank line after the last chunk
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _record(self) -> None:
            raw = self._body()
            text = raw.decode("utf-8", errors="replace")
            try:
                parsed = json.loads(text) if text.strip() else None
            except ValueError:
                parsed = None
            parts = urlsplit(self.path)
            inbox.record(
                Received(
                    method=self.command,
                    path=parts.path or "/",
                    query=parts.query,
                    headers={key.lower(): value for key, value in self.headers.items()},
                    body=text,
                    json_body=parsed,
                    received_at=datetime.now(UTC),
                )
            )
            self.send_response(204)
            self.end_headers()

        def do_GET(self) -> None:
            if urlsplit(self.path).path == RECEIVED_PATH:
                body = json.dumps([r.model_dump(mode="json") for r in inbox.received()]).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            self._record()

        do_POST = do_PUT = do_PATCH = do_DELETE = _record

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("inbox: " + format, *args)

    return _Handler


# --------------------------------------------------------------------------------------------- service


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tollwatch_dev.inbox", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--log-dir", type=Path, default=None)
    args = parser.parse_args(argv)

    stop = threading.Event()

    def _on_signal(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    with Inbox(args.host, args.port, args.log_dir) as inbox:
        print(f"INBOX_URL={inbox.url}", flush=True)
        stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
