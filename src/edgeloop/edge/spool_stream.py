"""One durable stream of the spool: appends, batched fsync, reads, commits and drops.

The guarantee is stated in ``spool.py``; the files are ``spool_files.py``'s, the framing
``spool_segment.py``'s. Every method takes the stream's lock, so the event loop, an
exporter thread and the fsync thread may all call in; ``sync`` (the fsync thread's) holds
it only to take and publish its marks, never across an fsync.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeloop.core.errors import EdgeloopError, ValidationError
from edgeloop.edge.spool_config import DEAD_LETTER, FullPolicy, StreamConfig
from edgeloop.edge.spool_files import HEAD, Batch, Position, SegmentFiles
from edgeloop.edge.spool_segment import FRAME_HEADER, DeadLetter, Record, encode_frame
from edgeloop.fileio import write_bytes_atomic

log = logging.getLogger("edgeloop.spool")

DROPPED_REJECTED = "rejected: full"
DROPPED_OVERWRITTEN = "overwritten"
DROPPED_EXPIRED = "expired"
DROPPED_CORRUPT = "corrupt"
STATE_FILE = "state.json"


class SpoolError(EdgeloopError):
    """A stream cannot do what was asked (closed, a failed disk, an unknown stream, ...)."""


class StreamFullError(SpoolError):
    """An append to a full ``reject-new`` stream; the record was not accepted."""

    def __init__(self, stream: str, max_bytes: int, disk_bytes: int, pending_bytes: int) -> None:
        self.stream = stream
        self.max_bytes = max_bytes
        self.pending_bytes = pending_bytes
        super().__init__(
            f"stream {stream!r} is full: {disk_bytes} of its {max_bytes} bytes used, "
            f"{pending_bytes} bytes waiting for export; the record was not accepted "
            "(raise the stream's max_bytes, or choose full_policy overwrite-oldest)"
        )


@dataclass(frozen=True, kw_only=True)
class StreamMetrics:
    """What a stream has done, and what it holds."""

    name: str
    priority: int
    full_policy: str
    max_bytes: int
    ttl_seconds: float | None
    appended: int
    exported: int
    dead_lettered: int
    pending: int  # records waiting for export (not dead-lettered, not lost)
    pending_bytes: int  # bytes of the records after the committed cursor
    disk_bytes: int
    segments: int
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> records
    oldest_pending_age: float | None  # seconds; None when nothing is pending
    last_sequence: int
    committed_sequence: int
    durable_sequence: int

    def to_json(self) -> dict[str, Any]:
        """The control channel's form (camelCase, as the agent's other answers)."""
        return {
            "name": self.name,
            "priority": self.priority,
            "fullPolicy": self.full_policy,
            "maxBytes": self.max_bytes,
            "ttlSeconds": self.ttl_seconds,
            "appended": self.appended,
            "exported": self.exported,
            "deadLettered": self.dead_lettered,
            "pending": self.pending,
            "pendingBytes": self.pending_bytes,
            "diskBytes": self.disk_bytes,
            "segments": self.segments,
            "dropped": dict(self.dropped),
            "oldestPendingAge": self.oldest_pending_age,
            "lastSequence": self.last_sequence,
            "committedSequence": self.committed_sequence,
            "durableSequence": self.durable_sequence,
        }


class Stream:
    """A durable, bounded stream; made and owned by a ``Spool``."""

    def __init__(
        self,
        folder: Path,
        config: StreamConfig,
        *,
        clock: Callable[[], float],
        first_sequence: Callable[[], int] = lambda: 1,
        fsync: Callable[[int], None],
        fsync_records: int,
        kick: Callable[[], None],
        dead_letters: Callable[[], Stream],
    ) -> None:
        self.folder = folder
        self.config = config
        self.name = config.name
        self._clock = clock
        self._first_sequence = first_sequence
        self._fsync = fsync
        self._fsync_records = fsync_records
        self._kick = kick
        self._dead_letters = dead_letters
        self._segment_size = config.segment_size
        self._max_bytes = config.max_bytes
        self._reject = config.full_policy is FullPolicy.REJECT_NEW
        self._lock = threading.Lock()
        self._sync_lock = threading.Lock()  # one sync at a time; close waits for it
        self._files = SegmentFiles(folder, fsync)
        self._next = 1
        self._last_ts = 0
        self._committed = 0
        self._cursor: Position = (0, HEAD)  # where the record after _committed is
        self._hint: tuple[int, Position] | None = None  # (after, position) where a read ended
        self._head_ts: int | None = None  # timestamp of the first pending record, once read
        self._durable = 0
        self._unsynced = 0
        self._kicked = False
        self._state_unsynced = False
        self._waiters: list[tuple[int, Future[None]]] = []
        self._failed: SpoolError | None = None
        self._closed = False
        self._appended = 0
        self._exported = 0
        self._dead_lettered = 0
        self._dropped: dict[str, int] = {}
        # Sequence ranges already counted (dead-lettered, lost to damage) that the cursor
        # has not passed yet: passing them must not count them again.
        self._counted: list[tuple[int, int]] = []
        self._changed = False  # counters ``state.json`` does not have yet
        self._damaged: set[tuple[int, int]] = set()  # damage already counted
        self._open()

    # -- writing ------------------------------------------------------------------------
    def append(self, payload: bytes) -> int:
        """Store ``payload``; its sequence number, once the kernel has it (see ``spool``)."""
        size = FRAME_HEADER.size + len(payload)
        with self._lock:
            self._check_usable()
            if size > self._segment_size - HEAD:
                raise ValidationError(
                    f"a record of {len(payload)} bytes does not fit in stream {self.name!r}'s "
                    f"segments of {self._segment_size} bytes; split it or raise segment_bytes",
                    field="payload",
                )
            files = self._files
            roll = files.tail.size + size > self._segment_size
            if files.disk + size + (HEAD if roll else 0) > self._max_bytes:
                roll = self._make_room(size, roll)
            if roll:
                self._roll()
            sequence = self._next
            stamp = int(self._clock() * 1000)
            if stamp < self._last_ts:
                stamp = self._last_ts
            try:
                files.write(encode_frame(sequence, stamp, payload), sequence)
            except OSError as err:
                if files.broken:
                    self._failed = SpoolError(
                        f"stream {self.name!r}: a failed write could not be undone; appends "
                        "are refused until the agent restarts"
                    )
                raise SpoolError(
                    f"stream {self.name!r}: cannot write to {self.folder}: {err.strerror}; "
                    "the record was not accepted"
                ) from err
            self._next = sequence + 1
            self._last_ts = stamp
            self._appended += 1
            self._unsynced += 1
            if self._unsynced >= self._fsync_records and not self._kicked:
                self._kicked = True
                self._kick()
            return sequence

    async def append_durable(self, payload: bytes) -> int:
        """``append``, then wait (without blocking the loop) until the record is fsynced."""
        sequence = self.append(payload)
        await asyncio.wrap_future(self.durable_future(sequence))
        return sequence

    def flush(self, timeout: float | None = None) -> None:
        """Return once every record appended before the call is fsynced (by this thread,
        which blocks: from the event loop, use ``aflush``)."""
        future = self.durable_future(kick=False)
        if not future.done():
            self.sync()
        future.result(timeout)

    async def aflush(self) -> None:
        """``flush`` for the event loop."""
        await asyncio.wrap_future(self.durable_future())

    def durable_future(self, sequence: int | None = None, *, kick: bool = True) -> Future[None]:
        """A future done once ``sequence`` (default: the last appended) is fsynced; ``kick``
        wakes the fsync thread at once rather than at its next interval."""
        future: Future[None] = Future()
        with self._lock:
            target = self._next - 1 if sequence is None else sequence
            if self._failed is not None:
                future.set_exception(self._failed)
            elif target <= self._durable:
                future.set_result(None)
            elif self._closed:
                future.set_exception(SpoolError(f"stream {self.name!r} is closed"))
            else:
                self._waiters.append((target, future))
        if kick and not future.done():
            self._kick()
        return future

    def dead_letter(self, record: Record, reason: str, timeout: float | None = None) -> int:
        """Keep ``record`` in the dead-letter stream with ``reason``, fsynced, so that the
        exporter may commit past it; the dead-letter record's sequence. It waits for one
        fsync: from the event loop, use ``adead_letter``."""
        stream, sequence = self._send_to_dead_letters(record, reason)
        stream.durable_future(sequence).result(timeout)
        return sequence

    async def adead_letter(self, record: Record, reason: str) -> int:
        """``dead_letter`` for the event loop."""
        stream, sequence = self._send_to_dead_letters(record, reason)
        await asyncio.wrap_future(stream.durable_future(sequence))
        return sequence

    def _send_to_dead_letters(self, record: Record, reason: str) -> tuple[Stream, int]:
        if self.name == DEAD_LETTER:
            raise SpoolError(
                "records of the dead-letter stream cannot be dead-lettered themselves: "
                "they would come back forever"
            )
        letter = DeadLetter(self.name, record.sequence, record.timestamp_ms, reason, record.payload)
        stream = self._dead_letters()
        sequence = stream.append(letter.encode())
        with self._lock:
            if record.sequence > self._committed and self._settle(
                record.sequence, after=record.sequence - 1
            ):  # else already counted (say, as expired, or dead-lettered before)
                self._dead_lettered += 1
                self._counted.append((record.sequence, record.sequence))
                self._write_state()  # so that a restart does not offer the record again
        return stream, sequence

    # -- reading ------------------------------------------------------------------------
    def read_batch(
        self, max_records: int = 500, max_bytes: int = 1024 * 1024, *, after: int | None = None
    ) -> list[Record]:
        """Up to ``max_records`` fsynced records (and about ``max_bytes`` of payload) after
        the committed cursor, or after ``after`` to read ahead of it; expired ones dropped."""
        with self._lock:
            self._check_open()
            self._expire()
            start = self._committed if after is None or after < self._committed else after
            if start == self._committed:
                position = self._cursor
            elif self._hint is not None and self._hint[0] == start:
                position = self._hint[1]
            else:
                position = self._files.locate(start)
            batch = self._files.read(
                position,
                after=start,
                max_records=max_records,
                max_bytes=max_bytes,
                max_sequence=self._durable,
            )
            self._count_damage(batch)
            records = batch.records
            if self._counted:  # dead-lettered records are not offered again
                records = [r for r in records if not self._is_counted(r.sequence)]
            if records and records[-1] is batch.records[-1]:
                self._hint = (records[-1].sequence, batch.position)
            return records

    def commit(self, upto: int) -> None:
        """Mark every record up to ``upto`` exported (the cloud acknowledged them)."""
        with self._lock:
            self._check_open()
            if upto <= self._committed:
                return
            if upto > self._durable:
                raise SpoolError(
                    f"stream {self.name!r}: cannot commit up to {upto}: records after "
                    f"{self._durable} cannot have been read yet (they are not on disk)"
                )
            if self._hint is not None and self._hint[0] == upto:
                position = self._hint[1]
            else:
                position = self._files.locate(upto)
            self._exported += self._settle(upto)
            self._advance(upto, position)
            self._write_state()
            self._drop_consumed()

    def sweep(self) -> None:
        """Drop expired records, and save changed counters (the fsync thread calls it)."""
        with self._lock:
            if self._closed or self._failed is not None:
                return
            self._expire()
            if self._changed:
                self._write_state()

    def metrics(self) -> StreamMetrics:
        """The stream's counters now."""
        with self._lock:
            self._check_open()
            head = self._head_timestamp()
            age = None if head is None else max(0.0, self._clock() - head / 1000)
            return StreamMetrics(
                name=self.name,
                priority=self.config.priority,
                full_policy=self.config.full_policy.value,
                max_bytes=self._max_bytes,
                ttl_seconds=self.config.ttl_seconds,
                appended=self._appended,
                exported=self._exported,
                dead_lettered=self._dead_lettered,
                pending=self._settle(self._next - 1),
                pending_bytes=self._files.bytes_from(self._cursor),
                disk_bytes=self._files.disk,
                segments=len(self._files.segments),
                dropped=dict(self._dropped),
                oldest_pending_age=age,
                last_sequence=self._next - 1,
                committed_sequence=self._committed,
                durable_sequence=self._durable,
            )

    # -- fsync --------------------------------------------------------------------------
    def sync(self) -> None:
        """Fsync what was written since the last sync, then wake who waits for it."""
        with self._sync_lock:
            with self._lock:
                if self._closed:
                    return
                target = self._next - 1
                sealing = self._files.take_sealing()
                folder, self._files.dir_dirty = self._files.dir_dirty, False
                state, self._state_unsynced = self._state_unsynced, False
                fd = self._files.fd
                self._unsynced = 0
                self._kicked = False
            if target <= self._durable and not (sealing or folder or state):
                return
            try:
                try:
                    for sealed in sealing:
                        self._fsync(sealed)
                finally:
                    for sealed in sealing:
                        os.close(sealed)
                if target > self._durable:
                    self._fsync(fd)
                if state:
                    self._files.fsync_path(self.folder / STATE_FILE)
                if folder:
                    self._files.fsync_path(self.folder)
            except OSError as err:
                self._fail(err)
                return
            with self._lock:
                self._durable = max(self._durable, target)
                done = [f for t, f in self._waiters if t <= self._durable]
                self._waiters = [(t, f) for t, f in self._waiters if t > self._durable]
            for future in done:
                future.set_result(None)

    def _fail(self, err: OSError) -> None:
        # After a failed fsync the kernel may have dropped the dirty pages: nothing after
        # the last good fsync can be promised any more. Refuse appends until a restart
        # recovers the stream from what is really on disk.
        failure = SpoolError(
            f"stream {self.name!r}: fsync failed ({err.strerror or err}); appends are "
            "refused until the agent restarts"
        )
        log.error("%s", failure)
        with self._lock:
            self._failed = failure
            waiters, self._waiters = self._waiters, []
        for _, future in waiters:
            future.set_exception(failure)

    def close(self) -> None:
        """Fsync, save the state and close the files."""
        if self._failed is None:
            self.sync()
        with self._sync_lock, self._lock:
            if self._closed:
                return
            if self._failed is None:
                try:
                    self._write_state()
                except SpoolError as err:
                    log.error("%s", err)  # the counters since the last save are lost
            self._closed = True
            self._files.close()
            waiters, self._waiters = self._waiters, []
        for _, future in waiters:
            future.set_exception(SpoolError(f"stream {self.name!r} closed"))

    # -- opening ------------------------------------------------------------------------
    def _open(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        for path in self.folder.glob(f".{STATE_FILE}.*"):
            path.unlink()  # the temp file of a state write that a crash interrupted
        state = self._load_state()
        committed = int(state.get("committed", 0))
        saved_last = int(state.get("lastSequence", 0))
        floor = max(committed, saved_last)
        if not state:
            # A new stream, or one that lost its state (a wiped or damaged spool): the cloud
            # may hold sequences it used before, so start above them (time-based).
            floor = saved_last = max(0, self._first_sequence() - 1)
        # Numbering resumes above anything the cloud may have seen (module docstring).
        self._next, last_ts = self._files.open(floor)
        self._last_ts = max(last_ts, int(state.get("lastTimestamp", 0)))
        self._durable = self._next - 1
        self._committed = max(committed, self._files.segments[0].first - 1)
        cursor = state.get("cursor")
        if (
            isinstance(cursor, list)
            and len(cursor) == 2
            and self._files.check((int(cursor[0]), int(cursor[1])), self._committed)
        ):
            self._cursor = self._files.normal((int(cursor[0]), int(cursor[1])))
        else:
            self._cursor = self._files.locate(self._committed)
        self._appended = int(state.get("appended", 0)) + max(0, self._next - 1 - saved_last)
        self._exported = int(state.get("exported", 0))
        self._dead_lettered = int(state.get("deadLettered", 0))
        self._dropped = {str(k): int(v) for k, v in dict(state.get("dropped", {})).items()}
        self._counted = [
            (int(first), int(last))
            for first, last in state.get("counted", [])
            if int(last) > self._committed
        ]
        if not state:
            self._write_state()  # so that a crash now does not make the next start anew

    def _load_state(self) -> dict[str, Any]:
        path = self.folder / STATE_FILE
        try:
            state = json.loads(path.read_bytes())
            if isinstance(state, dict):
                return state
        except FileNotFoundError:
            return {}
        except ValueError:
            pass
        log.warning(
            "stream %s: %s is damaged; its records are exported again from the oldest "
            "segment (the cloud drops the duplicates)",
            self.name,
            path,
        )
        return {}

    # -- limits -------------------------------------------------------------------------
    def _make_room(self, size: int, roll: bool) -> bool:
        """The stream is full: make room for a record of ``size`` bytes or raise; whether
        a new segment must still be started for it."""
        files = self._files
        self._expire()  # expired records make room before anything is refused or overwritten
        if files.disk + size + (HEAD if roll else 0) <= self._max_bytes:
            return roll
        if self._committed == self._next - 1 and files.tail.size > HEAD:
            # Everything exported, yet full (the limit was lowered): start a fresh tail so
            # that the old one can go.
            self._roll()
            self._cursor = files.normal(self._cursor)
            self._drop_consumed()
            roll = False
            if files.disk + size <= self._max_bytes:
                return roll
        if self._reject:
            self._drop(DROPPED_REJECTED, 1)
            raise StreamFullError(
                self.name, self._max_bytes, files.disk, files.bytes_from(self._cursor)
            )
        if roll:
            self._roll()
        dropped = False
        while files.disk + size > self._max_bytes and len(files.segments) > 1:
            oldest = files.segments[0]
            lost = self._settle(oldest.last)
            if lost:
                self._drop(DROPPED_OVERWRITTEN, lost)
            if self._committed < oldest.last:
                self._advance(oldest.last, (files.segments[1].first, HEAD))
            self._remove_first()
            dropped = True
        if dropped:
            self._write_state()
        return False

    def _roll(self) -> None:
        try:
            self._files.roll(self._next)
        except OSError as err:
            raise SpoolError(
                f"stream {self.name!r}: cannot start a segment in {self.folder}: "
                f"{err.strerror}; the record was not accepted"
            ) from err

    def _drop_consumed(self) -> None:
        """Delete the sealed segments wholly before the cursor."""
        while len(self._files.segments) > 1 and self._files.segments[0].first < self._cursor[0]:
            self._remove_first()

    def _remove_first(self) -> None:
        removed = self._files.remove_first()
        if self._hint is not None and self._hint[1][0] == removed.first:
            self._hint = None

    def _expire(self) -> None:
        """Drop the head records older than the time to live."""
        ttl = self.config.ttl_seconds
        if ttl is None:
            return
        cutoff = int(self._clock() * 1000) - int(ttl * 1000)
        head = self._head_timestamp()
        if head is None or head >= cutoff:
            return
        files = self._files
        before = self._committed
        expired = 0
        while True:
            # Timestamps never go backwards: a segment is wholly expired when the first
            # record of the next one is, and is dropped unread.
            index = files.index(self._cursor[0])
            if index + 1 == len(files.segments):
                break
            following = files.segments[index + 1]
            stamp = files.first_timestamp(following)
            if stamp is None or stamp >= cutoff:
                break
            upto = max(self._committed, files.segments[index].last)
            expired += self._settle(upto)
            self._advance(upto, (following.first, HEAD))
        batch = files.read(
            self._cursor, after=self._committed, max_records=1 << 30, min_timestamp=cutoff
        )
        self._count_damage(batch)
        if batch.records:
            expired += self._settle(batch.records[-1].sequence)
            self._advance(batch.records[-1].sequence, batch.position)
        if expired:
            self._drop(DROPPED_EXPIRED, expired)
        if self._committed != before:
            self._write_state()
            self._drop_consumed()

    def _count_damage(self, batch: Batch) -> None:
        for damage in batch.damage:
            if (damage.segment, damage.offset) in self._damaged:
                continue
            self._damaged.add((damage.segment, damage.offset))
            self._drop(DROPPED_CORRUPT, damage.lost)
            if damage.lost:
                self._counted.append((damage.last - damage.lost + 1, damage.last))
            log.error(
                "stream %s: %s at byte %d of segment %d; %d record(s) after it are lost",
                self.name,
                damage.problem,
                damage.offset,
                damage.segment,
                damage.lost,
            )

    # -- bookkeeping --------------------------------------------------------------------
    def _settle(self, upto: int, *, after: int | None = None) -> int:
        """Records in (after, upto] (after: the committed cursor) not counted already."""
        low = self._committed if after is None else after
        total = self._files.count(low, upto)
        for first, last in self._counted:
            overlap = min(last, upto) - max(first, low + 1) + 1
            if overlap > 0:
                total -= overlap
        return max(0, total)

    def _is_counted(self, sequence: int) -> bool:
        return any(first <= sequence <= last for first, last in self._counted)

    def _advance(self, committed: int, position: Position) -> None:
        self._committed = committed
        self._cursor = self._files.normal(position)
        self._head_ts = None
        if self._counted:
            self._counted = [(f, last) for f, last in self._counted if last > committed]

    def _head_timestamp(self) -> int | None:
        if self._head_ts is None and self._committed < self._next - 1:
            self._head_ts = self._files.timestamp_at(self._cursor)
        return self._head_ts

    def _write_state(self) -> None:
        state = {
            "format": 1,
            "committed": self._committed,
            "cursor": list(self._cursor),
            "lastSequence": self._next - 1,
            "lastTimestamp": self._last_ts,
            "appended": self._appended,
            "exported": self._exported,
            "deadLettered": self._dead_lettered,
            "dropped": self._dropped,
            "counted": self._counted,
        }
        try:
            # Not fsynced here (the append path must not wait): the next sync does it.
            write_bytes_atomic(
                self.folder / STATE_FILE, json.dumps(state).encode(), mode=0o600, fsync=False
            )
        except OSError as err:
            raise SpoolError(
                f"stream {self.name!r}: cannot save {self.folder / STATE_FILE}: {err.strerror}"
            ) from err
        self._state_unsynced = True
        self._files.dir_dirty = True
        self._changed = False

    def _drop(self, reason: str, count: int) -> None:
        self._dropped[reason] = self._dropped.get(reason, 0) + count
        self._changed = True

    def _check_open(self) -> None:
        if self._closed:
            raise SpoolError(f"stream {self.name!r} is closed")

    def _check_usable(self) -> None:
        self._check_open()
        if self._failed is not None:
            raise self._failed


__all__ = [
    "DROPPED_CORRUPT",
    "DROPPED_EXPIRED",
    "DROPPED_OVERWRITTEN",
    "DROPPED_REJECTED",
    "SpoolError",
    "Stream",
    "StreamFullError",
    "StreamMetrics",
]
