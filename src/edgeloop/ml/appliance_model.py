"""A trained anomaly model for one appliance kind: fitted in the cloud, scored on the hub.

The model learns what normal readings of an appliance look like and judges each new one,
one at a time, in microseconds, with numpy alone (the hub needs nothing else).

How it judges a reading (all sensors of one kit at one moment):

1. **Operating states.** Appliances cycle (a compressor runs, then rests; a washer fills,
   heats, spins), so "normal" is several clouds of points, not one. The sensors, each
   standardised by its median and spread, are modelled by a Gaussian mixture (a component
   per operating state, learned by EM from a k-means++ start) with regularised
   covariances. A reading is judged by the state that explains it best, without the
   states' weights: a washer filling is as normal as a washer at rest, although it fills
   for 1% of the day. A combination no state explains (a running compressor with no
   current, a rest with vibration) is unlikely under every state.
2. **Calibration.** That negative log-likelihood is turned into a tail probability on
   normal readings the mixture was not fitted on: an empirical quantile table, with an
   exponential tail past its 99th percentile (peaks over threshold), so a reading far
   beyond anything seen still gets a finite, growing surprise (``-log10`` of the tail).
3. **Time scales.** The surprise's moving averages over a few readings and over many
   (exponentially weighted) are calibrated the same way, on normal sequences: the model
   sees a gross outlier at once, and a small, lasting shift (a bearing wearing, a leak)
   once it has lasted, while the slow swings of normal life (which make consecutive
   readings anything but independent) are already in the averages' calibration.
4. **Missing sensors.** A reading with sensors missing (dropout) is judged by the
   mixture's marginal over the sensors present, with its own calibration per subset of
   sensors. Missingness is evidence too: a Chernoff bound on so large a recent share of
   missing values, so one lost value is no alarm and a sensor gone quiet soon is.
5. **Stuck sensors.** A sensor repeating a value for longer than its normal runs
   (resting values, such as a pump's zero flow, excepted) is evidence as well.
6. **Decision.** The *level* is ``-log10`` of the smallest of those probabilities,
   Bonferroni-corrected within each kind of evidence; it rises at once and falls by the
   threshold over ``_HOLD`` readings at most, so an incident makes one alarm, not a
   flicker. The decision is ``level >= threshold``, the threshold set above the highest
   level seen on held-out normal sequences; the score is ``level / (level + threshold)``:
   in [0, 1], and 0.5 exactly where the model decides.

Measured against the simulator's labelled faults (``python -m benchmarks ml``), this beat
an isolation forest put in the mixture's place (same calibration, same time scales) on
every appliance kind, and scores a reading hundreds of times faster than scikit-learn's
forest, so the hub needs no ONNX runtime for it.

The model is data: :meth:`AnomalyModel.to_json` gives a small JSON document with a format
version (``FORMAT``, ``FORMAT_VERSION``), from which :meth:`AnomalyModel.from_json` rebuilds
the identical model on a hub. :meth:`AnomalyModel.scorer` gives a :class:`StreamingScorer`
(one per kit): ``score(reading) -> (score, decision)``. :meth:`AnomalyModel.score_sequence`
scores a whole sequence at once, with the same results, for evaluation in the cloud.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "AnomalyModel",
    "FitConfig",
    "ModelFormatError",
    "StreamingScorer",
    "fit",
]

FORMAT = "edgeloop.appliance-model"
FORMAT_VERSION = 1
# Subsets of sensors calibrated one by one: every subset up to this many sensors; beyond
# it only the full set and each set with one sensor missing (see _subsets).
EXHAUSTIVE_SENSORS = 6
_LEVELS = np.concatenate([np.linspace(0.0, 0.95, 96), np.linspace(0.955, 0.99, 8)])
_LEVEL_LIST: list[float] = _LEVELS.tolist()
_TAIL_LEVEL = 0.99
_LOG10 = math.log(10.0)
_HOLD = 60  # readings a level at the threshold takes to fall to zero

Array = NDArray[np.float64]


class ModelFormatError(ValueError):
    """A model document this code cannot read (another format, a newer version, damage)."""


@dataclass(frozen=True, kw_only=True)
class FitConfig:
    """How a model is fitted; the defaults suit every appliance of the simulator."""

    components: int = 16  # mixture components (operating states), at most
    iterations: int = 40  # EM iterations, at most
    regularisation: float = 1e-3  # added to every covariance's diagonal (standardised units)
    fit_share: float = 0.6  # of each normal sequence: mixture; then calibration; then threshold
    calibration_share: float = 0.2
    smoothing: tuple[int, ...] = (8, 96)  # readings the moving averages of surprise span
    margin: float = 1.25  # threshold = margin * the highest level on held-out normal data
    min_threshold: float = 5.0  # ... and at least this
    max_surprise: float = 12.0  # of one reading: a gross outlier decides, but cannot dominate
    missing_floor: float = 0.01  # share of a sensor's values missing that is always normal
    missing_span: int = 32  # readings the missing share is averaged over
    resting_share: float = 0.1  # a value this frequent is a resting value (never "stuck")
    max_rows: int = 20_000  # readings the EM sees at most (a random subset beyond)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.components < 1 or self.iterations < 1:
            raise ValueError("components and iterations must be >= 1")
        shares = (self.fit_share, self.calibration_share)
        if min(shares) <= 0 or sum(shares) >= 1:
            raise ValueError("fit_share and calibration_share must be > 0 and sum to < 1")
        if any(span < 2 for span in (*self.smoothing, self.missing_span)):
            raise ValueError("each smoothing span must be >= 2 readings")
        if self.margin < 1 or self.min_threshold <= 0 or self.max_surprise <= 0:
            raise ValueError("margin must be >= 1, min_threshold and max_surprise > 0")


# --- the parts of a model -----------------------------------------------------------------


@dataclass(frozen=True)
class _Calibration:
    """A statistic of normal data at ``_LEVELS`` (strictly increasing), and the mean excess
    over the last of them (the exponential tail's scale): its upper tail probability."""

    values: Array
    tail_scale: float
    plain: list[float] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "plain", self.values.tolist())

    def tails(self, x: Array) -> Array:
        top = self.values[-1]
        inside = 1.0 - np.interp(x, self.values, _LEVELS)
        beyond = (1.0 - _TAIL_LEVEL) * np.exp(-(np.maximum(x, top) - top) / self.tail_scale)
        out: Array = np.where(x <= top, inside, beyond)
        return out

    def tail(self, x: float) -> float:
        """``tails`` of one value, in plain Python (several times faster for one)."""
        values = self.plain
        top = values[-1]
        if x > top:
            return (1.0 - _TAIL_LEVEL) * math.exp(-(x - top) / self.tail_scale)
        if x <= values[0]:
            return 1.0
        lo, hi = 0, len(values) - 1  # bisect: the first value >= x
        while lo < hi:
            mid = (lo + hi) // 2
            if values[mid] < x:
                lo = mid + 1
            else:
                hi = mid
        frac = (x - values[hi - 1]) / (values[hi] - values[hi - 1])
        return 1.0 - (_LEVEL_LIST[hi - 1] + frac * (_LEVEL_LIST[hi] - _LEVEL_LIST[hi - 1]))

    def to_json(self) -> dict[str, Any]:
        return {"values": self.values.tolist(), "tailScale": self.tail_scale}

    @classmethod
    def from_json(cls, document: Any) -> _Calibration:
        return cls(_shaped(document["values"], (len(_LEVELS),)), float(document["tailScale"]))


@dataclass(frozen=True)
class _Stuck:
    """How long one sensor normally repeats a value: P(run >= r) for r = 1, 2, ...; each
    repeat past the longest seen multiplies it by ``rate``; resting values never count."""

    resting: tuple[float, ...]
    survival: tuple[float, ...]
    rate: float

    def tail(self, run: int) -> float:
        if run <= 1:
            return 1.0
        n = len(self.survival)
        if run <= n:
            return self.survival[run - 1]
        return self.survival[-1] * self.rate ** (run - n)


@dataclass(frozen=True)
class _Subset:
    """The mixture's marginal over some sensors, ready to score: ``z = x @ a.T - b`` gives
    each component's whitened distance (``components`` blocks of ``width``)."""

    index: NDArray[np.intp]
    a: Array
    b: Array
    log_const: Array
    width: int
    calibration: _Calibration | None
    halves: Array  # (components, components * width): half the sum of each block

    def nll(self, x: Array) -> float:
        """The negative log-likelihood of one reading (its present sensors' values) under
        the state that explains it best: ``_nll`` for one row, at a third of the cost."""
        z = self.a.dot(x)
        z -= self.b
        z *= z
        v = self.halves.dot(z)
        v -= self.log_const
        return float(v.min())


@dataclass(eq=False)
class AnomalyModel:
    """A fitted model of one appliance kind's normal readings (see the module doc)."""

    appliance: str
    sensors: tuple[str, ...]
    center: Array
    scale: Array
    weights: Array  # (components,)
    means: Array  # (components, sensors), standardised
    covariances: Array  # (components, sensors, sensors), standardised
    calibration: dict[int, _Calibration]  # negative log-likelihood, by mask of sensors present
    missing: Array  # normal share of missing values, per sensor
    missing_span: int  # readings the share is averaged over
    smoothing: tuple[int, ...]  # spans of the surprise's moving averages
    smoothed: tuple[_Calibration, ...]  # their calibrations
    start: float  # where the moving averages start: the mean surprise of normal readings
    stuck: tuple[_Stuck, ...]
    threshold: float
    max_surprise: float
    info: dict[str, Any] = field(default_factory=dict)
    _subsets: dict[int, _Subset] = field(default_factory=dict, repr=False)

    # -- scoring -----------------------------------------------------------------------

    def scorer(self) -> StreamingScorer:
        """A scorer for one kit's readings, in order."""
        return StreamingScorer(self)

    def score_sequence(self, values: Array) -> tuple[Array, NDArray[np.bool_]]:
        """Scores and decisions of a whole sequence (rows in time order, NaN = missing), the
        same a fresh :class:`StreamingScorer` gives reading by reading."""
        raw = self.raw_levels(values)
        levels = np.empty(len(raw))
        level, cap, fall = 0.0, 2 * self.threshold, self.threshold / _HOLD
        for i, r in enumerate(raw.tolist()):
            level = min(cap, max(r, level - fall))
            levels[i] = level
        return levels / (levels + self.threshold), levels >= self.threshold

    def raw_levels(self, values: Array) -> Array:
        """Each reading's level before the hold: ``-log10`` of the corrected smallest tail
        probability of its surprise, the surprise's moving averages and its sensors' runs."""
        values = _matrix(values, len(self.sensors))
        surprise = self.surprise(values)
        p = 10.0**-surprise
        for span, calibration in zip(self.smoothing, self.smoothed, strict=True):
            p = np.minimum(p, calibration.tails(_moving_average(surprise, span, self.start)))
        tests = 1 + len(self.smoothing)
        level = -np.log10(np.minimum(1.0, np.maximum(p, 1e-300) * tests))
        runs = np.ones(len(values))
        for j, stuck in enumerate(self.stuck):
            runs = np.minimum(runs, _stuck_tails(values[:, j], stuck))
        run_level = -np.log10(np.minimum(1.0, np.maximum(runs, 1e-300) * len(self.sensors)))
        out: Array = np.maximum(np.maximum(level, run_level), self.missing_levels(values))
        return out

    def missing_levels(self, values: Array) -> Array:
        """Each reading's missingness level: ``-log10`` of a Chernoff bound on the chance
        of so large a recent share of missing values (over ``missing_span`` readings) for
        the sensor least likely to miss so many, Bonferroni-corrected over the sensors."""
        values = _matrix(values, len(self.sensors))
        missing = np.isnan(values)
        level = np.zeros(len(values))
        if not missing.any():
            return level
        for j in np.flatnonzero(missing.any(axis=0)).tolist():
            share = _moving_average(missing[:, j].astype(np.float64), self.missing_span, 0.0)
            bits = _divergence(share, float(self.missing[j])) * self.missing_span / _LOG10
            level = np.maximum(level, bits)
        out: Array = np.maximum(0.0, level - math.log10(len(self.sensors)))
        return out

    def surprise(self, values: Array) -> Array:
        """Each reading's surprise: ``-log10`` of its density's tail probability (over the
        sensors present), at most ``max_surprise``."""
        p = self.density_tail(values)
        out: Array = np.minimum(self.max_surprise, -np.log10(np.maximum(p, 1e-300)))
        return out

    def density_tail(self, values: Array) -> Array:
        """Each reading's tail probability under the mixture (1 when no sensor is present)."""
        values = _matrix(values, len(self.sensors))
        masks = ~np.isnan(values) @ (1 << np.arange(len(self.sensors)))
        tail = np.ones(len(values))
        for mask in np.unique(masks).tolist():
            subset = self._subset(mask) if mask else None
            if subset is None or subset.calibration is None:
                continue  # judged by missingness alone
            rows = masks == mask
            nll = self._nll(subset, values[rows][:, subset.index])
            tail[rows] = subset.calibration.tails(nll)
        return tail

    def negative_log_likelihood(self, values: Array) -> Array:
        """The mixture's negative log-likelihood of complete readings (no NaN)."""
        values = _matrix(values, len(self.sensors))
        return self._nll(self._subset((1 << len(self.sensors)) - 1), values)

    def _nll(self, subset: _Subset, x: Array) -> Array:
        z = x @ subset.a.T - subset.b
        d2 = (z * z).reshape(len(x), len(self.weights), subset.width).sum(axis=2)
        out: Array = (0.5 * d2 - subset.log_const).min(axis=1)
        return out

    def _subset(self, mask: int) -> _Subset:
        found = self._subsets.get(mask)
        if found is None:
            found = self._subsets[mask] = self._marginal(mask)
        return found

    def _marginal(self, mask: int) -> _Subset:
        index = np.array([j for j in range(len(self.sensors)) if mask >> j & 1], dtype=np.intp)
        width = len(index)
        blocks, offsets, consts = [], [], []
        inv_scale = 1.0 / self.scale[index]
        for k in range(len(self.weights)):
            chol = np.linalg.cholesky(self.covariances[k][np.ix_(index, index)])
            whiten = np.linalg.inv(chol)
            # The standardisation folded in: whiten((x - center) / scale - mean).
            a = whiten * inv_scale[None, :]
            blocks.append(a)
            offsets.append(a @ self.center[index] + whiten @ self.means[k, index])
            log_det = 2.0 * float(np.log(np.diag(chol)).sum())
            # No log(weight): a rare operating state (a washer filling) is as normal as a
            # common one (the washer at rest); what counts is how well the nearest explains.
            consts.append(-0.5 * (width * math.log(2 * math.pi) + log_det))
        return _Subset(
            index=index,
            a=np.vstack(blocks),
            b=np.concatenate(offsets),
            log_const=np.array(consts),
            width=width,
            calibration=self.calibration.get(mask),
            halves=np.kron(np.eye(len(self.weights)), np.full(width, 0.5)),
        )

    # -- the document ------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """The model as a JSON document (floats round-trip exactly)."""
        return {
            "format": FORMAT,
            "formatVersion": FORMAT_VERSION,
            "appliance": self.appliance,
            "sensors": list(self.sensors),
            "center": self.center.tolist(),
            "scale": self.scale.tolist(),
            "weights": self.weights.tolist(),
            "means": self.means.tolist(),
            "covariances": self.covariances.tolist(),
            "levels": _LEVEL_LIST,
            "calibration": {
                str(mask): cal.to_json() for mask, cal in sorted(self.calibration.items())
            },
            "missing": self.missing.tolist(),
            "missingSpan": self.missing_span,
            "smoothing": list(self.smoothing),
            "smoothed": [cal.to_json() for cal in self.smoothed],
            "start": self.start,
            "stuck": [
                {"resting": list(s.resting), "survival": list(s.survival), "rate": s.rate}
                for s in self.stuck
            ],
            "threshold": self.threshold,
            "maxSurprise": self.max_surprise,
            "info": self.info,
        }

    def to_bytes(self) -> bytes:
        """The JSON document as compact UTF-8 (the artifact a hub downloads)."""
        return json.dumps(self.to_json(), separators=(",", ":"), allow_nan=False).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> AnomalyModel:
        """A model from :meth:`to_bytes`; ModelFormatError when it is not one."""
        try:
            document = json.loads(data)
        except (ValueError, UnicodeDecodeError) as err:
            raise ModelFormatError(f"not a JSON document ({err})") from err
        return cls.from_json(document)

    @classmethod
    def from_json(cls, document: Any) -> AnomalyModel:
        """A model from :meth:`to_json`; ModelFormatError naming what is wrong otherwise."""
        if not isinstance(document, dict) or document.get("format") != FORMAT:
            raise ModelFormatError(f"not an {FORMAT} document")
        version = document.get("formatVersion")
        if version != FORMAT_VERSION:
            raise ModelFormatError(
                f"format version {version!r}; this edgeloop reads version {FORMAT_VERSION} "
                "(update edgeloop, or package a model trained by this version)"
            )
        try:
            if document["levels"] != _LEVEL_LIST:
                raise ModelFormatError("its calibration levels differ from this format's")
            sensors = tuple(str(s) for s in document["sensors"])
            d = len(sensors)
            weights = _shaped(document["weights"], (len(document["weights"]),))
            k = len(weights)
            model = cls(
                appliance=str(document["appliance"]),
                sensors=sensors,
                center=_shaped(document["center"], (d,)),
                scale=_shaped(document["scale"], (d,)),
                weights=weights,
                means=_shaped(document["means"], (k, d)),
                covariances=_shaped(document["covariances"], (k, d, d)),
                calibration={
                    int(mask): _Calibration.from_json(cal)
                    for mask, cal in document["calibration"].items()
                },
                missing=_shaped(document["missing"], (d,)),
                missing_span=int(document["missingSpan"]),
                smoothing=tuple(int(span) for span in document["smoothing"]),
                smoothed=tuple(_Calibration.from_json(cal) for cal in document["smoothed"]),
                start=float(document["start"]),
                stuck=tuple(
                    _Stuck(
                        tuple(float(v) for v in s["resting"]),
                        tuple(float(v) for v in s["survival"]),
                        float(s["rate"]),
                    )
                    for s in document["stuck"]
                ),
                threshold=float(document["threshold"]),
                max_surprise=float(document["maxSurprise"]),
                info=dict(document.get("info") or {}),
            )
        except ModelFormatError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ModelFormatError(f"damaged model document ({type(err).__name__}: {err})") from err
        if (
            d == 0
            or k == 0
            or len(model.stuck) != d
            or len(model.smoothing) != len(model.smoothed)
            or any(not 0 < mask < 1 << d for mask in model.calibration)
            or model.threshold <= 0
            or model.missing_span < 1
            or not ((model.missing > 0) & (model.missing < 1)).all()
        ):
            raise ModelFormatError("damaged model document (its parts do not fit together)")
        return model


class StreamingScorer:
    """Scores one kit's readings one at a time: ``score(reading) -> (score, decision)``."""

    def __init__(self, model: AnomalyModel) -> None:
        self.model = model
        self._sensors = model.sensors
        self._width = len(model.sensors)
        self._bits = [1 << j for j in range(self._width)]
        self._missing = model.missing.tolist()
        self._missing_alpha = 2.0 / (model.missing_span + 1)
        self._missing_bits = model.missing_span / _LOG10
        self._missing_bonferroni = math.log10(self._width)
        self._alphas = [2.0 / (span + 1) for span in model.smoothing]
        self._tests = 1 + len(model.smoothing)
        self._cap = 2 * model.threshold
        self._fall = model.threshold / _HOLD
        self.reset()

    def reset(self) -> None:
        """Forget the kit's history (a new kit, or after a repair)."""
        self.level = 0.0
        self._averages = [self.model.start] * len(self._alphas)
        self._shares = [0.0] * self._width
        self._last: list[float] = [math.nan] * self._width
        self._runs = [0] * self._width

    @property
    def decision(self) -> bool:
        """Whether the last reading was judged anomalous."""
        return self.level >= self.model.threshold

    def score(self, reading: Mapping[str, float | None]) -> tuple[float, bool]:
        """Judge the next reading (sensor name -> value; absent, None or NaN: missing)."""
        model = self.model
        values = [math.nan] * self._width
        mask = 0
        run_tail = 1.0
        missing_bits = 0.0
        shares = self._shares
        alpha = self._missing_alpha
        for j, name in enumerate(self._sensors):
            value = reading.get(name)
            if value is None or value != value:  # None or NaN
                shares[j] += alpha * (1.0 - shares[j])
                missing_bits = max(missing_bits, _divergence_one(shares[j], self._missing[j]))
                self._runs[j] = 0
                self._last[j] = math.nan
                continue
            if shares[j]:
                shares[j] -= alpha * shares[j]
                if shares[j] <= self._missing[j]:  # no evidence at or below the normal share
                    shares[j] = 0.0 if shares[j] < 1e-12 else shares[j]
                else:
                    missing_bits = max(missing_bits, _divergence_one(shares[j], self._missing[j]))
            value = float(value)
            values[j] = value
            mask |= self._bits[j]
            if value == self._last[j]:
                self._runs[j] += 1
                stuck = model.stuck[j]
                if value not in stuck.resting:
                    run_tail = min(run_tail, stuck.tail(self._runs[j]))
            else:
                self._runs[j] = 1
                self._last[j] = value
        tail = 1.0
        if mask:
            subset = model._subset(mask)
            if subset.calibration is not None:
                nll = subset.nll(np.array(values)[subset.index])
                tail = min(tail, subset.calibration.tail(nll))
        surprise = min(model.max_surprise, -math.log(max(tail, 1e-300)) / _LOG10)
        p = 10.0**-surprise
        averages = self._averages
        for i, (alpha, calibration) in enumerate(zip(self._alphas, model.smoothed, strict=True)):
            averages[i] += alpha * (surprise - averages[i])
            p = min(p, calibration.tail(averages[i]))
        raw = -math.log(min(1.0, max(p, 1e-300) * self._tests)) / _LOG10
        if run_tail < 1.0:
            raw = max(raw, -math.log(min(1.0, max(run_tail, 1e-300) * self._width)) / _LOG10)
        if missing_bits:
            raw = max(raw, missing_bits * self._missing_bits - self._missing_bonferroni)
        level = self.level = min(self._cap, max(raw, self.level - self._fall))
        threshold = model.threshold
        return level / (level + threshold), level >= threshold


# --- fitting ------------------------------------------------------------------------------


def fit(
    sequences: Sequence[Array],
    sensors: Sequence[str],
    *,
    appliance: str,
    config: FitConfig | None = None,
) -> AnomalyModel:
    """Fit a model on normal readings: one array per kit, rows in time order (NaN: missing).

    Each sequence is split in time: its first ``fit_share`` for the mixture, the missing
    rates and the normal runs; the next ``calibration_share`` to calibrate the tail
    probabilities; the rest to set the decision threshold.
    """
    config = config or FitConfig()
    d = len(sensors)
    if d == 0 or len(set(sensors)) != d:
        raise ValueError("give at least one sensor, each once")
    parts: tuple[list[Array], list[Array], list[Array]] = ([], [], [])
    for seq in sequences:
        seq = _matrix(seq, d)
        a = int(len(seq) * config.fit_share)
        b = int(len(seq) * (config.fit_share + config.calibration_share))
        for part, rows in zip(parts, (seq[:a], seq[a:b], seq[b:]), strict=True):
            if len(rows):
                part.append(rows)
    fit_rows = np.vstack(parts[0]) if parts[0] else np.empty((0, d))
    complete = fit_rows[~np.isnan(fit_rows).any(axis=1)]
    needed = 10 * d * (d + 3)
    if len(complete) < needed or not parts[1] or not parts[2]:
        raise ValueError(
            f"too few complete normal readings to fit a model ({len(complete)} in the fitting "
            f"share); give at least {needed / config.fit_share:.0f}"
        )
    rng = np.random.default_rng(config.seed)
    center, scale = _standardisation(complete)
    sample = complete
    if len(sample) > config.max_rows:
        sample = sample[np.sort(rng.choice(len(sample), config.max_rows, replace=False))]
    weights, means, covariances = _mixture((sample - center) / scale, config, rng)
    missing = np.maximum(config.missing_floor, np.isnan(fit_rows).mean(axis=0))
    missing = np.minimum(missing, 0.5)
    model = AnomalyModel(
        appliance=appliance,
        sensors=tuple(sensors),
        center=center,
        scale=scale,
        weights=weights,
        means=means,
        covariances=covariances,
        calibration={},
        missing=missing,
        missing_span=config.missing_span,
        smoothing=config.smoothing,
        smoothed=(),
        start=0.0,
        stuck=tuple(_fit_stuck([p[:, j] for p in parts[0]], config) for j in range(d)),
        threshold=config.min_threshold,
        max_surprise=config.max_surprise,
    )
    # Calibration: each subset's negative log-likelihood, then the surprise's averages.
    calibrating = np.vstack(parts[1])
    complete = calibrating[~np.isnan(calibrating).any(axis=1)]
    for mask in _subsets(d):
        index = [j for j in range(d) if mask >> j & 1]
        model.calibration[mask] = _calibrate(model._nll(model._marginal(mask), complete[:, index]))
    model._subsets.clear()
    surprises = [model.surprise(rows) for rows in parts[1]]
    model.start = float(np.concatenate(surprises).mean())
    model.smoothed = tuple(
        _calibrate(
            np.concatenate(
                [_moving_average(s, span, model.start)[span:] for s in surprises if len(s) > span]
                or [np.zeros(1)]
            )
        )
        for span in config.smoothing
    )
    # The threshold: above the highest level held-out normal sequences reach.
    highest = max(float(model.raw_levels(rows).max()) for rows in parts[2])
    model.threshold = max(config.min_threshold, config.margin * highest)
    model.info = {
        "readings": int(sum(len(s) for part in parts for s in part)),
        "sequences": len(sequences),
        "components": len(weights),
        "highest_normal_level": round(highest, 4),
        "config": asdict(config),
    }
    return model


def _standardisation(rows: Array) -> tuple[Array, Array]:
    center = np.median(rows, axis=0)
    q75, q25 = np.percentile(rows, [75, 25], axis=0)
    scale = (q75 - q25) / 1.349
    # A sensor at rest most of the time (a washer's flow) has no interquartile range.
    scale = np.where(scale > 1e-9, scale, rows.std(axis=0))
    scale = np.where(scale > 1e-9, scale, 1.0)
    return center, scale


def _mixture(x: Array, config: FitConfig, rng: np.random.Generator) -> tuple[Array, Array, Array]:
    """A Gaussian mixture by EM from a k-means++ start; empty components are dropped."""
    n, d = x.shape
    k = min(config.components, max(1, n // (5 * (d + 1))))
    means = _kmeans_pp(x, k, rng)
    nearest = np.zeros(n, dtype=np.intp)
    for _ in range(10):  # a few Lloyd steps: a start EM does not wander from
        nearest = ((x[:, None, :] - means[None]) ** 2).sum(axis=2).argmin(axis=1)
        means = np.array(
            [x[nearest == c].mean(axis=0) if (nearest == c).any() else means[c] for c in range(k)]
        )
    reg = config.regularisation * np.eye(d)
    resp = np.zeros((n, len(means)))
    resp[np.arange(n), nearest] = 1.0
    previous = -math.inf
    for _ in range(config.iterations):
        weights, means, covariances = _m_step(x, resp, reg)
        keep = weights > 2.0 * (d + 1) / n
        weights, means, covariances = weights[keep], means[keep], covariances[keep]
        weights = weights / weights.sum()
        ll = _component_log_likelihood(x, weights, means, covariances)
        top = ll.max(axis=1, keepdims=True)
        log_total = top[:, 0] + np.log(np.exp(ll - top).sum(axis=1))
        resp = np.exp(ll - log_total[:, None])
        mean_ll = float(log_total.mean())
        if mean_ll - previous < 1e-4:
            break
        previous = mean_ll
    weights, means, covariances = _m_step(x, resp, reg)
    keep = weights > 0
    return weights[keep] / weights[keep].sum(), means[keep], covariances[keep]


def _kmeans_pp(x: Array, k: int, rng: np.random.Generator) -> Array:
    centers = [x[int(rng.integers(len(x)))]]
    closest = ((x - centers[0]) ** 2).sum(axis=1)
    for _ in range(1, k):
        total = float(closest.sum())
        if total <= 0:
            break
        pick = int(np.searchsorted(np.cumsum(closest), rng.random() * total))
        centers.append(x[min(pick, len(x) - 1)])
        closest = np.minimum(closest, ((x - centers[-1]) ** 2).sum(axis=1))
    return np.array(centers)


def _m_step(x: Array, resp: Array, reg: Array) -> tuple[Array, Array, Array]:
    counts = resp.sum(axis=0) + 1e-12
    means = (resp.T @ x) / counts[:, None]
    covariances = np.empty((len(counts), x.shape[1], x.shape[1]))
    for c in range(len(counts)):
        diff = x - means[c]
        covariances[c] = (resp[:, c, None] * diff).T @ diff / counts[c] + reg
    return counts / counts.sum(), means, covariances


def _component_log_likelihood(x: Array, weights: Array, means: Array, covs: Array) -> Array:
    d = x.shape[1]
    out = np.empty((len(x), len(weights)))
    for c in range(len(weights)):
        chol = np.linalg.cholesky(covs[c])
        z = np.linalg.solve(chol, (x - means[c]).T)
        log_det = 2.0 * np.log(np.diag(chol)).sum()
        out[:, c] = (
            math.log(weights[c])
            - 0.5 * (d * math.log(2 * math.pi) + log_det)
            - 0.5 * (z * z).sum(0)
        )
    return out


def _subsets(d: int) -> list[int]:
    full = (1 << d) - 1
    if d <= EXHAUSTIVE_SENSORS:
        return list(range(1, full + 1))
    return [full, *(full & ~(1 << j) for j in range(d))]


def _calibrate(statistic: Array) -> _Calibration:
    values = np.quantile(statistic, _LEVELS)
    # Strictly increasing, so that interpolation is well defined where quantiles tie.
    values = np.maximum.accumulate(values) + np.arange(len(values)) * 1e-9
    top = values[-1]
    excess = statistic[statistic > top] - top
    # The tail falls no faster than an exponential through the median and the 99th
    # percentile would: the few excursions past the 99th percentile of a slowly moving
    # statistic (a long average) are too few, and too alike, to say more.
    bulk = float(top - np.median(statistic)) / math.log(50.0)
    tail_scale = max(float(excess.mean()) if len(excess) else 0.0, bulk, 1e-3)
    return _Calibration(values, tail_scale)


def _fit_stuck(columns: list[Array], config: FitConfig) -> _Stuck:
    """Normal run lengths of one sensor (resting values apart)."""
    seen = np.concatenate(columns)
    present = seen[~np.isnan(seen)]
    resting: tuple[float, ...] = ()
    if len(present):
        values, counts = np.unique(present, return_counts=True)
        resting = tuple(float(v) for v in values[counts >= config.resting_share * len(present)])
    runs = np.concatenate([_run_lengths(c) for c in columns])
    judged = runs[(runs > 0) & ~np.isin(seen, resting)]
    if len(judged) == 0:
        return _Stuck(resting, (1.0,), 0.5)
    longest = min(int(judged.max()), 500)
    counts = np.bincount(np.minimum(judged, longest), minlength=longest + 1)[1:]
    survival = np.cumsum(counts[::-1])[::-1] / len(judged)
    survival = np.maximum(survival, 1.0 / (len(judged) + 1))
    # Past the longest run seen, the survival goes on falling as it fell over the longer
    # half of the runs seen (a slowly changing sensor, such as an hour's duty cycle, repeats
    # for long), and at least halves with each repeat of a sensor that seldom repeats.
    half = longest // 2
    slope = 0.0
    if half >= 1 and survival[half - 1] > survival[-1]:
        slope = float(np.log(survival[-1] / survival[half - 1])) / (longest - half)
    rate = min(0.99, max(0.5, math.exp(slope)))
    return _Stuck(resting, tuple(float(s) for s in survival), rate)


# --- helpers shared by both scoring paths -------------------------------------------------


def _moving_average(surprise: Array, span: int, start: float) -> Array:
    """The exponentially weighted moving average over ``span`` readings, from ``start``."""
    alpha = 2.0 / (span + 1)
    out = np.empty(len(surprise))
    average = start
    for i, s in enumerate(surprise.tolist()):
        average += alpha * (s - average)
        out[i] = average
    return out


def _divergence(share: Array, rate: float) -> Array:
    """KL(share || rate) of Bernoulli shares above ``rate`` (0 at or below it), in nats."""
    f = np.clip(share, rate, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        kl = f * np.log(f / rate) + np.where(
            f < 1.0, (1.0 - f) * np.log((1.0 - f) / (1.0 - rate)), 0.0
        )
    out: Array = np.nan_to_num(np.maximum(kl, 0.0))
    return out


def _divergence_one(share: float, rate: float) -> float:
    """``_divergence`` of one share."""
    if share <= rate:
        return 0.0
    kl = share * math.log(share / rate)
    if share < 1.0:
        kl += (1.0 - share) * math.log((1.0 - share) / (1.0 - rate))
    return max(kl, 0.0)


def _run_lengths(column: Array) -> NDArray[np.int64]:
    """How many readings in a row (this one included) had this value; 0 when missing."""
    n = len(column)
    same = np.zeros(n, dtype=bool)
    same[1:] = column[1:] == column[:-1]  # NaN never equals: a gap breaks the run
    index = np.arange(n)
    starts = np.maximum.accumulate(np.where(same, 0, index))
    runs: NDArray[np.int64] = index - starts + 1
    runs[np.isnan(column)] = 0
    return runs


def _stuck_tails(column: Array, stuck: _Stuck) -> Array:
    runs = _run_lengths(column)
    tails = np.array([stuck.tail(r) for r in runs.tolist()], dtype=np.float64)
    if stuck.resting and len(tails):
        tails[np.isin(column, stuck.resting)] = 1.0
    return tails


def _matrix(values: Array | Sequence[Sequence[float]], width: int) -> Array:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 2 or array.shape[1] != width:
        raise ValueError(f"expected rows of {width} sensor values, got shape {array.shape}")
    return array


def _shaped(value: Any, shape: tuple[int, ...]) -> Array:
    array = np.asarray(value, dtype=np.float64)
    if array.shape != shape or not np.isfinite(array).all():
        raise ModelFormatError(f"an array of shape {array.shape}, expected {shape}")
    return array
