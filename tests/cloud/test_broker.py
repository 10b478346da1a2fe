"""The cloud broker: rendered config and ACLs, and the real Mosquitto with real TLS clients.

The broker runs on an event loop in a background thread (its API is async); the tests
drive paho clients (MQTT 5 and 3.1.1) synchronously against it. Certificates come from
the install's CA (``edgeloop.cloud.pki``). Every test uses its own things and topics.
"""

from __future__ import annotations

import asyncio
import os
import queue
import signal
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgeloop.cloud.broker import (
    AclRules,
    Broker,
    BrokerConfig,
    check_crl,
    choose_ports,
    password_line,
    render_acl,
    render_config,
    render_service_acl,
)
from edgeloop.cloud.pki import CertificateAuthority
from edgeloop.core.errors import CloudError, ValidationError

V5 = MQTTProtocolVersion.MQTTv5
V311 = MQTTProtocolVersion.MQTTv311
BOTH = pytest.mark.parametrize("proto", [V5, V311], ids=["mqtt5", "mqtt311"])
QUIET = 0.3  # how long "receives nothing" waits
NO_SUBSCRIBERS = 0x10  # MQTT 5 PUBACK: accepted, and nobody subscribes
T = TypeVar("T")


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


# --- pure parts ------------------------------------------------------------------------


def _config(tmp: Path, **overrides: Any) -> BrokerConfig:
    base: dict[str, Any] = {
        "data_dir": tmp / "broker",
        "ca_chain": tmp / "ca" / "chain.pem",
        "server_cert": tmp / "server.pem",
        "server_key": tmp / "server.key",
        "device_port": 8883,
        "service_port": 8884,
    }
    return BrokerConfig(**(base | overrides))


def test_render_config_has_mtls_listener_loopback_service_and_crash_safe_persistence(
    tmp_path: Path,
) -> None:
    conf = render_config(_config(tmp_path, host="0.0.0.0", run_as="edgeloop")).splitlines()
    assert conf.index("per_listener_settings true") < conf.index("listener 8883 0.0.0.0")
    for line in (
        "user edgeloop",
        "persistence true",
        f"persistence_location {tmp_path}/broker/",
        "autosave_on_changes true",
        "autosave_interval 1",
        f"cafile {tmp_path}/ca/chain.pem",
        f"crlfile {tmp_path}/broker/crl.pem",
        "require_certificate true",
        "use_identity_as_username true",
        "tls_version tlsv1.2",
        f"acl_file {tmp_path}/broker/device.acl",
        "listener 8884 127.0.0.1",  # the service listener stays on loopback
        f"password_file {tmp_path}/broker/service.passwd",
    ):
        assert line in conf, line
    device = conf[conf.index("listener 8883 0.0.0.0") : conf.index("listener 8884 127.0.0.1")]
    assert not any(line.startswith("password_file") for line in device)
    assert conf.count("allow_anonymous false") == 2


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"data_dir": Path("/tmp/with space")}, "data_dir"),
        ({"device_port": 0}, "device_port"),
        ({"service_port": 70000}, "service_port"),
        ({"service_port": 8883}, "ports"),
        ({"host": "a\nlistener 1"}, "host"),
    ],
)
def test_render_config_refuses_what_mosquitto_would_misread(
    tmp_path: Path, overrides: dict[str, Any], field: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        render_config(_config(tmp_path, **overrides))
    assert caught.value.field == field


def test_render_acl_gives_things_their_topics_and_claims_provisioning_only() -> None:
    acl = render_acl(AclRules(claim_templates=("hub", "hub"))).splitlines()
    assert "pattern readwrite $aws/things/%u/#" in acl
    assert "pattern readwrite edgeloop/things/%u/#" in acl
    claim = acl[acl.index("user claim:hub") :]
    assert acl.count("user claim:hub") == 1
    assert "topic deny $aws/things/claim:hub/#" in claim
    assert "topic deny edgeloop/things/claim:hub/#" in claim
    assert "topic write $aws/certificates/create/+" in claim
    assert "topic read $aws/certificates/create/+/accepted" in claim
    assert "topic write $aws/certificates/create-from-csr/+" in claim
    assert "topic read $aws/provisioning-templates/hub/provision/+/rejected" in claim
    assert not any(line.startswith("topic readwrite") for line in claim)
    assert "user" not in render_acl(AclRules())


@pytest.mark.parametrize(
    "rules",
    [
        AclRules(device_patterns=("$aws/things/+/#",)),
        AclRules(device_patterns=("things/%u-x/#",)),
        AclRules(claim_templates=("a b",)),
        AclRules(claim_templates=("x" * 37,)),
    ],
)
def test_render_acl_refuses_rules_that_do_not_name_one_thing(rules: AclRules) -> None:
    with pytest.raises(ValidationError):
        render_acl(rules)


def test_service_acl_and_password_line() -> None:
    assert render_service_acl("svc").splitlines() == [
        "user svc",
        "topic readwrite #",
        "topic readwrite $aws/#",
        "topic readwrite $SYS/#",
    ]
    line = password_line("svc", "secret", salt=b"0123456789ab")
    assert line.startswith("svc:$7$101$MDEyMzQ1Njc4OWFi$") and line.endswith("==\n")


def test_choose_ports_skips_busy_ones() -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        base = held.getsockname()[1] - 1
        ports = choose_ports(base, 2)
    assert base + 1 not in ports
    assert all(base + 1 < port <= base + 200 for port in ports)
    assert len(set(ports)) == 2


def test_check_crl_refuses_foreign_and_garbage(tmp_path: Path) -> None:
    ca = CertificateAuthority.create(tmp_path / "a")
    other = CertificateAuthority.create(tmp_path / "b", name="other")
    assert len(check_crl(ca.crl_chain_pem([]), ca.chain_pem)) == 2
    with pytest.raises(ValidationError, match="not signed by a CA"):
        check_crl(other.crl_pem([]), ca.chain_pem)
    with pytest.raises(ValidationError, match="no PEM"):
        check_crl(b"garbage", ca.chain_pem)


# --- the real broker ---------------------------------------------------------------------


class LoopThread:
    """An asyncio loop in a thread, for the broker, while tests run paho synchronously."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="broker-loop")
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@dataclass
class Pki:
    """The install's CA, and certificate files for the tests' things."""

    folder: Path
    ca: CertificateAuthority
    revoked: list[tuple[int, datetime]] = field(default_factory=list)

    def _files(self, name: str, cert: bytes, key: bytes | None) -> tuple[Path, Path]:
        assert key is not None
        (self.folder / f"{name}.pem").write_bytes(cert)
        (self.folder / f"{name}.key").write_bytes(key)
        return self.folder / f"{name}.pem", self.folder / f"{name}.key"

    def device(self, thing: str) -> Creds:
        issued = self.ca.issue_device_certificate(thing)
        cert, key = self._files(thing, issued.certificate_pem, issued.private_key_pem)
        return Creds(thing, cert, key, issued.serial)

    def claim(self, template: str) -> Creds:
        issued = self.ca.issue_claim_certificate(template)
        name = f"claim-{template}"
        cert, key = self._files(name, issued.certificate_pem, issued.private_key_pem)
        return Creds(f"claim:{template}", cert, key, issued.serial)

    def crl_revoking(self, *creds: Creds) -> bytes:
        self.revoked += [(c.serial, datetime.now(UTC)) for c in creds]
        return self.ca.crl_pem(self.revoked)


@dataclass(frozen=True)
class Creds:
    cn: str
    cert: Path
    key: Path
    serial: int


class Client:
    """A paho client that connects synchronously and queues what it receives."""

    def __init__(
        self,
        broker: Broker,
        pki: Pki,
        *,
        creds: Creds | None = None,
        service: bool = False,
        proto: MQTTProtocolVersion = V5,
        client_id: str | None = None,
        clean: bool = True,
    ) -> None:
        self.proto = proto
        self.clean = clean
        self.messages: queue.Queue[tuple[str, bytes, bool]] = queue.Queue()
        self.subacks: queue.Queue[list[int]] = queue.Queue()
        self.pubacks: dict[int, int] = {}
        self._outcome: queue.Queue[bool] = queue.Queue()
        cid = client_id or unique(creds.cn if creds else "service")
        self.paho = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=cid,
            protocol=proto,
            clean_session=clean if proto is V311 else None,
        )
        self.paho.reconnect_delay_set(1, 1)
        if service:
            login = broker.service_login
            self.paho.username_pw_set(login.username, login.password)
            self.port = login.port
        else:
            self.paho.tls_set(
                ca_certs=str(pki.ca.chain_path),
                certfile=str(creds.cert) if creds else None,
                keyfile=str(creds.key) if creds else None,
            )
            self.port = broker.ports.device
        self.paho.on_connect = self._on_connect
        self.paho.on_connect_fail = lambda *_: self._outcome.put(False)
        self.paho.on_disconnect = lambda *_: self._outcome.put(False)
        self.paho.on_message = lambda _c, _u, m: self.messages.put(
            (m.topic, bytes(m.payload), m.retain)
        )
        self.paho.on_subscribe = lambda _c, _u, _mid, codes, _p: self.subacks.put(
            [int(getattr(code, "value", code)) for code in codes]
        )
        self.paho.on_publish = self._on_publish

    def _on_publish(self, _c: Any, _u: Any, mid: int, code: Any, _p: Any) -> None:
        # paho gives a ReasonCode in MQTT 5, and a placeholder in 3.1.1.
        self.pubacks[mid] = int(code.value) if self.proto is V5 else 0

    def _on_connect(self, _c: Any, _u: Any, _flags: Any, code: Any, _p: Any) -> None:
        self._outcome.put(not code.is_failure)

    def connect(self, timeout: float = 5.0) -> bool:
        """True once CONNACK accepts; False when the handshake or the login is refused."""
        props = None
        if self.proto is V5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = 0 if self.clean else 3600
        try:
            self.paho.connect(
                "127.0.0.1",
                self.port,
                clean_start=self.clean if self.proto is V5 else mqtt.MQTT_CLEAN_START_FIRST_ONLY,
                properties=props,
            )
        except (ssl.SSLError, OSError):
            return False
        self.paho.loop_start()
        try:
            return self._outcome.get(timeout=timeout)
        except queue.Empty:
            return False

    def connected(self) -> Client:
        assert self.connect(), "the client could not connect"
        return self

    def subscribe(self, topic: str, qos: int = 1) -> int:
        self.paho.subscribe(topic, qos)
        return self.subacks.get(timeout=5)[0]

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> int:
        """The PUBACK's reason code (0 for success; MQTT 3.1.1 has no failure code)."""
        info = self.paho.publish(topic, payload, qos=qos, retain=retain)
        info.wait_for_publish(5)
        return self.pubacks.get(info.mid, 0)

    def expect(self, topic: str, timeout: float = 5.0) -> bytes:
        deadline = time.monotonic() + timeout
        while True:
            got_topic, payload, _ = self.messages.get(
                timeout=max(0.01, deadline - time.monotonic())
            )
            if got_topic == topic:
                return payload

    def nothing(self, wait: float = QUIET) -> bool:
        time.sleep(wait)
        return self.messages.empty()

    def alive(self) -> bool:
        return self.paho.is_connected()

    def close(self) -> None:
        self.paho.disconnect()
        self.paho.loop_stop()


@pytest.fixture(scope="module")
def loop() -> Iterator[LoopThread]:
    thread = LoopThread()
    yield thread
    thread.close()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority.create(folder / "ca")
    server = ca.issue_server_certificate(["localhost"], ["127.0.0.1"])
    (folder / "server.pem").write_bytes(server.certificate_pem + server.chain_pem)
    assert server.private_key_pem is not None
    (folder / "server.key").write_bytes(server.private_key_pem)
    return Pki(folder, ca)


CLAIM_TEMPLATE = "factory"


def _broker_config(pki: Pki, data_dir: Path, **overrides: Any) -> BrokerConfig:
    values: dict[str, Any] = {
        "data_dir": data_dir,
        "ca_chain": pki.ca.chain_path,
        "server_cert": pki.folder / "server.pem",
        "server_key": pki.folder / "server.key",
        "acl": AclRules(claim_templates=(CLAIM_TEMPLATE,)),
        "restart_base_delay": 0.05,
        "restart_max_delay": 0.5,
    }
    return BrokerConfig(**(values | overrides))


@pytest.fixture(scope="module")
def broker(
    loop: LoopThread, pki: Pki, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Broker]:
    running = Broker(_broker_config(pki, tmp_path_factory.mktemp("broker")))
    loop.run(running.update_crl(pki.ca.crl_pem([])))
    loop.run(running.start())
    yield running
    loop.run(running.stop())


@pytest.fixture
def clients(broker: Broker, pki: Pki) -> Iterator[list[Client]]:
    made: list[Client] = []
    yield made
    for client in made:
        client.close()


@pytest.fixture
def make(broker: Broker, pki: Pki, clients: list[Client]) -> Any:
    def factory(creds: Creds | None = None, **kwargs: Any) -> Client:
        client = Client(broker, pki, creds=creds, **kwargs)
        clients.append(client)
        return client

    return factory


@BOTH
def test_device_uses_its_own_shadow_topics(make: Any, pki: Pki, proto: MQTTProtocolVersion) -> None:
    me = pki.device(unique("thing"))
    device = make(me, proto=proto).connected()
    assert device.subscribe(f"$aws/things/{me.cn}/shadow/update/accepted") == 1
    assert device.subscribe(f"$aws/things/{me.cn}/shadow/#") == 1
    assert device.publish(f"$aws/things/{me.cn}/shadow/update", b'{"state":{}}') == 0
    assert device.expect(f"$aws/things/{me.cn}/shadow/update") == b'{"state":{}}'
    service = make(service=True).connected()
    service.publish(f"$aws/things/{me.cn}/shadow/update/accepted", b"ok")
    assert device.expect(f"$aws/things/{me.cn}/shadow/update/accepted") == b"ok"


@BOTH
def test_device_cannot_read_or_write_another_things_topics(
    make: Any, pki: Pki, proto: MQTTProtocolVersion
) -> None:
    me, other = pki.device(unique("thing")), pki.device(unique("thing"))
    theirs = f"$aws/things/{other.cn}/shadow/update/delta"
    service = make(service=True).connected()
    service.publish(theirs, b"retained", retain=True)
    device = make(me, proto=proto).connected()
    victim = make(other, proto=proto).connected()
    victim.subscribe(f"$aws/things/{other.cn}/#")
    victim.expect(theirs)  # the retained one
    code = device.subscribe(theirs)
    # Mosquitto's acl_file does not judge SUBSCRIBE (it grants it, 0x01) and checks read
    # access on every message it would deliver instead; a refusal (>= 0x80) is fine too.
    assert code == 1 or code >= 0x80
    device.subscribe("#")
    device.subscribe("$aws/things/+/shadow/#")
    service.publish(theirs, b"for the other thing only")
    assert victim.expect(theirs) == b"for the other thing only"
    assert device.nothing(), "a device received another thing's message"
    # Writing there is refused: MQTT 5 says so in the PUBACK, 3.1.1 drops it silently.
    code = device.publish(f"$aws/things/{other.cn}/shadow/update", b"forged")
    assert code == (0x87 if proto is V5 else 0)
    device.publish(f"edgeloop/things/{other.cn}/telemetry", b"forged")
    assert victim.nothing()


def test_no_client_certificate_is_refused(make: Any) -> None:
    assert not make(None).connect(timeout=3)


def test_service_login_is_needed_on_the_service_listener(broker: Broker, pki: Pki) -> None:
    intruder = Client(broker, pki, service=True)
    intruder.paho.username_pw_set(broker.service_login.username, "wrong")
    try:
        assert not intruder.connect(timeout=3)
    finally:
        intruder.close()


def test_claim_certificate_may_only_provision(make: Any, pki: Pki) -> None:
    claim = make(pki.claim(CLAIM_TEMPLATE)).connected()
    service = make(service=True).connected()
    service.subscribe("#")
    service.subscribe("$aws/#")
    for topic in (
        "$aws/certificates/create/json",
        "$aws/certificates/create-from-csr/json",
        f"$aws/provisioning-templates/{CLAIM_TEMPLATE}/provision/json",
    ):
        assert claim.publish(topic, b"{}") == 0
        assert service.expect(topic) == b"{}"
    for topic in (
        f"$aws/things/claim:{CLAIM_TEMPLATE}/shadow/update",  # %u patterns are denied
        f"edgeloop/things/claim:{CLAIM_TEMPLATE}/telemetry",
        "$aws/things/some-thing/shadow/update",
        "$aws/certificates/create/json/accepted",  # no forged replies to other devices
        "$aws/provisioning-templates/other/provision/json",
        "anything/else",
    ):
        assert claim.publish(topic, b"{}") == 0x87, topic
    assert service.nothing()
    claim.subscribe("$aws/certificates/create/json/accepted")
    claim.subscribe(f"$aws/things/claim:{CLAIM_TEMPLATE}/#")
    service.publish(f"$aws/things/claim:{CLAIM_TEMPLATE}/shadow/get", b"no")
    service.publish("$aws/certificates/create/json/accepted", b"yes")
    assert claim.expect("$aws/certificates/create/json/accepted") == b"yes"
    assert claim.nothing()


def test_claim_of_an_unlisted_template_gets_nothing_until_reloaded(
    make: Any, pki: Pki, broker: Broker, loop: LoopThread
) -> None:
    template = unique("tpl")
    topic = f"$aws/provisioning-templates/{template}/provision/json"
    claim = make(pki.claim(template)).connected()
    assert claim.publish(topic, b"{}") == 0x87
    rules = broker.cfg.acl
    loop.run(broker.reload(acl=AclRules(claim_templates=(*rules.claim_templates, template))))
    # The new ACL applies to the connection already open.
    assert claim.alive()
    assert claim.publish(topic, b"{}") == NO_SUBSCRIBERS  # accepted; nobody listens


def test_service_may_publish_to_any_thing(make: Any, pki: Pki) -> None:
    things = [pki.device(unique("thing")) for _ in range(2)]
    devices = [make(creds, proto=V311).connected() for creds in things]
    for device, creds in zip(devices, things, strict=True):
        device.subscribe(f"$aws/things/{creds.cn}/jobs/notify-next")
        device.subscribe(f"edgeloop/things/{creds.cn}/#")
    service = make(service=True).connected()
    for creds in things:
        service.publish(f"$aws/things/{creds.cn}/jobs/notify-next", creds.cn.encode())
        service.publish(f"edgeloop/things/{creds.cn}/config", b"c")
    for device, creds in zip(devices, things, strict=True):
        assert device.expect(f"$aws/things/{creds.cn}/jobs/notify-next") == creds.cn.encode()
        assert device.expect(f"edgeloop/things/{creds.cn}/config") == b"c"


def test_revoked_certificate_is_refused_after_a_reload_others_connect(
    make: Any, pki: Pki, broker: Broker, loop: LoopThread
) -> None:
    revoked, kept = pki.device(unique("thing")), pki.device(unique("thing"))
    held = make(revoked).connected()
    pid = broker.pid
    loop.run(broker.update_crl(pki.crl_revoking(revoked), keep_connections=True))
    assert broker.pid == pid  # a SIGHUP, no restart
    assert not make(revoked).connect(timeout=3)
    assert make(kept).connect()
    # What a reload does not do: a connection opened before the revocation stays open.
    assert held.alive()


def test_revocation_by_default_restarts_and_cuts_the_revoked_connection(
    make: Any, pki: Pki, broker: Broker, loop: LoopThread
) -> None:
    revoked, kept = pki.device(unique("thing")), pki.device(unique("thing"))
    held = make(revoked).connected()
    other = make(kept).connected()
    pid = broker.pid
    loop.run(broker.update_crl(pki.crl_revoking(revoked)))
    assert broker.pid != pid
    deadline = time.monotonic() + 5
    while (held.alive() or not other.alive()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not held.alive(), "the revoked device is still connected (paho retries; refused)"
    assert other.alive(), "the other device did not reconnect"
    assert not make(revoked).connect(timeout=3)


def test_kill_9_is_survived_retained_and_queued_messages_kept(
    make: Any, pki: Pki, broker: Broker, loop: LoopThread
) -> None:
    # One device per protocol: the broker names a device's session after its CN.
    devices = {proto: pki.device(unique("thing")) for proto in (V5, V311)}
    for proto, device in devices.items():
        session = make(device, proto=proto, clean=False).connected()
        session.subscribe(f"$aws/things/{device.cn}/jobs/notify")
        session.close()
    me = devices[V5]
    service = make(service=True).connected()
    for device in devices.values():
        service.publish(f"$aws/things/{device.cn}/jobs/notify", b"queued while away")
    service.publish(f"edgeloop/things/{me.cn}/birth", b"online", retain=True)
    # Mosquitto acks a QoS 1 PUBLISH before its autosave, which comes a moment later.
    time.sleep(0.2)
    pid, restarts = broker.pid, broker.restarts
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    loop.run(broker.wait_running())
    assert broker.pid != pid and broker.restarts == restarts + 1
    for proto, device in devices.items():
        back = make(device, proto=proto, clean=False)
        assert back.connect()
        assert back.expect(f"$aws/things/{device.cn}/jobs/notify") == b"queued while away"
    fresh = make(me).connected()
    fresh.subscribe(f"edgeloop/things/{me.cn}/birth")
    assert fresh.expect(f"edgeloop/things/{me.cn}/birth") == b"online"


def test_start_names_the_port_in_use_and_quotes_mosquitto(
    loop: LoopThread, pki: Pki, tmp_path: Path
) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        busy = held.getsockname()[1]
        free = choose_ports(0, 1)[0]
        cfg = _broker_config(pki, tmp_path / "b", device_port=busy, service_port=free)
        broker = Broker(cfg)
        loop.run(broker.update_crl(pki.ca.crl_pem([])))
        with pytest.raises(CloudError) as caught:
            loop.run(broker.start())
    message = str(caught.value)
    assert f"127.0.0.1:{busy}" in message and "address already in use" in message
    assert "mosquitto's log ends" in message and "Address already in use" in message
    assert broker.pid is None


def test_a_folder_has_one_broker_and_a_restart_keeps_its_ports(
    loop: LoopThread, pki: Pki, tmp_path: Path
) -> None:
    cfg = _broker_config(pki, tmp_path / "b")
    first = Broker(cfg)
    with pytest.raises(CloudError, match="no such file"):
        loop.run(first.start())  # no CRL yet
    loop.run(first.update_crl(pki.ca.crl_pem([])))
    ports = loop.run(first.start())
    try:
        with pytest.raises(CloudError, match="another edgeloop broker"):
            loop.run(Broker(cfg).start())
    finally:
        loop.run(first.stop())
    again = Broker(cfg)
    assert loop.run(again.start()) == ports
    loop.run(again.stop())


def test_restart_backoff_is_capped_and_jittered(tmp_path: Path) -> None:
    broker = Broker(_config(tmp_path, restart_base_delay=0.1, restart_max_delay=1.0))
    delays = [broker._backoff(failures) for failures in range(1, 12) for _ in range(20)]
    assert min(delays) >= 0.05 and max(delays) <= 1.0
    late = [broker._backoff(11) for _ in range(50)]
    assert min(late) >= 0.5 and len(set(late)) > 1


def test_start_without_mosquitto_says_how_to_get_it(
    loop: LoopThread, pki: Pki, tmp_path: Path
) -> None:
    broker = Broker(_broker_config(pki, tmp_path / "b", executable=str(tmp_path / "nope")))
    loop.run(broker.update_crl(pki.ca.crl_pem([])))
    with pytest.raises(CloudError, match=r"cannot run .*make setup"):
        loop.run(broker.start())
