"""Provisioning by claim on AWS IoT's fleet-provisioning topics, driven by the official
``awsiot.iotidentity`` client over a loopback connection (no broker: the service's MQTT
wiring is not this module's), and by raw payloads for the refusals."""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
from awscrt import mqtt
from awsiot import iotidentity
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from edgeloop.cloud.context import CloudContext
from edgeloop.cloud.db import Database
from edgeloop.cloud.objectstore import open_object_store
from edgeloop.cloud.pki import CertificateAuthority
from edgeloop.cloud.provisioning import (
    PROVISIONAL_CN_PREFIX,
    ClientIdentity,
    HookDecision,
    ProvisioningService,
    TemplateRules,
    command_hook,
    parse_decision,
    parse_request_topic,
)
from edgeloop.cloud.registry import Registry
from edgeloop.core.errors import CloudError, NotFoundError, ValidationError
from edgeloop.core.shadowbook import ShadowBook

CREATE = "$aws/certificates/create/json"
CREATE_CSR = "$aws/certificates/create-from-csr/json"


def provision_topic(template: str) -> str:
    return f"$aws/provisioning-templates/{template}/provision/json"


# -- fixtures ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority.create(tmp_path_factory.mktemp("ca") / "ca")


@pytest.fixture
def sqlite_registry(tmp_path: Path) -> Registry:
    """Most tests are about the protocol: SQLite is enough (the exchange runs on both)."""
    db = Database(f"sqlite:///{tmp_path / 'edgeloop.db'}")
    db.migrate()
    return Registry(db)


def _context(registry: Registry, ca: CertificateAuthority, data_dir: Path) -> CloudContext:
    return CloudContext(
        data_dir=data_dir,
        db=registry.db,
        registry=registry,
        ca=ca,
        shadows=ShadowBook(registry.shadow_storage()),
        objects=open_object_store(data_dir),
    )


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


class Wire:
    """A service, what it published, and a way to send it raw requests."""

    def __init__(self, ctx: CloudContext, **options: Any) -> None:
        self.ctx = ctx
        self.clock = Clock()
        self.sent: list[tuple[str, dict[str, Any]]] = []
        self.service = ProvisioningService(
            ctx,
            lambda topic, payload: self.sent.append((topic, json.loads(payload))),
            clock=self.clock,
            **options,
        )

    def send(
        self, topic: str, body: Mapping[str, Any] | bytes, client: ClientIdentity
    ) -> tuple[str, dict[str, Any]]:
        """The one answer to a request: ("accepted" | "rejected", document)."""
        payload = body if isinstance(body, bytes) else json.dumps(body).encode()
        before = len(self.sent)
        assert self.service.handle(topic, payload, client=client)
        assert len(self.sent) == before + 1
        answer_topic, document = self.sent[-1]
        assert answer_topic.startswith(topic + "/")
        return answer_topic.removeprefix(topic + "/"), document

    def create(self, client: ClientIdentity) -> dict[str, Any]:
        outcome, document = self.send(CREATE, {}, client)
        assert outcome == "accepted", document
        return document

    def provision(
        self, template: str, token: str, parameters: Mapping[str, str], client: ClientIdentity
    ) -> tuple[str, dict[str, Any]]:
        body = {"certificateOwnershipToken": token, "parameters": dict(parameters)}
        return self.send(provision_topic(template), body, client)


@pytest.fixture
def template() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def wire(
    sqlite_registry: Registry, ca: CertificateAuthority, tmp_path: Path, template: str
) -> Wire:
    sqlite_registry.create_claim_template(template)
    return Wire(_context(sqlite_registry, ca, tmp_path))


def _claim(template: str) -> ClientIdentity:
    return ClientIdentity("claim", template)


def _rejected(outcome: tuple[str, dict[str, Any]], status: int, code: str) -> str:
    """The message of a rejection, after checking it parses as the SDK's ErrorResponse."""
    kind, document = outcome
    assert kind == "rejected", document
    error = iotidentity.ErrorResponse.from_payload(document)
    assert (error.status_code, error.error_code) == (status, code), document
    assert set(document) == {"statusCode", "errorCode", "errorMessage"}
    assert isinstance(error.error_message, str)
    return error.error_message


# -- the official SDK client over a loopback connection ----------------------------------


class LoopbackConnection(mqtt.Connection):  # type: ignore[misc]  # awscrt ships no types
    """An awscrt MQTT connection that hands publishes to the service and delivers its
    answers to the client's subscriptions, as a broker would for one client."""

    def __init__(self, service: ProvisioningService, client: ClientIdentity) -> None:
        # Deliberately no super().__init__: nothing here talks to the native client.
        self.service = service
        self.client = client
        self.subscriptions: dict[str, Callable[..., None]] = {}

    def deliver(self, topic: str, payload: bytes) -> None:
        callback = self.subscriptions.get(topic)
        if callback is not None:
            callback(
                topic=topic, payload=payload, dup=False, qos=mqtt.QoS.AT_LEAST_ONCE, retain=False
            )

    def subscribe(self, topic: str, qos: Any, callback: Any = None) -> tuple[Future[Any], int]:
        self.subscriptions[topic] = callback
        done: Future[Any] = Future()
        done.set_result({"packet_id": 1, "topic": topic, "qos": qos})
        return done, 1

    def publish(
        self, topic: str, payload: Any, qos: Any, retain: bool = False
    ) -> tuple[Future[Any], int]:
        data = payload.encode() if isinstance(payload, str) else bytes(payload)
        assert self.service.handle(topic, data, client=self.client)
        done: Future[Any] = Future()
        done.set_result({"packet_id": 2})
        return done, 2


def _sdk_client(
    ctx: CloudContext, template: str, **options: Any
) -> tuple[iotidentity.IotIdentityClient, dict[str, list[Any]]]:
    """An IotIdentityClient subscribed to every answer topic; answers land in ``got``."""
    holder: list[LoopbackConnection] = []
    service = ProvisioningService(
        ctx, lambda topic, payload: holder[0].deliver(topic, payload), **options
    )
    connection = LoopbackConnection(service, _claim(template))
    holder.append(connection)
    client = iotidentity.IotIdentityClient(connection)
    got: dict[str, list[Any]] = {}

    def collect(key: str) -> Callable[[Any], None]:
        return lambda response: got.setdefault(key, []).append(response)

    qos = mqtt.QoS.AT_LEAST_ONCE
    create = iotidentity.CreateKeysAndCertificateSubscriptionRequest()
    csr = iotidentity.CreateCertificateFromCsrSubscriptionRequest()
    register = iotidentity.RegisterThingSubscriptionRequest(template_name=template)
    client.subscribe_to_create_keys_and_certificate_accepted(create, qos, collect("create"))
    client.subscribe_to_create_keys_and_certificate_rejected(create, qos, collect("error"))
    client.subscribe_to_create_certificate_from_csr_accepted(csr, qos, collect("csr"))
    client.subscribe_to_create_certificate_from_csr_rejected(csr, qos, collect("error"))
    client.subscribe_to_register_thing_accepted(register, qos, collect("register"))
    client.subscribe_to_register_thing_rejected(register, qos, collect("error"))
    return client, got


def _csr(key: ec.EllipticCurvePrivateKey) -> str:
    request = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "factory-unit")]))
        .sign(key, hashes.SHA256())
    )
    return request.public_bytes(serialization.Encoding.PEM).decode()


def _public_der(key: Any) -> bytes:
    return key.public_key().public_bytes(  # type: ignore[no-any-return]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def test_the_sdk_creates_keys_and_registers_a_thing(
    registry: Registry, ca: CertificateAuthority, tmp_path: Path, template: str
) -> None:
    """The whole exchange with the official client, on SQLite and on PostgreSQL."""
    registry.create_claim_template(template)
    ctx = _context(registry, ca, tmp_path)
    client, got = _sdk_client(ctx, template)
    qos = mqtt.QoS.AT_LEAST_ONCE

    client.publish_create_keys_and_certificate(
        iotidentity.CreateKeysAndCertificateRequest(), qos
    ).result(1)
    assert "error" not in got
    created = got["create"][0]
    assert isinstance(created, iotidentity.CreateKeysAndCertificateResponse)
    cert = x509.load_pem_x509_certificate(created.certificate_pem.encode())
    key = serialization.load_pem_private_key(created.private_key.encode(), password=None)
    assert _public_der(key) == cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    identity = ca.identify(created.certificate_pem.encode())
    assert identity.certificate_id == created.certificate_id
    assert identity.kind == "thing" and identity.name.startswith(PROVISIONAL_CN_PREFIX)
    # Pending: unknown to the registry, so not active anywhere that asks it.
    assert not registry.is_active(created.certificate_id)
    with pytest.raises(NotFoundError):
        registry.get_certificate(created.certificate_id)

    client.publish_register_thing(
        iotidentity.RegisterThingRequest(
            template_name=template,
            certificate_ownership_token=created.certificate_ownership_token,
            parameters={"SerialNumber": "SN-001", "model": "pi4"},
        ),
        qos,
    ).result(1)
    assert "error" not in got
    registered = got["register"][0]
    assert isinstance(registered, iotidentity.RegisterThingResponse)
    assert registered.thing_name == f"{template}-SN-001"
    assert registered.device_configuration == {}

    thing = registry.get_thing(registered.thing_name)
    assert thing.attributes == {
        "SerialNumber": "SN-001",
        "model": "pi4",
        "provisioningTemplate": template,
    }
    certificate = registry.get_certificate(created.certificate_id)
    assert (certificate.thing, certificate.status, certificate.kind) == (
        registered.thing_name,
        "ACTIVE",
        "device",
    )
    kinds = {(event.kind, event.subject) for event in registry.events(limit=250)}
    assert ("thing.created", registered.thing_name) in kinds
    assert ("certificate.recorded", created.certificate_id) in kinds


def test_the_sdk_creates_from_a_csr_and_registers_a_thing(
    sqlite_registry: Registry, ca: CertificateAuthority, tmp_path: Path, template: str
) -> None:
    sqlite_registry.create_claim_template(template)
    ctx = _context(sqlite_registry, ca, tmp_path)
    client, got = _sdk_client(ctx, template)
    qos = mqtt.QoS.AT_LEAST_ONCE
    key = ec.generate_private_key(ec.SECP256R1())

    client.publish_create_certificate_from_csr(
        iotidentity.CreateCertificateFromCsrRequest(certificate_signing_request=_csr(key)), qos
    ).result(1)
    assert "error" not in got
    created = got["csr"][0]
    assert isinstance(created, iotidentity.CreateCertificateFromCsrResponse)
    cert = x509.load_pem_x509_certificate(created.certificate_pem.encode())
    assert cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) == _public_der(key)
    assert created.certificate_id == cert.fingerprint(hashes.SHA256()).hex()

    client.publish_register_thing(
        iotidentity.RegisterThingRequest(
            template_name=template,
            certificate_ownership_token=created.certificate_ownership_token,
            parameters={"thingName": "boiler-7"},
        ),
        qos,
    ).result(1)
    assert got["register"][0].thing_name == "boiler-7"
    assert sqlite_registry.get_certificate(created.certificate_id).thing == "boiler-7"


def test_accepted_payloads_have_exactly_aws_fields(wire: Wire, template: str) -> None:
    created = wire.create(_claim(template))
    assert set(created) == {
        "certificateId",
        "certificatePem",
        "privateKey",
        "certificateOwnershipToken",
    }
    parsed = iotidentity.CreateKeysAndCertificateResponse.from_payload(created)
    assert parsed.private_key == created["privateKey"]
    outcome, document = wire.provision(
        template, created["certificateOwnershipToken"], {"SerialNumber": "1"}, _claim(template)
    )
    assert outcome == "accepted"
    assert set(document) == {"deviceConfiguration", "thingName"}
    key = ec.generate_private_key(ec.SECP256R1())
    outcome, from_csr = wire.send(
        CREATE_CSR, {"certificateSigningRequest": _csr(key)}, _claim(template)
    )
    assert outcome == "accepted"
    assert set(from_csr) == {"certificateId", "certificatePem", "certificateOwnershipToken"}


# -- tokens ------------------------------------------------------------------------------


def test_an_ownership_token_is_single_use(wire: Wire, template: str) -> None:
    claim = _claim(template)
    token = wire.create(claim)["certificateOwnershipToken"]
    assert wire.provision(template, token, {"SerialNumber": "A"}, claim)[0] == "accepted"
    message = _rejected(
        wire.provision(template, token, {"SerialNumber": "B"}, claim),
        400,
        "InvalidCertificateOwnershipToken",
    )
    assert "already used" in message
    with pytest.raises(NotFoundError):
        wire.ctx.registry.get_thing(f"{template}-B")


def test_an_ownership_token_expires(wire: Wire, template: str) -> None:
    claim = _claim(template)
    created = wire.create(claim)
    assert wire.service.pending_count == 1
    wire.clock.now += 300
    message = _rejected(
        wire.provision(
            template, created["certificateOwnershipToken"], {"SerialNumber": "A"}, claim
        ),
        400,
        "InvalidCertificateOwnershipToken",
    )
    assert "expired" in message or "unknown" in message
    assert wire.service.pending_count == 0
    assert not wire.ctx.registry.is_active(created["certificateId"])


def test_a_token_works_until_just_before_its_ttl(wire: Wire, template: str) -> None:
    claim = _claim(template)
    token = wire.create(claim)["certificateOwnershipToken"]
    wire.clock.now += 299.5
    assert wire.provision(template, token, {"SerialNumber": "A"}, claim)[0] == "accepted"


@pytest.mark.parametrize("token", ["", None, 42])
def test_an_empty_or_missing_token_is_refused_as_aws_does(
    wire: Wire, template: str, token: object
) -> None:
    body = {"parameters": {"SerialNumber": "A"}}
    if token is not None:
        body["certificateOwnershipToken"] = token  # type: ignore[assignment]
    message = _rejected(
        wire.send(provision_topic(template), body, _claim(template)),
        400,
        "InvalidCertificateOwnershipToken",
    )
    assert message == "Certificate ownership token cannot be empty."


def test_an_unknown_token_is_refused(wire: Wire, template: str) -> None:
    _rejected(
        wire.provision(template, "forged", {"SerialNumber": "A"}, _claim(template)),
        400,
        "InvalidCertificateOwnershipToken",
    )


def test_too_many_pending_certificates_are_throttled(
    sqlite_registry: Registry, ca: CertificateAuthority, tmp_path: Path, template: str
) -> None:
    sqlite_registry.create_claim_template(template)
    wire = Wire(_context(sqlite_registry, ca, tmp_path), max_pending=2)
    wire.create(_claim(template))
    wire.create(_claim(template))
    _rejected(wire.send(CREATE, {}, _claim(template)), 429, "Throttling")
    wire.clock.now += 301  # the first two expire and make room
    assert wire.send(CREATE, {}, _claim(template))[0] == "accepted"


# -- who may ask -------------------------------------------------------------------------


def test_a_claim_may_provision_only_through_its_own_template(wire: Wire, template: str) -> None:
    other = f"{template}x"
    wire.ctx.registry.create_claim_template(other)
    token = wire.create(_claim(template))["certificateOwnershipToken"]
    message = _rejected(
        wire.provision(other, token, {"SerialNumber": "A"}, _claim(template)),
        403,
        "InvalidTemplate",
    )
    assert template in message and other in message
    # A claim of the other template cannot use this template's token either.
    message = _rejected(
        wire.provision(other, token, {"SerialNumber": "A"}, _claim(other)),
        400,
        "InvalidCertificateOwnershipToken",
    )
    assert repr(template) in message
    # The token is still good where it belongs.
    assert wire.provision(template, token, {"SerialNumber": "A"}, _claim(template))[0] == (
        "accepted"
    )


def test_an_unregistered_template_is_refused(wire: Wire) -> None:
    message = _rejected(wire.send(CREATE, {}, _claim("nosuch")), 404, "InvalidTemplate")
    assert "'nosuch' is not registered" in message
    _rejected(
        wire.provision("nosuch", "t", {"SerialNumber": "A"}, _claim("nosuch")),
        404,
        "InvalidTemplate",
    )


def test_a_thing_identity_may_not_create_or_provision(wire: Wire, template: str) -> None:
    wire.ctx.registry.create_thing("hub-1")
    thing = ClientIdentity("thing", "hub-1")
    token = wire.create(_claim(template))["certificateOwnershipToken"]
    for topic, body in (
        (CREATE, {}),
        (CREATE_CSR, {"certificateSigningRequest": "x"}),
        (provision_topic(template), {"certificateOwnershipToken": token, "parameters": {}}),
    ):
        message = _rejected(wire.send(topic, body, thing), 403, "Unauthorized")
        assert "only a claim certificate" in message and "'hub-1'" in message
    assert wire.ctx.registry.list_certificates() == []


def test_a_claim_certificate_named_by_id_must_be_an_active_claim(
    wire: Wire, template: str, ca: CertificateAuthority
) -> None:
    issued = ca.issue_claim_certificate(template)
    wire.ctx.registry.record_certificate(issued.certificate_pem, kind="claim")
    claim = ClientIdentity("claim", template, issued.certificate_id)
    assert wire.send(CREATE, {}, claim)[0] == "accepted"
    wire.ctx.registry.revoke_certificate(issued.certificate_id)
    message = _rejected(wire.send(CREATE, {}, claim), 403, "Unauthorized")
    assert "REVOKED" in message
    unknown = ClientIdentity("claim", template, "ab" * 32)
    _rejected(wire.send(CREATE, {}, unknown), 403, "Unauthorized")


def test_a_claim_of_unknown_template_may_create_when_the_transport_cannot_tell(
    wire: Wire, template: str
) -> None:
    created = wire.create(ClientIdentity("claim", ""))
    outcome = wire.provision(
        template, created["certificateOwnershipToken"], {"SerialNumber": "A"}, _claim(template)
    )
    assert outcome[0] == "accepted"


# -- naming and attributes ---------------------------------------------------------------


def test_reprovisioning_a_serial_returns_the_same_thing(
    registry: Registry, ca: CertificateAuthority, tmp_path: Path, template: str
) -> None:
    """A factory-reset device provisions again: same thing, new certificate attached."""
    registry.create_claim_template(template)
    wire = Wire(_context(registry, ca, tmp_path))
    claim = _claim(template)
    first = wire.create(claim)
    outcome, answer = wire.provision(
        template, first["certificateOwnershipToken"], {"SerialNumber": "S1", "fw": "1"}, claim
    )
    assert outcome == "accepted"
    second = wire.create(claim)
    outcome, again = wire.provision(
        template, second["certificateOwnershipToken"], {"SerialNumber": "S1", "fw": "2"}, claim
    )
    assert outcome == "accepted"
    assert again["thingName"] == answer["thingName"] == f"{template}-S1"
    thing = registry.get_thing(answer["thingName"])
    assert thing.attributes["fw"] == "2" and thing.version == 2
    ids = {c.certificate_id for c in registry.list_certificates(thing=thing.name)}
    assert ids == {first["certificateId"], second["certificateId"]}
    assert all(registry.is_active(i) for i in ids)
    # Unchanged attributes: no write for the thing at all.
    third = wire.create(claim)
    wire.provision(
        template, third["certificateOwnershipToken"], {"SerialNumber": "S1", "fw": "2"}, claim
    )
    assert registry.get_thing(thing.name).version == 2


def test_a_thing_made_otherwise_cannot_be_claimed(wire: Wire, template: str) -> None:
    wire.ctx.registry.create_thing(f"{template}-S1", {"owner": "ops"})
    claim = _claim(template)
    created = wire.create(claim)
    message = _rejected(
        wire.provision(
            template, created["certificateOwnershipToken"], {"SerialNumber": "S1"}, claim
        ),
        400,
        "ResourceRegistrationFailure",
    )
    assert "not provisioned through template" in message
    assert wire.ctx.registry.list_certificates(thing=f"{template}-S1") == []


@pytest.mark.parametrize(
    ("parameters", "fragment"),
    [
        ({"model": "pi4"}, "give parameters.thingName or parameters.SerialNumber"),
        ({"SerialNumber": "has space"}, "parameters.SerialNumber"),
        ({"thingName": "cert:abc"}, "must not start with 'cert:'"),
        ({"thingName": "claim:x"}, "must not start with 'claim:'"),
        ({"SerialNumber": "1", "bad key!": "v"}, "bad key!"),
    ],
)
def test_unusable_names_and_attributes_are_refused(
    wire: Wire, template: str, parameters: dict[str, str], fragment: str
) -> None:
    claim = _claim(template)
    created = wire.create(claim)
    message = _rejected(
        wire.provision(template, created["certificateOwnershipToken"], parameters, claim),
        400,
        "ResourceRegistrationFailure",
    )
    assert fragment in message
    assert wire.ctx.registry.list_things().things == []
    assert not wire.ctx.registry.is_active(created["certificateId"])


def test_template_rules_pick_attributes_and_device_configuration(
    sqlite_registry: Registry, ca: CertificateAuthority, tmp_path: Path, template: str
) -> None:
    sqlite_registry.create_claim_template(template)
    rules = {
        template: TemplateRules(
            attributes=("SerialNumber", "model"), device_configuration={"telemetry": "60"}
        )
    }
    wire = Wire(_context(sqlite_registry, ca, tmp_path), rules=rules)
    claim = _claim(template)
    created = wire.create(claim)
    outcome, answer = wire.provision(
        template,
        created["certificateOwnershipToken"],
        {"SerialNumber": "9", "model": "pi5", "secret": "x"},
        claim,
    )
    assert outcome == "accepted"
    assert iotidentity.RegisterThingResponse.from_payload(answer).device_configuration == {
        "telemetry": "60"
    }
    assert sqlite_registry.get_thing(answer["thingName"]).attributes == {
        "SerialNumber": "9",
        "model": "pi5",
        "provisioningTemplate": template,
    }


# -- the pre-provisioning hook -----------------------------------------------------------


def _with_hook(
    registry: Registry, ca: CertificateAuthority, tmp_path: Path, template: str, hook: Any
) -> Wire:
    registry.create_claim_template(template)
    return Wire(_context(registry, ca, tmp_path), hook=hook)


def test_the_hook_can_refuse_with_a_reason(
    sqlite_registry: Registry, ca: CertificateAuthority, tmp_path: Path, template: str
) -> None:
    seen: list[tuple[str, dict[str, str]]] = []

    def hook(name: str, parameters: Mapping[str, str]) -> HookDecision:
        seen.append((name, dict(parameters)))
        allowed = parameters.get("SerialNumber", "").startswith("OK")
        return HookDecision(allowed, reason="" if allowed else "serial not on the allowlist")

    wire = _with_hook(sqlite_registry, ca, tmp_path, template, hook)
    claim = _claim(template)
    token = wire.create(claim)["certificateOwnershipToken"]
    message = _rejected(
        wire.provision(template, token, {"SerialNumber": "BAD1"}, claim), 403, "AccessDenied"
    )
    assert message.endswith("serial not on the allowlist")
    assert seen == [(template, {"SerialNumber": "BAD1"})]
    assert sqlite_registry.list_things().things == []
    # A refusal does not spend the token.
    assert wire.provision(template, token, {"SerialNumber": "OK1"}, claim)[0] == "accepted"


def test_the_hook_overrides_parameters(
    sqlite_registry: Registry, ca: CertificateAuthority, tmp_path: Path, template: str
) -> None:
    def hook(name: str, parameters: Mapping[str, str]) -> HookDecision:
        return HookDecision(True, {"SerialNumber": parameters["SerialNumber"].upper(), "site": "b"})

    wire = _with_hook(sqlite_registry, ca, tmp_path, template, hook)
    claim = _claim(template)
    token = wire.create(claim)["certificateOwnershipToken"]
    outcome, answer = wire.provision(template, token, {"SerialNumber": "ab1"}, claim)
    assert outcome == "accepted"
    assert answer["thingName"] == f"{template}-AB1"
    assert sqlite_registry.get_thing(answer["thingName"]).attributes["site"] == "b"


@pytest.mark.parametrize(
    "hook",
    [
        lambda name, parameters: 1 / 0,
        lambda name, parameters: {"allowProvisioning": True},
        lambda name, parameters: HookDecision(True, {"n": 5}),  # type: ignore[dict-item]
    ],
    ids=["raises", "not-a-decision", "non-string-override"],
)
def test_a_failing_hook_refuses(
    sqlite_registry: Registry,
    ca: CertificateAuthority,
    tmp_path: Path,
    template: str,
    hook: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    wire = _with_hook(sqlite_registry, ca, tmp_path, template, hook)
    claim = _claim(template)
    token = wire.create(claim)["certificateOwnershipToken"]
    message = _rejected(
        wire.provision(template, token, {"SerialNumber": "1"}, claim), 403, "AccessDenied"
    )
    assert "hook failed" in message
    assert any("pre-provisioning hook" in r.getMessage() for r in caplog.records)
    assert sqlite_registry.list_things().things == []


HOOK_SCRIPT = """
import json, sys, time
request = json.load(sys.stdin)
serial = request["parameters"].get("SerialNumber", "")
if serial == "SLOW":
    time.sleep(30)
if serial == "GARBAGE":
    print("not json")
elif serial == "CRASH":
    print("boom: database unreachable", file=sys.stderr)
    sys.exit(3)
elif serial.startswith("OK"):
    print(json.dumps({"allowProvisioning": True,
                      "parameterOverrides": {"checkedBy": request["templateName"]}}))
else:
    print(json.dumps({"allowProvisioning": False, "reason": "unknown serial " + serial}))
"""


@pytest.fixture
def hook_script(tmp_path: Path) -> list[str]:
    script = tmp_path / "hook.py"
    script.write_text(HOOK_SCRIPT)
    return [sys.executable, str(script)]


def test_command_hook_allows_overrides_and_refuses(hook_script: list[str]) -> None:
    hook = command_hook(hook_script)
    allowed = hook("kitchen", {"SerialNumber": "OK7"})
    assert allowed == HookDecision(True, {"checkedBy": "kitchen"}, "")
    refused = hook("kitchen", {"SerialNumber": "X"})
    assert (refused.allow, refused.reason) == (False, "unknown serial X")


def test_command_hook_times_out(hook_script: list[str]) -> None:
    with pytest.raises(CloudError, match=r"did not answer within 0.5 s"):
        command_hook(hook_script, timeout=0.5)("kitchen", {"SerialNumber": "SLOW"})


@pytest.mark.parametrize(
    ("serial", "fragment"),
    [("GARBAGE", "output is not JSON"), ("CRASH", "exited with status 3: boom")],
)
def test_command_hook_bad_output_or_exit_is_an_error(
    hook_script: list[str], serial: str, fragment: str
) -> None:
    with pytest.raises(CloudError, match=fragment):
        command_hook(hook_script)("kitchen", {"SerialNumber": serial})


def test_command_hook_that_cannot_run_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(CloudError, match="could not be run"):
        command_hook([str(tmp_path / "missing")])("kitchen", {})
    with pytest.raises(ValidationError):
        command_hook("python hook.py")


@pytest.mark.parametrize(
    ("output", "decision"),
    [
        (b'{"allowProvisioning": "true"}', HookDecision(True)),
        (b'{"allowProvisioning": false, "reason": "no"}', HookDecision(False, {}, "no")),
        (
            b'{"allowProvisioning": true, "parameterOverrides": {"a": "b"}}',
            HookDecision(True, {"a": "b"}),
        ),
    ],
)
def test_parse_decision_reads_aws_lambda_answers(output: bytes, decision: HookDecision) -> None:
    assert parse_decision(output) == decision


@pytest.mark.parametrize(
    "output",
    [
        b"[]",
        b'{"allowProvisioning": "yes"}',
        b'{"allowProvisioning": true, "parameterOverrides": {"a": 1}}',
    ],
)
def test_parse_decision_refuses_other_shapes(output: bytes) -> None:
    with pytest.raises(CloudError):
        parse_decision(output)


def test_the_templates_hook_command_is_run_through_the_service(
    sqlite_registry: Registry,
    ca: CertificateAuthority,
    tmp_path: Path,
    template: str,
    hook_script: list[str],
) -> None:
    import shlex

    sqlite_registry.create_claim_template(template, hook=shlex.join(hook_script))
    wire = Wire(_context(sqlite_registry, ca, tmp_path))
    claim = _claim(template)
    token = wire.create(claim)["certificateOwnershipToken"]
    message = _rejected(
        wire.provision(template, token, {"SerialNumber": "NOPE"}, claim), 403, "AccessDenied"
    )
    assert message.endswith("unknown serial NOPE")
    message = _rejected(
        wire.provision(template, token, {"SerialNumber": "CRASH"}, claim), 403, "AccessDenied"
    )
    assert "boom" not in message  # hook internals stay in the cloud's log
    outcome, answer = wire.provision(template, token, {"SerialNumber": "OK2"}, claim)
    assert outcome == "accepted"
    assert sqlite_registry.get_thing(answer["thingName"]).attributes["checkedBy"] == template


# -- payloads and topics -----------------------------------------------------------------


def test_request_topics_are_recognised() -> None:
    create = parse_request_topic(CREATE)
    assert create is not None and (create.operation, create.payload_format) == ("create", "json")
    csr = parse_request_topic("$aws/certificates/create-from-csr/cbor")
    assert csr is not None and (csr.operation, csr.payload_format) == ("create-from-csr", "cbor")
    provision = parse_request_topic(provision_topic("kitchen"))
    assert provision is not None and provision.template == "kitchen"
    for topic in (
        CREATE + "/accepted",
        provision_topic("kitchen") + "/rejected",
        "$aws/things/hub/shadow/get",
        "$aws/certificates/delete/json",
    ):
        assert parse_request_topic(topic) is None


def test_other_topics_are_not_handled_and_cbor_gets_no_answer(wire: Wire, template: str) -> None:
    claim = _claim(template)
    assert not wire.service.handle("$aws/things/x/shadow/get", b"{}", client=claim)
    assert not wire.service.handle(CREATE + "/accepted", b"{}", client=claim)
    assert wire.service.handle("$aws/certificates/create/cbor", b"\xa0", client=claim)
    assert wire.sent == []


@pytest.mark.parametrize(
    ("topic", "payload", "fragment"),
    [
        (CREATE, b"{not json", "not JSON"),
        (CREATE, b"[]", "must be a JSON object"),
        (CREATE_CSR, b"{}", "certificateSigningRequest must be"),
        (
            "provision",
            b'{"certificateOwnershipToken": "t", "parameters": {"a": 1}}',
            "parameters.a",
        ),
        ("provision", b'{"certificateOwnershipToken": "t", "parameters": []}', "parameters must"),
    ],
)
def test_malformed_payloads_are_refused(
    wire: Wire, template: str, topic: str, payload: bytes, fragment: str
) -> None:
    topic = provision_topic(template) if topic == "provision" else topic
    message = _rejected(wire.send(topic, payload, _claim(template)), 400, "InvalidPayload")
    assert fragment in message


def test_an_empty_create_payload_is_accepted(wire: Wire, template: str) -> None:
    assert wire.send(CREATE, b"", _claim(template))[0] == "accepted"


def test_a_bad_csr_is_refused(wire: Wire, template: str) -> None:
    message = _rejected(
        wire.send(CREATE_CSR, {"certificateSigningRequest": "-----BEGIN junk"}, _claim(template)),
        400,
        "InvalidCertificateSigningRequest",
    )
    assert "CSR" in message
    assert wire.service.pending_count == 0


def test_an_unexpected_failure_is_an_internal_failure(
    wire: Wire, template: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("disk on fire")

    claim = _claim(template)
    token = wire.create(claim)["certificateOwnershipToken"]
    monkeypatch.setattr(wire.ctx.registry, "record_certificate", broken)
    message = _rejected(
        wire.provision(template, token, {"SerialNumber": "Z"}, claim), 500, "InternalFailure"
    )
    assert "disk" not in message
    # The thing made for it is gone again, and the token can be used once the cloud recovers.
    assert wire.ctx.registry.list_things().things == []
    monkeypatch.undo()
    assert wire.provision(template, token, {"SerialNumber": "Z"}, claim)[0] == "accepted"
