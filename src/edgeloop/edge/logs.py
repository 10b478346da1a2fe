"""Per-component log files: size-capped rotation, tail, and follow.

A log line reads ``2026-11-22T02:48:05.123Z [stdout] text``. ``x.log`` rotates to
``x.log.1`` … ``x.log.<backups>``, so one component's logs never take much more than
``(backups + 1) * max_bytes`` of disk.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncGenerator, Callable
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import IO

__all__ = ["DEFAULT_BACKUPS", "DEFAULT_MAX_BYTES", "RotatingLog", "follow", "tail_lines"]

DEFAULT_MAX_BYTES = 1 << 20
DEFAULT_BACKUPS = 3

_BLOCK = 1 << 16
_TRUNCATED = " ...[truncated]"


def _utcnow() -> datetime:
    return datetime.now(UTC)


def format_timestamp(moment: datetime) -> str:
    """``2026-11-22T02:48:05.123Z``: UTC, milliseconds."""
    utc = moment.astimezone(UTC)
    return f"{utc:%Y-%m-%dT%H:%M:%S}.{utc.microsecond // 1000:03d}Z"


def rotated_path(path: Path, index: int) -> Path:
    """``x.log`` for 0, ``x.log.<index>`` for older files."""
    return path if index == 0 else path.with_name(f"{path.name}.{index}")


class RotatingLog:
    """One component's log file, rotated by size; owned by a single task (not thread-safe)."""

    def __init__(
        self,
        path: Path,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        backups: int = DEFAULT_BACKUPS,
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        if max_bytes < 128:
            raise ValueError(f"max_bytes must be at least 128, not {max_bytes}")
        if backups < 0:
            raise ValueError(f"backups must not be negative, not {backups}")
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self._clock = clock
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[bytes] | None = None
        self._size = 0
        self._open()

    def _open(self) -> None:
        # Unbuffered: each record is one write(2), so readers (tail, follow) see whole
        # lines at once and nothing is lost in a buffer if the agent dies.
        self._file = open(self.path, "ab", buffering=0)  # noqa: SIM115 - kept open on purpose
        self._size = self._file.seek(0, os.SEEK_END)

    def write_line(self, stream: str, line: str) -> None:
        """Append one line (several if ``line`` has newlines) from ``stream``."""
        if self._file is None:
            raise ValueError(f"log {self.path} is closed")
        prefix = f"{format_timestamp(self._clock())} [{stream}] ".encode()
        for part in line.rstrip("\r\n").split("\n"):
            record = prefix + part.rstrip("\r").encode("utf-8", "replace") + b"\n"
            if len(record) > self.max_bytes:
                # One line may not break the cap: keep its head, say it was cut.
                marker = _TRUNCATED.encode() + b"\n"
                head = record[: self.max_bytes - len(marker)]
                record = head.decode("utf-8", "ignore").encode() + marker
            if self._size + len(record) > self.max_bytes and self._size > 0:
                self._rotate()
            self._write(record)

    def _write(self, record: bytes) -> None:
        assert self._file is not None
        view = memoryview(record)
        while view:
            view = view[self._file.write(view) :]
        self._size += len(record)

    def _rotate(self) -> None:
        assert self._file is not None
        self._file.close()
        self._file = None
        if self.backups == 0:
            self.path.unlink(missing_ok=True)
        else:
            rotated_path(self.path, self.backups).unlink(missing_ok=True)
            for index in range(self.backups - 1, -1, -1):
                older = rotated_path(self.path, index)
                if older.exists():
                    os.replace(older, rotated_path(self.path, index + 1))
        self._open()

    @property
    def size(self) -> int:
        """Bytes in the current file."""
        return self._size

    def close(self) -> None:
        """Close the file; further writes raise ValueError."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> RotatingLog:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def tail_lines(path: Path, n: int) -> list[str]:
    """The last ``n`` lines of a log, oldest first, reaching into rotated files if needed."""
    if n <= 0:
        return []
    lines: list[str] = []
    index = 0
    while len(lines) < n:
        current = rotated_path(path, index)
        try:
            older = _tail_file(current, n - len(lines))
        except FileNotFoundError:
            if index > 0:  # rotated files are numbered without gaps
                break
            older = []
        lines = older + lines
        index += 1
    return lines


def _tail_file(path: Path, n: int) -> list[str]:
    """Read blocks backwards from the end until ``n`` whole lines are in hand."""
    with open(path, "rb") as f:
        pos = f.seek(0, os.SEEK_END)
        chunks: list[bytes] = []
        newlines = 0
        # n + 1 newlines guarantee n whole lines even when the file ends with a newline.
        while pos > 0 and newlines <= n:
            step = min(_BLOCK, pos)
            pos -= step
            f.seek(pos)
            chunk = f.read(step)
            chunks.append(chunk)
            newlines += chunk.count(b"\n")
    data = b"".join(reversed(chunks))
    parts = data.split(b"\n")
    if parts and parts[-1] == b"":
        parts.pop()
    if pos > 0:
        parts = parts[1:]  # the first piece may be the tail of an earlier line
    return [p.decode("utf-8", "replace") for p in parts[-n:]]


async def follow(
    path: Path, *, poll: float = 0.2, from_start: bool = False
) -> AsyncGenerator[str, None]:
    """Yield lines as they are appended to ``path``, across rotations, until cancelled.

    Starts at the current end of the file (or its start with ``from_start``, or when the
    file does not exist yet). A rotated file is read to its end before the new one is
    opened; if the log rotates twice within one ``poll``, the middle file is skipped.
    """
    file: IO[bytes] | None = None
    pending = b""
    try:
        while True:
            if file is None:
                file = _open_existing(path)
                if file is not None and not from_start:
                    file.seek(0, os.SEEK_END)
                from_start = True  # a file that appears later is new from its first byte
            if file is not None:
                # Checked before reading, so that a file rotated away is drained after
                # its last write: the writer never writes to it again once it is renamed.
                replaced = _replaced(path, file)
                if replaced is False:
                    file.seek(0)  # truncated in place
                    pending = b""
                data = file.read()
                if data:
                    *complete, pending = (pending + data).split(b"\n")
                    for raw in complete:
                        yield raw.decode("utf-8", "replace")
                if replaced:
                    if pending:
                        yield pending.decode("utf-8", "replace")
                        pending = b""
                    file.close()
                    file = None
                    continue
                if data:
                    continue
            await asyncio.sleep(poll)
    finally:
        if file is not None:
            file.close()


def _open_existing(path: Path) -> IO[bytes] | None:
    try:
        return open(path, "rb")  # closed by follow's finally
    except FileNotFoundError:
        return None


def _replaced(path: Path, file: IO[bytes]) -> bool | None:
    """True if ``path`` is now another file, False if it shrank, None if unchanged."""
    try:
        current = os.stat(path)
    except FileNotFoundError:
        return None  # mid-rotation: keep the old file until the new one appears
    mine = os.fstat(file.fileno())
    if (current.st_ino, current.st_dev) != (mine.st_ino, mine.st_dev):
        return True
    if current.st_size < file.tell():
        return False
    return None
