"""The audit report as a person sees it: a real Prefect server with its UI, a flow run that attaches the report as a
markdown artifact (as the ingest flow does), and headless Chromium on the artifact's page.

What is asserted is what reaches the screen, in both of Prefect 3.9's UIs (`/v2`, the default, and the classic
`/`): the verdict is the page's first heading, the picture is an `<img>` whose SVG the browser received whole (both
UIs sanitise HTML: an inline `<svg>` would not survive, tollwatch/prefect/quality_report.py), and the checks are a
table. The run's Artifacts tab shows the verdict on the artifact's card (the description). Screenshots are kept
under the test's tmp dir and their paths printed (`pytest -s`), to look at when a UI upgrade changes the rendering.
"""

from __future__ import annotations

import base64
import re
import struct
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from datetime import date, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tollwatch.contract.quality import CheckResult, PlazaDay, QualitySummary
from tollwatch.prefect.quality_report import MINUS

if TYPE_CHECKING:
    from tollwatch_dev.stack import StackEndpoints
    from tollwatch_dev.ui_login import UiLogin

pytestmark = pytest.mark.stack

VERDICT = "Held — not published: completeness, volume failed"
START = date(2024, 3, 1)
DAYS = 7
HOLE = (24, START + timedelta(days=4), 13)  # plaza, day, the missing hour
ZERO = (27, START + timedelta(days=6))  # plaza, day with no vehicles at all


def held_summary() -> QualitySummary:
    """A held load of 4 plazas x 7 days: one plaza-day misses an hour, one plaza counted zero vehicles on a day."""
    plaza_days = []
    for plaza, base in ((21, 31_000), (24, 16_000), (27, 45_000), (29, 24_000)):
        for offset in range(DAYS):
            day = START + timedelta(days=offset)
            median = base * (0.8 if day.weekday() >= 5 else 1.0)
            total, rows, missing = int(median * (0.95 + 0.02 * offset)), 48, []
            if (plaza, day) == HOLE[:2]:
                total, rows, missing = total - int(median / 24), 46, [HOLE[2]]
            if (plaza, day) == ZERO:
                total = 0
            plaza_days.append(
                PlazaDay(
                    plaza_id=plaza,
                    day=day,
                    total=total,
                    rows=rows,
                    expected_rows=48,
                    missing_hours=missing,
                    trailing_median=median,
                    trailing_low=int(median * 0.9),
                    trailing_high=int(median * 1.1),
                )
            )
    checks = [
        CheckResult(name="reconciliation", severity="error", passed=True, value=0, threshold="= 0 rows/day"),
        CheckResult(
            name="completeness",
            severity="error",
            passed=False,
            value=1,
            threshold="24 h per plaza-day",
            detail="1 plaza-day misses hours.",
            findings=[f"plaza {HOLE[0]} {HOLE[1]}: hour {HOLE[2]} missing"],
        ),
        CheckResult(
            name="volume",
            severity="error",
            passed=False,
            value=1,
            threshold="0.5x to 2x the trailing median",
            detail="1 plaza-day outside its trailing range.",
            findings=[f"plaza {ZERO[0]} {ZERO[1]}: 0 vehicles"],
        ),
        CheckResult(name="reject_rate", severity="error", passed=True, value=0.0, threshold="≤ 1%"),
        CheckResult(name="schema_drift", severity="warn", passed=True, value=0, threshold="no column added or dropped"),
    ]
    return QualitySummary(verdict="held", checks=checks, plaza_days=plaza_days)


@pytest.fixture(scope="module")
def ui_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackEndpoints]:
    """A Prefect server that serves its UI (the session's `stack` runs without one): tollwatch_dev's server on
    SQLite, on a free loopback port, requiring the stack's basic auth like every stack server. Its API is set for
    this process."""
    from prefect.settings import temporary_settings

    from tollwatch_dev.stack import LocalStack

    local = LocalStack(tmp_path_factory.mktemp("ui-stack"), services=("prefect",), prefect_ui=True, db="sqlite")
    endpoints = local.up()
    try:
        with pytest.MonkeyPatch.context() as patch, temporary_settings(updates=endpoints.prefect_settings()):
            for key, value in endpoints.env().items():
                patch.setenv(key, value)
            yield endpoints
    finally:
        from prefect.logging.handlers import APILogHandler

        APILogHandler().flush()
        local.down()


@pytest.fixture(scope="module")
def ui(ui_server: StackEndpoints) -> Iterator[UiLogin]:
    """The UI as a person who logged in sees it (tollwatch_dev.ui_login: the UI's own login, done for Chromium)."""
    from tollwatch_dev.ui_login import UiLogin

    with UiLogin(ui_server.prefect_api_url.removesuffix("/api"), ui_server.prefect_auth_string) as login:
        yield login


@pytest.fixture(scope="module")
def report_run(ui_server: StackEndpoints) -> dict[str, str]:
    """One flow run that attaches the held report, as the ingest flow will: artifact id, flow run id, UI base."""
    from prefect import flow
    from prefect.artifacts import create_markdown_artifact
    from prefect.context import get_run_context

    from tollwatch.prefect.quality_report import quality_description, quality_markdown

    @flow(name="quality-report-ui")
    def attach() -> tuple[str, str]:
        summary = held_summary()
        artifact = create_markdown_artifact(
            markdown=quality_markdown(summary, title="Ingest window 2024-03-01..2024-03-08"),
            key=f"quality-{uuid.uuid4().hex[:8]}",
            description=quality_description(summary),
        )
        return str(artifact), str(get_run_context().flow_run.id)  # type: ignore[union-attr]

    artifact_id, flow_run_id = attach()
    return {"artifact": artifact_id, "flow_run": flow_run_id, "base": ui_server.prefect_api_url.removesuffix("/api")}


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


@pytest.mark.parametrize("version", ["v2", "classic"])
def test_the_artifact_page_shows_the_verdict_then_the_picture_then_the_checks(report_run, ui, version, tmp_path):
    from tollwatch_dev.screenshot import dump_dom, screenshot

    prefix = "/v2" if version == "v2" else ""
    url = ui.url(f"{prefix}/artifacts/artifact/{report_run['artifact']}")

    png = screenshot(url, tmp_path / f"quality-report-{version}.png")
    print(f"\n{version} UI: {url}\nscreenshot: {png}")
    assert _png_size(png) == (1400, 1800)
    assert png.stat().st_size > 50_000  # a blank or error page compresses to a few KB

    dom = dump_dom(url)
    (tmp_path / f"quality-report-{version}.html").write_text(dom)
    heading = re.search(r"<h1[^>]*>([^<]*)</h1>", dom)
    assert heading, f"no heading rendered on {url}"
    assert heading.group(1).strip() == VERDICT  # the first heading of the page is the verdict
    image = re.search(r'<img[^>]*src="data:image/svg\+xml;base64,([A-Za-z0-9+/=]+)"[^>]*>', dom)
    assert image, "the chart did not reach the page as an image"
    assert 'alt="Daily vehicles per plaza' in image.group(0)
    assert dom.index(VERDICT) < image.start() < dom.index("<table")  # verdict, picture, then the tables

    # The SVG the browser got is whole: it parses, draws every plaza, and marks the missing hour.
    svg = ET.fromstring(base64.b64decode(image.group(1)))  # noqa: S314 - our own report, from our own server
    texts = [t.text for t in svg.iter("{http://www.w3.org/2000/svg}text")]
    assert {f"plaza {p}" for p in (21, 24, 27, 29)} <= set(texts)
    assert f"{MINUS}1h" in texts
    assert "FAILED" in dom
    assert "completeness" in dom
    assert "volume" in dom


def test_the_runs_artifacts_tab_shows_the_verdict_on_the_card(report_run, ui, tmp_path):
    """The flow run's Artifacts tab lists cards with the artifact's description, not its markdown (v2, the default
    UI; the classic UI ignores `?tab=` for a run it has not loaded yet). Without the login, the same address shows
    the login form and nothing of the run (the stack's server is not open)."""
    from tollwatch_dev.screenshot import dump_dom, screenshot

    page = f"/v2/runs/flow-run/{report_run['flow_run']}?tab=Artifacts"
    png = screenshot(ui.url(page), tmp_path / "flow-run-artifacts-tab.png")
    print(f"\nflow run Artifacts tab: {png}")
    assert "Held: completeness, volume failed" in dump_dom(ui.url(page))

    anonymous = dump_dom(f"{report_run['base']}{page}")
    assert "Held: completeness, volume failed" not in anonymous
    assert re.search(r"Login|Sign in|password", anonymous, re.IGNORECASE), anonymous[-2000:]
