"""The agent's settings and the folder layout of a hub.

Settings come from ``<root>/agent.json`` when it exists (every key optional), else the
defaults below; ``edgeloop device run`` flags override both. The layout is fixed so that
the CLI can find everything from ``--root`` alone.

The hub's cloud connection is the ``cloud`` key (absent: the hub runs without a cloud)::

    "cloud": {"endpoint": "HOST:PORT", "cert": "hub.pem", "key": "hub.key", "ca": "ca.pem"}

plus optional ``keepalive``, ``session_expiry``, ``queue_limit``, ``sync_interval``,
``reconnect_max`` and ``api`` (see ``CloudConnection``). Relative paths are under the
hub's root. ``api`` is the cloud's HTTP API (``https://cloud.example.com:8440``, or
``http://127.0.0.1:8440`` on the cloud's own machine), where fleet deployments get their
components' download links; over https the hub presents its certificate and trusts ``ca``. The
certificate's subject CN is the thing name the cloud knows the hub by: it becomes the
hub's thing name unless one is set, and a thing name set otherwise must equal it.

A factory image instead ships a claim, and no device certificate yet::

    "cloud": {"endpoint": "HOST:PORT", "ca": "ca.pem",
              "claim": {"cert": "claim.pem", "key": "claim.key", "template": "T",
                        "parameters": {"SerialNumber": "123"}}}

On a start without the device certificate (``cert``, default ``device.cert.pem``; ``key``,
default ``device.key.pem``) the hub provisions itself by claim
(``edgeloop.edge.cloud_link.provision_by_claim``) before anything else, stores its new
certificate and key there (0600) and writes their names into ``agent.json``; once they
exist the claim is not used again. A refusal stops the agent with the cloud's reason.

The hub's durable streams are the ``streams`` key (see ``edgeloop.edge.spool_config``)::

    "streams": {"telemetry": {"max_bytes": 67108864, "full_policy": "reject-new",
                              "ttl_seconds": 604800, "priority": 1}}

and how each goes to the cloud the ``export`` key (see ``edgeloop.edge.export_config``)::

    "export": {"alerts": {"policy": "mqtt"},
               "telemetry": {"policy": "batch", "interval_seconds": 86400}}

The kits' broker is the ``broker`` key (``edgeloop.edge.hub_broker_config``; ``ca``
defaults to ``cloud.ca``) and its topic mappings the ``bridge`` key
(``edgeloop.edge.bridge_config``)::

    "broker": {"port": 8883, "kit_topic_prefix": "kits"},
    "bridge": {"mqttTopicMapping": {"KitsToStream": {"topic": "kits/+/telemetry",
               "source": "LocalMqtt", "target": "Stream:telemetry"}}}
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from edgeloop import __version__
from edgeloop.core.errors import ValidationError
from edgeloop.edge.bridge_config import BridgeConfig, Endpoint, parse_bridge
from edgeloop.edge.export_config import ExportPolicy, check_streams, parse_export
from edgeloop.edge.hub_broker_config import BrokerSettings, parse_broker
from edgeloop.edge.lifecycle import RestartPolicy
from edgeloop.edge.spool_config import StreamConfig, parse_streams

NUCLEUS_VERSION = "2.14.0"
"""The Greengrass nucleus version edgeloop reports itself as, for recipes that ask."""

BUILTIN_COMPONENTS: dict[str, str] = {
    # Components the runtime provides itself: recipes that depend on them still deploy.
    "aws.greengrass.Nucleus": NUCLEUS_VERSION,
    "aws.greengrass.NucleusLite": NUCLEUS_VERSION,
    "aws.greengrass.TokenExchangeService": NUCLEUS_VERSION,
    "aws.greengrass.Cli": NUCLEUS_VERSION,
    "aws.greengrass.ipc.pubsub": NUCLEUS_VERSION,
    # Run by the agent itself when agent.json has a broker / bridge section.
    "edgeloop.HubBroker": __version__,
    "edgeloop.MqttBridge": __version__,
}


def default_root() -> Path:
    """``$EDGELOOP_ROOT``, else a per-user folder."""
    env = os.environ.get("EDGELOOP_ROOT")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "edgeloop" / "hub"


@dataclass(frozen=True)
class Layout:
    """Where things live under a hub's root folder."""

    root: Path

    @property
    def control_socket(self) -> Path:
        """The agent's control socket, which the CLI talks to."""
        return self.root / "agent.sock"

    @property
    def ipc_socket(self) -> Path:
        """The Greengrass IPC socket advertised to components."""
        return self.root / "ipc.socket"

    @property
    def logs(self) -> Path:
        """Per-component logs and the agent's own."""
        return self.root / "logs"

    @property
    def packages(self) -> Path:
        """Recipes and artifacts of every component version the hub has."""
        return self.root / "packages"

    @property
    def recipes(self) -> Path:
        """One normalised recipe file per component version."""
        return self.packages / "recipes"

    @property
    def work(self) -> Path:
        """Each component's working folder, ``{work:path}``."""
        return self.root / "work"

    @property
    def pid_file(self) -> Path:
        """The running agent's pid."""
        return self.root / "agent.pid"

    def component_log(self, name: str) -> Path:
        """The log file of one component."""
        return self.logs / f"{name}.log"


DEVICE_CERT = "device.cert.pem"
DEVICE_KEY = "device.key.pem"


@dataclass(frozen=True, kw_only=True)
class ClaimSettings:
    """A claim certificate that may only ask, through ``template``, for a real identity."""

    cert: Path
    key: Path
    template: str
    parameters: dict[str, str] = field(default_factory=dict)  # e.g. SerialNumber


@dataclass(frozen=True, kw_only=True)
class CloudConnection:
    """How the hub reaches its cloud's MQTT broker (mutual TLS)."""

    host: str
    port: int
    cert: Path
    key: Path
    ca: Path
    keepalive: int = 30  # seconds; the broker sends the last will after 1.5x this
    session_expiry: int = 7 * 24 * 3600  # seconds the broker keeps the session offline
    queue_limit: int = 1000  # messages held while offline before publishes are refused
    sync_interval: float = 300.0  # seconds between full shadow reconciliations; 0: off
    reconnect_max: float = 30.0  # cap of the jittered reconnect backoff, seconds
    claim: ClaimSettings | None = None  # how to get ``cert`` when it does not exist yet
    api: str | None = None  # the cloud's HTTP API, for fleet deployments' downloads

    @property
    def endpoint(self) -> str:
        """``host:port``."""
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class AgentSettings:
    """Tunables of one hub's agent."""

    root: Path
    thing_name: str = field(default_factory=socket.gethostname)
    region: str = "us-east-1"
    restart: RestartPolicy = field(default_factory=RestartPolicy)
    stop_grace: float = 5.0  # seconds between SIGTERM and SIGKILL
    health_window: float = 1.0  # default for deployments that do not say
    deployment_timeout: float = 300.0
    log_max_bytes: int = 1024 * 1024
    log_backups: int = 3
    cloud: CloudConnection | None = None
    export: tuple[ExportPolicy, ...] = ()  # each stream's way to the cloud; default batch
    streams: tuple[StreamConfig, ...] = ()  # the spool's streams; dead-letter always exists
    broker: BrokerSettings | None = None  # the kits' broker (edgeloop.edge.hub_broker)
    bridge: BridgeConfig | None = None  # topic mappings (edgeloop.edge.bridge)

    @property
    def layout(self) -> Layout:
        """The folder layout under ``root``."""
        return Layout(self.root)

    @classmethod
    def load(cls, root: Path, **overrides: Any) -> AgentSettings:
        """Defaults, then ``<root>/agent.json``, then ``overrides`` (None means unset)."""
        settings = cls(root=root)
        path = root / "agent.json"
        named = overrides.get("thing_name") is not None
        if path.exists():
            try:
                doc = json.loads(path.read_text(encoding="utf-8"))
            except ValueError as err:
                raise ValidationError(f"not valid JSON ({err})", source=str(path)) from err
            settings = settings.with_document(doc, source=str(path))
            named = named or "thing_name" in doc
        given = {k: v for k, v in overrides.items() if v is not None}
        settings = replace(settings, **given) if given else settings
        cloud = settings.cloud
        if cloud is not None:
            cn = certificate_cn(cloud.cert, source=str(path))
            if not named:
                settings = replace(settings, thing_name=cn)
            elif cn != settings.thing_name:
                raise ValidationError(
                    f"the certificate {cloud.cert} is thing {cn!r}'s, but this hub's "
                    f"thing name is {settings.thing_name!r}: use that thing's certificate, or "
                    "leave the thing name unset so that it comes from the certificate",
                    source=str(path),
                    field="cloud.cert",
                )
        return settings

    def with_document(self, doc: Any, *, source: str) -> AgentSettings:
        """These settings updated from a JSON document, validated key by key."""
        if not isinstance(doc, dict):
            raise ValidationError("must be a JSON object", source=source)
        known = {f.name: f for f in fields(self) if f.name != "root"}
        changes: dict[str, Any] = {}
        for key, value in doc.items():
            if key == "restart":
                changes["restart"] = _restart_policy(value, source)
            elif key == "streams":
                changes["streams"] = parse_streams(value, source=source)
            elif key == "export":
                streams = doc.get("streams")
                declared = parse_streams(streams, source=source) if streams else self.streams
                changes["export"] = check_streams(
                    parse_export(value, source=source),
                    {stream.name for stream in declared},
                    source=source,
                )
            elif key == "cloud":
                changes["cloud"] = None if value is None else _cloud(value, self.root, source)
            elif key == "broker":
                changes[key] = (
                    None if value is None else parse_broker(value, self.root, source=source)
                )
            elif key == "bridge":
                changes[key] = None if value is None else parse_bridge(value, source=source)
            elif key in known:
                changes[key] = _typed(key, value, type(getattr(self, key)), source)
            else:
                raise ValidationError(
                    f"unknown setting; known: {', '.join(sorted(known))}", source=source, field=key
                )
        return _check_broker_and_bridge(replace(self, **changes), source)


_MIN_INT = {"log_max_bytes": 4096, "restart.broken_after": 1}


def _check_broker_and_bridge(settings: AgentSettings, source: str) -> AgentSettings:
    """What the broker and the bridge need from the rest: a CA for kits' certificates (the
    cloud's by default), the broker for LocalMqtt, the cloud for IotCore, declared streams."""
    broker, bridge = settings.broker, settings.bridge
    if broker is not None and broker.ca is None:
        if settings.cloud is None:
            raise ValidationError(
                "is required on a hub without a cloud section: the CA that signs the kits' "
                "certificates",
                source=source,
                field="broker.ca",
            )
        settings = replace(settings, broker=replace(broker, ca=settings.cloud.ca))
    if bridge is None:
        return settings
    declared = {stream.name for stream in settings.streams}
    for mapping in bridge.mappings:
        where = f"bridge.mqttTopicMapping.{mapping.name}"
        ends = (mapping.source, mapping.target)
        if Endpoint.LOCAL_MQTT in ends and broker is None:
            raise ValidationError(
                "LocalMqtt needs the hub broker: add a broker section", source=source, field=where
            )
        if Endpoint.IOT_CORE in ends and settings.cloud is None:
            raise ValidationError(
                "IotCore needs the cloud connection: add a cloud section",
                source=source,
                field=where,
            )
        if mapping.stream is not None and mapping.stream not in declared:
            raise ValidationError(
                f"stream {mapping.stream!r} is not declared under streams "
                f"(declared: {', '.join(sorted(declared)) or 'none'})",
                source=source,
                field=f"{where}.target",
            )
    return settings


def _typed(key: str, value: Any, kind: type, source: str) -> Any:
    if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
        if value < 0:
            raise ValidationError("must not be negative", source=source, field=key)
        return float(value)
    if isinstance(value, kind) and not isinstance(value, bool):
        if isinstance(value, int) and value < _MIN_INT.get(key, 0):
            raise ValidationError(
                f"must be at least {_MIN_INT.get(key, 0)}", source=source, field=key
            )
        return value
    raise ValidationError(f"must be a {kind.__name__}", source=source, field=key)


def _restart_policy(value: Any, source: str) -> RestartPolicy:
    if not isinstance(value, dict):
        raise ValidationError("must be an object", source=source, field="restart")
    policy = RestartPolicy()
    known = {f.name: f for f in fields(policy)}
    changes: dict[str, Any] = {}
    for key, item in value.items():
        if key not in known:
            raise ValidationError(
                f"unknown key; known: {', '.join(sorted(known))}",
                source=source,
                field=f"restart.{key}",
            )
        changes[key] = _typed(f"restart.{key}", item, type(getattr(policy, key)), source)
    return replace(policy, **changes)


_CLOUD_PATHS = ("cert", "key", "ca")
_CLOUD_NUMBERS: dict[str, type] = {
    "keepalive": int,
    "session_expiry": int,
    "queue_limit": int,
    "sync_interval": float,
    "reconnect_max": float,
}
_MIN_INT.update({"cloud.keepalive": 5, "cloud.queue_limit": 1})


def _cloud(value: Any, root: Path, source: str, *, identity_exists: bool = True) -> CloudConnection:
    """The ``cloud`` key; with ``identity_exists=False`` cert and key may be missing files."""
    if not isinstance(value, dict):
        raise ValidationError(
            'must be an object: {"endpoint": "HOST:PORT", "cert": FILE, "key": FILE, "ca": FILE}',
            source=source,
            field="cloud",
        )
    known = ("endpoint", "claim", "api", *_CLOUD_PATHS, *_CLOUD_NUMBERS)
    for key in value:
        if key not in known:
            raise ValidationError(
                f"unknown key; known: {', '.join(sorted(known))}",
                source=source,
                field=f"cloud.{key}",
            )
    claim = None if value.get("claim") is None else _claim(value["claim"], root, source)
    if claim is not None:
        value = {"cert": DEVICE_CERT, "key": DEVICE_KEY, **value}
    for key in ("endpoint", *_CLOUD_PATHS):
        if not isinstance(value.get(key), str) or not value[key]:
            raise ValidationError("is required (a string)", source=source, field=f"cloud.{key}")
    host, port = parse_endpoint(value["endpoint"], source=source, field="cloud.endpoint")
    paths: dict[str, Path] = {}
    for key in _CLOUD_PATHS:
        paths[key] = _path(value[key], root)
        if (identity_exists or key == "ca") and not paths[key].is_file():
            raise ValidationError(
                f"{paths[key]} is not a file", source=source, field=f"cloud.{key}"
            )
    numbers: dict[str, Any] = {
        key: _typed(f"cloud.{key}", value[key], kind, source)
        for key, kind in _CLOUD_NUMBERS.items()
        if key in value
    }
    api = None if value.get("api") is None else parse_api_url(value["api"], source=source)
    return CloudConnection(
        host=host,
        port=port,
        cert=paths["cert"],
        key=paths["key"],
        ca=paths["ca"],
        claim=claim,
        api=api,
        **numbers,
    )


def parse_api_url(value: Any, *, source: str, field: str = "cloud.api") -> str:
    """The cloud API's base URL (``http(s)://HOST[:PORT]``, any ``/api/v1`` dropped)."""
    from urllib.parse import urlsplit

    shape = "an http:// or https:// URL such as https://cloud.example.com:8440"
    if not isinstance(value, str):
        raise ValidationError(f"must be {shape}", source=source, field=field)
    try:
        parts = urlsplit(value.strip())
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as err:
        raise ValidationError(
            f"{value!r} is not {shape} ({err})", source=source, field=field
        ) from None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query:
        raise ValidationError(f"{value!r} is not {shape}", source=source, field=field)
    path = parts.path.rstrip("/").removesuffix("/api/v1")
    return f"{parts.scheme}://{parts.netloc}{path}"


def _path(value: str, root: Path) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else root / path


def _claim(value: Any, root: Path, source: str) -> ClaimSettings:
    shape = '{"cert": FILE, "key": FILE, "template": NAME, "parameters": {NAME: STRING}}'
    if not isinstance(value, dict):
        raise ValidationError(f"must be an object: {shape}", source=source, field="cloud.claim")
    for key in value:
        if key not in ("cert", "key", "template", "parameters"):
            raise ValidationError(
                f"unknown key; expected {shape}", source=source, field=f"cloud.claim.{key}"
            )
    for key in ("cert", "key", "template"):
        if not isinstance(value.get(key), str) or not value[key]:
            raise ValidationError(
                "is required (a string)", source=source, field=f"cloud.claim.{key}"
            )
    paths = {key: _path(value[key], root) for key in ("cert", "key")}
    for key, path in paths.items():
        if not path.is_file():
            raise ValidationError(
                f"{path} is not a file", source=source, field=f"cloud.claim.{key}"
            )
    parameters = value.get("parameters") or {}
    if not isinstance(parameters, dict) or not all(
        isinstance(item, str) for item in parameters.values()
    ):
        raise ValidationError(
            "must be an object of string values (as AWS fleet provisioning takes them)",
            source=source,
            field="cloud.claim.parameters",
        )
    return ClaimSettings(
        cert=paths["cert"], key=paths["key"], template=value["template"], parameters=parameters
    )


def provision_if_needed(root: Path) -> bool:
    """Provision the hub by claim when ``agent.json`` has a claim and no device certificate
    yet (network I/O: the agent calls this at start, not ``load``); True when it did."""
    path = root / "agent.json"
    if not path.exists():
        return False
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ValidationError(f"not valid JSON ({err})", source=str(path)) from err
    if not _needs_provisioning(doc, root, str(path)):
        return False
    _provision(doc, root, path)
    return True


def _needs_provisioning(doc: Any, root: Path, source: str) -> bool:
    """Whether ``doc`` has a claim and no device certificate yet."""
    value = doc.get("cloud") if isinstance(doc, dict) else None
    if not isinstance(value, dict) or value.get("claim") is None:
        return False
    cloud = _cloud(value, root, source, identity_exists=False)
    return not cloud.cert.exists()


def _provision(doc: dict[str, Any], root: Path, path: Path) -> dict[str, Any]:
    """Provision by claim, then point ``agent.json`` at the new identity; the new document."""
    from edgeloop.edge.cloud_link import provision_by_claim  # loads paho only when needed

    cloud = _cloud(doc["cloud"], root, str(path), identity_exists=False)
    provision_by_claim(cloud)
    updated = {**doc, "cloud": {"cert": DEVICE_CERT, "key": DEVICE_KEY, **doc["cloud"]}}
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(updated, indent=1) + "\n", encoding="utf-8")
    os.replace(temporary, path)
    return updated


def parse_endpoint(endpoint: str, *, source: str, field: str) -> tuple[str, int]:
    """``HOST:PORT`` taken apart; ValidationError naming ``field`` otherwise."""
    host, _, port = endpoint.rpartition(":")
    host = host.strip("[]")  # [::1]:8883
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValidationError(
            f"{endpoint!r} is not HOST:PORT (e.g. cloud.example.com:8883)",
            source=source,
            field=field,
        )
    return host, int(port)


def certificate_cn(path: Path, *, source: str) -> str:
    """The subject common name of the PEM certificate at ``path`` (the hub's thing name)."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as err:
        raise ValidationError(
            f"{path} is not a PEM certificate ({err})", source=source, field="cloud.cert"
        ) from err
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names:
        raise ValidationError(
            f"{path} has no subject CN to name the hub's thing", source=source, field="cloud.cert"
        )
    return str(names[0].value)
