"""Dataset snapshots of the lake: a content hash that is stable across how the readings
arrived, and changes with any reading; stored and fetched again by hash."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from edgeloop.cloud.db import Database
from edgeloop.cloud.lake import Lake
from edgeloop.cloud.ml.dataset import Datasets, DatasetSpec, appliance_data, parse_since
from edgeloop.cloud.objectstore import LocalObjectStore
from edgeloop.core.errors import NotFoundError, ValidationError

from .ml_data import ingest, kit_payloads

START = datetime(2025, 1, 6, tzinfo=UTC)


def _datasets(folder: Path) -> Datasets:
    folder.mkdir(parents=True, exist_ok=True)
    db = Database(f"sqlite:///{folder / 'edgeloop.db'}")
    db.migrate()
    objects = LocalObjectStore(folder / "objects")
    return Datasets(db, objects, Lake(db, objects))


@pytest.fixture(scope="module")
def payloads() -> dict[str, list[bytes]]:
    return {
        "fridge-1": kit_payloads("fridge-1", "fridge", 2, seed=1),
        "pump-1": kit_payloads(
            "pump-1", "pump", 1, seed=2, faults=[{"fault": "sensor_dropout", "at": "30m"}]
        ),
    }


def test_the_hash_depends_on_the_readings_not_on_how_they_arrived(
    tmp_path: Path, payloads: dict[str, list[bytes]]
) -> None:
    one, two = _datasets(tmp_path / "one"), _datasets(tmp_path / "two")
    for kit, readings in payloads.items():
        ingest(one.lake, "hub-1", readings, size=5000, stream=kit)
        ingest(two.lake, "hub-1", readings[::-1], size=333, stream=kit)  # other batches, order
    two.lake.compact()
    first, table = one.snapshot(DatasetSpec())
    again, _ = one.snapshot(DatasetSpec())
    other, _ = two.snapshot(DatasetSpec())
    assert first.hash == again.hash == other.hash
    assert first.rows == table.num_rows == sum(len(p) for p in payloads.values())
    assert first.appliances["fridge"]["kits"] == 1
    assert first.appliances["pump"]["readings"] == len(payloads["pump-1"])
    # Stored, and fetched again by hash, checked.
    assert one.get(first.hash).key.startswith("ml/datasets/")
    assert one.load(first.hash).equals(table)
    assert [d.hash for d in one.all()] == [first.hash]


def test_any_change_to_a_reading_changes_the_hash(
    tmp_path: Path, payloads: dict[str, list[bytes]]
) -> None:
    base, changed = _datasets(tmp_path / "a"), _datasets(tmp_path / "b")
    readings = payloads["fridge-1"]
    ingest(base.lake, "hub-1", readings)
    document = json.loads(readings[100])
    document["label"] = "bearing_wear"  # one label
    ingest(changed.lake, "hub-1", [*readings[:100], json.dumps(document).encode(), *readings[101:]])
    assert base.snapshot(DatasetSpec())[0].hash != changed.snapshot(DatasetSpec())[0].hash


def test_a_spec_narrows_the_snapshot(tmp_path: Path, payloads: dict[str, list[bytes]]) -> None:
    datasets = _datasets(tmp_path)
    for kit, readings in payloads.items():
        ingest(datasets.lake, "hub-1", readings, stream=kit)
    info, table = datasets.snapshot(
        DatasetSpec(appliances=("pump",), since=START + timedelta(minutes=20))
    )
    assert info.rows == len(payloads["pump-1"]) - 240  # 5 s readings, the first 20 minutes
    (pump,) = list(appliance_data(table))
    assert pump.appliance == "pump"
    assert pump.sensors == (
        "duty_cycle_pct",
        "flow_lpm",
        "motor_current_a",
        "pressure_bar",
        "vibration_rms_g",
    )
    (pump_kit,) = pump.kits
    assert pump_kit.device == "hub-1/pump-1"
    # Its pressure sensor (the kit's first) dropped out at 30 min.
    assert not np.isnan(pump_kit.values[:120, 3]).any() and np.isnan(pump_kit.values[120:, 3]).all()
    assert not np.isnan(np.delete(pump_kit.values, 3, axis=1)).any()
    assert (np.diff(pump_kit.ts_ms) == 5000).all()
    assert set(pump_kit.labels[:120]) == {"normal"} and set(pump_kit.labels[120:]) == {
        "sensor_dropout"
    }


def test_bad_specs_and_hashes_are_refused(tmp_path: Path) -> None:
    datasets = _datasets(tmp_path)
    with pytest.raises(ValidationError, match="appliances"):
        DatasetSpec(appliances=("fridge'; DROP TABLE x; --",))
    with pytest.raises(ValidationError, match="until"):
        DatasetSpec(since=START, until=START)
    with pytest.raises(ValidationError, match="since"):
        parse_since("yesterday", field="since")
    assert parse_since("2h", now=START, field="since") == START - timedelta(hours=2)
    assert parse_since("2025-01-06T00:00:00", field="since") == START
    with pytest.raises(ValidationError, match="SHA-256"):
        datasets.get("abc")
    with pytest.raises(NotFoundError):
        datasets.get("0" * 64)
