"""Streaming anomaly detectors: one reading in, an anomaly score in [0, 1] and a decision out.

A detector judges each reading before it sees the next. It works in three layers:

1. **Novelty**, twice over. *Pattern novelty*: the last ``window`` readings form a pattern;
   its novelty is the distance (largest per-reading difference) to the nearest of the last
   ``memory`` patterns seen before it. A spike of a new shape, a rhythm that stops, a level
   never visited: each makes a pattern unlike anything remembered, and a pattern seen once
   before is no longer novel. *Level*: how far the reading falls outside the range of the
   last ``memory`` readings, as a share of their spread — a new extreme stands out even in a
   stream so noisy that no pattern ever repeats.
2. **Judgement** — pattern novelty is judged against its own recent history (as NAB's
   anomaly likelihood judges HTM's raw scores): the mean of the last ``smoothing`` novelties
   as a z-score over the ``baseline`` novelties before them, so that one parameter set fits
   streams of any scale and noise. A level beyond the range by ``level_alarm`` of the spread
   counts as much as a z-score of ``z_alarm``. The score is ``z / (z + z_alarm)`` for the
   larger of the two: 0.5 exactly where the detector decides.
3. **Refractory period** — after a decision the detector stays quiet for ``refractory``
   readings (score 0): one incident, one alarm.

:class:`SensorDetector` watches one sensor; :class:`ApplianceDetector` watches all the sensors of
one appliance as one joint pattern, each scaled by its spread over the warm-up, so that a
combination never seen (a pump drawing current with no flow) is novel even when each sensor
alone is not.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
from numpy.typing import NDArray

Timestamp = float | np.datetime64 | None


@runtime_checkable
class Detector(Protocol):
    """What every streaming detector offers."""

    @property
    def decision(self) -> bool:
        """Whether the last reading was judged anomalous (its score reached 0.5)."""
        ...

    def update(self, value: float, timestamp: Timestamp = None) -> float:
        """Take the next reading and return its anomaly score in [0, 1]."""
        ...

    def reset(self) -> None:
        """Forget everything, as if newly made."""
        ...


@dataclass(frozen=True, kw_only=True)
class DetectorConfig:
    """The one parameter set edgeloop's detectors use on every stream."""

    window: int = 8  # readings in a pattern
    memory: int = 4000  # patterns remembered for comparison
    warmup: int = 300  # readings before the likelihood learns: a young memory finds all new
    baseline: int = 1000  # novelties the likelihood's baseline spans
    smoothing: int = 5  # latest novelties averaged before they are judged
    z_alarm: float = 4.8  # likelihood z-score at which the detector decides
    level_alarm: float = 0.15  # share of the remembered spread beyond the range that decides
    refractory: int = 100  # quiet readings after a decision

    def __post_init__(self) -> None:
        if self.window < 1 or self.memory < 1 or self.smoothing < 1 or self.baseline < 2:
            raise ValueError("window, memory, smoothing must be >= 1 and baseline >= 2")
        if self.warmup < 0 or self.refractory < 0 or self.z_alarm <= 0 or self.level_alarm <= 0:
            raise ValueError("warmup and refractory must be >= 0, z_alarm and level_alarm > 0")


DEFAULT_CONFIG = DetectorConfig()
_MAX_Z = 1e6  # stands for "infinitely far": keeps scores finite


class PatternMemory:
    """The last ``memory`` patterns (``channels`` x ``window`` readings) and nearest-pattern search.

    Patterns are stored column-wise, one row per channel and lag. A pattern enters the memory
    only once it no longer overlaps the newest one, so a reading is never compared with
    itself. The search takes a bound from a likely close pattern (the successor of the
    previous best match: a series that repeats itself goes on as it went on before), and
    failing that from the patterns whose newest reading is closest. The memory is kept
    sorted by newest reading, which no nearer pattern can differ in by more than the bound:
    a binary search gives the candidates; the search discards, one row at a time, those
    already farther than the bound on that row, and measures the few that remain in full.
    """

    _FEW = 48  # patterns worth measuring in full rather than pruning further

    def __init__(self, channels: int, window: int, memory: int) -> None:
        self.channels = channels
        self.window = window
        self.capacity = memory
        self._rows = channels * window
        self._key_row = window - 1  # the first channel's newest reading
        # after the newest reading, the oldest (least correlated with it), then the rest
        self._prune_order = [0, *range(window - 2, 0, -1)]
        self._unit = np.ones(self._rows, dtype=np.float64)  # one channel: no scaling
        self._store = np.zeros((self._rows, memory), dtype=np.float64)
        self._ends = np.full(memory, -1, dtype=np.int64)  # reading index each pattern ends at
        self._keys = np.zeros(memory, dtype=np.float64)  # newest readings, ascending
        self._slots = np.zeros(memory, dtype=np.intp)  # the slot of each sorted key
        self._count = 0
        self._next = 0
        self._pending: deque[tuple[int, NDArray[np.float64]]] = deque()
        self._best = -1

    def reset(self) -> None:
        """Forget every pattern."""
        self._ends.fill(-1)
        self._count = 0
        self._next = 0
        self._pending.clear()
        self._best = -1

    def nearest(self, pattern: NDArray[np.float64], inv_scale: NDArray[np.float64]) -> float:
        """Largest scaled per-reading difference to the nearest remembered pattern (inf if none).

        ``pattern`` has one row per channel, oldest reading first; ``inv_scale`` one factor
        per channel.
        """
        count = self._count
        if count == 0:
            return math.inf
        flat = pattern.reshape(-1)
        weights = np.repeat(inv_scale, self.window) if self.channels > 1 else self._unit
        keys = self._keys[:count]
        key = float(flat[self._key_row])
        key_weight = float(weights[self._key_row])
        # A bound from likely neighbours: the successor of the previous best match, else the
        # patterns whose newest readings are closest.
        bound = math.inf
        best = self._best
        if best >= 0:
            successor = (best + 1) % self.capacity
            if successor < count and self._ends[successor] == self._ends[best] + 1:
                bound = float(self._distances(flat, weights, np.array([successor]))[0])
                if bound == 0.0:  # an exact repeat: nothing can be nearer
                    self._best = successor
                    return 0.0
        at = int(np.searchsorted(keys, key))
        if bound == math.inf:
            around = self._slots[max(0, at - 2) : at + 2]
            distances = self._distances(flat, weights, around)
            index = int(np.argmin(distances))
            bound = float(distances[index])
            if bound == 0.0:
                self._best = int(around[index])
                return 0.0
        # every nearer pattern has its newest reading within the bound of this one's
        # (widened a hair: key - (key - other) need not round back to other)
        reach = bound / key_weight * (1.0 + 1e-9) + 1e-12 * abs(key)
        low = int(np.searchsorted(keys, key - reach, side="left"))
        high = int(np.searchsorted(keys, key + reach, side="right"))
        candidates = self._slots[low:high]
        store = self._store
        for row in self._prune_order:
            if candidates.size <= self._FEW:
                break
            gap = np.abs(store[row, candidates] - flat[row])
            if self.channels > 1:
                gap *= weights[row]
            candidates = candidates[gap <= bound]
        for channel in range(1, self.channels):  # other channels prune on their newest too
            if candidates.size <= self._FEW:
                break
            row = channel * self.window + self.window - 1
            gap = np.abs(store[row, candidates] - flat[row]) * weights[row]
            candidates = candidates[gap <= bound]
        distances = self._distances(flat, weights, candidates)
        index = int(np.argmin(distances))
        self._best = int(candidates[index])
        return float(distances[index])

    def _distances(
        self, flat: NDArray[np.float64], weights: NDArray[np.float64], slots: NDArray[np.intp]
    ) -> NDArray[np.float64]:
        block = np.abs(self._store[:, slots] - flat[:, None])
        if self.channels > 1:
            block *= weights[:, None]
        result: NDArray[np.float64] = block.max(axis=0)
        return result

    def remember(self, pattern: NDArray[np.float64], end: int) -> None:
        """Queue the pattern ending at reading ``end``; admit the ones that no longer overlap."""
        self._pending.append((end, pattern.reshape(-1).copy()))
        # the next pattern (ending at end + 1) may meet those ending at end + 1 - window
        while self._pending and self._pending[0][0] <= end + 1 - self.window:
            done, flat = self._pending.popleft()
            self._admit(done, flat)

    def _admit(self, end: int, flat: NDArray[np.float64]) -> None:
        slot = self._next
        count = self._count
        keys, slots = self._keys, self._slots
        if count == self.capacity:  # the oldest pattern leaves, and its key with it
            old = float(self._store[self._key_row, slot])
            at = int(np.searchsorted(keys[:count], old, side="left"))
            while slots[at] != slot:  # among equal keys
                at += 1
            # copies: numpy does not promise overlapping slices move like memmove
            keys[at : count - 1] = keys[at + 1 : count].copy()
            slots[at : count - 1] = slots[at + 1 : count].copy()
            count -= 1
        key = float(flat[self._key_row])
        at = int(np.searchsorted(keys[:count], key, side="right"))
        keys[at + 1 : count + 1] = keys[at:count].copy()
        slots[at + 1 : count + 1] = slots[at:count].copy()
        keys[at] = key
        slots[at] = slot
        self._store[:, slot] = flat
        self._ends[slot] = end
        self._next = (slot + 1) % self.capacity
        self._count = count + 1


class LevelMemory:
    """The last ``memory`` readings of each channel, kept sorted, and how far a reading falls
    outside their range.

    A reading joins only ``lag`` readings later, so a new level stays outside the range for
    that long instead of widening it at once.
    """

    def __init__(self, channels: int, memory: int, *, lag: int) -> None:
        self.capacity = memory
        self._lag = lag
        self._sorted: list[list[float]] = [[] for _ in range(channels)]
        self._arrived: deque[list[float]] = deque()
        self._pending: deque[list[float]] = deque()

    def reset(self) -> None:
        """Forget every reading."""
        for values in self._sorted:
            values.clear()
        self._arrived.clear()
        self._pending.clear()

    def excess(self, reading: NDArray[np.float64]) -> float:
        """The largest distance of a channel beyond its range, over its spread (1st to 99th
        percentile; 0 within the range or with nothing remembered)."""
        worst = 0.0
        for value, values in zip(reading.tolist(), self._sorted, strict=True):
            if not values:
                continue
            beyond = max(value - values[-1], values[0] - value)
            if beyond <= 0.0:
                continue
            last = len(values) - 1
            spread = values[round(0.99 * last)] - values[round(0.01 * last)]
            if spread <= 0.0:
                spread = values[-1] - values[0]
            worst = max(worst, beyond / spread if spread > 0.0 else _MAX_Z)
        return worst

    def remember(self, reading: NDArray[np.float64]) -> None:
        """Queue the reading; admit the one ``lag`` readings older."""
        self._pending.append(reading.tolist())
        if len(self._pending) < self._lag:
            return
        admitted = self._pending.popleft()
        if len(self._arrived) == self.capacity:
            for value, values in zip(self._arrived.popleft(), self._sorted, strict=True):
                del values[bisect.bisect_left(values, value)]
        self._arrived.append(admitted)
        for value, values in zip(admitted, self._sorted, strict=True):
            bisect.insort(values, value)


class Likelihood:
    """How unusual the latest novelties are against the detector's own recent novelty.

    Returns the z-score of the mean of the last ``smoothing`` values over the ``baseline``
    values before them (running sums, refreshed exactly now and then against drift).
    """

    def __init__(self, baseline: int, smoothing: int) -> None:
        self.baseline = baseline
        self.smoothing = smoothing
        self._values: deque[float] = deque()
        self._recent: deque[float] = deque()
        self._sum = 0.0
        self._squares = 0.0
        self._recent_sum = 0.0
        self._since_refresh = 0

    def reset(self) -> None:
        """Forget every value."""
        self._values.clear()
        self._recent.clear()
        self._sum = self._squares = self._recent_sum = 0.0
        self._since_refresh = 0

    def update(self, value: float) -> float:
        """Take the next novelty; return its z-score (0 until the baseline has 20 values)."""
        self._recent.append(value)
        self._recent_sum += value
        if len(self._recent) > self.smoothing:
            old = self._recent.popleft()
            self._recent_sum -= old
            self._values.append(old)
            self._sum += old
            self._squares += old * old
            if len(self._values) > self.baseline:
                gone = self._values.popleft()
                self._sum -= gone
                self._squares -= gone * gone
            self._since_refresh += 1
            if self._since_refresh >= self.baseline:
                self._sum = math.fsum(self._values)
                self._squares = math.fsum(v * v for v in self._values)
                self._recent_sum = math.fsum(self._recent)
                self._since_refresh = 0
        count = len(self._values)
        if count < 20:
            return 0.0
        mean = self._sum / count
        spread = math.sqrt(max(self._squares / count - mean * mean, 1e-12))
        return (self._recent_sum / len(self._recent) - mean) / spread


class ApplianceDetector:
    """One joint detector over the sensors of an appliance, fed one reading of each at a time."""

    def __init__(self, channels: int, config: DetectorConfig = DEFAULT_CONFIG) -> None:
        if channels < 1:
            raise ValueError("an appliance detector needs at least one channel")
        self.channels = channels
        self.config = config
        self._memory = PatternMemory(channels, config.window, config.memory)
        self._levels = LevelMemory(channels, config.memory, lag=config.window)
        self._likelihood = Likelihood(config.baseline, config.smoothing)
        self._window = np.zeros((channels, config.window), dtype=np.float64)
        self._warm: list[NDArray[np.float64]] = []
        self._inv_scale = np.ones(channels, dtype=np.float64)
        self._seen = 0
        self._quiet = 0
        self._decision = False
        self.novelty = 0.0  # the last pattern's distance to its nearest remembered one
        self.level_excess = 0.0  # how far the last reading fell outside the remembered range
        self.z = 0.0  # the larger likelihood z-score of the last reading

    @property
    def decision(self) -> bool:
        """Whether the last reading was judged anomalous."""
        return self._decision

    def reset(self) -> None:
        """Forget everything, as if newly made."""
        self._memory.reset()
        self._levels.reset()
        self._likelihood.reset()
        self._window.fill(0.0)
        self._warm.clear()
        self._inv_scale.fill(1.0)
        self._seen = 0
        self._quiet = 0
        self._decision = False
        self.novelty = self.level_excess = self.z = 0.0

    def update_many(
        self, values: Sequence[float] | NDArray[np.float64], timestamp: Timestamp = None
    ) -> float:
        """Take one reading of every sensor (in channel order); return the anomaly score."""
        del timestamp  # patterns are in reading order; a clock adds nothing the order lacks
        reading = np.asarray(values, dtype=np.float64)
        if reading.shape != (self.channels,):
            raise ValueError(f"expected {self.channels} values, got shape {reading.shape}")
        if not bool(np.all(np.isfinite(reading))):
            raise ValueError(f"readings must be finite numbers, got {reading.tolist()}")
        config = self.config
        index = self._seen
        self._seen += 1
        self._window[:, :-1] = self._window[:, 1:]
        self._window[:, -1] = reading
        if self.channels > 1 and index < config.warmup:
            self._warm.append(reading.copy())
            if index == config.warmup - 1:
                self._inv_scale = _inverse_spread(np.array(self._warm))
                self._warm.clear()
        self.level_excess = self._levels.excess(reading)
        self._levels.remember(reading)
        if index < config.window - 1:
            return self._emit(0.0)
        self.novelty = self._memory.nearest(self._window, self._inv_scale)
        self._memory.remember(self._window, index)
        if index < config.warmup:
            return self._emit(0.0)
        self.z = max(
            self._likelihood.update(self.novelty),
            min(self.level_excess / config.level_alarm, _MAX_Z) * config.z_alarm,
        )
        score = self.z / (self.z + config.z_alarm) if self.z > 0 else 0.0
        return self._emit(score)

    def _emit(self, score: float) -> float:
        if self._quiet > 0:
            self._quiet -= 1
            self._decision = False
            return 0.0
        self._decision = score >= 0.5
        if self._decision:
            self._quiet = self.config.refractory
        return score


class SensorDetector(ApplianceDetector):
    """A detector for one sensor's stream."""

    def __init__(self, config: DetectorConfig = DEFAULT_CONFIG) -> None:
        super().__init__(1, config)

    def update(self, value: float, timestamp: Timestamp = None) -> float:
        """Take the next reading and return its anomaly score in [0, 1]."""
        return self.update_many((value,), timestamp)


def _inverse_spread(readings: NDArray[np.float64]) -> NDArray[np.float64]:
    """1 / each channel's spread (interquartile range, else range, else 1) over the readings."""
    low, high = np.percentile(readings, [25, 75], axis=0)
    spread = high - low
    full = readings.max(axis=0) - readings.min(axis=0)
    spread = np.where(spread > 0, spread, full)
    spread = np.where(spread > 0, spread, 1.0)
    return 1.0 / spread
