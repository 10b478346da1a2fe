"""The telemetry lake: every reading hubs send, once, as Parquet in the object store.

Layout in the object store (a local folder by default, S3 when configured)::

    telemetry/date=YYYY-MM-DD/thing=NAME/part-<UTC stamp>-<id>.parquet   readings
    quarantine/date=YYYY-MM-DD/thing=NAME/part-<UTC stamp>-<id>.parquet  refused records

``date`` is the reading's device time (UTC) for telemetry, the arrival time for the
quarantine. Files are immutable: compaction writes new ones and retires the old.

**The manifest is the lake.** A file is part of the lake when its row in ``lake_files``
(the cloud database) is live; queries read exactly the live files of one snapshot. Beside
it, ``lake_streams`` holds per ``(thing, stream)`` the ranges of sequence numbers the
lake holds, ``lake_kits`` per ``(thing, stream, kit)`` the ranges of the kit's own
counter (``kit_seq``) it holds, and ``lake_uploads`` the answers given to idempotency
keys. Ingestion:

1. decode and check the batch (bad framing: an error, nothing stored);
2. read the stream's ranges and their version; keep the records not yet held (and the
   first of any repeated within the batch);
3. convert them: readings to telemetry rows, the rest to quarantine rows with the reason;
4. read the ranges of the readings' kits; drop the readings whose ``(kit, kit_seq)`` is
   held (or repeated within the batch): a hub's bridge that crashed between spooling a
   kit's reading and acknowledging it to the kit's broker spools the redelivered copy
   under a new sequence number. Readings without ``kit_seq`` are kept once by sequence;
5. write the Parquet files;
6. commit in one transaction: the file rows, the merged sequence ranges (only if their
   version is still the one read in 2 — else delete the files and start again at 2), the
   merged kit ranges (guarded by the same version: only that transaction writes them),
   and the answer under the idempotency key.

A crash before 6 leaves files no manifest row names: invisible to queries, deleted by
:meth:`Lake.collect_garbage` once older than the grace period, and the batch, sent
again, is ingested whole. A crash after 6 leaves a batch the lake holds: sent again, its
records are all duplicates, and with its idempotency key it gets the first answer back.

Compaction, retention and garbage collection are in ``edgeloop.cloud.lake_upkeep``;
the manifest's tables in ``edgeloop.cloud.lake_manifest``; the conversion of records to
rows in ``edgeloop.cloud.lake_rows``; SQL in ``edgeloop.cloud.lake_query``.
"""

from __future__ import annotations

import io
import logging
import re
import threading
import uuid
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from sqlalchemy import case, func, select, update
from sqlalchemy.exc import IntegrityError

from edgeloop.cloud import lake_upkeep
from edgeloop.cloud.db import Database, utcnow
from edgeloop.cloud.lake_manifest import (
    STAMP,
    LakeFileRow,
    LakeKitRow,
    LakeStreamRow,
    LakeUploadRow,
    Stale,
    WrittenFile,
    add_files,
)
from edgeloop.cloud.lake_query import DEFAULT_TIMEOUT, run_query
from edgeloop.cloud.lake_rows import (
    convert,
    kit_repeats,
    merge_ranges,
    quarantine_table,
    seen_mask,
)
from edgeloop.cloud.lake_upkeep import CompactionResult, RetentionResult
from edgeloop.cloud.objectstore import LocalObjectStore, ObjectStore
from edgeloop.core.errors import ConflictError, ValidationError
from edgeloop.core.telemetry import (
    BatchColumns,
    TelemetryBatch,
    batch_digest,
    check_thing,
    decode_columns,
)

__all__ = [
    "CompactionResult",
    "IngestResult",
    "Lake",
    "LakeFileRow",
    "LakeKitRow",
    "LakeSettings",
    "LakeStats",
    "LakeStreamRow",
    "LakeUploadRow",
    "RetentionResult",
    "TableStats",
]

log = logging.getLogger("edgeloop.cloud.lake")

KINDS = ("telemetry", "quarantine")
IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,200}")
_ATTEMPTS = 8  # commits lost to another writer of the same stream before giving up
_LOCK_STRIPES = 64


# --- results ----------------------------------------------------------------------------


@dataclass(frozen=True)
class IngestResult:
    """What became of an uploaded batch."""

    thing: str
    stream: str
    received: int
    accepted: int
    duplicates: int
    quarantined: int
    replayed: bool = False  # the answer first given to this idempotency key

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TableStats:
    """Files and rows of one table of the lake."""

    files: int = 0
    rows: int = 0
    bytes: int = 0
    partitions: int = 0
    small_files: int = 0
    first_date: str | None = None
    last_date: str | None = None


@dataclass(frozen=True)
class LakeStats:
    """How big the lake is, and what maintenance would do."""

    telemetry: TableStats
    quarantine: TableStats
    things: int
    streams: int
    sequences_held: int
    retired_files: int  # awaiting deletion after the grace period
    store: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# --- the lake ---------------------------------------------------------------------------


@dataclass(kw_only=True)
class LakeSettings:
    """Tunables, with the defaults `cloud up` uses."""

    max_future: timedelta = timedelta(days=1)  # device clocks further ahead: quarantined
    grace: timedelta = timedelta(minutes=10)  # retired files stay readable this long
    small_file_bytes: int = 32 * 1024 * 1024  # compaction merges files under this size
    max_file_rows: int = 2_000_000  # compaction writes files of at most this many rows
    upload_ttl: timedelta = timedelta(days=7)  # idempotency answers kept this long
    compression: str = "zstd"
    threads: int | None = None  # DuckDB threads per query (None: one per core)


class Lake:
    """Ingestion, queries and upkeep of the telemetry lake (thread-safe)."""

    def __init__(
        self,
        db: Database,
        objects: ObjectStore,
        *,
        cache_dir: Path | None = None,
        settings: LakeSettings | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.db = db
        self.objects = objects
        self.settings = settings or LakeSettings()
        self.clock = clock
        if isinstance(objects, LocalObjectStore):
            self._root: Path | None = objects.root.resolve()
            self.cache_dir = None
        else:
            # Lake files never change once written, so a local copy never goes stale.
            self._root = None
            self.cache_dir = (cache_dir or Path(".edgeloop-lake-cache")).resolve()
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._locks = [threading.Lock() for _ in range(_LOCK_STRIPES)]
        self._cache_lock = threading.Lock()

    # -- ingestion ---------------------------------------------------------------------

    def ingest_bytes(
        self,
        data: bytes,
        *,
        thing: str | None = None,
        idempotency_key: str | None = None,
        source: str = "https",
    ) -> IngestResult:
        """Decode an uploaded batch and ingest it; ``thing`` (the caller) must be its thing."""
        columns = decode_columns(data)
        if thing is not None and columns.thing != thing:
            raise ValidationError(
                f"the batch is of thing {columns.thing!r}, uploaded for {thing!r}",
                field="header.thing",
            )
        return self.ingest(columns, idempotency_key=idempotency_key, source=source)

    def ingest(
        self,
        batch: TelemetryBatch | BatchColumns,
        *,
        idempotency_key: str | None = None,
        source: str = "https",
    ) -> IngestResult:
        """Keep the batch's new records: readings in the lake, the rest in quarantine."""
        if idempotency_key is not None and not IDEMPOTENCY_KEY.fullmatch(idempotency_key):
            raise ValidationError(
                "must be 1-200 printable ASCII characters without spaces",
                field="Idempotency-Key",
            )
        columns = batch if isinstance(batch, BatchColumns) else BatchColumns.of(batch)
        digest = batch_digest(columns) if idempotency_key is not None else ""
        thing, stream = columns.thing, columns.stream
        with self._locks[zlib.crc32(f"{thing}/{stream}".encode()) % _LOCK_STRIPES]:
            for _ in range(_ATTEMPTS):
                if idempotency_key is not None:
                    replay = self._replay(thing, idempotency_key, digest)
                    if replay is not None:
                        return replay
                try:
                    return self._ingest_once(columns, idempotency_key, digest, source)
                except Stale:
                    continue
        raise ConflictError(
            f"stream {stream!r} of {thing!r} kept changing under this upload; send it again"
        )

    def _replay(self, thing: str, key: str, digest: str) -> IngestResult | None:
        with self.db.read() as session:
            row = session.get(LakeUploadRow, (thing, key))
            if row is None:
                return None
            if row.digest != digest:
                raise ConflictError(
                    f"Idempotency-Key {key!r} was used by {thing!r} for another batch; "
                    "a new batch needs a new key"
                )
            return IngestResult(**{**row.result, "replayed": True})

    def _ingest_once(
        self, batch: BatchColumns, key: str | None, digest: str, source: str
    ) -> IngestResult:
        thing, stream = batch.thing, batch.stream
        received = len(batch.payloads)
        with self.db.read() as session:
            held = session.get(LakeStreamRow, (thing, stream))
            ranges = list(held.ranges) if held is not None else []
            version = held.version if held is not None else 0
        sequences = np.array(batch.sequences, dtype=np.int64)
        new = ~seen_mask(ranges, sequences)
        _, first = np.unique(sequences, return_index=True)
        once = np.zeros(received, dtype=bool)
        once[first] = True
        take = np.flatnonzero(new & once)
        fresh = len(take)
        now = self.clock()
        written: list[WrittenFile] = []
        quarantined = repeats = 0
        held_kits: dict[str, list[list[int]]] = {}
        kit_ranges: dict[str, list[list[int]]] = {}
        if fresh:
            all_fresh = fresh == received
            converted = convert(
                thing,
                stream,
                sequences if all_fresh else sequences[take],
                np.array(batch.timestamps, dtype=np.int64)[take],
                batch.payloads if all_fresh else [batch.payloads[i] for i in take],
                ingest_time=now,
                source=source,
                max_future_us=int(self.settings.max_future.total_seconds() * 1_000_000),
            )
            quarantined = converted.quarantined.num_rows
            rows = converted.rows
            held_kits = self._kit_ranges(thing, stream, rows)
            repeat, kit_ranges = kit_repeats(rows, held_kits)
            repeats = int(repeat.sum())
            if repeats:
                rows = rows.filter(pa.array(~repeat))
            try:
                written = self._write(thing, rows, "telemetry", now)
                written += self._write(thing, converted.quarantined, "quarantine", now)
            except BaseException:
                self.discard(written)
                raise
        result = IngestResult(
            thing=thing,
            stream=stream,
            received=received,
            accepted=fresh - quarantined - repeats,
            duplicates=received - fresh + repeats,
            quarantined=quarantined,
        )
        if not fresh and key is None:
            return result  # nothing new, nothing to remember
        try:
            self._commit(
                thing,
                stream,
                version,
                merge_ranges(ranges, sequences[take]) if fresh else None,
                written,
                now,
                upload=(key, digest, result) if key is not None else None,
                kits={kit: (kit in held_kits, held) for kit, held in kit_ranges.items()},
            )
        except (Stale, IntegrityError) as err:
            self.discard(written)
            raise Stale from err
        except BaseException:
            self.discard(written)
            raise
        return result

    def _commit(
        self,
        thing: str,
        stream: str,
        version: int,
        ranges: list[list[int]] | None,
        written: list[WrittenFile],
        now: datetime,
        *,
        upload: tuple[str, str, IngestResult] | None,
        kits: dict[str, tuple[bool, list[list[int]]]] | None = None,
    ) -> None:
        with self.db.write() as session:
            if ranges is not None:
                held = sum(last - first + 1 for first, last in ranges)
                if version == 0:
                    session.add(
                        LakeStreamRow(
                            thing=thing,
                            stream=stream,
                            ranges=ranges,
                            held=held,
                            version=1,
                            updated_at=now,
                        )
                    )
                    session.flush()  # a concurrent first batch of this stream: IntegrityError
                else:
                    changed = session.execute(
                        update(LakeStreamRow)
                        .where(
                            LakeStreamRow.thing == thing,
                            LakeStreamRow.stream == stream,
                            LakeStreamRow.version == version,
                        )
                        .values(ranges=ranges, held=held, version=version + 1, updated_at=now)
                    )
                    if changed.rowcount != 1:  # type: ignore[attr-defined]
                        raise Stale
                # The stream's version, checked just above, guards its kits' rows too.
                for kit, (exists, kit_ranges) in (kits or {}).items():
                    count = sum(last - first + 1 for first, last in kit_ranges)
                    if exists:
                        session.execute(
                            update(LakeKitRow)
                            .where(
                                LakeKitRow.thing == thing,
                                LakeKitRow.stream == stream,
                                LakeKitRow.kit == kit,
                            )
                            .values(ranges=kit_ranges, held=count, updated_at=now)
                        )
                    else:
                        session.add(
                            LakeKitRow(
                                thing=thing,
                                stream=stream,
                                kit=kit,
                                ranges=kit_ranges,
                                held=count,
                                updated_at=now,
                            )
                        )
            add_files(session, thing, written, now)
            if upload is not None:
                key, digest, result = upload
                session.add(
                    LakeUploadRow(
                        thing=thing,
                        key=key,
                        digest=digest,
                        result=result.to_json(),
                        created_at=now,
                    )
                )

    def _kit_ranges(self, thing: str, stream: str, rows: pa.Table) -> dict[str, list[list[int]]]:
        """The kit_seq ranges the lake holds for the kits of ``rows`` that carry kit_seq
        (read after the stream's version, which the commit checks: never older than it)."""
        with_seq = rows.filter(pc.is_valid(rows.column("kit_seq")))
        if not with_seq.num_rows:
            return {}
        kits = pc.unique(with_seq.column("kit")).to_pylist()
        held: dict[str, list[list[int]]] = {}
        with self.db.read() as session:
            for start in range(0, len(kits), 500):
                for kit, kit_ranges in session.execute(
                    select(LakeKitRow.kit, LakeKitRow.ranges).where(
                        LakeKitRow.thing == thing,
                        LakeKitRow.stream == stream,
                        LakeKitRow.kit.in_(kits[start : start + 500]),
                    )
                ):
                    held[kit] = kit_ranges
        return held

    def quarantine_message(
        self,
        thing: str,
        payload: bytes,
        *,
        reason: str,
        field: str | None = None,
        stream: str | None = None,
        source: str = "mqtt",
    ) -> None:
        """Keep a message that could not be read as a batch (no sequence to dedup on)."""
        check_thing(thing)
        now = self.clock()
        table = quarantine_table(
            thing,
            stream,
            [None],
            [reason],
            [field],
            [payload],
            [None],
            ingest_us=round(now.timestamp() * 1_000_000),
            source=source,
        )
        written = self._write(thing, table, "quarantine", now)
        try:
            with self.db.write() as session:
                add_files(session, thing, written, now)
        except BaseException:
            self.discard(written)
            raise

    # -- files ---------------------------------------------------------------------------

    def _write(self, thing: str, table: pa.Table, kind: str, now: datetime) -> list[WrittenFile]:
        """One Parquet file per date partition of ``table``."""
        if table.num_rows == 0:
            return []
        days = table.column("date").combine_chunks()
        unique = pc.unique(days)
        written: list[WrittenFile] = []
        try:
            for day in unique.to_pylist():
                part = table if len(unique) == 1 else table.filter(pc.equal(days, day))
                written.append(self.put_table(kind, day, thing, part, now))
        except BaseException:
            self.discard(written)
            raise
        return written

    def put_table(
        self, kind: str, day: date, thing: str, table: pa.Table, now: datetime
    ) -> WrittenFile:
        key = (
            f"{kind}/date={day.isoformat()}/thing={thing}/"
            f"part-{now.strftime(STAMP)}-{uuid.uuid4().hex[:16]}.parquet"
        )
        sink = io.BytesIO()
        pq.write_table(
            table,
            sink,
            compression=self.settings.compression,
            row_group_size=1 << 20,
            write_statistics=True,
        )
        data = sink.getvalue()
        self.objects.put(key, data)
        return WrittenFile(key, kind, day.isoformat(), table.num_rows, len(data))

    def discard(self, written: Iterable[WrittenFile]) -> None:
        for w in written:
            try:
                self.objects.delete(w.key)
            except Exception:  # an orphan: garbage collection takes it later
                log.warning("could not delete %s; garbage collection will", w.key, exc_info=True)

    def live_files(self, kind: str = "telemetry") -> list[LakeFileRow]:
        """The files of one table of the lake now, by key."""
        with self.db.read() as session:
            rows = session.scalars(
                select(LakeFileRow)
                .where(LakeFileRow.kind == kind, LakeFileRow.retired_at.is_(None))
                .order_by(LakeFileRow.key)
            )
            return list(rows)

    def _local_paths(self, keys: list[str]) -> list[Path]:
        if self._root is not None:
            return [self._root.joinpath(*key.split("/")) for key in keys]
        assert self.cache_dir is not None
        paths = []
        for key in keys:
            path = self.cache_dir.joinpath(*key.split("/"))
            if not path.exists():
                data = self.objects.get(key)
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
                tmp.write_bytes(data)
                tmp.replace(path)
            paths.append(path)
        return paths

    # -- queries -------------------------------------------------------------------------

    def query(self, sql: str, *, timeout: float = DEFAULT_TIMEOUT) -> pa.Table:
        """Run one SELECT over the views ``telemetry`` and ``quarantine``; an Arrow table.

        >>> lake.query("SELECT thing, count(*) FROM telemetry GROUP BY thing")
        """
        from edgeloop.cloud.lake_query import check_select

        check_select(sql)  # before any file is fetched
        with self.db.read() as session:  # one snapshot of the manifest for both views
            listed: dict[str, list[str]] = defaultdict(list)
            for kind, key in session.execute(
                select(LakeFileRow.kind, LakeFileRow.key)
                .where(LakeFileRow.retired_at.is_(None))
                .order_by(LakeFileRow.key)
            ):
                listed[kind].append(key)
        files = {kind: self._local_paths(listed[kind]) for kind in KINDS}
        allowed = [self._root] if self._root is not None else [self.cache_dir]
        return run_query(
            sql,
            files,
            allowed=[p for p in allowed if p is not None],
            timeout=timeout,
            threads=self.settings.threads,
        )

    def rows(self, sql: str, *, timeout: float = DEFAULT_TIMEOUT) -> list[dict[str, Any]]:
        """The query's rows as dictionaries (maps as dicts, times as datetimes)."""
        return _pylist(self.query(sql, timeout=timeout))

    # -- statistics ----------------------------------------------------------------------

    def stats(self) -> LakeStats:
        """Sizes from the manifest (no file is read)."""
        small = self.settings.small_file_bytes
        tables: dict[str, TableStats] = {}
        with self.db.read() as session:
            for kind in KINDS:
                live = (LakeFileRow.kind == kind) & LakeFileRow.retired_at.is_(None)
                files, rows, size, first, last, smalls = session.execute(
                    select(
                        func.count(),
                        func.coalesce(func.sum(LakeFileRow.rows), 0),
                        func.coalesce(func.sum(LakeFileRow.size), 0),
                        func.min(LakeFileRow.date),
                        func.max(LakeFileRow.date),
                        func.coalesce(func.sum(case((LakeFileRow.size < small, 1), else_=0)), 0),
                    ).where(live)
                ).one()
                partitions = session.scalar(
                    select(func.count()).select_from(
                        select(LakeFileRow.date, LakeFileRow.thing)
                        .where(live)
                        .distinct()
                        .subquery()
                    )
                )
                tables[kind] = TableStats(
                    files=int(files),
                    rows=int(rows),
                    bytes=int(size),
                    partitions=int(partitions or 0),
                    small_files=int(smalls),
                    first_date=first,
                    last_date=last,
                )
            things = session.scalar(select(func.count(func.distinct(LakeStreamRow.thing))))
            streams, held = session.execute(
                select(func.count(), func.coalesce(func.sum(LakeStreamRow.held), 0))
            ).one()
            retired = session.scalar(
                select(func.count()).where(LakeFileRow.retired_at.is_not(None))
            )
        return LakeStats(
            telemetry=tables["telemetry"],
            quarantine=tables["quarantine"],
            things=int(things or 0),
            streams=int(streams),
            sequences_held=int(held),
            retired_files=int(retired or 0),
            store=self.objects.describe(),
        )

    # -- upkeep (edgeloop.cloud.lake_upkeep) ---------------------------------------------

    def compact(self, *, collect: bool = True) -> CompactionResult:
        """Merge each partition's small files into as few as ``max_file_rows`` allows."""
        return lake_upkeep.compact(self, collect=collect)

    def retain(self, days: int, *, collect: bool = True) -> RetentionResult:
        """Drop partitions (telemetry by device date, quarantine by arrival) older than
        ``days`` days before today (UTC)."""
        return lake_upkeep.retain(self, days, collect=collect)

    def collect_garbage(self, *, grace: timedelta | None = None) -> int:
        """Delete retired files and orphans older than the grace period; how many went."""
        return lake_upkeep.collect_garbage(self, grace=grace)


def _pylist(table: pa.Table) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = table.to_pylist()
    maps = [f.name for f in table.schema if pa.types.is_map(f.type)]
    for row in rows:
        for name in maps:
            if row[name] is not None:
                row[name] = dict(row[name])
    return rows
