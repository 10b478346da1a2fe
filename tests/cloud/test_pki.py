"""The install's CA: files, issuing, identifying, CRLs, and real TLS handshakes with ssl."""

from __future__ import annotations

import hashlib
import ipaddress
import ssl
import stat
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgeloop.cloud.pki import (
    CertificateAuthority,
    IssuedCertificate,
    fingerprint,
    load_certificate,
)
from edgeloop.core.errors import ConflictError, PkiError, ValidationError


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    """The install's CA (root + intermediate), shared: issuing does not change it."""
    return CertificateAuthority.create(tmp_path_factory.mktemp("ca") / "ca")


@pytest.fixture(scope="module")
def foreign(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    """A CA a user owns (no intermediate), for certificates this install did not issue."""
    return CertificateAuthority.create(
        tmp_path_factory.mktemp("foreign") / "ca", name="acme", intermediate=False
    )


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _at(ca: CertificateAuthority, when: datetime) -> CertificateAuthority:
    """The same CA, seeing ``when`` as now."""
    return CertificateAuthority.load(ca.folder, clock=lambda: when)


def _csr(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, cn: str = "ignored") -> bytes:
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


# -- the CA folder ------------------------------------------------------------------------


def test_create_writes_the_ca_files_with_private_keys_unreadable_to_others(
    ca: CertificateAuthority,
) -> None:
    folder = ca.folder
    for name in ("root.pem", "root.key", "intermediate.pem", "intermediate.key", "chain.pem"):
        assert (folder / name).is_file(), name
    assert stat.S_IMODE((folder / "root.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((folder / "intermediate.key").stat().st_mode) == 0o600
    chain = x509.load_pem_x509_certificates((folder / "chain.pem").read_bytes())
    assert chain == [ca.root, ca.intermediate]
    assert ca.issuer == ca.intermediate
    assert ca.intermediate is not None
    ca.intermediate.verify_directly_issued_by(ca.root)
    constraints = ca.intermediate.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.value.ca and constraints.value.path_length == 0
    assert isinstance(ca.root.public_key(), ec.EllipticCurvePublicKey)


def test_create_without_intermediate_issues_from_the_root(foreign: CertificateAuthority) -> None:
    assert foreign.intermediate is None and foreign.issuer == foreign.root
    assert not (foreign.folder / "intermediate.pem").exists()
    assert x509.load_pem_x509_certificates(foreign.chain_pem) == [foreign.root]
    issued = foreign.issue_device_certificate("acme-1")
    load_certificate(issued.certificate_pem).verify_directly_issued_by(foreign.root)
    assert issued.chain_pem == _pem(foreign.root)


def test_an_rsa_ca_issues_certificates_it_identifies(tmp_path: Path) -> None:
    rsa_ca = CertificateAuthority.create(tmp_path / "ca", key_type="rsa")
    root_key = rsa_ca.root.public_key()
    assert isinstance(root_key, rsa.RSAPublicKey) and root_key.key_size == 2048
    issued = rsa_ca.issue_device_certificate("rsa-thing")
    assert rsa_ca.identify(issued.certificate_pem).name == "rsa-thing"


def test_create_refuses_an_unknown_key_type_and_an_existing_ca(
    tmp_path: Path, ca: CertificateAuthority
) -> None:
    with pytest.raises(ValidationError) as info:
        CertificateAuthority.create(tmp_path / "x", key_type="dsa")  # type: ignore[arg-type]
    assert info.value.field == "key_type"
    with pytest.raises(ConflictError, match=r"root\.pem"):
        CertificateAuthority.create(ca.folder)


def test_load_and_open_or_create_return_the_same_ca(tmp_path: Path) -> None:
    first = CertificateAuthority.open_or_create(tmp_path / "ca")
    again = CertificateAuthority.open_or_create(tmp_path / "ca", intermediate=False)
    loaded = CertificateAuthority.load(tmp_path / "ca")
    assert fingerprint(again.root) == fingerprint(first.root) == fingerprint(loaded.root)
    assert again.intermediate == first.intermediate
    issued = loaded.issue_device_certificate("after-reload")
    assert first.identify(issued.certificate_pem).name == "after-reload"


def test_load_puts_back_a_deleted_chain(tmp_path: Path) -> None:
    ca = CertificateAuthority.create(tmp_path / "ca")
    ca.chain_path.unlink()
    CertificateAuthority.load(tmp_path / "ca")
    assert ca.chain_path.read_bytes() == ca.chain_pem


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda f: (f / "root.pem").unlink(), r"root\.pem: missing"),
        (lambda f: (f / "intermediate.key").unlink(), r"intermediate\.key: missing"),
        (lambda f: (f / "root.pem").write_bytes(b"junk"), r"root\.pem: .*not a readable"),
        (
            lambda f: (f / "intermediate.key").write_bytes(b"-----BEGIN PRIVATE KEY-----\nxx\n"),
            r"intermediate\.key: not a readable",
        ),
        (
            lambda f: (f / "root.key").write_bytes((f / "intermediate.key").read_bytes()),
            r"root\.key: does not match",
        ),
    ],
    ids=["root-missing", "key-missing", "cert-corrupt", "key-corrupt", "key-swapped"],
)
def test_load_names_the_missing_or_corrupt_file(
    tmp_path: Path, damage: Callable[[Path], object], message: str
) -> None:
    CertificateAuthority.create(tmp_path / "ca")
    damage(tmp_path / "ca")
    with pytest.raises(PkiError, match=message):
        CertificateAuthority.load(tmp_path / "ca")


# -- device certificates --------------------------------------------------------------------


def _check_device(issued: IssuedCertificate, ca: CertificateAuthority, thing: str) -> None:
    cert = load_certificate(issued.certificate_pem)
    der = cert.public_bytes(serialization.Encoding.DER)
    assert issued.certificate_id == hashlib.sha256(der).hexdigest()
    assert len(issued.certificate_id) == 64 and issued.certificate_id.islower()
    assert issued.subject_cn == thing
    assert cert.subject.rfc4514_string() == f"CN={thing}"
    assert issued.serial == cert.serial_number and 0 < issued.serial < 2**128
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    cert.verify_directly_issued_by(ca.issuer)
    assert (issued.not_before, issued.not_after) == (
        cert.not_valid_before_utc,
        cert.not_valid_after_utc,
    )
    assert issued.chain_pem == ca.issuer_chain_pem


def test_device_certificate_with_a_generated_key(ca: CertificateAuthority) -> None:
    issued = ca.issue_device_certificate("furnace-hub-1", days=30)
    _check_device(issued, ca, "furnace-hub-1")
    assert issued.private_key_pem is not None and issued.key_pem == issued.private_key_pem
    key = serialization.load_pem_private_key(issued.private_key_pem, password=None)
    assert key.public_key() == load_certificate(issued.certificate_pem).public_key()
    lifetime = issued.not_after - issued.not_before
    assert timedelta(days=30) <= lifetime <= timedelta(days=30, minutes=10)


def test_serials_differ_between_certificates(ca: CertificateAuthority) -> None:
    serials = {ca.issue_device_certificate("same").serial for _ in range(5)}
    assert len(serials) == 5


@pytest.mark.parametrize("key_type", ["ec", "rsa"])
def test_device_certificate_from_a_csr_keeps_the_key_and_sets_the_cn(
    ca: CertificateAuthority, key_type: str
) -> None:
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey = (
        ec.generate_private_key(ec.SECP384R1())
        if key_type == "ec"
        else rsa.generate_private_key(public_exponent=65537, key_size=2048)
    )
    issued = ca.issue_device_certificate("csr-thing", csr_pem=_csr(key, cn="something-else"))
    _check_device(issued, ca, "csr-thing")
    assert issued.private_key_pem is None
    assert load_certificate(issued.certificate_pem).public_key() == key.public_key()


def test_a_csr_with_a_bad_signature_is_refused(ca: CertificateAuthority) -> None:
    der = bytearray(
        x509.load_pem_x509_csr(_csr(ec.generate_private_key(ec.SECP256R1()))).public_bytes(
            serialization.Encoding.DER
        )
    )
    der[-3] ^= 0x01  # inside the signature
    tampered = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(PkiError, match="signature does not verify"):
        ca.issue_device_certificate("t", csr_pem=tampered)


def test_unreadable_or_weak_csrs_are_refused(ca: CertificateAuthority) -> None:
    with pytest.raises(PkiError, match="not a readable PEM certificate request"):
        ca.issue_device_certificate("t", csr_pem=b"not a csr")
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(PkiError, match="1024 bits"):
        ca.issue_device_certificate("t", csr_pem=_csr(weak))


@pytest.mark.parametrize("name", ["", "has space", "x" * 129, "slash/no", "ünicode", "claim:x"])
def test_thing_names_are_validated_like_aws(ca: CertificateAuthority, name: str) -> None:
    with pytest.raises(ValidationError) as info:
        ca.issue_device_certificate(name)
    assert info.value.field == "thing_name"


def test_days_must_be_positive(ca: CertificateAuthority) -> None:
    with pytest.raises(ValidationError) as info:
        ca.issue_device_certificate("t", days=0)
    assert info.value.field == "days"


def test_a_leaf_does_not_outlive_its_issuer(ca: CertificateAuthority) -> None:
    issued = ca.issue_device_certificate("long-lived", days=100 * 365)
    assert issued.not_after == ca.issuer.not_valid_after_utc


# -- claim and server certificates ------------------------------------------------------------


def test_claim_certificate_names_itself_a_claim(ca: CertificateAuthority) -> None:
    issued = ca.issue_claim_certificate("factory-image")
    cert = load_certificate(issued.certificate_pem)
    ou = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    assert [a.value for a in ou] == ["claim"]
    assert issued.subject_cn == "claim:factory-image"
    assert issued.private_key_pem is not None
    identity = ca.identify(issued.certificate_pem)
    assert (identity.kind, identity.name) == ("claim", "factory-image")
    assert identity.certificate_id == issued.certificate_id


@pytest.mark.parametrize("template", ["", "with:colon", "x" * 37])
def test_claim_templates_are_validated(ca: CertificateAuthority, template: str) -> None:
    with pytest.raises(ValidationError) as info:
        ca.issue_claim_certificate(template)
    assert info.value.field == "template"


def test_server_certificate_has_sans_and_server_auth(ca: CertificateAuthority) -> None:
    issued = ca.issue_server_certificate(["broker.local", "localhost"], ["127.0.0.1", "::1"])
    cert = load_certificate(issued.certificate_pem)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["broker.local", "localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    # a server certificate cannot stand in for a device
    with pytest.raises(PkiError, match="client auth"):
        ca.identify(issued.certificate_pem)


def test_server_certificate_input_is_validated(ca: CertificateAuthority) -> None:
    with pytest.raises(ValidationError, match="ips"):
        ca.issue_server_certificate(["ok"], ["300.1.1.1"])
    with pytest.raises(ValidationError, match="hostnames"):
        ca.issue_server_certificate([], [])
    with pytest.raises(ValidationError, match="hostnames"):
        ca.issue_server_certificate(["bad host"], [])


# -- identify -------------------------------------------------------------------------------


def test_identify_a_thing(ca: CertificateAuthority) -> None:
    issued = ca.issue_device_certificate("washer-7")
    identity = ca.identify(issued.certificate_pem)
    assert identity.kind == "thing" and identity.name == "washer-7"
    assert identity.certificate_id == issued.certificate_id
    assert identity.issuer_fingerprint == fingerprint(ca.issuer)


def test_a_tampered_certificate_is_refused(ca: CertificateAuthority) -> None:
    issued = ca.issue_device_certificate("thing-a")
    der = load_certificate(issued.certificate_pem).public_bytes(serialization.Encoding.DER)
    forged = der.replace(b"thing-a", b"thing-b")
    assert forged != der
    with pytest.raises(PkiError, match="signature does not verify"):
        ca.identify(forged)


def test_expired_and_not_yet_valid_certificates_are_refused(ca: CertificateAuthority) -> None:
    issued = ca.issue_device_certificate("short", days=1)
    now = datetime.now(UTC)
    assert _at(ca, now + timedelta(hours=23)).identify(issued.certificate_pem).name == "short"
    with pytest.raises(PkiError, match="expired"):
        _at(ca, now + timedelta(days=2)).identify(issued.certificate_pem)
    with pytest.raises(PkiError, match="not valid before"):
        _at(ca, now - timedelta(hours=1)).identify(issued.certificate_pem)


def test_a_foreign_certificate_needs_its_ca_registered(
    ca: CertificateAuthority, foreign: CertificateAuthority
) -> None:
    issued = foreign.issue_device_certificate("acme-fridge")
    with pytest.raises(PkiError, match="neither this install's CA nor a registered CA"):
        ca.identify(issued.certificate_pem)
    identity = ca.identify(issued.certificate_pem, trusted_cas=[_pem(foreign.root)])
    assert (identity.kind, identity.name) == ("thing", "acme-fridge")
    assert identity.issuer_fingerprint == fingerprint(foreign.root)


def test_a_foreign_ca_with_our_name_does_not_pass(tmp_path: Path, ca: CertificateAuthority) -> None:
    impostor = CertificateAuthority.create(tmp_path / "ca")  # same names, other keys
    issued = impostor.issue_device_certificate("sneaky")
    with pytest.raises(PkiError, match="signature does not verify"):
        ca.identify(issued.certificate_pem)


def test_claims_are_only_accepted_from_our_own_ca(
    ca: CertificateAuthority, foreign: CertificateAuthority
) -> None:
    claim = foreign.issue_claim_certificate("tmpl")
    with pytest.raises(PkiError, match="only from this install's CA"):
        ca.identify(claim.certificate_pem, trusted_cas=[_pem(foreign.root)])


def test_identify_refuses_cas_and_non_ca_anchors(ca: CertificateAuthority) -> None:
    assert ca.intermediate is not None
    with pytest.raises(PkiError, match="CA certificate cannot identify"):
        ca.identify(_pem(ca.intermediate))
    leaf = ca.issue_device_certificate("leaf").certificate_pem
    with pytest.raises(PkiError, match=r"trusted CA #0 .* is not a CA"):
        ca.identify(leaf, trusted_cas=[leaf])


# -- helpers ------------------------------------------------------------------------------


def test_load_certificate_reads_pem_and_der_and_explains_failures(
    ca: CertificateAuthority,
) -> None:
    pem = _pem(ca.root)
    der = ca.root.public_bytes(serialization.Encoding.DER)
    assert load_certificate(pem) == load_certificate(der) == ca.root
    assert fingerprint(pem) == fingerprint(der) == hashlib.sha256(der).hexdigest()
    with pytest.raises(PkiError, match="empty"):
        load_certificate(b"")
    with pytest.raises(PkiError, match="BEGIN CERTIFICATE"):
        load_certificate((ca.folder / "root.key").read_bytes())
    with pytest.raises(PkiError, match=r"not a readable X\.509"):
        load_certificate(b"\x30\x03\x02\x01\x01")


# -- CRLs -----------------------------------------------------------------------------------


def test_crl_lists_revoked_serials_signed_by_the_issuing_ca(ca: CertificateAuthority) -> None:
    when = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    revoked = [(ca.issue_device_certificate(f"r{i}").serial, when) for i in range(3)]
    crl = x509.load_pem_x509_crl(ca.crl_pem(revoked, next_update_days=3))
    assert crl.issuer == ca.issuer.subject
    assert crl.is_signature_valid(ca.issuer.public_key())  # type: ignore[arg-type]
    assert {(entry.serial_number, entry.revocation_date_utc) for entry in crl} == set(revoked)
    assert crl.next_update_utc is not None and crl.last_update_utc is not None
    lifetime = crl.next_update_utc - datetime.now(UTC)
    assert timedelta(days=3) - timedelta(minutes=1) < lifetime <= timedelta(days=3)
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number > 0


def test_crl_chain_adds_the_roots_empty_crl(
    ca: CertificateAuthority, foreign: CertificateAuthority
) -> None:
    pem = ca.crl_chain_pem([(12345, datetime.now(UTC))])
    blocks = [b"-----BEGIN X509 CRL-----" + b for b in pem.split(b"-----BEGIN X509 CRL-----")[1:]]
    issuing, root = (x509.load_pem_x509_crl(block) for block in blocks)
    assert [entry.serial_number for entry in issuing] == [12345]
    assert root.issuer == ca.root.subject and len(root) == 0
    assert root.is_signature_valid(ca.root.public_key())  # type: ignore[arg-type]
    # with no intermediate there is only the one CRL
    assert foreign.crl_chain_pem([]).count(b"BEGIN X509 CRL") == 1


def test_crl_input_is_validated(ca: CertificateAuthority) -> None:
    with pytest.raises(ValidationError, match="revoked"):
        ca.crl_pem([(1, datetime(2030, 1, 1))])
    with pytest.raises(ValidationError, match="next_update_days"):
        ca.crl_pem([], next_update_days=0)


# -- TLS handshakes (OpenSSL through Python's ssl, in memory) -------------------------------


def _files(tmp_path: Path, name: str, issued: IssuedCertificate) -> tuple[Path, Path]:
    cert, key = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
    cert.write_bytes(issued.certificate_pem + issued.chain_pem)
    assert issued.private_key_pem is not None
    key.write_bytes(issued.private_key_pem)
    return cert, key


def _handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> bytes:
    """Run a TLS handshake between two contexts; the client certificate the server saw (DER)."""
    server_in, server_out, client_in, client_out = (ssl.MemoryBIO() for _ in range(4))
    server = server_ctx.wrap_bio(server_in, server_out, server_side=True)
    client = client_ctx.wrap_bio(client_in, client_out, server_hostname="broker.local")
    done = {"server": False, "client": False}
    for _ in range(20):
        for side, tls in (("client", client), ("server", server)):
            if not done[side]:
                try:
                    tls.do_handshake()
                    done[side] = True
                except ssl.SSLWantReadError:
                    pass
        server_in.write(client_out.read())
        client_in.write(server_out.read())
        if all(done.values()):
            # TLS 1.3: the client learns of a refused certificate only on its next read.
            client.write(b"ping")
            server_in.write(client_out.read())
            assert server.read(4) == b"ping"
            peer = server.getpeercert(binary_form=True)
            assert peer is not None
            return peer
    raise AssertionError("handshake did not finish")


@pytest.fixture
def tls(
    tmp_path: Path, ca: CertificateAuthority
) -> tuple[ssl.SSLContext, Callable[[IssuedCertificate], ssl.SSLContext]]:
    """A broker-like server context (client certificates required) and a client factory."""
    server_cert, server_key = _files(
        tmp_path, "server", ca.issue_server_certificate(["broker.local"])
    )
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(server_cert, server_key)
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    server_ctx.load_verify_locations(cafile=ca.chain_path)

    def client(issued: IssuedCertificate) -> ssl.SSLContext:
        cert, key = _files(tmp_path, "client", issued)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(cadata=ca.chain_pem.decode())
        ctx.load_cert_chain(cert, key)
        return ctx

    return server_ctx, client


TlsPair = tuple[ssl.SSLContext, Callable[[IssuedCertificate], ssl.SSLContext]]


def test_tls_with_a_device_certificate(tls: TlsPair, ca: CertificateAuthority) -> None:
    server_ctx, client = tls
    issued = ca.issue_device_certificate("tls-thing")
    peer = _handshake(server_ctx, client(issued))
    assert ca.identify(peer) == ca.identify(issued.certificate_pem)
    assert ca.identify(peer).kind == "thing"


def test_tls_with_a_claim_certificate(tls: TlsPair, ca: CertificateAuthority) -> None:
    server_ctx, client = tls
    peer = _handshake(server_ctx, client(ca.issue_claim_certificate("tmpl")))
    assert ca.identify(peer).kind == "claim"


def test_tls_refuses_a_foreign_certificate(tls: TlsPair, foreign: CertificateAuthority) -> None:
    server_ctx, client = tls
    with pytest.raises(ssl.SSLError, match="certificate verify failed"):
        _handshake(server_ctx, client(foreign.issue_device_certificate("acme-x")))


def test_tls_with_mosquittos_crl_flag_refuses_a_revoked_certificate(
    tls: TlsPair, ca: CertificateAuthority, tmp_path: Path
) -> None:
    """VERIFY_CRL_CHECK_LEAF is X509_V_FLAG_CRL_CHECK, what Mosquitto's ``crlfile`` sets."""
    server_ctx, client = tls
    kept, revoked = (ca.issue_device_certificate(n) for n in ("kept", "revoked"))
    crl = tmp_path / "crl.pem"
    crl.write_bytes(ca.crl_pem([(revoked.serial, datetime.now(UTC))]))
    server_ctx.load_verify_locations(cafile=crl)
    server_ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    _handshake(server_ctx, client(kept))
    with pytest.raises(ssl.SSLError, match="certificate revoked"):
        _handshake(server_ctx, client(revoked))


def test_tls_crl_check_needs_a_crl_from_every_leaf_issuer(
    tls: TlsPair, ca: CertificateAuthority, foreign: CertificateAuthority, tmp_path: Path
) -> None:
    """A registered CA's devices fail the CRL check until that CA's own CRL is loaded."""
    server_ctx, client = tls
    server_ctx.load_verify_locations(cadata=foreign.chain_pem.decode())
    (tmp_path / "crl.pem").write_bytes(ca.crl_pem([]))
    server_ctx.load_verify_locations(cafile=tmp_path / "crl.pem")
    server_ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    user_device = foreign.issue_device_certificate("acme-y")
    with pytest.raises(ssl.SSLError, match="unable to get certificate CRL"):
        _handshake(server_ctx, client(user_device))
    (tmp_path / "foreign-crl.pem").write_bytes(foreign.crl_pem([]))
    server_ctx.load_verify_locations(cafile=tmp_path / "foreign-crl.pem")
    _handshake(server_ctx, client(user_device))


def test_tls_full_chain_crl_check_needs_crl_chain(
    tls: TlsPair, ca: CertificateAuthority, tmp_path: Path
) -> None:
    """VERIFY_CRL_CHECK_CHAIN (X509_V_FLAG_CRL_CHECK_ALL) wants the root's CRL as well."""
    server_ctx, client = tls
    server_ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_CHAIN
    (tmp_path / "crl.pem").write_bytes(ca.crl_pem([]))
    server_ctx.load_verify_locations(cafile=tmp_path / "crl.pem")
    device = ca.issue_device_certificate("chain-checked")
    with pytest.raises(ssl.SSLError, match="unable to get certificate CRL"):
        _handshake(server_ctx, client(device))
    (tmp_path / "crls.pem").write_bytes(ca.crl_chain_pem([]))
    server_ctx.load_verify_locations(cafile=tmp_path / "crls.pem")
    _handshake(server_ctx, client(device))


def test_tls_refuses_everyone_once_the_crl_is_past_its_next_update(
    tls: TlsPair, ca: CertificateAuthority, tmp_path: Path
) -> None:
    server_ctx, client = tls
    stale = _at(ca, datetime.now(UTC) - timedelta(days=3)).crl_pem([], next_update_days=1)
    (tmp_path / "crl.pem").write_bytes(stale)
    server_ctx.load_verify_locations(cafile=tmp_path / "crl.pem")
    server_ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    with pytest.raises(ssl.SSLError, match="CRL has expired"):
        _handshake(server_ctx, client(ca.issue_device_certificate("innocent")))
