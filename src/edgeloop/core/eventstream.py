"""AWS event-stream framing: a sans-I/O encoder and incremental decoder.

One frame on the wire (all integers big-endian)::

    total length   u32   whole frame, prelude and trailer included
    headers length u32   bytes of the headers section
    prelude CRC    u32   CRC32 of the 8 bytes above
    headers              repeated: name length u8, name (UTF-8), type u8, value
    payload              opaque bytes
    message CRC    u32   CRC32 of every byte before it (prelude CRC included)

Header values by type: ``BOOL_TRUE``/``BOOL_FALSE`` carry no bytes; ``BYTE``, ``INT16``,
``INT32``, ``INT64`` are signed two's complement of 1/2/4/8 bytes; ``TIMESTAMP`` is an
int64 of milliseconds since the Unix epoch; ``BYTE_BUF`` and ``STRING`` are a u16 length
then that many bytes; ``UUID`` is 16 bytes.

Python types stand for the wire types: ``bool``, ``bytes``, ``str`` and ``uuid.UUID`` map
one to one; the integer types need a width, so they are small ``int`` subclasses
(:class:`Int8`, :class:`Int16`, :class:`Int32`, :class:`Int64`, :class:`Timestamp`) that
compare like ints and keep their wire type through a round trip. A plain ``int`` is
refused rather than given a guessed width.

A :class:`FrameError` means the byte stream can no longer be trusted (framing is lost); the
:class:`Decoder` refuses further input and the owner of the connection must close it.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from typing import ClassVar, Final, Self, cast
from uuid import UUID

from edgeloop.core.errors import EdgeloopError

__all__ = [
    "DEFAULT_MAX_MESSAGE_SIZE",
    "MAX_HEADERS_SIZE",
    "MAX_HEADER_NAME_LENGTH",
    "MAX_HEADER_VALUE_LENGTH",
    "PRELUDE_LENGTH",
    "TRAILER_LENGTH",
    "Decoder",
    "FrameError",
    "HeaderType",
    "HeaderValue",
    "Int8",
    "Int16",
    "Int32",
    "Int64",
    "Message",
    "Timestamp",
    "decode",
    "encode",
    "header_type_of",
]

PRELUDE_LENGTH: Final = 12
TRAILER_LENGTH: Final = 4
#: aws-c-event-stream's AWS_EVENT_STREAM_MAX_MESSAGE_SIZE; the AWS clients refuse more.
DEFAULT_MAX_MESSAGE_SIZE: Final = 16 * 1024 * 1024
#: aws-c-event-stream's AWS_EVENT_STREAM_MAX_HEADERS_SIZE.
MAX_HEADERS_SIZE: Final = 128 * 1024
MAX_HEADER_NAME_LENGTH: Final = 127
#: STRING and BYTE_BUF lengths are a u16 on the wire, but the C reader rejects > INT16_MAX.
MAX_HEADER_VALUE_LENGTH: Final = 32767

_PRELUDE = struct.Struct(">III")
_U32 = struct.Struct(">I")
_U16 = struct.Struct(">H")


class FrameError(EdgeloopError):
    """The byte stream is not valid event-stream framing; the connection must be closed."""


class HeaderType(IntEnum):
    """Wire type codes of header values."""

    BOOL_TRUE = 0
    BOOL_FALSE = 1
    BYTE = 2
    INT16 = 3
    INT32 = 4
    INT64 = 5
    BYTE_BUF = 6
    STRING = 7
    TIMESTAMP = 8
    UUID = 9


class _SizedInt(int):
    """An int that knows its wire type and refuses values outside its width."""

    header_type: ClassVar[HeaderType]
    bits: ClassVar[int]

    def __new__(cls, value: int = 0) -> Self:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{cls.__name__} needs an int, not {type(value).__name__}")
        low, high = -(1 << (cls.bits - 1)), (1 << (cls.bits - 1)) - 1
        if not low <= value <= high:
            raise ValueError(f"{cls.__name__} must be in [{low}, {high}], got {value}")
        return super().__new__(cls, value)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({int(self)})"


class Int8(_SizedInt):
    """A signed 8-bit header value (wire type BYTE)."""

    header_type = HeaderType.BYTE
    bits = 8


class Int16(_SizedInt):
    """A signed 16-bit header value."""

    header_type = HeaderType.INT16
    bits = 16


class Int32(_SizedInt):
    """A signed 32-bit header value (the RPC layer's type, stream id and flags)."""

    header_type = HeaderType.INT32
    bits = 32


class Int64(_SizedInt):
    """A signed 64-bit header value."""

    header_type = HeaderType.INT64
    bits = 64


class Timestamp(_SizedInt):
    """A TIMESTAMP header value: milliseconds since the Unix epoch, as a signed int64."""

    header_type = HeaderType.TIMESTAMP
    bits = 64


HeaderValue = bool | Int8 | Int16 | Int32 | Int64 | Timestamp | bytes | str | UUID

_SIZED_BY_TYPE: Final[dict[HeaderType, Callable[[int], HeaderValue]]] = {
    cls.header_type: cls for cls in (Int8, Int16, Int32, Int64, Timestamp)
}
_I32: Final = struct.Struct(">i")
_PRELUDE_HEAD: Final = struct.Struct(">II")
_SIZED_CLASSES: Final[dict[HeaderType, type[_SizedInt]]] = {
    cls.header_type: cls for cls in (Int8, Int16, Int32, Int64, Timestamp)
}
_INT_FORMATS: Final[dict[HeaderType, struct.Struct]] = {
    HeaderType.BYTE: struct.Struct(">b"),
    HeaderType.INT16: struct.Struct(">h"),
    HeaderType.INT32: struct.Struct(">i"),
    HeaderType.INT64: struct.Struct(">q"),
    HeaderType.TIMESTAMP: struct.Struct(">q"),
}


def header_type_of(value: HeaderValue) -> HeaderType:
    """The wire type a Python header value is encoded as."""
    if isinstance(value, bool):
        return HeaderType.BOOL_TRUE if value else HeaderType.BOOL_FALSE
    if isinstance(value, _SizedInt):
        return value.header_type
    if isinstance(value, bytes):
        return HeaderType.BYTE_BUF
    if isinstance(value, str):
        return HeaderType.STRING
    if isinstance(value, UUID):
        return HeaderType.UUID
    raise TypeError(
        f"header value {value!r} has type {type(value).__name__}; use bool, bytes, str, "
        "uuid.UUID, or Int8/Int16/Int32/Int64/Timestamp for integers"
    )


@dataclass(frozen=True, slots=True)
class Message:
    """One event-stream message: named, typed headers and an opaque payload.

    Header order is kept as given (dicts are ordered) and reproduced on the wire.
    """

    headers: Mapping[str, HeaderValue] = field(default_factory=dict)
    payload: bytes = b""


def _encode_header_uncached(out: bytearray, name: str, value: HeaderValue) -> None:
    raw_name = name.encode("utf-8")
    if not 1 <= len(raw_name) <= MAX_HEADER_NAME_LENGTH:
        raise FrameError(
            f"header name {name!r} is {len(raw_name)} bytes; it must be 1 to "
            f"{MAX_HEADER_NAME_LENGTH} bytes of UTF-8"
        )
    kind = header_type_of(value)
    out.append(len(raw_name))
    out += raw_name
    out.append(kind)
    if kind in (HeaderType.BOOL_TRUE, HeaderType.BOOL_FALSE):
        return
    if isinstance(value, UUID):
        out += value.bytes
    elif isinstance(value, _SizedInt):
        out += _INT_FORMATS[kind].pack(value)
    else:
        raw = value.encode("utf-8") if isinstance(value, str) else bytes(value)
        if len(raw) > MAX_HEADER_VALUE_LENGTH:
            raise FrameError(
                f"header {name!r} value is {len(raw)} bytes; the limit is {MAX_HEADER_VALUE_LENGTH}"
            )
        out += _U16.pack(len(raw))
        out += raw


_ENCODED_CACHE: dict[tuple[str, type, HeaderValue], bytes] = {}
_ENCODED_CACHE_LIMIT: Final = 4096
_INT32_PREFIX: dict[str, bytes] = {}


def _encode_header(out: bytearray, name: str, value: HeaderValue) -> None:
    # Hot path. RPC frames repeat the same names and string values (content type, model
    # names), so their encodings are cached; INT32 values (ids, flags) vary and get a
    # cached name prefix instead.
    if type(value) is Int32:
        prefix = _INT32_PREFIX.get(name)
        if prefix is None:
            scratch = bytearray()
            _encode_header_uncached(scratch, name, value)
            prefix = _INT32_PREFIX[name] = bytes(scratch[:-4])
        out += prefix
        out += _I32.pack(value)
        return
    key = (name, type(value), value)
    cached = _ENCODED_CACHE.get(key)
    if cached is None:
        scratch = bytearray()
        _encode_header_uncached(scratch, name, value)
        cached = bytes(scratch)
        if len(_ENCODED_CACHE) < _ENCODED_CACHE_LIMIT:
            _ENCODED_CACHE[key] = cached
    out += cached


def encode_headers(headers: Mapping[str, HeaderValue]) -> bytes:
    """The headers section of a frame, in the order given."""
    out = bytearray()
    for name, value in headers.items():
        _encode_header(out, name, value)
    return bytes(out)


def encode(message: Message, *, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> bytes:
    """Encode one message as a frame; FrameError if it breaks a size limit of the format."""
    return encode_frame(
        encode_headers(message.headers), message.payload, max_message_size=max_message_size
    )


def encode_frame(
    headers: bytes, payload: bytes, *, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
) -> bytes:
    """A frame around an already encoded headers section and a payload."""
    if len(headers) > MAX_HEADERS_SIZE:
        raise FrameError(f"headers take {len(headers)} bytes; the limit is {MAX_HEADERS_SIZE}")
    total = PRELUDE_LENGTH + len(headers) + len(payload) + TRAILER_LENGTH
    if total > max_message_size:
        raise FrameError(
            f"message would be {total} bytes; the limit is {max_message_size} "
            "(send a smaller payload)"
        )
    prelude = _PRELUDE_HEAD.pack(total, len(headers))
    frame = b"".join((prelude, _U32.pack(zlib.crc32(prelude)), headers, payload))
    return frame + _U32.pack(zlib.crc32(frame))


_TYPE_BY_CODE: Final[dict[int, HeaderType]] = {int(t): t for t in HeaderType}


def _fast_sized(cls: type[_SizedInt], value: int) -> HeaderValue:
    # A value unpacked from its own width is in range: skip __new__'s checks (hot path).
    return cast(HeaderValue, int.__new__(cls, value))


def _decode_headers(block: memoryview) -> dict[str, HeaderValue]:
    # Hot path: every message goes through here, so bounds are checked inline and error
    # texts are only built when something is wrong.
    headers: dict[str, HeaderValue] = {}
    raw_block = bytes(block)
    pos, end = 0, len(raw_block)
    while pos < end:
        name_length = raw_block[pos]
        pos += 1
        if not 1 <= name_length <= MAX_HEADER_NAME_LENGTH:
            raise FrameError(f"header name length {name_length} is outside 1..127")
        if pos + name_length > end:
            raise FrameError("headers section ends inside a header name")
        if pos + name_length + 1 > end:
            raise FrameError("headers section ends inside the type of a header")
        try:
            name = raw_block[pos : pos + name_length].decode("utf-8")
        except UnicodeDecodeError as err:
            raise FrameError("header name is not valid UTF-8") from err
        pos += name_length
        code = raw_block[pos]
        pos += 1
        kind = _TYPE_BY_CODE.get(code)
        value: HeaderValue
        if kind is None:
            raise FrameError(f"header {name!r} has unknown value type {code}")
        if kind is HeaderType.INT32:
            if pos + 4 > end:
                raise FrameError(f"headers section ends inside the value of header {name!r}")
            value = int.__new__(Int32, _I32.unpack_from(raw_block, pos)[0])  # in range by width
            pos += 4
        elif kind is HeaderType.STRING or kind is HeaderType.BYTE_BUF:
            if pos + 2 > end:
                raise FrameError(f"headers section ends inside the length of header {name!r}")
            (length,) = _U16.unpack_from(raw_block, pos)
            pos += 2
            if length > MAX_HEADER_VALUE_LENGTH:
                raise FrameError(f"header {name!r} value length {length} exceeds 32767")
            if pos + length > end:
                raise FrameError(f"headers section ends inside the value of header {name!r}")
            raw = raw_block[pos : pos + length]
            pos += length
            if kind is HeaderType.STRING:
                try:
                    value = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise FrameError(f"header {name!r} string is not valid UTF-8") from err
            else:
                value = raw
        elif kind is HeaderType.BOOL_TRUE:
            value = True
        elif kind is HeaderType.BOOL_FALSE:
            value = False
        elif kind is HeaderType.UUID:
            if pos + 16 > end:
                raise FrameError(f"headers section ends inside the value of header {name!r}")
            value = UUID(bytes=raw_block[pos : pos + 16])
            pos += 16
        else:
            fmt = _INT_FORMATS[kind]
            if pos + fmt.size > end:
                raise FrameError(f"headers section ends inside the value of header {name!r}")
            value = _fast_sized(_SIZED_CLASSES[kind], fmt.unpack_from(raw_block, pos)[0])
            pos += fmt.size
        if name in headers:
            # The format allows repeats, but nothing in the RPC protocol sends them and a
            # dict cannot hold them; taking either copy silently would hide a broken peer.
            raise FrameError(f"header {name!r} appears twice")
        headers[name] = value
    return headers


class Decoder:
    """Turns a byte stream into messages; feed it whatever the socket returned.

    Size limits are checked as soon as a frame's prelude has arrived, so a peer that
    announces an oversized frame is refused before its body is buffered. After the first
    FrameError the decoder stays failed.
    """

    def __init__(self, *, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> None:
        if max_message_size < PRELUDE_LENGTH + TRAILER_LENGTH:
            raise ValueError(f"max_message_size {max_message_size} is below the 16-byte minimum")
        self.max_message_size = max_message_size
        self._buffer = bytearray()
        self._failure: FrameError | None = None

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete frame held back, waiting for more input."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[Message]:
        """Append bytes; return every message they complete (possibly none)."""
        if self._failure is not None:
            raise FrameError(f"decoder already failed ({self._failure}); close the connection")
        self._buffer += data
        messages: list[Message] = []
        view = memoryview(self._buffer)
        offset = 0
        try:
            while len(view) - offset >= PRELUDE_LENGTH:
                total = self._check_prelude(view[offset : offset + PRELUDE_LENGTH])
                if len(view) - offset < total:
                    break
                messages.append(self._decode_frame(view[offset : offset + total]))
                offset += total
        except FrameError as err:
            self._failure = err
            raise
        finally:
            view.release()
        del self._buffer[:offset]
        return messages

    def close(self) -> None:
        """Declare end of input; FrameError if it cut a frame short."""
        if self._buffer and self._failure is None:
            self._failure = FrameError(
                f"connection ended inside a frame ({len(self._buffer)} bytes unread)"
            )
            raise self._failure

    def _check_prelude(self, prelude: memoryview) -> int:
        total, headers_length, prelude_crc = _PRELUDE.unpack(prelude)
        if zlib.crc32(prelude[:8]) != prelude_crc:
            raise FrameError("prelude CRC mismatch: not an event-stream frame, or corrupted")
        if total > self.max_message_size:
            raise FrameError(f"frame announces {total} bytes; the limit is {self.max_message_size}")
        if headers_length > MAX_HEADERS_SIZE:
            raise FrameError(
                f"frame announces {headers_length} bytes of headers; the limit is "
                f"{MAX_HEADERS_SIZE}"
            )
        if total < PRELUDE_LENGTH + headers_length + TRAILER_LENGTH:
            raise FrameError(
                f"frame length {total} cannot hold its prelude, {headers_length} bytes of "
                "headers and the trailer"
            )
        return int(total)

    def _decode_frame(self, frame: memoryview) -> Message:
        (message_crc,) = _U32.unpack(frame[-TRAILER_LENGTH:])
        if zlib.crc32(frame[:-TRAILER_LENGTH]) != message_crc:
            raise FrameError("message CRC mismatch: the frame was corrupted")
        (headers_length,) = _U32.unpack(frame[4:8])
        headers_end = PRELUDE_LENGTH + headers_length
        headers = _decode_headers(frame[PRELUDE_LENGTH:headers_end])
        return Message(headers, bytes(frame[headers_end:-TRAILER_LENGTH]))


def decode(frame: bytes, *, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> Message:
    """Decode exactly one complete frame; FrameError if it is anything else."""
    decoder = Decoder(max_message_size=max_message_size)
    messages = decoder.feed(frame)
    decoder.close()
    if len(messages) != 1:
        raise FrameError(f"expected exactly one frame, found {len(messages)}")
    return messages[0]
