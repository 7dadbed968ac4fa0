"""events.insert_sentinel, report_messages.insert_sentinel: several rows per INSERT on SQLite

SQLAlchemy inserts several rows in one INSERT … RETURNING only when it can tell
which returned id belongs to which row. SQLite's RETURNING order is not
guaranteed, so without a column the ORM fills in itself (an "insert sentinel",
a small integer per row of one statement) every event and conversation message
of a transaction took an INSERT of its own. The column is nullable and has no
meaning outside the INSERT that wrote it.

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-29
"""
import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

_TABLES = ("events", "report_messages")


def upgrade() -> None:
    for table in _TABLES:
        op.add_column(table, sa.Column("insert_sentinel", sa.Integer(), nullable=True))


def downgrade() -> None:
    for table in _TABLES:
        with op.batch_alter_table(table) as batch_op:
            batch_op.drop_column("insert_sentinel")
