"""How well an appliance model catches labelled faults: event-level precision, recall, F1 and
detection delay, overall and per fault.

A fault is an *episode* (a run of readings labelled with a fault's name); an *alarm* is a
run of decisions. Episodes and alarms are matched as in :mod:`edgeloop.ml.evaluation`
(an alarm starting inside an episode, or within ``grace`` readings after it, detects it;
one starting elsewhere is a false alarm). Readings without a label count as normal.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from edgeloop.ml.appliance_model import AnomalyModel
from edgeloop.ml.evaluation import fault_detection

__all__ = ["FaultQuality", "LabelledSequence", "Quality", "evaluate"]

NORMAL = "normal"
DEFAULT_GRACE = 30  # readings after an episode in which an alarm still counts for it


@dataclass(frozen=True)
class LabelledSequence:
    """One kit's readings in time order, with their labels (None: unlabelled, normal)."""

    values: NDArray[np.float64]  # (readings, sensors), NaN = missing
    labels: Sequence[str | None]
    ts_ms: NDArray[np.int64]


@dataclass(frozen=True, kw_only=True)
class FaultQuality:
    """How one fault's episodes were caught."""

    episodes: int
    detected: int
    median_delay_s: float | None  # from the episode's first reading to its first alarm

    @property
    def recall(self) -> float:
        return self.detected / self.episodes if self.episodes else 1.0


@dataclass(frozen=True, kw_only=True)
class Quality:
    """A model's decisions against the labels of some sequences."""

    readings: int
    episodes: int
    detected: int
    alarms: int
    false_alarms: int
    normal_days: float  # time spent in normal readings, for the false alarm rate
    faults: dict[str, FaultQuality] = field(default_factory=dict)

    @property
    def precision(self) -> float:
        return (self.alarms - self.false_alarms) / self.alarms if self.alarms else 1.0

    @property
    def recall(self) -> float:
        return self.detected / self.episodes if self.episodes else 1.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0

    @property
    def false_alarms_per_day(self) -> float:
        return self.false_alarms / self.normal_days if self.normal_days else 0.0

    def to_json(self) -> dict[str, Any]:
        """Counts, the derived rates (rounded) and the per-fault breakdown."""
        document = asdict(self)
        document["faults"] = {
            name: {**asdict(q), "recall": round(q.recall, 4)} for name, q in self.faults.items()
        }
        document.update(
            precision=round(self.precision, 4),
            recall=round(self.recall, 4),
            f1=round(self.f1, 4),
            false_alarms_per_day=round(self.false_alarms_per_day, 4),
            normal_days=round(self.normal_days, 4),
        )
        return document


def evaluate(
    model: AnomalyModel, sequences: Sequence[LabelledSequence], *, grace: int = DEFAULT_GRACE
) -> Quality:
    """Score each sequence with a fresh scorer and match its alarms to its fault episodes."""
    readings = episodes = detected = alarms = false_alarms = 0
    normal_ms = 0.0
    delays: dict[str, list[float]] = {}
    counts: dict[str, list[int]] = {}  # fault -> [episodes, detected]
    for seq in sequences:
        if len(seq.labels) != len(seq.values) or len(seq.ts_ms) != len(seq.values):
            raise ValueError("values, labels and ts_ms must have one entry per reading")
        if not len(seq.values):
            continue
        _, decisions = model.score_sequence(seq.values)
        flags = decisions.tolist()
        labels = [label or NORMAL for label in seq.labels]
        faulty = [label != NORMAL for label in labels]
        overall = fault_detection(faulty, flags, grace=grace)
        readings += len(flags)
        episodes += overall.episodes
        detected += overall.detected
        alarms += overall.alarms
        false_alarms += overall.false_alarms
        step = float(np.median(np.diff(seq.ts_ms))) if len(seq.ts_ms) > 1 else 0.0
        normal_ms += step * (len(faulty) - sum(faulty))
        for name in sorted(set(labels) - {NORMAL}):
            one = fault_detection([label == name for label in labels], flags, grace=grace)
            tally = counts.setdefault(name, [0, 0])
            tally[0] += one.episodes
            tally[1] += one.detected
            delays.setdefault(name, []).extend(d * step / 1000 for d in one.delays)
    return Quality(
        readings=readings,
        episodes=episodes,
        detected=detected,
        alarms=alarms,
        false_alarms=false_alarms,
        normal_days=normal_ms / 86_400_000,
        faults={
            name: FaultQuality(
                episodes=tally[0],
                detected=tally[1],
                median_delay_s=float(statistics.median(delays[name])) if delays[name] else None,
            )
            for name, tally in sorted(counts.items())
        },
    )
