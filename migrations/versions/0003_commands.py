"""maintainer commands: report workflow fields, embargo members, replay protection

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22
"""
from alembic import op
import sqlalchemy as sa

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

def _report_columns() -> list[sa.Column]:
    return [
        sa.Column("incident_manager", sa.String(length=254), nullable=True),
        sa.Column("severity", sa.String(length=16), nullable=True),
        sa.Column("cvss_vector", sa.String(length=255), nullable=True),
        sa.Column("cvss_score", sa.Float(), nullable=True),
        sa.Column("cve", sa.String(length=32), nullable=True),
        sa.Column("cve_requested_at", sa.DateTime(), nullable=True),
        sa.Column("affected", sa.String(length=500), nullable=True),
        sa.Column("fixed", sa.String(length=100), nullable=True),
        sa.Column("advisory_url", sa.String(length=500), nullable=True),
        sa.Column("release_version", sa.String(length=100), nullable=True),
        sa.Column("release_url", sa.String(length=500), nullable=True),
        sa.Column("disclose_at", sa.DateTime(), nullable=True),
        sa.Column("duplicate_of", sa.String(length=32), nullable=True),
    ]


def upgrade() -> None:
    with op.batch_alter_table("reports") as batch_op:
        for column in _report_columns():
            batch_op.add_column(column)
        batch_op.create_index(batch_op.f("ix_reports_disclose_at"), ["disclose_at"], unique=False)
    op.create_table(
        "embargo_members",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("report_id", sa.Integer(), nullable=False),
        sa.Column("address", sa.String(length=254), nullable=False),
        sa.Column("added_by", sa.String(length=64), nullable=False),
        sa.Column("added_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["report_id"], ["reports.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("embargo_members") as batch_op:
        batch_op.create_index(batch_op.f("ix_embargo_members_report_id"), ["report_id"], unique=False)
    op.create_table(
        "command_signatures",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column("fingerprint", sa.String(length=64), nullable=False),
        sa.Column("inbound_id", sa.Integer(), nullable=True),
        sa.Column("applied_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["inbound_id"], ["inbound_messages.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("digest"),
    )


def downgrade() -> None:
    op.drop_table("command_signatures")
    with op.batch_alter_table("embargo_members") as batch_op:
        batch_op.drop_index(batch_op.f("ix_embargo_members_report_id"))
    op.drop_table("embargo_members")
    with op.batch_alter_table("reports") as batch_op:
        batch_op.drop_index(batch_op.f("ix_reports_disclose_at"))
        for column in reversed(_report_columns()):
            batch_op.drop_column(column.name)
