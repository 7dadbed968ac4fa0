"""Tracking ids (``SEC-2026-0001``): allocation and recognition."""

from __future__ import annotations

import functools
import re
from datetime import datetime
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from mailer.models import Counter


def pattern(prefix: str) -> re.Pattern[str]:
    return re.compile(rf"\b{re.escape(prefix)}-(\d{{4}})-(\d{{4,6}})\b", re.IGNORECASE)


def find(prefix: str, text: str) -> str | None:
    """The first tracking id in ``text``, upper-cased, or None."""
    match = pattern(prefix).search(text or "")
    return match.group(0).upper() if match else None


@functools.lru_cache(maxsize=32)
def _bump(name: str, dialect: str) -> Any:
    """``INSERT … ON CONFLICT DO UPDATE SET value = value + 1 RETURNING value``: the first row is race-free too.

    Built once per counter (a statement is immutable; building and hashing it anew cost more than running it)."""
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    statement = insert(Counter).values(name=name, value=1)
    return statement.on_conflict_do_update(
        index_elements=[Counter.name], set_={"value": Counter.value + 1}
    ).returning(Counter.value)


def next_value(session: Session, name: str) -> int:
    """The next number of the named counter, unique under any concurrency.

    On PostgreSQL it is taken in a transaction of its own, committed at once: the
    counter row is locked only for that instant, not for the rest of the caller's
    transaction (which signs mail), so several messages are filed in parallel. A
    caller that rolls back leaves a gap, never a duplicate. SQLite has one writer:
    the increment joins the caller's transaction and rolls back with it.
    """
    bind = session.get_bind()
    dialect = bind.dialect.name
    if dialect == "postgresql":
        engine = bind.engine if isinstance(bind, Connection) else bind
        with engine.begin() as conn:
            return int(conn.execute(_bump(name, dialect)).scalar_one())
    with session.no_autoflush:  # the counter depends on nothing pending
        return int(session.execute(_bump(name, dialect)).scalar_one())


def allocate(session: Session, prefix: str, now: datetime) -> str:
    """Next id for the year of ``now``: one atomic upsert, safe with concurrent workers and instances."""
    value = next_value(session, f"tracking-{prefix}-{now.year}")
    return f"{prefix}-{now.year}-{value:04d}"
