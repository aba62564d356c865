"""A stateful Azure Databricks workspace for the downstream fault tests, served through respx at the HTTP layer
(the only component these tests mock, as tests/integration/test_databricks.py does; the Prefect server stays real).

`FakeWorkspace` answers the Jobs API 2.1 calls tollwatch makes (runs/submit, run-now, runs/get, runs/get-output,
runs/cancel) and the Entra ID token endpoint, keeping the state a real workspace keeps:
- a run exists once its submit request *arrived*, whether or not the caller got the answer; a second submit with
  the same `idempotency_token` returns the existing run instead of starting one (the documented behaviour);
- every API request needs a bearer token the token endpoint issued and that has not expired (else 401);
- a run moves PENDING → RUNNING → its end after `polls` runs/get calls and `duration_s` seconds; runs/get
  carries the 2.1 `state` object and the 2.2 `status` object, as the service returns both.

Faults, per API path (`/api/2.1/jobs/run-now`, ...):
- `lose_response(path)`: the next request is processed, then its response is lost (httpx.ReadTimeout);
- `throttle(path, count, retry_after)`: 429 REQUEST_LIMIT_EXCEEDED with `Retry-After`, `count` times (None:
  until cleared). A request that comes back before the advertised Retry-After is counted in `early_retries`.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import respx
from prefect_databricks.models.jobs import RunNowInput, RunSubmitSettings, RunSubmitTaskSettings

from tests.support.databricks_api import HOST, TOKEN_URL

JOBS = "/api/2.1/jobs"
SUBMIT, RUN_NOW, GET, GET_OUTPUT, CANCEL = (
    f"{JOBS}/runs/submit",
    f"{JOBS}/run-now",
    f"{JOBS}/runs/get",
    f"{JOBS}/runs/get-output",
    f"{JOBS}/runs/cancel",
)
WORKSPACE_ID = "1234567890123456"
THROTTLED = {
    "error_code": "REQUEST_LIMIT_EXCEEDED",
    "message": "Your request was rejected due to API rate limiting. Please retry your request later.",
}


@dataclass
class Ending:
    """How a run ends: a terminal life cycle, the result state (TERMINATED only) and the state message."""

    life_cycle: str = "TERMINATED"
    result: str | None = "SUCCESS"
    message: str = ""


@dataclass
class Call:
    """One API request as the workspace saw it."""

    method: str
    path: str
    token: str | None
    body: dict[str, Any] | None
    params: dict[str, str]
    answered: int | str = 0  # status code, or "timeout" when the response was lost


@dataclass
class FakeRun:
    run_id: int
    job_id: int | None
    run_type: str  # JOB_RUN (run-now) or SUBMIT_RUN (runs/submit)
    token: str | None
    request: dict[str, Any]
    ending: Ending
    polls: int
    duration_s: float
    created: float = field(default_factory=time.monotonic)
    polled: int = 0
    cancelled: bool = False
    task_runs: dict[str, int] = field(default_factory=dict)
    logs: str = ""

    def life_cycle(self) -> tuple[str, str | None, str]:
        if self.cancelled:
            return "TERMINATED", "CANCELED", "Run cancelled by the caller."
        done = self.polled > self.polls and time.monotonic() - self.created >= self.duration_s
        if done:
            return self.ending.life_cycle, self.ending.result, self.ending.message
        return ("PENDING", None, "Waiting for cluster") if self.polled <= 1 else ("RUNNING", None, "In run")


class FakeWorkspace:
    """The Jobs API and Entra ID token endpoint of one workspace, installed on a respx router."""

    def __init__(self, router: respx.MockRouter) -> None:
        self._lock = threading.Lock()
        self._ids = itertools.count(1001)
        self.runs: dict[int, FakeRun] = {}
        self.calls: list[Call] = []
        self.tokens: dict[str, float] = {}  # access token -> expiry (time.time())
        self.token_lifetimes: list[int] = []  # expires_in of the next tokens issued (then 3599)
        self.early_retries = 0
        self.unauthorised = 0
        self._lose: dict[str, int] = {}
        self._throttle: dict[str, tuple[int | None, int]] = {}
        self._not_before: dict[str, float] = {}
        self.job_endings: dict[int, Ending] = {}
        self.ending = Ending()
        self.polls = 2
        self.duration_s = 0.0
        self.logs = ""
        router.post(TOKEN_URL).mock(side_effect=self._issue_token)
        router.route(host=HOST).mock(side_effect=self._handle)

    # ------------------------------------------------------------------ faults and run behaviour

    def lose_response(self, path: str, times: int = 1) -> None:
        self._lose[path] = self._lose.get(path, 0) + times

    def throttle(self, path: str, count: int | None, retry_after: int = 1) -> None:
        self._throttle[path] = (count, retry_after)

    def runs_end(self, ending: Ending, *, polls: int = 2, duration_s: float = 0.0, job_id: int | None = None) -> None:
        """How runs created from now on end (only those of `job_id`, if given)."""
        if job_id is not None:
            self.job_endings[job_id] = ending
        else:
            self.ending = ending
        self.polls, self.duration_s = polls, duration_s

    # ------------------------------------------------------------------ what happened

    def calls_to(self, path: str) -> list[Call]:
        return [c for c in self.calls if c.path == path]

    def tokens_used(self, path: str) -> list[str | None]:
        return [c.token for c in self.calls_to(path)]

    # ------------------------------------------------------------------ Entra ID

    def _issue_token(self, request: httpx.Request) -> httpx.Response:
        form = dict(httpx.QueryParams(request.content.decode()))
        if form.get("grant_type") != "client_credentials":
            return httpx.Response(400, json={"error": "unsupported_grant_type"})
        with self._lock:
            lifetime = self.token_lifetimes.pop(0) if self.token_lifetimes else 3599
            token = f"tok-{len(self.tokens) + 1}"
            self.tokens[token] = time.time() + lifetime
        body = {"token_type": "Bearer", "expires_in": lifetime, "ext_expires_in": lifetime, "access_token": token}
        return httpx.Response(200, json=body)

    # ------------------------------------------------------------------ Jobs API

    def _handle(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        auth = request.headers.get("Authorization", "")
        token = auth.removeprefix("Bearer ") if auth.startswith("Bearer ") else None
        body = json.loads(request.content) if request.content else None
        call = Call(request.method, path, token, body, dict(request.url.params))
        with self._lock:
            self.calls.append(call)
            response = self._answer(call, request)
            lost = response.status_code == 200 and self._lose.get(path, 0) > 0
            if lost:
                self._lose[path] -= 1
            call.answered = "timeout" if lost else response.status_code
        if lost:  # processed, but the caller never hears back
            raise httpx.ReadTimeout("The read operation timed out", request=request)
        return response

    def _answer(self, call: Call, request: httpx.Request) -> httpx.Response:
        now = time.monotonic()
        if now < self._not_before.get(call.path, 0.0):
            self.early_retries += 1
        count, retry_after = self._throttle.get(call.path, (0, 0))
        if count is None or count > 0:
            self._throttle[call.path] = (None if count is None else count - 1, retry_after)
            self._not_before[call.path] = now + retry_after
            return httpx.Response(429, json=THROTTLED, headers={"Retry-After": str(retry_after)})
        expiry = self.tokens.get(call.token or "")
        if expiry is None or time.time() >= expiry:
            self.unauthorised += 1
            return httpx.Response(401, json={"error_code": "UNAUTHENTICATED", "message": "Token is expired."})
        handler = {
            ("POST", SUBMIT): self._submit,
            ("POST", RUN_NOW): self._run_now,
            ("GET", GET): self._get,
            ("GET", GET_OUTPUT): self._get_output,
            ("POST", CANCEL): self._cancel,
        }.get((call.method, call.path))
        if handler is None:
            return httpx.Response(404, json={"error_code": "ENDPOINT_NOT_FOUND", "message": f"No API at {call.path}"})
        return handler(call)

    def _start(self, call: Call, job_id: int | None, run_type: str) -> FakeRun:
        token = (call.body or {}).get("idempotency_token")
        if token is not None:
            for run in self.runs.values():
                if run.token == token:
                    return run  # the documented idempotency: the existing run, no new one
        run_id = next(self._ids)
        ending = self.job_endings.get(job_id, self.ending) if job_id is not None else self.ending
        run = FakeRun(run_id, job_id, run_type, token, call.body or {}, ending, self.polls, self.duration_s)
        for task in (call.body or {}).get("tasks", []):
            run.task_runs[task["task_key"]] = next(self._ids)
        run.logs = self.logs
        self.runs[run_id] = run
        return run

    def _submit(self, call: Call) -> httpx.Response:
        body = call.body or {}
        RunSubmitSettings.model_validate({k: v for k, v in body.items() if k != "idempotency_token"})
        for task in body.get("tasks", []):
            RunSubmitTaskSettings.model_validate(task)
        if len(body.get("idempotency_token") or "") > 64:
            return httpx.Response(400, json={"error_code": "INVALID_PARAMETER_VALUE", "message": "token too long"})
        return httpx.Response(200, json={"run_id": self._start(call, None, "SUBMIT_RUN").run_id})

    def _run_now(self, call: Call) -> httpx.Response:
        body = call.body or {}
        parsed = RunNowInput.model_validate({k: v for k, v in body.items() if v is not None and k != "job_parameters"})
        if not all(isinstance(v, str) for v in (body.get("job_parameters") or {}).values()):
            return httpx.Response(400, json={"error_code": "INVALID_PARAMETER_VALUE", "message": "job_parameters"})
        run = self._start(call, parsed.job_id, "JOB_RUN")
        return httpx.Response(200, json={"run_id": run.run_id, "number_in_job": run.run_id})

    def _find(self, call: Call) -> FakeRun | None:
        run_id = int(call.params.get("run_id") or (call.body or {}).get("run_id") or 0)
        return self.runs.get(run_id)

    def _get(self, call: Call) -> httpx.Response:
        run = self._find(call)
        if run is None:
            return _no_such_run(call)
        run.polled += 1
        return httpx.Response(200, json=self.describe(run))

    def describe(self, run: FakeRun) -> dict[str, Any]:
        """runs/get for one run (Jobs API 2.1 shape, with the 2.2 `status` beside the 2.1 `state`)."""
        life_cycle, result, message = run.life_cycle()
        state: dict[str, Any] = {"life_cycle_state": life_cycle, "state_message": message}
        state["user_cancelled_or_timedout"] = run.cancelled
        if result:
            state["result_state"] = result
        ended = life_cycle in ("TERMINATED", "SKIPPED", "INTERNAL_ERROR")
        status: dict[str, Any] = {"state": "TERMINATED" if ended else life_cycle}
        if ended:
            code = result if life_cycle == "TERMINATED" else life_cycle
            kind = "SUCCESS" if code in ("SUCCESS", "SKIPPED") else "CLIENT_ERROR"
            status["termination_details"] = {"code": code, "type": kind, "message": message}
        job = f"job/{run.job_id}" if run.job_id is not None else "job/0"
        return {
            "job_id": run.job_id,
            "run_id": run.run_id,
            "number_in_job": run.run_id,
            "original_attempt_run_id": run.run_id,
            "creator_user_name": "tollwatch-sp",
            "run_name": run.request.get("run_name", "Untitled"),
            "run_type": run.run_type,
            "state": state,
            "status": status,
            "run_page_url": f"https://{HOST}/?o={WORKSPACE_ID}#{job}/run/{run.run_id}",
            "tasks": [{"run_id": task_run, "task_key": key, "state": state} for key, task_run in run.task_runs.items()],
        }

    def _get_output(self, call: Call) -> httpx.Response:
        wanted = int(call.params.get("run_id") or 0)
        for run in self.runs.values():
            if wanted in run.task_runs.values():
                metadata = {**self.describe(run), "run_id": wanted}
                return httpx.Response(200, json={"metadata": metadata, "logs": run.logs, "logs_truncated": False})
            if wanted == run.run_id and run.task_runs:
                message = "Retrieving the output of runs with multiple tasks is not supported; use a task run id"
                return httpx.Response(400, json={"error_code": "INVALID_PARAMETER_VALUE", "message": message})
        return _no_such_run(call)

    def _cancel(self, call: Call) -> httpx.Response:
        run = self._find(call)
        if run is None:
            return _no_such_run(call)
        run.cancelled = True
        return httpx.Response(200, json={})


def _no_such_run(call: Call) -> httpx.Response:
    run_id = call.params.get("run_id") or (call.body or {}).get("run_id")
    message = f"Run {run_id} does not exist."
    return httpx.Response(400, json={"error_code": "INVALID_PARAMETER_VALUE", "message": message})
