"""Readings from a scenario: labelled, deterministic by seed, as fast as the CPU allows.

``KitSimulator`` produces one kit's readings in order (``step``, ``take``, ``batch``);
``HomeSimulator`` merges a scenario's kits by timestamp. Simulated time is separate from
the wall clock: a reading's timestamp is ``start + seq * interval``, and ``Pacer`` is what
spreads readings over real time at a speed factor when they are sent live.

Determinism: every random number comes from numpy ``Generator`` streams keyed by the seed,
the kit id and the stream's role (the plant, the sensors' noise, each fault injection), and
each stream gives the same number of draws every sample. So the same scenario and seed give
byte-identical readings, however they are batched; adding a kit or a fault leaves the other
kits' readings alone; and a kit with a fault shares its noise sample by sample with the same
kit without it.
"""

from __future__ import annotations

import heapq
import math
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from edgeloop.sim.models import NORMAL, SPIKE_RATE, Knob, SensorFault
from edgeloop.sim.plants import HEALTHY, Knobs, make_plant
from edgeloop.sim.scenario import FaultInjection, KitSpec, Scenario

BLOCK = 256  # samples of random numbers drawn at once; changes no value, only speed
_PLANT, _SENSORS, _FAULTS = 0, 1, 2  # stream roles, part of the seed derivation


@dataclass(frozen=True, kw_only=True, slots=True)
class Reading:
    """One sample of one kit, with its ground truth.

    ``values`` maps each sensor (in the model's order) to its reading, or ``None`` when the
    sensor gave none. ``label``, ``faults`` and ``level``: see ``edgeloop.sim.scenario``.
    """

    kit_id: str
    appliance: str
    seq: int  # 0 at the scenario's start, +1 per sample: gaps mean lost readings
    ts_ms: int  # device timestamp, milliseconds since the Unix epoch (UTC)
    values: dict[str, float | None]
    label: str
    faults: tuple[str, ...] = ()
    level: float = 0.0


@dataclass(frozen=True, kw_only=True)
class Batch:
    """Consecutive readings of one kit as arrays (missing values are NaN)."""

    kit_id: str
    appliance: str
    sensors: tuple[str, ...]
    seq: NDArray[np.int64]
    ts_ms: NDArray[np.int64]
    values: NDArray[np.float64]  # shape (samples, sensors)
    labels: tuple[str, ...]
    levels: NDArray[np.float64]

    def column(self, sensor: str) -> NDArray[np.float64]:
        """One sensor's readings."""
        return self.values[:, self.sensors.index(sensor)]


class _Draws:
    """A stream's fixed-width rows of uniforms and normals, drawn a block at a time."""

    def __init__(self, seed: np.random.SeedSequence, uniforms: int, normals: int) -> None:
        self._rng = np.random.Generator(np.random.PCG64(seed))
        self._uniforms = uniforms
        self._normals = normals
        self._u: list[list[float]] = []
        self._n: list[list[float]] = []
        self._i = BLOCK

    def next(self) -> tuple[list[float], list[float]]:
        if self._i == BLOCK:
            # Python lists: indexing numpy scalars one by one costs more than the physics.
            self._u = self._rng.random((BLOCK, self._uniforms)).tolist()
            self._n = self._rng.standard_normal((BLOCK, self._normals)).tolist()
            self._i = 0
        i = self._i
        self._i += 1
        return self._u[i], self._n[i]


class _Injected:
    """A fault injection's running state in one kit."""

    def __init__(
        self, fault: FaultInjection, sensors: tuple[str, ...], seed: np.random.SeedSequence
    ):
        self.fault = fault
        self.mode = fault.mode  # looked up once: the property searches the table
        self.columns = tuple(sensors.index(name) for name in fault.sensors)
        # Per sensor: whether it fires, its size, its sign; then the relay's roll.
        self.draws = _Draws(seed, 3 * len(sensors) + 1, 0)
        self.held: dict[int, float | None] = {}  # stuck values
        self.spiked = [False] * len(sensors)


def _digits(resolution: float) -> int:
    return max(0, math.ceil(-math.log10(resolution) - 1e-9))


class KitSimulator:
    """One kit's readings, one sample at a time."""

    def __init__(
        self, kit: KitSpec, *, seed: int, start_ms: int, utc_offset_h: float = 0.0
    ) -> None:
        self.kit = kit
        self.seed = kit.seed if kit.seed is not None else seed
        self.start_ms = start_ms
        self.seq = 0
        self._offset_s = utc_offset_h * 3600.0
        model = kit.model
        self.sensors = tuple(s.name for s in model.sensors)
        self._specs = model.sensors
        self._channels = tuple(
            (
                s.noise_rel,
                s.noise_sd,
                s.low,
                s.high,
                s.resolution,
                _digits(s.resolution),
                s.resolution == 10.0 ** -_digits(s.resolution),
            )
            for s in model.sensors
        )
        self._plant = make_plant(model, kit.interval_ms / 1000, start_ms / 1000, self._offset_s)
        key = zlib.crc32(kit.kit_id.encode())

        def stream(*role: int) -> np.random.SeedSequence:
            return np.random.SeedSequence(self.seed, spawn_key=(key, *role))

        self._plant_draws = _Draws(stream(_PLANT), self._plant.UNIFORMS, self._plant.NORMALS)
        self._noise = _Draws(stream(_SENSORS), 0, 2 * len(self.sensors))
        self._injected = [
            _Injected(f, self.sensors, stream(_FAULTS, i)) for i, f in enumerate(kit.faults)
        ]
        # The order the label takes its fault in: by start, then by entry.
        self._by_start = sorted(range(len(kit.faults)), key=lambda i: (kit.faults[i].start_s, i))

    @property
    def next_ts_ms(self) -> int:
        """The timestamp of the next reading."""
        return self.start_ms + self.seq * self.kit.interval_ms

    def step(self) -> Reading:
        """The next reading."""
        seq, ts_ms, values, label, faults, level = self._advance()
        return Reading(
            kit_id=self.kit.kit_id,
            appliance=self.kit.appliance,
            seq=seq,
            ts_ms=ts_ms,
            values=dict(zip(self.sensors, values, strict=True)),
            label=label,
            faults=faults,
            level=level,
        )

    def take(self, count: int) -> list[Reading]:
        """The next ``count`` readings."""
        return [self.step() for _ in range(count)]

    def batch(self, count: int) -> Batch:
        """The next ``count`` readings as arrays: the same values ``take`` would give."""
        seqs = np.empty(count, dtype=np.int64)
        stamps = np.empty(count, dtype=np.int64)
        values = np.empty((count, len(self.sensors)), dtype=np.float64)
        levels = np.empty(count, dtype=np.float64)
        labels = []
        for row in range(count):
            seq, ts_ms, sample, label, _, level = self._advance()
            seqs[row], stamps[row], levels[row] = seq, ts_ms, level
            values[row] = [math.nan if v is None else v for v in sample]
            labels.append(label)
        return Batch(
            kit_id=self.kit.kit_id,
            appliance=self.kit.appliance,
            sensors=self.sensors,
            seq=seqs,
            ts_ms=stamps,
            values=values,
            labels=tuple(labels),
            levels=levels,
        )

    def _advance(self) -> tuple[int, int, list[float | None], str, tuple[str, ...], float]:
        kit = self.kit
        seq = self.seq
        self.seq += 1
        ts_ms = self.start_ms + seq * kit.interval_ms
        t_rel = seq * kit.interval_ms / 1000
        t = ts_ms / 1000
        local_h = ((t + self._offset_s) % 86400.0) / 3600.0

        # Every stream gives its row every sample, whatever is active (see the module doc).
        rows = [injected.draws.next()[0] for injected in self._injected]
        if rows:
            # Each fault's level once per sample; None outside its window.
            levels = [
                injected.fault.level(t_rel) if injected.fault.active(t_rel) else None
                for injected in self._injected
            ]
            knobs = self._knobs(levels, rows)
        else:
            levels, knobs = [], HEALTHY
        u, n = self._plant_draws.next()
        truth = self._plant.step(t, local_h, knobs, u, n)
        _, noise = self._noise.next()
        noisy = [
            value * (1.0 + rel * noise[2 * i]) + sd * noise[2 * i + 1]
            for i, (value, (rel, sd, *_)) in enumerate(zip(truth, self._channels, strict=True))
        ]
        if rows:
            self._spikes(noisy, rows, levels)
        values: list[float | None] = []
        for value, (_, _, low, high, res, digits, decimal) in zip(
            noisy, self._channels, strict=True
        ):
            clamped = high if value > high else low if value < low else value
            # "+ 0.0" turns -0.0 into 0.0, so that payloads never say "-0.0".
            if decimal:
                values.append(round(clamped, digits) + 0.0)
            else:
                values.append(round(round(clamped / res) * res, digits) + 0.0)
        if rows:
            self._sensor_faults(values, rows, levels)
            label, faults, level = self._truth(levels)
        else:
            label, faults, level = NORMAL, (), 0.0
        return seq, ts_ms, values, label, faults, level

    def _truth(self, levels: list[float | None]) -> tuple[str, tuple[str, ...], float]:
        """What ``KitSpec.truth`` says, from this sample's levels (see the scenario doc)."""
        active = [i for i in self._by_start if levels[i] is not None]
        if not active:
            return NORMAL, (), 0.0
        first = levels[active[0]]
        assert first is not None
        return (
            self._injected[active[0]].fault.fault,
            tuple(self._injected[i].fault.fault for i in active),
            first,
        )

    def _knobs(self, levels: list[float | None], rows: list[list[float]]) -> Knobs:
        turned: dict[Knob, float] = {}
        roll = 1.0
        for injected, row, level in zip(self._injected, rows, levels, strict=True):
            knob = injected.mode.knob
            if knob is None or not level:
                continue
            if level > turned.get(knob, 0.0):  # two faults on one knob: the worse one
                turned[knob] = level
                if knob in (Knob.STICK_ON, Knob.STICK_OFF):
                    roll = row[-1]
        if not turned:
            return HEALTHY
        return Knobs(
            wear=turned.get(Knob.WEAR, 0.0),
            capacity_loss=turned.get(Knob.CAPACITY_LOSS, 0.0),
            restriction=turned.get(Knob.RESTRICTION, 0.0),
            stick_on=turned.get(Knob.STICK_ON, 0.0),
            stick_off=turned.get(Knob.STICK_OFF, 0.0),
            relay_roll=roll,
        )

    def _spikes(
        self, noisy: list[float], rows: list[list[float]], levels: list[float | None]
    ) -> None:
        for injected, row, level in zip(self._injected, rows, levels, strict=True):
            if injected.mode.sensor_fault is not SensorFault.SPIKES:
                continue
            rate = SPIKE_RATE * (level or 0.0)
            for col in injected.columns:
                # Never two in a row on one sensor: an outlier stands alone.
                fires = rate > 0 and row[3 * col] < rate and not injected.spiked[col]
                injected.spiked[col] = fires
                if fires:
                    spec = self._specs[col]
                    size = spec.spike * (1.0 + row[3 * col + 1])
                    down = row[3 * col + 2] < 0.5 and noisy[col] - size >= spec.low
                    noisy[col] += -size if down else size

    def _sensor_faults(
        self, values: list[float | None], rows: list[list[float]], levels: list[float | None]
    ) -> None:
        for injected, row, level in zip(self._injected, rows, levels, strict=True):
            kind = injected.mode.sensor_fault
            if kind is None or kind is SensorFault.SPIKES:
                continue
            if not level:
                injected.held.clear()  # outside the window: a later one holds afresh
                continue
            if kind is SensorFault.STUCK:
                for col in injected.columns:
                    values[col] = injected.held.setdefault(col, values[col])
            else:  # DROPOUT
                for col in injected.columns:
                    if row[3 * col] < level:
                        values[col] = None


class HomeSimulator:
    """A scenario's kits, their readings merged in timestamp order."""

    def __init__(self, scenario: Scenario) -> None:
        self.scenario = scenario
        self.kits = [
            KitSimulator(
                kit,
                seed=scenario.seed,
                start_ms=scenario.start_ms,
                utc_offset_h=scenario.utc_offset_h,
            )
            for kit in scenario.kits
        ]

    def readings(
        self, *, duration_s: float | None = None, count: int | None = None
    ) -> Iterator[Reading]:
        """Readings until ``duration_s`` of simulated time or ``count`` readings per kit
        (whichever comes first; forever with neither), ties in scenario order."""
        end_ms = None if duration_s is None else self.scenario.start_ms + round(duration_s * 1000)
        heap = [(sim.next_ts_ms, i) for i, sim in enumerate(self.kits)]
        heapq.heapify(heap)
        while heap:
            ts_ms, i = heapq.heappop(heap)
            sim = self.kits[i]
            if (end_ms is not None and ts_ms >= end_ms) or (count is not None and sim.seq >= count):
                continue
            yield sim.step()
            heapq.heappush(heap, (sim.next_ts_ms, i))


class Pacer:
    """Spreads simulated time over real time: ``speed`` simulated seconds per real one.

    ``speed`` 0 (or less) means as fast as possible. The first call sets the origin.
    """

    def __init__(self, speed: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.speed = speed
        self._clock = clock
        self._origin: tuple[float, float] | None = None  # (real, simulated)

    def delay(self, sim_s: float) -> float:
        """Real seconds to wait before simulated time ``sim_s`` is due (0 if it is)."""
        if self.speed <= 0:
            return 0.0
        now = self._clock()
        if self._origin is None:
            self._origin = (now, sim_s)
        real0, sim0 = self._origin
        return max(0.0, real0 + (sim_s - sim0) / self.speed - now)
