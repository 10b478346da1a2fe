"""Rollout decisions: canary first, an exponential rate, abort criteria, and their JSON form."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeloop.core.errors import ValidationError
from edgeloop.core.rollout import (
    AbortCriterion,
    Counts,
    RolloutConfig,
    RolloutState,
    parse_rollout_config,
    start,
    step,
)


def run(
    config: RolloutConfig,
    targets: int,
    *,
    seconds: int,
    outcome: str = "succeeded",
) -> tuple[list[int], RolloutState, Counts]:
    """Tick once a second; every released hub ends at once with ``outcome``."""
    state = start(config, 0)
    counts = Counts()
    released = 0
    per_tick = []
    for now in range(seconds):
        decision = step(config, state, counts, pending=targets - released, now=float(now))
        state = decision.state
        per_tick.append(decision.release)
        if decision.abort_reason or decision.complete:
            break
        released += decision.release
        counts = replace(counts, **{outcome: getattr(counts, outcome) + decision.release})
    return per_tick, state, counts


def test_without_a_canary_or_a_rate_every_target_goes_in_the_first_seconds() -> None:
    ticks, state, counts = run(RolloutConfig(), 10_000, seconds=12)
    assert sum(ticks) == 10_000 and ticks[0] == 1000  # one second's worth of 60,000/min
    assert state.phase == "complete" and counts.succeeded == 10_000


def test_a_constant_rate_releases_that_many_a_minute() -> None:
    config = RolloutConfig(base_per_minute=120, maximum_per_minute=120)
    ticks, _, _ = run(config, 10_000, seconds=60)
    assert ticks[0] == 2  # a second's worth at once
    assert sum(ticks) == 2 + 59 * 2


def test_fractions_carry_over_between_ticks() -> None:
    config = RolloutConfig(base_per_minute=30, maximum_per_minute=30)  # one every 2 s
    ticks, _, _ = run(config, 1_000, seconds=21)
    assert ticks[0] == 1 and sum(ticks) == 1 + 10


def test_the_rate_grows_by_its_factor_each_time_enough_were_notified() -> None:
    config = RolloutConfig(
        base_per_minute=60, increment_factor=2, increase_every=10, maximum_per_minute=480
    )
    ticks, state, _ = run(config, 10_000, seconds=120)
    assert state.rate_per_minute == 480  # 60 → 120 → 240 → 480, capped there
    assert ticks[1] == 1 and max(ticks) <= 8 + 1


def test_the_rate_can_grow_on_successes_instead() -> None:
    config = RolloutConfig(
        base_per_minute=60,
        increment_factor=3,
        increase_every=5,
        increase_on="succeeded",
        maximum_per_minute=10_000,
    )
    _, state, _ = run(config, 100, seconds=30, outcome="in_progress")  # none succeed
    assert state.rate_per_minute == 60


def test_a_canary_goes_alone_and_the_rest_follow_once_it_succeeded() -> None:
    config = RolloutConfig(canary_size=2, base_per_minute=600, maximum_per_minute=600)
    state = start(config, 2)
    first = step(config, state, Counts(), pending=50, now=0.0)
    assert first.release == 2 and first.state.phase == "canary"
    waiting = step(config, first.state, Counts(in_progress=2), pending=50, now=5.0)
    assert waiting.release == 0 and waiting.state.phase == "canary"
    half = step(config, waiting.state, Counts(in_progress=1, succeeded=1), pending=50, now=6.0)
    assert half.release == 0
    done = step(config, half.state, Counts(succeeded=2), pending=50, now=7.0)
    assert done.state.phase == "rollout" and done.release == 10  # a second's worth


def test_one_canary_failure_aborts() -> None:
    config = RolloutConfig(canary_size=3)
    state = step(config, start(config, 3), Counts(), pending=10, now=0).state
    decision = step(config, state, Counts(succeeded=2, timed_out=1), pending=10, now=1)
    assert decision.abort_reason is not None and "canary failed" in decision.abort_reason
    assert "1 TIMED_OUT" in decision.abort_reason and decision.state.phase == "aborted"
    again = step(config, decision.state, Counts(succeeded=3), pending=10, now=2)
    assert again.complete and again.release == 0 and again.abort_reason == decision.abort_reason


@pytest.mark.parametrize(
    ("criterion", "counts", "aborts"),
    [
        (AbortCriterion("ALL", 20, 10), Counts(succeeded=7, failed=2), False),  # 9 executed
        (AbortCriterion("ALL", 20, 10), Counts(succeeded=8, failed=2), True),  # 20% of 10
        (AbortCriterion("ALL", 20, 10), Counts(succeeded=9, failed=1, in_progress=50), False),
        (AbortCriterion("FAILED", 20, 1), Counts(succeeded=1, rejected=4), False),
        (AbortCriterion("REJECTED", 20, 1), Counts(succeeded=1, rejected=4), True),
        (AbortCriterion("TIMED_OUT", 50, 2), Counts(succeeded=1, timed_out=1), True),
        (AbortCriterion("ALL", 100, 1), Counts(succeeded=1, failed=99), False),
        (AbortCriterion("ALL", 100, 1), Counts(failed=3), True),
    ],
)
def test_abort_criteria(criterion: AbortCriterion, counts: Counts, aborts: bool) -> None:
    config = RolloutConfig(abort=(criterion,))
    decision = step(config, start(config, 0), counts, pending=100, now=0)
    assert (decision.abort_reason is not None) is aborts
    if aborts:
        assert decision.release == 0 and f"threshold {criterion.threshold_percent:g}%" in (
            decision.abort_reason or ""
        )


def test_a_rollout_completes_only_when_no_execution_is_pending() -> None:
    config = RolloutConfig()
    state = step(config, start(config, 0), Counts(), pending=3, now=0).state
    busy = step(config, state, Counts(in_progress=1, succeeded=2), pending=0, now=1)
    assert not busy.complete
    done = step(config, busy.state, Counts(succeeded=2, failed=1), pending=0, now=2)
    assert done.complete and done.state.phase == "complete"


@settings(max_examples=200, deadline=None)
@given(
    base=st.integers(1, 6000),
    factor=st.floats(1.1, 5),
    every=st.integers(1, 500),
    maximum=st.integers(1, 60_000),
    targets=st.integers(0, 5000),
    gaps=st.lists(st.floats(0.01, 30), min_size=1, max_size=60),
)
def test_releases_never_outrun_the_rate_nor_the_targets(
    base: int, factor: float, every: int, maximum: int, targets: int, gaps: list[float]
) -> None:
    base = min(base, maximum)
    config = RolloutConfig(
        base_per_minute=base,
        increment_factor=factor,
        increase_every=every,
        maximum_per_minute=maximum,
    )
    state = start(config, 0)
    counts = Counts()
    released = 0
    now = 0.0
    for gap in gaps:
        decision = step(config, state, counts, pending=targets - released, now=now)
        released += decision.release
        counts = replace(counts, in_progress=released)
        # Never more than what the bucket may hold plus what accrued since the last tick.
        assert decision.release <= max(1, math.ceil(maximum / 60 * (5 + gap)))
        state = decision.state
        now += gap
    assert 0 <= released <= targets


@pytest.mark.parametrize(
    ("doc", "field", "message"),
    [
        ([], "rollout", "JSON object"),
        ({"wave": 1}, "rollout", "unknown field 'wave'"),
        ({"canary": {}}, "rollout.canary", "either 'size' or 'group'"),
        ({"canary": {"size": 0}}, "rollout.canary.size", "from 1"),
        ({"canary": {"group": ""}}, "rollout.canary.group", "thing group"),
        ({"maximumPerMinute": 0}, "rollout.maximumPerMinute", "from 1 to 60000"),
        ({"exponentialRate": {}}, "rollout.exponentialRate.baseRatePerMinute", "required"),
        (
            {
                "maximumPerMinute": 5,
                "exponentialRate": {
                    "baseRatePerMinute": 10,
                    "incrementFactor": 2,
                    "rateIncreaseCriteria": {"numberOfNotifiedThings": 1},
                },
            },
            "rollout.exponentialRate.baseRatePerMinute",
            "above maximumPerMinute",
        ),
        (
            {
                "exponentialRate": {
                    "baseRatePerMinute": 10,
                    "incrementFactor": 1,
                    "rateIncreaseCriteria": {"numberOfNotifiedThings": 1},
                }
            },
            "rollout.exponentialRate.incrementFactor",
            "above 1",
        ),
        (
            {
                "exponentialRate": {
                    "baseRatePerMinute": 10,
                    "incrementFactor": 2,
                    "rateIncreaseCriteria": {},
                }
            },
            "rollout.exponentialRate.rateIncreaseCriteria",
            "exactly one",
        ),
        ({"abortConfig": {"criteriaList": []}}, "rollout.abortConfig.criteriaList", "non-empty"),
        (
            {"abortConfig": {"criteriaList": [{"failureType": "BAD", "thresholdPercentage": 5}]}},
            "rollout.abortConfig.criteriaList[0].failureType",
            "one of FAILED",
        ),
        (
            {"abortConfig": {"criteriaList": [{"failureType": "ALL", "thresholdPercentage": 0}]}},
            "rollout.abortConfig.criteriaList[0].thresholdPercentage",
            "percentage",
        ),
        (
            {
                "abortConfig": {
                    "criteriaList": [
                        {"failureType": "ALL", "thresholdPercentage": 5, "action": "PAUSE"}
                    ]
                }
            },
            "rollout.abortConfig.criteriaList[0].action",
            "CANCEL",
        ),
        (
            {"timeoutConfig": {"inProgressTimeoutInMinutes": 0}},
            "rollout.timeoutConfig.inProgressTimeoutInMinutes",
            "from 1",
        ),
        ({"jitterSeconds": -1}, "rollout.jitterSeconds", "from 0 to 3600"),
        ({"jitterSeconds": float("nan")}, "rollout.jitterSeconds", "from 0 to 3600"),
    ],
)
def test_a_bad_configuration_names_its_field(doc: object, field: str, message: str) -> None:
    with pytest.raises(ValidationError, match=message) as caught:
        parse_rollout_config(doc)
    assert caught.value.field == field


def test_the_configuration_parses_awss_field_names() -> None:
    config = parse_rollout_config(
        {
            "canary": {"group": "lab"},
            "maximumPerMinute": 1000,
            "exponentialRate": {
                "baseRatePerMinute": 10,
                "incrementFactor": 2.5,
                "rateIncreaseCriteria": {"numberOfSucceededThings": 20},
            },
            "abortConfig": {
                "criteriaList": [
                    {
                        "failureType": "FAILED",
                        "action": "CANCEL",
                        "thresholdPercentage": 25,
                        "minNumberOfExecutedThings": 4,
                    }
                ]
            },
            "timeoutConfig": {"inProgressTimeoutInMinutes": 7},
            "jitterSeconds": 2,
        }
    )
    assert config == RolloutConfig(
        canary_group="lab",
        base_per_minute=10,
        increment_factor=2.5,
        increase_every=20,
        increase_on="succeeded",
        maximum_per_minute=1000,
        abort=(AbortCriterion("FAILED", 25.0, 4),),
        execution_timeout_minutes=7,
        jitter_seconds=2.0,
    )
    assert parse_rollout_config(None) == RolloutConfig()
