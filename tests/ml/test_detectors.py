"""Streaming detectors: scores in range, deterministic, resettable, and finding what they should."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeloop.ml.detectors import (
    ApplianceDetector,
    Detector,
    DetectorConfig,
    LevelMemory,
    Likelihood,
    PatternMemory,
    SensorDetector,
)

SMALL = DetectorConfig(memory=2000, warmup=60, baseline=200, refractory=30)


def feed(detector: SensorDetector, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores, decisions = [], []
    for value in values:
        scores.append(detector.update(float(value)))
        decisions.append(detector.decision)
    return np.array(scores), np.array(decisions)


def noisy_level_shift(seed: int, rows: int = 1500, at: int = 1200) -> np.ndarray:
    rng = np.random.default_rng(seed)
    values = rng.normal(10.0, 1.0, rows)
    values[at:] += 8.0
    return values


def test_sensor_detector_is_a_detector() -> None:
    assert isinstance(SensorDetector(), Detector)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.floats(min_value=-1e6, max_value=1e6, allow_nan=False), min_size=1, max_size=300)
)
def test_scores_are_in_unit_interval_and_decisions_match_them(values: list[float]) -> None:
    detector = SensorDetector(DetectorConfig(memory=100, warmup=20, baseline=50, refractory=5))
    for value in values:
        score = detector.update(value)
        assert 0.0 <= score <= 1.0
        assert detector.decision == (score >= 0.5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_level_shift_is_decided_at_once_and_stationary_noise_stays_quiet(seed: int) -> None:
    scores, decisions = feed(SensorDetector(SMALL), noisy_level_shift(seed))
    # once the likelihood's baseline has filled (it is thin just after the warm-up)
    settled = SMALL.warmup + SMALL.baseline
    alarms = np.flatnonzero(decisions[settled:]) + settled
    assert alarms.size >= 1
    assert 1200 <= alarms[0] <= 1203  # at the shift, not before it
    assert scores[settled:1200].max() < 0.5


def test_periodic_signal_learnt_in_warmup_raises_no_alarm_until_its_rhythm_breaks() -> None:
    rng = np.random.default_rng(7)
    t = np.arange(3000)
    values = 5 * np.sin(2 * np.pi * t / 100) + rng.normal(0, 0.1, t.size)
    values[2500:2600] = values[2499]  # the rhythm stops, within the usual range
    _, decisions = feed(SensorDetector(), values)
    alarms = np.flatnonzero(decisions)
    assert alarms.size >= 1
    assert 2500 <= alarms[0] < 2530


def test_refractory_period_keeps_one_incident_to_one_alarm() -> None:
    _, decisions = feed(SensorDetector(SMALL), noisy_level_shift(0))
    alarms = np.flatnonzero(decisions)
    assert np.all(np.diff(alarms) > SMALL.refractory)


def test_same_readings_give_same_scores_and_reset_forgets() -> None:
    values = noisy_level_shift(3)
    first = SensorDetector(SMALL)
    once, _ = feed(first, values)
    again, _ = feed(SensorDetector(SMALL), values)
    assert np.array_equal(once, again)
    first.reset()
    assert first.decision is False
    after_reset, _ = feed(first, values)
    assert np.array_equal(once, after_reset)


def test_warmup_scores_zero() -> None:
    scores, _ = feed(SensorDetector(SMALL), noisy_level_shift(1)[: SMALL.warmup])
    assert not scores.any()


@settings(max_examples=30, deadline=None)
@given(
    st.integers(1, 3),
    st.integers(1, 6),
    st.integers(2, 40),
    st.integers(0, 2**32 - 1),
    st.booleans(),
)
def test_pattern_memory_finds_the_exact_nearest_pattern(
    channels: int, window: int, capacity: int, seed: int, repetitive: bool
) -> None:
    rng = np.random.default_rng(seed)
    rows = 150
    if repetitive:  # repeats and ties exercise the successor shortcut
        series = np.round(rng.normal(size=(channels, 7)), 1)[:, np.arange(rows) % 7]
    else:
        series = rng.normal(size=(channels, rows))
    inv_scale = rng.uniform(0.5, 2.0, channels) if channels > 1 else np.ones(1)
    memory = PatternMemory(channels, window, capacity)
    for end in range(window - 1, rows):
        pattern = series[:, end - window + 1 : end + 1]
        eligible = [e for e in range(window - 1, end - window + 1)][-capacity:]
        got = memory.nearest(pattern, inv_scale)
        if not eligible:
            assert got == float("inf")
        else:
            expected = min(
                float(
                    np.max(np.abs(series[:, e - window + 1 : e + 1] - pattern) * inv_scale[:, None])
                )
                for e in eligible
            )
            assert got == pytest.approx(expected, abs=1e-12)
        memory.remember(pattern, end)


def test_likelihood_is_zero_until_baseline_then_large_for_a_jump() -> None:
    likelihood = Likelihood(baseline=100, smoothing=3)
    rng = np.random.default_rng(0)
    zs = [likelihood.update(float(v)) for v in rng.normal(1.0, 0.1, 150)]
    assert zs[:22] == [0.0] * 22
    assert max(abs(z) for z in zs[30:]) < 5
    assert likelihood.update(10.0) > 20


def telegraph(rng: np.random.Generator, rows: int) -> np.ndarray:
    """On/off (10 / 0) held for 20 to 60 readings at a time."""
    states: list[float] = []
    on = False
    while len(states) < rows:
        states += [10.0 if on else 0.0] * int(rng.integers(20, 61))
        on = not on
    return np.array(states[:rows])


def test_appliance_detector_finds_a_broken_relation_each_sensor_alone_cannot() -> None:
    rng = np.random.default_rng(5)
    rows = 2000
    drive = telegraph(rng, rows) + rng.normal(0, 0.1, rows)  # a pump's current: on or off
    flow = 3.0 * drive + rng.normal(0, 0.3, rows)  # its flow follows
    # a fault: flow when the pump is off, none when it is on; flow alone looks as ever
    flow[1800:] = 3.0 * (10.0 - drive[1800:]) + rng.normal(0, 0.3, 200)
    joint = ApplianceDetector(2, SMALL)
    alone = SensorDetector(SMALL)
    joint_alarms, alone_alarms = [], []
    for index in range(rows):
        joint.update_many([drive[index], flow[index]])
        alone.update(flow[index])
        joint_alarms.append(joint.decision)
        alone_alarms.append(alone.decision)
    settled = SMALL.warmup + SMALL.baseline
    assert any(joint_alarms[1800:1810])
    assert sum(joint_alarms[settled:1800]) <= 1  # noise alone may, rarely, cross the bar
    assert not any(alone_alarms[1800:1810])


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="finite"):
        SensorDetector().update(float("nan"))
    with pytest.raises(ValueError, match="expected 2 values"):
        ApplianceDetector(2).update_many([1.0])
    with pytest.raises(ValueError):
        DetectorConfig(window=0)
    with pytest.raises(ValueError):
        DetectorConfig(z_alarm=0)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3), st.integers(1, 30), st.integers(1, 5), st.integers(0, 2**32 - 1))
def test_level_memory_measures_distance_beyond_the_remembered_range(
    channels: int, capacity: int, lag: int, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    readings = np.round(rng.normal(size=(80, channels)), 1)
    memory = LevelMemory(channels, capacity, lag=lag)
    for index, reading in enumerate(readings):
        known = readings[max(0, index - lag + 1 - capacity) : max(0, index - lag + 1)]
        expected = 0.0
        if known.size:
            for channel in range(channels):
                column = np.sort(known[:, channel])
                beyond = max(reading[channel] - column[-1], column[0] - reading[channel])
                last = column.size - 1
                spread = column[round(0.99 * last)] - column[round(0.01 * last)]
                spread = spread if spread > 0 else column[-1] - column[0]
                if beyond > 0:
                    expected = max(expected, beyond / spread if spread > 0 else 1e6)
        assert memory.excess(reading) == pytest.approx(expected)
        memory.remember(reading)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_gaussian_noise_raises_no_alarm_with_the_default_parameters(seed: int) -> None:
    values = np.random.default_rng(seed).normal(10.0, 1.0, 6000)
    _, decisions = feed(SensorDetector(), values)
    assert not decisions.any()
