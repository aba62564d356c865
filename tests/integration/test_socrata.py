"""The Socrata client against the mirror: stable paging, filters, retries and clear errors."""

from __future__ import annotations

from datetime import date

import orjson
import pytest

from tollwatch.adapters.socrata import (
    SocrataClient,
    UpstreamError,
    build_http_client,
    updated_after_where,
    window_where,
)
from tollwatch_dev.mirror import MirrorServer


@pytest.fixture
def client(mirror: MirrorServer) -> SocrataClient:
    return SocrataClient(build_http_client(mirror.url, 10), app_token="test-token", max_attempts=3, backoff_max_s=0.05)


def all_rows(client: SocrataClient, where: str | None, page_size: int) -> list[dict]:
    return [r for page in client.pages("qzve-kjga", where=where, page_size=page_size) for r in orjson.loads(page.body)]


def test_paging_returns_every_row_of_a_window_once(client, mirror):
    rows = all_rows(client, window_where(date(2024, 1, 1), date(2024, 1, 3)), page_size=100)
    assert len(rows) == 2 * 528
    assert len({r[":id"] for r in rows}) == len(rows)
    assert {r["date"][:10] for r in rows} == {"2024-01-01", "2024-01-02"}
    params = [r.params for r in mirror.dataset.requests if r.path.startswith("/resource/")]
    assert [p["$offset"] for p in params] == [str(o) for o in range(0, 1100, 100)]
    assert all(p["$order"] == ":id" and p["$select"] == ":*, *" for p in params)
    assert all(r.app_token == "test-token" for r in mirror.dataset.requests)


def test_updated_after_a_watermark_returns_only_the_new_publish(client, mirror):
    watermark = client.metadata("qzve-kjga").rows_updated_at
    mirror.dataset.publish(days=2)
    assert client.metadata("qzve-kjga").rows_updated_at > watermark
    rows = all_rows(client, updated_after_where(watermark), page_size=50_000)
    assert len(rows) == 2 * 528
    assert {r["date"][:10] for r in rows} == {"2024-04-01", "2024-04-02"}


def test_retry_after_429_202_and_truncated_body_then_success(client, mirror):
    mirror.dataset.fail_next([{"status": 429, "retry_after": 0}, {"status": 202}])
    assert len(all_rows(client, window_where(date(2024, 1, 1), date(2024, 1, 2)), page_size=1000)) == 528
    mirror.dataset.fail_next([{"truncate": True}])
    assert len(all_rows(client, window_where(date(2024, 1, 1), date(2024, 1, 2)), page_size=1000)) == 528


def test_a_persistent_5xx_ends_in_a_clear_error(client, mirror):
    mirror.dataset.fail_always({"status": 503})
    with pytest.raises(UpstreamError, match=r"failed \(gave up after 3 attempts\); last error: HTTP 503"):
        all_rows(client, None, page_size=10)
    assert len([r for r in mirror.dataset.requests if r.path.startswith("/resource/")]) == 3


def test_a_client_error_is_not_retried(client, mirror):
    with pytest.raises(UpstreamError, match="HTTP 400"):
        all_rows(client, "nonsense ~~ 'x'", page_size=10)
    assert len([r for r in mirror.dataset.requests if r.path.startswith("/resource/")]) == 1
