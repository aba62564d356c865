"""A local stack of a test module's own, started, pointed at and deployed into (tests that need real runs).

Stacks run the Prefect server on PostgreSQL unless the module asks for `LocalStack(..., db="sqlite")` (only
tests/integration/test_chain.py does, as the smoke test of that option)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import pytest

from tollwatch_dev.stack import LocalStack, StackEndpoints


@contextmanager
def deployed_stack(local: LocalStack, env: Mapping[str, str] | None = None) -> Iterator[StackEndpoints]:
    """Start `local` with `env` set (its worker and every flow run inherit it), point this process at it,
    deploy prefect.yaml into its local pool, and stop everything afterwards."""
    from prefect.settings import temporary_settings

    from tollwatch.prefect.deploy import deploy

    with pytest.MonkeyPatch.context() as patch:
        for key, value in (env or {}).items():
            patch.setenv(key, value)
        endpoints = local.up()
        try:
            for key, value in endpoints.env().items():
                patch.setenv(key, value)
            with temporary_settings(updates=endpoints.prefect_settings()):
                deploy("local")
                yield endpoints
        finally:
            local.down()
