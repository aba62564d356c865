"""The markdown artifact of an ingest run: what a human checks first when a number looks wrong."""

from __future__ import annotations

from collections import defaultdict
from datetime import date

from tollwatch.events import IngestionCompleted
from tollwatch.ingest import LoadResult

#: Beyond this many days the per-day table would drown the page: show months instead.
MAX_DAY_ROWS = 62


def ingest_report(completed: IngestionCompleted, result: LoadResult) -> str:
    """Summary, rejects by reason, and rows per day (or month) and plaza."""
    lines = [
        f"# Ingest {completed.mode} {completed.window or ''}",
        "",
        "| refresh id | snapshot | fetched | written | rejected | replay |",
        "|---|---|---|---|---|---|",
        f"| `{completed.refresh_id}` | {completed.snapshot_id} | {completed.rows_fetched} | "
        f"{completed.rows_written} | {completed.rows_rejected} | {completed.already_committed} |",
        "",
        f"Landing: `{completed.landing_uri}`",
    ]
    if completed.run_page_url:
        lines += ["", f"Merged on Databricks: [{completed.run_page_url}]({completed.run_page_url})"]
    if result.reject_reasons:
        lines += ["", "## Rejected rows (quarantined under `rejected/`)", "", "| reason | rows |", "|---|---|"]
        lines += [f"| {reason} | {n} |" for reason, n in result.reject_reasons.most_common()]
    lines += ["", *_pivot(result)]
    return "\n".join(lines)


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
