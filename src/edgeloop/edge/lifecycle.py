"""The component lifecycle state machine and restart policy, pure: no processes, no clocks.

States carry Greengrass's meanings:

    NEW        known to the hub, its Install step has not run for this version
    INSTALLED  Install succeeded (or there is none); not started
    STARTING   the Startup step is running (a Run-only component skips straight to RUNNING)
    RUNNING    the Run step's process is alive, or the Startup step exited 0
    STOPPING   the Shutdown step and the signals that follow it are in progress
    FINISHED   the Run step exited 0, or the component was stopped on request
    ERRORED    a step failed (non-zero exit, timeout, crash); a restart is scheduled
    BROKEN     it errored too often in a short time. Unlike Greengrass this is not a dead
               end: the runtime tries again after a cool-off and says why it broke.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field
from enum import StrEnum


class State(StrEnum):
    """A component's lifecycle state, as Greengrass names it."""

    NEW = "NEW"
    INSTALLED = "INSTALLED"
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    STOPPING = "STOPPING"
    FINISHED = "FINISHED"
    ERRORED = "ERRORED"
    BROKEN = "BROKEN"


class Event(StrEnum):
    """What can happen to a component."""

    INSTALLED = "installed"  # Install succeeded or was skipped
    START = "start"  # Startup step launched
    RUN = "run"  # Run step launched, or Startup exited 0
    EXITED_OK = "exited_ok"  # Run step exited 0
    FAILED = "failed"  # any step failed
    STOP = "stop"  # stop requested
    STOPPED = "stopped"  # stop completed
    GIVE_UP = "give_up"  # crash loop detected
    RESET = "reset"  # a fresh attempt (restart, cool-off over, new deployment)


# Which event is legal in which state, and where it leads. Anything else is a bug in the
# supervisor, not a user error, so it raises.
_TRANSITIONS: dict[tuple[State, Event], State] = {
    (State.NEW, Event.INSTALLED): State.INSTALLED,
    (State.NEW, Event.FAILED): State.ERRORED,
    (State.INSTALLED, Event.START): State.STARTING,
    (State.INSTALLED, Event.RUN): State.RUNNING,
    (State.INSTALLED, Event.EXITED_OK): State.FINISHED,  # nothing to start
    (State.STARTING, Event.RUN): State.RUNNING,
    (State.RUNNING, Event.RUN): State.RUNNING,  # UpdateState(RUNNING) came before Startup ended
    (State.STARTING, Event.FAILED): State.ERRORED,
    (State.RUNNING, Event.EXITED_OK): State.FINISHED,
    (State.RUNNING, Event.FAILED): State.ERRORED,
    (State.STOPPING, Event.STOPPED): State.FINISHED,
    (State.FINISHED, Event.STOPPED): State.FINISHED,  # stopping what had already finished
    (State.STOPPING, Event.FAILED): State.ERRORED,
    (State.ERRORED, Event.GIVE_UP): State.BROKEN,
}
_STOPPABLE = {
    State.NEW,
    State.INSTALLED,
    State.STARTING,
    State.RUNNING,
    State.ERRORED,
    State.BROKEN,  # stopping a broken component ends its cool-off: it is FINISHED
}


class IllegalTransition(RuntimeError):
    """The supervisor asked for a transition the state machine does not allow."""


def transition(state: State, event: Event) -> State:
    """The state that ``event`` leads to from ``state``."""
    if event is Event.RESET:
        # A fresh attempt starts over from NEW; the supervisor skips Install when it
        # already ran for this version.
        return State.NEW
    if event is Event.STOP:
        if state in _STOPPABLE:
            return State.STOPPING
        if state in (State.FINISHED, State.STOPPING):
            return state
    nxt = _TRANSITIONS.get((state, event))
    if nxt is None:
        raise IllegalTransition(f"{event.value} is not allowed in state {state.value}")
    return nxt


def is_settled_ok(state: State) -> bool:
    """True for the states a healthy deployment may end in."""
    return state in (State.RUNNING, State.FINISHED)


def satisfies_hard_dependency(state: State) -> bool:
    """A dependent may start once each HARD dependency is RUNNING or FINISHED."""
    return state in (State.RUNNING, State.FINISHED)


@dataclass(frozen=True)
class RestartPolicy:
    """Capped exponential backoff with jitter, crash-loop detection and a cool-off."""

    base_delay: float = 0.5
    max_delay: float = 30.0
    jitter: float = 0.2  # each delay is scaled by a factor in [1 - jitter, 1 + jitter]
    broken_after: int = 3  # this many errors ...
    broken_window: float = 60.0  # ... within this many seconds mean a crash loop
    cooloff: float = 300.0  # a BROKEN component is tried again after this long

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Backoff before restart number ``attempt`` (1-based)."""
        raw = min(self.max_delay, self.base_delay * 2.0 ** max(0, attempt - 1))
        factor: float = rng.uniform(1 - self.jitter, 1 + self.jitter)
        return max(0.0, raw * factor)


@dataclass
class ErrorHistory:
    """The recent errors of one component, to tell a crash loop from bad luck."""

    policy: RestartPolicy
    times: deque[float] = field(default_factory=deque)

    def record(self, now: float) -> None:
        """Remember an error at ``now`` and forget those outside the window."""
        self.times.append(now)
        while self.times and now - self.times[0] > self.policy.broken_window:
            self.times.popleft()

    def is_crash_loop(self) -> bool:
        """True when the window holds ``broken_after`` errors or more."""
        return len(self.times) >= self.policy.broken_after

    def clear(self) -> None:
        """Start counting afresh (after a cool-off or a new deployment)."""
        self.times.clear()

    @property
    def consecutive(self) -> int:
        """How many errors the current window holds."""
        return len(self.times)
