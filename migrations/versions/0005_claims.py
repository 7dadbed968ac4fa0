"""claims: work taken by one instance at a time (inbound messages, outbox rows) and named leases (IMAP mailbox)

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06
"""
import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_CLAIMED = ("inbound_messages", "outbox")


def upgrade() -> None:
    for table in _CLAIMED:
        with op.batch_alter_table(table) as batch_op:
            batch_op.add_column(sa.Column("claimed_by", sa.String(length=128), nullable=True))
            batch_op.add_column(sa.Column("claimed_until", sa.DateTime(), nullable=True))
    with op.batch_alter_table("inbound_messages") as batch_op:
        # the worker's fair pick: the oldest due message of each envelope sender
        batch_op.create_index("ix_inbound_state_sender", ["state", "mail_from", "id"], unique=False)
    op.create_table(
        "leases",
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("holder", sa.String(length=128), nullable=False),
        sa.Column("until", sa.DateTime(), nullable=False),
        sa.Column("acquired_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )


def downgrade() -> None:
    op.drop_table("leases")
    with op.batch_alter_table("inbound_messages") as batch_op:
        batch_op.drop_index("ix_inbound_state_sender")
    for table in reversed(_CLAIMED):
        with op.batch_alter_table(table) as batch_op:
            batch_op.drop_column("claimed_until")
            batch_op.drop_column("claimed_by")
