"""Prefect automations and downstream subscriptions, declared as YAML in `automations/` and applied idempotently.

* `load`: read and validate every file (all problems at once, nothing applied on any error);
* `compile`: turn the declarations into Prefect `AutomationCore` objects, resolving block and deployment names;
* `apply`: compare with what the server has, then create / update / (with prune) delete by name.

The CLI (`tollwatch automations apply`) lives in `tollwatch.cli.automations`.
"""

from __future__ import annotations

from tollwatch.prefect.automations.models import MANAGED_TAG, PROJECT_TAG, AutomationsConfigError, Project

__all__ = ["MANAGED_TAG", "PROJECT_TAG", "AutomationsConfigError", "Project"]
