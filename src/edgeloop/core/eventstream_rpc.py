"""The event-stream RPC layer Greengrass IPC speaks on top of eventstream framing.

Every RPC message carries three INT32 headers: ``:message-type``, ``:message-flags`` and
``:stream-id``. Stream id 0 is the connection itself (CONNECT, CONNECT_ACK, PING,
PING_RESPONSE, PROTOCOL_ERROR, INTERNAL_ERROR); ids from 1 up are streams, which carry only
APPLICATION_MESSAGE and APPLICATION_ERROR. The first message of a stream names the
``operation``; application messages name their shape in ``service-model-type`` and carry
JSON (``:content-type: application/json``). See docs/ipc-protocol.md for the whole dance.

Header names are matched case-insensitively on input, as the AWS C and Python clients do.
"""

from __future__ import annotations

import functools
import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import IntEnum, IntFlag
from typing import Any, Final

from edgeloop.core.errors import EdgeloopError
from edgeloop.core.eventstream import (
    HeaderValue,
    Int32,
    Message,
    encode_frame,
    encode_headers,
)

__all__ = [
    "CONTENT_TYPE",
    "CONTENT_TYPE_JSON",
    "MESSAGE_FLAGS",
    "MESSAGE_TYPE",
    "OPERATION",
    "PROTOCOL_VERSION",
    "SERVICE_MODEL_TYPE",
    "STREAM_ID",
    "VERSION",
    "ConnectRequest",
    "MessageFlag",
    "MessageType",
    "ProtocolError",
    "RpcMessage",
    "application_error",
    "application_message",
    "connect_ack",
    "internal_error",
    "json_body",
    "parse",
    "parse_connect",
    "ping_response",
    "protocol_error",
]

MESSAGE_TYPE: Final = ":message-type"
MESSAGE_FLAGS: Final = ":message-flags"
STREAM_ID: Final = ":stream-id"
OPERATION: Final = "operation"
SERVICE_MODEL_TYPE: Final = "service-model-type"
CONTENT_TYPE: Final = ":content-type"
VERSION: Final = ":version"

CONTENT_TYPE_JSON: Final = "application/json"
#: What awsiot.eventstreamrpc sends in the CONNECT message's ``:version`` header.
PROTOCOL_VERSION: Final = "0.1.0"

_MAX_STREAM_ID: Final = 2**31 - 1
_I32: Final = struct.Struct(">i")


class ProtocolError(EdgeloopError):
    """A well-framed message that breaks the RPC rules; answer PROTOCOL_ERROR and close."""


class MessageType(IntEnum):
    """Values of the ``:message-type`` header."""

    APPLICATION_MESSAGE = 0
    APPLICATION_ERROR = 1
    PING = 2
    PING_RESPONSE = 3
    CONNECT = 4
    CONNECT_ACK = 5
    PROTOCOL_ERROR = 6
    INTERNAL_ERROR = 7


class MessageFlag(IntFlag):
    """Bits of the ``:message-flags`` header."""

    NONE = 0
    CONNECTION_ACCEPTED = 0x1
    TERMINATE_STREAM = 0x2


_MESSAGE_TYPES: Final = {int(t): t for t in MessageType}
_FLAGS: Final = {int(f): f for f in (MessageFlag(v) for v in range(4))}
_STREAM_TYPES: Final = frozenset({MessageType.APPLICATION_MESSAGE, MessageType.APPLICATION_ERROR})


@dataclass(frozen=True, slots=True)
class RpcMessage:
    """An incoming message with its RPC headers pulled out and checked."""

    message_type: MessageType
    flags: MessageFlag
    stream_id: int
    payload: bytes = b""
    operation: str | None = None
    model_type: str | None = None
    content_type: str | None = None
    headers: Mapping[str, HeaderValue] = field(default_factory=dict)

    @property
    def terminates_stream(self) -> bool:
        """True if the sender closes the stream with this message."""
        return MessageFlag.TERMINATE_STREAM in self.flags

    def json(self) -> Any:
        """The payload parsed as JSON (an empty payload is ``{}``); ProtocolError if it is not."""
        if not self.payload:
            return {}
        try:
            return json.loads(self.payload)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ProtocolError(
                f"stream {self.stream_id}: payload of {self.model_type or 'message'} is not "
                f"valid JSON ({err})"
            ) from err


@dataclass(frozen=True, slots=True)
class ConnectRequest:
    """What a CONNECT message asks for."""

    version: str | None
    auth_token: str | None


def _lookup(headers: Mapping[str, HeaderValue]) -> Mapping[str, HeaderValue]:
    # Peers send lower-case names (ours and the SDK's C runtime both do): only copy when
    # one is not, so the common case costs nothing.
    for name in headers:
        if not name.islower() and name.lower() != name:
            return {n.lower(): v for n, v in headers.items()}
    return headers


def _int32(lowered: Mapping[str, HeaderValue], name: str) -> int:
    value = lowered.get(name)
    if value is None:
        raise ProtocolError(
            f"message lacks the {name} header; every RPC message needs "
            f"{MESSAGE_TYPE}, {MESSAGE_FLAGS} and {STREAM_ID}"
        )
    if not isinstance(value, Int32):
        raise ProtocolError(f"header {name} must be INT32, not {type(value).__name__}")
    return int(value)


def _string(lowered: Mapping[str, HeaderValue], name: str) -> str | None:
    value = lowered.get(name)
    return value if isinstance(value, str) else None


def parse(message: Message) -> RpcMessage:
    """Pull the RPC fields out of a decoded message; ProtocolError if they are wrong."""
    lowered = _lookup(message.headers)
    raw_type = _int32(lowered, MESSAGE_TYPE)
    raw_flags = _int32(lowered, MESSAGE_FLAGS)
    stream_id = _int32(lowered, STREAM_ID)
    message_type = _MESSAGE_TYPES.get(raw_type)  # a table: enum calls cost on the hot path
    if message_type is None:
        raise ProtocolError(f"{MESSAGE_TYPE} {raw_type} is not a known message type")
    if stream_id < 0:
        raise ProtocolError(f"{STREAM_ID} {stream_id} is negative")
    if (stream_id == 0) == (message_type in _STREAM_TYPES):
        where = "stream id 0" if stream_id == 0 else f"stream {stream_id}"
        raise ProtocolError(
            f"{message_type.name} cannot travel on {where}: application messages and errors "
            "use stream ids from 1, every other type uses stream id 0"
        )
    flags = _FLAGS.get(raw_flags)
    if flags is None:
        flags = MessageFlag(raw_flags & 0xFFFFFFFF)
    return RpcMessage(
        message_type=message_type,
        # Unknown bits are kept rather than refused: the C runtime ignores them too.
        flags=flags,
        stream_id=stream_id,
        payload=message.payload,
        operation=_string(lowered, OPERATION),
        model_type=_string(lowered, SERVICE_MODEL_TYPE),
        content_type=_string(lowered, CONTENT_TYPE),
        headers=message.headers,
    )


def parse_connect(rpc: RpcMessage) -> ConnectRequest:
    """Read the ``:version`` header and the ``{"authToken": ...}`` payload of a CONNECT."""
    if rpc.message_type is not MessageType.CONNECT:
        raise ProtocolError(f"expected CONNECT, got {rpc.message_type.name}")
    version = _string(_lookup(rpc.headers), VERSION)
    token: str | None = None
    if rpc.payload:
        body = rpc.json()
        if not isinstance(body, dict):
            raise ProtocolError("CONNECT payload must be a JSON object")
        raw_token = body.get("authToken")
        if raw_token is not None and not isinstance(raw_token, str):
            raise ProtocolError("CONNECT payload field authToken must be a string")
        token = raw_token
    return ConnectRequest(version=version, auth_token=token)


def json_body(value: Any) -> bytes:
    """Serialise a JSON payload the way the SDKs expect (UTF-8, compact)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _rpc_headers(
    message_type: MessageType, flags: MessageFlag, stream_id: int
) -> dict[str, HeaderValue]:
    if not 0 <= stream_id <= _MAX_STREAM_ID:
        raise ValueError(f"stream id {stream_id} is outside 0..{_MAX_STREAM_ID}")
    return {
        MESSAGE_TYPE: Int32(int(message_type)),
        MESSAGE_FLAGS: Int32(int(flags)),
        STREAM_ID: Int32(stream_id),
    }


def connect_ack(*, accepted: bool) -> Message:
    """The answer to CONNECT; without CONNECTION_ACCEPTED the client gives up and closes."""
    flags = MessageFlag.CONNECTION_ACCEPTED if accepted else MessageFlag.NONE
    return Message(_rpc_headers(MessageType.CONNECT_ACK, flags, 0))


def ping_response(payload: bytes = b"") -> Message:
    """The answer to PING (echoing its payload is allowed, not required)."""
    return Message(_rpc_headers(MessageType.PING_RESPONSE, MessageFlag.NONE, 0), payload)


def application_message(
    stream_id: int, model_type: str, payload: bytes, *, terminate: bool = False
) -> Message:
    """A response or stream event on a stream; ``terminate`` closes the stream with it."""
    flags = MessageFlag.TERMINATE_STREAM if terminate else MessageFlag.NONE
    headers = _rpc_headers(MessageType.APPLICATION_MESSAGE, flags, stream_id)
    if stream_id == 0:
        raise ValueError("application messages need a stream id from 1")
    headers[CONTENT_TYPE] = CONTENT_TYPE_JSON
    headers[SERVICE_MODEL_TYPE] = model_type
    return Message(headers, payload)


@functools.lru_cache(maxsize=1024)
def _application_headers(model_type: str, flags: int, message_type: int, operation: str) -> bytes:
    # Everything but the stream id, which is encoded last so it can be appended.
    headers: dict[str, HeaderValue] = {}
    if operation:
        headers[OPERATION] = operation
    headers[CONTENT_TYPE] = CONTENT_TYPE_JSON
    headers[SERVICE_MODEL_TYPE] = model_type
    headers[MESSAGE_TYPE] = Int32(message_type)
    headers[MESSAGE_FLAGS] = Int32(flags)
    headers[STREAM_ID] = Int32(0)
    return encode_headers(headers)[:-4]


def encode_application_message(
    stream_id: int,
    model_type: str,
    payload: bytes,
    *,
    terminate: bool = False,
    operation: str = "",
) -> bytes:
    """The frame of ``application_message`` (plus ``operation`` for a request), built from
    a cached headers template: requests, responses and events are the hot path."""
    if not 1 <= stream_id <= _MAX_STREAM_ID:
        raise ValueError(f"application messages need a stream id in 1..{_MAX_STREAM_ID}")
    flags = MessageFlag.TERMINATE_STREAM if terminate else MessageFlag.NONE
    prefix = _application_headers(
        model_type, int(flags), int(MessageType.APPLICATION_MESSAGE), operation
    )
    return encode_frame(prefix + _I32.pack(stream_id), payload)


def application_error(stream_id: int, model_type: str, message: str, **fields: Any) -> Message:
    """A modelled error (e.g. ``aws.greengrass#UnauthorizedError``); it always ends the stream.

    ``fields`` are extra members of the error shape, already in the model's camelCase.
    """
    if stream_id == 0:
        raise ValueError("application errors need a stream id from 1")
    headers = _rpc_headers(MessageType.APPLICATION_ERROR, MessageFlag.TERMINATE_STREAM, stream_id)
    headers[CONTENT_TYPE] = CONTENT_TYPE_JSON
    headers[SERVICE_MODEL_TYPE] = model_type
    return Message(headers, json_body({"message": message, **fields}))


def _connection_error(message_type: MessageType, message: str) -> Message:
    headers = _rpc_headers(message_type, MessageFlag.NONE, 0)
    headers[CONTENT_TYPE] = CONTENT_TYPE_JSON
    return Message(headers, json_body({"message": message}))


def protocol_error(message: str) -> Message:
    """Tell the peer it broke the protocol; send it, then close the connection."""
    return _connection_error(MessageType.PROTOCOL_ERROR, message)


def internal_error(message: str) -> Message:
    """Tell the peer the server failed; send it, then close the connection."""
    return _connection_error(MessageType.INTERNAL_ERROR, message)
