"""The contract between a trigger (an ingestion that committed) and a local downstream job.

A job gets the table and snapshot that triggered it, not just "the table": reading at that snapshot makes a
run reproducible (a re-run sees the same rows even after later loads) and lets the output record its
lineage. These are pydantic models so a flow can take them as parameters and put them in events as JSON.
"""

from __future__ import annotations

from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field

from tollwatch.contract.errors import TollwatchError
from tollwatch.contract.events import Window
from tollwatch.contract.settings import Settings

# Snapshot summary keys a job writes on its output, so the output table's history says what it was built from.
from tollwatch.contract.table import JOB, UPSTREAM_REFRESH_ID, UPSTREAM_SNAPSHOT_ID, UPSTREAM_TABLE

__all__ = [
    "JOB",
    "UPSTREAM_REFRESH_ID",
    "UPSTREAM_SNAPSHOT_ID",
    "UPSTREAM_TABLE",
    "JobResult",
    "LocalJob",
    "UpstreamNotFoundError",
    "UpstreamRef",
]


class UpstreamNotFoundError(TollwatchError, LookupError):
    """The upstream table or snapshot a job was asked to read does not exist (not loaded yet, or expired)."""


class UpstreamRef(BaseModel):
    """The load that triggered a job: which table, at which snapshot, from which refresh."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    table: str = Field(description="identifier of the upstream table, e.g. bronze.bnt_traffic_hourly")
    snapshot_id: int | None = Field(default=None, description="read at this snapshot; None = the current one")
    refresh_id: str = Field(description="the refresh (load) that produced the snapshot")


class JobResult(BaseModel):
    """What a job run wrote; enough for a completion event and for a human reading the flow run."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    job: str
    table: str = Field(description="identifier of the output table")
    rows_written: int = Field(ge=0)
    days_replaced: int = Field(ge=0, description="days of the output whose rows were replaced (the window's days)")
    snapshot_id: int | None = Field(description="output snapshot after the run; None if nothing was committed")
    window: Window | None = None


class LocalJob(Protocol):
    """A downstream job that runs in-process (as opposed to a Databricks job started by run-now)."""

    def __call__(self, settings: Settings, window: Window, upstream: UpstreamRef) -> JobResult: ...
