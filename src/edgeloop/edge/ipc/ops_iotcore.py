"""PublishToIoTCore and SubscribeToIoTCore: components' MQTT traffic with AWS IoT Core.

The hub's cloud connection is behind the ``CloudLink`` protocol defined here. A hub
without one refuses both operations with a ServiceError that says so: a message is never
accepted and then dropped. As in the Greengrass nucleus (``MqttProxyIPCAgent``), calls are
authorized under ``aws.greengrass.ipc.mqttproxy`` on the topic or filter, and a request
without ``qos`` means AT_LEAST_ONCE.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from edgeloop.core.errors import ValidationError
from edgeloop.core.topics import validate_topic_name
from edgeloop.edge.ipc import args
from edgeloop.edge.ipc.authz import MQTT_PROXY
from edgeloop.edge.ipc.context import IpcContext
from edgeloop.edge.ipc.server import InvalidArgumentsError, Operation, ServiceError, Stream

log = logging.getLogger("edgeloop.ipc.iotcore")

CLOUD_TIMEOUT = 30.0  # seconds to wait for the cloud link to take a publish or subscribe
QUEUE_LIMIT = 1024  # messages held for one slow subscriber before the oldest is dropped
_QOS = {"0": 0, "1": 1}
_PAYLOAD_FORMATS = ("0", "1")  # BYTES, UTF8


@dataclass(frozen=True, kw_only=True)
class MqttProperties:
    """The MQTT 5 properties a component may set (MQTTMessage / PublishToIoTCoreRequest)."""

    user_properties: tuple[tuple[str, str], ...] = ()
    message_expiry_interval_seconds: int | None = None
    correlation_data: bytes | None = None
    response_topic: str | None = None
    payload_format_utf8: bool | None = None
    content_type: str | None = None


@dataclass(frozen=True)
class CloudMessage:
    """One message received from AWS IoT Core."""

    topic: str
    payload: bytes
    retain: bool = False
    properties: MqttProperties | None = None


Unsubscribe = Callable[[], Awaitable[None]]


class CloudLink(Protocol):
    """The hub's MQTT connection to AWS IoT Core, as IPC operations use it."""

    async def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int,
        retain: bool,
        *,
        properties: MqttProperties | None = None,
    ) -> None:
        """Return once the message is accepted (sent, or spooled for sending).

        Raise when it is not; the caller reports the failure to the component.
        """
        ...

    async def subscribe(
        self, topic_filter: str, qos: int, callback: Callable[[CloudMessage], None]
    ) -> Unsubscribe:
        """Subscribe; ``callback`` is called on the event loop for each message, and must
        not block. Returns the coroutine function that ends this one subscription."""
        ...


def _qos(body: dict[str, Any]) -> int:
    qos = body.get("qos")
    if qos is None:
        return 1
    if qos not in _QOS:
        raise InvalidArgumentsError(
            f"qos must be '0' (AT_MOST_ONCE) or '1' (AT_LEAST_ONCE), not {qos!r}"
        )
    return _QOS[qos]


def _blob(body: dict[str, Any], field: str) -> bytes | None:
    raw = body.get(field)
    return None if raw is None else args.blob(raw, field)


def _properties(body: dict[str, Any]) -> MqttProperties | None:
    user = body.get("userProperties")
    pairs: list[tuple[str, str]] = []
    if user is not None:
        if not isinstance(user, list):
            raise InvalidArgumentsError("userProperties must be a list of {key, value}")
        for item in user:
            if (
                not isinstance(item, dict)
                or not isinstance(item.get("key"), str)
                or not isinstance(item.get("value"), str)
            ):
                raise InvalidArgumentsError("each userProperties item needs a key and a value")
            pairs.append((item["key"], item["value"]))
    expiry = body.get("messageExpiryIntervalSeconds")
    if expiry is not None and (
        isinstance(expiry, bool) or not isinstance(expiry, int) or expiry < 0
    ):
        raise InvalidArgumentsError("messageExpiryIntervalSeconds must be a non-negative integer")
    response_topic = body.get("responseTopic")
    if response_topic is not None:
        try:
            validate_topic_name(response_topic)
        except ValidationError as err:
            raise InvalidArgumentsError(f"responseTopic {response_topic!r}: {err.reason}") from err
    payload_format = body.get("payloadFormat")
    if payload_format is not None and payload_format not in _PAYLOAD_FORMATS:
        raise InvalidArgumentsError("payloadFormat must be '0' (BYTES) or '1' (UTF8)")
    content_type = body.get("contentType")
    if content_type is not None and not isinstance(content_type, str):
        raise InvalidArgumentsError("contentType must be a string")
    properties = MqttProperties(
        user_properties=tuple(pairs),
        message_expiry_interval_seconds=expiry,
        correlation_data=_blob(body, "correlationData"),
        response_topic=response_topic,
        payload_format_utf8=None if payload_format is None else payload_format == "1",
        content_type=content_type,
    )
    return properties if properties != MqttProperties() else None


def mqtt_message(message: CloudMessage) -> dict[str, Any]:
    """The MQTTMessage shape of a received message, as JSON (unset members left out)."""
    out: dict[str, Any] = {
        "topicName": message.topic,
        "payload": base64.b64encode(message.payload).decode(),
        "retain": message.retain,
    }
    props = message.properties
    if props is None:
        return out
    if props.user_properties:
        out["userProperties"] = [{"key": k, "value": v} for k, v in props.user_properties]
    if props.message_expiry_interval_seconds is not None:
        out["messageExpiryIntervalSeconds"] = props.message_expiry_interval_seconds
    if props.correlation_data is not None:
        out["correlationData"] = base64.b64encode(props.correlation_data).decode()
    if props.response_topic is not None:
        out["responseTopic"] = props.response_topic
    if props.payload_format_utf8 is not None:
        out["payloadFormat"] = "1" if props.payload_format_utf8 else "0"
    if props.content_type is not None:
        out["contentType"] = props.content_type
    return out


def _no_cloud(operation: str, topic: str) -> ServiceError:
    verb = "published" if operation == "PublishToIoTCore" else "subscribed"
    return ServiceError(
        f"{operation} on {topic!r} failed: this hub has no cloud connection configured, so "
        f"the message was NOT accepted and nothing was {verb}. Configure the hub's AWS IoT "
        "Core connection, or use PublishToTopic/SubscribeToTopic for local messages."
    )


def operations(ctx: IpcContext, cloud: CloudLink | None) -> list[Operation]:
    """The AWS IoT Core MQTT operations; without ``cloud`` both refuse every call."""

    async def publish(stream: Stream, body: dict[str, Any]) -> dict[str, Any]:
        topic = args.topic(body, "topicName", is_filter=False)
        ctx.authorizer.check(stream.component, MQTT_PROXY, "PublishToIoTCore", topic)
        qos = _qos(body)
        payload = _blob(body, "payload") or b""
        retain = body.get("retain") is True
        properties = _properties(body)
        if cloud is None:
            raise _no_cloud("PublishToIoTCore", topic)
        try:
            async with asyncio.timeout(CLOUD_TIMEOUT):
                await cloud.publish(topic, payload, qos, retain, properties=properties)
        except TimeoutError as err:
            raise ServiceError(
                f"PublishToIoTCore on {topic!r}: the cloud connection did not take the message "
                f"within {CLOUD_TIMEOUT:g} s; it was NOT published"
            ) from err
        except Exception as err:
            raise ServiceError(
                f"PublishToIoTCore on {topic!r} failed: {err}; the message was NOT published"
            ) from err
        return {}

    async def subscribe(stream: Stream, body: dict[str, Any]) -> dict[str, Any]:
        topic_filter = args.topic(body, "topicName", is_filter=True)
        ctx.authorizer.check(stream.component, MQTT_PROXY, "SubscribeToIoTCore", topic_filter)
        qos = _qos(body)
        if cloud is None:
            raise _no_cloud("SubscribeToIoTCore", topic_filter)
        forwarder = _Forwarder(stream, topic_filter)
        try:
            async with asyncio.timeout(CLOUD_TIMEOUT):
                unsubscribe = await cloud.subscribe(topic_filter, qos, forwarder.offer)
        except TimeoutError as err:
            raise ServiceError(
                f"SubscribeToIoTCore on {topic_filter!r}: AWS IoT Core did not confirm the "
                f"subscription within {CLOUD_TIMEOUT:g} s"
            ) from err
        except Exception as err:
            raise ServiceError(f"SubscribeToIoTCore on {topic_filter!r} failed: {err}") from err
        if stream.closed:  # the component went away while we subscribed
            await _unsubscribe(unsubscribe, topic_filter)
            return {}
        forwarder.unsubscribe = unsubscribe
        stream.on_close(forwarder.close)
        # Messages that arrive meanwhile wait in the queue: the client takes the first
        # message on the stream as the response, so no event may overtake it.
        stream.after_response(forwarder.start)
        return {}

    return [
        Operation("PublishToIoTCore", publish),
        Operation("SubscribeToIoTCore", subscribe, streaming=True),
    ]


async def _unsubscribe(unsubscribe: Unsubscribe, topic_filter: str) -> None:
    try:
        async with asyncio.timeout(CLOUD_TIMEOUT):
            await unsubscribe()
    except Exception:
        log.exception("could not unsubscribe from %r in AWS IoT Core", topic_filter)


class _Forwarder:
    """Hands one subscription's cloud messages to its stream, never blocking the link.

    A subscriber that cannot keep up loses its OLDEST queued messages first, as the local
    pub/sub router does, and the count is logged.
    """

    def __init__(self, stream: Stream, topic_filter: str) -> None:
        self.stream = stream
        self.topic_filter = topic_filter
        self.unsubscribe: Unsubscribe | None = None
        self.dropped = 0
        self._queue: asyncio.Queue[CloudMessage] = asyncio.Queue(maxsize=QUEUE_LIMIT)
        self._task: asyncio.Task[None] | None = None

    def offer(self, message: CloudMessage) -> None:
        if self.stream.closed:
            return
        if self._queue.full():
            self._queue.get_nowait()
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning(
                    "%s is not keeping up with %s from AWS IoT Core: %d message(s) dropped",
                    self.stream.component,
                    self.topic_filter,
                    self.dropped,
                )
        self._queue.put_nowait(message)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"iotcore:{self.stream.component}"
        )

    async def _run(self) -> None:
        while True:
            message = await self._queue.get()
            try:
                await self.stream.send_event("IoTCoreMessage", {"message": mqtt_message(message)})
            except (ConnectionError, OSError):
                return  # the stream or connection is gone; its close unsubscribes

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        unsubscribe, self.unsubscribe = self.unsubscribe, None
        if unsubscribe is not None:
            await _unsubscribe(unsubscribe, self.topic_filter)
