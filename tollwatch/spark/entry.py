"""What every Spark entry point of the wheel does around its work: log to the driver's stderr, print one result line.

The result line (`TOLLWATCH_RESULT=<json>`) is how a caller reads what the job did: spark-submit's stdout locally,
`jobs/runs/get-output` (`logs`) on Databricks.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

from tollwatch.contract import table as contract

log = logging.getLogger("tollwatch.spark")


def log_to_driver() -> None:
    """The jobs' progress on stderr (the driver log), without touching Spark's own logging."""
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)


def print_result(result: dict[str, Any]) -> dict[str, Any]:
    """Print the one result line and return the result."""
    print(contract.RESULT_MARKER + json.dumps(result, sort_keys=True), flush=True)
    return result
