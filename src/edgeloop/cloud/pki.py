"""The install's certificate authority: device, claim and server certificates, and CRLs.

One folder holds the CA (``root.pem``/``root.key``, optionally ``intermediate.pem``/
``intermediate.key``, and ``chain.pem``, the bundle the broker and clients trust). The
intermediate, when present, issues everything; the root only signs the intermediate, so
its key can be moved offline later.

Certificate profiles (what Mosquitto/OpenSSL check on a TLS handshake):

- device: ``CN=<thing name>``, ``basicConstraints CA:FALSE``, ``keyUsage
  digitalSignature`` (plus ``keyEncipherment`` for RSA keys), ``extendedKeyUsage
  clientAuth``, a random 128-bit serial. Its id is AWS IoT's ``certificateId``: the
  SHA-256 fingerprint of the DER, lowercase hex.
- claim (provisioning by claim, as AWS IoT fleet provisioning): ``CN=claim:<template>``
  and ``OU=claim``; see :meth:`CertificateAuthority.issue_claim_certificate`.
- server: ``extendedKeyUsage serverAuth`` and SANs, for the broker's and the API's
  listeners.

Revocation. Mosquitto, given ``crlfile``, loads it into the listener's X509_STORE and sets
only ``X509_V_FLAG_CRL_CHECK``: OpenSSL then wants a CRL from the *leaf's issuer* (ours is
the issuing CA, so :meth:`CertificateAuthority.crl_pem` is enough), ignores the rest of
the chain, and refuses every client when that CRL is missing or past its ``nextUpdate``
— so the CRL must be re-signed before ``next_update_days`` run out, and a leaf issued
by a user-registered CA fails the handshake ("unable to get certificate CRL") unless that
CA's own CRL is in the file too. Mosquitto 2.0 loads every CRL of a multi-CRL ``crlfile``
(1.6 took exactly one: eclipse/mosquitto#1442); checked by hand against 2.0.11.
:meth:`CertificateAuthority.crl_chain_pem` adds the root's (empty) CRL for verifiers that
check the whole chain (``X509_V_FLAG_CRL_CHECK_ALL``, Python's
``VERIFY_CRL_CHECK_CHAIN``). :meth:`CertificateAuthority.identify` does not look at
revocation: the registry knows which certificate ids are revoked.
"""

from __future__ import annotations

import ipaddress
import re
import secrets
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgeloop.core.errors import ConflictError, PkiError, ValidationError
from edgeloop.core.names import is_thing_name
from edgeloop.fileio import write_bytes_atomic

KeyType = Literal["ec", "rsa"]
IdentityKind = Literal["thing", "claim"]
Clock = Callable[[], datetime]
SigningKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

CLAIM_OU = "claim"
CLAIM_CN_PREFIX = "claim:"
# AWS IoT's thing name and provisioning template name patterns.
_TEMPLATE_NAME = re.compile(r"^[0-9A-Za-z_-]{1,36}$")
# Clocks disagree by a little; a certificate that starts "now" would be refused by a
# verifier a few seconds behind.
_BACKDATE = timedelta(minutes=5)
_ROOT_DAYS = 20 * 365
_INTERMEDIATE_DAYS = 10 * 365
_CSR_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, kw_only=True)
class IssuedCertificate:
    """A certificate just issued; ``private_key_pem`` is set when the CA made the key."""

    certificate_pem: bytes
    private_key_pem: bytes | None
    certificate_id: str
    serial: int
    not_before: datetime
    not_after: datetime
    subject_cn: str
    chain_pem: bytes  # the issuer's chain up to the root, issuer first

    @property
    def key_pem(self) -> bytes | None:
        """Alias of ``private_key_pem``."""
        return self.private_key_pem


@dataclass(frozen=True)
class Identity:
    """Who a verified certificate speaks for."""

    kind: IdentityKind
    name: str  # the thing name, or the provisioning template of a claim
    certificate_id: str
    issuer_fingerprint: str


def load_certificate(data: bytes) -> x509.Certificate:
    """The first certificate in ``data`` (PEM, or DER); PkiError saying why it is unreadable."""
    if not data or not data.strip():
        raise PkiError("no certificate: the data is empty")
    try:
        if b"-----BEGIN" in data:
            if b"-----BEGIN CERTIFICATE-----" not in data:
                raise PkiError("no PEM block 'BEGIN CERTIFICATE' found (is it a key or a CSR?)")
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError as err:
        raise PkiError(f"not a readable X.509 certificate: {err}") from err


def fingerprint(cert: bytes | x509.Certificate) -> str:
    """SHA-256 of the certificate's DER, lowercase hex (AWS IoT's ``certificateId``)."""
    certificate = cert if isinstance(cert, x509.Certificate) else load_certificate(cert)
    return certificate.fingerprint(hashes.SHA256()).hex()


def check_thing_name(name: str, field: str = "thing_name") -> str:
    """``name`` if AWS IoT would accept it as a thing name; ValidationError otherwise."""
    if not is_thing_name(name):
        raise ValidationError(
            f"{name!r} must be 1-128 characters of letters, digits, ':', '_' and '-'", field=field
        )
    if name.startswith(CLAIM_CN_PREFIX):
        # A thing named like a claim would share its broker username (the CN).
        raise ValidationError(f"{name!r} must not start with {CLAIM_CN_PREFIX!r}", field=field)
    return name


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: SigningKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _new_key(key_type: str) -> SigningKey:
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise ValidationError(f"{key_type!r} is not one of 'ec', 'rsa'", field="key_type")


def _serial() -> int:
    return secrets.randbits(128) or 1


def _common_name(cert: x509.Certificate | x509.Name) -> str | None:
    name = cert.subject if isinstance(cert, x509.Certificate) else cert
    values = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(values[0].value) if values else None


def _describe(cert: x509.Certificate) -> str:
    return _common_name(cert) or cert.subject.rfc4514_string() or "(no subject)"


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _read_cert(path: Path) -> x509.Certificate:
    try:
        data = path.read_bytes()
    except FileNotFoundError as err:
        raise PkiError(f"{path}: missing (the CA folder is incomplete)") from err
    try:
        return load_certificate(data)
    except PkiError as err:
        raise PkiError(f"{path}: {err}") from err


def _read_key(path: Path, cert: x509.Certificate) -> SigningKey:
    try:
        data = path.read_bytes()
    except FileNotFoundError as err:
        raise PkiError(f"{path}: missing (the CA folder is incomplete)") from err
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise PkiError(f"{path}: not a readable unencrypted PEM private key: {err}") from err
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise PkiError(f"{path}: a {type(key).__name__}; only EC and RSA keys are supported")
    if key.public_key() != cert.public_key():
        raise PkiError(f"{path}: does not match the certificate beside it")
    return key


class CertificateAuthority:
    """The install's CA; the intermediate issues when there is one, else the root."""

    def __init__(
        self,
        folder: Path,
        *,
        root: x509.Certificate,
        root_key: SigningKey,
        intermediate: x509.Certificate | None = None,
        intermediate_key: SigningKey | None = None,
        clock: Clock = _utcnow,
    ) -> None:
        self.folder = folder
        self.root = root
        self.intermediate = intermediate
        self.clock = clock
        self._root_key = root_key
        self._issuer_key: SigningKey = intermediate_key if intermediate_key else root_key
        self.issuer: x509.Certificate = intermediate if intermediate else root

    # -- creating and loading -------------------------------------------------------------

    @classmethod
    def create(
        cls,
        folder: Path,
        *,
        name: str = "edgeloop",
        intermediate: bool = True,
        key_type: KeyType = "ec",
        clock: Clock = _utcnow,
    ) -> CertificateAuthority:
        """Make a new CA in ``folder``; ConflictError if one is already there.

        ``root.pem`` is written last, so a crash part-way leaves a folder that is not a CA
        and that a second ``create`` overwrites.
        """
        root_path = folder / "root.pem"
        if root_path.exists():
            raise ConflictError(f"{root_path}: a CA already exists here; load it instead")
        if not name.strip():
            raise ValidationError("must not be empty", field="name")
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        now = clock()
        root_key = _new_key(key_type)
        root_name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, name),
                x509.NameAttribute(NameOID.COMMON_NAME, f"{name} root CA"),
            ]
        )
        root = _ca_certificate(
            root_name,
            root_key.public_key(),
            issuer_name=root_name,
            issuer_key=root_key,
            path_length=1 if intermediate else 0,
            not_before=now - _BACKDATE,
            not_after=now + timedelta(days=_ROOT_DAYS),
        )
        inter: x509.Certificate | None = None
        inter_key: SigningKey | None = None
        if intermediate:
            inter_key = _new_key(key_type)
            inter = _ca_certificate(
                x509.Name(
                    [
                        x509.NameAttribute(NameOID.ORGANIZATION_NAME, name),
                        x509.NameAttribute(NameOID.COMMON_NAME, f"{name} issuing CA"),
                    ]
                ),
                inter_key.public_key(),
                issuer_name=root.subject,
                issuer_key=root_key,
                path_length=0,
                not_before=now - _BACKDATE,
                not_after=now + timedelta(days=_INTERMEDIATE_DAYS),
            )
            write_bytes_atomic(folder / "intermediate.key", _key_pem(inter_key), mode=0o600)
            write_bytes_atomic(folder / "intermediate.pem", _pem(inter), mode=0o644)
        else:
            (folder / "intermediate.key").unlink(missing_ok=True)
            (folder / "intermediate.pem").unlink(missing_ok=True)
        ca = cls(
            folder,
            root=root,
            root_key=root_key,
            intermediate=inter,
            intermediate_key=inter_key,
            clock=clock,
        )
        write_bytes_atomic(folder / "chain.pem", ca.chain_pem, mode=0o644)
        write_bytes_atomic(folder / "root.key", _key_pem(root_key), mode=0o600)
        write_bytes_atomic(root_path, _pem(root), mode=0o644)
        return ca

    @classmethod
    def load(cls, folder: Path, *, clock: Clock = _utcnow) -> CertificateAuthority:
        """The CA in ``folder``; PkiError naming the file that is missing or corrupt."""
        root = _read_cert(folder / "root.pem")
        root_key = _read_key(folder / "root.key", root)
        inter: x509.Certificate | None = None
        inter_key: SigningKey | None = None
        if (folder / "intermediate.pem").exists():
            inter = _read_cert(folder / "intermediate.pem")
            inter_key = _read_key(folder / "intermediate.key", inter)
            try:
                inter.verify_directly_issued_by(root)
            except (ValueError, TypeError, InvalidSignature) as err:
                reason = str(err) or "the signature does not verify"
                raise PkiError(
                    f"{folder / 'intermediate.pem'}: not issued by root.pem ({reason})"
                ) from err
        ca = cls(
            folder,
            root=root,
            root_key=root_key,
            intermediate=inter,
            intermediate_key=inter_key,
            clock=clock,
        )
        if not (folder / "chain.pem").exists():
            # Derived from the certificates above, so an accidental delete is repaired.
            write_bytes_atomic(folder / "chain.pem", ca.chain_pem, mode=0o644)
        return ca

    @classmethod
    def open_or_create(
        cls,
        folder: Path,
        *,
        name: str = "edgeloop",
        intermediate: bool = True,
        key_type: KeyType = "ec",
        clock: Clock = _utcnow,
    ) -> CertificateAuthority:
        """The CA in ``folder``, created first if there is none (the other options then apply)."""
        if (folder / "root.pem").exists():
            return cls.load(folder, clock=clock)
        return cls.create(
            folder, name=name, intermediate=intermediate, key_type=key_type, clock=clock
        )

    @property
    def chain_pem(self) -> bytes:
        """What the broker and clients trust: the root, then the intermediate if any."""
        return _pem(self.root) + (_pem(self.intermediate) if self.intermediate else b"")

    @property
    def chain_path(self) -> Path:
        """``chain.pem``, for the broker's ``cafile``."""
        return self.folder / "chain.pem"

    @property
    def issuer_chain_pem(self) -> bytes:
        """The issuing CA's chain as a leaf's holder sends it: issuer first, root last."""
        return (_pem(self.intermediate) if self.intermediate else b"") + _pem(self.root)

    # -- issuing ----------------------------------------------------------------------------

    def issue_device_certificate(
        self, thing_name: str, *, csr_pem: bytes | None = None, days: int = 3650
    ) -> IssuedCertificate:
        """A client certificate for a thing, for the key in ``csr_pem`` or a new EC key.

        The CSR's subject is ignored: the CN is always the thing name, because the broker
        and the API take the identity from it.
        """
        check_thing_name(thing_name)
        _check_days(days)
        key: SigningKey | None = None
        if csr_pem is None:
            key = _new_key("ec")
            public_key = key.public_key()
        else:
            public_key = _csr_public_key(csr_pem)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, thing_name)])
        return self._issue(
            subject, public_key, key, days, ExtendedKeyUsageOID.CLIENT_AUTH, sans=None
        )

    def issue_claim_certificate(self, template: str, *, days: int = 365) -> IssuedCertificate:
        """A provisioning-claim certificate for ``template``, with a new EC key.

        The convention: subject ``CN=claim:<template>, OU=claim``. A thing's certificate
        never has an OU and a thing may not be named ``claim:...``, so the broker's ACL
        (which sees the CN as the username) and the API can tell a claim apart and let it
        do one thing only: ask for a real identity through ``template``.
        """
        if not _TEMPLATE_NAME.match(template):
            raise ValidationError(
                f"{template!r} must be 1-36 characters of letters, digits, '_' and '-'",
                field="template",
            )
        _check_days(days)
        key = _new_key("ec")
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, CLAIM_OU),
                x509.NameAttribute(NameOID.COMMON_NAME, CLAIM_CN_PREFIX + template),
            ]
        )
        return self._issue(
            subject, key.public_key(), key, days, ExtendedKeyUsageOID.CLIENT_AUTH, sans=None
        )

    def issue_server_certificate(
        self, hostnames: Sequence[str], ips: Sequence[str] = (), *, days: int = 825
    ) -> IssuedCertificate:
        """A TLS server certificate (broker, API) for ``hostnames`` and ``ips``, new EC key."""
        if isinstance(hostnames, str) or isinstance(ips, str):
            raise ValidationError("must be a list, not a string", field="hostnames/ips")
        if not hostnames and not ips:
            raise ValidationError("give at least one hostname or IP address", field="hostnames")
        _check_days(days)
        sans: list[x509.GeneralName] = []
        for host in hostnames:
            if not host or not re.match(r"^[A-Za-z0-9*]([A-Za-z0-9.*-]*[A-Za-z0-9])?$", host):
                raise ValidationError(f"{host!r} is not a DNS name", field="hostnames")
            sans.append(x509.DNSName(host))
        for ip in ips:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(ip)))
            except ValueError as err:
                raise ValidationError(f"{ip!r} is not an IP address", field="ips") from err
        key = _new_key("ec")
        cn = hostnames[0] if hostnames else ips[0]
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        return self._issue(
            subject, key.public_key(), key, days, ExtendedKeyUsageOID.SERVER_AUTH, sans=sans
        )

    def _issue(
        self,
        subject: x509.Name,
        public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey,
        key: SigningKey | None,
        days: int,
        usage: x509.ObjectIdentifier,
        sans: list[x509.GeneralName] | None,
    ) -> IssuedCertificate:
        now = self.clock()
        not_before = now - _BACKDATE
        # A leaf that outlives its issuer would be refused then anyway; say so up front.
        not_after = min(now + timedelta(days=days), self.issuer.not_valid_after_utc)
        rsa_key = isinstance(public_key, rsa.RSAPublicKey)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.issuer.subject)
            .public_key(public_key)
            .serial_number(_serial())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=rsa_key,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(_aki(self.issuer), critical=False)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self._issuer_key, hashes.SHA256())
        return IssuedCertificate(
            certificate_pem=_pem(cert),
            private_key_pem=_key_pem(key) if key is not None else None,
            certificate_id=fingerprint(cert),
            serial=cert.serial_number,
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
            subject_cn=_common_name(cert) or "",
            chain_pem=self.issuer_chain_pem,
        )

    # -- verifying ---------------------------------------------------------------------------

    def identify(self, cert_pem: bytes, trusted_cas: Sequence[bytes] = ()) -> Identity:
        """Who ``cert_pem`` speaks for, if it is a valid client certificate; PkiError if not.

        Accepted: certificates issued by this CA, and certificates issued directly by one of
        ``trusted_cas`` (CAs users registered, each a trust anchor as in AWS IoT). Checks the
        issuer's signature, the validity dates of the certificate and its issuer against
        ``clock``, that it is no CA and may be used for client auth. Revocation is the
        registry's to check, by ``certificate_id``.
        """
        cert = load_certificate(cert_pem)
        own = [self.issuer, self.root] if self.intermediate else [self.root]
        user_cas = [_load_ca(pem, index) for index, pem in enumerate(trusted_cas)]
        issuer = _find_issuer(cert, own + user_cas)
        now = self.clock()
        for checked, what in ((cert, "certificate"), (issuer, f"issuing CA {_describe(issuer)!r}")):
            if now < checked.not_valid_before_utc:
                raise PkiError(f"the {what} is not valid before {checked.not_valid_before_utc}")
            if now > checked.not_valid_after_utc:
                raise PkiError(f"the {what} expired on {checked.not_valid_after_utc}")
        if _is_ca(cert):
            raise PkiError("a CA certificate cannot identify a device")
        try:
            eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            eku = None
        if eku is not None and ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
            raise PkiError("the certificate's extended key usage does not allow client auth")
        cn = _common_name(cert)
        if cn is None:
            raise PkiError("the certificate's subject has no CN")
        ous = [
            a.value for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
        ]
        issuer_id = fingerprint(issuer)
        if CLAIM_OU in ous or cn.startswith(CLAIM_CN_PREFIX):
            if issuer not in own:
                raise PkiError("claim certificates are accepted only from this install's CA")
            template = cn.removeprefix(CLAIM_CN_PREFIX)
            if CLAIM_OU not in ous or not cn.startswith(CLAIM_CN_PREFIX) or not template:
                raise PkiError(f"subject {cert.subject.rfc4514_string()!r} is a malformed claim")
            return Identity("claim", template, fingerprint(cert), issuer_id)
        try:
            check_thing_name(cn, field="subject CN")
        except ValidationError as err:
            raise PkiError(f"the certificate does not name a thing: {err}") from err
        return Identity("thing", cn, fingerprint(cert), issuer_id)

    # -- revocation -------------------------------------------------------------------------

    def crl_pem(
        self, revoked: Iterable[tuple[int, datetime]], *, next_update_days: int = 7
    ) -> bytes:
        """A CRL from the issuing CA listing ``(serial, revoked_at)``, for Mosquitto's ``crlfile``.

        Re-sign it before ``next_update_days`` pass: OpenSSL refuses every client once the
        CRL in use is past its next update.
        """
        return _crl(self.issuer, self._issuer_key, revoked, self.clock(), next_update_days)

    def crl_chain_pem(
        self, revoked: Iterable[tuple[int, datetime]], *, next_update_days: int = 7
    ) -> bytes:
        """:meth:`crl_pem`, then the root's (empty) CRL when there is an intermediate.

        For verifiers that check CRLs along the whole chain (OpenSSL's
        ``X509_V_FLAG_CRL_CHECK_ALL``); Mosquitto only checks the leaf's issuer.
        """
        now = self.clock()
        crls = _crl(self.issuer, self._issuer_key, revoked, now, next_update_days)
        if self.intermediate is not None:
            crls += _crl(self.root, self._root_key, (), now, next_update_days)
        return crls


def _check_days(days: int) -> None:
    if days < 1:
        raise ValidationError(f"{days} must be at least 1", field="days")


def _aki(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _ca_certificate(
    subject: x509.Name,
    public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey,
    *,
    issuer_name: x509.Name,
    issuer_key: SigningKey,
    path_length: int,
    not_before: datetime,
    not_after: datetime,
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(public_key)
        .serial_number(_serial())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,  # OpenSSL refuses CRLs from an issuer without it
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )
    if issuer_name != subject:
        issuer_public = issuer_key.public_key()
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_public), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _csr_public_key(csr_pem: bytes) -> ec.EllipticCurvePublicKey | rsa.RSAPublicKey:
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as err:
        raise PkiError(f"the CSR is not a readable PEM certificate request: {err}") from err
    try:
        valid = csr.is_signature_valid
    except UnsupportedAlgorithm as err:
        raise PkiError(f"the CSR's signature algorithm is not supported: {err}") from err
    if not valid:
        raise PkiError("the CSR's signature does not verify: it was not signed by its own key")
    key = csr.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, _CSR_CURVES):
            raise PkiError(f"the CSR's EC curve {key.curve.name} is not P-256, P-384 or P-521")
        return key
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < 2048:
            raise PkiError(f"the CSR's RSA key has {key.key_size} bits; at least 2048 needed")
        return key
    raise PkiError(f"the CSR's key is a {type(key).__name__}; only EC and RSA are accepted")


def _load_ca(pem: bytes, index: int) -> x509.Certificate:
    try:
        cert = load_certificate(pem)
    except PkiError as err:
        raise PkiError(f"trusted CA #{index}: {err}") from err
    if not _is_ca(cert):
        raise PkiError(f"trusted CA #{index} ({_describe(cert)!r}) is not a CA certificate")
    return cert


def _find_issuer(cert: x509.Certificate, cas: Sequence[x509.Certificate]) -> x509.Certificate:
    named = [ca for ca in cas if ca.subject == cert.issuer]
    for ca in named:
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return ca
    issuer = _common_name(cert.issuer) or cert.issuer.rfc4514_string()
    if named:
        raise PkiError(
            f"the certificate's signature does not verify against {issuer!r}: "
            "it was altered, or signed by another key with the same name"
        )
    raise PkiError(
        f"the certificate's issuer {issuer!r} is neither this install's CA nor a registered CA"
    )


def _crl(
    issuer: x509.Certificate,
    key: SigningKey,
    revoked: Iterable[tuple[int, datetime]],
    now: datetime,
    next_update_days: int,
) -> bytes:
    if next_update_days < 1:
        raise ValidationError(f"{next_update_days} must be at least 1", field="next_update_days")
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer.subject)
        .last_update(now - _BACKDATE)
        .next_update(now + timedelta(days=next_update_days))
        # RFC 5280 wants a monotonically increasing number; milliseconds since the epoch is.
        .add_extension(x509.CRLNumber(int(now.timestamp() * 1000)), critical=False)
        .add_extension(_aki(issuer), critical=False)
    )
    for serial, revoked_at in revoked:
        if revoked_at.tzinfo is None:
            raise ValidationError("revocation times must be timezone-aware", field="revoked")
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(serial)
            .revocation_date(revoked_at)
            .build()
        )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)
