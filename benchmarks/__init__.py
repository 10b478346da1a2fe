"""edgeloop's benchmarks: ``python -m benchmarks [SUITE ...]`` prints one table per run.

Each suite is a module with a ``run(out: SuiteResult)`` function that adds its rows and
notes to ``out``; ``SUITES`` names them.
Baselines are measured in the same run as what they are compared with, on the same machine.
"""

from __future__ import annotations

SUITES: dict[str, str] = {
    # suite name -> module, imported only when the suite runs
    "edge": "benchmarks.edge_runtime",
    "ipc": "benchmarks.ipc",
    "lake": "benchmarks.lake",
    "sim": "benchmarks.sim",
    "cloud": "benchmarks.cloud",
    "rollout": "benchmarks.rollout",
    "spool": "benchmarks.spool",
    "pipeline": "benchmarks.pipeline",
    "soak": "benchmarks.soak",
    "nab": "benchmarks.nab",
    "ml": "benchmarks.ml",
}

__all__ = ["SUITES"]
