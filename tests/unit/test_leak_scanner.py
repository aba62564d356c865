"""The secret scanner of the leak test (tests/support/leaks.py) finds what it must, and only that."""

from __future__ import annotations

import base64

import pytest

from tests.support.leaks import Leak, LeakScan

MARKERS = {"function key": "fk-MARKER-7f3a9c1e", "storage key": "sk-MARKER-0b5d2e44"}


def test_a_marker_is_found_raw_or_base64_and_named_not_printed() -> None:
    scan = LeakScan(MARKERS)
    scan.text("worker.log", "GET /api/watch?code=fk-MARKER-7f3a9c1e", kind="log file")
    basic = base64.b64encode(b"sk-MARKER-0b5d2e44").decode()
    scan.text("event 1", f'{{"headers": {{"Authorization": "Basic {basic}"}}}}', kind="event")
    scan.text("event 2", '{"payload": {"rows": 3}}', kind="event")

    assert scan.found == [Leak("worker.log", "function key"), Leak("event 1", "storage key")]
    assert scan.coverage == {"log file": 1, "event": 2}
    assert all("MARKER" not in repr(leak) for leak in scan.found)


def test_clean_documents_report_nothing() -> None:
    scan = LeakScan(MARKERS)
    scan.text("a", "fk-MARKER-7f3a9c1 (one character short)", kind="log file")
    assert scan.found == []


def test_a_short_marker_is_refused_because_it_would_match_by_accident() -> None:
    with pytest.raises(ValueError, match="at least 12 characters: token"):
        LeakScan({"token": "abc"})
