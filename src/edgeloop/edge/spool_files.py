"""A stream's segment files: the tail open for appends, reads by position, recovery.

A position is ``(segment, offset)``: the first sequence of a segment (its name) and a byte
offset in it. Segments hold consecutive sequences; the last one of a sealed segment is
taken to be one less than the next segment's first (a power cut that tore a sealed segment
shows up when it is read, as damage). Only the tail segment is scanned when a stream opens:
start-up costs one segment, not the whole backlog. Callers hold the stream's lock.
"""

from __future__ import annotations

import logging
import os
from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass, field
from operator import attrgetter
from pathlib import Path

from edgeloop.edge.spool_segment import (
    FRAME_HEADER,
    SEGMENT_HEADER,
    Record,
    check_segment_header,
    encode_segment_header,
    parse_segment_name,
    pread_all,
    read_segment,
    scan,
    segment_name,
)

log = logging.getLogger("edgeloop.spool")

HEAD = SEGMENT_HEADER.size
READ_CHUNK = 256 * 1024
Position = tuple[int, int]  # (segment, offset)


@dataclass(slots=True)
class Segment:
    """One segment file, as the stream knows it."""

    first: int  # sequence of its first record (its name)
    size: int  # bytes in the file
    last: int  # sequence of its last record; first - 1 while empty
    first_ts: int | None = None  # timestamp of its first record, once read


@dataclass(frozen=True, slots=True)
class Damage:
    """A damaged record: the rest of its segment is unreadable."""

    segment: int
    offset: int
    lost: int  # records the rest of the segment held
    last: int  # the last of them
    problem: str


@dataclass(slots=True)
class Batch:
    """Records read, where reading stopped, and any damage skipped on the way."""

    records: list[Record]
    position: Position
    damage: list[Damage] = field(default_factory=list)


class SegmentFiles:
    """The segment files of one stream's folder."""

    def __init__(self, folder: Path, fsync: Callable[[int], None]) -> None:
        self.folder = folder
        self.segments: list[Segment] = []
        self.disk = 0  # bytes of all segment files
        self.fd = -1  # the tail, O_APPEND
        self.sealing: list[int] = []  # sealed segments' fds, to fsync and close
        self.dir_dirty = False  # a segment was made or deleted since the last fsync
        self.broken = False  # a failed write could not be undone
        self._fsync = fsync
        self._read_fd: tuple[int, int] | None = None  # (segment, fd) of a sealed segment

    @property
    def tail(self) -> Segment:
        """The segment appends go to."""
        return self.segments[-1]

    # -- opening ------------------------------------------------------------------------
    def open(self, floor: int) -> tuple[int, int]:
        """Find the segments, cut the tail back to its last whole record, and fsync what a
        killed writer left in the page cache; (next sequence, last timestamp found).
        ``floor`` is the highest sequence that may have been handed out before."""
        firsts = sorted(
            first
            for path in self.folder.iterdir()
            if (first := parse_segment_name(path.name)) is not None
        )
        self.segments = [Segment(f, self._path(f).stat().st_size, f - 1) for f in firsts]
        for segment, following in zip(self.segments, self.segments[1:], strict=False):
            segment.last = following.first - 1
        last_ts = self._recover_tail() if self.segments else 0
        resume = max(floor + 1, self.tail.last + 1 if self.segments else 1)
        if self.segments and self.tail.last + 1 != resume and self.tail.size == HEAD:
            self._path(self.tail.first).unlink()  # empty, and numbering resumes higher
            self.segments.pop()
        if self.segments and self.tail.last + 1 == resume:
            self.fd = os.open(self._path(self.tail.first), os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
        else:  # a new stream, or sequences were lost (a power cut): resume at ``resume``
            self.roll(resume)
        self.disk = sum(s.size for s in self.segments)
        for segment in self.segments[:-1]:
            self.fsync_path(self._path(segment.first))
        self._fsync(self.fd)
        self.fsync_path(self.folder)
        self.dir_dirty = False
        return resume, last_ts

    def _recover_tail(self) -> int:
        """Check the tail and cut it back to its last whole, valid record; that record's
        timestamp (0 when there is none)."""
        path = self._path(self.tail.first)
        data = read_segment(path)
        if not check_segment_header(data, self.tail.first):
            if data.strip(b"\0"):
                aside = path.with_name(path.name + ".damaged")
                os.replace(path, aside)
                log.error("%s has no valid header; moved to %s", path, aside)
            else:  # created, then a crash before its header reached the disk
                path.unlink()
            self.segments.pop()
            if not self.segments:
                return 0
            path = self._path(self.tail.first)
            data = read_segment(path)
        found = scan(data, HEAD)
        if found.problem is not None:
            log.warning(
                "%s ends in %s; cut back to its last whole record (%d bytes dropped)",
                path,
                found.problem,
                len(data) - found.end,
            )
            os.truncate(path, found.end)
        self.tail.size = found.end
        self.tail.last = found.records[-1].sequence if found.records else self.tail.first - 1
        return found.records[-1].timestamp_ms if found.records else 0

    # -- writing ------------------------------------------------------------------------
    def roll(self, first: int) -> None:
        """Start a new tail segment whose first record will be ``first``."""
        path = self._path(first)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, encode_segment_header(first))
        except OSError:
            os.close(fd)
            path.unlink()
            raise
        if self.fd >= 0:
            self.sealing.append(self.fd)
        self.fd = fd
        self.segments.append(Segment(first, HEAD, first - 1))
        self.disk += HEAD
        self.dir_dirty = True

    def write(self, frame: bytes, sequence: int) -> None:
        """Append one record's frame to the tail; on an error, leave no part of it."""
        before = self.tail.size
        try:
            written = os.write(self.fd, frame)
            while written < len(frame):
                written += os.write(self.fd, memoryview(frame)[written:])
        except OSError:
            try:
                os.ftruncate(self.fd, before)  # no half record for the next one to follow
            except OSError:
                self.broken = True
            raise
        self.tail.size += len(frame)
        self.tail.last = sequence
        self.disk += len(frame)

    def remove_first(self) -> Segment:
        """Delete the oldest segment (never the tail)."""
        segment = self.segments.pop(0)
        if self._read_fd is not None and self._read_fd[0] == segment.first:
            self._close_read_fd()
        self._path(segment.first).unlink(missing_ok=True)
        self.disk -= segment.size
        self.dir_dirty = True
        return segment

    # -- reading ------------------------------------------------------------------------
    def read(
        self,
        position: Position,
        *,
        after: int,
        max_records: int,
        max_bytes: int | None = None,
        max_sequence: int | None = None,
        min_timestamp: int | None = None,
    ) -> Batch:
        """Records from ``position`` (the one after sequence ``after``) on, across segments,
        within the limits (see ``scan``); damaged parts are skipped and reported."""
        first, offset = position
        index = self.index(first)
        batch = Batch([], position)
        taken = 0
        chunk = READ_CHUNK
        while len(batch.records) < max_records and (max_bytes is None or taken < max_bytes):
            segment = self.segments[index]
            if offset >= segment.size:
                if index + 1 == len(self.segments):
                    break
                index += 1
                offset = HEAD
                continue
            if max_sequence is not None and segment.first > max_sequence:
                break
            data = self.pread(segment, offset, min(segment.size - offset, chunk))
            found = scan(
                data,
                max_records=max_records - len(batch.records),
                max_bytes=max_bytes,
                max_sequence=max_sequence,
                min_timestamp=min_timestamp,
                taken=taken,
            )
            batch.records.extend(found.records)
            taken = found.taken
            offset += found.end
            if found.short and offset + (len(data) - found.end) < segment.size:
                chunk *= 2  # a record longer than the chunk: read more of it
            elif found.problem is not None:
                last = batch.records[-1].sequence if batch.records else after
                lost = max(0, segment.last - max(last, segment.first - 1))
                batch.damage.append(
                    Damage(segment.first, offset, lost, segment.last, found.problem)
                )
                offset = segment.size
            elif not data or found.end < len(data):
                break  # a limit was reached
        batch.position = self.normal((self.segments[index].first, offset))
        return batch

    def pread(self, segment: Segment, offset: int, size: int) -> bytes:
        """Bytes of ``segment`` (the tail through its own descriptor)."""
        if segment is self.segments[-1]:
            return pread_all(self.fd, size, offset)
        if self._read_fd is None or self._read_fd[0] != segment.first:
            self._close_read_fd()
            path = self._path(segment.first)
            self._read_fd = (segment.first, os.open(path, os.O_RDONLY | os.O_CLOEXEC))
        return pread_all(self._read_fd[1], size, offset)

    def timestamp_at(self, position: Position) -> int | None:
        """The timestamp of the record at ``position``; None at the end of the stream."""
        segment = self.segments[self.index(position[0])]
        if position[1] + FRAME_HEADER.size > segment.size:
            return None
        return int(FRAME_HEADER.unpack(self.pread(segment, position[1], FRAME_HEADER.size))[3])

    def first_timestamp(self, segment: Segment) -> int | None:
        """The timestamp of a segment's first record (kept once read)."""
        if segment.first_ts is None:
            segment.first_ts = self.timestamp_at((segment.first, HEAD))
        return segment.first_ts

    # -- positions and counts -----------------------------------------------------------
    def index(self, first: int) -> int:
        """The index of the segment holding sequence ``first`` (or the one before it)."""
        return bisect_right(self.segments, first, key=attrgetter("first")) - 1

    def locate(self, after: int) -> Position:
        """The position of the first record after sequence ``after``."""
        index = self.index(after + 1)
        if index < 0:
            return (self.segments[0].first, HEAD)
        segment = self.segments[index]
        if after >= segment.last:
            return self.normal((segment.first, segment.size))
        data = self.pread(segment, HEAD, segment.size - HEAD)
        return (segment.first, HEAD + scan(data, max_sequence=after).end)

    def normal(self, position: Position) -> Position:
        """The end of a sealed segment is the start of the next one."""
        index = self.index(position[0])
        if position[1] >= self.segments[index].size and index + 1 < len(self.segments):
            return (self.segments[index + 1].first, HEAD)
        return position

    def check(self, position: Position, after: int) -> bool:
        """Whether ``position`` (say, from ``state.json``) is where the record after
        sequence ``after`` is."""
        index = self.index(position[0])
        if index < 0 or self.segments[index].first != position[0]:
            return False
        segment = self.segments[index]
        if position[1] == segment.size:
            return segment.last <= after
        if not HEAD <= position[1] < segment.size:
            return False
        header = self.pread(segment, position[1], FRAME_HEADER.size)
        return len(header) == FRAME_HEADER.size and FRAME_HEADER.unpack(header)[2] == after + 1

    def count(self, after: int, upto: int) -> int:
        """How many records there are with sequences in (after, upto]."""
        total = 0
        for segment in self.segments[max(0, self.index(after + 1)) :]:
            if segment.first > upto:
                break
            low, high = max(after + 1, segment.first), min(upto, segment.last)
            if high >= low:
                total += high - low + 1
        return total

    def bytes_from(self, position: Position) -> int:
        """Bytes of records from ``position`` to the end of the stream."""
        index = self.index(position[0])
        return sum(s.size - HEAD for s in self.segments[index:]) - (position[1] - HEAD)

    # -- files --------------------------------------------------------------------------
    def take_sealing(self) -> list[int]:
        """The sealed segments' descriptors, for the caller to fsync and close."""
        sealing, self.sealing = self.sealing, []
        return sealing

    def fsync_path(self, path: Path) -> None:
        """Fsync a file or folder by name."""
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self._fsync(fd)
        finally:
            os.close(fd)

    def close(self) -> None:
        """Close every descriptor."""
        for fd in [self.fd, *self.take_sealing()]:
            if fd >= 0:
                os.close(fd)
        self.fd = -1
        self._close_read_fd()

    def _close_read_fd(self) -> None:
        if self._read_fd is not None:
            os.close(self._read_fd[1])
            self._read_fd = None

    def _path(self, first: int) -> Path:
        return self.folder / segment_name(first)


__all__ = ["HEAD", "Batch", "Damage", "Position", "Segment", "SegmentFiles"]
