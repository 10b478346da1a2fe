"""The spool's on-disk format: segment files of CRC-checked, sequence-numbered records.

A segment file is named by the sequence number of its first record, zero-padded so that
names sort in order (``00000000000000000001.seg``), and holds::

    header  "ELSPOOL1" (8 bytes) | first sequence (u64)
    record  payload length (u32) | crc32 (u32) | sequence (u64) | timestamp ms (u64) | payload
    record  ...

little-endian; the CRC covers the length, the sequence, the timestamp and the payload.
Records are only ever appended. A record cut short (a write interrupted by a crash) or
whose CRC does not match ends the readable part of a segment: ``scan`` reports where.
Pure framing: the files are ``spool_files.py``'s, the policy ``spool_stream.py``'s.

A record of the ``dead-letter`` stream carries the record it stands for::

    "ELDL" | meta length (u32) | meta (JSON: stream, sequence, timestampMs, reason) | payload
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SEGMENT_SUFFIX = ".seg"
SEGMENT_MAGIC = b"ELSPOOL1"
SEGMENT_HEADER = struct.Struct("<8sQ")  # magic, first sequence
FRAME_HEADER = struct.Struct("<IIQQ")  # payload length, crc32, sequence, timestamp ms
_CRC_FIELDS = struct.Struct("<IQQ")  # what the CRC covers besides the payload
MAX_PAYLOAD = 64 * 1024 * 1024  # a longer length field can only be damage


@dataclass(frozen=True, slots=True)
class Record:
    """One record of a stream: its sequence number, when the hub accepted it, its bytes."""

    sequence: int
    timestamp_ms: int
    payload: bytes


def segment_name(first: int) -> str:
    """The file name of the segment whose first record has sequence ``first``."""
    return f"{first:020d}{SEGMENT_SUFFIX}"


def parse_segment_name(name: str) -> int | None:
    """The first sequence a segment file name stands for, or None for other files."""
    stem = name.removesuffix(SEGMENT_SUFFIX)
    if stem == name or len(stem) != 20 or not stem.isdigit():
        return None
    return int(stem)


def encode_segment_header(first: int) -> bytes:
    """The header a new segment file starts with."""
    return SEGMENT_HEADER.pack(SEGMENT_MAGIC, first)


def check_segment_header(data: bytes, first: int) -> bool:
    """True when ``data`` starts with the header of the segment named ``first``."""
    if len(data) < SEGMENT_HEADER.size:
        return False
    magic, named = SEGMENT_HEADER.unpack_from(data)
    return bool(magic == SEGMENT_MAGIC and named == first)


def encode_frame(sequence: int, timestamp_ms: int, payload: bytes) -> bytes:
    """One record as it is written to a segment."""
    size = len(payload)
    crc = zlib.crc32(payload, zlib.crc32(_CRC_FIELDS.pack(size, sequence, timestamp_ms)))
    return FRAME_HEADER.pack(size, crc, sequence, timestamp_ms) + payload


@dataclass(frozen=True, slots=True)
class Scan:
    """What ``scan`` found in a buffer: the records, where it stopped, and why."""

    records: list[Record]
    end: int  # offset just past the last whole, valid record read
    problem: str | None  # None: stopped cleanly (a limit, or the end of a whole record)
    short: bool = False  # the buffer ends inside a record (more bytes may complete it)
    taken: int = 0  # payload bytes taken, including those counted before the call


def scan(
    buf: bytes,
    start: int = 0,
    *,
    max_records: int | None = None,
    max_bytes: int | None = None,
    max_sequence: int | None = None,
    min_timestamp: int | None = None,
    taken: int = 0,
) -> Scan:
    """Decode whole records from ``buf[start:]``, checking each CRC.

    Stops before the first record that would exceed ``max_records`` or ``max_bytes``
    (payload bytes, counting ``taken`` already spent; a first record is always taken even
    when larger), whose sequence is above
    ``max_sequence``, or whose timestamp is at least ``min_timestamp`` (the sweep of
    expired records uses it); at a record cut short (``short``); or at a damaged one
    (``problem``).
    """
    records: list[Record] = []
    pos = start
    end = len(buf)
    unpack = FRAME_HEADER.unpack_from
    head = FRAME_HEADER.size
    crc32 = zlib.crc32
    fields = _CRC_FIELDS.pack
    while pos < end:
        if max_records is not None and len(records) >= max_records:
            break
        if end - pos < head:
            return Scan(records, pos, "a record header cut short", short=True, taken=taken)
        size, crc, sequence, timestamp = unpack(buf, pos)
        if size > MAX_PAYLOAD:
            return Scan(records, pos, f"a record length of {size} bytes", taken=taken)
        if end - pos < head + size:
            return Scan(records, pos, "a record cut short", short=True, taken=taken)
        if max_sequence is not None and sequence > max_sequence:
            break
        if min_timestamp is not None and timestamp >= min_timestamp:
            break
        if max_bytes is not None and taken and taken + size > max_bytes:
            break
        payload = buf[pos + head : pos + head + size]
        if crc32(payload, crc32(fields(size, sequence, timestamp))) != crc:
            return Scan(records, pos, f"a CRC mismatch in record {sequence}", taken=taken)
        records.append(Record(sequence, timestamp, payload))
        taken += size
        pos += head + size
    return Scan(records, pos, None, taken=taken)


def read_segment(path: Path) -> bytes:
    """The whole of a segment file."""
    with open(path, "rb") as file:
        return file.read()


def pread_all(fd: int, size: int, offset: int) -> bytes:
    """``size`` bytes at ``offset`` (fewer only at the end of the file)."""
    chunks = []
    while size > 0:
        chunk = os.pread(fd, size, offset)
        if not chunk:
            break
        chunks.append(chunk)
        size -= len(chunk)
        offset += len(chunk)
    return b"".join(chunks)


DEAD_LETTER_MAGIC = b"ELDL"
_DEAD_LETTER_HEAD = struct.Struct("<4sI")


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A record an exporter gave up on: where it came from, why, and its payload."""

    stream: str
    sequence: int
    timestamp_ms: int
    reason: str
    payload: bytes

    def encode(self) -> bytes:
        """The payload of the dead-letter record that keeps this one."""
        meta = json.dumps(
            {
                "stream": self.stream,
                "sequence": self.sequence,
                "timestampMs": self.timestamp_ms,
                "reason": self.reason,
            },
            separators=(",", ":"),
        ).encode()
        return _DEAD_LETTER_HEAD.pack(DEAD_LETTER_MAGIC, len(meta)) + meta + self.payload

    @classmethod
    def decode(cls, data: bytes) -> DeadLetter:
        """A dead-letter record's payload taken apart; ValueError when it is not one."""
        if len(data) < _DEAD_LETTER_HEAD.size:
            raise ValueError("too short for a dead-letter record")
        magic, size = _DEAD_LETTER_HEAD.unpack_from(data)
        start = _DEAD_LETTER_HEAD.size
        if magic != DEAD_LETTER_MAGIC or len(data) < start + size:
            raise ValueError("not a dead-letter record")
        meta: dict[str, Any] = json.loads(data[start : start + size])
        return cls(
            stream=str(meta["stream"]),
            sequence=int(meta["sequence"]),
            timestamp_ms=int(meta["timestampMs"]),
            reason=str(meta["reason"]),
            payload=bytes(data[start + size :]),
        )


__all__ = [
    "FRAME_HEADER",
    "MAX_PAYLOAD",
    "SEGMENT_HEADER",
    "SEGMENT_SUFFIX",
    "DeadLetter",
    "Record",
    "Scan",
    "check_segment_header",
    "encode_frame",
    "encode_segment_header",
    "parse_segment_name",
    "pread_all",
    "read_segment",
    "scan",
    "segment_name",
]
