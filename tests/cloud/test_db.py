"""The cloud database on SQLite and PostgreSQL: URLs, errors, migrations, portable types."""

from __future__ import annotations

import socket
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, select, text

import edgeloop.cloud.components
import edgeloop.cloud.deployments
import edgeloop.cloud.jobs
import edgeloop.cloud.lake
import edgeloop.cloud.ml.registry  # noqa: F401  (with the four above: every model on Base)
from edgeloop.cloud.db import _MIGRATIONS, Base, Database, EventRow, ThingRow
from edgeloop.core.errors import CloudError, ValidationError

from .conftest import PostgresServer

TABLES = {
    "things",
    "thing_groups",
    "group_members",
    "dynamic_memberships",
    "certificates",
    "registered_cas",
    "connectivity",
    "shadows",
    "claim_templates",
    "events",
}


def _head() -> str:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(_MIGRATIONS))
    head = ScriptDirectory.from_config(config).get_current_head()
    assert head is not None
    return head


HEAD = _head()


def test_migrations_from_empty_match_the_models(database_url: str) -> None:
    db = Database(database_url)
    try:
        assert db.revision() is None
        db.migrate()
        assert db.revision() == HEAD
        assert set(inspect(db.engine).get_table_names()) >= TABLES
        with db.engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            # The hand-written migration creates exactly what the models declare.
            assert compare_metadata(context, Base.metadata) == []
        db.migrate()  # already at head: nothing to do
        assert db.revision() == HEAD
    finally:
        db.dispose()


def test_json_and_times_round_trip(database: Database) -> None:
    when = datetime(2024, 5, 1, 12, 30, 15, 123456, tzinfo=timezone(timedelta(hours=2)))
    attributes = {"model": "pi4", "floor": 2, "ratio": 0.5, "ok": True, "é": "ü"}
    with database.write() as session:
        session.add(
            ThingRow(name="t1", attributes=attributes, created_at=when, updated_at=when, version=1)
        )
    with database.read() as session:
        row = session.get(ThingRow, "t1")
        assert row is not None
        assert row.attributes == attributes
        assert row.created_at == when
        assert row.created_at.tzinfo == UTC
        # Comparisons in SQL see the same instant whatever the offset it was written with.
        later = session.scalar(
            select(ThingRow.name).where(ThingRow.created_at > when - timedelta(microseconds=1))
        )
        assert later == "t1"


def test_naive_times_are_refused(database: Database) -> None:
    with pytest.raises(Exception, match="naive datetime"), database.write() as session:
        session.add(EventRow(at=datetime(2024, 1, 1), kind="k", subject="s", detail={}))


def test_a_failed_write_changes_nothing(database: Database) -> None:
    now = datetime.now(UTC)
    with pytest.raises(RuntimeError), database.write() as session:
        session.add(ThingRow(name="t1", attributes={}, created_at=now, updated_at=now, version=1))
        session.flush()
        raise RuntimeError("boom")
    with database.read() as session:
        assert session.get(ThingRow, "t1") is None


def test_foreign_keys_are_enforced(database: Database) -> None:
    with pytest.raises(Exception, match=r"(?i)foreign key"), database.write() as session:
        session.execute(
            text("INSERT INTO group_members (group_name, thing_name) VALUES ('g', 't')")
        )


def test_sqlite_uses_wal_and_foreign_keys(tmp_path: Path) -> None:
    db = Database.in_data_dir(tmp_path / "data")
    try:
        db.migrate()
        assert (tmp_path / "data" / "edgeloop.db").is_file()
        assert db.dialect == "sqlite"
        with db.engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    finally:
        db.dispose()


def test_postgresql_urls_use_psycopg(postgres_server: PostgresServer) -> None:
    db = Database(postgres_server.url("postgres").replace("postgresql://", "postgres://"))
    try:
        assert db.engine.dialect.driver == "psycopg"
        db.check()
    finally:
        db.dispose()


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("", "is empty"),
        ("not a url", "is not a URL"),
        ("mysql://admin:hunter2@db/edgeloop", "scheme 'mysql' is not supported"),
        ("postgresql+psycopg2://admin:hunter2@db/edgeloop", "is not supported"),
    ],
)
def test_bad_urls_name_the_problem_without_the_password(url: str, expected: str) -> None:
    with pytest.raises(ValidationError, match=expected) as caught:
        Database(url)
    assert caught.value.field is not None and "database URL" in caught.value.field
    assert "hunter2" not in str(caught.value)


def test_a_missing_sqlite_folder_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="does not exist"):
        Database(f"sqlite:///{tmp_path}/missing/edgeloop.db")


def test_an_unreachable_database_is_a_cloud_error_without_the_password() -> None:
    with socket.socket() as sock:  # a loopback port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
        db = Database(f"postgresql://edgeloop:hunter2@127.0.0.1:{port}/fleet")
        with pytest.raises(CloudError) as caught:
            db.migrate()
    message = str(caught.value)
    assert f"postgresql://edgeloop@127.0.0.1:{port}/fleet" in message
    assert "hunter2" not in message


def test_a_missing_postgres_database_is_named(postgres_server: PostgresServer) -> None:
    db = Database(postgres_server.url("no_such_db"))
    with pytest.raises(CloudError, match="no_such_db"):
        db.check()
