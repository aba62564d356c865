"""Local downstream jobs, looked up by name.

A flow or trigger names the job it runs (`local.job.<name>` is its Prefect resource), so names are the
stable interface: the registry turns a name into a callable and a typo into an error that lists what exists,
instead of a KeyError deep inside a flow run.
"""

from __future__ import annotations

from tollwatch.contract.errors import TollwatchError
from tollwatch.downstream.daily_totals import daily_totals
from tollwatch.downstream.models import JobResult, LocalJob, UpstreamNotFoundError, UpstreamRef

__all__ = [
    "LOCAL_JOBS",
    "JobResult",
    "LocalJob",
    "UnknownJobError",
    "UpstreamNotFoundError",
    "UpstreamRef",
    "local_job",
]

#: Every local job by the name triggers and events use.
LOCAL_JOBS: dict[str, LocalJob] = {
    "daily_totals": daily_totals,
}


class UnknownJobError(TollwatchError, ValueError):
    """No local job has that name; the message lists the ones that exist."""

    status = 400


def local_job(name: str) -> LocalJob:
    """The job registered as `name`."""
    try:
        return LOCAL_JOBS[name]
    except KeyError:
        known = ", ".join(sorted(LOCAL_JOBS)) or "(none)"
        raise UnknownJobError(f"no local job named {name!r}; known jobs: {known}") from None
