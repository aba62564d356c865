"""A local stand-in for the Azure Functions host's HTTP front door, for curl, SDKs and browsers.

Azure Functions Core Tools cannot be installed here (its installer downloads binaries), so this serves the
HTTP routes of the *built* app on loopback: it asks the app for its functions (`app.get_functions()`), takes
each HTTP trigger's route, methods and auth level, and calls the registered Python function
(`get_user_function()`) with a real `azure.functions.HttpRequest`, then writes its `HttpResponse` back.

Like the Functions host: routes live under `/api/`, and functions with auth level FUNCTION or ADMIN need the
key in the `x-functions-key` header or the `code` query parameter (401 otherwise; the key comes from
`TOLLWATCH_FUNCTION_KEY`). An exception in a function is a 500 with an empty body; the traceback goes to
the log. Non-HTTP triggers (timer, Event Grid trigger) are not served; `tollwatch watch --once` runs the timer.
"""

from __future__ import annotations

import hmac
import importlib.util
import logging
import sys
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self
from urllib.parse import parse_qs, urlsplit

import azure.functions as func

from tollwatch.contract.errors import TollwatchError
from tollwatch.contract.webio import FUNCTION_KEY_HEADER, FUNCTION_KEY_QUERY, HOST_MAX_BODY_BYTES, ROUTE_PREFIX

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
DEFAULT_APP_PATH = Path(__file__).resolve().parents[1] / "function_app.py"


class FunctionHostError(TollwatchError):
    """The app cannot be served as configured; the message says what to change."""


@dataclass(frozen=True)
class HttpRoute:
    """One HTTP-triggered function as the host exposes it."""

    path: str
    function_name: str
    methods: frozenset[str]
    auth_level: func.AuthLevel
    handler: Callable[[func.HttpRequest], func.HttpResponse]

    @property
    def needs_key(self) -> bool:
        return self.auth_level != func.AuthLevel.ANONYMOUS


def load_function_app(path: Path = DEFAULT_APP_PATH) -> func.FunctionApp:
    """Import `function_app.py` by path (it is a top-level script in Azure, not part of the package)."""
    if not path.exists():
        raise FunctionHostError(f"no function app at {path}")
    root = str(path.parent)
    if root not in sys.path:
        sys.path.insert(0, root)  # `functions/` sits next to it, as in the deployed app
    spec = importlib.util.spec_from_file_location("function_app", path)
    if spec is None or spec.loader is None:
        raise FunctionHostError(f"cannot import {path}")
    module = sys.modules.get("function_app")
    if module is None or getattr(module, "__file__", None) != str(path):
        module = importlib.util.module_from_spec(spec)
        sys.modules["function_app"] = module
        spec.loader.exec_module(module)
    app = getattr(module, "app", None)
    if not isinstance(app, func.FunctionApp):
        raise FunctionHostError(f"{path} defines no `app = func.FunctionApp(...)`")
    return app


_INDEXED: weakref.WeakKeyDictionary[func.FunctionApp, list[func.Function]] = weakref.WeakKeyDictionary()
_INDEX_LOCK = threading.Lock()


def indexed_functions(app: func.FunctionApp) -> list[func.Function]:
    """`app.get_functions()`, once per app: a second call fails the library's own duplicate-name check."""
    with _INDEX_LOCK:
        if app not in _INDEXED:
            _INDEXED[app] = app.get_functions()
        return _INDEXED[app]


def http_routes(app: func.FunctionApp, route_prefix: str = ROUTE_PREFIX) -> list[HttpRoute]:
    """The app's HTTP functions with the path, methods and auth level the Functions host would give them."""
    routes = []
    for function in indexed_functions(app):
        if not function.is_http_function():
            continue
        trigger = function.get_trigger()
        name = function.get_function_name()
        route = (getattr(trigger, "route", None) or name).strip("/")
        methods = getattr(trigger, "methods", None) or list(func.HttpMethod)
        level = getattr(trigger, "auth_level", None) or func.AuthLevel.FUNCTION
        routes.append(
            HttpRoute(
                path=f"/{route_prefix.strip('/')}/{route}" if route_prefix else f"/{route}",
                function_name=name,
                methods=frozenset(str(getattr(m, "value", m)).upper() for m in methods),
                auth_level=func.AuthLevel(level),
                handler=function.get_user_function(),
            )
        )
    return routes


def find_function(app: func.FunctionApp, name: str) -> Callable[..., Any]:
    """The Python function registered under `name` (for triggers the dev host does not serve)."""
    for function in indexed_functions(app):
        if function.get_function_name() == name:
            return function.get_user_function()
    raise FunctionHostError(f"the function app has no function named {name!r}")


class FunctionHost:
    """Serves an app's HTTP routes on loopback: `with FunctionHost(app, function_key=...) as host: host.url`."""

    def __init__(self, app: func.FunctionApp, *, function_key: str | None, port: int = 0) -> None:
        self.routes = {route.path: route for route in http_routes(app)}
        if function_key is None and any(r.needs_key for r in self.routes.values()):
            raise FunctionHostError(
                "these routes need a function key: set TOLLWATCH_FUNCTION_KEY, e.g. "
                "export TOLLWATCH_FUNCTION_KEY=$(python -c 'import secrets; print(secrets.token_urlsafe(32))')"
            )
        self._key = function_key
        self._server = _Server((LOOPBACK, port), _Handler)
        self._server.host = self  # type: ignore[attr-defined]
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self._server.server_port}"

    def start(self) -> Self:
        self._thread = threading.Thread(target=self._server.serve_forever, name="funchost", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self._server.serve_forever()

    def stop(self) -> None:
        """Stop serving and release the port; also for a host that never started (`shutdown` would wait forever for
        a serve loop that never ran)."""
        if self._thread is not None:
            self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ request handling

    def authorized(self, route: HttpRoute, headers: dict[str, str], query: dict[str, str]) -> bool:
        if not route.needs_key:
            return True
        provided = headers.get(FUNCTION_KEY_HEADER) or query.get(FUNCTION_KEY_QUERY)
        if not provided or self._key is None:
            return False
        return hmac.compare_digest(provided.encode(), self._key.encode())

    def dispatch(self, method: str, target: str, headers: dict[str, str], body: bytes) -> _Answer:
        parts = urlsplit(target)
        route = self.routes.get(parts.path.rstrip("/") or "/")
        if route is None:
            return _Answer(HTTPStatus.NOT_FOUND)
        query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        lowered = {k.lower(): v for k, v in headers.items()}
        if not self.authorized(route, lowered, query):
            return _Answer(HTTPStatus.UNAUTHORIZED)
        if method not in route.methods:
            return _Answer(HTTPStatus.METHOD_NOT_ALLOWED, {"Allow": ", ".join(sorted(route.methods))})
        request = func.HttpRequest(
            method=method, url=f"{self.url}{target}", headers=headers, params=query, route_params={}, body=body
        )
        try:
            response = route.handler(request)
        except Exception:
            log.exception("function %s raised", route.function_name)
            return _Answer(HTTPStatus.INTERNAL_SERVER_ERROR)
        out_headers = dict(response.headers.items())
        if response.mimetype and "content-type" not in {k.lower() for k in out_headers}:
            charset = f"; charset={response.charset}" if response.charset else ""
            out_headers["Content-Type"] = f"{response.mimetype}{charset}"
        return _Answer(HTTPStatus(response.status_code), out_headers, response.get_body() or b"")


class _Server(ThreadingHTTPServer):
    """One thread per connection, and an accept queue as deep as the Functions host's (Kestrel listens with 512).

    Why: socketserver listens with a backlog of 5. Sixteen connections opened at once while the handler threads
    kept the accept loop from running (bench figure 9) overflowed it: the kernel dropped the excess, those clients
    stalled a second for the retransmit and some were reset (`ReadError`), which Event Grid counts as a failed
    delivery (tests/integration/test_fn_devhost_burst.py).
    """

    daemon_threads = True
    request_queue_size = 512


@dataclass(frozen=True)
class _Answer:
    status: HTTPStatus
    headers: dict[str, str] | None = None
    body: bytes = b""


class _Handler(BaseHTTPRequestHandler):
    server_version = "tollwatch-funchost"
    protocol_version = "HTTP/1.1"

    def _serve(self) -> None:
        host: FunctionHost = self.server.host  # type: ignore[attr-defined]
        length = int(self.headers.get("Content-Length") or 0)
        if length > HOST_MAX_BODY_BYTES:  # the Functions host refuses these; so does this one
            answer = _Answer(HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
            self.close_connection = True
        else:
            body = self.rfile.read(length) if length else b""
            answer = host.dispatch(self.command, self.path, dict(self.headers.items()), body)
        self.send_response(answer.status)
        for key, value in (answer.headers or {}).items():
            if key.lower() not in {"content-length", "connection", "transfer-encoding"}:
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(answer.body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(answer.body)

    def __getattr__(self, name: str) -> Any:
        """Every method reaches `dispatch`: 404 for an unknown path, 405 with Allow for a method the route does not
        take. Why: http.server answers a method without a `do_*` handler, e.g. TRACE, with its own 501 (found by
        schemathesis, tests/integration/test_fn_openapi.py)."""
        if name.startswith("do_"):
            return self._serve
        raise AttributeError(name)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        # Path only: the query string may carry the function key (`code`) or a shared secret.
        log.info("%s %s → %s", self.command, urlsplit(self.path).path, code)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("funchost: " + format, *args)
