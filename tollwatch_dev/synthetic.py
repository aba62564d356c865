"""Deterministic synthetic rows shaped like MTA Bridges & Tunnels "Hourly Traffic" (data.ny.gov `qzve-kjga`).

Why synthetic: tests and local development need an upstream that is offline, repeatable and as large as
the real one (16 years of hourly rows) without shipping or materialising data. So every row is a pure
function of its position: `seq` -> (day, plaza, hour, direction) -> counts. Nothing here does I/O or keeps
state, which is what lets the mirror serve 3+ million rows with memory independent of history size.

Row order (and so `seq`, and so `:id`) is day by day, then plaza 1..11, hour 0..23, direction I then O:
`ROWS_PER_DAY` = 11 * 24 * 2 = 528 rows per day.

Noise is a hash of (seed, row key) rather than a draw from a global RNG stream, so any row can be computed
alone, in any order, from any thread. The row key is the *absolute* slot `date.toordinal() * 528 + slot`
(not `seq`, which depends on the mirror's history start), so the same date carries the same counts whatever
window a mirror was started with.

Upstream corrections (the mirror's revisions) are a pure function too: a row revised `n` times serves
`vehicles_e_zpass` plus `n` (see `revised_ezpass`), so every version of a row is visibly different from the
previous one and a test can compute what any version must hold.

Plaza names and volumes are illustrative, tuned so totals look plausible; they are not authoritative.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

PLAZA_COUNT = 11
HOURS = 24
DIRECTIONS = ("I", "O")
ROWS_PER_DAY = PLAZA_COUNT * HOURS * len(DIRECTIONS)  # 528

#: The user columns every row carries, in the order Socrata lists them.
BASE_COLUMNS = ("plaza_id", "date", "hour", "direction", "vehicles_e_zpass", "vehicles_vtoll")
#: Older exports carried cash counts under this name instead of `vehicles_vtoll` (schema drift).
CASH_COLUMN = "vehicles_cash"
VTOLL_COLUMN = "vehicles_vtoll"

_MASK64 = (1 << 64) - 1
_INV_2_32 = 1.0 / 4294967296.0


@dataclass(frozen=True)
class Plaza:
    """A toll plaza: id as served, a human name, and typical vehicles per day (both directions)."""

    plaza_id: int
    name: str
    daily_vehicles: int


PLAZAS: tuple[Plaza, ...] = (
    Plaza(1, "Robert F. Kennedy Bridge - Bronx Plaza", 85_000),
    Plaza(2, "Robert F. Kennedy Bridge - Manhattan Plaza", 75_000),
    Plaza(3, "Bronx-Whitestone Bridge", 120_000),
    Plaza(4, "Henry Hudson Bridge", 70_000),
    Plaza(5, "Marine Parkway-Gil Hodges Memorial Bridge", 22_000),
    Plaza(6, "Cross Bay Veterans Memorial Bridge", 20_000),
    Plaza(7, "Queens Midtown Tunnel", 80_000),
    Plaza(8, "Hugh L. Carey Tunnel", 55_000),
    Plaza(9, "Throgs Neck Bridge", 115_000),
    Plaza(10, "Verrazzano-Narrows Bridge - Brooklyn Plaza", 110_000),
    Plaza(11, "Verrazzano-Narrows Bridge - Staten Island Plaza", 150_000),
)

# Day-of-week volume multipliers (Monday=0); weekends also use a different hourly shape.
_WEEKDAY_FACTOR = (0.97, 1.0, 1.0, 1.01, 1.06, 0.86, 0.80)
_ROW_NOISE = 0.16  # +/- 8 % per row
_DAY_NOISE = 0.06  # +/- 3 % per day
_EZPASS_MIN_SHARE = 0.90
_EZPASS_SHARE_SPAN = 0.05  # share in [0.90, 0.95)


# ---------------------------------------------------------------------------------------------- hashing


def mix64(value: int) -> int:
    """SplitMix64 finaliser: a fast, well-spread 64-bit hash so noise needs no RNG state."""
    z = (value + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def seed_salt(seed: int) -> int:
    """Spread the seed over 64 bits once, so nearby seeds give unrelated streams."""
    return mix64(mix64(seed & _MASK64) ^ 0x5EED)


# ---------------------------------------------------------------------------------------------- shapes


def _bump(hour: float, centre: float, width: float) -> float:
    """A Gaussian bump: rush hours are peaks, not steps."""
    return math.exp(-0.5 * ((hour - centre) / width) ** 2)


def _hour_weight(hour: int, direction: str, weekend: bool) -> float:
    """Relative traffic for one hour and direction: night trough, AM inbound and PM outbound rushes."""
    h = hour + 0.5
    night_centre = 4.5 if weekend else 3.5
    distance = min(abs(h - night_centre), 24.0 - abs(h - night_centre))
    daytime = 1.0 - math.exp(-0.5 * (distance / 3.0) ** 2)
    if weekend:
        return 0.03 + 0.60 * daytime + 0.40 * _bump(h, 14.0, 3.5)
    if direction == "I":
        return 0.03 + 0.50 * daytime + 1.05 * _bump(h, 8.0, 1.1) + 0.30 * _bump(h, 17.5, 1.6)
    return 0.03 + 0.50 * daytime + 0.30 * _bump(h, 8.0, 1.2) + 1.05 * _bump(h, 17.5, 1.4)


def _base_table(weekend: bool) -> tuple[float, ...]:
    """Expected vehicles per row slot for a typical day, before day and row factors (528 entries)."""
    weights = [_hour_weight(h, d, weekend) for h in range(HOURS) for d in DIRECTIONS]
    scale = 1.0 / sum(weights)
    return tuple(plaza.daily_vehicles * w * scale for plaza in PLAZAS for w in weights)


_BASE = (_base_table(weekend=False), _base_table(weekend=True))
# Per slot: (plaza_id, hour, direction) as served strings; precomputed so paging does no formatting.
_SLOTS: tuple[tuple[str, str, str], ...] = tuple(
    (str(plaza.plaza_id), str(h), d) for plaza in PLAZAS for h in range(HOURS) for d in DIRECTIONS
)


def _season_factor(day: date) -> float:
    """Summer is busier than winter (~ +/- 7 %)."""
    return 1.0 + 0.07 * math.sin(2.0 * math.pi * (day.timetuple().tm_yday - 105) / 365.25)


def day_factor(salt: int, day: date) -> float:
    """Volume multiplier for a whole day: weekday, season and a hashed per-day wobble."""
    wobble = (mix64(salt ^ (day.toordinal() * 0x9E37)) >> 32) * _INV_2_32 - 0.5
    return _WEEKDAY_FACTOR[day.weekday()] * _season_factor(day) * (1.0 + _DAY_NOISE * wobble)


def _split(expected: float, hashed: int) -> tuple[int, int]:
    """Turn an expected total into (e_zpass, other) counts using two independent halves of one hash."""
    noise = (hashed >> 32) * _INV_2_32 - 0.5
    total = max(0, round(expected * (1.0 + _ROW_NOISE * noise)))
    share = _EZPASS_MIN_SHARE + _EZPASS_SHARE_SPAN * (hashed & 0xFFFFFFFF) * _INV_2_32
    ezpass = round(total * share)
    return ezpass, total - ezpass


# ---------------------------------------------------------------------------------------------- positions


@dataclass(frozen=True)
class RowPosition:
    """Where a row sits: day index from history start, plaza id, hour and direction."""

    day_index: int
    plaza_id: int
    hour: int
    direction: str


def slot_of(plaza_id: int, hour: int, direction: str) -> int:
    """Index of (plaza, hour, direction) inside a day, 0..527."""
    if not 1 <= plaza_id <= PLAZA_COUNT or not 0 <= hour < HOURS or direction not in DIRECTIONS:
        raise ValueError(f"no such row slot: plaza {plaza_id}, hour {hour}, direction {direction!r}")
    return ((plaza_id - 1) * HOURS + hour) * 2 + DIRECTIONS.index(direction)


def position(seq: int) -> RowPosition:
    """Inverse of `seq_of` for a row's sequence number."""
    if seq < 0:
        raise ValueError(f"seq must be >= 0, got {seq}")
    day_index, slot = divmod(seq, ROWS_PER_DAY)
    plaza_index, rest = divmod(slot, HOURS * 2)
    hour, direction = divmod(rest, 2)
    return RowPosition(day_index, plaza_index + 1, hour, DIRECTIONS[direction])


def row_id(seq: int) -> str:
    """Socrata-style `:id`, zero-padded so lexical order equals `seq` order (stable `$order=:id` paging)."""
    return f"row-{seq:012d}"


def floating_timestamp(day: date) -> str:
    """A Socrata floating timestamp at midnight, e.g. `2024-03-05T00:00:00.000`."""
    return f"{day.isoformat()}T00:00:00.000"


def iso_utc(epoch_s: int) -> str:
    """A Socrata fixed timestamp for system fields, e.g. `2026-01-01T00:00:00.000Z`."""
    return datetime.fromtimestamp(epoch_s, UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")


# ---------------------------------------------------------------------------------------------- rows


def revised_ezpass(ezpass: int, revisions: int) -> int:
    """`vehicles_e_zpass` of a row after `revisions` upstream corrections (0: as first published).

    Why this shape: adding the revision count keeps values plausible and non-negative, makes each version
    differ from the one before, and needs no state.
    """
    return ezpass + revisions


def hourly_counts(seed: int, day: date, plaza_id: int, hour: int, direction: str) -> tuple[int, int]:
    """(e_zpass, other) vehicles for one absolute row; the same for a date whatever the history start."""
    slot = slot_of(plaza_id, hour, direction)
    salt = seed_salt(seed)
    expected = _BASE[day.weekday() >= 5][slot] * day_factor(salt, day)
    return _split(expected, mix64(salt ^ (day.toordinal() * ROWS_PER_DAY + slot)))


@dataclass(frozen=True)
class SyntheticTable:
    """The whole synthetic dataset from `start` on, addressed by `seq`; holds configuration only.

    `cash_until` (exclusive) simulates the old schema: rows dated before it carry `vehicles_cash`
    instead of `vehicles_vtoll`.
    """

    start: date
    seed: int = 42
    cash_until: date | None = None

    def day(self, day_index: int) -> date:
        """Calendar date of a day index."""
        return self.start + timedelta(days=day_index)

    def seq_of(self, day: date, plaza_id: int, hour: int, direction: str) -> int:
        """Sequence number of a row (days before `start` are an error)."""
        day_index = (day - self.start).days
        if day_index < 0:
            raise ValueError(f"{day} is before history start {self.start}")
        return day_index * ROWS_PER_DAY + slot_of(plaza_id, hour, direction)

    def other_column(self, day: date) -> str:
        """Which name the non-E-ZPass count has on that day (schema drift)."""
        return CASH_COLUMN if self.cash_until is not None and day < self.cash_until else VTOLL_COLUMN

    def row(self, seq: int, revisions: int = 0) -> dict[str, str]:
        """One row, O(1); `revisions` picks the version (see `revised_ezpass`)."""
        return next(self.rows(seq, seq + 1, revisions))

    def rows(self, lo: int, hi: int, revisions: int = 0) -> Iterator[dict[str, str]]:
        """Rows `seq` in [lo, hi) in order, all at the same version (`revisions` corrections applied);
        cost is per row, independent of `lo` and history size."""
        salt = seed_salt(self.seed)
        seq = max(lo, 0)
        while seq < hi:
            day_index, slot = divmod(seq, ROWS_PER_DAY)
            day_end = min(hi, (day_index + 1) * ROWS_PER_DAY)
            yield from self._day_rows(salt, day_index, slot, slot + day_end - seq, revisions)
            seq = day_end

    def _day_rows(
        self, salt: int, day_index: int, slot_lo: int, slot_hi: int, revisions: int
    ) -> Iterator[dict[str, str]]:
        """Rows of one day for slots [slot_lo, slot_hi); per-day work is hoisted out of the row loop."""
        day = self.day(day_index)
        date_text = floating_timestamp(day)
        other = self.other_column(day)
        base = _BASE[day.weekday() >= 5]
        factor = day_factor(salt, day)
        key_base = day.toordinal() * ROWS_PER_DAY
        for slot in range(slot_lo, slot_hi):
            ezpass, rest = _split(base[slot] * factor, mix64(salt ^ (key_base + slot)))
            plaza, hour, direction = _SLOTS[slot]
            yield {
                "plaza_id": plaza,
                "date": date_text,
                "hour": hour,
                "direction": direction,
                "vehicles_e_zpass": str(revised_ezpass(ezpass, revisions) if revisions else ezpass),
                other: str(rest),
            }
