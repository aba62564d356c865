"""A small Socrata (SODA 2.x) client: dataset metadata and rows page by page.

Why not a generic Socrata SDK: we need exactly two endpoints, stable paging (`$order=:id`), system fields
and a retry policy that honours `Retry-After`; httpx + tenacity give that in a few lines, and pages stay
raw bytes so the landing zone keeps exactly what the upstream sent.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import NoReturn

import httpx
import orjson
from pydantic import BaseModel, ConfigDict, Field

from tollwatch.adapters.net import TRANSIENT_STATUS, RetryPolicy, retry_after_s, tls_context
from tollwatch.contract.errors import TollwatchError

log = logging.getLogger(__name__)

#: Socrata answers 202 while it is still preparing a result: worth asking again, like the usual transient answers.
RETRYABLE_STATUS = TRANSIENT_STATUS | {202}


class UpstreamError(TollwatchError):
    """The upstream could not be read; the message says what was asked and what came back."""

    status = 502


class _Retryable(Exception):
    """A response or transport failure worth another try (carries the server's Retry-After, if any)."""

    transient = True  # what tollwatch.adapters.net retries

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class DatasetMetadata(BaseModel):
    """The part of `/api/views/{id}.json` tollwatch relies on."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    id: str
    name: str = ""
    rows_updated_at: int = Field(alias="rowsUpdatedAt", description="epoch seconds of the last data publish")
    columns: list[dict[str, object]] = Field(default_factory=list)


@dataclass(frozen=True)
class Page:
    """One page of rows as the upstream sent it (raw JSON bytes) plus what we learned parsing it."""

    number: int
    offset: int
    body: bytes
    row_count: int
    columns: frozenset[str]


def socrata_timestamp(epoch_s: int) -> str:
    """Socrata's floating-timestamp literal for an epoch (UTC), as used in `:updated_at` filters."""
    return datetime.fromtimestamp(epoch_s, UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def window_where(start: date, stop: date) -> str:
    """`$where` for rows whose `date` is in `[start, stop)`."""
    return f"date >= '{start.isoformat()}T00:00:00' AND date < '{stop.isoformat()}T00:00:00'"


def updated_after_where(epoch_s: int) -> str:
    """`$where` for rows changed after a watermark."""
    return f":updated_at > '{socrata_timestamp(epoch_s)}'"


def updated_between_where(after_epoch_s: int | None, through_epoch_s: int) -> str:
    """`$where` for row versions published after `after` (exclusive) and up to `through` (inclusive).

    Written as half-open second ranges (`>= after+1s`, `< through+1s`): `rowsUpdatedAt` is whole seconds while a
    row's `:updated_at` may carry milliseconds, and a version stamped 12:00:00.500 belongs to the publish whose
    `rowsUpdatedAt` is 12:00:00. Without a lower bound (first sighting) it is every version up to `through`.
    """
    upper = f":updated_at < '{socrata_timestamp(through_epoch_s + 1)}'"
    if after_epoch_s is None:
        return upper
    return f":updated_at >= '{socrata_timestamp(after_epoch_s + 1)}' AND {upper}"


class SocrataClient:
    """Reads one Socrata domain. Construct with an `httpx.Client` so tests and callers control transport."""

    def __init__(
        self,
        http: httpx.Client,
        *,
        app_token: str | None = None,
        max_attempts: int = 6,
        backoff_max_s: float = 60.0,
        backoff_initial_s: float = 0.5,
    ) -> None:
        self._http = http
        self._headers = {"Accept": "application/json"}
        if app_token:
            self._headers["X-App-Token"] = app_token
        self._retry = RetryPolicy(
            max_attempts=max_attempts, initial_s=backoff_initial_s, max_delay_s=backoff_max_s, statuses=frozenset()
        )

    # ------------------------------------------------------------------ public API

    def metadata(self, dataset_id: str) -> DatasetMetadata:
        """Dataset metadata; `rows_updated_at` is the publish watermark."""
        body, _ = self._get(f"/api/views/{dataset_id}.json", params={})
        try:
            return DatasetMetadata.model_validate_json(body)
        except ValueError as exc:
            raise UpstreamError(f"metadata for {dataset_id} is not what Socrata returns: {exc}") from exc

    def pages(self, dataset_id: str, *, where: str | None, page_size: int = 50_000) -> Iterator[Page]:
        """Rows matching `where`, in stable `:id` order, one page at a time (memory = one page).

        Stops at the first short page. `$order=:id` keeps paging stable while the upstream publishes.
        """
        offset = 0
        number = 0
        while True:
            params = {"$select": ":*, *", "$order": ":id", "$limit": str(page_size), "$offset": str(offset)}
            if where:
                params["$where"] = where
            body, parsed = self._get(f"/resource/{dataset_id}.json", params=params, expect_array=True)
            rows = parsed or []
            columns = frozenset(k for row in rows for k in row) if rows else frozenset()
            if rows:
                yield Page(number=number, offset=offset, body=body, row_count=len(rows), columns=columns)
            log.debug("page %d at offset %d: %d rows", number, offset, len(rows))
            if len(rows) < page_size:
                return
            offset += len(rows)
            number += 1

    def count(self, dataset_id: str, *, where: str | None) -> int:
        """How many rows match `where` (`$select=count(*) AS n`): what a load reconciles its fetch against."""
        params = {"$select": "count(*) AS n"}
        if where:
            params["$where"] = where
        _, parsed = self._get(f"/resource/{dataset_id}.json", params=params, expect_array=True)
        rows = parsed or []
        try:
            return int(rows[0]["n"]) if rows else 0
        except (KeyError, TypeError, ValueError) as exc:
            raise UpstreamError(f"count(*) for {dataset_id} answered {rows[:1]!r}, not [{{'n': '<int>'}}]") from exc

    def counts_by_day(self, dataset_id: str, *, where: str | None, page_size: int = 50_000) -> dict[date, int]:
        """Rows per day matching `where` (`$select=date, count(*) AS n`, `$group=date`), days without rows absent."""
        counts: dict[date, int] = {}
        offset = 0
        while True:
            params = {
                "$select": "date, count(*) AS n",
                "$group": "date",
                "$order": "date",
                "$limit": str(page_size),
                "$offset": str(offset),
            }
            if where:
                params["$where"] = where
            _, parsed = self._get(f"/resource/{dataset_id}.json", params=params, expect_array=True)
            rows = parsed or []
            for row in rows:
                try:
                    n = int(row["n"])
                except (KeyError, TypeError, ValueError) as exc:
                    raise UpstreamError(f"count(*) per date for {dataset_id} answered {row!r}") from exc
                day = _calendar_day(row.get("date"))
                if day is None:  # rows no writer keeps (typing rejects them): no day of the table to compare with
                    log.info("count(*) per date: %d upstream rows without a calendar date (%r)", n, row.get("date"))
                    continue
                counts[day] = counts.get(day, 0) + n
            if len(rows) < page_size:
                return counts
            offset += len(rows)

    # ------------------------------------------------------------------ transport

    def _get(
        self, path: str, *, params: dict[str, str], expect_array: bool = False
    ) -> tuple[bytes, list[dict[str, str]] | None]:
        """GET with the one retry policy (tollwatch.adapters.net); returns the raw body and, with `expect_array`,
        the parsed rows."""

        def give_up(error: BaseException, why: str) -> NoReturn:
            raise UpstreamError(f"GET {path} failed ({why}); last error: {error}") from error

        return self._retry.call(
            self._get_once, path, params, expect_array, what=f"GET {path}", give_up=give_up, logger=log
        )

    def _get_once(
        self, path: str, params: dict[str, str], expect_array: bool
    ) -> tuple[bytes, list[dict[str, str]] | None]:
        try:
            response = self._http.get(path, params=params, headers=self._headers)
        except httpx.TransportError as exc:
            raise _Retryable(f"{type(exc).__name__}: {exc}") from exc
        # httpx links a response and its stream both ways, so this page's body (~2.3 MB per 10k rows) would be
        # freed only by a full GC: over a long window every fetched body stayed alive. Break the cycle.
        response.stream = httpx.ByteStream(b"")
        if response.status_code in RETRYABLE_STATUS:
            raise _Retryable(
                f"HTTP {response.status_code} {response.reason_phrase}: {response.text[:200]}",
                retry_after=retry_after_s(response.headers.get("Retry-After")),
            )
        if response.status_code >= 400:
            raise UpstreamError(f"GET {path} → HTTP {response.status_code}: {response.text[:500]}")
        body = response.content
        if not expect_array:
            return body, None
        try:
            parsed = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            # A truncated body (dropped connection mid-transfer) is transient: ask again.
            raise _Retryable(f"body is not complete JSON ({len(body)} bytes): {exc}") from exc
        if not isinstance(parsed, list):
            raise UpstreamError(f"GET {path} returned {type(parsed).__name__}, expected a JSON array")
        return body, parsed


def build_http_client(base_url: str, timeout_s: float) -> httpx.Client:
    """The httpx client for the upstream: connection pooling, sane timeouts, no redirects surprise."""
    return httpx.Client(
        base_url=base_url,
        timeout=httpx.Timeout(timeout_s, connect=10.0),
        follow_redirects=True,
        headers={"User-Agent": "tollwatch/0.1"},
        verify=tls_context(),
    )


def _calendar_day(value: object) -> date | None:
    """The day of a Socrata date (`2024-01-03T00:00:00.000`), None for a missing or malformed one."""
    try:
        return date.fromisoformat(str(value)[:10]) if value is not None else None
    except ValueError:
        return None
