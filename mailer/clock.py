"""The one clock: every component reads the time through a :class:`Clock` it was given.

Production uses :data:`SYSTEM` (aware UTC). Tests build a :class:`FakeClock`
and move it (``advance``, ``set``) through weekends, holidays, DST changes and
year ends with no sleeps and no SQL date rewrites.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Protocol


class Clock(Protocol):
    def __call__(self) -> datetime:
        """The current instant, timezone-aware (UTC)."""
        ...


def system_now() -> datetime:
    return datetime.now(UTC)


SYSTEM: Clock = system_now


class FakeClock:
    """A clock that only moves when told to."""

    def __init__(self, start: datetime | None = None) -> None:
        self._now = start if start is not None else system_now()
        if self._now.tzinfo is None:
            raise ValueError("FakeClock needs an aware datetime")

    def __call__(self) -> datetime:
        return self._now

    def advance(self, delta: timedelta | None = None, **parts: float) -> datetime:
        """Move forward by ``delta`` or ``timedelta(**parts)``; returns the new instant."""
        self._now += delta if delta is not None else timedelta(**parts)
        return self._now

    def set(self, when: datetime) -> datetime:
        if when.tzinfo is None:
            raise ValueError("FakeClock needs an aware datetime")
        self._now = when
        return self._now
