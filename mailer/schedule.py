"""Dates in the disclosure timeline: pure date math, no database, no clock.

Workdays skip weekends and the configured country's public holidays
(``schedule.holidays_country``, the ``holidays`` library). Local time is
``schedule.timezone``; every function takes aware datetimes and returns aware
UTC ones, so a DST change or a year end needs no special case in callers. A
date-only disclosure happens at the start of business hours local time.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import holidays

from mailer.config import ScheduleConfig

_DATE = re.compile(r"^(\d{4})-(\d{2})-(\d{2})(?:[ T](\d{2}):(\d{2})(?:\s+([A-Za-z_/+\-0-9]+))?)?$")


class BadDate(ValueError):
    """A date argument that is malformed, not a real date, or in the past."""


@functools.lru_cache(maxsize=16)
def _calendar(country: str) -> holidays.HolidayBase:
    return holidays.country_holidays(country) if country else holidays.HolidayBase()


def zone(config: ScheduleConfig) -> ZoneInfo:
    """The configured local time zone."""
    return ZoneInfo(config.timezone)


def local(instant: datetime, config: ScheduleConfig) -> datetime:
    """``instant`` in the configured zone."""
    return _aware(instant).astimezone(zone(config))


def _aware(instant: datetime) -> datetime:
    if instant.tzinfo is None:
        raise ValueError("naive datetime given to the schedule; every instant must be aware")
    return instant


def is_workday(day: date, config: ScheduleConfig) -> bool:
    """Not a Saturday, Sunday or a public holiday of ``holidays_country``."""
    return day.weekday() < 5 and day not in _calendar(config.holidays_country)


def holiday_name(day: date, config: ScheduleConfig) -> str | None:
    """The holiday's name, or None."""
    name = _calendar(config.holidays_country).get(day)
    return str(name) if name else None


def add_workdays(start: date, days: int, config: ScheduleConfig) -> date:
    """The date ``days`` workdays after ``start`` (before it when negative); ``start`` itself is not counted."""
    step = 1 if days >= 0 else -1
    day, left = start, abs(days)
    while left:
        day += timedelta(days=step)
        if is_workday(day, config):
            left -= 1
    return day


def next_workday(day: date, config: ScheduleConfig) -> date:
    """The first workday strictly after ``day``."""
    return add_workdays(day, 1, config)


def at_local(day: date, clock: time, config: ScheduleConfig) -> datetime:
    """``day`` at local wall-clock ``clock``, as UTC (a time skipped by DST is moved forward by the gap)."""
    wall = datetime.combine(day, clock, zone(config))
    return wall.astimezone(UTC).astimezone(zone(config)).astimezone(UTC)


def business_start(day: date, config: ScheduleConfig) -> datetime:
    """``day`` at the start of business hours local time, as UTC."""
    return at_local(day, config.business_start, config)


def disclosure_instant(value: date | datetime, config: ScheduleConfig) -> datetime:
    """A disclosure date or instant as UTC: a date-only value happens at business-hours start."""
    if isinstance(value, datetime):
        return _aware(value).astimezone(UTC)
    return business_start(value, config)


def shift_workdays(instant: datetime, days: int, config: ScheduleConfig) -> datetime:
    """The same local wall-clock time ``days`` workdays later (earlier when negative), as UTC."""
    wall = local(instant, config)
    return at_local(add_workdays(wall.date(), days, config), wall.time().replace(tzinfo=None), config)


def advance_notice_at(disclose_at: datetime, config: ScheduleConfig, lead_workdays: int) -> datetime:
    """When the advance-disclosure mail goes: ``lead_workdays`` workdays before, at business-hours start.

    Never later than the disclosure instant and never more than
    ``max_advance_notice_days`` before it.
    """
    instant = _aware(disclose_at).astimezone(UTC)
    when = business_start(add_workdays(local(instant, config).date(), -lead_workdays, config), config)
    when = max(when, instant - timedelta(days=config.max_advance_notice_days))
    return min(when, instant)


def preview_at(instant: datetime, config: ScheduleConfig, preview_workdays: int) -> datetime:
    """When the preview of an announcement due at ``instant`` goes: ``preview_workdays`` workdays before."""
    return min(shift_workdays(instant, -preview_workdays, config), _aware(instant).astimezone(UTC))


def reminder_at(day: date, config: ScheduleConfig) -> datetime:
    """``day`` at ``reminder_hour`` local time, as UTC."""
    return at_local(day, time(config.reminder_hour), config)


def next_reminder_at(after: datetime, config: ScheduleConfig) -> datetime:
    """The first reminder instant strictly after ``after``: a workday at ``reminder_hour``."""
    day = local(after, config).date()
    if not is_workday(day, config) or reminder_at(day, config) <= after:
        day = next_workday(day, config)
    return reminder_at(day, config)


def last_reminder_at(upto: datetime, config: ScheduleConfig) -> datetime:
    """The latest reminder instant at or before ``upto``."""
    day = local(upto, config).date()
    if not is_workday(day, config) or reminder_at(day, config) > upto:
        day = add_workdays(day, -1, config)
    return reminder_at(day, config)


def format_local(instant: datetime, config: ScheduleConfig) -> str:
    """``2026-03-30 09:00 CEST (Europe/Berlin)``: always with the zone."""
    wall = local(instant, config)
    return f"{wall:%Y-%m-%d %H:%M %Z} ({config.timezone})"


def parse_when(text: str, *, now: datetime, config: ScheduleConfig) -> datetime:
    """``YYYY-MM-DD[ HH:MM[ TZ]]`` or ``+N`` (workdays from today) as an aware datetime, not in the past.

    Without a time zone the configured one is used; a date without a time (and
    ``+N``) means the start of business hours that day.
    """
    text = text.strip()
    tz = zone(config)
    if re.fullmatch(r"\+\d{1,2}", text):
        target = add_workdays(local(now, config).date(), int(text[1:]), config)
        return datetime.combine(target, config.business_start, tz)
    match = _DATE.match(text)
    if not match:
        raise BadDate(f"expected YYYY-MM-DD[ HH:MM TZ] or +N workdays, got {text!r}")
    year, month, mday, hour, minute, tzname = match.groups()
    try:
        if tzname:
            tz = ZoneInfo(tzname)
        if hour:
            when = datetime(int(year), int(month), int(mday), int(hour), int(minute), tzinfo=tz)
        else:
            when = datetime.combine(date(int(year), int(month), int(mday)), config.business_start, tz)
    except (ValueError, ZoneInfoNotFoundError) as exc:
        raise BadDate(f"not a real date/time: {text!r} ({exc})") from None
    past = when < now if hour else when.date() < now.astimezone(tz).date()
    if past:
        raise BadDate(f"{text} is in the past")
    return when


@dataclass(frozen=True)
class DateCheck:
    """The outcome of :func:`check_disclosure`: refusals stop the command; notes go into the transcript."""

    refusals: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.refusals


def check_disclosure(
    when: datetime,
    *,
    now: datetime,
    accepted_at: datetime | None,
    config: ScheduleConfig,
    lead_workdays: int,
    force: bool = False,
) -> DateCheck:
    """The guards on a disclosure instant (``#disclose``, ``#extend``).

    Refused: in the past; on a weekend or holiday (unless ``force``); more
    than ``max_embargo_days`` after acceptance (unless ``force``). Not refused
    but noted: closer than the advance-notice lead (the notice then goes at once).
    """
    refusals: list[str] = []
    notes: list[str] = []
    instant = _aware(when).astimezone(UTC)
    shown = format_local(instant, config)
    if instant <= now:
        refusals.append(f"{shown} is in the past")
    day = local(instant, config).date()
    if not force and not is_workday(day, config):
        what = holiday_name(day, config) or day.strftime("%A")
        refusals.append(f"{day:%Y-%m-%d} is not a workday ({what}); add --force to use it anyway")
    start = accepted_at or now
    limit = start + timedelta(days=config.max_embargo_days)
    if instant > limit:
        if force:
            notes.append(f"{shown} is beyond the {config.max_embargo_days}-day embargo maximum (forced)")
        else:
            refusals.append(
                f"{shown} is more than {config.max_embargo_days} days after acceptance "
                f"({format_local(start, config)}); add --force to go beyond schedule.max_embargo_days"
            )
    if not refusals and advance_notice_at(instant, config, lead_workdays) <= now:
        notes.append("the date is closer than the advance-notice lead: the advance notice goes at once")
    return DateCheck(tuple(refusals), tuple(notes))
