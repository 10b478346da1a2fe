"""Schema for jobs and job executions on AWS IoT's Jobs contract.

Revision ID: 0003
Revises: 0002
Create Date: written by hand
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_EXECUTION_STATUSES = (
    "QUEUED",
    "IN_PROGRESS",
    "SUCCEEDED",
    "FAILED",
    "TIMED_OUT",
    "REJECTED",
    "CANCELED",
    "REMOVED",
)


def _when(name: str, *, nullable: bool = False) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("job_id", sa.String(64), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("document", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("target_selection", sa.String(16), nullable=False),
        sa.Column("in_progress_timeout_minutes", sa.Integer(), nullable=True),
        sa.Column("force_canceled", sa.Boolean(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        _when("created_at"),
        _when("updated_at"),
        _when("completed_at", nullable=True),
        sa.PrimaryKeyConstraint("job_id", name="pk_jobs"),
        sa.CheckConstraint(
            "status IN ('IN_PROGRESS', 'CANCELED', 'COMPLETED')", name="ck_jobs_status"
        ),
        sa.CheckConstraint(
            "target_selection IN ('SNAPSHOT', 'CONTINUOUS')", name="ck_jobs_target_selection"
        ),
    )
    op.create_index("ix_jobs_status", "jobs", ["status"])
    statuses = ", ".join(f"'{status}'" for status in _EXECUTION_STATUSES)
    op.create_table(
        "job_executions",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("job_id", sa.String(64), nullable=False),
        sa.Column("thing_name", sa.String(128), nullable=False),
        sa.Column("execution_number", sa.Integer(), nullable=False),
        sa.Column("latest", sa.Boolean(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("status_details", sa.JSON(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        _when("queued_at"),
        _when("started_at", nullable=True),
        _when("last_updated_at"),
        _when("step_deadline", nullable=True),
        _when("run_deadline", nullable=True),
        _when("timeout_at", nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_job_executions"),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.job_id"], name="fk_job_executions_job_id_jobs", ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["thing_name"],
            ["things.name"],
            name="fk_job_executions_thing_name_things",
            ondelete="CASCADE",
        ),
        sa.UniqueConstraint(
            "job_id",
            "thing_name",
            "execution_number",
            name="uq_job_executions_job_id_thing_name_execution_number",
        ),
        sa.CheckConstraint(f"status IN ({statuses})", name="ck_job_executions_status"),
    )
    # The rollout engine's poll: counts per status of one job's latest executions.
    op.create_index(
        "ix_job_executions_job_id_latest_status", "job_executions", ["job_id", "latest", "status"]
    )
    # A thing's pending list, served to its device on every request.
    op.create_index(
        "ix_job_executions_thing_name_status", "job_executions", ["thing_name", "status"]
    )
    # The timeout sweep.
    op.create_index("ix_job_executions_timeout_at", "job_executions", ["timeout_at"])


def downgrade() -> None:
    op.drop_table("job_executions")
    op.drop_table("jobs")
