"""The cloud's REST API over a real CloudContext (SQLite; one flow on PostgreSQL too)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fastapi.testclient import TestClient

from edgeloop.cloud.api import API_PREFIX, create_app
from edgeloop.cloud.context import CloudContext
from edgeloop.cloud.db import Database
from edgeloop.cloud.objectstore import LocalObjectStore
from edgeloop.cloud.pki import CertificateAuthority
from edgeloop.cloud.registry import Registry
from edgeloop.core.shadowbook import ShadowBook

V1 = API_PREFIX


@dataclass
class Cloud:
    """A context, its app's client, and the revocations the broker hook saw."""

    ctx: CloudContext
    client: TestClient
    revocations: list[int] = field(default_factory=list)


def make_cloud(tmp: Path, db: Database, registry: Registry, ca: CertificateAuthority) -> Cloud:
    ctx = CloudContext(
        data_dir=tmp,
        db=db,
        registry=registry,
        ca=ca,
        shadows=ShadowBook(registry.shadow_storage()),
        objects=LocalObjectStore(tmp / "objects"),
    )
    cloud = Cloud(ctx, TestClient(create_app(ctx)))

    async def revoked() -> None:
        cloud.revocations.append(len(ctx.crl_pem()))

    ctx.revoked = revoked
    return cloud


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority.open_or_create(tmp_path_factory.mktemp("ca") / "ca")


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory, ca: CertificateAuthority) -> Iterator[Cloud]:
    """One SQLite-backed cloud for the module; tests use unique names so they never collide."""
    tmp = tmp_path_factory.mktemp("cloud")
    db = Database(f"sqlite:///{tmp / 'edgeloop.db'}")
    db.migrate()
    made = make_cloud(tmp, db, Registry(db), ca)
    with made.client:
        yield made
    db.dispose()


@pytest.fixture
def client(cloud: Cloud) -> TestClient:
    return cloud.client


@pytest.fixture
def uid() -> str:
    return uuid.uuid4().hex[:8]


def ok(response: Any, status: int = 200) -> Any:
    assert response.status_code == status, response.text
    return response.json() if response.content else None


def csr_for(name: str) -> tuple[ec.EllipticCurvePrivateKey, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ignored")]))
        .sign(key, hashes.SHA256())
    )
    return key, csr.public_bytes(serialization.Encoding.PEM).decode()


# --- things ---------------------------------------------------------------------------------


def test_thing_create_list_describe_patch_delete(
    cloud: Cloud, client: TestClient, uid: str
) -> None:
    name = f"hub-{uid}"
    made = ok(
        client.post(
            f"{V1}/things",
            json={"thingName": name, "thingType": "Hub", "attributes": {"model": "pi4", "n": 2}},
        ),
        201,
    )
    assert made["thingName"] == name and made["version"] == 1
    assert made["attributes"] == {"model": "pi4", "n": 2}
    for other in ("a", "b", "c"):
        ok(client.post(f"{V1}/things", json={"thingName": f"{name}-{other}"}), 201)

    first = ok(client.get(f"{V1}/things", params={"prefix": f"{name}-", "pageSize": 2}))
    assert [t["thingName"] for t in first["things"]] == [f"{name}-a", f"{name}-b"]
    second = ok(
        client.get(
            f"{V1}/things",
            params={"prefix": f"{name}-", "pageSize": 2, "nextToken": first["nextToken"]},
        )
    )
    assert [t["thingName"] for t in second["things"]] == [f"{name}-c"]
    assert second["nextToken"] is None

    patched = ok(
        client.patch(
            f"{V1}/things/{name}/attributes",
            json={"attributes": {"model": None, "floor": "3"}, "expectedVersion": 1},
        )
    )
    assert patched["attributes"] == {"n": 2, "floor": "3"} and patched["version"] == 2
    stale = client.patch(
        f"{V1}/things/{name}/attributes", json={"attributes": {"x": 1}, "expectedVersion": 1}
    )
    assert stale.status_code == 409 and stale.json()["error"] == "conflict"
    assert "version 2" in stale.json()["message"]
    assert ok(client.get(f"{V1}/things/{name}"))["attributes"] == {"n": 2, "floor": "3"}

    cloud.ctx.registry.set_connectivity(name, True, datetime(2024, 1, 1, tzinfo=UTC), "c-1")
    ok(client.post(f"{V1}/groups", json={"thingGroupName": f"g-{uid}"}), 201)
    ok(client.put(f"{V1}/groups/g-{uid}/things/{name}"))
    cert = ok(client.post(f"{V1}/things/{name}/certificates", json={}), 201)
    detail = ok(client.get(f"{V1}/things/{name}"))
    assert detail["groups"] == [f"g-{uid}"]
    assert detail["connectivity"]["connected"] is True
    assert detail["connectivity"]["clientId"] == "c-1"
    assert [c["certificateId"] for c in detail["certificates"]] == [cert["certificateId"]]
    assert detail["certificates"][0]["status"] == "ACTIVE"

    assert client.delete(f"{V1}/things/{name}").status_code == 204
    gone = client.get(f"{V1}/things/{name}")
    assert gone.status_code == 404 and name in gone.json()["message"]
    assert ok(client.get(f"{V1}/certificates/{cert['certificateId']}"))["status"] == "INACTIVE"
    assert client.delete(f"{V1}/things/{name}").status_code == 404


def test_create_answers_201_with_location_and_409_on_a_duplicate(
    client: TestClient, uid: str
) -> None:
    created = client.post(f"{V1}/things", json={"thingName": f"dup-{uid}"})
    assert created.status_code == 201
    assert created.headers["location"] == f"{V1}/things/dup-{uid}"
    again = client.post(f"{V1}/things", json={"thingName": f"dup-{uid}"})
    assert again.status_code == 409
    assert again.json() == {
        "error": "conflict",
        "message": f"a thing named 'dup-{uid}' already exists",
        "field": None,
    }


# --- groups ---------------------------------------------------------------------------------


def test_static_and_dynamic_groups(client: TestClient, uid: str) -> None:
    hubs = [f"grp-{uid}-{i}" for i in range(3)]
    for index, hub in enumerate(hubs):
        ok(
            client.post(
                f"{V1}/things", json={"thingName": hub, "attributes": {"k": uid, "i": index}}
            ),
            201,
        )

    static = ok(
        client.post(f"{V1}/groups", json={"thingGroupName": f"s-{uid}", "description": "kitchen"}),
        201,
    )
    assert (static["kind"], static["members"], static["description"]) == ("static", [], "kitchen")
    assert ok(client.put(f"{V1}/groups/s-{uid}/things/{hubs[0]}"))["changed"] is True
    assert ok(client.put(f"{V1}/groups/s-{uid}/things/{hubs[0]}"))["changed"] is False
    ok(client.put(f"{V1}/groups/s-{uid}/things/{hubs[1]}"))
    removed = ok(client.delete(f"{V1}/groups/s-{uid}/things/{hubs[1]}"))
    assert (removed["member"], removed["changed"]) == (False, True)
    assert ok(client.get(f"{V1}/groups/s-{uid}"))["members"] == [hubs[0]]

    query = f"attributes.k:{uid} AND attributes.i>=1"
    dynamic = ok(
        client.post(
            f"{V1}/groups",
            json={"thingGroupName": f"d-{uid}", "kind": "dynamic", "query": query},
        ),
        201,
    )
    assert dynamic["members"] == hubs[1:] and dynamic["query"] == query
    ok(client.patch(f"{V1}/things/{hubs[0]}/attributes", json={"attributes": {"i": 5}}))
    assert ok(client.get(f"{V1}/groups/d-{uid}"))["members"] == hubs
    refused = client.put(f"{V1}/groups/d-{uid}/things/{hubs[0]}")
    assert refused.status_code == 409 and "dynamic" in refused.json()["message"]

    names = [g["thingGroupName"] for g in ok(client.get(f"{V1}/groups"))["groups"]]
    assert {f"s-{uid}", f"d-{uid}"} <= set(names)
    assert client.post(f"{V1}/groups", json={"thingGroupName": f"s-{uid}"}).status_code == 409
    assert client.delete(f"{V1}/groups/s-{uid}").status_code == 204
    assert client.get(f"{V1}/groups/s-{uid}").status_code == 404
    assert client.put(f"{V1}/groups/s-{uid}/things/{hubs[0]}").status_code == 404
    assert client.put(f"{V1}/groups/d-{uid}/things/nope-{uid}").status_code in (404, 409)


# --- certificates ---------------------------------------------------------------------------


def test_issue_with_a_generated_key_verifies_and_revocation_calls_the_hook(
    cloud: Cloud, client: TestClient, uid: str
) -> None:
    name = f"cert-{uid}"
    ok(client.post(f"{V1}/things", json={"thingName": name}), 201)
    issued = ok(client.post(f"{V1}/things/{name}/certificates", json={}), 201)
    assert issued["privateKeyPem"].startswith("-----BEGIN")
    assert issued["status"] == "ACTIVE" and issued["kind"] == "device"
    identity = cloud.ctx.ca.identify(issued["certificatePem"].encode())
    assert (identity.kind, identity.name) == ("thing", name)
    assert identity.certificate_id == issued["certificateId"]
    # The key is handed out once and never kept.
    key_body = issued["privateKeyPem"].splitlines()[1]
    stored = ok(client.get(f"{V1}/certificates/{issued['certificateId']}"))
    assert "privateKeyPem" not in stored and key_body not in str(stored)
    assert stored["serial"] == str(int(stored["serial"]))

    before = len(cloud.revocations)
    revoked = ok(
        client.post(f"{V1}/certificates/{issued['certificateId']}/revoke", json={"reason": "lost"})
    )
    assert (revoked["status"], revoked["revokeReason"]) == ("REVOKED", "lost")
    assert revoked["brokerNotified"] is True
    assert len(cloud.revocations) == before + 1
    assert not cloud.ctx.registry.is_active(issued["certificateId"])
    again = client.post(f"{V1}/certificates/{issued['certificateId']}/revoke")
    assert again.status_code == 409 and len(cloud.revocations) == before + 1


def test_issue_for_a_csr_returns_no_key(cloud: Cloud, client: TestClient, uid: str) -> None:
    name = f"csr-{uid}"
    ok(client.post(f"{V1}/things", json={"thingName": name}), 201)
    key, csr = csr_for(name)
    issued = ok(client.post(f"{V1}/things/{name}/certificates", json={"csrPem": csr}), 201)
    assert issued["privateKeyPem"] is None
    cert = x509.load_pem_x509_certificate(issued["certificatePem"].encode())
    assert cert.public_key() == key.public_key()
    assert cloud.ctx.ca.identify(issued["certificatePem"].encode()).name == name
    assert client.post(f"{V1}/things/nope-{uid}/certificates", json={}).status_code == 404


def test_a_failing_broker_hook_still_revokes(cloud: Cloud, client: TestClient, uid: str) -> None:
    name = f"hook-{uid}"
    ok(client.post(f"{V1}/things", json={"thingName": name}), 201)
    issued = ok(client.post(f"{V1}/things/{name}/certificates", json={}), 201)
    working = cloud.ctx.revoked

    async def broken() -> None:
        raise OSError("broker gone")

    cloud.ctx.revoked = broken
    try:
        revoked = ok(client.post(f"{V1}/certificates/{issued['certificateId']}/revoke"))
    finally:
        cloud.ctx.revoked = working
    assert (revoked["status"], revoked["brokerNotified"]) == ("REVOKED", False)
    assert revoked["revokeReason"] == "unspecified"


def test_rotation_keeps_the_things_state(cloud: Cloud, client: TestClient, uid: str) -> None:
    name = f"rot-{uid}"
    ok(client.post(f"{V1}/things", json={"thingName": name, "attributes": {"a": 1}}), 201)
    ok(client.post(f"{V1}/things/{name}/shadow", json={"state": {"reported": {"t": 20}}}))
    old = ok(client.post(f"{V1}/things/{name}/certificates", json={}), 201)

    before = len(cloud.revocations)
    rotated = ok(
        client.post(f"{V1}/certificates/{old['certificateId']}/rotate", json={"revokeOld": True}),
        201,
    )
    new = rotated["certificate"]
    assert new["certificateId"] != old["certificateId"] and new["thingName"] == name
    assert cloud.ctx.ca.identify(new["certificatePem"].encode()).name == name
    assert (rotated["previous"]["status"], rotated["previous"]["revokeReason"]) == (
        "REVOKED",
        "superseded",
    )
    assert rotated["brokerNotified"] is True and len(cloud.revocations) == before + 1
    assert ok(client.get(f"{V1}/things/{name}"))["attributes"] == {"a": 1}
    assert ok(client.get(f"{V1}/things/{name}/shadow"))["state"]["reported"] == {"t": 20}

    # Without revokeOld both stay active, for a device to switch over.
    _, csr = csr_for(name)
    kept = ok(
        client.post(f"{V1}/certificates/{new['certificateId']}/rotate", json={"csrPem": csr}), 201
    )
    assert kept["previous"]["status"] == "ACTIVE" and kept["certificate"]["privateKeyPem"] is None
    assert len(cloud.revocations) == before + 1
    statuses = [c["status"] for c in ok(client.get(f"{V1}/things/{name}"))["certificates"]]
    assert sorted(statuses) == ["ACTIVE", "ACTIVE", "REVOKED"]

    refused = client.post(f"{V1}/certificates/{old['certificateId']}/rotate")
    assert refused.status_code == 409 and "revoked" in refused.json()["message"]
    assert client.post(f"{V1}/certificates/{'0' * 64}/rotate").status_code == 404


def test_registered_ca_certificates_can_be_registered_for_things(
    client: TestClient, uid: str, tmp_path: Path
) -> None:
    name = f"reg-{uid}"
    ok(client.post(f"{V1}/things", json={"thingName": name}), 201)
    foreign = CertificateAuthority.create(tmp_path / "foreign", intermediate=False)
    leaf = foreign.issue_device_certificate(name).certificate_pem.decode()

    unknown = client.post(f"{V1}/things/{name}/certificates", json={"certificatePem": leaf})
    assert unknown.status_code == 400 and unknown.json()["field"] == "certificatePem"

    ca = ok(client.post(f"{V1}/cas", json={"pem": foreign.chain_pem.decode()}), 201)
    assert ca["caId"] in [c["caId"] for c in ok(client.get(f"{V1}/cas"))["cas"]]
    assert client.post(f"{V1}/cas", json={"pem": foreign.chain_pem.decode()}).status_code == 409
    not_a_ca = client.post(f"{V1}/cas", json={"pem": leaf})
    assert not_a_ca.status_code == 400 and not_a_ca.json()["field"] == "pem"

    other = f"reg2-{uid}"
    ok(client.post(f"{V1}/things", json={"thingName": other}), 201)
    wrong = client.post(f"{V1}/things/{other}/certificates", json={"certificatePem": leaf})
    assert wrong.status_code == 400 and wrong.json()["field"] == "certificatePem"
    assert name in wrong.json()["message"]

    registered = ok(
        client.post(f"{V1}/things/{name}/certificates", json={"certificatePem": leaf}), 201
    )
    assert (registered["status"], registered["privateKeyPem"]) == ("ACTIVE", None)
    again = client.post(f"{V1}/things/{name}/certificates", json={"certificatePem": leaf})
    assert again.status_code == 409


# --- claims ---------------------------------------------------------------------------------


def test_claims_record_a_claim_certificate_and_their_template(
    cloud: Cloud, client: TestClient, uid: str
) -> None:
    template = f"factory-{uid}"
    first = ok(
        client.post(f"{V1}/claims", json={"template": template, "description": "line 1"}), 201
    )
    assert (first["kind"], first["thingName"], first["templateCreated"]) == ("claim", None, True)
    assert first["privateKeyPem"].startswith("-----BEGIN")
    identity = cloud.ctx.ca.identify(first["certificatePem"].encode())
    assert (identity.kind, identity.name) == ("claim", template)
    assert cloud.ctx.registry.get_claim_template(template).description == "line 1"
    recorded = ok(client.get(f"{V1}/certificates/{first['certificateId']}"))
    assert (recorded["kind"], recorded["status"]) == ("claim", "ACTIVE")

    second = ok(client.post(f"{V1}/claims", json={"template": template}), 201)
    assert second["templateCreated"] is False
    assert second["certificateId"] != first["certificateId"]
    refused = client.post(f"{V1}/certificates/{first['certificateId']}/rotate")
    assert refused.status_code == 409 and "claim" in refused.json()["message"]


# --- fleet ----------------------------------------------------------------------------------


def test_fleet_query(client: TestClient, uid: str) -> None:
    for index in range(4):
        ok(
            client.post(
                f"{V1}/things",
                json={"thingName": f"fq-{uid}-{index}", "attributes": {"batch": uid, "n": index}},
            ),
            201,
        )
    found = ok(
        client.get(f"{V1}/fleet/query", params={"q": f"attributes.batch:{uid} AND attributes.n>1"})
    )
    assert found == {"things": [f"fq-{uid}-2", f"fq-{uid}-3"], "count": 2}
    assert (
        ok(client.get(f"{V1}/fleet/query", params={"q": "thingName:nothing-like-this*"}))["count"]
        == 0
    )


# --- shadows --------------------------------------------------------------------------------


def test_classic_and_named_shadows_over_rest(client: TestClient, uid: str) -> None:
    name = f"sh-{uid}"
    ok(client.post(f"{V1}/things", json={"thingName": name}), 201)
    absent = client.get(f"{V1}/things/{name}/shadow")
    assert absent.status_code == 404
    assert absent.json()["code"] == 404 and "No shadow exists" in absent.json()["message"]

    accepted = ok(
        client.post(
            f"{V1}/things/{name}/shadow",
            json={
                "state": {"desired": {"mode": "eco"}, "reported": {"mode": "off"}},
                "clientToken": "t1",
            },
        )
    )
    assert accepted["version"] == 1 and accepted["clientToken"] == "t1"
    assert accepted["state"] == {"desired": {"mode": "eco"}, "reported": {"mode": "off"}}
    assert "timestamp" in accepted["metadata"]["desired"]["mode"]
    got = ok(client.get(f"{V1}/things/{name}/shadow"))
    assert got["state"]["delta"] == {"mode": "eco"} and got["version"] == 1

    conflict = client.post(
        f"{V1}/things/{name}/shadow",
        json={"state": {"reported": {"mode": "eco"}}, "version": 7, "clientToken": "t2"},
    )
    assert conflict.status_code == 409
    body = conflict.json()
    assert (body["code"], body["message"], body["clientToken"]) == (409, "Version conflict", "t2")
    assert isinstance(body["timestamp"], int)
    ok(
        client.post(
            f"{V1}/things/{name}/shadow",
            json={"state": {"reported": {"mode": "eco"}}, "version": 1},
        )
    )
    assert "delta" not in ok(client.get(f"{V1}/things/{name}/shadow"))["state"]

    for shadow in ("cfg", "alarms", "zz"):
        ok(
            client.post(
                f"{V1}/things/{name}/shadows/{shadow}", json={"state": {"desired": {"s": shadow}}}
            )
        )
    assert ok(client.get(f"{V1}/things/{name}/shadows/cfg"))["state"]["desired"] == {"s": "cfg"}
    page = ok(client.get(f"{V1}/things/{name}/shadows", params={"pageSize": 2}))
    assert page["results"] == ["alarms", "cfg"] and page["nextToken"]
    rest = ok(
        client.get(
            f"{V1}/things/{name}/shadows", params={"pageSize": 2, "nextToken": page["nextToken"]}
        )
    )
    assert (rest["results"], rest["nextToken"]) == (["zz"], None)

    deleted = ok(client.delete(f"{V1}/things/{name}/shadows/zz"))
    assert deleted["version"] == 1 and "timestamp" in deleted
    assert client.get(f"{V1}/things/{name}/shadows/zz").status_code == 404
    assert client.delete(f"{V1}/things/{name}/shadows/zz").status_code == 404
    stale = client.request("DELETE", f"{V1}/things/{name}/shadow", json={"version": 1})
    assert stale.status_code == 409 and stale.json()["message"] == "Version conflict"
    assert ok(client.delete(f"{V1}/things/{name}/shadow"))["version"] == 2
    assert client.get(f"{V1}/things/{name}/shadow").status_code == 404


@pytest.mark.parametrize(
    ("path", "kwargs", "code", "message"),
    [
        (
            "shadow",
            {"content": b"{not json", "headers": {"content-type": "application/json"}},
            400,
            "Invalid JSON",
        ),
        ("shadow", {"json": [1, 2]}, 400, "Invalid JSON"),
        (
            "shadow",
            {"content": b"\xff\xfe", "headers": {"content-type": "application/json"}},
            415,
            "UTF-8",
        ),
        ("shadow", {"json": {"state": "x"}}, 400, ""),
        ("shadow", {"json": {"state": {"reported": {}}, "version": -1}}, 400, "Invalid version"),
        ("shadows/bad%20name", {"json": {"state": {"reported": {"a": 1}}}}, 400, "shadow name"),
    ],
)
def test_bad_shadow_updates_get_aws_error_documents(
    client: TestClient, uid: str, path: str, kwargs: dict[str, Any], code: int, message: str
) -> None:
    name = f"shbad-{uid}"
    ok(client.post(f"{V1}/things", json={"thingName": name}), 201)
    refused = client.post(f"{V1}/things/{name}/{path}", **kwargs)
    assert refused.status_code == code, refused.text
    assert refused.json()["code"] == code and message in refused.json()["message"]
    assert client.get(f"{V1}/things/{name}/shadow").status_code == 404  # nothing stored


def test_shadows_of_unknown_and_deleted_things(client: TestClient, uid: str) -> None:
    ghost = client.post(f"{V1}/things/ghost-{uid}/shadow", json={"state": {"reported": {"a": 1}}})
    assert ghost.status_code == 404 and ghost.json()["code"] == 404

    name = f"gone-{uid}"
    ok(client.post(f"{V1}/things", json={"thingName": name}), 201)
    ok(client.post(f"{V1}/things/{name}/shadow", json={"state": {"reported": {"a": 1}}}))
    assert client.delete(f"{V1}/things/{name}").status_code == 204
    assert client.get(f"{V1}/things/{name}/shadow").status_code == 404
    # A thing created again under the name starts without the old one's shadows.
    ok(client.post(f"{V1}/things", json={"thingName": name}), 201)
    assert client.get(f"{V1}/things/{name}/shadow").status_code == 404


# --- bad requests ---------------------------------------------------------------------------

BAD_REQUESTS: list[tuple[str, str, str, dict[str, Any], int, str]] = [
    # (id, method, path, request kwargs, status, field); {new} is a fresh name, {hub} exists
    ("thing-missing-name", "POST", "/things", {"json": {}}, 400, "thingName"),
    ("thing-bad-name", "POST", "/things", {"json": {"thingName": "bad name"}}, 400, "thingName"),
    ("thing-name-not-str", "POST", "/things", {"json": {"thingName": 5}}, 400, "thingName"),
    ("thing-claim-name", "POST", "/things", {"json": {"thingName": "claim:x"}}, 400, "thingName"),
    (
        "thing-bad-type",
        "POST",
        "/things",
        {"json": {"thingName": "{new}", "thingType": "a b"}},
        400,
        "thingType",
    ),
    (
        "thing-nested-attr",
        "POST",
        "/things",
        {"json": {"thingName": "{new}", "attributes": {"a": {"b": 1}}}},
        400,
        "attributes.a",
    ),
    (
        "thing-bad-attr-name",
        "POST",
        "/things",
        {"json": {"thingName": "{new}", "attributes": {"a b": 1}}},
        400,
        "attributes.a b",
    ),
    (
        "thing-null-attr",
        "POST",
        "/things",
        {"json": {"thingName": "{new}", "attributes": {"a": None}}},
        400,
        "attributes.a",
    ),
    (
        "thing-long-attr",
        "POST",
        "/things",
        {"json": {"thingName": "{new}", "attributes": {"a": "x" * 801}}},
        400,
        "attributes.a",
    ),
    (
        "thing-attrs-not-map",
        "POST",
        "/things",
        {"json": {"thingName": "{new}", "attributes": [1]}},
        400,
        "attributes",
    ),
    (
        "thing-unknown-field",
        "POST",
        "/things",
        {"json": {"thingName": "{new}", "thingname": "x"}},
        400,
        "thingname",
    ),
    (
        "thing-not-json",
        "POST",
        "/things",
        {"content": b"{nope", "headers": {"content-type": "application/json"}},
        400,
        "body",
    ),
    ("thing-body-array", "POST", "/things", {"json": ["{new}"]}, 400, "body"),
    ("thing-no-body", "POST", "/things", {}, 400, "body"),
    ("list-page-zero", "GET", "/things?pageSize=0", {}, 400, "pageSize"),
    ("list-page-word", "GET", "/things?pageSize=many", {}, 400, "pageSize"),
    ("list-page-huge", "GET", "/things?pageSize=251", {}, 400, "pageSize"),
    (
        "patch-version-zero",
        "PATCH",
        "/things/{hub}/attributes",
        {"json": {"attributes": {"a": 1}, "expectedVersion": 0}},
        400,
        "expectedVersion",
    ),
    (
        "patch-version-str",
        "PATCH",
        "/things/{hub}/attributes",
        {"json": {"attributes": {}, "expectedVersion": "1"}},
        400,
        "expectedVersion",
    ),
    (
        "patch-attrs-missing",
        "PATCH",
        "/things/{hub}/attributes",
        {"json": {"expectedVersion": 1}},
        400,
        "attributes",
    ),
    (
        "patch-attr-list",
        "PATCH",
        "/things/{hub}/attributes",
        {"json": {"attributes": {"a": [1]}}},
        400,
        "attributes.a",
    ),
    (
        "patch-attr-nan",
        "PATCH",
        "/things/{hub}/attributes",
        {"content": b'{"attributes": {"a": NaN}}', "headers": {"content-type": "application/json"}},
        400,
        "attributes.a",
    ),
    (
        "group-bad-kind",
        "POST",
        "/groups",
        {"json": {"thingGroupName": "{new}", "kind": "weird"}},
        400,
        "kind",
    ),
    (
        "group-bad-name",
        "POST",
        "/groups",
        {"json": {"thingGroupName": "bad name"}},
        400,
        "thingGroupName",
    ),
    (
        "group-dynamic-no-query",
        "POST",
        "/groups",
        {"json": {"thingGroupName": "{new}", "kind": "dynamic"}},
        400,
        "query",
    ),
    (
        "group-dynamic-bad-query",
        "POST",
        "/groups",
        {"json": {"thingGroupName": "{new}", "kind": "dynamic", "query": "attributes.a:("}},
        400,
        "query",
    ),
    (
        "group-static-query",
        "POST",
        "/groups",
        {"json": {"thingGroupName": "{new}", "query": "thingName:x"}},
        400,
        "query",
    ),
    (
        "group-description-int",
        "POST",
        "/groups",
        {"json": {"thingGroupName": "{new}", "description": 3}},
        400,
        "description",
    ),
    (
        "cert-bad-csr",
        "POST",
        "/things/{hub}/certificates",
        {"json": {"csrPem": "not a csr"}},
        400,
        "csrPem",
    ),
    (
        "cert-csr-and-cert",
        "POST",
        "/things/{hub}/certificates",
        {"json": {"csrPem": "a", "certificatePem": "b"}},
        400,
        "certificatePem",
    ),
    (
        "cert-bad-cert",
        "POST",
        "/things/{hub}/certificates",
        {"json": {"certificatePem": "garbage"}},
        400,
        "certificatePem",
    ),
    (
        "revoke-empty-reason",
        "POST",
        "/certificates/{new}/revoke",
        {"json": {"reason": ""}},
        400,
        "reason",
    ),
    (
        "rotate-bad-flag",
        "POST",
        "/certificates/{new}/rotate",
        {"json": {"revokeOld": "yes"}},
        400,
        "revokeOld",
    ),
    ("ca-garbage", "POST", "/cas", {"json": {"pem": "garbage"}}, 400, "pem"),
    ("ca-missing", "POST", "/cas", {"json": {}}, 400, "pem"),
    ("claim-bad-template", "POST", "/claims", {"json": {"template": "bad name"}}, 400, "template"),
    ("claim-long-template", "POST", "/claims", {"json": {"template": "t" * 37}}, 400, "template"),
    ("fleet-no-query", "GET", "/fleet/query", {}, 400, "q"),
    ("fleet-empty-query", "GET", "/fleet/query?q=", {}, 400, "q"),
    ("shadow-list-page", "GET", "/things/{hub}/shadows?pageSize=500", {}, 400, "pageSize"),
]


@pytest.fixture(scope="module")
def hub(cloud: Cloud) -> str:
    cloud.ctx.registry.create_thing("api-hub-fixture", {"a": 1})
    return "api-hub-fixture"


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "field"),
    [row[1:] for row in BAD_REQUESTS],
    ids=[row[0] for row in BAD_REQUESTS],
)
def test_bad_requests_name_the_field_and_change_nothing(
    cloud: Cloud,
    client: TestClient,
    hub: str,
    uid: str,
    method: str,
    path: str,
    kwargs: dict[str, Any],
    status: int,
    field: str,
) -> None:
    new = f"new-{uid}"

    def fill(value: Any) -> Any:
        if isinstance(value, str):
            return value.replace("{new}", new).replace("{hub}", hub)
        if isinstance(value, dict):
            return {fill(k): fill(v) for k, v in value.items()}
        if isinstance(value, list):
            return [fill(v) for v in value]
        return value

    events = len(cloud.ctx.registry.events(limit=100_000))
    before = cloud.ctx.registry.get_thing(hub)
    response = client.request(method, V1 + fill(path), **fill(kwargs))
    assert response.status_code == status, response.text
    body = response.json()
    assert (body["error"], body["field"]) == ("validation", field), body
    assert field in body["message"]
    # Nothing half-written: no new audit entries, nothing created, the hub untouched.
    assert len(cloud.ctx.registry.events(limit=100_000)) == events
    assert client.get(f"{V1}/things/{new}").status_code == 404
    assert client.get(f"{V1}/groups/{new}").status_code == 404
    assert cloud.ctx.registry.get_thing(hub) == before


def test_a_bad_fleet_query_names_the_position(client: TestClient) -> None:
    refused = client.get(f"{V1}/fleet/query", params={"q": "attributes.a:1 AND ("})
    assert refused.status_code == 400
    assert refused.json()["field"] == "q" and "position 20" in refused.json()["message"]


def test_not_found_and_unknown_routes_answer_json(client: TestClient, uid: str) -> None:
    for path in (
        f"/things/nope-{uid}",
        f"/groups/nope-{uid}",
        f"/certificates/{'ab' * 32}",
    ):
        missing = client.get(V1 + path)
        assert missing.status_code == 404 and missing.json()["error"] == "not_found"
        assert f"nope-{uid}" in missing.json()["message"] or "ab" * 32 in missing.json()["message"]
    patch = client.patch(f"{V1}/things/nope-{uid}/attributes", json={"attributes": {}})
    assert patch.status_code == 404
    route = client.get(f"{V1}/no-such-route")
    assert route.status_code == 404 and route.json()["error"] == "http"
    method = client.put(f"{V1}/things")
    assert method.status_code == 405 and method.json()["error"] == "http"


# --- health and OpenAPI ---------------------------------------------------------------------


def test_health(client: TestClient, cloud: Cloud, tmp_path: Path, ca: CertificateAuthority) -> None:
    healthy = ok(client.get(f"{V1}/health"))
    assert healthy["status"] == "ok" and healthy["database"] == {
        "ok": True,
        "dialect": "sqlite",
        "message": None,
    }
    assert healthy["version"]

    # A database that does not answer: 503, and the error names it.
    db = Database("postgresql://nobody@127.0.0.1:1/nothing")
    down = make_cloud(tmp_path, db, Registry(db), ca)
    with down.client:
        answer = down.client.get(f"{V1}/health")
        assert answer.status_code == 503
        assert answer.json()["status"] == "unavailable"
        assert "127.0.0.1" in answer.json()["database"]["message"]
        listing = down.client.get(f"{V1}/things")
        assert listing.status_code == 503 and listing.json()["error"] == "unavailable"
    db.dispose()


ROUTES = {
    ("POST", "/things"),
    ("GET", "/things"),
    ("GET", "/things/{name}"),
    ("PATCH", "/things/{name}/attributes"),
    ("DELETE", "/things/{name}"),
    ("POST", "/groups"),
    ("GET", "/groups"),
    ("GET", "/groups/{name}"),
    ("DELETE", "/groups/{name}"),
    ("PUT", "/groups/{name}/things/{thing}"),
    ("DELETE", "/groups/{name}/things/{thing}"),
    ("POST", "/things/{name}/certificates"),
    ("GET", "/certificates/{certificateId}"),
    ("POST", "/certificates/{certificateId}/revoke"),
    ("POST", "/certificates/{certificateId}/rotate"),
    ("POST", "/cas"),
    ("GET", "/cas"),
    ("POST", "/claims"),
    ("GET", "/fleet/query"),
    ("GET", "/things/{name}/shadow"),
    ("POST", "/things/{name}/shadow"),
    ("DELETE", "/things/{name}/shadow"),
    ("GET", "/things/{name}/shadows"),
    ("GET", "/things/{name}/shadows/{shadowName}"),
    ("POST", "/things/{name}/shadows/{shadowName}"),
    ("DELETE", "/things/{name}/shadows/{shadowName}"),
    ("GET", "/health"),
}


def test_openapi_lists_every_route_and_answers_400_not_422(client: TestClient) -> None:
    document = ok(client.get("/openapi.json"))
    assert document["info"]["title"] == "edgeloop cloud"
    listed = {
        (method.upper(), path.removeprefix(V1))
        for path, operations in document["paths"].items()
        for method in operations
    }
    # The registry's routes; the component, job and deployment routers add theirs.
    assert listed >= ROUTES
    assert {("POST", "/deployments"), ("POST", "/jobs"), ("GET", "/components")} <= listed
    for operations in document["paths"].values():
        for operation in operations.values():
            assert operation.get("summary") and operation.get("description")
            assert "422" not in operation["responses"]
            assert operation["tags"]
    assert "HTTPValidationError" not in document["components"]["schemas"]
    assert "ErrorBody" in document["components"]["schemas"]
    update = document["paths"][f"{V1}/things/{{name}}/shadow"]["post"]
    assert "requestBody" in update and "409" in update["responses"]
    created = document["paths"][f"{V1}/things"]["post"]
    assert "201" in created["responses"] and "400" in created["responses"]
    assert client.get("/docs").status_code == 200


# --- both databases -------------------------------------------------------------------------


def test_the_api_on_sqlite_and_postgresql(
    database: Database, tmp_path: Path, ca: CertificateAuthority
) -> None:
    cloud = make_cloud(tmp_path, database, Registry(database), ca)
    client = cloud.client
    with client:
        assert ok(client.get(f"{V1}/health"))["database"]["dialect"] == database.dialect
        ok(
            client.post(f"{V1}/things", json={"thingName": "hub-1", "attributes": {"m": "pi4"}}),
            201,
        )
        ok(
            client.post(f"{V1}/things", json={"thingName": "hub-2", "attributes": {"m": "pi5"}}),
            201,
        )
        ok(
            client.post(
                f"{V1}/groups",
                json={"thingGroupName": "pi4s", "kind": "dynamic", "query": "attributes.m:pi4"},
            ),
            201,
        )
        ok(
            client.patch(
                f"{V1}/things/hub-2/attributes",
                json={"attributes": {"m": "pi4"}, "expectedVersion": 1},
            )
        )
        assert ok(client.get(f"{V1}/groups/pi4s"))["members"] == ["hub-1", "hub-2"]
        assert ok(client.get(f"{V1}/fleet/query", params={"q": "attributes.m:pi4"}))["count"] == 2

        cert = ok(client.post(f"{V1}/things/hub-1/certificates", json={}), 201)
        ok(
            client.post(
                f"{V1}/certificates/{cert['certificateId']}/revoke", json={"reason": "test"}
            )
        )
        assert cloud.revocations and cloud.revocations[-1] > 0
        assert ok(client.get(f"{V1}/things/hub-1"))["certificates"][0]["status"] == "REVOKED"

        ok(client.post(f"{V1}/things/hub-1/shadows/cfg", json={"state": {"desired": {"x": 1}}}))
        conflict = client.post(
            f"{V1}/things/hub-1/shadows/cfg", json={"state": {"desired": {"x": 2}}, "version": 5}
        )
        assert conflict.status_code == 409
        assert ok(client.get(f"{V1}/things/hub-1/shadows"))["results"] == ["cfg"]
        assert ok(client.post(f"{V1}/claims", json={"template": "factory"}), 201)["kind"] == "claim"

        bad = client.post(
            f"{V1}/things", json={"thingName": "hub-3", "attributes": {"a": {"b": 1}}}
        )
        assert (bad.status_code, bad.json()["field"]) == (400, "attributes.a")
        assert client.delete(f"{V1}/things/hub-2").status_code == 204
        assert [t["thingName"] for t in ok(client.get(f"{V1}/things"))["things"]] == ["hub-1"]
