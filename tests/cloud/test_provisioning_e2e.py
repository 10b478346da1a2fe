"""Provisioning by claim end to end: `cloud up`, a claim made through the REST API, and
real hub agent processes that trade it for their own thing and certificate, then connect."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from paho.mqtt.enums import CallbackAPIVersion

from edgeloop.cloud.provisioning import ClientIdentity, ProvisioningService, rotate_topic
from tests.cloud.test_cloud_up import RunningCloud
from tests.edge.conftest import FAST_RESTARTS, Hub

HOOK = """\
import json, sys
request = json.load(sys.stdin)
serial = request["parameters"].get("SerialNumber", "")
if serial.startswith("stolen-"):
    print(json.dumps({"allowProvisioning": False, "reason": f"serial {serial} is not ours"}))
else:
    print(json.dumps({"allowProvisioning": True}))
"""


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningCloud]:
    running = RunningCloud(tmp_path_factory.mktemp("cloud") / "data")
    yield running
    running.close()


class ClaimHub(Hub):
    """A hub with only a claim: its thing name comes from the certificate it gets."""

    def start(self, *, wait: bool = False) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edgeloop.edge.agent", "--root", str(self.root)],
            stdout=subprocess.DEVNULL,
            stderr=open(self.root / "agent.stderr", "ab"),  # noqa: SIM115
        )

    def stderr(self) -> str:
        path = self.root / "agent.stderr"
        return path.read_text() if path.exists() else ""


def eventually(check: Callable[[], Any], what: str, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not in {timeout} s: {what}")
        time.sleep(0.1)


def _claim(cloud: RunningCloud, folder: Path, template: str) -> tuple[Path, Path]:
    answer = cloud.api.post("/claims", json={"template": template})
    assert answer.status_code == 201, answer.text
    claim = answer.json()
    cert, key = folder / "claim.pem", folder / "claim.key"
    cert.write_text(claim["certificatePem"])
    key.write_text(claim["privateKeyPem"])
    return cert, key


def _hub(
    cloud: RunningCloud, folder: Path, claim: tuple[Path, Path], template: str, serial: str
) -> ClaimHub:
    settings = {
        "restart": dict(FAST_RESTARTS),
        "stop_grace": 2.0,
        "cloud": {
            "endpoint": f"{cloud.endpoints['mqtt']['host']}:{cloud.endpoints['mqtt']['port']}",
            "ca": cloud.endpoints["caFile"],
            "keepalive": 5,
            "reconnect_max": 1,
            "claim": {
                "cert": str(claim[0]),
                "key": str(claim[1]),
                "template": template,
                "parameters": {"SerialNumber": serial},
            },
        },
    }
    folder.mkdir(parents=True)
    return ClaimHub(folder / "hub", settings)


def _connected(cloud: RunningCloud, thing: str) -> bool:
    answer = cloud.api.get(f"/things/{thing}")
    if answer.status_code != 200:
        return False
    info = answer.json()["connectivity"]
    return bool(info and info["connected"])


def test_hubs_provision_by_claim_rotate_and_go_online(cloud: RunningCloud, tmp_path: Path) -> None:
    template = f"fleet-{uuid.uuid4().hex[:8]}"
    hook = tmp_path / "hook.py"
    hook.write_text(HOOK)
    ctx = cloud.cloud.ctx
    assert ctx is not None
    # The REST API makes templates without a hook; this one is made first, with one.
    ctx.registry.create_claim_template(template, hook=f"{sys.executable} {hook}")
    claim = _claim(cloud, tmp_path, template)
    acl = Path(cloud.endpoints["dataDir"]) / "broker" / "device.acl"
    eventually(lambda: f"user claim:{template}" in acl.read_text(), "the broker admits the claim")

    # A holder of another template's claim listens wherever answers could reach it. (Holders
    # of one claim share its connection name, the broker making the CN the client id: they
    # take the connection from each other, and a hub retries its exchange.)
    other = f"fleet-{uuid.uuid4().hex[:8]}"
    (tmp_path / "other").mkdir()
    other_claim = _claim(cloud, tmp_path / "other", other)
    eventually(lambda: f"user claim:{other}" in acl.read_text(), "the broker admits the other")
    eavesdropper = _Listener(cloud, other_claim, f"claim-{other}-listener")
    eavesdropper.subscribe(
        "$aws/certificates/create-from-csr/json/accepted",
        f"$aws/provisioning-templates/{template}/provision/json/accepted",
        "edgeloop/replies/#",
    )
    serials = [f"sn-{uuid.uuid4().hex[:6]}" for _ in range(3)]
    hubs = [_hub(cloud, tmp_path / s, claim, template, s) for s in serials]
    refused = _hub(cloud, tmp_path / "stolen", claim, template, "stolen-1")
    try:
        for hub in [*hubs, refused]:
            hub.start()

        for hub, serial in zip(hubs, serials, strict=True):
            thing = f"{template}-{serial}"
            eventually(lambda: _connected(cloud, thing), f"{thing} online")  # noqa: B023
            root = hub.root
            for name in ("device.cert.pem", "device.key.pem"):
                assert stat.S_IMODE((root / name).stat().st_mode) == 0o600
            cloud_settings = json.loads((root / "agent.json").read_text())["cloud"]
            assert cloud_settings["cert"] == "device.cert.pem"
            assert cloud_settings["key"] == "device.key.pem"

            pem = (root / "device.cert.pem").read_bytes()
            cert = x509.load_pem_x509_certificate(pem)
            cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
            assert cn == thing
            certificate_id = cert.fingerprint(hashes.SHA256()).hex()
            recorded = cloud.api.get(f"/certificates/{certificate_id}").json()
            assert (recorded["thingName"], recorded["status"]) == (thing, "ACTIVE")
            details = cloud.api.get(f"/things/{thing}").json()
            assert details["attributes"]["SerialNumber"] == serial
            # The interim certificate (CN cert:<hex>) was traded in and is INACTIVE now.
            statuses = {
                c.certificate_id: c.status for c in ctx.registry.list_certificates(thing=thing)
            }
            assert statuses[certificate_id] == "ACTIVE"
            assert {s for i, s in statuses.items() if i != certificate_id} == {"INACTIVE"}
            assert hub.call("status")["thingName"] == thing

        assert refused.proc is not None
        assert refused.proc.wait(30) == 1
        assert "pre-provisioning hook refused provisioning: serial stolen-1 is not ours" in (
            refused.stderr()
        )
        assert not (refused.root / "device.cert.pem").exists()
        assert "claim" in json.loads((refused.root / "agent.json").read_text())["cloud"]
        assert cloud.api.get(f"/things/{template}-stolen-1").status_code == 404

        # The hubs' answers went to their private reply topics: the eavesdropper saw none,
        # though a request of its own without a response topic is answered where it listens.
        assert eavesdropper.received == []
        eavesdropper.client.publish(
            "$aws/certificates/create-from-csr/json",
            json.dumps({"certificateSigningRequest": _csr()}),
            qos=1,
        )
        topic, document = eventually(
            lambda: eavesdropper.received and eavesdropper.received[-1], "the shared answer"
        )
        assert topic == "$aws/certificates/create-from-csr/json/accepted"
        assert "certificateOwnershipToken" in document
    finally:
        eavesdropper.close()
        for hub in [*hubs, refused]:
            hub.stop()


class _Listener:
    """A paho MQTT 5 client with a claim certificate, recording what it receives."""

    def __init__(self, cloud: RunningCloud, claim: tuple[Path, Path], client_id: str) -> None:
        self.received: list[tuple[str, dict[str, Any]]] = []
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
        )
        self.client.tls_set(
            ca_certs=cloud.endpoints["caFile"], certfile=str(claim[0]), keyfile=str(claim[1])
        )
        self.client.on_message = lambda c, u, m: self.received.append(
            (m.topic, json.loads(m.payload))
        )
        subscribed: list[Any] = []
        self.client.on_subscribe = lambda c, u, mid, codes, props: subscribed.append(codes)
        self._subscribed = subscribed
        self.client.connect(cloud.endpoints["mqtt"]["host"], cloud.endpoints["mqtt"]["port"])
        self.client.loop_start()

    def subscribe(self, *topics: str) -> None:
        self.client.subscribe([(topic, 1) for topic in topics])
        eventually(lambda: self._subscribed, "the SUBACK", timeout=10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_create_keys_is_refused_and_claims_cannot_rotate(
    cloud: RunningCloud, tmp_path: Path
) -> None:
    template = f"fleet-{uuid.uuid4().hex[:8]}"
    cert, key = _claim(cloud, tmp_path, template)
    acl = Path(cloud.endpoints["dataDir"]) / "broker" / "device.acl"
    eventually(lambda: f"user claim:{template}" in acl.read_text(), "the broker admits the claim")
    received: list[tuple[str, dict[str, Any]]] = []
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=f"claim-{template}", protocol=mqtt.MQTTv5
    )
    client.tls_set(ca_certs=cloud.endpoints["caFile"], certfile=str(cert), keyfile=str(key))
    published: list[Any] = []

    def on_message(c: Any, u: Any, m: Any) -> None:
        received.append((m.topic, json.loads(m.payload)))

    def on_publish(c: Any, u: Any, mid: int, reason: Any, props: Any) -> None:
        published.append(reason)

    client.on_message = on_message
    client.on_publish = on_publish
    client.connect(cloud.endpoints["mqtt"]["host"], cloud.endpoints["mqtt"]["port"])
    client.loop_start()
    try:
        client.subscribe("$aws/certificates/create/json/rejected", qos=1)
        time.sleep(0.3)
        client.publish("$aws/certificates/create/json", b"{}", qos=1)
        topic, document = eventually(lambda: received and received[-1], "an answer")
        assert topic == "$aws/certificates/create/json/rejected"
        assert document["statusCode"] == 403
        assert "create-from-csr" in document["errorMessage"]
        # A claim may not use a rotate topic (its own CN's included).
        client.publish(f"edgeloop/certificates/claim:{template}/rotate", b"{}", qos=1)
        eventually(lambda: len(published) == 2, "the PUBACK")
        assert published[-1].is_failure
    finally:
        client.disconnect()
        client.loop_stop()


def _csr() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "anything")]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def test_rotation_is_once_per_interim_certificate_and_for_its_own_cn(
    cloud: RunningCloud,
) -> None:
    ctx = cloud.cloud.ctx
    assert ctx is not None
    template = f"fleet-{uuid.uuid4().hex[:8]}"
    ctx.registry.create_claim_template(template)
    sent: list[tuple[str, dict[str, Any]]] = []
    service = ProvisioningService(ctx, lambda t, p: sent.append((t, json.loads(p))))
    claim = ClientIdentity("claim", template)

    def ask(topic: str, body: dict[str, Any], client: ClientIdentity) -> dict[str, Any]:
        assert service.handle(topic, json.dumps(body).encode(), client=client)
        return {"outcome": sent[-1][0].rsplit("/", 1)[-1], **sent[-1][1]}

    created = ask(
        "$aws/certificates/create-from-csr/json", {"certificateSigningRequest": _csr()}, claim
    )
    cn = x509.load_pem_x509_certificate(created["certificatePem"].encode()).subject
    interim = str(cn.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)
    assert interim.startswith("cert:")
    rotate = {"certificateId": created["certificateId"], "certificateSigningRequest": _csr()}
    # Not provisioned yet: the certificate is not recorded.
    assert ask(rotate_topic(interim), rotate, ClientIdentity("thing", interim))["outcome"] == (
        "rejected"
    )
    provisioned = ask(
        f"$aws/provisioning-templates/{template}/provision/json",
        {
            "certificateOwnershipToken": created["certificateOwnershipToken"],
            "parameters": {"SerialNumber": "1"},
        },
        claim,
    )
    thing = provisioned["thingName"]
    # Another certificate's CN, a thing's name, or a claim: refused.
    other = "cert:" + "0" * 32
    for topic, client in [
        (rotate_topic(other), ClientIdentity("thing", other)),
        (rotate_topic(thing), ClientIdentity("thing", thing)),
        (rotate_topic(interim), ClientIdentity("claim", template)),
    ]:
        answer = ask(topic, rotate, client)
        assert (answer["outcome"], answer["statusCode"]) == ("rejected", 403), answer
    answer = ask(rotate_topic(interim), rotate, ClientIdentity("thing", interim))
    assert answer["outcome"] == "accepted" and answer["thingName"] == thing
    assert ctx.registry.get_certificate(created["certificateId"]).status == "INACTIVE"
    assert ctx.registry.get_certificate(answer["certificateId"]).status == "ACTIVE"
    again = ask(rotate_topic(interim), rotate, ClientIdentity("thing", interim))
    assert (again["outcome"], again["statusCode"]) == ("rejected", 403)
    assert "INACTIVE" in again["errorMessage"]


def test_claim_settings_name_the_field_that_is_wrong(tmp_path: Path) -> None:
    from edgeloop.core.errors import ValidationError
    from edgeloop.edge.settings import AgentSettings

    (tmp_path / "ca.pem").write_text("x")
    claim: dict[str, Any] = {"cert": "claim.pem", "key": "claim.key", "template": "t"}
    cloud = {"endpoint": "127.0.0.1:1", "ca": "ca.pem", "claim": claim}
    (tmp_path / "agent.json").write_text(json.dumps({"cloud": cloud}))
    with pytest.raises(ValidationError, match=r"claim\.pem is not a file") as err:
        AgentSettings.load(tmp_path)
    assert err.value.field == "cloud.claim.cert"
    (tmp_path / "claim.pem").write_text("x")
    (tmp_path / "claim.key").write_text("x")
    claim["parameters"] = {"SerialNumber": 7}
    (tmp_path / "agent.json").write_text(json.dumps({"cloud": cloud}))
    with pytest.raises(ValidationError) as err:
        AgentSettings.load(tmp_path)
    assert err.value.field == "cloud.claim.parameters"
