"""Schema for jobs and job executions on AWS IoT's Jobs contract.

Revision ID: 0003
Revises: 0002
Create Date: written by hand
"""

from __future__ import annotations

from collections.abc import Sequence

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
