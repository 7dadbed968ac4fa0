"""Tracking ids (``SEC-2026-0001``): allocation and recognition."""

from __future__ import annotations

import re
from datetime import datetime

from sqlalchemy import update
from sqlalchemy.orm import Session

from mailer.models import Counter


def pattern(prefix: str) -> re.Pattern[str]:
    return re.compile(rf"\b{re.escape(prefix)}-(\d{{4}})-(\d{{4,6}})\b", re.IGNORECASE)


def find(prefix: str, text: str) -> str | None:
    """The first tracking id in ``text``, upper-cased, or None."""
    match = pattern(prefix).search(text or "")
    return match.group(0).upper() if match else None


def allocate(session: Session, prefix: str, now: datetime) -> str:
    """Next id for the year of ``now``: one atomic increment, safe with concurrent workers."""
    name = f"tracking-{prefix}-{now.year}"
    bump = update(Counter).where(Counter.name == name).values(value=Counter.value + 1).returning(Counter.value)
    value = session.scalar(bump)
    if value is None:
        session.add(Counter(name=name, value=1))
        session.flush()
        value = 1
    return f"{prefix}-{now.year}-{value:04d}"
