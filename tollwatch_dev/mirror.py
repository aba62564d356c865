"""A Socrata-compatible mirror of MTA B&T "Hourly Traffic" (`qzve-kjga`) for local development and tests.

Why a mirror: the ingestion code must be exercised against the real protocol (SODA 2.x paging, system
fields, `:updated_at` watermarks, throttling, schema drift) without the network, with data that is
deterministic and as large as the real history. Rows come from `tollwatch_dev.synthetic`, computed from
their position on the fly, so memory does not grow with history size.

Data endpoints (SODA 2.x semantics for what tollwatch uses; every value is a JSON string):

* ``GET /api/views/{id}.json`` -> ``{"id", "name", "rowsUpdatedAt", "viewLastModified", "columns": [...]}``
* ``GET /resource/{id}.json`` with ``$select`` (``*``, ``:*``, ``:*, *`` or a column list), ``$where``
  (``AND`` of ``date``/``:updated_at`` compared with ``>= > < <=`` to a quoted timestamp), ``$order``
  (``:id`` only), ``$limit`` (default 1000, at most 50000), ``$offset``; ``X-App-Token`` header or
  ``$$app_token`` accepted and logged. Query errors answer 400 ``{"error": true, "message": ...}``.
* Counts (SoQL aggregates), the shapes ``SocrataClient.count``/``counts_by_day`` send, with the same ``$where``:
  ``$select=count(*) AS n`` -> ``[{"n": "1234"}]``; ``$select=date, count(*) AS n&$group=date&$order=date``
  -> ``[{"date": "2024-01-01T00:00:00.000", "n": "528"}, ...]`` (one object per date that has rows,
  ascending, paged by ``$limit``/``$offset``). ``count(*)`` without an alias answers under ``count``; ``AS`` and
  ``COUNT`` in any case; ``$order`` absent or ``date [asc]``. Any other aggregate (another function, ``$group``
  by another column or without ``count(*)``, ``date`` without ``$group``) is a 400 with the reason. A count
  equals the number of rows the data query with the same ``$where`` pages through (both read the same
  version-map ranges) and costs O(days), not O(rows); per date, a row whose ``date`` was ``corrupt``-ed counts
  under the value it serves (a null date: no ``date`` key, last). Count requests are ``/resource`` requests:
  they take injected faults, are in the request log and count down ``after_requests``, like data requests.

Publishing model: rows exist for days in ``[history_start, published_through)``; the history is a list of
publish batches (contiguous ``seq`` ranges, one ``updated_at`` each). The initial batch is stamped with a
fixed ``base_epoch`` (not the wall clock) so results are deterministic. The upstream can also *revise* days
(every row gets a new version: new ``:updated_at``, ``vehicles_e_zpass`` + 1 per revision, same ``:id`` and
``:created_at``) and *delete* days (their rows vanish from every query; other rows keep their ``:id``). Every
data change (publish, revision, deletion) is stamped ``max(rowsUpdatedAt + 1, now)`` and moves
``rowsUpdatedAt`` there, so stamps are strictly increasing. Which rows exist and at which version is a version
map (sorted, disjoint seq ranges, see ``RowVersions``): an ``:updated_at`` filter selects the entries whose
*current* stamp matches, which after revisions is several disjoint ranges, paged by ``$offset``/``$limit`` in
``:id`` order as one list. Without revisions or deletions the map has one entry per publish, so the common case
costs what a single contiguous range did. A deletion itself has no rows to show: ``:updated_at`` filters never
reveal it (as on Socrata), only counts and ``rowsUpdatedAt`` do.

Admin endpoints (JSON in, JSON out; not logged in the request log, never subject to faults):

* ``POST /admin/publish`` ``{"days": 7, "now": <epoch s, optional>}``
  -> ``{"rowsUpdatedAt", "start_seq", "end_seq", "first_id", "last_id", "published_through"}``
* ``POST /admin/revise`` ``{"start": "YYYY-MM-DD", "stop": "YYYY-MM-DD", "now": <epoch s, optional>}`` (stop
  exclusive; every day must be published and not deleted) -> ``{"rowsUpdatedAt", "revision", "start", "stop",
  "days", "rows", "start_seq", "end_seq", "updated_at", "first_id", "last_id"}``
* ``POST /admin/delete`` ``{"start", "stop", "now"?}`` (same shapes; days already deleted may be inside the range,
  but not only those) -> ``{"rowsUpdatedAt", "start", "stop", "days", "rows" (vanished now), "start_seq",
  "end_seq", "updated_at", "live_rows"}``. Malformed bodies (missing or non-``YYYY-MM-DD`` dates, unknown keys,
  ``start >= stop``, days outside the published history, a non-numeric ``now``) are a 400 naming the problem.
* ``POST /admin/faults`` with any of these keys (unknown keys are a 400, to catch typos):
  ``"fail_next": [{"status": 429, "retry_after": 2, "body": null, "truncate": false}, ...]`` (queued),
  ``"fail_always": {"status": 503, ...}`` or ``null`` to clear, ``"clear": true`` (drop queue and always),
  ``"corrupt": [{"seq": 5, "field": "date", "value": "not-a-date"}]`` (``value: null`` drops the field),
  ``"cash_until": "2024-06-01"`` or ``null``, ``"extra_columns": {"name": "constant" | null}``
  (``null`` removes), ``"after_requests": [{"requests": 2, "publish_days": 7, "faults": {...}}]`` (once the
  next ``requests`` data requests have been answered, publish that many days and/or apply that faults
  document: what changes the upstream *between* the pages of one paging sequence). A document is checked
  whole before any of it applies. Answers the state (as ``GET /admin/state``).
* ``POST /admin/reset`` -> back to the construction state (batches, revisions, deletions, faults, overrides,
  request log).
* ``GET /admin/requests`` -> ``{"requests": [{"method", "path", "params", "app_token", "status"}, ...]}``;
  ``POST /admin/requests/clear`` empties it.
* ``GET /admin/state`` -> history range, ``rows`` (live), batches, ``revisions`` (``[{"revision", "start", "stop",
  "days", "rows", "start_seq", "end_seq", "updated_at"}]``), ``deleted`` (``[{"start", "stop", "days", "rows",
  "start_seq", "end_seq", "updated_at"}]``), pending faults, drift and override summary.

Run it: ``python -m tollwatch_dev.mirror --port 0 --start 2024-01-01 --through 2025-01-01`` prints
``MIRROR_URL=http://127.0.0.1:<port>`` once listening and stops cleanly on SIGTERM/SIGINT. In-process:
``with MirrorServer("qzve-kjga", "2024-01-01", "2024-02-01") as mirror: ... mirror.url, mirror.dataset``.

State across restarts: with ``--state FILE`` (``MirrorServer(..., state_file=...)``) the data changes (publishes,
revisions, deletions, each with its stamp) are written to FILE after every change and replayed on start, so a
restarted mirror serves what it served before, with the same ``:updated_at`` and ``rowsUpdatedAt``. A file
written for other construction parameters (dataset, range, seed, base epoch, cash boundary) is another upstream
and is ignored (then overwritten at the next change). Faults, overrides and the request log are not kept.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import re
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import Any, Self
from urllib.parse import parse_qs, urlsplit

from tollwatch_dev.synthetic import (
    BASE_COLUMNS,
    CASH_COLUMN,
    ROWS_PER_DAY,
    VTOLL_COLUMN,
    SyntheticTable,
    floating_timestamp,
    iso_utc,
    row_id,
)

DEFAULT_DATASET_ID = "qzve-kjga"
DATASET_NAME = "MTA Bridges & Tunnels Hourly Traffic Rates: Beginning 2010"
DEFAULT_HISTORY_START = date(2024, 1, 1)
DEFAULT_PUBLISHED_THROUGH = date(2025, 1, 1)
#: 2026-01-01T00:00:00Z: the initial batch's stamp, fixed so two runs serve identical system fields.
DEFAULT_BASE_EPOCH = 1_767_225_600
DEFAULT_LIMIT = 1000
MAX_LIMIT = 50_000
SYSTEM_FIELDS = (":id", ":created_at", ":updated_at")
#: Bounded so a long-running dev mirror does not grow without limit; tests see far fewer requests.
REQUEST_LOG_SIZE = 10_000
#: Version of the history document (`MirrorDataset.history`, the `--state` file).
HISTORY_VERSION = 1

_COLUMN_TYPES = {
    "plaza_id": "number",
    "date": "calendar_date",
    "hour": "number",
    "direction": "text",
    "vehicles_e_zpass": "number",
    VTOLL_COLUMN: "number",
    CASH_COLUMN: "number",
}
_KNOWN_PARAMS = frozenset({"$select", "$where", "$order", "$group", "$limit", "$offset", "$$app_token"})
_CONDITION = re.compile(r"\s*(?P<field>:updated_at|date|`date`)\s*(?P<op>>=|<=|>|<)\s*'(?P<literal>[^']*)'\s*")
_AND = re.compile(r"\s+and\s+", re.IGNORECASE)
_ORDER_BY_ID = re.compile(r"\s*:id(\s+asc)?\s*", re.IGNORECASE)
_COUNT_ITEM = re.compile(r"count\s*\(\s*\*\s*\)(?P<rest>.*)", re.IGNORECASE | re.DOTALL)
_ALIAS = re.compile(r"\s+as\s+(?P<alias>[A-Za-z_][A-Za-z0-9_]*)\s*", re.IGNORECASE)
_DATE_COLUMN = re.compile(r"\s*(date|`date`)\s*")
_ORDER_BY_DATE = re.compile(r"\s*(date|`date`)(\s+asc)?\s*", re.IGNORECASE)
_DATE_KEY = "date"

#: An extra column's value: a constant, or a function of (seq, row so far); `None` results are omitted.
ExtraValue = Callable[[int, Mapping[str, str]], object] | str | int | float


class QueryError(ValueError):
    """A request the mirror (like Socrata) refuses with 400; `code` mimics Socrata's error codes."""

    def __init__(self, message: str, code: str = "query.compiler.malformed") -> None:
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------------------------------------- value types


@dataclass(frozen=True)
class PublishBatch:
    """Rows `seq` in [start_seq, end_seq) published together at `updated_at` (epoch seconds)."""

    start_seq: int
    end_seq: int
    updated_at: int

    def to_json(self) -> dict[str, int]:
        """Plain JSON shape for the admin API."""
        return asdict(self)


@dataclass(frozen=True)
class RowVersions:
    """Rows `seq` in [start_seq, end_seq) that share their current version.

    `created_at` is the stamp of the publish that first served them (Socrata keeps `:created_at` and `:id`
    across updates), `updated_at` the stamp of their current version, `revisions` how many upstream
    corrections they went through (0: as first published). The dataset's version map is a sorted tuple of
    these, disjoint, with gaps where rows were deleted: it is what `:updated_at` filters and paging read.
    """

    start_seq: int
    end_seq: int
    created_at: int
    updated_at: int
    revisions: int = 0


@dataclass(frozen=True)
class Revision:
    """An upstream correction: every row dated in [start, stop) got a new version stamped `updated_at`
    (same `:id` and `:created_at`, new values); `number` counts revisions since construction or reset."""

    number: int
    start: date
    stop: date
    start_seq: int
    end_seq: int
    updated_at: int

    def to_json(self) -> dict[str, Any]:
        """Plain JSON shape for the admin API."""
        return {
            "revision": self.number,
            "start": self.start.isoformat(),
            "stop": self.stop.isoformat(),
            "days": (self.stop - self.start).days,
            "rows": self.end_seq - self.start_seq,
            "start_seq": self.start_seq,
            "end_seq": self.end_seq,
            "updated_at": self.updated_at,
        }


@dataclass(frozen=True)
class Deletion:
    """Rows dated in [start, stop) removed upstream at `updated_at`; `rows` is how many vanished then (days
    deleted earlier are not counted twice). Their seqs stay unused, so other rows keep their `:id`."""

    start: date
    stop: date
    start_seq: int
    end_seq: int
    rows: int
    updated_at: int

    def to_json(self) -> dict[str, Any]:
        """Plain JSON shape for the admin API."""
        return {
            "start": self.start.isoformat(),
            "stop": self.stop.isoformat(),
            "days": (self.stop - self.start).days,
            "rows": self.rows,
            "start_seq": self.start_seq,
            "end_seq": self.end_seq,
            "updated_at": self.updated_at,
        }


@dataclass(frozen=True)
class FailSpec:
    """One injected failure: an HTTP status (with optional Retry-After and body) or a truncated 200."""

    status: int = 500
    retry_after: float | None = None
    body: str | None = None
    truncate: bool = False

    @classmethod
    def parse(cls, raw: FailSpec | Mapping[str, Any] | int) -> FailSpec:
        """Accept a FailSpec, a bare status, or the admin JSON shape; reject anything malformed early."""
        if isinstance(raw, FailSpec):
            return raw
        if isinstance(raw, int) and not isinstance(raw, bool):
            raw = {"status": raw}
        if not isinstance(raw, Mapping):
            raise ValueError(f"a failure must be an object or a status code, got {raw!r}")
        unknown = set(raw) - {"status", "retry_after", "body", "truncate"}
        if unknown:
            raise ValueError(f"unknown failure keys: {sorted(unknown)}")
        truncate = bool(raw.get("truncate", False))
        status = int(raw.get("status", 200 if truncate else 500))
        if not 100 <= status <= 599:
            raise ValueError(f"status must be an HTTP status code, got {status}")
        retry_after = raw.get("retry_after")
        body = raw.get("body")
        return cls(
            status=status,
            retry_after=None if retry_after is None else float(retry_after),
            body=None if body is None else str(body),
            truncate=truncate,
        )

    def to_json(self) -> dict[str, Any]:
        """Plain JSON shape for the admin API."""
        return asdict(self)


@dataclass(frozen=True)
class RequestRecord:
    """What a client sent, so tests can assert on paging parameters and the app token."""

    method: str
    path: str
    params: dict[str, str]
    app_token: str | None
    status: int

    def to_json(self) -> dict[str, Any]:
        """Plain JSON shape for the admin API."""
        return asdict(self)


@dataclass(frozen=True)
class ScheduledChange:
    """A change of the upstream that waits for `requests` more data requests to be answered, then happens once.

    Why: a real publish can land while a client is paging. Firing on the request count (just before the
    triggering response is written) makes "after the first page was served" exact for a sequential client.
    """

    requests: int
    publish_days: int | None = None
    faults: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, raw: ScheduledChange | Mapping[str, Any]) -> ScheduledChange:
        """Accept a ScheduledChange or the admin JSON shape; the nested faults document is checked now."""
        if isinstance(raw, ScheduledChange):
            return raw
        if not isinstance(raw, Mapping):
            raise ValueError(f"after_requests items must be objects, got {raw!r}")
        unknown = set(raw) - {"requests", "publish_days", "faults"}
        if unknown:
            raise ValueError(f"unknown after_requests keys: {sorted(unknown)}")
        requests = int(raw.get("requests", 0))
        if requests < 1:
            raise ValueError(f"after_requests needs requests >= 1, got {requests}")
        days = raw.get("publish_days")
        if days is not None and int(days) < 1:
            raise ValueError(f"publish_days must be >= 1, got {days}")
        faults = raw.get("faults") or {}
        if not isinstance(faults, Mapping):
            raise ValueError("after_requests faults must be a faults document (an object)")
        check_admin_faults(faults)
        if days is None and not faults:
            raise ValueError("after_requests items need publish_days or faults (or both)")
        return cls(requests=requests, publish_days=None if days is None else int(days), faults=dict(faults))

    def to_json(self) -> dict[str, Any]:
        """Plain JSON shape for the admin API."""
        return {"requests": self.requests, "publish_days": self.publish_days, "faults": dict(self.faults)}


@dataclass(frozen=True)
class Selection:
    """Resolved `$select`: whether system fields are needed and, if not everything, which keys to keep."""

    system: bool = False
    keep: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Condition:
    """One `$where` comparison; `literal` is a naive UTC datetime."""

    field: str
    op: str
    literal: datetime


@dataclass(frozen=True)
class DataQuery:
    """A parsed `/resource` request."""

    select_items: tuple[str, ...] = ("*",)
    conditions: tuple[Condition, ...] = ()
    limit: int = DEFAULT_LIMIT
    offset: int = 0


@dataclass(frozen=True)
class CountQuery:
    """A parsed aggregate `/resource` request: `count(*)` alone, or per `date` (`$group=date`).

    `keys` are the answer's keys in `$select` order: the count's alias (`count` without one) and, when
    grouped, `date`. `$limit`/`$offset` page the answer's objects, as on Socrata.
    """

    count_key: str
    keys: tuple[str, ...]
    conditions: tuple[Condition, ...] = ()
    limit: int = DEFAULT_LIMIT
    offset: int = 0

    @property
    def by_date(self) -> bool:
        """Whether the answer has one object per date rather than one in all."""
        return _DATE_KEY in self.keys


@dataclass(frozen=True)
class _Snapshot:
    """Everything a read needs, captured at once so a concurrent publish never tears a page."""

    table: SyntheticTable
    extent: int  # seqs [0, extent) have been published (some may be deleted since)
    versions: tuple[RowVersions, ...]
    version_starts: tuple[int, ...]  # `start_seq` of each entry of `versions`, for bisect
    overrides: Mapping[int, Mapping[str, str | None]]
    extras: Mapping[str, ExtraValue]
    user_columns: tuple[str, ...]


# ---------------------------------------------------------------------------------------------- parsing


def as_date(value: date | str) -> date:
    """Dates arrive as `date` objects from Python and as ISO strings from the CLI and admin JSON."""
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    return date.fromisoformat(str(value)[:10])


def parse_timestamp(text: str) -> datetime:
    """A SoQL timestamp literal as naive UTC (with or without `Z`, millis or a bare date)."""
    try:
        parsed = datetime.fromisoformat(text.strip())
    except ValueError as exc:
        raise QueryError(f"invalid timestamp literal '{text}'", "query.soql.type-mismatch") from exc
    if parsed.tzinfo is not None:
        parsed = parsed.astimezone(UTC).replace(tzinfo=None)
    return parsed


def _drop_parentheses(text: str) -> str:
    """In a pure conjunction grouping changes nothing, so balanced parentheses (outside quotes) can go."""
    out, depth, quoted = [], 0, False
    for char in text:
        if char == "'":
            quoted = not quoted
        elif not quoted and char in "()":
            depth += 1 if char == "(" else -1
            if depth < 0:
                break
            char = " "
        out.append(char)
    if depth != 0:
        raise QueryError(f"unbalanced parentheses in $where '{text}'")
    return "".join(out)


def parse_where(text: str) -> tuple[Condition, ...]:
    """A conjunction of `date`/`:updated_at` comparisons; anything else is refused, not half-understood."""
    stripped = _drop_parentheses(text).strip()
    if not stripped:
        return ()
    conditions = []
    for part in _AND.split(stripped):
        match = _CONDITION.fullmatch(part)
        if match is None:
            raise QueryError(
                f"Could not parse $where near '{part.strip()}': the mirror supports only AND-ed comparisons "
                "of date or :updated_at (>=, >, <, <=) with a quoted timestamp"
            )
        field_name = match["field"].strip("`")
        conditions.append(Condition(field_name, match["op"], parse_timestamp(match["literal"])))
    return tuple(conditions)


def _parse_int(name: str, raw: str, maximum: int | None = None) -> int:
    """Strict non-negative integer parameter (Socrata refuses `abc`, `-1`, `1.5`)."""
    if not raw.strip().isdigit():
        raise QueryError(f"{name} must be a non-negative integer, got '{raw}'", "query.soql.invalid-paging")
    value = int(raw)
    if maximum is not None and value > maximum:
        raise QueryError(f"{name} must be at most {maximum}, got {value}", "query.soql.invalid-paging")
    return value


def parse_query(params: Mapping[str, str]) -> DataQuery | CountQuery:
    """Validate SODA parameters; everything the mirror cannot honour exactly is a 400, never ignored.

    A `$group`, or a function call in `$select`, makes it an aggregate query (`CountQuery`).
    """
    for name in params:
        if name.startswith("$") and name not in _KNOWN_PARAMS:
            raise QueryError(f"Unrecognized arguments [{name}]", "query.soql.unknown-parameter")
        if not name.startswith("$"):
            raise QueryError(
                f"simple filter '{name}' is not supported by the mirror; use $where", "query.soql.unsupported"
            )
    items = tuple(item.strip() for item in params.get("$select", "*").split(","))
    if not all(items):
        raise QueryError(f"empty item in $select '{params['$select']}'")
    conditions = parse_where(params.get("$where", ""))
    limit = _parse_int("$limit", params.get("$limit", str(DEFAULT_LIMIT)), MAX_LIMIT)
    offset = _parse_int("$offset", params.get("$offset", "0"))
    if "$group" in params or any("(" in item for item in items):
        return _parse_count(items, params.get("$group"), params.get("$order"), conditions, limit, offset)
    order = params.get("$order")
    if order is not None and _ORDER_BY_ID.fullmatch(order) is None:
        raise QueryError(f"the mirror supports only $order=:id, got '{order}'", "query.soql.unsupported")
    return DataQuery(select_items=items, conditions=conditions, limit=limit, offset=offset)


def _parse_count(
    items: tuple[str, ...],
    group: str | None,
    order: str | None,
    conditions: tuple[Condition, ...],
    limit: int,
    offset: int,
) -> CountQuery:
    """The aggregate shapes tollwatch sends: `$select=count(*) [AS n]`, and `$select=date, count(*) [AS n]`
    with `$group=date` (optionally `$order=date [asc]`). Any other aggregate is refused with the reason, so a
    client never reconciles against a number the mirror only pretended to compute."""
    unsupported = "query.soql.unsupported"
    if group is not None and _DATE_COLUMN.fullmatch(group) is None:
        raise QueryError(f"the mirror groups only by date, got $group='{group}'", unsupported)
    count_key: str | None = None
    keys: list[str] = []
    for item in items:
        count = _COUNT_ITEM.fullmatch(item)
        if count is not None:
            alias = _ALIAS.fullmatch(count["rest"]) if count["rest"].strip() else None
            if count["rest"].strip() and alias is None:
                raise QueryError(f"could not parse '{item}': write count(*) or count(*) AS <name>")
            if count_key is not None:
                raise QueryError(f"the mirror supports one count(*) per query, got $select '{', '.join(items)}'")
            count_key = alias["alias"] if alias else "count"
            keys.append(count_key)
        elif _DATE_COLUMN.fullmatch(item):
            if _DATE_KEY in keys:
                raise QueryError("date is selected twice")
            keys.append(_DATE_KEY)
        elif "(" in item:
            raise QueryError(f"the mirror supports only count(*) among aggregate functions, got '{item}'", unsupported)
        else:
            raise QueryError(f"with count(*) the mirror selects only date (grouped by date), got '{item}'", unsupported)
    if count_key is None:
        raise QueryError("$group without count(*) is not supported by the mirror: select count(*) [AS name]")
    if keys.count(count_key) > 1:
        raise QueryError(f"the alias '{count_key}' collides with the date column")
    by_date = _DATE_KEY in keys
    if by_date and group is None:
        raise QueryError("date is selected beside count(*) but not grouped: add $group=date", "query.soql.no-group")
    if group is not None and not by_date:
        raise QueryError("$group=date needs date in $select: the mirror answers per-date counts with their date")
    if order is not None and (not by_date or _ORDER_BY_DATE.fullmatch(order) is None):
        raise QueryError(
            f"on counts the mirror supports only $order=date (ascending, per-date counts), got '{order}'", unsupported
        )
    return CountQuery(count_key, tuple(keys), conditions, limit, offset)


def resolve_select(items: tuple[str, ...], user_columns: tuple[str, ...]) -> Selection:
    """Expand `*` / `:*` / names into the keys to serve; `*` alone (the common case) needs no projection."""
    if items == ("*",):
        return Selection()
    keep: list[str] = []
    for item in items:
        if item == "*":
            expanded: Iterable[str] = user_columns
        elif item == ":*":
            expanded = SYSTEM_FIELDS
        elif item in user_columns or item in SYSTEM_FIELDS:
            expanded = (item,)
        else:
            raise QueryError(f"No such column: {item}", "query.soql.no-such-column")
        keep.extend(name for name in expanded if name not in keep)
    system = any(name.startswith(":") for name in keep)
    everything = set(keep) == set(SYSTEM_FIELDS) | set(user_columns)
    return Selection(system=system, keep=None if everything else tuple(keep))


# ---------------------------------------------------------------------------------------------- ranges


def _day_range(start: date, days: int, condition: Condition) -> tuple[int, int]:
    """Day indices [lo, hi) whose midnight satisfies a `date` comparison (rows are in date order)."""
    delta = condition.literal - datetime.combine(start, datetime.min.time())
    whole = delta.days  # floor, also for negative deltas
    ceil = whole + (1 if delta - timedelta(days=whole) > timedelta(0) else 0)
    bounds = {">=": (ceil, days), ">": (whole + 1, days), "<": (0, ceil), "<=": (0, whole + 1)}
    lo, hi = bounds[condition.op]
    return min(max(lo, 0), days), min(max(hi, 0), days)


_COMPARE: dict[str, Callable[[float, float], bool]] = {
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
}

#: Rows [lo, hi) of one `RowVersions` entry (lo/hi are seqs inside it).
Piece = tuple[int, int, RowVersions]


def _replace_versions(
    versions: tuple[RowVersions, ...], lo: int, hi: int, change: Callable[[RowVersions], RowVersions | None]
) -> tuple[RowVersions, ...]:
    """The version map with `change` applied to the rows in [lo, hi) (`None` deletes them); rows outside
    keep their entries, split at `lo`/`hi` where an entry straddles them."""
    out: list[RowVersions] = []
    for entry in versions:
        if entry.end_seq <= lo or entry.start_seq >= hi:
            out.append(entry)
            continue
        if entry.start_seq < lo:
            out.append(replace(entry, end_seq=lo))
        inside = change(replace(entry, start_seq=max(entry.start_seq, lo), end_seq=min(entry.end_seq, hi)))
        if inside is not None:
            out.append(inside)
        if entry.end_seq > hi:
            out.append(replace(entry, start_seq=hi))
    return tuple(out)


def _gaps(versions: tuple[RowVersions, ...], lo: int, hi: int) -> list[tuple[int, int]]:
    """The parts of [lo, hi) no version-map entry covers (deleted rows, or rows never published)."""
    gaps: list[tuple[int, int]] = []
    cursor = lo
    for entry in versions:
        if entry.end_seq <= cursor:
            continue
        if entry.start_seq >= hi:
            break
        if entry.start_seq > cursor:
            gaps.append((cursor, entry.start_seq))
        cursor = entry.end_seq
    if cursor < hi:
        gaps.append((cursor, hi))
    return gaps


def _matching_pieces(snap: _Snapshot, conditions: tuple[Condition, ...], history_start: date) -> list[Piece]:
    """The rows a `$where` selects, as sorted disjoint seq ranges (in `:id` order).

    `date` conditions narrow one contiguous seq window (rows are in date order); `:updated_at` conditions
    keep the version-map entries whose current stamp matches. Without revisions or deletions the map has one
    entry per publish, so this costs what one contiguous range did: O(batches), independent of row count.
    """
    lo, hi = 0, snap.extent
    days = snap.extent // ROWS_PER_DAY
    stamp_tests: list[tuple[Callable[[float, float], bool], float]] = []
    for condition in conditions:
        if condition.field == "date":
            day_lo, day_hi = _day_range(history_start, days, condition)
            lo, hi = max(lo, day_lo * ROWS_PER_DAY), min(hi, day_hi * ROWS_PER_DAY)
        else:
            stamp_tests.append((_COMPARE[condition.op], condition.literal.replace(tzinfo=UTC).timestamp()))
    pieces: list[Piece] = []
    if lo >= hi:
        return pieces
    versions = snap.versions
    for index in range(max(bisect.bisect_right(snap.version_starts, lo) - 1, 0), len(versions)):
        entry = versions[index]
        if entry.start_seq >= hi:
            break
        if all(test(entry.updated_at, threshold) for test, threshold in stamp_tests):
            first, last = max(entry.start_seq, lo), min(entry.end_seq, hi)
            if first < last:
                pieces.append((first, last, entry))
    return pieces


def _page(pieces: Iterable[Piece], offset: int, limit: int) -> list[Piece]:
    """`$offset`/`$limit` applied across disjoint pieces, as if they were one list of rows."""
    page: list[Piece] = []
    skip, room = offset, limit
    for lo, hi, entry in pieces:
        if room <= 0:
            break
        if skip >= hi - lo:
            skip -= hi - lo
            continue
        first = lo + skip
        last = min(hi, first + room)
        skip, room = 0, room - (last - first)
        page.append((first, last, entry))
    return page


# ---------------------------------------------------------------------------------------------- dataset


class MirrorDataset:
    """The mutable state of one mirrored dataset: publish history, faults, overrides and request log.

    Readers take an immutable snapshot under the lock and render outside it; writers replace structures
    rather than mutating them (copy-on-write), so pages stay consistent under `ThreadingHTTPServer`.
    """

    def __init__(
        self,
        dataset_id: str = DEFAULT_DATASET_ID,
        start: date | str = DEFAULT_HISTORY_START,
        through: date | str = DEFAULT_PUBLISHED_THROUGH,
        *,
        seed: int = 42,
        cash_until: date | str | None = None,
        base_epoch: int = DEFAULT_BASE_EPOCH,
        name: str = DATASET_NAME,
    ) -> None:
        self.dataset_id = dataset_id
        self.name = name
        self.history_start = as_date(start)
        self.seed = seed
        self.base_epoch = base_epoch
        self._initial_through = as_date(through)
        self._initial_cash_until = None if cash_until is None else as_date(cash_until)
        if self._initial_through < self.history_start:
            raise ValueError(f"published_through {through} is before history start {start}")
        self._lock = threading.Lock()
        #: Called with `history()` after every data change, under the lock (so calls come in change order).
        self.on_change: Callable[[dict[str, Any]], None] | None = None
        self._initialise()

    def _initialise(self) -> None:
        """(Re)build the construction state; shared by `__init__` and `reset` so they cannot diverge."""
        self._table = SyntheticTable(self.history_start, self.seed, self._initial_cash_until)
        self._days = (self._initial_through - self.history_start).days
        initial_rows = self._days * ROWS_PER_DAY
        self._batches: tuple[PublishBatch, ...] = (
            (PublishBatch(0, initial_rows, self.base_epoch),) if initial_rows else ()
        )
        first = tuple(RowVersions(b.start_seq, b.end_seq, b.updated_at, b.updated_at) for b in self._batches)
        self._set_versions(first)
        #: Socrata moves `rowsUpdatedAt` on every data change (publish, revision, deletion): one clock for all.
        self._rows_updated_at = self.base_epoch
        self._revisions: tuple[Revision, ...] = ()
        self._deletions: tuple[Deletion, ...] = ()
        #: Every data change since construction, in order, as `history()` lists them (what `replay` re-applies).
        self._changes: tuple[dict[str, Any], ...] = ()
        self._schema_changed_at = self.base_epoch
        self._overrides: dict[int, dict[str, str | None]] = {}
        self._extras: dict[str, ExtraValue] = {}
        self._fail_queue: deque[FailSpec] = deque()
        self._fail_always: FailSpec | None = None
        self._scheduled: tuple[ScheduledChange, ...] = ()
        self._requests: deque[RequestRecord] = deque(maxlen=REQUEST_LOG_SIZE)

    # ------------------------------------------------------------------ read-only views

    @property
    def published_through(self) -> date:
        """Exclusive end date of published rows."""
        return self.history_start + timedelta(days=self._days)

    @property
    def total_rows(self) -> int:
        """Rows currently published (deleted rows excluded)."""
        return self._live_rows

    @property
    def extent(self) -> int:
        """Seqs ever published: [0, extent). Deleted rows keep their seq, so other rows keep their `:id`."""
        return self._days * ROWS_PER_DAY

    @property
    def versions(self) -> tuple[RowVersions, ...]:
        """The version map: which rows exist and at which version, sorted by seq (see `RowVersions`)."""
        return self._versions

    @property
    def batches(self) -> tuple[PublishBatch, ...]:
        """Publish history, oldest first."""
        return self._batches

    @property
    def revisions(self) -> tuple[Revision, ...]:
        """Revisions since construction or reset, oldest first."""
        return self._revisions

    @property
    def deletions(self) -> tuple[Deletion, ...]:
        """Deletions since construction or reset, oldest first."""
        return self._deletions

    @property
    def rows_updated_at(self) -> int:
        """Socrata's `rowsUpdatedAt`: the stamp of the newest data change (the base epoch before any)."""
        return self._rows_updated_at

    @property
    def cash_until(self) -> date | None:
        """Rows dated before this carry `vehicles_cash` instead of `vehicles_vtoll`."""
        return self._table.cash_until

    @property
    def requests(self) -> list[RequestRecord]:
        """Copy of the request log (data and metadata requests, oldest first)."""
        with self._lock:
            return list(self._requests)

    def seq_of(self, day: date | str, plaza_id: int, hour: int, direction: str) -> int:
        """Sequence number of a row, e.g. to `corrupt` it."""
        return self._table.seq_of(as_date(day), plaza_id, hour, direction)

    def user_columns(self) -> tuple[str, ...]:
        """Columns the published rows can carry, in Socrata's listing order (drift and extras included)."""
        with self._lock:
            return self._user_columns()

    def _user_columns(self) -> tuple[str, ...]:
        """`user_columns` for a caller holding the lock."""
        cash, through = self._table.cash_until, self.published_through
        columns = [c for c in BASE_COLUMNS if c != VTOLL_COLUMN or cash is None or cash < through]
        if cash is not None and cash > self.history_start:
            columns.append(CASH_COLUMN)
        columns.extend(name for name in self._extras if name not in columns)
        return tuple(columns)

    def metadata(self) -> dict[str, Any]:
        """The `/api/views/{id}.json` document (the subset Socrata clients rely on)."""
        with self._lock:
            user_columns, rows_updated_at = self._user_columns(), self.rows_updated_at
            view_modified = max(rows_updated_at, self._schema_changed_at)
        columns = [
            {
                "id": index + 1,
                "name": name,
                "fieldName": name,
                "dataTypeName": _COLUMN_TYPES.get(name, "text"),
                "position": index + 1,
            }
            for index, name in enumerate(user_columns)
        ]
        return {
            "id": self.dataset_id,
            "name": self.name,
            "assetType": "dataset",
            "createdAt": self.base_epoch,
            "rowsUpdatedAt": rows_updated_at,
            "viewLastModified": view_modified,
            "columns": columns,
        }

    def state(self) -> dict[str, Any]:
        """Summary for `GET /admin/state` and admin answers."""
        with self._lock:
            return {
                "dataset": self.dataset_id,
                "history_start": self.history_start.isoformat(),
                "published_through": self.published_through.isoformat(),
                "rows": self.total_rows,
                "rowsUpdatedAt": self.rows_updated_at,
                "batches": [b.to_json() for b in self._batches],
                "revisions": [r.to_json() for r in self._revisions],
                "deleted": [d.to_json() for d in self._deletions],
                "pending_failures": [f.to_json() for f in self._fail_queue],
                "fail_always": None if self._fail_always is None else self._fail_always.to_json(),
                "cash_until": None if self.cash_until is None else self.cash_until.isoformat(),
                "extra_columns": list(self._extras),
                "corrupted_rows": sorted(self._overrides),
                "after_requests": [change.to_json() for change in self._scheduled],
            }

    # ------------------------------------------------------------------ publishing and overrides

    def publish(self, days: int = 7, now: float | None = None) -> PublishBatch:
        """Append the next `days` days as one batch stamped `max(previous + 1, now)`.

        Strictly increasing stamps keep `:updated_at > watermark` an exact "what's new" query.
        """
        if days < 1:
            raise ValueError(f"days must be >= 1, got {days}")
        wall = time.time() if now is None else now
        with self._lock:
            stamp = self._next_stamp(wall)
            batch = PublishBatch(self.extent, self.extent + days * ROWS_PER_DAY, stamp)
            self._batches = (*self._batches, batch)
            self._set_versions((*self._versions, RowVersions(batch.start_seq, batch.end_seq, stamp, stamp)))
            self._days += days
            self._changed({"change": "publish", "days": days, "at": stamp})
        return batch

    def revise(self, start: date | str, stop: date | str, now: float | None = None) -> Revision:
        """Give every row dated in [start, stop) a new version, like an upstream correction of existing rows.

        The rows keep `:id` and `:created_at`; `:updated_at` becomes a new stamp taken like a publish's
        (`max(rowsUpdatedAt + 1, now)`, so `rowsUpdatedAt` moves to it) and `vehicles_e_zpass` grows by one per
        revision of that row (`synthetic.revised_ezpass`). Every day in the range must exist: revising a day
        that is not published or was deleted is a ValueError (a 400 over HTTP), because a test that thinks it
        corrected rows which are not there would assert on nothing.
        """
        first, last = as_date(start), as_date(stop)
        wall = time.time() if now is None else now
        with self._lock:
            lo, hi = self._seq_span(first, last)
            gone = _gaps(self._versions, lo, hi)
            if gone:
                raise ValueError(
                    f"cannot revise [{first}, {last}): {self._describe_days(gone)} deleted; "
                    "the mirror revises only rows that exist"
                )
            stamp = self._next_stamp(wall)
            revision = Revision(len(self._revisions) + 1, first, last, lo, hi, stamp)
            self._set_versions(
                _replace_versions(
                    self._versions, lo, hi, lambda e: replace(e, updated_at=stamp, revisions=e.revisions + 1)
                )
            )
            self._revisions = (*self._revisions, revision)
            self._changed({"change": "revise", "start": first.isoformat(), "stop": last.isoformat(), "at": stamp})
        return revision

    def delete_days(self, start: date | str, stop: date | str, now: float | None = None) -> Deletion:
        """Remove every row dated in [start, stop) from all data and count queries, like an upstream deletion.

        Other rows keep their seq and `:id`; `rowsUpdatedAt` moves like a publish (Socrata moves it on any data
        change); later publishes still append after `published_through`. Days already deleted may be part of
        the range, but a range with nothing left to delete is a ValueError (a 400 over HTTP).
        """
        first, last = as_date(start), as_date(stop)
        wall = time.time() if now is None else now
        with self._lock:
            lo, hi = self._seq_span(first, last)
            vanishing = (hi - lo) - sum(b - a for a, b in _gaps(self._versions, lo, hi))
            if vanishing == 0:
                raise ValueError(f"nothing to delete: every day in [{first}, {last}) is already deleted")
            stamp = self._next_stamp(wall)
            deletion = Deletion(first, last, lo, hi, vanishing, stamp)
            self._set_versions(_replace_versions(self._versions, lo, hi, lambda e: None))
            self._deletions = (*self._deletions, deletion)
            self._changed({"change": "delete", "start": first.isoformat(), "stop": last.isoformat(), "at": stamp})
        return deletion

    def _seq_span(self, first: date, last: date) -> tuple[int, int]:
        """Seqs of the days [first, last), which must be a non-empty part of the published days."""
        if first >= last:
            raise ValueError(f"start must be before stop, got [{first}, {last})")
        if first < self.history_start or last > self.published_through:
            raise ValueError(
                f"[{first}, {last}) is not within the published days [{self.history_start}, {self.published_through})"
            )
        return (first - self.history_start).days * ROWS_PER_DAY, (last - self.history_start).days * ROWS_PER_DAY

    def _describe_days(self, spans: Iterable[tuple[int, int]]) -> str:
        """Seq spans (whole days) as `[start, stop)` date ranges, for error messages."""
        day = self._table.day
        return ", ".join(f"[{day(lo // ROWS_PER_DAY)}, {day(-(-hi // ROWS_PER_DAY))})" for lo, hi in spans)

    def _next_stamp(self, wall: float) -> int:
        """Stamp a data change `max(rowsUpdatedAt + 1, wall)` and move `rowsUpdatedAt` to it (caller holds the
        lock). Strictly increasing, whatever the clock says, so every change has its own `:updated_at`."""
        self._rows_updated_at = max(self._rows_updated_at + 1, int(wall))
        return self._rows_updated_at

    def _changed(self, change: dict[str, Any]) -> None:
        """Record a data change and report the new history (caller holds the lock)."""
        self._changes = (*self._changes, change)
        if self.on_change is not None:
            self.on_change(self._history())

    # ------------------------------------------------------------------ history (state across restarts)

    def history(self) -> dict[str, Any]:
        """The construction parameters and every data change since, enough for `replay` to rebuild the rows,
        versions and stamps: ``{"version", "dataset", "history_start", "initial_published_through", "seed",
        "base_epoch", "cash_until" (initial), "changes": [{"change": "publish", "days", "at"} | {"change":
        "revise" | "delete", "start", "stop", "at"}, ...]}`` (``at``: the change's stamp)."""
        with self._lock:
            return self._history()

    def _history(self) -> dict[str, Any]:
        return {**self._identity(), "changes": [dict(change) for change in self._changes]}

    def _identity(self) -> dict[str, Any]:
        return {
            "version": HISTORY_VERSION,
            "dataset": self.dataset_id,
            "history_start": self.history_start.isoformat(),
            "initial_published_through": self._initial_through.isoformat(),
            "seed": self.seed,
            "base_epoch": self.base_epoch,
            "cash_until": None if self._initial_cash_until is None else self._initial_cash_until.isoformat(),
        }

    def replay(self, document: Mapping[str, Any]) -> bool:
        """Re-apply a `history()` document's changes to a dataset in its construction state, with their own
        stamps. False (and nothing changed) if it was written for other construction parameters; ValueError if
        it is malformed or its stamps do not replay (each change must be newer than the one before)."""
        identity = {key: document.get(key) for key in self._identity()}
        if identity != self._identity():
            return False
        if self._changes:
            raise ValueError("replay needs a dataset in its construction state")
        for change in document.get("changes", []):
            kind, at = change.get("change"), change.get("at")
            if not isinstance(at, int):
                raise ValueError(f"history change without an integer stamp: {change!r}")
            if kind == "publish":
                stamp = self.publish(int(change["days"]), now=at).updated_at
            elif kind == "revise":
                stamp = self.revise(change["start"], change["stop"], now=at).updated_at
            elif kind == "delete":
                stamp = self.delete_days(change["start"], change["stop"], now=at).updated_at
            else:
                raise ValueError(f"unknown history change {kind!r}")
            if stamp != at:
                raise ValueError(f"history change {change!r} replayed with stamp {stamp}: stamps must increase")
        return True

    def _set_versions(self, versions: tuple[RowVersions, ...]) -> None:
        """Replace the version map and what is derived from it (caller holds the lock, or is initialising)."""
        self._versions = versions
        self._version_starts = tuple(entry.start_seq for entry in versions)
        self._live_rows = sum(entry.end_seq - entry.start_seq for entry in versions)

    def corrupt(self, seq: int, field_name: str, value: str | None) -> None:
        """Serve `value` verbatim for one field of one row (`None` drops the field, as Socrata omits nulls)."""
        if seq < 0:
            raise ValueError(f"seq must be >= 0, got {seq}")
        with self._lock:
            overrides = dict(self._overrides)
            overrides[seq] = {**overrides.get(seq, {}), field_name: None if value is None else str(value)}
            self._overrides = overrides

    def set_cash_until(self, cash_until: date | str | None) -> None:
        """Switch the schema-drift boundary: rows dated before it carry `vehicles_cash`."""
        with self._lock:
            new = None if cash_until is None else as_date(cash_until)
            self._table = SyntheticTable(self.history_start, self.seed, new)
            self._touch_schema()

    def extra_column(self, name: str, value: ExtraValue | None) -> None:
        """Add a column to every row (constant or `fn(seq, row)`); `None` removes it again."""
        _check_extra_column_name(name)
        with self._lock:
            extras: dict[str, ExtraValue] = dict(self._extras)
            if value is None:
                extras.pop(name, None)
            else:
                extras[name] = value
            self._extras = extras
            self._touch_schema()

    def _touch_schema(self) -> None:
        """Move `viewLastModified` on schema changes, as Socrata does (caller holds the lock)."""
        self._schema_changed_at = max(self._schema_changed_at + 1, int(time.time()))

    # ------------------------------------------------------------------ faults and request log

    def fail_next(self, failures: Iterable[FailSpec | Mapping[str, Any] | int]) -> None:
        """Queue failures for the next data requests, consumed one per request in order."""
        parsed = [FailSpec.parse(item) for item in failures]
        with self._lock:
            self._fail_queue.extend(parsed)

    def fail_always(self, failure: FailSpec | Mapping[str, Any] | int | None) -> None:
        """Make every data request fail (after the queue is drained); `None` clears it."""
        parsed = None if failure is None else FailSpec.parse(failure)
        with self._lock:
            self._fail_always = parsed

    def clear_faults(self) -> None:
        """Drop queued failures, `fail_always` and scheduled changes."""
        with self._lock:
            self._fail_queue.clear()
            self._fail_always = None
            self._scheduled = ()

    def after_requests(
        self, requests: int, *, publish_days: int | None = None, faults: Mapping[str, Any] | None = None
    ) -> None:
        """Once `requests` more data requests have been answered, publish `publish_days` days and/or apply
        `faults` (an `/admin/faults` document), e.g. "publish while the client is between page 1 and page 2"."""
        change = ScheduledChange.parse({"requests": requests, "publish_days": publish_days, "faults": faults or {}})
        with self._lock:
            self._scheduled = (*self._scheduled, change)

    def take_fault(self) -> FailSpec | None:
        """The failure to apply to the current data request, if any (consumes one queued failure)."""
        with self._lock:
            if self._fail_queue:
                return self._fail_queue.popleft()
            return self._fail_always

    def record_request(self, record: RequestRecord) -> None:
        """Append to the request log; a data request also counts down the scheduled changes.

        The handler records a request just before writing its response, so a change this request makes due
        is in place before the client can send its next request.
        """
        due: list[ScheduledChange] = []
        with self._lock:
            self._requests.append(record)
            if self._scheduled and record.path.startswith("/resource/"):
                waiting = []
                for change in self._scheduled:
                    counted = ScheduledChange(change.requests - 1, change.publish_days, change.faults)
                    (due if counted.requests <= 0 else waiting).append(counted)
                self._scheduled = tuple(waiting)
        for change in due:
            if change.publish_days is not None:
                self.publish(change.publish_days)
            if change.faults:
                apply_admin_faults(self, change.faults)

    def clear_requests(self) -> None:
        """Empty the request log (e.g. between test phases)."""
        with self._lock:
            self._requests.clear()

    def reset(self) -> None:
        """Back to the construction state: initial batch only, no revisions, deletions, faults, overrides,
        extras or log."""
        with self._lock:
            self._initialise()
            if self.on_change is not None:
                self.on_change(self._history())

    # ------------------------------------------------------------------ queries

    def _snapshot(self) -> _Snapshot:
        with self._lock:
            return _Snapshot(
                self._table,
                self.extent,
                self._versions,
                self._version_starts,
                self._overrides,
                self._extras,
                self._user_columns(),
            )

    def query(self, params: Mapping[str, str]) -> list[dict[str, str]]:
        """Rows for SODA parameters, in `:id` order; raises `QueryError` for what Socrata would refuse."""
        parsed = parse_query(params)
        snap = self._snapshot()
        if isinstance(parsed, CountQuery):
            return self._count(snap, parsed)
        selection = resolve_select(parsed.select_items, snap.user_columns)
        pieces = _matching_pieces(snap, parsed.conditions, self.history_start)
        return list(self._render(snap, _page(pieces, parsed.offset, parsed.limit), selection))

    def _count(self, snap: _Snapshot, parsed: CountQuery) -> list[dict[str, str]]:
        """A count query's answer, from the same pieces the data query pages through (so they agree by
        construction): O(version-map entries) for `count(*)`, O(days) per date, no row is rendered."""
        pieces = _matching_pieces(snap, parsed.conditions, self.history_start)
        if not parsed.by_date:
            answer = [{parsed.count_key: str(sum(hi - lo for lo, hi, _ in pieces))}]
        else:
            answer = []
            for served, count in _counts_by_served_date(snap, pieces):
                values = {_DATE_KEY: served, parsed.count_key: str(count)}
                answer.append({key: values[key] for key in parsed.keys if values[key] is not None})
        return answer[parsed.offset : parsed.offset + parsed.limit]

    def _render(self, snap: _Snapshot, pieces: Iterable[Piece], selection: Selection) -> Iterator[dict[str, str]]:
        """Synthetic rows at their current version plus system fields, extra columns and overrides, then the
        `$select` projection. System-field text is formatted once per piece, not per row."""
        for lo, hi, entry in pieces:
            created, updated = iso_utc(entry.created_at), iso_utc(entry.updated_at)
            for seq, row in enumerate(snap.table.rows(lo, hi, entry.revisions), start=lo):
                if selection.system:
                    row = {":id": row_id(seq), ":created_at": created, ":updated_at": updated, **row}
                for name, value in snap.extras.items():
                    served = value(seq, row) if callable(value) else value
                    if served is not None:
                        row[name] = str(served)
                override = snap.overrides.get(seq)
                if override:
                    _apply_override(row, override, selection.system)
                if selection.keep is not None:
                    row = {name: row[name] for name in selection.keep if name in row}
                yield row


def _counts_by_served_date(snap: _Snapshot, pieces: list[Piece]) -> list[tuple[str | None, int]]:
    """Rows per served `date` value, ascending (a dropped date, Socrata's null, sorts last).

    Rows are counted on their positional day, O(days); then each `corrupt` override of `date` on a selected
    row moves one row to the group of the value it serves, normalised like a calendar_date (a valid date
    or timestamp becomes `YYYY-MM-DDTHH:MM:SS.mmm`; anything else is grouped under its raw text). So the
    groups sum to `count(*)` and follow what the data query serves.
    """
    per_day: dict[int, int] = {}
    for lo, hi, _ in pieces:
        day = lo // ROWS_PER_DAY
        while day * ROWS_PER_DAY < hi:
            per_day[day] = per_day.get(day, 0) + min(hi, (day + 1) * ROWS_PER_DAY) - max(lo, day * ROWS_PER_DAY)
            day += 1
    counts: dict[str | None, int] = {floating_timestamp(snap.table.day(d)): n for d, n in per_day.items()}
    if snap.overrides and pieces:
        starts = [lo for lo, _, _ in pieces]
        for seq, override in snap.overrides.items():
            if _DATE_KEY not in override:
                continue
            index = bisect.bisect_right(starts, seq) - 1
            if index < 0 or seq >= pieces[index][1]:
                continue
            counts[floating_timestamp(snap.table.day(seq // ROWS_PER_DAY))] -= 1
            served = _served_date(override[_DATE_KEY])
            counts[served] = counts.get(served, 0) + 1
    return sorted(((k, n) for k, n in counts.items() if n > 0), key=lambda kn: (kn[0] is None, kn[0] or ""))


def _served_date(value: str | None) -> str | None:
    """The group key of a served `date` text: normalised when it is a date, else as is (None stays null)."""
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        return value
    return parsed.strftime("%Y-%m-%dT%H:%M:%S.") + f"{parsed.microsecond // 1000:03d}"


def _apply_override(row: dict[str, str], override: Mapping[str, str | None], system: bool) -> None:
    """Corrupt a row in place; system-field overrides only show when system fields are selected."""
    for name, value in override.items():
        if name.startswith(":") and not system:
            continue
        if value is None:
            row.pop(name, None)
        else:
            row[name] = value


# ---------------------------------------------------------------------------------------------- admin JSON


def _check_extra_column_name(name: str) -> None:
    """An extra column must not shadow a dataset or system column."""
    if name in BASE_COLUMNS or name in (CASH_COLUMN, *SYSTEM_FIELDS) or not name:
        raise ValueError(f"{name!r} is not a valid extra column name")


_FAULT_KEYS = frozenset(
    {"fail_next", "fail_always", "clear", "corrupt", "cash_until", "extra_columns", "after_requests"}
)


def check_admin_faults(payload: Mapping[str, Any]) -> None:
    """Raise ValueError (-> 400) if any part of a faults document is malformed, before any of it applies."""
    unknown = set(payload) - _FAULT_KEYS
    if unknown:
        raise ValueError(f"unknown keys {sorted(unknown)}; allowed: {sorted(_FAULT_KEYS)}")
    for item in _as_list(payload.get("fail_next", []), "fail_next"):
        FailSpec.parse(item)
    if payload.get("fail_always") is not None:
        FailSpec.parse(payload["fail_always"])
    for item in _as_list(payload.get("corrupt", []), "corrupt"):
        if not isinstance(item, Mapping) or "seq" not in item or "field" not in item or int(item["seq"]) < 0:
            raise ValueError(f"corrupt items need seq (>= 0) and field, got {item!r}")
    if payload.get("cash_until") is not None:
        as_date(payload["cash_until"])
    extras = payload.get("extra_columns", {})
    if not isinstance(extras, Mapping):
        raise ValueError("extra_columns must be an object {name: value | null}")
    for name in extras:
        _check_extra_column_name(str(name))
    for item in _as_list(payload.get("after_requests", []), "after_requests"):
        ScheduledChange.parse(item)


def apply_admin_faults(dataset: MirrorDataset, payload: Mapping[str, Any]) -> None:
    """Apply a `POST /admin/faults` document; raises ValueError (-> 400) on anything malformed (then nothing
    of it applies, so a typo in one key never leaves half a fault set behind)."""
    check_admin_faults(payload)
    if payload.get("clear"):
        dataset.clear_faults()
    if "fail_next" in payload:
        dataset.fail_next(_as_list(payload["fail_next"], "fail_next"))
    if "fail_always" in payload:
        dataset.fail_always(payload["fail_always"])
    for item in payload.get("corrupt", []):
        dataset.corrupt(int(item["seq"]), str(item["field"]), item.get("value"))
    if "cash_until" in payload:
        dataset.set_cash_until(payload["cash_until"])
    for name, value in payload.get("extra_columns", {}).items():
        dataset.extra_column(str(name), value)
    for item in payload.get("after_requests", []):
        change = ScheduledChange.parse(item)
        dataset.after_requests(change.requests, publish_days=change.publish_days, faults=change.faults)


_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")


def parse_day_range(payload: Mapping[str, Any], action: str) -> tuple[date, date, float | None]:
    """`{"start": "YYYY-MM-DD", "stop": "YYYY-MM-DD", "now": <epoch s, optional>}` of `/admin/revise` and
    `/admin/delete`; anything else is a ValueError (-> 400) naming the problem, so a typo never acts on
    the wrong days."""
    unknown = set(payload) - {"start", "stop", "now"}
    if unknown:
        raise ValueError(f"unknown {action} keys {sorted(unknown)}; allowed: ['now', 'start', 'stop']")
    days: list[date] = []
    for key in ("start", "stop"):
        value = payload.get(key)
        if not isinstance(value, str) or _DAY.fullmatch(value) is None:
            raise ValueError(f"{action} needs {key} as a 'YYYY-MM-DD' string, got {value!r}")
        days.append(date.fromisoformat(value))  # also refuses 2024-02-30
    now = payload.get("now")
    if now is not None and (isinstance(now, bool) or not isinstance(now, int | float)):
        raise ValueError(f"now must be epoch seconds (a number), got {now!r}")
    return days[0], days[1], now


def _as_list(value: object, key: str) -> list[Any]:
    if not isinstance(value, list):
        raise ValueError(f"{key} must be a list")
    return value


# ---------------------------------------------------------------------------------------------- HTTP


def _error_body(message: str, code: str | None = None) -> dict[str, Any]:
    """Socrata's error document shape."""
    body: dict[str, Any] = {"error": True, "message": message}
    if code:
        body["code"] = code
    return body


def _fault_body(fault: FailSpec) -> bytes:
    """What an injected failure says: the configured body, or what Socrata would plausibly answer."""
    if fault.body is not None:
        return fault.body.encode()
    if fault.status == HTTPStatus.ACCEPTED:
        return json.dumps({"code": "processing", "message": "still processing, retry later"}).encode()
    try:
        phrase = HTTPStatus(fault.status).phrase
    except ValueError:
        phrase = "Injected failure"
    return json.dumps(_error_body(phrase, "mirror.injected")).encode()


class _MirrorHTTPServer(ThreadingHTTPServer):
    """Carries the dataset to handlers; daemon threads so idle keep-alive connections never block exit."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], dataset: MirrorDataset, verbose: bool) -> None:
        super().__init__(address, _Handler)
        self.dataset = dataset
        self.verbose = verbose


class _Handler(BaseHTTPRequestHandler):
    """Routes requests; all JSON, all Content-Length-framed so HTTP/1.1 keep-alive works with httpx."""

    server: _MirrorHTTPServer
    protocol_version = "HTTP/1.1"
    timeout = 60  # an idle keep-alive connection frees its thread after this long
    _status = 0
    _record: Callable[[int], None] | None = None

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.verbose:
            super().log_message(format, *args)

    # ------------------------------------------------------------------ routing

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        path = url.path.rstrip("/") or "/"
        params = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        self._status = 0
        self._record = None
        if path.startswith("/admin/"):
            self._admin(method, path)
            return
        token = self.headers.get("X-App-Token") or params.get("$$app_token")
        # Recorded just before the response is written (see _send), so a client that has its answer can
        # already see its request in the log.
        self._record = lambda status: self.server.dataset.record_request(
            RequestRecord(method, path, params, token, status)
        )
        try:
            self._public(method, path, params)
        except Exception as exc:
            # A mirror bug should reach the test as a readable 500, not as a dropped connection.
            if self._status:
                raise
            self._send_json(HTTPStatus.INTERNAL_SERVER_ERROR, _error_body(f"mirror bug: {exc!r}"))

    def _public(self, method: str, path: str, params: dict[str, str]) -> None:
        dataset = self.server.dataset
        views = re.fullmatch(r"/api/views/([^/]+?)(?:\.json)?", path)
        resource = re.fullmatch(r"/resource/([^/]+?)(?:\.json)?", path)
        if method != "GET" or (views is None and resource is None):
            self._send_json(HTTPStatus.NOT_FOUND, _error_body(f"no route for {method} {path}", "not_found"))
        elif views is not None:
            if views[1] != dataset.dataset_id:
                self._send_json(HTTPStatus.NOT_FOUND, _error_body(f"Cannot find view with id {views[1]}"))
            else:
                self._send_json(HTTPStatus.OK, dataset.metadata())
        elif resource is not None:
            self._resource(resource[1], params)

    def _resource(self, dataset_id: str, params: dict[str, str]) -> None:
        """A data request: injected faults first (like a gateway in front), then the query."""
        dataset = self.server.dataset
        fault = dataset.take_fault()
        if fault is not None and not fault.truncate:
            headers = {} if fault.retry_after is None else {"Retry-After": f"{fault.retry_after:g}"}
            self._send(fault.status, _fault_body(fault), headers)
            return
        if dataset_id != dataset.dataset_id:
            self._send_json(HTTPStatus.NOT_FOUND, _error_body(f"Dataset {dataset_id} not found", "not_found"))
            return
        try:
            rows = dataset.query(params)
        except QueryError as exc:
            self._send_json(HTTPStatus.BAD_REQUEST, _error_body(str(exc), exc.code))
            return
        body = json.dumps(rows, separators=(",", ":")).encode()
        if fault is not None:  # truncate: a 200 whose body is cut in half (invalid JSON)
            body = body[: len(body) // 2]
        self._send(HTTPStatus.OK, body)

    def _admin(self, method: str, path: str) -> None:
        dataset = self.server.dataset
        try:
            payload = self._read_json() if method == "POST" else {}
            if (method, path) == ("POST", "/admin/publish"):
                batch = dataset.publish(int(payload.get("days", 7)), payload.get("now"))
                answer: dict[str, Any] = {
                    "rowsUpdatedAt": batch.updated_at,
                    "start_seq": batch.start_seq,
                    "end_seq": batch.end_seq,
                    "first_id": row_id(batch.start_seq),
                    "last_id": row_id(batch.end_seq - 1),
                    "published_through": dataset.published_through.isoformat(),
                }
            elif (method, path) == ("POST", "/admin/revise"):
                revision = dataset.revise(*parse_day_range(payload, "revise"))
                answer = {
                    "rowsUpdatedAt": revision.updated_at,
                    **revision.to_json(),
                    "first_id": row_id(revision.start_seq),
                    "last_id": row_id(revision.end_seq - 1),
                }
            elif (method, path) == ("POST", "/admin/delete"):
                deletion = dataset.delete_days(*parse_day_range(payload, "delete"))
                answer = {"rowsUpdatedAt": deletion.updated_at, **deletion.to_json(), "live_rows": dataset.total_rows}
            elif (method, path) == ("POST", "/admin/faults"):
                apply_admin_faults(dataset, payload)
                answer = dataset.state()
            elif (method, path) == ("POST", "/admin/reset"):
                dataset.reset()
                answer = dataset.state()
            elif (method, path) == ("GET", "/admin/requests"):
                answer = {"requests": [r.to_json() for r in dataset.requests]}
            elif (method, path) == ("POST", "/admin/requests/clear"):
                dataset.clear_requests()
                answer = {"requests": []}
            elif (method, path) == ("GET", "/admin/state"):
                answer = dataset.state()
            else:
                self._send_json(HTTPStatus.NOT_FOUND, _error_body(f"no admin route {method} {path}"))
                return
        except (ValueError, TypeError) as exc:
            self._send_json(HTTPStatus.BAD_REQUEST, _error_body(str(exc)))
            return
        self._send_json(HTTPStatus.OK, answer)

    # ------------------------------------------------------------------ I/O

    def _read_json(self) -> dict[str, Any]:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if not raw.strip():
            return {}
        payload = json.loads(raw)
        if not isinstance(payload, dict):
            raise ValueError("admin body must be a JSON object")
        return payload

    def _send_json(self, status: int, document: object) -> None:
        self._send(status, json.dumps(document).encode())

    def _send(self, status: int, body: bytes, headers: Mapping[str, str] | None = None) -> None:
        self._status = int(status)
        if self._record is not None:
            self._record(self._status)
            self._record = None
        self.send_response(status)
        self.send_header("Content-Type", "application/json;charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)


# ---------------------------------------------------------------------------------------------- server


class MirrorServer:
    """The mirror on a background thread: `start()` (port 0 picks a free port), `.url`, `stop()`.

    `dataset` is the dataset id at construction; afterwards `.dataset` is the `MirrorDataset` state object
    (publish, corrupt, fail_next, ...), which is what tests drive.
    """

    def __init__(
        self,
        dataset: str = DEFAULT_DATASET_ID,
        start: date | str = DEFAULT_HISTORY_START,
        through: date | str = DEFAULT_PUBLISHED_THROUGH,
        seed: int = 42,
        *,
        cash_until: date | str | None = None,
        base_epoch: int = DEFAULT_BASE_EPOCH,
        host: str = "127.0.0.1",
        port: int = 0,
        verbose: bool = False,
        state_file: Path | str | None = None,
    ) -> None:
        self.dataset = MirrorDataset(dataset, start, through, seed=seed, cash_until=cash_until, base_epoch=base_epoch)
        #: True when the dataset's history was restored from `state_file`.
        self.restored = False
        if state_file is not None:
            self.restored = _restore(self.dataset, Path(state_file))
            self.dataset.on_change = lambda history: _write_history(Path(state_file), history)
        self.host = host
        self.port = port
        self._verbose = verbose
        self._httpd: _MirrorHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> Self:
        """Bind and serve on a daemon thread; returns self so `MirrorServer(...).start()` chains."""
        if self._httpd is not None:
            raise RuntimeError("mirror already started")
        self._httpd = _MirrorHTTPServer((self.host, self.port), self.dataset, self._verbose)
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1}, name="socrata-mirror", daemon=True
        )
        self._thread.start()
        return self

    @property
    def url(self) -> str:
        """Base URL, e.g. `http://127.0.0.1:38211` (Socrata paths go after it)."""
        if self._httpd is None:
            raise RuntimeError("mirror not started")
        return f"http://{self.host}:{self.port}"

    def stop(self) -> None:
        """Stop serving and release the port; safe to call twice."""
        httpd, thread = self._httpd, self._thread
        self._httpd, self._thread = None, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        if thread is not None:
            thread.join(timeout=5)

    def __enter__(self) -> Self:
        return self.start() if self._httpd is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _restore(dataset: MirrorDataset, path: Path) -> bool:
    """Replay `path` into `dataset` if it exists and was written for the same parameters; ValueError names the
    file if it cannot be read or replayed (a history silently dropped would republish what was published)."""
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        return False
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read the mirror history {path}: {exc}; delete it to start over") from exc
    try:
        return isinstance(document, dict) and dataset.replay(document)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"cannot replay the mirror history {path}: {exc}; delete it to start over") from exc


def _write_history(path: Path, history: Mapping[str, Any]) -> None:
    """Write atomically (a crash mid-write leaves the previous history, never half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(history, indent=1) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------- CLI


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tollwatch_dev.mirror", description="Socrata-compatible mirror of MTA hourly traffic."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (printed as MIRROR_URL)")
    parser.add_argument("--dataset", default=DEFAULT_DATASET_ID)
    parser.add_argument("--start", type=as_date, default=DEFAULT_HISTORY_START, help="history start date")
    parser.add_argument("--through", type=as_date, default=DEFAULT_PUBLISHED_THROUGH, help="exclusive end")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--cash-until", type=as_date, default=None, help="rows before carry vehicles_cash")
    parser.add_argument("--base-epoch", type=int, default=DEFAULT_BASE_EPOCH, help="initial batch stamp")
    parser.add_argument("--verbose", action="store_true", help="log every request to stderr")
    parser.add_argument(
        "--state", type=Path, default=None, help="JSON file the publish/revision/deletion history is kept in"
    )
    return parser.parse_args(argv)


def _server_from(args: argparse.Namespace) -> MirrorServer:
    return MirrorServer(
        args.dataset,
        args.start,
        args.through,
        seed=args.seed,
        cash_until=args.cash_until,
        base_epoch=args.base_epoch,
        host=args.host,
        port=args.port,
        verbose=args.verbose,
        state_file=args.state,
    )


def main(argv: list[str] | None = None) -> int:
    """Serve until SIGTERM/SIGINT; the single stdout line tells a supervisor where to connect."""
    args = _parse_args(argv)
    try:
        server = _server_from(args).start()
    except ValueError as exc:
        print(f"mirror: {exc}", file=sys.stderr, flush=True)
        return 2
    if server.restored:
        print(f"mirror: restored its history from {args.state}", flush=True)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print(f"MIRROR_URL={server.url}", flush=True)
    try:
        while not stop.wait(0.5):  # a timed wait keeps the main thread responsive to signals
            pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
