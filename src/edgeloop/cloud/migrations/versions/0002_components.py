"""Schema for the component registry: component versions and their artifacts.

Revision ID: 0002
Revises: 0001
Create Date: written by hand
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "component_versions",
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("publisher", sa.Text(), nullable=False),
        sa.Column("recipe", sa.JSON(), nullable=False),
        sa.Column("recipe_sha256", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", "version", name="pk_component_versions"),
    )
    op.create_table(
        "component_blobs",
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("stored_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("sha256", name="pk_component_blobs"),
    )
    op.create_table(
        "component_artifacts",
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("file", sa.String(255), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("name", "version", "file", name="pk_component_artifacts"),
        sa.ForeignKeyConstraint(
            ["name", "version"],
            ["component_versions.name", "component_versions.version"],
            name="fk_component_artifacts_name_component_versions",
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["sha256"],
            ["component_blobs.sha256"],
            name="fk_component_artifacts_sha256_component_blobs",
        ),
    )
    op.create_index("ix_component_artifacts_sha256", "component_artifacts", ["sha256"])


def downgrade() -> None:
    op.drop_index("ix_component_artifacts_sha256", table_name="component_artifacts")
    for table in ("component_artifacts", "component_blobs", "component_versions"):
        op.drop_table(table)
