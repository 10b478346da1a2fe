"""The hub's broker for its monitoring kits: Mosquitto, configured and supervised by the agent.

A hub whose ``agent.json`` has a ``broker`` section (``edgeloop.edge.hub_broker_config``,
which also says what the listeners and the ACL allow) runs it as the built-in component
``edgeloop.HubBroker``, before any other component starts::

    "broker": {"port": 8883, "ca": "install-ca.pem", "kit_topic_prefix": "kits"}

Certificates. Kits present client certificates signed by the install's CA: the CA the
cloud issues things' certificates with (the hub's ``cloud.ca``, the cloud's ``caFile``), so
``edgeloop cloud cert issue <kit-id>`` makes a kit's identity (CN = kit id); a hub without
a cloud names its own ``ca``. The broker's server identity is ``cert``/``key`` when given.
Otherwise the hub makes, on first start, a **hub-local server CA** (EC P-256, path length
0, key 0600 in ``<root>/broker/``) and a server certificate it signs, for the host name,
``<host name>.local``, ``localhost``, 127.0.0.1, ::1 and ``server_names``. Kits trust
``<root>/broker/server-ca.pem``, copied to them when they are set up (for
``edgeloop sim kits``: ``--ca <root>/broker/server-ca.pem``). This CA only ever signs the
hub's server certificate (it is not among the CAs client certificates are checked
against), so trusting it trusts this one hub; the server certificate can be made again
(new names, renewal) without touching the kits. Why a CA and not a self-signed server
certificate: OpenSSL's strict verification (Python 3.13's default) refuses a leaf that
is its own trust anchor, and a renewed self-signed certificate would have to be
re-distributed to every kit. Kits reaching the hub by an address the certificate does
not name must either have that address added to ``server_names`` or skip the host-name
check (sound here: the trust anchor is this hub's alone).

Durability. ``persistence`` with ``autosave_on_changes`` saves the database after every
change (``autosave_changes``: 1), so a restart keeps the bridge's persistent session and
the QoS 1 readings queued for it. A graceful stop saves everything, and so does a killed
agent: the Mosquitto it leaves running is stopped with SIGTERM by the next agent.
Mosquitto 2.0.11 acknowledges a PUBLISH a few milliseconds before the save that follows,
so a ``kill -9`` of Mosquitto itself can lose what it acknowledged in those milliseconds.

The price of saving every change: a save rewrites the whole database (a new file, then a
rename, which ext4 flushes), and a reading is two changes (stored; acknowledged by the
bridge). Measured on the loaded 2-core test machine (SSD, ext4), four simulated kits
publishing as fast as acknowledged through to the spool: about 240 readings a second
saving every change, 1,400 with ``autosave_changes`` 100 (a home's kits send about one a
second). And the broker slows down as its queue grows: a backlog (the agent down for
long, the streams full) drains at a rate that falls with its size. ``autosave_changes``
N saves every N changes instead, and a ``kill -9`` of Mosquitto may then lose up to N.

Supervision: an unexpected exit is restarted with capped, jittered backoff; a Mosquitto
left running by a killed agent is stopped (gracefully: it saves) before a new one starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import secrets
import signal
import socket
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeloop import __version__
from edgeloop.core.errors import AgentError, EdgeloopError, ValidationError
from edgeloop.edge.hub_broker_config import (
    AGENT_USER,
    BRIDGE_CLIENT_ID,
    SERVICE_HOST,
    BrokerSettings,
    RenderedPaths,
    password_line,
    queue_limits,
    render_agent_acl,
    render_config,
    render_kit_acl,
)
from edgeloop.fileio import write_bytes_atomic

__all__ = [
    "AGENT_USER",
    "BRIDGE_CLIENT_ID",
    "COMPONENT",
    "AgentLogin",
    "HubBroker",
    "ServerIdentity",
    "ensure_server_identity",
    "server_names",
]

log = logging.getLogger("edgeloop.hub_broker")

COMPONENT = "edgeloop.HubBroker"
_STABLE_SECONDS = 30.0  # an exit after this long up counts as a first failure again
_LOG_ROTATE_BYTES = 8 * 1024 * 1024
_DROP_LINE = b"Outgoing messages are being dropped for client"
_SERVER_DAYS = 825
_RENEW_DAYS = 30
_CA_DAYS = 20 * 365

# --- the hub-local server identity ----------------------------------------------------------


@dataclass(frozen=True)
class ServerIdentity:
    """The broker's certificate and key, and the CA kits trust for it (None: not ours)."""

    cert: Path
    key: Path
    trust: Path | None


def server_names(extra: Sequence[str]) -> list[str]:
    """The names and addresses the hub-local server certificate is made for."""
    host = socket.gethostname()
    names = [host, f"{host}.local", "localhost", "127.0.0.1", "::1", *extra]
    return list(dict.fromkeys(n for n in names if n))


def ensure_server_identity(
    folder: Path, names: Sequence[str], *, now: float | None = None
) -> ServerIdentity:
    """The hub-local server CA and a current server certificate for ``names`` in ``folder``.

    The CA is made once; the server certificate again when it is missing, names other
    names, or expires within 30 days.
    """
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    ca_cert_path, ca_key_path = folder / "server-ca.pem", folder / "server-ca.key"
    cert_path, key_path = folder / "server.cert.pem", folder / "server.key.pem"
    moment = dt.datetime.fromtimestamp(now if now is not None else time.time(), dt.UTC)

    def pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def usage(*, ca: bool) -> x509.KeyUsage:
        return x509.KeyUsage(
            digital_signature=True,
            content_commitment=False,
            key_encipherment=False,
            data_encipherment=False,
            key_agreement=False,
            key_cert_sign=ca,
            crl_sign=ca,
            encipher_only=False,
            decipher_only=False,
        )

    try:
        ca_cert = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
        ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
        if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
            raise ValueError("not an EC key")
    except (OSError, ValueError):
        ca_key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edgeloop hub"),
                x509.NameAttribute(NameOID.COMMON_NAME, f"{socket.gethostname()} server CA"),
            ]
        )
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(moment - dt.timedelta(minutes=5))
            .not_valid_after(moment + dt.timedelta(days=_CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(usage(ca=True), critical=True)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
            )
            .sign(ca_key, hashes.SHA256())
        )
        write_bytes_atomic(ca_key_path, pem_key(ca_key), mode=0o600)
        write_bytes_atomic(ca_cert_path, ca_cert.public_bytes(serialization.Encoding.PEM))
        cert_path.unlink(missing_ok=True)  # signed by a CA that is gone
    sans: list[x509.GeneralName] = []
    for name in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            sans.append(x509.DNSName(name))
    if _current(cert_path, key_path, sans, moment):
        return ServerIdentity(cert_path, key_path, ca_cert_path)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(moment - dt.timedelta(minutes=5))
        .not_valid_after(moment + dt.timedelta(days=_SERVER_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    write_bytes_atomic(key_path, pem_key(key), mode=0o600)
    write_bytes_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    log.info("made the hub broker's server certificate for %s", ", ".join(names))
    return ServerIdentity(cert_path, key_path, ca_cert_path)


def _current(cert_path: Path, key_path: Path, sans: list[Any], moment: Any) -> bool:
    """Whether the server certificate exists, names exactly ``sans`` and is not expiring."""
    import datetime as dt

    from cryptography import x509

    if not key_path.is_file():
        return False
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        named = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, x509.ExtensionNotFound):
        return False
    fresh = cert.not_valid_after_utc - moment > dt.timedelta(days=_RENEW_DAYS)
    return fresh and set(named) == set(sans)


# --- the running broker -----------------------------------------------------------------------


@dataclass(frozen=True)
class AgentLogin:
    """How the agent's bridge reaches the broker: plain MQTT on loopback."""

    host: str
    port: int
    username: str
    password: str


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


class HubBroker:
    """Mosquitto as the agent's built-in component; see the module docstring."""

    def __init__(
        self,
        settings: BrokerSettings,
        data_dir: Path,
        *,
        stream_bytes: Iterable[int] = (),
    ) -> None:
        if settings.ca is None:
            raise ValidationError(
                "is required: the CA kits' certificates chain to (the hub has no cloud.ca)",
                field="broker.ca",
            )
        self.settings = settings
        self.data_dir = data_dir
        self.queue_messages, self.queue_bytes = queue_limits(
            stream_bytes, settings.max_queued_messages
        )
        self.state = "NEW"
        self.since = time.time()
        self.restarts = 0
        self.last_error: dict[str, Any] | None = None
        self.port = 0
        self.service_port = 0
        self.identity: ServerIdentity | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._password = ""
        self._started_at = 0.0
        self._stopping = False
        self._supervisor: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._drops = 0
        self._drop_offset = 0
        self._running = asyncio.Event()

    # -- what others need ------------------------------------------------------------------

    @property
    def login(self) -> AgentLogin:
        """The loopback listener and the agent's credentials."""
        return AgentLogin(SERVICE_HOST, self.service_port, AGENT_USER, self._password)

    @property
    def pid(self) -> int | None:
        """Mosquitto's process id while it runs."""
        proc = self._proc
        return proc.pid if proc is not None and proc.returncode is None else None

    @property
    def conf_path(self) -> Path:
        return self.data_dir / "mosquitto.conf"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "mosquitto.log"

    async def wait_running(self, timeout: float) -> bool:
        """True once Mosquitto is up (False after ``timeout`` seconds)."""
        try:
            async with asyncio.timeout(timeout):
                await self._running.wait()
        except TimeoutError:
            return False
        return True

    def status(self) -> dict[str, Any]:
        """For ``device status``: where kits connect, the state, and any drops."""
        self._count_drops()
        identity = self.identity
        return {
            "name": COMPONENT,
            "state": self.state,
            "since": self.since,
            "pid": self.pid,
            "restarts": self.restarts,
            "host": self.settings.host,
            "port": self.port,
            "servicePort": self.service_port,
            "caFile": str(self.settings.ca),
            "serverCaFile": str(identity.trust) if identity and identity.trust else None,
            "kitTopicPrefix": self.settings.kit_topic_prefix,
            "maxQueuedMessages": self.queue_messages,
            "maxQueuedBytes": self.queue_bytes,
            "droppedForClients": self._drops,
            "lastError": self.last_error,
        }

    def component_status(self) -> dict[str, Any]:
        """A row of ``device components``, shaped as a component runner's."""
        note = f"kits on {self.settings.host}:{self.port or '-'} (mTLS)"
        if self._drops:
            note += f"; dropped queued messages {self._drops} time(s), see {self.log_path}"
        return {
            "name": COMPONENT,
            "version": __version__,
            "state": self.state,
            "since": self.since,
            "pid": self.pid,
            "restarts": self.restarts,
            "note": note,
            "paused": False,
            "lastError": self.last_error,
            "builtin": True,
        }

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Write the files and start Mosquitto; a failure is logged, kept in the status and
        retried by the supervisor (the hub runs its components either way)."""
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._set("STARTING")
        self._stopping = False
        try:
            await self._stop_orphan()
            self._rotate_log()
            self._password = self._secret()
            async with self._lock:
                await self._prepare()
                await self._spawn()
        except EdgeloopError as err:
            self._proc = None
            self._fail(str(err))
            log.error("the hub broker did not start: %s", err)
        self._supervisor = asyncio.create_task(self._supervise(), name="hub-broker")

    async def stop(self) -> None:
        """Stop Mosquitto gracefully (it saves its database) and its supervision."""
        self._stopping = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
            self._supervisor = None
        self._set("STOPPING")
        async with self._lock:
            await self._terminate()
        self._set("FINISHED")

    # -- supervision -----------------------------------------------------------------------------

    async def _supervise(self) -> None:
        failures = 0 if self._proc is not None else 1
        loop = asyncio.get_running_loop()
        while not self._stopping:
            proc = self._proc
            if proc is not None:
                code = await proc.wait()
                if self._stopping:
                    return
                self._running.clear()
                uptime = loop.time() - self._started_at
                failures = 1 if uptime > _STABLE_SECONDS else failures + 1
                self._fail(f"mosquitto exited with code {code} after {uptime:.1f} s", code)
            delay = self._backoff(failures)
            log.warning("hub broker down; starting it again in %.2f s%s", delay, self._tail(5))
            await asyncio.sleep(delay)
            async with self._lock:
                if self._stopping:
                    return
                try:
                    await self._prepare()
                    await self._spawn()
                except EdgeloopError as err:
                    self._proc = None
                    failures += 1
                    self._fail(str(err))
                    log.error("the hub broker did not start: %s", err)
                    continue
            self.restarts += 1
            log.info("hub broker restarted (pid %s)", self.pid)

    def _backoff(self, failures: int) -> float:
        cfg = self.settings
        ceiling = min(cfg.restart_max_delay, cfg.restart_base_delay * 2.0 ** max(0, failures - 1))
        return ceiling * random.uniform(0.5, 1.0)

    def _set(self, state: str) -> None:
        if state != self.state:
            self.state = state
            self.since = time.time()

    def _fail(self, reason: str, code: int | None = None) -> None:
        self._set("ERRORED")
        self.last_error = {
            "step": "run",
            "reason": reason,
            "exitCode": code,
            "signal": -code if code is not None and code < 0 else None,
            "at": time.time(),
            "logTail": self._tail_lines(10),
        }

    # -- the process ---------------------------------------------------------------------

    async def _prepare(self) -> None:
        """Choose ports, make the identity if needed, write every file Mosquitto reads."""
        cfg = self.settings
        assert cfg.ca is not None
        if cfg.cert is not None and cfg.key is not None:
            self.identity = ServerIdentity(cfg.cert, cfg.key, None)
        else:
            names = server_names(cfg.server_names)
            self.identity = await asyncio.to_thread(ensure_server_identity, self.data_dir, names)
        self.port, self.service_port = self._ports()
        paths = RenderedPaths(
            data_dir=self.data_dir, ca=cfg.ca, cert=self.identity.cert, key=self.identity.key
        )
        write_bytes_atomic(paths.kit_acl, render_kit_acl(cfg.kit_topic_prefix).encode())
        write_bytes_atomic(paths.agent_acl, render_agent_acl().encode())
        write_bytes_atomic(
            paths.password_file, password_line(AGENT_USER, self._password).encode(), mode=0o600
        )
        # Started as root, Mosquitto drops to the `mosquitto` user, which could then not
        # write its database into our 0700 folder.
        run_as = "root" if os.geteuid() == 0 else None
        conf = render_config(
            cfg,
            paths,
            port=self.port,
            service_port=self.service_port,
            max_queued_messages=self.queue_messages,
            max_queued_bytes=self.queue_bytes,
            run_as=run_as,
        )
        write_bytes_atomic(self.conf_path, conf.encode(), mode=0o600)

    def _ports(self) -> tuple[int, int]:
        """The configured ports; 0 means the one chosen last time if free, else a free one."""
        cfg = self.settings
        saved: dict[str, Any] = {}
        with contextlib.suppress(OSError, ValueError):
            saved = json.loads((self.data_dir / "ports.json").read_text())
        port, service = cfg.port, cfg.service_port
        if self.port and not port:  # a restart keeps what the kits know
            port = self.port
        if self.service_port and not service:
            service = self.service_port
        if not port:
            old = saved.get("port")
            if isinstance(old, int) and 0 < old < 65536 and _is_free(cfg.host, old):
                port = old
            else:
                port = _free_port(cfg.host)
        if not service:
            old = saved.get("servicePort")
            if isinstance(old, int) and 0 < old < 65536 and old != port:
                service = old if _is_free(SERVICE_HOST, old) else 0
            service = service or _free_port(SERVICE_HOST, avoid=port)
        body = json.dumps({"port": port, "servicePort": service}).encode()
        write_bytes_atomic(self.data_dir / "ports.json", body)
        return port, service

    async def _spawn(self) -> None:
        """Start Mosquitto with the files written; return once it answers."""
        cfg = self.settings
        offset = self._log_size()
        with self.log_path.open("ab") as out:
            try:
                proc = await asyncio.create_subprocess_exec(
                    cfg.executable,
                    "-c",
                    str(self.conf_path),
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=out,
                    stderr=asyncio.subprocess.STDOUT,
                    start_new_session=True,  # our signals (Ctrl-C) are not its
                )
            except OSError as err:
                raise AgentError(
                    f"cannot run {cfg.executable}: {err.strerror}; install Debian's mosquitto "
                    "package (`make setup` does)"
                ) from err
        self._proc = proc
        self._started_at = asyncio.get_running_loop().time()
        (self.data_dir / "mosquitto.pid").write_text(f"{proc.pid}\n")
        deadline = self._started_at + cfg.start_timeout
        while True:
            if proc.returncode is not None:
                tail = self._log_since(offset)
                hint = ""
                if "Address already in use" in tail:
                    hint = (
                        f": port {self.port} or {self.service_port} is taken; free it or set "
                        "broker.port / broker.service_port"
                    )
                raise AgentError(
                    f"mosquitto exited with code {proc.returncode} while starting{hint}"
                    f"{_excerpt(tail)}"
                )
            try:
                await self._probe()
                break
            except (OSError, AgentError, asyncio.IncompleteReadError, TimeoutError):
                pass
            if asyncio.get_running_loop().time() > deadline:
                await self._terminate()
                raise AgentError(
                    f"mosquitto did not answer within {cfg.start_timeout:g} s"
                    f"{_excerpt(self._log_since(offset))}"
                )
            await asyncio.sleep(0.03)
        self._set("RUNNING")
        self._running.set()
        log.info(
            "hub broker (mosquitto pid %d) takes kits on %s:%d, the agent on %s:%d",
            proc.pid,
            cfg.host,
            self.port,
            SERVICE_HOST,
            self.service_port,
        )

    async def _probe(self) -> None:
        """The kits' port takes a TCP connection and the agent's login gets CONNACK 0."""
        async with asyncio.timeout(2.0):
            host = SERVICE_HOST if self.settings.host in ("0.0.0.0", "::") else self.settings.host
            _, writer = await asyncio.open_connection(host, self.port)
            writer.close()
            reader, writer = await asyncio.open_connection(SERVICE_HOST, self.service_port)
            try:
                probe = f"edgeloop/probe-{secrets.token_hex(4)}"
                writer.write(_connect_packet(probe, AGENT_USER, self._password))
                await writer.drain()
                ack = await reader.readexactly(4)
                writer.write(b"\xe0\x00")  # DISCONNECT
                await writer.drain()
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
        if ack != b"\x20\x02\x00\x00":
            raise AgentError(f"mosquitto refused the agent's login (CONNACK {ack.hex()})")

    async def _terminate(self) -> None:
        self._running.clear()
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)  # it saves its database on the way out
        try:
            async with asyncio.timeout(self.settings.stop_timeout):
                await proc.wait()
        except TimeoutError:
            log.warning("mosquitto ignored SIGTERM; killing it")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
        (self.data_dir / "mosquitto.pid").unlink(missing_ok=True)

    async def _stop_orphan(self) -> None:
        """Stop a Mosquitto a killed agent left running on our config (it saves first)."""
        pid = _orphan(self.data_dir / "mosquitto.pid", self.conf_path)
        if pid is None:
            return
        log.warning("stopping mosquitto %d, left running by a previous agent", pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        for _ in range(int(self.settings.stop_timeout / 0.05)):
            if not _alive(pid):
                return
            await asyncio.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)

    # -- files ----------------------------------------------------------------------------

    def _secret(self) -> str:
        path = self.data_dir / "agent.secret"
        try:
            secret = path.read_text().strip()
        except FileNotFoundError:
            secret = ""
        if not secret:
            secret = secrets.token_urlsafe(32)
            write_bytes_atomic(path, secret.encode(), mode=0o600)
        return secret

    def _rotate_log(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            if self.log_path.stat().st_size > _LOG_ROTATE_BYTES:
                os.replace(self.log_path, self.log_path.with_name(self.log_path.name + ".1"))

    def _log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def _log_since(self, offset: int) -> str:
        try:
            with self.log_path.open("rb") as handle:
                handle.seek(offset)
                return handle.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def _tail_lines(self, lines: int) -> list[str]:
        text = self._log_since(max(0, self._log_size() - 8192))
        return [line for line in text.splitlines() if line.strip()][-lines:]

    def _tail(self, lines: int) -> str:
        return _excerpt("\n".join(self._tail_lines(lines)), lines)

    def _count_drops(self) -> None:
        """Count Mosquitto's "dropping messages" notices logged since the last look."""
        size = self._log_size()
        if size < self._drop_offset:  # rotated
            self._drop_offset = 0
        if size == self._drop_offset:
            return
        try:
            with self.log_path.open("rb") as handle:
                handle.seek(self._drop_offset)
                chunk = handle.read(size - self._drop_offset)
        except FileNotFoundError:
            return
        end = chunk.rfind(b"\n") + 1  # a line being written is read next time
        self._drops += chunk[:end].count(_DROP_LINE)
        self._drop_offset += end


def _excerpt(text: str, lines: int = 15) -> str:
    tail = [line for line in text.splitlines() if line.strip()][-lines:]
    return ("; mosquitto's log ends:\n  " + "\n  ".join(tail)) if tail else ""


def _is_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Mosquitto binds
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def _free_port(host: str, *, avoid: int = 0) -> int:
    for _ in range(10):
        with socket.socket() as sock:
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
        if port != avoid:
            return port
    raise AgentError(f"no free port on {host}")


def _orphan(pid_file: Path, conf: Path) -> int | None:
    """The pid in ``pid_file`` if that process is a Mosquitto running ``conf``."""
    try:
        pid = int(pid_file.read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None
    return pid if str(conf).encode() in cmdline else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
