"""Figure 9: load on the intake (issue 17, part 3) — the Function app's two HTTP doors under 16 connections.

On a stack of its own (PostgreSQL, a Prefect server, Azurite; no worker and no deployments, so an event starts
nothing and the figure measures the intake alone), the dev Functions host (`tollwatch functions serve`) serves
the real handlers in a **subprocess**: the load generator's 16 threads then compete with the host for the cores
as another client would, not for the host's GIL, and the host starts from its own environment as it does for a
developer. Everything talks over loopback.

* **Event Grid** (`POST /api/eventgrid`): 10,000 deliveries. Publishes are BlobCreated events of the watched
  container, grouped into batches of one to five; each batch is delivered one to three times (same event ids, as Event
  Grid redelivers), and all deliveries are shuffled, so they arrive out of order. Most blobs are written once; a
  fifth of the publishes *rewrite* a blob already written (a newer eTag and sequencer). What must come out is then
  well defined: the newest publish of every blob has exactly one `tollwatch.dataset.refreshed` (its delivery is
  never stale); an older publish of a rewritten blob has at most one (the receiver drops it when it arrives after
  the newer sequencer was recorded, and emits it when the two are in flight together: the stale check is
  read-then-act, by design, and the ingest's ledger makes a stale refresh harmless). Lost = a newest publish without
  an event; duplicate = a second event for one publish (same blob URL and eTag); unexpected = an event for
  something never published.
* **Backfill** (`POST /api/backfill`): 2,000 requests with explicit calendar chunks (day, week or month; no
  upstream counting), each distinct body sent one to three times. Every distinct body must yield exactly its
  plan's chunk events (`core.backfill.plan_backfill`, one per (request id, start, stop)), whatever the repeats.

Every answer to a valid request must be 2xx; a 5xx or a transport error is counted and the request is sent again
(as Event Grid would), so the event accounting still says whether the intake itself lost anything. The stored
events are read back from the Prefect server (events API, through the stack's env) until every expected event is
there or a grace period ends. Lost, duplicate, unexpected or non-2xx: the figure fails (`FigureFailed`).

Baselines, same host, same 16 connections, same run, before the load: the Event Grid subscription handshake (the
same route, secret and body parsing, no storage and no Prefect) and, for backfill, a request refused by validation
(400: settings and parsing, no emit); a wrong function key (401, refused by the host before any handler) is the
transport floor, reported beside them.

Bounded: `--quick` sends 500 deliveries and 100 backfill requests; the figure aborts with a sentence when it runs
longer than its cap (20 min, quick 6 min).

Run: `python -m bench --only 9` (`--quick` for the small sizes).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import secrets
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

from bench.common import Figure, FigureFailed, cpu_by_service, percentile
from tollwatch.contract.events import EventName
from tollwatch.core.backfill import BackfillLimits, parse_backfill, plan_backfill
from tollwatch_dev.procs import ProcessRef, spawn, tail, terminate_group
from tollwatch_dev.stack import LocalStack, StackEndpoints

GROUP_EVENTGRID = "9 intake: Event Grid"
GROUP_BACKFILL = "9 intake: backfill"
CONCURRENCY = 16
DOMAIN, DATASET = "data.ny.gov", "qzve-kjga"
#: What the host watches (its TOLLWATCH_EVENTGRID_* settings) and what the generated publishes name.
TOPIC = "/subscriptions/bench/resourceGroups/bench/providers/Microsoft.Storage/storageAccounts/benchaccount"
CONTAINER = "upstream"
SUBSCRIPTION = "bench-intake"
#: Share of publishes that rewrite a blob already written (a newer eTag and sequencer for the same URL).
REWRITE_SHARE = 0.2
#: Event Grid batches here hold 1..MAX_BATCH events; each batch is delivered 1..3 times (weights below).
MAX_BATCH = 5
COPIES, COPY_WEIGHTS = (1, 2, 3), (0.5, 0.3, 0.2)
#: Backfill bodies are sent 1..3 times ("some repeated").
BACKFILL_COPY_WEIGHTS = (0.6, 0.3, 0.1)
#: Sends of one request before it counts as failed (the first try plus Event Grid-like retries of 5xx/transport errors).
MAX_SENDS, RESEND_PAUSE_S = 4, 1.0
#: How long stored events may lag the last 2xx before a missing one counts as lost.
SETTLE_S = 120.0


@dataclass(frozen=True)
class Sizes:
    deliveries: int
    backfills: int
    baseline: int
    cap_s: float


FULL = Sizes(deliveries=10_000, backfills=2_000, baseline=2_000, cap_s=20 * 60)
QUICK = Sizes(deliveries=500, backfills=100, baseline=200, cap_s=6 * 60)


class Aborted(RuntimeError):
    """The figure ran past its time cap; what was sent so far is in the message."""


# ---------------------------------------------------------------------------------------------- workloads


@dataclass(frozen=True)
class Publish:
    """One BlobCreated: a write of `blob` (its URL, the eTag and sequencer the write got)."""

    blob: str
    etag: str
    sequencer: str
    event_id: str

    @property
    def url(self) -> str:
        return f"https://benchaccount.blob.core.windows.net/{CONTAINER}/{self.blob}"

    def event(self, at: datetime) -> dict[str, Any]:
        """The event in the Event Grid schema, as a storage account's system topic delivers it."""
        return {
            "id": self.event_id,
            "topic": TOPIC,
            "subject": f"/blobServices/default/containers/{CONTAINER}/blobs/{self.blob}",
            "eventType": "Microsoft.Storage.BlobCreated",
            "eventTime": at.isoformat().replace("+00:00", "Z"),
            "data": {
                "api": "PutBlockList",
                "eTag": self.etag,
                "contentType": "text/csv",
                "contentLength": 524288,
                "blobType": "BlockBlob",
                "url": self.url,
                "sequencer": self.sequencer,
            },
            "dataVersion": "",
            "metadataVersion": "1",
        }


@dataclass(frozen=True)
class EventGridWorkload:
    publishes: tuple[Publish, ...]
    deliveries: tuple[bytes, ...]
    batches: int

    def newest(self) -> set[tuple[str, str]]:
        """(url, eTag) of each blob's newest publish: exactly one event each, whatever the arrival order."""
        top: dict[str, Publish] = {}
        for p in self.publishes:
            if p.url not in top or p.sequencer > top[p.url].sequencer:
                top[p.url] = p
        return {(p.url, p.etag) for p in top.values()}


def eventgrid_workload(deliveries: int, seed: int, run: str) -> EventGridWorkload:
    """Batches of fresh writes and rewrites, each delivered one to three times, shuffled; exactly `deliveries` requests.

    Sequencers and eTags come from one counter (fixed-width hex, as Azure's sequencers compare as strings), so a
    rewrite always carries a newer sequencer than every earlier write of its blob.
    """
    rng = random.Random(seed)
    at = datetime.now(UTC)
    publishes: list[Publish] = []
    sent: list[bytes] = []
    blobs: list[str] = []
    batches = 0
    while len(sent) < deliveries:
        batch = []
        for _ in range(rng.randint(1, MAX_BATCH)):
            counter = len(publishes) + 1
            if blobs and rng.random() < REWRITE_SHARE:
                blob = rng.choice(blobs)
            else:
                blob = f"publishes/{run}/{len(blobs):06d}.csv"
                blobs.append(blob)
            event_id = str(uuid.UUID(int=rng.getrandbits(128)))
            publish = Publish(blob, f'"0x8D{counter:014X}"', f"{counter:032x}", event_id)
            publishes.append(publish)
            batch.append(publish.event(at))
        body = json.dumps(batch).encode()
        copies = rng.choices(COPIES, COPY_WEIGHTS)[0]
        sent.extend([body] * min(copies, deliveries - len(sent)))
        batches += 1
    rng.shuffle(sent)
    return EventGridWorkload(tuple(publishes), tuple(sent), batches)


@dataclass(frozen=True)
class BackfillWorkload:
    bodies: tuple[bytes, ...]
    distinct: tuple[bytes, ...]
    #: (request id, start, stop) of every chunk event the distinct bodies plan, by event id.
    expected: dict[str, tuple[str, str, str]]


def backfill_workload(requests: int, seed: int, run: str) -> BackfillWorkload:
    """Distinct calendar-chunked requests (one to four chunks each), each sent one to three times, shuffled."""
    rng = random.Random(seed)
    limits = BackfillLimits(today=date.today())
    distinct: list[bytes] = []
    bodies: list[bytes] = []
    expected: dict[str, tuple[str, str, str]] = {}
    while len(bodies) < requests:
        chunk, days = rng.choice((("day", (1, 3)), ("week", (7, 21)), ("month", (28, 80))))
        start = date(2020, 1, 1) + timedelta(days=rng.randint(0, 1500))
        stop = start + timedelta(days=rng.randint(*days))
        request = {"start": str(start), "stop": str(stop), "chunk": chunk, "reason": f"bench {run} #{len(distinct)}"}
        body = json.dumps(request).encode()
        plan = plan_backfill(parse_backfill(body, limits), domain=DOMAIN, dataset_id=DATASET, requested_by="http")
        for event, window in zip(plan.events, plan.chunks, strict=True):
            expected[str(event.id)] = (plan.request_id, str(window.start), str(window.stop))
        distinct.append(body)
        copies = rng.choices(COPIES, BACKFILL_COPY_WEIGHTS)[0]
        bodies.extend([body] * min(copies, requests - len(bodies)))
    rng.shuffle(bodies)
    return BackfillWorkload(tuple(bodies), tuple(distinct), expected)


# ---------------------------------------------------------------------------------------------- load


@dataclass
class Load:
    """What one phase of requests saw: every first answer's latency and status, resends, the 2xx bodies."""

    name: str
    latencies_ms: list[float] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)
    resent: int = 0
    failed: int = 0
    wall_s: float = 0.0
    cpu_s: dict[str, float] = field(default_factory=dict)
    replies: list[Any] = field(default_factory=list)

    @property
    def sent(self) -> int:
        return len(self.latencies_ms)

    @property
    def rate(self) -> float:
        return self.sent / self.wall_s if self.wall_s else 0.0

    def p(self, q: float) -> float:
        return percentile(self.latencies_ms, q)

    def non_2xx(self, expected: int) -> int:
        return sum(n for status, n in self.statuses.items() if status != str(expected))

    def describe(self) -> str:
        statuses = ", ".join(f"{status}: {n}" for status, n in sorted(self.statuses.items()))
        return (
            f"{self.sent} requests in {self.wall_s:.1f} s = {self.rate:.0f}/s, p50 {self.p(50):.1f} ms, "
            f"p99 {self.p(99):.1f} ms, max {max(self.latencies_ms):.0f} ms; first answers {{{statuses}}}, "
            f"resent {self.resent}, failed after {MAX_SENDS} sends {self.failed}"
        )


def hammer(
    url: str,
    bodies: tuple[bytes, ...] | list[bytes],
    headers: dict[str, str],
    *,
    name: str,
    ok: int,
    deadline: float,
    keep_replies: bool = False,
) -> Load:
    """POST every body over `CONCURRENCY` kept-alive connections; time each first answer.

    A 5xx or a transport error is sent again (up to MAX_SENDS, a pause between) like Event Grid's retry, so the
    accounting afterwards still tells intake losses from refused deliveries; only the first answer is timed.
    """
    load = Load(name)
    lock = threading.Lock()
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)

    with httpx.Client(limits=limits, timeout=httpx.Timeout(60.0, connect=10.0), headers=headers) as client:

        def send(body: bytes) -> None:
            if time.monotonic() > deadline:
                return
            first: tuple[float, str] | None = None
            reply: Any = None
            for attempt in range(MAX_SENDS):
                began = time.perf_counter()
                try:
                    response = client.post(url, content=body)
                    status = str(response.status_code)
                except httpx.TransportError as exc:
                    status = type(exc).__name__
                    response = None
                if first is None:
                    first = ((time.perf_counter() - began) * 1000, status)
                if response is not None and response.status_code < 500:
                    if keep_replies and response.status_code == ok:
                        reply = response.json()
                    break
                if attempt + 1 < MAX_SENDS:
                    time.sleep(RESEND_PAUSE_S)
            with lock:
                load.latencies_ms.append(first[0])
                load.statuses[first[1]] += 1
                load.resent += attempt
                load.failed += int(response is None or response.status_code >= 500)
                if reply is not None:
                    load.replies.append(reply)

        began = time.perf_counter()
        with ThreadPoolExecutor(CONCURRENCY, thread_name_prefix="intake-load") as pool:
            list(pool.map(send, bodies))
        load.wall_s = time.perf_counter() - began
    if load.sent < len(bodies):
        raise Aborted(f"{name}: time cap reached after {load.sent} of {len(bodies)} requests ({load.describe()})")
    return load


# ---------------------------------------------------------------------------------------------- the host


@dataclass
class Host:
    """`tollwatch functions serve` in a process group of its own, on a port it chose (`--port 0`)."""

    url: str
    ref: ProcessRef
    log: Path
    key: str
    secret: str

    def eventgrid_headers(self) -> dict[str, str]:
        return {
            "content-type": "application/json",
            "aeg-event-type": "Notification",
            "aeg-subscription-name": SUBSCRIPTION.upper(),  # Event Grid may upper-case it
            "x-tollwatch-secret": self.secret,
            "x-functions-key": self.key,
        }

    def backfill_headers(self) -> dict[str, str]:
        return {"content-type": "application/json", "x-functions-key": self.key}


@contextlib.contextmanager
def function_host(endpoints: StackEndpoints, workdir: Path) -> Iterator[Host]:
    """The dev host with the settings a deployed app would have for this stack (fresh key and secret per run).

    It starts from this process's environment without any TOLLWATCH_*/PREFECT_* variable (a developer's own must
    not leak in), plus the stack's env, in an empty working directory (no `.env`) and without `--local-stack`.
    """
    key, secret = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TOLLWATCH_", "PREFECT_"))}
    env |= endpoints.env() | {
        "PYTHONUNBUFFERED": "1",  # the route listing (and its port) reaches the log at once
        "TOLLWATCH_FUNCTION_KEY": key,
        "TOLLWATCH_EVENTGRID_SECRETS": secret,
        "TOLLWATCH_EVENTGRID_SOURCE_TOPICS": TOPIC,
        "TOLLWATCH_EVENTGRID_SUBSCRIPTION_NAMES": SUBSCRIPTION,
        "TOLLWATCH_EVENTGRID_CONTAINER": CONTAINER,
        "TOLLWATCH_STORAGE_CONTAINER": "bench-intake",
        "TOLLWATCH_UPSTREAM_DOMAIN": DOMAIN,
    }
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / "funchost.log"
    argv = [str(Path(sys.executable).parent / "tollwatch"), "functions", "serve", "--port", "0", "--no-local-stack"]
    offset = log.stat().st_size if log.exists() else 0  # the log is appended to: read this start's lines only
    ref = spawn(argv, log_path=log, env=env, cwd=workdir)
    try:
        deadline = time.monotonic() + 60
        found = None
        while found is None:
            found = re.search(r"(http://127\.0\.0\.1:\d+)/api/", log.read_text(errors="replace")[offset:])
            if found is None:
                if not ref.alive() or time.monotonic() > deadline:
                    raise RuntimeError(f"the dev Functions host did not start; its log:\n{tail(log)}")
                time.sleep(0.2)
        yield Host(found.group(1), ref, log, key, secret)
    finally:
        terminate_group(ref)


# ---------------------------------------------------------------------------------------------- Prefect


@contextlib.contextmanager
def prefect_env(env: dict[str, str]) -> Iterator[None]:
    """The stack's env for this process's Prefect client: os.environ and every PREFECT_* setting it names.

    Why both: Prefect reads its settings once, at import, so setting os.environ alone would not reach a client made
    now; every PREFECT_* name of the env (the API URL, and basic auth when the stack sets it) is applied as a
    temporary setting as well.
    """
    import prefect.settings
    from prefect.settings import temporary_settings

    updates = {getattr(prefect.settings, k): v for k, v in env.items() if hasattr(prefect.settings, k)}
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        with temporary_settings(updates=updates):
            yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def stored_events(env: dict[str, str], name: str, since: datetime) -> list[Any]:
    """Every `name` event the server stored since `since` (oldest first; pages of 50)."""
    from tollwatch.prefect.observe import connect

    with prefect_env(env), connect() as observer:
        return observer.events(names=[name], since=since, limit=10_000_000)


def settled(read: Callable[[], list[Any]], complete: Callable[[list[Any]], bool], what: str) -> list[Any]:
    """Read until `complete` holds or SETTLE_S passed: the server stores accepted events asynchronously."""
    deadline = time.monotonic() + SETTLE_S
    while True:
        events = read()
        if complete(events) or time.monotonic() > deadline:
            return events
        print(f"  {what}: {len(events)} stored so far, reading again", file=sys.stderr, flush=True)
        time.sleep(5)


# ---------------------------------------------------------------------------------------------- accounting


@dataclass(frozen=True)
class Accounting:
    expected: int
    stored: int
    lost: int
    duplicate: int
    unexpected: int
    extra: dict[str, int] = field(default_factory=dict)

    @property
    def clean(self) -> bool:
        return self.lost == 0 and self.duplicate == 0 and self.unexpected == 0

    def describe(self) -> str:
        more = "".join(f", {k} {v}" for k, v in self.extra.items())
        return (
            f"expected {self.expected}, stored {self.stored}: lost {self.lost}, duplicate {self.duplicate}, "
            f"unexpected {self.unexpected}{more}"
        )


def account_eventgrid(workload: EventGridWorkload, events: list[Any], run: str) -> Accounting:
    """Events per publish (blob URL + eTag), against each blob's newest publish and the set of all publishes."""
    mine = [e for e in events if f"/publishes/{run}/" in str((e.payload.get("blob") or {}).get("url", ""))]
    per_publish = Counter((e.payload["blob"]["url"], e.payload["blob"]["etag"]) for e in mine)
    published = {(p.url, p.etag) for p in workload.publishes}
    newest = workload.newest()
    older = published - newest
    return Accounting(
        expected=len(newest),
        stored=len(mine),
        lost=sum(1 for key in newest if per_publish[key] == 0),
        duplicate=sum(n - 1 for n in per_publish.values() if n > 1),
        unexpected=sum(n for key, n in per_publish.items() if key not in published),
        extra={
            "superseded publishes": len(older),
            "of them emitted (in flight with the newer one)": sum(1 for key in older if per_publish[key]),
        },
    )


def account_backfill(workload: BackfillWorkload, events: list[Any], replies: list[Any]) -> Accounting:
    """Events per chunk (request id, start, stop) against the distinct bodies' plans; replies checked too."""
    requests = {key[0] for key in workload.expected.values()}
    mine = [e for e in events if e.payload.get("request_id") in requests]
    per_chunk = Counter((e.payload["request_id"], e.payload["start"], e.payload["stop"]) for e in mine)
    chunks = set(workload.expected.values())
    answered = {i for reply in replies for i in reply["event_ids"]}
    return Accounting(
        expected=len(chunks),
        stored=len(mine),
        lost=sum(1 for key in chunks if per_chunk[key] == 0),
        duplicate=sum(n - 1 for n in per_chunk.values() if n > 1),
        unexpected=sum(n for key, n in per_chunk.items() if key not in chunks),
        extra={
            "distinct requests": len(workload.distinct),
            "202 event ids not in the plan": len(answered - set(workload.expected)),
        },
    )


# ---------------------------------------------------------------------------------------------- the figure


def _measured(pids: dict[str, int], run: Callable[[], Load]) -> Load:
    before = cpu_by_service(pids)
    load = run()
    after = cpu_by_service(pids)
    load.cpu_s = {name: round(after[name] - before.get(name, 0.0), 1) for name in after}
    print(f"  {load.name}: {load.describe()}; CPU s {load.cpu_s}", file=sys.stderr, flush=True)
    return load


def _figures(group: str, what: str, load: Load, baseline: Load, ok: int, accounting: Accounting) -> list[Figure]:
    non_2xx = load.non_2xx(ok)
    met = accounting.clean and non_2xx == 0 and load.failed == 0
    goal = "0 lost, 0 duplicate, every answer 2xx"
    rate = Figure(
        group=group,
        name=f"{what}/s ({load.sent:,} over {CONCURRENCY} connections)",
        value=round(load.rate, 1),
        unit="req/s",
        better="higher",
        baseline=round(baseline.rate, 1),
        baseline_name=baseline.name,
        goal=goal,
        goal_met=met,
        note=f"{accounting.describe()}; {load.describe()}; CPU s {load.cpu_s}",
    )
    p50, p99 = (
        Figure(
            group=group,
            name=f"response p{q}",
            value=round(load.p(q), 1),
            unit="ms",
            baseline=round(baseline.p(q), 1),
            baseline_name=baseline.name,
        )
        for q in (50, 99)
    )
    lost = Figure(
        group=group,
        name="events lost + duplicate + unexpected",
        value=accounting.lost + accounting.duplicate + accounting.unexpected,
        unit="events",
        goal="0",
        goal_met=accounting.clean,
    )
    return [rate, p50, p99, lost]


def handshake_body() -> bytes:
    return json.dumps(
        [
            {
                "id": str(uuid.uuid4()),
                "topic": TOPIC,
                "subject": "",
                "eventType": "Microsoft.EventGrid.SubscriptionValidationEvent",
                "eventTime": datetime.now(UTC).isoformat(),
                "data": {"validationCode": str(uuid.uuid4())},
                "dataVersion": "2",
                "metadataVersion": "1",
            }
        ]
    ).encode()


def run(quick: bool) -> tuple[list[Figure], dict[str, Any]]:
    """The figure: (figures, measurements for results/latest.json). Raises FigureFailed when the goal is missed."""
    sizes = QUICK if quick else FULL
    began = time.monotonic()
    deadline = began + sizes.cap_s
    tag = uuid.uuid4().hex[:8]
    eventgrid = eventgrid_workload(sizes.deliveries, seed=9, run=tag)
    backfills = backfill_workload(sizes.backfills, seed=9, run=tag)
    with tempfile.TemporaryDirectory(prefix="tollwatch-bench-intake-") as tmp:
        stack = LocalStack(Path(tmp) / "stack", services=("azurite", "prefect"), prefect_ui=False)
        try:
            endpoints = stack.up()
            env = endpoints.env()
            since = datetime.now(UTC) - timedelta(minutes=1)
            with function_host(endpoints, Path(tmp) / "host") as host:
                pids = {name: s.pid for name, s in stack.status().items() if s.pid is not None}
                pids["host"] = host.ref.pid
                eventgrid_url, backfill_url = f"{host.url}/api/eventgrid", f"{host.url}/api/backfill"
                n = sizes.baseline
                floor = _measured(
                    pids,
                    lambda: hammer(
                        eventgrid_url,
                        [b"[]"] * n,
                        host.eventgrid_headers() | {"x-functions-key": "wrong-key"},
                        name="wrong key (401)",
                        ok=401,
                        deadline=deadline,
                    ),
                )
                handshake = _measured(
                    pids,
                    lambda: hammer(
                        eventgrid_url,
                        [handshake_body() for _ in range(n)],
                        host.eventgrid_headers(),
                        name="handshake (200)",
                        ok=200,
                        deadline=deadline,
                    ),
                )
                invalid = json.dumps({"start": "2024-02-01", "stop": "2024-01-01", "chunk": "day"}).encode()
                refused = _measured(
                    pids,
                    lambda: hammer(
                        backfill_url,
                        [invalid] * n,
                        host.backfill_headers(),
                        name="invalid backfill (400)",
                        ok=400,
                        deadline=deadline,
                    ),
                )
                eg_load = _measured(
                    pids,
                    lambda: hammer(
                        eventgrid_url,
                        eventgrid.deliveries,
                        host.eventgrid_headers(),
                        name="Event Grid deliveries",
                        ok=200,
                        deadline=deadline,
                    ),
                )
                bf_load = _measured(
                    pids,
                    lambda: hammer(
                        backfill_url,
                        backfills.bodies,
                        host.backfill_headers(),
                        name="backfill requests",
                        ok=202,
                        deadline=deadline,
                        keep_replies=True,
                    ),
                )
                host_errors = host.log.read_text(errors="replace").count("Traceback")
                if host_errors:
                    print(f"  host: {host_errors} traceback(s); its log ends:\n{tail(host.log)}", file=sys.stderr)
            newest = eventgrid.newest()
            eg_events = settled(
                lambda: stored_events(env, EventName.DATASET_REFRESHED, since),
                lambda found: newest <= {(e.payload["blob"]["url"], e.payload["blob"]["etag"]) for e in found},
                "refresh events",
            )
            eg_accounting = account_eventgrid(eventgrid, eg_events, tag)
            bf_events = settled(
                lambda: stored_events(env, EventName.BACKFILL_REQUESTED, since),
                lambda found: set(backfills.expected) <= {str(e.id) for e in found},
                "backfill events",
            )
            bf_accounting = account_backfill(backfills, bf_events, bf_load.replies)
        finally:
            stack.down()
    figures = _figures(GROUP_EVENTGRID, "deliveries", eg_load, handshake, 200, eg_accounting)
    figures += _figures(GROUP_BACKFILL, "requests", bf_load, refused, 202, bf_accounting)
    figures[0].note += f"; floor (wrong key, 401): {floor.describe()}"
    figures[0].note += f"; {eventgrid.batches} batches of {len(eventgrid.publishes)} publishes"
    measured: dict[str, Any] = {
        "sizes": sizes.__dict__,
        "took_s": round(time.monotonic() - began, 1),
        "host_tracebacks": host_errors,
        "loads": {
            load.name: {
                "sent": load.sent,
                "wall_s": round(load.wall_s, 2),
                "rate": round(load.rate, 1),
                "p50_ms": round(load.p(50), 2),
                "p99_ms": round(load.p(99), 2),
                "max_ms": round(max(load.latencies_ms), 1),
                "statuses": dict(load.statuses),
                "resent": load.resent,
                "failed": load.failed,
                "cpu_s": load.cpu_s,
            }
            for load in (floor, handshake, refused, eg_load, bf_load)
        },
        "eventgrid": eg_accounting.__dict__,
        "backfill": bf_accounting.__dict__,
    }
    problems = [
        f"{group}: {accounting.describe()}, {load.non_2xx(ok)} non-2xx first answers, {load.failed} failed"
        for group, accounting, load, ok in (
            (GROUP_EVENTGRID, eg_accounting, eg_load, 200),
            (GROUP_BACKFILL, bf_accounting, bf_load, 202),
        )
        if not accounting.clean or load.non_2xx(ok) or load.failed
    ]
    if host_errors:
        problems.append(f"{host_errors} tracebacks in the host log")
    if problems:
        raise FigureFailed("figure 9 goal NOT met: " + "; ".join(problems), figures)
    return figures, measured


# ---------------------------------------------------------------------------------------------- profile


def profile_deliveries(deliveries: int, out: Path) -> None:
    """pyinstrument profile of the Event Grid handler, called in-process one delivery at a time (no HTTP, no
    concurrency) on a stack of its own, with the figure's workload: where one delivery's time goes."""
    import azure.functions as func
    from pyinstrument import Profiler

    from tollwatch_dev.funchost import find_function, load_function_app

    secret = secrets.token_urlsafe(24)
    work = eventgrid_workload(deliveries, seed=9, run="profile")
    with tempfile.TemporaryDirectory(prefix="tollwatch-bench-intake-") as tmp:
        stack = LocalStack(Path(tmp) / "stack", services=("azurite", "prefect"), prefect_ui=False)
        saved = dict(os.environ)
        try:
            os.environ.update(
                stack.up().env()
                | {
                    "TOLLWATCH_EVENTGRID_SECRETS": secret,
                    "TOLLWATCH_EVENTGRID_SOURCE_TOPICS": TOPIC,
                    "TOLLWATCH_EVENTGRID_CONTAINER": CONTAINER,
                    "TOLLWATCH_STORAGE_CONTAINER": "bench-intake",
                }
            )
            handler = find_function(load_function_app(), "eventgrid_webhook")
            headers = {
                "content-type": "application/json",
                "aeg-event-type": "Notification",
                "x-tollwatch-secret": secret,
            }

            def deliver(body: bytes) -> None:
                request = func.HttpRequest("POST", "http://localhost/api/eventgrid", headers=headers, body=body)
                if (status := handler(request).status_code) != 200:
                    raise RuntimeError(f"delivery answered {status}")

            warm = work.deliveries[:20]  # imports and first connections, not profiled
            for body in warm:
                deliver(body)
            profiler = Profiler(interval=0.001)
            began, cpu = time.perf_counter(), time.process_time()
            with profiler:
                for body in work.deliveries[len(warm) :]:
                    deliver(body)
            n = len(work.deliveries) - len(warm)
            wall_ms, cpu_ms = (time.perf_counter() - began) / n * 1000, (time.process_time() - cpu) / n * 1000
        finally:
            stack.down()
            os.environ.clear()
            os.environ.update(saved)
    head = (
        f"# pyinstrument profile of the Event Grid webhook handler (python -m bench.intake --profile {deliveries})\n"
        f"# {n} deliveries of figure 9's workload, one at a time, in-process: {wall_ms:.1f} ms wall, "
        f"{cpu_ms:.1f} ms CPU each (profiler included)\n\n"
    )
    out.write_text(head + profiler.output_text(unicode=True, color=False))
    print(f"{head}written to {out}")


if __name__ == "__main__":
    import argparse

    from bench.common import RESULTS

    parser = argparse.ArgumentParser(prog="python -m bench.intake", description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", type=int, default=400, metavar="N", help="deliveries to profile")
    parser.add_argument("--out", type=Path, default=RESULTS / "profile-eventgrid-delivery.txt")
    args = parser.parse_args()
    profile_deliveries(args.profile, args.out)
