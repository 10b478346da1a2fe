"""Kit certificates: each kit has its own key and certificate, CN = its kit id.

A folder holds them as ``<kit_id>.cert.pem`` and ``<kit_id>.key.pem`` (unencrypted PEM).
Given the CA's certificate and key, missing ones are issued (an EC P-256 key, a one-year
client certificate signed by the CA, key file mode 0600); given only the CA certificate,
every kit must already have its files.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgeloop.core.errors import PkiError, ValidationError

VALID_DAYS = 365


@dataclass(frozen=True, kw_only=True)
class KitIdentity:
    """Where one kit's certificate and key are."""

    kit_id: str
    cert: Path
    key: Path


def identity_paths(certs_dir: Path, kit_id: str) -> KitIdentity:
    """The files of ``kit_id`` in ``certs_dir``."""
    return KitIdentity(
        kit_id=kit_id,
        cert=certs_dir / f"{kit_id}.cert.pem",
        key=certs_dir / f"{kit_id}.key.pem",
    )


def issue_kit_certificate(
    ca_cert_pem: bytes,
    ca_key_pem: bytes,
    kit_id: str,
    *,
    days: int = VALID_DAYS,
    now: dt.datetime | None = None,
) -> tuple[bytes, bytes]:
    """A new key and a client certificate for ``kit_id`` signed by the CA: (cert, key) PEM."""
    try:
        ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
        ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    except (ValueError, TypeError) as err:
        raise PkiError(f"cannot read the CA certificate or key: {err}") from err
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise PkiError("the CA key must be an EC or RSA private key")
    key = ec.generate_private_key(ec.SECP256R1())
    start = (now or dt.datetime.now(dt.UTC)) - dt.timedelta(minutes=5)  # clock skew
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, kit_id)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def kit_identities(
    kit_ids: Sequence[str], certs_dir: Path, *, ca_cert: Path, ca_key: Path | None = None
) -> list[KitIdentity]:
    """Each kit's files in ``certs_dir``, issuing the missing ones when ``ca_key`` is given."""
    identities = [identity_paths(certs_dir, kit_id) for kit_id in kit_ids]
    missing = [i for i in identities if not (i.cert.is_file() and i.key.is_file())]
    if not missing:
        return identities
    if ca_key is None:
        names = ", ".join(f"{i.cert.name} / {i.key.name}" for i in missing)
        raise ValidationError(
            f"no certificate and key for kit(s) {names}; put them there, or pass --ca-key "
            "to issue them with the CA",
            source=str(certs_dir),
        )
    ca_cert_pem, ca_key_pem = _read(ca_cert), _read(ca_key)
    certs_dir.mkdir(parents=True, exist_ok=True)
    for identity in missing:
        cert_pem, key_pem = issue_kit_certificate(ca_cert_pem, ca_key_pem, identity.kit_id)
        _write(identity.key, key_pem, 0o600)
        _write(identity.cert, cert_pem, 0o644)
    return identities


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise PkiError(f"cannot read {path}: {err.strerror}") from err


def _write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.replace(tmp, path)
