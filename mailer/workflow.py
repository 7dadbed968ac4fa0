"""Processing a received message: a visible list of named steps.

    The pipeline itself is listed in ``mailer.pipeline``.

Each step takes the :class:`Processing` context and may set ``stop`` to end
the pipeline early. All steps of one message run in one database transaction:
the report, its event log entries and its outgoing mail are committed together
or not at all. A step that raises is recorded by the worker (see
``mailer.worker``) with the step's name, and the message is retried later.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from dataclasses import replace as _replace
from datetime import datetime, timedelta

from email_validator import EmailNotValidError, validate_email
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from mailer import classify, tracking
from mailer.classify import Kind
from mailer.config import Config, Maintainer
from mailer.crypto import CryptoError, OpenPGP
from mailer.errors import StepError
from mailer.models import (
    Attachment,
    Event,
    InboundMessage,
    OutboxMessage,
    Report,
    ReportKey,
    ReportMessage,
    ReportState,
)
from mailer.outgoing import Kind as MailKind
from mailer.outgoing import Outgoing, Postman
from mailer.parsing import FIELDS, AttachmentData, Parsed, envelope_address, extract_fields, header_safe, parse_message
from mailer.pgpmime import Unwrapped, unwrap

log = logging.getLogger(__name__)

_ANY_MSGID = re.compile(rb"<[\x21-\x3b\x3d\x3f-\x7e]{1,250}>")
_OPENPGP = re.compile(rb"-----BEGIN PGP |application/pgp-|multipart/(encrypted|signed)|^autocrypt:", re.I | re.M)
_PGP_CONTROL_TYPES = ("application/pgp-keys", "application/pgp-encrypted", "application/pgp-signature")


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
    gpg: OpenPGP | None = None
    pgp: Unwrapped | None = None
    # the sender wrote encrypted (whether or not we could decrypt it)
    encrypted_input: bool = False
    protected_subject: str = ""
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


def unwrap_openpgp(ctx: Processing) -> None:
    """Decrypt and verify over the raw bytes as received; only encrypted parts count as the report's text."""
    raw = ctx.inbound.raw
    if ctx.gpg is None or not _OPENPGP.search(raw[:2_000_000]):
        return
    pgp = ctx.pgp = unwrap(raw, ctx.gpg)
    p = ctx.p
    ctx.encrypted_input = pgp.encrypted or bool(re.search(rb"multipart/encrypted|-----BEGIN PGP MESSAGE-----", raw, re.I))
    if pgp.encrypted:
        p.body_text = "\n\n".join(part.text for part in pgp.text_parts if part.encrypted)
        ctx.protected_subject = header_safe(pgp.protected_headers.get("Subject", ""), 500)
    elif pgp.text_parts:
        p.body_text = "\n\n".join(part.text for part in pgp.text_parts)
    if pgp.text_parts or pgp.attachments:
        p.attachments = [
            AttachmentData(header_safe(a.filename or "", 255), header_safe(a.content_type, 255), a.data)
            for a in pgp.attachments
            if a.content_type not in _PGP_CONTROL_TYPES
        ]


def openpgp_summary(pgp: Unwrapped | None) -> dict[str, object]:
    """What the report records per message about its protection."""
    if pgp is None:
        return {"encrypted": False, "signed": False}
    return {
        "encrypted": pgp.encrypted,
        "partly_encrypted": pgp.partly_encrypted,
        "signed": any(part.signed for part in pgp.text_parts),
        "errors": list(pgp.errors),
        "parts": [
            {
                "encrypted": part.encrypted,
                "signed": part.signed,
                "signature_valid": part.signature_valid,
                "signer": part.signer_fpr,
                "signature_reason": part.signature_reason,
            }
            for part in pgp.text_parts
        ],
        # plaintext that came beside the encrypted part: kept apart, never merged
        "outside_text": [part.text for part in pgp.text_parts if pgp.encrypted and not part.encrypted],
    }


def _report_by_references(ctx: Processing, msgids: list[str]) -> Report | None:
    if not msgids:
        return None
    found = ctx.session.scalar(
        select(ReportMessage.report_id).where(ReportMessage.message_id.in_(msgids[:100])).limit(1)
    )
    return ctx.session.get(Report, found) if found is not None else None


def _report_by_tracking_id(ctx: Processing) -> Report | None:
    prefix = ctx.config.service.tracking_prefix
    tracking_id = tracking.find(prefix, ctx.p.subject) or tracking.find(prefix, ctx.protected_subject)
    if tracking_id is None:
        return None
    return ctx.session.scalar(select(Report).where(Report.tracking_id == tracking_id))


def _embedded_msgids(raw: bytes) -> list[str]:
    """Message-IDs anywhere in a bounce (DSNs quote the original headers)."""
    found = _ANY_MSGID.findall(raw[:1_000_000])
    return [m.decode("ascii") for m in found[:200]]


def classify_message(ctx: Processing) -> None:
    p = ctx.p
    rcpts = {str(r).strip("<>").lower() for r in ctx.inbound.rcpt_tos}
    if ctx.config.sendkey_address in rcpts and ctx.config.service.contact not in rcpts:
        ctx.kind = Kind.SENDKEY
        return
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


def answer_sendkey(ctx: Processing) -> None:
    """Mail to the -sendkey sub-address is answered with the service's public key (RFC 3834 rules apply)."""
    if ctx.kind is not Kind.SENDKEY:
        return
    ctx.inbound.classification = Kind.SENDKEY.value
    ctx.stop = True
    reason = _ack_blocked(ctx)
    if reason is not None:
        ctx.event("sendkey.suppressed", reason=reason)
        return
    outbox = ctx.postman.enqueue(
        ctx.session,
        Outgoing(
            kind=MailKind.ACK,
            to=ctx.envelope_from,
            subject=f"OpenPGP key of {ctx.config.service.contact}",
            template="sendkey.txt.j2",
            in_reply_to=ctx.p.message_id,
            references=(ctx.p.message_id,) if ctx.p.message_id else (),
            rate_key=ctx.envelope_from,
            attach_key=True,
        ),
    )
    ctx.event("sendkey.queued", message_id=outbox.message_id, to=ctx.envelope_from)


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
        meta={
            "from_header": p.from_address,
            "subject": p.subject,
            "protected_subject": ctx.protected_subject,
            "unparseable": p.error,
            "openpgp": openpgp_summary(ctx.pgp),
        },
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
    flags: dict[str, object] = {"unparseable": p.error} if p.error else {}
    if ctx.encrypted_input:
        flags["encrypted"] = True
    if ctx.pgp is not None and ctx.pgp.partly_encrypted:
        flags["partly_encrypted"] = True
    if ctx.pgp is not None and ctx.pgp.errors:
        flags["openpgp_error"] = ctx.pgp.reason
    report = Report(
        tracking_id=tracking.allocate(ctx.session, ctx.config.service.tracking_prefix, ctx.now),
        state=ReportState.NEW.value,
        reporter=ctx.envelope_from or p.from_address,
        subject=ctx.protected_subject or p.subject,
        fields=fields,
        missing_fields=missing,
        flags=flags,
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
    if ctx.report is not None and ctx.pgp is not None and ctx.pgp.errors:
        ctx.event("openpgp.problem", reason=ctx.pgp.reason, errors=list(ctx.pgp.errors))
    ctx.session.flush()
    ctx.inbound.report_id = ctx.report.id if ctx.report is not None else None


def _acks_sent_today(ctx: Processing, address: str) -> int:
    since = ctx.now - timedelta(days=1)
    query = select(func.count(OutboxMessage.id)).where(
        OutboxMessage.rate_key == address,
        OutboxMessage.kind == MailKind.ACK.value,
        OutboxMessage.created_at >= since,
    )
    return ctx.session.scalar(query) or 0


def valid_recipient(address: str) -> str | None:
    try:
        return validate_email(address, check_deliverability=False, test_environment=True).normalized
    except EmailNotValidError:
        return None


def _ack_blocked(ctx: Processing) -> str | None:
    reason = classify.no_reply_reason(ctx.p, ctx.envelope_from, ctx.config.service.contact)
    if reason is None and valid_recipient(ctx.envelope_from) is None:
        reason = "envelope sender is not a valid address"
    if reason is None and _acks_sent_today(ctx, ctx.envelope_from) >= ctx.config.service.acks_per_sender_per_day:
        reason = "acknowledgement rate limit for this sender reached"
    return reason


def bind_keys(ctx: Processing) -> None:
    """Keys in the reporter's mail are kept for answering that reporter on that report, nothing else."""
    if ctx.pgp is None or not ctx.pgp.keys_found or ctx.report is None:
        return
    from_reporter = ctx.kind is Kind.NEW or (ctx.kind is Kind.FOLLOWUP and ctx.envelope_from == ctx.report.reporter)
    if not from_reporter:
        return
    for blob in ctx.pgp.keys_found[:3]:
        ctx.session.add(ReportKey(report=ctx.report, key_blob=blob, source="message", inbound_id=ctx.inbound.id, created_at=ctx.now))
    ctx.event("openpgp.reporter_key", count=min(len(ctx.pgp.keys_found), 3))


def reporter_key(session: Session, report: Report) -> bytes | None:
    """The newest key the reporter sent for this report, if any."""
    query = select(ReportKey.key_blob).where(ReportKey.report_id == report.id).order_by(ReportKey.id.desc()).limit(1)
    return session.scalar(query)


def acknowledge(ctx: Processing) -> None:
    if ctx.kind is not Kind.NEW or ctx.report is None:
        return
    report = ctx.report
    reason = _ack_blocked(ctx)
    if reason is not None:
        ctx.event("ack.suppressed", reason=reason)
        return
    ctx.session.flush()
    key_blob = reporter_key(ctx.session, report)
    references = tuple(ctx.p.references[-10:]) + ((ctx.p.message_id,) if ctx.p.message_id else ())
    if ctx.encrypted_input:
        # Generic text only: whoever sent it may be replaying someone else's ciphertext.
        subject = f"[{report.tracking_id}] Your encrypted report was received"
        template, context = "ack_encrypted.txt.j2", {"report": report, "have_key": key_blob is not None}
    else:
        subject = f"[{report.tracking_id}] Re: {report.subject}" if report.subject else f"[{report.tracking_id}] Your security report"
        template, context = "ack.txt.j2", {"report": report, "missing": [FIELDS[m] for m in report.missing_fields]}
    outgoing = Outgoing(
        kind=MailKind.ACK, to=ctx.envelope_from, subject=subject, template=template, context=context,
        report_id=report.id, in_reply_to=ctx.p.message_id, references=references, rate_key=ctx.envelope_from,
        key_blob=key_blob, attach_key=key_blob is None,
    )
    try:
        outbox = ctx.postman.enqueue(ctx.session, outgoing)
    except CryptoError as exc:
        ctx.event("ack.reporter_key_unusable", reason=str(exc))
        context["have_key"] = False
        outgoing = _replace(outgoing, key_blob=None, attach_key=True)
        outbox = ctx.postman.enqueue(ctx.session, outgoing)
    record_outgoing(ctx, outbox, "ack")
    report.state = ReportState.ACKNOWLEDGED.value
    report.acknowledged_at = ctx.now
    ctx.event("ack.queued", message_id=outbox.message_id, to=ctx.envelope_from, encrypted=outgoing.key_blob is not None)


def record_outgoing(ctx: Processing, outbox: OutboxMessage, kind: str) -> None:
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


def maintainer_key_problem(gpg: OpenPGP | None, fingerprint: str) -> str | None:
    """Why mail cannot be encrypted to this maintainer's pinned key, or None."""
    if not fingerprint:
        return "no fingerprint configured"
    if gpg is None:
        return "no OpenPGP keyring"
    info = gpg.key_info(fingerprint)
    if info is None:
        return f"key {fingerprint} is not in the keyring (mailer keys import FILE)"
    if info.problem:
        return info.problem
    if not info.can_encrypt:
        return f"key {fingerprint} has no usable encryption subkey"
    return None


def notice_recipients(config: Config, report: Report) -> list[Maintainer]:
    """All maintainers, or only the incident manager once assigned when ``commands.notify`` says so."""
    if config.commands.notify == "incident_manager" and report.incident_manager:
        chosen = [m for m in config.maintainers if m.address == report.incident_manager]
        if chosen:
            return chosen
    return list(config.maintainers)


def _report_thread(ctx: Processing) -> str | None:
    """Maintainers' notices of one report thread under the report's first message."""
    assert ctx.report is not None
    query = (
        select(ReportMessage.message_id)
        .where(ReportMessage.report_id == ctx.report.id, ReportMessage.kind == "report")
        .order_by(ReportMessage.id)
        .limit(1)
    )
    return ctx.session.scalar(query)


def notify_maintainers(ctx: Processing) -> None:
    """Report content reaches maintainers only encrypted to their pinned key (fail closed)."""
    if ctx.report is None or ctx.kind not in (Kind.NEW, Kind.FOLLOWUP):
        return
    label = "New report" if ctx.kind is Kind.NEW else "Follow-up"
    allow_clear = ctx.config.gnupg.allow_cleartext_to_maintainers
    thread = _report_thread(ctx)
    for maintainer in notice_recipients(ctx.config, ctx.report):
        problem = maintainer_key_problem(ctx.gpg, maintainer.fingerprint)
        detailed = problem is None or allow_clear
        if problem is not None:
            log.warning("notice to %s %s report content: %s", maintainer.address,
                        "carries" if allow_clear else "omits", problem)
            ctx.event("notice.without_encryption", to=maintainer.address, reason=problem, content_included=allow_clear)
        notice = Outgoing(
            kind=MailKind.NOTICE,
            to=maintainer.address,
            subject=f"[{ctx.report.tracking_id}] {label}",
            template="notice.txt.j2",
            context={
                "report": ctx.report, "maintainer": maintainer, "message": ctx.report_message,
                "label": label, "detailed": detailed, "key_problem": problem,
                "openpgp": openpgp_summary(ctx.pgp), "attachments": ctx.p.attachments,
            },
            report_id=ctx.report.id,
            in_reply_to=thread,
            references=(thread,) if thread else (),
            encrypt_to=(maintainer.fingerprint,) if problem is None else (),
        )
        try:
            outbox = ctx.postman.enqueue(ctx.session, notice)
        except CryptoError as exc:  # the key went bad since we looked: fail closed, still notify
            ctx.event("notice.without_encryption", to=maintainer.address, reason=str(exc), content_included=False)
            context = {**notice.context, "detailed": False, "key_problem": str(exc)}
            outbox = ctx.postman.enqueue(ctx.session, _replace(notice, context=context, encrypt_to=()))
        record_outgoing(ctx, outbox, "notice")


def run_pipeline(ctx: Processing, steps: tuple[Step, ...]) -> None:
    """Run the steps in order; a step's exception is re-raised as StepError naming it."""
    for step in steps:
        try:
            step(ctx)
        except Exception as exc:  # noqa: BLE001 - recorded with the step name by the worker
            raise StepError(step.__name__, exc) from exc
        if ctx.stop:
            return
