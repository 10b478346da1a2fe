"""Supervision of components: one runner per component, driving its lifecycle scripts.

A runner owns one asyncio task that walks the lifecycle (bootstrap and install once per
version, wait for HARD dependencies, startup or run), and on failure runs Recover, backs
off (capped, jittered) and tries again; a crash loop goes BROKEN, and a BROKEN component
is tried again after a cool-off. Stopping cancels that task and then runs the Shutdown
script, SIGTERM and SIGKILL on the component's process group.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import secrets
import signal
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeloop.core.errors import ComponentError
from edgeloop.core.recipe import Lifecycle, Recipe, StepName
from edgeloop.core.variables import InterpolationContext, interpolate
from edgeloop.edge.artifacts import ArtifactStore
from edgeloop.edge.lifecycle import ErrorHistory, Event, State, transition
from edgeloop.edge.logs import RotatingLog, tail_lines
from edgeloop.edge.process import (
    ProcessGroups,
    StepOutcome,
    StepProcess,
    monotonic,
    should_skip,
    signal_group,
    spawn,
)
from edgeloop.edge.settings import BUILTIN_COMPONENTS, AgentSettings
from edgeloop.edge.store import HubStore

log = logging.getLogger("edgeloop.supervisor")

LOG_TAIL_LINES = 10
BOOTSTRAP_RESTART_CODES = {
    100: "bootstrap asked for a restart of the runtime; restart the agent when convenient",
    101: "bootstrap asked for a reboot of the host; edgeloop never reboots it by itself",
}


@dataclass(frozen=True)
class ComponentSpec:
    """One component version as the hub will run it."""

    recipe: Recipe
    lifecycle: Lifecycle
    hard_deps: tuple[str, ...]
    soft_deps: tuple[str, ...]
    artifacts: tuple[Any, ...] = ()

    @property
    def name(self) -> str:
        """The component's name."""
        return self.recipe.name

    @property
    def version(self) -> str:
        """The component's version, as text."""
        return str(self.recipe.version)


@dataclass
class LastError:
    """Why a component last failed: the step, how it ended, and its last log lines."""

    step: str
    reason: str
    exit_code: int | None
    signal: int | None
    at: float
    log_tail: list[str]

    def to_json(self) -> dict[str, Any]:
        """For status documents."""
        return {
            "step": self.step,
            "reason": self.reason,
            "exitCode": self.exit_code,
            "signal": self.signal,
            "at": self.at,
            "logTail": self.log_tail,
        }


class ComponentRunner:
    """Runs one component version and knows its state."""

    def __init__(self, spec: ComponentSpec, supervisor: Supervisor) -> None:
        self.spec = spec
        self._sup = supervisor
        self.state = State.NEW
        self.since = time.time()
        self.restarts = 0
        self.note = ""
        self.last_error: LastError | None = None
        self.svcuid = secrets.token_urlsafe(24)
        self.paused = False
        self._task: asyncio.Task[None] | None = None
        self._proc: StepProcess | None = None
        self._errors = ErrorHistory(supervisor.settings.restart)
        self._rng = random.Random()
        settings = supervisor.settings
        self.log = RotatingLog(
            settings.layout.component_log(spec.name),
            max_bytes=settings.log_max_bytes,
            backups=settings.log_backups,
        )

    @property
    def name(self) -> str:
        """The component's name."""
        return self.spec.name

    @property
    def pid(self) -> int | None:
        """The pid of the running Run/Startup process group leader, if alive."""
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return None
        return proc.pid

    @property
    def active(self) -> bool:
        """True while the runner's lifecycle task is alive."""
        return self._task is not None and not self._task.done()

    # -- control ----------------------------------------------------------------------
    def start(self) -> None:
        """Start the lifecycle task if it is not running."""
        if self.active:
            return
        if self.state in (State.FINISHED, State.ERRORED, State.BROKEN, State.STOPPING):
            self._set(Event.RESET)
        self._task = asyncio.create_task(self._lifecycle(), name=f"component:{self.name}")

    async def stop(self) -> None:
        """Stop the component: Shutdown script, then SIGTERM, then SIGKILL its group."""
        task, self._task = self._task, None
        await _end(task)
        was_started = self._proc is not None
        self._set(Event.STOP)
        if was_started and StepName.SHUTDOWN in self.spec.lifecycle.steps:
            outcome = await self._run_step(StepName.SHUTDOWN)
            if not outcome.ok:
                self.log.write_line("edgeloop", outcome.describe())
        await self._kill_group()
        self._set(Event.STOPPED)
        self.note = ""

    async def restart(self) -> None:
        """Stop and start again, clearing the crash-loop count."""
        await self.stop()
        self._errors.clear()
        self.start()

    def close(self) -> None:
        """Release the log file (the runner must be stopped)."""
        self.log.close()

    def report_state(self, state: str) -> None:
        """UpdateState from the component itself: RUNNING, or ERRORED (restart it)."""
        if state == "RUNNING":
            if self.state in (State.STARTING, State.RUNNING):
                self._set(Event.RUN)
            return
        if self.state in (State.STARTING, State.RUNNING):
            task = self._task
            reported = StepOutcome("UpdateState", reason="the component reported ERRORED")
            self._task = asyncio.create_task(
                self._after_reported_error(task, reported), name=f"component:{self.name}"
            )

    async def _after_reported_error(
        self, task: asyncio.Task[None] | None, outcome: StepOutcome
    ) -> None:
        await _end(task)
        await self._lifecycle(outcome)

    def pause(self) -> None:
        """Freeze the component's processes (SIGSTOP to its group)."""
        pid = self.pid
        if pid is None or self.state is not State.RUNNING:
            raise ComponentError(f"{self.name} is {self.state.value}, not RUNNING: cannot pause it")
        signal_group(pid, signal.SIGSTOP)
        self.paused = True
        self.log.write_line("edgeloop", "paused")

    def resume(self) -> None:
        """Let a paused component's processes run again (SIGCONT)."""
        if not self.paused:
            raise ComponentError(f"{self.name} is not paused")
        if self.pid is not None:
            signal_group(self.pid, signal.SIGCONT)
        self.paused = False
        self.log.write_line("edgeloop", "resumed")

    # -- the lifecycle task -----------------------------------------------------------
    async def _lifecycle(self, failure: StepOutcome | None = None) -> None:
        if failure is not None:
            await self._recover(failure)
        while True:
            outcome = await self._attempt()
            if outcome.ok:
                return
            await self._recover(outcome)

    async def _attempt(self) -> StepOutcome:
        steps = self.spec.lifecycle.steps
        store = self._sup.store
        for step in (StepName.BOOTSTRAP, StepName.INSTALL):
            if step in steps and not store.step_done(self.name, self.spec.version, step.value):
                outcome = await self._run_step(step)
                if step is StepName.BOOTSTRAP and outcome.exit_code in BOOTSTRAP_RESTART_CODES:
                    # Greengrass restarts itself (100) or the host (101) here. A hub agent
                    # that reboots its host is not what a user of a shared machine wants:
                    # the request is recorded where the owner sees it, and the work goes on.
                    self.note = BOOTSTRAP_RESTART_CODES[outcome.exit_code]
                    log.warning("%s: %s", self.name, self.note)
                    self.log.write_line("edgeloop", self.note)
                    outcome = StepOutcome(step.value, exit_code=0)
                if not outcome.ok:
                    return outcome
                store.mark_step_done(self.name, self.spec.version, step.value)
        self._set(Event.INSTALLED)
        await self._wait_for_dependencies()
        if StepName.STARTUP in steps:
            self._set(Event.START)
            outcome = await self._run_step(StepName.STARTUP, keep_group=True)
            if not outcome.ok:
                return outcome
            if outcome.skipped:
                self._set(Event.EXITED_OK)
                return outcome
            self._set(Event.RUN)
            # A Startup component is RUNNING until it is stopped; its background
            # processes stay in the process group that stop() signals.
            await asyncio.Event().wait()
        if StepName.RUN in steps:
            run = steps[StepName.RUN]
            if should_skip(run.skipif):
                self._set(Event.EXITED_OK)
                return StepOutcome(StepName.RUN.value, skipped=True)
            proc = await self._spawn(StepName.RUN)
            if isinstance(proc, StepOutcome):
                return proc
            self._set(Event.RUN)
            outcome = await proc.wait(run.timeout)
            if outcome.ok:
                self._set(Event.EXITED_OK)
            return outcome
        self._set(Event.EXITED_OK)  # nothing to run: the component's work is done
        return StepOutcome("lifecycle", exit_code=0)

    async def _recover(self, outcome: StepOutcome) -> None:
        tail = tail_lines(self.log.path, LOG_TAIL_LINES)
        self.last_error = LastError(
            step=outcome.step,
            reason=outcome.describe(),
            exit_code=outcome.exit_code,
            signal=outcome.signal,
            at=time.time(),
            log_tail=tail,
        )
        self._set(Event.FAILED)
        log.warning("%s: %s", self.name, outcome.describe())
        await self._kill_group()
        if StepName.RECOVER in self.spec.lifecycle.steps:
            await self._run_step(StepName.RECOVER)
        self._errors.record(monotonic())
        policy = self._sup.settings.restart
        if self._errors.is_crash_loop():
            self._set(Event.GIVE_UP)
            self.note = (
                f"crash loop: {self._errors.consecutive} errors within "
                f"{policy.broken_window:g} s; next try in {policy.cooloff:g} s"
            )
            log.error("%s is BROKEN: %s (%s)", self.name, self.note, outcome.describe())
            await asyncio.sleep(policy.cooloff)
            self._errors.clear()
        else:
            delay = policy.delay(self._errors.consecutive, self._rng)
            self.note = f"restarting in {delay:.2f} s"
            await asyncio.sleep(delay)
        self.note = ""
        self.restarts += 1
        self._set(Event.RESET)

    async def _wait_for_dependencies(self) -> None:
        deps = self.spec.hard_deps
        if not deps:
            return

        def waiting() -> list[str]:
            return [d for d in deps if not self._sup.dependency_ready(d)]

        async with self._sup.changed:
            while pending := waiting():
                self.note = "waiting for " + ", ".join(
                    f"{d} ({self._sup.state_of(d)})" for d in pending
                )
                await self._sup.changed.wait()
        self.note = ""

    # -- steps ------------------------------------------------------------------------
    async def _spawn(self, step: StepName) -> StepProcess | StepOutcome:
        spec = self.spec.lifecycle.steps[step]
        try:
            ctx = self._sup.interpolation_context(self.spec)
            script = interpolate(spec.script, ctx)
            env = self._sup.environment(self, spec.setenv, ctx)
            cwd = Path(ctx.work_path)
            proc = await spawn(
                step.value,
                script,
                env=env,
                cwd=cwd,
                log=self.log,
                groups=self._sup.groups,
                component=self.name,
                privileged=spec.requires_privilege,
            )
        except OSError as err:
            return StepOutcome(step.value, spawn_error=str(err))
        self._proc = proc
        return proc

    async def _run_step(self, step: StepName, *, keep_group: bool = False) -> StepOutcome:
        spec = self.spec.lifecycle.steps[step]
        if should_skip(spec.skipif):
            self.log.write_line("edgeloop", f"{step.value} skipped ({spec.skipif})")
            return StepOutcome(step.value, skipped=True)
        previous = self._proc
        proc = await self._spawn(step)
        if isinstance(proc, StepOutcome):
            return proc
        try:
            outcome = await proc.wait(spec.timeout)
        except asyncio.CancelledError:
            await proc.terminate(self._sup.settings.stop_grace)
            raise
        if not keep_group:
            # Only Startup leaves processes behind on purpose; the group of any other
            # step is done with, and the Run/Startup group stays the one to signal.
            self._proc = previous
        self.log.write_line("edgeloop", outcome.describe())
        return outcome

    async def _kill_group(self) -> None:
        self.paused = False
        proc, self._proc = self._proc, None
        if proc is not None:
            await proc.terminate(self._sup.settings.stop_grace)

    # -- state ------------------------------------------------------------------------
    def _set(self, event: Event) -> None:
        new = transition(self.state, event)
        if new is self.state:
            return
        old, self.state = self.state, new
        self.since = time.time()
        self.log.write_line("edgeloop", f"state {old.value} -> {new.value}")
        self._sup.state_changed(self, old, new)

    def status(self) -> dict[str, Any]:
        """A JSON-ready description, for `device components` and deployment reports."""
        return {
            "name": self.name,
            "version": self.spec.version,
            "state": self.state.value,
            "since": self.since,
            "pid": self.pid,
            "restarts": self.restarts,
            "note": self.note,
            "paused": self.paused,
            "lastError": self.last_error.to_json() if self.last_error else None,
        }


async def _end(task: asyncio.Task[None] | None) -> None:
    """Cancel a lifecycle task until it has ended.

    Cancel again and again: a cancellation that races with a completing await can be
    absorbed on Python 3.11, and a component must never outlive its stop.
    """
    while task is not None and not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=0.5)


StateListener = Callable[[str, State, State], None]


class Supervisor:
    """All of a hub's component runners, and what they need from the hub."""

    def __init__(
        self,
        settings: AgentSettings,
        store: HubStore,
        artifacts: ArtifactStore,
        groups: ProcessGroups,
        configuration: Callable[[str], Mapping[str, Any]],
    ) -> None:
        self.settings = settings
        self.store = store
        self.artifacts = artifacts
        self.groups = groups
        self._configuration = configuration
        self.runners: dict[str, ComponentRunner] = {}
        self.changed = asyncio.Condition()
        self.listeners: list[StateListener] = []

    # -- what runners ask of the hub ----------------------------------------------------
    def dependency_ready(self, name: str) -> bool:
        """True when ``name`` is a builtin, or a component that is RUNNING or FINISHED."""
        runner = self.runners.get(name)
        if runner is None:
            return name in BUILTIN_COMPONENTS
        return runner.state in (State.RUNNING, State.FINISHED)

    def state_of(self, name: str) -> str:
        """The state of a component, or a word saying it is not on the hub."""
        runner = self.runners.get(name)
        return runner.state.value if runner else "not deployed"

    def work_dir(self, name: str) -> Path:
        """``{work:path}``: created on first use."""
        path = self.settings.layout.work / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def interpolation_context(self, spec: ComponentSpec) -> InterpolationContext:
        """What recipe variables in ``spec``'s scripts and values resolve to, right now."""
        visible = {spec.name, *spec.hard_deps, *spec.soft_deps}
        artifacts: dict[str, str] = {}
        decompressed: dict[str, str] = {}
        configuration: dict[str, Mapping[str, Any]] = {}
        for name in visible:
            runner = self.runners.get(name)
            version = spec.version if name == spec.name else (runner and runner.spec.version)
            if version:
                paths = self.artifacts.paths_for(name, version)
                artifacts[name] = str(paths.path)
                decompressed[name] = str(paths.decompressed_path)
            configuration[name] = self._configuration(name)
        return InterpolationContext(
            component=spec.name,
            artifacts_path=artifacts,
            decompressed_path=decompressed,
            work_path=str(self.work_dir(spec.name)),
            kernel_root=str(self.settings.root),
            thing_name=self.settings.thing_name,
            configuration=configuration,
            visible=frozenset(visible),
        )

    def environment(
        self, runner: ComponentRunner, step_env: Mapping[str, str], ctx: InterpolationContext
    ) -> dict[str, str]:
        """The environment Greengrass gives a component's scripts, plus its Setenv."""
        settings = self.settings
        env = dict(os.environ)
        ipc_socket = str(settings.layout.ipc_socket)
        env.update(
            {
                "AWS_IOT_THING_NAME": settings.thing_name,
                "AWS_REGION": settings.region,
                "AWS_DEFAULT_REGION": settings.region,
                "SVCUID": runner.svcuid,
                "AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH_FOR_COMPONENT": ipc_socket,
                "AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH": ipc_socket,
                "GG_ROOT_CA_PATH": str(settings.root / "rootCA.pem"),
                "EDGELOOP_ROOT": str(settings.root),
                "EDGELOOP_COMPONENT_NAME": runner.name,
                "EDGELOOP_COMPONENT_VERSION": runner.spec.version,
            }
        )
        for key, value in {**runner.spec.lifecycle.setenv, **step_env}.items():
            env[key] = interpolate(value, ctx)
        return env

    def state_changed(self, runner: ComponentRunner, old: State, new: State) -> None:
        """Wake whoever waits on states, tell listeners, and cascade HARD restarts."""
        for listener in self.listeners:
            listener(runner.name, old, new)
        asyncio.get_running_loop().create_task(self._notify(), name="state-notify")
        if old in (State.RUNNING, State.FINISHED) and new is State.ERRORED:
            # Greengrass: a HARD dependent restarts when its dependency fails.
            for dependent in self.dependents(runner.name, hard_only=True):
                other = self.runners[dependent]
                if other.active:
                    other.log.write_line("edgeloop", f"restarting: {runner.name} failed")
                    asyncio.get_running_loop().create_task(
                        other.restart(), name=f"cascade:{dependent}"
                    )

    async def _notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    async def wait_until(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait until ``predicate()`` holds after some state change; False on timeout."""

        async def _wait() -> None:
            async with self.changed:
                await self.changed.wait_for(predicate)

        try:
            async with asyncio.timeout(timeout):
                await _wait()
        except TimeoutError:
            return False
        return True

    def dependents(self, name: str, *, hard_only: bool = False) -> list[str]:
        """Components that depend on ``name`` directly."""
        out = []
        for other, runner in self.runners.items():
            deps = (
                runner.spec.hard_deps
                if hard_only
                else (runner.spec.hard_deps + runner.spec.soft_deps)
            )
            if name in deps:
                out.append(other)
        return out

    # -- reconciling ------------------------------------------------------------------
    async def apply(self, specs: Mapping[str, ComponentSpec], restart: Iterable[str] = ()) -> None:
        """Make the running set match ``specs``: stop what left or changed, start the rest."""
        restart_set = set(restart)
        to_stop = [
            name
            for name, runner in self.runners.items()
            # Versions are immutable, so the same version is the same recipe (whichever
            # file it was read from): only a version change or a request restarts.
            if name not in specs
            or str(specs[name].recipe.version) != runner.spec.version
            or name in restart_set
        ]
        await self.stop(to_stop)
        for name in to_stop:
            self.runners.pop(name).close()
        for name, spec in specs.items():
            if name not in self.runners:
                self.runners[name] = ComponentRunner(spec, self)
        for runner in self.runners.values():
            if runner.state not in (State.FINISHED,) or runner.name in restart_set:
                runner.start()
        await self._notify()

    async def stop(self, names: Iterable[str]) -> None:
        """Stop components, dependents before what they depend on."""
        for layer in self._stop_layers(set(names)):
            await asyncio.gather(*(self.runners[n].stop() for n in layer))

    async def stop_all(self) -> None:
        """Stop every component (on agent shutdown)."""
        await self.stop(list(self.runners))
        for runner in self.runners.values():
            runner.close()

    def _stop_layers(self, names: set[str]) -> list[list[str]]:
        # Peel off, layer by layer, the components no remaining one depends on.
        remaining = {n for n in names if n in self.runners}
        layers = []
        while remaining:
            needed = {
                dep
                for n in remaining
                for dep in self.runners[n].spec.hard_deps + self.runners[n].spec.soft_deps
            }
            layer = sorted(remaining - needed) or sorted(remaining)  # a cycle: stop all
            layers.append(layer)
            remaining -= set(layer)
        return layers

    def statuses(self) -> list[dict[str, Any]]:
        """The status of every component, by name."""
        return [self.runners[n].status() for n in sorted(self.runners)]
