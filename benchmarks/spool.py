"""Durable spool benchmarks: append rates with batched fsync and with durable acks, the
read+commit rate of an exporter, and the time to reopen a backlog.

Every reading is a 100-byte payload appended from one thread, as the agent's event loop
appends. The baselines run in the same process on the same folder: ``os.write`` of the very
frames the spool writes (the kernel's floor, no bookkeeping, no fsync), and SQLite in WAL
mode, the usual embedded alternative, at the same two guarantees (survives kill -9 of the
writer: ``synchronous=NORMAL``; survives a power cut: ``synchronous=FULL``).
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from benchmarks._report import Result, SuiteResult, Target
from edgeloop.edge.spool import Spool, StreamConfig
from edgeloop.edge.spool_segment import encode_frame

READINGS = 200_000  # per timed run of the fast paths
SLOW_READINGS = 300  # per timed run with one fsync per reading
RUNS = 3
PAYLOAD = bytes(range(100))
STREAM = StreamConfig(name="readings", max_bytes=256 * 1024 * 1024)


@dataclass(frozen=True, kw_only=True)
class AtLeast(Target):
    """A lower bound (a rate to reach)."""

    def __str__(self) -> str:
        return f"≥ {self.limit:,.0f} {self.unit}"

    def met_by(self, value: float) -> bool:
        return value >= self.limit


APPEND_TARGET = AtLeast(limit=50_000, unit="readings/s")


def _progress(message: str) -> None:
    print(f"  spool: {message}", file=sys.stderr, flush=True)


@contextmanager
def _folder() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="elb-spool-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _rate(count: int, run: Callable[[Path], float]) -> tuple[float, list[float]]:
    """Median readings/s over RUNS fresh folders; ``run`` returns the seconds it took."""
    rates = []
    for _ in range(RUNS):
        with _folder() as folder:
            rates.append(count / run(folder))
    return statistics.median(rates), rates


def _describe(rate: float, rates: list[float], count: int) -> str:
    spread = f"{min(rates):,.0f} to {max(rates):,.0f}"
    return f"{rate:,.0f} readings/s (median of {len(rates)}: {spread}; {count:,} per run)"


# -- the spool ---------------------------------------------------------------------------
def spool_append(folder: Path) -> float:
    """Appends with the default group commit, until the last one is fsynced."""
    with Spool(folder, [STREAM]) as spool:
        stream = spool.stream("readings")
        append = stream.append
        started = time.perf_counter()
        for _ in range(READINGS):
            append(PAYLOAD)
        stream.flush()
        return time.perf_counter() - started


def spool_durable(batch: int, count: int) -> Callable[[Path], float]:
    """Appends acknowledged only once fsynced: ``flush`` after every ``batch``."""

    def run(folder: Path) -> float:
        with Spool(folder, [STREAM]) as spool:
            stream = spool.stream("readings")
            started = time.perf_counter()
            for _ in range(count // batch):
                for _ in range(batch):
                    stream.append(PAYLOAD)
                stream.flush()
            return time.perf_counter() - started

    return run


def spool_read_commit(folder: Path) -> float:
    """An exporter draining a backlog: batches of 500, each committed."""
    with Spool(folder, [STREAM]) as spool:
        stream = spool.stream("readings")
        for _ in range(READINGS):
            stream.append(PAYLOAD)
        stream.flush()
        started = time.perf_counter()
        while batch := stream.read_batch(500):
            stream.commit(batch[-1].sequence)
        took = time.perf_counter() - started
        if stream.metrics().exported != READINGS:
            raise RuntimeError("the exporter did not see every reading")
        return took


def spool_reopen(folder: Path) -> float:
    """Opening a stream with a backlog, as the agent does at start (recovery included)."""
    with Spool(folder, [STREAM]) as spool:
        stream = spool.stream("readings")
        for _ in range(READINGS):
            stream.append(PAYLOAD)
    started = time.perf_counter()
    Spool(folder, [STREAM]).close()
    return time.perf_counter() - started


# -- baselines ---------------------------------------------------------------------------
def raw_write(folder: Path) -> float:
    """``os.write`` of the spool's own frames, one per reading, never fsynced."""
    frames = [encode_frame(i, 1_700_000_000_000, PAYLOAD) for i in range(1, READINGS + 1)]
    fd = os.open(folder / "raw", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        write = os.write
        started = time.perf_counter()
        for frame in frames:
            write(fd, frame)
        return time.perf_counter() - started
    finally:
        os.close(fd)


def sqlite_insert(synchronous: str, batch: int, count: int) -> Callable[[Path], float]:
    """SQLite WAL inserts of (timestamp, payload), ``batch`` per transaction."""

    def run(folder: Path) -> float:
        db = sqlite3.connect(folder / "spool.db", isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={synchronous}")
            db.execute("CREATE TABLE readings (seq INTEGER PRIMARY KEY, ts INTEGER, payload BLOB)")
            insert = "INSERT INTO readings (ts, payload) VALUES (?, ?)"
            started = time.perf_counter()
            for _ in range(count // batch):
                db.execute("BEGIN")
                for _ in range(batch):
                    db.execute(insert, (int(time.time() * 1000), PAYLOAD))
                db.execute("COMMIT")
            return time.perf_counter() - started
        finally:
            db.close()

    return run


def sqlite_read_delete(folder: Path) -> float:
    """SQLite WAL: select 500 in order, then delete them, per batch."""
    db = sqlite3.connect(folder / "spool.db", isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("CREATE TABLE readings (seq INTEGER PRIMARY KEY, ts INTEGER, payload BLOB)")
        db.execute("BEGIN")
        db.executemany(
            "INSERT INTO readings (ts, payload) VALUES (?, ?)",
            ((1_700_000_000_000, PAYLOAD) for _ in range(READINGS)),
        )
        db.execute("COMMIT")
        started = time.perf_counter()
        after = 0
        while rows := db.execute(
            "SELECT seq, ts, payload FROM readings WHERE seq > ? ORDER BY seq LIMIT 500", (after,)
        ).fetchall():
            after = rows[-1][0]
            db.execute("DELETE FROM readings WHERE seq <= ?", (after,))
        return time.perf_counter() - started
    finally:
        db.close()


def _filesystem(path: Path) -> str:
    """The file system a folder is on, from /proc/mounts (the longest matching mount)."""
    best = ("", "unknown", "?")
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            device, mount, kind = line.split()[:3]
            if str(path).startswith(mount) and len(mount) > len(best[0]):
                best = (mount, kind, device)
    except OSError:
        pass
    return f"{best[1]} on {best[2]} (mounted at {best[0]})"


def run(out: SuiteResult) -> None:
    """Run the spool benchmarks, adding rows to ``out``."""
    _progress("append, batched fsync")
    append, append_runs = _rate(READINGS, spool_append)
    raw, _ = _rate(READINGS, raw_write)
    lite, _ = _rate(READINGS // 4, sqlite_insert("NORMAL", 1, READINGS // 4))
    out.results.append(
        Result(
            benchmark="durable spool append, 100-byte readings, one thread, "
            "default group commit (fsync every 50 ms or 1,000 records)",
            measured=_describe(append, append_runs, READINGS),
            value=append,
            target=APPEND_TARGET,
            comparison=f"raw os.write of the same frames, no fsync: {raw:,.0f}/s; "
            f"SQLite WAL synchronous=NORMAL, a commit per reading: {lite:,.0f}/s",
        )
    )
    for batch in (1000, 100):
        _progress(f"durable acks every {batch}")
        rate, rates = _rate(READINGS // 4, spool_durable(batch, READINGS // 4))
        lite, _ = _rate(READINGS // 4, sqlite_insert("FULL", batch, READINGS // 4))
        out.results.append(
            Result(
                benchmark=f"durable acks: flush (fsync) after every {batch:,} appends",
                measured=_describe(rate, rates, READINGS // 4),
                comparison=f"SQLite WAL synchronous=FULL, {batch:,} per transaction: {lite:,.0f}/s",
            )
        )
    _progress("durable ack per reading")
    rate, rates = _rate(SLOW_READINGS, spool_durable(1, SLOW_READINGS))
    lite, _ = _rate(SLOW_READINGS, sqlite_insert("FULL", 1, SLOW_READINGS))
    out.results.append(
        Result(
            benchmark="durable ack per reading: flush after each append",
            measured=_describe(rate, rates, SLOW_READINGS),
            comparison=f"SQLite WAL synchronous=FULL, a commit per reading: {lite:,.0f}/s",
        )
    )
    _progress("read + commit")
    rate, rates = _rate(READINGS, spool_read_commit)
    lite, _ = _rate(READINGS, sqlite_read_delete)
    out.results.append(
        Result(
            benchmark="exporter: read_batch(500) + commit, draining a backlog",
            measured=_describe(rate, rates, READINGS),
            comparison=f"SQLite WAL: select 500 in order + delete them: {lite:,.0f}/s",
        )
    )
    _progress("reopen a backlog")
    reopen = []
    for _ in range(RUNS):
        with _folder() as folder:
            reopen.append(spool_reopen(folder))
    out.results.append(
        Result(
            benchmark=f"open a spool holding {READINGS:,} pending readings (agent start)",
            measured=f"median {statistics.median(reopen) * 1000:.0f} ms "
            f"(max {max(reopen) * 1000:.0f} ms, N={RUNS})",
        )
    )
    with _folder() as folder:
        where = _filesystem(folder.resolve())
    out.notes.append(
        f"spool folders under {tempfile.gettempdir()}: {where}. Rates count readings "
        "appended until the last is fsynced; the durable-ack rows wait for an fsync per "
        "flush, so they measure this disk's fsync latency as much as edgeloop."
    )


__all__ = ["run"]
