"""The daily digest: workdays at the configured hour, once a day, waiting reports first, encrypted."""

from __future__ import annotations

from datetime import UTC, datetime

from mailer.app import Service
from mailer.clock import FakeClock
from tests.conftest import smtp_port
from tests.gpgtools import Home
from tests.relay import CaptureRelay
from tests.test_commands import MARA, mara, open_for, reports, send_command, signed, svc
from tests.test_intake import asend, report_bytes

__all__ = ["mara", "svc"]

MONDAY_0930 = datetime(2026, 11, 30, 9, 30, tzinfo=UTC)  # the test config's timezone is UTC


async def _three_reports(svc: Service, home: Home, fpr: str) -> list[str]:
    for n, subject in enumerate(("Waiting one", "Accepted one", "Scheduled one")):
        await asend(smtp_port(svc), report_bytes(msgid=f"<d{n}@reporter.test>", subject=subject))
        await svc.settle()
    ids = [r.tracking_id for r in reports(svc)]
    await send_command(svc, signed(home, fpr, f"#report {ids[1]}\n#accept\n", msgid="<dg1@p>"))
    await send_command(svc, signed(home, fpr, f"#report {ids[2]}\n#accept\n#disclose +5\n", msgid="<dg2@p>"))
    return ids


async def test_digest_lists_open_reports_waiting_first_once_a_workday(
    svc: Service, relay: CaptureRelay, mara: tuple[Home, str]
) -> None:
    """At 09:30 on a Monday each maintainer gets one digest; waiting reports come first; a second drain sends nothing."""
    home, fpr = mara
    clock = svc.clock
    assert isinstance(clock, FakeClock)
    clock.set(MONDAY_0930.replace(hour=7))
    ids = await _three_reports(svc, home, fpr)
    before = len(relay.handler.to(MARA))
    assert svc.digest.drain() == 0  # before the hour
    clock.set(MONDAY_0930)
    assert svc.digest.drain() == 1
    assert svc.digest.drain() == 0  # once a day
    await svc.settle()
    [digest] = relay.handler.to(MARA)[before:]
    text = open_for(home, digest.raw)
    assert "Open security reports on 2026-11-30: 3, 1 waiting on a maintainer" in text
    assert text.index(ids[0]) < text.index(ids[1]) < text.index(ids[2])
    assert "WAITING " + ids[0] in text and "Waiting one" in text
    assert "advance_notice" in text or "release" in text  # the scheduled one names its next mail


async def test_no_digest_on_a_weekend_or_when_nothing_is_open(svc: Service, mara: tuple[Home, str]) -> None:
    """Saturday sends nothing; a workday with no open report sends nothing."""
    clock = svc.clock
    assert isinstance(clock, FakeClock)
    clock.set(datetime(2026, 11, 30, 9, 30, tzinfo=UTC))
    assert svc.digest.drain() == 0  # nothing open
    await asend(smtp_port(svc), report_bytes())
    await svc.settle()
    clock.set(datetime(2026, 12, 5, 9, 30, tzinfo=UTC))  # Saturday
    assert svc.digest.drain() == 0
    clock.set(datetime(2026, 12, 7, 9, 30, tzinfo=UTC))  # Monday
    assert svc.digest.drain() == 1
