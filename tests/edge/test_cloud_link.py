"""The hub's cloud link: settings, the reconciliation rule, and end to end a real cloud
(``RunningCloud``: API, Mosquitto with mutual TLS, shadow and connectivity services) with
real hub agent processes whose components use the official Greengrass IPC client."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from edgeloop.core.errors import CloudError, ValidationError
from edgeloop.edge.cloud_link import CloudLink, apply_patch, backoff, reconcile, state_patch
from edgeloop.edge.control import wait_for_agent
from edgeloop.edge.settings import AgentSettings, CloudConnection
from tests.cloud.test_cloud_up import RunningCloud, _device
from tests.edge.conftest import FAST_RESTARTS, Hub
from tests.edge.test_ipc_official_sdk import PRELUDE, SHADOW, records

MQTT_PROXY = "aws.greengrass.ipc.mqttproxy"


# -- the rule, pure ------------------------------------------------------------------------
def test_state_patch_turns_one_state_into_the_other() -> None:
    old = {"a": 1, "b": {"x": 1, "y": 2}, "gone": True, "list": [1, 2]}
    new = {"a": 1, "b": {"x": 1, "y": 3, "z": {"deep": 0}}, "list": [1], "fresh": "v"}
    patch = state_patch(old, new)
    assert patch == {"b": {"y": 3, "z": {"deep": 0}}, "gone": None, "list": [1], "fresh": "v"}
    assert apply_patch(old, patch) == new
    assert state_patch(new, new) == {}


def test_reported_comes_from_the_hub_and_desired_from_the_cloud() -> None:
    local = {"reported": {"temp": 21, "old": 1}, "desired": {"fan": "low"}}
    cloud = {"reported": {"temp": 19, "stale": 2}, "desired": {"fan": "high", "mode": "eco"}}
    plan = reconcile(local, cloud)
    assert plan.to_cloud == {"reported": {"temp": 21, "old": 1, "stale": None}}
    assert plan.to_local == {"desired": {"fan": "high", "mode": "eco"}}
    assert plan.discarded is None


def test_desired_changed_on_the_hub_is_pushed_unless_the_cloud_changed_too() -> None:
    local = {"desired": {"fan": "low"}}
    cloud = {"desired": {"fan": "high"}}
    pushed = reconcile(local, cloud, pending_desired={"fan": "low"}, cloud_changed=False)
    assert pushed.to_cloud == {"desired": {"fan": "low"}} and pushed.to_local == {}
    lost = reconcile(local, cloud, pending_desired={"fan": "low"}, cloud_changed=True)
    assert lost.to_cloud == {} and lost.to_local == {"desired": {"fan": "high"}}
    assert lost.discarded == {"fan": "low"}


def test_a_shadow_one_side_lacks_is_copied_whole() -> None:
    state = {"desired": {"a": 1}, "reported": {"b": 2}}
    assert reconcile(state, None).to_cloud == state
    assert reconcile(None, state).to_local == state
    assert reconcile(None, None).to_cloud == {}


def test_backoff_is_capped_and_jittered() -> None:
    assert backoff(1, 30, lambda: 0.0) == 0.5
    assert backoff(3, 30, lambda: 1.0) == 4.0
    assert backoff(50, 5, lambda: 0.0) == 2.5 and backoff(50, 5, lambda: 1.0) == 5.0


# -- settings ------------------------------------------------------------------------------
def _credentials(cloud: RunningCloud, folder: Path) -> tuple[str, dict[str, Any]]:
    thing, cert, key = _device(cloud, folder)
    mq = cloud.endpoints["mqtt"]
    return thing, {
        "endpoint": f"{mq['host']}:{mq['port']}",
        "cert": str(cert),
        "key": str(key),
        "ca": cloud.endpoints["caFile"],
    }


def test_settings_take_the_thing_name_from_the_certificate(
    cloud: RunningCloud, tmp_path: Path
) -> None:
    thing, conn = _credentials(cloud, tmp_path)
    (tmp_path / "agent.json").write_text(json.dumps({"cloud": {**conn, "queue_limit": 5}}))
    settings = AgentSettings.load(tmp_path)
    assert settings.thing_name == thing
    assert settings.cloud is not None and settings.cloud.queue_limit == 5
    assert settings.cloud.endpoint == conn["endpoint"]

    with pytest.raises(ValidationError) as err:
        AgentSettings.load(tmp_path, thing_name="someone-else")
    assert err.value.field == "cloud.cert" and thing in str(err.value)

    for bad, field in (
        ({**conn, "endpoint": "no-port"}, "cloud.endpoint"),
        ({**conn, "key": str(tmp_path / "missing.key")}, "cloud.key"),
        ({k: v for k, v in conn.items() if k != "ca"}, "cloud.ca"),
        ({**conn, "queue_limit": 0}, "cloud.queue_limit"),
        ({**conn, "colour": "blue"}, "cloud.colour"),
    ):
        (tmp_path / "agent.json").write_text(json.dumps({"cloud": bad}))
        with pytest.raises(ValidationError) as err:
            AgentSettings.load(tmp_path)
        assert err.value.field == field, bad


def test_device_run_flags_write_the_cloud_settings(cloud: RunningCloud, tmp_path: Path) -> None:
    from edgeloop.cli.device import _save_cloud_flags

    thing, conn = _credentials(cloud, tmp_path)
    root = tmp_path / "hub"
    _save_cloud_flags(
        root, conn["endpoint"], Path(conn["cert"]), Path(conn["key"]), Path(conn["ca"])
    )
    assert AgentSettings.load(root).thing_name == thing
    _save_cloud_flags(root, "127.0.0.1:1", None, None, None)  # override one key, keep the rest
    saved = json.loads((root / "agent.json").read_text())["cloud"]
    assert saved == {**conn, "endpoint": "127.0.0.1:1"}
    with pytest.raises(ValidationError, match=r"cloud\.endpoint"):
        _save_cloud_flags(root, "nonsense", None, None, None)


# -- end to end ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningCloud]:
    running = RunningCloud(tmp_path_factory.mktemp("cloud") / "data")
    yield running
    running.close()


class CloudHub(Hub):
    """A hub whose thing name comes from its certificate (no ``--thing-name``)."""

    def start(self, *, wait: bool = True) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edgeloop.edge.agent", "--root", str(self.root)],
            stdout=subprocess.DEVNULL,
            stderr=open(self.root / "agent.stderr", "ab"),  # noqa: SIM115
        )
        if wait:
            wait_for_agent(self.root, self.proc)

    def local_shadow(self, thing: str, name: str = "") -> dict[str, Any]:
        """The hub's stored copy of a shadow's state (``{}`` when there is none)."""
        folder = self.root / "state" / "shadows" / thing
        path = folder / "classic.json" if not name else folder / "named" / f"{name}.json"
        if not path.exists():
            return {}
        document = json.loads(path.read_text())["document"] or {}
        return dict(document.get("state") or {})


# A component that runs the commands the test appends to a file, one JSON line each.
DRIVER = """
commands, out = sys.argv[1:3]
client = GreengrassCoreIPCClientV2()
done = 0
emit(out, ready=True)
while True:
    lines = open(commands).read().split("\\n")[:-1] if os.path.exists(commands) else []
    for line in lines[done:]:
        done += 1
        cmd = json.loads(line)
        try:
            if cmd["op"] == "update":
                answer = client.update_thing_shadow(
                    thing_name=cmd["thing"],
                    shadow_name=cmd.get("shadow"),
                    payload=json.dumps(cmd["doc"]).encode(),
                )
                emit(out, id=cmd["id"], ok=json.loads(answer.payload))
            elif cmd["op"] == "publish":
                client.publish_to_iot_core(
                    topic_name=cmd["topic"], qos="1", payload=cmd["payload"].encode()
                )
                emit(out, id=cmd["id"], ok=True)
        except Exception as err:
            emit(out, id=cmd["id"], error=repr(err))
    time.sleep(0.02)
"""


class Driver:
    """Drives the DRIVER component of a hub."""

    def __init__(self, hub: CloudHub, thing: str) -> None:
        self.hub, self.thing = hub, thing
        self.commands, self.out = hub.root.parent / "commands", hub.root.parent / "out"
        policy = {
            "policyDescription": "test",
            "operations": ["aws.greengrass#UpdateThingShadow", "aws.greengrass#GetThingShadow"],
            "resources": [f"$aws/things/{thing}/shadow", f"$aws/things/{thing}/shadow/name/*"],
        }
        proxy = {
            "policyDescription": "test",
            "operations": ["aws.greengrass#PublishToIoTCore"],
            "resources": [f"edgeloop/things/{thing}/*"],
        }
        config = {
            "accessControl": {SHADOW: {"s:1": policy}, MQTT_PROXY: {"p:1": proxy}},
        }
        command = f"{sys.executable} -u {{artifacts:path}}/main.py {self.commands} {self.out}"
        hub.component(
            "com.example.Driver",
            lifecycle={"Run": command},
            config=config,
            artifacts={"main.py": (PRELUDE + DRIVER).encode()},
        )
        record = hub.deploy(merge={"com.example.Driver": "1.0.0"})
        assert record["status"] == "SUCCEEDED", record

    def run(self, op: str, **cmd: Any) -> Any:
        ident = uuid.uuid4().hex
        with self.commands.open("a") as f:
            f.write(json.dumps({"op": op, "id": ident, "thing": self.thing, **cmd}) + "\n")
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            for rec in records(self.out):
                if rec.get("id") == ident:
                    assert "error" not in rec, rec["error"]
                    return rec["ok"]
            time.sleep(0.02)
        raise AssertionError(
            f"{op} got no answer; driver log:\n{self.hub.log('com.example.Driver')}"
        )

    def update(self, doc: dict[str, Any], shadow: str | None = None) -> Any:
        return self.run("update", doc=doc, shadow=shadow)


def eventually(check: Callable[[], Any], what: str, timeout: float = 15) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not in {timeout} s: {what}")
        time.sleep(0.05)


@pytest.fixture
def cloud_hub(cloud: RunningCloud, tmp_path: Path) -> Iterator[tuple[CloudHub, str]]:
    thing, conn = _credentials(cloud, tmp_path)
    conn.update(sync_interval=1, reconnect_max=1, keepalive=5)
    settings = {
        "restart": dict(FAST_RESTARTS),
        "stop_grace": 2.0,
        "health_window": 0.3,
        "cloud": conn,
    }
    hub = CloudHub(tmp_path / "hub", settings)
    yield hub, thing
    hub.stop()


def _connected(cloud: RunningCloud, thing: str) -> bool | None:
    info = cloud.api.get(f"/things/{thing}").json()["connectivity"]
    return info["connected"] if info else None


def _cloud_state(cloud: RunningCloud, thing: str, name: str = "") -> dict[str, Any]:
    path = f"/things/{thing}/shadows/{name}" if name else f"/things/{thing}/shadow"
    answer = cloud.api.get(path)
    return dict(answer.json()["state"]) if answer.status_code == 200 else {}


def _service_client(cloud: RunningCloud, received: list[tuple[str, bytes]]) -> mqtt.Client:
    assert cloud.cloud.broker is not None
    login = cloud.cloud.broker.service_login
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=f"test-{uuid.uuid4().hex[:6]}",
        protocol=mqtt.MQTTv5,
    )
    client.username_pw_set(login.username, login.password)
    client.on_message = lambda c, u, m: received.append((m.topic, bytes(m.payload)))
    client.connect(login.host, login.port)
    client.loop_start()
    return client


def test_a_hub_goes_online_syncs_both_ways_publishes_and_goes_offline_on_kill(
    cloud: RunningCloud, cloud_hub: tuple[CloudHub, str]
) -> None:
    hub, thing = cloud_hub
    hub.start()
    eventually(lambda: _connected(cloud, thing) is True, "the hub is online in the registry")
    status = eventually(lambda: hub.call("status")["cloud"]["connected"] and hub.call("status"), "")
    assert status["thingName"] == thing and status["cloud"]["queued"] == 0
    driver = Driver(hub, thing)

    # hub -> cloud: reported values set through the hub's local shadows (classic and named)
    driver.update({"state": {"reported": {"temp": 21.5}}})
    driver.update({"state": {"reported": {"rpm": 900}}}, shadow="pump")
    eventually(
        lambda: _cloud_state(cloud, thing).get("reported") == {"temp": 21.5}, "classic reported"
    )
    eventually(
        lambda: _cloud_state(cloud, thing, "pump").get("reported") == {"rpm": 900},
        "named reported",
    )

    # cloud -> hub, over MQTT (as an AWS IoT app would): applied at once, never echoed back
    received: list[tuple[str, bytes]] = []
    service = _service_client(cloud, received)
    try:
        service.subscribe(f"edgeloop/things/{thing}/#", qos=1)
        service.subscribe(f"$aws/things/{thing}/shadow/name/pump/update/accepted", qos=1)
        time.sleep(0.3)
        request = {"state": {"desired": {"rpm": 1200}}, "clientToken": "app-1"}
        service.publish(f"$aws/things/{thing}/shadow/name/pump/update", json.dumps(request), 1)
        eventually(
            lambda: hub.local_shadow(thing, "pump").get("desired") == {"rpm": 1200},
            "desired over MQTT reaches the hub",
        )

        # cloud -> hub, over REST (no MQTT announcement): the periodic reconcile brings it
        cloud.api.post(f"/things/{thing}/shadow", json={"state": {"desired": {"temp": 19}}})
        eventually(
            lambda: hub.local_shadow(thing).get("desired") == {"temp": 19},
            "desired over REST reaches the hub",
        )
        time.sleep(1.2)  # a full reconcile later, the hub pushed back nothing of its own
        pump_updates = [json.loads(p) for t, p in received if t.endswith("/pump/update/accepted")]
        # The app's own update, and nothing after it: the hub pushed back nothing (its own
        # earlier report may be answered late, while the cloud writes it, with a lower version).
        (app,) = [u for u in pump_updates if u.get("clientToken") == "app-1"]
        assert all(u["version"] <= app["version"] for u in pump_updates), pump_updates
        assert _cloud_state(cloud, thing, "pump")["desired"] == {"rpm": 1200}

        # PublishToIoTCore from a component reaches a cloud-side subscriber
        driver.run("publish", topic=f"edgeloop/things/{thing}/telemetry", payload="hello")
        eventually(
            lambda: (f"edgeloop/things/{thing}/telemetry", b"hello") in received,
            "the component's message reaches the cloud",
        )
    finally:
        service.disconnect()
        service.loop_stop()

    # kill -9: the broker publishes the hub's last will
    hub.kill9()
    eventually(lambda: _connected(cloud, thing) is False, "the hub is offline after kill -9")


def test_changes_made_while_offline_sync_when_the_hub_is_back(
    cloud: RunningCloud, cloud_hub: tuple[CloudHub, str]
) -> None:
    hub, thing = cloud_hub
    hub.start()
    eventually(lambda: _connected(cloud, thing) is True, "the hub is online")
    driver = Driver(hub, thing)
    driver.update({"state": {"reported": {"mode": "auto"}, "desired": {"mode": "auto"}}})
    eventually(lambda: _cloud_state(cloud, thing).get("reported") == {"mode": "auto"}, "synced")

    # The hub stops (a graceful stop says so); meanwhile the cloud asks for a change.
    hub.stop()
    eventually(lambda: _connected(cloud, thing) is False, "the hub is offline after a stop")
    cloud.api.post(f"/things/{thing}/shadow", json={"state": {"desired": {"mode": "eco"}}})
    hub.start()
    eventually(
        lambda: hub.local_shadow(thing).get("desired") == {"mode": "eco"},
        "the cloud's change made while the hub was away reaches it",
    )

    # The cloud is unreachable: local changes wait, are remembered across an agent restart,
    # and are pushed when the cloud is back.
    broker = cloud.cloud.broker
    assert broker is not None
    cloud._run(broker.stop())
    try:
        eventually(lambda: not hub.call("status")["cloud"]["connected"], "the hub sees it")
        driver.update({"state": {"reported": {"mode": "eco", "temp": 30}}}, shadow="climate")
        driver.update({"state": {"desired": {"fan": "high"}}}, shadow="climate")
        hub.stop()
        pending = json.loads((hub.root / "state" / "cloud-sync.json").read_text())
        assert pending["climate"]["dirty"] and pending["climate"]["desired"] == {"fan": "high"}
    finally:
        cloud._run(broker.start())
    hub.start()
    eventually(
        lambda: (
            _cloud_state(cloud, thing, "climate")
            == {
                "reported": {"mode": "eco", "temp": 30},
                "desired": {"fan": "high"},
                "delta": {"fan": "high"},
            }
        ),
        "offline changes reach the cloud",
        timeout=30,
    )
    eventually(lambda: _connected(cloud, thing) is True, "the hub is online again")


def test_publishes_wait_in_a_bounded_queue_while_offline(
    cloud: RunningCloud, tmp_path: Path
) -> None:
    thing, conn = _credentials(cloud, tmp_path)
    mq = cloud.endpoints["mqtt"]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]  # nothing listens there once the socket closes
    files = {k: Path(conn[k]) for k in ("cert", "key", "ca")}
    received: list[tuple[str, bytes]] = []
    service = _service_client(cloud, received)
    service.subscribe(f"edgeloop/things/{thing}/data", qos=1)
    topic = f"edgeloop/things/{thing}/data"

    async def scenario() -> None:
        unreachable = CloudLink(
            CloudConnection(host="127.0.0.1", port=closed_port, queue_limit=2, **files), thing
        )
        await unreachable.start()
        await unreachable.publish(topic, b"1", 1, False)
        await unreachable.publish(topic, b"2", 0, False)
        with pytest.raises(CloudError, match="NOT accepted"):
            await unreachable.publish(topic, b"3", 1, False)
        assert unreachable.status()["queued"] == 2 and not unreachable.status()["connected"]
        await unreachable.stop()

        # Queued before the first connect, sent in order once connected, QoS 0 included.
        link = CloudLink(CloudConnection(host=mq["host"], port=mq["port"], **files), thing)
        for n in (b"a", b"b", b"c"):
            await link.publish(topic, n, 0 if n == b"b" else 1, False)
        await link.start()
        for _ in range(200):  # up to 10 s
            if len([t for t, _ in received if t == topic]) >= 3:
                break
            await asyncio.sleep(0.05)
        assert link.status()["connected"] and link.status()["queued"] == 0
        await link.stop()

    try:
        time.sleep(0.3)
        asyncio.run(scenario())
    finally:
        service.disconnect()
        service.loop_stop()
    assert [p for t, p in received if t == topic] == [b"a", b"b", b"c"]
