"""The write-audit-publish checks: is what a load committed to its audit branch fit to publish to `main`?

Pure computation. The caller scans the audit branch (the days the load touched) and `main` (the trailing weeks
before them) in record batches and folds each batch into a `Profile`; `audit` then judges the two profiles, the
upstream's row counts per day, the typing's reject count and the upstream's column names against a `QualitySpec`
(`tollwatch.contract.quality`). Nothing here reads a table, calls the upstream or emits an event, so every check is
a unit test away, and the same function serves the ingest flow and an operator re-judging a held load.

Why a profile and not the rows: a one-year backfill is ~193,000 rows (11 plazas x 365 days x 24 hours x 2
directions), but the checks only need, per plaza-day, the vehicle total, the row count and which (direction, hour)
slots exist. A profile keeps exactly that (one small entry per plaza-day: ~4,000 for a year), so the scan can
stream batches and drop each one after `Profile.add`.

Which plaza-days are judged: every plaza-day the load holds, and also every plaza that is *regular* on a loaded day
but absent from it: regular = it has rows in `main` on at least `volume.min_history` of the same weekday over the
`volume.trailing_weeks` before. Without that, a plaza the upstream stopped publishing passes every check
(reconciliation compares with an upstream that lacks it too); with it, the absent plaza-day is incomplete (every
hour missing) and out of volume range (0 vehicles).
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date, timedelta

import pyarrow as pa
import pyarrow.compute as pc

from tollwatch.contract.errors import TollwatchError
from tollwatch.contract.quality import (
    CheckResult,
    CompletenessSpec,
    PlazaDay,
    QualitySpec,
    QualitySummary,
    ReconciliationSpec,
    RejectRateSpec,
    SchemaDriftSpec,
    Verdict,
    VolumeSpec,
)
from tollwatch.contract.table import COLUMNS, KEY, target_columns

#: The key columns, named by the contract (plaza_id, date, hour, direction).
PLAZA, DAY, HOUR, DIRECTION = KEY
#: The vehicle counts summed into a plaza-day's total (every `long` column of the contract); a null counts 0.
COUNT_COLUMNS: tuple[str, ...] = tuple(c.name for c in COLUMNS if c.type == "long")
#: What a scan feeding a `Profile` needs to read (project to these: the other columns are never looked at).
PROFILE_COLUMNS: tuple[str, ...] = (*KEY, *COUNT_COLUMNS)
#: A check lists at most this many findings: the summary travels in an event, which must stay small.
MAX_FINDINGS = 20
#: Hours of a day a profile records (the contract's `hour: not 0-23` check keeps others out of the table).
HOURS_PER_DAY = 24

_TIMES = "\N{MULTIPLICATION SIGN}"
_DASH = "\N{EN DASH}"
_AT_MOST = "\N{LESS-THAN OR EQUAL TO}"
_AT_LEAST = "\N{GREATER-THAN OR EQUAL TO}"
#: Weekday names independent of the process's locale (findings are read by people in any locale the same way).
_WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_TOTAL = "__tollwatch_total"


# ---------------------------------------------------------------------------------------------- the profile


@dataclass
class DayProfile:
    """One plaza-day: its vehicle total, its row count, and which hours each direction has.

    `hours` maps a direction to a bit mask of the hours present (bit h = hour h): 24 bits per direction instead
    of 48 tuples, so a year of plaza-days stays a few hundred kilobytes.
    """

    total: int = 0
    rows: int = 0
    hours: dict[str, int] = field(default_factory=dict)

    @property
    def directions(self) -> frozenset[str]:
        return frozenset(self.hours)

    @property
    def present(self) -> frozenset[tuple[str, int]]:
        """The (direction, hour) slots that have at least one row."""
        return frozenset((d, h) for d, mask in self.hours.items() for h in range(HOURS_PER_DAY) if mask >> h & 1)

    def hours_of(self, direction: str) -> list[int]:
        """The hours present for `direction`, ascending."""
        mask = self.hours.get(direction, 0)
        return [h for h in range(HOURS_PER_DAY) if mask >> h & 1]


@dataclass
class Profile:
    """Per (plaza_id, day): what the checks need of a set of table rows, built batch by batch with `add`.

    Rows without a plaza or a day cannot belong to a plaza-day and are not counted (the table's typing makes both
    required, so a table never holds one). A row whose direction or hour is null, or whose hour is outside 0-23,
    counts in the total and the rows but fills no slot.
    """

    days: dict[tuple[int, date], DayProfile] = field(default_factory=dict)

    @classmethod
    def of(cls, *batches: pa.RecordBatch | pa.Table) -> Profile:
        """A profile of `batches` (a convenience for callers and tests holding the rows already)."""
        profile = cls()
        for batch in batches:
            profile.add(batch)
        return profile

    def add(self, batch: pa.RecordBatch | pa.Table) -> Profile:
        """Fold `batch` into the profile (and return it, to chain): one pyarrow group-by per batch, then a merge
        of its groups (one per plaza, day, direction and hour) into the per-plaza-day entries."""
        names = set(batch.schema.names)
        missing = [name for name in KEY if name not in names]
        if missing:
            raise TollwatchError(
                f"A quality profile needs the columns {', '.join(KEY)}; the rows given lack {', '.join(missing)}: "
                f"scan the table with at least {', '.join(PROFILE_COLUMNS)}."
            )
        if batch.num_rows == 0:
            return self
        total: pa.Array | pa.ChunkedArray = pa.repeat(pa.scalar(0, pa.int64()), batch.num_rows)
        for name in COUNT_COLUMNS:
            if name in names:
                total = pc.add(total, pc.fill_null(batch.column(name).cast(pa.int64()), 0))
        keyed = pa.table({name: batch.column(name) for name in KEY} | {_TOTAL: total})
        grouped = keyed.group_by(list(KEY), use_threads=False).aggregate(
            [(_TOTAL, "sum"), (_TOTAL, "count", pc.CountOptions(mode="all"))]
        )
        columns = (PLAZA, DAY, DIRECTION, HOUR, f"{_TOTAL}_sum", f"{_TOTAL}_count")
        for plaza, day, direction, hour, vehicles, rows in zip(
            *(grouped.column(name).to_pylist() for name in columns), strict=True
        ):
            if plaza is None or day is None:
                continue
            entry = self.days.get((plaza, day))
            if entry is None:
                entry = self.days[(plaza, day)] = DayProfile()
            entry.total += vehicles or 0
            entry.rows += rows
            if direction is not None:
                slot = 1 << hour if hour is not None and 0 <= hour < HOURS_PER_DAY else 0
                entry.hours[direction] = entry.hours.get(direction, 0) | slot
        return self

    def rows_by_day(self) -> dict[date, int]:
        """Rows per day, over every plaza (what reconciliation compares with the upstream's count(*))."""
        counts: dict[date, int] = {}
        for (_, day), entry in self.days.items():
            counts[day] = counts.get(day, 0) + entry.rows
        return counts

    def directions_by_plaza(self) -> dict[int, set[str]]:
        """Every direction each plaza has a row in, over all its days."""
        found: dict[int, set[str]] = {}
        for (plaza, _), entry in self.days.items():
            found.setdefault(plaza, set()).update(entry.hours)
        return found


# ---------------------------------------------------------------------------------------------- the audit


def audit(
    spec: QualitySpec,
    *,
    loaded: Profile,
    history: Profile,
    upstream_by_day: dict[date, int] | None,
    rows_read: int,
    rows_rejected: int,
    columns: list[str],
    rows_superseded: int = 0,
) -> QualitySummary:
    """Judge a load: every enabled check of `spec`, the verdict, and the plaza-days behind the picture.

    - `loaded`: the audit branch's rows of the days the load touched;
    - `history`: `main`'s rows of [first loaded day - 7 x trailing_weeks, last loaded day] (a loaded day that is
      also in `history` holds main's old values, which only a later loaded day would compare with);
    - `upstream_by_day`: the upstream's row count per day of the load's window (None: not known, reconciliation is
      not evaluated);
    - `rows_read`, `rows_rejected`: what the typing saw and refused;
    - `rows_superseded`: fetched rows the dedupe dropped for a newer version of the same key (an upstream that
      re-issues a corrected row as a new row holds both; the table keeps one);
    - `columns`: the upstream's column names as read (empty: unknown, schema drift is not evaluated).
    """
    days = sorted({day for _, day in loaded.days} | set(upstream_by_day or {}))
    plaza_days = _plaza_days(spec, loaded, history, days)
    checks: list[CheckResult] = []
    if spec.reconciliation.enabled:
        checks.append(_reconciliation(spec.reconciliation, loaded, upstream_by_day, rows_rejected + rows_superseded))
    if spec.completeness.enabled:
        checks.append(_completeness(spec.completeness, plaza_days))
    if spec.volume.enabled:
        checks.append(_volume(spec.volume, plaza_days))
    if spec.reject_rate.enabled:
        checks.append(_reject_rate(spec.reject_rate, rows_read, rows_rejected))
    if spec.schema_drift.enabled:
        checks.append(_schema_drift(spec.schema_drift, columns))
    return QualitySummary(verdict=verdict_of(checks), checks=checks, plaza_days=[p.plaza_day for p in plaza_days])


def verdict_of(checks: Iterable[CheckResult]) -> Verdict:
    """`held` when a failing check is an `error`, else `warned` when one is a `warn`, else `passed`."""
    failing = {c.severity for c in checks if not c.passed}
    if "error" in failing:
        return "held"
    return "warned" if "warn" in failing else "passed"


@dataclass(frozen=True)
class _Judged:
    """A plaza-day with what completeness and volume need to know of it."""

    plaza_day: PlazaDay
    #: direction -> missing hours, for every expected direction that lacks some.
    missing: dict[str, list[int]]
    #: same-weekday totals of `main` (most recent first); judged by volume when at least `min_history`.
    trailing: list[int]


def _plaza_days(spec: QualitySpec, loaded: Profile, history: Profile, days: list[date]) -> list[_Judged]:
    """Every plaza-day to judge, sorted by (plaza, day): the loaded ones, and regular plazas absent on a loaded day."""
    volume = spec.volume
    hours = spec.completeness.hours
    plazas = sorted({plaza for plaza, _ in loaded.days} | {plaza for plaza, _ in history.days})
    directions = loaded.directions_by_plaza()
    for plaza, found in history.directions_by_plaza().items():
        directions.setdefault(plaza, set()).update(found)
    judged = []
    for plaza in plazas:
        for day in days:
            trailing = [
                history.days[(plaza, earlier)].total
                for week in range(1, volume.trailing_weeks + 1)
                if (plaza, earlier := day - timedelta(weeks=week)) in history.days
            ]
            entry = loaded.days.get((plaza, day))
            if entry is None:
                if len(trailing) < volume.min_history:
                    continue  # not regular on this weekday: its absence is not a finding
                entry = DayProfile()
            expected = sorted(directions.get(plaza, set()))
            missing: dict[str, list[int]] = {}
            for direction in expected:
                present = set(entry.hours_of(direction))
                lacking = [h for h in range(hours) if h not in present]
                if lacking:
                    missing[direction] = lacking
            enough = len(trailing) >= volume.min_history
            plaza_day = PlazaDay(
                plaza_id=plaza,
                day=day,
                total=entry.total,
                rows=entry.rows,
                expected_rows=hours * len(expected),
                missing_hours=sorted({h for lacking in missing.values() for h in lacking}),
                trailing_median=float(statistics.median(trailing)) if enough else None,
                trailing_low=min(trailing) if enough else None,
                trailing_high=max(trailing) if enough else None,
            )
            judged.append(_Judged(plaza_day=plaza_day, missing=missing, trailing=trailing))
    return judged


def _reconciliation(
    spec: ReconciliationSpec, loaded: Profile, upstream_by_day: dict[date, int] | None, rows_accounted: int = 0
) -> CheckResult:
    """Rows per day against the upstream's count(*): a load copies the upstream, so a difference is a lost or a
    duplicated row. Every day either side has is compared (a day only the upstream has was not loaded at all).

    Every upstream row must be accounted for: in the table, quarantined by the typing (`reject_rate` judges those,
    so one bad row is not held twice), or superseded by a newer version of its key that the upstream also serves
    (the table keeps one row per key). A shortfall is explained up to those `rows_accounted`; extra rows in the
    table never are."""
    limit = spec.max_differing_rows_per_day
    threshold = "= 0 rows/day differing" if limit == 0 else f"{_AT_MOST} {limit:,} rows/day differing"
    if upstream_by_day is None:
        return CheckResult(
            name="reconciliation",
            severity=spec.severity,
            passed=True,
            evaluated=False,
            threshold=threshold,
            detail="Not evaluated: the upstream's row counts per day were not available to compare with.",
        )
    table = loaded.rows_by_day()
    days = sorted(set(table) | set(upstream_by_day))
    counts = [(day, table.get(day, 0), upstream_by_day.get(day, 0)) for day in days]
    differing = sum(abs(rows - upstream) for _, rows, upstream in counts)
    unexplained, budget = [], rows_accounted
    for day, rows, upstream in counts:
        explained = min(budget, max(upstream - rows, 0))
        budget -= explained
        unexplained.append((day, rows, upstream, abs(rows + explained - upstream)))
    over = [(day, rows, upstream) for day, rows, upstream, left in unexplained if left > limit]
    if not days:
        detail = "No day to compare: neither the load nor the upstream has rows."
    elif over:
        detail = (
            f"{len(over)} of {len(days)} days differ from the upstream by more than {limit:,} rows "
            f"({differing:,} rows differ in all){_listed(len(over))}."
        )
    else:
        detail = f"All {len(days)} days have the upstream's row count" + (
            "." if differing == 0 else f" within {limit:,} rows ({differing:,} rows differ in all)."
        )
    return CheckResult(
        name="reconciliation",
        severity=spec.severity,
        passed=not over,
        value=differing,
        threshold=threshold,
        detail=detail,
        findings=[f"{day}: table {rows:,}, upstream {upstream:,}" for day, rows, upstream in over[:MAX_FINDINGS]],
    )


def _completeness(spec: CompletenessSpec, plaza_days: list[_Judged]) -> CheckResult:
    """Every hour of every direction a plaza reports: a missing hour is a gap readers would take for no traffic.
    The value is the number of missing rows (one per plaza, day, direction and hour)."""
    incomplete = [p for p in plaza_days if p.missing]
    missing_rows = sum(len(hours) for p in incomplete for hours in p.missing.values())
    findings = [
        f"plaza {p.plaza_day.plaza_id} {p.plaza_day.day} {direction}: {_hours_text(hours)} missing"
        for p in incomplete
        for direction, hours in sorted(p.missing.items())
    ]
    if not plaza_days:
        detail = "No plaza-day to judge: the load holds no rows."
    elif incomplete:
        detail = (
            f"{len(incomplete)} of {len(plaza_days)} plaza-days lack hours "
            f"({missing_rows:,} rows missing){_listed(len(findings))}."
        )
    else:
        detail = f"All {len(plaza_days)} plaza-days have {spec.hours} hours in every direction their plaza reports."
    return CheckResult(
        name="completeness",
        severity=spec.severity,
        passed=not incomplete,
        value=missing_rows,
        threshold=f"{spec.hours} hours per direction a plaza reports",
        detail=detail,
        findings=findings[:MAX_FINDINGS],
    )


def _volume(spec: VolumeSpec, plaza_days: list[_Judged]) -> CheckResult:
    """Each plaza-day's total against the same weekday's median in `main`.

    A median of 0 (the plaza was at zero on at least half of those days): a total of 0 passes (closed, and still
    closed), and any traffic is out of range on the high side (the ratio is infinite), because either the history
    in `main` is wrong or the plaza reopened, and both deserve a look before readers see it.
    """
    threshold = (
        f"{spec.low_ratio:g}{_TIMES}{_DASH}{spec.high_ratio:g}{_TIMES} the same-weekday median of the "
        f"{spec.trailing_weeks} trailing weeks (judged with {_AT_LEAST} {spec.min_history} of them)"
    )
    judged = [p for p in plaza_days if len(p.trailing) >= spec.min_history]
    unjudged = len(plaza_days) - len(judged)
    if not judged:
        return CheckResult(
            name="volume",
            severity=spec.severity,
            passed=True,
            evaluated=False,
            threshold=threshold,
            detail=(
                f"Not evaluated: none of the {len(plaza_days)} plaza-days has {spec.min_history} or more "
                f"same-weekday days in main's {spec.trailing_weeks} trailing weeks."
            ),
        )
    findings = []
    for p in judged:
        day = p.plaza_day
        median = statistics.median(p.trailing)
        ratio = day.total / median if median else (1.0 if day.total == 0 else float("inf"))
        if spec.low_ratio <= ratio <= spec.high_ratio:
            continue
        weekdays = _WEEKDAYS[day.day.weekday()] + ("s" if len(p.trailing) > 1 else "")
        of = f"of {len(p.trailing)} {weekdays}"
        findings.append(
            f"plaza {day.plaza_id} {day.day}: {day.total:,} vehicles, "
            + (f"{ratio:.2f}{_TIMES} the median {median:,.0f} {of}" if median else f"while the median {of} is 0")
        )
    skipped = f"; {unjudged} not judged (too little history)" if unjudged else ""
    if findings:
        detail = (
            f"{len(findings)} of {len(judged)} judged plaza-days are out of range{skipped}{_listed(len(findings))}."
        )
    else:
        detail = f"All {len(judged)} judged plaza-days are within range{skipped}."
    return CheckResult(
        name="volume",
        severity=spec.severity,
        passed=not findings,
        value=len(findings),
        threshold=threshold,
        detail=detail,
        findings=findings[:MAX_FINDINGS],
    )


def _reject_rate(spec: RejectRateSpec, rows_read: int, rows_rejected: int) -> CheckResult:
    """The typing's rejects as a share of what was read; nothing read is a rate of 0."""
    rate = rows_rejected / rows_read if rows_read else 0.0
    passed = rate <= spec.max_rate
    return CheckResult(
        name="reject_rate",
        severity=spec.severity,
        passed=passed,
        value=rate,
        threshold=f"{_AT_MOST} {spec.max_rate * 100:g}%",
        detail=(
            f"{rows_rejected:,} of {rows_read:,} rows read were rejected by typing ({rate:.2%})"
            + ("." if passed else f", above {spec.max_rate * 100:g}%.")
        ),
    )


def _schema_drift(spec: SchemaDriftSpec, columns: list[str]) -> CheckResult:
    """Upstream columns the contract does not know (the load adds them as strings) and required contract columns
    the upstream no longer sends. Unknown `:`-system fields are neither: the table never keeps them."""
    threshold = "no added or dropped columns"
    if not columns:
        return CheckResult(
            name="schema_drift",
            severity=spec.severity,
            passed=True,
            evaluated=False,
            threshold=threshold,
            detail="Not evaluated: the upstream's columns were not available.",
        )
    known = {c.name for c in COLUMNS}
    added = [c.name for c in target_columns(columns) if c.name not in known]
    present = set(columns)
    dropped = [c.upstream for c in COLUMNS if c.required and c.upstream not in present and c.name not in present]
    findings = [f"added: {name} (kept as a string column)" for name in added] + [
        f"dropped: {name} (required by the contract)" for name in dropped
    ]
    if findings:
        detail = f"The upstream's columns drifted from the contract: {len(added)} added, {len(dropped)} dropped."
    else:
        detail = f"The upstream's {len(columns)} columns are the contract's."
    return CheckResult(
        name="schema_drift",
        severity=spec.severity,
        passed=not findings,
        value=len(findings),
        threshold=threshold,
        detail=detail,
        findings=findings[:MAX_FINDINGS],
    )


# ---------------------------------------------------------------------------------------------- wording


def _listed(count: int) -> str:
    return f"; the first {MAX_FINDINGS} are listed" if count > MAX_FINDINGS else ""


def _hours_text(hours: list[int]) -> str:
    """`hour 5`, `hours 5, 6`, `hours 0-23`, `hours 1-4, 9`: runs of three or more hours are written as a range."""
    parts: list[str] = []
    start = previous = hours[0]
    for hour in [*hours[1:], None]:
        if hour is not None and hour == previous + 1:
            previous = hour
            continue
        if previous - start >= 2:
            parts.append(f"{start}-{previous}")
        else:
            parts.extend(str(h) for h in range(start, previous + 1))
        if hour is not None:
            start = previous = hour
    return ("hour " if len(hours) == 1 else "hours ") + ", ".join(parts)
