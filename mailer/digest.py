"""The maintainers' daily digest, and the reminder that security.txt is about to expire.

On each workday at ``[digest] hour`` (local time) every maintainer gets one
mail, encrypted to their key, listing the open reports: state, age, incident
manager, the next deadline and the next scheduled mail — reports waiting on
a maintainer first. Nothing is sent when nothing is open. A maintainer
without a usable key gets the list without subjects (``detailed``).

Each mail is claimed like the timeline's (a :class:`~mailer.models.ScheduledMail`
row with a unique key), so a restart or a second instance sends it once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from mailer import schedule
from mailer.clock import SYSTEM, Clock
from mailer.config import Config
from mailer.correspondence import Correspondence
from mailer.db import Database
from mailer.models import Event, Report, ScheduledMail, ScheduledMailState
from mailer.openpgp import OpenPGP
from mailer.outgoing import MailKind, Outgoing, Postman
from mailer.scheduler import facts_of_reports
from mailer.timeline import OPEN_STATES, plan

log = logging.getLogger(__name__)

SECURITY_TXT_WARNING = timedelta(days=30)
WAITING_STATES = frozenset({"new", "acknowledged"})


@dataclass(frozen=True)
class Line:
    tracking_id: str
    subject: str
    state: str
    age_days: int
    incident_manager: str
    waiting: bool
    next_deadline: str
    next_mail: str


class Digest:
    def __init__(self, db: Database, config: Config, postman: Postman, gpg: OpenPGP, *, clock: Clock = SYSTEM) -> None:
        self.db, self.config, self.postman, self.gpg, self.clock = db, config, postman, gpg, clock

    def lines(self, now: datetime) -> list[Line]:
        """The open reports as the digest lists them, waiting-on-a-maintainer first."""
        cfg = self.config.schedule
        out: list[Line] = []
        with self.db.reading() as session:  # it only reads: no SQLite write lock for a pass over every open report
            mail = Correspondence(session, self.config, self.postman, self.gpg, now=now)
            reports = list(session.scalars(select(Report).where(Report.state.in_(sorted(OPEN_STATES))).order_by(Report.id)))
            every = facts_of_reports(session, reports, lambda a: mail.member_key_problem(a) is None)
            for report, facts in zip(reports, every, strict=True):
                upcoming = [item for item in plan(facts, self.config, now) if item.due_at >= now or item.state == "held"]
                held = [item for item in upcoming if item.state == "held" and item.due_at <= now]
                deadlines = [item for item in upcoming if item.kind == "reminder"]
                mails = [item for item in upcoming if item.kind != "reminder"]
                out.append(Line(
                    tracking_id=report.tracking_id, subject=report.subject, state=report.state,
                    age_days=(now - report.created_at).days, incident_manager=report.incident_manager or "-",
                    waiting=report.state in WAITING_STATES or bool(held),
                    next_deadline=(f"{schedule.format_local(deadlines[0].due_at, cfg)} {deadlines[0].detail.get('topic', '')}"
                                   if deadlines else "-"),
                    next_mail=(f"{schedule.format_local(mails[0].due_at, cfg)} {mails[0].kind}"
                               + (f" (HELD: {mails[0].reason})" if mails[0].state == "held" else "") if mails else "-"),
                ))
        return sorted(out, key=lambda line: (not line.waiting, line.tracking_id))

    def _claim_and_send(self, key: str, kind: str, now: datetime, *, subject: str, template: str,
                        context: dict[str, object]) -> int:
        try:
            with self.db.session() as session:
                session.add(ScheduledMail(key=key, kind=kind, due_at=now, state=ScheduledMailState.SENT.value,
                                          reports=[], recipients=["maintainers"], detail={"audience": "maintainers"},
                                          sent_at=now, late_seconds=0.0, created_at=now))
                session.flush()  # the claim
                mail = Correspondence(session, self.config, self.postman, self.gpg, now=now)
                for maintainer in self.config.maintainers:
                    mail.to_maintainer(maintainer, Outgoing(kind=MailKind.NOTICE, to="", subject=subject,
                                                            template=template, context=context))
        except IntegrityError:
            return 0
        return 1

    def drain(self) -> int:
        """Send today's digest (and a due security.txt reminder) if it is time and not sent yet."""
        now = self.clock()
        sent = self._security_txt(now)
        hour = self.config.digest.hour
        if hour is None:
            return sent
        local = schedule.local(now, self.config.schedule)
        if local.hour < hour or not schedule.is_workday(local.date(), self.config.schedule):
            return sent
        lines = self.lines(now)
        if not lines:
            return sent
        day = f"{local:%Y-%m-%d}"
        return sent + self._claim_and_send(
            f"digest:{day}", "digest", now, subject=f"Daily digest {day}: {len(lines)} open report(s)",
            template="digest.txt.j2", context={"lines": lines, "day": day, "waiting": sum(line.waiting for line in lines)})

    def _security_txt(self, now: datetime) -> int:
        with self.db.session() as session:
            written = session.scalar(select(Event).where(Event.kind == "security_txt.written")
                                     .order_by(Event.id.desc()).limit(1))
            expires_text = str(written.detail.get("expires", "")) if written is not None else ""
        if not expires_text:
            return 0
        expires = datetime.fromisoformat(expires_text.replace("Z", "+00:00"))
        if now < expires - SECURITY_TXT_WARNING:
            return 0
        return self._claim_and_send(
            f"security_txt:{expires_text}", "reminder", now, subject="Reminder: security.txt expires soon",
            template="security_txt_expiry.txt.j2", context={"expires": schedule.format_local(expires, self.config.schedule)})
