"""The hub agent with real child processes: supervision, deployments, rollback, recovery."""

from __future__ import annotations

import io
import itertools
import json
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

from tests.edge.conftest import FAST_RESTARTS, Hub, pid_alive

LOOP = "while true; do sleep 0.2; done"


def test_runs_a_component_with_greengrass_variables_and_environment(hub: Hub) -> None:
    hub.component(
        "com.example.Env",
        lifecycle={
            "Setenv": {"GREETING": "{configuration:/greeting}"},
            "Run": {
                "Script": "env > {work:path}/env.txt; "
                "echo '{artifacts:path}|{kernel:rootPath}|{iot:thingName}|"
                "{configuration:/nested/value}|{print $1}' > vars.txt; " + LOOP,
                "Setenv": {"STEP_ONLY": "yes"},
            },
        },
        config={"greeting": "hello", "nested": {"value": 42}},
        artifacts={"tool.sh": b"echo tool\n"},
    )
    record = hub.deploy(merge={"com.example.Env": "1.0.0"})
    assert record["status"] == "SUCCEEDED", record["failureCause"]
    comps = hub.components()
    assert comps["com.example.Env"]["state"] == "RUNNING"
    assert pid_alive(comps["com.example.Env"]["pid"])

    work = hub.root / "work" / "com.example.Env"
    env = dict(
        line.split("=", 1) for line in (work / "env.txt").read_text().splitlines() if "=" in line
    )
    assert env["AWS_IOT_THING_NAME"] == "test-hub"
    assert env["GREETING"] == "hello"
    assert env["STEP_ONLY"] == "yes"
    assert len(env["SVCUID"]) >= 16
    assert env["AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH_FOR_COMPONENT"] == str(
        hub.root / "ipc.socket"
    )
    artifacts_path, root, thing, value, awk = (work / "vars.txt").read_text().strip().split("|")
    assert Path(artifacts_path, "tool.sh").read_bytes() == b"echo tool\n"
    assert root == str(hub.root)
    assert thing == "test-hub"
    assert value == "42"
    assert awk == "{print $1}"  # not a recipe variable: left alone


def test_crash_restarts_with_backoff_then_broken_then_retried(
    hub_factory: Callable[..., Hub],
) -> None:
    # Delays far above process start-up jitter, so "the backoff grows" is not a coin toss.
    hub = hub_factory(restart={**FAST_RESTARTS, "base_delay": 0.25, "max_delay": 2.0})
    hub.start()
    flag = hub.root.parent / "crash"
    stamps = hub.root.parent / "starts.txt"
    hub.component(
        "com.example.Crashy",
        lifecycle={
            "Run": f"date +%s.%N >> {stamps}; "
            f"if [ -e {flag} ]; then echo 'fatal: sensor gone' >&2; exit 7; fi; {LOOP}"
        },
    )
    assert hub.deploy(merge={"com.example.Crashy": "1.0.0"})["status"] == "SUCCEEDED"
    flag.touch()
    hub.call("restart", name="com.example.Crashy")

    comps = hub.wait_for(lambda c: c["com.example.Crashy"]["state"] == "BROKEN", timeout=20)
    broken = comps["com.example.Crashy"]
    assert broken["lastError"]["exitCode"] == 7
    assert "fatal: sensor gone" in "\n".join(broken["lastError"]["logTail"])
    assert "crash loop" in broken["note"]
    starts = [float(x) for x in stamps.read_text().split()]
    gaps = [b - a for a, b in itertools.pairwise(starts[1:])]
    assert len(gaps) >= 2 and gaps[-1] > gaps[0]  # backoff grows

    # BROKEN is not a dead end: after the cool-off it is tried again and recovers.
    flag.unlink()
    comps = hub.wait_for(lambda c: c["com.example.Crashy"]["state"] == "RUNNING", timeout=20)
    assert comps["com.example.Crashy"]["restarts"] >= 3


def test_hard_dependency_starts_first_and_its_restart_restarts_dependents(hub: Hub) -> None:
    order = hub.root.parent / "order.txt"
    hub.component(
        "com.example.Base",
        lifecycle={"Startup": f"sleep 0.4; echo base >> {order}", "Shutdown": "true"},
    )
    hub.component(
        "com.example.App",
        lifecycle={"Run": f"echo app >> {order}; {LOOP}"},
        deps={"com.example.Base": {"VersionRequirement": "^1.0.0"}},
    )
    hub.component(
        "com.example.Slow",
        lifecycle={"Install": "sleep 2", "Run": LOOP},
    )
    hub.component(
        "com.example.Soft",
        lifecycle={"Run": f"echo soft >> {order}; {LOOP}"},
        deps={"com.example.Slow": {"VersionRequirement": "*", "DependencyType": "SOFT"}},
    )
    record = hub.deploy(merge={"com.example.App": "1.0.0", "com.example.Soft": "1.0.0"})
    assert record["status"] == "SUCCEEDED", record["failureCause"]
    lines = order.read_text().split()
    assert lines.index("base") < lines.index("app")
    assert lines.index("soft") < 2  # the SOFT dependency's slow install did not block it

    app_pid = hub.components()["com.example.App"]["pid"]
    hub.call("restart", name="com.example.Base")
    comps = hub.wait_for(
        lambda c: (
            c["com.example.App"]["state"] == "RUNNING"
            and c["com.example.App"]["pid"] not in (None, app_pid)
        )
    )
    assert not pid_alive(app_pid)
    assert comps["com.example.Base"]["state"] == "RUNNING"


def test_failing_deployment_rolls_back_versions_and_configuration(hub: Hub) -> None:
    hub.component("com.example.Svc", "1.0.0", lifecycle={"Run": LOOP}, config={"level": 1})
    assert hub.deploy(merge={"com.example.Svc": "1.0.0"})["status"] == "SUCCEEDED"
    before = hub.components()["com.example.Svc"]

    hub.component(
        "com.example.Svc",
        "2.0.0",
        lifecycle={"Run": "echo 'cannot open /dev/sensor' >&2; exit 3"},
        config={"level": 1},
    )
    record = hub.deploy(
        merge={"com.example.Svc": "2.0.0"},
        updateConfig={"com.example.Svc": {"MERGE": {"level": 2}}},
    )
    assert record["status"] == "FAILED"
    assert record["detailedStatus"] == "FAILED_ROLLBACK_COMPLETE"
    assert "com.example.Svc 2.0.0 went ERRORED" in record["failureCause"]
    assert "exited with code 3" in record["failureCause"]
    assert "cannot open /dev/sensor" in record["failureCause"]

    after = hub.components()["com.example.Svc"]
    assert after["version"] == "1.0.0"
    assert after["state"] == "RUNNING"
    assert after["configuration"] == {"level": 1}
    assert after["pid"] != before["pid"] and pid_alive(after["pid"])  # v1 started again
    status = hub.call("status")
    assert status["roots"] == {"com.example.Svc": "1.0.0"}


def test_do_nothing_leaves_the_failed_version_in_place(hub: Hub) -> None:
    hub.component("com.example.Svc", "1.0.0", lifecycle={"Run": LOOP})
    assert hub.deploy(merge={"com.example.Svc": "1.0.0"})["status"] == "SUCCEEDED"
    hub.component("com.example.Svc", "1.1.0", lifecycle={"Run": "exit 1"})
    record = hub.deploy(merge={"com.example.Svc": "1.1.0"}, failureHandling="DO_NOTHING")
    assert record["detailedStatus"] == "FAILED_ROLLBACK_NOT_REQUESTED"
    assert hub.components()["com.example.Svc"]["version"] == "1.1.0"


def test_agent_kill9_recovers_last_successful_deployment(hub: Hub) -> None:
    hub.component("com.example.Keep", lifecycle={"Run": LOOP}, config={"mode": "a"})
    record = hub.deploy(
        merge={"com.example.Keep": "1.0.0"},
        updateConfig={"com.example.Keep": {"MERGE": {"mode": "b"}}},
    )
    assert record["status"] == "SUCCEEDED"
    old_pid = hub.components()["com.example.Keep"]["pid"]
    hub.kill9()
    assert pid_alive(old_pid)  # orphaned until the agent comes back ...
    hub.start()
    comps = hub.wait_for(lambda c: c["com.example.Keep"]["state"] == "RUNNING")
    assert not pid_alive(old_pid)  # ... which ends what its predecessor left
    assert comps["com.example.Keep"]["configuration"] == {"mode": "b"}
    assert comps["com.example.Keep"]["pid"] != old_pid


def test_agent_killed_during_a_deployment_comes_back_on_the_last_good_one(hub: Hub) -> None:
    hub.component("com.example.Svc", "1.0.0", lifecycle={"Run": LOOP})
    assert hub.deploy(merge={"com.example.Svc": "1.0.0"})["status"] == "SUCCEEDED"
    hub.component("com.example.Svc", "2.0.0", lifecycle={"Startup": "sleep 30"})
    record = hub.deploy(merge={"com.example.Svc": "2.0.0"}, wait=False)
    hub.wait_for(lambda c: c["com.example.Svc"]["version"] == "2.0.0")
    hub.kill9()
    hub.start()
    comps = hub.wait_for(lambda c: c["com.example.Svc"]["state"] == "RUNNING")
    assert comps["com.example.Svc"]["version"] == "1.0.0"
    interrupted = hub.call("deployment", id=record["deploymentId"])
    assert interrupted["status"] == "FAILED"
    assert "agent stopped" in interrupted["failureCause"]


def test_install_runs_once_per_version(hub: Hub) -> None:
    count = hub.root.parent / "installs.txt"
    for version in ("1.0.0", "1.0.1"):
        hub.component(
            "com.example.Inst",
            version,
            lifecycle={"Install": f"echo {version} >> {count}", "Run": LOOP},
        )
    assert hub.deploy(merge={"com.example.Inst": "1.0.0"})["status"] == "SUCCEEDED"
    hub.call("restart", name="com.example.Inst")
    hub.wait_for(lambda c: c["com.example.Inst"]["state"] == "RUNNING")
    assert count.read_text().split() == ["1.0.0"]
    assert hub.deploy(merge={"com.example.Inst": "1.0.1"})["status"] == "SUCCEEDED"
    assert count.read_text().split() == ["1.0.0", "1.0.1"]


def test_stop_runs_shutdown_then_terms_then_kills_the_whole_group(hub: Hub) -> None:
    marker = hub.root.parent / "shutdown.txt"
    hub.component(
        "com.example.Stubborn",
        lifecycle={
            # The script and a child both ignore SIGTERM: only SIGKILL ends them.
            "Run": "trap '' TERM; (trap '' TERM; while true; do sleep 0.1; done) & "
            "while true; do sleep 0.1; done",
            "Shutdown": f"echo shutdown >> {marker}",
        },
    )
    assert hub.deploy(merge={"com.example.Stubborn": "1.0.0"})["status"] == "SUCCEEDED"
    pid = hub.components()["com.example.Stubborn"]["pid"]
    children = [
        int(p.name)
        for p in Path("/proc").iterdir()
        if p.name.isdigit() and _pgid(int(p.name)) == pid
    ]
    assert len(children) >= 2
    started = time.monotonic()
    result = hub.call("stop", name="com.example.Stubborn")
    assert result["state"] == "FINISHED"
    assert time.monotonic() - started >= 1.5  # waited the grace period before SIGKILL
    assert marker.read_text().strip() == "shutdown"
    assert not any(pid_alive(p) for p in children)


def test_startup_timeout_is_an_error(hub: Hub) -> None:
    hub.component("com.example.Hang", lifecycle={"Startup": {"Script": "sleep 30", "Timeout": 0.5}})
    record = hub.deploy(merge={"com.example.Hang": "1.0.0"})
    assert record["status"] == "FAILED"
    assert "startup timed out" in record["failureCause"]
    assert "com.example.Hang" not in hub.components()


def test_digest_mismatch_changes_nothing(hub: Hub) -> None:
    hub.component("com.example.Art", artifacts={"app.bin": b"real bytes"})
    recipe_file = hub.recipes / "com.example.Art-1.0.0.json"
    recipe = json.loads(recipe_file.read_text())
    recipe["Manifests"][0]["Artifacts"][0]["Digest"] = (
        "n4bQgYhMfWWaL+qgxVrQFaO/TxsrC4Is0V1sFbDwCgg="
    )
    recipe["Manifests"][0]["Artifacts"][0]["Algorithm"] = "SHA-256"
    recipe_file.write_text(json.dumps(recipe))
    record = hub.deploy(merge={"com.example.Art": "1.0.0"})
    assert record["status"] == "FAILED"
    assert record["detailedStatus"] == "FAILED_NO_STATE_CHANGE"
    assert "s3://bucket/com.example.Art/1.0.0/app.bin" in record["failureCause"]
    assert hub.components() == {}
    assert not (hub.root / "packages" / "recipes" / "com.example.Art@1.0.0.json").exists()


def test_zip_path_traversal_is_refused(hub: Hub) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("ok.txt", "fine")
        zf.writestr("../../escape.txt", "gotcha")
    hub.component("com.example.Zip", artifacts={"bundle.zip": buf.getvalue()})
    recipe_file = hub.recipes / "com.example.Zip-1.0.0.json"
    recipe = json.loads(recipe_file.read_text())
    recipe["Manifests"][0]["Artifacts"][0]["Unarchive"] = "ZIP"
    recipe_file.write_text(json.dumps(recipe))
    record = hub.deploy(merge={"com.example.Zip": "1.0.0"})
    assert record["status"] == "FAILED"
    assert "escape.txt" in record["failureCause"]
    assert not list(hub.root.parent.rglob("escape.txt"))


def test_resolution_conflict_names_the_clash(hub: Hub) -> None:
    hub.component("com.example.Lib", "1.0.0", lifecycle={"Run": LOOP})
    hub.component("com.example.Lib", "2.0.0", lifecycle={"Run": LOOP})
    hub.component(
        "com.example.Old",
        lifecycle={"Run": LOOP},
        deps={"com.example.Lib": {"VersionRequirement": "<2.0.0"}},
    )
    hub.component(
        "com.example.New",
        lifecycle={"Run": LOOP},
        deps={"com.example.Lib": {"VersionRequirement": ">=2.0.0"}},
    )
    record = hub.deploy(merge={"com.example.Old": "1.0.0", "com.example.New": "1.0.0"})
    assert record["status"] == "FAILED"
    cause = record["failureCause"]
    for text in ("com.example.Lib", "<2.0.0", ">=2.0.0", "com.example.Old", "com.example.New"):
        assert text in cause
    assert hub.components() == {}


def test_a_recipe_written_for_greengrass_deploys(hub: Hub) -> None:
    (hub.recipes / "hello.yaml").write_text(
        """---
recipeFormatVersion: '2020-01-25'
componentName: com.example.HelloWorld
componentVersion: '1.0.0'
componentDescription: My first AWS IoT Greengrass component.
componentPublisher: Amazon
componentConfiguration:
  defaultConfiguration:
    Message: world
componentDependencies:
  aws.greengrass.Nucleus:
    versionRequirement: '>=2.0.0 <2.20.0'
    dependencyType: SOFT
manifests:
  - platform:
      os: linux
    lifecycle:
      run: python3 -u {artifacts:path}/hello_world.py '{configuration:/Message}'
    artifacts:
      - uri: s3://DOC-EXAMPLE-BUCKET/artifacts/com.example.HelloWorld/1.0.0/hello_world.py
"""
    )
    folder = hub.artifacts / "com.example.HelloWorld" / "1.0.0"
    folder.mkdir(parents=True)
    (folder / "hello_world.py").write_text(
        "import sys, time\nprint(f'Hello, {sys.argv[1]}!', flush=True)\ntime.sleep(60)\n"
    )
    record = hub.deploy(merge={"com.example.HelloWorld": "1.0.0"})
    assert record["status"] == "SUCCEEDED", record["failureCause"]
    deadline = time.monotonic() + 10
    while "Hello, world!" not in hub.log("com.example.HelloWorld"):
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_remove_stops_the_component(hub: Hub) -> None:
    hub.component("com.example.Gone", lifecycle={"Run": LOOP})
    assert hub.deploy(merge={"com.example.Gone": "1.0.0"})["status"] == "SUCCEEDED"
    pid = hub.components()["com.example.Gone"]["pid"]
    assert hub.deploy(remove=["com.example.Gone"])["status"] == "SUCCEEDED"
    assert hub.components() == {}
    assert not pid_alive(pid)


def _pgid(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[2])
    except (OSError, IndexError, ValueError):
        return None


def test_configuration_merge_and_reset_across_deployments(hub: Hub) -> None:
    hub.component(
        "com.example.Cfg",
        lifecycle={"Run": LOOP},
        config={"interval": 5, "sensors": {"temp": True, "hum": False}, "name": "x"},
    )
    update = {"MERGE": {"interval": 1, "sensors": {"hum": True}, "extra": [1, 2]}}
    record = hub.deploy(
        merge={"com.example.Cfg": "1.0.0"}, updateConfig={"com.example.Cfg": update}
    )
    assert record["status"] == "SUCCEEDED"
    assert hub.components()["com.example.Cfg"]["configuration"] == {
        "interval": 1,
        "sensors": {"temp": True, "hum": True},
        "name": "x",
        "extra": [1, 2],
    }
    pid = hub.components()["com.example.Cfg"]["pid"]
    reset = {"RESET": ["/interval", "/extra"], "MERGE": {"name": "y"}}
    assert hub.deploy(updateConfig={"com.example.Cfg": reset})["status"] == "SUCCEEDED"
    comps = hub.components()
    assert comps["com.example.Cfg"]["configuration"] == {
        "interval": 5,
        "sensors": {"temp": True, "hum": True},
        "name": "y",
    }
    # Its scripts do not interpolate configuration, so it was not restarted for it.
    assert comps["com.example.Cfg"]["pid"] == pid


def test_a_deployment_leaves_unrelated_components_running(hub: Hub) -> None:
    hub.component("com.example.A", lifecycle={"Run": LOOP})
    hub.component("com.example.B", lifecycle={"Run": LOOP})
    assert hub.deploy(merge={"com.example.A": "1.0.0"})["status"] == "SUCCEEDED"
    pid = hub.components()["com.example.A"]["pid"]
    assert hub.deploy(merge={"com.example.B": "1.0.0"})["status"] == "SUCCEEDED"
    comps = hub.components()
    assert comps["com.example.A"]["pid"] == pid
    assert comps["com.example.B"]["state"] == "RUNNING"


def test_bootstrap_restart_request_is_recorded_not_obeyed(hub: Hub) -> None:
    hub.component("com.example.Boot", lifecycle={"Bootstrap": "exit 100", "Run": LOOP})
    record = hub.deploy(merge={"com.example.Boot": "1.0.0"})
    assert record["status"] == "SUCCEEDED", record["failureCause"]
    assert "restart of the runtime" in hub.log("com.example.Boot")
