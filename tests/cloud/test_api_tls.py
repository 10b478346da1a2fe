"""The API over HTTPS (`cloud up --tls`): things call it with their certificates and reach
only their own resources, operators with the install's token; revoked, inactive, claim and
foreign certificates are refused; the CLI finds the CA and token of the local install."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import ssl
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from edgeloop.cloud.apiauth import THING_RULES, thing_may
from edgeloop.cloud.pki import CertificateAuthority
from edgeloop.cloud.service import Cloud, CloudSettings
from edgeloop.core.errors import CloudError
from tests.cloud.test_cloud_up import _free_port

EDGELOOP = Path(sys.executable).parent / "edgeloop"


class TlsCloud:
    """A `cloud up --tls` served from a background event loop."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.cloud = Cloud(CloudSettings(data_dir=data_dir, port=_free_port(), tls=True))
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.endpoints: dict[str, Any] = asyncio.run_coroutine_threadsafe(
            self.cloud.start(), self.loop
        ).result(60)
        self.url = self.endpoints["api"] + "/api/v1"
        token = Path(self.endpoints["tokenFile"]).read_text().strip()
        self.operator = self.client(headers={"Authorization": f"Bearer {token}"})

    def client(self, cert: tuple[Path, Path] | None = None, **kwargs: Any) -> httpx.Client:
        context = ssl.create_default_context(cafile=self.endpoints["caFile"])
        if cert is not None:
            context.load_cert_chain(*cert)
        return httpx.Client(base_url=self.url, verify=context, timeout=30, **kwargs)

    def thing(self, tmp: Path) -> tuple[str, tuple[Path, Path], str]:
        """A new thing with a certificate: its name, (cert, key) files, certificate id."""
        name = f"hub-{uuid.uuid4().hex[:8]}"
        assert self.operator.post("/things", json={"thingName": name}).status_code == 201
        issued = self.operator.post(f"/things/{name}/certificates", json={}).json()
        cert, key = tmp / f"{name}.pem", tmp / f"{name}.key"
        cert.write_text(issued["certificatePem"])
        key.write_text(issued["privateKeyPem"])
        return name, (cert, key), issued["certificateId"]

    def close(self) -> None:
        self.operator.close()
        asyncio.run_coroutine_threadsafe(self.cloud.stop(), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsCloud]:
    running = TlsCloud(tmp_path_factory.mktemp("tls-cloud") / "data")
    yield running
    running.close()


def _message(response: httpx.Response) -> str:
    body = response.json()
    assert isinstance(body, dict) and isinstance(body.get("message"), str), body
    return str(body["message"])


def test_the_api_serves_https_and_its_token_is_private(cloud: TlsCloud) -> None:
    assert cloud.endpoints["api"].startswith("https://")
    assert Path(cloud.endpoints["tokenFile"]).stat().st_mode & 0o777 == 0o600
    with (
        httpx.Client(base_url=cloud.url, verify=True, timeout=10) as untrusting,
        pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"),
    ):
        untrusting.get("/health")


def test_without_credentials_only_public_paths_answer(cloud: TlsCloud) -> None:
    with cloud.client() as anonymous:
        assert anonymous.get("/health").status_code == 200
        assert anonymous.get(cloud.endpoints["api"] + "/openapi.json").status_code == 200
        refused = anonymous.get("/things")
        assert refused.status_code == 401
        assert "client certificate" in _message(refused) and "api-token" in _message(refused)
        assert refused.headers["www-authenticate"].startswith("Bearer")
    with cloud.client(headers={"Authorization": "Bearer not-the-token"}) as wrong:
        refused = wrong.get("/things")
        assert refused.status_code == 401 and "not this cloud's operator token" in _message(refused)


def test_the_operator_token_may_do_everything(cloud: TlsCloud, tmp_path: Path) -> None:
    name, _, certificate_id = cloud.thing(tmp_path)
    assert cloud.operator.get(f"/things/{name}").json()["thingName"] == name
    assert cloud.operator.get("/fleet/query", params={"query": f"thingName:{name}"}).json()
    assert cloud.operator.get(f"/certificates/{certificate_id}").status_code == 200


def test_a_thing_reaches_its_own_resources_and_nothing_else(
    cloud: TlsCloud, tmp_path: Path
) -> None:
    name, cert, _ = cloud.thing(tmp_path)
    other, _, _ = cloud.thing(tmp_path)
    with cloud.client(cert) as hub:
        assert hub.get(f"/things/{name}").json()["thingName"] == name
        update = hub.post(
            f"/things/{name}/shadow", json={"state": {"reported": {"firmware": "1.2"}}}
        )
        assert update.status_code == 200, update.text
        assert hub.get(f"/things/{name}/shadow").json()["state"]["reported"] == {"firmware": "1.2"}
        for method, path in [
            ("GET", f"/things/{other}"),
            ("GET", f"/things/{other}/shadow"),
            ("GET", "/things"),
            ("DELETE", f"/things/{name}"),
            ("PATCH", f"/things/{name}/attributes"),
            ("POST", f"/things/{name}/certificates"),
            ("POST", "/claims"),
        ]:
            refused = hub.request(method, path, json={})
            assert refused.status_code == 403, (method, path, refused.text)
            assert f"thing {name!r} may not {method}" in _message(refused)


def test_a_revoked_certificate_can_no_longer_call_the_api(cloud: TlsCloud, tmp_path: Path) -> None:
    name, cert, certificate_id = cloud.thing(tmp_path)
    with cloud.client(cert) as hub:
        assert hub.get(f"/things/{name}").status_code == 200
        revoke = cloud.operator.post(f"/certificates/{certificate_id}/revoke", json={})
        assert revoke.status_code == 200
        refused = hub.get(f"/things/{name}")  # the same keep-alive connection, even
        assert refused.status_code == 403
        assert _message(refused) == f"certificate {certificate_id} is REVOKED"
    with cloud.client(cert) as again:
        assert again.get(f"/things/{name}").status_code == 403


def test_an_unregistered_or_claim_certificate_is_refused(cloud: TlsCloud, tmp_path: Path) -> None:
    ca = CertificateAuthority.open_or_create(cloud.data_dir / "ca")
    # Signed by the install's CA but never recorded: the CA alone does not make a thing.
    issued = ca.issue_device_certificate("stray-hub")
    assert issued.private_key_pem is not None
    stray = (tmp_path / "stray.pem", tmp_path / "stray.key")
    stray[0].write_bytes(issued.certificate_pem)
    stray[1].write_bytes(issued.private_key_pem)
    with cloud.client(stray) as client:
        refused = client.get("/things/stray-hub")
        assert refused.status_code == 403 and "is not registered" in _message(refused)

    claim = cloud.operator.post("/claims", json={"template": f"t{uuid.uuid4().hex[:6]}"})
    assert claim.status_code == 201, claim.text
    claim_files = (tmp_path / "claim.pem", tmp_path / "claim.key")
    claim_files[0].write_text(claim.json()["certificatePem"])
    claim_files[1].write_text(claim.json()["privateKeyPem"])
    with cloud.client(claim_files) as client:
        refused = client.get("/things")
        assert refused.status_code == 403 and "claim" in _message(refused)


def test_a_certificate_of_another_ca_fails_the_handshake(cloud: TlsCloud, tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "impostor")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    files = (tmp_path / "impostor.pem", tmp_path / "impostor.key")
    files[0].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files[1].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with cloud.client(files) as client, pytest.raises(httpx.HTTPError):
        client.get("/things")


def test_the_cli_finds_the_local_installs_ca_and_token(cloud: TlsCloud) -> None:
    env = {**os.environ, "EDGELOOP_CLOUD_DATA": str(cloud.data_dir)}
    env.pop("EDGELOOP_CLOUD", None)
    env.pop("EDGELOOP_TOKEN", None)
    run = subprocess.run(
        [str(EDGELOOP), "cloud", "thing", "list", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert isinstance(json.loads(run.stdout), dict | list)
    # Another URL of the same cloud is not "the local install": no token is sent.
    other = f"https://localhost:{cloud.endpoints['api'].rsplit(':', 1)[1]}"
    env |= {"EDGELOOP_CA_FILE": cloud.endpoints["caFile"]}
    run = subprocess.run(
        [str(EDGELOOP), "cloud", "thing", "list", "--url", other],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode != 0 and "client certificate" in run.stderr
    env |= {"EDGELOOP_TOKEN": Path(cloud.endpoints["tokenFile"]).read_text().strip()}
    run = subprocess.run(
        [str(EDGELOOP), "cloud", "thing", "list", "--url", other],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr


def test_the_cli_says_when_the_clouds_certificate_is_not_trusted(cloud: TlsCloud) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGELOOP_")}
    env["EDGELOOP_CLOUD_DATA"] = "/nonexistent"
    run = subprocess.run(
        [str(EDGELOOP), "cloud", "thing", "list", "--url", cloud.url],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode != 0 and "$EDGELOOP_CA_FILE" in run.stderr


def test_plain_http_beyond_loopback_is_refused(tmp_path: Path) -> None:
    cloud = Cloud(CloudSettings(data_dir=tmp_path / "data", host="0.0.0.0", port=_free_port()))
    with pytest.raises(CloudError, match="with --tls"):
        asyncio.run(cloud.start())
    assert cloud.broker is None


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("GET", "/api/v1/things/hub-1", True),
        ("HEAD", "/api/v1/things/hub-1", True),
        ("DELETE", "/api/v1/things/hub-1", False),
        ("GET", "/api/v1/things/hub-10", False),
        ("GET", "/api/v1/things/hub-1/shadow", True),
        ("POST", "/api/v1/things/hub-1/shadows/config", True),
        ("GET", "/api/v1/things/hub-1/shadowsx", False),
        ("GET", "/api/v1/things/hub-1/jobs/next", True),
        ("POST", "/api/v1/things/hub-1/certificates", False),
        ("GET", "/api/v1/things/hub-.1", False),
        ("GET", "/api/v1/things", False),
    ],
)
def test_the_thing_rules(method: str, path: str, allowed: bool) -> None:
    assert thing_may("hub-1", method, path) is allowed
    assert all(rule.why for rule in THING_RULES)


def test_a_thing_name_with_regex_characters_matches_only_itself() -> None:
    assert thing_may("a.b", "GET", "/api/v1/things/a.b")
    assert not thing_may("a.b", "GET", "/api/v1/things/aXb")
