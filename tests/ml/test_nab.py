"""NAB scoring: the rules on small cases, and NAB's own results reproduced from its raw outputs."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeloop.ml import nab
from edgeloop.ml.nab_corpus import (
    NabCorpus,
    check_profiles,
    load_raw_scores,
    load_reference_scores,
    reference_detectors,
)

STANDARD = nab.PROFILES["standard"]
RAW_DETECTORS = ("numenta", "windowedGaussian", "null")  # the ones with raw outputs here
# The scoreboard's names in the corpus README, and the score tables they stand for.
README_NAMES = {
    "ARTime": "ARTime",
    "Numenta HTM": "numenta",
    "HTM Java": "htmjava",
    "CAD OSE": "contextOSE",
    "KNN CAD": "knncad",
    "Relative Entropy": "relativeEntropy",
    "Random Cut Forest": "randomCutForest",
    "Earthgecko Skyline": "earthgeckoSkyline",
    "Twitter ADVec": "twitterADVec",
    "Windowed Gaussian": "windowedGaussian",
    "Bayesian Changepoint": "bayesChangePt",
}


# -- the rules on small cases ------------------------------------------------------------


def test_probationary_period_is_15_percent_capped_at_750_rows() -> None:
    assert nab.probationary_length(4032) == 604  # floor(604.8)
    assert nab.probationary_length(1243) == 186
    assert nab.probationary_length(5000) == 750
    assert nab.probationary_length(22695) == 750
    assert nab.probationary_length(0) == 0


def test_scaled_sigmoid_rewards_early_and_caps_far_false_positives() -> None:
    values = nab.scaled_sigmoid(np.array([-1.0, -0.5, 0.0, 0.5, 3.0, 3.0001, 50.0]))
    assert values[0] == pytest.approx(2 / (1 + math.exp(-5)) - 1)
    assert values[2] == 0.0
    assert values[0] > values[1] > values[2] > values[3] > values[4] > -1.0
    assert values[5] == values[6] == -1.0


def one_window_file() -> nab.FileLabels:
    # 100 rows: probation 15, one window over rows 40..49
    return nab.FileLabels(rows=100, windows=((40, 49),))


def detections(rows: int, *at: int) -> np.ndarray:
    scores = np.zeros(rows)
    scores[list(at)] = 1.0
    return scores


def test_first_row_of_a_window_earns_the_full_true_positive_weight() -> None:
    result = nab.score_file(one_window_file(), detections(100, 40, 45), 0.5, STANDARD)
    assert result.score == pytest.approx(1.0)
    assert (result.tp, result.fp, result.fn, result.tn) == (2, 0, 8, 75)


def test_later_detection_in_a_window_earns_less() -> None:
    early = nab.score_file(one_window_file(), detections(100, 42), 0.5, STANDARD).score
    late = nab.score_file(one_window_file(), detections(100, 49), 0.5, STANDARD).score
    assert 1.0 > early > late > 0.0


def test_missed_window_costs_fn_weight_and_false_positive_before_it_costs_fp_weight() -> None:
    labels = one_window_file()
    assert nab.score_file(labels, detections(100), 0.5, STANDARD).score == -1.0
    assert nab.score_file(labels, detections(100, 20), 0.5, STANDARD).score == pytest.approx(
        -1.0 - 0.11
    )
    fn_profile = nab.PROFILES["reward_low_FN_rate"]
    assert nab.score_file(labels, detections(100), 0.5, fn_profile).score == -2.0


def test_false_positive_just_after_a_window_is_nearly_free_and_far_after_costs_fully() -> None:
    labels = one_window_file()
    near = nab.score_file(labels, detections(100, 40, 50), 0.5, STANDARD).score
    far = nab.score_file(labels, detections(100, 40, 90), 0.5, STANDARD).score
    # one row past a 10-row window is 1/9 of a width out: 27 % of the full cost
    assert near == pytest.approx(1.0 + 0.11 * (2 / (1 + math.exp(5 / 9)) - 1))
    assert 1.0 > near > 1.0 - 0.11 * 0.3
    assert far == pytest.approx(1.0 - 0.11)


def test_probationary_rows_are_never_scored() -> None:
    labels = nab.FileLabels(rows=100, windows=((10, 20),))  # window partly in probation
    result = nab.score_file(labels, detections(100, 5, 12), 0.5, STANDARD)
    assert result.score == -1.0  # row 12 is in probation: the window counts as missed
    assert (result.tp, result.fp) == (0, 0)
    assert result.tn + result.fn == 85


def test_windows_are_matched_by_timestamp_as_nab_does() -> None:
    stamps = np.array(
        ["2014-01-01 00:00", "2014-01-01 01:00", "2014-01-01 01:00", "2014-01-01 02:00",
         "2014-01-01 03:00", "2014-01-01 04:00"],
        dtype="datetime64[us]",
    )  # fmt: skip
    start, end = np.datetime64("2014-01-01 01:00", "us"), np.datetime64("2014-01-01 03:00", "us")
    assert nab.window_rows(stamps, [(start, end)]) == ((1, 4),)
    between = np.datetime64("2014-01-01 01:30", "us"), np.datetime64("2014-01-01 03:30", "us")
    assert nab.window_rows(stamps, [between]) == ((3, 4),)


def test_overlapping_windows_are_refused() -> None:
    with pytest.raises(ValueError, match="disjoint"):
        nab.FileLabels(rows=100, windows=((10, 30), (20, 40)))


# -- the threshold sweep ------------------------------------------------------------------


def brute_force(files: list[tuple[nab.FileLabels, np.ndarray]], cost: nab.CostMatrix):
    """Every distinct score as a threshold, each file scored from scratch."""
    candidates = sorted({float(s) for _, scores in files for s in scores}, reverse=True)
    return [
        (t, sum(nab.score_file(labels, scores, t, cost).score for labels, scores in files))
        for t in [math.inf, *candidates]
    ]


@st.composite
def small_corpus(draw: st.DrawFn) -> list[tuple[nab.FileLabels, np.ndarray]]:
    files = []
    for _ in range(draw(st.integers(1, 3))):
        rows = draw(st.integers(20, 60))
        cuts = sorted(draw(st.sets(st.integers(0, rows - 1), max_size=4)))
        windows = tuple((cuts[i], cuts[i + 1]) for i in range(0, len(cuts) - 1, 2))
        levels = st.sampled_from([0.0, 0.2, 0.5, 0.7, 0.9, 1.0])  # ties are common in NAB
        scores = np.array(draw(st.lists(levels, min_size=rows, max_size=rows)))
        files.append((nab.FileLabels(rows=rows, windows=windows), scores))
    return files


@settings(max_examples=150, deadline=None)
@given(small_corpus(), st.sampled_from(sorted(nab.PROFILES)))
def test_sweep_equals_scoring_every_threshold_from_scratch(files, profile) -> None:
    cost = nab.PROFILES[profile]
    swept = nab.sweep(files, cost)
    expected = brute_force(files, cost)
    # the sweep's candidates are the scored rows' values; rows in probation cannot matter
    assert set(swept.thresholds) <= {t for t, _ in expected}
    assert list(swept.thresholds) == sorted(set(swept.thresholds), reverse=True)
    _, best_score = swept.best()
    assert best_score == pytest.approx(max(s for _, s in expected))
    for threshold, score in expected:
        assert swept.at(threshold) == pytest.approx(score)
        assert swept.at(threshold - 1e-3) == pytest.approx(
            sum(nab.score_file(lab, sc, threshold - 1e-3, cost).score for lab, sc in files)
        )


def coarse_to_fine(objective: Callable[[float], float]) -> tuple[float, float]:
    """A coarse-to-fine search over [0, 1] in the manner of NAB's own optimiser."""
    x, step, tolerance = 0.5, 0.1, 1e-7
    seen = {x: objective(x)}
    best = seen[x]
    while step > tolerance:
        if x + step > 1.0:
            step = abs(1.0 - x) / 2
        x += step
        seen.setdefault(x, objective(x))
        if seen[x] > best:
            best, step = seen[x], step * 2
            continue
        if x - step < 0.0:
            step = abs(x) / 2
        x -= 2 * step
        seen.setdefault(x, objective(x))
        if seen[x] > best:
            best, step = seen[x], step * 2
            continue
        x += step
        step *= 0.5
    return x, best


# -- NAB's own results, reproduced --------------------------------------------------------


@cache
def raw_scores(root: Path, detector: str, name: str) -> np.ndarray:
    return load_raw_scores(root, detector, name)


def test_corpus_profiles_are_nabs(nab_root: Path) -> None:
    assert check_profiles(nab_root) == nab.PROFILES


@pytest.mark.parametrize("profile", sorted(nab.PROFILES))
@pytest.mark.parametrize("detector", RAW_DETECTORS)
def test_reference_raw_outputs_score_as_nab_scored_them(
    nab_root: Path, nab_corpus: NabCorpus, detector: str, profile: str
) -> None:
    reference = load_reference_scores(nab_root, detector, profile)
    assert {row.file for row in reference} == {f.name for f in nab_corpus.files}
    cost = nab.PROFILES[profile]
    for row in reference:
        labels = nab_corpus.by_name(row.file).labels
        got = nab.score_file(labels, raw_scores(nab_root, detector, row.file), row.threshold, cost)
        assert got.score == pytest.approx(row.score, abs=1e-9), row.file
        counts = (got.tp, got.tn, got.fp, got.fn, got.total)
        assert counts == (row.tp, row.tn, row.fp, row.fn, row.total), row.file


@pytest.mark.parametrize("profile", sorted(nab.PROFILES))
@pytest.mark.parametrize("detector", ["numenta", "windowedGaussian"])
def test_corpus_optimum_is_at_least_as_good_as_nabs_thresholds(
    nab_root: Path, nab_corpus: NabCorpus, detector: str, profile: str
) -> None:
    cost = nab.PROFILES[profile]
    files = [(f.labels, raw_scores(nab_root, detector, f.name)) for f in nab_corpus.files]
    swept = nab.sweep(files, cost)
    reference = load_reference_scores(nab_root, detector, profile)
    # NAB chose these thresholds on its whole corpus; on this split the sweep's is as good or better
    at_reference = swept.at(reference[0].threshold)
    assert at_reference == pytest.approx(sum(row.score for row in reference), abs=1e-9)
    threshold, best = swept.best()
    assert best >= at_reference
    assert best == pytest.approx(
        sum(nab.score_file(labels, s, threshold, cost).score for labels, s in files), abs=1e-9
    )
    _, searched = coarse_to_fine(swept.at)
    assert best >= searched


def test_null_detector_scores_the_null_baseline(nab_root: Path, nab_corpus: NabCorpus) -> None:
    labels = [f.labels for f in nab_corpus.files]
    for profile, cost in nab.PROFILES.items():
        table = sum(row.score for row in load_reference_scores(nab_root, "null", profile))
        assert nab.null_score(labels, cost) == pytest.approx(table)


def readme_scoreboard(root: Path) -> dict[str, float]:
    text = (root / "README.md").read_text()
    rows = re.findall(r"^\| ([A-Za-z ]+?) \| (\d+\.\d) \|", text, flags=re.MULTILINE)
    return {name: float(score) for name, score in rows}


def test_scoreboard_in_the_readme_is_reproduced_from_the_score_tables(
    nab_root: Path, nab_corpus: NabCorpus
) -> None:
    board = readme_scoreboard(nab_root)
    assert set(board) == set(README_NAMES)
    assert set(README_NAMES.values()) <= set(reference_detectors(nab_root))
    null = nab.null_score([f.labels for f in nab_corpus.files], STANDARD)
    perfect = nab.perfect_score(nab_corpus.windows, STANDARD)
    assert nab_corpus.windows == 55
    for name, published in board.items():
        raw = sum(
            row.score for row in load_reference_scores(nab_root, README_NAMES[name], "standard")
        )
        assert round(nab.normalized_score(raw, null, perfect), 1) == published, name
