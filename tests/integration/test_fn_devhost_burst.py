"""The dev host under a burst of connections (found by bench figure 9, the load on the intake).

Sixteen clients connecting at once while the host's threads were busy got resets (`ReadError: Connection reset by
peer`) and one-second stalls: socketserver listens with a backlog of 5, so the kernel dropped the connections that
did not fit in the accept queue. Event Grid would count a reset as a failed delivery.
"""

from __future__ import annotations

import contextlib
import socket
from urllib.parse import urlsplit

import azure.functions as func

from tollwatch_dev.funchost import FunctionHost

#: Twice the connections bench figure 9 opens at once.
BURST = 32
#: Below the kernel's first SYN retransmit (1 s): a connection the listen queue dropped cannot complete in time.
CONNECT_TIMEOUT_S = 0.5


def _ping_app() -> func.FunctionApp:
    app = func.FunctionApp(http_auth_level=func.AuthLevel.ANONYMOUS)

    @app.route(route="ping", methods=["GET"])
    def ping(req: func.HttpRequest) -> func.HttpResponse:
        return func.HttpResponse("pong", mimetype="text/plain")

    return app


def test_connections_arriving_before_the_host_accepts_them_wait_in_its_queue_and_are_all_served():
    host = FunctionHost(_ping_app(), function_key=None)  # listening, not accepting yet: the busiest a host can be
    address = urlsplit(host.url)
    sockets: list[socket.socket] = []
    try:
        refused = 0
        for _ in range(BURST):
            try:
                sockets.append(socket.create_connection((address.hostname, address.port), timeout=CONNECT_TIMEOUT_S))
            except TimeoutError:
                refused += 1
        assert refused == 0, f"{refused} of {BURST} connections were dropped by the listen queue"

        host.start()
        answers = []
        for sock in sockets:
            sock.settimeout(10)
            sock.sendall(b"GET /api/ping HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            answers.append(b"".join(iter(lambda s=sock: s.recv(65536), b"")))
        assert all(a.startswith(b"HTTP/1.1 200") and a.endswith(b"pong") for a in answers)
    finally:
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.close()
        host.stop()
