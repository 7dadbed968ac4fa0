"""Dates in the disclosure timeline: workdays skip weekends and the configured country's holidays."""

from __future__ import annotations

import re
from datetime import date, datetime, time
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import holidays

from mailer.config import ScheduleConfig

_DATE = re.compile(r"^(\d{4})-(\d{2})-(\d{2})(?:[ T](\d{2}):(\d{2})(?:\s+([A-Za-z_/+\-0-9]+))?)?$")


class BadDate(ValueError):
    """A date argument that is malformed, not a real date, or in the past."""


def _calendar(config: ScheduleConfig) -> holidays.HolidayBase:
    return holidays.country_holidays(config.holidays_country) if config.holidays_country else holidays.HolidayBase()


def add_workdays(start: date, days: int, config: ScheduleConfig) -> date:
    """The date ``days`` workdays after ``start``."""
    return _calendar(config).get_nth_working_day(start, days)


def parse_when(text: str, *, now: datetime, config: ScheduleConfig) -> datetime:
    """``YYYY-MM-DD[ HH:MM[ TZ]]`` or ``+N`` (workdays from today) as an aware datetime, not in the past."""
    text = text.strip()
    zone = ZoneInfo(config.timezone)
    if re.fullmatch(r"\+\d{1,2}", text):
        day = add_workdays(now.astimezone(zone).date(), int(text[1:]), config)
        return datetime.combine(day, time(0, 0), zone)
    match = _DATE.match(text)
    if not match:
        raise BadDate(f"expected YYYY-MM-DD[ HH:MM TZ] or +N workdays, got {text!r}")
    year, month, day, hour, minute, tz = match.groups()
    try:
        if tz:
            zone = ZoneInfo(tz)
        when = datetime(int(year), int(month), int(day), int(hour or 0), int(minute or 0), tzinfo=zone)
    except (ValueError, ZoneInfoNotFoundError) as exc:
        raise BadDate(f"not a real date/time: {text!r} ({exc})") from None
    past = when < now if hour else when.date() < now.astimezone(when.tzinfo).date()
    if past:
        raise BadDate(f"{text} is in the past")
    return when


def is_workday(day: date, config: ScheduleConfig) -> bool:
    return _calendar(config).is_working_day(day)
