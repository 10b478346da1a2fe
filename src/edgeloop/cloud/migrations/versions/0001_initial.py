"""The initial schema: registry, identity, connectivity, shadows, claim templates, events.

Revision ID: 0001
Revises:
Create Date: written by hand
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _when(name: str, *, nullable: bool = False) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def _thing_fk(table: str, *, ondelete: str = "CASCADE") -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        ["thing_name"],
        ["things.name"],
        name=f"fk_{table}_thing_name_things",
        ondelete=ondelete,
    )


def _membership_table(table: str) -> None:
    op.create_table(
        table,
        sa.Column("group_name", sa.String(128), nullable=False),
        sa.Column("thing_name", sa.String(128), nullable=False),
        sa.PrimaryKeyConstraint("group_name", "thing_name", name=f"pk_{table}"),
        sa.ForeignKeyConstraint(
            ["group_name"],
            ["thing_groups.name"],
            name=f"fk_{table}_group_name_thing_groups",
            ondelete="CASCADE",
        ),
        _thing_fk(table),
    )
    op.create_index(f"ix_{table}_thing_name", table, ["thing_name"])


def upgrade() -> None:
    op.create_table(
        "things",
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("thing_type", sa.String(128), nullable=True),
        sa.Column("attributes", sa.JSON(), nullable=False),
        _when("created_at"),
        _when("updated_at"),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_things"),
    )
    op.create_table(
        "thing_groups",
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("query", sa.Text(), nullable=True),
        sa.Column("description", sa.Text(), nullable=False),
        _when("created_at"),
        sa.PrimaryKeyConstraint("name", name="pk_thing_groups"),
        sa.CheckConstraint(
            "(kind = 'static' AND query IS NULL) OR (kind = 'dynamic' AND query IS NOT NULL)",
            name="ck_thing_groups_kind_query",
        ),
    )
    _membership_table("group_members")
    _membership_table("dynamic_memberships")
    op.create_table(
        "certificates",
        sa.Column("certificate_id", sa.String(64), nullable=False),
        sa.Column("thing_name", sa.String(128), nullable=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("pem", sa.Text(), nullable=False),
        sa.Column("serial", sa.Text(), nullable=False),
        sa.Column("issuer", sa.Text(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        _when("created_at"),
        _when("revoked_at", nullable=True),
        sa.Column("revoke_reason", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("certificate_id", name="pk_certificates"),
        _thing_fk("certificates", ondelete="SET NULL"),
        sa.CheckConstraint("kind IN ('device', 'claim')", name="ck_certificates_kind"),
        sa.CheckConstraint(
            "status IN ('ACTIVE', 'REVOKED', 'INACTIVE')", name="ck_certificates_status"
        ),
    )
    op.create_index("ix_certificates_thing_name", "certificates", ["thing_name"])
    op.create_index("ix_certificates_status", "certificates", ["status"])
    op.create_table(
        "registered_cas",
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("pem", sa.Text(), nullable=False),
        _when("created_at"),
        sa.PrimaryKeyConstraint("fingerprint", name="pk_registered_cas"),
    )
    op.create_table(
        "connectivity",
        sa.Column("thing_name", sa.String(128), nullable=False),
        sa.Column("connected", sa.Boolean(), nullable=False),
        _when("since"),
        sa.Column("client_id", sa.String(256), nullable=True),
        sa.Column("disconnect_reason", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("thing_name", name="pk_connectivity"),
        _thing_fk("connectivity"),
    )
    op.create_table(
        "shadows",
        sa.Column("thing_name", sa.String(128), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("document", sa.JSON(), nullable=True),
        sa.Column("version", sa.Integer(), nullable=False),
        _when("updated_at"),
        sa.PrimaryKeyConstraint("thing_name", "name", name="pk_shadows"),
        _thing_fk("shadows"),
    )
    op.create_table(
        "claim_templates",
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("hook", sa.Text(), nullable=True),
        _when("created_at"),
        sa.PrimaryKeyConstraint("name", name="pk_claim_templates"),
    )
    op.create_table(
        "events",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        _when("at"),
        sa.Column("kind", sa.String(64), nullable=False),
        sa.Column("subject", sa.String(256), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_events"),
    )
    op.create_index("ix_events_subject_id", "events", ["subject", "id"])


def downgrade() -> None:
    for table in (
        "events",
        "claim_templates",
        "shadows",
        "connectivity",
        "registered_cas",
        "certificates",
        "dynamic_memberships",
        "group_members",
        "thing_groups",
        "things",
    ):
        op.drop_table(table)
