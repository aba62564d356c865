"""What a Spark merge reports: one shape for both sides of the process boundary.

`tollwatch-merge` fills it on the cluster and prints it as the `TOLLWATCH_RESULT=<json>` line; the flow reads that
line back (`tollwatch.adapters.spark_submit.read_result`, validated by pydantic against this same dataclass). Standard
library only, like the rest of the contract.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class MergeResult:
    """What the load did."""

    table: str
    mode: str
    refresh_id: str
    window: str | None = None
    already_committed: bool = False
    snapshot_id: int | None = None
    rows_read: int = 0
    rows_written: int = 0
    rows_rejected: int = 0
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    #: The days the load replaced or merged (`start/stop`), as its snapshots record them.
    touched: str | None = None
    #: The ledger's high-water mark after this load.
    committed_through: int | None = None
    #: Write-audit-publish on the cluster (`--audit`): the audit branch, whether the load reached `main`, the checks'
    #: summary (`QualitySummary.brief()`), and an operator's settlement when the refresh was settled before.
    branch: str | None = None
    published: bool = True
    quality: dict[str, Any] | None = None
    settled: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "rejected_by_reason": dict(sorted(self.rejected_by_reason.items()))}
