"""An asyncio client for the hub agent's Greengrass IPC (eventstream RPC over a Unix socket).

edgeloop's own components use this instead of ``awsiot.greengrasscoreipc``; it speaks the
same protocol (docs/ipc-protocol.md) through the sans-I/O codec in ``edgeloop.core``, so
this module only moves bytes and matches answers to calls.

Errors::

    EdgeloopError
    └── IpcError                         anything this client raises on purpose
        ├── IpcConnectionError           cannot connect, token refused, connection lost
        ├── IpcTimeoutError              no answer in time (also a TimeoutError)
        └── (modelled errors, sent by the agent on one stream; the connection lives on)
            ├── ServiceError             the agent failed, or does not serve the operation
            ├── UnauthorizedError        no accessControl policy allows the call
            ├── ResourceNotFoundError    no such component, key, shadow, deployment
            ├── InvalidArgumentsError    the request is malformed
            ├── ConflictError            e.g. a stale shadow version
            ├── ComponentNotFoundError
            └── FailedUpdateConditionCheckError

A modelled error the client has no class for arrives as a plain ``IpcError`` whose
``model`` names it. Example::

    async with await IpcClient.connect() as ipc:
        await ipc.publish_json("sensors/furnace/temperature", {"celsius": 61.5})
        async with await ipc.subscribe_topic("alarms/#") as alarms:
            async for message in alarms:
                print(message.topic, message.payload)
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Generic, Literal, Self, TypeVar

from edgeloop.core.eventstream import Decoder, FrameError, HeaderValue, Int32, Message, encode
from edgeloop.core.eventstream_rpc import (
    MESSAGE_FLAGS,
    MESSAGE_TYPE,
    PROTOCOL_VERSION,
    STREAM_ID,
    VERSION,
    MessageFlag,
    MessageType,
    ProtocolError,
    RpcMessage,
    encode_application_message,
    json_body,
    parse,
    ping_response,
    protocol_error,
)
from edgeloop.core.ipc_errors import (
    ComponentNotFoundError,
    ConflictError,
    FailedUpdateConditionCheckError,
    InvalidArgumentsError,
    IpcError,
    ResourceNotFoundError,
    ServiceError,
    UnauthorizedError,
    error_class,
)

__all__ = [
    "DEFAULT_QUEUE_LIMIT",
    "SOCKET_PATH_ENV",
    "TOKEN_ENV",
    "ComponentNotFoundError",
    "ConflictError",
    "FailedUpdateConditionCheckError",
    "InvalidArgumentsError",
    "IpcClient",
    "IpcConnectionError",
    "IpcError",
    "IpcTimeoutError",
    "ResourceNotFoundError",
    "ServiceError",
    "Subscription",
    "TopicMessage",
    "UnauthorizedError",
]

log = logging.getLogger("edgeloop.sdk.ipc")

SOCKET_PATH_ENV: Final = "AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH_FOR_COMPONENT"
TOKEN_ENV: Final = "SVCUID"
DEFAULT_QUEUE_LIMIT: Final = 1024
PREFIX: Final = "aws.greengrass#"
_READ_CHUNK: Final = 256 * 1024
_MAX_STREAM_ID: Final = 2**31 - 1

T = TypeVar("T")


# -- errors ------------------------------------------------------------------------------
class IpcConnectionError(IpcError):
    """The client is not connected: refused, unreachable, lost, or closed."""


class IpcTimeoutError(IpcError, TimeoutError):
    """The agent did not answer a call in time; the connection may still be fine."""


def _modelled_error(rpc: RpcMessage) -> IpcError:
    model = rpc.model_type or ""
    try:
        body = rpc.json()
    except ProtocolError:
        body = {"message": rpc.payload.decode("utf-8", "replace")}
    if not isinstance(body, dict):
        body = {"message": str(body)}
    fields = dict(body)
    message = str(fields.pop("message", "") or model or "error without a message")
    cls = error_class(model)
    if cls is not None:
        return cls(message, fields)
    err = IpcError(f"{model or 'an unnamed error'}: {message}", fields)
    err.model = model.removeprefix(PREFIX)
    return err


# -- wire helpers ------------------------------------------------------------------------
def _rpc_headers(kind: MessageType, flags: MessageFlag, stream_id: int) -> dict[str, HeaderValue]:
    return {
        MESSAGE_TYPE: Int32(int(kind)),
        MESSAGE_FLAGS: Int32(int(flags)),
        STREAM_ID: Int32(stream_id),
    }


def _connect_message(token: str) -> Message:
    headers = _rpc_headers(MessageType.CONNECT, MessageFlag.NONE, 0)
    headers[VERSION] = PROTOCOL_VERSION
    return Message(headers, json.dumps({"authToken": token}).encode("utf-8"))


def _terminate_message(stream_id: int) -> Message:
    # Exactly what the SDK sends from operation.close(): the three RPC headers, no body.
    return Message(
        _rpc_headers(MessageType.APPLICATION_MESSAGE, MessageFlag.TERMINATE_STREAM, stream_id)
    )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: Any, what: str) -> bytes:
    if not isinstance(text, str):
        raise IpcError(f"{what} is not base64 text")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as err:
        raise IpcError(f"{what} is not valid base64") from err


def _json_document(raw: bytes, what: str) -> dict[str, Any]:
    if not raw:
        return {}
    try:
        document = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise IpcError(f"{what} is not JSON: {err}") from err
    if not isinstance(document, dict):
        raise IpcError(f"{what} is not a JSON object")
    return document


def _shadow_request(thing: str, name: str) -> dict[str, Any]:
    request = {"thingName": thing}
    if name:
        request["shadowName"] = name
    return request


def _shadow_payload(response: Mapping[str, Any], operation: str) -> dict[str, Any]:
    raw = _unb64(response.get("payload") or "", f"{operation} payload")
    return _json_document(raw, f"{operation} payload")


# -- streams -----------------------------------------------------------------------------
class _Call:
    """A request/response stream: waits for its one answer."""

    def __init__(self, operation: str, future: asyncio.Future[dict[str, Any]]) -> None:
        self.operation = operation
        self.future = future

    def on_message(self, rpc: RpcMessage) -> bool:
        """Take one message; True when the stream is finished."""
        if not self.future.done():
            try:
                self.future.set_result(_response(rpc, self.operation))
            except IpcError as err:
                self.future.set_exception(err)
        return True

    def on_error(self, err: IpcError) -> None:
        if not self.future.done():
            self.future.set_exception(err)


def _response(rpc: RpcMessage, operation: str) -> dict[str, Any]:
    if rpc.message_type is MessageType.APPLICATION_ERROR:
        raise _modelled_error(rpc)
    expected = f"{PREFIX}{operation}Response"
    if rpc.model_type != expected:
        raise IpcError(f"{operation}: the agent answered {rpc.model_type!r}, not {expected!r}")
    try:
        body = rpc.json()
    except ProtocolError as err:
        raise IpcError(f"{operation}: the response is not JSON") from err
    if not isinstance(body, dict):
        raise IpcError(f"{operation}: the response is not a JSON object")
    return body


class _Ended:
    """Marks the end of a subscription's events, with the error that ended it, if any."""

    def __init__(self, error: IpcError | None) -> None:
        self.error = error


class Subscription(Generic[T]):
    """The events of one streaming operation, as an async iterator.

    Delivery policy: events wait in a bounded queue (``max_queue``, default 1024) until
    the iterator takes them, so the connection's reader never waits for a slow consumer
    and other calls and subscriptions on the connection keep flowing. When the queue is
    full, the OLDEST queued event is dropped to make room for the new one, and
    ``dropped`` counts how many were lost (the newest reading is worth more than a stale
    one). The iterator ends when the subscription is closed (``close()``, or the agent
    ends the stream) after the queued events are taken; if the agent ends it with an
    error, or the connection is lost, that ``IpcError`` is raised once the queue is empty.
    """

    def __init__(
        self,
        client: IpcClient,
        stream_id: int,
        operation: str,
        convert: Callable[[dict[str, Any]], T],
        max_queue: int,
    ) -> None:
        if max_queue < 1:
            raise ValueError(f"max_queue must be at least 1, got {max_queue}")
        self.stream_id = stream_id
        self.operation = operation
        self.max_queue = max_queue
        #: Events dropped because the queue was full.
        self.dropped = 0
        #: Events received from the agent (including dropped ones).
        self.received = 0
        self._client = client
        self._convert = convert
        self._queue: deque[RpcMessage] = deque()
        self._ended: _Ended | None = None
        self._closed_by_us = False
        self._waiter: asyncio.Future[None] | None = None
        self._loop = asyncio.get_running_loop()
        self.response: asyncio.Future[dict[str, Any]] = self._loop.create_future()

    @property
    def pending(self) -> int:
        """Events queued and not yet taken."""
        return len(self._queue)

    @property
    def closed(self) -> bool:
        """True once no more events will arrive."""
        return self._ended is not None

    # The reader task calls these -------------------------------------------------------
    def on_message(self, rpc: RpcMessage) -> bool:
        if not self.response.done():
            try:
                self.response.set_result(_response(rpc, self.operation))
            except IpcError as err:
                self.response.set_exception(err)
                self._end(err)
                return True
            if rpc.terminates_stream:
                self._end(None)
            return rpc.terminates_stream
        if rpc.message_type is MessageType.APPLICATION_ERROR:
            self._end(_modelled_error(rpc))
            return True
        # A terminating message without a model type only ends the stream.
        if rpc.model_type is not None or not rpc.terminates_stream:
            self.received += 1
            if len(self._queue) >= self.max_queue:
                self._queue.popleft()
                self.dropped += 1
                if self.dropped == 1 or self.dropped % 1000 == 0:
                    log.warning(
                        "%s stream %d: consumer is not keeping up, %d event(s) dropped",
                        self.operation,
                        self.stream_id,
                        self.dropped,
                    )
            self._queue.append(rpc)
            self._wake()
        if rpc.terminates_stream:
            self._end(None)
        return rpc.terminates_stream

    def on_error(self, err: IpcError) -> None:
        if not self.response.done():
            self.response.set_exception(err)
        self._end(err)

    def _end(self, error: IpcError | None) -> None:
        if self._ended is None:
            self._ended = _Ended(error)
            self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # The consumer calls these ----------------------------------------------------------
    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> T:
        while True:
            if self._queue:
                rpc = self._queue.popleft()
                return self._convert(_event_body(rpc, self.operation))
            ended = self._ended
            if ended is not None:
                if ended.error is not None:
                    error, ended.error = ended.error, None  # raised once, then StopAsync…
                    raise error
                raise StopAsyncIteration
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    async def close(self) -> None:
        """Stop the events: tell the agent (an empty TERMINATE_STREAM message) and end."""
        if self._closed_by_us:
            return
        self._closed_by_us = True
        self._queue.clear()
        if self._ended is None:
            self._client._forget(self.stream_id)
            with contextlib.suppress(IpcConnectionError):
                await self._client._send(_terminate_message(self.stream_id))
        self._end(None)
        assert self._ended is not None
        self._ended.error = None  # closed on purpose: the iterator just ends

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


def _event_body(rpc: RpcMessage, operation: str) -> dict[str, Any]:
    try:
        body = rpc.json()
    except ProtocolError as err:
        raise IpcError(f"{operation}: an event of stream {rpc.stream_id} is not JSON") from err
    if not isinstance(body, dict):
        raise IpcError(f"{operation}: an event of stream {rpc.stream_id} is not a JSON object")
    return body


@dataclass(frozen=True, slots=True)
class TopicMessage:
    """One message of a local topic: a JSON value, or bytes when ``binary``."""

    topic: str
    payload: Any
    binary: bool


def _topic_message(event: dict[str, Any]) -> TopicMessage:
    json_message = event.get("jsonMessage")
    if isinstance(json_message, dict):
        context = json_message.get("context") or {}
        return TopicMessage(str(context.get("topic", "")), json_message.get("message"), False)
    binary_message = event.get("binaryMessage")
    if isinstance(binary_message, dict):
        context = binary_message.get("context") or {}
        payload = _unb64(binary_message.get("message") or "", "binaryMessage.message")
        return TopicMessage(str(context.get("topic", "")), payload, True)
    raise IpcError("SubscribeToTopic: an event has neither jsonMessage nor binaryMessage")


def _identity(event: dict[str, Any]) -> dict[str, Any]:
    return event


_Stream = _Call | Subscription[Any]


# -- the client --------------------------------------------------------------------------
class IpcClient:
    """One connection to the agent's IPC socket; make it with ``await IpcClient.connect()``.

    Calls and subscriptions may run concurrently from any number of tasks on the loop
    that connected. One named reader task decodes frames and routes them by stream id.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        decoder: Decoder,
        socket_path: str,
    ) -> None:
        self.socket_path = socket_path
        self._reader = reader
        self._writer = writer
        self._decoder = decoder
        self._streams: dict[int, _Stream] = {}
        self._last_stream_id = 0
        self._failure: IpcConnectionError | None = None
        self._reader_task: asyncio.Task[None] | None = None

    @classmethod
    async def connect(
        cls,
        socket_path: str | os.PathLike[str] | None = None,
        token: str | None = None,
        *,
        timeout: float = 10,
    ) -> IpcClient:
        """Connect and authenticate; by default as the agent told this component to.

        The socket path and token default to the environment variables the agent sets
        (``AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH_FOR_COMPONENT`` and ``SVCUID``).
        """
        path = os.fspath(socket_path) if socket_path is not None else _env(SOCKET_PATH_ENV)
        auth_token = token if token is not None else _env(TOKEN_ENV)
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await _open(path)
                try:
                    decoder = await _handshake(reader, writer, auth_token, path)
                except BaseException:
                    writer.close()
                    raise
        except TimeoutError as err:
            raise IpcConnectionError(
                f"the agent at {path} did not complete the IPC handshake in {timeout:g} s"
            ) from err
        client = cls(reader, writer, decoder, path)
        client._reader_task = asyncio.get_running_loop().create_task(
            client._read_loop(), name=f"edgeloop-ipc-reader:{path}"
        )
        return client

    # -- lifecycle -------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        """True until the connection is lost or closed."""
        return self._failure is None

    async def close(self) -> None:
        """Close the connection: pending calls fail, subscriptions' iterators just end."""
        if self._failure is None:
            self._fail(IpcConnectionError("the IPC client was closed"), subscriptions_too=False)
        task, self._reader_task = self._reader_task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._writer.close()
        with contextlib.suppress(OSError, RuntimeError):
            await self._writer.wait_closed()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- generic calls ---------------------------------------------------------------------
    async def call(
        self, operation: str, request: Mapping[str, Any], *, timeout: float = 10
    ) -> dict[str, Any]:
        """Call a request/response operation (e.g. ``"PublishToTopic"``) and return its answer.

        ``request`` is the request shape as the protocol has it: camelCase members, blobs
        base64. Modelled errors raise their ``IpcError`` subclass.
        """
        operation = operation.removeprefix(PREFIX)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        stream_id = await self._open_stream(_Call(operation, future), operation, request)
        try:
            async with asyncio.timeout(timeout):
                return await future
        except TimeoutError as err:
            if isinstance(err, IpcError):
                raise
            raise IpcTimeoutError(
                f"{operation}: no answer from the agent in {timeout:g} s (stream {stream_id})"
            ) from err
        finally:
            self._forget(stream_id)

    async def subscribe(
        self,
        operation: str,
        request: Mapping[str, Any],
        *,
        timeout: float = 10,
        max_queue: int = DEFAULT_QUEUE_LIMIT,
    ) -> Subscription[dict[str, Any]]:
        """Start a streaming operation (``"SubscribeTo…"``); its events are the raw dicts."""
        return await self._subscribe(operation, request, _identity, timeout, max_queue)

    async def _subscribe(
        self,
        operation: str,
        request: Mapping[str, Any],
        convert: Callable[[dict[str, Any]], T],
        timeout: float,
        max_queue: int,
    ) -> Subscription[T]:
        operation = operation.removeprefix(PREFIX)
        # The id is a placeholder until _open_stream gives the real one, synchronously.
        subscription = Subscription(self, 0, operation, convert, max_queue)
        subscription.stream_id = await self._open_stream(subscription, operation, request)
        try:
            async with asyncio.timeout(timeout):
                await subscription.response
        except TimeoutError as err:
            await subscription.close()
            if isinstance(err, IpcError):
                raise
            raise IpcTimeoutError(
                f"{operation}: no answer from the agent in {timeout:g} s "
                f"(stream {subscription.stream_id})"
            ) from err
        except BaseException:
            await subscription.close()
            raise
        return subscription

    # -- local publish/subscribe -----------------------------------------------------------
    async def publish_json(self, topic: str, obj: Any, *, timeout: float = 10) -> None:
        """Publish any JSON value on a local topic."""
        message = {"jsonMessage": {"message": obj}}
        await self.call(
            "PublishToTopic", {"topic": topic, "publishMessage": message}, timeout=timeout
        )

    async def publish_binary(self, topic: str, data: bytes, *, timeout: float = 10) -> None:
        """Publish bytes on a local topic."""
        message = {"binaryMessage": {"message": _b64(data)}}
        await self.call(
            "PublishToTopic", {"topic": topic, "publishMessage": message}, timeout=timeout
        )

    async def subscribe_topic(
        self,
        topic: str,
        *,
        from_others_only: bool = False,
        timeout: float = 10,
        max_queue: int = DEFAULT_QUEUE_LIMIT,
    ) -> Subscription[TopicMessage]:
        """Subscribe to a local topic filter (MQTT wildcards allowed).

        ``from_others_only`` leaves out this component's own messages
        (``RECEIVE_MESSAGES_FROM_OTHERS``).
        """
        mode = "RECEIVE_MESSAGES_FROM_OTHERS" if from_others_only else "RECEIVE_ALL_MESSAGES"
        request = {"topic": topic, "receiveMode": mode}
        return await self._subscribe(
            "SubscribeToTopic", request, _topic_message, timeout, max_queue
        )

    # -- configuration ---------------------------------------------------------------------
    async def get_configuration(
        self, key_path: Sequence[str] = (), component: str | None = None
    ) -> Any:
        """A component's configuration (this one's by default) at ``key_path``.

        As in Greengrass, a container comes back as its object, and a leaf wrapped in an
        object under its own key: ``get_configuration(["a", "b"])`` → ``{"b": 5}``.
        """
        request: dict[str, Any] = {"keyPath": list(key_path)}
        if component is not None:
            request["componentName"] = component
        return (await self.call("GetConfiguration", request)).get("value")

    async def update_configuration(
        self,
        key_path: Sequence[str],
        value: Mapping[str, Any],
        timestamp: float | None = None,
    ) -> None:
        """Merge ``value`` into this component's configuration at ``key_path``.

        ``timestamp`` (seconds since the epoch, now by default) orders concurrent updates:
        one older than the last update of the same path raises
        FailedUpdateConditionCheckError.
        """
        request = {
            "keyPath": list(key_path),
            "valueToMerge": dict(value),
            "timestamp": time.time() if timestamp is None else timestamp,
        }
        await self.call("UpdateConfiguration", request)

    async def subscribe_configuration(
        self, key_path: Sequence[str] = (), component: str | None = None
    ) -> Subscription[dict[str, Any]]:
        """Events ``{"configurationUpdateEvent": {"componentName", "keyPath"}}`` on change."""
        request: dict[str, Any] = {"keyPath": list(key_path)}
        if component is not None:
            request["componentName"] = component
        return await self.subscribe("SubscribeToConfigurationUpdate", request)

    async def subscribe_validate_configuration(self) -> Subscription[dict[str, Any]]:
        """Events ``{"validateConfigurationUpdateEvent": {"configuration", "deploymentId"}}``."""
        return await self.subscribe("SubscribeToValidateConfigurationUpdates", {})

    async def send_configuration_validity_report(
        self, deployment_id: str, accepted: bool, message: str = ""
    ) -> None:
        """Answer a validation event: accept or reject the deployment's configuration."""
        report: dict[str, Any] = {
            "status": "ACCEPTED" if accepted else "REJECTED",
            "deploymentId": deployment_id,
        }
        if message:
            report["message"] = message
        await self.call("SendConfigurationValidityReport", {"configurationValidityReport": report})

    # -- lifecycle of this component -------------------------------------------------------
    async def update_state(self, state: Literal["RUNNING", "ERRORED"]) -> None:
        """Report this component's state to the agent."""
        if state not in ("RUNNING", "ERRORED"):
            raise ValueError(f"state must be 'RUNNING' or 'ERRORED', not {state!r}")
        await self.call("UpdateState", {"state": state})

    async def subscribe_component_updates(self) -> Subscription[dict[str, Any]]:
        """Events ``{"preUpdateEvent": {...}}`` / ``{"postUpdateEvent": {...}}``."""
        return await self.subscribe("SubscribeToComponentUpdates", {})

    async def defer_component_update(
        self, deployment_id: str, recheck_after_ms: int, message: str = ""
    ) -> None:
        """Ask the agent to hold a pending update for ``recheck_after_ms`` milliseconds."""
        request: dict[str, Any] = {
            "deploymentId": deployment_id,
            "recheckAfterMs": recheck_after_ms,
        }
        if message:
            request["message"] = message
        await self.call("DeferComponentUpdate", request)

    # -- local shadows ---------------------------------------------------------------------
    async def get_thing_shadow(self, thing: str, name: str = "") -> dict[str, Any]:
        """The shadow document (``name`` empty: the classic shadow)."""
        response = await self.call("GetThingShadow", _shadow_request(thing, name))
        return _shadow_payload(response, "GetThingShadow")

    async def update_thing_shadow(
        self, thing: str, doc: Mapping[str, Any], name: str = ""
    ) -> dict[str, Any]:
        """Apply an update document (``{"state": {"reported": ...}}``); returns the accepted one."""
        request = _shadow_request(thing, name)
        request["payload"] = _b64(json.dumps(dict(doc), separators=(",", ":")).encode())
        response = await self.call("UpdateThingShadow", request)
        return _shadow_payload(response, "UpdateThingShadow")

    async def delete_thing_shadow(self, thing: str, name: str = "") -> None:
        """Delete a shadow."""
        await self.call("DeleteThingShadow", _shadow_request(thing, name))

    async def list_named_shadows(self, thing: str) -> list[str]:
        """The names of every named shadow of ``thing`` (all pages)."""
        names: list[str] = []
        token: str | None = None
        while True:
            request: dict[str, Any] = {"thingName": thing}
            if token:
                request["nextToken"] = token
            response = await self.call("ListNamedShadowsForThing", request)
            names.extend(str(n) for n in response.get("results") or [])
            token = response.get("nextToken") or None
            if token is None:
                return names

    # -- AWS IoT Core ----------------------------------------------------------------------
    async def publish_to_iot_core(self, topic: str, payload: bytes, qos: Literal[0, 1] = 1) -> None:
        """Publish to AWS IoT Core through the hub's cloud connection."""
        if qos not in (0, 1):
            raise ValueError(f"qos must be 0 or 1, not {qos!r}")
        request = {"topicName": topic, "payload": _b64(payload), "qos": str(qos)}
        await self.call("PublishToIoTCore", request)

    # -- the connection --------------------------------------------------------------------
    async def _open_stream(
        self, stream: _Stream, operation: str, request: Mapping[str, Any]
    ) -> int:
        if self._failure is not None:
            raise IpcConnectionError(f"{operation}: {self._failure.message}")
        if self._last_stream_id >= _MAX_STREAM_ID:
            raise IpcConnectionError(
                f"{operation}: this connection has used every stream id; connect again"
            )
        frame = encode_application_message(
            self._last_stream_id + 1,
            f"{PREFIX}{operation}Request",
            json_body(request),
            operation=PREFIX + operation,
        )
        # Ids must reach the agent in order: take the id and write with no await between.
        self._last_stream_id += 1
        stream_id = self._last_stream_id
        self._streams[stream_id] = stream
        try:
            await self._write(frame)
        except IpcConnectionError:
            self._streams.pop(stream_id, None)
            raise
        return stream_id

    def _forget(self, stream_id: int) -> None:
        self._streams.pop(stream_id, None)

    async def _send(self, message: Message) -> None:
        await self._write(encode(message))

    async def _write(self, frame: bytes) -> None:
        if self._failure is not None:
            raise IpcConnectionError(self._failure.message)
        try:
            self._writer.write(frame)
            await self._writer.drain()
        except (ConnectionError, OSError, RuntimeError) as err:
            failure = IpcConnectionError(f"lost the connection to the agent at {self.socket_path}")
            self._fail(failure)
            raise failure from err

    async def _read_loop(self) -> None:
        failure: IpcConnectionError
        try:
            while True:
                data = await self._reader.read(_READ_CHUNK)
                if not data:
                    failure = IpcConnectionError(
                        f"the agent at {self.socket_path} closed the connection"
                    )
                    break
                for message in self._decoder.feed(data):
                    self._route(parse(message))
        except _AgentClosed as err:
            failure = IpcConnectionError(str(err))
        except FrameError as err:
            failure = IpcConnectionError(f"the agent sent a frame that cannot be decoded: {err}")
        except ProtocolError as err:
            with contextlib.suppress(ConnectionError, OSError, RuntimeError):
                self._writer.write(encode(protocol_error(str(err))))
            failure = IpcConnectionError(f"the agent broke the IPC protocol: {err}")
        except (ConnectionError, OSError) as err:
            failure = IpcConnectionError(f"lost the connection to the agent: {err}")
        except Exception as err:
            # A bug here must not leave callers waiting forever: fail them all instead.
            log.exception("IPC reader failed")
            failure = IpcConnectionError(f"the IPC client failed: {err!r}")
        self._fail(failure)
        self._writer.close()

    def _route(self, rpc: RpcMessage) -> None:
        if rpc.stream_id == 0:
            kind = rpc.message_type
            if kind is MessageType.PING:
                self._writer.write(encode(ping_response(rpc.payload)))
            elif kind in (MessageType.PROTOCOL_ERROR, MessageType.INTERNAL_ERROR):
                what = "a protocol error" if kind is MessageType.PROTOCOL_ERROR else "a failure"
                try:
                    detail = str(rpc.json().get("message", ""))
                except (ProtocolError, AttributeError):
                    detail = rpc.payload.decode("utf-8", "replace")
                raise _AgentClosed(f"the agent reported {what} and closed: {detail}")
            elif kind is not MessageType.PING_RESPONSE:
                raise ProtocolError(f"unexpected {kind.name} after the handshake")
            return
        stream = self._streams.get(rpc.stream_id)
        if stream is None:
            if rpc.stream_id > self._last_stream_id:
                raise ProtocolError(f"a message on stream {rpc.stream_id}, which was never opened")
            return  # a late message for a stream we gave up on
        if stream.on_message(rpc):
            self._streams.pop(rpc.stream_id, None)

    def _fail(self, failure: IpcConnectionError, *, subscriptions_too: bool = True) -> None:
        if self._failure is not None:
            return
        self._failure = failure
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            if (
                isinstance(stream, Subscription)
                and not subscriptions_too
                and stream.response.done()
            ):
                stream._end(None)
            else:
                stream.on_error(failure)
        if subscriptions_too:
            log.warning("IPC: %s", failure.message)


class _AgentClosed(Exception):
    """The agent sent PROTOCOL_ERROR or INTERNAL_ERROR: it is closing the connection."""


def _env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise IpcConnectionError(
            f"environment variable {name} is not set: the edgeloop agent sets it for the "
            "components it starts; outside one, pass socket_path= and token= to connect()"
        )
    return value


async def _open(path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    try:
        return await asyncio.open_unix_connection(path, limit=_READ_CHUNK)
    except OSError as err:
        raise IpcConnectionError(
            f"cannot connect to the agent's IPC socket {path}: {err.strerror or err}; "
            "is the agent running?"
        ) from err


async def _handshake(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, token: str, path: str
) -> Decoder:
    decoder = Decoder()
    try:
        writer.write(encode(_connect_message(token)))
        await writer.drain()
        while True:
            data = await reader.read(_READ_CHUNK)
            if not data:
                raise IpcConnectionError(
                    f"the agent at {path} closed the connection during the handshake"
                )
            messages = decoder.feed(data)
            if not messages:
                continue
            rpc = parse(messages[0])
            if rpc.message_type is not MessageType.CONNECT_ACK:
                raise IpcConnectionError(
                    f"the agent at {path} answered CONNECT with {rpc.message_type.name}"
                )
            if MessageFlag.CONNECTION_ACCEPTED not in rpc.flags:
                raise IpcConnectionError(
                    "the agent refused the auth token: it names no component the agent "
                    f"started (check {TOKEN_ENV}, or the token passed to connect())"
                )
            # Anything after the ACK in the same read could only be a PING (no stream is
            # open yet), which needs no answer: the agent never relies on PING.
            return decoder
    except (FrameError, ProtocolError) as err:
        raise IpcConnectionError(f"the agent at {path} broke the IPC handshake: {err}") from err
    except (ConnectionError, OSError) as err:
        raise IpcConnectionError(f"lost the connection to {path} during the handshake") from err
