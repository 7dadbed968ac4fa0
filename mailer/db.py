"""Engine, sessions and schema migrations."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from mailer.errors import DatabaseNotMigrated

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL + synchronous=FULL: a commit is on disk before we answer 250.
    # isolation_level=None hands transaction control to the "begin" hook below
    # (pysqlite would otherwise start the transaction only at the first write,
    # leaving earlier reads outside it).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        # Take the write lock at BEGIN: a transaction never has to upgrade a stale read snapshot.
        event.listen(engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE"))
        return engine
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    return create_engine(url, pool_pre_ping=True)


def alembic_config(url: str) -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str) -> None:
    """Bring the schema to the newest revision."""
    command.upgrade(alembic_config(url), "head")


def check_migrated(engine: Engine, url: str) -> None:
    """:raises DatabaseNotMigrated: when the schema is not at head."""
    head = ScriptDirectory.from_config(alembic_config(url)).get_current_head()
    assert head is not None
    with engine.connect() as conn:
        current = MigrationContext.configure(conn).get_current_revision()
    if current != head:
        raise DatabaseNotMigrated(current, head)


class Database:
    """Owns the engine and hands out transactional sessions."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        # SQLite has one writer; queueing our own threads on a lock is far cheaper
        # than letting them sleep in SQLite's busy handler. PostgreSQL needs none.
        self._write_lock: threading.RLock | None = threading.RLock() if url.startswith("sqlite") else None

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session whose transaction commits on success and rolls back on error."""
        if self._write_lock is None:
            with self._sessions() as session, session.begin():
                yield session
            return
        with self._write_lock, self._sessions() as session, session.begin():
            yield session

    def check(self) -> None:
        check_migrated(self.engine, self.url)

    def dispose(self) -> None:
        self.engine.dispose()
