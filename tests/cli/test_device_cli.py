"""`edgeloop device …` as a user runs it: the console script, a real agent, real output."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.edge.conftest import Hub, pid_alive

EDGELOOP = Path(sys.executable).parent / "edgeloop"
EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "components"
# exec: one process per component, so a stop does not wait for an orphaned child's zombie
# to be reaped (slow under some init processes, e.g. in micro-VMs).
LOOP = "exec sleep 600"
TICKER = (
    "exec python3 -u -c 'import itertools, time\n"
    "for i in itertools.count(1):\n"
    '    print("tick", i); time.sleep(0.1)\''
)
SUCCEEDED = re.compile(r"^deployment [0-9a-f-]{36} SUCCEEDED in \d+\.\d\d s \(SUCCESSFUL\)$")


def _env(edgeloop_root: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    for key in ("EDGELOOP_ROOT", "FORCE_COLOR", "TTY_COMPATIBLE"):
        env.pop(key, None)
    env["NO_COLOR"] = "1"
    env["COLUMNS"] = "300"  # rich wraps at 80 columns when it is not on a terminal
    if edgeloop_root is not None:
        env["EDGELOOP_ROOT"] = str(edgeloop_root)
    return env


def edgeloop(
    *args: str | Path, root: Path | None = None, env_root: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the console script; ``root`` becomes ``--root``."""
    argv = [str(EDGELOOP), *map(str, args)]
    if root is not None:
        argv += ["--root", str(root)]
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=90, env=_env(env_root), check=False
    )


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The single ``error: …`` line a failing command prints, checked for shape."""
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def json_out(result: subprocess.CompletedProcess[str]) -> Any:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_console_script_is_installed() -> None:
    assert EDGELOOP.exists(), "pip install -e . should have installed the edgeloop script"
    result = edgeloop("version")
    assert result.returncode == 0
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*\n", result.stdout)


# -- status, components, deployments -------------------------------------------------
def test_status_components_and_deployments_of_an_empty_hub(hub: Hub) -> None:
    assert hub.proc is not None
    status = json_out(edgeloop("device", "status", "--json", root=hub.root))
    assert status["pid"] == hub.proc.pid
    assert status["thingName"] == "test-hub"
    assert status["root"] == str(hub.root.resolve())
    assert status["deploymentId"] is None
    assert status["roots"] == {}
    assert status["components"] == {}
    assert json_out(edgeloop("device", "components", "--json", root=hub.root)) == []
    assert json_out(edgeloop("device", "deployments", "--json", root=hub.root)) == []

    human = edgeloop("device", "status", root=hub.root)
    assert human.returncode == 0
    assert f"hub test-hub at {hub.root.resolve()}" in human.stdout
    assert f"pid {hub.proc.pid}" in human.stdout
    assert "deployment (none yet)" in human.stdout
    assert "components: none" in human.stdout


def test_deploy_the_examples_with_merge_and_inline_configuration(hub: Hub) -> None:
    update = {"com.example.FlakySensor": {"MERGE": {"crashEverySeconds": 0}}}
    result = edgeloop(
        "device",
        "deploy",
        "--recipe-dir",
        EXAMPLES / "recipes",
        "--artifact-dir",
        EXAMPLES / "artifacts",
        "--merge",
        "com.example.FlakySensor=1.0.0",
        "--update-config",
        json.dumps(update),
        root=hub.root,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert len(lines) == 1 and SUCCEEDED.match(lines[0]), result.stdout
    deployment_id = lines[0].split()[1]

    comps = {
        c["name"]: c for c in json_out(edgeloop("device", "components", "--json", root=hub.root))
    }
    assert set(comps) == {"com.example.FlakySensor", "com.example.Heartbeat"}
    sensor, beat = comps["com.example.FlakySensor"], comps["com.example.Heartbeat"]
    assert sensor["state"] == beat["state"] == "RUNNING"
    assert sensor["root"] is True and beat["root"] is False  # pulled in as a dependency
    assert sensor["configuration"] == {"crashEverySeconds": 0}
    assert beat["configuration"] == {"intervalSeconds": 1, "message": "hub alive"}
    assert pid_alive(sensor["pid"]) and pid_alive(beat["pid"])

    status = json_out(edgeloop("device", "status", "--json", root=hub.root))
    assert status["deploymentId"] == deployment_id
    assert status["roots"] == {"com.example.FlakySensor": "1.0.0"}
    assert status["components"] == {"RUNNING": 2}

    history = json_out(edgeloop("device", "deployments", "--json", root=hub.root))
    assert [d["deploymentId"] for d in history] == [deployment_id]
    assert history[0]["status"] == "SUCCEEDED"
    assert history[0]["request"]["merge"] == {"com.example.FlakySensor": "1.0.0"}
    one = json_out(edgeloop("device", "deployments", deployment_id, "--json", root=hub.root))
    assert one["deploymentId"] == deployment_id

    table = edgeloop("device", "components", root=hub.root)
    assert table.returncode == 0
    assert "com.example.FlakySensor" in table.stdout
    assert "RUNNING" in table.stdout


def test_deploy_with_configuration_from_a_file(hub: Hub, tmp_path: Path) -> None:
    config = tmp_path / "update.json"
    config.write_text(
        json.dumps(
            {"com.example.Heartbeat": {"MERGE": {"message": "from a file", "intervalSeconds": 0.2}}}
        )
    )
    result = edgeloop(
        "device",
        "deploy",
        "--recipe-dir",
        EXAMPLES / "recipes",
        "--artifact-dir",
        EXAMPLES / "artifacts",
        "--merge",
        "com.example.Heartbeat=1.0.0",
        "--update-config",
        f"@{config}",
        root=hub.root,
    )
    assert result.returncode == 0, result.stderr
    assert SUCCEEDED.match(result.stdout.strip()), result.stdout
    beat = hub.components()["com.example.Heartbeat"]
    assert beat["configuration"] == {"intervalSeconds": 0.2, "message": "from a file"}
    deadline = time.monotonic() + 10
    while "test-hub: from a file (beat 2)" not in hub.log("com.example.Heartbeat"):
        assert time.monotonic() < deadline, hub.log("com.example.Heartbeat")
        time.sleep(0.05)


def test_a_failing_deploy_exits_1_and_prints_the_cause(hub: Hub, tmp_path: Path) -> None:
    recipes = tmp_path / "bad-recipes"
    recipes.mkdir()
    (recipes / "broken.json").write_text(
        json.dumps(
            {
                "RecipeFormatVersion": "2020-01-25",
                "ComponentName": "com.example.Broken",
                "ComponentVersion": "1.0.0",
                "Manifests": [
                    {
                        "Platform": {"os": "linux"},
                        "Lifecycle": {"Run": "echo 'no sensor attached' >&2; exit 3"},
                    }
                ],
            }
        )
    )
    result = edgeloop(
        "device", "deploy", "--recipe-dir", recipes, "--merge", "com.example.Broken=1.0.0",
        root=hub.root,
    )  # fmt: skip
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert re.match(
        r"^deployment [0-9a-f-]{36} FAILED in \d+\.\d\d s \(FAILED_ROLLBACK_COMPLETE\)$",
        result.stdout.strip(),
    ), result.stdout
    assert "com.example.Broken 1.0.0 went ERRORED" in result.stderr
    assert "exited with code 3" in result.stderr
    assert "no sensor attached" in result.stderr
    assert hub.components() == {}  # rolled back to the empty hub


def test_a_configuration_update_of_the_wrong_shape_is_one_error_line(hub: Hub) -> None:
    result = edgeloop(
        "device", "deploy", "--update-config", '{"com.example.X": {"MERGE": 5}}', root=hub.root
    )
    line = one_error_line(result)
    assert "--update-config" in line
    assert "com.example.X" in line
    assert json_out(edgeloop("device", "deployments", "--json", root=hub.root)) == []


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--merge", "badformat"], "error: --merge: 'badformat' is not NAME=VERSION"),
        (["--merge", "=1.0.0"], "error: --merge: '=1.0.0' is not NAME=VERSION"),
        (["--merge", "com.example.A="], "error: --merge: 'com.example.A=' is not NAME=VERSION"),
        (["--update-config", "{not json"], "error: --update-config: not valid JSON"),
        (
            ["--update-config", "@/nonexistent/update.json"],
            "error: /nonexistent/update.json: cannot read it: No such file or directory",
        ),
    ],
)
def test_bad_deploy_arguments_are_one_error_line(
    tmp_path: Path, args: list[str], expected: str
) -> None:
    # No agent: the arguments are checked before the CLI even tries to reach one.
    result = edgeloop("device", "deploy", *args, root=tmp_path / "hub")
    assert one_error_line(result).startswith(expected)
    assert result.stdout == ""


# -- without an agent ----------------------------------------------------------------
@pytest.mark.parametrize(
    "args",
    [
        ["status", "--json"],
        ["components"],
        ["deployments", "some-id"],
        ["deploy", "--merge", "com.example.A=1.0.0"],
        ["restart", "com.example.A"],
        ["stop", "com.example.A"],
    ],
    ids=lambda args: "-".join(a.strip("-") for a in args),
)
def test_every_command_without_an_agent_says_how_to_start_one(
    tmp_path: Path, args: list[str]
) -> None:
    root = tmp_path / "hub"
    result = edgeloop("device", *args, root=root)
    assert one_error_line(result) == (
        f"error: no agent is running for the hub at {root} "
        f"(start one with: edgeloop device run --root {root})"
    )
    assert result.stdout == ""


def test_edgeloop_root_is_used_when_root_is_not_given(hub: Hub, tmp_path: Path) -> None:
    assert hub.proc is not None
    status = json_out(edgeloop("device", "status", "--json", env_root=hub.root))
    assert status["pid"] == hub.proc.pid
    assert status["root"] == str(hub.root.resolve())
    # An explicit --root wins over the environment.
    other = tmp_path / "other"
    line = one_error_line(edgeloop("device", "status", root=other, env_root=hub.root))
    assert f"hub at {other} " in line
    # And an environment pointing at no agent says which folder it tried.
    empty = tmp_path / "empty"
    line = one_error_line(edgeloop("device", "components", env_root=empty))
    assert f"edgeloop device run --root {empty}" in line


# -- logs ----------------------------------------------------------------------------
def _deploy(hub: Hub, name: str, run: str) -> None:
    hub.component(name, lifecycle={"Run": run})
    record = hub.deploy(merge={name: "1.0.0"})
    assert record["status"] == "SUCCEEDED", record["failureCause"]


def _wait_log(hub: Hub, name: str, text: str) -> None:
    deadline = time.monotonic() + 10
    while text not in hub.log(name):
        assert time.monotonic() < deadline, hub.log(name)
        time.sleep(0.05)


def test_logs_prints_the_components_lines(hub: Hub) -> None:
    _deploy(hub, "com.example.Talker", f"echo 'line one'; echo 'line two' >&2; {LOOP}")
    _wait_log(hub, "com.example.Talker", "line two")

    result = edgeloop("device", "logs", "com.example.Talker", root=hub.root)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any(line.endswith("[stdout] line one") for line in lines)
    assert any(line.endswith("[stderr] line two") for line in lines)
    assert any("[edgeloop] state INSTALLED -> RUNNING" in line for line in lines)

    last = edgeloop("device", "logs", "com.example.Talker", "-n", "1", root=hub.root)
    assert last.stdout.splitlines() == lines[-1:]

    agent = edgeloop("device", "logs", "edgeloop", root=hub.root)
    assert agent.returncode == 0
    assert "edgeloop agent" in agent.stdout
    assert "running for test-hub" in agent.stdout


def test_logs_of_an_unknown_component_lists_the_logs_there_are(hub: Hub) -> None:
    _deploy(hub, "com.example.Talker", f"echo hi; {LOOP}")
    result = edgeloop("device", "logs", "com.example.Nope", root=hub.root)
    assert one_error_line(result) == (
        f"error: no log for 'com.example.Nope' under {hub.root / 'logs'} "
        "(logs: com.example.Talker, edgeloop)"
    )


def test_logs_of_an_empty_folder_says_there_are_none(tmp_path: Path) -> None:
    result = edgeloop("device", "logs", "com.example.Nope", root=tmp_path)
    assert one_error_line(result).endswith("(logs: none)")


def test_logs_follow_shows_lines_appended_after_it_started(hub: Hub) -> None:
    _deploy(hub, "com.example.Ticker", TICKER)
    _wait_log(hub, "com.example.Ticker", "tick 2")
    proc = subprocess.Popen(
        [
            str(EDGELOOP),
            "device",
            "logs",
            "com.example.Ticker",
            "-f",
            "-n",
            "1",
            "--root",
            hub.root,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        first = lines.get(timeout=15)
        assert first is not None and "[stdout] tick " in first, first
        shown = int(first.rsplit(" ", 1)[1])
        deadline = time.monotonic() + 10
        newer = None
        while newer is None:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            assert line is not None, "logs --follow ended by itself"
            if "[stdout] tick " in line and int(line.rsplit(" ", 1)[1]) > shown:
                newer = line
        assert proc.poll() is None  # still following
    finally:
        proc.send_signal(signal.SIGINT)  # what Ctrl-C does
        try:
            code = proc.wait(10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
            reader.join(5)
    assert proc.stderr is not None
    err = proc.stderr.read()
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()
    assert code == 0, err  # Ctrl-C ends --follow quietly
    assert "Traceback" not in err


# -- restart and stop ----------------------------------------------------------------
def test_restart_and_stop_a_component(hub: Hub) -> None:
    _deploy(hub, "com.example.Svc", LOOP)
    old_pid = hub.components()["com.example.Svc"]["pid"]

    result = edgeloop("device", "restart", "com.example.Svc", root=hub.root)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("com.example.Svc: ")
    comps = hub.wait_for(
        lambda c: (
            c["com.example.Svc"]["state"] == "RUNNING"
            and c["com.example.Svc"]["pid"] not in (None, old_pid)
        )
    )
    assert not pid_alive(old_pid)
    new_pid = comps["com.example.Svc"]["pid"]

    result = edgeloop("device", "stop", "com.example.Svc", root=hub.root)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "com.example.Svc: FINISHED"
    assert not pid_alive(new_pid)
    assert hub.components()["com.example.Svc"]["pid"] is None


def test_restart_or_stop_of_an_unknown_component_names_the_ones_there_are(hub: Hub) -> None:
    _deploy(hub, "com.example.Svc", LOOP)
    for command in ("restart", "stop"):
        result = edgeloop("device", command, "com.example.Nope", root=hub.root)
        assert one_error_line(result) == (
            "error: no component 'com.example.Nope' on this hub (components: com.example.Svc)"
        )
    assert hub.components()["com.example.Svc"]["state"] == "RUNNING"


def test_stopping_a_stopped_component_again_is_harmless(hub: Hub) -> None:
    _deploy(hub, "com.example.Svc", LOOP)
    assert edgeloop("device", "stop", "com.example.Svc", root=hub.root).returncode == 0
    again = edgeloop("device", "stop", "com.example.Svc", root=hub.root)
    assert again.stderr == ""
    assert again.returncode == 0
    assert again.stdout.strip() == "com.example.Svc: FINISHED"


def test_removing_a_component_whose_run_finished(hub: Hub) -> None:
    _deploy(hub, "com.example.Once", "echo done")
    hub.wait_for(lambda c: c["com.example.Once"]["state"] == "FINISHED")
    result = edgeloop("device", "deploy", "--remove", "com.example.Once", root=hub.root)
    assert result.returncode == 0, result.stderr
    assert SUCCEEDED.match(result.stdout.strip())
    assert hub.components() == {}
