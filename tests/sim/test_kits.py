"""`edgeloop sim kits` against a real Mosquitto that requires client certificates.

The console script runs as a child process; a paho subscriber with its own certificate
listens on a topic prefix unique to each test and checks that every reading arrives, in
order, byte for byte what the generator makes of the same scenario.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgeloop.core.errors import ValidationError
from edgeloop.sim.generator import HomeSimulator
from edgeloop.sim.kits import Broker, parse_broker
from edgeloop.sim.payload import decode, encode
from edgeloop.sim.scenario import load_scenario
from tests.sim.conftest import TlsBroker, make_ca

EDGELOOP = Path(sys.executable).parent / "edgeloop"

SCENARIO = """
seed: 21
kits:
  - id: furnace-1
    appliance: furnace
    faults: [{fault: bearing_wear, at: 500, ramp: 600}]
  - id: fridge-1
    appliance: fridge
    faults: [{fault: spikes, at: 800, severity: 1}]
  - id: washer-1
    appliance: washer
    faults: [{fault: sensor_dropout, at: 300, severity: 0.5}]
  - id: pump-1
    appliance: pump
    faults: [{fault: stuck_relay_off, at: 600}]
"""


class Subscriber:
    """A paho client with its own certificate, collecting everything under a prefix."""

    def __init__(self, broker: TlsBroker, prefix: str) -> None:
        name = f"observer-{uuid.uuid4().hex[:6]}"
        cert, key = broker.client_cert(name)
        self.messages: list[tuple[str, bytes, bool, float]] = []
        self.lock = threading.Lock()
        subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv5)
        self.client.tls_set(ca_certs=str(broker.ca), certfile=str(cert), keyfile=str(key))
        self.client.reconnect_delay_set(1, 1)
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *args: subscribed.set()
        # A persistent session: the broker queues what arrives while this client is away.
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = 300
        self.client.connect("127.0.0.1", broker.port, clean_start=False, properties=properties)
        self.client.loop_start()
        self.client.subscribe(f"{prefix}/#", qos=1)
        assert subscribed.wait(10), "no SUBACK"

    def _on_message(self, client: object, userdata: object, message: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.messages.append(
                (message.topic, message.payload, bool(message.retain), time.monotonic())
            )

    def telemetry(self) -> list[tuple[str, bytes, float]]:
        with self.lock:
            return [(t, p, at) for t, p, _, at in self.messages if t.endswith("/telemetry")]

    def wait_for(self, count: int, timeout: float = 20.0) -> list[tuple[str, bytes, float]]:
        """Telemetry messages once ``count`` distinct readings have arrived."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.telemetry()
            if len({p for _, p, _ in got}) >= count or time.monotonic() > deadline:
                return got
            time.sleep(0.05)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def edgeloop(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(EDGELOOP), *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def kits_args(broker: TlsBroker, certs: Path, prefix: str, *more: str) -> list[str]:
    return [
        "sim",
        "kits",
        "--hub",
        broker.hub,
        "--ca",
        str(broker.ca),
        "--certs",
        str(certs),
        "--topic-prefix",
        prefix,
        *more,
    ]


def by_kit(messages: list[tuple[str, bytes, float]]) -> dict[str, list[int]]:
    """Each kit's sequence numbers in arrival order, repeats (QoS 1 DUPs) dropped."""
    seen: set[tuple[str, int]] = set()
    order: dict[str, list[int]] = {}
    for _, payload, _ in messages:
        reading = decode(payload)
        if (reading.kit_id, reading.seq) not in seen:
            seen.add((reading.kit_id, reading.seq))
            order.setdefault(reading.kit_id, []).append(reading.seq)
    return order


def test_every_reading_arrives_in_order_with_its_label(
    tls_broker: TlsBroker, tmp_path: Path
) -> None:
    prefix = f"test/{uuid.uuid4().hex[:8]}/kits"
    scenario = tmp_path / "home.yaml"
    scenario.write_text(SCENARIO)
    certs = tmp_path / "certs"
    subscriber = Subscriber(tls_broker, prefix)
    try:
        done = edgeloop(
            *kits_args(tls_broker, certs, prefix, "--ca-key", str(tls_broker.ca_key)),
            "--scenario",
            str(scenario),
            "--speed",
            "0",
            "--count",
            "250",
            "--json",
        )
        assert done.returncode == 0, done.stderr
        summary = json.loads(done.stdout)
        assert [k["kit"] for k in summary["kits"]] == [
            "furnace-1",
            "fridge-1",
            "washer-1",
            "pump-1",
        ]
        for kit in summary["kits"]:
            assert (kit["sent"], kit["acked"], kit["firstSeq"], kit["lastSeq"]) == (
                250,
                250,
                0,
                249,
            )
        received = subscriber.wait_for(1000)
    finally:
        subscriber.close()

    # Every reading, once or more, in order per kit, on its own topic.
    assert by_kit(received) == {
        k: list(range(250)) for k in ("furnace-1", "fridge-1", "washer-1", "pump-1")
    }
    for topic, payload, _ in received:
        assert topic == f"{prefix}/{decode(payload).kit_id}/telemetry"
    # Byte for byte what the generator makes of the scenario: values and labels.
    expected = {
        (r.kit_id, r.seq): encode(r)
        for r in HomeSimulator(load_scenario(scenario)).readings(count=250)
    }
    got = {(decode(p).kit_id, decode(p).seq): p for _, p, _ in received}
    assert got == expected
    labels: dict[str, set[str]] = {}
    for payload in got.values():
        reading = decode(payload)
        labels.setdefault(reading.kit_id, set()).add(reading.label)
    assert labels == {
        "furnace-1": {"normal", "bearing_wear"},
        "fridge-1": {"normal", "spikes"},
        "washer-1": {"normal", "sensor_dropout"},
        "pump-1": {"normal", "stuck_relay_off"},
    }
    # The kits said they were online, and then that they were not.
    with subscriber.lock:
        statuses = [json.loads(p) for t, p, _, _ in subscriber.messages if t.endswith("/status")]
    for kit in ("furnace-1", "pump-1"):
        mine = [s["online"] for s in statuses if s["kit"] == kit]
        assert mine[0] is True and mine[-1] is False
    # Each kit got its own certificate, issued by the CA, its kit id as CN.
    cert = x509.load_pem_x509_certificate((certs / "washer-1.cert.pem").read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "washer-1"
    assert (certs / "washer-1.key.pem").stat().st_mode & 0o777 == 0o600


def test_speed_spreads_readings_over_real_time(tls_broker: TlsBroker, tmp_path: Path) -> None:
    prefix = f"test/{uuid.uuid4().hex[:8]}"
    subscriber = Subscriber(tls_broker, prefix)
    try:
        done = edgeloop(
            *kits_args(tls_broker, tmp_path / "certs", prefix, "--ca-key", str(tls_broker.ca_key)),
            "--appliances",
            "pump",
            "--speed",
            "100",
            "--duration",
            "80s",
            "--mqtt",
            "3.1.1",
        )
        assert done.returncode == 0, done.stderr
        # Without --json: the live view's last frame, one row per kit.
        row = next(line for line in done.stdout.splitlines() if "pump-1" in line)
        assert [cell.strip() for cell in row.split("│")[4:8]] == ["16", "16", "0", "15"]
        received = subscriber.wait_for(16)
    finally:
        subscriber.close()
    assert by_kit(received) == {"pump-1": list(range(16))}
    # 16 readings 5 s apart: 75 simulated seconds, 0.75 s at 100x.
    spread = received[-1][2] - received[0][2]
    assert 0.6 < spread < 5.0


def test_ctrl_c_stops_cleanly_with_every_sent_reading_acknowledged(
    tls_broker: TlsBroker, tmp_path: Path
) -> None:
    prefix = f"test/{uuid.uuid4().hex[:8]}"
    subscriber = Subscriber(tls_broker, prefix)
    args = kits_args(tls_broker, tmp_path / "certs", prefix, "--ca-key", str(tls_broker.ca_key))
    proc = subprocess.Popen(
        [str(EDGELOOP), *args, "--appliances", "fridge,washer", "--speed", "2000", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        subscriber.wait_for(60)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        summary = json.loads(out)
        assert summary["stopped"] is True
        time.sleep(0.3)
        received = subscriber.telemetry()
    finally:
        if proc.poll() is None:
            proc.kill()
        subscriber.close()
    order = by_kit(received)
    for kit in summary["kits"]:
        assert kit["sent"] == kit["acked"] > 10
        # Nothing lost: every number from 0 up to the last one sent arrived, in order.
        assert order[kit["kit"]] == list(range(kit["lastSeq"] + 1))


def test_nothing_is_lost_when_the_broker_restarts_mid_run(
    own_broker: TlsBroker, tmp_path: Path
) -> None:
    prefix = f"test/{uuid.uuid4().hex[:8]}"
    subscriber = Subscriber(own_broker, prefix)
    args = kits_args(own_broker, tmp_path / "certs", prefix, "--ca-key", str(own_broker.ca_key))
    args += ["--appliances", "fridge,pump", "--speed", "3000", "--count", "600", "--json"]
    proc = subprocess.Popen(
        [str(EDGELOOP), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        subscriber.wait_for(100)
        own_broker.stop()
        time.sleep(1.0)  # the kits keep sampling, queueing, and retrying meanwhile
        own_broker.start()
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        summary = json.loads(out)
        received = subscriber.wait_for(1200, timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        subscriber.close()
    for kit in summary["kits"]:
        assert kit["sent"] == kit["acked"] == 600
        assert kit["connects"] >= 2  # it did lose the broker
    # Every reading arrived (some twice), in order per kit apart from the resent ones.
    seen: dict[str, set[int]] = {}
    for _, payload, _ in received:
        reading = decode(payload)
        seen.setdefault(reading.kit_id, set()).add(reading.seq)
    missing = {k: sorted(set(range(600)) - v) for k, v in seen.items()}
    assert seen == {"fridge-1": set(range(600)), "pump-1": set(range(600))}, missing


def test_a_kit_whose_certificate_the_broker_does_not_trust_is_refused(
    tls_broker: TlsBroker, tmp_path: Path
) -> None:
    other_ca, other_key = make_ca(tmp_path / "other", "another CA")
    certs = tmp_path / "certs"
    done = edgeloop(
        "sim",
        "kits",
        "--hub",
        tls_broker.hub,
        "--ca",
        str(tls_broker.ca),
        "--certs",
        str(certs),
        "--appliances",
        "pump",
        "--count",
        "3",
        "--json",
        timeout=60,
    )
    assert done.returncode == 1
    assert "--ca-key" in done.stderr and "pump-1.cert.pem" in done.stderr
    # Issued by a CA the broker does not know: the handshake is refused.
    from edgeloop.sim.certs import kit_identities

    kit_identities(["pump-1"], certs, ca_cert=other_ca, ca_key=other_key)
    done = edgeloop(
        *kits_args(tls_broker, certs, "test/x"), "--appliances", "pump", "--count", "3", timeout=60
    )
    assert done.returncode == 1
    assert "kit pump-1 could not connect to 127.0.0.1:" in done.stderr
    assert "Traceback" not in done.stderr


def test_readings_the_broker_refuses_are_reported(tls_broker: TlsBroker, tmp_path: Path) -> None:
    args = kits_args(
        tls_broker, tmp_path / "certs", "elsewhere", "--ca-key", str(tls_broker.ca_key)
    )
    done = edgeloop(*args, "--appliances", "pump", "--count", "5", "--speed", "0", "--json")
    assert done.returncode == 1
    assert json.loads(done.stdout)["kits"][0]["refused"] == 5
    assert "refused 5 reading(s) of kit pump-1: Not authorized" in done.stderr


def test_an_untrusted_broker_is_refused(tls_broker: TlsBroker, tmp_path: Path) -> None:
    other_ca, other_key = make_ca(tmp_path / "other", "another CA")
    done = edgeloop(
        "sim",
        "kits",
        "--hub",
        tls_broker.hub,
        "--ca",
        str(other_ca),
        "--certs",
        str(tmp_path / "certs"),
        "--ca-key",
        str(other_key),
        "--appliances",
        "fridge",
        "--count",
        "3",
        timeout=60,
    )
    assert done.returncode == 1
    assert "the broker's certificate is not trusted" in done.stderr


@pytest.mark.parametrize(
    ("text", "broker"),
    [
        ("hub.local:8883", Broker(host="hub.local", port=8883)),
        ("hub.local", Broker(host="hub.local", port=8883)),
        ("[::1]:1884", Broker(host="::1", port=1884)),
    ],
)
def test_broker_addresses(text: str, broker: Broker) -> None:
    assert parse_broker(text) == broker


@pytest.mark.parametrize("text", ["", ":8883", "hub:0", "hub:x", "[::1", "hub:70000"])
def test_bad_broker_addresses(text: str) -> None:
    with pytest.raises(ValidationError, match="HOST:PORT"):
        parse_broker(text)


def test_console_script_exists() -> None:
    assert os.access(EDGELOOP, os.X_OK)
