"""The few bytes the warm client and server exchange over a Unix socket (stdlib only: the client must start
in milliseconds, so it imports nothing heavy)."""

from __future__ import annotations

import json
import os
import socket
import struct

#: Environment variable naming the server's socket; unset = no warm path, the client runs the engine cold.
SOCKET_ENV = "TOLLWATCH_WARM_SOCKET"
_HEADER = struct.Struct("!I")


def send_message(sock: socket.socket, message: dict[str, object], fds: list[int] | None = None) -> None:
    body = json.dumps(message).encode()
    if fds:
        socket.send_fds(sock, [_HEADER.pack(len(body))], fds)
        sock.sendall(body)
    else:
        sock.sendall(_HEADER.pack(len(body)) + body)


def receive_message(sock: socket.socket, with_fds: int = 0) -> tuple[dict[str, object], list[int]]:
    """One message (and up to `with_fds` passed file descriptors); ConnectionError if the peer went away."""
    fds: list[int] = []
    if with_fds:
        header, fds, _, _ = socket.recv_fds(sock, _HEADER.size, with_fds)
    else:
        header = _recv_exactly(sock, _HEADER.size)
    if len(header) < _HEADER.size:
        header += _recv_exactly(sock, _HEADER.size - len(header))
    (size,) = _HEADER.unpack(header)
    return json.loads(_recv_exactly(sock, size)), fds


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    chunks = []
    while size:
        chunk = sock.recv(size)
        if not chunk:
            raise ConnectionError("warm server connection closed")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def socket_path() -> str | None:
    path = os.environ.get(SOCKET_ENV)
    return path if path and os.path.exists(path) else None
