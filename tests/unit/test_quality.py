"""The write-audit-publish checks (tollwatch/core/quality.py) and their spec (tollwatch/contract/quality.py + .yaml).

Pure pyarrow: each test builds the audit branch's rows and main's trailing weeks as small tables with the table's
schema (`full_day` makes one plaza-day: 24 hours x both directions), profiles them, and reads the verdict, the
checks and their findings. Plaza-days are Wednesday 2024-01-03 and the same weekday in the weeks before.
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, timedelta
from itertools import pairwise
from pathlib import Path

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tollwatch.contract.errors import ConfigurationError, TollwatchError
from tollwatch.contract.quality import (
    DEFAULT_SPEC_FILE,
    CheckResult,
    QualitySpec,
    QualitySummary,
    RejectRateSpec,
    SchemaDriftSpec,
    VolumeSpec,
    load_spec,
)
from tollwatch.contract.table import COLUMNS
from tollwatch.core.quality import MAX_FINDINGS, Profile, audit, verdict_of
from tollwatch.core.schema import base_schema

SCHEMA = base_schema()
DAY = date(2024, 1, 3)  # a Wednesday
UPSTREAM_COLUMNS = [c.upstream for c in COLUMNS]
PER_ROW = 100  # e-ZPass vehicles per row; vtoll adds 1, cash is null (counts 0)
ROW_TOTAL = PER_ROW + 1
DAY_TOTAL = 48 * ROW_TOTAL  # a full plaza-day, both directions


def full_day(
    plaza: int,
    day: date = DAY,
    *,
    directions: tuple[str, ...] = ("I", "O"),
    hours: range | list[int] = range(24),
    per_row: int = PER_ROW,
    skip: tuple[tuple[str, int], ...] = (),
) -> pa.Table:
    """One plaza-day with the table's schema: a row per (direction, hour), minus the (direction, hour)s in `skip`."""
    return pa.Table.from_pylist(
        [
            {
                "plaza_id": plaza,
                "date": day,
                "hour": hour,
                "direction": direction,
                "vehicles_e_zpass": per_row,
                "vehicles_vtoll": 1 if per_row else 0,
                "vehicles_cash": None,
                "source_row_id": f"row-{plaza}-{day}-{direction}-{hour}",
                "source_updated_at": datetime(2024, 2, 1, tzinfo=UTC),
            }
            for direction in directions
            for hour in hours
            if (direction, hour) not in skip
        ],
        schema=SCHEMA,
    )


def trailing(plaza: int, weeks: int = 6, day: date = DAY, **kwargs: object) -> list[pa.Table]:
    """The same weekday in each of the `weeks` weeks before `day`, full days."""
    return [full_day(plaza, day - timedelta(weeks=week), **kwargs) for week in range(1, weeks + 1)]  # type: ignore[arg-type]


def judge(
    loaded: list[pa.Table],
    history: list[pa.Table],
    *,
    spec: QualitySpec | None = None,
    upstream: dict[date, int] | None = None,
    rows_read: int | None = None,
    rows_rejected: int = 0,
    columns: list[str] | None = None,
) -> QualitySummary:
    """`audit` with the defaults of a clean load: the upstream has exactly the loaded rows, nothing rejected, the
    contract's columns."""
    profile = Profile.of(*loaded)
    return audit(
        spec or QualitySpec(),
        loaded=profile,
        history=Profile.of(*history),
        upstream_by_day=profile.rows_by_day() if upstream is None else upstream,
        rows_read=sum(t.num_rows for t in loaded) if rows_read is None else rows_read,
        rows_rejected=rows_rejected,
        columns=UPSTREAM_COLUMNS if columns is None else columns,
    )


def check(summary: QualitySummary, name: str) -> CheckResult:
    (found,) = [c for c in summary.checks if c.name == name]
    return found


# ---------------------------------------------------------------------------------------------- verdicts


def test_a_complete_load_in_line_with_its_history_passes_every_check():
    summary = judge([full_day(1), full_day(2)], [*trailing(1), *trailing(2)])

    assert summary.verdict == "passed"
    assert [c.name for c in summary.checks] == [
        "reconciliation",
        "completeness",
        "volume",
        "reject_rate",
        "schema_drift",
    ]
    assert all(c.passed and c.evaluated and not c.findings for c in summary.checks)
    assert summary.failing == summary.warnings == []
    assert [(p.plaza_id, p.day, p.total, p.rows, p.expected_rows, p.missing_hours) for p in summary.plaza_days] == [
        (1, DAY, DAY_TOTAL, 48, 48, []),
        (2, DAY, DAY_TOTAL, 48, 48, []),
    ]
    assert summary.plaza_days[0].trailing_median == DAY_TOTAL
    assert summary.brief()["verdict"] == "passed"


def test_one_missing_hour_holds_the_load_and_the_finding_names_plaza_day_direction_and_hour():
    summary = judge([full_day(4, skip=(("O", 5),)), full_day(2)], [*trailing(4), *trailing(2)])

    assert summary.verdict == "held"
    completeness = check(summary, "completeness")
    assert not completeness.passed
    assert completeness.findings == ["plaza 4 2024-01-03 O: hour 5 missing"]
    assert completeness.value == 1
    assert [c.name for c in summary.failing] == ["completeness"]
    (four,) = [p for p in summary.plaza_days if p.plaza_id == 4]
    assert (four.rows, four.expected_rows, four.missing_hours) == (47, 48, [5])


def test_missing_hours_are_listed_together_and_runs_as_ranges():
    summary = judge([full_day(4, skip=(("O", 5), ("O", 6), ("I", 0), ("I", 1), ("I", 2), ("I", 9)))], trailing(4))

    assert check(summary, "completeness").findings == [
        "plaza 4 2024-01-03 I: hours 0-2, 9 missing",
        "plaza 4 2024-01-03 O: hours 5, 6 missing",
    ]
    assert summary.plaza_days[0].missing_hours == [0, 1, 2, 5, 6, 9]


def test_a_plaza_at_zero_against_six_weeks_of_history_is_held_by_volume():
    summary = judge([full_day(7, per_row=0), full_day(2)], [*trailing(7), *trailing(2)])

    assert summary.verdict == "held"
    volume = check(summary, "volume")
    assert [c.name for c in summary.failing] == ["volume"]
    assert volume.value == 1
    assert volume.findings == [f"plaza 7 2024-01-03: 0 vehicles, 0.00\u00d7 the median {DAY_TOTAL:,} of 6 Wednesdays"]
    seven = summary.plaza_days[-1]
    assert (seven.plaza_id, seven.total, seven.trailing_median) == (7, 0, DAY_TOTAL)
    assert (seven.trailing_low, seven.trailing_high) == (DAY_TOTAL, DAY_TOTAL)


def test_a_day_loaded_twice_is_above_the_high_ratio():
    summary = judge([full_day(1), full_day(1), full_day(1)], trailing(1), upstream={DAY: 48})

    assert check(summary, "volume").findings == [
        f"plaza 1 2024-01-03: {3 * DAY_TOTAL:,} vehicles, 3.00\u00d7 the median {DAY_TOTAL:,} of 6 Wednesdays"
    ]
    assert check(summary, "reconciliation").findings == ["2024-01-03: table 144, upstream 48"]


def test_a_holiday_at_sixty_percent_of_the_median_passes():
    summary = judge([full_day(1, per_row=60)], trailing(1))

    assert check(summary, "volume").passed
    assert summary.verdict == "passed"


def test_with_less_history_than_min_history_volume_is_not_evaluated_and_passes():
    summary = judge([full_day(7, per_row=0)], trailing(7, weeks=2))

    volume = check(summary, "volume")
    assert (volume.passed, volume.evaluated, volume.findings) == (True, False, [])
    assert "Not evaluated" in volume.detail
    assert summary.verdict == "passed"
    assert summary.plaza_days[0].trailing_median is None


def test_only_the_same_weekday_counts_as_history_and_the_loaded_day_itself_does_not():
    other_weekdays = [full_day(1, DAY - timedelta(days=n)) for n in range(1, 20) if n % 7]
    summary = judge([full_day(1, per_row=0)], [*other_weekdays, full_day(1, DAY)])

    assert not check(summary, "volume").evaluated


def test_plaza_days_with_too_little_history_are_not_judged_while_the_others_are():
    summary = judge([full_day(1), full_day(9, per_row=0)], [*trailing(1), *trailing(9, weeks=2)])

    volume = check(summary, "volume")
    assert volume.passed
    assert volume.evaluated
    assert "1 not judged" in volume.detail


def test_a_plaza_at_zero_stays_at_zero_but_traffic_after_a_median_of_zero_is_out_of_range():
    closed = judge([full_day(3, per_row=0)], trailing(3, per_row=0))
    reopened = judge([full_day(3)], trailing(3, per_row=0))

    assert check(closed, "volume").passed
    assert check(reopened, "volume").findings == [
        f"plaza 3 2024-01-03: {DAY_TOTAL:,} vehicles, while the median of 6 Wednesdays is 0"
    ]


def test_a_regular_plaza_absent_from_the_load_is_incomplete_and_at_zero():
    summary = judge([full_day(1)], [*trailing(1), *trailing(2)])

    assert summary.verdict == "held"
    assert check(summary, "completeness").findings == [
        "plaza 2 2024-01-03 I: hours 0-23 missing",
        "plaza 2 2024-01-03 O: hours 0-23 missing",
    ]
    assert check(summary, "volume").findings[0].startswith("plaza 2 2024-01-03: 0 vehicles, 0.00\u00d7")
    two = summary.plaza_days[-1]
    assert (two.plaza_id, two.rows, two.expected_rows, len(two.missing_hours)) == (2, 0, 48, 24)


def test_a_plaza_seen_on_too_few_same_weekdays_is_not_expected():
    summary = judge([full_day(1)], [*trailing(1), *trailing(2, weeks=2)])

    assert summary.verdict == "passed"
    assert [p.plaza_id for p in summary.plaza_days] == [1]


def test_a_reject_burst_of_five_percent_holds_the_load():
    summary = judge([full_day(1)], trailing(1), rows_read=1000, rows_rejected=50)

    reject = check(summary, "reject_rate")
    assert summary.verdict == "held"
    assert (reject.passed, reject.value, reject.threshold) == (False, 0.05, "\u2264 1%")
    assert "50 of 1,000 rows" in reject.detail


def test_a_reject_rate_at_the_limit_passes_and_nothing_read_is_a_rate_of_zero():
    assert check(judge([full_day(1)], trailing(1), rows_read=100, rows_rejected=1), "reject_rate").passed
    empty = judge([], [], rows_read=0, rows_rejected=0)
    assert check(empty, "reject_rate").value == 0
    assert empty.verdict == "passed"
    assert empty.plaza_days == []


def test_an_upstream_count_that_differs_holds_the_load_by_reconciliation_naming_the_day():
    later = DAY + timedelta(days=1)
    summary = judge([full_day(1), full_day(1, later)], [], upstream={DAY: 49, later: 48, DAY + timedelta(days=2): 10})

    reconciliation = check(summary, "reconciliation")
    assert summary.verdict == "held"
    assert not reconciliation.passed
    assert reconciliation.findings == ["2024-01-03: table 48, upstream 49", "2024-01-05: table 0, upstream 10"]
    assert reconciliation.value == 11


def test_a_tolerance_per_day_lets_small_differences_pass():
    spec = QualitySpec.model_validate({"reconciliation": {"max_differing_rows_per_day": 1}})

    summary = judge([full_day(1)], [], upstream={DAY: 49}, spec=spec)

    assert check(summary, "reconciliation").passed
    assert check(summary, "reconciliation").value == 1


def test_without_upstream_counts_reconciliation_is_not_evaluated():
    profile = Profile.of(full_day(1))
    summary = audit(
        QualitySpec(),
        loaded=profile,
        history=Profile(),
        upstream_by_day=None,
        rows_read=48,
        rows_rejected=0,
        columns=UPSTREAM_COLUMNS,
    )

    reconciliation = check(summary, "reconciliation")
    assert (reconciliation.passed, reconciliation.evaluated) == (True, False)
    assert reconciliation.detail


def test_an_unknown_upstream_column_warns_and_the_load_is_published():
    summary = judge([full_day(1)], trailing(1), columns=[*UPSTREAM_COLUMNS, "vehicles_bus", ":created_at"])

    drift = check(summary, "schema_drift")
    assert summary.verdict == "warned"
    assert summary.failing == []
    assert [c.name for c in summary.warnings] == ["schema_drift"]
    assert drift.findings == ["added: vehicles_bus (kept as a string column)"]
    assert summary.brief()["warnings"] == ["schema_drift"]


def test_a_required_column_the_upstream_dropped_is_drift_and_no_columns_is_not_judged():
    without = [c for c in UPSTREAM_COLUMNS if c != "direction"]

    assert check(judge([full_day(1)], [], columns=without), "schema_drift").findings == [
        "dropped: direction (required by the contract)"
    ]
    # optional counts come and go between exports (vehicles_cash before, vehicles_vtoll now): not drift
    assert check(
        judge([full_day(1)], [], columns=[c for c in UPSTREAM_COLUMNS if c != "vehicles_cash"]), "schema_drift"
    ).passed
    unknown = check(judge([full_day(1)], [], columns=[]), "schema_drift")
    assert (unknown.passed, unknown.evaluated) == (True, False)


def test_a_one_direction_plaza_is_complete_with_only_its_direction():
    summary = judge([full_day(5, directions=("I",))], trailing(5, directions=("I",)))

    assert summary.verdict == "passed"
    assert check(summary, "completeness").passed
    assert summary.plaza_days[0].expected_rows == 24


def test_a_direction_seen_only_in_history_is_still_expected():
    summary = judge([full_day(5, directions=("I",))], trailing(5))

    assert check(summary, "completeness").findings == ["plaza 5 2024-01-03 O: hours 0-23 missing"]


def test_a_disabled_check_is_omitted_from_the_summary():
    spec = QualitySpec(volume=VolumeSpec(enabled=False))

    summary = judge([full_day(7, per_row=0)], trailing(7), spec=spec)

    assert "volume" not in [c.name for c in summary.checks]
    assert summary.verdict == "passed"


def test_a_check_set_to_warn_publishes_with_a_warning():
    spec = QualitySpec(reject_rate=RejectRateSpec(severity="warn"), schema_drift=SchemaDriftSpec(enabled=False))

    summary = judge([full_day(1)], trailing(1), rows_read=100, rows_rejected=50, spec=spec)

    assert summary.verdict == "warned"


def test_findings_are_bounded_and_the_detail_says_so():
    loaded = [full_day(plaza, skip=(("I", 3),)) for plaza in range(1, MAX_FINDINGS + 6)]

    completeness = check(judge(loaded, []), "completeness")

    assert len(completeness.findings) == MAX_FINDINGS
    assert completeness.value == MAX_FINDINGS + 5
    assert f"the first {MAX_FINDINGS} are listed" in completeness.detail


# ---------------------------------------------------------------------------------------------- the profile


def test_profile_over_two_batches_equals_profile_over_one():
    rows = pa.concat_tables([full_day(1), full_day(2, skip=(("I", 4),)), full_day(1, DAY + timedelta(days=1))])
    half = rows.num_rows // 2 + 7  # cuts a plaza-day in two

    assert Profile().add(rows.slice(0, half)).add(rows.slice(half)) == Profile.of(rows)
    assert Profile.of(*rows.to_batches(max_chunksize=10)) == Profile.of(rows)


def test_profile_sums_the_counts_with_nulls_as_zero_and_records_the_slots():
    profile = Profile.of(full_day(1, directions=("O",), hours=[0, 23]))

    (entry,) = profile.days.values()
    assert (entry.total, entry.rows) == (2 * ROW_TOTAL, 2)
    assert entry.present == {("O", 0), ("O", 23)}
    assert profile.rows_by_day() == {DAY: 2}
    assert profile.directions_by_plaza() == {1: {"O"}}


def test_profile_refuses_rows_without_the_key_columns():
    with pytest.raises(TollwatchError, match="lack hour"):
        Profile().add(full_day(1).drop_columns(["hour"]))


@settings(max_examples=60, deadline=None)
@given(cuts=st.lists(st.integers(0, 96), max_size=6))
def test_profile_does_not_depend_on_how_the_rows_are_batched(cuts):
    rows = pa.concat_tables([full_day(1), full_day(2, hours=range(0, 24, 2))])
    bounds = [0, *sorted(cuts), rows.num_rows]

    pieces = [rows.slice(start, stop - start) for start, stop in pairwise(bounds)]

    assert Profile.of(*pieces) == Profile.of(rows)


# ---------------------------------------------------------------------------------------------- the verdict


@given(outcomes=st.lists(st.tuples(st.sampled_from(["error", "warn"]), st.booleans()), max_size=5))
def test_held_iff_an_error_check_failed_warned_iff_only_warn_checks_failed(outcomes):
    checks = [CheckResult(name="volume", severity=severity, passed=passed) for severity, passed in outcomes]

    verdict = verdict_of(checks)

    error_failed = any(s == "error" and not p for s, p in outcomes)
    warn_failed = any(s == "warn" and not p for s, p in outcomes)
    assert (verdict == "held") == error_failed
    assert (verdict == "warned") == (warn_failed and not error_failed)
    assert (verdict == "passed") == (not error_failed and not warn_failed)


# ---------------------------------------------------------------------------------------------- the spec


def test_the_shipped_yaml_states_exactly_the_model_defaults():
    assert load_spec() == QualitySpec()
    assert load_spec(DEFAULT_SPEC_FILE) == QualitySpec()


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("volume:\n  low_ratio: -1\n", "volume.low_ratio"),
        ("volume:\n  low_ratio: 3\n", "low_ratio (3.0) must be below high_ratio"),
        ("reject_rate:\n  max_rate: 0.01\n  maxrate: 0.02\n", "reject_rate.maxrate"),
        ("completeness: [24]\n", "completeness"),
        ("volume: {low_ratio: 0.5\n", "cannot be read as YAML"),
    ],
)
def test_a_bad_spec_raises_configuration_error_naming_the_file(tmp_path: Path, text: str, problem: str):
    path = tmp_path / "team-quality.yaml"
    path.write_text(text)

    with pytest.raises(ConfigurationError, match=re.escape(problem)) as raised:
        load_spec(path)
    assert str(path) in str(raised.value)


def test_a_missing_spec_file_raises_configuration_error(tmp_path: Path):
    with pytest.raises(ConfigurationError, match=r"nowhere\.yaml"):
        load_spec(tmp_path / "nowhere.yaml")


def test_an_empty_spec_file_is_the_defaults_and_a_partial_one_overrides_only_what_it_names(tmp_path: Path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    partial = tmp_path / "partial.yaml"
    partial.write_text("volume:\n  low_ratio: 0.3\n")

    assert load_spec(empty) == QualitySpec()
    assert load_spec(partial) == QualitySpec(volume=VolumeSpec(low_ratio=0.3))


def test_a_shortfall_is_accounted_for_by_rejected_or_superseded_rows_but_an_extra_row_never_is():
    """Every upstream row is in the table, quarantined, or superseded by a newer version of its key; only what is
    none of these holds the load (one bad row is judged by reject_rate and completeness, not twice)."""

    def reconciliation(upstream: int, **counts: int) -> CheckResult:
        summary = audit(
            QualitySpec(),
            loaded=Profile.of(full_day(1)),
            history=Profile(),
            upstream_by_day={DAY: upstream},
            rows_read=48 + counts.get("rows_rejected", 0) + counts.get("rows_superseded", 0),
            columns=UPSTREAM_COLUMNS,
            **counts,
        )
        return check(summary, "reconciliation")

    assert not reconciliation(49, rows_rejected=0).passed  # one upstream row nowhere
    assert reconciliation(49, rows_rejected=1).passed  # quarantined
    assert reconciliation(49, rows_rejected=0, rows_superseded=1).passed  # an older version of a key it holds
    assert not reconciliation(50, rows_rejected=0, rows_superseded=1).passed  # one still unaccounted
    assert not reconciliation(47, rows_rejected=1).passed  # the table holds a row the upstream does not
