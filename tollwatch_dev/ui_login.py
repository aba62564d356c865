"""Log a headless browser into a Prefect UI that requires basic auth, the way a person does: the UI's own login.

The local stack's server requires `PREFECT_SERVER_API_AUTH_STRING` (tollwatch_dev.stack_secrets). Prefect's UIs (v1
and v2) ask for it on a login page and keep it, base64'd, in `localStorage["prefect-password"]` of the UI's origin;
every API call then carries `Authorization: Basic <that>`. Headless Chromium cannot type into the page, and
`--screenshot` cannot set storage first, so this serves the UI through a loopback pass-through on an origin of its
own whose one extra page, `/__tollwatch_login`, stores the password exactly as the login form would and
redirects to the page asked for. The UI then calls the real API (its `api_url` is absolute) with that header.

Loopback only, GET/HEAD only (a UI's assets and `ui-settings`; its API calls go to the server directly).
"""

from __future__ import annotations

import base64
import json
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self
from urllib.parse import parse_qs, quote, urlsplit

import httpx

LOGIN_PATH = "/__tollwatch_login"
_HOP_HEADERS = frozenset({"host", "connection", "keep-alive", "accept-encoding", "content-length"})
_PASSED_HEADERS = ("content-type", "cache-control", "etag", "last-modified", "location")


class UiLogin:
    """`with UiLogin("http://127.0.0.1:4200", auth) as ui: screenshot(ui.url("/runs"), ...)`."""

    def __init__(self, ui_base: str, auth_string: str) -> None:
        self.ui_base = ui_base.rstrip("/")
        self._stored = base64.b64encode(auth_string.encode()).decode()
        self._http = httpx.Client(base_url=self.ui_base, timeout=30, trust_env=False, follow_redirects=False)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.login = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._server.serve_forever, name="ui-login", daemon=True)

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self._server.server_port}"

    def url(self, path: str) -> str:
        """The address that logs in, then opens `path` (e.g. `/runs/flow-run/<id>`) of the UI."""
        return f"{self.origin}{LOGIN_PATH}?next={quote(path, safe='')}"

    def login_page(self, next_path: str) -> bytes:
        target = next_path if next_path.startswith("/") and not next_path.startswith("//") else "/"
        script = (
            f"localStorage.setItem('prefect-password', {json.dumps(self._stored)});"
            f"location.replace({json.dumps(target)});"
        )
        return f"<!doctype html><title>login</title><script>{script}</script>".encode()

    def fetch(self, method: str, path: str, headers: dict[str, str]) -> httpx.Response:
        """The UI's answer, asked with the browser's headers (the UI serves its app for a deep link only to an
        HTML navigation, which it recognises by `Accept`)."""
        passed = {k: v for k, v in headers.items() if k.lower() not in _HOP_HEADERS}
        return self._http.request(method, path, headers=passed)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._http.close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _serve(self) -> None:
        login: UiLogin = self.server.login  # type: ignore[attr-defined]
        parts = urlsplit(self.path)
        if parts.path == LOGIN_PATH:
            next_path = parse_qs(parts.query).get("next", ["/"])[-1]
            self._answer(HTTPStatus.OK, {"content-type": "text/html"}, login.login_page(next_path))
            return
        upstream = login.fetch(self.command, self.path, dict(self.headers.items()))
        headers = {k: v for k, v in upstream.headers.items() if k.lower() in _PASSED_HEADERS}
        self._answer(HTTPStatus(upstream.status_code), headers, upstream.content)

    def _answer(self, status: HTTPStatus, headers: dict[str, str], body: bytes) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_HEAD = _serve

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the test reads the page, not this log."""
