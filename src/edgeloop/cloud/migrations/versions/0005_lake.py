"""Schema for the telemetry lake: its manifest of files, the sequences it holds, and the
answers given to idempotency keys.

Revision ID: 0005
Revises: 0004
Create Date: written by hand
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _when(name: str, *, nullable: bool = False) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "lake_files",
        sa.Column("key", sa.String(512), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("date", sa.String(10), nullable=False),
        sa.Column("thing", sa.String(128), nullable=False),
        sa.Column("rows", sa.BigInteger(), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        _when("created_at"),
        _when("retired_at", nullable=True),
        sa.PrimaryKeyConstraint("key", name="pk_lake_files"),
        sa.CheckConstraint("kind IN ('telemetry', 'quarantine')", name="ck_lake_files_kind"),
    )
    op.create_index(
        "ix_lake_files_kind_retired_at_date", "lake_files", ["kind", "retired_at", "date"]
    )
    op.create_index("ix_lake_files_retired_at", "lake_files", ["retired_at"])
    op.create_table(
        "lake_streams",
        sa.Column("thing", sa.String(128), nullable=False),
        sa.Column("stream", sa.String(64), nullable=False),
        sa.Column("ranges", sa.JSON(), nullable=False),
        sa.Column("held", sa.BigInteger(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        _when("updated_at"),
        sa.PrimaryKeyConstraint("thing", "stream", name="pk_lake_streams"),
    )
    op.create_table(
        "lake_uploads",
        sa.Column("thing", sa.String(128), nullable=False),
        sa.Column("key", sa.String(200), nullable=False),
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("result", sa.JSON(), nullable=False),
        _when("created_at"),
        sa.PrimaryKeyConstraint("thing", "key", name="pk_lake_uploads"),
    )
    op.create_index("ix_lake_uploads_created_at", "lake_uploads", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_lake_uploads_created_at", table_name="lake_uploads")
    op.drop_table("lake_uploads")
    op.drop_table("lake_streams")
    op.drop_index("ix_lake_files_retired_at", table_name="lake_files")
    op.drop_index("ix_lake_files_kind_retired_at_date", table_name="lake_files")
    op.drop_table("lake_files")
