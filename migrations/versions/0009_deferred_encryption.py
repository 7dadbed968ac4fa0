"""outbox.encrypt_to: mail to pinned keys is encrypted by the sender, outside the processing transaction

Encrypting a maintainer's or embargo member's notice ran gpg inside the
message's transaction, which on SQLite holds the single write lock for the
whole call. Such mail is now queued as plaintext (sealed at rest like every
outbox row) with the fingerprints to encrypt to, and the sender signs and
encrypts it before its first attempt, storing the ciphertext before sending.
A reporter's own key (used for one message, never imported) is still used in
the transaction, where an unusable key can still change what the mail says.

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-29
"""
import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("outbox") as batch_op:
        batch_op.add_column(sa.Column("encrypt_to", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("outbox") as batch_op:
        batch_op.drop_column("encrypt_to")
