"""outbox.needs_signature: sign-only mail is queued unsigned and signed by the sender

Signing happened inside the processing transaction, which on SQLite holds the
single write lock for the whole gpg call; the sender now signs such mail just
before its first attempt, several at once, and stores the signed bytes before
sending them (so a retry sends the same bytes).

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-29
"""
import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("outbox") as batch_op:
        batch_op.add_column(sa.Column("needs_signature", sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("outbox") as batch_op:
        batch_op.drop_column("needs_signature")
