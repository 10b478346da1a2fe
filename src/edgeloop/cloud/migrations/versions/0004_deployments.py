"""Schema for fleet deployments, their rollouts and what happened to them.

Revision ID: 0004
Revises: 0003
Create Date: written by hand
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

STATUSES = ("ACTIVE", "PAUSED", "COMPLETED", "ABORTED", "CANCELED", "SUPERSEDED")


def _when(name: str, *, nullable: bool = False) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    statuses = ", ".join(f"'{status}'" for status in STATUSES)
    op.create_table(
        "deployments",
        sa.Column("deployment_id", sa.String(64), nullable=False),
        sa.Column("name", sa.String(256), nullable=False),
        sa.Column("target", sa.String(160), nullable=False),
        sa.Column("document", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("rollout", sa.JSON(), nullable=False),
        sa.Column("targets", sa.JSON(), nullable=False),
        sa.Column("canary", sa.JSON(), nullable=False),
        sa.Column("released", sa.Integer(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("previous_id", sa.String(64), nullable=True),
        sa.Column("rolled_back", sa.Integer(), nullable=False),
        _when("created_at"),
        _when("updated_at"),
        sa.PrimaryKeyConstraint("deployment_id", name="pk_deployments"),
        sa.CheckConstraint(f"status IN ({statuses})", name="ck_deployments_status"),
    )
    op.create_index("ix_deployments_status", "deployments", ["status"])
    op.create_index("ix_deployments_target_created_at", "deployments", ["target", "created_at"])
    op.create_table(
        "deployment_events",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("deployment_id", sa.String(64), nullable=False),
        _when("at"),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_deployment_events"),
        sa.ForeignKeyConstraint(
            ["deployment_id"],
            ["deployments.deployment_id"],
            name="fk_deployment_events_deployment_id_deployments",
            ondelete="CASCADE",
        ),
    )
    op.create_index(
        "ix_deployment_events_deployment_id", "deployment_events", ["deployment_id", "id"]
    )


def downgrade() -> None:
    op.drop_index("ix_deployment_events_deployment_id", table_name="deployment_events")
    op.drop_table("deployment_events")
    op.drop_index("ix_deployments_target_created_at", table_name="deployments")
    op.drop_index("ix_deployments_status", table_name="deployments")
    op.drop_table("deployments")
