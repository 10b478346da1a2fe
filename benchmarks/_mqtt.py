"""A minimal sans-I/O MQTT 5 codec for the benchmarks' simulated hubs.

Only what a simulated hub sends and hears: CONNECT (with a will and a session expiry),
PUBLISH (QoS 0/1), PUBACK, SUBSCRIBE, PINGREQ and DISCONNECT out; CONNACK, PUBLISH,
PUBACK, SUBACK and PINGRESP in. Properties are written as empty (except the session
expiry) and skipped when read. Thousands of hubs share one process, so this is kept to
plain functions over ``bytes``; the connection that moves the bytes is elsewhere.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

CONNECT = 1
CONNACK = 2
PUBLISH = 3
PUBACK = 4
SUBSCRIBE = 8
SUBACK = 9
PINGREQ = 12
PINGRESP = 13
DISCONNECT = 14

_SESSION_EXPIRY = 0x11  # property identifier, four-byte integer
_MAX_LENGTH = 268_435_455  # the largest remaining length a variable byte integer holds


class ProtocolError(ValueError):
    """Bytes that are not a packet this codec understands."""


def varint(value: int) -> bytes:
    """MQTT's variable byte integer."""
    if not 0 <= value <= _MAX_LENGTH:
        raise ProtocolError(f"{value} does not fit a variable byte integer")
    out = bytearray()
    while True:
        byte, value = value % 128, value // 128
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def read_varint(data: bytes | bytearray | memoryview, at: int) -> tuple[int, int] | None:
    """``(value, offset after it)``, or None when ``data`` ends inside the integer."""
    value, shift = 0, 0
    for index in range(at, min(at + 4, len(data))):
        byte = data[index]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, index + 1
        shift += 7
    if len(data) - at >= 4:
        raise ProtocolError("a variable byte integer longer than four bytes")
    return None


def _string(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("!H", len(raw)) + raw


def _packet(kind: int, flags: int, body: bytes) -> bytes:
    return bytes([kind << 4 | flags]) + varint(len(body)) + body


# -- what a hub sends -------------------------------------------------------------------


def connect(
    client_id: str,
    *,
    keepalive: int,
    clean_start: bool = True,
    session_expiry: int = 0,
    will_topic: str | None = None,
    will_payload: bytes = b"",
    will_qos: int = 0,
    will_retain: bool = False,
) -> bytes:
    """CONNECT, MQTT 5, no username or password (the certificate is the identity)."""
    flags = 0x02 if clean_start else 0
    if will_topic is not None:
        flags |= 0x04 | (will_qos << 3) | (0x20 if will_retain else 0)
    properties = b""
    if session_expiry:
        properties = bytes([_SESSION_EXPIRY]) + struct.pack("!I", session_expiry)
    body = _string("MQTT") + bytes([5, flags]) + struct.pack("!H", keepalive)
    body += varint(len(properties)) + properties + _string(client_id)
    if will_topic is not None:
        body += b"\x00" + _string(will_topic) + _string(will_payload)  # no will properties
    return _packet(CONNECT, 0, body)


def publish(
    topic: str, payload: bytes, *, qos: int = 0, retain: bool = False, packet_id: int = 0
) -> bytes:
    """PUBLISH with no properties; ``packet_id`` is required for QoS 1."""
    if qos not in (0, 1):
        raise ProtocolError(f"QoS {qos} is not supported here")
    if qos and not 0 < packet_id < 65536:
        raise ProtocolError("a QoS 1 PUBLISH needs a packet id from 1 to 65535")
    body = _string(topic) + (struct.pack("!H", packet_id) if qos else b"") + b"\x00" + payload
    return _packet(PUBLISH, qos << 1 | (1 if retain else 0), body)


def puback(packet_id: int) -> bytes:
    """PUBACK, success (the short form: no reason code, no properties)."""
    return _packet(PUBACK, 0, struct.pack("!H", packet_id))


def subscribe(packet_id: int, filters: list[tuple[str, int]]) -> bytes:
    """SUBSCRIBE to ``(topic filter, maximum QoS)`` pairs, no properties."""
    body = struct.pack("!H", packet_id) + b"\x00"
    for topic, qos in filters:
        body += _string(topic) + bytes([qos])
    return _packet(SUBSCRIBE, 0x02, body)


PINGREQ_PACKET = bytes([PINGREQ << 4, 0])
DISCONNECT_PACKET = bytes([DISCONNECT << 4, 0])  # normal disconnection: the will is dropped


# -- what a hub hears -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Packet:
    """One decoded packet. Fields not used by a packet type keep their defaults."""

    kind: int
    packet_id: int = 0
    reason: int = 0  # CONNACK, PUBACK; SUBACK's first reason code
    reasons: bytes = b""  # SUBACK
    session_present: bool = False  # CONNACK
    topic: str = ""  # PUBLISH
    payload: bytes = b""  # PUBLISH
    qos: int = 0  # PUBLISH
    retain: bool = False  # PUBLISH


def _skip_properties(body: bytes, at: int) -> int:
    found = read_varint(body, at)
    if found is None:
        raise ProtocolError("properties cut short")
    length, at = found
    return at + length


def decode(first: int, body: bytes) -> Packet:
    """The packet with fixed-header byte ``first`` and ``body`` (all after the length)."""
    kind, flags = first >> 4, first & 0x0F
    if kind == CONNACK:
        if len(body) < 2:
            raise ProtocolError("CONNACK shorter than two bytes")
        return Packet(CONNACK, reason=body[1], session_present=bool(body[0] & 1))
    if kind == PUBLISH:
        qos = (flags >> 1) & 3
        (length,) = struct.unpack_from("!H", body, 0)
        at = 2 + length
        topic = body[2:at].decode()
        packet_id = 0
        if qos:
            (packet_id,) = struct.unpack_from("!H", body, at)
            at += 2
        at = _skip_properties(body, at)
        return Packet(
            PUBLISH,
            packet_id=packet_id,
            topic=topic,
            payload=body[at:],
            qos=qos,
            retain=bool(flags & 1),
        )
    if kind == PUBACK:
        (packet_id,) = struct.unpack_from("!H", body, 0)
        return Packet(PUBACK, packet_id=packet_id, reason=body[2] if len(body) > 2 else 0)
    if kind == SUBACK:
        (packet_id,) = struct.unpack_from("!H", body, 0)
        reasons = body[_skip_properties(body, 2) :]
        return Packet(SUBACK, packet_id=packet_id, reason=reasons[0], reasons=reasons)
    if kind in (PINGRESP, DISCONNECT):
        return Packet(kind, reason=body[0] if body else 0)
    raise ProtocolError(f"packet type {kind} is not expected by a client")


class Decoder:
    """Splits a byte stream into packets: ``feed`` bytes, get the complete packets."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Packet]:
        """Every packet completed by ``data``, in order."""
        buffer = self._buffer
        buffer += data
        packets: list[Packet] = []
        at = 0
        while len(buffer) - at >= 2:
            found = read_varint(buffer, at + 1)
            if found is None:
                break
            length, start = found
            end = start + length
            if end > len(buffer):
                break
            packets.append(decode(buffer[at], bytes(buffer[start:end])))
            at = end
        if at:
            del buffer[:at]
        return packets


__all__ = [
    "CONNACK",
    "DISCONNECT_PACKET",
    "PINGREQ_PACKET",
    "PINGRESP",
    "PUBACK",
    "PUBLISH",
    "SUBACK",
    "Decoder",
    "Packet",
    "ProtocolError",
    "connect",
    "decode",
    "puback",
    "publish",
    "read_varint",
    "subscribe",
    "varint",
]
