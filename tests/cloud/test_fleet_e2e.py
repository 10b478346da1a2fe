"""The control plane's promise in one story, with real processes only: ``edgeloop cloud up``
and three hubs run with ``edgeloop device run``, each in its own folder. They provision by
claim, go online, one goes offline when killed, a revoked one is refused, and shadows sync
both ways across a time one hub spends offline. The cloud is driven through the CLI, as a
user would; only the waits poll the REST API directly, to stay fast.

Marked ``slow``: the story takes about 30 s on a 2-core box (keepalive 5 s, reconnects
capped at 1 s, shadow reconciliation every second), the module under 50 s.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from paho.mqtt.enums import CallbackAPIVersion

from edgeloop.edge.control import wait_for_agent
from tests.edge.conftest import FAST_RESTARTS
from tests.edge.test_cloud_link import CloudHub, Driver, eventually

pytestmark = pytest.mark.slow

EDGELOOP = str(Path(sys.executable).with_name("edgeloop"))
KEEPALIVE = 5  # the least a hub accepts; the broker sends the last will after 1.5x this
# A REST shadow update is not announced to the hub over MQTT: the hub's periodic
# reconciliation (cloud.sync_interval, 300 s by default) is what brings it. One second here.
SYNC_INTERVAL = 1.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- the cloud: `edgeloop cloud up` and the CLI --------------------------------------------
class CloudUp:
    """A running ``edgeloop cloud up`` process, and its CLI."""

    def __init__(self, folder: Path) -> None:
        self.data_dir = folder / "cloud"
        self.stderr = folder / "cloud.stderr"
        port = str(_free_port())
        self.proc = subprocess.Popen(
            [EDGELOOP, "cloud", "up", "--data-dir", str(self.data_dir), "--port", port, "--json"],
            stdout=subprocess.PIPE,
            stderr=open(self.stderr, "wb"),  # noqa: SIM115
        )
        self.endpoints = self._ready(timeout=60)
        self.url: str = self.endpoints["api"]
        self.mqtt = (str(self.endpoints["mqtt"]["host"]), int(self.endpoints["mqtt"]["port"]))
        headers = {}
        token_file = self.endpoints.get("tokenFile")
        if token_file and Path(token_file).exists():
            headers["Authorization"] = f"Bearer {Path(token_file).read_text().strip()}"
        self.api = httpx.Client(base_url=f"{self.url}/api/v1", headers=headers, timeout=30)

    def _ready(self, timeout: float) -> dict[str, Any]:
        """The endpoints `cloud up --json` prints once everything answers."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        out = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            readable, _, _ = select.select([fd], [], [], 0.2)
            if readable:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break  # it exited
                out += chunk
                with contextlib.suppress(ValueError):
                    return dict(json.loads(out))
        raise AssertionError(
            f"`edgeloop cloud up` printed no endpoints (exit code {self.proc.poll()}):\n"
            f"{out.decode()}\n{self.stderr.read_text()}"
        )

    def cli(self, *args: str) -> Any:
        """``edgeloop cloud ARGS --url URL --json``: its JSON; fails the test on an error."""
        done = self._run(args)
        assert done.returncode == 0, f"edgeloop cloud {' '.join(args)}: {done.stderr}"
        return json.loads(done.stdout)

    def _run(self, args: tuple[str, ...]) -> subprocess.CompletedProcess[str]:
        # The install's folder, so the CLI finds its token and CA should the API ask.
        env = {**os.environ, "EDGELOOP_CLOUD_DATA": str(self.data_dir)}
        command = [EDGELOOP, "cloud", *args, "--url", self.url, "--json"]
        return subprocess.run(command, capture_output=True, text=True, timeout=60, env=env)

    def connectivity(self, thing: str) -> dict[str, Any]:
        """A thing's connectivity as the registry has it (REST, for waits)."""
        answer = self.api.get(f"/things/{thing}")
        return dict(answer.json()["connectivity"]) if answer.status_code == 200 else {}

    def shadow_state(self, thing: str) -> dict[str, Any]:
        """The cloud's classic shadow state of a thing (REST, for waits)."""
        answer = self.api.get(f"/things/{thing}/shadow")
        return dict(answer.json()["state"]) if answer.status_code == 200 else {}

    def close(self) -> None:
        self.api.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
                # Killed the hard way, it could not stop its broker: do it here.
                pid_file = self.data_dir / "broker" / "mosquitto.pid"
                with contextlib.suppress(OSError, ValueError):
                    os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def cloud(tmp_path: Path) -> Iterator[CloudUp]:
    running = CloudUp(tmp_path)
    try:
        yield running
    finally:
        running.close()


# -- hubs -----------------------------------------------------------------------------------
class FleetHub(CloudHub):
    """A hub run as its owner runs it: ``edgeloop device run --root FOLDER``."""

    def start(self, *, wait: bool = True) -> None:
        self.proc = subprocess.Popen(
            [EDGELOOP, "device", "run", "--root", str(self.root)],
            stdout=subprocess.DEVNULL,
            stderr=open(self.root / "agent.stderr", "ab"),  # noqa: SIM115
        )
        if wait:
            wait_for_agent(self.root, self.proc, timeout=30)

    def status(self) -> dict[str, Any]:
        """``edgeloop device status --json``."""
        done = subprocess.run(
            [EDGELOOP, "device", "status", "--root", str(self.root), "--json"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 0, done.stderr
        return dict(json.loads(done.stdout))

    def agent_log(self) -> str:
        path = self.root / "logs" / "edgeloop.log"
        return path.read_text() if path.exists() else ""

    def certificate_id(self) -> str:
        """The SHA-256 fingerprint of the certificate the hub holds (the cloud's id for it)."""
        pem = (self.root / "device.cert.pem").read_bytes()
        return x509.load_pem_x509_certificate(pem).fingerprint(hashes.SHA256()).hex()


@pytest.fixture
def hubs(tmp_path: Path) -> Iterator[Callable[..., FleetHub]]:
    """Make hubs; every agent is stopped afterwards, whatever happened."""
    made: list[FleetHub] = []

    def make(name: str, cloud_settings: dict[str, Any]) -> FleetHub:
        settings = {
            "restart": dict(FAST_RESTARTS),
            "stop_grace": 2.0,
            "health_window": 0.3,
            "cloud": cloud_settings,
        }
        (tmp_path / name).mkdir()
        hub = FleetHub(tmp_path / name / "hub", settings)
        made.append(hub)
        return hub

    yield make
    for hub in made:
        hub.stop()


class Uplink:
    """A TCP relay between one hub and the broker that the test can cut, like the hub's
    internet connection: open connections drop (the broker sees them go) and new ones fail."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.up = True
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._server.getsockname()[1])
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        threading.Thread(target=self._accept, name="uplink", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                near, _ = self._server.accept()
            except OSError:
                return  # closed
            if not self.up:
                near.close()
                continue
            try:
                far = socket.create_connection(self.target, timeout=5)
                far.settimeout(None)
            except OSError:
                near.close()
                continue
            with self._lock:
                self._open += [near, far]
            for source, sink in ((near, far), (far, near)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        self.up = False
        with self._lock:
            dropped, self._open = self._open, []
        for sock in dropped:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def restore(self) -> None:
        self.up = True

    def close(self) -> None:
        self.cut()
        self._server.close()


@pytest.fixture
def uplink(cloud: CloudUp) -> Iterator[Uplink]:
    link = Uplink(cloud.mqtt)
    yield link
    link.close()


# -- helpers --------------------------------------------------------------------------------
def _when(iso: str) -> datetime:
    at = datetime.fromisoformat(iso.replace("Z", "+00:00"))
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


def _claim_publishes(cloud: CloudUp, claim: dict[str, str], topics: list[str]) -> list[Any]:
    """Connect with the claim certificate, publish ``{"connected": false}`` on each topic
    (QoS 1, retained) and return the broker's PUBACK reason codes."""
    acks: list[Any] = []
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=f"probe-{uuid.uuid4().hex[:8]}", protocol=mqtt.MQTTv5
    )
    client.tls_set(ca_certs=claim["rootCa"], certfile=claim["cert"], keyfile=claim["key"])
    client.on_publish = lambda c, u, mid, reason, props: acks.append(reason)
    client.connect(*cloud.mqtt)
    client.loop_start()
    try:
        eventually(client.is_connected, "the claim connects")
        for topic in topics:
            client.publish(topic, b'{"connected": false, "state": {}}', qos=1, retain=True)
        eventually(lambda: len(acks) == len(topics), "the broker's PUBACKs")
    finally:
        client.disconnect()
        client.loop_stop()
    return acks


def _sync_record(hub: FleetHub) -> dict[str, Any]:
    """What the hub's shadow sync recorded for its classic shadow (``{}``: in step)."""
    records = json.loads((hub.root / "state" / "cloud-sync.json").read_text())
    return dict(records.get("") or {})


# -- the story ------------------------------------------------------------------------------
@pytest.mark.timeout(300)  # about 30 s on an idle 2-core box; much longer on a busy one
def test_a_fleet_provisions_by_claim_goes_on_and_offline_is_revoked_and_syncs_shadows(
    cloud: CloudUp, uplink: Uplink, hubs: Callable[..., FleetHub], tmp_path: Path
) -> None:
    # 1. `cloud up` answers, with an empty fleet.
    assert cloud.cli("thing", "list") == []

    # 2. A claim for a factory image; three hubs with only the claim trade it for their own
    # thing and certificate on first start. Hub C reaches the cloud through a link the test
    # can cut.
    template = f"fleet-{uuid.uuid4().hex[:8]}"
    claim = cloud.cli("claim", "create", template, "--out", str(tmp_path / "claim"))
    assert claim["kind"] == "claim" and claim["thingName"] is None and claim["templateCreated"]
    files = claim["files"]
    serials = [f"sn{n}-{uuid.uuid4().hex[:6]}" for n in range(3)]
    things = [f"{template}-{serial}" for serial in serials]
    thing_a, thing_b, thing_c = things
    direct = f"{cloud.mqtt[0]}:{cloud.mqtt[1]}"
    endpoints = [direct, direct, f"127.0.0.1:{uplink.port}"]
    fleet = [
        hubs(
            name,
            {
                "endpoint": endpoint,
                "ca": files["rootCa"],
                "keepalive": KEEPALIVE,
                "reconnect_max": 1,
                "sync_interval": SYNC_INTERVAL,
                "claim": {
                    "cert": files["cert"],
                    "key": files["key"],
                    "template": template,
                    "parameters": {"SerialNumber": serial},
                },
            },
        )
        for name, serial, endpoint in zip("abc", serials, endpoints, strict=True)
    ]
    a, b, c = fleet
    for hub in fleet:
        hub.start(wait=False)
    for hub, thing in zip(fleet, things, strict=True):
        assert hub.proc is not None
        assert wait_for_agent(hub.root, hub.proc, timeout=30)["thingName"] == thing

    listed = cloud.cli("thing", "list", "--prefix", template)
    assert sorted(t["thingName"] for t in listed) == sorted(things)
    certificates: dict[str, str] = {}
    for hub, thing, serial in zip(fleet, things, serials, strict=True):
        shown = cloud.cli("thing", "show", thing)
        assert shown["attributes"]["SerialNumber"] == serial
        active = [x for x in shown["certificates"] if x["status"] == "ACTIVE"]
        assert len(active) == 1 and active[0]["kind"] == "device", shown["certificates"]
        assert active[0]["certificateId"] == hub.certificate_id()  # the one the hub holds
        # The interim certificate it traded for it is out of use.
        assert {x["status"] for x in shown["certificates"] if x not in active} == {"INACTIVE"}
        certificates[thing] = active[0]["certificateId"]
    assert len(set(certificates.values())) == 3
    assert claim["certificateId"] not in certificates.values()

    # 3. All three are online, in the registry and in a fleet query.
    for thing in things:
        eventually(lambda: cloud.connectivity(thing).get("connected"), f"{thing} online")  # noqa: B023
        seen = cloud.cli("thing", "show", thing)["connectivity"]
        assert seen["connected"] is True and seen["clientId"] == thing and seen["since"]
    ours = f"attributes.provisioningTemplate:{template}"
    online = cloud.cli("fleet", "query", f"{ours} AND connectivity.connected:true")
    assert (sorted(online["things"]), online["count"]) == (sorted(things), 3)

    # The claim is good for provisioning only: it may not touch a hub's shadow, nor say
    # that a hub went offline.
    acks = _claim_publishes(
        cloud,
        files,
        [f"$aws/things/{thing_a}/shadow/update", f"edgeloop/things/{thing_a}/connectivity"],
    )
    assert all(ack.is_failure for ack in acks), acks
    time.sleep(0.3)  # what the broker would have delivered, the services would have seen
    assert cloud.connectivity(thing_a)["connected"] is True
    assert cloud.api.get(f"/things/{thing_a}/shadow").status_code == 404

    # 4. kill -9 hub A: the broker publishes its last will, within the keepalive bound
    # (1.5x keepalive for a silent peer; a dead process's socket closes at once).
    before_kill = datetime.now(UTC) - timedelta(milliseconds=100)
    a.kill9()
    eventually(
        lambda: cloud.connectivity(thing_a).get("connected") is False,
        "hub A offline after kill -9",
        timeout=1.5 * KEEPALIVE + 1,
    )
    seen = cloud.cli("thing", "show", thing_a)["connectivity"]
    assert seen["connected"] is False and seen["disconnectReason"] == "connection lost"
    offline_since = _when(seen["since"])
    assert before_kill <= offline_since <= datetime.now(UTC)
    offline = cloud.cli("fleet", "query", f"{ours} AND connectivity.connected:false")
    assert offline["things"] == [thing_a]
    # Started again, it resumes.
    a.start()
    eventually(lambda: cloud.connectivity(thing_a).get("connected"), "hub A back online")
    assert _when(cloud.connectivity(thing_a)["since"]) > offline_since

    # 5. Revoke hub B's certificate: the broker drops B and refuses it from then on, even
    # after B's agent restarts, which says why; the others reconnect and stay online.
    before_revoke = datetime.now(UTC) - timedelta(milliseconds=100)
    revoked = cloud.cli("cert", "revoke", certificates[thing_b], "--reason", "stolen")
    assert revoked["status"] == "REVOKED" and revoked["thingName"] == thing_b
    assert revoked["brokerNotified"] is True
    eventually(lambda: cloud.connectivity(thing_b).get("connected") is False, "hub B dropped")
    b.stop()
    b.start()
    status = eventually(
        lambda: (s := b.status())["cloud"]["error"] and s, "hub B says why it is not connected"
    )
    assert status["cloud"]["connected"] is False and status["cloud"]["connects"] == 0
    assert "certificate revoked" in status["cloud"]["error"], status["cloud"]
    assert "certificate revoked" in b.agent_log()
    for thing in (thing_a, thing_c):
        eventually(
            lambda: (
                cloud.connectivity(thing).get("connected")  # noqa: B023
                and _when(cloud.connectivity(thing)["since"]) > before_revoke  # noqa: B023
            ),
            f"{thing} reconnected after the broker dropped the revoked hub",
        )
    time.sleep(1.0)  # B has kept trying meanwhile (reconnect_max 1 s)
    assert b.status()["cloud"]["connected"] is False
    seen = cloud.cli("thing", "show", thing_b)
    assert seen["connectivity"]["connected"] is False
    statuses = {x["certificateId"]: x["status"] for x in seen["certificates"]}
    assert statuses[certificates[thing_b]] == "REVOKED"
    online = cloud.cli("fleet", "query", f"{ours} AND connectivity.connected:true")
    assert sorted(online["things"]) == sorted([thing_a, thing_c])

    # 6. Shadows, both ways, with hub C offline in the middle. A component on C reports
    # through the hub's local shadow (Greengrass IPC); the cloud sets desired with the CLI.
    driver = Driver(c, thing_c)
    driver.update({"state": {"reported": {"temp": 21.5}}})
    eventually(lambda: cloud.shadow_state(thing_c).get("reported") == {"temp": 21.5}, "to cloud")
    assert cloud.cli("shadow", "get", thing_c)["state"]["reported"] == {"temp": 21.5}
    cloud.cli("shadow", "update", thing_c, "--desired", '{"fan": "high"}')
    eventually(lambda: c.local_shadow(thing_c).get("desired") == {"fan": "high"}, "to the hub")

    # C loses its link: the broker's last will says so. Meanwhile its component reports
    # a change, which waits (recorded on disk); then C's agent stops, still cut off, and
    # the cloud asks for a change of its own.
    uplink.cut()
    eventually(lambda: cloud.connectivity(thing_c).get("connected") is False, "hub C offline")
    eventually(lambda: not c.call("status")["cloud"]["connected"], "hub C knows it")
    driver.update({"state": {"reported": {"temp": 30.5, "door": "open"}}})
    assert c.local_shadow(thing_c)["reported"] == {"temp": 30.5, "door": "open"}
    c.stop()
    assert _sync_record(c)["dirty"] is True
    cloud.cli("shadow", "update", thing_c, "--desired", '{"fan": "low"}')
    in_cloud = cloud.cli("shadow", "get", thing_c)["state"]
    assert in_cloud["reported"] == {"temp": 21.5} and in_cloud["desired"] == {"fan": "low"}
    assert c.local_shadow(thing_c)["desired"] == {"fan": "high"}

    # Back online (its component starts afresh: no commands to replay), both sides agree:
    # the hub's reported and the cloud's desired won, nothing is left to sync.
    driver.commands.unlink()
    driver.out.unlink()
    uplink.restore()
    c.start()
    eventually(lambda: cloud.connectivity(thing_c).get("connected"), "hub C back online")
    converged = {"desired": {"fan": "low"}, "reported": {"temp": 30.5, "door": "open"}}
    eventually(
        lambda: {k: cloud.shadow_state(thing_c).get(k) for k in converged} == converged,
        "the change made on the hub while offline reaches the cloud",
    )
    eventually(
        lambda: c.local_shadow(thing_c) == converged,
        "the change made in the cloud while the hub was offline reaches it",
    )
    eventually(lambda: not _sync_record(c).get("dirty"), "the hub has nothing left to sync")
    in_cloud = cloud.cli("shadow", "get", thing_c)["state"]
    assert in_cloud == {**converged, "delta": {"fan": "low"}}


def test_a_claim_cannot_take_over_a_hubs_connection(
    cloud: CloudUp, hubs: Callable[..., FleetHub], tmp_path: Path
) -> None:
    thing = f"hub-{uuid.uuid4().hex[:8]}"
    cloud.cli("thing", "create", thing)
    issued = cloud.cli("cert", "issue", thing, "--out", str(tmp_path / "identity"))["files"]
    claim = cloud.cli("claim", "create", f"t-{uuid.uuid4().hex[:8]}", "--out", str(tmp_path))
    hub = hubs(
        "hub",
        {
            "endpoint": f"{cloud.mqtt[0]}:{cloud.mqtt[1]}",
            "cert": issued["cert"],
            "key": issued["key"],
            "ca": issued["rootCa"],
            "keepalive": KEEPALIVE,
            "reconnect_max": 1,
        },
    )
    hub.start()
    eventually(lambda: cloud.connectivity(thing).get("connected"), "the hub online")
    assert hub.call("status")["cloud"]["connects"] == 1

    files = claim["files"]
    intruder = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=thing, protocol=mqtt.MQTTv5)
    intruder.tls_set(ca_certs=files["rootCa"], certfile=files["cert"], keyfile=files["key"])
    intruder.connect(*cloud.mqtt)
    intruder.loop_start()
    try:
        time.sleep(1.0)
        assert intruder.is_connected()  # the broker took it, under its own CN's name
    finally:
        intruder.disconnect()
        intruder.loop_stop()
    time.sleep(1.5)  # the hub would have reconnected by now (reconnect_max 1 s)
    assert hub.call("status")["cloud"]["connects"] == 1, "the hub was dropped"
