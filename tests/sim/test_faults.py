"""Each fault mode changes what it should, compared with the same seed without the fault.

A kit's noise streams do not depend on its faults, so a healthy run and a faulty run of the
same seed are identical until the fault begins and differ afterwards only by its effect.
"""

from __future__ import annotations

import numpy as np
import pytest

from edgeloop.sim.models import SPIKE_RATE
from tests.sim.conftest import run, window


def mean(values: np.ndarray) -> float:
    return float(np.nanmean(values))


def test_bearing_wear_raises_vibration_and_current_over_time_furnace() -> None:
    healthy = run("furnace")
    worn = run("furnace", {"fault": "bearing_wear", "at": "6h", "ramp": "12h"})
    before = window(healthy, 0, 6)
    assert np.array_equal(healthy.values[before], worn.values[before])
    vib_h, vib_w = healthy.column("vibration_rms_g"), worn.column("vibration_rms_g")
    # Early in the ramp the wear barely shows; at full wear the running vibration is several
    # times the healthy one.
    early, late = window(worn, 6, 8), window(worn, 18, 24)
    assert mean(vib_w[early]) < 1.5 * mean(vib_h[early])
    assert mean(vib_w[late]) > 4 * mean(vib_h[late])
    ratios = [
        mean(vib_w[window(worn, h, h + 3)]) / mean(vib_h[window(worn, h, h + 3)])
        for h in (6, 9, 12, 15, 18)
    ]
    assert ratios == sorted(ratios), ratios  # rises with the ramp
    # Friction: the blower draws more while it runs.
    running = healthy.column("blower_current_a") > 2.0
    current_h = healthy.column("blower_current_a")[late][running[late]]
    current_w = worn.column("blower_current_a")[late][running[late]]
    assert np.median(current_w) > 1.08 * np.median(current_h)


def test_bearing_wear_raises_the_washers_spin_vibration() -> None:
    healthy = run("washer")
    worn = run("washer", {"fault": "bearing_wear", "at": 0, "ramp": "1h"})
    spinning = healthy.column("motor_current_a") > 1.0
    assert spinning.sum() > 20
    assert np.median(worn.column("vibration_rms_g")[spinning]) > 3 * np.median(
        healthy.column("vibration_rms_g")[spinning]
    )


def test_refrigerant_leak_lengthens_runs_then_drifts_the_cabinet_warmer() -> None:
    healthy = run("fridge")
    leaking = run("fridge", {"fault": "refrigerant_leak", "at": 0, "ramp": "24h"})
    duty_h, duty_l = healthy.column("duty_cycle_pct"), leaking.column("duty_cycle_pct")
    temp_h, temp_l = healthy.column("cabinet_temp_c"), leaking.column("cabinet_temp_c")
    mid, end = window(healthy, 8, 14), window(healthy, 20, 24)
    # First the compressor runs longer and holds the temperature ...
    assert mean(duty_l[mid]) > mean(duty_h[mid]) + 10
    assert abs(mean(temp_l[mid]) - mean(temp_h[mid])) < 0.5
    # ... then it cannot keep up: it runs all the time and the cabinet drifts up.
    assert mean(duty_l[end]) > 95
    assert mean(temp_l[end]) > mean(temp_h[end]) + 2.5
    assert temp_l[end][-1] > temp_l[end][0]
    # With charge lost the running compressor draws less.
    running_h = healthy.column("compressor_current_a") > 0.5
    running_l = leaking.column("compressor_current_a") > 0.5
    assert np.median(
        leaking.column("compressor_current_a")[end][running_l[end]]
    ) < 0.93 * np.median(healthy.column("compressor_current_a")[end][running_h[end]])


def test_stuck_relay_on_keeps_the_compressor_running_and_freezes_the_cabinet() -> None:
    stuck = run("fridge", {"fault": "stuck_relay_on", "at": "6h"}, hours=12)
    temp = stuck.column("cabinet_temp_c")
    assert 2.0 < mean(temp[window(stuck, 0, 6)]) < 6.0
    assert mean(stuck.column("duty_cycle_pct")[window(stuck, 8, 12)]) == 100.0
    assert temp[-1] < -5.0


@pytest.mark.parametrize(
    ("appliance", "at_h"),
    [("furnace", 2), ("fridge", 2), ("pump", 9)],  # the pump has work in the morning
)
def test_stuck_relay_off_never_starts_the_appliance(appliance: str, at_h: float) -> None:
    stuck = run(appliance, {"fault": "stuck_relay_off", "at": at_h * 3600}, hours=at_h + 6)
    assert mean(stuck.column("duty_cycle_pct")[window(stuck, at_h - 2, at_h)]) > 0.5
    # An hour after the fault the last run has left the one-hour duty window.
    later = window(stuck, at_h + 1.5, at_h + 6)
    assert np.all(stuck.column("duty_cycle_pct")[later] == 0.0)


def test_stuck_relay_off_lets_the_pumps_pressure_fall_with_use() -> None:
    stuck = run("pump", {"fault": "stuck_relay_off", "at": "6h"}, hours=12)
    pressure = stuck.column("pressure_bar")
    assert np.nanmin(pressure[window(stuck, 0, 6)]) > 2.5  # the switch holds it
    assert np.nanmin(pressure[window(stuck, 6, 12)]) < 0.5  # nothing refills the tank


def test_stuck_relay_on_runs_the_pump_up_to_the_relief_valve() -> None:
    # A relay sticks closed once it closes: at 7h, when the house starts drawing water.
    stuck = run("pump", {"fault": "stuck_relay_on", "at": "7h"}, hours=12)
    pressure = stuck.column("pressure_bar")
    assert np.nanmax(pressure[window(stuck, 0, 7)]) < 4.5
    assert np.nanmedian(pressure[window(stuck, 9, 12)]) > 5.0


def test_clogged_filter_heats_the_furnaces_supply_air_and_lightens_the_blower() -> None:
    healthy = run("furnace")
    clogged = run("furnace", {"fault": "clogged_filter", "at": 0, "ramp": "1h"})
    later = window(healthy, 2, 24)
    supply_h, supply_c = healthy.column("supply_temp_c"), clogged.column("supply_temp_c")
    assert np.nanmax(supply_c[later]) > 85  # up to the high limit
    assert np.nanmax(supply_h[later]) < 65
    blowing_h = healthy.column("blower_current_a")[later]
    blowing_c = clogged.column("blower_current_a")[later]
    assert np.median(blowing_c[blowing_c > 2.0]) < 0.95 * np.median(blowing_h[blowing_h > 2.0])


def test_clogged_filter_starves_the_pump_runs_longer_and_cavitates() -> None:
    healthy = run("pump")
    clogged = run("pump", {"fault": "clogged_filter", "at": 0, "ramp": "1h"})
    later = window(healthy, 2, 24)
    flow_h, flow_c = healthy.column("flow_lpm")[later], clogged.column("flow_lpm")[later]
    assert np.median(flow_c[flow_c > 0]) < 0.5 * np.median(flow_h[flow_h > 0])
    assert mean(clogged.column("duty_cycle_pct")[later]) > 2 * mean(
        healthy.column("duty_cycle_pct")[later]
    )
    vib_h, vib_c = (
        healthy.column("vibration_rms_g")[later],
        clogged.column("vibration_rms_g")[later],
    )
    assert np.median(vib_c[flow_c > 0]) > 2 * np.median(vib_h[flow_h > 0])


def test_clogged_filter_slows_the_washers_fills() -> None:
    healthy = run("washer")
    clogged = run("washer", {"fault": "clogged_filter", "at": 0, "ramp": "1h"})
    flow_h, flow_c = healthy.column("water_flow_lpm"), clogged.column("water_flow_lpm")
    assert (flow_h > 0).sum() > 10
    assert np.median(flow_c[flow_c > 0]) < 0.5 * np.median(flow_h[flow_h > 0])
    assert (flow_c > 0).sum() > 2 * (flow_h > 0).sum()  # the same water takes longer


def test_sensor_dropout_leaves_readings_missing_at_the_severity_rate() -> None:
    everything = ["pressure_bar", "flow_lpm", "motor_current_a", "vibration_rms_g"]
    fault = {"fault": "sensor_dropout", "at": "2h", "until": "8h", "severity": 0.3}
    dropped = run("pump", fault | {"sensors": everything}, hours=10)
    missing = np.isnan(dropped.values)
    assert not missing[:, 4].any()  # duty_cycle_pct was not named
    assert not missing[window(dropped, 0, 2)].any()
    assert not missing[window(dropped, 8, 10)].any()
    share = missing[window(dropped, 2, 8), :4].mean()
    assert 0.27 < share < 0.33


def test_sensor_dropout_hits_the_first_sensor_unless_told() -> None:
    dropped = run("fridge", {"fault": "sensor_dropout", "at": 0})
    missing = np.isnan(dropped.values)
    assert missing[:, 0].all()  # severity 1
    assert missing.sum() == missing[:, 0].sum()
    named = run("fridge", {"fault": "sensor_dropout", "at": 0, "sensors": ["vibration_rms_g"]})
    missing = np.isnan(named.values)
    assert missing[:, 2].all() and missing.sum() == missing[:, 2].sum()


def test_sensor_stuck_repeats_one_value() -> None:
    healthy = run("fridge", hours=6)
    stuck = run("fridge", {"fault": "sensor_stuck", "at": "3h"}, hours=6)
    temp_h, temp_s = healthy.column("cabinet_temp_c"), stuck.column("cabinet_temp_c")
    after = window(stuck, 3, 6)
    assert len(set(temp_s[after].tolist())) == 1
    assert temp_s[after][0] == temp_h[after][0]
    assert len(set(temp_h[after].tolist())) > 5
    # Only the first sensor (the default) is stuck.
    assert np.array_equal(healthy.values[:, 1:], stuck.values[:, 1:])


def test_spikes_are_isolated_outliers_at_the_expected_rate() -> None:
    healthy = run("furnace")
    spiky = run("furnace", {"fault": "spikes", "at": "1h"})
    changed = healthy.values != spiky.values
    assert not changed[window(healthy, 0, 1)].any()
    per_sensor = changed.sum(axis=0)
    samples = changed.shape[0] - window(healthy, 0, 1).stop
    for count in per_sensor:
        assert 0.6 * SPIKE_RATE * samples < count < 1.3 * SPIKE_RATE * samples
    # Never two in a row on one sensor, and each is a real outlier.
    assert not (changed[1:] & changed[:-1]).any()
    for col, name in enumerate(spiky.sensors):
        rows = np.flatnonzero(changed[:, col])
        jumps = np.abs(spiky.values[rows, col] - healthy.values[rows, col])
        spec_size = {"supply_temp_c": 30, "supply_rh_pct": 40, "blower_current_a": 3.3}
        if name in spec_size:
            assert np.median(jumps) > 0.5 * spec_size[name], name


def test_a_repaired_fault_stops_affecting_readings() -> None:
    healthy = run("furnace", hours=8)
    dropped = run("furnace", {"fault": "sensor_dropout", "at": "1h", "until": "2h"}, hours=8)
    after = window(healthy, 2, 8)
    assert np.array_equal(healthy.values[after], dropped.values[after])
