"""Facts are stated once: the dataset, the event names and the compute defaults each have one home in the code."""

from __future__ import annotations

import re
from pathlib import Path
from typing import get_args

import pytest

from tollwatch.contract import compute
from tollwatch.contract.events import EventName
from tollwatch.prefect.automations.models import SUBSCRIBABLE_PAYLOADS, SubscribableEvent

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = [*sorted((ROOT / "tollwatch").rglob("*.py")), *sorted((ROOT / "functions").rglob("*.py"))]


def _code_lines(path: Path) -> list[tuple[int, str]]:
    """Lines of code, not comments or docstrings' prose (a fact may be mentioned; it may not be restated)."""
    lines = []
    in_docstring = False
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        stripped = line.strip()
        opens_or_closes = stripped.count('"""') == 1  # a one-line docstring opens and closes on its line
        if in_docstring or stripped.startswith(('"""', "#")):
            if opens_or_closes:
                in_docstring = not in_docstring
            continue
        lines.append((number, line.split(" #")[0]))
    return lines


def _stated(pattern: str) -> list[str]:
    regex = re.compile(pattern)
    return [
        f"{path.relative_to(ROOT)}:{number}"
        for path in PRODUCT
        for number, line in _code_lines(path)
        if regex.search(line)
    ]


@pytest.mark.parametrize(
    ("fact", "pattern", "home"),
    [
        ("the dataset id", r"qzve-kjga", "tollwatch/contract/settings.py"),
        ("the upstream domain", r"[\"']data\.ny\.gov[\"']", "tollwatch/contract/settings.py"),
        ("an event name", r"[\"']tollwatch\.(dataset|backfill|ingestion|job)\.[a-z]+[\"']", None),
        ("the Databricks runtime", re.escape(compute.SPARK_VERSION), "tollwatch/contract/compute.py"),
        ("the Databricks node type", re.escape(compute.NODE_TYPE_ID), "tollwatch/contract/compute.py"),
    ],
)
def test_a_fact_is_stated_in_one_module(fact, pattern, home):
    places = {place.split(":")[0] for place in _stated(pattern)}
    if home is None:  # event names: the contract's EventName, and the one Literal kept equal to it below
        allowed = {"tollwatch/contract/events.py", "tollwatch/prefect/automations/models.py"}
        assert places <= allowed, fact
    else:
        assert places == {home}, fact


def test_the_subscribable_events_are_event_names_with_a_payload_model():
    assert set(get_args(SubscribableEvent)) == set(SUBSCRIBABLE_PAYLOADS)
    assert set(SUBSCRIBABLE_PAYLOADS) <= {name.value for name in EventName}
