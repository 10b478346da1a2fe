"""Event-level quality of a detector's decisions against labelled faults.

The simulator labels each reading with whether a fault is active; a detector decides, per
reading, whether it is anomalous. A fault is an *episode* (a run of labelled readings); an
alarm is a run of decisions. An episode is detected when an alarm starts within it (or within
``grace`` readings after it: a fault may show only as it ends); the delay is the readings from
the episode's start to that alarm. Alarms that start outside every episode (and its grace) are
false alarms.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class FaultDetection:
    """How well a run of decisions caught the labelled faults."""

    episodes: int  # labelled fault episodes
    detected: int  # episodes with an alarm starting inside (or within the grace after)
    alarms: int  # runs of consecutive decisions
    false_alarms: int  # alarms starting outside every episode and its grace
    delays: tuple[int, ...]  # readings from each detected episode's start to its first alarm

    @property
    def recall(self) -> float:
        """Detected episodes over all episodes (1.0 when there are none)."""
        return self.detected / self.episodes if self.episodes else 1.0

    @property
    def precision(self) -> float:
        """Alarms that fell on a fault over all alarms (1.0 when there are none)."""
        return (self.alarms - self.false_alarms) / self.alarms if self.alarms else 1.0

    @property
    def mean_delay(self) -> float | None:
        """Mean detection delay in readings, None when nothing was detected."""
        return statistics.fmean(self.delays) if self.delays else None

    @property
    def median_delay(self) -> float | None:
        """Median detection delay in readings, None when nothing was detected."""
        return float(statistics.median(self.delays)) if self.delays else None


def runs(flags: Sequence[bool]) -> list[tuple[int, int]]:
    """The runs of true values as inclusive (first, last) index pairs."""
    spans: list[tuple[int, int]] = []
    start = -1
    for index, flag in enumerate(flags):
        if flag and start < 0:
            start = index
        elif not flag and start >= 0:
            spans.append((start, index - 1))
            start = -1
    if start >= 0:
        spans.append((start, len(flags) - 1))
    return spans


def fault_detection(
    labels: Sequence[bool], decisions: Sequence[bool], *, grace: int = 0
) -> FaultDetection:
    """Score ``decisions`` against ``labels`` (both one flag per reading)."""
    if len(labels) != len(decisions):
        raise ValueError(f"{len(labels)} labels but {len(decisions)} decisions")
    if grace < 0:
        raise ValueError("grace must be >= 0")
    episodes = runs(labels)
    alarm_starts = [first for first, _ in runs(decisions)]
    delays: list[int] = []
    matched: set[int] = set()
    for first, last in episodes:
        inside = [s for s in alarm_starts if first <= s <= last + grace]
        if inside:
            delays.append(inside[0] - first)
        matched.update(inside)
    return FaultDetection(
        episodes=len(episodes),
        detected=len(delays),
        alarms=len(alarm_starts),
        false_alarms=len(alarm_starts) - len(matched),
        delays=tuple(delays),
    )
