"""The audit report of a write-audit-publish load: the markdown artifact a person opens when a load was held.

It reads top-down in the order a person asks: *was it published?* (the verdict is the first heading, with the
failing checks named), *where is it wrong?* (a picture: one row per plaza, its daily totals against its trailing
same-weekday range, missing hours in red), then *by how much?* (the checks, and the plaza-days, as tables).

How the picture reaches the page (seen in Prefect 3.9.1's two UIs, headless Chromium; tests/integration/
test_quality_report_ui.py keeps it so): both UIs sanitise HTML in markdown — the default UI (`/v2`, react-markdown
with rehype-sanitize's GitHub schema) drops an inline `<svg>` entirely and the classic UI (`/`, DOMPurify on each
HTML token) keeps only an empty `<svg>` shell; both drop `style` attributes. Both render a markdown image whose
source is a *base64* `data:image/svg+xml` URI (the v2 UI allows `data:image/` sources on purpose), so the SVG is
embedded that way: it is drawn by the browser as an image, with its own `<style>`, and needs no file or server.
A URL-encoded (`utf8,`) data URI is not an option: its spaces end the markdown link. The classic UI is dark and
the v2 UI light, so the SVG paints its own white background. No emoji: not every viewer has an emoji font.

Pure: no Prefect API calls. The flow creates the artifact (`create_markdown_artifact(markdown=quality_markdown(…),
description=quality_description(…))`); the description is what the flow run's Artifacts tab shows on the card.
"""

from __future__ import annotations

import base64
import math
import re
from collections import defaultdict
from collections.abc import Collection, Iterable, Sequence
from datetime import date
from xml.sax.saxutils import escape, quoteattr

from tollwatch.contract.quality import CheckResult, PlazaDay, QualitySummary

#: At most this many days are drawn, listed as plaza-days needing a look, or tabulated per day (beyond it the totals
#: table shows months and the picture the last MAX_DAYS days): the same bound as the ingest report's MAX_DAY_ROWS,
#: so a backfill's report stays a page, not a scroll (a unit test keeps the two equal).
MAX_DAYS = 62

#: At most this many findings of a check are shown in its table cell (the check's `findings` are already the first).
MAX_FINDINGS = 5

#: Typography for people (ruff would flag these characters written out: they look like ASCII ones).
TIMES, DASH, MINUS = "\u00d7", "\u2013", "\u2212"

#: How a check's finding names a plaza-day (tollwatch.core.quality: `plaza 27 2024-03-07: 0 vehicles, …`).
_PLAZA_DAY = re.compile(r"\bplaza (\d+) (\d{4}-\d{2}-\d{2})\b")

_HEADINGS = {"passed": "Passed", "warned": "Published with warnings", "held": "Held — not published"}

# ------------------------------------------------------------------------------------------------ the markdown


def quality_description(summary: QualitySummary) -> str:
    """A short line for the artifact's description: the flow run's Artifacts tab shows it on the artifact's card
    (not the markdown), cut after ~40 characters in the v2 UI, so it is the verdict's word and the check names only:
    `Held: completeness, volume failed`, `Published with warnings: schema_drift`, `Passed`."""
    if summary.verdict == "held":
        names = ", ".join(c.name for c in summary.failing)
        return f"Held: {names} failed" if names else "Held"
    return _verdict_line(summary)


def quality_markdown(summary: QualitySummary, *, title: str) -> str:
    """The whole report: the verdict as the first heading, what the load covers, the picture (a base64 SVG data-URI
    image, see the module docstring for why), the checks, the plaza-days needing a look, and daily totals per
    plaza. `title` names the load (e.g. `Ingest window 2024-03-01..2024-04-01`); it comes second, because the
    verdict is what a person scans a list of runs for."""
    days = sorted({pd.day for pd in summary.plaza_days})
    plazas = sorted({pd.plaza_id for pd in summary.plaza_days})
    failed = volume_failures(summary)
    flagged = [pd for pd in summary.plaza_days if pd.missing_hours or (pd.plaza_id, pd.day) in failed]
    lines = [f"# {_verdict_line(summary)}", "", f"**{_cell(title)}**", "", _overview(summary, days, plazas, failed)]
    if summary.plaza_days:
        svg = volume_svg(summary.plaza_days, failed=failed)
        alt = _alt_text(days, plazas)
        lines += ["", f"![{alt}]({svg_data_uri(svg)})", "", _legend(summary, len(days))]
    lines += ["", "## Checks", "", *_checks_table(summary.checks)]
    if summary.plaza_days:
        lines += ["", *_flagged_table(flagged, failed), "", *_totals_table(summary.plaza_days, plazas, failed)]
    return "\n".join(lines) + "\n"


def volume_failures(summary: QualitySummary) -> set[tuple[int, date]]:
    """The (plaza, day)s the volume check failed, read from its findings.

    Why from the findings: the volume check judges a day's total against a *ratio* of the trailing median (0.5x-2x
    by default), while a PlazaDay's `trailing_low`..`trailing_high` is the range the same weekday actually spanned in
    the trailing weeks (tollwatch.core.quality). A day outside that span is common (a new weekly high) and is shown
    as such; only the check says which days failed. The check lists its first findings only (the summary travels
    in an event), so beyond them a failing day is not shaded; the report says how many the check counted."""
    check = next((c for c in summary.checks if c.name == "volume"), None)
    if check is None or check.passed:
        return set()
    found = (_PLAZA_DAY.search(f) for f in check.findings)
    return {(int(m.group(1)), date.fromisoformat(m.group(2))) for m in found if m}


def _verdict_line(summary: QualitySummary) -> str:
    heading = _HEADINGS[summary.verdict]
    if summary.verdict == "held":
        names = [c.name for c in summary.failing]
        also = [c.name for c in summary.warnings]
        line = f"{heading}: {', '.join(names)} failed" if names else heading
        return f"{line} (warning: {', '.join(also)})" if also else line
    if summary.verdict == "warned":
        names = [c.name for c in summary.warnings]
        return f"{heading}: {', '.join(names)}" if names else heading
    return heading


def _overview(summary: QualitySummary, days: list[date], plazas: list[int], failed: set[tuple[int, date]]) -> str:
    judged = [c for c in summary.checks if c.evaluated]
    passed = sum(c.passed for c in judged)
    parts = [f"{len(summary.checks)} checks: {passed} passed"]
    if summary.failing:
        parts.append(f"{len(summary.failing)} failed")
    if summary.warnings:
        parts.append(f"{len(summary.warnings)} warned")
    if len(judged) < len(summary.checks):
        parts.append(f"{len(summary.checks) - len(judged)} not judged")
    text = ", ".join(parts) + "."
    if days:
        missing = sum(1 for pd in summary.plaza_days if pd.missing_hours)
        outside = sum(1 for pd in summary.plaza_days if _outside(pd))
        text += (
            f" {_n(len(plazas), 'plaza')} {TIMES} {_n(len(days), 'day')} ({days[0]} {DASH} {days[-1]}): "
            f"{_n(missing, 'plaza-day')} missing hours, {len(failed)} failing the volume check; "
            f"{outside} outside {'its' if outside == 1 else 'their'} trailing range."
        )
    return text


def _alt_text(days: list[date], plazas: list[int]) -> str:
    shown = days[-MAX_DAYS:]
    scope = f"last {len(shown)} of {len(days)} days" if len(shown) < len(days) else f"{len(days)} days"
    return f"Daily vehicles per plaza against its trailing range: {len(plazas)} plazas, {scope}"


def _legend(summary: QualitySummary, n_days: int) -> str:
    text = (
        "*One row per plaza, each on its own scale from 0. Blue band: the range the same weekday spanned in the "
        f"trailing weeks (low {DASH} high); dark tick: their median; dot: the day's total (a ring when outside the "
        "band, grey without history: not judged). Red column and dot: hours missing (their count on top); amber "
        "column and dot: the volume check failed the day.*"
    )
    volume = next((c for c in summary.checks if c.name == "volume" and not c.passed), None)
    if volume is not None and volume.value is not None and volume.value > len(volume.findings):
        text += f" *The volume check failed {_number(volume.value)} plaza-days and names the first "
        text += f"{len(volume.findings)}: only those are shaded.*"
    if n_days > MAX_DAYS:
        text += f" *Only the last {MAX_DAYS} of {n_days} days are drawn.*"
    return text


def _checks_table(checks: Sequence[CheckResult]) -> list[str]:
    out = [
        "| check | severity | result | value | threshold | detail | first findings |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in checks:
        findings = "; ".join(_cell(f) for f in c.findings[:MAX_FINDINGS])
        if len(c.findings) > MAX_FINDINGS:
            findings += f"; … {len(c.findings) - MAX_FINDINGS} more"
        value = "" if c.value is None else _number(c.value)
        out.append(
            f"| {c.name} | {c.severity} | {_result(c)} | {value} | {_cell(c.threshold)} | {_cell(c.detail)} "
            f"| {findings} |"
        )
    return out


def _result(check: CheckResult) -> str:
    if not check.evaluated:
        return "not judged"
    if check.passed:
        return "passed"
    return "**FAILED**" if check.severity == "error" else "**warning**"


def _flagged_table(flagged: list[PlazaDay], failed: set[tuple[int, date]]) -> list[str]:
    """Plaza-days with missing hours or failed by the volume check, with the numbers behind their marks."""
    if not flagged:
        return ["## Plaza-days needing a look", "", "None: no plaza-day misses hours or failed the volume check."]
    ordered = sorted(flagged, key=lambda pd: (pd.day, pd.plaza_id))
    out = [
        f"## Plaza-days needing a look ({len(flagged)})",
        "",
        "| plaza | day | total | trailing median | trailing range | total / median | rows / expected | missing hours |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for pd in ordered[:MAX_DAYS]:
        median = "" if pd.trailing_median is None else _count(round(pd.trailing_median))
        band = "" if pd.trailing_low is None or pd.trailing_high is None else _range(pd)
        ratio = f"{pd.total / pd.trailing_median:.2f}{TIMES}" if pd.trailing_median else ""
        total = f"**{_count(pd.total)}**" if (pd.plaza_id, pd.day) in failed else _count(pd.total)
        out.append(
            f"| {pd.plaza_id} | {pd.day} | {total} | {median} | {band} | {ratio} | {pd.rows} / {pd.expected_rows} "
            f"| {_hours(pd.missing_hours)} |"
        )
    if len(ordered) > MAX_DAYS:
        out.append(f"| … {len(ordered) - MAX_DAYS} more | | | | | | | |")
    return out


def _totals_table(plaza_days: Sequence[PlazaDay], plazas: list[int], failed: set[tuple[int, date]]) -> list[str]:
    """Vehicles per day (or month, beyond MAX_DAYS days) and plaza, like the ingest report's rows per day."""
    days = {pd.day for pd in plaza_days}
    by_month = len(days) > MAX_DAYS
    grid: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
    marks: dict[tuple[str, int], list[str]] = defaultdict(list)
    for pd in plaza_days:
        key = pd.day.strftime("%Y-%m") if by_month else pd.day.isoformat()
        grid[key][pd.plaza_id] += pd.total
        if pd.missing_hours:
            marks[key, pd.plaza_id].append(f"{MINUS}{len(pd.missing_hours)}h")
        if (pd.plaza_id, pd.day) in failed:
            marks[key, pd.plaza_id].append("volume")
    unit = "month" if by_month else "day"
    out = [
        f"## Vehicles per {unit} and plaza",
        "",
        f"| {unit} \\ plaza | " + " | ".join(str(p) for p in plazas) + " |",
        "|---|" + "---:|" * len(plazas),
    ]
    for key in sorted(grid):
        cells = []
        for p in plazas:
            if p not in grid[key]:
                cells.append("")
                continue
            n = _count(grid[key][p])
            cells.append(f"**{n}** ({', '.join(marks[key, p])})" if marks[key, p] else n)
        out.append(f"| {key} | " + " | ".join(cells) + " |")
    return out


# ------------------------------------------------------------------------------------------------ the picture

_WIDTH = 720
_LEFT = 96  # plaza label and scale
_RIGHT = 14
_TOP = 92  # title, scope and the legend's two lines
_ROW = 66  # one plaza: plot + gap
_PLOT = 48
_BOTTOM = 26  # day labels

_STYLE = (
    "text{font-family:'DejaVu Sans',Verdana,Arial,sans-serif;fill:#1f2933}"
    ".t{font-size:14px;font-weight:bold}.s{font-size:11px;fill:#52606d}.p{font-size:12px;font-weight:bold}"
    ".d{font-size:10px;fill:#52606d}.m{font-size:10px;font-weight:bold;fill:#c81e1e}"
    ".bg{fill:#f5f7fa}.band{fill:#bcd0ea}.med{stroke:#23395d;stroke-width:2;fill:none}"
    ".c-fail{fill:#fdecc8}.c-miss{fill:#fbd5d5}"
    # a dot's white outline first, so the ring (outside the band) can replace it
    ".dot{stroke:#fff;stroke-width:1}.ok{fill:#1d4e89}.ob{fill:#fff;stroke:#1d4e89;stroke-width:1.8}"
    ".fail{fill:#d97706}.miss{fill:#c81e1e}.nh{fill:#9aa5b1}"
)


def volume_svg(
    plaza_days: Sequence[PlazaDay], *, failed: Collection[tuple[int, date]] = (), max_days: int = MAX_DAYS
) -> str:
    """Small multiples, one row per plaza (its own scale from 0, so a plaza at zero sits on the floor of its row),
    x = day: the trailing range as a band, the trailing median as a tick, the day's total as a dot (a ring outside
    the band). A day with missing hours gets a red column and dot with their count, a day in `failed` (the volume
    check's, `volume_failures`) an amber one. At most `max_days` days (the last ones) are drawn, so the picture stays
    legible and the artifact small (paths, not one element per mark)."""
    all_days = sorted({pd.day for pd in plaza_days})
    days = all_days[-max_days:]
    if not days:
        return _svg(_WIDTH, _TOP, [_text(12, 24, "No plaza-days in this load.", "t")])
    index = {day: i for i, day in enumerate(days)}
    rows: dict[int, list[PlazaDay]] = defaultdict(list)
    for pd in plaza_days:
        if pd.day in index:
            rows[pd.plaza_id].append(pd)
    plazas = sorted(rows)
    plot_w = _WIDTH - _LEFT - _RIGHT
    col = plot_w / len(days)
    floor = _TOP + _ROW * len(plazas) - (_ROW - _PLOT)  # the last row's bottom
    height = floor + _BOTTOM
    scope = f"last {len(days)} of {len(all_days)} days" if len(days) < len(all_days) else f"{len(days)} days"
    parts = [
        _text(10, 20, "Vehicles per plaza-day against the trailing range", "t"),
        _text(10, 37, f"{days[0]} to {days[-1]} ({scope})", "s"),
        '<g class="legend">',
        *_legend_marks(10, 57, 77),
        "</g>",
    ]
    for r, plaza in enumerate(plazas):
        top = _TOP + r * _ROW
        parts += _plaza_row(plaza, rows[plaza], index, top, col, set(failed))
    parts += _day_labels(days, col, floor + 14)
    return _svg(_WIDTH, height, parts)


def svg_data_uri(svg: str) -> str:
    """The SVG as a base64 `data:image/svg+xml` URI: the one form both Prefect UIs render inside markdown."""
    return "data:image/svg+xml;base64," + base64.b64encode(svg.encode("utf-8")).decode("ascii")


def _plaza_row(
    plaza: int, days: list[PlazaDay], index: dict[date, int], top: float, col: float, failed: set[tuple[int, date]]
) -> list[str]:
    peak = max(max(pd.total, pd.trailing_high or 0, pd.trailing_median or 0) for pd in days)
    scale = _nice(peak)
    bottom = top + _PLOT

    def y(v: float) -> float:
        return bottom - _PLOT * min(v, scale) / scale

    x0 = _LEFT
    parts = [
        f'<rect class="bg" x="{x0}" y="{top}" width="{_WIDTH - _LEFT - _RIGHT}" height="{_PLOT}"/>',
        _text(8, top + _PLOT / 2 + 5, f"plaza {plaza}", "p"),
        _text(x0 - 4, top + 9, _short(scale), "d", anchor="end"),
        _text(x0 - 4, bottom, "0", "d", anchor="end"),
    ]
    band_w = max(2.0, min(col * 0.7, 30.0))
    bands, medians, dots, notes = [], [], [], []
    for pd in sorted(days, key=lambda pd: pd.day):
        cx = x0 + (index[pd.day] + 0.5) * col
        left = cx - band_w / 2
        if pd.missing_hours or (pd.plaza_id, pd.day) in failed:
            shade = "c-miss" if pd.missing_hours else "c-fail"
            parts.append(f'<rect class="{shade}" x="{_f(cx - col / 2)}" y="{top}" width="{_f(col)}" height="{_PLOT}"/>')
        if pd.trailing_low is not None and pd.trailing_high is not None:
            bands.append(f"M{_f(left)} {_f(y(pd.trailing_high))}h{_f(band_w)}V{_f(y(pd.trailing_low))}h{_f(-band_w)}Z")
        if pd.trailing_median is not None:
            medians.append(f"M{_f(left)} {_f(y(pd.trailing_median))}h{_f(band_w)}")
        kind = _dot_kind(pd, failed)
        dots.append(f'<circle class="dot {kind}" cx="{_f(cx)}" cy="{_f(y(pd.total))}" r="{_f(min(4.0, col / 3))}"/>')
        if pd.missing_hours:
            label = f"{MINUS}{len(pd.missing_hours)}h" if col >= 22 else str(len(pd.missing_hours))
            notes.append(_text(cx, top - 3, label, "m", anchor="middle"))  # above the row: never under a dot
    if bands:
        parts.append(f'<path class="band" d="{"".join(bands)}"/>')
    if medians:
        parts.append(f'<path class="med" d="{"".join(medians)}"/>')
    return [f'<g class="row" data-plaza="{plaza}">', *parts, *dots, *notes, "</g>"]


def _dot_kind(pd: PlazaDay, failed: set[tuple[int, date]]) -> str:
    """A dot's class, the most urgent first: hours missing, failed by the volume check, not judged (no history),
    outside the band (a ring: common, e.g. a new weekly high, and no failure by itself), within it."""
    if pd.missing_hours:
        return "miss"
    if (pd.plaza_id, pd.day) in failed:
        return "fail"
    if pd.trailing_median is None:
        return "nh"
    return "ob" if _outside(pd) else "ok"


def _day_labels(days: list[date], col: float, baseline: float) -> list[str]:
    fmt = "%a %m-%d" if col >= 64 else "%m-%d"
    every = max(1, math.ceil((58 if col >= 64 else 36) / col))
    # label the last day always (the newest is what a load is about), then every `every`-th going back
    picks = range(len(days) - 1, -1, -every)
    return [
        _text(_LEFT + (i + 0.5) * col, baseline, days[i].strftime(fmt), "d", anchor="middle") for i in sorted(picks)
    ]


def _legend_marks(x0: float, y1: float, y2: float) -> list[str]:
    """Two lines: the marks of a day (band, tick, dots), then what a shaded column means."""
    out: list[str] = []
    x = x0
    marks = [
        ("band", "trailing range"),
        ("med", "trailing median"),
        ("ok", "day total"),
        ("ob", "outside the band"),
        ("nh", "no history (not judged)"),
    ]
    for kind, label in marks:
        if kind == "band":
            out.append(f'<rect class="band" x="{_f(x)}" y="{y1 - 9}" width="12" height="12"/>')
        elif kind == "med":
            out.append(f'<path class="med" d="M{_f(x)} {y1 - 3}h12"/>')
        else:
            out.append(f'<circle class="dot {kind}" cx="{_f(x + 6)}" cy="{y1 - 3}" r="4.5"/>')
        out.append(_text(x + 16, y1 + 1, label, "s"))
        x += 22 + 6.4 * len(label)
    x = x0
    for shade, kind, label in (
        ("c-miss", "miss", f"hours missing ({MINUS}n h on top)"),
        ("c-fail", "fail", "volume check failed"),
    ):
        out.append(f'<rect class="{shade}" x="{_f(x)}" y="{y2 - 10}" width="12" height="14"/>')
        out.append(f'<circle class="dot {kind}" cx="{_f(x + 6)}" cy="{y2 - 3}" r="4.5"/>')
        out.append(_text(x + 16, y2 + 1, label, "s"))
        x += 22 + 6.4 * len(label)
    return out


def _svg(width: float, height: float, parts: Iterable[str]) -> str:
    body = "".join(parts)
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{_f(height)}" '
        f'viewBox="0 0 {width} {_f(height)}"><style>{_STYLE}</style>'
        f'<rect width="100%" height="100%" fill="#ffffff"/>{body}</svg>'
    )


def _text(x: float, y: float, text: str, cls: str, *, anchor: str = "start") -> str:
    a = "" if anchor == "start" else f' text-anchor="{anchor}"'
    return f'<text class={quoteattr(cls)} x="{_f(x)}" y="{_f(y)}"{a}>{escape(text)}</text>'


# ------------------------------------------------------------------------------------------------ small helpers


def _outside(pd: PlazaDay) -> bool:
    if pd.trailing_low is None or pd.trailing_high is None:
        return False
    return not pd.trailing_low <= pd.total <= pd.trailing_high


def _range(pd: PlazaDay) -> str:
    return f"{_count(pd.trailing_low or 0)} {DASH} {_count(pd.trailing_high or 0)}"


def _hours(hours: list[int]) -> str:
    if not hours:
        return ""
    shown = ", ".join(f"{h:02d}h" for h in sorted(hours)[:8])
    return f"{len(hours)}: {shown}" + (" …" if len(hours) > 8 else "")


def _nice(peak: float) -> float:
    """The row's scale: `peak` rounded up to 1, 2, 2.5 or 5 times a power of ten (a plaza at zero still gets 1)."""
    if peak <= 0:
        return 1.0
    magnitude = 10 ** math.floor(math.log10(peak))
    for step in (1, 2, 2.5, 5, 10):
        if peak <= step * magnitude:
            return step * magnitude
    return 10 * magnitude  # pragma: no cover - the loop ends at 10


def _short(n: float) -> str:
    if n >= 1_000_000:
        return f"{n / 1_000_000:g}M"
    if n >= 1_000:
        return f"{n / 1_000:g}k"
    return f"{n:g}"


def _n(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _count(n: int) -> str:
    return f"{n:,}"


def _number(v: float) -> str:
    return f"{v:,.0f}" if float(v).is_integer() else f"{v:.4g}"


def _f(v: float) -> str:
    return f"{v:.1f}".rstrip("0").rstrip(".")


def _cell(text: str) -> str:
    """A markdown table cell: one line, pipes escaped, `<` escaped (both UIs would sanitise it away as HTML)."""
    return " ".join(text.split()).replace("|", "\\|").replace("<", "&lt;")
