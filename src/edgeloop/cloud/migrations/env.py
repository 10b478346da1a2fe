"""Alembic's entry point for the cloud's schema.

``Database.migrate()`` runs this with its own connection in ``config.attributes``, so no
``alembic.ini`` is needed. Run by hand (``alembic -x`` style tools), it connects to
``sqlalchemy.url`` through ``Database`` so the URL rules stay the same.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from edgeloop.cloud.db import Base, Database

config = context.config
target_metadata = Base.metadata


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things in place: batch mode copies the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def _run_offline() -> None:
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    _run_offline()
elif (given := config.attributes.get("connection")) is not None:
    _run(given)
else:
    database = Database(config.get_main_option("sqlalchemy.url") or "")
    try:
        with database.engine.begin() as connection:
            _run(connection)
    finally:
        database.dispose()
