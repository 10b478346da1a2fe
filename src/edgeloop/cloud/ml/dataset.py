"""Training datasets: snapshots of the lake's readings, named by the hash of their content.

A snapshot is one SQL query over the lake's ``telemetry`` view (appliance kinds and a time
range), ordered so that the same readings always come out in the same order, as an Arrow
table with the columns ``SNAPSHOT_SCHEMA`` names. Its *hash* is the SHA-256 of that table
written as an uncompressed Arrow IPC stream (its canonical bytes): the same readings give
the same hash whatever files, compactions or batches they came in, and any change to a
reading, a label or a timestamp gives another. The snapshot is kept in the object store
(``ml/datasets/<hash>.arrows``, zstd-compressed IPC) with a row in ``ml_datasets``, so the
dataset a model version was trained on can be fetched again, and is checked against its
hash when it is.

:func:`appliance_data` turns a snapshot into what training needs: per appliance kind, its
sensors (by name) and per kit its readings as a dense array (NaN
where a sensor gave no value), labels and timestamps.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from numpy.typing import NDArray
from sqlalchemy import BigInteger, String
from sqlalchemy.orm import Mapped, mapped_column

from edgeloop.cloud.db import Base, Database, utcnow
from edgeloop.cloud.lake import Lake
from edgeloop.cloud.objectstore import ObjectStore
from edgeloop.core.errors import NotFoundError, ValidationError

__all__ = [
    "SNAPSHOT_SCHEMA",
    "ApplianceData",
    "DatasetInfo",
    "DatasetRow",
    "DatasetSpec",
    "Datasets",
    "KitData",
    "appliance_data",
    "canonical_bytes",
    "content_hash",
    "parse_since",
]

PREFIX = "ml/datasets/"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_RELATIVE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(m|h|d)\s*$")
_UNITS = {"m": 60.0, "h": 3600.0, "d": 86400.0}
_SHA256 = re.compile(r"[0-9a-f]{64}")

SNAPSHOT_SCHEMA = pa.schema(
    [
        pa.field("thing", pa.string()),
        pa.field("kit", pa.string()),
        pa.field("appliance", pa.string()),
        pa.field("device_time", pa.timestamp("us", tz="UTC")),
        pa.field("kit_seq", pa.int64()),
        pa.field("label", pa.string()),
        pa.field("sensors", pa.map_(pa.string(), pa.float64())),
    ]
)


class DatasetRow(Base):
    """A dataset snapshot kept in the object store."""

    __tablename__ = "ml_datasets"

    hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    spec: Mapped[dict[str, Any]]
    rows: Mapped[int] = mapped_column(BigInteger)
    appliances: Mapped[dict[str, Any]]  # kind -> {"readings": n, "kits": n}
    key: Mapped[str] = mapped_column(String(512))
    size: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime]


@dataclass(frozen=True, kw_only=True)
class DatasetSpec:
    """Which readings a dataset holds: appliance kinds (none: all) and a time range."""

    appliances: tuple[str, ...] = ()
    since: datetime | None = None
    until: datetime | None = None

    def __post_init__(self) -> None:
        for name in self.appliances:
            if not _NAME.fullmatch(name):
                raise ValidationError(
                    f"{name!r} is not an appliance kind (letters, digits, '_', '.', '-')",
                    field="appliances",
                )
        for label, when in (("since", self.since), ("until", self.until)):
            if when is not None and when.tzinfo is None:
                raise ValidationError("must be a time with a time zone", field=label)
        if self.since and self.until and self.until <= self.since:
            raise ValidationError("must come after 'since'", field="until")

    def sql(self) -> str:
        """The snapshot's query over the lake (values checked, so safe to inline)."""
        where = ["true"]
        if self.appliances:
            kinds = ", ".join(f"'{name}'" for name in sorted(set(self.appliances)))
            where.append(f"appliance IN ({kinds})")
        if self.since is not None:
            where.append(f"device_time >= TIMESTAMPTZ '{self.since.astimezone(UTC).isoformat()}'")
        if self.until is not None:
            where.append(f"device_time < TIMESTAMPTZ '{self.until.astimezone(UTC).isoformat()}'")
        return (
            # A map's keys come in whatever order the lake's batch had them: sorted here.
            "SELECT thing, kit, appliance, device_time, kit_seq, label, "
            "map_from_entries(list_sort(map_entries(sensors))) AS sensors FROM telemetry "
            f"WHERE {' AND '.join(where)} "
            "ORDER BY appliance, thing, kit, device_time, kit_seq, stream, sequence"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "appliances": list(self.appliances),
            "since": self.since.isoformat() if self.since else None,
            "until": self.until.isoformat() if self.until else None,
        }


def parse_since(value: str | None, *, now: datetime | None = None, field: str) -> datetime | None:
    """A time from ISO 8601 (UTC unless it says) or a span back from now (``90m``, ``6h``,
    ``7d``); None for None or an empty string."""
    if value is None or not value.strip():
        return None
    match = _RELATIVE.match(value)
    if match:
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
        return (now or utcnow()) - timedelta(seconds=seconds)
    try:
        when = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError as err:
        raise ValidationError(
            f"{value!r} is neither an ISO 8601 time (2025-01-06T00:00:00Z) nor a span back "
            "from now (90m, 6h, 7d)",
            field=field,
        ) from err
    return when if when.tzinfo else when.replace(tzinfo=UTC)


# --- canonical bytes ----------------------------------------------------------------------


def canonical_bytes(table: pa.Table) -> bytes:
    """The table in the snapshot schema as one uncompressed Arrow IPC stream, one batch."""
    table = table.cast(SNAPSHOT_SCHEMA).combine_chunks()
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, SNAPSHOT_SCHEMA) as writer:
        if table.num_rows:
            writer.write_table(table, max_chunksize=max(1, table.num_rows))
    return bytes(sink.getvalue().to_pybytes())


def content_hash(table: pa.Table) -> str:
    """The SHA-256 of the table's canonical bytes."""
    return hashlib.sha256(canonical_bytes(table)).hexdigest()


@dataclass(frozen=True)
class DatasetInfo:
    """A stored snapshot."""

    hash: str
    spec: dict[str, Any]
    rows: int
    appliances: dict[str, Any]
    key: str
    size: int
    created_at: datetime

    def to_json(self) -> dict[str, Any]:
        return {
            "hash": self.hash,
            "spec": self.spec,
            "rows": self.rows,
            "appliances": self.appliances,
            "key": self.key,
            "size": self.size,
            "createdAt": self.created_at.isoformat(),
        }


class Datasets:
    """Snapshots of the lake, taken, stored and fetched again by hash."""

    def __init__(self, db: Database, objects: ObjectStore, lake: Lake) -> None:
        self.db = db
        self.objects = objects
        self.lake = lake

    def snapshot(self, spec: DatasetSpec) -> tuple[DatasetInfo, pa.Table]:
        """Query the lake, store the result under its hash (once), and return both."""
        table = self.lake.query(spec.sql()).cast(SNAPSHOT_SCHEMA)
        data = canonical_bytes(table)
        digest = hashlib.sha256(data).hexdigest()
        with self.db.read() as session:
            row = session.get(DatasetRow, digest)
            if row is not None:
                return _info(row), table
        key = f"{PREFIX}{digest}.arrows"
        stored = _compressed(table)
        self.objects.put(key, stored)
        info = DatasetInfo(
            hash=digest,
            spec=spec.to_json(),
            rows=table.num_rows,
            appliances=_summary(table),
            key=key,
            size=len(stored),
            created_at=utcnow(),
        )
        with self.db.write() as session:
            if session.get(DatasetRow, digest) is None:
                session.add(
                    DatasetRow(
                        hash=info.hash,
                        spec=info.spec,
                        rows=info.rows,
                        appliances=info.appliances,
                        key=info.key,
                        size=info.size,
                        created_at=info.created_at,
                    )
                )
        return info, table

    def get(self, digest: str) -> DatasetInfo:
        """The stored snapshot with this hash (NotFoundError otherwise)."""
        if not _SHA256.fullmatch(digest):
            raise ValidationError("must be 64 lowercase hex digits (a SHA-256)", field="hash")
        with self.db.read() as session:
            row = session.get(DatasetRow, digest)
            if row is None:
                raise NotFoundError("dataset", digest)
            return _info(row)

    def load(self, digest: str) -> pa.Table:
        """The snapshot's table, checked against its hash."""
        info = self.get(digest)
        with pa.ipc.open_stream(pa.BufferReader(self.objects.get(info.key))) as reader:
            table = reader.read_all()
        if content_hash(table) != digest:
            raise ValidationError(
                f"the stored dataset {info.key} no longer matches its hash: it was damaged",
                field="hash",
            )
        return table

    def all(self) -> list[DatasetInfo]:
        """Every stored snapshot, newest first."""
        from sqlalchemy import select

        with self.db.read() as session:
            rows = session.scalars(select(DatasetRow).order_by(DatasetRow.created_at.desc()))
            return [_info(row) for row in rows]


def _info(row: DatasetRow) -> DatasetInfo:
    return DatasetInfo(
        hash=row.hash,
        spec=dict(row.spec),
        rows=row.rows,
        appliances=dict(row.appliances),
        key=row.key,
        size=row.size,
        created_at=row.created_at,
    )


def _compressed(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    options = pa.ipc.IpcWriteOptions(compression="zstd")
    with pa.ipc.new_stream(sink, SNAPSHOT_SCHEMA, options=options) as writer:
        writer.write_table(table.combine_chunks())
    return bytes(sink.getvalue().to_pybytes())


def _summary(table: pa.Table) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for data in appliance_data(table):
        summary[data.appliance] = {
            "readings": sum(len(k.labels) for k in data.kits),
            "kits": len(data.kits),
            "sensors": list(data.sensors),
        }
    return summary


# --- from a snapshot to arrays ------------------------------------------------------------


@dataclass(frozen=True)
class KitData:
    """One kit's readings in time order."""

    thing: str
    kit: str
    values: NDArray[np.float64]  # (readings, sensors), NaN = no value
    labels: tuple[str | None, ...]
    ts_ms: NDArray[np.int64]

    @property
    def device(self) -> str:
        """The kit's name across the fleet: ``<thing>/<kit>``."""
        return f"{self.thing}/{self.kit}"


@dataclass(frozen=True)
class ApplianceData:
    """One appliance kind's readings, kit by kit."""

    appliance: str
    sensors: tuple[str, ...]
    kits: tuple[KitData, ...]


def appliance_data(table: pa.Table) -> Iterator[ApplianceData]:
    """The snapshot's readings per appliance kind (in the snapshot's order)."""
    if table.num_rows == 0:
        return
    table = table.cast(SNAPSHOT_SCHEMA).combine_chunks()
    kinds = table.column("appliance").to_pylist()
    for kind, start, stop in _spans(kinds):
        part = table.slice(start, stop - start)
        sensors_col = part.column("sensors").combine_chunks()
        encoded = pc.dictionary_encode(sensors_col.keys)
        seen = [str(s) for s in encoded.dictionary.to_pylist()]
        sensors = tuple(sorted(seen))
        rank = np.array([sensors.index(name) for name in seen], dtype=np.intp)
        offsets = sensors_col.offsets.to_numpy()
        offsets = offsets - offsets[0]
        rows = np.repeat(np.arange(part.num_rows), np.diff(offsets))
        values = np.full((part.num_rows, len(sensors)), np.nan)
        codes = rank[encoded.indices.to_numpy(zero_copy_only=False)]
        items = sensors_col.items.to_numpy(zero_copy_only=False)
        values[rows, codes] = np.where(np.isnan(items), np.nan, items)
        ts = part.column("device_time").cast(pa.int64()).to_numpy() // 1000
        labels = part.column("label").to_pylist()
        device = list(
            zip(part.column("thing").to_pylist(), part.column("kit").to_pylist(), strict=True)
        )
        kits = tuple(
            KitData(
                thing=thing,
                kit=kit,
                values=values[a:b],
                labels=tuple(labels[a:b]),
                ts_ms=ts[a:b].astype(np.int64),
            )
            for (thing, kit), a, b in _spans(device)
        )
        yield ApplianceData(appliance=str(kind), sensors=sensors, kits=kits)


def _spans(keys: Sequence[Any]) -> Iterator[tuple[Any, int, int]]:
    """Runs of equal consecutive keys as (key, start, stop)."""
    start = 0
    for i in range(1, len(keys) + 1):
        if i == len(keys) or keys[i] != keys[start]:
            yield keys[start], start, i
            start = i
