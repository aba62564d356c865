"""Warm drivers for the Databricks double's clusters: a long-lived Python process that holds a SparkSession and runs
each task's entry point in-process, as a Databricks all-purpose cluster runs its jobs.

Why. An all-purpose ("existing") Databricks cluster is started once and runs many jobs, each in a Spark session of
its own on the cluster's one SparkContext: a run does not pay for a JVM, a SparkContext and a catalog. A
`spark-submit` per task costs all three, ~10-25 s on two shared cores, most of what a test of a merge waited for.
The double's job clusters share the warm driver too: a job cluster's fresh JVM is not what any test looks at, and each
run still gets a Spark session of its own (below).

How a run goes (`WarmDriver.run`, called by a double given `WarmClusters`):
- the driver (this file run as a script, in a process group of its own) starts its SparkSession once, with the
  launch settings: the master, the jars and every Spark setting but the catalogs' (`spark.sql.catalog.*`); a double
  starts it in the background when it starts, as a workspace's cluster is up before its jobs come;
- per task, a new session (`SparkSession.newSession()`: its own SQL conf and catalogs, so the table is loaded afresh
  and one test's catalog never serves another's) gets the run's catalog settings; the run's environment variables
  are set in the Python driver for the call (the JVM keeps the environment it started with: only Python code of the
  task reads them, the storage mount's connection string); the entry point's function is called with the task's
  argv and that session (`main(argv, spark=session)`, the signature of tollwatch's Spark entry points; a function
  without a `spark` parameter is called as a console script, `main()` with `sys.argv`);
- what it writes to `sys.stdout` and `sys.stderr` becomes the task's lines as it is written (spark-submit's
  PythonRunner also merges the Python driver's stderr into its stdout); an exception ends it failed, with the
  traceback printed into those lines; `SystemExit` ends it with its code;
- afterwards the environment is restored and Spark's cache is cleared (the sessions share the cache manager), so a
  run sees nothing of the one before but the warm JVM and the imported modules. An entry point that stops the
  SparkContext fails its run (on a shared cluster that breaks every other job) and the driver is replaced;
- cancel or timeout: the driver's process group (the Python driver and its JVM) is killed, and the next run starts
  a new driver. One run at a time per driver: a run waiting for it (or for its start) is still PENDING.

The JVM's own log (log4j) goes to the driver's log (`WarmDriver.log`, its last lines), not to a task's output.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Literal

#: The driver's log keeps its last lines (the JVM's log4j output and the driver's own messages).
LOG_LINES = 400
#: How long a driver may take to start its SparkSession.
START_TIMEOUT_S = 300.0
#: Settings a run gives its own session; every other Spark setting is the driver's, fixed at its start.
RUN_CONF_PREFIX = "spark.sql.catalog."


@dataclass(frozen=True)
class DriverSpec:
    """What a driver is started with; another spec is another driver."""

    python: str
    master: str
    jars: tuple[str, ...]
    #: Spark settings fixed at start (catalogs excepted: `RUN_CONF_PREFIX`), as sorted pairs.
    conf: tuple[tuple[str, str], ...]

    def launch_conf(self) -> dict[str, str]:
        conf = dict(self.conf)
        if self.jars:
            conf["spark.jars"] = ",".join(self.jars)
            conf["spark.driver.extraClassPath"] = os.pathsep.join(self.jars)
        return conf


@dataclass(frozen=True)
class WarmTask:
    """One task for a driver: the entry point's function and argv, the run's catalog settings and environment."""

    entry_point: str
    module: str
    function: str
    argv: tuple[str, ...]
    conf: Mapping[str, str] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Outcome:
    """How a task ended on a driver.

    `success`/`failed`: the entry point returned / raised or exited non-zero (`exit_code`); `stopped`: cancelled or
    timed out (the driver was killed, or the task never started); `lost`: the driver failed to start or died during
    the task, or the task stopped the SparkContext (`detail` says which and why).
    """

    kind: Literal["success", "failed", "stopped", "lost"]
    exit_code: int | None = None
    detail: str = ""
    started: bool = False


def split_conf(conf: Mapping[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """(the driver's launch settings, a run's settings): catalogs are per run, everything else is the driver's."""
    launch = {k: v for k, v in conf.items() if not k.startswith(RUN_CONF_PREFIX)}
    run = {k: v for k, v in conf.items() if k.startswith(RUN_CONF_PREFIX)}
    return launch, run


# ------------------------------------------------------------------------------------------- the double's side


class _DriverProcess:
    """One start of a driver: the process, the channel to it, and what it reported."""

    def __init__(self, spec: DriverSpec, env: Mapping[str, str]) -> None:
        ours, theirs = socket.socketpair()
        try:
            self.process = subprocess.Popen(
                # -P: this file's directory (tests/support) is not put first on the driver's sys.path
                [spec.python, "-P", os.path.abspath(__file__), str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=dict(env),
                start_new_session=True,  # its own process group: a kill ends the JVM with it
            )
        finally:
            theirs.close()
        self.connection = Connection(ours.detach())
        self.log: deque[str] = deque(maxlen=LOG_LINES)
        self.ready = threading.Event()
        self.ended = threading.Event()
        self.exited = threading.Event()
        self.failure: str | None = None
        self.result: dict[str, Any] | None = None
        self.on_line: Callable[[str], None] | None = None
        self._send_lock = threading.Lock()
        self.send({"master": spec.master, "app_name": "databricks double: warm driver", "conf": spec.launch_conf()})
        threading.Thread(target=self._read, name=f"warm-driver-{self.pid}", daemon=True).start()
        threading.Thread(target=self._drain, name=f"warm-driver-log-{self.pid}", daemon=True).start()

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return not self.exited.is_set() and self.process.poll() is None

    def send(self, message: dict[str, Any]) -> None:
        with self._send_lock:
            self.connection.send(message)

    def _read(self) -> None:
        try:
            while True:
                kind, payload = self.connection.recv()
                if kind == "line":
                    on_line = self.on_line
                    if on_line is not None:
                        on_line(payload)
                    else:
                        self.log.append(payload)
                elif kind == "ready":
                    self.ready.set()
                elif kind == "failed":
                    self.failure = payload
                elif kind == "ended":
                    self.result = payload
                    self.ended.set()
        except (EOFError, OSError):
            pass
        finally:
            self.connection.close()
            self.exited.set()

    def _drain(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.log.append(line.rstrip("\n"))
        self.process.stdout.close()

    def tail(self, lines: int = 40) -> str:
        return "\n".join(list(self.log)[-lines:])

    def kill(self, grace_s: float = 10.0) -> None:
        """SIGTERM to the driver's process group (the Python driver and its JVM), SIGKILL to what is left of it after
        `grace_s`; returns when no process of the group is left."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGTERM)
        if not self._group_gone(grace_s):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)
            self._group_gone(grace_s)
        self.exited.wait(grace_s)  # the reader sees the channel close

    def _group_gone(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while True:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=0.05)  # reaps the leader, which would otherwise stay in the group
            try:
                os.killpg(self.pid, 0)
            except ProcessLookupError:
                return True
            if time.monotonic() > deadline:
                return False

    def stop(self, timeout_s: float = 30.0) -> None:
        """Ask the driver to stop its SparkContext and exit; killed if it does not in time."""
        if self.alive():
            try:
                self.send({"op": "stop"})
                self.process.wait(timeout=timeout_s)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self.kill()


class WarmDriver:
    """A warm driver: started by its first run, started again by the run after a kill, one run at a time."""

    def __init__(self, spec: DriverSpec, env: Mapping[str, str]) -> None:
        self.spec = spec
        self.env = dict(env)
        #: How many times a driver process was started (a cancel or a crash makes the next run start another).
        self.starts = 0
        self._current: _DriverProcess | None = None
        self._busy = threading.Lock()
        self._starting = threading.Lock()

    @property
    def pid(self) -> int | None:
        """The running driver's process id (the leader of its process group), None when none runs."""
        current = self._current
        return current.pid if current is not None and current.alive() else None

    @property
    def log(self) -> list[str]:
        """The last lines of the driver's log (the JVM's log4j output and anything written outside a task)."""
        return list(self._current.log) if self._current is not None else []

    def start(self) -> None:
        """Start the driver now unless one runs (in the background: a run waits until it is ready)."""
        self._started()

    def _started(self) -> _DriverProcess:
        with self._starting:
            if self._current is None or not self._current.alive():
                self._current = _DriverProcess(self.spec, self.env)
                self.starts += 1
            return self._current

    def run(
        self,
        task: WarmTask,
        *,
        started: Callable[[], bool],
        on_line: Callable[[str], None],
        stop: Callable[[], bool],
    ) -> Outcome:
        """Run `task` on this cluster's driver, starting the driver first if none runs.

        `started()` is called when the driver is about to run the task (False: cancelled meanwhile, the task is not
        run); `on_line` gets each line the task writes; `stop()` is polled while waiting and while the task runs
        (True: cancel or timeout, the driver is killed).
        """
        while not self._busy.acquire(timeout=0.1):
            if stop():
                return Outcome("stopped")
        try:
            return self._run(task, started, on_line, stop)
        finally:
            self._busy.release()

    def _run(
        self, task: WarmTask, started: Callable[[], bool], on_line: Callable[[str], None], stop: Callable[[], bool]
    ) -> Outcome:
        driver = self._started()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not driver.ready.wait(0.1):
            if driver.exited.is_set() or time.monotonic() > deadline:
                driver.kill()
                why = driver.failure or driver.tail()
                return Outcome("lost", detail=f"the cluster's driver did not start:\n{why}")
            if stop():
                driver.kill()
                return Outcome("stopped")
        if not started():
            return Outcome("stopped")
        driver.result = None
        driver.ended.clear()
        driver.on_line = on_line
        request = {"op": "run", "entry_point": task.entry_point, "module": task.module, "function": task.function}
        request |= {"argv": list(task.argv), "conf": dict(task.conf), "env": dict(task.env)}
        try:
            try:
                driver.send(request)
            except OSError:  # it died since it was ready
                return Outcome("lost", detail=self._died(driver), started=True)
            while not driver.ended.wait(0.1):
                if stop():
                    driver.kill()
                    return Outcome("stopped", started=True)
                if driver.exited.is_set() and not driver.ended.is_set():
                    return Outcome("lost", detail=self._died(driver), started=True)
        finally:
            driver.on_line = None
        result = driver.result or {}
        if not result.get("alive", False):
            driver.stop(timeout_s=10)
            detail = (
                f"{task.entry_point} stopped the SparkContext, which every run on an all-purpose cluster shares; the "
                "driver is restarting"
            )
            return Outcome("lost", result.get("exit_code"), detail, started=True)
        code = int(result.get("exit_code", 1))
        return Outcome("success" if code == 0 else "failed", code, started=True)

    def _died(self, driver: _DriverProcess) -> str:
        driver.process.wait()
        return (
            f"the cluster's driver exited ({driver.process.returncode}) during the run; its last lines:\n"
            f"{driver.tail()}"
        )

    def close(self) -> None:
        if self._current is not None:
            self._current.stop()
            self._current = None


class WarmClusters:
    """The clusters of a test session: one warm driver per launch settings (python, master, jars, Spark settings),
    shared by every double given this object; `close()` (or leaving `with`) stops them."""

    def __init__(self) -> None:
        self._drivers: dict[DriverSpec, WarmDriver] = {}
        self._lock = threading.Lock()

    def driver(self, spec: DriverSpec, env: Mapping[str, str]) -> WarmDriver:
        """The driver of these launch settings (started by its first run); `env` is its environment when it starts."""
        with self._lock:
            if spec not in self._drivers:
                self._drivers[spec] = WarmDriver(spec, env)
            return self._drivers[spec]

    @property
    def drivers(self) -> list[WarmDriver]:
        with self._lock:
            return list(self._drivers.values())

    def close(self) -> None:
        for driver in self.drivers:
            driver.close()

    def __enter__(self) -> WarmClusters:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------------------------------------- the driver's side
# Runs as `python -P tests/support/warm_driver.py <fd>`: the standard library and pyspark only (imported here, not at
# the top: the double's side never needs pyspark).


class _TaskLines:
    """sys.stdout and sys.stderr of the driver: whole lines to the running task, or to the driver's log between
    tasks. One object for both streams, so a task's lines keep the order they were written in."""

    encoding = "utf-8"
    errors = "replace"

    def __init__(self, send: Callable[..., None]) -> None:
        self._send = send
        self._partial = ""
        self._lock = threading.Lock()
        self.active = False

    def write(self, text: str) -> int:
        with self._lock:
            *lines, self._partial = (self._partial + text).split("\n")
            for line in lines:
                self._emit(line)
        return len(text)

    def flush(self) -> None:
        with self._lock:
            if self._partial:
                self._emit(self._partial)
                self._partial = ""

    def _emit(self, line: str) -> None:
        if self.active:
            self._send("line", line)
        else:
            sys.__stderr__.write(line + "\n")
            sys.__stderr__.flush()

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return sys.__stderr__.fileno()


def _serve(fd: int) -> None:
    import traceback

    connection = Connection(fd)
    send_lock = threading.Lock()

    def send(kind: str, payload: Any) -> None:
        with send_lock:
            connection.send((kind, payload))

    spec = connection.recv()
    lines = _TaskLines(send)
    sys.stdout = sys.stderr = lines  # type: ignore[assignment]
    try:
        from pyspark.sql import SparkSession

        builder = SparkSession.builder.master(spec["master"]).appName(spec["app_name"])
        for key, value in spec["conf"].items():
            builder = builder.config(key, value)
        base = builder.getOrCreate()
    except BaseException:
        send("failed", traceback.format_exc())
        return
    send("ready", {"pid": os.getpid(), "spark": base.version})
    while True:
        try:
            request = connection.recv()
        except (EOFError, OSError):
            return
        if request.get("op") == "stop":
            base.stop()
            return
        if not _run_task(request, base, lines, send):
            return


def _run_task(request: dict[str, Any], base: Any, lines: _TaskLines, send: Callable[..., None]) -> bool:
    """One task in a new session on the shared SparkContext; False when the task stopped the SparkContext."""
    import importlib
    import inspect
    import traceback

    previous = {key: os.environ.get(key) for key in request["env"]}
    os.environ.update(request["env"])
    lines.active = True
    code = 0
    try:
        session = base.newSession()
        for key, value in request["conf"].items():
            session.conf.set(key, value)
        target: Any = importlib.import_module(request["module"])
        for part in request["function"].split("."):
            target = getattr(target, part)
        if "spark" in inspect.signature(target).parameters:
            target(list(request["argv"]), spark=session)
        else:
            sys.argv = [request["entry_point"], *request["argv"]]
            target()
    except SystemExit as exc:
        if isinstance(exc.code, int):
            code = exc.code
        elif exc.code is not None:
            print(exc.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        lines.flush()
        lines.active = False
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    alive = base.sparkContext._jsc is not None
    if alive:
        base.catalog.clearCache()
    send("ended", {"exit_code": code, "alive": alive})
    return alive


if __name__ == "__main__":
    _serve(int(sys.argv[1]))
