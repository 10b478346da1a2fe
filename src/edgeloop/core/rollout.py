"""Rollout decisions, pure: how many more hubs to notify now, and whether to abort.

A fleet deployment reaches its targets in stages. The deployment engine owns the clock,
the job store and the broker; at every tick it hands :func:`step` the rollout's
configuration, its state so far, the job's execution counts and the time, and applies
the :class:`Decision` it gets back (notify ``release`` more hubs, abort with a reason, or
record that the rollout is complete).

The stages, as AWS IoT Jobs and Greengrass define them, with edgeloop's additions:

- **Canary** (optional): the first ``canary_size`` targets (or the members of a canary
  group, picked by the engine) are notified alone. Every canary must succeed before the
  rest are notified; one canary failure aborts the rollout, since a canary exists to stop
  a bad version early.
- **Exponential rate**: after the canary, hubs are notified at ``base_per_minute``; each
  time ``increase_every`` more hubs have been notified (or have succeeded, per
  ``increase_on``), the rate is multiplied by ``increment_factor``, up to
  ``maximum_per_minute``. Releases accrue continuously (a token bucket), so a tick every
  second releases about rate/60 hubs; what a tick cannot release (fractions) carries over.
- **Abort criteria**: each criterion names a failure type (FAILED, REJECTED, TIMED_OUT,
  or ALL of them), a threshold percentage and a minimum number of executed hubs (those in
  a terminal state). When that many have executed and the failures of that type reach
  the threshold, the rollout aborts. TIMED_OUT counts as a failure: an execution that
  never ends is ended by its timeout, never left "in progress".

Nothing here reads a clock, touches a socket, or draws random numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

from edgeloop.core.errors import ValidationError

__all__ = [
    "FAILURE_TYPES",
    "AbortCriterion",
    "Counts",
    "Decision",
    "RolloutConfig",
    "RolloutState",
    "parse_rollout_config",
    "start",
    "step",
]

FailureType = Literal["FAILED", "REJECTED", "TIMED_OUT", "ALL"]
FAILURE_TYPES: tuple[FailureType, ...] = ("FAILED", "REJECTED", "TIMED_OUT", "ALL")
Phase = Literal["canary", "rollout", "complete", "aborted"]

MAX_PER_MINUTE = 60_000  # one a millisecond: beyond it a tick's release is a burst anyway


@dataclass(frozen=True)
class AbortCriterion:
    """Abort when ``min_executed`` hubs have executed and ``failure_type`` reaches the
    threshold (percent of executed hubs)."""

    failure_type: FailureType = "ALL"
    threshold_percent: float = 10.0
    min_executed: int = 1


@dataclass(frozen=True)
class RolloutConfig:
    """How a deployment reaches its targets (defaults: no canary, all at once)."""

    canary_size: int = 0
    canary_group: str | None = None
    base_per_minute: int = MAX_PER_MINUTE
    increment_factor: float = 1.0
    increase_every: int = 0  # 0: the rate never increases
    increase_on: Literal["notified", "succeeded"] = "notified"
    maximum_per_minute: int = MAX_PER_MINUTE
    abort: tuple[AbortCriterion, ...] = ()
    execution_timeout_minutes: int = 60
    jitter_seconds: float = 0.0

    @property
    def has_canary(self) -> bool:
        return self.canary_size > 0 or self.canary_group is not None


@dataclass(frozen=True)
class Counts:
    """A rollout's job executions by status (notified = every execution that exists)."""

    queued: int = 0
    in_progress: int = 0
    succeeded: int = 0
    failed: int = 0
    rejected: int = 0
    timed_out: int = 0
    canceled: int = 0
    removed: int = 0

    @property
    def notified(self) -> int:
        return (
            self.queued
            + self.in_progress
            + self.succeeded
            + self.failed
            + self.rejected
            + self.timed_out
            + self.canceled
            + self.removed
        )

    @property
    def failures(self) -> int:
        return self.failed + self.rejected + self.timed_out

    @property
    def executed(self) -> int:
        """Executions that ended on the hub's account: succeeded or failed."""
        return self.succeeded + self.failures

    def of(self, failure_type: FailureType) -> int:
        return {
            "FAILED": self.failed,
            "REJECTED": self.rejected,
            "TIMED_OUT": self.timed_out,
            "ALL": self.failures,
        }[failure_type]


@dataclass(frozen=True)
class RolloutState:
    """What a rollout has done so far; the engine stores it between ticks."""

    phase: Phase = "canary"
    rate_per_minute: float = 0.0
    allowance: float = 0.0  # releases accrued but not yet made (fractions carry over)
    last_tick: float | None = None  # seconds, the engine's clock
    counted_at_increase: int = 0  # the notified / succeeded count at the last increase
    canary_targets: int = 0  # how many the canary phase notified
    abort_reason: str | None = None


@dataclass(frozen=True)
class Decision:
    """What to do now: notify ``release`` more hubs; ``state`` is the state to keep."""

    state: RolloutState
    release: int = 0
    abort_reason: str | None = None
    complete: bool = False


def start(config: RolloutConfig, canary_targets: int) -> RolloutState:
    """The state of a new rollout; ``canary_targets`` is how many the canary holds."""
    if config.has_canary and canary_targets > 0:
        return RolloutState(phase="canary", canary_targets=canary_targets)
    return RolloutState(phase="rollout", rate_per_minute=float(config.base_per_minute))


def step(
    config: RolloutConfig,
    state: RolloutState,
    counts: Counts,
    *,
    pending: int,
    now: float,
) -> Decision:
    """The next move. ``pending``: targets not yet notified (outside the canary)."""
    if state.phase in ("complete", "aborted"):
        return Decision(state, abort_reason=state.abort_reason, complete=True)
    reason = _abort_reason(config, state, counts)
    if reason is not None:
        return Decision(replace(state, phase="aborted", abort_reason=reason), abort_reason=reason)

    if state.phase == "canary":
        if state.last_tick is None:
            first = replace(state, last_tick=now)
            return Decision(first, release=state.canary_targets)
        if counts.succeeded < state.canary_targets:
            return Decision(replace(state, last_tick=now))
        state = replace(
            state,
            phase="rollout",
            rate_per_minute=float(config.base_per_minute),
            allowance=_burst(float(config.base_per_minute), first=True),
            counted_at_increase=0,
            last_tick=now,
        )

    if pending <= 0:
        if counts.queued + counts.in_progress == 0:
            return Decision(replace(state, phase="complete", last_tick=now), complete=True)
        return Decision(replace(state, last_tick=now))

    state = _increase(config, state, counts)
    rate = state.rate_per_minute
    if state.last_tick is None:  # the rollout's first tick: a second's worth at once
        allowance = _burst(rate, first=True)
    else:
        allowance = state.allowance + rate * max(0.0, now - state.last_tick) / 60.0
    # The bucket holds a few seconds' worth at most: an engine that stalled for a while
    # does not make up for it in one burst.
    allowance = min(allowance, _burst(rate, first=False))
    release = min(pending, math.floor(allowance + 1e-9))
    return Decision(replace(state, allowance=allowance - release, last_tick=now), release=release)


BURST_SECONDS = 5.0


def _burst(rate_per_minute: float, *, first: bool) -> float:
    """What the bucket may hold: one second's worth at the start, else BURST_SECONDS'."""
    return max(1.0, rate_per_minute / 60.0 * (1.0 if first else BURST_SECONDS))


def _increase(config: RolloutConfig, state: RolloutState, counts: Counts) -> RolloutState:
    if config.increase_every <= 0 or config.increment_factor <= 1.0:
        return state
    counted = counts.notified - state.canary_targets
    if config.increase_on == "succeeded":
        counted = max(0, counts.succeeded - state.canary_targets)
    rate = state.rate_per_minute
    mark = state.counted_at_increase
    while counted - mark >= config.increase_every and rate < config.maximum_per_minute:
        rate = min(float(config.maximum_per_minute), rate * config.increment_factor)
        mark += config.increase_every
    return replace(state, rate_per_minute=rate, counted_at_increase=mark)


def _abort_reason(config: RolloutConfig, state: RolloutState, counts: Counts) -> str | None:
    if state.phase == "canary" and state.last_tick is not None and counts.failures:
        return (
            f"the canary failed: {counts.failures} of {state.canary_targets} canary hubs "
            f"failed ({_failure_summary(counts)})"
        )
    executed = counts.executed
    for criterion in config.abort:
        if executed < max(1, criterion.min_executed):
            continue
        failed = counts.of(criterion.failure_type)
        percent = 100.0 * failed / executed
        if failed and percent >= criterion.threshold_percent:
            kind = "failures" if criterion.failure_type == "ALL" else criterion.failure_type
            return (
                f"{kind} reached {percent:.1f}% of {executed} executed hubs "
                f"(threshold {criterion.threshold_percent:g}%, at least "
                f"{criterion.min_executed} executed): {_failure_summary(counts)}"
            )
    return None


def _failure_summary(counts: Counts) -> str:
    parts = [
        f"{n} {name}"
        for name, n in (
            ("FAILED", counts.failed),
            ("REJECTED", counts.rejected),
            ("TIMED_OUT", counts.timed_out),
        )
        if n
    ]
    return ", ".join(parts) or "none"


# -- the configuration's wire form -------------------------------------------------------
# Field names follow AWS IoT's CreateJob / Greengrass CreateDeployment
# (jobExecutionsRolloutConfig, abortConfig, timeoutConfig), plus edgeloop's canary and
# jitter, under "rollout" in a deployment document.


def parse_rollout_config(doc: object, field: str = "rollout") -> RolloutConfig:
    """A RolloutConfig from its JSON form; ValidationError naming the field that is wrong.

    ``{"canary": {"size": 1} | {"group": "g"},
       "exponentialRate": {"baseRatePerMinute": 10, "incrementFactor": 2,
                           "rateIncreaseCriteria": {"numberOfNotifiedThings": 10}},
       "maximumPerMinute": 1000,
       "abortConfig": {"criteriaList": [{"failureType": "FAILED", "action": "CANCEL",
                       "thresholdPercentage": 20, "minNumberOfExecutedThings": 5}]},
       "timeoutConfig": {"inProgressTimeoutInMinutes": 10},
       "jitterSeconds": 5}``
    """
    if doc is None:
        return RolloutConfig()
    body = _object(doc, field)
    _only(
        body,
        field,
        {
            "canary",
            "exponentialRate",
            "maximumPerMinute",
            "abortConfig",
            "timeoutConfig",
            "jitterSeconds",
        },
    )
    config = RolloutConfig()
    if "canary" in body:
        canary = _object(body["canary"], f"{field}.canary")
        _only(canary, f"{field}.canary", {"size", "group"})
        if ("size" in canary) == ("group" in canary):
            raise ValidationError("give either 'size' or 'group'", field=f"{field}.canary")
        if "size" in canary:
            config = replace(
                config, canary_size=_int(canary["size"], f"{field}.canary.size", 1, 10_000)
            )
        else:
            group = canary["group"]
            if not isinstance(group, str) or not group:
                raise ValidationError("must be a thing group's name", field=f"{field}.canary.group")
            config = replace(config, canary_group=group)
    maximum = MAX_PER_MINUTE
    if "maximumPerMinute" in body:
        maximum = _int(body["maximumPerMinute"], f"{field}.maximumPerMinute", 1, MAX_PER_MINUTE)
    config = replace(config, maximum_per_minute=maximum, base_per_minute=maximum)
    if "exponentialRate" in body:
        config = _exponential(body["exponentialRate"], f"{field}.exponentialRate", config)
    if "abortConfig" in body:
        config = replace(config, abort=_abort(body["abortConfig"], f"{field}.abortConfig"))
    if "timeoutConfig" in body:
        timeout = _object(body["timeoutConfig"], f"{field}.timeoutConfig")
        _only(timeout, f"{field}.timeoutConfig", {"inProgressTimeoutInMinutes"})
        if "inProgressTimeoutInMinutes" in timeout:
            minutes = _int(
                timeout["inProgressTimeoutInMinutes"],
                f"{field}.timeoutConfig.inProgressTimeoutInMinutes",
                1,
                10_080,
            )
            config = replace(config, execution_timeout_minutes=minutes)
    if "jitterSeconds" in body:
        jitter = body["jitterSeconds"]
        if (
            isinstance(jitter, bool)
            or not isinstance(jitter, int | float)
            or not math.isfinite(jitter)
            or not 0 <= jitter <= 3600
        ):
            raise ValidationError(
                "must be a number of seconds from 0 to 3600", field=f"{field}.jitterSeconds"
            )
        config = replace(config, jitter_seconds=float(jitter))
    return config


def _exponential(doc: object, field: str, config: RolloutConfig) -> RolloutConfig:
    rate = _object(doc, field)
    _only(rate, field, {"baseRatePerMinute", "incrementFactor", "rateIncreaseCriteria"})
    for key in ("baseRatePerMinute", "incrementFactor", "rateIncreaseCriteria"):
        if key not in rate:
            raise ValidationError("is required", field=f"{field}.{key}")
    base = _int(rate["baseRatePerMinute"], f"{field}.baseRatePerMinute", 1, MAX_PER_MINUTE)
    if base > config.maximum_per_minute:
        raise ValidationError(
            f"{base} is above maximumPerMinute ({config.maximum_per_minute})",
            field=f"{field}.baseRatePerMinute",
        )
    factor = rate["incrementFactor"]
    if isinstance(factor, bool) or not isinstance(factor, int | float) or not 1 < factor <= 5:
        raise ValidationError(
            "must be a number above 1 and at most 5", field=f"{field}.incrementFactor"
        )
    criteria = _object(rate["rateIncreaseCriteria"], f"{field}.rateIncreaseCriteria")
    keys = {"numberOfNotifiedThings", "numberOfSucceededThings"}
    _only(criteria, f"{field}.rateIncreaseCriteria", keys)
    if len(criteria) != 1:
        raise ValidationError(
            "give exactly one of numberOfNotifiedThings, numberOfSucceededThings",
            field=f"{field}.rateIncreaseCriteria",
        )
    ((key, value),) = criteria.items()
    every = _int(value, f"{field}.rateIncreaseCriteria.{key}", 1, 1_000_000)
    return replace(
        config,
        base_per_minute=base,
        increment_factor=float(factor),
        increase_every=every,
        increase_on="notified" if key == "numberOfNotifiedThings" else "succeeded",
    )


def _abort(doc: object, field: str) -> tuple[AbortCriterion, ...]:
    body = _object(doc, field)
    _only(body, field, {"criteriaList"})
    items = body.get("criteriaList")
    if not isinstance(items, list) or not items:
        raise ValidationError("must be a non-empty list", field=f"{field}.criteriaList")
    criteria = []
    for i, item in enumerate(items):
        where = f"{field}.criteriaList[{i}]"
        entry = _object(item, where)
        _only(
            entry,
            where,
            {"failureType", "action", "thresholdPercentage", "minNumberOfExecutedThings"},
        )
        failure = entry.get("failureType")
        if failure not in FAILURE_TYPES:
            raise ValidationError(
                f"{failure!r} must be one of {', '.join(FAILURE_TYPES)}",
                field=f"{where}.failureType",
            )
        if entry.get("action", "CANCEL") != "CANCEL":
            raise ValidationError("the only action is CANCEL", field=f"{where}.action")
        threshold = entry.get("thresholdPercentage")
        if (
            isinstance(threshold, bool)
            or not isinstance(threshold, int | float)
            or not 0 < threshold <= 100
        ):
            raise ValidationError(
                "must be a percentage above 0 and at most 100", field=f"{where}.thresholdPercentage"
            )
        minimum = _int(
            entry.get("minNumberOfExecutedThings", 1),
            f"{where}.minNumberOfExecutedThings",
            1,
            1_000_000,
        )
        criteria.append(AbortCriterion(failure, float(threshold), minimum))
    return tuple(criteria)


def _object(doc: object, field: str) -> dict[str, object]:
    if not isinstance(doc, dict):
        raise ValidationError("must be a JSON object", field=field)
    return doc


def _only(doc: dict[str, object], field: str, allowed: set[str]) -> None:
    unknown = sorted(set(doc) - allowed)
    if unknown:
        raise ValidationError(
            f"unknown field {unknown[0]!r} (expected one of {', '.join(sorted(allowed))})",
            field=field,
        )


def _int(value: object, field: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValidationError(f"must be a whole number from {low} to {high}", field=field)
    return value
