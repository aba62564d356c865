"""The dev inbox records every request (in memory, as JSON lines, and behind GET /_received), in-process and as
a service started with `python -m tollwatch_dev.inbox`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tollwatch_dev.inbox import Inbox, Received, log_name

ROOT = Path(__file__).resolve().parents[2]


def test_records_method_path_headers_body_and_json(tmp_path):
    with Inbox() as inbox:
        response = httpx.post(f"{inbox.url}/alerts/x?a=1", json={"subject": "s", "body": "b"}, headers={"X-Tag": "t"})
        httpx.put(f"{inbox.url}/city-dashboard", content=b"not json")
        [alert] = inbox.wait_for("/alerts")

        assert response.status_code == 204
        assert (alert.method, alert.path, alert.query) == ("POST", "/alerts/x", "a=1")
        assert alert.headers["x-tag"] == "t"
        assert alert.headers["content-type"] == "application/json"
        assert alert.json_body == {"subject": "s", "body": "b"}
        assert json.loads(alert.body) == alert.json_body
        [plain] = inbox.received("/city-dashboard")
        assert (plain.method, plain.body, plain.json_body) == ("PUT", "not json", None)
        assert [r.path for r in inbox.received()] == ["/alerts/x", "/city-dashboard"]


def test_wait_for_counts_requests_and_times_out_naming_what_arrived():
    with Inbox() as inbox:
        for n in range(3):
            httpx.post(f"{inbox.url}/hook", json={"n": n})
        assert [r.json_body["n"] for r in inbox.wait_for("/hook", count=3)] == [0, 1, 2]
        with pytest.raises(TimeoutError, match=r"expected 4 request\(s\) to /hook .* got 3: POST /hook"):
            inbox.wait_for("/hook", count=4, timeout_s=0.2)


def test_log_dir_gets_one_json_line_per_request_per_first_path_segment(tmp_path):
    with Inbox(log_dir=tmp_path / "logs") as inbox:
        httpx.post(f"{inbox.url}/alerts", json={"body": "one"})
        httpx.post(f"{inbox.url}/alerts/deeper", json={"body": "two"})
        httpx.post(f"{inbox.url}/", content=b"x")
        inbox.wait_for("/", count=3)

    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == ["alerts.jsonl", "root.jsonl"]
    lines = (tmp_path / "logs" / "alerts.jsonl").read_text().splitlines()
    alerts = [Received.model_validate_json(line) for line in lines]
    assert [(r.path, r.json_body) for r in alerts] == [
        ("/alerts", {"body": "one"}),
        ("/alerts/deeper", {"body": "two"}),
    ]


def test_log_file_names_cannot_escape_the_log_dir():
    assert log_name("/../../etc/passwd") == "root"
    assert log_name("/a b/c") == "a_b"
    assert log_name("/") == "root"


def test_get_received_lists_everything_recorded_but_itself():
    with Inbox() as inbox:
        httpx.post(f"{inbox.url}/hook", json={"n": 1})
        inbox.wait_for("/hook")
        listed = httpx.get(f"{inbox.url}/_received").json()
        again = httpx.get(f"{inbox.url}/_received").json()

    assert [(r["method"], r["path"], r["json_body"]) for r in listed] == [("POST", "/hook", {"n": 1})]
    assert again == listed


@pytest.mark.timeout(60)
def test_runs_as_a_service_that_prints_its_url_and_stops_on_sigterm(tmp_path):
    process = subprocess.Popen(
        [sys.executable, "-m", "tollwatch_dev.inbox", "--port", "0", "--log-dir", str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline().strip()
        assert line.startswith("INBOX_URL=http://127.0.0.1:")
        url = line.removeprefix("INBOX_URL=")
        assert httpx.post(f"{url}/alerts", json={"body": "hi"}).status_code == 204
        assert [r["json_body"] for r in httpx.get(f"{url}/_received").json()] == [{"body": "hi"}]
        assert json.loads((tmp_path / "alerts.jsonl").read_text())["json_body"] == {"body": "hi"}
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
