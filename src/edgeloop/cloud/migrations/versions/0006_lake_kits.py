"""The kit counters the telemetry lake holds per kit, so that a reading a hub spooled
twice is kept once.

Revision ID: 0006
Revises: 0005
Create Date: written by hand
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "lake_kits",
        sa.Column("thing", sa.String(128), nullable=False),
        sa.Column("stream", sa.String(64), nullable=False),
        sa.Column("kit", sa.String(128), nullable=False),
        sa.Column("ranges", sa.JSON(), nullable=False),
        sa.Column("held", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("thing", "stream", "kit", name="pk_lake_kits"),
    )


def downgrade() -> None:
    op.drop_table("lake_kits")
