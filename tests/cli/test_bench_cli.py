"""`edgeloop bench nab` on a small corpus laid out as NAB lays its own."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from edgeloop.cli.main import app
from edgeloop.ml import nab

PROFILES = {
    name: {"CostMatrix": {"tpWeight": c.tp_weight, "fnWeight": c.fn_weight,
                          "fpWeight": c.fp_weight, "tnWeight": c.tn_weight}}
    for name, c in nab.PROFILES.items()
}  # fmt: skip


def write_corpus(root: Path) -> None:
    rng = np.random.default_rng(0)
    stamps = np.datetime64("2024-01-01T00:00") + np.arange(1200) * np.timedelta64(5, "m")
    windows = {}
    for name, shift in (("steady.csv", None), ("shift.csv", 1000)):
        values = rng.normal(10, 1, stamps.size)
        if shift:
            values[shift:] += 10
        path = root / "data" / "demo" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = [
            f"{str(t).replace('T', ' ')}:00,{v:.4f}" for t, v in zip(stamps, values, strict=True)
        ]
        path.write_text("timestamp,value\n" + "\n".join(rows) + "\n")
        windows[f"demo/{name}"] = (
            [[f"{str(stamps[shift - 30]).replace('T', ' ')}:00.000000",
              f"{str(stamps[shift + 30]).replace('T', ' ')}:00.000000"]] if shift else []
        )  # fmt: skip
    (root / "labels").mkdir()
    (root / "labels" / "combined_windows.json").write_text(json.dumps(windows))
    (root / "config").mkdir()
    (root / "config" / "profiles.json").write_text(json.dumps(PROFILES))
    scores = root / "reference" / "scores"
    scores.mkdir(parents=True)
    for detector, shift_score in (("null", -1.0), ("rival", 0.5)):
        for profile in nab.PROFILES:
            lines = ["Detector,Profile,File,Threshold,Score,TP,TN,FP,FN,Total_Count"]
            lines.append(f"{detector},{profile},demo/steady.csv,0.5,0.0,0,1020,0,0,1200")
            lines.append(f"{detector},{profile},demo/shift.csv,0.5,{shift_score},0,959,0,61,1200")
            (scores / f"{detector}_{profile}_scores.csv").write_text("\n".join(lines) + "\n")


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    write_corpus(tmp_path)
    return tmp_path


def test_bench_nab_scores_the_detector_next_to_the_scoreboard(corpus: Path) -> None:
    result = CliRunner().invoke(
        app, ["bench", "nab", "--nab", str(corpus), "--jobs", "1", "--json"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["files"] == 2
    assert report["readings"] == 2400
    # the shift is found at once and nothing else fires: close to the perfect score
    assert report["edgeloop"]["standard"] > 90
    # the rival's 0.5 on the one window, between the null detector's -fnWeight and 1
    assert report["scoreboard"] == {
        "rival": {
            name: pytest.approx(100 * (0.5 + cost.fn_weight) / (1 + cost.fn_weight))
            for name, cost in nab.PROFILES.items()
        }
    }
    assert report["micros_per_reading"] > 0


def test_bench_nab_prints_a_table(corpus: Path) -> None:
    result = CliRunner().invoke(app, ["bench", "nab", "--nab", str(corpus), "--jobs", "1"])
    assert result.exit_code == 0, result.output
    assert "edgeloop" in result.output and "rival" in result.output
    assert "µs per reading" in result.output


def test_bench_nab_names_a_missing_corpus(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["bench", "nab", "--nab", str(tmp_path / "none")])
    assert result.exit_code == 1
    assert "profiles.json" in result.output
