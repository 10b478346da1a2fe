"""Scoring a streaming detector on a NAB corpus: the computation behind ``edgeloop bench nab``."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from edgeloop.ml import nab
from edgeloop.ml.detectors import DetectorConfig, SensorDetector
from edgeloop.ml.nab_corpus import NabFile


@dataclass(frozen=True, kw_only=True)
class SeriesRun:
    """A detector's scores on one series, and the time it took per reading."""

    scores: NDArray[np.float64]
    seconds: float


def run_detector(values: NDArray[np.float64], config: DetectorConfig | None = None) -> SeriesRun:
    """Feed ``values`` one at a time to a fresh :class:`SensorDetector`."""
    detector = SensorDetector(config) if config else SensorDetector()
    scores = np.empty(values.size, dtype=np.float64)
    update = detector.update
    started = time.perf_counter()
    for index, value in enumerate(values.tolist()):
        scores[index] = update(value)
    return SeriesRun(scores=scores, seconds=time.perf_counter() - started)


@dataclass(frozen=True, kw_only=True)
class ProfileResult:
    """A corpus score under one profile at one threshold."""

    profile: str
    threshold: float
    raw: float
    normalized: float


def corpus_scores(
    files: Sequence[NabFile],
    scores: Mapping[str, NDArray[np.float64]],
    windows: int,
    threshold: Callable[[str, nab.Sweep], float] | None = None,
) -> dict[str, ProfileResult]:
    """Every profile's normalised score, at the corpus-optimal threshold unless one is given.

    ``threshold(profile, sweep)`` may pick the threshold instead (a fixed decision level,
    say); ``windows`` is the corpus's labelled window count (the perfect score).
    """
    results = {}
    labels = [item.labels for item in files]
    for profile, cost in nab.PROFILES.items():
        swept = nab.sweep([(item.labels, scores[item.name]) for item in files], cost)
        if threshold is None:
            chosen, raw = swept.best()
        else:
            chosen = threshold(profile, swept)
            raw = swept.at(chosen)
        null = nab.null_score(labels, cost)
        perfect = nab.perfect_score(windows, cost)
        results[profile] = ProfileResult(
            profile=profile,
            threshold=chosen,
            raw=raw,
            normalized=nab.normalized_score(raw, null, perfect),
        )
    return results


def held_out_scores(
    files: Sequence[NabFile], scores: Mapping[str, NDArray[np.float64]], windows: int
) -> dict[str, float]:
    """Normalised scores with each category scored at the threshold best for the others.

    A detector tuned to the corpus shows it here: its threshold, chosen without a category,
    does worse on that category than the corpus-wide optimum.
    """
    totals = dict.fromkeys(nab.PROFILES, 0.0)
    categories = sorted({item.category for item in files})
    for category in categories:
        train = [item for item in files if item.category != category]
        test = [item for item in files if item.category == category]
        for profile, cost in nab.PROFILES.items():
            if train:
                chosen, _ = nab.sweep([(f.labels, scores[f.name]) for f in train], cost).best()
            else:
                chosen = float("inf")
            totals[profile] += sum(
                nab.score_file(f.labels, scores[f.name], chosen, cost).score for f in test
            )
    labels = [item.labels for item in files]
    return {
        profile: nab.normalized_score(
            totals[profile], nab.null_score(labels, cost), nab.perfect_score(windows, cost)
        )
        for profile, cost in nab.PROFILES.items()
    }
