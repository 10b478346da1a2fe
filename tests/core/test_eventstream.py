"""Tests for edgeloop.core.eventstream and eventstream_rpc: framing, RPC fields, interop.

The known-answer frames below were written by the AWS C runtime (aws-c-event-stream, via
awscrt 0.36.1): an ``awscrt.eventstream.rpc.ClientConnection`` connected to a Unix socket
and its bytes were recorded. The Python binding cannot encode a standalone frame, so
recording a real client is how we get vectors produced by the reference implementation.
"""

from __future__ import annotations

import asyncio
import os
import struct
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeloop.core import eventstream_rpc as rpc
from edgeloop.core.errors import EdgeloopError
from edgeloop.core.eventstream import (
    DEFAULT_MAX_MESSAGE_SIZE,
    MAX_HEADER_VALUE_LENGTH,
    MAX_HEADERS_SIZE,
    Decoder,
    FrameError,
    HeaderType,
    HeaderValue,
    Int8,
    Int16,
    Int32,
    Int64,
    Message,
    Timestamp,
    decode,
    encode,
    header_type_of,
)

# --- known answers ----------------------------------------------------------------------

KAT_UUID = UUID("0123456789abcdef0123456789abcdef")

# CONNECT with one header of every type, as the C client wrote it (its own RPC headers last).
KAT_ALL_TYPES_MESSAGE = Message(
    {
        "t": True,
        "f": False,
        "b": Int8(-2),
        "s": Int16(-300),
        "i": Int32(70000),
        "l": Int64(-(2**40)),
        "buf": b"\x00\xff",
        "str": "h\u00e9llo",
        "ts": Timestamp(1700000000123),
        "u": KAT_UUID,
        ":message-type": Int32(4),
        ":message-flags": Int32(0),
        ":stream-id": Int32(0),
    },
    b'{"authToken": "x"}',
)
KAT_ALL_TYPES = bytes.fromhex(
    "000000af0000008d045c28b3017400016601016202fe017303fed401690400011170016c05ffffff00"
    "000000000362756606000200ff0373747207000668c3a96c6c6f027473080000018bcfe5687b017509"
    "0123456789abcdef0123456789abcdef0d3a6d6573736167652d7479706504000000040e3a6d657373"
    "6167652d666c61677304000000000a3a73747265616d2d696404000000007b2261757468546f6b656e"
    "223a202278227d53574d1c"
)

# The first message of a PublishToTopic stream, as awsiot.eventstreamrpc sends it.
KAT_ACTIVATE_MESSAGE = Message(
    {
        ":content-type": "application/json",
        "service-model-type": "aws.greengrass#PublishToTopicRequest",
        ":message-type": Int32(0),
        ":message-flags": Int32(0),
        ":stream-id": Int32(1),
        "operation": "aws.greengrass#PublishToTopic",
    },
    b'{"topic": "t"}',
)
KAT_ACTIVATE = bytes.fromhex(
    "000000da000000bc64b047360d3a636f6e74656e742d747970650700106170706c69636174696f6e2f"
    "6a736f6e12736572766963652d6d6f64656c2d747970650700246177732e677265656e677261737323"
    "5075626c697368546f546f706963526571756573740d3a6d6573736167652d7479706504000000000e"
    "3a6d6573736167652d666c61677304000000000a3a73747265616d2d69640400000001096f70657261"
    "74696f6e07001d6177732e677265656e6772617373235075626c697368546f546f7069637b22746f70"
    "6963223a202274227da82dcca2"
)

# The smallest frame: no headers, no payload (the CRCs of these eight zero-ish bytes).
KAT_EMPTY = bytes.fromhex("000000100000000005c248eb7d98c8ff")


def typed(headers: Any) -> list[tuple[str, type, Any]]:
    """Headers with their Python types, since Int32(1) == Int64(1) as ints."""
    return [(name, type(value), value) for name, value in headers.items()]


@pytest.mark.parametrize(
    ("message", "frame"),
    [
        (KAT_ALL_TYPES_MESSAGE, KAT_ALL_TYPES),
        (KAT_ACTIVATE_MESSAGE, KAT_ACTIVATE),
        (Message(), KAT_EMPTY),
    ],
    ids=["all-header-types", "activate-publish", "empty"],
)
def test_known_answers_encode_and_decode(message: Message, frame: bytes) -> None:
    assert encode(message) == frame
    decoded = decode(frame)
    assert typed(decoded.headers) == typed(message.headers)
    assert decoded.payload == message.payload


def test_crcs_cover_prelude_and_whole_frame() -> None:
    frame = KAT_ALL_TYPES
    assert struct.unpack(">I", frame[8:12])[0] == zlib.crc32(frame[:8])
    assert struct.unpack(">I", frame[-4:])[0] == zlib.crc32(frame[:-4])


# --- round trips ------------------------------------------------------------------------


def _sized(cls: Callable[[int], HeaderValue], bits: int) -> st.SearchStrategy[HeaderValue]:
    return st.integers(-(1 << (bits - 1)), (1 << (bits - 1)) - 1).map(cls)


header_values: st.SearchStrategy[HeaderValue] = st.one_of(
    st.booleans(),
    _sized(Int8, 8),
    _sized(Int16, 16),
    _sized(Int32, 32),
    _sized(Int64, 64),
    _sized(Timestamp, 64),
    st.binary(max_size=300),
    st.text(max_size=200),
    st.uuids(),
)
header_names = st.text(min_size=1, max_size=40).filter(lambda n: len(n.encode()) <= 127)
messages = st.builds(
    Message,
    st.dictionaries(header_names, header_values, max_size=12),
    st.binary(max_size=2000),
)


@given(messages)
@settings(max_examples=300)
def test_round_trip_keeps_values_types_and_order(message: Message) -> None:
    decoded = decode(encode(message))
    assert typed(decoded.headers) == typed(message.headers)
    assert decoded.payload == message.payload


@given(st.lists(messages, min_size=1, max_size=4), st.data())
@settings(max_examples=100)
def test_stream_in_random_chunks(batch: list[Message], data: st.DataObject) -> None:
    stream = b"".join(encode(m) for m in batch)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    decoder = Decoder()
    out: list[Message] = []
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        out += decoder.feed(stream[start:end])
    decoder.close()
    assert [(typed(m.headers), m.payload) for m in out] == [
        (typed(m.headers), m.payload) for m in batch
    ]


def test_stream_split_at_every_byte_boundary() -> None:
    frames = [KAT_ALL_TYPES, KAT_EMPTY, KAT_ACTIVATE]
    stream = b"".join(frames)
    for cut in range(len(stream) + 1):
        decoder = Decoder()
        out = decoder.feed(stream[:cut]) + decoder.feed(stream[cut:])
        assert [encode(m) for m in out] == frames, f"split at {cut}"
        assert decoder.buffered == 0


def test_stream_fed_one_byte_at_a_time_yields_each_message_when_complete() -> None:
    decoder = Decoder()
    stream = KAT_ACTIVATE + KAT_ALL_TYPES
    completed_at = []
    for index in range(len(stream)):
        if decoder.feed(stream[index : index + 1]):
            completed_at.append(index + 1)
    assert completed_at == [len(KAT_ACTIVATE), len(stream)]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (True, HeaderType.BOOL_TRUE),
        (False, HeaderType.BOOL_FALSE),
        (Int8(1), HeaderType.BYTE),
        (Int16(1), HeaderType.INT16),
        (Int32(1), HeaderType.INT32),
        (Int64(1), HeaderType.INT64),
        (b"x", HeaderType.BYTE_BUF),
        ("x", HeaderType.STRING),
        (Timestamp(1), HeaderType.TIMESTAMP),
        (KAT_UUID, HeaderType.UUID),
    ],
)
def test_header_type_of(value: HeaderValue, expected: HeaderType) -> None:
    assert header_type_of(value) is expected


def test_sized_ints_compare_as_ints_and_check_range() -> None:
    assert Int32(7) == 7
    assert repr(Int16(-3)) == "Int16(-3)"
    assert Int8(127) == 127 and Int8(-128) == -128
    with pytest.raises(ValueError, match=r"Int8 must be in \[-128, 127\], got 128"):
        Int8(128)
    with pytest.raises(ValueError, match="Int32"):
        Int32(2**31)
    with pytest.raises(TypeError, match="needs an int"):
        Int32(True)


# --- bad input is refused ---------------------------------------------------------------


def _frame(headers: bytes, payload: bytes = b"", *, total: int | None = None) -> bytes:
    """Build a frame by hand with correct CRCs, so one field at a time can be wrong."""
    length = 16 + len(headers) + len(payload) if total is None else total
    prelude = struct.pack(">II", length, len(headers))
    body = prelude + struct.pack(">I", zlib.crc32(prelude)) + headers + payload
    return body + struct.pack(">I", zlib.crc32(body))


def _refuse(data: bytes, reason: str, **kwargs: Any) -> FrameError:
    decoder = Decoder(**kwargs)
    with pytest.raises(FrameError, match=reason) as caught:
        decoder.feed(data)
    with pytest.raises(FrameError, match="already failed"):
        decoder.feed(KAT_EMPTY)
    return caught.value


def test_frame_error_is_an_edgeloop_error() -> None:
    assert issubclass(FrameError, EdgeloopError)


def test_garbage_is_refused() -> None:
    _refuse(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "prelude CRC mismatch")


def test_bad_prelude_crc_is_refused() -> None:
    frame = bytearray(KAT_ACTIVATE)
    frame[9] ^= 0x01
    _refuse(bytes(frame), "prelude CRC mismatch")


@pytest.mark.parametrize("position", [12, 40, len(KAT_ACTIVATE) - 20, len(KAT_ACTIVATE) - 1])
def test_bad_message_crc_is_refused(position: int) -> None:
    frame = bytearray(KAT_ACTIVATE)
    frame[position] ^= 0x80
    _refuse(bytes(frame), "message CRC mismatch")


def test_oversized_frame_is_refused_from_its_prelude_alone() -> None:
    prelude = struct.pack(">II", 1 << 30, 0)
    prelude += struct.pack(">I", zlib.crc32(prelude))
    error = _refuse(prelude, f"announces {1 << 30} bytes; the limit is {DEFAULT_MAX_MESSAGE_SIZE}")
    assert "limit" in str(error)


def test_max_message_size_is_configurable() -> None:
    _refuse(KAT_ACTIVATE, "the limit is 100", max_message_size=100)
    assert Decoder(max_message_size=len(KAT_ACTIVATE)).feed(KAT_ACTIVATE)
    with pytest.raises(ValueError, match="16-byte minimum"):
        Decoder(max_message_size=15)


def test_oversized_headers_section_is_refused() -> None:
    prelude = struct.pack(">II", 200_000, MAX_HEADERS_SIZE + 1)
    _refuse(prelude + struct.pack(">I", zlib.crc32(prelude)), "bytes of headers")


def test_total_length_too_small_for_its_headers_is_refused() -> None:
    _refuse(_frame(b"\x01a\x00", total=16), "cannot hold")


def test_truncated_input_is_buffered_then_refused_at_close() -> None:
    decoder = Decoder()
    assert decoder.feed(KAT_ACTIVATE[:-1]) == []
    assert decoder.buffered == len(KAT_ACTIVATE) - 1
    with pytest.raises(FrameError, match="ended inside a frame"):
        decoder.close()
    Decoder().close()  # nothing buffered: a clean end


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        (b"\x01a\x0a", "unknown value type 10"),
        (b"\x01a\xff", "unknown value type 255"),
        (b"\x00\x00", "name length 0"),
        (b"\x80" + b"a" * 128 + b"\x00", "name length 128"),
        (b"\x05ab", "ends inside a header name"),
        (b"\x01a", "ends inside the type"),
        (b"\x01a\x04\x00\x00", "ends inside the value"),
        (b"\x01a\x07\x00", "ends inside the length"),
        (b"\x01a\x07\x00\x09abc", "ends inside the value"),
        (b"\x01a\x06\x80\x00", "exceeds 32767"),
        (b"\x01a\x07\x00\x02\xc3\x28", "not valid UTF-8"),
        (b"\x02\xc3\x28\x00", "name is not valid UTF-8"),
        (b"\x01a\x09" + b"\x00" * 15, "ends inside the value"),
        (b"\x01a\x00\x01a\x01", "appears twice"),
    ],
)
def test_malformed_headers_are_refused(headers: bytes, reason: str) -> None:
    _refuse(_frame(headers, b"payload"), reason)


def test_encode_refuses_what_the_format_cannot_carry() -> None:
    with pytest.raises(FrameError, match="1 to 127 bytes"):
        encode(Message({"x" * 128: True}))
    with pytest.raises(FrameError, match="1 to 127 bytes"):
        encode(Message({"": True}))
    with pytest.raises(FrameError, match="limit is 32767"):
        encode(Message({"v": "x" * (MAX_HEADER_VALUE_LENGTH + 1)}))
    assert decode(encode(Message({"v": b"x" * MAX_HEADER_VALUE_LENGTH}))).headers["v"]
    with pytest.raises(FrameError, match="headers take"):
        encode(Message({f"h{i}": "x" * 30000 for i in range(5)}))
    with pytest.raises(FrameError, match="the limit is 1000"):
        encode(Message(payload=b"x" * 1000), max_message_size=1000)
    with pytest.raises(TypeError, match="Int8/Int16/Int32/Int64/Timestamp"):
        encode(Message({"n": 5}))  # type: ignore[dict-item]


# --- the RPC layer ----------------------------------------------------------------------


def test_parse_activation_from_the_official_client() -> None:
    message = rpc.parse(decode(KAT_ACTIVATE))
    assert message.message_type is rpc.MessageType.APPLICATION_MESSAGE
    assert message.flags == rpc.MessageFlag.NONE
    assert message.stream_id == 1
    assert message.operation == "aws.greengrass#PublishToTopic"
    assert message.model_type == "aws.greengrass#PublishToTopicRequest"
    assert message.content_type == "application/json"
    assert message.json() == {"topic": "t"}
    assert not message.terminates_stream


def test_parse_connect_reads_version_and_token() -> None:
    message = Message({":version": "0.1.0", **_rpc_headers(4, 0, 0)}, b'{"authToken": "tok"}')
    request = rpc.parse_connect(rpc.parse(message))
    assert request == rpc.ConnectRequest(version="0.1.0", auth_token="tok")
    assert rpc.parse_connect(rpc.parse(Message(_rpc_headers(4, 0, 0)))).auth_token is None


@pytest.mark.parametrize(
    ("payload", "reason"),
    [(b"[1]", "JSON object"), (b'{"authToken": 5}', "must be a string"), (b"{", "not valid JSON")],
)
def test_parse_connect_refuses_bad_payloads(payload: bytes, reason: str) -> None:
    with pytest.raises(rpc.ProtocolError, match=reason):
        rpc.parse_connect(rpc.parse(Message(_rpc_headers(4, 0, 0), payload)))


def test_parse_connect_refuses_other_types() -> None:
    with pytest.raises(rpc.ProtocolError, match="expected CONNECT, got PING"):
        rpc.parse_connect(rpc.parse(Message(_rpc_headers(2, 0, 0))))


def test_rpc_header_names_are_case_insensitive() -> None:
    message = Message(
        {":Message-Type": Int32(0), ":MESSAGE-FLAGS": Int32(2), ":Stream-Id": Int32(3)}
    )
    parsed = rpc.parse(message)
    assert (parsed.stream_id, parsed.terminates_stream) == (3, True)


def _rpc_headers(message_type: int, flags: int, stream_id: int) -> dict[str, HeaderValue]:
    return {
        ":message-type": Int32(message_type),
        ":message-flags": Int32(flags),
        ":stream-id": Int32(stream_id),
    }


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ({":message-flags": Int32(0), ":stream-id": Int32(0)}, "lacks the :message-type"),
        ({":message-type": Int32(2), ":stream-id": Int32(0)}, "lacks the :message-flags"),
        ({":message-type": Int32(2), ":message-flags": Int32(0)}, "lacks the :stream-id"),
        ({**_rpc_headers(2, 0, 0), ":stream-id": Int64(0)}, "must be INT32, not Int64"),
        (_rpc_headers(8, 0, 0), "8 is not a known message type"),
        (_rpc_headers(0, 0, 0), "APPLICATION_MESSAGE cannot travel on stream id 0"),
        (_rpc_headers(1, 2, 0), "APPLICATION_ERROR cannot travel on stream id 0"),
        (_rpc_headers(2, 0, 5), "PING cannot travel on stream 5"),
        (_rpc_headers(0, 0, -1), "negative"),
    ],
)
def test_parse_refuses_broken_rpc_messages(headers: dict[str, HeaderValue], reason: str) -> None:
    with pytest.raises(rpc.ProtocolError, match=reason):
        rpc.parse(Message(headers))


def test_builders_produce_what_the_clients_expect() -> None:
    ack = rpc.parse(decode(encode(rpc.connect_ack(accepted=True))))
    assert ack.message_type is rpc.MessageType.CONNECT_ACK
    assert ack.flags == rpc.MessageFlag.CONNECTION_ACCEPTED
    assert rpc.parse(rpc.connect_ack(accepted=False)).flags == rpc.MessageFlag.NONE

    pong = rpc.parse(rpc.ping_response(b"echo"))
    assert (pong.message_type, pong.stream_id, pong.payload) == (
        rpc.MessageType.PING_RESPONSE,
        0,
        b"echo",
    )

    response = rpc.parse(
        rpc.application_message(7, "aws.greengrass#PublishToTopicResponse", b"{}", terminate=True)
    )
    assert response.terminates_stream and response.stream_id == 7
    assert response.model_type == "aws.greengrass#PublishToTopicResponse"
    assert response.content_type == "application/json"

    error = rpc.parse(
        rpc.application_error(
            7, "aws.greengrass#ResourceNotFoundError", "no such thing", resourceName="x"
        )
    )
    assert error.message_type is rpc.MessageType.APPLICATION_ERROR
    assert error.terminates_stream
    assert error.json() == {"message": "no such thing", "resourceName": "x"}

    for build, kind in ((rpc.protocol_error, 6), (rpc.internal_error, 7)):
        failure = rpc.parse(build("bad"))
        assert failure.message_type == kind and failure.json() == {"message": "bad"}

    with pytest.raises(ValueError, match="stream id from 1"):
        rpc.application_message(0, "m", b"")
    with pytest.raises(ValueError, match="stream id from 1"):
        rpc.application_error(0, "m", "x")
    with pytest.raises(ValueError, match="outside"):
        rpc.application_message(2**31, "m", b"")


def test_empty_payload_is_an_empty_json_object() -> None:
    assert rpc.parse(Message(_rpc_headers(0, 2, 1))).json() == {}


def test_json_body_is_compact_utf8() -> None:
    assert rpc.json_body({"a": "\u00e9", "b": [1]}) == '{"a":"\u00e9","b":[1]}'.encode()


# --- interop with the AWS runtime and the official Greengrass IPC client -----------------


@pytest.fixture
def socket_path() -> Iterator[str]:
    # Unix socket paths must stay under ~107 bytes; pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="el-es-") as directory:
        yield str(Path(directory) / "ipc.sock")


class _MiniServer:
    """Just enough of an IPC server to answer CONNECT, PING and a few operations."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.seen: list[rpc.RpcMessage] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        decoder = Decoder()
        try:
            while data := await reader.read(65536):
                for message in decoder.feed(data):
                    for reply in self.answer(rpc.parse(message)):
                        writer.write(encode(reply))
                await writer.drain()
        finally:
            writer.close()

    def answer(self, request: rpc.RpcMessage) -> list[Message]:
        self.seen.append(request)
        kind = request.message_type
        if kind is rpc.MessageType.CONNECT:
            token = rpc.parse_connect(request).auth_token
            return [rpc.connect_ack(accepted=token == self.token)]
        if kind is rpc.MessageType.PING:
            return [rpc.ping_response(request.payload)]
        sid = request.stream_id
        if request.operation == "aws.greengrass#PublishToTopic":
            if request.json()["topic"] == "forbidden":
                return [rpc.application_error(sid, "aws.greengrass#UnauthorizedError", "no")]
            return [
                rpc.application_message(
                    sid, "aws.greengrass#PublishToTopicResponse", b"{}", terminate=True
                )
            ]
        if request.operation == "aws.greengrass#SubscribeToTopic":
            event = {"binaryMessage": {"message": "AGhp", "context": {"topic": "a/b"}}}
            return [
                rpc.application_message(sid, "aws.greengrass#SubscribeToTopicResponse", b"{}"),
                rpc.application_message(
                    sid, "aws.greengrass#SubscriptionResponseMessage", rpc.json_body(event)
                ),
            ]
        return []


def _serve_while(path: str, server: _MiniServer, client: Any) -> Any:
    async def main() -> Any:
        listener = await asyncio.start_unix_server(server.handle, path)
        try:
            return await asyncio.wait_for(asyncio.to_thread(client), timeout=20)
        finally:
            listener.close()

    return asyncio.run(main())


def test_aws_c_runtime_decodes_our_frames(socket_path: str) -> None:
    protocol = pytest.importorskip("awscrt.eventstream.rpc")
    awscrt_io = pytest.importorskip("awscrt.io")
    from awscrt.eventstream import Header

    handler_base: Any = protocol.ClientConnectionHandler

    class Handler(handler_base):  # type: ignore[misc]
        def __init__(self) -> None:
            self.setup: Future[Any] = Future()
            self.messages: list[tuple[Any, ...]] = []
            self.got_ping = threading.Event()

        def on_connection_setup(self, connection: Any, error: Any, **kwargs: Any) -> None:
            self.setup.set_result((connection, error))

        def on_connection_shutdown(self, reason: Any, **kwargs: Any) -> None:
            pass

        def on_protocol_message(
            self, headers: Any, payload: bytes, message_type: Any, flags: int, **kwargs: Any
        ) -> None:
            values = [(h.name, h.type.name, h.value) for h in headers]
            self.messages.append((message_type.name, flags, values, payload))
            if message_type == protocol.MessageType.PING_RESPONSE:
                self.got_ping.set()

    class EchoServer(_MiniServer):
        def answer(self, request: rpc.RpcMessage) -> list[Message]:
            replies = super().answer(request)
            if request.message_type is rpc.MessageType.PING:
                # Send the client's own headers back, re-encoded by us.
                replies = [Message({**request.headers, **replies[0].headers}, request.payload)]
            return replies

    def client() -> Handler:
        group = awscrt_io.EventLoopGroup(1)
        bootstrap = awscrt_io.ClientBootstrap(group, awscrt_io.DefaultHostResolver(group))
        options = awscrt_io.SocketOptions()
        options.domain = awscrt_io.SocketDomain.Local
        handler = Handler()
        protocol.ClientConnection.connect(
            handler=handler,
            host_name=socket_path,
            port=0,
            bootstrap=bootstrap,
            socket_options=options,
        )
        connection, error = handler.setup.result(5)
        assert error is None
        connection.send_protocol_message(
            payload=b'{"authToken": "s"}', message_type=protocol.MessageType.CONNECT
        ).result(5)
        headers = [
            Header.from_bool("t", True),
            Header.from_bool("f", False),
            Header.from_byte("b", -2),
            Header.from_int16("s", -300),
            Header.from_int32("i", 70000),
            Header.from_int64("l", -(2**40)),
            Header.from_byte_buf("buf", b"\x00\xff"),
            Header.from_string("str", "h\u00e9llo"),
            Header.from_timestamp("ts", 1700000000123),
            Header.from_uuid("u", KAT_UUID),
        ]
        deadline = time.monotonic() + 5
        while not handler.messages and time.monotonic() < deadline:
            time.sleep(0.01)
        connection.send_protocol_message(
            headers=headers, payload=b"ping!", message_type=protocol.MessageType.PING
        ).result(5)
        assert handler.got_ping.wait(5)
        connection.close()
        return handler

    handler = _serve_while(socket_path, EchoServer("s"), client)
    ack, pong = handler.messages
    assert ack[:2] == ("CONNECT_ACK", 1)
    assert pong[0] == "PING_RESPONSE" and pong[3] == b"ping!"
    assert pong[2][:10] == [
        ("t", "BOOL_TRUE", True),
        ("f", "BOOL_FALSE", False),
        ("b", "BYTE", -2),
        ("s", "INT16", -300),
        ("i", "INT32", 70000),
        ("l", "INT64", -(2**40)),
        ("buf", "BYTE_BUF", b"\x00\xff"),
        ("str", "STRING", "h\u00e9llo"),
        ("ts", "TIMESTAMP", 1700000000123),
        ("u", "UUID", KAT_UUID),
    ]


def test_official_greengrass_v2_client_connects_publishes_and_subscribes(
    socket_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    clientv2 = pytest.importorskip("awsiot.greengrasscoreipc.clientv2")
    model = pytest.importorskip("awsiot.greengrasscoreipc.model")
    monkeypatch.setenv("AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH_FOR_COMPONENT", socket_path)
    monkeypatch.setenv("SVCUID", "the-token")
    server = _MiniServer("the-token")

    def client() -> dict[str, Any]:
        results: dict[str, Any] = {}
        ipc = clientv2.GreengrassCoreIPCClientV2()
        try:
            message = model.PublishMessage(binary_message=model.BinaryMessage(message=b"\x00hi"))
            results["publish"] = ipc.publish_to_topic(topic="a/b", publish_message=message)
            try:
                ipc.publish_to_topic(topic="forbidden", publish_message=message)
            except model.UnauthorizedError as err:
                results["error"] = err
            events: list[Any] = []
            arrived = threading.Event()

            def on_event(event: Any) -> None:
                events.append(event)
                arrived.set()

            _, operation = ipc.subscribe_to_topic(topic="a/b", on_stream_event=on_event)
            assert arrived.wait(5)
            operation.close().result(5)
            results["events"] = events
        finally:
            ipc.close()
        os.environ["SVCUID"] = "wrong"
        try:
            clientv2.GreengrassCoreIPCClientV2()
        except Exception as err:
            results["rejected"] = err
        return results

    results = _serve_while(socket_path, server, client)
    assert isinstance(results["publish"], model.PublishToTopicResponse)
    assert results["error"].message == "no"
    assert results["events"][0].binary_message.message == b"\x00hi"
    assert "access denied" in str(results["rejected"])

    connect = server.seen[0]
    assert rpc.parse_connect(connect) == rpc.ConnectRequest("0.1.0", "the-token")
    publish = server.seen[1]
    assert publish.json() == {
        "topic": "a/b",
        "publishMessage": {"binaryMessage": {"message": "AGhp"}},
    }
    # Closing a subscription: an empty APPLICATION_MESSAGE with TERMINATE_STREAM and no
    # content type or model type.
    close = server.seen[4]
    assert close.terminates_stream and close.payload == b"" and close.model_type is None


@given(
    stream_id=st.integers(min_value=1, max_value=2**31 - 1),
    model=st.text(min_size=1, max_size=60),
    payload=st.binary(max_size=200),
    terminate=st.booleans(),
    operation=st.sampled_from(["", "aws.greengrass#PublishToTopic"]),
)
def test_templated_application_frames_decode_like_built_ones(
    stream_id: int, model: str, payload: bytes, terminate: bool, operation: str
) -> None:
    from edgeloop.core.eventstream_rpc import application_message, encode_application_message

    fast = decode(
        encode_application_message(
            stream_id, model, payload, terminate=terminate, operation=operation
        )
    )
    built = application_message(stream_id, model, payload, terminate=terminate)
    expected = dict(built.headers)
    if operation:
        expected["operation"] = operation
    assert dict(fast.headers) == expected
    assert fast.payload == payload
