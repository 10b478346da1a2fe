"""Tests for per-component log files: rotation, tail and follow."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from edgeloop.edge.logs import RotatingLog, follow, format_timestamp, tail_lines

MOMENT = datetime(2026, 11, 22, 2, 48, 5, 123456, tzinfo=UTC)


def fixed_clock() -> datetime:
    return MOMENT


def text_of(line: str) -> str:
    """The text after the ``<timestamp> [stream] `` prefix."""
    return line.split("] ", 1)[1]


# -- RotatingLog -----------------------------------------------------------------------------


def test_line_format(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "com.example.Sensor.log"
    with RotatingLog(path, clock=fixed_clock) as log:
        log.write_line("stdout", "hello")
        log.write_line("stderr", "two\nlines\n")
    assert path.read_text() == (
        "2026-11-22T02:48:05.123Z [stdout] hello\n"
        "2026-11-22T02:48:05.123Z [stderr] two\n"
        "2026-11-22T02:48:05.123Z [stderr] lines\n"
    )


def test_timestamps_are_utc() -> None:
    eastern = timezone(timedelta(hours=-5))
    assert format_timestamp(datetime(2026, 11, 21, 21, 48, 5, 7000, eastern)) == (
        "2026-11-22T02:48:05.007Z"
    )


def test_rotation_caps_disk_use(tmp_path: Path) -> None:
    path = tmp_path / "x.log"
    with RotatingLog(path, max_bytes=300, backups=2, clock=fixed_clock) as log:
        for i in range(200):
            log.write_line("stdout", f"line {i:04d}")
            assert log.size <= 300
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["x.log", "x.log.1", "x.log.2"]
    sizes = [p.stat().st_size for p in tmp_path.iterdir()]
    assert all(size <= 300 for size in sizes)
    assert sum(sizes) <= 3 * 300
    # Rotation only moves whole lines, newest in x.log.
    assert text_of(path.read_text().splitlines()[-1]) == "line 0199"
    newest_rotated = (tmp_path / "x.log.1").read_text().splitlines()
    oldest_current = path.read_text().splitlines()[0]
    assert int(text_of(newest_rotated[-1])[5:]) + 1 == int(text_of(oldest_current)[5:])


def test_reopen_appends_and_counts_existing_size(tmp_path: Path) -> None:
    path = tmp_path / "x.log"
    with RotatingLog(path, max_bytes=200, clock=fixed_clock) as log:
        log.write_line("stdout", "first")
    with RotatingLog(path, max_bytes=200, clock=fixed_clock) as log:
        assert log.size == path.stat().st_size
        log.write_line("stdout", "second")
    assert [text_of(line) for line in path.read_text().splitlines()] == ["first", "second"]


def test_oversized_line_is_truncated_to_the_cap(tmp_path: Path) -> None:
    path = tmp_path / "x.log"
    with RotatingLog(path, max_bytes=200, backups=1, clock=fixed_clock) as log:
        log.write_line("stdout", "é" * 500)
    data = path.read_bytes()
    assert len(data) <= 200
    assert data.decode().endswith("...[truncated]\n")


def test_no_backups_truncates(tmp_path: Path) -> None:
    path = tmp_path / "x.log"
    with RotatingLog(path, max_bytes=150, backups=0, clock=fixed_clock) as log:
        for i in range(20):
            log.write_line("stdout", f"line {i}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.log"]
    assert text_of(path.read_text().splitlines()[-1]) == "line 19"


def test_closed_log_refuses_writes(tmp_path: Path) -> None:
    log = RotatingLog(tmp_path / "x.log")
    log.close()
    log.close()
    with pytest.raises(ValueError, match="closed"):
        log.write_line("stdout", "late")


# -- tail_lines ------------------------------------------------------------------------------


def test_tail_within_one_file(tmp_path: Path) -> None:
    path = tmp_path / "x.log"
    path.write_text("".join(f"l{i}\n" for i in range(10)))
    assert tail_lines(path, 3) == ["l7", "l8", "l9"]
    assert tail_lines(path, 0) == []
    assert tail_lines(path, 50) == [f"l{i}" for i in range(10)]
    assert tail_lines(tmp_path / "absent.log", 5) == []


def test_tail_keeps_a_partial_last_line_and_crosses_blocks(tmp_path: Path) -> None:
    path = tmp_path / "x.log"
    lines = [f"{i:06d} " + "x" * 90 for i in range(3000)]  # ~290 KiB: several read blocks
    path.write_text("\n".join(lines) + "\nunfinished")
    assert tail_lines(path, 1) == ["unfinished"]
    assert tail_lines(path, 1500) == [*lines[-1499:], "unfinished"]


def test_tail_reaches_into_rotated_files(tmp_path: Path) -> None:
    path = tmp_path / "x.log"
    with RotatingLog(path, max_bytes=300, backups=3, clock=fixed_clock) as log:
        for i in range(30):
            log.write_line("stdout", f"line {i:04d}")
    current = len(path.read_text().splitlines())
    assert current < 12
    got = [text_of(line) for line in tail_lines(path, 12)]
    assert got == [f"line {i:04d}" for i in range(18, 30)]
    everything = [text_of(line) for line in tail_lines(path, 1000)]
    assert everything == [f"line {i:04d}" for i in range(30 - len(everything), 30)]


# -- follow ----------------------------------------------------------------------------------


async def _pump(lines: AsyncIterator[str], queue: asyncio.Queue[str]) -> None:
    async for line in lines:
        await queue.put(line)


async def _with_follower(
    path: Path,
    body: Callable[[asyncio.Queue[str]], object],
    *,
    from_start: bool = False,
) -> None:
    queue: asyncio.Queue[str] = asyncio.Queue()
    lines = follow(path, poll=0.01, from_start=from_start)
    task = asyncio.create_task(_pump(lines, queue), name="follow")
    await asyncio.sleep(0)  # let the follower open the file and seek before we write
    try:
        result = body(queue)
        if asyncio.iscoroutine(result):
            await result
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await lines.aclose()


async def _next(queue: asyncio.Queue[str]) -> str:
    async with asyncio.timeout(2):
        return await queue.get()


def test_follow_starts_at_the_end(tmp_path: Path) -> None:
    path = tmp_path / "x.log"

    async def run() -> None:
        log = RotatingLog(path, clock=fixed_clock)
        log.write_line("stdout", "old")

        async def body(queue: asyncio.Queue[str]) -> None:
            log.write_line("stdout", "new")
            assert text_of(await _next(queue)) == "new"

        await _with_follower(path, body)
        log.close()

    asyncio.run(run())


def test_follow_across_rotation(tmp_path: Path) -> None:
    path = tmp_path / "x.log"

    async def run() -> None:
        log = RotatingLog(path, max_bytes=200, backups=1, clock=fixed_clock)

        async def body(queue: asyncio.Queue[str]) -> None:
            for i in range(40):  # ~5 lines per file: many rotations
                log.write_line("stdout", f"line {i:04d}")
                assert text_of(await _next(queue)) == f"line {i:04d}"
            # A burst of lines that rotates once between polls is still read in full.
            for i in range(40, 44):
                log.write_line("stdout", f"line {i:04d}")
            for i in range(40, 44):
                assert text_of(await _next(queue)) == f"line {i:04d}"
            assert queue.empty()

        await _with_follower(path, body, from_start=True)
        log.close()

    asyncio.run(run())


def test_follow_waits_for_the_file_and_rereads_after_truncation(tmp_path: Path) -> None:
    path = tmp_path / "later.log"

    async def run() -> None:
        async def body(queue: asyncio.Queue[str]) -> None:
            await asyncio.sleep(0.03)
            path.write_text("a\nb\n")
            assert [await _next(queue), await _next(queue)] == ["a", "b"]
            path.write_text("c\n")  # truncates in place, as copytruncate would
            assert await _next(queue) == "c"

        await _with_follower(path, body)

    asyncio.run(run())
