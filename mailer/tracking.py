"""Tracking ids (``SEC-2026-0001``): allocation and recognition."""

from __future__ import annotations

import re
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from mailer.models import Counter


def pattern(prefix: str) -> re.Pattern[str]:
    return re.compile(rf"\b{re.escape(prefix)}-(\d{{4}})-(\d{{4,6}})\b", re.IGNORECASE)


def find(prefix: str, text: str) -> str | None:
    """The first tracking id in ``text``, upper-cased, or None."""
    match = pattern(prefix).search(text or "")
    return match.group(0).upper() if match else None


def allocate(session: Session, prefix: str, now: datetime) -> str:
    """Next id for the year of ``now``; the counter row is locked until the transaction ends."""
    name = f"tracking-{prefix}-{now.year}"
    counter = session.scalar(select(Counter).where(Counter.name == name).with_for_update())
    if counter is None:
        counter = Counter(name=name, value=0)
        session.add(counter)
    counter.value += 1
    session.flush()
    return f"{prefix}-{now.year}-{counter.value:04d}"
