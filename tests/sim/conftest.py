"""Helpers for the simulator's tests: one kit's readings with and without faults."""

from __future__ import annotations

from typing import Any

from edgeloop.sim.generator import Batch, KitSimulator
from edgeloop.sim.scenario import Scenario, parse_scenario

HOUR = 3600.0


def one_kit(appliance: str, *faults: dict[str, Any], seed: int = 3, **kit: Any) -> Scenario:
    """A scenario with one kit (id ``<appliance>-1``) and the given fault entries."""
    return parse_scenario(
        {
            "seed": seed,
            "kits": [
                {"id": f"{appliance}-1", "appliance": appliance, "faults": list(faults), **kit}
            ],
        }
    )


def run(appliance: str, *faults: dict[str, Any], hours: float = 24.0, **kw: Any) -> Batch:
    """``hours`` of one kit's readings as arrays."""
    scenario = one_kit(appliance, *faults, **kw)
    kit = scenario.kits[0]
    sim = KitSimulator(kit, seed=scenario.seed, start_ms=scenario.start_ms)
    return sim.batch(round(hours * HOUR * 1000 / kit.interval_ms))


def window(batch: Batch, from_h: float, to_h: float) -> slice:
    """Rows from ``from_h`` to ``to_h`` hours after the start."""
    per_hour = round(HOUR * 1000 / int(batch.ts_ms[1] - batch.ts_ms[0]))
    return slice(round(from_h * per_hour), round(to_h * per_hour))
