"""reporter keys bound to a report

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""
from alembic import op
import sqlalchemy as sa

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "report_keys",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("report_id", sa.Integer(), nullable=False),
        sa.Column("fingerprint", sa.String(length=64), nullable=False),
        sa.Column("key_blob", sa.LargeBinary(), nullable=False),
        sa.Column("source", sa.String(length=32), nullable=False),
        sa.Column("inbound_id", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["inbound_id"], ["inbound_messages.id"]),
        sa.ForeignKeyConstraint(["report_id"], ["reports.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("report_keys") as batch_op:
        batch_op.create_index(batch_op.f("ix_report_keys_report_id"), ["report_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("report_keys") as batch_op:
        batch_op.drop_index(batch_op.f("ix_report_keys_report_id"))
    op.drop_table("report_keys")
