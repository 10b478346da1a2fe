"""Upkeep of the telemetry lake: compaction, retention, and collecting what they retire.

Compaction merges a partition's small files into one (sorted by stream and sequence),
commits the new file's row and retires the old rows in one transaction, and deletes the
old objects only after the grace period, so a query that listed them can still read
them. Retention retires whole partitions older than N days. Garbage collection deletes
retired files and orphans (files of a batch whose commit never happened) once older
than the grace period. Sequence ranges outlive all three, so a reading once held is
never taken in again.
"""

from __future__ import annotations

import io
import logging
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from sqlalchemy import delete, func, select, update

from edgeloop.cloud.lake_manifest import PART_NAME, STAMP, LakeFileRow, LakeUploadRow, Stale
from edgeloop.cloud.lake_rows import QUARANTINE_SCHEMA, TELEMETRY_SCHEMA
from edgeloop.core.errors import ValidationError

if TYPE_CHECKING:
    from edgeloop.cloud.lake import Lake

__all__ = ["CompactionResult", "RetentionResult", "collect_garbage", "compact", "retain"]

log = logging.getLogger("edgeloop.cloud.lake")
KINDS = ("telemetry", "quarantine")


@dataclass(frozen=True)
class CompactionResult:
    """What a compaction merged."""

    partitions: int = 0
    files_before: int = 0
    files_after: int = 0
    rows: int = 0
    duplicates_dropped: int = 0
    deleted_objects: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RetentionResult:
    """What a retention run retired."""

    cutoff: str  # partitions dated before this day were dropped
    partitions: int = 0
    files: int = 0
    rows: int = 0
    deleted_objects: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def compact(lake: Lake, *, collect: bool = True) -> CompactionResult:
    """Merge each partition's small files into as few as ``max_file_rows`` allows."""
    groups: dict[tuple[str, str, str], list[LakeFileRow]] = defaultdict(list)
    with lake.db.read() as session:
        for row in session.scalars(
            select(LakeFileRow)
            .where(
                LakeFileRow.retired_at.is_(None),
                LakeFileRow.size < lake.settings.small_file_bytes,
            )
            .order_by(LakeFileRow.key)
        ):
            groups[(row.kind, row.date, row.thing)].append(row)
    partitions = before = after = rows = dropped = 0
    for (kind, day, thing), files in sorted(groups.items()):
        runs = list(_runs(files, lake.settings.max_file_rows))
        if not runs:
            continue
        partitions += 1
        for run in runs:
            merged = _merge(lake, kind, day, thing, run)
            if merged is None:
                continue  # its files changed meanwhile; the next compaction sees them
            before += len(run)
            after += 1
            rows += merged[0]
            dropped += merged[1]
    deleted = collect_garbage(lake) if collect else 0
    return CompactionResult(
        partitions=partitions,
        files_before=before,
        files_after=after,
        rows=rows,
        duplicates_dropped=dropped,
        deleted_objects=deleted,
    )


def _merge(
    lake: Lake, kind: str, day: str, thing: str, run: list[LakeFileRow]
) -> tuple[int, int] | None:
    schema = TELEMETRY_SCHEMA if kind == "telemetry" else QUARANTINE_SCHEMA
    tables = [pq.read_table(io.BytesIO(lake.objects.get(f.key)), schema=schema) for f in run]
    table = pa.concat_tables(tables)
    dropped = 0
    if kind == "telemetry":
        table = table.sort_by([("stream", "ascending"), ("sequence", "ascending")])
        table, dropped = _drop_repeats(table)
        if dropped:
            log.warning("compaction of %s/%s dropped %d repeated readings", day, thing, dropped)
    else:
        table = table.sort_by([("ingest_time", "ascending")])
    now = lake.clock()
    new = lake.put_table(kind, date.fromisoformat(day), thing, table, now)
    try:
        with lake.db.write() as session:
            retired = session.execute(
                update(LakeFileRow)
                .where(LakeFileRow.key.in_([f.key for f in run]), LakeFileRow.retired_at.is_(None))
                .values(retired_at=now)
            )
            if retired.rowcount != len(run):  # type: ignore[attr-defined]
                raise Stale  # retention or another compaction took some of them
            session.add(
                LakeFileRow(
                    key=new.key,
                    kind=kind,
                    date=day,
                    thing=thing,
                    rows=new.rows,
                    size=new.size,
                    created_at=now,
                    retired_at=None,
                )
            )
    except Stale:
        lake.discard([new])
        return None
    except BaseException:
        lake.discard([new])
        raise
    return new.rows, dropped


def retain(lake: Lake, days: int, *, collect: bool = True) -> RetentionResult:
    """Drop partitions (telemetry by device date, quarantine by arrival) older than
    ``days`` days before today (UTC)."""
    if isinstance(days, bool) or not isinstance(days, int) or days < 0:
        raise ValidationError("must be a whole number of days, 0 or more", field="days")
    now = lake.clock()
    cutoff = (now.astimezone(UTC).date() - timedelta(days=days)).isoformat()
    with lake.db.write() as session:
        old = LakeFileRow.retired_at.is_(None) & (LakeFileRow.date < cutoff)
        files, rows = session.execute(
            select(func.count(), func.coalesce(func.sum(LakeFileRow.rows), 0)).where(old)
        ).one()
        partitions = session.scalar(
            select(func.count()).select_from(
                select(LakeFileRow.kind, LakeFileRow.date, LakeFileRow.thing)
                .where(old)
                .distinct()
                .subquery()
            )
        )
        session.execute(update(LakeFileRow).where(old).values(retired_at=now))
    deleted = collect_garbage(lake) if collect else 0
    return RetentionResult(
        cutoff=cutoff,
        partitions=int(partitions or 0),
        files=int(files),
        rows=int(rows),
        deleted_objects=deleted,
    )


def collect_garbage(lake: Lake, *, grace: timedelta | None = None) -> int:
    """Delete retired files and orphans (written by a batch that never committed) once
    older than the grace period, and old idempotency answers; how many objects went."""
    now = lake.clock()
    limit = now - (lake.settings.grace if grace is None else grace)
    with lake.db.read() as session:
        retired = list(
            session.scalars(
                select(LakeFileRow.key).where(
                    LakeFileRow.retired_at.is_not(None), LakeFileRow.retired_at <= limit
                )
            )
        )
    deleted = 0
    for key in retired:
        lake.objects.delete(key)
        deleted += 1
    with lake.db.write() as session:
        if retired:
            for chunk in _chunks(retired, 500):
                session.execute(delete(LakeFileRow).where(LakeFileRow.key.in_(chunk)))
        session.execute(
            delete(LakeUploadRow).where(LakeUploadRow.created_at < now - lake.settings.upload_ttl)
        )
    deleted += _delete_orphans(lake, limit)
    _prune_cache(lake)
    return deleted


def _delete_orphans(lake: Lake, limit: datetime) -> int:
    with lake.db.read() as session:
        known = set(session.scalars(select(LakeFileRow.key)))
    deleted = 0
    for kind in KINDS:
        for info in lake.objects.list(f"{kind}/"):
            if info.key in known:
                continue
            match = PART_NAME.match(info.key.rsplit("/", 1)[-1])
            if match is None:
                continue  # not ours
            written = datetime.strptime(match.group(1), STAMP).replace(tzinfo=UTC)
            if written <= limit:
                lake.objects.delete(info.key)
                deleted += 1
    return deleted


def _prune_cache(lake: Lake) -> None:
    if lake.cache_dir is None:
        return
    with lake.db.read() as session:
        live = set(session.scalars(select(LakeFileRow.key).where(LakeFileRow.retired_at.is_(None))))
    for path in lake.cache_dir.rglob("*.parquet"):
        if path.relative_to(lake.cache_dir).as_posix() not in live:
            path.unlink(missing_ok=True)


def _runs(files: list[LakeFileRow], max_rows: int) -> Iterator[list[LakeFileRow]]:
    """Groups of two or more files whose rows add up to at most ``max_rows``."""
    run: list[LakeFileRow] = []
    total = 0
    for f in files:
        if run and total + f.rows > max_rows:
            if len(run) > 1:
                yield run
            run, total = [], 0
        run.append(f)
        total += f.rows
    if len(run) > 1:
        yield run


def _drop_repeats(table: pa.Table) -> tuple[pa.Table, int]:
    """A sorted table without rows repeating the previous row's (stream, sequence)."""
    if table.num_rows < 2:
        return table, 0
    sequence = table.column("sequence").to_numpy()
    stream = table.column("stream").combine_chunks().dictionary_encode().indices.to_numpy()
    repeat = np.zeros(table.num_rows, dtype=bool)
    repeat[1:] = (sequence[1:] == sequence[:-1]) & (stream[1:] == stream[:-1])
    dropped = int(repeat.sum())
    return (table.filter(pa.array(~repeat)) if dropped else table), dropped


def _chunks(items: list[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
