"""Processing a received message: a visible list of named steps.

    PIPELINE = (parse, classify, file, acknowledge, notify_maintainers)

Each step takes the :class:`Processing` context and may set ``stop`` to end
the pipeline early. All steps of one message run in one database transaction:
the report, its event log entries and its outgoing mail are committed together
or not at all. A step that raises is recorded by the worker (see
``mailer.worker``) with the step's name, and the message is retried later.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from email_validator import EmailNotValidError, validate_email
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from mailer import classify, tracking
from mailer.classify import Kind
from mailer.config import Config
from mailer.errors import StepError
from mailer.models import (
    Attachment,
    Event,
    InboundMessage,
    OutboxMessage,
    Report,
    ReportMessage,
    ReportState,
)
from mailer.outgoing import Kind as MailKind
from mailer.outgoing import Outgoing, Postman
from mailer.parsing import FIELDS, Parsed, envelope_address, extract_fields, parse_message

_ANY_MSGID = re.compile(rb"<[\x21-\x3b\x3d\x3f-\x7e]{1,250}>")


@dataclass
class Processing:
    """Everything the steps share while one inbound message is processed."""

    session: Session
    config: Config
    postman: Postman
    inbound: InboundMessage
    now: datetime
    envelope_from: str = ""
    parsed: Parsed | None = None
    kind: Kind | None = None
    report: Report | None = None
    report_message: ReportMessage | None = None
    stop: bool = False
    notes: list[str] = field(default_factory=list)

    def event(self, kind: str, **detail: object) -> None:
        self.session.add(
            Event(report=self.report, kind=kind, detail=detail, inbound_id=self.inbound.id, at=self.now)
        )

    @property
    def p(self) -> Parsed:
        assert self.parsed is not None
        return self.parsed


Step = Callable[[Processing], None]


def parse(ctx: Processing) -> None:
    ctx.envelope_from = envelope_address(ctx.inbound.mail_from)
    ctx.parsed = parse_message(ctx.inbound.raw, ctx.config.parsing)


def _report_by_references(ctx: Processing, msgids: list[str]) -> Report | None:
    if not msgids:
        return None
    found = ctx.session.scalar(
        select(ReportMessage.report_id).where(ReportMessage.message_id.in_(msgids[:100])).limit(1)
    )
    return ctx.session.get(Report, found) if found is not None else None


def _report_by_tracking_id(ctx: Processing) -> Report | None:
    tracking_id = tracking.find(ctx.config.service.tracking_prefix, ctx.p.subject)
    if tracking_id is None:
        return None
    return ctx.session.scalar(select(Report).where(Report.tracking_id == tracking_id))


def _embedded_msgids(raw: bytes) -> list[str]:
    """Message-IDs anywhere in a bounce (DSNs quote the original headers)."""
    found = _ANY_MSGID.findall(raw[:1_000_000])
    return [m.decode("ascii") for m in found[:200]]


def classify_message(ctx: Processing) -> None:
    p = ctx.p
    if classify.is_bounce(p, ctx.envelope_from):
        ctx.kind = Kind.BOUNCE
        ctx.report = _report_by_references(ctx, p.references + _embedded_msgids(ctx.inbound.raw))
        ctx.report = ctx.report or _report_by_tracking_id(ctx)
        return
    ctx.report = _report_by_references(ctx, p.references) or _report_by_tracking_id(ctx)
    if classify.is_auto_reply(p):
        ctx.kind = Kind.AUTOREPLY
    else:
        ctx.kind = Kind.FOLLOWUP if ctx.report is not None else Kind.NEW


def _add_report_message(ctx: Processing, kind: str) -> ReportMessage:
    p = ctx.p
    message = ReportMessage(
        report=ctx.report,
        direction="in",
        kind=kind,
        message_id=p.message_id,
        sender=ctx.envelope_from or p.from_address,
        inbound_id=ctx.inbound.id,
        body_text=p.body_text,
        meta={"from_header": p.from_address, "subject": p.subject, "unparseable": p.error},
        created_at=ctx.now,
    )
    ctx.session.add(message)
    cap = ctx.config.parsing.max_attachment_bytes
    for item in p.attachments:
        kept = len(item.data) <= cap
        message.attachments.append(
            Attachment(
                filename=item.filename,
                content_type=item.content_type,
                size=len(item.data),
                data=item.data if kept else None,
                truncated=not kept,
            )
        )
    ctx.report_message = message
    return message


def _new_report(ctx: Processing) -> Report:
    p = ctx.p
    fields, missing = extract_fields(p.body_text) if p.error is None else ({}, list(FIELDS))
    report = Report(
        tracking_id=tracking.allocate(ctx.session, ctx.config.service.tracking_prefix, ctx.now),
        state=ReportState.NEW.value,
        reporter=ctx.envelope_from or p.from_address,
        subject=p.subject,
        fields=fields,
        missing_fields=missing,
        flags={"unparseable": p.error} if p.error else {},
        created_at=ctx.now,
        updated_at=ctx.now,
    )
    ctx.session.add(report)
    return report


def file(ctx: Processing) -> None:
    ctx.inbound.classification = ctx.kind.value if ctx.kind else None
    if ctx.kind is Kind.NEW:
        ctx.report = _new_report(ctx)
        _add_report_message(ctx, "report")
        ctx.event("report.filed", tracking_id=ctx.report.tracking_id, missing=ctx.report.missing_fields)
        if ctx.p.error:
            ctx.event("message.unparseable", reason=ctx.p.error)
    elif ctx.report is not None:
        _add_report_message(ctx, ctx.kind.value if ctx.kind else "followup")
        ctx.report.updated_at = ctx.now
        ctx.event(f"message.{ctx.kind.value if ctx.kind else 'followup'}", message_id=ctx.p.message_id)
    else:
        ctx.kind = Kind.IGNORED
        ctx.inbound.classification = Kind.IGNORED.value
        ctx.event("message.ignored", reason="bounce or auto-reply matching no report", message_id=ctx.p.message_id)
        ctx.stop = True
    ctx.inbound.report_id = ctx.report.id if ctx.report is not None and ctx.report.id else None
    ctx.session.flush()
    if ctx.report is not None:
        ctx.inbound.report_id = ctx.report.id


def _acks_sent_today(ctx: Processing, address: str) -> int:
    since = ctx.now - timedelta(days=1)
    query = select(func.count(OutboxMessage.id)).where(
        OutboxMessage.rate_key == address,
        OutboxMessage.kind == MailKind.ACK.value,
        OutboxMessage.created_at >= since,
    )
    return ctx.session.scalar(query) or 0


def _valid_recipient(address: str) -> str | None:
    try:
        return validate_email(address, check_deliverability=False, test_environment=True).normalized
    except EmailNotValidError:
        return None


def _ack_blocked(ctx: Processing) -> str | None:
    reason = classify.no_reply_reason(ctx.p, ctx.envelope_from, ctx.config.service.contact)
    if reason is None and _valid_recipient(ctx.envelope_from) is None:
        reason = "envelope sender is not a valid address"
    if reason is None and _acks_sent_today(ctx, ctx.envelope_from) >= ctx.config.service.acks_per_sender_per_day:
        reason = "acknowledgement rate limit for this sender reached"
    return reason


def acknowledge(ctx: Processing) -> None:
    if ctx.kind is not Kind.NEW or ctx.report is None:
        return
    report = ctx.report
    reason = _ack_blocked(ctx)
    if reason is not None:
        ctx.event("ack.suppressed", reason=reason)
        return
    references = tuple(ctx.p.references[-10:]) + ((ctx.p.message_id,) if ctx.p.message_id else ())
    outbox = ctx.postman.enqueue(
        ctx.session,
        Outgoing(
            kind=MailKind.ACK,
            to=ctx.envelope_from,
            subject=f"[{report.tracking_id}] Re: {report.subject}" if report.subject else f"[{report.tracking_id}] Your security report",
            template="ack.txt.j2",
            context={"report": report, "missing": [FIELDS[m] for m in report.missing_fields]},
            report_id=report.id,
            in_reply_to=ctx.p.message_id,
            references=references,
            rate_key=ctx.envelope_from,
        ),
    )
    _record_outgoing(ctx, outbox, "ack")
    report.state = ReportState.ACKNOWLEDGED.value
    report.acknowledged_at = ctx.now
    ctx.event("ack.queued", message_id=outbox.message_id, to=ctx.envelope_from)


def _record_outgoing(ctx: Processing, outbox: OutboxMessage, kind: str) -> None:
    ctx.session.add(
        ReportMessage(
            report=ctx.report,
            direction="out",
            kind=kind,
            message_id=outbox.message_id,
            sender=ctx.config.service.contact,
            outbox_id=outbox.id,
            meta={"to": outbox.rcpt_tos},
            created_at=ctx.now,
        )
    )


def notify_maintainers(ctx: Processing) -> None:
    """Tell maintainers something arrived; report content only travels encrypted (OpenPGP issue)."""
    if ctx.report is None or ctx.kind not in (Kind.NEW, Kind.FOLLOWUP):
        return
    template = "notice_new.txt.j2" if ctx.kind is Kind.NEW else "notice_followup.txt.j2"
    label = "New report" if ctx.kind is Kind.NEW else "Follow-up"
    for maintainer in ctx.config.maintainers:
        outbox = ctx.postman.enqueue(
            ctx.session,
            Outgoing(
                kind=MailKind.NOTICE,
                to=maintainer.address,
                subject=f"[{ctx.report.tracking_id}] {label}",
                template=template,
                context={"report": ctx.report, "maintainer": maintainer, "message": ctx.report_message},
                report_id=ctx.report.id,
            ),
        )
        _record_outgoing(ctx, outbox, "notice")


PIPELINE: tuple[Step, ...] = (parse, classify_message, file, acknowledge, notify_maintainers)


def run_pipeline(ctx: Processing, steps: tuple[Step, ...] = PIPELINE) -> None:
    """Run the steps in order; a step's exception is re-raised as StepError naming it."""
    for step in steps:
        try:
            step(ctx)
        except Exception as exc:  # noqa: BLE001 - recorded with the step name by the worker
            raise StepError(step.__name__, exc) from exc
        if ctx.stop:
            return
