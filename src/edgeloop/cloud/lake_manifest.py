"""The lake's manifest and index, in the cloud database: which Parquet files make up the
lake, which sequence numbers of each stream it holds (and which kit counters of each
kit in it), and the answers given to idempotency keys. A file is part of the lake while
its row is live; committing rows is what makes files visible, in one transaction with the
ranges they fill.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, CheckConstraint, Index, Integer, String
from sqlalchemy.orm import Mapped, Session, mapped_column

from edgeloop.cloud.db import Base

__all__ = [
    "MAX_IDEMPOTENCY_KEY",
    "PART_NAME",
    "STAMP",
    "LakeFileRow",
    "LakeKitRow",
    "LakeStreamRow",
    "LakeUploadRow",
    "Stale",
    "WrittenFile",
    "add_files",
]

MAX_IDEMPOTENCY_KEY = 200
STAMP = "%Y%m%dT%H%M%S%fZ"  # in file names: when the file was written, UTC
PART_NAME = re.compile(r"^part-(\d{8}T\d{12}Z)-[0-9a-f]+\.parquet$")


class LakeFileRow(Base):
    """A Parquet file of the lake; live while ``retired_at`` is null."""

    __tablename__ = "lake_files"
    __table_args__ = (
        CheckConstraint("kind IN ('telemetry', 'quarantine')", name="kind"),
        Index("ix_lake_files_kind_retired_at_date", "kind", "retired_at", "date"),
        Index("ix_lake_files_retired_at", "retired_at"),
    )

    key: Mapped[str] = mapped_column(String(512), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    date: Mapped[str] = mapped_column(String(10))  # YYYY-MM-DD, the partition
    thing: Mapped[str] = mapped_column(String(128))
    rows: Mapped[int] = mapped_column(BigInteger)
    size: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime]
    retired_at: Mapped[datetime | None]


class LakeStreamRow(Base):
    """The sequence numbers of one stream of one thing that the lake holds, as ranges."""

    __tablename__ = "lake_streams"

    thing: Mapped[str] = mapped_column(String(128), primary_key=True)
    stream: Mapped[str] = mapped_column(String(64), primary_key=True)
    ranges: Mapped[list[list[int]]] = mapped_column(JSON)  # [[first, last], ...] inclusive
    held: Mapped[int] = mapped_column(BigInteger)
    version: Mapped[int] = mapped_column(Integer)
    updated_at: Mapped[datetime]


class LakeKitRow(Base):
    """The kit counters (``kit_seq``) of one kit's readings in one stream of one thing that
    the lake holds, as ranges.

    A hub may spool one kit reading twice under two sequence numbers (its broker redelivers
    a reading whose spooling a crash left unacknowledged); the kit's own counter tells
    them apart. Written only in the transaction that moves the stream's ``LakeStreamRow``
    to its next version, so that row's version guards these rows too.
    """

    __tablename__ = "lake_kits"

    thing: Mapped[str] = mapped_column(String(128), primary_key=True)
    stream: Mapped[str] = mapped_column(String(64), primary_key=True)
    kit: Mapped[str] = mapped_column(String(128), primary_key=True)
    ranges: Mapped[list[list[int]]] = mapped_column(JSON)  # [[first, last], ...] inclusive
    held: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[datetime]


class LakeUploadRow(Base):
    """The answer given to an upload with an idempotency key, to give again on a retry."""

    __tablename__ = "lake_uploads"
    __table_args__ = (Index("ix_lake_uploads_created_at", "created_at"),)

    thing: Mapped[str] = mapped_column(String(128), primary_key=True)
    key: Mapped[str] = mapped_column(String(MAX_IDEMPOTENCY_KEY), primary_key=True)
    digest: Mapped[str] = mapped_column(String(64))
    result: Mapped[dict[str, Any]]
    created_at: Mapped[datetime]


@dataclass
class WrittenFile:
    """A Parquet file written to the object store, not yet in the manifest."""

    key: str
    kind: str
    day: str
    rows: int
    size: int


class Stale(Exception):
    """Another writer committed to the same stream (or key) first: read and try again."""


def add_files(session: Session, thing: str, written: Iterable[WrittenFile], now: datetime) -> None:
    """Manifest rows for ``written`` (live from the commit of ``session``'s transaction)."""
    session.add_all(
        LakeFileRow(
            key=w.key,
            kind=w.kind,
            date=w.day,
            thing=thing,
            rows=w.rows,
            size=w.size,
            created_at=now,
            retired_at=None,
        )
        for w in written
    )
