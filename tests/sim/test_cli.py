"""`edgeloop sim generate` and `edgeloop sim catalog`, through the console script."""

from __future__ import annotations

import json
from pathlib import Path

from edgeloop.sim.generator import HomeSimulator
from edgeloop.sim.models import APPLIANCES, FAULTS
from edgeloop.sim.payload import encode
from edgeloop.sim.scenario import load_scenario
from tests.sim.test_kits import SCENARIO, edgeloop


def test_generate_writes_the_generators_readings_as_json_lines(tmp_path: Path) -> None:
    scenario = tmp_path / "home.yaml"
    scenario.write_text(SCENARIO)
    out = tmp_path / "readings.jsonl"
    done = edgeloop(
        "sim", "generate", "--scenario", str(scenario), "--duration", "1h", "--out", str(out)
    )
    assert done.returncode == 0, done.stderr
    lines = out.read_bytes().splitlines()
    expected = [encode(r) for r in HomeSimulator(load_scenario(scenario)).readings(duration_s=3600)]
    assert lines == expected
    assert len(lines) == 2 * 360 + 2 * 720
    assert "2160 readings from 4 kit(s)" in done.stderr


def test_generate_with_truth_seed_and_start(tmp_path: Path) -> None:
    done = edgeloop(
        "sim",
        "generate",
        "--appliances",
        "refrigerator",
        "--seed",
        "9",
        "--start",
        "2025-07-01T12:00:00Z",
        "--count",
        "3",
        "--truth",
    )
    assert done.returncode == 0, done.stderr
    docs = [json.loads(line) for line in done.stdout.splitlines()]
    assert [d["kit_seq"] for d in docs] == [0, 1, 2]
    assert docs[0]["ts"] == 1751371200.0 and docs[0]["kit"] == "fridge-1"
    assert docs[0]["faults"] == [] and docs[0]["level"] == 0.0


def test_generate_names_bad_options() -> None:
    done = edgeloop("sim", "generate", "--appliances", "toaster", "--count", "1")
    assert done.returncode == 1 and "unknown appliance 'toaster'" in done.stderr
    done = edgeloop("sim", "generate", "--duration", "soon")
    assert done.returncode == 1 and "--duration" in done.stderr
    assert "Traceback" not in done.stderr


def test_catalog_lists_appliances_and_faults() -> None:
    done = edgeloop("sim", "catalog", "--json")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert [a["kind"] for a in doc["appliances"]] == list(APPLIANCES)
    assert [f["name"] for f in doc["faults"]] == list(FAULTS)
    table = edgeloop("sim", "catalog")
    assert "refrigerant_leak" in table.stdout and "supply_temp_c" in table.stdout
