"""Engine, sessions and schema migrations; the claims and leases several instances share work with.

One database, several instances (PostgreSQL): every queue is drained by *claiming*
rows, never by selecting them. A claim is ``claimed_by``/``claimed_until`` set in
one short transaction on rows picked with ``FOR UPDATE SKIP LOCKED`` (SQLite has
one writer, ``BEGIN IMMEDIATE``, and ignores the clause); an instance that dies
leaves its claims to expire after the lease. A named :class:`~mailer.models.Lease`
row gives one instance a job that must not run twice (polling an IMAP mailbox).

SQLite is single-instance: :class:`InstanceLock` (``flock`` on a file beside the
database) refuses a second ``mailer serve`` on the same file, so its worker and
sender keep their claims in memory (:func:`claim_for` writes none there).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from sqlalchemy import Engine, create_engine, delete, event, inspect, or_, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from mailer.audit import chain_events, collect_events, forget_events
from mailer.errors import DatabaseNotMigrated, MailerError
from mailer.inserts import insert_pending
from mailer.models import InboundMessage, Lease, OutboxMessage

if TYPE_CHECKING:
    from alembic.config import Config as AlembicConfig

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"


SQLITE_SOFT_HEAP_LIMIT = 4 << 20


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
    # SQLite's memory in this process (page caches, sorts), shared by its connections: above it the caches are
    # recycled (the pages stay in the OS's cache). bench/flood.py: 11-14 MB at its peak without, 6 MB with.
    cursor.execute(f"PRAGMA soft_heap_limit={SQLITE_SOFT_HEAP_LIMIT}")
    cursor.close()


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            # created 0600 whatever the umask; SQLite gives the WAL and shm files the database's mode
            os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        # Take the write lock at BEGIN: a transaction never has to upgrade a stale read snapshot.
        # (a reading session, Database.reading(), begins a plain read transaction instead)
        event.listen(engine, "begin", lambda conn: conn.exec_driver_sql(
            "BEGIN" if conn.get_execution_options().get("mailer_reading") else "BEGIN IMMEDIATE"))
        return engine
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    return create_engine(url, pool_pre_ping=True)


def alembic_config(url: str) -> AlembicConfig:
    # alembic is imported when a schema is checked or migrated: 11 MB in a worker process that does neither
    from alembic.config import Config as AlembicConfig

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str) -> None:
    """Bring the schema to the newest revision."""
    from alembic import command

    command.upgrade(alembic_config(url), "head")


#: The newest migration (``migrations/versions``): the schema this code needs. Written here so that the
#: service checks it without loading alembic (9 MB it would keep for its lifetime); tests/test_migrations.py
#: holds it equal to alembic's head.
SCHEMA_HEAD = "0011"


def check_migrated(engine: Engine, url: str) -> None:
    """:raises DatabaseNotMigrated: when the schema is not at head (:data:`SCHEMA_HEAD`)."""
    with engine.connect() as conn:
        if not inspect(conn).has_table("alembic_version"):
            current = None
        else:
            versions = list(conn.execute(text("SELECT version_num FROM alembic_version")).scalars())
            current = versions[0] if len(versions) == 1 else ",".join(sorted(versions)) or None
    if current != SCHEMA_HEAD:
        raise DatabaseNotMigrated(current, SCHEMA_HEAD)


def new_owner() -> str:
    """A name for one running instance in claims and leases: host, pid and a random part (pids are reused)."""
    return f"{socket.gethostname()[:80]}:{os.getpid()}:{secrets.token_hex(4)}"


class WriteLock:
    """The SQLite writer's turn: a thread lock, and a file lock beside the database for other processes.

    A writer that finds SQLite locked sleeps in its busy handler (1, 2, 5, 10,
    ... ms) and the lock often sits free while every writer sleeps; waiting
    here, the next writer wakes the moment the last one commits. The file lock
    (``flock``, released by the kernel if the process dies) serves the worker
    processes (``worker.processes``) and the CLI beside the service.

    Intake goes first (:meth:`first`): a sender waits for its 250 on that commit. It holds a second
    file lock (the gate) while it waits for its turn and commits; every other writer passes the gate
    before it queues, so once intake waits, no writer that comes after it goes before it (a worker
    process's next message, the sender's outcomes); it still races those already queued.
    """

    def __init__(self, database: Path | None) -> None:
        self._threads = threading.RLock()
        self._depth = 0  # re-entry by the holding thread: the file lock is taken once
        self._owner: int | None = None  # the holding thread (it never waits at the gate: it is past it)
        self._path = None if database is None else database.with_name(database.name + ".writer")
        self._fd: int | None = None
        self._gate = None if database is None else database.with_name(database.name + ".intake")
        # two open files: flock locks of one open file do not exclude each other
        self._gate_fds: dict[bool, int] = {}

    def _gate_fd(self, first: bool) -> int:
        fd = self._gate_fds.get(first)
        if fd is None:
            assert self._gate is not None
            fd = self._gate_fds[first] = os.open(self._gate, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        return fd

    def __enter__(self) -> None:
        if self._gate is not None and self._owner != threading.get_ident():
            fd = self._gate_fd(first=False)
            fcntl.flock(fd, fcntl.LOCK_SH)  # waits while intake waits or writes
            fcntl.flock(fd, fcntl.LOCK_UN)
        self._acquire()

    def _acquire(self) -> None:
        self._threads.acquire()
        try:
            if self._depth == 0 and self._path is not None:
                if self._fd is None:
                    self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                fcntl.flock(self._fd, fcntl.LOCK_EX)
        except BaseException:
            self._threads.release()
            raise
        self._depth += 1
        self._owner = threading.get_ident()

    def __exit__(self, *_exc: object) -> None:
        self._depth -= 1
        try:
            if self._depth == 0:
                self._owner = None
                if self._fd is not None:
                    fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._threads.release()

    @contextmanager
    def first(self) -> Iterator[None]:
        """The writer's turn ahead of those not yet queued (intake)."""
        if self._gate is None:
            with self:
                yield
            return
        fd = self._gate_fd(first=True)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            self._acquire()
            try:
                yield
            finally:
                self.__exit__()
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)


class Database:
    """Owns the engine and hands out transactional sessions."""

    def __init__(self, url: str) -> None:
        self.url = url
        #: this instance's name in the claims it takes (see :func:`claim`)
        self.owner = new_owner()
        self.engine = make_engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        # the audit chain (mailer.audit): events noted at each flush, chained once at commit
        event.listen(self._sessions, "pending_to_persistent", collect_events)
        # new rows by Core inserts, ahead of the unit of work (mailer.inserts): less time under SQLite's write lock
        event.listen(self._sessions, "before_flush", insert_pending)
        event.listen(self._sessions, "before_commit", chain_events)
        event.listen(self._sessions, "after_soft_rollback", forget_events)
        # SQLite has one writer; queueing our own threads and processes on a lock is far
        # cheaper than letting them sleep in SQLite's busy handler. PostgreSQL needs none.
        self._write_lock: WriteLock | None = WriteLock(self.sqlite_path()) if url.startswith("sqlite") else None

    @contextmanager
    def session(self, *, first: bool = False) -> Iterator[Session]:
        """A session whose transaction commits on success and rolls back on error.

        ``first``: SQLite's writer turn ahead of the writers not yet queued (:meth:`WriteLock.first`: intake).
        """
        if self._write_lock is None:
            with self._sessions() as session, session.begin():
                yield session
            return
        with self._write_lock.first() if first else self._write_lock, self._sessions() as session, session.begin():
            yield session

    @contextmanager
    def reading(self) -> Iterator[Session]:
        """A session that only reads: no write lock (SQLite's WAL readers run beside the writer)."""
        with self._sessions(bind=self.engine.execution_options(mailer_reading=True)) as session, session.begin():
            yield session

    @property
    def is_sqlite(self) -> bool:
        return self.engine.dialect.name == "sqlite"

    def sqlite_path(self) -> Path | None:
        """The SQLite database file, or None (PostgreSQL, in-memory)."""
        database = self.engine.url.database if self.is_sqlite else None
        return Path(database).resolve() if database and database != ":memory:" else None

    def check(self) -> None:
        check_migrated(self.engine, self.url)

    def dispose(self) -> None:
        self.engine.dispose()


# --------------------------------------------------------------------------- claims

Claimable = type[InboundMessage] | type[OutboxMessage]


def claimable(model: Claimable, now: datetime) -> Any:
    """Rows nobody holds: never claimed, released, or their holder's lease ran out."""
    return or_(model.claimed_until.is_(None), model.claimed_until < now)


def claim(session: Session, model: Claimable, candidates: list[int], *, owner: str, now: datetime,
          lease: float, where: Any = None) -> list[int]:
    """Claim those of ``candidates`` still claimable (and matching ``where``) for ``owner``; the ids got, in order.

    Rows another transaction holds are skipped, not waited for (``SKIP LOCKED``);
    the update is conditional, so two instances never both get a row.
    """
    if not candidates:
        return []
    query = select(model.id).where(model.id.in_(candidates), claimable(model, now))
    if where is not None:
        query = query.where(where)
    got = sorted(session.scalars(query.order_by(model.id).with_for_update(skip_locked=True)))
    if got:
        session.execute(
            update(model).where(model.id.in_(got)).values(claimed_by=owner, claimed_until=now + timedelta(seconds=lease))
            .execution_options(synchronize_session=False)
        )
    return got


def claim_for(db: Database, model: Claimable, candidates: list[int], *, now: datetime, lease: float,
              where: Any = None) -> list[int]:
    """Claim ``candidates`` for this instance (:func:`claim`) in a transaction of its own; the ids got, in order.

    On SQLite nothing is written: it serves one instance (:class:`InstanceLock`),
    whose worker never has two messages of one sender in flight and whose sender
    sends one batch at a time, so a claim would cost a writer's turn and an fsync
    and guard against nothing. The processing transaction still re-checks the row
    under the write lock.
    """
    if not candidates:
        return []
    if db.is_sqlite:
        return sorted(candidates)
    with db.session() as session:
        return claim(session, model, candidates, owner=db.owner, now=now, lease=lease, where=where)


def renew_claims(db: Database, model: Claimable, ids: list[int], *, now: datetime, lease: float) -> int:
    """Push the lease of our own claims on ``ids`` forward; rows held by a transaction of ours are skipped."""
    if not ids or db.is_sqlite:  # SQLite: no claims are written (claim_for)
        return 0
    with db.session() as session:
        mine = list(session.scalars(
            select(model.id).where(model.id.in_(ids), model.claimed_by == db.owner).with_for_update(skip_locked=True)
        ))
        if mine:
            session.execute(update(model).where(model.id.in_(mine)).values(claimed_until=now + timedelta(seconds=lease))
                            .execution_options(synchronize_session=False))
        return len(mine)


def release_claims(db: Database, model: Claimable, ids: list[int] | None = None, *, everyone: bool = False) -> int:
    """Hand claims back at once (shutdown); ``everyone`` (SQLite at start, a single instance) clears stale ones too."""
    if db.is_sqlite and not everyone:  # no claims of ours were written (claim_for)
        return 0
    with db.session() as session:
        query = select(model.id).where(model.claimed_by.is_not(None))
        if not everyone:
            query = query.where(model.claimed_by == db.owner)
        if ids is not None:
            query = query.where(model.id.in_(ids))
        held = list(session.scalars(query.with_for_update(skip_locked=True)))
        if held:
            session.execute(update(model).where(model.id.in_(held)).values(claimed_by=None, claimed_until=None)
                            .execution_options(synchronize_session=False))
        return len(held)


# --------------------------------------------------------------------------- leases


def acquire_lease(db: Database, name: str, *, now: datetime, seconds: float) -> str | None:
    """Take or renew the named lease for ``db.owner``; None when we hold it now, else the current holder."""
    until = now + timedelta(seconds=seconds)
    try:
        with db.session() as session:
            row = session.get(Lease, name, with_for_update=True)
            if row is None:
                session.add(Lease(name=name, holder=db.owner, until=until, acquired_at=now))
                session.flush()
                return None
            if row.holder != db.owner and row.until >= now:
                return row.holder
            if row.holder != db.owner:
                row.holder, row.acquired_at = db.owner, now
            row.until = until
            return None
    except IntegrityError:  # another instance inserted it first
        return "another instance"


def release_lease(db: Database, name: str) -> None:
    with db.session() as session:
        session.execute(delete(Lease).where(Lease.name == name, Lease.holder == db.owner))


# --------------------------------------------------------------------------- SQLite: one instance


class InstanceLocked(MailerError):
    """Another ``mailer serve`` is using this SQLite database."""


class InstanceLock:
    """``flock`` on ``<database>.lock``, holding the pid and host of the instance that has it.

    The kernel drops the lock when the process dies, however it dies, so a
    crashed instance never blocks the next one.
    """

    def __init__(self, database: Path) -> None:
        self.database = database
        self.path = database.with_name(database.name + ".lock")
        self._file: IO[str] | None = None

    def acquire(self) -> None:
        """:raises InstanceLocked: naming the other instance's pid and host."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - held open while the service runs
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().split()
            handle.close()
            pid, host = [*holder, "?", "?"][:2]
            raise InstanceLocked(
                f"another mailer serve (pid {pid} on {host}) is using the SQLite database {self.database}; "
                "SQLite allows one instance: stop that one first, or move to PostgreSQL for several "
                "(MAILER_DATABASE_URL, then `mailer db upgrade`)"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()} {socket.gethostname()}\n")
        handle.flush()
        self._file = handle

    def release(self) -> None:
        if self._file is None:
            return
        with contextlib.suppress(OSError):
            self._file.seek(0)
            self._file.truncate()
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
        self._file.close()
        self._file = None
