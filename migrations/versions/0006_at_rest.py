"""report content encrypted at rest (mailer.atrest): encrypted columns are text or bytes

Subjects, fields, message bodies and metadata, attachment names and data, event
detail and received messages are stored encrypted (AES-256-GCM under a data key
outside the database). The JSON columns among them become text (the ciphertext
of the JSON document) and the short string columns become text (ciphertext is
longer than its plaintext). Values already stored stay readable as they are
(legacy plaintext has no ``enc1:`` prefix) and are encrypted by the next start
of the service (``mailer.atrest.seal_legacy``), or here when this process has
a data key loaded.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""
import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

# (table, column, type before, PostgreSQL cast back)
_CHANGED = (
    ("reports", "subject", sa.String(length=998), None),
    ("reports", "fields", sa.JSON(), "fields::json"),
    ("report_messages", "meta", sa.JSON(), "meta::json"),
    ("attachments", "filename", sa.String(length=255), None),
    ("events", "detail", sa.JSON(), "detail::json"),
)


# the encrypted columns as of this revision (later revisions add theirs)
_SEALED = (
    ("inbound_messages", "raw", "bytes"),
    ("reports", "subject", "text"),
    ("reports", "fields", "text"),
    ("report_messages", "body_text", "text"),
    ("report_messages", "meta", "text"),
    ("attachments", "filename", "text"),
    ("attachments", "data", "bytes"),
    ("events", "detail", "text"),
)


def upgrade() -> None:
    for table, column, before, _ in _CHANGED:
        with op.batch_alter_table(table) as batch_op:
            batch_op.alter_column(column, existing_type=before, type_=sa.Text(), existing_nullable=False,
                                  postgresql_using=f"{column}::text")
    from mailer import atrest

    atrest.seal_legacy(op.get_bind(), columns=_SEALED)


def downgrade() -> None:
    from mailer import atrest

    ring = atrest.installed()
    bind = op.get_bind()
    if ring is not None:
        atrest.unseal_all(bind, ring)
    else:
        for table, column, _, _ in _CHANGED:
            found = bind.execute(sa.text(f"SELECT 1 FROM {table} WHERE {column} LIKE 'enc1:%' LIMIT 1")).first()
            if found is not None:
                raise RuntimeError("encrypted values are stored: load the data key (MAILER_DATA_KEY) to downgrade below 0006")
    for table, column, before, cast in _CHANGED:
        with op.batch_alter_table(table) as batch_op:
            batch_op.alter_column(column, existing_type=sa.Text(), type_=before, existing_nullable=False,
                                  postgresql_using=cast)
