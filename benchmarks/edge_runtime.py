"""Edge runtime benchmarks: the agent's memory, its start-up time, and a local deployment's.

Every number comes from a real agent process (``python -m edgeloop.edge.agent``) on a hub
folder under /tmp, driven over its control socket as the device CLI drives it. The
baselines (a bare interpreter, the agent's imports alone) are measured in the same run.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

from benchmarks._report import Result, Samples, SuiteResult, Target, mb
from edgeloop.core.errors import AgentError
from edgeloop.edge.control import ControlClient
from edgeloop.edge.settings import AgentSettings

RUNS = 5  # repetitions of each timed benchmark
POLL = 0.005  # seconds between control requests while timing
RUNNING_COMPONENTS = 5
DEPLOYED_COMPONENTS = 3
SETTLE = 1.0  # seconds to let a hub settle after its deployment before reading memory
LOOP = "while true; do sleep 1; done"
TIMEOUT = 20.0  # no single wait in this suite should come near this

MEMORY_TARGET = Target(limit=30, unit="MB")
START_TARGET = Target(limit=0.5, unit="s", inclusive=False)
DEPLOY_TARGET = Target(limit=2, unit="s", inclusive=False)

PYTHON = sys.executable  # baselines run the very interpreter the agent runs on
BARE_SLEEP = "import time; print('ready', flush=True); time.sleep(60)"
AGENT_IMPORTS = (
    "import asyncio, edgeloop.edge.agent, time; print('ready', flush=True); time.sleep(60)"
)


class BenchmarkError(RuntimeError):
    """The benchmark itself could not run (as opposed to a target being missed)."""


def _defaults() -> dict[str, Any]:
    """AgentSettings' field defaults, without building settings for a real hub."""
    out: dict[str, Any] = {}
    for f in fields(AgentSettings):
        if f.default is not MISSING:
            out[f.name] = f.default
    return out


# -- processes and folders --------------------------------------------------------------
class Workspace:
    """Owns every folder and process this suite makes, and ends them all on exit."""

    def __init__(self) -> None:
        self.folders: list[Path] = []
        self.processes: list[subprocess.Popen[bytes]] = []
        # Every child compiles to, and reads, a bytecode cache of its own, as an installed
        # hub would (pip writes .pyc files). Without it, a shell that sets
        # PYTHONDONTWRITEBYTECODE (as containers often do) makes every agent start compile
        # edgeloop from source; the cache is kept out of src/ so the run leaves no trace.
        self.env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        self.env["PYTHONPYCACHEPREFIX"] = str(self.folder() / "pyc")

    def folder(self) -> Path:
        """A fresh, short folder under /tmp (a hub's socket path must fit in 107 bytes)."""
        path = Path(tempfile.mkdtemp(prefix="elb-", dir="/tmp"))
        self.folders.append(path)
        return path

    def popen(self, argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        """Start a process (with the workspace's environment) that this workspace will end."""
        kwargs.setdefault("env", self.env)
        proc = subprocess.Popen(argv, **kwargs)
        self.processes.append(proc)
        return proc

    def close(self) -> None:
        """SIGTERM, then SIGKILL, every process still alive; sweep hubs; remove folders."""
        for proc in self.processes:
            terminate(proc, grace=10.0)
        for folder in self.folders:
            kill_components(folder)
            shutil.rmtree(folder, ignore_errors=True)

    def __enter__(self) -> Workspace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def terminate(proc: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM ``proc``, and SIGKILL it if it has not exited within ``grace`` seconds."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def kill_components(folder: Path) -> None:
    """SIGKILL the process group of any component whose hub lives under ``folder``.

    A cleanly stopped agent leaves none; this is for an agent that had to be killed.
    Components carry ``EDGELOOP_ROOT`` in their environment, which identifies them.
    """
    marker = f"EDGELOOP_ROOT={folder}/".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(item.startswith(marker) for item in env):
            with contextlib.suppress(OSError):
                os.killpg(os.getpgid(int(entry.name)), signal.SIGKILL)


def group_members(pgid: int) -> list[tuple[int, str]]:
    """The (pid, state letter) of every process in group ``pgid``, zombies included."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields_after_name = stat[stat.rfind(")") + 2 :].split()
        if len(fields_after_name) > 2 and int(fields_after_name[2]) == pgid:
            members.append((int(entry.name), fields_after_name[0]))
    return members


def zombie_linger_time(ws: Workspace) -> float:
    """Seconds from SIGTERM to a component-like process group until no member is left.

    The group is ``sh -c LOOP`` in its own session, like a component. Its shell is reaped
    here at once, but the orphaned ``sleep`` stays a zombie, and a member of the group,
    until PID 1 (or a subreaper) reaps it; how soon that happens depends on the machine.
    """
    proc = ws.popen(["sh", "-c", LOOP], start_new_session=True, stdin=subprocess.DEVNULL)
    deadline = time.perf_counter() + TIMEOUT
    try:
        while len(group_members(proc.pid)) < 2:  # the shell and its sleep
            if time.perf_counter() > deadline:
                raise BenchmarkError("the test process group never started its sleep")
            time.sleep(POLL)
        began = time.perf_counter()
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(5)
        while group_members(proc.pid):
            if time.perf_counter() > deadline:
                raise BenchmarkError(f"process group {proc.pid} lingered over {TIMEOUT:g} s")
            time.sleep(POLL)
        return time.perf_counter() - began
    finally:
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)


# -- memory -----------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class Memory:
    """A process's memory as the kernel reports it, in KiB."""

    rss: int
    peak_rss: int
    pss: int | None  # None when smaps_rollup is not readable

    def describe(self) -> str:
        """``RSS x MB, PSS y MB``."""
        pss = f"{mb(self.pss):.1f} MB" if self.pss is not None else "n/a"
        return f"RSS {mb(self.rss):.1f} MB, PSS {pss}"


def read_memory(pid: int) -> Memory:
    """VmRSS and VmHWM from /proc/PID/status, Pss from /proc/PID/smaps_rollup."""
    status = _kib_fields(Path(f"/proc/{pid}/status"))
    if "VmRSS" not in status:
        raise BenchmarkError(f"no VmRSS for pid {pid}: has it exited?")
    try:
        pss: int | None = _kib_fields(Path(f"/proc/{pid}/smaps_rollup")).get("Pss")
    except OSError:
        pss = None
    return Memory(rss=status["VmRSS"], peak_rss=status.get("VmHWM", status["VmRSS"]), pss=pss)


def _kib_fields(path: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in path.read_text().splitlines():
        name, sep, value = line.partition(":")
        parts = value.split()
        if sep and len(parts) == 2 and parts[1] == "kB":
            out[name.strip()] = int(parts[0])
    return out


def idle_process_memory(ws: Workspace, code: str) -> Memory:
    """The memory of ``python -c code`` once it prints ``ready`` (then it is ended)."""
    proc = ws.popen([PYTHON, "-c", code], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != b"ready":
            raise BenchmarkError(f"baseline {code!r} exited with {proc.wait(5)} before ready")
        return read_memory(proc.pid)
    finally:
        terminate(proc, grace=2.0)


# -- a hub ------------------------------------------------------------------------------
class BenchHub:
    """A hub folder with recipes to deploy and a real agent process."""

    def __init__(self, ws: Workspace) -> None:
        self.ws = ws
        base = ws.folder()
        self.root = base / "h"
        self.recipes = base / "r"
        self.artifacts = base / "a"
        for folder in (self.root, self.recipes, self.artifacts):
            folder.mkdir()
        self.stderr = base / "agent.stderr"
        self.proc: subprocess.Popen[bytes] | None = None
        self.client = ControlClient(self.root, timeout=TIMEOUT)

    def component(self, name: str, run: str, artifacts: dict[str, bytes] | None = None) -> None:
        """Write the recipe (and artifacts) of a Run-only component, version 1.0.0."""
        manifest: dict[str, Any] = {"Platform": {"os": "linux"}, "Lifecycle": {"Run": run}}
        if artifacts:
            folder = self.artifacts / name / "1.0.0"
            folder.mkdir(parents=True)
            for file, data in artifacts.items():
                (folder / file).write_bytes(data)
            manifest["Artifacts"] = [{"URI": f"s3://bench/{name}/1.0.0/{f}"} for f in artifacts]
        recipe = {
            "RecipeFormatVersion": "2020-01-25",
            "ComponentName": name,
            "ComponentVersion": "1.0.0",
            "Manifests": [manifest],
        }
        (self.recipes / f"{name}-1.0.0.json").write_text(json.dumps(recipe))

    def start(self) -> float:
        """Start the agent; returns the ``time.perf_counter()`` just before Popen."""
        if self.proc is not None and self.proc.poll() is None:
            raise BenchmarkError("the agent is already running")
        self.client.close()
        with self.stderr.open("ab") as err:
            started = time.perf_counter()
            self.proc = self.ws.popen(
                [
                    PYTHON,
                    "-m",
                    "edgeloop.edge.agent",
                    "--root",
                    str(self.root),
                    "--thing-name",
                    "bench-hub",
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        return started

    def poll_until(self, op: str, done: Callable[[Any], bool], **args: Any) -> tuple[float, Any]:
        """Call ``op`` every POLL seconds until ``done(result)``; returns when, and the result.

        Before the agent listens, a refused connection counts as not done yet.
        """
        deadline = time.perf_counter() + TIMEOUT
        while True:
            try:
                result = self.client.call(op, **args)
            except AgentError:
                self.client.close()
                result = None
            else:
                if done(result):
                    return time.perf_counter(), result
            if self.proc is not None and self.proc.poll() is not None:
                raise BenchmarkError(f"the agent exited with {self.proc.returncode}{self._tail()}")
            if time.perf_counter() > deadline:
                raise BenchmarkError(
                    f"{op!r} not done within {TIMEOUT:g} s: {result}{self._tail()}"
                )
            time.sleep(POLL)

    def wait_answer(self) -> float:
        """Wait until the agent answers ``status``; returns when."""
        return self.poll_until("status", lambda _: True)[0]

    def wait_all_running(self, count: int) -> float:
        """Wait until ``count`` components are listed and every one is RUNNING."""

        def all_running(components: list[dict[str, Any]]) -> bool:
            return len(components) == count and all(c["state"] == "RUNNING" for c in components)

        return self.poll_until("components", all_running)[0]

    def deploy(self, names: list[str]) -> tuple[float, dict[str, Any]]:
        """Deploy ``names`` at 1.0.0; returns seconds from request to SUCCEEDED, and the record."""
        started = time.perf_counter()
        record = self.client.call(
            "deploy",
            recipeDir=str(self.recipes),
            artifactDir=str(self.artifacts),
            merge=dict.fromkeys(names, "1.0.0"),
        )
        ended, final = self.poll_until(
            "deployment",
            lambda rec: rec["status"] in ("SUCCEEDED", "FAILED", "CANCELED"),
            id=record["deploymentId"],
        )
        if final["status"] != "SUCCEEDED":
            raise BenchmarkError(
                f"deployment {final['status']}: {final.get('failureCause')}{self._tail()}"
            )
        return ended - started, final

    @property
    def pid(self) -> int:
        """The running agent's pid."""
        if self.proc is None or self.proc.poll() is not None:
            raise BenchmarkError("the agent is not running")
        return self.proc.pid

    def stop(self) -> float:
        """SIGTERM the agent (it stops its components) and wait; SIGKILL as a last resort.

        Returns the seconds from SIGTERM until the agent exited.
        """
        self.client.close()
        began = time.perf_counter()
        if self.proc is not None:
            terminate(self.proc, grace=TIMEOUT)
            if self.proc.returncode not in (0, -signal.SIGTERM):
                raise BenchmarkError(f"the agent exited with {self.proc.returncode}{self._tail()}")
        elapsed = time.perf_counter() - began
        kill_components(self.root.parent)
        return elapsed

    def _tail(self) -> str:
        try:
            lines = self.stderr.read_text(errors="replace").splitlines()[-8:]
        except OSError:
            return ""
        return ("\nagent stderr:\n  " + "\n  ".join(lines)) if lines else ""


# -- the benchmarks ---------------------------------------------------------------------
def bench_memory_and_start(ws: Workspace, out: SuiteResult) -> None:
    """Agent memory with 5 RUNNING components, then restart timing on the same hub."""
    hub = BenchHub(ws)
    names = [f"bench.Loop{i}" for i in range(RUNNING_COMPONENTS)]
    for name in names:
        hub.component(name, LOOP)
    hub.start()
    hub.wait_answer()
    hub.deploy(names)
    hub.wait_all_running(RUNNING_COMPONENTS)
    time.sleep(SETTLE)
    agent = read_memory(hub.pid)
    hub.stop()

    # Measured with no agent alive, so the PSS of each is not shared with the others.
    bare = idle_process_memory(ws, BARE_SLEEP)
    imports = idle_process_memory(ws, AGENT_IMPORTS)
    out.results += [
        Result(
            benchmark=f"agent memory, {RUNNING_COMPONENTS} components RUNNING, "
            f"{SETTLE:g} s after the deployment settled",
            measured=agent.describe(),
            value=mb(agent.rss),
            target=MEMORY_TARGET,
            comparison=f"+{mb(agent.rss - bare.rss):.1f} MB RSS over the bare interpreter, "
            f"+{mb(agent.rss - imports.rss):.1f} MB over the agent's imports alone",
        ),
        Result(
            benchmark="agent peak memory during start and deployment (VmHWM)",
            measured=f"RSS {mb(agent.peak_rss):.1f} MB",
            comparison="context; the target is the settled figure",
        ),
        Result(
            benchmark="baseline: bare interpreter, idle (python -c 'import time; time.sleep(…)')",
            measured=bare.describe(),
        ),
        Result(
            benchmark="baseline: the agent's imports, idle "
            "(python -c 'import asyncio, edgeloop.edge.agent')",
            measured=imports.describe(),
        ),
    ]

    # The baselines are timed between the agent's runs, not after them all, so that what
    # else the machine is doing weighs on both sides of the comparison alike.
    cold_env = dict(os.environ) if "PYTHONDONTWRITEBYTECODE" in os.environ else None
    timings: dict[str, list[float]] = {}
    for _ in range(RUNS):
        began = hub.start()
        timings.setdefault("answer", []).append(hub.wait_answer() - began)
        timings.setdefault("start", []).append(hub.wait_all_running(RUNNING_COMPONENTS) - began)
        timings.setdefault("stop", []).append(hub.stop())
        timings.setdefault("bare", []).append(_time_once(ws.env, "pass"))
        timings.setdefault("import", []).append(_time_once(ws.env, "import edgeloop.edge.agent"))
        if cold_env is not None:
            timings.setdefault("cold", []).append(
                _time_once(cold_env, "import edgeloop.edge.agent")
            )
    linger = Samples(values=[zombie_linger_time(ws) for _ in range(RUNS)])
    start, answer, stop, bare_runs, import_runs = (
        Samples(values=timings[key]) for key in ("start", "answer", "stop", "bare", "import")
    )
    out.results += [
        Result(
            benchmark=f"agent start until all {RUNNING_COMPONENTS} components RUNNING "
            f"(hub already deployed; Popen to the `components` reply)",
            measured=start.describe("ms"),
            value=start.max,
            target=START_TARGET,
            comparison=f"control socket first answers after {answer.describe('ms')}",
        ),
        Result(
            benchmark=f"agent stop, SIGTERM until exit ({RUNNING_COMPONENTS} components stopped)",
            measured=stop.describe("ms"),
            comparison="the agent waits until each component's process group is gone, "
            "zombies included: see the next row",
        ),
        Result(
            benchmark="baseline: a component-like process group (sh -c 'while …; do sleep 1; "
            "done') after SIGTERM, until no member is left",
            measured=linger.describe("ms"),
            comparison="its orphaned sleep stays a zombie until PID 1 reaps it",
        ),
        Result(
            benchmark="baseline: interpreter start and exit (python -c pass)",
            measured=bare_runs.describe("ms"),
        ),
        Result(
            benchmark="baseline: import the agent and exit "
            "(python -c 'import edgeloop.edge.agent')",
            measured=import_runs.describe("ms"),
        ),
    ]
    if cold_env is not None:
        # The shell this ran from keeps Python from caching bytecode: show what that costs.
        cold = Samples(values=timings["cold"])
        out.results.append(
            Result(
                benchmark="baseline: the same import with this shell's PYTHONDONTWRITEBYTECODE "
                "(edgeloop compiled from source each time)",
                measured=cold.describe("ms"),
                comparison="every start pays this where no .pyc cache exists",
            )
        )


def _time_once(env: dict[str, str], code: str) -> float:
    """Wall time of ``python -c code``, from spawn to exit."""
    began = time.perf_counter()
    done = subprocess.run([PYTHON, "-c", code], env=env, stdin=subprocess.DEVNULL, check=False)
    elapsed = time.perf_counter() - began
    if done.returncode != 0:
        raise BenchmarkError(f"python -c {code!r} exited with {done.returncode}")
    return elapsed


def bench_deployment(ws: Workspace, out: SuiteResult) -> None:
    """A local deployment of 3 small components on fresh hubs, request to SUCCEEDED."""
    window = float(_defaults()["health_window"])
    names = [f"bench.Small{i}" for i in range(DEPLOYED_COMPONENTS)]
    totals: list[float] = []
    recorded: list[float] = []
    for _ in range(RUNS):
        hub = BenchHub(ws)  # no agent.json: the hub runs on AgentSettings' defaults
        for i, name in enumerate(names):
            hub.component(
                name,
                "test -s {artifacts:path}/data.bin && " + LOOP,
                artifacts={"data.bin": os.urandom(4096 * (i + 1))},
            )
        hub.start()
        hub.wait_answer()
        elapsed, record = hub.deploy(names)
        totals.append(elapsed)
        recorded.append(record["updatedAt"] - record["createdAt"])
        hub.stop()
    total = Samples(values=totals)
    overhead = Samples(values=[t - window for t in totals])
    agent_view = Samples(values=recorded)
    out.results += [
        Result(
            benchmark=f"local deployment of {DEPLOYED_COMPONENTS} components with small "
            f"artifacts, request to SUCCEEDED (fresh hub, health window {window:g} s)",
            measured=total.describe("s"),
            value=total.max,
            target=DEPLOY_TARGET,
            comparison=f"agent's own record (createdAt→updatedAt): {agent_view.describe('s')}",
        ),
        Result(
            benchmark=f"deployment overhead: the above minus the {window:g} s health window",
            measured=overhead.describe("s"),
            comparison="what the runtime itself adds: prepare, stage, start, poll",
        ),
    ]
    out.notes.append(
        f"The deployment time includes the health window ({window:g} s, "
        "AgentSettings.health_window's default): a deployment succeeds only after every "
        "component it touched stayed RUNNING that long, so it is a floor, not overhead."
    )


def run(out: SuiteResult) -> None:
    """Run the edge runtime benchmarks, adding rows to ``out`` as they complete."""
    with Workspace() as ws:
        _progress("warming the bytecode cache")
        _time_once(ws.env, "import edgeloop.edge.agent")
        _progress("agent memory and start-up")
        bench_memory_and_start(ws, out)
        _progress("local deployments")
        bench_deployment(ws, out)
    out.notes += [
        "Verdicts on timed rows use the max of the runs, not the median.",
        f"Timings poll the control socket every {POLL * 1000:g} ms; baselines run "
        f"{PYTHON}, the interpreter the agent runs on. Every child process uses a warm "
        "bytecode cache (PYTHONPYCACHEPREFIX in the run's temporary folder), as an "
        "installed hub has.",
        "RSS is VmRSS from /proc/PID/status; PSS (from /proc/PID/smaps_rollup) splits shared "
        "pages among the processes mapping them, this benchmark's own interpreter included.",
        "Published figures to compare with (not measured here): the Greengrass nucleus "
        "(Java) needs at least 96 MB of RAM; Greengrass nucleus lite (C) is documented as "
        "using under 15 MB (earlier versions of its page said under 5 MB).",
    ]


def _progress(what: str) -> None:
    print(f"  edge: {what} ...", file=sys.stderr, flush=True)


__all__ = ["run"]
