"""The appliance model: fitted on the simulator's normal readings, it catches the simulator's
labelled faults; it scores a stream as it scores a batch, survives its own artifact format,
and copes with sensors that drop out."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

from edgeloop.ml.appliance_evaluation import LabelledSequence, Quality, evaluate
from edgeloop.ml.appliance_model import (
    FORMAT_VERSION,
    AnomalyModel,
    FitConfig,
    ModelFormatError,
    fit,
)
from edgeloop.sim.generator import Batch, KitSimulator
from edgeloop.sim.models import APPLIANCES
from edgeloop.sim.scenario import parse_scenario

KIND = "fridge"
SENSORS = tuple(s.name for s in APPLIANCES[KIND].sensors)
# Each fault from 12 h to 30 h of a 36 h run; slow faults ramp over 4 h, not days.
FAULTS = ("bearing_wear", "refrigerant_leak", "stuck_relay_on", "spikes", "sensor_dropout")


def simulate(kit_id: str, hours: float, seed: int, faults: Sequence[dict[str, Any]] = ()) -> Batch:
    scenario = parse_scenario(
        {"seed": seed, "kits": [{"id": kit_id, "appliance": KIND, "faults": list(faults)}]}
    )
    kit = scenario.kits[0]
    simulator = KitSimulator(kit, seed=seed, start_ms=scenario.start_ms)
    return simulator.batch(round(hours * 3600_000 / kit.interval_ms))


def labelled(batch: Batch) -> LabelledSequence:
    return LabelledSequence(batch.values, batch.labels, batch.ts_ms)


@pytest.fixture(scope="module")
def model() -> AnomalyModel:
    normal = [simulate(f"train-{i}", 36, seed=100 + i).values for i in range(2)]
    return fit(normal, SENSORS, appliance=KIND)


@pytest.fixture(scope="module")
def faulty() -> list[Batch]:
    return [
        simulate(
            f"test-{fault}",
            36,
            seed=300 + i,
            faults=[{"fault": fault, "at": "12h", "until": "30h", "ramp": "4h"}]
            if fault in ("bearing_wear", "refrigerant_leak")
            else [{"fault": fault, "at": "12h", "until": "30h"}],
        )
        for i, fault in enumerate(FAULTS)
    ]


@pytest.fixture(scope="module")
def quality(model: AnomalyModel, faulty: list[Batch]) -> Quality:
    healthy = simulate("test-healthy", 48, seed=999)
    return evaluate(model, [labelled(b) for b in (*faulty, healthy)])


def test_it_catches_the_simulators_faults_with_few_false_alarms(quality: Quality) -> None:
    assert quality.episodes == len(FAULTS)
    assert quality.recall >= 0.8, quality.to_json()
    assert quality.precision >= 0.9, quality.to_json()
    assert quality.f1 >= 0.85
    # Two healthy days (and the healthy hours around each fault) raise at most one alarm a day.
    assert quality.false_alarms_per_day <= 1.0, quality.to_json()
    for fault in ("stuck_relay_on", "spikes", "sensor_dropout"):
        caught = quality.faults[fault]
        assert caught.detected == 1, (fault, quality.to_json())
        assert caught.median_delay_s is not None and caught.median_delay_s < 3600


def test_scores_are_in_range_and_half_where_it_decides(
    model: AnomalyModel, faulty: list[Batch]
) -> None:
    scores, decisions = model.score_sequence(faulty[2].values)
    assert ((scores >= 0) & (scores <= 1)).all()
    assert decisions.any() and not decisions.all()
    assert (decisions == (scores >= 0.5)).all()


def test_a_stream_scores_as_the_batch_does(model: AnomalyModel, faulty: list[Batch]) -> None:
    batch = faulty[4]  # sensor dropout: readings with a sensor left out
    scorer = model.scorer()
    streamed = [
        scorer.score({n: v for n, v in zip(SENSORS, row.tolist(), strict=True) if v == v})
        for row in batch.values
    ]
    scores, decisions = model.score_sequence(batch.values)
    assert np.allclose([s for s, _ in streamed], scores, rtol=0, atol=1e-9)
    assert [d for _, d in streamed] == decisions.tolist()
    scorer.reset()
    assert scorer.score(dict(zip(SENSORS, batch.values[0].tolist(), strict=True)))[1] is False


def test_the_artifact_round_trips_exactly(model: AnomalyModel, faulty: list[Batch]) -> None:
    data = model.to_bytes()
    assert len(data) < 200_000  # small enough to ship to every hub
    again = AnomalyModel.from_bytes(data)
    assert again.to_bytes() == data
    values = faulty[0].values
    assert np.array_equal(model.score_sequence(values)[0], again.score_sequence(values)[0])
    assert json.loads(data)["formatVersion"] == FORMAT_VERSION


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"format": "something-else"}, "not an edgeloop.appliance-model"),
        ({"formatVersion": FORMAT_VERSION + 1}, "format version"),
        ({"means": [[1.0]]}, "expected"),
        ({"threshold": -1.0}, "do not fit together"),
        ({"stuck": None}, "damaged"),
    ],
)
def test_a_damaged_or_foreign_artifact_is_refused(
    model: AnomalyModel, change: dict[str, Any], message: str
) -> None:
    document = {**model.to_json(), **change}
    with pytest.raises(ModelFormatError, match=message):
        AnomalyModel.from_json(document)
    with pytest.raises(ModelFormatError, match="not a JSON"):
        AnomalyModel.from_bytes(b"\xff{")


def test_missing_sensors_are_scored_on_the_rest(model: AnomalyModel) -> None:
    healthy = simulate("gaps", 6, seed=4242).values
    scorer = model.scorer()
    decided = []
    for i, row in enumerate(healthy):
        reading: dict[str, float | None] = dict(zip(SENSORS, row.tolist(), strict=True))
        if i % 97 == 0:  # now and then one value lost: no alarm for that
            reading[SENSORS[i % len(SENSORS)]] = None
        score, decision = scorer.score(reading)
        assert 0.0 <= score <= 1.0 and not math.isnan(score)
        decided.append(decision)
    assert sum(decided) == 0
    # One sensor gone for good: an alarm within a few minutes.
    quiet = 0
    for row in healthy[:60]:
        _, decision = scorer.score(dict(zip(SENSORS[1:], row[1:].tolist(), strict=True)))
        quiet += 1
        if decision:
            break
    assert decision and quiet <= 12
    # Nothing at all from the kit: judged on missingness alone.
    assert 0.5 <= scorer.score({})[0] <= 1.0


def test_a_stuck_sensor_is_noticed(model: AnomalyModel) -> None:
    healthy = simulate("stuck", 4, seed=77).values
    stuck = healthy.copy()
    stuck[360:, 0] = stuck[360, 0]  # the cabinet thermometer repeats itself from 1 h on
    _, decisions = model.score_sequence(stuck)
    assert not decisions[:360].any()
    assert decisions[360:].any()
    assert np.argmax(decisions[360:]) < 180  # within half an hour


def test_scoring_a_reading_takes_microseconds(model: AnomalyModel, faulty: list[Batch]) -> None:
    readings = [dict(zip(SENSORS, row.tolist(), strict=True)) for row in faulty[0].values[:2000]]
    scorer = model.scorer()
    started = time.perf_counter()
    for reading in readings:
        scorer.score(reading)
    per_reading = (time.perf_counter() - started) / len(readings)
    assert per_reading < 500e-6  # ~20 µs on a quiet machine; generous for a busy CI


def test_fitting_needs_enough_normal_readings() -> None:
    with pytest.raises(ValueError, match="too few"):
        fit([np.zeros((50, 2))], ("a", "b"), appliance="x")
    with pytest.raises(ValueError, match="each once"):
        fit([np.zeros((5000, 2))], ("a", "a"), appliance="x")
    with pytest.raises(ValueError, match="margin"):
        FitConfig(margin=0.5)
