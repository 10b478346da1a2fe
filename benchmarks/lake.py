"""Telemetry lake benchmarks: ingestion per core, dedup, queries over 10M rows, compaction.

Ingestion runs what ``POST /things/{thing}/telemetry`` runs after reading the body
(``Lake.ingest_bytes``: gunzip and unframe, dedup against the stream's ranges, check and
convert the readings, write Parquet, commit to SQLite with a synced write) on gzipped
batches of 10,000 furnace readings encoded beforehand, as a hub would send them. Its rate
is counted per CPU-second of this process (every thread included), so "per core" holds
on a loaded machine. The baseline, same run and same rows: writing the finished table
with PyArrow alone — the floor no ingestion can go under.

Queries run on a lake of ``EDGELOOP_BENCH_LAKE_ROWS`` rows (default 10,000,000) as
compaction leaves it: files of a million rows, generated directly rather than ingested
(ingesting 10M readings would take minutes of this machine). Compaction merges 200 small
files as ingestion leaves them.

The kit-to-lake end-to-end rate needs the whole pipeline (simulated kits, the hub's
spool and uploader, the API): :func:`kit_to_lake` is its hook, called with the suite's
result when given; until it is wired the table says so.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks._report import Result, Samples, SuiteResult, Target
from edgeloop.cloud.db import Database
from edgeloop.cloud.lake import Lake, LakeSettings
from edgeloop.cloud.lake_manifest import add_files
from edgeloop.cloud.lake_rows import SENSORS_TYPE, TELEMETRY_SCHEMA, UTC_US, convert
from edgeloop.cloud.objectstore import LocalObjectStore
from edgeloop.core.telemetry import Reading, Record, TelemetryBatch, encode_batch, encode_reading

BATCH = 10_000  # readings a batch
BATCHES = 12  # fresh batches in the ingestion row
TARGET_US = 10.0  # CPU µs a reading: 100,000 readings a second on one core
QUERY_ROWS = int(os.environ.get("EDGELOOP_BENCH_LAKE_ROWS", "10000000"))
FILE_ROWS = 1_000_000
SMALL_FILES = 200
SMALL_ROWS = 5_000
QUERY_REPEATS = 5
NOW = datetime.now(UTC).replace(microsecond=0)
KITS = 8
THINGS = 10

KitToLake = Callable[[SuiteResult], None]
kit_to_lake: KitToLake | None = None  # set by the end-to-end pipeline when it exists


def run(out: SuiteResult) -> None:
    """Run the lake benchmarks, adding rows to ``out`` as they complete."""
    with tempfile.TemporaryDirectory(prefix="edgeloop-lake-bench-") as folder:
        root = Path(folder)
        bench_ingestion(root / "ingest", out)
        bench_compaction(root / "compact", out)
        bench_queries(root / "query", out)
    if kit_to_lake is not None:
        kit_to_lake(out)
    else:
        out.results.append(
            Result(
                benchmark="kit-to-lake end-to-end rate",
                measured="measured by the pipeline suite: python -m benchmarks pipeline",
                comparison="hook: benchmarks.lake.kit_to_lake",
            )
        )


def _lake(folder: Path, **settings: object) -> Lake:
    folder.mkdir(parents=True)
    db = Database(f"sqlite:///{folder / 'edgeloop.db'}")
    db.migrate()
    return Lake(db, LocalObjectStore(folder / "objects"), settings=LakeSettings(**settings))  # type: ignore[arg-type]


def _progress(message: str) -> None:
    print(f"  lake: {message}", flush=True)


# --- ingestion -----------------------------------------------------------------------------


def _payloads(count: int, start: int, *, indent: int | None = None) -> list[bytes]:
    rng = np.random.default_rng(start)
    temps = rng.normal(60, 3, count).round(2)
    amps = rng.normal(3, 0.2, count).round(3)
    vibration = np.abs(rng.normal(0.01, 0.004, count)).round(4)
    base = (NOW - timedelta(hours=2)).timestamp()
    payloads = []
    for i in range(count):
        reading = Reading(
            kit=f"kit-{(start + i) % KITS:04d}",
            appliance="furnace",
            ts=round(base + (start + i) * 0.01, 3),
            sensors={
                "temp_c": float(temps[i]),
                "current_a": float(amps[i]),
                "vibration_g": float(vibration[i]),
            },
            kit_seq=start + i,
            label="normal" if i % 50 else None,
        )
        if indent is None:
            payloads.append(encode_reading(reading))
        else:  # readable JSON: every record takes the one-by-one path
            payloads.append(json.dumps(reading.to_json(), indent=indent).encode())
    return payloads


def _batch(start: int, payloads: list[bytes], stream: str = "readings") -> bytes:
    hub_us = int(NOW.timestamp() * 1e6)
    records = tuple(Record(start + i, hub_us + i, p) for i, p in enumerate(payloads))
    return encode_batch(TelemetryBatch("hub-0001", stream, records))


def _ingest(lake: Lake, bodies: list[bytes]) -> tuple[float, float]:
    """CPU and wall seconds to ingest ``bodies``."""
    cpu, wall = time.process_time(), time.perf_counter()
    for body in bodies:
        lake.ingest_bytes(body)
    return time.process_time() - cpu, time.perf_counter() - wall


def bench_ingestion(folder: Path, out: SuiteResult) -> None:
    _progress(f"encoding {BATCHES} batches of {BATCH:,} readings, as hubs send them")
    payloads = [_payloads(BATCH, i * BATCH) for i in range(BATCHES)]
    bodies = [_batch(i * BATCH, p) for i, p in enumerate(payloads)]
    size = sum(len(b) for b in bodies) / (BATCHES * BATCH)
    lake = _lake(folder / "lake")
    lake.ingest_bytes(_batch(10**9, payloads[0][:1000], stream="warmup"))
    _progress("ingesting")
    cpu, wall = _ingest(lake, bodies)
    readings = BATCHES * BATCH
    per_reading = cpu / readings * 1e6
    table = lake.query("SELECT * FROM telemetry WHERE stream = 'readings'")
    assert table.num_rows == readings, table.num_rows

    # The floor, same rows: PyArrow writes the finished table, nothing else.
    base_cpu = time.process_time()
    for chunk in table.to_batches(BATCH):
        sink = io.BytesIO()
        pq.write_table(pa.Table.from_batches([chunk]), sink, compression="zstd")
        lake.objects.put(f"baseline/part-{time.time_ns()}.parquet", sink.getvalue())
    floor = (time.process_time() - base_cpu) / readings * 1e6
    out.results.append(
        Result(
            benchmark=f"batch ingestion into the lake ({BATCH:,} readings a batch, gzipped)",
            measured=f"{readings / cpu:,.0f} readings/s per core ({per_reading:.1f} µs CPU "
            f"a reading; {readings / wall:,.0f}/s wall)",
            value=per_reading,
            target=Target(limit=TARGET_US, unit="µs CPU a reading (≥ 100,000/s per core)"),
            comparison=f"PyArrow alone writing the same rows: {1e6 / floor:,.0f} rows/s per "
            f"core ({floor:.1f} µs); the wire: {size:.1f} bytes a reading gzipped",
        )
    )

    # Readings the columnar path cannot vouch for are checked one by one.
    pretty = [
        _batch(10**8 + i * 2000, _payloads(2000, 10**8 + i * 2000, indent=1)) for i in range(3)
    ]
    slow_cpu, _ = _ingest(lake, pretty)
    slow = slow_cpu / 6000 * 1e6
    out.results.append(
        Result(
            benchmark="ingestion, every reading checked one by one (indented JSON payloads)",
            measured=f"{1e6 / slow:,.0f} readings/s per core ({slow:.1f} µs CPU a reading)",
            comparison=f"{slow / per_reading:.1f}x the columnar path's cost",
        )
    )

    # Dedup: resent batches overlapping half of what the lake holds, then a whole retry.
    start = BATCHES * BATCH
    overlap = [
        _batch(
            start + i * BATCH // 2 - BATCH // 2,
            _payloads(BATCH, start + i * BATCH // 2 - BATCH // 2),
        )
        for i in range(6)
    ]
    half_cpu, _ = _ingest(lake, overlap)
    half = half_cpu / (6 * BATCH) * 1e6
    retry_cpu, _ = _ingest(lake, bodies[:4])
    retry = retry_cpu / (4 * BATCH) * 1e6
    out.results.append(
        Result(
            benchmark="dedup: batches half of whose readings the lake holds",
            measured=f"{1e6 / half:,.0f} received readings/s per core ({half:.1f} µs each)",
            comparison=f"fresh batches: {per_reading:.1f} µs; a retry of held batches: "
            f"{retry:.1f} µs a reading ({1e6 / retry:,.0f}/s)",
        )
    )
    # The fraction of the work in checking and converting (no files, no database).
    sequences = np.arange(BATCH, dtype=np.int64)
    convert_cpu = time.process_time()
    convert(
        "t",
        "s",
        sequences,
        sequences,
        payloads[0],
        ingest_time=NOW,
        source="bench",
        max_future_us=86_400_000_000,
    )
    share = (time.process_time() - convert_cpu) / BATCH * 1e6
    out.notes.append(
        f"ingestion: checking and converting readings costs {share:.1f} µs of the "
        f"{per_reading:.1f} µs a reading; the rest is unframing, Parquet and the commit"
    )


# --- a big lake for queries, and small files for compaction --------------------------------


def _table(rows: int, *, thing: str, day: date, first_sequence: int, seed: int) -> pa.Table:
    """``rows`` readings of one thing on one day, as the lake stores them."""
    rng = np.random.default_rng(seed)
    start_us = int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp() * 1e6)
    device_us = np.sort(rng.integers(start_us, start_us + 86_400_000_000, rows))
    offsets = np.arange(0, 3 * rows + 1, 3, dtype=np.int32)
    keys = pa.DictionaryArray.from_arrays(
        pa.array(np.tile(np.arange(3, dtype=np.int32), rows)),
        pa.array(["temp_c", "current_a", "vibration_g"]),
    ).cast(pa.string())
    values = np.column_stack(
        [rng.normal(60, 3, rows), rng.normal(3, 0.2, rows), np.abs(rng.normal(0.01, 0.004, rows))]
    ).ravel()
    kits = pa.DictionaryArray.from_arrays(
        pa.array(rng.integers(0, KITS, rows).astype(np.int32)),
        pa.array([f"kit-{k:04d}" for k in range(KITS)]),
    ).cast(pa.string())
    labels = pa.DictionaryArray.from_arrays(
        pa.array(np.where(rng.random(rows) < 0.01, 1, 0).astype(np.int32)),
        pa.array(["normal", "fault"]),
    ).cast(pa.string())
    return pa.Table.from_arrays(
        [
            pa.array([thing] * rows, pa.string()),
            pa.array(["readings"] * rows, pa.string()),
            pa.array(np.arange(first_sequence, first_sequence + rows)),
            kits,
            pa.array(["furnace"] * rows, pa.string()),
            pa.MapArray.from_arrays(pa.array(offsets), keys, pa.array(values)).cast(SENSORS_TYPE),
            pa.array(device_us).cast(UTC_US),
            pa.array(np.arange(rows)),
            labels,
            pa.array(device_us + 1000).cast(UTC_US),
            pa.array(device_us + 5_000_000).cast(UTC_US),
            pa.array(np.full(rows, (day - date(1970, 1, 1)).days, dtype=np.int32)).cast(
                pa.date32()
            ),
        ],
        schema=TELEMETRY_SCHEMA,
    )


def _register(lake: Lake, thing: str, table: pa.Table, day: date) -> None:
    written = lake.put_table("telemetry", day, thing, table, lake.clock())
    with lake.db.write() as session:
        add_files(session, thing, [written], lake.clock())


def bench_compaction(folder: Path, out: SuiteResult) -> None:
    lake = _lake(folder)
    day = NOW.date()
    _progress(f"writing {SMALL_FILES} small files of {SMALL_ROWS:,} readings")
    for i in range(SMALL_FILES):
        table = _table(SMALL_ROWS, thing="hub-0001", day=day, first_sequence=i * SMALL_ROWS, seed=i)
        _register(lake, "hub-0001", table, day)
    rows = SMALL_FILES * SMALL_ROWS
    started = time.perf_counter()
    result = lake.compact()
    took = time.perf_counter() - started
    assert result.rows == rows and result.files_after == 1, result
    assert lake.rows("SELECT count(DISTINCT sequence) AS n FROM telemetry")[0]["n"] == rows
    out.results.append(
        Result(
            benchmark=f"compaction: {SMALL_FILES} files of {SMALL_ROWS:,} readings into one",
            measured=f"{took:.2f} s ({rows / took:,.0f} rows/s)",
            comparison="read, sort by stream and sequence, drop repeats, write, commit",
        )
    )


QUERIES = (
    ("count every reading", "SELECT count(*) FROM telemetry"),
    (
        "average of a sensor per kit, one day",
        "SELECT kit, avg(sensors['temp_c']) FROM telemetry WHERE date = DATE '{day}' GROUP BY kit",
    ),
    (
        "one thing's latest 100 readings",
        "SELECT * FROM telemetry WHERE thing = 'hub-0003' ORDER BY device_time DESC LIMIT 100",
    ),
    (
        "hourly maximum of a sensor, every thing",
        "SELECT thing, date_trunc('hour', device_time) AS h, max(sensors['vibration_g']) "
        "FROM telemetry GROUP BY ALL",
    ),
)


def bench_queries(folder: Path, out: SuiteResult) -> None:
    lake = _lake(folder)
    files = max(1, QUERY_ROWS // FILE_ROWS)
    _progress(f"writing a lake of {files * FILE_ROWS:,} readings in {files} files")
    days = [NOW.date() - timedelta(days=d) for d in range(max(1, files // THINGS))]
    for i in range(files):
        thing = f"hub-{i % THINGS:04d}"
        day = days[(i // THINGS) % len(days)]
        table = _table(FILE_ROWS, thing=thing, day=day, first_sequence=i * FILE_ROWS, seed=i)
        _register(lake, thing, table, day)
        del table
    size = lake.stats().telemetry.bytes
    for label, sql in QUERIES:
        query = sql.format(day=days[0].isoformat())
        lake.query(query)  # warm: the OS's page cache, DuckDB's first plan
        samples = []
        for _ in range(QUERY_REPEATS):
            started = time.perf_counter()
            lake.query(query)
            samples.append(time.perf_counter() - started)
        out.results.append(
            Result(
                benchmark=f"query over {files * FILE_ROWS / 1e6:.0f}M readings: {label}",
                measured=Samples(values=samples).describe("ms"),
                comparison=f"{files} Parquet files, {size / 2**20:,.0f} MiB",
            )
        )
