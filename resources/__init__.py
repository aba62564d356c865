"""The bundle's resources defined in Python (databricks.yml: `python.resources`): the Databricks CLI calls
`load_resources` with the selected target and the variables' values, as `python -m databricks.bundles.build`."""

from __future__ import annotations

from databricks.bundles.core import Bundle, Resources

from resources.jobs import daily_totals_job, merge_job


def load_resources(bundle: Bundle) -> Resources:
    resources = Resources()
    resources.add_job("tollwatch_merge", merge_job(bundle))
    resources.add_job("tollwatch_daily_totals", daily_totals_job(bundle))
    return resources
