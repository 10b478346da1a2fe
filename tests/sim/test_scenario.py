"""Scenario files and the model tables: what they accept, and errors that name the field."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from edgeloop.core.errors import ValidationError
from edgeloop.sim.generator import KitSimulator
from edgeloop.sim.models import APPLIANCES, FAULTS, FridgeParams, appliance, fault_mode
from edgeloop.sim.payload import check_prefix, decode, encode, status_payload, telemetry_topic
from edgeloop.sim.scenario import (
    FaultInjection,
    home,
    load_scenario,
    parse_duration,
    parse_scenario,
    parse_time,
    scenario_document,
)

YAML = """
name: winter-home
seed: 42
start: 2025-01-06T06:00:00Z
utc_offset_h: 1
kits:
  - id: furnace-1
    appliance: hvac
    faults:
      - {fault: bearing_wear, at: 6h, ramp: 12h, severity: 0.8}
  - id: fridge.kitchen
    appliance: refrigerator
    interval: 30s
    seed: 7
    params: {setpoint_c: 5}
    faults:
      - {fault: sensor_stuck, at: 90m, until: 2h, sensors: [compressor_current_a]}
      - {fault: sensor_dropout, at: 1d}
"""


def test_a_yaml_scenario_is_read(tmp_path: Path) -> None:
    path = tmp_path / "home.yaml"
    path.write_text(YAML)
    scenario = load_scenario(path)
    assert scenario.name == "winter-home" and scenario.seed == 42
    assert scenario.start_ms == parse_time("2025-01-06T06:00:00Z")
    assert scenario.utc_offset_h == 1
    furnace, fridge = scenario.kits
    assert (furnace.appliance, furnace.interval_ms, furnace.seed) == ("furnace", 10_000, None)
    assert furnace.faults == (
        FaultInjection(fault="bearing_wear", start_s=21600, severity=0.8, ramp_s=43200),
    )
    assert fridge.appliance == "fridge" and fridge.interval_ms == 30_000 and fridge.seed == 7
    assert isinstance(fridge.model.params, FridgeParams) and fridge.model.params.setpoint_c == 5
    stuck, dropout = fridge.faults
    assert stuck.sensors == ("compressor_current_a",) and stuck.end_s == 7200
    assert dropout.sensors == ("cabinet_temp_c",)  # the first sensor, by default
    # The JSON form reads back to the same scenario (params aside).
    again = tmp_path / "home.json"
    again.write_text(json.dumps(scenario_document(scenario)))
    assert load_scenario(again).kits[0] == furnace


def test_params_change_the_physics() -> None:
    def cabinet(setpoint: float) -> float:
        scenario = parse_scenario(
            {"kits": [{"id": "f", "appliance": "fridge", "params": {"setpoint_c": setpoint}}]}
        )
        sim = KitSimulator(scenario.kits[0], seed=0, start_ms=scenario.start_ms)
        temps = [r.values["cabinet_temp_c"] for r in sim.take(2000)]
        return sum(t for t in temps if t is not None) / len(temps)

    assert cabinet(7.0) - cabinet(3.0) == pytest.approx(4.0, abs=0.5)


def test_home_names_kits_by_kind() -> None:
    scenario = home(["furnace", "washing_machine", "fridge", "fridge"], seed=4)
    assert [k.kit_id for k in scenario.kits] == ["furnace-1", "washer-1", "fridge-1", "fridge-2"]
    assert scenario.seed == 4


@pytest.mark.parametrize(
    ("text", "seconds"),
    [(90, 90.0), (1.5, 1.5), ("90s", 90.0), ("15m", 900.0), ("6h", 21600.0), ("2d", 172800.0),
     ("250ms", 0.25), ("0", 0.0)],
)  # fmt: skip
def test_durations(text: Any, seconds: float) -> None:
    assert parse_duration(text) == seconds


def _kit(**overrides: Any) -> dict[str, Any]:
    return {"id": "k1", "appliance": "fridge"} | overrides


@pytest.mark.parametrize(
    ("doc", "field", "words"),
    [
        ([], None, "mapping"),
        ({"kits": []}, "kits", "non-empty"),
        ({"kits": [_kit()], "colour": 1}, None, "colour"),
        ({"kits": [_kit()], "seed": -1}, "seed", "non-negative"),
        ({"kits": [_kit()], "start": "yesterday"}, "start", "ISO 8601"),
        ({"kits": [_kit(appliance="toaster")]}, "kits[0].appliance", "furnace"),
        ({"kits": [_kit(id="a/b")]}, "kits[0].id", "letters"),
        ({"kits": [_kit(), _kit()]}, "kits[1].id", "twice"),
        ({"kits": [_kit(interval="fast")]}, "kits[0].interval", "duration"),
        ({"kits": [_kit(interval=0)]}, "kits[0].interval", "1 ms"),
        ({"kits": [_kit(params={"door": 1})]}, "kits[0].params.door", "setpoint_c"),
        ({"kits": [_kit(params={"door_open_s": 1})]}, "kits[0].params.door_open_s", "numeric"),
        ({"kits": [_kit(faults=[{"at": 1}])]}, "kits[0].faults[0].fault", "required"),
        ({"kits": [_kit(faults=[{"fault": "rust", "at": 1}])]}, "kits[0].faults[0].fault", "known"),
        (
            {"kits": [_kit(faults=[{"fault": "clogged_filter", "at": 1}])]},
            "kits[0].faults[0].fault",
            "does not happen to a fridge",
        ),
        ({"kits": [_kit(faults=[{"fault": "spikes"}])]}, "kits[0].faults[0].at", "required"),
        (
            {"kits": [_kit(faults=[{"fault": "spikes", "at": 1, "severity": 2}])]},
            "kits[0].faults[0].severity",
            "0 < severity",
        ),
        (
            {"kits": [_kit(faults=[{"fault": "spikes", "at": 10, "until": 5}])]},
            "kits[0].faults[0].until",
            "after",
        ),
        (
            {"kits": [_kit(faults=[{"fault": "spikes", "at": 1, "sensors": ["x"]}])]},
            "kits[0].faults[0].sensors",
            "cabinet_temp_c",
        ),
        (
            {"kits": [_kit(faults=[{"fault": "bearing_wear", "at": 1, "sensors": ["x"]}])]},
            "kits[0].faults[0].sensors",
            "not on chosen sensors",
        ),
    ],
)
def test_bad_scenarios_name_the_field(doc: Any, field: str | None, words: str) -> None:
    with pytest.raises(ValidationError) as caught:
        parse_scenario(doc, source="home.yaml")
    assert caught.value.field == field
    assert caught.value.source == "home.yaml"
    assert words in str(caught.value)


def test_unreadable_scenario_files_say_so(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="cannot read"):
        load_scenario(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(ValidationError, match="not valid JSON"):
        load_scenario(bad)


def test_the_tables_hang_together() -> None:
    for kind, model in APPLIANCES.items():
        assert model.kind == kind
        names = [s.name for s in model.sensors]
        assert len(set(names)) == len(names)
        assert appliance(kind.upper()) is model
        for alias in model.aliases:
            assert appliance(alias) is model
        # The plant returns one value per sensor.
        scenario = home([kind])
        reading = KitSimulator(scenario.kits[0], seed=0, start_ms=scenario.start_ms).step()
        assert list(reading.values) == names
    for name, mode in FAULTS.items():
        assert fault_mode(name) is mode
        assert mode.applies_to <= set(APPLIANCES)
        assert (mode.knob is None) != (mode.sensor_fault is None)
    with pytest.raises(ValidationError, match="known: furnace"):
        appliance("toaster")


def test_payloads_round_trip_and_name_bad_fields() -> None:
    scenario = parse_scenario(
        {"kits": [_kit(faults=[{"fault": "sensor_dropout", "at": 0, "severity": 0.5}])]}
    )
    sim = KitSimulator(scenario.kits[0], seed=1, start_ms=scenario.start_ms)
    readings = sim.take(20)
    assert any(None in r.values.values() for r in readings)
    for reading in readings:
        back = decode(encode(reading))
        assert back == replace(reading, level=0.0)
    doc = json.loads(encode(readings[0]))
    # The reading object of edgeloop's telemetry records, field for field.
    assert list(doc) == ["kit", "appliance", "ts", "sensors", "kit_seq", "label"]
    assert doc["ts"] == scenario.start_ms / 1000 and doc["label"] == "sensor_dropout"
    for field, value in [
        ("kit_seq", -1),
        ("kit", "a/b"),
        ("sensors", {"x": "hot"}),
        ("ts", "now"),
        ("colour", 1),
    ]:
        with pytest.raises(ValidationError) as caught:
            decode(json.dumps(doc | {field: value}).encode())
        assert field in str(caught.value)
    assert telemetry_topic("k1", "home/7/kits") == "home/7/kits/k1/telemetry"
    assert check_prefix("home/7/kits") == "home/7/kits"
    for bad in ("", "a//b", "kits/+", "#"):
        with pytest.raises(ValidationError):
            check_prefix(bad)
    status = json.loads(status_payload(scenario.kits[0], online=True))
    assert status["online"] is True and status["sensors"][0]["name"] == "cabinet_temp_c"
    assert json.loads(status_payload(scenario.kits[0], online=False)) == {
        "kit": "k1",
        "online": False,
    }
