"""Reminders for things maintainers said they would do: today, a CVE that was requested but not recorded.

Runs beside the worker; each reminder is an event, so one goes out at most once
per ``INTERVAL`` per report, to the incident manager (or all maintainers).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy import func, select

from mailer import states
from mailer.config import Config
from mailer.crypto import OpenPGP
from mailer.db import Database
from mailer.models import Event, Report, utcnow
from mailer.outgoing import Kind, Outgoing, Postman
from mailer.workflow import maintainer_key_problem, notice_recipients

log = logging.getLogger(__name__)

INTERVAL = timedelta(days=1)
CVE_GRACE = timedelta(days=2)


class Reminders:
    def __init__(self, db: Database, config: Config, postman: Postman, gpg: OpenPGP | None, *,
                 clock: Callable[[], datetime] = utcnow) -> None:
        self.db, self.config, self.postman, self.gpg, self.clock = db, config, postman, gpg, clock

    def drain(self) -> int:
        """Queue every reminder that is due now; returns how many reports were reminded of."""
        now = self.clock()
        sent = 0
        with self.db.session() as session:
            last = (
                select(func.max(Event.at))
                .where(Event.report_id == Report.id, Event.kind == "reminder.cve")
                .scalar_subquery()
            )
            query = select(Report).where(
                Report.cve_requested_at.is_not(None),
                Report.cve_requested_at <= now - CVE_GRACE,
                Report.cve.is_(None),
                Report.state.in_([s.value for s in states.OPEN]),
                (last.is_(None)) | (last <= now - INTERVAL),
            )
            for report in session.scalars(query):
                for maintainer in notice_recipients(self.config, report):
                    problem = maintainer_key_problem(self.gpg, maintainer.fingerprint)
                    self.postman.enqueue(session, Outgoing(
                        kind=Kind.NOTICE, to=maintainer.address,
                        subject=f"[{report.tracking_id}] Reminder: CVE requested, not recorded",
                        template="reminder_cve.txt.j2", context={"report": report},
                        report_id=report.id, encrypt_to=(maintainer.fingerprint,) if problem is None else (),
                    ))
                session.add(Event(report_id=report.id, kind="reminder.cve", at=now, detail={}))
                sent += 1
        return sent

    async def run(self, every: float = 3600.0) -> None:
        while True:
            try:
                await asyncio.to_thread(self.drain)
            except Exception:  # noqa: BLE001 - try again next round
                log.exception("reminder pass failed")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(every):
                    await asyncio.Event().wait()
