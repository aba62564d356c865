"""What a Databricks compute spec must say before anything is submitted. Submitting, polling and the flows on
Databricks, with the Jobs API mocked at the HTTP layer: tests/integration/test_databricks.py.
"""

from __future__ import annotations

import pytest

from tollwatch.adapters.databricks_jobs import ComputeSpec


def test_compute_specs_refuse_incomplete_settings():
    with pytest.raises(ValueError, match="existing_cluster_id"):
        ComputeSpec(kind="existing_cluster")
    assert ComputeSpec(kind="existing_cluster", existing_cluster_id="0101-abc").existing_cluster_id == "0101-abc"
