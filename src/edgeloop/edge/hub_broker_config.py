"""The hub broker described as data — its ``broker`` section in ``agent.json`` — and the
files Mosquitto reads (pure; ``edgeloop.edge.hub_broker`` runs it)::

    "broker": {
      "port": 8883,                    kits' TLS listener (0: a free port, then kept)
      "host": "0.0.0.0",               where it listens (default: every address)
      "ca": "install-ca.pem",          kits' certificates must chain to it (default: cloud.ca)
      "cert": "hub-broker.cert.pem",   the broker's own certificate and key (default: a
      "key": "hub-broker.key.pem",       hub-local one made on first start: edge.hub_broker)
      "server_names": ["hub.local"],   more names/addresses for the made certificate
      "kit_topic_prefix": "kits",      kit X may use PREFIX/X/# and nothing else
      "service_port": 0,               the agent's loopback listener (0: a free port, kept)
      "max_queued_messages": null,     per-client queue cap (default: from the spool, below)
      "autosave_changes": 1            save the broker's database every N changes (below)
    }

Relative paths are under the hub's root. Every key is optional but ``ca`` on a hub
without a ``cloud`` section.

Two listeners, one topic space (``per_listener_settings``):

- **kits** (``host:port``): TLS 1.2+, ``require_certificate`` against ``ca``.
  ``use_identity_as_username`` makes the certificate's CN the username, and
  ``use_username_as_clientid`` makes it the client id too, so a kit can neither speak for
  another in the ACL (``pattern readwrite PREFIX/%u/#`` is all it gets; a PUBLISH elsewhere
  is answered with PUBACK 0x87 "not authorized" in MQTT 5) nor take over another's
  session by choosing its client id.
- **agent** (``127.0.0.1:service_port``): plain MQTT on loopback for the bridge
  (``edgeloop.edge.bridge``), one user whose random password lives in
  ``<root>/broker/agent.secret`` (0600), every topic allowed. The bridge's client id
  (``edgeloop/bridge``) contains a ``/``, which no kit id or thing name can, so no kit
  certificate can claim the bridge's session.

Queued readings are capped per client by ``max_queued_messages`` and
``max_queued_bytes``; past them Mosquitto drops QoS 1 messages silently, which would break
"nothing accepted is lost", so the caps are the spool's: ``max_queued_bytes`` is the total
``max_bytes`` of the streams the bridge stores into, and ``max_queued_messages`` that over
64 bytes (less than any reading takes), so the spool refuses before the broker would drop,
and the hub as a whole buffers up to twice the streams' size while the cloud is away.
(Mosquitto keeps queued messages in memory: that much RAM, worst case.) When Mosquitto
still drops, its log says so and ``device status`` counts it.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeloop.core.errors import ValidationError

__all__ = [
    "AGENT_USER",
    "BRIDGE_CLIENT_ID",
    "DEFAULT_PORT",
    "SERVICE_HOST",
    "BrokerSettings",
    "RenderedPaths",
    "check_prefix",
    "parse_broker",
    "password_line",
    "queue_limits",
    "render_agent_acl",
    "render_config",
    "render_kit_acl",
]

MOSQUITTO = "/usr/sbin/mosquitto"
SERVICE_HOST = "127.0.0.1"
AGENT_USER = "edgeloop-agent"
BRIDGE_CLIENT_ID = "edgeloop/bridge"  # a '/' no kit id or thing name has
DEFAULT_PORT = 8883
DEFAULT_QUEUE_MESSAGES = 100_000  # when no stream backs the bridge (Pubsub targets only)
MIN_RECORD_BYTES = 64  # fewer than any reading takes in a stream, frame included
MAX_PACKET = 128 * 1024  # a reading is at most 64 KiB (edgeloop.core.telemetry)
_TOKEN = re.compile(r"^\S+$")
_PREFIX_LEVEL = re.compile(r"^[A-Za-z0-9_.-]+$")

# --- settings ----------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class BrokerSettings:
    """The ``broker`` section of ``agent.json``, paths resolved under the hub's root."""

    port: int = DEFAULT_PORT
    host: str = "0.0.0.0"
    ca: Path | None = None  # None until resolved: the cloud's CA
    cert: Path | None = None  # None: the hub-local identity
    key: Path | None = None
    server_names: tuple[str, ...] = ()
    kit_topic_prefix: str = "kits"
    service_port: int = 0
    max_queued_messages: int | None = None
    autosave_changes: int = 1
    executable: str = MOSQUITTO
    start_timeout: float = 10.0
    stop_timeout: float = 10.0
    restart_base_delay: float = 0.2
    restart_max_delay: float = 10.0


_KEYS = (
    "port",
    "host",
    "ca",
    "cert",
    "key",
    "server_names",
    "kit_topic_prefix",
    "service_port",
    "max_queued_messages",
    "autosave_changes",
)


def parse_broker(value: Any, root: Path, *, source: str) -> BrokerSettings:
    """The ``broker`` section, validated key by key (``ca`` may stay unresolved)."""
    if not isinstance(value, dict):
        raise ValidationError(
            'must be an object, e.g. {"port": 8883, "ca": "install-ca.pem"}',
            source=source,
            field="broker",
        )
    for key in value:
        if key not in _KEYS:
            raise ValidationError(
                f"unknown key; known: {', '.join(sorted(_KEYS))}",
                source=source,
                field=f"broker.{key}",
            )
    changes: dict[str, Any] = {}
    for key in ("port", "service_port"):
        if key in value:
            port = value[key]
            if not _is_int(port) or not 0 <= port <= 65535:
                raise ValidationError(
                    "must be a port number (1-65535), or 0 for a free one chosen once",
                    source=source,
                    field=f"broker.{key}",
                )
            changes[key] = port
    if changes.get("port") and changes.get("port") == changes.get("service_port"):
        raise ValidationError(
            "must differ from broker.port", source=source, field="broker.service_port"
        )
    if "host" in value:
        if not isinstance(value["host"], str) or not _TOKEN.match(value["host"]):
            raise ValidationError(
                "must be an address to listen on, e.g. 0.0.0.0 or 192.168.1.20",
                source=source,
                field="broker.host",
            )
        changes["host"] = value["host"]
    for key in ("ca", "cert", "key"):
        if value.get(key) is None:
            continue
        if not isinstance(value[key], str) or not value[key]:
            raise ValidationError("must be a file name", source=source, field=f"broker.{key}")
        path = Path(value[key]).expanduser()
        path = path if path.is_absolute() else root / path
        if not path.is_file():
            raise ValidationError(f"{path} is not a file", source=source, field=f"broker.{key}")
        if not _TOKEN.match(str(path)):
            raise ValidationError(
                f"{path}: Mosquitto cannot read a path with spaces",
                source=source,
                field=f"broker.{key}",
            )
        changes[key] = path
    if ("cert" in changes) != ("key" in changes):
        missing = "key" if "cert" in changes else "cert"
        raise ValidationError(
            "give both cert and key, or neither (the hub then makes its own identity)",
            source=source,
            field=f"broker.{missing}",
        )
    names = value.get("server_names", [])
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise ValidationError(
            "must be a list of host names or addresses",
            source=source,
            field="broker.server_names",
        )
    changes["server_names"] = tuple(names)
    if "kit_topic_prefix" in value:
        changes["kit_topic_prefix"] = check_prefix(
            value["kit_topic_prefix"], source=source, field="broker.kit_topic_prefix"
        )
    queued = value.get("max_queued_messages")
    if queued is not None:
        if not _is_int(queued) or queued < 1:
            raise ValidationError(
                "must be a whole number of messages, at least 1 (null: from the spool)",
                source=source,
                field="broker.max_queued_messages",
            )
        changes["max_queued_messages"] = queued
    autosave = value.get("autosave_changes", 1)
    if not _is_int(autosave) or autosave < 1:
        raise ValidationError(
            "must be a whole number of changes, at least 1 (1: save after every change)",
            source=source,
            field="broker.autosave_changes",
        )
    changes["autosave_changes"] = autosave
    return BrokerSettings(**changes)


def check_prefix(value: Any, *, source: str | None = None, field: str = "kit_topic_prefix") -> str:
    """A kit topic prefix: topic levels of letters, digits, ``_ . -``; no wildcards."""
    if not isinstance(value, str) or not all(_PREFIX_LEVEL.match(p) for p in value.split("/")):
        raise ValidationError(
            f"{value!r} is not a topic prefix: levels of letters, digits, '_', '.' or '-' "
            "separated by '/' (e.g. kits)",
            source=source,
            field=field,
        )
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def queue_limits(stream_bytes: Iterable[int], configured: int | None) -> tuple[int, int]:
    """``(max_queued_messages, max_queued_bytes)`` for the streams the bridge stores into.

    The broker may hold as much as those streams can: once they are full the bridge stops
    acknowledging, and the broker's queue is what holds kits' readings meanwhile.
    """
    total = sum(stream_bytes)
    if total == 0:
        return configured or DEFAULT_QUEUE_MESSAGES, 0
    return configured or max(1000, total // MIN_RECORD_BYTES), total


# --- configuration files (pure) ----------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class RenderedPaths:
    """Where the files Mosquitto reads are."""

    data_dir: Path
    ca: Path
    cert: Path
    key: Path

    @property
    def kit_acl(self) -> Path:
        return self.data_dir / "kits.acl"

    @property
    def agent_acl(self) -> Path:
        return self.data_dir / "agent.acl"

    @property
    def password_file(self) -> Path:
        return self.data_dir / "agent.passwd"


def _token(value: str, name: str) -> str:
    if not _TOKEN.match(value):
        raise ValidationError(
            f"{value!r} must be free of spaces (mosquitto.conf reads one token)",
            source="hub broker",
            field=name,
        )
    return value


def render_config(
    settings: BrokerSettings,
    paths: RenderedPaths,
    *,
    port: int,
    service_port: int,
    max_queued_messages: int,
    max_queued_bytes: int,
    run_as: str | None = None,
) -> str:
    """``mosquitto.conf`` for the hub broker, on chosen ports."""
    data = _token(str(paths.data_dir), "data_dir")
    if not (0 < port < 65536 and 0 < service_port < 65536) or port == service_port:
        raise ValidationError(
            f"ports {port} and {service_port} must be two different ports",
            source="hub broker",
            field="port",
        )
    return "\n".join(
        [
            "# Written by edgeloop (edgeloop.edge.hub_broker); edits are overwritten.",
            "per_listener_settings true",
            *([f"user {_token(run_as, 'run_as')}"] if run_as else []),
            "",
            "# Every change saved at once: queued readings survive a restart.",
            "persistence true",
            f"persistence_location {data}/",
            "persistence_file mosquitto.db",
            "autosave_on_changes true",
            f"autosave_interval {settings.autosave_changes}",
            "# Caps from the spool's streams: the spool refuses before the broker drops.",
            f"max_queued_messages {max_queued_messages}",
            f"max_queued_bytes {max_queued_bytes}",
            f"max_packet_size {MAX_PACKET}",
            "set_tcp_nodelay true",
            "",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",  # not information: every save of the database logs a line
            "log_timestamp_format %Y-%m-%dT%H:%M:%S",
            "connection_messages true",
            "",
            "# Kits: mutual TLS; the certificate's CN is the username and the client id.",
            f"listener {port} {_token(settings.host, 'host')}",
            "protocol mqtt",
            f"cafile {_token(str(paths.ca), 'ca')}",
            f"certfile {_token(str(paths.cert), 'cert')}",
            f"keyfile {_token(str(paths.key), 'key')}",
            "require_certificate true",
            "use_identity_as_username true",
            "use_username_as_clientid true",
            "tls_version tlsv1.2",
            "allow_anonymous false",
            f"acl_file {paths.kit_acl}",
            "",
            "# The agent's bridge: loopback only, one user, every topic.",
            f"listener {service_port} {SERVICE_HOST}",
            "protocol mqtt",
            "allow_anonymous false",
            f"password_file {paths.password_file}",
            f"acl_file {paths.agent_acl}",
            "",
        ]
    )


def render_kit_acl(prefix: str) -> str:
    """The kits' ACL: each kit reads and writes ``prefix/<its CN>/#``, nothing else."""
    check_prefix(prefix)
    return (
        "# Written by edgeloop (edgeloop.edge.hub_broker); edits are overwritten.\n"
        "# %u is the kit's certificate CN, which is also its client id.\n"
        f"pattern readwrite {prefix}/%u/#\n"
    )


def render_agent_acl(user: str = AGENT_USER) -> str:
    """The loopback listener's ACL: the agent's user may use every topic."""
    return f"user {_token(user, 'user')}\ntopic readwrite #\n"


def password_line(user: str, password: str, *, salt: bytes | None = None) -> str:
    """One ``password_file`` line in Mosquitto 2.0's format (PBKDF2-SHA512, ``$7$``)."""
    salt = salt if salt is not None else secrets.token_bytes(12)
    rounds = 101
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, rounds)
    b64 = base64.b64encode
    return f"{user}:$7${rounds}${b64(salt).decode()}${b64(digest).decode()}\n"
