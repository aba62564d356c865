"""The markdown artifact of an ingest run: what a human checks first when a number looks wrong."""

from __future__ import annotations

from collections import defaultdict
from datetime import date

from tollwatch.contract.events import IngestionCompleted
from tollwatch.contract.quality import QualitySummary
from tollwatch.core.audit import Reconciliation
from tollwatch.core.ingest import LoadResult
from tollwatch.prefect.quality_report import quality_markdown

#: Beyond this many days the per-day table would drown the page: show months instead.
MAX_DAY_ROWS = 62


#: At most this many differing days are listed in the report (the rest are counted).
MAX_DIFFERING_DAYS = 31


def ingest_report(
    completed: IngestionCompleted,
    result: LoadResult,
    counts: Reconciliation | None = None,
    quality: QualitySummary | None = None,
) -> str:
    """The audit's verdict and picture first (when the load was audited), then the summary, the reconciliation with
    the upstream, rejects by reason, and rows per day (or month) and plaza."""
    title = f"Ingest {completed.mode} {completed.window or ''}"
    lines = [quality_markdown(quality, title=title), "", "## The load"] if quality is not None else [f"# {title}"]
    lines += [
        "",
        "| refresh id | snapshot | fetched | written | rejected | replay |",
        "|---|---|---|---|---|---|",
        f"| `{completed.refresh_id}` | {completed.snapshot_id} | {completed.rows_fetched} | "
        f"{completed.rows_written} | {completed.rows_rejected} | {completed.already_committed} |",
        "",
        f"Landing: `{completed.landing_uri}`",
    ]
    if completed.committed_through is not None:
        lines += ["", f"Committed through upstream rowsUpdatedAt `{completed.committed_through}`."]
    lines += ["", *_reconciliation(counts)]
    if completed.run_page_url:
        lines += ["", f"Merged on Databricks: [{completed.run_page_url}]({completed.run_page_url})"]
    if result.reject_reasons:
        lines += ["", "## Rejected rows (quarantined under `rejected/`)", "", "| reason | rows |", "|---|---|"]
        lines += [f"| {reason} | {n} |" for reason, n in result.reject_reasons.most_common()]
    lines += ["", *_pivot(result)]
    return "\n".join(lines)


def _reconciliation(counts: Reconciliation | None) -> list[str]:
    if counts is None:
        return ["Upstream reconciliation: not available for this run."]
    if counts.matches:
        return [f"Upstream reconciliation of {counts.window}: **{counts.table_rows} rows = the upstream's count**."]
    out = [
        f"## Upstream reconciliation of {counts.window}: {counts.table_rows} rows in the table, "
        f"{counts.upstream_rows} upstream",
        "",
        "| day | upstream | table |",
        "|---|---|---|",
    ]
    out += [f"| {d.day} | {d.upstream} | {d.table} |" for d in counts.differing_days[:MAX_DIFFERING_DAYS]]
    if len(counts.differing_days) > MAX_DIFFERING_DAYS:
        out.append(f"| … {len(counts.differing_days) - MAX_DIFFERING_DAYS} more days | | |")
    return [*out, "", "`tollwatch audit --start … --stop … --repair` requests a window load of each differing day."]


def _pivot(result: LoadResult) -> list[str]:
    counts = result.rows_per_day_plaza
    if not counts:
        return ["No rows written."]
    days = {d for d, _ in counts}
    by_month = len(days) > MAX_DAY_ROWS

    def bucket(day: date) -> str:
        return day.strftime("%Y-%m") if by_month else day.isoformat()

    plazas = sorted({p for _, p in counts})
    grid: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
    for (day, plaza), n in counts.items():
        grid[bucket(day)][plaza] += n
    title = "month" if by_month else "day"
    out = [f"## Rows per {title} and plaza", "", f"| {title} | " + " | ".join(str(p) for p in plazas) + " |"]
    out.append("|---|" + "---|" * len(plazas))
    for key in sorted(grid):
        out.append(f"| {key} | " + " | ".join(str(grid[key].get(p, 0)) for p in plazas) + " |")
    return out
