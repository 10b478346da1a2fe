"""The Numenta Anomaly Benchmark's scoring rules, as plain functions over arrays.

NAB scores a detector file by file. The first ``min(floor(0.15 * rows), 750)`` rows are a
probationary period and are not scored. A detection is a row whose anomaly score is at or
above the threshold. Inside a labelled window only the *first* detection counts, worth a
scaled sigmoid of its position in the window (the window's first row is worth ``tpWeight``,
its last almost nothing); a window without a detection costs ``fnWeight``. Each detection
outside every window costs ``fpWeight`` times the sigmoid of its distance past the preceding
window, measured in that window's widths (just after a window it is nearly free; from three
widths on, or with no window before it, it costs the full ``fpWeight``). A file's raw score
is the sum; the corpus score is the sum over files, normalised so that the null detector
(never fires) scores 0 and the perfect one (first row of every window) 100. One threshold is
shared by every file: the one that maximises the corpus score.

:func:`sweep` finds that threshold exactly: every distinct anomaly score is a candidate, and
sorting the scored rows once gives the corpus score at all of them. NAB's own optimiser is a
coarse-to-fine search over [0, 1]; the exact optimum is at least as good.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from numpy.typing import NDArray

PROBATION_PERCENT = 0.15
PROBATION_CAP_ROWS = 5000  # the cap is 15 % of 5000 rows: 750 rows


@dataclass(frozen=True, kw_only=True)
class CostMatrix:
    """What a scoring profile pays for a hit, a miss and a false alarm."""

    tp_weight: float
    fn_weight: float
    fp_weight: float
    tn_weight: float = 1.0  # NAB carries it in its profiles; no score uses it


# NAB's config/profiles.json; edgeloop.ml.nab_corpus reads the file and checks it matches.
PROFILES: dict[str, CostMatrix] = {
    "standard": CostMatrix(tp_weight=1.0, fn_weight=1.0, fp_weight=0.11),
    "reward_low_FP_rate": CostMatrix(tp_weight=1.0, fn_weight=1.0, fp_weight=0.22),
    "reward_low_FN_rate": CostMatrix(tp_weight=1.0, fn_weight=2.0, fp_weight=0.11),
}


def probationary_length(rows: int, percent: float = PROBATION_PERCENT) -> int:
    """How many leading rows of a file NAB leaves unscored."""
    return int(min(math.floor(percent * rows), percent * PROBATION_CAP_ROWS))


def scaled_sigmoid(position: NDArray[np.float64]) -> NDArray[np.float64]:
    """``2 * sigmoid(-5 x) - 1``, and exactly -1 beyond ``x = 3``: NAB's reward curve."""
    x = np.asarray(position, dtype=np.float64)
    with np.errstate(over="ignore"):  # exp overflows to inf far right: the value is -1 there
        value = 2.0 / (1.0 + np.exp(5.0 * x)) - 1.0
    return np.where(x > 3.0, -1.0, value)


_MAX_TP = float(scaled_sigmoid(np.array(-1.0)))  # a window's first row


@dataclass(frozen=True)
class FileLabels:
    """A file's shape as NAB scores it: its length and its windows as inclusive row ranges."""

    rows: int
    windows: tuple[tuple[int, int], ...]

    def __post_init__(self) -> None:
        previous_end = -1
        for start, end in self.windows:
            if not previous_end < start <= end < self.rows:
                raise ValueError(
                    f"windows must be ordered, disjoint row ranges within {self.rows} rows; "
                    f"got {list(self.windows)}"
                )
            previous_end = end

    @property
    def probation(self) -> int:
        """Rows at the start that are not scored."""
        return probationary_length(self.rows)

    @cached_property
    def window_of(self) -> NDArray[np.int64]:
        """For each row, the index of its window, or -1 outside every window."""
        owner = np.full(self.rows, -1, dtype=np.int64)
        for index, (start, end) in enumerate(self.windows):
            owner[start : end + 1] = index
        return owner

    @property
    def scored_windows(self) -> int:
        """Windows with at least one row after the probationary period: the ones scored."""
        return sum(1 for _, end in self.windows if end >= self.probation)

    def detection_values(self, cost: CostMatrix) -> NDArray[np.float64]:
        """What a detection at each row is worth under ``cost`` (negative outside windows)."""
        values = np.empty(self.rows, dtype=np.float64)
        rows = np.arange(self.rows, dtype=np.float64)
        # Before the first window a false positive has nothing to be near: full cost.
        values[:] = -cost.fp_weight
        for index, (start, end) in enumerate(self.windows):
            width = end - start + 1
            inside = rows[start : end + 1]
            values[start : end + 1] = (
                scaled_sigmoid(-(end - inside + 1) / width) * cost.tp_weight / _MAX_TP
            )
            stop = self.windows[index + 1][0] if index + 1 < len(self.windows) else self.rows
            # NAB divides by width - 1; a one-row window would divide by zero there.
            after = rows[end + 1 : stop]
            values[end + 1 : stop] = scaled_sigmoid((after - end) / max(width - 1, 1)) * (
                cost.fp_weight
            )
        return values


def window_rows(
    timestamps: NDArray[np.datetime64],
    windows: Sequence[tuple[np.datetime64, np.datetime64]],
) -> tuple[tuple[int, int], ...]:
    """Labelled windows (first and last timestamp, inclusive) as inclusive row ranges.

    As in NAB, a window starts at the first row (after the previous window) stamped with its
    start and ends at the first row stamped with its end: some NAB files repeat or step back
    an hour at a clock change, so rows are matched by timestamp, not by order. A bound that
    falls between rows takes the rows inside it.
    """
    ranges: list[tuple[int, int]] = []
    for start, end in windows:
        after = ranges[-1][1] + 1 if ranges else 0
        starts = np.flatnonzero(timestamps[after:] == start)
        if not starts.size:
            starts = np.flatnonzero(timestamps[after:] >= start)
            if not starts.size:
                continue
        first = after + int(starts[0])
        ends = np.flatnonzero(timestamps == end)
        if ends.size and int(ends[0]) >= first:
            last = int(ends[0])
        else:
            beyond = np.flatnonzero(timestamps[first:] > end)
            last = first + int(beyond[0]) - 1 if beyond.size else timestamps.size - 1
            if last < first:
                continue
        ranges.append((first, last))
    return tuple(ranges)


@dataclass(frozen=True, kw_only=True)
class FileScore:
    """One file's NAB score at one threshold, with NAB's row counts (scored rows only)."""

    score: float
    tp: int
    tn: int
    fp: int
    fn: int
    total: int


def score_file(
    labels: FileLabels, scores: NDArray[np.float64], threshold: float, cost: CostMatrix
) -> FileScore:
    """A file's raw NAB score: rows scoring ``>= threshold`` are detections."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != (labels.rows,):
        raise ValueError(f"expected {labels.rows} anomaly scores, got {scores.shape}")
    values = labels.detection_values(cost)
    probation = labels.probation
    detected = scores >= threshold
    detected[:probation] = False
    in_window = labels.window_of >= 0
    scored = np.arange(labels.rows) >= probation
    total = float(values[detected & ~in_window].sum())
    for start, end in labels.windows:
        if end < probation:
            continue
        hits = np.flatnonzero(detected[start : end + 1])
        total += float(values[start + hits[0]]) if hits.size else -cost.fn_weight
    return FileScore(
        score=total,
        tp=int((detected & in_window).sum()),
        tn=int((~detected & ~in_window & scored).sum()),
        fp=int((detected & ~in_window).sum()),
        fn=int((~detected & in_window & scored).sum()),
        total=labels.rows,
    )


@dataclass(frozen=True)
class Sweep:
    """The corpus score at every candidate threshold, highest threshold first.

    ``thresholds[0]`` is ``inf`` (nothing detected); each later entry is a distinct anomaly
    score, at which every row scoring at least that much is a detection.
    """

    thresholds: NDArray[np.float64]
    scores: NDArray[np.float64]

    def best(self) -> tuple[float, float]:
        """The threshold with the highest corpus score (the highest such threshold on a tie)."""
        index = int(np.argmax(self.scores))
        return float(self.thresholds[index]), float(self.scores[index])

    def at(self, threshold: float) -> float:
        """The corpus score with rows scoring ``>= threshold`` detected."""
        # thresholds descend; the last candidate at or above ``threshold`` detects the same rows
        index = int(np.searchsorted(-self.thresholds, -threshold, side="right")) - 1
        return float(self.scores[index])


def sweep(files: Sequence[tuple[FileLabels, NDArray[np.float64]]], cost: CostMatrix) -> Sweep:
    """Corpus scores at every threshold, from one sort of all scored rows.

    Lowering the threshold past a row adds its value if it is outside every window; inside
    a window it raises the window's worth to the row's value if that is higher (the earliest
    detection is the most valuable, so the window is worth its best detected row).
    """
    event_scores: list[NDArray[np.float64]] = []
    event_gains: list[NDArray[np.float64]] = []
    base = 0.0
    for labels, raw in files:
        scores = np.asarray(raw, dtype=np.float64)
        if scores.shape != (labels.rows,):
            raise ValueError(f"expected {labels.rows} anomaly scores, got {scores.shape}")
        values = labels.detection_values(cost)
        probation = labels.probation
        outside = labels.window_of < 0
        outside[:probation] = False
        event_scores.append(scores[outside])
        event_gains.append(values[outside])
        for start, end in labels.windows:
            first = max(start, probation)
            if first > end:
                continue
            base -= cost.fn_weight
            order = np.argsort(-scores[first : end + 1], kind="stable")
            running = np.maximum.accumulate(
                np.concatenate(([-cost.fn_weight], values[first : end + 1][order]))
            )
            event_scores.append(scores[first : end + 1][order])
            event_gains.append(np.diff(running))
    all_scores = np.concatenate(event_scores) if event_scores else np.empty(0)
    all_gains = np.concatenate(event_gains) if event_gains else np.empty(0)
    order = np.argsort(-all_scores, kind="stable")
    sorted_scores = all_scores[order]
    totals = base + np.cumsum(all_gains[order])
    # The corpus score at a threshold counts every row at or above it: a tie group's last row.
    group_ends = np.flatnonzero(np.diff(sorted_scores) != 0)
    group_ends = np.append(group_ends, sorted_scores.size - 1) if sorted_scores.size else group_ends
    return Sweep(
        thresholds=np.concatenate(([np.inf], sorted_scores[group_ends])),
        scores=np.concatenate(([base], totals[group_ends])),
    )


def null_score(files: Sequence[FileLabels], cost: CostMatrix) -> float:
    """The corpus score of a detector that never fires: every scored window missed."""
    return -cost.fn_weight * sum(labels.scored_windows for labels in files)


def perfect_score(windows: int, cost: CostMatrix) -> float:
    """The corpus score of a detector that fires on the first row of every window."""
    return windows * cost.tp_weight


def normalized_score(raw: float, null: float, perfect: float) -> float:
    """NAB's reported score: 0 for the null detector, 100 for the perfect one."""
    return 100.0 * (raw - null) / (perfect - null)
