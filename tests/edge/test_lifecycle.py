"""The pure lifecycle state machine, the restart backoff and crash-loop detection."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeloop.edge.lifecycle import (
    ErrorHistory,
    Event,
    IllegalTransition,
    RestartPolicy,
    State,
    is_settled_ok,
    satisfies_hard_dependency,
    transition,
)

# The table as the module docstring describes it, written out again so that a change to
# the state machine has to be made on purpose in two places.
LEGAL: dict[tuple[State, Event], State] = {
    (State.NEW, Event.INSTALLED): State.INSTALLED,
    (State.NEW, Event.FAILED): State.ERRORED,
    (State.INSTALLED, Event.START): State.STARTING,
    (State.INSTALLED, Event.RUN): State.RUNNING,
    (State.INSTALLED, Event.EXITED_OK): State.FINISHED,
    (State.STARTING, Event.RUN): State.RUNNING,
    (State.RUNNING, Event.RUN): State.RUNNING,  # UpdateState(RUNNING) before Startup ended
    (State.STARTING, Event.FAILED): State.ERRORED,
    (State.RUNNING, Event.EXITED_OK): State.FINISHED,
    (State.RUNNING, Event.FAILED): State.ERRORED,
    (State.STOPPING, Event.STOPPED): State.FINISHED,
    (State.FINISHED, Event.STOPPED): State.FINISHED,  # stopping what had already finished
    (State.STOPPING, Event.FAILED): State.ERRORED,
    (State.ERRORED, Event.GIVE_UP): State.BROKEN,
}
STOP_TARGET: dict[State, State] = {
    State.NEW: State.STOPPING,
    State.INSTALLED: State.STOPPING,
    State.STARTING: State.STOPPING,
    State.RUNNING: State.STOPPING,
    State.ERRORED: State.STOPPING,
    State.BROKEN: State.STOPPING,  # ends the cool-off
    # Already stopping or at rest: STOP changes nothing.
    State.STOPPING: State.STOPPING,
    State.FINISHED: State.FINISHED,
}
TABLE_EVENTS = [e for e in Event if e not in (Event.STOP, Event.RESET)]
ILLEGAL = [(s, e) for s in State for e in TABLE_EVENTS if (s, e) not in LEGAL]


@pytest.mark.parametrize(("state", "event"), sorted(LEGAL))
def test_every_legal_transition_goes_where_the_table_says(state: State, event: Event) -> None:
    assert transition(state, event) is LEGAL[(state, event)]


@pytest.mark.parametrize(("state", "event"), ILLEGAL)
def test_every_other_transition_raises(state: State, event: Event) -> None:
    with pytest.raises(IllegalTransition) as info:
        transition(state, event)
    assert event.value in str(info.value)
    assert state.value in str(info.value)


def test_the_illegal_set_is_not_trivially_empty() -> None:
    # 8 states x 7 table events, 14 of them legal.
    assert len(ILLEGAL) == 8 * 7 - 14


@pytest.mark.parametrize("state", list(State))
def test_stop_is_accepted_in_every_state(state: State) -> None:
    assert transition(state, Event.STOP) is STOP_TARGET[state]


@pytest.mark.parametrize("state", list(State))
def test_stop_then_stopped_ends_finished_from_every_state(state: State) -> None:
    # What ComponentRunner.stop() does, whatever state the component is in.
    assert transition(transition(state, Event.STOP), Event.STOPPED) is State.FINISHED


@pytest.mark.parametrize("state", list(State))
def test_reset_starts_over_from_new_in_every_state(state: State) -> None:
    assert transition(state, Event.RESET) is State.NEW


def test_a_stop_then_stopped_sequence_finishes_a_running_component() -> None:
    state = State.NEW
    for event in (Event.INSTALLED, Event.START, Event.RUN, Event.STOP, Event.STOPPED):
        state = transition(state, event)
    assert state is State.FINISHED


def test_crash_loop_path_errored_broken_then_reset() -> None:
    state = transition(State.RUNNING, Event.FAILED)
    assert state is State.ERRORED
    state = transition(state, Event.GIVE_UP)
    assert state is State.BROKEN
    with pytest.raises(IllegalTransition):
        transition(state, Event.RUN)
    assert transition(state, Event.RESET) is State.NEW


def test_settled_and_dependency_predicates() -> None:
    ok = {State.RUNNING, State.FINISHED}
    for state in State:
        assert is_settled_ok(state) is (state in ok)
        assert satisfies_hard_dependency(state) is (state in ok)


def _legal(state: State, event: Event) -> bool:
    try:
        transition(state, event)
    except IllegalTransition:
        return False
    return True


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(list(Event)), max_size=60))
def test_random_legal_sequences_stay_in_known_states(events: list[Event]) -> None:
    state = State.NEW
    for event in events:
        if not _legal(state, event):
            continue
        nxt = transition(state, event)
        assert isinstance(nxt, State)
        # Every move is one the table, STOP or RESET allows: nothing undefined.
        if event is Event.RESET:
            assert nxt is State.NEW
        elif event is Event.STOP:
            assert nxt is STOP_TARGET[state]
        else:
            assert nxt is LEGAL[(state, event)]
        state = nxt
    # Whatever happened, a component can always be stopped and started afresh.
    assert transition(transition(state, Event.STOP), Event.STOPPED) is State.FINISHED
    assert transition(state, Event.RESET) is State.NEW


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(list(Event)), max_size=40))
def test_legality_is_a_pure_function_of_state_and_event(events: list[Event]) -> None:
    state = State.NEW
    for event in events:
        legal = (state, event) in LEGAL or event in (Event.STOP, Event.RESET)
        assert _legal(state, event) is legal
        if legal:
            state = transition(state, event)


# -- restart policy ------------------------------------------------------------------
def test_delay_without_jitter_doubles_then_caps() -> None:
    policy = RestartPolicy(base_delay=0.5, max_delay=5.0, jitter=0.0)
    rng = random.Random(1)
    delays = [policy.delay(n, rng) for n in range(1, 8)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0]


def test_delay_of_attempt_zero_or_less_is_the_base() -> None:
    policy = RestartPolicy(base_delay=0.25, jitter=0.0)
    rng = random.Random(0)
    assert policy.delay(0, rng) == 0.25
    assert policy.delay(-3, rng) == 0.25


def test_huge_attempt_numbers_stay_capped() -> None:
    policy = RestartPolicy(base_delay=0.5, max_delay=30.0, jitter=0.0)
    assert policy.delay(1000, random.Random(0)) == 30.0


@pytest.mark.parametrize("seed", [0, 1, 42, 2024])
def test_jittered_delays_stay_within_bounds_and_vary(seed: int) -> None:
    policy = RestartPolicy(base_delay=0.5, max_delay=8.0, jitter=0.2)
    rng = random.Random(seed)
    seen: set[float] = set()
    for attempt in range(1, 12):
        raw = min(8.0, 0.5 * 2 ** (attempt - 1))
        for _ in range(20):
            delay = policy.delay(attempt, rng)
            assert raw * 0.8 <= delay <= raw * 1.2
            seen.add(delay)
    assert len(seen) > 100  # the jitter really jitters


def test_jitter_is_reproducible_with_a_seeded_rng() -> None:
    policy = RestartPolicy()
    first = [policy.delay(n, random.Random(7)) for n in range(1, 6)]
    second = [policy.delay(n, random.Random(7)) for n in range(1, 6)]
    assert first == second


@settings(max_examples=200, deadline=None)
@given(
    base=st.floats(0.001, 10.0),
    cap=st.floats(0.001, 100.0),
    jitter=st.floats(0.0, 1.0),
    attempt=st.integers(1, 200),
    seed=st.integers(0, 2**32),
)
def test_delay_is_never_negative_and_never_above_the_jittered_cap(
    base: float, cap: float, jitter: float, attempt: int, seed: int
) -> None:
    policy = RestartPolicy(base_delay=base, max_delay=cap, jitter=jitter)
    delay = policy.delay(attempt, random.Random(seed))
    assert 0.0 <= delay <= cap * (1 + jitter) + 1e-9


def test_mean_delay_grows_with_attempts_until_the_cap() -> None:
    policy = RestartPolicy(base_delay=0.1, max_delay=1.6, jitter=0.3)
    rng = random.Random(3)
    means = [sum(policy.delay(n, rng) for _ in range(200)) / 200 for n in range(1, 8)]
    assert means[0] < means[1] < means[2] < means[3] < means[4]
    assert means[5] == pytest.approx(1.6, rel=0.1)
    assert means[6] == pytest.approx(1.6, rel=0.1)


# -- error history -------------------------------------------------------------------
def test_three_errors_inside_the_window_are_a_crash_loop() -> None:
    history = ErrorHistory(RestartPolicy(broken_after=3, broken_window=60.0))
    history.record(100.0)
    history.record(130.0)
    assert not history.is_crash_loop()
    assert history.consecutive == 2
    history.record(159.0)
    assert history.is_crash_loop()
    assert history.consecutive == 3


def test_errors_spread_wider_than_the_window_are_bad_luck() -> None:
    history = ErrorHistory(RestartPolicy(broken_after=3, broken_window=60.0))
    for now in (0.0, 50.0, 100.0, 150.0, 200.0):
        history.record(now)
        assert not history.is_crash_loop()
    assert list(history.times) == [150.0, 200.0]


def test_an_error_exactly_at_the_window_edge_still_counts() -> None:
    history = ErrorHistory(RestartPolicy(broken_after=2, broken_window=10.0))
    history.record(0.0)
    history.record(10.0)
    assert history.is_crash_loop()
    history.record(20.5)
    assert list(history.times) == [20.5]  # 10.0 is 10.5 s old: out
    assert not history.is_crash_loop()


def test_clear_forgets_every_error() -> None:
    history = ErrorHistory(RestartPolicy(broken_after=2, broken_window=60.0))
    history.record(1.0)
    history.record(2.0)
    assert history.is_crash_loop()
    history.clear()
    assert history.consecutive == 0
    assert not history.is_crash_loop()
    history.record(3.0)
    assert not history.is_crash_loop()


def test_broken_after_one_means_the_first_error_breaks() -> None:
    history = ErrorHistory(RestartPolicy(broken_after=1))
    assert not history.is_crash_loop()
    history.record(5.0)
    assert history.is_crash_loop()


def test_histories_do_not_share_their_times() -> None:
    policy = RestartPolicy()
    a, b = ErrorHistory(policy), ErrorHistory(policy)
    a.record(1.0)
    assert b.consecutive == 0
