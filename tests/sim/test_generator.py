"""The generator: determinism, labels, plausible normal behaviour, pacing."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgeloop.sim.generator import HomeSimulator, KitSimulator, Pacer
from edgeloop.sim.models import APPLIANCES, PUMP, PumpParams
from edgeloop.sim.payload import encode
from edgeloop.sim.scenario import home, parse_scenario
from tests.sim.conftest import HOUR, run, window

HOME = {
    "seed": 11,
    "kits": [
        {
            "id": "furnace-1",
            "appliance": "furnace",
            "faults": [{"fault": "bearing_wear", "at": "1h", "ramp": "2h"}],
        },
        {
            "id": "fridge-1",
            "appliance": "fridge",
            "faults": [
                {"fault": "refrigerant_leak", "at": "30m", "ramp": "3h", "severity": 0.5},
                {"fault": "spikes", "at": "2h", "until": "3h"},
            ],
        },
        {
            "id": "washer-1",
            "appliance": "washer",
            "faults": [{"fault": "sensor_dropout", "at": "1h", "severity": 0.2}],
        },
        {
            "id": "pump-1",
            "appliance": "pump",
            "faults": [{"fault": "stuck_relay_on", "at": "2h"}],
        },
    ],
}


def payloads(doc: dict[str, object], hours: float = 4.0) -> list[bytes]:
    sim = HomeSimulator(parse_scenario(doc))
    return [encode(r) for r in sim.readings(duration_s=hours * HOUR)]


def test_same_seed_gives_byte_identical_readings() -> None:
    first, second = payloads(HOME), payloads(HOME)
    assert len(first) == 4 * 4 * 360 + 2 * 4 * 360  # two kits at 10 s, two at 5 s
    assert first == second


def test_different_seeds_give_different_readings() -> None:
    other = payloads(HOME | {"seed": 12})
    same = payloads(HOME)
    differing = sum(a != b for a, b in zip(same, other, strict=True))
    assert differing > 0.9 * len(same)


def test_a_kits_own_seed_overrides_the_scenarios() -> None:
    kits = [dict(k) for k in HOME["kits"]]  # type: ignore[attr-defined]
    kits[0]["seed"] = 99
    changed = HomeSimulator(parse_scenario(HOME | {"kits": kits}))
    plain = HomeSimulator(parse_scenario(HOME))
    a, b = changed.kits[0].take(50), plain.kits[0].take(50)
    assert [r.values for r in a] != [r.values for r in b]
    assert [r.values for r in changed.kits[1].take(50)] == [
        r.values for r in plain.kits[1].take(50)
    ]


def test_batches_steps_and_chunking_agree() -> None:
    scenario = parse_scenario(HOME)
    for kit in scenario.kits:
        stepped = KitSimulator(kit, seed=scenario.seed, start_ms=scenario.start_ms).take(700)
        chunked = KitSimulator(kit, seed=scenario.seed, start_ms=scenario.start_ms)
        pieces = chunked.take(3) + chunked.take(300) + chunked.take(397)
        assert stepped == pieces
        batch = KitSimulator(kit, seed=scenario.seed, start_ms=scenario.start_ms).batch(700)
        for row, reading in enumerate(stepped):
            assert batch.seq[row] == reading.seq and batch.ts_ms[row] == reading.ts_ms
            assert batch.labels[row] == reading.label
            for col, name in enumerate(batch.sensors):
                value = reading.values[name]
                got = batch.values[row, col]
                assert (value is None and math.isnan(got)) or value == got


def test_adding_a_kit_or_a_fault_leaves_the_others_alone() -> None:
    base = parse_scenario({"seed": 5, "kits": [{"id": "fridge-1", "appliance": "fridge"}]})
    more = parse_scenario(
        {
            "seed": 5,
            "kits": [
                {"id": "pump-9", "appliance": "pump"},
                {"id": "fridge-1", "appliance": "fridge"},
            ],
        }
    )
    alone = KitSimulator(base.kits[0], seed=5, start_ms=base.start_ms).take(500)
    among = KitSimulator(more.kits[1], seed=5, start_ms=more.start_ms).take(500)
    assert alone == among


def test_readings_are_merged_in_time_order_with_consecutive_sequence_numbers() -> None:
    sim = HomeSimulator(parse_scenario(HOME))
    readings = list(sim.readings(duration_s=HOUR))
    stamps = [r.ts_ms for r in readings]
    assert stamps == sorted(stamps)
    for kit in sim.scenario.kits:
        mine = [r for r in readings if r.kit_id == kit.kit_id]
        assert [r.seq for r in mine] == list(range(len(mine)))
        assert all(r.ts_ms == sim.scenario.start_ms + r.seq * kit.interval_ms for r in mine)
        assert all(list(r.values) == [s.name for s in kit.model.sensors] for r in mine)


def test_count_limits_readings_per_kit() -> None:
    sim = HomeSimulator(parse_scenario(HOME))
    readings = list(sim.readings(count=7))
    assert len(readings) == 28
    assert {r.kit_id for r in readings} == {k["id"] for k in HOME["kits"]}  # type: ignore[attr-defined]


def test_labels_follow_the_scenario() -> None:
    sim = HomeSimulator(parse_scenario(HOME))
    start = sim.scenario.start_ms
    for reading in sim.readings(duration_s=4 * HOUR):
        t = (reading.ts_ms - start) / 1000
        truth = sim.scenario.kit(reading.kit_id).truth(t)
        assert (reading.label, reading.faults, reading.level) == truth
        if reading.kit_id == "furnace-1":
            expected = "bearing_wear" if t >= HOUR else "normal"
            assert reading.label == expected
            assert reading.level == pytest.approx(min(1.0, max(0.0, (t - HOUR) / (2 * HOUR))))
        elif reading.kit_id == "fridge-1":
            faults = (["refrigerant_leak"] if t >= 1800 else []) + (
                ["spikes"] if 2 * HOUR <= t < 3 * HOUR else []
            )
            assert list(reading.faults) == faults
            # The leak began first, so it labels the reading while both are on.
            assert reading.label == (faults[0] if faults else "normal")
            assert reading.level <= 0.5
        elif reading.kit_id == "pump-1":
            assert reading.label == ("stuck_relay_on" if t >= 2 * HOUR else "normal")
            assert reading.level == (1.0 if t >= 2 * HOUR else 0.0)
        else:
            assert reading.label == ("sensor_dropout" if t >= HOUR else "normal")
            if t < HOUR:
                assert None not in reading.values.values()


def test_a_normal_day_is_plausible() -> None:
    furnace, fridge, washer, pump = (run(kind) for kind in ("furnace", "fridge", "washer", "pump"))
    # Furnace: cycles, works harder at night in the cold (before the morning), and the
    # setback lets it rest at 23:00.
    duty = furnace.column("duty_cycle_pct")
    assert 20 < np.mean(duty) < 80
    assert np.max(duty[window(furnace, 6, 8)]) > 80  # the morning recovery from setback
    supply = furnace.column("supply_temp_c")
    assert np.max(supply) > 45 and np.min(supply) < 25
    # Fridge: holds its band, compressor on about a third of the time.
    cabinet = fridge.column("cabinet_temp_c")
    assert np.percentile(cabinet, 1) > 2.5 and np.percentile(cabinet, 99) < 6.5
    assert 20 < np.mean(fridge.column("duty_cycle_pct")) < 60
    # Washer: vibration peaks as the drum passes its resonance, above the final spin's
    # plateau; inlet flow only while filling.
    vibration = washer.column("vibration_rms_g")
    current = washer.column("motor_current_a")
    final_spin = current > 1.8
    assert final_spin.sum() > 20
    assert np.max(vibration) > 1.3 * np.median(vibration[final_spin])
    assert 8 < np.max(washer.column("water_flow_lpm")) < 14
    # Pump: pressure between the switch's settings, flow only while it runs.
    pressure = pump.column("pressure_bar")
    params = PUMP.params
    assert isinstance(params, PumpParams)
    assert params.cut_in_bar - 0.3 < np.min(pressure)
    assert np.max(pressure) < params.cut_out_bar + 0.3
    flow, current = pump.column("flow_lpm"), pump.column("motor_current_a")
    assert np.all((flow > 0) == (current > 1.0))


@pytest.mark.parametrize("kind", sorted(APPLIANCES))
def test_readings_stay_in_the_sensors_ranges_and_resolution(kind: str) -> None:
    batch = run(kind, {"fault": "spikes", "at": 0}, hours=6)
    for col, spec in enumerate(APPLIANCES[kind].sensors):
        values = batch.values[:, col]
        assert np.all((spec.low <= values) & (values <= spec.high)), spec.name
        steps = values / spec.resolution
        assert np.allclose(steps, np.round(steps), atol=1e-6), spec.name


def test_a_simulated_day_of_four_appliances() -> None:
    """Correctness only: the rate is measured by ``python -m benchmarks sim``."""
    sim = HomeSimulator(home(["furnace", "fridge", "washer", "pump"], seed=2))
    counts: dict[str, int] = {}
    for reading in sim.readings(duration_s=24 * HOUR):
        counts[reading.kit_id] = counts.get(reading.kit_id, 0) + 1
    assert counts == {"furnace-1": 8640, "fridge-1": 8640, "washer-1": 17280, "pump-1": 17280}


def test_pacer_spreads_simulated_time_over_real_time() -> None:
    now = [100.0]
    pacer = Pacer(60.0, clock=lambda: now[0])
    assert pacer.delay(1000.0) == 0.0  # the first reading sets the origin
    assert pacer.delay(1060.0) == pytest.approx(1.0)
    now[0] = 100.5
    assert pacer.delay(1060.0) == pytest.approx(0.5)
    now[0] = 103.0
    assert pacer.delay(1060.0) == 0.0  # late: due at once
    assert Pacer(0).delay(1e9) == 0.0
