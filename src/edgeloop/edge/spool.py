"""The hub's durable store-and-forward spool: bounded streams that survive crashes.

A spool is a folder with one folder per stream, each configured from data
(``StreamConfig``: size limit, full policy, time to live, priority)::

    spool/.lock                           held while a process has the spool open
    spool/<stream>/state.json             committed cursor and counters (atomic replace)
    spool/<stream>/00000000000000000001.seg   append-only segments, named by first sequence
    spool/<stream>/00000000000000004097.seg   ... the last one is the tail

A segment is a header (``ELSPOOL1``, first sequence) then records framed as
``[length u32][crc32 u32][sequence u64][timestamp ms u64][payload]`` (``spool_segment``).
Components ``append``; an exporter ``read_batch``es from the committed cursor and
``commit(upto)``s once the cloud acknowledged; fully committed segments are deleted.
Sequence numbers are per stream, only grow and are never reused, across restarts too:
the cloud deduplicates on (thing, stream, sequence). A new stream (or one whose
``state.json`` was lost) starts at ``first_sequence()``: 1 by default; the agent gives
``time_sequence`` (the current time in microseconds), so that a hub whose spool was wiped
numbers above everything it sent before.

Durability — the guarantee:

* ``append()`` returns once the record is written to its segment with ``write(2)``, i.e.
  handed to the kernel. **A record whose append returned survives kill -9 of the agent**
  (or any crash of the agent alone): the kernel writes it to disk on its own.
* A background thread fsyncs every stream with new records every ``fsync_interval``
  (50 ms by default) and as soon as ``fsync_records`` (1,000) records wait for it: group
  commit, off the event loop. **A record survives a power cut or a kernel crash once it is
  fsynced.** A power cut can take only records appended since the last fsync (under
  normal load, the last 50 ms); such a record is lost whole, never torn, and nothing
  fsynced before it is touched. ``flush()`` / ``await aflush()`` return when every record
  appended before the call is fsynced, ``await append_durable()`` when its record is: for
  callers that must not acknowledge what a power cut could take back. (This presumes
  storage that honours fsync; SD cards without power-loss protection may not.)
* Readers only ever see fsynced records, so the cloud never holds a record a power cut
  could take from the hub, and a sequence number the cloud has seen is never reused:
  after a restart numbering resumes above the last record on disk, the committed cursor and
  the last sequence ``state.json`` recorded.
* On open, the tail segment is scanned and cut back to its last whole record with a valid
  CRC (a torn record is one whose append never returned, or one not yet fsynced at a power
  cut); every segment and the folder are then fsynced, so all that was found is durable.
* ``commit()`` replaces ``state.json`` atomically (temp file, rename) at once and fsyncs it
  with the next group commit. A commit lost to a crash means records are exported again:
  duplicates the cloud drops. ``dead_letter(record, reason)`` returns once the dead-letter
  copy is fsynced, so a commit past the record can never outlive the copy; the record is
  not offered to readers again, restarts included.

Nothing accepted leaves a stream but by an acknowledged commit, a dead letter, or a counted
drop: "overwritten" and "expired" (by policy), "corrupt" (damage found on disk);
"rejected: full" counts appends refused, which were never accepted.

Full streams: ``reject-new`` makes ``append`` raise ``StreamFullError`` (naming the stream,
its limit and what waits for export); ``overwrite-oldest`` deletes whole oldest segments.
The limit counts the stream's segment files. Expired records (older than the time to live)
are dropped from the head of the stream when it is read and by a sweep every 5 s;
timestamps in a stream never go backwards (a clock stepped back stamps records with the
stream's last timestamp until it catches up), so expired records are always at the head.
``priority`` (1 first .. 10 last) orders ``Spool.streams`` for the exporter.

The API is synchronous, cheap and thread-safe; appends never wait for the disk, so the
agent's event loop calls them directly. ``SpoolError`` and ``StreamFullError`` are
``EdgeloopError``s; a bad record (too large for a segment) is a ``ValidationError``.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from types import TracebackType

from edgeloop.core.errors import EdgeloopError
from edgeloop.edge.spool_config import DEAD_LETTER, StreamConfig, dead_letter_config
from edgeloop.edge.spool_stream import (
    DROPPED_CORRUPT,
    DROPPED_EXPIRED,
    DROPPED_OVERWRITTEN,
    DROPPED_REJECTED,
    SpoolError,
    Stream,
    StreamFullError,
    StreamMetrics,
)

log = logging.getLogger("edgeloop.spool")

LOCK_FILE = ".lock"


class Spool:
    """A folder of durable streams, with the thread that fsyncs them in batches."""

    def __init__(
        self,
        folder: Path,
        streams: Iterable[StreamConfig] = (),
        *,
        clock: Callable[[], float] = time.time,
        first_sequence: Callable[[], int] = lambda: 1,
        fsync: Callable[[int], None] = os.fsync,
        fsync_interval: float = 0.05,
        fsync_records: int = 1000,
        sweep_interval: float = 5.0,
    ) -> None:
        if fsync_interval <= 0 or fsync_records < 1 or sweep_interval <= 0:
            raise ValueError("fsync_interval and sweep_interval > 0, fsync_records >= 1")
        self.folder = folder
        self._fsync_interval = fsync_interval
        self._sweep_interval = sweep_interval
        folder.mkdir(parents=True, exist_ok=True)
        self._lock_fd = _lock_folder(folder)
        configs = {config.name: config for config in streams}
        configs.setdefault(DEAD_LETTER, dead_letter_config())
        for path in sorted(folder.iterdir()):
            if path.is_dir() and path.name not in configs:
                # A stream no longer declared still holds accepted records: keep exporting.
                try:
                    configs[path.name] = StreamConfig(name=path.name)
                except EdgeloopError:
                    continue  # not a stream's folder
                log.warning("stream %s is not declared; kept with default limits", path.name)
        self._streams: dict[str, Stream] = {}
        self._wake = threading.Event()
        self._stopping = False
        try:
            for name, config in configs.items():
                self._streams[name] = Stream(
                    folder / name,
                    config,
                    clock=clock,
                    first_sequence=first_sequence,
                    fsync=fsync,
                    fsync_records=fsync_records,
                    kick=self._wake.set,
                    dead_letters=self._dead_letter_stream,
                )
        except BaseException:
            for stream in self._streams.values():
                stream.close()
            os.close(self._lock_fd)
            raise
        self._thread = threading.Thread(target=self._flush_loop, name="spool-fsync", daemon=True)
        self._thread.start()

    def stream(self, name: str) -> Stream:
        """The stream called ``name``; SpoolError naming the known ones otherwise."""
        try:
            return self._streams[name]
        except KeyError:
            known = ", ".join(sorted(self._streams))
            raise SpoolError(
                f"no stream {name!r} in the spool at {self.folder} (streams: {known}); "
                'declare it in agent.json under "streams"'
            ) from None

    @property
    def streams(self) -> list[Stream]:
        """Every stream, in export order: priority 1 first, then by name."""
        return sorted(self._streams.values(), key=lambda s: (s.config.priority, s.name))

    def metrics(self) -> list[StreamMetrics]:
        """Each stream's counters, in export order."""
        return [stream.metrics() for stream in self.streams]

    def flush(self, timeout: float | None = None) -> None:
        """Return once every record appended before the call is fsynced (blocking: from
        the event loop, use ``aflush``)."""
        for stream in self._streams.values():
            stream.flush(timeout)

    async def aflush(self) -> None:
        """``flush`` for the event loop: waits without blocking it."""
        futures = [stream.durable_future() for stream in self._streams.values()]
        self._wake.set()
        await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))

    def close(self) -> None:
        """Fsync and close every stream, and stop the fsync thread."""
        if self._stopping:
            return
        self._stopping = True
        self._wake.set()
        self._thread.join()
        for stream in self._streams.values():
            stream.close()
        os.close(self._lock_fd)

    def __enter__(self) -> Spool:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _dead_letter_stream(self) -> Stream:
        return self._streams[DEAD_LETTER]

    def _flush_loop(self) -> None:
        next_sweep = time.monotonic() + self._sweep_interval
        while not self._stopping:
            self._wake.wait(self._fsync_interval)
            self._wake.clear()
            for stream in list(self._streams.values()):
                try:
                    stream.sync()
                except Exception:  # the thread must outlive any one failure; sync logs it
                    log.exception("fsync of stream %s failed", stream.name)
            if time.monotonic() >= next_sweep:
                next_sweep = time.monotonic() + self._sweep_interval
                for stream in list(self._streams.values()):
                    try:
                        stream.sweep()
                    except Exception:
                        log.exception("sweep of stream %s failed", stream.name)


def time_sequence() -> int:
    """The current time in microseconds: a new stream's first sequence that is above any a
    wiped spool on this hub handed out before (given a clock that does not go back)."""
    return time.time_ns() // 1000


def _lock_folder(folder: Path) -> int:
    """Hold an exclusive lock on the spool, so two processes never append to one stream."""
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise SpoolError(
            f"the spool at {folder} is in use by another process (is another agent running "
            "for this hub?)"
        ) from None
    return fd


__all__ = [
    "DEAD_LETTER",
    "DROPPED_CORRUPT",
    "DROPPED_EXPIRED",
    "DROPPED_OVERWRITTEN",
    "DROPPED_REJECTED",
    "Spool",
    "SpoolError",
    "Stream",
    "StreamConfig",
    "StreamFullError",
    "StreamMetrics",
    "time_sequence",
]
