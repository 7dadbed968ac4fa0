"""Answering steps: the reporter's acknowledgement, the key request, the maintainers' notice.

Automatic answers follow RFC 3834 (:func:`ack_blocked`); who gets what, and
encrypted or not, is decided by :mod:`mailer.correspondence`.
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import bindparam, func, select

from mailer.classify import MessageKind
from mailer.models import OutboxMessage, ReportMessage, ReportState
from mailer.outgoing import MailKind, Outgoing
from mailer.parsing import FIELDS
from mailer.pgpshapes import looks_encrypted
from mailer.prepare import traits
from mailer.processing import Processing, openpgp_summary
from mailer.text import valid_address

# built once (every message counts its sender's acks; building the statement cost more than running it)
_ACKS_SINCE = select(func.count(OutboxMessage.id)).where(
    OutboxMessage.rate_key == bindparam("address"),
    OutboxMessage.kind == MailKind.ACK.value,
    OutboxMessage.created_at >= bindparam("since", type_=OutboxMessage.created_at.type),
)


def acks_sent_today(ctx: Processing, address: str) -> int:
    with ctx.session.no_autoflush:  # counts acks committed before: nothing pending changes it
        return ctx.session.scalar(_ACKS_SINCE, {"address": address, "since": ctx.now - timedelta(days=1)}) or 0


def count_acks(ctx: Processing) -> None:
    """The sender's acknowledgements of the last day, counted before the write transaction (outside
    SQLite's write lock). Nothing adds to them meanwhile: one message per envelope sender is processed
    at a time (:class:`mailer.worker.Worker`), and only processing queues acknowledgements."""
    if ctx.envelope_from:
        ctx.acks_sent_today = acks_sent_today(ctx, ctx.envelope_from)


def ack_blocked(ctx: Processing) -> str | None:
    """Why this message gets no automatic answer (RFC 3834, invalid sender, rate limit), or None."""
    reason = traits(ctx).no_reply
    if reason is None and valid_address(ctx.envelope_from) is None:
        reason = "envelope sender is not a valid address"
    if reason is None:
        sent = ctx.acks_sent_today if ctx.acks_sent_today is not None else acks_sent_today(ctx, ctx.envelope_from)
        if sent >= ctx.config.service.acks_per_sender_per_day:
            reason = "acknowledgement rate limit for this sender reached"
    return reason


def _in_reply(ctx: Processing) -> tuple[str | None, tuple[str, ...]]:
    msgid = ctx.m.message_id
    return msgid, tuple(ctx.m.references[-10:]) + ((msgid,) if msgid else ())


def answer_sendkey(ctx: Processing) -> None:
    """Mail to the -sendkey sub-address is answered with the service's public key (RFC 3834 rules apply)."""
    reason = ack_blocked(ctx)
    if reason is not None:
        ctx.event("sendkey.suppressed", reason=reason)
        return
    msgid = ctx.m.message_id
    outbox = ctx.postman.enqueue(ctx.session, Outgoing(
        kind=MailKind.ACK, to=ctx.envelope_from, subject=f"OpenPGP key of {ctx.config.service.contact}",
        template="sendkey.txt.j2", in_reply_to=msgid, references=(msgid,) if msgid else (),
        rate_key=ctx.envelope_from, attach_key=True,
    ))
    ctx.event("sendkey.queued", message_id=outbox.message_id, to=ctx.envelope_from)


def acknowledge(ctx: Processing) -> None:
    """The reporter hears within the SLA, with the tracking id; encrypted to their key when they sent one."""
    report = ctx.report
    assert report is not None
    reason = ack_blocked(ctx)
    if reason is not None:
        ctx.event("ack.suppressed", reason=reason)
        return
    in_reply_to, references = _in_reply(ctx)
    if ctx.encrypted_input:
        # Generic text only: whoever sent it may be replaying someone else's ciphertext.
        subject = f"[{report.tracking_id}] Your encrypted report was received"
        template, context = "ack_encrypted.txt.j2", {}
    else:
        subject = f"[{report.tracking_id}] Re: {report.subject}" if report.subject else f"[{report.tracking_id}] Your security report"
        template, context = "ack.txt.j2", {"missing": [FIELDS[m] for m in report.missing_fields]}
    sent = ctx.mail.to_reporter(report, Outgoing(
        kind=MailKind.ACK, to="", subject=subject, template=template, context=context, report=report,
        in_reply_to=in_reply_to, references=references, rate_key=ctx.envelope_from,
    ), what="ack")
    if sent is None:
        return
    ctx.record_outgoing(sent.outbox, "ack")
    report.state = ReportState.ACKNOWLEDGED.value
    report.acknowledged_at = ctx.now
    ctx.event("ack.queued", message_id=sent.outbox.message_id, to=report.reporter, encrypted=sent.encrypted)


def _report_thread(ctx: Processing) -> str | None:
    """Maintainers' notices of one report thread under the report's first message."""
    assert ctx.report is not None
    if ctx.report_message is not None and ctx.report_message.kind == "report":
        return ctx.report_message.message_id  # this message is the report
    query = (
        select(ReportMessage.message_id)
        .where(ReportMessage.report_id == ctx.report.id, ReportMessage.kind == "report")
        .order_by(ReportMessage.id)
        .limit(1)
    )
    with ctx.session.no_autoflush:  # the report's first message was committed with the report
        return ctx.session.scalar(query)


def notice_attachments(ctx: Processing) -> tuple[list[dict[str, object]], tuple[tuple[str, str, bytes], ...]]:
    """The message's attachments for the notice: listed all, attached (encrypted) up to the configured total."""
    budget = ctx.config.parsing.notice_attachment_bytes
    listed: list[dict[str, object]] = []
    attached: list[tuple[str, str, bytes]] = []
    stored = ctx.report_message.attachments if ctx.report_message is not None else []
    for item in stored:
        # ciphertext we could not decrypt is no use to a maintainer (and their client would try to decrypt it)
        fits = (item.data is not None and not item.truncated and len(item.data) <= budget
                and not looks_encrypted(item.data))
        if fits and item.data is not None:
            budget -= len(item.data)
            attached.append((item.filename or "attachment", item.content_type, item.data))
        listed.append({"filename": item.filename, "content_type": item.content_type, "size": item.size,
                       "attached": fits, "stored": not item.truncated})
    return listed, tuple(attached)


def notify_maintainers(ctx: Processing) -> None:
    """Report content reaches maintainers only encrypted to their pinned key (fail closed)."""
    report = ctx.report
    assert report is not None
    label = "New report" if ctx.kind is MessageKind.NEW else "Follow-up"
    thread = _report_thread(ctx)
    listed, attached = notice_attachments(ctx)
    notice = Outgoing(
        kind=MailKind.NOTICE, to="", subject=f"[{report.tracking_id}] {label}", template="notice.txt.j2",
        context={
            "report": report, "message": ctx.report_message, "label": label,
            "openpgp": openpgp_summary(ctx.protected), "attachments": listed,
        },
        report=report, in_reply_to=thread, references=(thread,) if thread else (), attachments=attached,
    )
    for outbox in ctx.mail.to_maintainers(report, notice):
        ctx.record_outgoing(outbox, "notice")
