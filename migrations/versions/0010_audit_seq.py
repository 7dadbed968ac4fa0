"""events.seq: each chained event's place in the audit chain

The chain was extended at each flush and walked in id order. On PostgreSQL two
transactions insert events with interleaved ids (sequence values are taken at
INSERT, the chain head's lock later), so id order need not be chain order.
The chain is now extended once per transaction, at commit, and each event
records its place (1, 2, ...); `mailer audit verify` walks that order. Events
already chained were chained in id order: they get their places in id order.

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-29
"""
import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

_BATCH = 1000


def upgrade() -> None:
    with op.batch_alter_table("events") as batch_op:
        batch_op.add_column(sa.Column("seq", sa.Integer(), nullable=True))
        batch_op.create_unique_constraint("uq_events_seq", ["seq"])
    connection = op.get_bind()
    events = sa.table("events", sa.column("id", sa.Integer()), sa.column("hash", sa.String()),
                      sa.column("seq", sa.Integer()))
    position, last = 0, 0
    while True:
        ids = list(connection.scalars(sa.select(events.c.id).where(events.c.hash.is_not(None), events.c.id > last)
                                      .order_by(events.c.id).limit(_BATCH)))
        if not ids:
            break
        connection.execute(sa.update(events).where(events.c.id == sa.bindparam("event_id"))
                           .values(seq=sa.bindparam("position")),
                           [{"event_id": id_, "position": position + i} for i, id_ in enumerate(ids, start=1)])
        position += len(ids)
        last = ids[-1]


def downgrade() -> None:
    with op.batch_alter_table("events") as batch_op:
        batch_op.drop_constraint("uq_events_seq", type_="unique")
        batch_op.drop_column("seq")
