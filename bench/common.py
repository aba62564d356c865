"""What every benchmark reports: a figure, the baseline measured in the same run, and their ratio.

Absolute times drift on shared machines; a ratio against a baseline taken minutes earlier on the same box
does not. Nothing here runs in the test suite.
"""

from __future__ import annotations

import contextlib
import platform
import statistics
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


class Figure(BaseModel):
    """One measured number beside its same-run baseline (when it has one) and its goal."""

    group: str = Field(description="which figure of the benchmark issue, e.g. '1 event→Running'")
    name: str
    value: float
    unit: str
    baseline: float | None = None
    baseline_name: str | None = None
    better: Literal["lower", "higher"] = "lower"
    goal: str | None = None
    goal_met: bool | None = None
    note: str = ""

    @property
    def ratio(self) -> float | None:
        """How many times better than the baseline (>1 = better), whichever direction is better."""
        if self.baseline is None or not self.value or not self.baseline:
            return None
        return self.baseline / self.value if self.better == "lower" else self.value / self.baseline


class FigureFailed(Exception):
    """A figure was measured but missed a goal it must not miss (e.g. an event lost): its figures are still shown,
    and `python -m bench` exits non-zero."""

    def __init__(self, message: str, figures: list[Figure]) -> None:
        super().__init__(message)
        self.figures = figures


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, round(q / 100 * len(ordered) + 0.5)) if q < 100 else len(ordered)
    return ordered[min(rank, len(ordered)) - 1]


def summary(values: list[float]) -> dict[str, float]:
    return {
        "n": float(len(values)),
        "p50": statistics.median(values),
        "p95": percentile(values, 95),
        "max": max(values),
    }


def machine() -> dict[str, str]:
    """Where and when the numbers were taken (printed with the table and stored with the results)."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    cpus = subprocess.run(["nproc"], capture_output=True, text=True)
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit.stdout.strip() or "unknown",
        "python": platform.python_version(),
        "cpus": cpus.stdout.strip() or "?",
        "platform": platform.platform(),
    }


def cpu_by_service(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds (user + system) each service has used so far, with its children: the ones still running and the
    ones it has reaped (PostgreSQL's backends, the warm server's forked runs). A process that is gone is left out."""
    import psutil

    used: dict[str, float] = {}
    for name, pid in pids.items():
        try:
            process = psutil.Process(pid)
            t = process.cpu_times()
            total = t.user + t.system + t.children_user + t.children_system
            for child in process.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    c = child.cpu_times()
                    total += c.user + c.system
        except psutil.Error:
            continue
        used[name] = total
    return used
