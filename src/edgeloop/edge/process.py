"""Lifecycle scripts as child processes, each in its own process group.

A script runs as ``sh -c SCRIPT`` (what Greengrass does on Linux), in a new session so
that its whole tree can be signalled at once: Shutdown script first (by the caller), then
SIGTERM to the group, then SIGKILL after a grace period. Every process group the agent
starts is recorded on disk with its start time, so that an agent that was killed with
``kill -9`` can, when it comes back, end what its predecessor left running.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from edgeloop.core.recipe import SkipIf
from edgeloop.edge.logs import RotatingLog
from edgeloop.edge.store import write_json_atomic


@dataclass(frozen=True)
class StepOutcome:
    """How a lifecycle step ended."""

    step: str
    exit_code: int | None = None
    signal: int | None = None
    timed_out: bool = False
    skipped: bool = False
    spawn_error: str | None = None
    reason: str | None = None  # why it failed, when no exit status tells it

    @property
    def ok(self) -> bool:
        """True when the step succeeded or was skipped."""
        return self.skipped or (self.exit_code == 0 and not self.timed_out)

    def describe(self) -> str:
        """One line saying how the step ended, for status and deployment reports."""
        if self.skipped:
            return f"{self.step} skipped"
        if self.reason:
            return f"{self.step}: {self.reason}"
        if self.spawn_error:
            return f"{self.step} could not start: {self.spawn_error}"
        if self.timed_out:
            return f"{self.step} timed out"
        if self.signal is not None:
            try:
                name = signal.Signals(self.signal).name
            except ValueError:
                name = str(self.signal)
            return f"{self.step} killed by signal {name}"
        return f"{self.step} exited with code {self.exit_code}"


def should_skip(skipif: SkipIf | None) -> bool:
    """Greengrass's Skipif: ``onpath X`` skips when X is an executable on PATH,
    ``exists F`` when the file exists."""
    if skipif is None:
        return False
    if skipif.kind == "onpath":
        return shutil.which(skipif.target) is not None
    return os.path.exists(skipif.target)


def _start_time(pid: int) -> str | None:
    """The kernel's start time of a process (field 22 of /proc/PID/stat), or None."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces; fields after it are plain.
    fields = raw[raw.rfind(")") + 2 :].split()
    return fields[19] if len(fields) > 19 else None


class ProcessGroups:
    """The process groups this agent started, recorded on disk for crash recovery."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._groups: dict[int, dict[str, str]] = {}

    def add(self, pgid: int, component: str) -> None:
        """Record a new process group."""
        self._groups[pgid] = {"component": component, "start": _start_time(pgid) or ""}
        self._save()

    def discard(self, pgid: int) -> None:
        """Forget a group whose leader has been reaped."""
        if self._groups.pop(pgid, None) is not None:
            self._save()

    def _save(self) -> None:
        write_json_atomic(self._path, {str(k): v for k, v in self._groups.items()}, fsync=False)

    def reap_leftovers(self) -> list[str]:
        """Kill the groups a previous agent left behind; returns a line per group killed."""
        try:
            recorded = json.loads(self._path.read_text())
        except (OSError, ValueError):
            return []
        killed = []
        for pgid_text, info in recorded.items():
            pgid = int(pgid_text)
            # Only a group whose leader still has the recorded start time is ours: pids
            # are reused, and killing a stranger's group would be far worse than a leak.
            if info.get("start") and _start_time(pgid) == info["start"]:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pgid, signal.SIGKILL)
                    killed.append(f"{info.get('component', '?')} (process group {pgid})")
        self._groups.clear()
        self._save()
        return killed


EXIT_POLL = 0.25  # seconds between exit-status checks of a running step


class StepProcess:
    """One running lifecycle script and the tasks that copy its output to the log."""

    def __init__(
        self,
        step: str,
        proc: asyncio.subprocess.Process,
        log: RotatingLog,
        groups: ProcessGroups,
    ) -> None:
        self.step = step
        self._proc = proc
        self._groups = groups
        self._pumps = [
            asyncio.create_task(_pump(proc.stdout, log, "stdout"), name=f"{step}-stdout"),
            asyncio.create_task(_pump(proc.stderr, log, "stderr"), name=f"{step}-stderr"),
        ]

    @property
    def pid(self) -> int:
        """The pid of the script's shell, which leads its process group."""
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        """The exit status once reaped, else None."""
        return self._proc.returncode

    async def wait(self, timeout: float | None = None) -> StepOutcome:
        """Wait for the script to end; on timeout, kill its group and say so."""
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation
        # that races with the process exiting, and stop() relies on cancellation.
        try:
            async with asyncio.timeout(timeout):
                code = await self._exit()
        except TimeoutError:
            await self.terminate(grace=2.0)
            return StepOutcome(self.step, timed_out=True)
        await self._finish()
        return _outcome(self.step, code)

    async def _exit(self) -> int:
        # On Python 3.11, Process.wait() returns only once the child's pipes are closed
        # too, so a killed shell whose child still holds stdout would look alive forever.
        # The exit status is known earlier: watch for it as well.
        waiter = asyncio.ensure_future(self._proc.wait())
        try:
            while True:
                done, _ = await asyncio.wait({waiter}, timeout=EXIT_POLL)
                if done:
                    return waiter.result()
                if self._proc.returncode is not None:
                    return self._proc.returncode
        finally:
            if not waiter.done():
                waiter.cancel()

    async def _finish(self) -> None:
        # The pipes close when the last process holding them exits; a daemon started by a
        # Startup script may keep them open, so the pumps get a bounded time to drain.
        _, pending = await asyncio.wait(self._pumps, timeout=0.5)
        for task in pending:
            task.cancel()
        self._groups.discard(self._proc.pid)

    async def terminate(self, grace: float) -> None:
        """SIGTERM the whole group, then SIGKILL whatever is left after ``grace`` seconds."""
        pgid = self._proc.pid
        _signal_group(pgid, signal.SIGTERM)
        _signal_group(pgid, signal.SIGCONT)  # a paused component must wake to see SIGTERM
        # Wait for the whole group, not just its leader: a Startup script's daemon outlives
        # the script, and children may linger after the leader exits.
        deadline = time.monotonic() + grace
        while _group_alive(pgid) and time.monotonic() < deadline:  # noqa: ASYNC110 (polling the kernel)
            await asyncio.sleep(0.02)
        _signal_group(pgid, signal.SIGKILL)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5.0):
                await self._proc.wait()
        await self._finish()


def _group_alive(pgid: int) -> bool:
    """True while a live (non-zombie) process is in the group.

    ``killpg(pgid, 0)`` also succeeds for zombies, and an orphaned grandchild stays a
    zombie until init reaps it (seconds on some hosts, never in a container without an
    init): waiting for those would stall every stop for nothing.
    """
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        entries = os.listdir("/proc")
    except OSError:
        return True
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                raw = fh.read()
        except OSError:
            continue
        fields = raw[raw.rfind(b")") + 2 :].split()
        if len(fields) > 2 and fields[2] == str(pgid).encode() and fields[0] != b"Z":
            return True
    return False


def signal_group(pgid: int, sig: int) -> None:
    """Send ``sig`` to a process group; a group that is already gone is not an error."""
    _signal_group(pgid, sig)


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _outcome(step: str, code: int) -> StepOutcome:
    if code < 0:
        return StepOutcome(step, signal=-code)
    return StepOutcome(step, exit_code=code)


async def _pump(stream: asyncio.StreamReader | None, log: RotatingLog, name: str) -> None:
    if stream is None:
        return
    while True:
        try:
            line = await stream.readline()
        except ValueError:
            # A line longer than the reader's limit: take what is buffered as one line.
            line = await stream.read(64 * 1024)
        if not line:
            return
        log.write_line(name, line.decode("utf-8", "replace").rstrip("\n"))


async def spawn(
    step: str,
    script: str,
    *,
    env: Mapping[str, str],
    cwd: Path,
    log: RotatingLog,
    groups: ProcessGroups,
    component: str,
    privileged: bool = False,
) -> StepProcess:
    """Start ``script`` in a new process group; raises OSError if it cannot start."""
    argv = ["sh", "-c", script]
    if privileged and os.geteuid() != 0:
        # RequiresPrivilege on a hub that does not run as root: ask sudo, never prompt.
        argv = ["sudo", "-n", "-E", *argv]
    log.write_line("edgeloop", f"{step} starting")
    proc = await asyncio.create_subprocess_exec(
        *argv,
        cwd=str(cwd),
        env=dict(env),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
        limit=256 * 1024,
    )
    groups.add(proc.pid, component)
    return StepProcess(step, proc, log, groups)


def monotonic() -> float:
    """The clock the supervisor uses for backoff and crash-loop windows."""
    return time.monotonic()
