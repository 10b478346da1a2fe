"""The hub's durable spool: round trips, sequence numbers across restarts, kill -9 of a real
writer, torn tails, full policies, expiry, dead letters, commits, batched fsync, and a
property test of append/read/commit/reopen against a model."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeloop.core.errors import ValidationError
from edgeloop.edge.spool import (
    DEAD_LETTER,
    DROPPED_CORRUPT,
    DROPPED_EXPIRED,
    DROPPED_OVERWRITTEN,
    DROPPED_REJECTED,
    Spool,
    SpoolError,
    StreamConfig,
    StreamFullError,
)
from edgeloop.edge.spool_config import FullPolicy, parse_streams
from edgeloop.edge.spool_segment import FRAME_HEADER, SEGMENT_HEADER, DeadLetter, Record

SMALL = 4096  # the smallest segment: many segments from few records


class Clock:
    """A wall clock the test moves by hand."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def frame(payload: bytes) -> int:
    return FRAME_HEADER.size + len(payload)


def drain(stream: object, batch: int = 1000) -> list[Record]:
    """Every readable record after the committed cursor, without committing."""
    out: list[Record] = []
    after = None
    while True:
        records = stream.read_batch(batch, after=after)  # type: ignore[attr-defined]
        if not records:
            return out
        out += records
        after = records[-1].sequence


class Spools:
    """Spools opened on one folder, as an agent opens it at each start."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.opened: list[Spool] = []

    def open(self, *configs: StreamConfig, **options: Any) -> Spool:
        spool = Spool(self.folder, configs, **options)
        self.opened.append(spool)
        return spool

    def reopen(self, *configs: StreamConfig, **options: Any) -> Spool:
        """Close every open spool (an agent stopping), then open the folder again."""
        self.close()
        return self.open(*configs, **options)

    def close(self) -> None:
        for spool in self.opened:
            spool.close()  # idempotent


@pytest.fixture
def spools(tmp_path: Path) -> Iterator[Spools]:
    """Open spools on one folder; every one still open is closed at the end."""
    made = Spools(tmp_path / "spool")
    yield made
    made.close()


# -- round trip and sequences -----------------------------------------------------------
def test_round_trip(spools: Spools) -> None:
    clock = Clock()
    spool = spools.open(StreamConfig(name="t"), clock=clock)
    stream = spool.stream("t")
    payloads = [b"", b"a", bytes(range(256)) * 4, b"reading 3"]
    sequences = []
    for payload in payloads:
        sequences.append(stream.append(payload))
        clock.now += 0.25
    assert sequences == [1, 2, 3, 4]
    stream.flush()
    records = stream.read_batch()
    assert [r.payload for r in records] == payloads
    assert [r.sequence for r in records] == sequences
    assert [r.timestamp_ms for r in records] == [1_700_000_000_000 + 250 * i for i in range(4)]
    assert stream.read_batch(2) == records[:2]
    assert stream.read_batch(10, after=2) == records[2:]


def test_only_fsynced_records_are_read(spools: Spools) -> None:
    gate = threading.Event()

    def slow_fsync(fd: int) -> None:
        gate.wait(10)
        os.fsync(fd)

    gate.set()  # opening fsyncs too
    spool = spools.open(StreamConfig(name="t"), fsync=slow_fsync)
    gate.clear()
    stream = spool.stream("t")
    stream.append(b"one")
    assert stream.read_batch() == []  # on its way to the disk: an exporter must not see it
    with pytest.raises(SpoolError, match="cannot commit up to 1"):
        stream.commit(1)
    gate.set()
    stream.flush()
    assert [r.payload for r in stream.read_batch()] == [b"one"]


def test_sequences_grow_across_reopen_and_are_never_reused(spools: Spools) -> None:
    config = StreamConfig(name="t", max_bytes=64 * 1024, segment_bytes=SMALL)
    stream = spools.open(config).stream("t")
    seen = [stream.append(b"x" * 100) for _ in range(100)]
    stream.flush()
    stream.commit(seen[-1])  # everything exported: its segments are deleted
    for _ in range(3):
        stream = spools.reopen(config).stream("t")
        seen += [stream.append(b"y" * 100) for _ in range(30)]
    assert seen == list(range(1, len(seen) + 1))
    # Even without state.json, numbering resumes above what the segments hold.
    spools.close()
    (spools.folder / "t" / "state.json").unlink()
    stream = spools.open(config).stream("t")
    assert stream.append(b"z") == seen[-1] + 1


def test_a_second_process_cannot_open_the_same_spool(spools: Spools) -> None:
    spools.open()
    with pytest.raises(SpoolError, match="in use by another process"):
        spools.open()


def test_a_record_larger_than_a_segment_is_refused(spools: Spools) -> None:
    stream = spools.open(StreamConfig(name="t", max_bytes=64 * 1024, segment_bytes=SMALL)).stream(
        "t"
    )
    with pytest.raises(ValidationError, match="does not fit in stream 't'"):
        stream.append(b"x" * SMALL)
    assert stream.append(b"fits") == 1


# -- crashes ----------------------------------------------------------------------------
WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from edgeloop.edge.spool import Spool, StreamConfig

    spool = Spool(Path(sys.argv[1]), [StreamConfig(name="k", segment_bytes=16384)])
    stream = spool.stream("k")
    start = int(sys.argv[2])
    for i in range(start, start + 10_000_000):
        sequence = stream.append(f"reading {i}".encode())
        sys.stdout.write(f"{sequence} {i}\\n")
        sys.stdout.flush()
    """
)


@pytest.mark.slow
def test_kill_9_loses_no_record_whose_append_returned(tmp_path: Path) -> None:
    """A real writer appends in a loop and reports each sequence it got back; it is killed
    with SIGKILL at three moments; every reported record is there afterwards, whole."""
    folder = tmp_path / "spool"
    reported: dict[int, str] = {}
    start = 0
    for round_, lines_before_kill in enumerate((500, 3000, 7000)):
        errors = tmp_path / f"writer-{round_}.stderr"
        with open(errors, "wb") as stderr:
            child = subprocess.Popen(
                [sys.executable, "-c", WRITER, str(folder), str(start)],
                stdout=subprocess.PIPE,
                stderr=stderr,
            )
        assert child.stdout is not None
        got = 0
        while got < lines_before_kill:
            line = child.stdout.readline()
            assert line, errors.read_text()
            sequence, index = line.split()
            reported[int(sequence)] = f"reading {int(index)}"
            got += 1
        time.sleep(0.002 * round_)  # let it run on a little, mid-append
        os.kill(child.pid, signal.SIGKILL)
        rest = child.stdout.read()  # what it reported before it died, through the buffer
        child.wait(10)
        child.stdout.close()
        for line in rest.splitlines(keepends=True):
            if line.endswith(b"\n"):  # a line cut by the kill was not reported whole
                sequence, index = line.split()
                reported[int(sequence)] = f"reading {int(index)}"
        assert child.returncode == -signal.SIGKILL
        with Spool(folder, [StreamConfig(name="k", segment_bytes=16384)]) as spool:
            stream = spool.stream("k")
            records = drain(stream)
            metrics = stream.metrics()
            assert metrics.dropped == {}  # nothing torn, nothing damaged
            start = int(records[-1].payload.split()[1]) + 1
        found = {r.sequence: r.payload.decode() for r in records}
        assert [r.sequence for r in records] == list(range(1, len(records) + 1))
        missing = {s: p for s, p in reported.items() if found.get(s) != p}
        assert not missing, f"round {round_}: {len(missing)} reported records missing"
        assert metrics.appended == len(records)


def test_a_torn_tail_is_cut_back_and_earlier_records_kept(spools: Spools) -> None:
    config = StreamConfig(name="t")
    stream = spools.open(config).stream("t")
    for i in range(10):
        stream.append(f"record {i}".encode())
    spools.close()
    segment = next((spools.folder / "t").glob("*.seg"))
    size = segment.stat().st_size
    os.truncate(segment, size - 3)  # the last record cut mid-payload
    stream = spools.open(config).stream("t")
    records = drain(stream)
    assert [r.payload for r in records] == [f"record {i}".encode() for i in range(9)]
    assert segment.stat().st_size == size - frame(b"record 9")
    assert stream.append(b"after") == 11  # 10 may have been seen: never reused
    stream.flush()
    assert drain(stream)[-1] == Record(11, drain(stream)[-1].timestamp_ms, b"after")


def test_garbage_after_the_last_record_is_cut_off(spools: Spools) -> None:
    config = StreamConfig(name="t")
    stream = spools.open(config).stream("t")
    for i in range(5):
        stream.append(f"record {i}".encode())
    spools.close()
    segment = next((spools.folder / "t").glob("*.seg"))
    good = segment.stat().st_size
    with open(segment, "ab") as file:  # a header whose CRC does not match, then noise
        file.write(FRAME_HEADER.pack(5, 123, 6, 0) + b"abcde" + os.urandom(50))
    stream = spools.open(config).stream("t")
    assert [r.sequence for r in drain(stream)] == [1, 2, 3, 4, 5]
    assert segment.stat().st_size == good


def test_a_segment_created_but_empty_at_a_crash_is_repaired(spools: Spools) -> None:
    config = StreamConfig(name="t", max_bytes=64 * 1024, segment_bytes=SMALL)
    stream = spools.open(config).stream("t")
    sequences = [stream.append(b"x" * 1000) for _ in range(3)]
    spools.close()
    folder = spools.folder / "t"
    (folder / f"{sequences[-1] + 1:020d}.seg").write_bytes(b"")  # no header yet
    stream = spools.open(config).stream("t")
    assert [r.sequence for r in drain(stream)] == sequences
    assert stream.append(b"y") == sequences[-1] + 1


def test_a_damaged_sealed_segment_is_skipped_counted_and_reading_goes_on(
    spools: Spools,
) -> None:
    config = StreamConfig(name="t", max_bytes=1 << 20, segment_bytes=SMALL)
    stream = spools.open(config).stream("t")
    for i in range(100):
        stream.append(b"%03d" % i * 30)
    spools.close()
    first, second, *_ = sorted((spools.folder / "t").glob("*.seg"))
    data = bytearray(first.read_bytes())
    middle = SEGMENT_HEADER.size + 5 * frame(b"000" * 30) + FRAME_HEADER.size + 1
    data[middle] ^= 0xFF  # bit rot in the sixth record's payload
    first.write_bytes(bytes(data))
    stream = spools.open(config).stream("t")
    records = drain(stream)
    in_first = int(second.name.removesuffix(".seg")) - 1
    assert [r.sequence for r in records] == [1, 2, 3, 4, 5, *range(in_first + 1, 101)]
    assert stream.metrics().dropped == {DROPPED_CORRUPT: in_first - 5}
    drain(stream)  # counted once, however often it is read
    stream.commit(100)
    metrics = stream.metrics()
    assert metrics.dropped == {DROPPED_CORRUPT: in_first - 5}
    assert metrics.exported == 100 - (in_first - 5) and metrics.pending == 0


# -- full policies ----------------------------------------------------------------------
def test_reject_new_refuses_at_the_limit_and_counts_it(spools: Spools) -> None:
    config = StreamConfig(name="t", max_bytes=16384, segment_bytes=SMALL)
    stream = spools.open(config).stream("t")
    payload = b"r" * 100
    accepted = []
    with pytest.raises(StreamFullError) as info:
        while True:
            accepted.append(stream.append(payload))
    error = info.value
    assert error.stream == "t" and error.max_bytes == 16384
    assert "stream 't' is full" in str(error) and "16384" in str(error)
    assert error.pending_bytes == len(accepted) * frame(payload)
    with pytest.raises(StreamFullError):
        stream.append(payload)
    metrics = stream.metrics()
    assert metrics.dropped == {DROPPED_REJECTED: 2}
    assert metrics.appended == metrics.pending == len(accepted)
    assert metrics.disk_bytes <= 16384
    stream.flush()
    records = drain(stream)
    assert [r.sequence for r in records] == accepted  # nothing stored was lost
    stream.commit(records[len(records) // 2].sequence)
    assert stream.append(payload) == accepted[-1] + 1  # room again once exported


def test_a_lowered_limit_does_not_block_a_stream_that_has_exported_everything(
    spools: Spools,
) -> None:
    stream = spools.open(StreamConfig(name="t", max_bytes=1 << 20)).stream("t")
    for _ in range(2000):
        stream.append(b"x" * 100)
    stream.flush()
    stream.commit(2000)
    smaller = StreamConfig(name="t", max_bytes=16384)
    stream = spools.reopen(smaller).stream("t")
    assert stream.append(b"y") == 2001
    assert stream.metrics().disk_bytes <= 16384


def test_overwrite_oldest_drops_whole_oldest_segments_and_counts_them(
    spools: Spools,
) -> None:
    config = StreamConfig(
        name="t", max_bytes=16384, segment_bytes=SMALL, full_policy=FullPolicy.OVERWRITE_OLDEST
    )
    stream = spools.open(config).stream("t")
    payload = b"o" * 100
    total = 1000
    for i in range(total):
        assert stream.append(payload) == i + 1
        assert stream.metrics().disk_bytes <= 16384
    stream.flush()
    records = drain(stream)
    metrics = stream.metrics()
    overwritten = metrics.dropped[DROPPED_OVERWRITTEN]
    assert overwritten + len(records) == total
    assert [r.sequence for r in records] == list(range(overwritten + 1, total + 1))
    assert metrics.pending == len(records) and metrics.appended == total
    per_segment = (SMALL - SEGMENT_HEADER.size) // frame(payload)
    assert overwritten % per_segment == 0  # whole segments only


# -- expiry ------------------------------------------------------------------------------
def test_records_older_than_the_ttl_are_dropped_and_counted(
    spools: Spools,
) -> None:
    clock = Clock()
    config = StreamConfig(name="t", ttl_seconds=60, segment_bytes=SMALL)
    stream = spools.open(config, clock=clock).stream("t")
    for _ in range(100):  # several segments of old records
        stream.append(b"old" * 30)
    clock.now += 50
    fresh = [stream.append(b"fresh") for _ in range(5)]
    clock.now += 20  # the first 100 are now 70 s old, the fresh ones 20 s
    stream.flush()
    assert [r.sequence for r in stream.read_batch()] == fresh
    metrics = stream.metrics()
    assert metrics.dropped == {DROPPED_EXPIRED: 100}
    assert metrics.pending == 5 and metrics.segments == 1
    assert metrics.oldest_pending_age == pytest.approx(20)
    clock.now += 41
    stream.sweep()  # the fsync thread's sweep drops them without a read
    metrics = stream.metrics()
    assert metrics.dropped == {DROPPED_EXPIRED: 105} and metrics.pending == 0
    assert metrics.oldest_pending_age is None


def test_a_full_stream_drops_expired_records_before_refusing_new_ones(
    spools: Spools,
) -> None:
    clock = Clock()
    config = StreamConfig(name="t", max_bytes=16384, segment_bytes=SMALL, ttl_seconds=60)
    stream = spools.open(config, clock=clock).stream("t")
    with pytest.raises(StreamFullError):
        while True:
            stream.append(b"r" * 100)
    clock.now += 61
    assert stream.append(b"r" * 100) > 0  # room made by expiry, not refused
    metrics = stream.metrics()
    assert metrics.dropped[DROPPED_EXPIRED] > 0 and metrics.dropped[DROPPED_REJECTED] == 1


def test_a_clock_stepped_back_does_not_reorder_timestamps(
    spools: Spools,
) -> None:
    clock = Clock()
    stream = spools.open(StreamConfig(name="t"), clock=clock).stream("t")
    stream.append(b"a")
    clock.now -= 3600
    stream.append(b"b")
    stream.flush()
    first, second = stream.read_batch()
    assert second.timestamp_ms == first.timestamp_ms


# -- dead letters and commits ---------------------------------------------------------
def test_a_poison_record_goes_to_the_dead_letter_stream_with_its_reason(
    spools: Spools,
) -> None:
    spool = spools.open(StreamConfig(name="t"))
    stream = spool.stream("t")
    for payload in (b"good 1", b"poison", b"good 2"):
        stream.append(payload)
    stream.flush()
    batch = stream.read_batch()
    stream.dead_letter(batch[1], "the cloud said 400: payload is not JSON")
    stream.commit(batch[-1].sequence)  # the stream moves on past the poison record
    metrics = stream.metrics()
    assert (metrics.exported, metrics.dead_lettered, metrics.pending) == (2, 1, 0)
    letters = spool.stream(DEAD_LETTER)
    letters.flush()
    (kept,) = letters.read_batch()
    letter = DeadLetter.decode(kept.payload)
    assert letter == DeadLetter(
        "t", 2, batch[1].timestamp_ms, "the cloud said 400: payload is not JSON", b"poison"
    )
    with pytest.raises(SpoolError, match="cannot be dead-lettered"):
        letters.dead_letter(kept, "again")


def test_a_dead_letter_is_not_offered_again_even_after_a_restart(spools: Spools) -> None:
    stream = spools.open(StreamConfig(name="t")).stream("t")
    for payload in (b"poison", b"good"):
        stream.append(payload)
    stream.flush()
    poison, _ = stream.read_batch()
    stream.dead_letter(poison, "refused")
    assert [r.payload for r in stream.read_batch()] == [b"good"]
    stream = spools.reopen(StreamConfig(name="t")).stream("t")
    assert [r.payload for r in stream.read_batch()] == [b"good"]
    metrics = stream.metrics()
    assert (metrics.pending, metrics.dead_lettered) == (1, 1)
    stream.commit(2)
    assert (stream.metrics().exported, stream.metrics().dead_lettered) == (1, 1)


def test_commit_deletes_exported_segments_and_survives_reopen(spools: Spools) -> None:
    config = StreamConfig(name="t", max_bytes=1 << 20, segment_bytes=SMALL)
    stream = spools.open(config).stream("t")
    for i in range(200):
        stream.append(f"reading {i:03d}".encode() * 10)
    stream.flush()
    folder = spools.folder / "t"
    before = len(list(folder.glob("*.seg")))
    batch = stream.read_batch(150)
    stream.commit(batch[-1].sequence)
    after = len(list(folder.glob("*.seg")))
    assert after < before and after == stream.metrics().segments
    stream = spools.reopen(config).stream("t")
    metrics = stream.metrics()
    assert (metrics.appended, metrics.exported, metrics.pending) == (200, 150, 50)
    assert metrics.committed_sequence == 150
    assert [r.sequence for r in drain(stream)] == list(range(151, 201))
    stream.commit(150)  # an old acknowledgement changes nothing
    stream.commit(200)
    assert stream.metrics().pending == 0 and stream.metrics().pending_bytes == 0


def test_a_damaged_state_file_means_export_again_not_loss(spools: Spools) -> None:
    config = StreamConfig(name="t")
    stream = spools.open(config).stream("t")
    for i in range(10):
        stream.append(b"%d" % i)
    stream.flush()
    stream.commit(4)
    spools.close()
    (spools.folder / "t" / "state.json").write_bytes(b'{"committed": 4, "cur')
    stream = spools.open(config).stream("t")
    assert [r.sequence for r in drain(stream)] == list(range(1, 11))


# -- batched fsync ------------------------------------------------------------------------
class RecordingFsync:
    """An fsync that records what it was asked for and can be held back."""

    def __init__(self) -> None:
        self.calls = 0
        self.sizes: list[int] = []
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()
        self.fail = False

    def __call__(self, fd: int) -> None:
        self.started.set()
        self.gate.wait(10)
        if self.fail:
            raise OSError(5, "Input/output error")
        self.calls += 1
        self.sizes.append(os.fstat(fd).st_size)
        os.fsync(fd)


def test_flush_returns_only_after_an_fsync_of_every_appended_record(spools: Spools) -> None:
    fsync = RecordingFsync()
    spool = spools.open(StreamConfig(name="t"), fsync=fsync, fsync_interval=30)
    stream = spool.stream("t")
    fsync.gate.clear()
    fsync.started.clear()
    for i in range(100):
        stream.append(b"reading %d" % i)
    done = threading.Event()
    flusher = threading.Thread(target=lambda: (stream.flush(), done.set()))
    flusher.start()
    assert fsync.started.wait(5)
    assert not done.wait(0.2)  # the fsync is in progress: flush has not returned
    fsync.gate.set()
    assert done.wait(5)
    flusher.join()
    segment = next((spools.folder / "t").glob("*.seg"))
    assert segment.stat().st_size in fsync.sizes  # the fsync covered the whole file


def test_appends_are_fsynced_in_batches(spools: Spools) -> None:
    fsync = RecordingFsync()
    spool = spools.open(StreamConfig(name="t"), fsync=fsync, fsync_records=100)
    stream = spool.stream("t")
    before = fsync.calls
    for _ in range(1000):
        stream.append(b"x" * 100)
    stream.flush()
    assert 1 <= fsync.calls - before <= 20  # group commit: far fewer fsyncs than records
    assert stream.metrics().durable_sequence == 1000


def test_the_record_threshold_syncs_without_waiting_for_the_timer(
    spools: Spools,
) -> None:
    spool = spools.open(StreamConfig(name="t"), fsync_interval=30, fsync_records=10)
    stream = spool.stream("t")
    for _ in range(10):
        stream.append(b"x")
    deadline = time.monotonic() + 5
    while stream.metrics().durable_sequence < 10:
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_a_failed_fsync_refuses_further_appends(spools: Spools) -> None:
    fsync = RecordingFsync()
    spool = spools.open(StreamConfig(name="t"), fsync=fsync)
    stream = spool.stream("t")
    fsync.fail = True
    stream.append(b"x")
    with pytest.raises(SpoolError, match="fsync failed"):
        stream.flush(timeout=5)
    with pytest.raises(SpoolError, match="fsync failed"):
        stream.append(b"y")


def test_durable_appends_from_the_event_loop(spools: Spools) -> None:
    spool = spools.open(StreamConfig(name="t"))
    stream = spool.stream("t")

    async def main() -> list[int]:
        sequences = await asyncio.gather(*(stream.append_durable(b"%d" % i) for i in range(50)))
        stream.append(b"more")
        await spool.aflush()
        (first,) = stream.read_batch(1)
        await stream.adead_letter(first, "refused")
        return list(sequences)

    sequences = asyncio.run(main())
    assert sorted(sequences) == list(range(1, 51))
    assert stream.metrics().durable_sequence == 51
    assert spool.stream(DEAD_LETTER).metrics().durable_sequence == 1  # fsynced on return


# -- configuration -------------------------------------------------------------------------
def test_streams_from_agent_json() -> None:
    configs = parse_streams(
        {
            "telemetry": {
                "max_bytes": 1 << 20,
                "full_policy": "overwrite-oldest",
                "ttl_seconds": 3600,
                "priority": 1,
            },
            "events": {},
        },
        source="agent.json",
    )
    assert configs == (
        StreamConfig(
            name="telemetry",
            max_bytes=1 << 20,
            full_policy=FullPolicy.OVERWRITE_OLDEST,
            ttl_seconds=3600,
            priority=1,
        ),
        StreamConfig(name="events"),
    )


@pytest.mark.parametrize(
    ("doc", "field", "reason"),
    [
        ([], "streams", "must be an object"),
        ({"t": 1}, "streams.t", "must be an object"),
        ({"t": {"size": 1}}, "streams.t.size", "unknown key"),
        ({"t": {"max_bytes": 10}}, "streams.t.max_bytes", "at least 16384"),
        ({"t": {"max_bytes": "1M"}}, "streams.t.max_bytes", "whole number"),
        ({"t": {"full_policy": "drop"}}, "streams.t.full_policy", "'drop' is not one of"),
        ({"t": {"ttl_seconds": 0}}, "streams.t.ttl_seconds", "positive"),
        ({"t": {"priority": 11}}, "streams.t.priority", "1 (exported first) to 10"),
        ({"t": {"segment_bytes": 100}}, "streams.t.segment_bytes", "from 4096"),
        ({"bad/name": {}}, "streams", "not a stream name"),
    ],
)
def test_bad_stream_settings_name_the_field(doc: object, field: str, reason: str) -> None:
    with pytest.raises(ValidationError) as info:
        parse_streams(doc, source="agent.json")
    assert info.value.field == field and info.value.source == "agent.json"
    assert reason in info.value.reason


def test_streams_on_disk_but_no_longer_declared_are_kept(spools: Spools) -> None:
    stream = spools.open(StreamConfig(name="old")).stream("old")
    stream.append(b"still to export")
    spool = spools.reopen()
    assert [s.name for s in spool.streams] == [DEAD_LETTER, "old"]
    assert spool.stream("old").metrics().pending == 1
    with pytest.raises(SpoolError, match=r"no stream 'nope'.*dead-letter, old"):
        spool.stream("nope")


# -- a model -------------------------------------------------------------------------------
OPERATIONS = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.binary(max_size=700)),
        st.tuples(st.just("flush"), st.none()),
        st.tuples(st.just("read"), st.integers(1, 40)),
        st.tuples(st.just("commit"), st.integers(0, 40)),
        st.tuples(st.just("reopen"), st.none()),
    ),
    max_size=60,
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(OPERATIONS)
def test_append_read_commit_reopen_against_a_model(
    operations: list[tuple[str, object]],
) -> None:
    config = StreamConfig(name="m", max_bytes=1 << 20, segment_bytes=SMALL)
    with tempfile.TemporaryDirectory() as folder:
        spool = Spool(Path(folder), [config])
        try:
            stream = spool.stream("m")
            stored: list[tuple[int, bytes]] = []  # the model: every accepted record
            committed = 0
            durable = 0
            last_read: list[Record] = []
            for name, argument in operations:
                if name == "append":
                    assert isinstance(argument, bytes)
                    sequence = stream.append(argument)
                    assert sequence == (stored[-1][0] + 1 if stored else 1)
                    stored.append((sequence, argument))
                elif name == "flush":
                    stream.flush()
                    durable = stored[-1][0] if stored else 0
                elif name == "read":
                    assert isinstance(argument, int)
                    last_read = stream.read_batch(argument)
                    got = [(r.sequence, r.payload) for r in last_read]
                    pending = [p for p in stored if p[0] > committed]
                    assert got == pending[: len(got)]
                    # At least what is known to be fsynced; the fsync thread may add more.
                    known = [p for p in pending if p[0] <= durable]
                    assert min(argument, len(known)) <= len(got) <= argument
                elif name == "commit" and last_read:
                    assert isinstance(argument, int)
                    upto = last_read[min(argument, len(last_read) - 1)].sequence
                    stream.commit(upto)
                    committed = max(committed, upto)
                elif name == "reopen":
                    spool.close()
                    spool = Spool(Path(folder), [config])
                    stream = spool.stream("m")
                    durable = stored[-1][0] if stored else 0
                    last_read = []
                metrics = stream.metrics()
                assert metrics.appended == len(stored)
                assert metrics.pending == len([p for p in stored if p[0] > committed])
                assert metrics.pending_bytes == sum(frame(p) for s, p in stored if s > committed)
                assert metrics.exported == len([p for p in stored if p[0] <= committed])
            stream.flush()
            assert [(r.sequence, r.payload) for r in drain(stream)] == [
                p for p in stored if p[0] > committed
            ]
        finally:
            spool.close()


BOUNDED_OPERATIONS = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.integers(0, 900)),
        st.tuples(st.just("wait"), st.integers(1, 40)),
        st.tuples(st.just("flush"), st.none()),
        st.tuples(st.just("read"), st.integers(1, 60)),
        st.tuples(st.just("commit"), st.integers(0, 60)),
        st.tuples(st.just("dead-letter"), st.integers(0, 60)),
        st.tuples(st.just("sweep"), st.none()),
        st.tuples(st.just("reopen"), st.none()),
    ),
    max_size=80,
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(BOUNDED_OPERATIONS, st.sampled_from(list(FullPolicy)))
def test_every_record_is_pending_exported_dead_lettered_or_counted_as_dropped(
    operations: list[tuple[str, int | None]], policy: FullPolicy
) -> None:
    """With a small limit, a time to live and dead letters, no record is ever unaccounted
    for, and what is read is what was stored, in order."""
    config = StreamConfig(
        name="b", max_bytes=16384, segment_bytes=SMALL, full_policy=policy, ttl_seconds=60
    )
    clock = Clock()
    with tempfile.TemporaryDirectory() as folder:
        spool = Spool(Path(folder), [config], clock=clock)
        try:
            stream = spool.stream("b")
            stored: dict[int, bytes] = {}
            lettered: set[int] = set()
            last_read: list[Record] = []
            for name, argument in operations:
                if name == "append":
                    assert argument is not None
                    payload = os.urandom(argument)
                    try:
                        stored[stream.append(payload)] = payload
                    except StreamFullError:
                        assert policy is FullPolicy.REJECT_NEW
                elif name == "wait":
                    assert argument is not None
                    clock.now += argument
                elif name == "flush":
                    stream.flush()
                elif name == "read":
                    assert argument is not None
                    last_read = stream.read_batch(argument)
                    sequences = [r.sequence for r in last_read]
                    assert sequences == sorted(set(sequences))
                    assert all(stored[r.sequence] == r.payload for r in last_read)
                    assert not lettered & set(sequences)  # a dead letter is not offered again
                    assert all(r.sequence > stream.metrics().committed_sequence for r in last_read)
                elif name == "commit" and last_read:
                    assert argument is not None
                    stream.commit(last_read[min(argument, len(last_read) - 1)].sequence)
                elif name == "dead-letter" and last_read:
                    assert argument is not None
                    letter = last_read[min(argument, len(last_read) - 1)]
                    stream.dead_letter(letter, "refused")
                    lettered.add(letter.sequence)
                elif name == "sweep":
                    stream.sweep()
                elif name == "reopen":
                    spool.close()
                    spool = Spool(Path(folder), [config], clock=clock)
                    stream = spool.stream("b")
                    last_read = []
                m = stream.metrics()
                dropped = m.dropped.get(DROPPED_OVERWRITTEN, 0) + m.dropped.get(DROPPED_EXPIRED, 0)
                assert m.appended == len(stored)
                assert m.appended == m.pending + m.exported + m.dead_lettered + dropped
                assert m.disk_bytes <= 16384
                assert set(m.dropped) <= {DROPPED_OVERWRITTEN, DROPPED_EXPIRED, DROPPED_REJECTED}
        finally:
            spool.close()
