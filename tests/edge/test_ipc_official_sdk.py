"""Greengrass IPC end to end: real components on a real agent, using the official SDK client.

Every component here is a small Python script run by the venv's interpreter. It talks to
the agent with ``awsiot.greengrasscoreipc`` (V1 ``connect()`` or ``GreengrassCoreIPCClientV2``)
exactly as a component on AWS IoT Greengrass would, and writes what it observes as JSON
lines to files under the test's tmp folder; the test polls those files with a deadline.
Tests that need the test to drive a component step by step use "go" files it creates.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.edge.conftest import Hub, pid_alive

PUBSUB = "aws.greengrass.ipc.pubsub"
LIFECYCLE = "aws.greengrass.ipc.lifecycle"
CLI = "aws.greengrass.Cli"
SHADOW = "aws.greengrass.ShadowManager"

Records = list[dict[str, Any]]

# Put at the top of every component script.
PRELUDE = """\
import json, os, sys, time
from awsiot.greengrasscoreipc.clientv2 import GreengrassCoreIPCClientV2
from awsiot.greengrasscoreipc.model import BinaryMessage, JsonMessage, PublishMessage


def emit(path, **record):
    # One JSON line per observation, written whole so a reader never sees half a record.
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\\n")


def wait_for_file(path, timeout=30):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise SystemExit(f"{path} never appeared")
        time.sleep(0.01)


def idle():
    while True:
        time.sleep(1)


"""


# -- helpers -------------------------------------------------------------------------------
def python_component(
    hub: Hub,
    name: str,
    script: str,
    *args: object,
    version: str = "1.0.0",
    config: dict[str, Any] | None = None,
    step: str = "Run",
    background: bool = False,
    exec_: bool = False,
) -> None:
    """A component whose ``step`` runs ``script`` with the venv's Python.

    ``exec_`` replaces the step's shell with Python, so the component's pid is Python's.
    """
    command = (
        ("exec " if exec_ else "")
        + f"{sys.executable} -u {{artifacts:path}}/main.py "
        + " ".join(shlex.quote(str(a)) for a in args)
    )
    if background:
        command += " &"
    hub.component(
        name,
        version,
        lifecycle={step: command},
        config=config,
        artifacts={"main.py": (PRELUDE + script).encode()},
    )


def access(service: str, operations: list[str], resources: list[str]) -> dict[str, Any]:
    """An ``accessControl`` configuration with one policy."""
    policy = {"policyDescription": "test", "operations": operations, "resources": resources}
    return {"accessControl": {service: {f"test:{service}:1": policy}}}


def records(path: Path) -> Records:
    """The complete JSON lines written so far."""
    if not path.exists():
        return []
    lines = path.read_text().split("\n")[:-1]  # the last piece may be a line being written
    return [json.loads(line) for line in lines if line.strip()]


def wait_records(
    path: Path,
    predicate: Callable[[Records], bool],
    *,
    hub: Hub,
    name: str,
    timeout: float = 15,
) -> Records:
    """Poll ``path`` until ``predicate`` holds of its records; on timeout show why."""
    deadline = time.monotonic() + timeout
    while True:
        found = records(path)
        if predicate(found):
            return found
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{path.name}: condition not met within {timeout} s; records: {found}\n"
                f"{name} log:\n{hub.log(name)}\nagent log tail:\n{agent_log(hub)[-3000:]}"
            )
        time.sleep(0.02)


def has(key: str) -> Callable[[Records], bool]:
    """A predicate: some record has ``key``."""
    return lambda recs: any(key in r for r in recs)


def first(recs: Records, key: str) -> Any:
    """The value of ``key`` in the first record that has it."""
    return next(r[key] for r in recs if key in r)


def agent_log(hub: Hub) -> str:
    """The agent's own log."""
    path = hub.root / "logs" / "edgeloop.log"
    return path.read_text() if path.exists() else ""


def deployed(hub: Hub, **request: Any) -> dict[str, Any]:
    """Deploy and insist that it succeeded."""
    record = hub.deploy(**request)
    assert record["status"] == "SUCCEEDED", record["failureCause"]
    return record


# -- 1. publish/subscribe ------------------------------------------------------------------
SUBSCRIBER = """
mode, topic_filter, out = sys.argv[1:4]


def record(event):
    if event.json_message is not None:
        emit(out, topic=event.json_message.context.topic, json=event.json_message.message)
    else:
        message = event.binary_message
        emit(out, topic=message.context.topic, binary=message.message.hex())


def on_error(error):
    emit(out, error=repr(error))
    return False


if mode == "v1":
    import awsiot.greengrasscoreipc
    from awsiot.greengrasscoreipc.client import SubscribeToTopicStreamHandler
    from awsiot.greengrasscoreipc.model import SubscribeToTopicRequest

    class Handler(SubscribeToTopicStreamHandler):
        def on_stream_event(self, event):
            record(event)

        def on_stream_error(self, error):
            return on_error(error)

        def on_stream_closed(self):
            emit(out, closed=True)

    client = awsiot.greengrasscoreipc.connect()
    operation = client.new_subscribe_to_topic(Handler())
    operation.activate(SubscribeToTopicRequest(topic=topic_filter)).result(10)
    operation.get_response().result(10)
else:
    # executor=None: handlers run on the SDK's own thread, in the order messages arrive (its
    # default thread pool would run them concurrently and record them in any order).
    client = GreengrassCoreIPCClientV2(executor=None)
    client.subscribe_to_topic(topic=topic_filter, on_stream_event=record, on_stream_error=on_error)
emit(out, ready=True)
idle()
"""

PUBLISHER = """
mode, prefix, go, out = sys.argv[1:5]
wait_for_file(go)
messages = [
    # Not under the subscribers' filters: must reach nobody.
    (f"elsewhere/{mode}", PublishMessage(json_message=JsonMessage(message={"lost": True}))),
    (
        f"{prefix}/{mode}/json",
        PublishMessage(json_message=JsonMessage(message={"from": mode, "n": [1, 2.5, None]})),
    ),
    (
        f"{prefix}/{mode}/bin",
        PublishMessage(binary_message=BinaryMessage(message=b"\\x00\\xff" + mode.encode())),
    ),
]
if mode == "v1":
    import awsiot.greengrasscoreipc
    from awsiot.greengrasscoreipc.model import PublishToTopicRequest

    client = awsiot.greengrasscoreipc.connect()
    for topic, message in messages:
        operation = client.new_publish_to_topic()
        operation.activate(PublishToTopicRequest(topic=topic, publish_message=message)).result(10)
        operation.get_response().result(10)
else:
    client = GreengrassCoreIPCClientV2()
    for topic, message in messages:
        client.publish_to_topic(topic=topic, publish_message=message)
emit(out, published=len(messages))
idle()
"""


def test_publish_subscribe_json_and_binary_with_v1_and_v2_clients(hub: Hub) -> None:
    tmp = hub.root.parent
    prefix = f"plant/{uuid.uuid4().hex[:8]}"
    go = tmp / "go"
    everything = access(
        PUBSUB, ["aws.greengrass#PublishToTopic", "aws.greengrass#SubscribeToTopic"], ["*"]
    )
    # One subscriber per client kind, each on a different wildcard filter.
    subscribers = {
        "com.example.SubV1": ("v1", f"{prefix}/#"),
        "com.example.SubV2": ("v2", f"{prefix}/+/+"),
    }
    for name, (mode, topic_filter) in subscribers.items():
        python_component(hub, name, SUBSCRIBER, mode, topic_filter, tmp / name, config=everything)
    for mode in ("v1", "v2"):
        name = f"com.example.Pub{mode.upper()}"
        python_component(hub, name, PUBLISHER, mode, prefix, go, tmp / name, config=everything)
    names = [*subscribers, "com.example.PubV1", "com.example.PubV2"]
    deployed(hub, merge=dict.fromkeys(names, "1.0.0"))
    for name in subscribers:
        wait_records(tmp / name, has("ready"), hub=hub, name=name)

    go.touch()
    expected = [
        {"topic": f"{prefix}/v1/json", "json": {"from": "v1", "n": [1, 2.5, None]}},
        {"topic": f"{prefix}/v1/bin", "binary": (b"\x00\xffv1").hex()},
        {"topic": f"{prefix}/v2/json", "json": {"from": "v2", "n": [1, 2.5, None]}},
        {"topic": f"{prefix}/v2/bin", "binary": (b"\x00\xffv2").hex()},
    ]
    for name in subscribers:
        recs = wait_records(
            tmp / name,
            lambda recs: sum("topic" in r for r in recs) >= 4,
            hub=hub,
            name=name,
        )
        got = [r for r in recs if "topic" in r or "error" in r]
        assert sorted(got, key=json.dumps) == sorted(expected, key=json.dumps), name
        # One publisher's messages arrive in the order it published them.
        for mode in ("v1", "v2"):
            mine = [r["topic"] for r in got if r["topic"].startswith(f"{prefix}/{mode}/")]
            assert mine == [f"{prefix}/{mode}/json", f"{prefix}/{mode}/bin"]
    for mode in ("v1", "v2"):
        name = f"com.example.Pub{mode.upper()}"
        assert first(records(tmp / name), "published") == 3


# -- 2. configuration ----------------------------------------------------------------------
CONFIGURED = """
from datetime import datetime, timezone

other, out = sys.argv[1:3]
client = GreengrassCoreIPCClientV2()
emit(out, whole=client.get_configuration().value)
emit(out, leaf=client.get_configuration(key_path=["nested", "level"]).value)
response = client.get_configuration(component_name=other)
emit(out, other=response.value, otherName=response.component_name)


def on_update(event):
    update = event.configuration_update_event
    emit(out, event={"componentName": update.component_name, "keyPath": update.key_path})


client.subscribe_to_configuration_update(on_stream_event=on_update)
client.update_configuration(
    key_path=["nested"], timestamp=datetime.now(timezone.utc), value_to_merge={"mine": True}
)
emit(out, updated=True)
idle()
"""


def test_configuration_get_update_own_and_subscribe_to_deployment_changes(hub: Hub) -> None:
    tmp = hub.root.parent
    name, other = "com.example.Configured", "com.example.Other"
    out = tmp / "configured"
    python_component(
        hub, name, CONFIGURED, other, out, config={"greeting": "hello", "nested": {"level": 1}}
    )
    hub.component(other, lifecycle={"Run": "while true; do sleep 0.2; done"}, config={"pin": 7})
    deployed(hub, merge={name: "1.0.0", other: "1.0.0"})

    recs = wait_records(out, has("updated"), hub=hub, name=name)
    assert first(recs, "whole") == {"greeting": "hello", "nested": {"level": 1}}
    assert first(recs, "leaf") == {"level": 1}  # a leaf comes back under its own key
    assert first(recs, "other") == {"pin": 7}  # reading another component's is allowed
    assert first(recs, "otherName") == other
    comps = hub.components()
    assert comps[name]["configuration"] == {
        "greeting": "hello",
        "nested": {"level": 1, "mine": True},
    }
    # UpdateConfiguration has no componentName: it can only ever change the caller's own.
    assert comps[other]["configuration"] == {"pin": 7}
    pid = comps[name]["pid"]

    deployed(
        hub,
        merge={name: "1.0.0"},
        updateConfig={name: {"MERGE": {"greeting": "bonjour"}}},
    )
    events = wait_records(
        out,
        lambda recs: (
            {"componentName": name, "keyPath": ["greeting"]} in [r.get("event") for r in recs]
        ),
        hub=hub,
        name=name,
    )
    seen = [r["event"] for r in events if "event" in r]
    assert {"componentName": name, "keyPath": ["nested", "mine"]} in seen  # its own update
    after = hub.components()[name]
    assert after["pid"] == pid  # a configuration change alone does not restart it
    assert after["configuration"] == {
        "greeting": "bonjour",
        "nested": {"level": 1, "mine": True},
    }


# -- 3. UpdateState ------------------------------------------------------------------------
REPORTS_RUNNING = """
out = sys.argv[1]
client = GreengrassCoreIPCClientV2()
client.update_state(state="RUNNING")
emit(out, reported="RUNNING", pid=os.getpid())
idle()
"""

REPORTS_ERRORED_ONCE = """
out, trigger, marker = sys.argv[1:4]
emit(out, started=os.getpid())
client = GreengrassCoreIPCClientV2()
if os.path.exists(marker):
    client.update_state(state="RUNNING")
    emit(out, reported="RUNNING")
else:
    wait_for_file(trigger)
    open(marker, "w").close()
    emit(out, reporting="ERRORED")  # before the call: the agent may end us before it returns
    client.update_state(state="ERRORED")
idle()
"""


def test_update_state_from_a_startup_background_process_and_errored_restarts(hub: Hub) -> None:
    tmp = hub.root.parent
    background, errs = "com.example.Background", "com.example.Flaky"
    bg_out, errs_out, trigger = tmp / "background", tmp / "flaky", tmp / "trigger"
    python_component(hub, background, REPORTS_RUNNING, bg_out, step="Startup", background=True)
    python_component(hub, errs, REPORTS_ERRORED_ONCE, errs_out, trigger, tmp / "marker")
    deployed(hub, merge={background: "1.0.0", errs: "1.0.0"})

    # The Startup script has exited; the process it left behind reports over IPC.
    recs = wait_records(bg_out, has("reported"), hub=hub, name=background)
    assert pid_alive(first(recs, "pid"))
    assert hub.components()[background]["state"] == "RUNNING"

    first_pid = first(wait_records(errs_out, has("started"), hub=hub, name=errs), "started")
    assert hub.components()[errs]["restarts"] == 0
    trigger.touch()
    comps = hub.wait_for(lambda c: c[errs]["restarts"] >= 1 and c[errs]["state"] == "RUNNING")
    recs = wait_records(errs_out, lambda recs: {"reported": "RUNNING"} in recs, hub=hub, name=errs)
    assert sum("started" in r for r in recs) == 2
    reports = [r.get("reporting") or r.get("reported") for r in recs if len(r.keys() - {"started"})]
    assert reports == ["ERRORED", "RUNNING"]
    deadline = time.monotonic() + 5
    while pid_alive(first_pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not pid_alive(first_pid)  # the instance that reported ERRORED was ended
    assert "ERRORED" in (comps[errs]["lastError"] or {}).get("reason", "")
    assert comps[background]["state"] == "RUNNING"


# -- 4. deferred update --------------------------------------------------------------------
DEFERS_ONCE = """
import queue

version, out, defer_ms = sys.argv[1], sys.argv[2], int(sys.argv[3])
events = queue.Queue()
client = GreengrassCoreIPCClientV2()
emit(out, started=version)
client.subscribe_to_component_updates(on_stream_event=events.put)
emit(out, ready=version)
deferred = False
while True:
    event = events.get()
    if event.pre_update_event is not None:
        deployment_id = event.pre_update_event.deployment_id
        emit(out, pre=deployment_id, version=version, at=time.time())
        if not deferred:
            deferred = True
            client.defer_component_update(
                deployment_id=deployment_id, message="finishing a batch", recheck_after_ms=defer_ms
            )
            emit(out, deferred=deployment_id, at=time.time())
    elif event.post_update_event is not None:
        emit(out, post=event.post_update_event.deployment_id)
"""


def test_component_defers_an_update_and_the_deployment_waits(hub: Hub) -> None:
    tmp = hub.root.parent
    name, out = "com.example.Batch", tmp / "batch"
    for version in ("1.0.0", "2.0.0"):
        python_component(hub, name, DEFERS_ONCE, version, out, 1500, version=version)
    deployed(hub, merge={name: "1.0.0"})
    wait_records(out, lambda recs: {"ready": "1.0.0"} in recs, hub=hub, name=name)

    started = time.monotonic()
    record = deployed(hub, merge={name: "2.0.0"})
    took = time.monotonic() - started
    assert took >= 1.5, f"the deployment did not wait for the deferral ({took:.2f} s)"
    recs = wait_records(out, lambda recs: {"ready": "2.0.0"} in recs, hub=hub, name=name)
    assert first(recs, "pre") == record["deploymentId"]
    assert first(recs, "deferred") == record["deploymentId"]
    asked_again = [r for r in recs if r.get("pre") == record["deploymentId"]]
    assert len(asked_again) >= 2  # asked again after the recheck time, then let go
    assert asked_again[1]["at"] - first([r for r in recs if "deferred" in r], "at") >= 1.3
    assert hub.components()[name]["version"] == "2.0.0"


# -- 4b. configuration validation ----------------------------------------------------------
VALIDATOR = """
from awsiot.greengrasscoreipc.model import ConfigurationValidityReport

out = sys.argv[1]
client = GreengrassCoreIPCClientV2()


def on_event(event):
    update = event.validate_configuration_update_event
    level = update.configuration.get("level", 0)
    accepted = level <= 10
    emit(out, asked=update.deployment_id, level=level)
    report = ConfigurationValidityReport(
        status="ACCEPTED" if accepted else "REJECTED",
        deployment_id=update.deployment_id,
        message="" if accepted else f"level {level} is above the safe limit 10",
    )
    client.send_configuration_validity_report(configuration_validity_report=report)


client.subscribe_to_validate_configuration_updates(on_stream_event=on_event)
emit(out, ready=True)
idle()
"""


def test_a_deployment_waits_for_the_components_validity_report(hub: Hub) -> None:
    tmp = hub.root.parent
    name, out = "com.example.Guarded", tmp / "guarded"
    python_component(hub, name, VALIDATOR, out, config={"level": 1})
    deployed(hub, merge={name: "1.0.0"})
    wait_records(out, lambda recs: {"ready": True} in recs, hub=hub, name=name)

    # A short validation timeout: a silent component would let the deployment through.
    rejected = hub.deploy(updateConfig={name: {"MERGE": {"level": 20}}}, validationTimeout=5)
    assert rejected["status"] == "FAILED"
    assert rejected["detailedStatus"] == "FAILED_NO_STATE_CHANGE"
    assert "level 20 is above the safe limit 10" in rejected["failureCause"]
    assert hub.components()[name]["configuration"] == {"level": 1}

    accepted = deployed(hub, updateConfig={name: {"MERGE": {"level": 5}}})
    assert hub.components()[name]["configuration"] == {"level": 5}
    recs = wait_records(
        out,
        lambda recs: any(r.get("asked") == accepted["deploymentId"] for r in recs),
        hub=hub,
        name=name,
    )
    assert [r["level"] for r in recs if "asked" in r] == [20, 5]


# -- 5. pause and resume -------------------------------------------------------------------
COUNTER = """
out = sys.argv[1]
n = 0
while True:
    n += 1
    with open(out + ".tmp", "w") as f:
        f.write(str(n))
    os.replace(out + ".tmp", out)
    time.sleep(0.05)
"""

CONTROLLER = """
target, commands, out = sys.argv[1:4]
client = GreengrassCoreIPCClientV2()
emit(out, ready=True)
done = set()
while True:
    for command in ("pause", "resume"):
        if command not in done and os.path.exists(os.path.join(commands, command)):
            done.add(command)
            try:
                getattr(client, f"{command}_component")(component_name=target)
                emit(out, ok=command)
            except Exception as err:
                emit(out, failed=command, error=f"{type(err).__name__}: {err}")
    time.sleep(0.01)
"""


def test_a_component_pauses_and_resumes_another(hub: Hub) -> None:
    tmp = hub.root.parent
    counter, controller = "com.example.Counter", "com.example.Controller"
    count, commands, out = tmp / "count", tmp / "commands", tmp / "controller"
    commands.mkdir()
    python_component(hub, counter, COUNTER, count)
    policy = access(
        LIFECYCLE,
        ["aws.greengrass#PauseComponent", "aws.greengrass#ResumeComponent"],
        [counter],
    )
    python_component(hub, controller, CONTROLLER, counter, commands, out, config=policy)
    deployed(hub, merge={counter: "1.0.0", controller: "1.0.0"})
    wait_records(out, has("ready"), hub=hub, name=controller)

    def value() -> int:
        deadline = time.monotonic() + 10
        while not count.exists():
            assert time.monotonic() < deadline, hub.log(counter)
            time.sleep(0.02)
        return int(count.read_text())

    def advances(beyond: int) -> None:
        deadline = time.monotonic() + 5
        while value() <= beyond:
            assert time.monotonic() < deadline, f"counter stuck at {beyond}"
            time.sleep(0.02)

    advances(2)
    (commands / "pause").touch()
    wait_records(out, lambda recs: {"ok": "pause"} in recs, hub=hub, name=controller)
    time.sleep(0.15)  # a write already under way may still land
    frozen = value()
    time.sleep(0.5)  # ten ticks of the counter
    assert value() == frozen
    status = hub.components()[counter]
    assert status["paused"] is True
    assert status["state"] == "RUNNING"

    (commands / "resume").touch()
    wait_records(out, lambda recs: {"ok": "resume"} in recs, hub=hub, name=controller)
    advances(frozen + 3)
    assert hub.components()[counter]["paused"] is False
    assert not any("failed" in r for r in records(out))


# -- 6. unauthorized publish ---------------------------------------------------------------
PUBLISHES_TWICE = """
from awsiot.greengrasscoreipc.model import UnauthorizedError

out = sys.argv[1]
client = GreengrassCoreIPCClientV2()
message = PublishMessage(json_message=JsonMessage(message={"valve": "open"}))
client.publish_to_topic(topic="allowed/valves", publish_message=message)
emit(out, allowed=True)
try:
    client.publish_to_topic(topic="secret/valves", publish_message=message)
    emit(out, denied=False)
except UnauthorizedError as err:
    emit(out, denied=True, message=err.message)
"""


def test_unauthorized_publish_is_denied_and_logged(hub: Hub) -> None:
    tmp = hub.root.parent
    name, out = "com.example.Nosy", tmp / "nosy"
    policy = access(PUBSUB, ["aws.greengrass#PublishToTopic"], ["allowed/valves"])
    python_component(hub, name, PUBLISHES_TWICE, out, config=policy)
    deployed(hub, merge={name: "1.0.0"})

    recs = wait_records(out, has("denied"), hub=hub, name=name)
    assert first(recs, "allowed") is True
    assert first(recs, "denied") is True
    message = first(recs, "message")
    assert name in message and "secret/valves" in message and "PublishToTopic" in message
    denied = [line for line in agent_log(hub).splitlines() if "secret/valves" in line]
    assert denied, agent_log(hub)
    assert name in denied[0] and "PublishToTopic" in denied[0]
    assert not any("allowed/valves" in line for line in agent_log(hub).splitlines())


# -- 7. a wrong token ----------------------------------------------------------------------
WRONG_TOKEN_CLIENT = """
import sys

import awsiot.greengrasscoreipc
from awsiot.greengrasscoreipc.clientv2 import GreengrassCoreIPCClientV2

for attempt in range(int(sys.argv[1])):
    for label, make in (
        ("v1", lambda: awsiot.greengrasscoreipc.connect(timeout=5)),
        ("v2", GreengrassCoreIPCClientV2),
    ):
        try:
            make()
            print(label, "CONNECTED")
        except Exception as err:
            print(label, "REFUSED", type(err).__name__)
"""

GETS_CONFIGURATION = """
out = sys.argv[1]
emit(out, value=GreengrassCoreIPCClientV2().get_configuration().value)
idle()
"""


def connect_with_wrong_token(hub: Hub, attempts: int) -> list[str]:
    """Connect with both clients ``attempts`` times from a process that is no component."""
    env = {
        **os.environ,
        "SVCUID": "wrong",
        "AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH_FOR_COMPONENT": str(hub.root / "ipc.socket"),
    }
    result = subprocess.run(
        [sys.executable, "-c", WRONG_TOKEN_CLIENT, str(attempts)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = result.stdout.splitlines()
    assert len(lines) == 2 * attempts, result.stdout + result.stderr
    return lines


def test_a_process_with_a_wrong_token_is_refused(hub: Hub) -> None:
    outcomes = connect_with_wrong_token(hub, 1)
    assert [line.split()[:2] for line in outcomes] == [["v1", "REFUSED"], ["v2", "REFUSED"]]
    assert "refused a connection" in agent_log(hub)

    # The agent goes on serving the components it started.
    tmp = hub.root.parent
    name, out = "com.example.Honest", tmp / "honest"
    python_component(hub, name, GETS_CONFIGURATION, out, config={"ok": True})
    deployed(hub, merge={name: "1.0.0"})
    assert first(wait_records(out, has("value"), hub=hub, name=name), "value") == {"ok": True}


def test_a_wrong_token_is_reported_as_access_denied(hub: Hub) -> None:
    # The bug is a race the server loses about half the time: twenty tries make it show.
    outcomes = connect_with_wrong_token(hub, 10)
    assert set(outcomes) == {"v1 REFUSED AccessDeniedError", "v2 REFUSED AccessDeniedError"}


# -- 8. a subscriber killed mid-stream -----------------------------------------------------
STREAMER = """
topic, go, out = sys.argv[1:4]
wait_for_file(go)
client = GreengrassCoreIPCClientV2()
seq = 0
while True:
    seq += 1
    message = PublishMessage(json_message=JsonMessage(message={"seq": seq}))
    client.publish_to_topic(topic=topic, publish_message=message)
    if seq % 10 == 0:
        with open(out + ".tmp", "w") as f:
            f.write(str(seq))
        os.replace(out + ".tmp", out)
    time.sleep(0.01)
"""

STREAM_SUBSCRIBER = """
topic, out = sys.argv[1:3]
client = GreengrassCoreIPCClientV2()
received = open(out, "a")


def on_message(event):
    received.write(f"{event.json_message.message['seq']}\\n")
    received.flush()


client.subscribe_to_topic(topic=topic, on_stream_event=on_message)
emit(out + ".ready", pid=os.getpid())
idle()
"""


def seqs(path: Path) -> set[int]:
    """Sequence numbers a stream subscriber wrote."""
    if not path.exists():
        return set()
    return {int(x) for x in path.read_text().split("\n")[:-1] if x}


def test_killing_a_subscriber_mid_stream_leaves_the_others_receiving(hub: Hub) -> None:
    tmp = hub.root.parent
    topic = f"line/{uuid.uuid4().hex[:8]}/speed"
    go = tmp / "go"
    everything = access(
        PUBSUB, ["aws.greengrass#PublishToTopic", "aws.greengrass#SubscribeToTopic"], ["*"]
    )
    subscribers = ["com.example.SubA", "com.example.SubB", "com.example.SubC"]
    for name in subscribers:
        # exec: the pid the agent reports is the subscriber's own, so SIGKILL hits it.
        python_component(
            hub, name, STREAM_SUBSCRIBER, topic, tmp / name, config=everything, exec_=True
        )
    streamer = "com.example.Streamer"
    python_component(hub, streamer, STREAMER, topic, go, tmp / "published", config=everything)
    deployed(hub, merge=dict.fromkeys([*subscribers, streamer], "1.0.0"))
    ready = {
        name: first(
            wait_records(Path(f"{tmp / name}.ready"), has("pid"), hub=hub, name=name), "pid"
        )
        for name in subscribers
    }

    go.touch()

    def wait_seqs(name: str, at_least: int, timeout: float = 15) -> set[int]:
        deadline = time.monotonic() + timeout
        while True:
            got = seqs(tmp / name)
            if got and max(got) >= at_least:
                return got
            assert time.monotonic() < deadline, f"{name} got {len(got)}: {hub.log(name)}"
            time.sleep(0.02)

    for name in subscribers:
        wait_seqs(name, 20)
    victim = "com.example.SubB"
    assert hub.components()[victim]["pid"] == ready[victim]
    os.kill(ready[victim], signal.SIGKILL)
    at_kill = max(seqs(tmp / "com.example.SubA"))

    for name in ("com.example.SubA", "com.example.SubC"):
        got = wait_seqs(name, at_kill + 100)
        # Nothing lost around the kill: every message up to near the newest arrived.
        start, end = min(got), max(got) - 20
        missing = set(range(start, end)) - got
        assert not missing, f"{name} missed {sorted(missing)[:20]}"
    comps = hub.wait_for(lambda c: c[victim]["state"] == "RUNNING" and c[victim]["restarts"] >= 1)
    assert comps[streamer]["state"] == "RUNNING" and comps[streamer]["restarts"] == 0
    assert not pid_alive(ready[victim])
    # The restarted subscriber subscribes again and gets the stream from where it is now.
    before = max(seqs(tmp / victim))
    wait_seqs(victim, before + 50)
    assert "Traceback" not in agent_log(hub)


def test_a_killed_run_shell_is_noticed_while_its_child_lives_on(hub: Hub) -> None:
    name = "com.example.Shell"
    # dash does not exec the last command: the Run step's pid is the shell, sleep its child.
    hub.component(name, lifecycle={"Run": "sleep 60; echo unreachable"})
    deployed(hub, merge={name: "1.0.0"})
    os.kill(hub.components()[name]["pid"], signal.SIGKILL)
    hub.wait_for(lambda c: c[name]["restarts"] >= 1 and c[name]["pid"] is not None, timeout=4)


# -- 9. a thousand subscriptions -----------------------------------------------------------
FANOUT = """
import threading

topic, out, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
client = GreengrassCoreIPCClientV2()
hits = [0] * count
lock = threading.Lock()


def handler(i):
    def on_message(event):
        with lock:
            hits[i] += 1

    return on_message


started = time.monotonic()
for i in range(count):
    client.subscribe_to_topic(topic=topic, on_stream_event=handler(i))
emit(out, subscribed=count, seconds=time.monotonic() - started)
message = PublishMessage(json_message=JsonMessage(message={"hello": "everyone"}))
client.publish_to_topic(topic=topic, publish_message=message)
deadline = time.monotonic() + 20
while time.monotonic() < deadline and not all(hits):
    time.sleep(0.01)
time.sleep(0.2)  # time for any duplicate to show
emit(out, received=sum(1 for h in hits if h), total=sum(hits))
idle()
"""


def test_one_message_reaches_a_thousand_subscriptions(hub: Hub) -> None:
    tmp = hub.root.parent
    name, out = "com.example.Fanout", tmp / "fanout"
    everything = access(
        PUBSUB, ["aws.greengrass#PublishToTopic", "aws.greengrass#SubscribeToTopic"], ["*"]
    )
    topic = f"broadcast/{uuid.uuid4().hex[:8]}"
    python_component(hub, name, FANOUT, topic, out, 1000, config=everything)
    deployed(hub, merge={name: "1.0.0"})
    recs = wait_records(out, has("received"), hub=hub, name=name, timeout=40)
    assert first(recs, "subscribed") == 1000
    assert first(recs, "received") == 1000
    assert first(recs, "total") == 1000  # each exactly once


# -- 10. local deployments over IPC --------------------------------------------------------
DEPLOYER = """
target, version, recipes, artifacts, configuration, out = sys.argv[1:7]
client = GreengrassCoreIPCClientV2()
created = client.create_local_deployment(
    root_component_versions_to_add={target: version},
    component_to_configuration=json.loads(configuration) or None,
    recipe_directory_path=recipes,
    artifacts_directory_path=artifacts,
)
emit(out, created=created.deployment_id)
deadline = time.monotonic() + 30
while time.monotonic() < deadline:
    deployment = client.get_local_deployment_status(deployment_id=created.deployment_id).deployment
    if deployment.status in ("SUCCEEDED", "FAILED"):
        emit(out, status=deployment.status, id=deployment.deployment_id)
        break
    time.sleep(0.05)
idle()
"""


def cli_policy() -> dict[str, Any]:
    return access(
        CLI,
        ["aws.greengrass#CreateLocalDeployment", "aws.greengrass#GetLocalDeploymentStatus"],
        ["*"],
    )


def test_a_component_deploys_another_version_over_ipc(hub: Hub) -> None:
    tmp = hub.root.parent
    deployer, target, out = "com.example.Deployer", "com.example.Target", tmp / "deployer"
    loop = {"Run": "while true; do sleep 0.2; done"}
    hub.component(target, "1.0.0", lifecycle=loop)
    hub.component(target, "2.0.0", lifecycle=loop)
    python_component(
        hub,
        deployer,
        DEPLOYER,
        target,
        "2.0.0",
        hub.recipes,
        hub.artifacts,
        "{}",
        out,
        config=cli_policy(),
    )
    deployed(hub, merge={target: "1.0.0"})
    assert hub.components()[target]["version"] == "1.0.0"
    deployed(hub, merge={deployer: "1.0.0"})
    deployer_pid = hub.components()[deployer]["pid"]

    recs = wait_records(out, has("status"), hub=hub, name=deployer, timeout=30)
    assert first(recs, "status") == "SUCCEEDED"
    assert first(recs, "id") == first(recs, "created")
    comps = hub.components()
    assert comps[target]["version"] == "2.0.0" and comps[target]["state"] == "RUNNING"
    # A local deployment adds to the hub's roots: the caller itself stays, untouched.
    assert comps[deployer]["state"] == "RUNNING" and comps[deployer]["pid"] == deployer_pid
    assert hub.call("deployment", id=first(recs, "created"))["status"] == "SUCCEEDED"


def test_local_deployment_configuration_uses_merge_and_reset_keys(hub: Hub) -> None:
    tmp = hub.root.parent
    deployer, target, out = "com.example.Deployer", "com.example.Tuned", tmp / "deployer"
    hub.component(
        target, lifecycle={"Run": "while true; do sleep 0.2; done"}, config={"mode": "eco"}
    )
    configuration = json.dumps({target: {"MERGE": {"mode": "boost"}}})
    python_component(
        hub,
        deployer,
        DEPLOYER,
        target,
        "1.0.0",
        hub.recipes,
        hub.artifacts,
        configuration,
        out,
        config=cli_policy(),
    )
    deployed(hub, merge={deployer: "1.0.0"})
    recs = wait_records(out, has("status"), hub=hub, name=deployer, timeout=30)
    assert first(recs, "status") == "SUCCEEDED"
    assert hub.components()[target]["configuration"] == {"mode": "boost"}


# -- 11. shadows ---------------------------------------------------------------------------
SHADOWS = """
from awsiot.greengrasscoreipc.model import ResourceNotFoundError, UnauthorizedError

thing, out = sys.argv[1:3]
client = GreengrassCoreIPCClientV2()
document = {"state": {"reported": {"temperature": 21.5}, "desired": {"fan": "on"}}}
updated = client.update_thing_shadow(
    thing_name=thing, shadow_name="climate", payload=json.dumps(document).encode()
)
emit(out, updated=json.loads(updated.payload))
got = client.get_thing_shadow(thing_name=thing, shadow_name="climate")
emit(out, got=json.loads(got.payload))
try:
    client.get_thing_shadow(thing_name=thing, shadow_name="absent")
except ResourceNotFoundError as err:
    emit(out, absent=err.message)
try:
    client.get_thing_shadow(thing_name="someone-else", shadow_name="climate")
except UnauthorizedError as err:
    emit(out, unauthorized=err.message)
emit(out, done=True)
"""


def test_shadow_update_and_get_round_trip(hub: Hub) -> None:
    tmp = hub.root.parent
    name, out, thing = "com.example.Climate", tmp / "climate", "greenhouse-7"
    policy = access(
        SHADOW,
        ["aws.greengrass#GetThingShadow", "aws.greengrass#UpdateThingShadow"],
        [f"$aws/things/{thing}/shadow/name/*"],
    )
    python_component(hub, name, SHADOWS, thing, out, config=policy)
    deployed(hub, merge={name: "1.0.0"})
    recs = wait_records(out, has("done"), hub=hub, name=name)

    updated, got = first(recs, "updated"), first(recs, "got")
    assert updated["state"] == {"reported": {"temperature": 21.5}, "desired": {"fan": "on"}}
    assert updated["version"] == 1
    assert got["state"]["reported"] == {"temperature": 21.5}
    assert got["state"]["desired"] == {"fan": "on"}
    assert got["state"]["delta"] == {"fan": "on"}
    assert got["version"] == 1
    assert "absent" in first(recs, "absent")
    assert "someone-else" in first(recs, "unauthorized")
