"""audit chain (prev_hash/hash on events, audit_head), advisory fields (#summary, #credit), more at rest

The outgoing mail (``outbox.raw``: a plain ack repeats the report's subject)
and the scheduled mail's detail are encrypted at rest too (mailer.atrest);
``scheduled_mail.detail`` becomes text for its ciphertext.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-29

Events already in the database stay unchained (no hash): the chain starts
with the first event written after this migration (mailer.audit).
"""
import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

GENESIS = "0" * 64


def upgrade() -> None:
    with op.batch_alter_table("events") as batch_op:
        batch_op.add_column(sa.Column("prev_hash", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("hash", sa.String(length=64), nullable=True))
        batch_op.create_unique_constraint("uq_events_hash", ["hash"])
    head = op.create_table(
        "audit_head",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("last_hash", sa.String(length=64), nullable=False),
        sa.Column("length", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.bulk_insert(head, [{"id": 1, "last_hash": GENESIS, "length": 0}])
    with op.batch_alter_table("scheduled_mail") as batch_op:
        batch_op.alter_column("detail", existing_type=sa.JSON(), type_=sa.Text(), existing_nullable=False,
                              postgresql_using="detail::text")
    from mailer import atrest

    atrest.seal_legacy(op.get_bind(), columns=(("outbox", "raw", "bytes"), ("scheduled_mail", "detail", "text")))
    with op.batch_alter_table("reports") as batch_op:
        batch_op.add_column(sa.Column("summary", sa.String(length=500), nullable=True))
        batch_op.add_column(sa.Column("credit", sa.String(length=200), nullable=True))
        batch_op.add_column(sa.Column("credit_none", sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("reports") as batch_op:
        batch_op.drop_column("credit_none")
        batch_op.drop_column("credit")
        batch_op.drop_column("summary")
    op.drop_table("audit_head")
    with op.batch_alter_table("scheduled_mail") as batch_op:
        batch_op.alter_column("detail", existing_type=sa.Text(), type_=sa.JSON(), existing_nullable=False,
                              postgresql_using="detail::json")
    with op.batch_alter_table("events") as batch_op:
        batch_op.drop_constraint("uq_events_hash", type_="unique")
        batch_op.drop_column("hash")
        batch_op.drop_column("prev_hash")
