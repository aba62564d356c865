"""The local dev host (`tollwatch functions serve`): routes from the built app, Functions-host-style key auth."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import azure.functions as func
import httpx
import pytest

from tests.support.funcapp import FUNCTION_KEY, SECRET, closed_port, payload
from tollwatch_dev.funchost import FunctionHost, FunctionHostError, http_routes

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def toy_app() -> func.FunctionApp:
    """A tiny app for host behaviours the real app does not have (anonymous routes, a crashing function)."""
    toy = func.FunctionApp(http_auth_level=func.AuthLevel.FUNCTION)

    @toy.route(route="open", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
    def open_route(req: func.HttpRequest) -> func.HttpResponse:
        return func.HttpResponse(f"hello {req.params.get('name', 'nobody')}", mimetype="text/plain")

    @toy.route(route="crash", methods=["POST"])
    def crash(req: func.HttpRequest) -> func.HttpResponse:
        raise RuntimeError("secret internals")

    return toy


def test_routes_come_from_the_built_app(app):
    routes = {r.path: r for r in http_routes(app)}
    assert set(routes) == {"/api/eventgrid", "/api/backfill", "/api/openapi.json"}
    assert routes["/api/eventgrid"].methods == {"POST", "OPTIONS"}
    assert routes["/api/backfill"].function_name == "request_backfill"
    assert {path for path, r in routes.items() if not r.needs_key} == {"/api/openapi.json"}  # the API description


def test_key_by_header_or_code_query_and_401_otherwise(toy_app):
    with FunctionHost(toy_app, function_key="k1") as host, httpx.Client() as http:
        assert http.get(f"{host.url}/api/open", params={"name": "ann"}).text == "hello ann"  # anonymous
        assert http.post(f"{host.url}/api/crash").status_code == 401
        assert http.post(f"{host.url}/api/crash", headers={"x-functions-key": "k2"}).status_code == 401
        assert http.post(f"{host.url}/api/crash", params={"code": ""}).status_code == 401
        crashed = http.post(f"{host.url}/api/crash", headers={"x-functions-key": "k1"})
        via_code = http.post(f"{host.url}/api/crash", params={"code": "k1"})
        assert http.get(f"{host.url}/api/missing").status_code == 404
        assert http.get(f"{host.url}/api/crash", params={"code": "k1"}).status_code == 405

    assert crashed.status_code == via_code.status_code == 500
    assert crashed.content == b""  # like the Functions host: no traceback, no internals


def test_host_refuses_to_start_without_a_key_for_keyed_routes(app):
    with pytest.raises(FunctionHostError, match="TOLLWATCH_FUNCTION_KEY"):
        FunctionHost(app, function_key=None)


def test_cli_serves_the_app_over_http(fenv):
    """`tollwatch functions serve` in its own process, called with curl-like requests."""
    port = closed_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "tollwatch"), "functions", "serve", "--port", str(port), "--no-local-stack"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        preexec_fn=_interruptible,
    )
    try:
        url = f"http://127.0.0.1:{port}/api/eventgrid"
        validation = _post_when_up(url, payload("subscription-validation.eventgrid.json"), server)
        unauthorised = httpx.post(url, json=[])
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGINT)  # Ctrl-C, as a user stops it
        output, _ = server.communicate(timeout=30)

    assert validation.json() == {"validationResponse": "512d38b6-c7b8-40c8-89fe-f46f9e9622b6"}
    assert unauthorised.status_code == 401
    assert f"http://127.0.0.1:{port}/api/backfill" in output
    assert FUNCTION_KEY not in output  # the key is never printed


def _interruptible() -> None:
    """In the child before exec: Ctrl-C's default action, as in a terminal.

    A shell without job control starts background commands (`make test &`, nohup scripts, some CI runners) with
    SIGINT ignored, children inherit that, and Python then installs no KeyboardInterrupt handler: the server
    would never see the test's Ctrl-C (a 30 s timeout, seen on a clean clone run in the background).
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _post_when_up(url: str, body: object, server: subprocess.Popen[str]) -> httpx.Response:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"serve exited: {server.stdout.read() if server.stdout else ''}")
        try:
            return httpx.post(url, json=body, headers={"x-functions-key": FUNCTION_KEY, "x-tollwatch-secret": SECRET})
        except httpx.ConnectError:
            time.sleep(0.2)
    raise AssertionError("serve did not start listening within 60 s")


@pytest.mark.timeout(30)
def test_a_host_that_never_started_stops_and_frees_its_port(toy_app):
    """`stop` used to wait forever for a serve loop that never ran (found by bench figure 9's burst test)."""
    host = FunctionHost(toy_app, function_key="k1")
    port = int(host.url.rsplit(":", 1)[1])
    host.stop()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", port))  # the port is free again
