"""The bridge's topic mappings described as data: the ``bridge`` section of ``agent.json``,
in the configuration form of Greengrass's ``aws.greengrass.clientdevices.mqtt.Bridge``
(``edgeloop.edge.bridge`` runs them)::

    "bridge": {
      "mqttTopicMapping": {
        "KitsToStream": {"topic": "kits/+/telemetry", "source": "LocalMqtt",
                         "target": "Stream:telemetry"},
        "KitsToComponents": {"topic": "kits/+/telemetry", "source": "LocalMqtt",
                             "target": "Pubsub", "targetTopicPrefix": "hub/"},
        "AlertsToKits": {"topic": "alerts/#", "source": "Pubsub", "target": "LocalMqtt"},
        "StatusToCloud": {"topic": "kits/+/status", "source": "LocalMqtt",
                          "target": "IotCore", "targetTopicPrefix": "edgeloop/things/hub-1/"}
      }
    }

``source`` and ``target`` are Greengrass's ``LocalMqtt`` (the hub broker,
``edgeloop.edge.hub_broker``), ``Pubsub`` (local IPC publish/subscribe) and ``IotCore`` (the
hub's cloud connection), plus edgeloop's own target ``Stream:<name>``: the spool stream
``<name>`` (declared under ``streams``), from which the exporters ship to the cloud's lake:
durable store-and-forward. A target topic is ``targetTopicPrefix`` + the source topic (no
prefix for streams). A source and its target differ. Unknown keys are errors, named.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from edgeloop.core.errors import ValidationError
from edgeloop.core.topics import validate_topic_filter
from edgeloop.edge.spool_config import DEAD_LETTER, StreamConfig

__all__ = [
    "STREAM_PREFIX",
    "BridgeConfig",
    "Endpoint",
    "Mapping",
    "parse_bridge",
    "stream_bytes",
]

STREAM_PREFIX = "Stream:"


class Endpoint(StrEnum):
    """Where a mapping takes messages from, or puts them."""

    LOCAL_MQTT = "LocalMqtt"
    PUBSUB = "Pubsub"
    IOT_CORE = "IotCore"
    STREAM = "Stream"  # edgeloop's: a spool stream (targets only)


@dataclass(frozen=True, kw_only=True)
class Mapping:
    """One entry of ``mqttTopicMapping``."""

    name: str
    topic: str
    source: Endpoint
    target: Endpoint
    stream: str | None = None  # the stream of a Stream target
    target_topic_prefix: str = ""

    @property
    def target_label(self) -> str:
        """The target as configured (``Stream:<name>`` for streams)."""
        return f"{STREAM_PREFIX}{self.stream}" if self.target is Endpoint.STREAM else self.target

    def to_json(self) -> dict[str, Any]:
        """The mapping's configuration form."""
        body = {"topic": self.topic, "source": self.source.value, "target": self.target_label}
        if self.target_topic_prefix:
            body["targetTopicPrefix"] = self.target_topic_prefix
        return body


@dataclass(frozen=True)
class BridgeConfig:
    """The bridge's configuration: its topic mappings, in the order given."""

    mappings: tuple[Mapping, ...] = ()

    def streams(self) -> list[str]:
        """The spool streams the bridge appends to."""
        return sorted({m.stream for m in self.mappings if m.stream is not None})

    def uses(self, endpoint: Endpoint) -> bool:
        """Whether any mapping has ``endpoint`` as its source or target."""
        return any(endpoint in (m.source, m.target) for m in self.mappings)


_MAPPING_KEYS = ("topic", "source", "target", "targetTopicPrefix")
_SOURCES = (Endpoint.LOCAL_MQTT, Endpoint.PUBSUB, Endpoint.IOT_CORE)


def parse_bridge(value: Any, *, source: str) -> BridgeConfig:
    """The ``bridge`` section: ``{"mqttTopicMapping": {NAME: {...}}}``, validated."""
    shape = '{"mqttTopicMapping": {"NAME": {"topic": ..., "source": ..., "target": ...}}}'
    if not isinstance(value, dict):
        raise ValidationError(f"must be an object: {shape}", source=source, field="bridge")
    for key in value:
        if key != "mqttTopicMapping":
            raise ValidationError(
                f"unknown key; the bridge takes {shape}", source=source, field=f"bridge.{key}"
            )
    table = value.get("mqttTopicMapping", {})
    if not isinstance(table, dict):
        raise ValidationError(
            "must map names to mappings", source=source, field="bridge.mqttTopicMapping"
        )
    mappings = [_mapping(name, body, source) for name, body in table.items()]
    return BridgeConfig(tuple(mappings))


def _mapping(name: str, body: Any, source: str) -> Mapping:
    where = f"bridge.mqttTopicMapping.{name}"
    if not isinstance(body, dict):
        raise ValidationError(
            'must be an object: {"topic": FILTER, "source": ..., "target": ...}',
            source=source,
            field=where,
        )
    for key in body:
        if key not in _MAPPING_KEYS:
            raise ValidationError(
                f"unknown key; known: {', '.join(_MAPPING_KEYS)}",
                source=source,
                field=f"{where}.{key}",
            )
    topic = body.get("topic")
    if not isinstance(topic, str) or not topic:
        raise ValidationError("is required (a topic filter)", source=source, field=f"{where}.topic")
    try:
        validate_topic_filter(topic)
    except ValidationError as err:
        raise ValidationError(err.reason, source=source, field=f"{where}.topic") from None
    names = ", ".join(e.value for e in _SOURCES)
    try:
        src = Endpoint(str(body.get("source")))
        if src not in _SOURCES:
            raise ValueError
    except ValueError:
        raise ValidationError(
            f"{body.get('source')!r} is not one of {names}", source=source, field=f"{where}.source"
        ) from None
    raw_target = body.get("target")
    stream = None
    if isinstance(raw_target, str) and raw_target.startswith(STREAM_PREFIX):
        target, stream = Endpoint.STREAM, raw_target.removeprefix(STREAM_PREFIX)
        if not stream or stream == DEAD_LETTER:
            raise ValidationError(
                f"{raw_target!r} does not name a stream to store into (not {DEAD_LETTER})",
                source=source,
                field=f"{where}.target",
            )
    else:
        try:
            target = Endpoint(str(raw_target))
            if target not in _SOURCES:
                raise ValueError
        except ValueError:
            raise ValidationError(
                f"{raw_target!r} is not one of {names} or {STREAM_PREFIX}<stream>",
                source=source,
                field=f"{where}.target",
            ) from None
    if target is src:
        raise ValidationError(
            f"the target is the source ({src.value}): the message would come back",
            source=source,
            field=f"{where}.target",
        )
    prefix = body.get("targetTopicPrefix", "")
    if not isinstance(prefix, str) or "+" in prefix or "#" in prefix:
        raise ValidationError(
            "must be a topic prefix without wildcards",
            source=source,
            field=f"{where}.targetTopicPrefix",
        )
    if prefix and target is Endpoint.STREAM:
        raise ValidationError(
            "a stream has no topics: leave targetTopicPrefix out",
            source=source,
            field=f"{where}.targetTopicPrefix",
        )
    return Mapping(
        name=name, topic=topic, source=src, target=target, stream=stream, target_topic_prefix=prefix
    )


def stream_bytes(config: BridgeConfig | None, streams: Iterable[StreamConfig]) -> list[int]:
    """The ``max_bytes`` of each stream the bridge stores into (for the broker's caps)."""
    if config is None:
        return []
    wanted = set(config.streams())
    return [s.max_bytes for s in streams if s.name in wanted]
