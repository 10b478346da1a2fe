"""The ML loop's tables: dataset snapshots, model versions, aliases and their history.

Revision ID: 0007
Revises: 0006
Create Date: written by hand
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _when(name: str) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=False)


def upgrade() -> None:
    op.create_table(
        "ml_datasets",
        sa.Column("hash", sa.String(64), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("rows", sa.BigInteger(), nullable=False),
        sa.Column("appliances", sa.JSON(), nullable=False),
        sa.Column("key", sa.String(512), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        _when("created_at"),
        sa.PrimaryKeyConstraint("hash", name="pk_ml_datasets"),
    )
    op.create_table(
        "ml_model_versions",
        sa.Column("name", sa.String(96), nullable=False),
        sa.Column("version", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("appliance", sa.String(64), nullable=False),
        sa.Column("scope", sa.String(16), nullable=False),
        sa.Column("device", sa.String(256), nullable=True),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("dataset_hash", sa.String(64), nullable=False),
        sa.Column("code_version", sa.String(128), nullable=False),
        sa.Column("artifact_key", sa.String(512), nullable=False),
        sa.Column("artifact_sha256", sa.String(64), nullable=False),
        sa.Column("artifact_size", sa.BigInteger(), nullable=False),
        sa.Column("created_by", sa.String(128), nullable=False),
        _when("created_at"),
        sa.PrimaryKeyConstraint("name", "version", name="pk_ml_model_versions"),
    )
    op.create_index("ix_ml_model_versions_appliance", "ml_model_versions", ["appliance"])
    op.create_table(
        "ml_aliases",
        sa.Column("name", sa.String(96), nullable=False),
        sa.Column("alias", sa.String(32), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        _when("updated_at"),
        sa.ForeignKeyConstraint(
            ["name", "version"],
            ["ml_model_versions.name", "ml_model_versions.version"],
            name="fk_ml_aliases_name_ml_model_versions",
        ),
        sa.PrimaryKeyConstraint("name", "alias", name="pk_ml_aliases"),
    )
    op.create_table(
        "ml_alias_history",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("name", sa.String(96), nullable=False),
        sa.Column("alias", sa.String(32), nullable=False),
        sa.Column("from_version", sa.Integer(), nullable=True),
        sa.Column("to_version", sa.Integer(), nullable=True),
        sa.Column("who", sa.String(128), nullable=False),
        _when("at"),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_ml_alias_history"),
    )
    op.create_index("ix_ml_alias_history_name_id", "ml_alias_history", ["name", "id"])


def downgrade() -> None:
    op.drop_index("ix_ml_alias_history_name_id", table_name="ml_alias_history")
    op.drop_table("ml_alias_history")
    op.drop_table("ml_aliases")
    op.drop_index("ix_ml_model_versions_appliance", table_name="ml_model_versions")
    op.drop_table("ml_model_versions")
    op.drop_table("ml_datasets")
