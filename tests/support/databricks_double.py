"""A Databricks Jobs API 2.1 double that EXECUTES what it is given: a loopback HTTPS workspace for tests.

What it serves (request and response shapes of the Jobs API 2.1; request bodies validated with prefect-databricks'
models, an invalid one answered `400 {"error_code": "INVALID_PARAMETER_VALUE", "message": ...}`):

- `POST /api/2.1/jobs/runs/submit`: a one-time run of its tasks; the same `idempotency_token` returns the run it
  started the first time, without starting another;
- `POST /api/2.1/jobs/run-now`: a run of one of the jobs the double was given (the bundle's, loaded from
  `resources/` as the Databricks CLI loads them, see `bundle_jobs`), under job ids the double assigns (`job_id`);
  `{{job.parameters.<name>}}` references in the task's parameters are replaced by the job's parameter defaults,
  overridden by the request's `job_parameters`; a job's `max_concurrent_runs` queues (or, without `queue`, skips)
  the runs beyond it;
- `GET /api/2.1/jobs/runs/get`: life cycle PENDING → RUNNING → TERMINATED (result SUCCESS, FAILED, TIMEDOUT or
  CANCELED) or INTERNAL_ERROR (the task could not be started: no such package or entry point), a `run_page_url`
  on the double's host, and one task run per task, with run ids of their own;
- `GET /api/2.1/jobs/runs/get-output?run_id=<task run id>`: `logs` (the driver's stdout, last 5 MB), and for a
  failed task `error` (the exception line) and `error_trace` (the driver's traceback); asked for a parent run, it
  refuses as Databricks does (the output of a multi-task run is per task);
- `POST /api/2.1/jobs/runs/cancel`: the driver's process group is terminated (a warm driver's too: the next run
  starts another); the run ends TERMINATED/CANCELED.

What a run does: each `python_wheel_task` resolves its `entry_point` through the installed distribution's metadata
(`importlib.metadata.entry_points(group="console_scripts")`, the distribution named by `package_name`), and runs it on
`local[1]`, with the jars and the Spark conf (Iceberg's JDBC catalog on pyiceberg's catalog database) the double was
constructed with, in one of two ways:
- a double given `clusters` (`tests.support.warm_driver.WarmClusters`, one per test session) runs it in a warm
  driver, a long-lived Python process holding a SparkSession, as a Databricks all-purpose cluster runs every job on
  its one SparkContext: each task gets a new session with the double's catalog conf, and the entry point's
  `main(argv, spark=session)` is called in-process; its stdout and stderr are the task's logs, an exception its
  `error`/`error_trace` (see that module). Every cluster of the double shares that driver, job clusters and a
  one-time run's `new_cluster` too (what their fresh JVM would add is not what these tests look at). Such runs are
  logged to `double.warm_runs`;
- a double without `clusters` `spark-submit`s that entry point's module file
  (`tollwatch.adapters.spark_submit.submit_command`) with the task's parameters, a JVM of its own per task.
The double stands for a workspace whose clusters all see that one catalog: the catalog conf a request carries for its
cluster (`new_cluster.spark_conf`, a Hadoop catalog on abfss) is recorded, not used. The task's `libraries` (the wheel,
Maven coordinates) are recorded, not installed: the driver imports the tollwatch installed in this venv (the working
tree, installed editable), which is what the wheel would be built from.

The cluster's storage mount. A landing arrives as `abfss://<container>@<account>.dfs.<suffix>/<path>`. Azurite, the
local Blob emulator, has no DFS (ABFS) endpoint, so the double rewrites every such parameter of the mounted account
to the Azurite blob URL of the same container and path (`http://127.0.0.1:<port>/<account>/<container>/<path>`)
and gives the driver `TOLLWATCH_STORAGE_CONNECTION_STRING` in its environment: the Spark job then reads the landing
where the flow put it (tollwatch.spark.landing downloads an emulator landing with that connection string). An
abfss URI of another account is passed on unchanged (and fails in the driver, as it would on a cluster with no
access to that account). Apart from that variable the driver gets none of the caller's `TOLLWATCH_*` / `PREFECT_*`
settings: a cluster does not share the worker's configuration.

TLS. prefect-databricks always calls `https://{databricks_instance}/api/2.1/jobs/...`, so the double speaks HTTPS:
at start-up it makes a throwaway CA and a server certificate for 127.0.0.1 (the `cryptography` package) in a
temporary directory, and writes `ca_bundle`, certifi's CAs plus that CA. Clients trust it through the standard
`SSL_CERT_FILE` variable: httpx reads it when `trust_env` is on, its default (httpx._config.create_ssl_context;
https://www.python-httpx.org/environment_variables). Set it in the environment of every process that calls the
double (`double.client_env()`); nothing else changes for other hosts, since the bundle keeps certifi's CAs.

Authentication: a bearer token. A request without one is answered 401; with `token=` given, another token is answered
403. `token` is either the one token accepted (a PAT placeholder: `DatabricksCredentials(token=...)` needs no Entra ID
token endpoint) or a check of each token, as the workspace makes it for an Entra ID token: e.g.
`tests.support.entra.ManagedIdentityEndpoint.accepts(DATABRICKS)`, minted by the managed identity endpoint for the
Azure Databricks resource and not expired.

Lifecycle: `with DatabricksJobsDouble(...) as double:` starts the server thread (and, given `clusters`, their warm
driver in the background, unless it runs already); leaving stops it, terminates any driver still running (a warm driver
only when one of its runs is unfinished: it belongs to `clusters`, which stops it) and removes the temporary
directory. Every request is logged to `double.calls`, every spark-submit command to
`double.spark_submits`, every run on a warm driver to `double.warm_runs`.
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import metadata, util
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import certifi
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from prefect_databricks.models.jobs import RunNowInput, RunSubmitSettings, RunSubmitTaskSettings
from pydantic import TypeAdapter, ValidationError

from tests.support.warm_driver import DriverSpec, Outcome, WarmClusters, WarmDriver, WarmTask, split_conf
from tollwatch.adapters import spark_submit as sparksubmit
from tollwatch.contract import table as contract

API = "/api/2.1/jobs"
HOST = "127.0.0.1"
#: Spark settings of the double's "clusters" (the request's own conf wins over none of them).
CLUSTER_CONF = {
    "spark.ui.enabled": "false",
    "spark.sql.session.timeZone": "UTC",  # a Databricks cluster's default
    "spark.sql.shuffle.partitions": "2",
    "spark.driver.host": HOST,
    # the JVM's quick-start JIT: a test's merge is seconds of work, where the C2 compiler only costs start-up time
    "spark.driver.extraJavaOptions": "-XX:TieredStopAtLevel=1",
}
#: runs/get-output returns the last 5 MB of a task's logs.
LOGS_LIMIT = 5 * 1024 * 1024
TERMINAL = frozenset({"TERMINATED", "SKIPPED", "INTERNAL_ERROR"})
FAILED_MESSAGE = "Workload failed, see run output for details"
ABFSS = re.compile(r"abfss://(?P<container>[^@/]+)@(?P<account>[^./]+)\.dfs\.[^/]+(?P<path>/.*)?")
PARAMETER_REF = re.compile(r"\{\{\s*([\w.-]+)\s*\}\}")
#: The personal access token the tests' credentials blocks carry and the double expects: a placeholder, not a secret.
PLACEHOLDER_PAT = "placeholder-pat-not-a-secret"
LOG4J_LINE = re.compile(r"^\d\d/\d\d/\d\d \d\d:\d\d:\d\d (TRACE|DEBUG|INFO|WARN|ERROR|FATAL) ")
_STRING_MAP: TypeAdapter[dict[str, str]] = TypeAdapter(dict[str, str])


class ApiError(Exception):
    """An error answer of the Jobs API: `{"error_code": code, "message": message}` with an HTTP status."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message

    @classmethod
    def invalid(cls, message: str) -> ApiError:
        return cls(400, "INVALID_PARAMETER_VALUE", message)


# ---------------------------------------------------------------------------------------------------------- TLS


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    cert: Path
    key: Path
    #: certifi's CAs + the test CA: what SSL_CERT_FILE points to.
    bundle: Path


def make_tls(directory: Path, host: str = HOST) -> TlsFiles:
    """A throwaway CA (valid one day) and a server certificate for `host`, signed by it, as PEM files."""
    now = datetime.now(UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tollwatch test CA (throwaway, tests only)")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host)), x509.DNSName("localhost")]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    files = TlsFiles(directory / "ca.pem", directory / "server.pem", directory / "server.key", directory / "bundle.pem")
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    files.ca.write_bytes(ca_pem)
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.touch(mode=0o600)
    files.key.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    files.bundle.write_bytes(Path(certifi.where()).read_bytes().rstrip(b"\n") + b"\n" + ca_pem)
    return files


# ------------------------------------------------------------------------------------------------------ storage


@dataclass(frozen=True)
class StorageMount:
    """The Azurite account the "clusters" reach abfss:// paths of (parsed from its connection string)."""

    connection_string: str
    account: str
    blob_endpoint: str

    @classmethod
    def from_connection_string(cls, connection_string: str) -> StorageMount:
        parts = dict(part.split("=", 1) for part in connection_string.split(";") if "=" in part)
        account = parts["AccountName"]
        endpoint = parts.get("BlobEndpoint") or (
            f"{parts.get('DefaultEndpointsProtocol', 'https')}://{account}.blob."
            f"{parts.get('EndpointSuffix', 'core.windows.net')}"
        )
        return cls(connection_string, account, endpoint.rstrip("/"))

    def resolve(self, value: str) -> str:
        """An abfss:// URI of this account as the blob URL of the same container/path; anything else unchanged."""
        match = ABFSS.fullmatch(value)
        if match is None or match["account"] != self.account:
            return value
        return f"{self.blob_endpoint}/{match['container']}{match['path'] or '/'}"

    def resolve_argument(self, argument: str) -> str:
        """`--flag=<uri>` or a bare `<uri>`."""
        if argument.startswith("--") and "=" in argument:
            flag, value = argument.split("=", 1)
            return f"{flag}={self.resolve(value)}"
        return self.resolve(argument)


# ---------------------------------------------------------------------------------------------------------- runs


def _now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class TaskRun:
    """One task of a run: what it was asked, what it ran, how it ended, what it printed."""

    run_id: int
    task_key: str
    settings: dict[str, Any]
    #: The task's parameters after job-parameter substitution (what the API reports), before the storage mount.
    parameters: list[str]
    life_cycle_state: str = "PENDING"
    result_state: str | None = None
    state_message: str = ""
    start_time: int = 0
    end_time: int = 0
    command: list[str] = field(default_factory=list)
    stdout: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)
    exit_code: int | None = None
    error: str | None = None
    error_trace: str | None = None
    process: subprocess.Popen[str] | None = None

    @property
    def finished(self) -> bool:
        return self.life_cycle_state in TERMINAL

    def end(self, life_cycle: str, result: str | None, message: str = "") -> None:
        self.life_cycle_state, self.result_state, self.state_message = life_cycle, result, message
        self.end_time = _now_ms()


@dataclass
class Run:
    """A run (one-time or of a job) and its task runs."""

    run_id: int
    job_id: int
    run_type: str  # SUBMIT_RUN | JOB_RUN
    run_name: str
    tasks: list[TaskRun]
    idempotency_token: str | None = None
    timeout_seconds: int = 0
    job_parameters: list[dict[str, str]] | None = None
    life_cycle_state: str = "PENDING"
    result_state: str | None = None
    state_message: str = ""
    cancel_requested: bool = False
    timed_out: bool = False
    start_time: int = field(default_factory=_now_ms)
    end_time: int = 0
    thread: threading.Thread | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def finished(self) -> bool:
        return self.life_cycle_state in TERMINAL


@dataclass(frozen=True)
class Call:
    """One request the double answered."""

    method: str
    path: str
    query: dict[str, str]
    body: Any
    status: int
    response: Any
    authorization: str | None


@dataclass(frozen=True)
class WarmRun:
    """A task the double ran on the warm driver."""

    #: The compute the task asked for: its `existing_cluster_id`, `job_cluster_key`, or `new_cluster`.
    cluster: str
    entry_point: str
    #: The task's argv as the driver got it (after the storage mount).
    argv: list[str]
    task_run_id: int


@dataclass
class Job:
    job_id: int
    key: str
    settings: dict[str, Any]
    slots: threading.Semaphore


# -------------------------------------------------------------------------------------------------- the double


class DatabricksJobsDouble:
    """A Jobs API 2.1 workspace on https://127.0.0.1:<port> whose clusters run tasks with local spark-submit."""

    def __init__(
        self,
        *,
        jars: list[Path],
        conf: Mapping[str, str],
        storage_connection_string: str | None = None,
        jobs: Mapping[str, Mapping[str, Any]] | None = None,
        token: str | Callable[[str], bool] | None = None,
        spark_submit: str | None = None,
        master: str = "local[1]",
        pending_s: float = 0.5,
        clusters: WarmClusters | None = None,
    ) -> None:
        self.jars = list(jars)
        self.conf = {**CLUSTER_CONF, **conf}
        self.mount = (
            StorageMount.from_connection_string(storage_connection_string) if storage_connection_string else None
        )
        self.token = token
        self.spark_submit = spark_submit or str(Path(sys.executable).parent / "spark-submit")
        self.master = master
        self.pending_s = pending_s
        self.calls: list[Call] = []
        self.spark_submits: list[list[str]] = []
        #: The warm drivers the tasks run in (None: every task is a spark-submit).
        self.clusters = clusters
        self.warm_runs: list[WarmRun] = []
        self.runs: dict[int, Run] = {}
        self._task_runs: dict[int, tuple[Run, TaskRun]] = {}
        self._tokens: dict[str, int] = {}
        self._lock = threading.RLock()
        self._ids = itertools.count(804_001)
        self._job_ids = itertools.count(5_101)
        self.jobs: dict[int, Job] = {}
        for key, settings in (jobs or {}).items():
            for task in settings.get("tasks") or []:
                _check_wheel_task(task, f"job {key}: task {task.get('task_key')}: ")
            job_id = next(self._job_ids)
            limit = int(settings.get("max_concurrent_runs") or 1)
            self.jobs[job_id] = Job(job_id, key, json.loads(json.dumps(settings)), threading.Semaphore(limit))
        self._tmp: Path | None = None
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.tls: TlsFiles | None = None

    # -- lifecycle

    def __enter__(self) -> DatabricksJobsDouble:
        self._tmp = Path(tempfile.mkdtemp(prefix="databricks-double-"))
        self.tls = make_tls(self._tmp)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.tls.cert, self.tls.key)
        self._server = _Server(self, context)
        self._thread = threading.Thread(target=self._server.serve_forever, name="databricks-double", daemon=True)
        self._thread.start()
        if self.clusters is not None:
            self.warm_driver().start()  # in the background, as a workspace's cluster is up before its jobs come
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        for run in list(self.runs.values()):
            self._cancel(run)
        for run in list(self.runs.values()):
            if run.thread is not None:
                run.thread.join(timeout=30)
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)

    # -- what tests use

    @property
    def port(self) -> int:
        assert self._server is not None, "the double is not started (use it as a context manager)"
        return int(self._server.server_address[1])

    @property
    def host(self) -> str:
        """What `DatabricksCredentials.databricks_instance` is set to."""
        return f"{HOST}:{self.port}"

    @property
    def url(self) -> str:
        return f"https://{self.host}"

    @property
    def ca_bundle(self) -> Path:
        assert self.tls is not None, "the double is not started (use it as a context manager)"
        return self.tls.bundle

    def client_env(self) -> dict[str, str]:
        """What a process calling the double needs in its environment (httpx trusts SSL_CERT_FILE)."""
        return {"SSL_CERT_FILE": str(self.ca_bundle)}

    def mount_storage(self, connection_string: str) -> None:
        """Give the clusters an Azurite account (when it starts after the double)."""
        self.mount = StorageMount.from_connection_string(connection_string)

    def job_id(self, name: str) -> int:
        """The id the double gave a job: by its resource key (`tollwatch_merge`) or its name (`tollwatch merge`)."""
        for job in self.jobs.values():
            if name in (job.key, job.settings.get("name")):
                return job.job_id
        raise KeyError(f"no job {name!r}; the double has {sorted(j.key for j in self.jobs.values())}")

    def calls_to(self, method: str, endpoint: str) -> list[Call]:
        """The logged requests to one endpoint (`runs/submit`, `run-now`, …)."""
        return [c for c in self.calls if c.method == method and c.path == f"{API}/{endpoint}"]

    def wait(self, run_id: int, timeout_s: float = 300) -> dict[str, Any]:
        """Block until the run is finished; its runs/get answer."""
        run = self.runs[run_id]
        if not run.done.wait(timeout_s):
            raise TimeoutError(f"run {run_id} still {run.life_cycle_state} after {timeout_s}s")
        return self.run_json(run)

    def run_page_url(self, run: Run, run_id: int | None = None) -> str:
        return f"{self.url}/?o=0#job/{run.job_id}/run/{run_id or run.run_id}"

    # -- HTTP

    def handle(self, method: str, target: str, raw: bytes, authorization: str | None) -> tuple[int, Any]:
        parts = urlsplit(target)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        body: Any = None
        try:
            if raw:
                try:
                    body = json.loads(raw)
                except ValueError as exc:
                    raise ApiError(400, "MALFORMED_REQUEST", f"Invalid JSON given in the body: {exc}") from None
            self._authorize(authorization)
            route = ROUTES.get((method, parts.path))
            if route is None:
                raise ApiError(404, "ENDPOINT_NOT_FOUND", f"No API found for '{method} {parts.path}'")
            status, answer = 200, route(self, query, body)
        except ApiError as error:
            status, answer = error.status, {"error_code": error.code, "message": error.message}
        except Exception as error:  # a bug of the double: an answer the caller can show, not a dropped connection
            status, answer = 500, {"error_code": "INTERNAL_ERROR", "message": f"databricks double: {error!r}"}
        with self._lock:
            self.calls.append(Call(method, parts.path, query, body, status, answer, authorization))
        return status, answer

    def _authorize(self, authorization: str | None) -> None:
        scheme, _, credential = (authorization or "").partition(" ")
        if scheme != "Bearer" or not credential:
            message = "Credential was not sent or was of an unsupported type for this API."
            raise ApiError(401, "UNAUTHENTICATED", message)
        if self.token is None:
            return
        accepted = self.token(credential) if callable(self.token) else credential == self.token
        if not accepted:
            raise ApiError(403, "PERMISSION_DENIED", "Invalid access token.")

    # -- endpoints

    def _submit(self, query: dict[str, str], body: Any) -> dict[str, Any]:
        body = _object(body)
        _validate(RunSubmitSettings, body, "")
        tasks = body.get("tasks")
        if not isinstance(tasks, list) or not tasks:
            raise ApiError.invalid("At least one task is required.")
        environments = {e.get("environment_key") for e in body.get("environments") or [] if isinstance(e, dict)}
        for index, task in enumerate(tasks):
            _validate(RunSubmitTaskSettings, task, f"tasks[{index}].")
            _check_wheel_task(task, f"tasks[{index}].")
            compute = [k for k in ("existing_cluster_id", "new_cluster", "environment_key") if task.get(k)]
            if len(compute) != 1:
                raise ApiError.invalid(
                    f"Task {task['task_key']}: exactly one of existing_cluster_id, new_cluster or environment_key is "
                    f"required (got {compute or 'none'})."
                )
            if task.get("environment_key") and task["environment_key"] not in environments:
                key = task["environment_key"]
                raise ApiError.invalid(f"Task {task['task_key']}: environment {key!r} is not defined.")
        _check_keys_unique(tasks)
        token = _token(body)

        def build(run_id: int) -> Run:
            task_runs = [
                TaskRun(next(self._ids), t["task_key"], t, _wheel_parameters(t["python_wheel_task"])) for t in tasks
            ]
            return Run(
                run_id=run_id,
                job_id=next(self._job_ids),  # a one-time run gets a job id of its own, as on Databricks
                run_type="SUBMIT_RUN",
                run_name=str(body.get("run_name") or "Untitled"),
                tasks=task_runs,
                idempotency_token=token,
                timeout_seconds=int(body.get("timeout_seconds") or 0),
            )

        return {"run_id": self._start(token, build, None)}

    def _run_now(self, query: dict[str, str], body: Any) -> dict[str, Any]:
        body = _object(body)
        _validate(RunNowInput, body, "")
        if not isinstance(body.get("job_id"), int):
            raise ApiError.invalid("Job id is required.")
        job = self.jobs.get(body["job_id"])
        if job is None:
            raise ApiError.invalid(f"Job {body['job_id']} does not exist.")
        given = body.get("job_parameters") or {}
        try:
            given = _STRING_MAP.validate_python(given, strict=True)
        except ValidationError as exc:
            raise ApiError.invalid(f"job_parameters must map names to strings: {exc.errors()[0]['msg']}") from None
        defaults = {p["name"]: str(p.get("default", "")) for p in job.settings.get("parameters") or []}
        values = {**defaults, **given}
        token = _token(body)

        def build(run_id: int) -> Run:
            task_runs = []
            for task in job.settings.get("tasks") or []:
                task_run_id = next(self._ids)
                references = {"job.id": str(job.job_id), "job.run_id": str(run_id), "task.run_id": str(task_run_id)}
                references |= {"task.name": task["task_key"]} | {f"job.parameters.{k}": v for k, v in values.items()}
                parameters = [_substitute(p, references) for p in _wheel_parameters(task["python_wheel_task"])]
                task_runs.append(TaskRun(task_run_id, task["task_key"], task, parameters))
            return Run(
                run_id=run_id,
                job_id=job.job_id,
                run_type="JOB_RUN",
                run_name=str(job.settings.get("name") or job.key),
                tasks=task_runs,
                idempotency_token=token,
                timeout_seconds=int(job.settings.get("timeout_seconds") or 0),
                job_parameters=[
                    {"name": name, "default": defaults.get(name, ""), "value": value} for name, value in values.items()
                ],
            )

        run_id = self._start(token, build, job)
        return {"run_id": run_id, "number_in_job": run_id}

    def _get(self, query: dict[str, str], body: Any) -> dict[str, Any]:
        return self.run_json(self._run(query.get("run_id")))

    def _get_output(self, query: dict[str, str], body: Any) -> dict[str, Any]:
        run_id = _run_id(query.get("run_id"))
        with self._lock:
            if run_id in self.runs:
                raise ApiError.invalid(
                    "Retrieving the output of runs with multiple tasks is not supported. Please retrieve the output "
                    "of each individual task run instead."
                )
            if run_id not in self._task_runs:
                raise ApiError.invalid(f"Run {run_id} does not exist.")
            run, task = self._task_runs[run_id]
        logs = "".join(f"{line}\n" for line in list(task.stdout))
        truncated = len(logs.encode()) > LOGS_LIMIT
        answer: dict[str, Any] = {
            "metadata": self.task_json(run, task),
            "logs": logs.encode()[-LOGS_LIMIT:].decode(errors="ignore") if truncated else logs,
            "logs_truncated": truncated,
        }
        if task.error is not None:
            answer["error"] = task.error
        if task.error_trace is not None:
            answer["error_trace"] = task.error_trace
        return answer

    def _cancel_endpoint(self, query: dict[str, str], body: Any) -> dict[str, Any]:
        body = _object(body)
        self._cancel(self._run(body.get("run_id")))
        return {}

    # -- runs

    def _run(self, value: Any) -> Run:
        run_id = _run_id(value)
        with self._lock:
            if run_id not in self.runs:
                raise ApiError.invalid(f"Run {run_id} does not exist.")
            return self.runs[run_id]

    def _start(self, token: str | None, build: Any, job: Job | None) -> int:
        """The run a token already started, or a new one, started."""
        with self._lock:
            if token is not None and token in self._tokens:
                return self._tokens[token]
            run = build(next(self._ids))
            self.runs[run.run_id] = run
            for task in run.tasks:
                self._task_runs[task.run_id] = (run, task)
            if token is not None:
                self._tokens[token] = run.run_id
            run.thread = threading.Thread(target=self._execute, args=(run, job), name=f"run-{run.run_id}", daemon=True)
            run.thread.start()
            return run.run_id

    def _cancel(self, run: Run) -> None:
        with run.lock:
            if run.finished:
                return
            run.cancel_requested = True
            processes = [t.process for t in run.tasks if t.process is not None and t.process.poll() is None]
        for process in processes:
            _terminate(process)

    def _execute(self, run: Run, job: Job | None) -> None:
        try:
            if not self._wait_for_slot(run, job):
                return
            try:
                self._execute_tasks(run)
            finally:
                if job is not None:
                    job.slots.release()
        except Exception as exc:  # the double's own failure: visible as the run's end, never a hung poll
            with run.lock:
                for task in run.tasks:
                    if not task.finished:
                        task.end("INTERNAL_ERROR", "FAILED", f"databricks double: {exc!r}")
                self._end(run, "INTERNAL_ERROR", "FAILED", f"databricks double: {exc!r}")
        finally:
            run.done.set()

    def _wait_for_slot(self, run: Run, job: Job | None) -> bool:
        """A job run waits (QUEUED) while the job has max_concurrent_runs active; without a queue it is skipped."""
        if job is None:
            return True
        if job.slots.acquire(blocking=False):
            return True
        if not (job.settings.get("queue") or {}).get("enabled"):
            limit = job.settings.get("max_concurrent_runs") or 1
            message = f"Skipping this run because the limit of {limit} maximum concurrent runs has been reached."
            with run.lock:
                for task in run.tasks:
                    task.end("SKIPPED", None, message)
                self._end(run, "SKIPPED", None, message)
            return False
        with run.lock:
            run.life_cycle_state, run.state_message = "QUEUED", "Queued: the job's maximum concurrent runs is reached"
        while not job.slots.acquire(timeout=0.2):
            if run.cancel_requested:
                with run.lock:
                    for task in run.tasks:
                        task.end("TERMINATED", "CANCELED", "Run cancelled.")
                    self._end(run, "TERMINATED", "CANCELED", "Run cancelled.")
                return False
        with run.lock:
            run.life_cycle_state, run.state_message = "PENDING", ""
        return True

    def _execute_tasks(self, run: Run) -> None:
        time.sleep(self.pending_s)  # "waiting for the cluster": PENDING is a state callers see
        deadline = time.monotonic() + run.timeout_seconds if run.timeout_seconds else None
        for task in run.tasks:  # in order (the double has no depends_on graph: one task per run is what it runs)
            self._execute_task(run, task, deadline)
        failed = [t for t in run.tasks if t.result_state != "SUCCESS"]
        with run.lock:
            if run.cancel_requested:
                self._end(run, "TERMINATED", "CANCELED", "Run cancelled.")
            elif run.timed_out:
                self._end(run, "TERMINATED", "TIMEDOUT", f"Run timed out after {run.timeout_seconds} seconds.")
            elif any(t.life_cycle_state == "INTERNAL_ERROR" for t in failed):
                first = next(t for t in failed if t.life_cycle_state == "INTERNAL_ERROR")
                self._end(run, "INTERNAL_ERROR", "FAILED", first.state_message)
            elif failed:
                message = (
                    f"Task {failed[0].task_key} failed with message: {FAILED_MESSAGE}. This caused all downstream "
                    "tasks to get skipped."
                )
                self._end(run, "TERMINATED", "FAILED", message)
            else:
                self._end(run, "TERMINATED", "SUCCESS", "")

    def _end(self, run: Run, life_cycle: str, result: str | None, message: str) -> None:
        run.life_cycle_state, run.result_state, run.state_message = life_cycle, result, message
        run.end_time = _now_ms()

    def _execute_task(self, run: Run, task: TaskRun, deadline: float | None) -> None:
        wheel = task.settings["python_wheel_task"]
        try:
            module_file = entry_point_module(str(wheel["package_name"]), str(wheel["entry_point"]))
            unresolved = sorted({ref for p in task.parameters for ref in PARAMETER_REF.findall(p)})
            if unresolved:
                raise LookupError(f"Invalid dynamic value references in the task's parameters: {unresolved}")
        except LookupError as exc:
            with run.lock:
                task.start_time = task.start_time or _now_ms()
                task.end("INTERNAL_ERROR", "FAILED", str(exc))
            return
        argv = [self.mount.resolve_argument(p) for p in task.parameters] if self.mount else list(task.parameters)
        if self.clusters is not None:
            self._execute_warm(run, task, argv, deadline)
            return
        task.command = self.command(str(wheel["entry_point"]), module_file, argv)
        with run.lock:
            if run.cancel_requested:
                task.end("TERMINATED", "CANCELED", "Run cancelled.")
                return
            task.start_time = _now_ms()
            task.process = subprocess.Popen(
                task.command,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=self.driver_env(),
                start_new_session=True,  # its own process group: a cancel ends the JVM and the Python driver
            )
            task.life_cycle_state, task.state_message = "RUNNING", "In run"
            run.life_cycle_state, run.state_message = "RUNNING", "In run"
        with self._lock:
            self.spark_submits.append(task.command)
        process = task.process
        readers = [
            threading.Thread(target=_drain, args=(process.stdout, task.stdout), daemon=True),
            threading.Thread(target=_drain, args=(process.stderr, task.stderr), daemon=True),
        ]
        for reader in readers:
            reader.start()
        while process.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                with run.lock:
                    run.timed_out = True
                _terminate(process)
            time.sleep(0.1)
        for reader in readers:
            reader.join(timeout=10)
        task.exit_code = process.returncode
        with run.lock:
            if run.cancel_requested:
                task.end("TERMINATED", "CANCELED", "Run cancelled.")
            elif run.timed_out:
                task.end("TERMINATED", "TIMEDOUT", f"Task {task.task_key} timed out.")
            elif process.returncode == 0:
                task.end("TERMINATED", "SUCCESS", "")
            else:
                task.error, task.error_trace = driver_error(task.stdout, task.stderr, process.returncode)
                task.end("TERMINATED", "FAILED", FAILED_MESSAGE)

    def warm_driver(self) -> WarmDriver:
        """The warm driver this double's tasks run in (tests.support.warm_driver), started by its first run."""
        assert self.clusters is not None, "the double was given no clusters: its tasks are spark-submits"
        launch, _ = split_conf(self.conf)
        jars = tuple(str(j) for j in self.jars)
        spec = DriverSpec(sys.executable, self.master, jars, tuple(sorted(launch.items())))
        return self.clusters.driver(spec, self.cluster_env(shared=True))

    def _execute_warm(self, run: Run, task: TaskRun, argv: list[str], deadline: float | None) -> None:
        """The task in the warm driver: a session of its own with the double's catalog conf, the entry point called."""
        wheel = task.settings["python_wheel_task"]
        entry = entry_point(str(wheel["package_name"]), str(wheel["entry_point"]))
        driver = self.warm_driver()
        _, per_run = split_conf(self.conf)
        request = WarmTask(entry.name, entry.module, entry.attr, tuple(argv), per_run, self.run_env())
        compute = task.settings.get("existing_cluster_id") or task.settings.get("job_cluster_key") or "new_cluster"
        with self._lock:
            self.warm_runs.append(WarmRun(str(compute), entry.name, list(argv), task.run_id))

        def started() -> bool:
            with run.lock:
                if run.cancel_requested:
                    return False
                task.start_time = _now_ms()
                task.life_cycle_state, task.state_message = "RUNNING", "In run"
                run.life_cycle_state, run.state_message = "RUNNING", "In run"
                return True

        def stop() -> bool:
            with run.lock:
                if deadline is not None and time.monotonic() > deadline:
                    run.timed_out = True
                return run.cancel_requested or run.timed_out

        outcome: Outcome = driver.run(request, started=started, on_line=task.stdout.append, stop=stop)
        with run.lock:
            task.exit_code = outcome.exit_code
            task.start_time = task.start_time or _now_ms()
            if run.cancel_requested:
                task.end("TERMINATED", "CANCELED", "Run cancelled.")
            elif run.timed_out:
                task.end("TERMINATED", "TIMEDOUT", f"Task {task.task_key} timed out.")
            elif outcome.kind == "success":
                task.end("TERMINATED", "SUCCESS", "")
            elif outcome.kind == "lost" and not outcome.started:  # the cluster never came up: the task never ran
                task.end("INTERNAL_ERROR", "FAILED", outcome.detail)
            elif outcome.kind == "lost":
                task.error, task.error_trace = outcome.detail.splitlines()[0], outcome.detail
                task.end("TERMINATED", "FAILED", FAILED_MESSAGE)
            else:
                code = outcome.exit_code if outcome.exit_code is not None else 1
                task.error, task.error_trace = driver_error(task.stdout, task.stderr, code, runner=entry.name)
                task.end("TERMINATED", "FAILED", FAILED_MESSAGE)

    def command(self, entry_point: str, module_file: Path, argv: list[str]) -> list[str]:
        """`spark-submit` of the entry point's module file, through tollwatch.adapters.spark_submit.submit_command.

        submit_command always submits the merge module, named `tollwatch-merge`: its script (the last item when no
        argv is given) is swapped for this entry point's module and the app is named after the entry point.
        """
        command = sparksubmit.submit_command(self.spark_submit, self.master, self.jars, self.conf, [])
        command.pop()
        command[command.index("--name") + 1] = entry_point
        return [*command, str(module_file), *argv]

    def driver_env(self) -> dict[str, str]:
        """The driver's environment: none of the caller's tollwatch/Prefect settings, the storage mount's secret."""
        return self.cluster_env() | self.run_env()

    def cluster_env(self, *, shared: bool = False) -> dict[str, str]:
        """A cluster's environment: none of the caller's tollwatch/Prefect settings. A `shared` (warm) driver outlives
        this double, so it does not get the caller's SSL_CERT_FILE either (this double's CA, in a directory that goes
        with it)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TOLLWATCH_", "PREFECT_"))}
        if shared:
            env.pop("SSL_CERT_FILE", None)
        return env | {"PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable, "SPARK_LOCAL_IP": HOST}

    def run_env(self) -> dict[str, str]:
        """What a run's driver gets on top of the cluster's environment: the storage mount's secret."""
        return {"TOLLWATCH_STORAGE_CONNECTION_STRING": self.mount.connection_string} if self.mount else {}

    # -- answers

    def _state(self, life_cycle: str, result: str | None, message: str, run: Run) -> dict[str, Any]:
        state: dict[str, Any] = {
            "life_cycle_state": life_cycle,
            "state_message": message,
            "user_cancelled_or_timedout": run.cancel_requested or run.timed_out,
        }
        if result is not None:
            state["result_state"] = result
        return state

    def task_json(self, run: Run, task: TaskRun) -> dict[str, Any]:
        with run.lock:
            wheel = {**task.settings["python_wheel_task"], "parameters": list(task.parameters)}
            answer = {
                "run_id": task.run_id,
                "task_key": task.task_key,
                "state": self._state(task.life_cycle_state, task.result_state, task.state_message, run),
                "python_wheel_task": wheel,
                "libraries": task.settings.get("libraries", []),
                "start_time": task.start_time,
                "end_time": task.end_time,
                "setup_duration": 0,
                "execution_duration": max(0, (task.end_time or _now_ms()) - task.start_time) if task.start_time else 0,
                "cleanup_duration": 0,
                "attempt_number": 0,
                "run_page_url": self.run_page_url(run, task.run_id),
            }
            for compute in ("existing_cluster_id", "new_cluster", "job_cluster_key", "environment_key"):
                if task.settings.get(compute):
                    answer[compute] = task.settings[compute]
            return answer

    def run_json(self, run: Run) -> dict[str, Any]:
        tasks = [self.task_json(run, task) for task in run.tasks]
        with run.lock:
            answer: dict[str, Any] = {
                "job_id": run.job_id,
                "run_id": run.run_id,
                "number_in_job": run.run_id,
                "original_attempt_run_id": run.run_id,
                "creator_user_name": "tollwatch-tests",
                "run_name": run.run_name,
                "run_type": run.run_type,
                "state": self._state(run.life_cycle_state, run.result_state, run.state_message, run),
                "start_time": run.start_time,
                "end_time": run.end_time,
                "setup_duration": 0,
                "execution_duration": max(0, (run.end_time or _now_ms()) - run.start_time),
                "cleanup_duration": 0,
                "run_page_url": self.run_page_url(run),
                "format": "MULTI_TASK",
                "tasks": tasks,
            }
            if run.job_parameters is not None:
                answer["job_parameters"] = run.job_parameters
            return answer


ROUTES = {
    ("POST", f"{API}/runs/submit"): DatabricksJobsDouble._submit,
    ("POST", f"{API}/run-now"): DatabricksJobsDouble._run_now,
    ("GET", f"{API}/runs/get"): DatabricksJobsDouble._get,
    ("GET", f"{API}/runs/get-output"): DatabricksJobsDouble._get_output,
    ("POST", f"{API}/runs/cancel"): DatabricksJobsDouble._cancel_endpoint,
}


# ---------------------------------------------------------------------------------------------- the HTTP server


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, double: DatabricksJobsDouble, context: ssl.SSLContext) -> None:
        self.double = double
        self.context = context
        self.tls_failures: list[str] = []
        super().__init__((HOST, 0), _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that does not trust the certificate ends its handshake: noted, not printed."""
        self.tls_failures.append(repr(sys.exc_info()[1]))


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def setup(self) -> None:
        # the TLS handshake runs in this connection's thread, so a stalled client cannot block the accept loop
        self.request = self.server.context.wrap_socket(self.request, server_side=True)
        super().setup()

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.request.close()

    def do_GET(self) -> None:
        self._answer("GET")

    def do_POST(self) -> None:
        self._answer("POST")

    def _answer(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        status, body = self.server.double.handle(method, self.path, raw, self.headers.get("Authorization"))
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # the double keeps its own log (`calls`)
        return


# ------------------------------------------------------------------------------------------------------ helpers


def entry_point(package: str, name: str) -> metadata.EntryPoint:
    """`package`'s console-script entry point `name`, as a python_wheel_task resolves it."""
    wanted = _normalized(package)
    found = [
        ep
        for ep in metadata.entry_points(group="console_scripts").select(name=name)
        if ep.dist is not None and _normalized(ep.dist.name) == wanted
    ]
    if not found:
        raise LookupError(
            f"Library installation failed: package {package!r} has no entry point {name!r} "
            "(console_scripts) on this cluster"
        )
    return found[0]


def entry_point_module(package: str, name: str) -> Path:
    """The module file of `package`'s console-script entry point `name` (what spark-submit is given)."""
    found = entry_point(package, name)
    spec = util.find_spec(found.module)
    if spec is None or spec.origin is None:
        raise LookupError(f"entry point {name!r} names module {found.module!r}, which cannot be found")
    return Path(spec.origin)


def driver_error(stdout: list[str], stderr: list[str], code: int, runner: str = "spark-submit") -> tuple[str, str]:
    """(`error`, `error_trace`) of a failed driver: the last Python traceback it printed and its exception line.

    spark-submit's PythonRunner merges the Python driver's stderr into its own stdout (so the traceback is there);
    the JVM's log4j output goes to spark-submit's stderr. Both are searched, stdout first. Without a traceback the
    error is that `runner` (spark-submit, or a warm driver's entry point) exited with `code`.
    """
    for lines in (list(stdout), list(stderr)):
        starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last):")]
        if not starts:
            continue
        trace: list[str] = []
        error = ""
        for line in lines[starts[-1] :]:
            if error and (LOG4J_LINE.match(line) or not line.strip() or line.startswith(contract.RESULT_MARKER)):
                break
            trace.append(line)
            if not error and line and not line[0].isspace() and not line.startswith("Traceback"):
                error = line
        return error or f"{runner} exited with {code}", "\n".join(trace)
    tail = [line for line in [*stdout, *stderr][-40:] if line.strip()]
    return f"{runner} exited with {code}", "\n".join(tail)


def bundle_jobs(tmp: Path, target: str = "dev", **variables: str) -> dict[str, dict[str, Any]]:
    """The bundle's jobs as the Databricks CLI loads them (tests/support/bundle.py), by resource key."""
    from tests.support.bundle import load_resources

    return load_resources(tmp, target, **variables)


def save_workspace_blocks(double: DatabricksJobsDouble, container: str, *, token: str = PLACEHOLDER_PAT) -> None:
    """The blocks a production workspace has (as the `databricks_blocks` fixture saves them), pointing at the double:
    credentials with the placeholder PAT, an existing cluster, the Azurite account's container as the landing
    storage, and a Hadoop catalog on any abfss warehouse (the double's clusters use their own JDBC catalog conf)."""
    from prefect_databricks import DatabricksCredentials

    from tollwatch.prefect.blocks import AzureStorageLocation, DatabricksCompute, SparkIcebergCatalog

    DatabricksCredentials(databricks_instance=double.host, token=token).save("tollwatch-databricks", overwrite=True)
    DatabricksCompute(kind="existing_cluster", existing_cluster_id="0101-000000-double").save(
        "tollwatch", overwrite=True
    )
    account = double.mount.account if double.mount else "devstoreaccount1"
    AzureStorageLocation(account=account, container=container).save("tollwatch", overwrite=True)
    SparkIcebergCatalog(kind="hadoop", warehouse=f"abfss://lake@{account}.dfs.core.windows.net/warehouse").save(
        "tollwatch", overwrite=True
    )


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ApiError.invalid("The request body must be a JSON object.")
    return body


def _validate(model: Any, body: Any, where: str) -> None:
    """prefect-databricks' model of the request (its generated Jobs API 2.1 models) must accept the body."""
    try:
        model.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        location = ".".join(str(part) for part in first["loc"])
        raise ApiError.invalid(f"Invalid {where}{location}: {first['msg']}") from None


def _check_wheel_task(task: dict[str, Any], where: str) -> None:
    kinds = [k for k in task if k.endswith("_task") and task[k] is not None]
    if kinds != ["python_wheel_task"]:
        raise ApiError.invalid(
            f"{where}: the double executes exactly one python_wheel_task per task (got {kinds or 'none'})."
        )
    wheel = task["python_wheel_task"]
    for name in ("package_name", "entry_point"):
        if not isinstance(wheel.get(name), str) or not wheel[name]:
            raise ApiError.invalid(f"{where}python_wheel_task.{name} is required.")
    if wheel.get("parameters") and wheel.get("named_parameters"):
        raise ApiError.invalid(f"{where}python_wheel_task: parameters and named_parameters are mutually exclusive.")


def _check_keys_unique(tasks: list[dict[str, Any]]) -> None:
    keys = [t["task_key"] for t in tasks]
    if len(set(keys)) != len(keys):
        raise ApiError.invalid(f"Task keys must be unique within a run (got {keys}).")


def _wheel_parameters(wheel: Mapping[str, Any]) -> list[str]:
    """argv of a wheel task: `parameters` as given, or `named_parameters` as `--name=value`."""
    if wheel.get("named_parameters"):
        return [f"--{name}={value}" for name, value in wheel["named_parameters"].items()]
    return [str(p) for p in wheel.get("parameters") or []]


def _substitute(parameter: str, references: Mapping[str, str]) -> str:
    """Dynamic value references (`{{job.parameters.x}}`); an unknown one is left in place (and fails the task)."""
    return PARAMETER_REF.sub(lambda m: references.get(m[1], m[0]), parameter)


def _token(body: Mapping[str, Any]) -> str | None:
    token = body.get("idempotency_token")
    if token is None:
        return None
    if not isinstance(token, str) or not 0 < len(token) <= 64:
        raise ApiError.invalid("idempotency_token must be a string of at most 64 characters.")
    return token


def _run_id(value: Any) -> int:
    try:
        run_id = int(value)
    except (TypeError, ValueError):
        raise ApiError.invalid(f"Invalid run_id: {value!r}") from None
    if run_id <= 0:
        raise ApiError.invalid(f"Invalid run_id: {value!r}")
    return run_id


def _drain(stream: Any, into: list[str]) -> None:
    for line in stream:
        into.append(line.rstrip("\n"))
    stream.close()


def _terminate(process: subprocess.Popen[str], grace_s: float = 10.0) -> None:
    """SIGTERM to the driver's process group (spark-submit → JVM → Python), SIGKILL if it lingers."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            return
