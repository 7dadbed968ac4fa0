"""The timeline runner: sends what :mod:`mailer.timeline` plans, once, never early.

Due work is read from the database on every pass (no in-memory timers).
For each due item one transaction locks the item's reports, inserts the
:class:`~mailer.models.ScheduledMail` row with the item's unique key — the
insert is the claim: when it fails, another pass or another instance already
handled it — queues the mail through :class:`~mailer.correspondence.Correspondence`,
applies the state change (``announced``, ``published``) and records an event.
A mail sent after its instant (the service was down) is recorded with
``late_seconds`` and logged as a warning.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from mailer import logs, states
from mailer.advisory import AdvisoryError, osv_record
from mailer.clock import SYSTEM, Clock
from mailer.config import Config
from mailer.correspondence import Correspondence
from mailer.db import Database
from mailer.loop import run_every
from mailer.models import (
    EmbargoMember,
    Event,
    OutboxMessage,
    Report,
    ScheduledMail,
    ScheduledMailState,
)
from mailer.openpgp import OpenPGP
from mailer.outgoing import MailKind, Outgoing, Postman
from mailer.text import header_safe
from mailer.timeline import (
    PLANNED_STATES,
    Audience,
    Kind,
    Member,
    Planned,
    ReportFacts,
    plan_all,
)

log = logging.getLogger(__name__)

LATE_WARNING_SECONDS = 300.0
MAX_ROUNDS = 4  # a state change (release → published) makes new items due in the same drain
_RESPONSES = ("state.accept", "state.reject", "state.duplicate", "reply.sent")
_TRIAGE = ("state.accept", "state.reject", "state.duplicate")
_CHANGES = ("state.disclose", "state.extend", "report.fixed", "report.severity", "report.cvss", "report.disclose")
# the state machine's moves the schedule makes: target state -> the states it may come from
_MOVES = {target.value: frozenset(s.value for s in sources)
          for sources, target in (states.TRANSITIONS["announce"], states.TRANSITIONS["publish"]) if target is not None}


@dataclass
class _Loaded:
    """What :func:`facts_from_report` reads besides the report row, for one report."""

    members: list[EmbargoMember] = field(default_factory=list)
    events: list[tuple[str, datetime, dict[str, Any]]] = field(default_factory=list)
    notices: list[ScheduledMail] = field(default_factory=list)


def _load(session: Session, report_ids: list[int]) -> dict[int, _Loaded]:
    """Members, events and sent embargo notices of several reports: three queries, not three per report."""
    loaded = {report_id: _Loaded() for report_id in report_ids}
    for member in session.scalars(select(EmbargoMember).where(EmbargoMember.report_id.in_(report_ids))
                                  .order_by(EmbargoMember.id)):
        loaded[member.report_id].members.append(member)
    query = (select(Event.report_id, Event.kind, Event.at, Event.detail)
             .where(Event.report_id.in_(report_ids)).order_by(Event.id))
    for report_id, kind, at, detail in session.execute(query):
        loaded[report_id].events.append((kind, at, detail))
    for row in session.scalars(
        select(ScheduledMail).where(ScheduledMail.report_id.in_(report_ids), ScheduledMail.kind == Kind.EMBARGO_NOTICE.value,
                                    ScheduledMail.state == ScheduledMailState.SENT.value).order_by(ScheduledMail.id)
    ):
        if row.report_id is not None:
            loaded[row.report_id].notices.append(row)
    return loaded


def facts_of_reports(session: Session, reports: Iterable[Report], key_ok: Callable[[str], bool], *,
                     batch: int = 200) -> Iterator[ReportFacts]:
    """:func:`facts_from_report` for many reports, loaded ``batch`` reports at a time."""
    chunk: list[Report] = []
    for report in reports:
        chunk.append(report)
        if len(chunk) >= batch:
            yield from _facts_of_chunk(session, chunk, key_ok)
            chunk = []
    if chunk:
        yield from _facts_of_chunk(session, chunk, key_ok)


def _facts_of_chunk(session: Session, reports: list[Report], key_ok: Callable[[str], bool]) -> Iterator[ReportFacts]:
    loaded = _load(session, [report.id for report in reports])
    for report in reports:
        yield _facts(report, loaded[report.id], key_ok)


def facts_from_report(session: Session, report: Report, key_ok: Callable[[str], bool]) -> ReportFacts:
    """The :class:`ReportFacts` of ``report``: its row, embargo members, events and sent embargo notices."""
    return _facts(report, _load(session, [report.id])[report.id], key_ok)


def _facts(report: Report, loaded: _Loaded, key_ok: Callable[[str], bool]) -> ReportFacts:
    members, events = loaded.members, loaded.events

    def first(kinds: Iterable[str]) -> datetime | None:
        times = [at for kind, at, _ in events if kind in kinds]
        return min(times) if times else None

    def last(kinds: Iterable[str]) -> datetime | None:
        times = [at for kind, at, _ in events if kind in kinds]
        return max(times) if times else None

    current = {m.address: m.added_at for m in members}
    removed = tuple(
        (str(detail.get("address", "")), at) for kind, at, detail in events
        if kind == "embargo.remove" and detail.get("address")
        and not (detail["address"] in current and current[detail["address"]] >= at)
    )
    notified: dict[str, dict[str, str]] = {}
    for row in loaded.notices:
        if row.recipients and isinstance(row.detail.get("snapshot"), dict):
            notified[str(row.recipients[0])] = dict(row.detail["snapshot"])
    description = str(report.fields.get("description", "")).strip().splitlines()
    return ReportFacts(
        report_id=report.id, tracking_id=report.tracking_id, state=report.state, created_at=report.created_at,
        summary=report.subject or (description[0][:200] if description else ""),
        severity=report.severity, cvss_vector=report.cvss_vector, cvss_score=report.cvss_score,
        cve=report.cve, cve_none=bool(report.cve_none), cve_requested_at=report.cve_requested_at,
        affected=report.affected, fixed=report.fixed, advisory_url=report.advisory_url,
        release_version=report.release_version, release_url=report.release_url, disclose_at=report.disclose_at,
        first_response_at=first(_RESPONSES), triaged_at=first(_TRIAGE),
        accepted_at=report.accepted_at or first(("state.accept",)), published_at=report.published_at,
        leaked_at=report.leaked_at or last(("leak",)), publish_requested_at=report.publish_requested_at,
        changed_at=last(_CHANGES),
        members=tuple(Member(m.address, key_ok(m.address), m.added_at) for m in members),
        removed=removed, notified=notified,
    )


def show_recipients(audience: str, recipients: Iterable[str], *, members: bool = False) -> list[str]:
    """Recipients for a listing: list addresses and roles as they are, members as a count unless ``members``."""
    values = list(recipients)
    if audience == Audience.MEMBER.value and not members:
        return [f"{len(values)} embargo member" + ("s" if len(values) != 1 else "")]
    return values


def listing_entry(*, report: str, kind: str, due_at: datetime, state: str, reason: str | None, recipients: list[str],
           key: str, reports: list[Any]) -> dict[str, Any]:
    """One listing entry; ``due_at`` as ISO 8601 UTC (``Z``), ``reason`` only when there is one."""
    entry: dict[str, Any] = {
        "report": report, "kind": kind, "due_at": due_at.astimezone(UTC).isoformat().replace("+00:00", "Z"),
        "state": state, "recipients": recipients, "key": key, "reports": [str(r) for r in reports],
    }
    if reason:
        entry["reason"] = reason
    return entry


class Scheduler:
    """Runs the disclosure timeline against the database (see the module docstring)."""

    def __init__(self, db: Database, config: Config, postman: Postman, gpg: OpenPGP, *, clock: Clock = SYSTEM) -> None:
        self.db, self.config, self.postman, self.gpg, self.clock = db, config, postman, gpg, clock

    # ------------------------------------------------------------------ planning

    def _plan(self, session: Session, now: datetime, *, due_by: datetime | None = None) -> tuple[list[Planned], set[str]]:
        """The plan of every report the timeline still concerns (with ``due_by``: its items due by then),
        and the keys already recorded."""
        correspondence = Correspondence(session, self.config, self.postman, self.gpg, now=now)
        known: dict[str, bool] = {}

        def key_ok(address: str) -> bool:
            if address not in known:
                known[address] = correspondence.member_key_problem(address) is None
            return known[address]

        # streamed, 200 at a time: a flood leaves thousands of open reports, each row with the report's text
        reports = session.scalars(select(Report).where(Report.state.in_(sorted(PLANNED_STATES))).order_by(Report.id)
                                  .execution_options(yield_per=200))
        items = plan_all(facts_of_reports(session, reports, key_ok), self.config, now, due_by=due_by)
        keys = [item.key for item in items]
        recorded: set[str] = set()
        for start in range(0, len(keys), 500):
            recorded.update(session.scalars(select(ScheduledMail.key).where(ScheduledMail.key.in_(keys[start:start + 500]))))
        return items, recorded

    def preview(self, at: datetime) -> list[Planned]:
        """What would go out at ``at`` (``mailer schedule run --dry-run --at ISO``): nothing is sent or recorded."""
        with self.db.session() as session:
            items, recorded = self._plan(session, at, due_by=at)
            session.rollback()
        return [item for item in items if item.due_at <= at and item.key not in recorded]

    def listing(self, *, members: bool = False) -> list[dict[str, Any]]:
        """Recorded and planned mail for ``mailer schedule list --json``; member addresses only with ``members``."""
        now = self.clock()
        with self.db.session() as session:
            items, recorded = self._plan(session, now)
            rows = list(session.scalars(select(ScheduledMail).order_by(ScheduledMail.due_at, ScheduledMail.id)))
        out: list[dict[str, Any]] = []
        for row in rows:
            audience = str(row.detail.get("audience", ""))
            out.append(listing_entry(report=row.reports[0] if row.reports else "", kind=row.kind, due_at=row.due_at,
                              state=row.state, reason=row.reason, key=row.key, reports=row.reports,
                              recipients=show_recipients(audience, row.recipients, members=members)))
        for item in items:
            if item.key not in recorded:
                out.append(listing_entry(report=item.report, kind=str(item.kind), due_at=item.due_at, state=item.state,
                                  reason=item.reason, key=item.key, reports=list(item.reports),
                                  recipients=show_recipients(item.audience.value, item.recipients, members=members)))
        return sorted(out, key=lambda entry: (entry["due_at"], entry["key"]))

    # ------------------------------------------------------------------ sending

    def drain(self) -> int:
        """Handle every due, unrecorded item; returns how many were sent or held. Safe to run concurrently."""
        now = self.clock()
        handled = 0
        for _ in range(MAX_ROUNDS):
            # planning only reads (without SQLite's write lock: it covers every open report); each item
            # is claimed, re-checked and sent in a transaction of its own (_handle)
            with self.db.reading() as session:
                items, recorded = self._plan(session, now, due_by=now)
            due = [item for item in items if item.due_at <= now]
            covered = [item for item in due if item.key in recorded and item.moves_to]
            if covered:
                self._apply_covered(covered, now)
            count = sum(self._handle(item, now) for item in due if item.key not in recorded)
            handled += count
            if not count:
                break
        return handled

    def _apply_covered(self, items: list[Planned], now: datetime) -> None:
        """A report that joined an advance notice already sent for its day is announced by it."""
        with self.db.session() as session:
            for item in items:
                for report in self._lock(session, item.report_ids):
                    self._move(session, report, item, now)

    @staticmethod
    def _lock(session: Session, report_ids: Iterable[int]) -> list[Report]:
        ids = sorted(set(report_ids))
        if not ids:
            return []
        return list(session.scalars(select(Report).where(Report.id.in_(ids)).order_by(Report.id).with_for_update()))

    def _move(self, session: Session, report: Report, item: Planned, now: datetime) -> None:
        target = item.moves_to
        if target is None or report.state not in _MOVES[target]:
            return
        old, report.state, report.updated_at = report.state, target, now
        if target == "published":
            report.published_at = now
        session.add(Event(report_id=report.id, kind=f"state.{target}", at=now,
                          detail={"old": old, "new": target, "by": "schedule", "key": item.key}))

    def _handle(self, item: Planned, now: datetime) -> int:
        """Claim, send, move and log one item in one transaction; 0 when another pass had it."""
        late = max(0.0, (now - item.due_at).total_seconds())
        try:
            with self.db.session() as session:
                reports = self._lock(session, item.report_ids)
                if item.kind is Kind.RELEASE and all(r.state not in _MOVES["published"] for r in reports):
                    return 0  # already moved by another instance: its fresh plan no longer has this item
                row = self._row(item, ScheduledMailState.HELD if item.state == "held" else ScheduledMailState.SENT,
                                now, late)
                session.add(row)
                session.flush()  # the claim: a duplicate key raises here
                sent = self._send(session, item, reports, now)
                if item.state != "held" and not sent and item.audience is Audience.MEMBER:
                    row.state, row.reason = ScheduledMailState.FAILED.value, "no usable OpenPGP key for the member"
                for report in reports:
                    if item.state != "held":
                        self._move(session, report, item, now)
                    session.add(Event(report_id=report.id, kind=f"schedule.{row.state}", at=now, detail={
                        "kind": str(item.kind), "key": item.key, "late_seconds": late, "mails": len(sent),
                        **({"reason": row.reason} if row.reason else {}),
                    }))
        except IntegrityError:
            log.debug("scheduled mail %s was already handled", item.key)
            return 0
        except Exception as exc:
            log.exception("scheduled mail %s failed", item.key)
            logs.scheduled(str(item.kind), item.key, ScheduledMailState.FAILED.value, list(item.reports), type(exc).__name__)
            return self._record_failure(item, now, late, exc)
        logs.scheduled(str(item.kind), item.key, row.state, list(item.reports), row.reason)
        if late > LATE_WARNING_SECONDS:
            log.warning("scheduled %s for %s went out %.0f seconds late (due %s)",
                        item.kind, ", ".join(item.reports) or "-", late, item.due_at.isoformat())
        return 1

    def _record_failure(self, item: Planned, now: datetime, late: float, exc: Exception) -> int:
        try:
            with self.db.session() as session:
                row = self._row(item, ScheduledMailState.FAILED, now, late)
                row.reason = f"{type(exc).__name__}: {exc}"[:2000]
                session.add(row)
        except IntegrityError:
            return 0
        return 1

    def _row(self, item: Planned, state: ScheduledMailState, now: datetime, late: float) -> ScheduledMail:
        return ScheduledMail(
            key=item.key, report_id=item.report_ids[0] if len(item.report_ids) == 1 else None,
            reports=list(item.reports), kind=str(item.kind), due_at=item.due_at, state=state.value,
            reason=item.reason, recipients=list(item.recipients),
            detail={**item.detail, "audience": item.audience.value, "template": item.template},
            sent_at=now if state is not ScheduledMailState.FAILED else None, late_seconds=late, created_at=now,
        )

    def _send(self, session: Session, item: Planned, reports: list[Report], now: datetime) -> list[OutboxMessage]:
        """Queue the item's mail; returns the outbox rows (empty: nothing could be sent)."""
        correspondence = Correspondence(session, self.config, self.postman, self.gpg, now=now)
        report = reports[0] if reports else None
        alert = item.kind in (Kind.RELEASE_HELD, Kind.REMINDER)
        outgoing = Outgoing(
            kind=MailKind.ALERT if alert else MailKind.NOTICE, to="", subject=header_safe(item.subject, 200),
            template=item.template, context={**item.context, "osv_attached": False},
            report=report if report is not None and len(reports) == 1 else None,
        )
        if item.kind is Kind.RELEASE and report is not None and len(reports) == 1:
            outgoing = self._with_osv(outgoing, report, now)
        if item.audience is Audience.LISTS:
            return [correspondence.to_list(address, outgoing) for address in item.recipients]
        if item.audience is Audience.MEMBER:
            mails = [correspondence.to_member(address, outgoing) for address in item.recipients]
            return [mail for mail in mails if mail is not None]
        if item.audience is Audience.REPORTER:
            delivery = correspondence.to_reporter(report, outgoing, what=f"schedule.{item.kind}") if report else None
            return [delivery.outbox] if delivery is not None else []
        if item.audience is Audience.ALL_MAINTAINERS:
            return [correspondence.to_maintainer(m, outgoing) for m in self.config.maintainers]
        return correspondence.to_maintainers(report, outgoing)

    def _with_osv(self, outgoing: Outgoing, report: Report, now: datetime) -> Outgoing:
        """The release email with the report's OSV record attached, when ``[advisory] attach_osv`` and one can be written."""
        if not self.config.advisory.attach_osv:
            return outgoing
        try:
            record = osv_record(report, self.config, now=now)
        except AdvisoryError as exc:
            log.info("release of %s goes without an OSV record: %s", report.tracking_id, exc)
            return outgoing
        data = (json.dumps(record, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
        return replace(outgoing, context={**outgoing.context, "osv_attached": True, "osv_name": f"{report.tracking_id}.osv.json"},
                       public_attachments=((f"{report.tracking_id}.osv.json", "application/json", data),))

    async def run(self, every: float = 60.0) -> None:
        """The service loop: drain now and then every ``every`` seconds (the work is in the database)."""
        await run_every(lambda: asyncio.to_thread(self.drain), every=every, name="schedule", log=log)
