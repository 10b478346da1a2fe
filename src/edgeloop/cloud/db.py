"""The cloud's database: SQLAlchemy models and a ``Database`` over SQLite or PostgreSQL.

One code path for both: ``sqlite:///path/to/edgeloop.db`` (the embedded default, a file in
the data folder; WAL journal, foreign keys on, writers queue on a busy timeout) and
``postgresql://user:password@host:port/dbname`` (driven by psycopg 3). JSON columns use
SQLAlchemy's portable ``JSON``; timestamps are always timezone-aware UTC on the Python side
(SQLite keeps them as naive UTC text, which sorts and compares correctly).

The schema is created and upgraded by Alembic (``Database.migrate()``); the migration
scripts ship inside the package, so no ``alembic.ini`` is needed at run time.

Sessions: ``read()`` for queries, ``write()`` for a transaction that commits when the block
ends. On SQLite a write transaction starts with ``BEGIN IMMEDIATE``, so a writer waits for
the write lock up front instead of failing half-way when another writer got there first.
Errors of an unreachable or failing database surface as ``CloudError`` naming the URL
(never its password).
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Dialect,
    Engine,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    create_engine,
    event,
    text,
)
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.exc import ArgumentError, InterfaceError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.pool import StaticPool
from sqlalchemy.types import TypeDecorator

from edgeloop.core.errors import CloudError, ValidationError

__all__ = [
    "Base",
    "CertificateRow",
    "ClaimTemplateRow",
    "ConnectivityRow",
    "Database",
    "DynamicMembershipRow",
    "EventRow",
    "GroupMemberRow",
    "RegisteredCaRow",
    "ShadowRow",
    "ThingGroupRow",
    "ThingRow",
]

SQLITE_FILE_NAME = "edgeloop.db"
# How long a SQLite writer waits for another writer's lock before giving up.
SQLITE_BUSY_SECONDS = 30.0
POSTGRES_CONNECT_TIMEOUT = 10

_MIGRATIONS = Path(__file__).parent / "migrations"

# Stable constraint names, so migrations can name what they alter on both backends.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    """Now, timezone-aware UTC (the default clock of the cloud's services)."""
    return datetime.now(UTC)


class UtcDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on both backends (SQLite stores naive UTC text)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            # A naive time is ambiguous; refusing it beats storing the wrong instant.
            raise ValueError(f"naive datetime {value!r}: pass a timezone-aware time")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# BIGSERIAL on PostgreSQL; SQLite's ROWID alias must be spelled INTEGER.
_EVENT_ID = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    """Declarative base of the cloud's tables."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UtcDateTime(), dict[str, Any]: JSON()}


class ThingRow(Base):
    """A thing: a hub or device, with flat attributes and an optimistic-lock version."""

    __tablename__ = "things"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    thing_type: Mapped[str | None] = mapped_column(String(128))
    attributes: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    version: Mapped[int] = mapped_column(Integer, default=1)


class ThingGroupRow(Base):
    """A thing group: static (listed members) or dynamic (a saved fleet query)."""

    __tablename__ = "thing_groups"
    __table_args__ = (
        CheckConstraint(
            "(kind = 'static' AND query IS NULL) OR (kind = 'dynamic' AND query IS NOT NULL)",
            name="kind_query",
        ),
    )

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    query: Mapped[str | None] = mapped_column(Text)
    description: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime]


class GroupMemberRow(Base):
    """A thing in a static group."""

    __tablename__ = "group_members"
    __table_args__ = (Index("ix_group_members_thing_name", "thing_name"),)

    group_name: Mapped[str] = mapped_column(
        String(128), ForeignKey("thing_groups.name", ondelete="CASCADE"), primary_key=True
    )
    thing_name: Mapped[str] = mapped_column(
        String(128), ForeignKey("things.name", ondelete="CASCADE"), primary_key=True
    )


class DynamicMembershipRow(Base):
    """A thing that currently matches a dynamic group's query (kept by the registry)."""

    __tablename__ = "dynamic_memberships"
    __table_args__ = (Index("ix_dynamic_memberships_thing_name", "thing_name"),)

    group_name: Mapped[str] = mapped_column(
        String(128), ForeignKey("thing_groups.name", ondelete="CASCADE"), primary_key=True
    )
    thing_name: Mapped[str] = mapped_column(
        String(128), ForeignKey("things.name", ondelete="CASCADE"), primary_key=True
    )


class CertificateRow(Base):
    """An X.509 certificate the cloud issued or registered, keyed by its SHA-256 fingerprint."""

    __tablename__ = "certificates"
    __table_args__ = (
        CheckConstraint("kind IN ('device', 'claim')", name="kind"),
        CheckConstraint("status IN ('ACTIVE', 'REVOKED', 'INACTIVE')", name="status"),
        Index("ix_certificates_thing_name", "thing_name"),
        Index("ix_certificates_status", "status"),
    )

    certificate_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    thing_name: Mapped[str | None] = mapped_column(
        String(128), ForeignKey("things.name", ondelete="SET NULL")
    )
    kind: Mapped[str] = mapped_column(String(16))
    pem: Mapped[str] = mapped_column(Text)
    # Text: X.509 serials run to 20 bytes, past any integer column; decimal digits.
    serial: Mapped[str] = mapped_column(Text)
    issuer: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default="ACTIVE")
    created_at: Mapped[datetime]
    revoked_at: Mapped[datetime | None]
    revoke_reason: Mapped[str | None] = mapped_column(Text)


class RegisteredCaRow(Base):
    """A CA certificate a user registered; device certificates it signed may be registered."""

    __tablename__ = "registered_cas"

    fingerprint: Mapped[str] = mapped_column(String(64), primary_key=True)
    pem: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime]


class ConnectivityRow(Base):
    """Whether a thing is connected to the broker, since when, and why it left."""

    __tablename__ = "connectivity"

    thing_name: Mapped[str] = mapped_column(
        String(128), ForeignKey("things.name", ondelete="CASCADE"), primary_key=True
    )
    connected: Mapped[bool] = mapped_column(Boolean)
    since: Mapped[datetime]
    client_id: Mapped[str | None] = mapped_column(String(256))
    disconnect_reason: Mapped[str | None] = mapped_column(Text)


class ShadowRow(Base):
    """One shadow of a thing (name '' is the classic shadow); document None = deleted."""

    __tablename__ = "shadows"

    thing_name: Mapped[str] = mapped_column(
        String(128), ForeignKey("things.name", ondelete="CASCADE"), primary_key=True
    )
    name: Mapped[str] = mapped_column(String(64), primary_key=True, default="")
    document: Mapped[dict[str, Any] | None]
    version: Mapped[int] = mapped_column(Integer)
    updated_at: Mapped[datetime]


class ClaimTemplateRow(Base):
    """A provisioning template: what a claim certificate may turn into (and who decides)."""

    __tablename__ = "claim_templates"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    description: Mapped[str] = mapped_column(Text, default="")
    hook: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime]


class EventRow(Base):
    """One line of the append-only audit log: every registry write adds one."""

    __tablename__ = "events"
    __table_args__ = (Index("ix_events_subject_id", "subject", "id"),)

    id: Mapped[int] = mapped_column(_EVENT_ID, primary_key=True, autoincrement=True)
    at: Mapped[datetime]
    kind: Mapped[str] = mapped_column(String(64))
    subject: Mapped[str] = mapped_column(String(256))
    detail: Mapped[dict[str, Any]] = mapped_column(default=dict)


# --- the database -----------------------------------------------------------------------


_PASSWORD_IN_URL = re.compile(r"(://[^:/@]*):[^@/]*@")


def redact(url: str) -> str:
    """``url`` without any password, for messages and logs."""
    return _PASSWORD_IN_URL.sub(r"\1@", url)


def _parse(url: str) -> tuple[URL, str]:
    """The URL to connect with (driver chosen) and its password-free display form."""
    if not isinstance(url, str) or not url.strip():
        raise ValidationError(
            "is empty: use sqlite:///path/to/edgeloop.db or postgresql://user@host/dbname",
            field="database URL",
        )
    try:
        parsed = make_url(url.strip())
    except ArgumentError as err:
        raise ValidationError(
            "is not a URL: use sqlite:///path/to/edgeloop.db or postgresql://user@host/dbname",
            field=f"database URL {redact(url)!r}",
        ) from err
    # (URL.set(password=None) would keep the password: None there means "unchanged".)
    shown = URL.create(
        parsed.drivername,
        username=parsed.username,
        host=parsed.host,
        port=parsed.port,
        database=parsed.database,
        query=parsed.query,
    ).render_as_string(hide_password=False)
    backend, _, driver = parsed.drivername.partition("+")
    if backend in ("postgresql", "postgres") and driver in ("", "psycopg"):
        return parsed.set(drivername="postgresql+psycopg"), shown
    if backend == "sqlite" and driver in ("", "pysqlite"):
        return parsed.set(drivername="sqlite+pysqlite"), shown
    raise ValidationError(
        f"scheme {parsed.drivername!r} is not supported: use sqlite:///path/to/edgeloop.db "
        "or postgresql://user@host/dbname (driven by psycopg 3)",
        field=f"database URL {shown!r}",
    )


def _is_memory(url: URL) -> bool:
    return url.database in (None, "", ":memory:")


class Database:
    """A SQLite file or a PostgreSQL database, with the cloud's schema once migrated."""

    def __init__(self, url: str, *, echo: bool = False) -> None:
        self.url, self.display_url = _parse(url)
        self.engine = self._create_engine(echo)
        # Sessions keep loaded values after commit: services return plain data from them.
        self.sessions: sessionmaker[Session] = sessionmaker(self.engine, expire_on_commit=False)
        self._write_sessions: sessionmaker[Session] = sessionmaker(
            self.engine.execution_options(edgeloop_write=True), expire_on_commit=False
        )

    @classmethod
    def in_data_dir(cls, data_dir: Path) -> Database:
        """The embedded default: a SQLite file in the install's data folder."""
        data_dir.mkdir(parents=True, exist_ok=True)
        return cls(f"sqlite:///{(data_dir / SQLITE_FILE_NAME).resolve()}")

    @property
    def dialect(self) -> str:
        """``"sqlite"`` or ``"postgresql"``."""
        return self.engine.dialect.name

    def __repr__(self) -> str:
        return f"Database({self.display_url!r})"

    # -- engines -------------------------------------------------------------------------

    def _create_engine(self, echo: bool) -> Engine:
        if self.url.get_backend_name() == "postgresql":
            return create_engine(
                self.url,
                echo=echo,
                pool_pre_ping=True,
                connect_args={"connect_timeout": POSTGRES_CONNECT_TIMEOUT},
            )
        if _is_memory(self.url):
            engine = create_engine(
                "sqlite+pysqlite://",
                echo=echo,
                poolclass=StaticPool,
                connect_args={"check_same_thread": False},
            )
        else:
            path = Path(str(self.url.database))
            if not path.parent.is_dir():
                raise ValidationError(
                    f"folder {str(path.parent)!r} does not exist: create the data folder first",
                    field=f"database URL {self.display_url!r}",
                )
            engine = create_engine(
                self.url,
                echo=echo,
                connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_SECONDS},
            )
        _configure_sqlite(engine, wal=not _is_memory(self.url))
        return engine

    # -- sessions ------------------------------------------------------------------------

    @contextmanager
    def translate_errors(self) -> Iterator[None]:
        """Turn a driver's connection or operational failure into a CloudError."""
        try:
            yield
        except (OperationalError, InterfaceError) as err:
            detail = redact(str(err.orig) if err.orig is not None else str(err))
            if self.url.password:
                detail = detail.replace(self.url.password, "***")
            detail = detail.strip().splitlines()[0] if detail.strip() else type(err).__name__
            raise CloudError(
                f"database {self.display_url} failed: {detail} "
                "(is it running and reachable, and are the user and database right?)"
            ) from err

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A session for queries (its transaction is rolled back at the end)."""
        with self.translate_errors(), self.sessions() as session:
            yield session

    @contextmanager
    def write(self) -> Iterator[Session]:
        """A session in a transaction that commits when the block ends (rolls back on error)."""
        with self.translate_errors(), self._write_sessions() as session, session.begin():
            yield session

    def check(self) -> None:
        """Connect once; CloudError naming the URL when the database cannot be reached."""
        with self.translate_errors(), self.engine.connect() as connection:
            connection.execute(text("SELECT 1"))

    # -- schema --------------------------------------------------------------------------

    def migrate(self, revision: str = "head") -> None:
        """Bring the schema to ``revision`` (default: the newest) with Alembic, atomically."""
        from alembic import command
        from alembic.config import Config

        config = Config()
        config.set_main_option("script_location", str(_MIGRATIONS))
        writer = self.engine.execution_options(edgeloop_write=True)
        with self.translate_errors(), writer.begin() as connection:
            # env.py runs on this connection, inside this transaction.
            config.attributes["connection"] = connection
            command.upgrade(config, revision)

    def revision(self) -> str | None:
        """The schema revision Alembic last applied (None for an empty database)."""
        from alembic.runtime.migration import MigrationContext

        with self.translate_errors(), self.engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()

    def dispose(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()


def _configure_sqlite(engine: Engine, *, wal: bool) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: sqlite3.Connection, _record: object) -> None:
        # Take transactions over from pysqlite (which never BEGINs before DDL and cannot
        # BEGIN IMMEDIATE); the "begin" hook below opens them instead.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA foreign_keys = ON")
            cursor.execute(f"PRAGMA busy_timeout = {int(SQLITE_BUSY_SECONDS * 1000)}")
            if wal:
                # Readers never block the writer; synchronous stays FULL, so a committed
                # write survives a power cut.
                cursor.execute("PRAGMA journal_mode = WAL")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        write = connection.get_execution_options().get("edgeloop_write", False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")
