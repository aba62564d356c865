"""Test driver, never production code: one ingest flow run in this process, SIGKILLed at a chosen point.

    python -m tests.faults._ingest_kill_driver <before-commit|after-commit> '<flow parameters as JSON>'

- `before-commit`: the load has landed and sealed its pages in Blob and written its Iceberg data files; the
  process dies as pyiceberg is about to swap the catalog pointer (`Transaction.commit_transaction`), i.e. at
  the last moment before the commit. The table must already exist (its creation commits too).
- `after-commit`: the table store's commit returned (the snapshot is in the catalog); the process dies
  before the task returns, so no completion event is ever sent.

Right before dying it writes `KILLING <point> ...` to stdout, so the test knows the point was reached.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Callable
from typing import Any


def _say(text: str) -> None:
    os.write(1, f"{text}\n".encode())  # not print(): the flow's log_prints would route it through logging


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def kill_before_commit() -> None:
    from pyiceberg.table import Transaction

    def killed(self: Transaction) -> None:
        _say(f"KILLING before-commit: {len(self._updates)} table updates staged, none committed")
        _die()

    Transaction.commit_transaction = killed  # type: ignore[method-assign,assignment]


def kill_after_commit() -> None:
    from tollwatch.core.table import IcebergTableStore

    def wrap(real: Callable[..., int]) -> Callable[..., int]:
        def committed_then_killed(*args: Any, **kwargs: Any) -> int:
            snapshot_id = real(*args, **kwargs)
            _say(f"KILLING after-commit: snapshot {snapshot_id}")
            _die()
            return snapshot_id

        return committed_then_killed

    IcebergTableStore.commit_window = wrap(IcebergTableStore.commit_window)  # type: ignore[method-assign]
    IcebergTableStore.commit_merge = wrap(IcebergTableStore.commit_merge)  # type: ignore[method-assign]


KILL_POINTS = {"before-commit": kill_before_commit, "after-commit": kill_after_commit}


def main(argv: list[str]) -> int:
    point, parameters = argv[1], json.loads(argv[2])
    KILL_POINTS[point]()
    from tollwatch.prefect.flows.ingest import ingest

    ingest(**parameters)
    _say(f"NOT KILLED: the flow run finished without reaching {point}")
    return 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
