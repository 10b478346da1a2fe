"""The hub broker for kits: its settings and files, its hub-local server identity, and a real
agent running it — kits over mutual TLS into a spool stream, the ACL, restarts of Mosquitto."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from paho.mqtt.enums import CallbackAPIVersion

from edgeloop.core.errors import ValidationError
from edgeloop.edge.hub_broker import ensure_server_identity
from edgeloop.edge.hub_broker_config import (
    BrokerSettings,
    RenderedPaths,
    parse_broker,
    queue_limits,
    render_config,
    render_kit_acl,
)
from edgeloop.edge.settings import AgentSettings
from edgeloop.edge.spool import Spool
from edgeloop.edge.spool_segment import DeadLetter
from edgeloop.sim.certs import issue_kit_certificate, kit_identities
from tests.edge.conftest import Hub

EDGELOOP = Path(sys.executable).parent / "edgeloop"
KITS = ["furnace-1", "fridge-1", "washer-1", "pump-1"]  # the sim's default home
STREAMS = {"telemetry": {"max_bytes": 8 << 20, "priority": 1}}
TO_STREAM = {"topic": "kits/+/telemetry", "source": "LocalMqtt", "target": "Stream:telemetry"}


# -- certificates -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    """The install's CA (it signs kits' certificates), and a folder of kit identities."""

    ca: Path
    ca_key: Path
    certs: Path

    def kit(self, kit_id: str) -> tuple[Path, Path]:
        """A kit's certificate and key (issued by the CA on first use)."""
        ident = kit_identities([kit_id], self.certs, ca_cert=self.ca, ca_key=self.ca_key)[0]
        return ident.cert, ident.key


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make_ca(folder: Path, name: str) -> tuple[Path, Path]:
    """A CA certificate and key in ``folder``."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / f"{name}.key").write_bytes(_pem_key(key))
    return folder / f"{name}.pem", folder / f"{name}.key"


def make_server_cert(ca: Path, ca_key: Path, folder: Path) -> tuple[Path, Path]:
    """A server certificate for 127.0.0.1 signed by the CA (the "configured identity")."""
    issuer = x509.load_pem_x509_certificate(ca.read_bytes())
    signer = serialization.load_pem_private_key(ca_key.read_bytes(), password=None)
    assert isinstance(signer, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test-hub")]))
        .issuer_name(issuer.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(signer, hashes.SHA256())
    )
    (folder / "hub-broker.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "hub-broker.key").write_bytes(_pem_key(key))
    return folder / "hub-broker.pem", folder / "hub-broker.key"


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    """A fresh install CA and a kit-certificate folder."""
    ca, ca_key = make_ca(tmp_path / "pki", "install-ca")
    return Pki(ca=ca, ca_key=ca_key, certs=tmp_path / "kit-certs")


# -- a hub with a broker ------------------------------------------------------------------------


def broker_hub(
    hub_factory: Callable[..., Hub],
    pki: Pki,
    mappings: dict[str, Any] | None = None,
    *,
    streams: dict[str, Any] | None = None,
    **broker: Any,
) -> Hub:
    """A hub whose agent.json has a broker on a free loopback port, streams and a bridge."""
    return hub_factory(
        broker={"port": 0, "host": "127.0.0.1", "ca": str(pki.ca), **broker},
        streams=streams or STREAMS,
        bridge={"mqttTopicMapping": mappings or {"KitsToStream": TO_STREAM}},
    )


def broker_status(hub: Hub) -> dict[str, Any]:
    """The ``broker`` part of the agent's status."""
    status: dict[str, Any] = hub.call("status")["broker"]
    return status


def wait_status(
    hub: Hub, predicate: Callable[[dict[str, Any]], bool], timeout: float = 20
) -> dict[str, Any]:
    """Poll the agent's status until ``predicate`` holds."""
    deadline = time.monotonic() + timeout
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        status = hub.call("status")
        if predicate(status):
            return status
        time.sleep(0.05)
    raise AssertionError(f"status never matched within {timeout} s: {status}")


def trust_file(hub: Hub) -> Path:
    """What kits trust the hub broker with (its own CA when it made its identity)."""
    status = broker_status(hub)
    return Path(status["serverCaFile"] or status["caFile"])


def run_kits(
    hub: Hub, pki: Pki, *args: str, background: bool = False
) -> subprocess.Popen[str] | dict[str, Any]:
    """``edgeloop sim kits`` against the hub's broker (its JSON summary, or the process)."""
    kit_identities(KITS, pki.certs, ca_cert=pki.ca, ca_key=pki.ca_key)
    port = broker_status(hub)["port"]
    command = [
        str(EDGELOOP),
        "sim",
        "kits",
        "--hub",
        f"127.0.0.1:{port}",
        "--ca",
        str(trust_file(hub)),
        "--certs",
        str(pki.certs),
        "--json",
        *args,
    ]
    env = {k: v for k, v in os.environ.items() if k != "FORCE_COLOR"} | {"NO_COLOR": "1"}
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    _KIT_RUNS.append(proc)
    if background:
        return proc
    return finish_kits(proc)


_KIT_RUNS: list[subprocess.Popen[str]] = []


@pytest.fixture(autouse=True)
def end_kit_runs() -> Iterator[None]:
    """Kits runs a failed test left behind are stopped."""
    yield
    while _KIT_RUNS:
        proc = _KIT_RUNS.pop()
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)


def finish_kits(proc: subprocess.Popen[str], timeout: float = 60) -> dict[str, Any]:
    """The summary of a kits run, which must have had every reading acknowledged."""
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    summary: dict[str, Any] = json.loads(out)
    for kit in summary["kits"]:
        assert kit["acked"] == kit["sent"] > 0, summary
    return summary


def stored_readings(hub: Hub, stream: str = "telemetry") -> dict[str, list[int]]:
    """Each kit's ``kit_seq`` in the order the stream holds them (the agent stopped)."""
    configs = AgentSettings.load(hub.root).streams
    found: dict[str, list[int]] = {}
    with Spool(hub.root / "spool", configs) as spool:
        for payload in read_all(spool, stream):
            reading = json.loads(payload)
            found.setdefault(reading["kit"], []).append(reading["kit_seq"])
    return found


def dead_letters(hub: Hub) -> list[DeadLetter]:
    """What the dead-letter stream holds (the agent stopped)."""
    configs = AgentSettings.load(hub.root).streams
    with Spool(hub.root / "spool", configs) as spool:
        return [DeadLetter.decode(p) for p in read_all(spool, "dead-letter")]


def read_all(spool: Spool, name: str) -> list[bytes]:
    """Every pending record's payload of one stream."""
    stream = spool.stream(name)
    payloads: list[bytes] = []
    after = 0
    while batch := stream.read_batch(1000, 1 << 24, after=after):
        payloads += [r.payload for r in batch]
        after = batch[-1].sequence
    return payloads


def assert_complete(
    found: dict[str, list[int]], acked: dict[str, range], *, ordered: bool = True
) -> int:
    """Every acknowledged reading is stored (first copies in each kit's order when
    ``ordered``); the count of duplicate copies.

    Order is not asked across a restart of Mosquitto: 2.0.11 hands a session readings that
    arrived after its restart before those it restored from its database.
    """
    duplicates = 0
    for kit, expected in acked.items():
        seqs = found.get(kit, [])
        firsts = list(dict.fromkeys(seqs))
        assert set(expected) <= set(seqs), f"{kit}: missing {sorted(set(expected) - set(seqs))}"
        if ordered:
            assert firsts == sorted(firsts), f"{kit}: out of order: {seqs}"
        duplicates += len(seqs) - len(firsts)
    return duplicates


class KitConnection:
    """A kit as a bare paho client with its certificate (for what the simulator does not do)."""

    def __init__(self, port: int, trust: Path, cert: Path | None, key: Path | None) -> None:
        ctx = ssl.create_default_context(cafile=str(trust))
        if cert is not None and key is not None:
            ctx.load_cert_chain(str(cert), str(key))
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id="ignored", protocol=mqtt.MQTTv5
        )
        self.client.tls_set_context(ctx)
        self.acks: dict[int, str] = {}
        self.connected = threading.Event()
        self.settled = threading.Event()  # accepted, or refused / cut off
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda *_: self.settled.set()
        self.client.on_publish = self._on_publish
        self.port = port

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if not reason.is_failure:
            self.connected.set()
        self.settled.set()

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        self.acks[mid] = str(reason)

    def connect(self) -> bool:
        """True when the broker accepted the connection."""
        try:
            self.client.connect("127.0.0.1", self.port)
        except (OSError, ssl.SSLError):
            return False
        self.client.loop_start()
        self.settled.wait(5)
        return self.connected.is_set()

    def publish(self, topic: str, payload: bytes) -> str:
        """Publish QoS 1 and wait for the PUBACK's reason."""
        info = self.client.publish(topic, payload, qos=1)
        deadline = time.monotonic() + 10
        while info.mid not in self.acks:
            assert time.monotonic() < deadline, "no PUBACK"
            time.sleep(0.005)
        return self.acks[info.mid]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def kit_connections() -> Iterator[list[KitConnection]]:
    """Kit connections closed after the test."""
    made: list[KitConnection] = []
    yield made
    for kit in made:
        kit.close()


def reading(kit: str, seq: int) -> bytes:
    """A valid reading of ``kit``."""
    doc = {"kit": kit, "appliance": "furnace", "ts": 1.75e9 + seq, "sensors": {"t": 1.0}}
    return json.dumps({**doc, "kit_seq": seq}).encode()


# -- settings and files -------------------------------------------------------------------------


def test_broker_settings_are_validated_naming_the_field(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    settings = parse_broker({"ca": "ca.pem", "server_names": ["hub.local"]}, tmp_path, source="s")
    assert settings.ca == ca and settings.port == 8883 and settings.kit_topic_prefix == "kits"
    cases = {
        "broker.port": {"port": 70000},
        "broker.service_port": {"port": 9000, "service_port": 9000},
        "broker.ca": {"ca": "missing.pem"},
        "broker.key": {"cert": "ca.pem"},
        "broker.kit_topic_prefix": {"kit_topic_prefix": "kits/+"},
        "broker.max_queued_messages": {"max_queued_messages": 0},
        "broker.colour": {"colour": "blue"},
    }
    for field, doc in cases.items():
        with pytest.raises(ValidationError) as info:
            parse_broker(doc, tmp_path, source="agent.json")
        assert info.value.field == field, (field, str(info.value))


def test_broker_ca_comes_from_the_cloud_or_must_be_given(tmp_path: Path) -> None:
    for name in ("ca.pem", "hub.pem", "hub.key"):
        (tmp_path / name).write_text("x")
    cloud = {"endpoint": "cloud:8883", "cert": "hub.pem", "key": "hub.key", "ca": "ca.pem"}
    settings = AgentSettings(root=tmp_path).with_document(
        {"broker": {}, "cloud": cloud}, source="agent.json"
    )
    assert settings.broker is not None and settings.broker.ca == tmp_path / "ca.pem"
    with pytest.raises(ValidationError) as info:
        AgentSettings(root=tmp_path).with_document({"broker": {}}, source="agent.json")
    assert info.value.field == "broker.ca"


def test_config_and_acl(tmp_path: Path) -> None:
    paths = RenderedPaths(
        data_dir=tmp_path, ca=tmp_path / "ca.pem", cert=tmp_path / "c", key=tmp_path / "k"
    )
    conf = render_config(
        BrokerSettings(ca=paths.ca),
        paths,
        port=8883,
        service_port=18830,
        max_queued_messages=131072,
        max_queued_bytes=8 << 20,
    )
    lines = conf.splitlines()
    for line in (
        "listener 8883 0.0.0.0",
        "require_certificate true",
        "use_identity_as_username true",
        "use_username_as_clientid true",
        "listener 18830 127.0.0.1",
        "autosave_on_changes true",
        "max_queued_messages 131072",
        f"max_queued_bytes {8 << 20}",
    ):
        assert line in lines, line
    assert render_kit_acl("home/kits").splitlines()[-1] == "pattern readwrite home/kits/%u/#"
    # The broker holds what the bridge's streams hold (readings of at least 64 bytes).
    assert queue_limits([8 << 20, 1 << 20], None) == ((9 << 20) // 64, 9 << 20)
    assert queue_limits([], None)[1] == 0 and queue_limits([], 5) == (5, 0)


def test_hub_local_identity_is_made_once_and_renewed_for_new_names(tmp_path: Path) -> None:
    first = ensure_server_identity(tmp_path, ["hub", "127.0.0.1"])
    assert first.trust is not None
    assert oct(os.stat(first.key).st_mode & 0o777) == "0o600"
    assert oct(os.stat(tmp_path / "server-ca.key").st_mode & 0o777) == "0o600"
    ca = x509.load_pem_x509_certificate(first.trust.read_bytes())
    cert = x509.load_pem_x509_certificate(first.cert.read_bytes())
    cert.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length == 0
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["hub"]
    pem = first.cert.read_bytes()
    assert ensure_server_identity(tmp_path, ["hub", "127.0.0.1"]).cert.read_bytes() == pem
    again = ensure_server_identity(tmp_path, ["hub", "127.0.0.1", "hub.local"])
    renewed = x509.load_pem_x509_certificate(again.cert.read_bytes())
    renewed.verify_directly_issued_by(ca)  # same CA: kits need nothing new
    assert again.cert.read_bytes() != pem


# -- a real agent ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_kits_reach_the_spool_through_the_hub_broker_and_only_their_own_topics(
    hub_factory: Callable[..., Hub], pki: Pki, kit_connections: list[KitConnection]
) -> None:
    hub = broker_hub(hub_factory, pki)  # no cert/key: the hub makes its own identity
    hub.start()
    status = wait_status(hub, lambda s: s["bridge"]["connected"])["broker"]
    assert status["state"] == "RUNNING" and status["port"] > 0
    assert status["serverCaFile"] == str(hub.root / "broker" / "server-ca.pem")
    components = hub.components()
    assert components["edgeloop.HubBroker"]["state"] == "RUNNING"
    assert components["edgeloop.HubBroker"]["pid"] == status["pid"]
    assert components["edgeloop.MqttBridge"]["state"] == "RUNNING"

    summary = run_kits(hub, pki, "--count", "120", "--speed", "0")
    assert {k["kit"] for k in summary["kits"]} == set(KITS)

    # A kit may publish only under its own kits/<CN>/ (whatever client id it asks for).
    trust = trust_file(hub)
    kit = KitConnection(status["port"], trust, *pki.kit("furnace-1"))
    kit_connections.append(kit)
    assert kit.connect()
    assert kit.publish("kits/fridge-1/telemetry", reading("fridge-1", 9999)) == "Not authorized"
    assert kit.publish("other/furnace-1", b"{}") == "Not authorized"
    assert kit.publish("kits/furnace-1/telemetry", reading("furnace-1", 120)) == "Success"
    # No certificate, or one from another CA: no connection.
    assert not KitConnection(status["port"], trust, None, None).connect()
    other_ca, other_key = make_ca(hub.root.parent / "other", "other-ca")
    cert, key = issue_kit_certificate(other_ca.read_bytes(), other_key.read_bytes(), "pump-1")
    (hub.root.parent / "other" / "k.pem").write_bytes(cert)
    (hub.root.parent / "other" / "k.key").write_bytes(key)
    rogue = KitConnection(
        status["port"],
        trust,
        hub.root.parent / "other" / "k.pem",
        hub.root.parent / "other" / "k.key",
    )
    kit_connections.append(rogue)
    assert not rogue.connect()

    bridge = wait_status(hub, lambda s: s["bridge"]["acked"] >= 4 * 120 + 1)["bridge"]
    (mapping,) = bridge["mappings"]
    assert mapping["forwarded"] == 4 * 120 + 1 and mapping["invalid"] == 0
    shown = subprocess.run(
        [str(EDGELOOP), "device", "status", "--root", str(hub.root)],
        capture_output=True,
        text=True,
        env={**os.environ, "NO_COLOR": "1", "COLUMNS": "200"},
        check=True,
    ).stdout
    assert "broker: RUNNING" in shown and "KitsToStream: kits/+/telemetry LocalMqtt" in shown
    hub.stop()
    found = stored_readings(hub)
    acked = {k: range(120) for k in KITS} | {"furnace-1": range(121)}
    assert assert_complete(found, acked) == 0
    assert "9999" not in json.dumps(found)


@pytest.mark.slow
def test_broker_restarts_lose_nothing_acknowledged(
    hub_factory: Callable[..., Hub], pki: Pki, kit_connections: list[KitConnection]
) -> None:
    cert, key = make_server_cert(pki.ca, pki.ca_key, pki.ca.parent)
    hub = broker_hub(hub_factory, pki, cert=str(cert), key=str(key))
    hub.start()
    wait_status(hub, lambda s: s["bridge"]["connected"])
    assert broker_status(hub)["serverCaFile"] is None  # kits trust the install's CA

    # Graceful restart (SIGTERM: Mosquitto saves) while kits publish: the agent starts it
    # again, kits reconnect and resend what was not acknowledged.
    proc = run_kits(hub, pki, "--count", "300", "--speed", "300", background=True)
    assert isinstance(proc, subprocess.Popen)
    wait_status(hub, lambda s: s["bridge"]["acked"] > 100)
    os.kill(broker_status(hub)["pid"], signal.SIGTERM)
    wait_status(hub, lambda s: s["broker"]["restarts"] == 1 and s["broker"]["state"] == "RUNNING")
    finish_kits(proc)

    # kill -9 of Mosquitto with readings queued for the bridge (the agent frozen): what it
    # saved comes back, and the bridge stores it once the agent restarted Mosquitto.
    kit = KitConnection(broker_status(hub)["port"], pki.ca, *pki.kit("probe-1"))
    kit_connections.append(kit)
    assert kit.connect()
    assert hub.proc is not None
    broker_pid = broker_status(hub)["pid"]
    os.kill(hub.proc.pid, signal.SIGSTOP)
    try:
        for seq in range(50):
            assert kit.publish("kits/probe-1/telemetry", reading("probe-1", seq)) == "Success"
        time.sleep(0.3)  # Mosquitto saves within milliseconds of the last PUBACK
        os.kill(broker_pid, signal.SIGKILL)
    finally:
        os.kill(hub.proc.pid, signal.SIGCONT)
    status = wait_status(
        hub,
        lambda s: (
            s["broker"]["restarts"] == 2
            and s["bridge"]["connected"]
            and s["bridge"]["mappings"][0]["forwarded"] >= 4 * 300 + 50
        ),
    )
    assert status["broker"]["lastError"]["reason"].startswith("mosquitto exited with code -9")
    hub.stop()
    found = stored_readings(hub)
    # Kits resend what a restart left unacknowledged; the bridge recognised every repeat.
    acked = {k: range(300) for k in KITS} | {"probe-1": range(50)}
    assert assert_complete(found, acked, ordered=False) == 0
