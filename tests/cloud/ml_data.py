"""Simulated appliance readings in a lake, for the ML loop's tests."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from edgeloop.cloud.lake import Lake
from edgeloop.core.telemetry import Record, TelemetryBatch
from edgeloop.sim.generator import KitSimulator
from edgeloop.sim.payload import encode
from edgeloop.sim.scenario import parse_scenario

HOUR_US = 3_600_000_000


def kit_payloads(
    kit_id: str,
    appliance: str,
    hours: float,
    *,
    seed: int,
    faults: Sequence[dict[str, Any]] = (),
    params: dict[str, float] | None = None,
) -> list[bytes]:
    """One kit's readings as the telemetry payloads a hub spools."""
    kit: dict[str, Any] = {"id": kit_id, "appliance": appliance, "faults": list(faults)}
    if params:
        kit["params"] = params
    scenario = parse_scenario({"seed": seed, "kits": [kit]})
    spec = scenario.kits[0]
    simulator = KitSimulator(spec, seed=seed, start_ms=scenario.start_ms)
    count = round(hours * 3_600_000 / spec.interval_ms)
    return [encode(simulator.step()) for _ in range(count)]


def batches(
    thing: str,
    payloads: Sequence[bytes],
    *,
    size: int = 4000,
    first: int = 1,
    stream: str = "readings",
) -> list[TelemetryBatch]:
    """The payloads as upload batches of one stream, numbered from ``first``."""
    return [
        TelemetryBatch(
            thing,
            stream,
            tuple(
                Record(first + start + i, 1_736_121_600_000_000 + (start + i) * 1000, payload)
                for i, payload in enumerate(payloads[start : start + size])
            ),
        )
        for start in range(0, len(payloads), size)
    ]


def ingest(
    lake: Lake, thing: str, payloads: Sequence[bytes], *, size: int = 4000, stream: str = "readings"
) -> None:
    """Upload the payloads (one stream of one thing) into the lake."""
    for batch in batches(thing, payloads, size=size, stream=stream):
        result = lake.ingest(batch)
        assert result.quarantined == 0, result
