"""The reliability soak: a million kit readings to the lake through kill -9 of the hub agent,
a restart of its kits' broker, a cloud outage and streams filled to their limits.

It is the ``soak``-marked test ``tests/reliability/test_kits_to_lake.py`` (the story and
its checks are there; ``make test`` runs the same story with 13,000 readings), run with
pytest in a process of its own; the row says whether every check held and how long the
million readings took.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._report import Result, SuiteResult

TEST = "tests/reliability/test_kits_to_lake.py"
ROOT = Path(__file__).resolve().parent.parent


def run(out: SuiteResult) -> None:
    """Run the soak test; one row with its outcome."""
    with tempfile.TemporaryDirectory(prefix="elb-soak-") as folder:
        report = Path(folder) / "report.json"
        env = {**os.environ, "EDGELOOP_SOAK_REPORT": str(report)}
        print("  soak: a million readings, kits to lake (several minutes)", file=sys.stderr)
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-m", "soak", "-q", "-p", "no:cacheprovider", TEST],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        took = time.monotonic() - started
        if done.returncode != 0 or not report.exists():
            out.results.append(
                Result(
                    benchmark="soak: 1,000,000 readings kits to lake",
                    measured=f"FAILED after {took:.0f} s (pytest -m soak {TEST})",
                )
            )
            raise RuntimeError(f"the soak test failed:\n{done.stdout[-4000:]}{done.stderr[-2000:]}")
        found = json.loads(report.read_text())
    readings, seconds = found["readings"], found["seconds"]
    out.results.append(
        Result(
            benchmark="soak: kits to lake through kill -9, broker restart, outage, full streams",
            measured=f"every check held: {readings:,} readings, 0 lost, 0 duplicated, "
            f"{found['overwritten']} counted as overwritten by policy; {seconds:.0f} s "
            f"({readings / seconds:,.0f} readings/s)",
            comparison="events: " + "; ".join(f"{at:.0f} s {what}" for at, what in found["events"]),
        )
    )
