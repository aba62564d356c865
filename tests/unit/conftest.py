"""The unit layer: no Prefect server, no Azurite, no mirror, no Spark — in-memory fakes (tests/support/fakes.py) and,
where a table is the subject, pyiceberg on a temp directory. The whole layer runs in seconds (`make unit`).

A test that needs the real stack belongs in tests/integration: here, asking for the `stack` or `mirror` fixture
(directly or through `env`, `fenv`, ...) or carrying the `stack`/`spark` marker fails before anything starts.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

# Property-based tests and fuzzers (marker `fuzz`): a bounded number of examples in `make test` ("ci"), many more
# in `make fuzz` ("fuzz", HYPOTHESIS_PROFILE=fuzz). No deadline: a slow example on a busy 2-core machine is not a
# failure, a wrong answer is.
settings.register_profile("ci", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("fuzz", max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

#: The roots of every fixture in tests/conftest.py that starts a real component.
_REAL_COMPONENTS = frozenset({"stack", "mirror"})
_REAL_MARKERS = frozenset({"stack", "spark"})


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    fixtures = _REAL_COMPONENTS & set(getattr(item, "fixturenames", ()))
    markers = _REAL_MARKERS & {mark.name for mark in item.iter_markers()}
    if fixtures or markers:
        found = ", ".join([*(f"fixture {f!r}" for f in sorted(fixtures)), *(f"marker {m!r}" for m in sorted(markers))])
        pytest.fail(f"{item.nodeid} is in tests/unit but needs real components ({found}): move it to tests/integration")
