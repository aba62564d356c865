"""`python -m tollwatch_dev.warm.client`: the command a work pool runs instead of `python -m prefect.engine`.

It imports only the standard library (so it starts in milliseconds), hands its environment, working
directory and stdio to the warm server, which forks a pre-imported child running Prefect's engine, forwards
SIGTERM/SIGINT to that child (cancellation keeps working) and exits with the child's exit code. Without a
reachable server it simply becomes `python -m prefect.engine` (exec), so a run never depends on the warm path.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys

from tollwatch.prefect.internals import ENGINE_MODULE
from tollwatch_dev.warm.protocol import receive_message, send_message, socket_path


def _run_cold() -> None:
    os.execv(sys.executable, [sys.executable, "-m", ENGINE_MODULE, *sys.argv[1:]])  # noqa: S606 - no shell wanted


def main() -> int:
    path = socket_path()
    if path is None:
        _run_cold()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
        send_message(sock, {"env": dict(os.environ), "cwd": os.getcwd(), "args": sys.argv[1:]}, fds=[0, 1, 2])
        started, _ = receive_message(sock)
    except OSError:
        sock.close()
        _run_cold()
        return 1  # unreachable: exec replaced this process
    child = int(started["pid"])  # type: ignore[arg-type]

    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, forward)
    try:
        ended, _ = receive_message(sock)
    except ConnectionError:
        return 1  # the server died with the child's outcome unknown: report a crash
    code = int(ended["exit"])  # type: ignore[arg-type]
    return 128 - code if code < 0 else code  # killed by signal N → 128+N, as a shell reports it


if __name__ == "__main__":
    sys.exit(main())
