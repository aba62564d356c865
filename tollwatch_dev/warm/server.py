"""`python -m tollwatch_dev.warm.server --socket PATH`: import everything a flow run needs once, then fork a
child per request that runs Prefect's engine (`prefect.engine` as `__main__`) for one flow run.

Single-threaded on purpose (a selector over the listening socket and one pidfd per child): forking a
process that runs threads is unsafe, and nothing here needs them. Each child takes the client's stdio,
environment and working directory, refreshes Prefect's settings from that environment when its PREFECT_*
settings differ from the server's, and exits through Prefect's own exit handlers (so queued logs and events
are flushed) with the engine's exit code.

What a child still spent its CPU on (py-spy over 12 warm runs): 34 % building TLS contexts — every Prefect
client parses certifi's CA bundle again (27 ms each, about a dozen clients per run, even for an http:// API) —
and 18 % re-reading settings it already had. `share_ca_bundle_contexts` parses each bundle once, before
the fork; the settings refresh is skipped when the environment did not change them.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import runpy
import selectors
import signal
import socket
import sys
import time
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path

from tollwatch.prefect.internals import ENGINE_MODULE, share_ca_bundle_contexts
from tollwatch_dev.warm.protocol import receive_message, send_message

#: What the first line of a flow run would otherwise wait for (measured: ~2.5 s on this machine).
PRELOAD = (
    "prefect",
    ENGINE_MODULE,
    "prefect.flow_engine",
    "prefect.task_engine",
    "prefect.client.orchestration",
    "prefect.deployments.steps",
    "pyarrow",
    "pyarrow.compute",
    "pyarrow.parquet",
    "pyiceberg.catalog.sql",
    "azure.storage.blob",
    "tollwatch.prefect.flows.ingest",
    "tollwatch.prefect.flows.run_job",
    "tollwatch.prefect.deploy",
)


def preload(modules: tuple[str, ...] = PRELOAD) -> float:
    started = time.perf_counter()
    for name in modules:
        importlib.import_module(name)
    return time.perf_counter() - started


def _settings_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The variables Prefect builds its settings from (PREFECT__* are per-run values it reads directly)."""
    return {k: v for k, v in environ.items() if k.startswith("PREFECT_") and not k.startswith("PREFECT__")}


def settings_environments(environ: Mapping[str, str]) -> tuple[dict[str, str], ...]:
    """The PREFECT_* variables a run may arrive with when its settings are this process's own.

    Two shapes: this environment as it is, and as a worker sharing it hands it to a run — Prefect's workers
    overlay their settings re-serialised (`BaseJobConfiguration._base_environment`: `false` arrives as
    `False`, `5` as `5.0`, and a default such as PREFECT_SERVER_EPHEMERAL_ENABLED appears). Comparing with
    the first only, every run of the local stack re-read its settings (~25 ms of CPU per run, more under
    load). Before prefect is imported (a server without preload) only the first shape applies.
    """
    own = _settings_environment(environ)
    if "prefect.settings" not in sys.modules:
        return (own,)
    from prefect.settings import get_current_settings

    passed = _settings_environment({**environ, **get_current_settings().to_environment_variables(exclude_unset=True)})
    return (own, passed)


def _run_child(message: dict[str, object], fds: list[int], module: str, known: Sequence[dict[str, str]]) -> None:
    """In the forked child: become the flow run process. Never returns."""
    code = 1
    try:
        os.setpgid(0, 0)  # its own process group: the client forwards signals explicitly
        for target, fd in zip((0, 1, 2), fds, strict=True):
            os.dup2(fd, target)
            os.close(fd)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(signum, signal.SIG_DFL if signum != signal.SIGINT else signal.default_int_handler)
        os.chdir(str(message["cwd"]))
        os.environ.clear()
        os.environ.update({str(k): str(v) for k, v in dict(message["env"]).items()})  # type: ignore[call-overload]
        if _settings_environment(os.environ) not in known:
            from tollwatch.prefect.internals import refresh_settings

            refresh_settings()  # settings were read from the server's environment at import
        sys.argv = [module, *[str(a) for a in list(message.get("args") or [])]]  # type: ignore[call-overload]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        try:
            from tollwatch.prefect.internals import flush_at_exit

            flush_at_exit()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)


def serve(path: Path, *, module: str = ENGINE_MODULE, modules: tuple[str, ...] = PRELOAD) -> None:
    """Preload, listen on `path`, and run `module` as `__main__` in one forked child per request."""
    share_ca_bundle_contexts()
    took = preload(modules)
    known = settings_environments(os.environ)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(128)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ, None)
    print(f"WARM_READY socket={path} preload={took:.2f}s", flush=True)
    stopping = False

    def stop(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    try:
        while not stopping:
            for key, _ in selector.select(timeout=1.0):
                if key.data is None:
                    _accept(listener, selector, module, known)
                else:
                    _reap(selector, key)
    finally:
        listener.close()
        path.unlink(missing_ok=True)


def _accept(
    listener: socket.socket, selector: selectors.BaseSelector, module: str, known: Sequence[dict[str, str]]
) -> None:
    conn, _ = listener.accept()
    try:
        message, fds = receive_message(conn, with_fds=3)
    except (ConnectionError, OSError, ValueError):
        conn.close()
        return
    if len(fds) != 3:
        for fd in fds:
            os.close(fd)
        conn.close()
        return
    pid = os.fork()
    if pid == 0:
        listener.close()
        conn.close()
        _run_child(message, fds, module, known)
    for fd in fds:
        os.close(fd)
    with contextlib.suppress(OSError):  # the client is gone; the run still finishes and reports to Prefect
        send_message(conn, {"pid": pid})
    selector.register(os.pidfd_open(pid), selectors.EVENT_READ, (pid, conn))


def _reap(selector: selectors.BaseSelector, key: selectors.SelectorKey) -> None:
    pid, conn = key.data
    selector.unregister(key.fd)
    os.close(key.fd)
    _, status = os.waitpid(pid, 0)
    with contextlib.suppress(OSError):
        send_message(conn, {"exit": os.waitstatus_to_exitcode(status)})
    conn.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tollwatch_dev.warm.server")
    parser.add_argument("--socket", type=Path, required=True)
    parser.add_argument("--module", default=ENGINE_MODULE, help="what each child runs as __main__")
    parser.add_argument("--no-preload", action="store_true", help="skip the imports (for testing the plumbing)")
    args = parser.parse_args(argv)
    serve(args.socket, module=args.module, modules=() if args.no_preload else PRELOAD)
    return 0


if __name__ == "__main__":
    sys.exit(main())
