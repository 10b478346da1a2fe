"""Helpers for the simulator's tests: one kit's readings, a CA, a real TLS Mosquitto."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgeloop.sim.certs import issue_kit_certificate
from edgeloop.sim.generator import Batch, KitSimulator
from edgeloop.sim.scenario import Scenario, parse_scenario

HOUR = 3600.0


def one_kit(appliance: str, *faults: dict[str, Any], seed: int = 3, **kit: Any) -> Scenario:
    """A scenario with one kit (id ``<appliance>-1``) and the given fault entries."""
    return parse_scenario(
        {
            "seed": seed,
            "kits": [
                {"id": f"{appliance}-1", "appliance": appliance, "faults": list(faults), **kit}
            ],
        }
    )


def run(appliance: str, *faults: dict[str, Any], hours: float = 24.0, **kw: Any) -> Batch:
    """``hours`` of one kit's readings as arrays."""
    scenario = one_kit(appliance, *faults, **kw)
    kit = scenario.kits[0]
    sim = KitSimulator(kit, seed=scenario.seed, start_ms=scenario.start_ms)
    return sim.batch(round(hours * HOUR * 1000 / kit.interval_ms))


def window(batch: Batch, from_h: float, to_h: float) -> slice:
    """Rows from ``from_h`` to ``to_h`` hours after the start."""
    per_hour = round(HOUR * 1000 / int(batch.ts_ms[1] - batch.ts_ms[0]))
    return slice(round(from_h * per_hour), round(to_h * per_hour))


# --- a real Mosquitto with a mutual-TLS listener -------------------------------------------


ALLOWED = "test"  # the topic tree the brokers' ACL opens to every client


class TlsBroker:
    """A throwaway Mosquitto on loopback that requires client certificates from ``ca``.

    Persistent (sessions and queued messages survive ``restart``), like a hub's broker.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.ca, self.ca_key = make_ca(folder)
        self.cert, self.key = _server_cert(folder, self.ca, self.ca_key)
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def hub(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client_cert(self, name: str) -> tuple[Path, Path]:
        """A certificate and key for ``name`` signed by the broker's CA."""
        cert_pem, key_pem = issue_kit_certificate(
            self.ca.read_bytes(), self.ca_key.read_bytes(), name
        )
        cert, key = self.folder / f"{name}.client.pem", self.folder / f"{name}.client.key"
        cert.write_bytes(cert_pem)
        key.write_bytes(key_pem)
        return cert, key

    def start(self) -> None:
        mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not Path(mosquitto).exists():
            pytest.fail("mosquitto is not installed: run `make setup`", pytrace=False)
        acl = self.folder / "acl"
        acl.write_text(f"pattern readwrite {ALLOWED}/#\n")
        conf = self.folder / "mosquitto.conf"
        conf.write_text(
            "\n".join(
                [
                    # As root Mosquitto would drop to its own user, who cannot read here.
                    *(["user root"] if os.geteuid() == 0 else []),
                    "persistence true",
                    f"persistence_location {self.folder}/",
                    # An observer away for a restart must not miss readings queued for it.
                    "max_queued_messages 100000",
                    "log_dest stderr",
                    "log_type error",
                    "log_type warning",
                    "log_type notice",
                    f"listener {self.port} 127.0.0.1",
                    f"cafile {self.ca}",
                    f"certfile {self.cert}",
                    f"keyfile {self.key}",
                    "require_certificate true",
                    "use_identity_as_username true",
                    "allow_anonymous false",
                    f"acl_file {acl}",
                    "",
                ]
            )
        )
        with (self.folder / "mosquitto.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [mosquitto, "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    log_text = (self.folder / "mosquitto.log").read_text()
                    pytest.fail(f"mosquitto did not start: {log_text}", pytrace=False)
                time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM: Mosquitto saves its sessions and exits."""
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


def make_ca(folder: Path, name: str = "test CA") -> tuple[Path, Path]:
    """A self-signed EC CA: (certificate, key) files."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=2))
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    folder.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = folder / "ca.pem", folder / "ca.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def _server_cert(folder: Path, ca: Path, ca_key: Path) -> tuple[Path, Path]:
    ca_cert = x509.load_pem_x509_certificate(ca.read_bytes())
    signer = serialization.load_pem_private_key(ca_key.read_bytes(), password=None)
    assert isinstance(signer, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hub broker")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(signer, hashes.SHA256())
    )
    cert_path, key_path = folder / "server.pem", folder / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsBroker]:
    """Mosquitto with one listener: TLS, client certificates required, CN as username."""
    broker = TlsBroker(tmp_path_factory.mktemp("kits-broker"))
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def own_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsBroker]:
    """A broker for one test alone, which it may stop and start."""
    broker = TlsBroker(tmp_path_factory.mktemp("own-broker"))
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()
