"""The cloud's MQTT broker: Mosquitto, configured, started and supervised by edgeloop.

Two listeners, one topic space:

- **device** (``host:device_port``): mutual TLS. ``require_certificate`` with the CA chain
  as ``cafile`` and the CA's CRL as ``crlfile``; ``use_identity_as_username`` makes the
  certificate's CN the username, so the ACL's ``%u`` is the thing name (or
  ``claim:<template>`` for a claim certificate) and cannot be forged by the client.
- **service** (``127.0.0.1:service_port``): plain TCP on loopback, one user from a
  password file, allowed every topic; edgeloop's own cloud services (shadows, jobs,
  ingest, connectivity) connect here.

Why a password on a loopback listener for the service identity, not a service
certificate on the device listener: (1) on the device listener the username *is* the
CN, so a service CN would share a namespace with thing names and the ACL would be one
mis-issued certificate away from handing a device the whole fleet; with
``per_listener_settings`` the service user exists only on a listener that takes no
certificates, and the device listener never reads the password file. (2) The services
carry the fleet's whole traffic; TLS on loopback buys nothing and costs CPU on a
2-core box. (3) The services then need nothing from the CA to start. The secret is
random, kept ``0600`` in the data folder and stable across restarts.

Persistence: ``autosave_on_changes true`` with ``autosave_interval 1`` (the default of
``BrokerConfig.autosave_changes``; `cloud up --broker-autosave N` saves every N changes
instead, for large fleets) saves the database after every change (retained message,
subscription, message queued for an offline session, durable connect), writing
``mosquitto.db.new`` and renaming it, so a ``kill -9`` loses nothing saved. Two limits
of Mosquitto 2.0.11, measured here:

- it acknowledges a QoS 1 PUBLISH *before* the save that follows it: a ``kill -9`` within
  a few milliseconds of the PUBACK lost a retained message; 10 ms later it survived;
- it saves only sessions whose last CONNECT had clean start 0 (``clean_session false``);
  an MQTT 5 session opened with clean start 1 and a session expiry is lost on any
  restart, graceful or not. Durable clients (the hub) must connect with clean start 0.

Authorization is by Mosquitto's ``acl_file``, which does not judge SUBSCRIBE: a
subscription to another thing's topics (or ``#``) is granted (SUBACK 0x01), and read
access is checked on every message delivered, so nothing of another thing's arrives.
A forbidden PUBLISH gets PUBACK 0x87 in MQTT 5 and is dropped silently in 3.1.1.

What a reload (SIGHUP) does in Mosquitto 2.0.11, checked against the real broker
(``tests/cloud/test_broker.py``):

- re-reads the configuration, the ACL files and the password file; the ACLs apply to
  existing subscriptions too (``mosquitto.conf(5)``);
- reloads the server certificate and key, and the CRL: new TLS handshakes are checked
  against the new CRL, but a connection already open with a now-revoked certificate
  stays open. So :meth:`Broker.update_crl` restarts the broker gracefully by default
  (every client reconnects; revoked ones are refused), and only reloads when asked to
  keep connections;
- fails open on a bad CRL: if the file cannot be read at reload, Mosquitto logs an
  error and then accepts revoked certificates. :meth:`Broker.update_crl` therefore
  verifies a CRL against the CA chain before writing it, and writes it atomically.
- does not change listeners (ports, hosts) or persistence settings that need a restart.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import random
import re
import secrets
import signal
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from edgeloop.core.errors import CloudError, ValidationError
from edgeloop.fileio import write_bytes_atomic

__all__ = [
    "AclRules",
    "Broker",
    "BrokerConfig",
    "BrokerPorts",
    "ServiceLogin",
    "choose_ports",
    "render_acl",
    "render_config",
    "render_service_acl",
]

log = logging.getLogger(__name__)

MOSQUITTO = "/usr/sbin/mosquitto"
SERVICE_HOST = "127.0.0.1"
# How far above the base port choose_ports looks for free ones.
_PORT_SCAN = 200
# Mosquitto 2.0's password hash: PBKDF2-HMAC-SHA512, 101 rounds, 12-byte salt ("$7$").
_PW_ROUNDS = 101
# An unexpected exit after this long up counts as the first failure again.
_STABLE_SECONDS = 30.0
_LOG_ROTATE_BYTES = 8 * 1024 * 1024
# Everything mosquitto.conf takes as a single token must be free of whitespace.
_TOKEN = re.compile(r"^\S+$")
_TEMPLATE = re.compile(r"^[0-9A-Za-z_-]{1,36}$")
_ACCESS = ("read", "write", "readwrite")


# --- configuration (pure) ----------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class AclRules:
    """Who may use which topics on the device listener.

    ``device_patterns`` are Mosquitto ``pattern`` topics granted read+write to every
    certificate, ``%u`` being its CN; claim certificates are barred from them and get
    only the fleet-provisioning topics of their own template (see :func:`render_acl`).
    """

    device_patterns: tuple[str, ...] = ("$aws/things/%u/#", "edgeloop/things/%u/#")
    claim_templates: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class BrokerConfig:
    """Everything the broker is started with; ports 0 mean "choose free ones"."""

    data_dir: Path
    ca_chain: Path  # the CAs client certificates must chain to (the CA's chain.pem)
    server_cert: Path  # the broker's certificate, then any intermediates
    server_key: Path
    crl: Path | None = None  # the CRL Mosquitto checks; default <data_dir>/crl.pem
    host: str = "127.0.0.1"  # where the device listener binds
    device_port: int = 0
    service_port: int = 0
    base_port: int = 0  # chosen ports are looked for just above this (0: any free port)
    acl: AclRules = field(default_factory=AclRules)
    service_user: str = "edgeloop-service"
    tls_version: str = "tlsv1.2"  # the lowest version accepted
    # AWS IoT caps payloads at 128 KiB; Mosquitto's own cap (256 MiB) lets one client
    # make the broker buffer a quarter gigabyte.
    max_packet_size: int = 256 * 1024
    # Persistent sessions of clients that stay away longer are dropped (AWS IoT's cap).
    session_expiry: str | None = "7d"
    # Changes between saves of the broker's database: 1 saves after every change (nothing
    # saved is lost to kill -9); each save rewrites the whole file, so a large fleet trades
    # a window of unsaved changes for throughput (see benchmarks/cloud.py).
    autosave_changes: int = 1
    run_as: str | None = None  # Mosquitto's `user`: whom it drops to when started as root
    executable: str = MOSQUITTO
    start_timeout: float = 10.0
    stop_timeout: float = 10.0
    restart_base_delay: float = 0.2
    restart_max_delay: float = 10.0

    @property
    def crl_path(self) -> Path:
        """Where the CRL is read from."""
        return self.crl if self.crl is not None else self.data_dir / "crl.pem"

    @property
    def conf_path(self) -> Path:
        return self.data_dir / "mosquitto.conf"

    @property
    def device_acl_path(self) -> Path:
        return self.data_dir / "device.acl"

    @property
    def service_acl_path(self) -> Path:
        return self.data_dir / "service.acl"

    @property
    def password_path(self) -> Path:
        return self.data_dir / "service.passwd"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "mosquitto.log"


@dataclass(frozen=True)
class BrokerPorts:
    """Where the broker listens."""

    host: str
    device: int
    service: int


@dataclass(frozen=True)
class ServiceLogin:
    """How edgeloop's cloud services reach the broker (plain MQTT on loopback)."""

    host: str
    port: int
    username: str
    password: str


def _token(value: str, name: str) -> str:
    if not _TOKEN.match(value):
        raise ValidationError(
            f"{value!r} must be non-empty and free of spaces and line breaks "
            "(mosquitto.conf reads one token)",
            source="broker config",
            field=name,
        )
    return value


def _port(value: int, name: str) -> int:
    if not 1 <= value <= 65535:
        raise ValidationError(
            f"{value} is not a port (1-65535); choose one with choose_ports()",
            source="broker config",
            field=name,
        )
    return value


def render_config(cfg: BrokerConfig) -> str:
    """``mosquitto.conf`` for ``cfg``, whose ports must be chosen already."""
    data = _token(str(cfg.data_dir), "data_dir")
    conf = "\n".join(
        [
            "# Written by edgeloop (edgeloop.cloud.broker); edits are overwritten.",
            "per_listener_settings true",
            *([f"user {_token(cfg.run_as, 'run_as')}"] if cfg.run_as else []),
            "",
            "persistence true",
            f"persistence_location {data}/",
            "persistence_file mosquitto.db",
            "autosave_on_changes true",
            f"autosave_interval {_positive(cfg.autosave_changes, 'autosave_changes')}",
            *(
                [f"persistent_client_expiration {_token(cfg.session_expiry, 'session_expiry')}"]
                if cfg.session_expiry
                else []
            ),
            f"max_packet_size {cfg.max_packet_size}",
            # Mosquitto's default (1,000 queued per client) would drop QoS 1 telemetry the
            # hubs already had acknowledged while the cloud's services are away.
            f"max_queued_messages {MAX_QUEUED_MESSAGES}",
            "set_tcp_nodelay true",
            "",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "log_timestamp_format %Y-%m-%dT%H:%M:%S",
            "connection_messages true",
            "",
            "# Devices: mutual TLS; the certificate's CN is the username (%u in the ACL).",
            f"listener {_port(cfg.device_port, 'device_port')} {_token(cfg.host, 'host')}",
            "protocol mqtt",
            f"cafile {_token(str(cfg.ca_chain), 'ca_chain')}",
            f"certfile {_token(str(cfg.server_cert), 'server_cert')}",
            f"keyfile {_token(str(cfg.server_key), 'server_key')}",
            f"crlfile {_token(str(cfg.crl_path), 'crl')}",
            "require_certificate true",
            "use_identity_as_username true",
            # The client id becomes the CN too: no certificate (a claim shipped in every
            # factory image, say) can take over another's session by naming its client id.
            "use_username_as_clientid true",
            f"tls_version {_token(cfg.tls_version, 'tls_version')}",
            "allow_anonymous false",
            f"acl_file {cfg.device_acl_path}",
            "",
            "# edgeloop's own services: loopback only, one user, every topic.",
            f"listener {_port(cfg.service_port, 'service_port')} {SERVICE_HOST}",
            "protocol mqtt",
            "allow_anonymous false",
            f"password_file {cfg.password_path}",
            f"acl_file {cfg.service_acl_path}",
            "",
        ]
    )
    if cfg.device_port == cfg.service_port:
        raise ValidationError(
            f"both listeners on port {cfg.device_port}", source="broker config", field="ports"
        )
    return conf


MAX_QUEUED_MESSAGES = 1_000_000  # per client; the services' session holds the backlog
ROTATE_PATTERN = "edgeloop/certificates/%u/rotate"
# Where the cloud answers a request whose MQTT 5 Response Topic is under the asker's client
# id (edgeloop.cloud.provisioning): readable by that client id alone, written by no device.
PRIVATE_REPLY_PATTERN = "edgeloop/replies/%c/#"


def _check_topic(topic: str, name: str) -> str:
    _token(topic, name)
    if "%u" not in topic.split("/"):
        raise ValidationError(
            f"{topic!r} must contain a whole level '%u' so that it names one thing",
            source="broker ACL",
            field=name,
        )
    return topic


def _positive(value: int, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValidationError(
            f"{value!r} must be a whole number ≥ 1", source="broker config", field=field
        )
    return value


def render_acl(rules: AclRules) -> str:
    """The device listener's ACL file.

    Every certificate may read and write its own ``device_patterns`` (``%u`` = its CN).
    A claim certificate (CN ``claim:<template>``) is denied those and may use AWS IoT's
    fleet-provisioning topics only, split by direction so that it cannot forge a
    response to another device: it *writes* the request topics
    (``$aws/certificates/create/<format>``, ``.../create-from-csr/<format>``,
    ``$aws/provisioning-templates/<template>/provision/<format>``) and *reads* their
    ``/accepted`` and ``/rejected`` replies. Templates not listed get nothing.

    Every certificate may also write ``edgeloop/certificates/<its CN>/rotate`` and read
    its replies: the interim ``cert:<hex>`` certificate a claim obtains trades itself
    there for one named after its thing (``edgeloop.cloud.provisioning``, which refuses
    any other CN). Claims are denied it, as they are the device patterns.

    Mind that MQTT has no reply-to-one-connection: a reply published on
    ``$aws/certificates/create/json/accepted`` reaches every claim connected at that
    moment, and CreateKeysAndCertificate's reply carries a private key (CreateCertificate
    FromCsr's does not). AWS IoT answers only the asking connection; Mosquitto cannot. So
    every client may read ``edgeloop/replies/<its client id>/#`` (and none may write it):
    a request naming a Response Topic there is answered there alone, which is what
    edgeloop's hubs do. Clients that subscribe to the shared reply topics (AWS's SDK) get
    the shared answers.
    """
    lines = ["# Written by edgeloop (edgeloop.cloud.broker); edits are overwritten."]
    lines += ["# Devices: their own topics; %u is the certificate's CN."]
    patterns = [_check_topic(topic, "device_patterns") for topic in rules.device_patterns]
    lines += [f"pattern readwrite {topic}" for topic in patterns]
    lines += ["# Private replies: a client reads its own client id's reply topics only."]
    lines += [f"pattern read {PRIVATE_REPLY_PATTERN}"]
    lines += ["# An interim certificate (CN cert:<hex>) trades itself for its thing's here."]
    lines += [
        f"pattern write {ROTATE_PATTERN}",
        f"pattern read {ROTATE_PATTERN}/accepted",
        f"pattern read {ROTATE_PATTERN}/rejected",
    ]
    for template in sorted(set(rules.claim_templates)):
        if not _TEMPLATE.match(template):
            raise ValidationError(
                f"{template!r} must be 1-36 characters of letters, digits, '_' and '-'",
                source="broker ACL",
                field="claim_templates",
            )
        user = f"claim:{template}"
        lines += ["", f"# Claim certificates of template {template!r}: provisioning only."]
        lines += [f"user {user}"]
        # `deny` is checked before any grant, the patterns' grants included.
        denied = [*patterns, ROTATE_PATTERN, f"{ROTATE_PATTERN}/+"]
        lines += [f"topic deny {topic.replace('%u', user)}" for topic in denied]
        for request in (
            "$aws/certificates/create",
            "$aws/certificates/create-from-csr",
            f"$aws/provisioning-templates/{template}/provision",
        ):
            lines += [
                f"topic write {request}/+",
                f"topic read {request}/+/accepted",
                f"topic read {request}/+/rejected",
            ]
    return "\n".join(lines) + "\n"


def render_service_acl(user: str) -> str:
    """The service listener's ACL: ``user`` may use every topic, ``$`` topics included."""
    _token(user, "service_user")
    # `#` does not match topics starting with `$`; those are granted by name.
    grants = ("#", "$aws/#", "$SYS/#")
    return "\n".join([f"user {user}", *(f"topic readwrite {t}" for t in grants)]) + "\n"


def password_line(user: str, password: str, *, salt: bytes | None = None) -> str:
    """One ``password_file`` line in Mosquitto 2.0's format (what ``mosquitto_passwd`` writes)."""
    salt = salt if salt is not None else secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, _PW_ROUNDS)
    b64 = base64.b64encode
    return f"{user}:$7${_PW_ROUNDS}${b64(salt).decode()}${b64(digest).decode()}\n"


def choose_ports(base: int, count: int = 2, *, hosts: Sequence[str] = (SERVICE_HOST,)) -> list[int]:
    """``count`` ports free on every one of ``hosts``: the first ones above ``base``, or any
    the system offers when ``base`` is 0. CloudError when none are free near ``base``."""
    if base == 0:
        with contextlib.ExitStack() as stack:
            ports = []
            for _ in range(count):
                sock = stack.enter_context(socket.socket())
                sock.bind((hosts[0], 0))
                ports.append(int(sock.getsockname()[1]))
            return ports
    found: list[int] = []
    for port in range(base + 1, min(base + 1 + _PORT_SCAN, 65536)):
        if all(_is_free(host, port) for host in hosts):
            found.append(port)
            if len(found) == count:
                return found
    raise CloudError(
        f"no {count} free ports among {base + 1}-{base + _PORT_SCAN}: "
        "free some, or give the broker's ports explicitly"
    )


def _is_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        # As Mosquitto does, so a port in TIME_WAIT counts as free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def check_crl(crl_pem: bytes, ca_chain_pem: bytes) -> list[x509.CertificateRevocationList]:
    """The CRLs in ``crl_pem`` if every one is signed by a CA of the chain and current.

    Mosquitto accepts revoked certificates after a reload that fails to read the CRL,
    so nothing unverified may reach the file. ValidationError says what is wrong.
    """
    blocks = re.findall(
        rb"-----BEGIN X509 CRL-----.+?-----END X509 CRL-----", crl_pem, flags=re.DOTALL
    )
    if not blocks:
        raise ValidationError("no PEM 'BEGIN X509 CRL' block found", field="crl")
    cas = x509.load_pem_x509_certificates(ca_chain_pem)
    now = datetime.now(UTC)
    crls = []
    for index, block in enumerate(blocks):
        where = f"crl #{index}"
        try:
            crl = x509.load_pem_x509_crl(block)
        except ValueError as err:
            raise ValidationError(f"unreadable: {err}", field=where) from err
        issuers = [ca for ca in cas if ca.subject == crl.issuer]
        public_keys = [ca.public_key() for ca in issuers]
        if not any(
            isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey)
            and crl.is_signature_valid(key)
            for key in public_keys
        ):
            raise ValidationError(
                f"not signed by a CA of the broker's chain (issuer {crl.issuer.rfc4514_string()})",
                field=where,
            )
        next_update = crl.next_update_utc
        if next_update is not None and next_update <= now:
            raise ValidationError(
                f"past its next update ({next_update:%Y-%m-%d %H:%M}Z): OpenSSL would refuse "
                "every client; sign a new one",
                field=where,
            )
        crls.append(crl)
    return crls


# --- the running broker --------------------------------------------------------------------


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        value, digit = divmod(value, 128)
        out.append(digit | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _connect_packet(client_id: str, username: str, password: str) -> bytes:
    """An MQTT 3.1.1 CONNECT, clean session, with a username and password."""

    def string(text: str) -> bytes:
        raw = text.encode()
        return len(raw).to_bytes(2, "big") + raw

    body = string("MQTT") + bytes([4, 0xC2]) + (10).to_bytes(2, "big")
    body += string(client_id) + string(username) + string(password)
    return bytes([0x10]) + _varint(len(body)) + body


class Broker:
    """Mosquitto as a supervised child process; see the module docstring.

    ``start()`` writes its files into ``cfg.data_dir`` and returns once both listeners
    answer; a supervisor task restarts it with capped, jittered backoff if it dies.
    One Broker per data folder at a time (a lock file says so).
    """

    def __init__(self, cfg: BrokerConfig) -> None:
        self.cfg = cfg
        self.restarts = 0  # unexpected exits recovered by the supervisor
        self._proc: asyncio.subprocess.Process | None = None
        self._ports: BrokerPorts | None = None
        self._started_at = 0.0
        self._stopping = False
        self._supervisor: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()  # one of start/restart/reload/respawn at a time
        self._lock_file: IO[bytes] | None = None
        self._password = ""

    # -- what callers need -------------------------------------------------------------

    @property
    def ports(self) -> BrokerPorts:
        """Where it listens (chosen ports included); CloudError before ``start()``."""
        if self._ports is None:
            raise CloudError("the broker has not been started")
        return self._ports

    @property
    def service_login(self) -> ServiceLogin:
        """The loopback listener and the credentials of edgeloop's services."""
        return ServiceLogin(SERVICE_HOST, self.ports.service, self.cfg.service_user, self._password)

    @property
    def pid(self) -> int | None:
        """Mosquitto's process id while it runs."""
        proc = self._proc
        return proc.pid if proc is not None and proc.returncode is None else None

    @property
    def running(self) -> bool:
        return self.pid is not None

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> BrokerPorts:
        """Write the files, launch Mosquitto and wait until both listeners answer.

        CloudError, with Mosquitto's last log lines, if it cannot start.
        """
        if self._supervisor is not None:
            raise CloudError("the broker is already started")
        cfg = self.cfg
        cfg.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._take_folder()
        try:
            for path, what in (
                (cfg.ca_chain, "ca_chain"),
                (cfg.server_cert, "server_cert"),
                (cfg.server_key, "server_key"),
            ):
                if not path.is_file():
                    raise CloudError(f"broker {what} {path}: no such file")
            if not cfg.crl_path.is_file():
                raise CloudError(
                    f"broker CRL {cfg.crl_path}: no such file; write one first with "
                    "Broker.update_crl(CertificateAuthority.crl_pem([]))"
                )
            await self._stop_orphan()
            self._rotate_log()
            self._password = self._service_secret()
            self._write_auth_files()
            async with self._lock:
                await self._start_on_free_ports()
            self._stopping = False
            self._supervisor = asyncio.create_task(self._supervise(), name="broker-supervisor")
            return self.ports
        except BaseException:
            await self._terminate()
            self._release_folder()
            raise

    async def stop(self) -> None:
        """Stop Mosquitto (it saves its database on the way out) and the supervisor."""
        self._stopping = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
            self._supervisor = None
        async with self._lock:
            await self._terminate()
        self._release_folder()

    async def restart(self) -> None:
        """Stop Mosquitto gracefully and start it again on the same ports.

        Every client is disconnected and must reconnect; persistent sessions, queued
        messages and retained messages are kept.
        """
        async with self._lock:
            self._require_started()
            await self._terminate()
            await self._spawn()

    async def reload(self, *, acl: AclRules | None = None) -> None:
        """Rewrite the ACL and password files (with ``acl`` if given) and SIGHUP Mosquitto.

        Returns once Mosquitto has finished reloading; CloudError if it logged an error.
        """
        async with self._lock:
            self._require_started()
            if acl is not None:
                self.cfg = replace(self.cfg, acl=acl)
            self._write_auth_files()
            await self._hangup()

    async def update_crl(self, crl_pem: bytes, *, keep_connections: bool = False) -> None:
        """Install a new CRL (verified against the CA chain first) and apply it.

        By default Mosquitto restarts gracefully, because a reload only checks new
        handshakes: a device already connected with a revoked certificate would stay
        connected. ``keep_connections=True`` reloads instead (revoked certificates cannot
        connect again; open connections stay), for callers that accept that. Before
        ``start()`` the file is only written.
        """
        try:
            chain = self.cfg.ca_chain.read_bytes()
        except OSError as err:
            raise CloudError(f"broker ca_chain {self.cfg.ca_chain}: {err.strerror}") from err
        check_crl(crl_pem, chain)
        self.cfg.crl_path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(self.cfg.crl_path, crl_pem)
        if self._supervisor is None:
            return
        if keep_connections:
            async with self._lock:
                await self._hangup()
        else:
            await self.restart()

    async def wait_running(self, timeout: float = 10.0) -> None:
        """Return once Mosquitto answers (after a crash, say) and no (re)start is under way."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    if self.running and not self._lock.locked():
                        try:
                            await self._probe()
                            return
                        except (OSError, CloudError, asyncio.IncompleteReadError):
                            pass
                    await asyncio.sleep(0.05)
        except TimeoutError as err:
            raise CloudError(
                f"the broker did not answer within {timeout:g} s{self._log_excerpt()}"
            ) from err

    # -- supervision -------------------------------------------------------------------

    async def _supervise(self) -> None:
        failures = 0
        loop = asyncio.get_running_loop()
        while True:
            proc = self._proc
            assert proc is not None
            code = await proc.wait()
            if self._stopping:
                return
            if self._proc is not proc or self._lock.locked():
                # restart() or a respawn is replacing it; watch whatever it starts.
                async with self._lock:
                    pass
                if self._proc is not proc:
                    continue
            uptime = loop.time() - self._started_at
            failures = 1 if uptime > _STABLE_SECONDS else failures + 1
            while not self._stopping:
                delay = self._backoff(failures)
                log.warning(
                    "mosquitto exited with code %s after %.1f s; restarting in %.2f s%s",
                    code,
                    uptime,
                    delay,
                    self._log_excerpt(5),
                )
                await asyncio.sleep(delay)
                async with self._lock:
                    if self._stopping:
                        return
                    if self.running:  # restart() or update_crl() got there first
                        break
                    try:
                        await self._spawn()
                    except CloudError as err:
                        log.error("mosquitto did not restart: %s", err)
                        failures += 1
                        continue
                    self.restarts += 1
                log.info("mosquitto restarted (pid %s)", self.pid)
                break

    def _backoff(self, failures: int) -> float:
        cfg = self.cfg
        ceiling = min(cfg.restart_max_delay, cfg.restart_base_delay * 2.0 ** (failures - 1))
        return ceiling * random.uniform(0.5, 1.0)

    # -- the process -------------------------------------------------------------------

    async def _start_on_free_ports(self) -> None:
        """Start on the configured ports; a port given as 0 is chosen (and kept for next time)."""
        cfg = self.cfg
        chosen = cfg.device_port == 0 or cfg.service_port == 0
        remembered = self._remembered_ports() if chosen else None
        for attempt in range(3):
            if remembered is not None and attempt == 0:
                device, service = remembered
            else:
                hosts = sorted({cfg.host, SERVICE_HOST})
                taken = {cfg.device_port, cfg.service_port}
                picks = iter(
                    p for p in choose_ports(cfg.base_port, 4, hosts=hosts) if p not in taken
                )
                device = cfg.device_port or next(picks)
                service = cfg.service_port or next(picks)
            self._ports = BrokerPorts(cfg.host, device, service)
            try:
                await self._spawn()
            except _PortInUse as err:
                if not chosen or attempt == 2:
                    raise CloudError(str(err)) from None
                log.info("a chosen port was taken before mosquitto bound it; again: %s", err)
                continue
            ports = json.dumps({"device": device, "service": service}).encode()
            write_bytes_atomic(cfg.data_dir / "ports.json", ports)
            return

    def _remembered_ports(self) -> tuple[int, int] | None:
        """The ports of the last run, if still free: devices keep the endpoint they know."""
        try:
            saved = json.loads((self.cfg.data_dir / "ports.json").read_text())
            device = self.cfg.device_port or int(saved["device"])
            service = self.cfg.service_port or int(saved["service"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        free = _is_free(self.cfg.host, device) and _is_free(SERVICE_HOST, service)
        return (device, service) if free and device != service else None

    def _effective_config(self) -> BrokerConfig:
        ports = self.ports
        # Started as root, Mosquitto drops to the `mosquitto` user unless told otherwise,
        # and could then not write its database into our 0700 folder.
        run_as = self.cfg.run_as or ("root" if os.geteuid() == 0 else None)
        return replace(
            self.cfg, device_port=ports.device, service_port=ports.service, run_as=run_as
        )

    async def _spawn(self) -> None:
        """Start Mosquitto with the current files; return once it answers."""
        cfg = self.cfg
        write_bytes_atomic(
            cfg.conf_path, render_config(self._effective_config()).encode(), mode=0o600
        )
        offset = self._log_size()
        with cfg.log_path.open("ab") as out:
            try:
                proc = await asyncio.create_subprocess_exec(
                    cfg.executable,
                    "-c",
                    str(cfg.conf_path),
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=out,
                    stderr=asyncio.subprocess.STDOUT,
                    start_new_session=True,  # its own process group: our signals are not its
                )
            except OSError as err:
                raise CloudError(
                    f"cannot run {cfg.executable}: {err.strerror}; install Debian's mosquitto "
                    "package (`make setup` does)"
                ) from err
        self._proc = proc
        self._started_at = asyncio.get_running_loop().time()
        (cfg.data_dir / "mosquitto.pid").write_text(f"{proc.pid}\n")
        deadline = self._started_at + cfg.start_timeout
        while True:
            if proc.returncode is not None:
                tail = self._log_since(offset)
                if "Address already in use" in tail:
                    raise _PortInUse(
                        f"mosquitto could not listen on {self.ports.host}:{self.ports.device} "
                        f"or {SERVICE_HOST}:{self.ports.service}: address already in use; "
                        f"stop what holds it or choose other ports{_excerpt(tail)}"
                    )
                raise CloudError(
                    f"mosquitto exited with code {proc.returncode} while starting "
                    f"(config {cfg.conf_path}){_excerpt(tail)}"
                )
            try:
                await self._probe(device=True)
                return
            except (OSError, CloudError, asyncio.IncompleteReadError):
                pass
            if asyncio.get_running_loop().time() > deadline:
                await self._terminate()
                raise CloudError(
                    f"mosquitto did not answer within {cfg.start_timeout:g} s"
                    f"{_excerpt(self._log_since(offset))}"
                )
            await asyncio.sleep(0.03)

    async def _probe(self, *, device: bool = False) -> None:
        """The service listener answers a login with CONNACK 0 (and, with ``device``, the
        device listener accepts a TCP connection).

        Mosquitto opens every listener before it serves any, and serves one loop, so an
        answer also means the other listener is up and any reload asked for has finished.
        """
        ports = self.ports
        async with asyncio.timeout(2.0):
            if device:
                # A bare TCP connect: a handshake would need a client certificate.
                _, writer = await asyncio.open_connection(ports.host, ports.device)
                writer.close()
            reader, writer = await asyncio.open_connection(SERVICE_HOST, ports.service)
            try:
                probe_id = f"edgeloop-probe-{secrets.token_hex(4)}"
                writer.write(_connect_packet(probe_id, self.cfg.service_user, self._password))
                await writer.drain()
                ack = await reader.readexactly(4)
                writer.write(b"\xe0\x00")  # DISCONNECT
                await writer.drain()
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
        if ack != b"\x20\x02\x00\x00":
            raise CloudError(f"mosquitto refused the service login (CONNACK {ack.hex()})")

    async def _hangup(self) -> None:
        proc = self._proc
        if proc is None or proc.returncode is not None:
            log.info("mosquitto is down; the supervisor's restart will read the new files")
            return
        offset = self._log_size()
        os.kill(proc.pid, signal.SIGHUP)
        deadline = asyncio.get_running_loop().time() + self.cfg.start_timeout
        while "Reloading config." not in self._log_since(offset):
            if asyncio.get_running_loop().time() > deadline or proc.returncode is not None:
                raise CloudError(f"mosquitto did not reload{self._log_excerpt()}")
            await asyncio.sleep(0.02)
        await self._probe()
        errors = [line for line in self._log_since(offset).splitlines() if "Error" in line]
        if errors:
            raise CloudError(
                "mosquitto reported errors while reloading:\n  " + "\n  ".join(errors[-10:])
            )

    async def _terminate(self) -> None:
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        if not await _wait_exit(proc, self.cfg.stop_timeout):
            log.warning("mosquitto ignored SIGTERM for %g s; killing it", self.cfg.stop_timeout)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
        (self.cfg.data_dir / "mosquitto.pid").unlink(missing_ok=True)

    def _require_started(self) -> None:
        if self._supervisor is None or self._stopping:
            raise CloudError("the broker is not started")

    # -- files -------------------------------------------------------------------------

    def _take_folder(self) -> None:
        path = self.cfg.data_dir / "broker.lock"
        handle = path.open("ab")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise CloudError(
                f"{self.cfg.data_dir}: another edgeloop broker runs on this folder"
            ) from None
        self._lock_file = handle

    def _release_folder(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def _orphan_pid(self) -> int | None:
        """A Mosquitto left running on our config by a previous owner of this folder.

        Whoever holds the folder's lock owns the folder, so any such process is an orphan.
        """
        try:
            pid = int((self.cfg.data_dir / "mosquitto.pid").read_text())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            return None
        return pid if str(self.cfg.conf_path).encode() in cmdline else None

    async def _stop_orphan(self) -> None:
        pid = self._orphan_pid()
        if pid is None:
            return
        log.warning("stopping mosquitto %d, left running by a previous edgeloop", pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)  # it saves its database on the way out
        for _ in range(int(self.cfg.stop_timeout / 0.05)):
            if not _alive(pid):
                break
            await asyncio.sleep(0.05)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def _service_secret(self) -> str:
        path = self.cfg.data_dir / "service.secret"
        try:
            secret = path.read_text().strip()
        except FileNotFoundError:
            secret = ""
        if not secret:
            secret = secrets.token_urlsafe(32)
            write_bytes_atomic(path, secret.encode(), mode=0o600)
        return secret

    def _write_auth_files(self) -> None:
        cfg = self.cfg
        write_bytes_atomic(cfg.device_acl_path, render_acl(cfg.acl).encode())
        write_bytes_atomic(cfg.service_acl_path, render_service_acl(cfg.service_user).encode())
        write_bytes_atomic(
            cfg.password_path, password_line(cfg.service_user, self._password).encode(), mode=0o600
        )

    def _rotate_log(self) -> None:
        path = self.cfg.log_path
        with contextlib.suppress(FileNotFoundError):
            if path.stat().st_size > _LOG_ROTATE_BYTES:
                os.replace(path, path.with_name(path.name + ".1"))

    def _log_size(self) -> int:
        try:
            return self.cfg.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def _log_since(self, offset: int) -> str:
        try:
            with self.cfg.log_path.open("rb") as handle:
                handle.seek(offset)
                return handle.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def _log_excerpt(self, lines: int = 15) -> str:
        return _excerpt(self._log_since(max(0, self._log_size() - 16384)), lines)


class _PortInUse(CloudError):
    """Mosquitto could not bind: worth choosing other ports when they were ours to choose."""


def _excerpt(text: str, lines: int = 15) -> str:
    tail = [line for line in text.splitlines() if line.strip()][-lines:]
    return ("; mosquitto's log ends:\n  " + "\n  ".join(tail)) if tail else ""


async def _wait_exit(proc: asyncio.subprocess.Process, timeout: float) -> bool:
    """True once ``proc`` has exited, False if it still runs after ``timeout`` seconds."""
    try:
        async with asyncio.timeout(timeout):
            await proc.wait()
    except TimeoutError:
        return False
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
