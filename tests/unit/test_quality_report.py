"""The audit report's markdown (tollwatch/prefect/quality_report.py): the verdict first, a well-formed picture that
marks missing hours and the days the volume check failed, the checks as a table, and a size that stays bounded for
a long backfill. How Prefect's UIs render it is tests/integration/test_quality_report_ui.py."""

from __future__ import annotations

import base64
import re
import xml.etree.ElementTree as ET
from datetime import date, timedelta

import pytest

from tollwatch.contract.quality import CheckResult, PlazaDay, QualitySummary
from tollwatch.prefect.quality_report import (
    DASH,
    MAX_DAYS,
    MINUS,
    TIMES,
    quality_description,
    quality_markdown,
    svg_data_uri,
    volume_svg,
)

SVG = "{http://www.w3.org/2000/svg}"
START = date(2024, 3, 1)
IMAGE = re.compile(r"!\[([^\]]*)\]\(data:image/svg\+xml;base64,([A-Za-z0-9+/=]+)\)")


def _day(plaza: int, day: date, total: int = 20_000, **changes: object) -> PlazaDay:
    values: dict[str, object] = {
        "plaza_id": plaza,
        "day": day,
        "total": total,
        "rows": 48,
        "expected_rows": 48,
        "trailing_median": 20_000.0,
        "trailing_low": 10_000,
        "trailing_high": 40_000,
    }
    return PlazaDay.model_validate(values | changes)


def _days(n: int, plazas: tuple[int, ...] = (21, 24, 27)) -> list[PlazaDay]:
    return [_day(p, START + timedelta(days=d)) for p in plazas for d in range(n)]


def _check(name: str, passed: bool = True, severity: str = "error", **more: object) -> CheckResult:
    return CheckResult.model_validate({"name": name, "severity": severity, "passed": passed, **more})


def _held() -> QualitySummary:
    """Held: plaza 24 misses hour 13 on the 5th, plaza 27 counted zero vehicles on the 7th."""
    days = [
        pd
        for pd in _days(7)
        if (pd.plaza_id, pd.day) not in {(24, START + timedelta(days=4)), (27, START + timedelta(days=6))}
    ]
    days += [
        _day(24, START + timedelta(days=4), total=19_100, rows=46, missing_hours=[13]),
        _day(27, START + timedelta(days=6), total=0),
    ]
    checks = [
        _check("reconciliation", value=0, threshold="= 0 rows/day"),
        _check("completeness", False, value=1, detail="1 plaza-day misses hours.", findings=["plaza 24 2024-03-05"]),
        _check("volume", False, value=1, findings=["plaza 27 2024-03-07: 0 vehicles"]),
        _check("reject_rate", value=0.0),
        _check("schema_drift", severity="warn"),
    ]
    return QualitySummary(verdict="held", checks=checks, plaza_days=days)


def _svg_of(markdown: str) -> ET.Element:
    found = IMAGE.search(markdown)
    assert found, "no data-URI image in the report"
    return ET.fromstring(base64.b64decode(found.group(2)))  # noqa: S314 - our own output


def _rows(svg: ET.Element) -> dict[str, ET.Element]:
    """The picture's rows by plaza (the legend is outside them)."""
    return {g.get("data-plaza", ""): g for g in svg.iter(f"{SVG}g") if g.get("class") == "row"}


def _dots(svg: ET.Element, kind: str) -> list[ET.Element]:
    """The day dots of a kind (ok, ob: outside the band, fail, miss, nh) in the plaza rows."""
    return [c for row in _rows(svg).values() for c in row.iter(f"{SVG}circle") if c.get("class") == f"dot {kind}"]


def _shaded(svg: ET.Element) -> list[str]:
    """The classes of the shaded day columns in the plaza rows."""
    rects = (r for row in _rows(svg).values() for r in row.iter(f"{SVG}rect"))
    return [r.get("class", "") for r in rects if r.get("class", "").startswith("c-")]


def _texts(svg: ET.Element) -> list[str]:
    return [t.text or "" for t in svg.iter(f"{SVG}text")]


# ------------------------------------------------------------------------------------------------ the verdict


@pytest.mark.parametrize(
    ("verdict", "checks", "heading", "description"),
    [
        ("passed", [_check("volume")], "# Passed", "Passed"),
        (
            "warned",
            [_check("volume"), _check("schema_drift", False, severity="warn")],
            "# Published with warnings: schema_drift",
            "Published with warnings: schema_drift",
        ),
        (
            "held",
            [_check("completeness", False), _check("volume", False), _check("schema_drift", False, severity="warn")],
            "# Held — not published: completeness, volume failed (warning: schema_drift)",
            "Held: completeness, volume failed",
        ),
    ],
)
def test_the_verdict_is_the_first_line_with_the_checks_that_decided_it(verdict, checks, heading, description):
    summary = QualitySummary(verdict=verdict, checks=checks, plaza_days=_days(3))
    markdown = quality_markdown(summary, title="Ingest window 2024-03-01..2024-03-04")
    assert markdown.splitlines()[0] == heading
    assert quality_description(summary) == description
    assert len(description) <= 40  # the Artifacts tab's card shows ~40 characters


def test_the_title_follows_the_verdict_and_the_picture_comes_before_the_tables():
    markdown = quality_markdown(_held(), title="Ingest window 2024-03-01..2024-03-08")
    lines = markdown.splitlines()
    assert lines[2] == "**Ingest window 2024-03-01..2024-03-08**"
    assert "1 plaza-day missing hours, 1 failing the volume check; 1 outside its trailing range." in lines[4]
    image = IMAGE.search(markdown)
    assert image
    assert image.start() < markdown.index("## Checks") < markdown.index("## Plaza-days needing a look (2)")


# ------------------------------------------------------------------------------------------------ the picture


def test_the_picture_is_a_well_formed_svg_data_uri_with_a_row_per_plaza():
    markdown = quality_markdown(_held(), title="t")
    found = IMAGE.search(markdown)
    assert found
    assert found.group(1) == "Daily vehicles per plaza against its trailing range: 3 plazas, 7 days"
    svg = _svg_of(markdown)
    assert svg.tag == f"{SVG}svg"
    assert float(svg.get("width", 0)) <= 760  # fits the artifact column without shrinking its text much
    texts = _texts(svg)
    assert [t for t in texts if t.startswith("plaza ")] == ["plaza 21", "plaza 24", "plaza 27"]
    assert "Fri 03-01" in texts  # x = day
    assert "Thu 03-07" in texts  # the newest day is always labelled
    # Each plaza-day has its dot; the trailing range its band and median (one path each per plaza).
    assert list(_rows(svg)) == ["21", "24", "27"]
    for row in _rows(svg).values():
        assert len(list(row.iter(f"{SVG}circle"))) == 7
        assert [p.get("class") for p in row.iter(f"{SVG}path")] == ["band", "med"]
    assert 'fill="#ffffff"' in ET.tostring(svg, encoding="unicode")  # legible on the dark UI as on the light one


def test_missing_hours_are_red_with_their_count_and_a_day_the_volume_check_failed_is_amber():
    svg = _svg_of(quality_markdown(_held(), title="t"))
    assert f"{MINUS}1h" in _texts(svg)
    assert [c.get("cx") for c in _dots(svg, "miss")] == [c.get("cx") for c in _rows(svg)["24"].iter(f"{SVG}circle")][
        4:5
    ]
    assert [c.get("cx") for c in _dots(svg, "fail")] == [c.get("cx") for c in _rows(svg)["27"].iter(f"{SVG}circle")][
        6:7
    ]
    assert len(_dots(svg, "ok")) == 21 - 2
    assert sorted(_shaded(svg)) == ["c-fail", "c-miss"]


def test_a_plaza_at_zero_sits_on_the_floor_of_its_row():
    svg = _svg_of(quality_markdown(_held(), title="t"))
    (zero,) = _dots(svg, "fail")
    background = next(r for r in _rows(svg)["27"].iter(f"{SVG}rect") if r.get("class") == "bg")
    assert float(zero.get("cy", 0)) == float(background.get("y", 0)) + float(background.get("height", 0))


def test_a_day_outside_its_trailing_range_that_the_volume_check_passed_is_a_ring_not_a_failure():
    """The band is the range the weekday spanned (tollwatch.core.quality); the check judges a ratio of the median.
    A new weekly high is outside the band and still within 0.5x-2x: shown, not flagged."""
    days = [_day(21, START, total=45_000), _day(21, START + timedelta(days=1))]
    summary = QualitySummary(verdict="passed", checks=[_check("volume", value=0)], plaza_days=days)
    markdown = quality_markdown(summary, title="t")
    svg = _svg_of(markdown)
    assert len(_dots(svg, "ob")) == 1
    assert len(_dots(svg, "ok")) == 1
    assert _shaded(svg) == []
    assert "0 failing the volume check; 1 outside its trailing range." in markdown
    assert "## Plaza-days needing a look\n\nNone" in markdown
    assert "| 2024-03-01 | 45,000 |" in markdown  # unmarked in the totals


def test_failed_days_beyond_the_checks_first_findings_are_counted_in_the_legend():
    days = _days(3, plazas=(21,))
    volume = _check("volume", False, value=25, findings=[f"plaza 21 {START}: 0 vehicles"])
    markdown = quality_markdown(QualitySummary(verdict="held", checks=[volume], plaza_days=days), title="t")
    assert "The volume check failed 25 plaza-days and names the first 1: only those are shaded." in markdown
    assert len(_dots(_svg_of(markdown), "fail")) == 1


def test_a_day_without_trailing_history_is_grey_and_not_flagged():
    days = [_day(21, START, trailing_median=None, trailing_low=None, trailing_high=None, total=1)]
    summary = QualitySummary(verdict="passed", checks=[_check("volume", evaluated=False)], plaza_days=days)
    markdown = quality_markdown(summary, title="t")
    assert len(_dots(_svg_of(markdown), "nh")) == 1
    assert "| volume | error | not judged |" in markdown
    assert "## Plaza-days needing a look\n\nNone" in markdown


def test_more_than_max_days_draws_the_last_ones_and_says_so():
    n = MAX_DAYS + 30
    svg = ET.fromstring(volume_svg(_days(n, plazas=(21,))))  # noqa: S314 - our own output
    assert len(_dots(svg, "ok")) == MAX_DAYS
    last = START + timedelta(days=n - 1)
    assert f"{START + timedelta(days=30)} to {last} (last {MAX_DAYS} of {n} days)" in _texts(svg)
    summary = QualitySummary(verdict="passed", checks=[_check("volume")], plaza_days=_days(n, plazas=(21,)))
    assert f"Only the last {MAX_DAYS} of {n} days are drawn." in quality_markdown(summary, title="t")


def test_no_plaza_days_means_no_picture_but_still_the_verdict_and_checks():
    summary = QualitySummary(verdict="held", checks=[_check("reconciliation", False, value=12)])
    markdown = quality_markdown(summary, title="t")
    assert markdown.startswith("# Held — not published: reconciliation failed\n")
    assert "data:image" not in markdown
    assert "| reconciliation | error | **FAILED** | 12 |" in markdown
    ET.fromstring(volume_svg([]))  # noqa: S314 - still a valid (empty) picture


# ------------------------------------------------------------------------------------------------ the tables


def test_checks_table_has_every_column_and_the_first_findings():
    findings = [f"plaza {p} 2024-03-0{d}" for p in (21, 24) for d in range(1, 5)]
    check = _check(
        "completeness",
        False,
        value=8,
        threshold="24 h | per plaza-day",
        detail="8 plaza-days\nmiss <hours>.",
        findings=findings,
    )
    markdown = quality_markdown(QualitySummary(verdict="held", checks=[check]), title="t")
    assert "| check | severity | result | value | threshold | detail | first findings |" in markdown
    row = next(line for line in markdown.splitlines() if line.startswith("| completeness"))
    # one line, pipes and angle brackets escaped (the UIs would eat `<hours>` as HTML)
    assert row.startswith(
        "| completeness | error | **FAILED** | 8 | 24 h \\| per plaza-day | 8 plaza-days miss &lt;hours>. |"
    )
    assert "plaza 21 2024-03-01; plaza 21 2024-03-02" in row
    assert row.endswith("; … 3 more |")
    assert row.count(" | ") == 6


def test_plaza_day_tables_show_the_numbers_behind_the_picture():
    markdown = quality_markdown(_held(), title="t")
    assert f"| 24 | 2024-03-05 | 19,100 | 20,000 | 10,000 {DASH} 40,000 | 0.95{TIMES} | 46 / 48 | 1: 13h |" in markdown
    assert f"| 27 | 2024-03-07 | **0** | 20,000 | 10,000 {DASH} 40,000 | 0.00{TIMES} | 48 / 48 |  |" in markdown
    assert "| day \\ plaza | 21 | 24 | 27 |" in markdown
    assert f"| 2024-03-05 | 20,000 | **19,100** ({MINUS}1h) | 20,000 |" in markdown
    assert "| 2024-03-07 | 20,000 | 20,000 | **0** (volume) |" in markdown


def test_a_long_backfill_stays_bounded():
    """10 plazas over 120 days, every plaza-day flagged: months in the totals, MAX_DAYS listed plaza-days, and a
    report of a size Prefect's UI renders at once."""
    plazas = tuple(range(21, 31))
    days = [_day(p, START + timedelta(days=d), total=5_000, missing_hours=[3]) for p in plazas for d in range(120)]
    checks = [_check("completeness", False), _check("volume", False)]
    markdown = quality_markdown(QualitySummary(verdict="held", checks=checks, plaza_days=days), title="t")
    assert "## Vehicles per month and plaza" in markdown
    assert len([line for line in markdown.splitlines() if line.startswith("| 2024-")]) == 4  # Mar-Jun
    assert len([line for line in markdown.splitlines() if re.match(r"\| \d+ \| 2024-", line)]) == MAX_DAYS
    assert f"| … {len(days) - MAX_DAYS} more |" in markdown
    svg = _svg_of(markdown)
    assert len(_dots(svg, "miss")) == len(plazas) * MAX_DAYS
    assert len(markdown) < 250_000


def test_max_days_is_the_ingest_reports_bound():
    from tollwatch.prefect.flows.report import MAX_DAY_ROWS

    assert MAX_DAYS == MAX_DAY_ROWS


def test_the_data_uri_is_base64_the_one_form_both_uis_render():
    uri = svg_data_uri('<svg xmlns="http://www.w3.org/2000/svg"><text>a b</text></svg>')
    assert uri.startswith("data:image/svg+xml;base64,")
    assert " " not in uri  # a space would end the markdown image's link
