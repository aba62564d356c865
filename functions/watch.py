"""`watch_upstream` (timer): announce each upstream publish once. The logic is `tollwatch.core.watermark`.

The schedule comes from the app setting `TOLLWATCH_WATCH_SCHEDULE` (an NCRONTAB expression with seconds)
when it is set — the host resolves `%TOLLWATCH_WATCH_SCHEDULE%` — and is every 15 minutes otherwise. The
timer never runs on startup (every scale-out or restart would tick), and a failed tick (Prefect or the
upstream unreachable) is retried three times, 30 s apart, before the next scheduled tick tries again.
"""

from __future__ import annotations

import logging
import os

import azure.functions as func

from tollwatch import resources
from tollwatch.contract.settings import load_settings

log = logging.getLogger(__name__)

SCHEDULE_SETTING = "TOLLWATCH_WATCH_SCHEDULE"
DEFAULT_SCHEDULE = "0 */15 * * * *"


def schedule_expression() -> str:
    """`%TOLLWATCH_WATCH_SCHEDULE%` if that app setting exists (the host fails on a missing one), else the default."""
    return f"%{SCHEDULE_SETTING}%" if os.environ.get(SCHEDULE_SETTING) else DEFAULT_SCHEDULE


bp = func.Blueprint()


@bp.function_name("watch_upstream")
@bp.timer_trigger(arg_name="timer", schedule=schedule_expression(), run_on_startup=False)
@bp.retry(strategy="fixed_delay", max_retry_count="3", delay_interval="00:00:30")
def watch_upstream(timer: func.TimerRequest) -> None:
    """One tick: raises (so the invocation fails and is retried) whenever the watermark was not advanced safely."""
    settings = load_settings()
    with resources.upstream_watcher(settings) as watcher:
        result = watcher.check(past_due=timer.past_due)
    log.info("watch_upstream: %s", result.model_dump_json())
