"""The load-quality contract: which checks an audited load must pass, and how their outcome is reported.

Write-audit-publish: every load commits to an audit branch of the table, the checks below run on that branch, and
only a load without a failing `error` check is published to `main` and announced (`tollwatch.ingestion.completed`,
with the `QualitySummary` as its `quality`). A failing `error` check holds the load (`tollwatch.ingestion.held`);
a failing `warn` check publishes it with a warning. The spec is data (`quality.yaml` beside this module holds the
defaults for MTA B&T; `TOLLWATCH_QUALITY_SPEC` names another file), so a team tunes thresholds without code.

Models only (pydantic): the checks themselves are computed in `tollwatch.core.quality`.
"""

from __future__ import annotations

from datetime import date, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tollwatch.contract.errors import ConfigurationError, describe
from tollwatch.contract.events import Window

Severity = Literal["error", "warn"]
CheckName = Literal["reconciliation", "completeness", "volume", "reject_rate", "schema_drift"]
Verdict = Literal["passed", "warned", "held"]

#: The defaults, stated once as data.
DEFAULT_SPEC_FILE = Path(__file__).with_name("quality.yaml")


class _Spec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    severity: Severity = "error"
    enabled: bool = True


class ReconciliationSpec(_Spec):
    """Rows per loaded day on the audit branch against the upstream's count(*) for that day."""

    max_differing_rows_per_day: int = Field(default=0, ge=0)


class CompletenessSpec(_Spec):
    """Every plaza-day of the load has `hours` hours for each direction that plaza reports."""

    hours: int = Field(default=24, ge=1, le=24)


class VolumeSpec(_Spec):
    """Each plaza-day's vehicle total against the median of the same weekday over the trailing weeks in `main`."""

    trailing_weeks: int = Field(default=6, ge=1)
    min_history: int = Field(default=3, ge=1, description="fewer same-weekday days in main: the check is skipped")
    low_ratio: float = Field(default=0.5, ge=0)
    high_ratio: float = Field(default=2.0, gt=0)

    @model_validator(mode="after")
    def _consistent(self) -> VolumeSpec:
        """A range that is empty, or a history the trailing weeks can never supply, is a spec that cannot mean what
        its author wanted: refused when the spec is read, not discovered as a check that never judges."""
        if self.low_ratio >= self.high_ratio:
            raise ValueError(f"low_ratio ({self.low_ratio}) must be below high_ratio ({self.high_ratio})")
        if self.min_history > self.trailing_weeks:
            raise ValueError(
                f"min_history ({self.min_history}) cannot exceed trailing_weeks ({self.trailing_weeks}): "
                "the check would never judge a day"
            )
        return self


class RejectRateSpec(_Spec):
    """Rows rejected by typing, as a share of the rows read."""

    max_rate: float = Field(default=0.01, ge=0, le=1)


class SchemaDriftSpec(_Spec):
    """Upstream columns the contract does not know (added as strings) or contract columns the upstream dropped."""

    severity: Severity = "warn"


class QualitySpec(BaseModel):
    """All checks of an audited load."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    reconciliation: ReconciliationSpec = ReconciliationSpec()
    completeness: CompletenessSpec = CompletenessSpec()
    volume: VolumeSpec = VolumeSpec()
    reject_rate: RejectRateSpec = RejectRateSpec()
    schema_drift: SchemaDriftSpec = SchemaDriftSpec()


class CheckResult(BaseModel):
    """One check's outcome on one load."""

    model_config = ConfigDict(frozen=True)

    name: CheckName
    severity: Severity
    passed: bool
    #: False when the check could not be judged (e.g. too little history for `volume`); it then passes.
    evaluated: bool = True
    value: float | None = Field(default=None, description="the measured number (rows differing, rate, …)")
    threshold: str = Field(default="", description="the limit, in words, e.g. `= 0 rows/day` or `≤ 1%`")
    detail: str = Field(default="", description="one sentence for humans")
    findings: list[str] = Field(default_factory=list, description="the first offending items, e.g. a plaza-day")


class PlazaDay(BaseModel):
    """One plaza-day of the load, as the report draws it."""

    model_config = ConfigDict(frozen=True)

    plaza_id: int
    day: date
    total: int
    rows: int
    expected_rows: int
    missing_hours: list[int] = Field(default_factory=list)
    trailing_median: float | None = None
    trailing_low: int | None = None
    trailing_high: int | None = None


class QualitySummary(BaseModel):
    """What the checks found: the verdict, every check, and the plaza-days behind the volume picture."""

    model_config = ConfigDict(frozen=True)

    verdict: Verdict
    checks: list[CheckResult]
    plaza_days: list[PlazaDay] = Field(default_factory=list)

    @property
    def failing(self) -> list[CheckResult]:
        """Checks that hold the load."""
        return [c for c in self.checks if not c.passed and c.severity == "error"]

    @property
    def warnings(self) -> list[CheckResult]:
        return [c for c in self.checks if not c.passed and c.severity == "warn"]

    def brief(self) -> dict[str, object]:
        """The event's `quality`: the verdict and each check's outcome, without the plaza-day detail."""
        return {
            "verdict": self.verdict,
            "checks": [c.model_dump(mode="json") for c in self.checks],
            "warnings": [c.name for c in self.warnings],
            "failing": [c.name for c in self.failing],
        }


def load_spec(path: Path | None = None) -> QualitySpec:
    """The quality spec in `path` (YAML; None: `DEFAULT_SPEC_FILE`, the shipped defaults).

    A spec that cannot be read or does not validate raises `ConfigurationError` naming the file and the problem: a
    load must never run its audit on a half-understood spec (a misspelt key would otherwise silently keep a default).
    """
    import yaml  # lazily: only the flow side reads a spec; the rest of the contract stays light

    source = DEFAULT_SPEC_FILE if path is None else path
    try:
        data = yaml.safe_load(source.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigurationError(f"The quality spec {source} does not exist: create it or name another file.") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise ConfigurationError(f"The quality spec {source} cannot be read as YAML: {error}.") from None
    try:
        return QualitySpec.model_validate({} if data is None else data)
    except ValidationError as error:
        raise ConfigurationError(f"The quality spec {source} is invalid: {describe(error)}.") from None


# ---------------------------------------------------------------------------------------------- held loads


class HoldRecord(BaseModel):
    """Why a load is held, and what an operator needs to settle it (`tollwatch status` shows these)."""

    model_config = ConfigDict(frozen=True)

    refresh_id: str
    branch: str
    snapshot_id: int
    mode: Literal["refresh", "window"]
    window: Window | None = None
    touched: Window | None = None
    #: The publish a refresh loaded (its `rowsUpdatedAt`), so a later refresh that covers it can be told apart.
    rows_updated_at: int | None = None
    flow_run_id: str | None = None
    #: Where the load's sealed landing is (its manifest's prefix): an override after `main` moved rebuilds from it.
    landing_prefix: str | None = None
    rows_fetched: int = 0
    rows_written: int = 0
    rows_rejected: int = 0
    committed_through: int | None = None
    held_at: datetime
    failing: list[str]
    #: The checks' summary (`QualitySummary.brief()`).
    quality: dict[str, object] = Field(default_factory=dict)


class Settlement(BaseModel):
    """How an operator settled a held load."""

    model_config = ConfigDict(frozen=True)

    refresh_id: str
    action: Literal["published", "discarded"]
    by: str
    reason: str
    at: datetime
    snapshot_id: int | None = None
    #: The hold it settled (what the load was, why it was held): an override's announcement is built from it.
    held: HoldRecord | None = None
