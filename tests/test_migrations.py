"""The alembic migrations build exactly the schema the models describe, on both databases, and go back down."""

from __future__ import annotations

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from mailer.db import SCHEMA_HEAD, Database, alembic_config, upgrade
from mailer.errors import DatabaseNotMigrated
from mailer.models import Base


def test_migrations_match_the_models(db_url: str) -> None:
    """After `db upgrade` autogenerate finds no difference between the schema and the models."""
    upgrade(db_url)
    db = Database(db_url)
    try:
        db.check()
        with db.engine.connect() as conn:
            assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    finally:
        db.dispose()


def test_the_schema_the_service_needs_is_alembics_head() -> None:
    """The service checks the revision without alembic (mailer.db.SCHEMA_HEAD): it must be the newest migration."""
    assert ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head() == SCHEMA_HEAD


def test_a_database_one_migration_behind_is_refused(db_url: str) -> None:
    """At the revision before head the service refuses to start, naming both revisions."""
    upgrade(db_url)
    command.downgrade(alembic_config(db_url), "-1")
    previous = ScriptDirectory.from_config(alembic_config(db_url)).get_revision(SCHEMA_HEAD).down_revision
    db = Database(db_url)
    try:
        with pytest.raises(DatabaseNotMigrated, match=f"revision {previous}, this version needs {SCHEMA_HEAD}"):
            db.check()
    finally:
        db.dispose()
    upgrade(db_url)


def test_downgrade_to_base_and_back(db_url: str) -> None:
    """Every migration can be undone, and the service refuses a database that is not at head."""
    upgrade(db_url)
    command.downgrade(alembic_config(db_url), "base")
    db = Database(db_url)
    try:
        with pytest.raises(DatabaseNotMigrated, match="mailer db upgrade"):
            db.check()
    finally:
        db.dispose()
    upgrade(db_url)
