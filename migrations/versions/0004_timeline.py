"""disclosure timeline: scheduled mail (the exactly-once claim) and the report facts it needs

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29
"""
import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def _report_columns() -> list[sa.Column]:
    return [
        sa.Column("accepted_at", sa.DateTime(), nullable=True),
        sa.Column("cve_none", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("published_at", sa.DateTime(), nullable=True),
        sa.Column("leaked_at", sa.DateTime(), nullable=True),
        sa.Column("publish_token_hash", sa.String(length=64), nullable=True),
        sa.Column("publish_token_until", sa.DateTime(), nullable=True),
        sa.Column("publish_requested_at", sa.DateTime(), nullable=True),
    ]


def upgrade() -> None:
    with op.batch_alter_table("reports") as batch_op:
        for column in _report_columns():
            batch_op.add_column(column)
    op.create_table(
        "scheduled_mail",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(length=255), nullable=False),
        sa.Column("report_id", sa.Integer(), nullable=True),
        sa.Column("reports", sa.JSON(), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("due_at", sa.DateTime(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("recipients", sa.JSON(), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.Column("sent_at", sa.DateTime(), nullable=True),
        sa.Column("late_seconds", sa.Float(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["report_id"], ["reports.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("key"),
    )
    with op.batch_alter_table("scheduled_mail") as batch_op:
        batch_op.create_index(batch_op.f("ix_scheduled_mail_report_id"), ["report_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("scheduled_mail") as batch_op:
        batch_op.drop_index(batch_op.f("ix_scheduled_mail_report_id"))
    op.drop_table("scheduled_mail")
    with op.batch_alter_table("reports") as batch_op:
        for column in reversed(_report_columns()):
            batch_op.drop_column(column.name)
