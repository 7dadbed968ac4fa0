"""Filing steps: a new report, a message threaded onto a report, an ignored message, the reporter's keys."""

from __future__ import annotations

from sqlalchemy import select

from mailer import tracking
from mailer.classify import MessageKind
from mailer.models import Attachment, Report, ReportKey, ReportMessage, ReportState
from mailer.parsing import merge_fields
from mailer.prepare import policy_fields, traits
from mailer.processing import Processing, openpgp_summary


def _add_report_message(ctx: Processing, kind: str) -> ReportMessage:
    m = ctx.m
    message = ReportMessage(
        report=ctx.report,
        direction="in",
        kind=kind,
        message_id=m.message_id,
        sender=ctx.envelope_from or m.from_address,
        inbound_id=ctx.inbound.id,
        body_text=ctx.text,
        meta={
            "from_header": m.from_address,
            "subject": m.subject,
            "protected_subject": ctx.protected_subject,
            "unparseable": m.error,
            "openpgp": openpgp_summary(ctx.protected),
        },
        created_at=ctx.now,
    )
    cap = ctx.config.parsing.max_attachment_bytes
    # the whole collection at once: known to be complete, so reading it later needs no query
    message.attachments = [
        Attachment(filename=item.filename, content_type=item.content_type, size=len(item.data),
                   data=item.data if len(item.data) <= cap else None, truncated=len(item.data) > cap)
        for item in ctx.attachments
    ]
    ctx.session.add(message)
    ctx.report_message = message
    return message


def _record_openpgp_problem(ctx: Processing) -> None:
    if ctx.protected is not None and ctx.protected.errors:
        ctx.event("openpgp.problem", reason=ctx.protected.reason, errors=list(ctx.protected.errors))


def _finish(ctx: Processing) -> None:
    _record_openpgp_problem(ctx)
    ctx.inbound.report = ctx.report


def file_report(ctx: Processing) -> None:
    """A new report with a tracking id; the policy's fields are read from its text."""
    m, pgp = ctx.m, ctx.protected
    fields, missing = policy_fields(ctx)  # read before the write transaction (prepare.inspect)
    flags: dict[str, object] = {"unparseable": m.error} if m.error else {}
    if ctx.encrypted_input:
        flags["encrypted"] = True
    automated = traits(ctx).no_reply
    if automated is not None:
        flags["automated"] = automated
    if ctx.envelope_unknown:
        flags["envelope_sender"] = "unknown (no Return-Path); the From address stands in"
    if pgp is not None and pgp.partly_encrypted:
        flags["partly_encrypted"] = True
    if pgp is not None and pgp.errors:
        flags["openpgp_error"] = pgp.reason
    if pgp is not None and pgp.forwarded_from:
        flags["forwarded"] = {"by": ctx.envelope_from or m.from_address, "from": list(pgp.forwarded_from)}
    ctx.report = report = Report(
        tracking_id=tracking.allocate(ctx.session, ctx.config.service.tracking_prefix, ctx.now),
        state=ReportState.NEW.value,
        reporter=ctx.envelope_from or m.from_address,
        subject=ctx.protected_subject or m.subject,
        fields=fields,
        missing_fields=missing,
        flags=flags,
        created_at=ctx.now,
        updated_at=ctx.now,
    )
    ctx.session.add(report)
    _add_report_message(ctx, "report")
    ctx.event("report.filed", tracking_id=report.tracking_id, missing=report.missing_fields)
    if m.error:
        ctx.event("message.unparseable", reason=m.error)
    _finish(ctx)


def thread(ctx: Processing) -> None:
    """A follow-up, bounce or auto-reply joins the report it belongs to (found by classification)."""
    assert ctx.report is not None and ctx.kind is not None, "classification found no report"
    _add_report_message(ctx, ctx.kind.value)
    ctx.report.updated_at = ctx.now
    ctx.event(f"message.{ctx.kind.value}", message_id=ctx.m.message_id)
    if ctx.kind is MessageKind.FOLLOWUP:
        _reevaluate_fields(ctx, ctx.report)
    _finish(ctx)


def _reevaluate_fields(ctx: Processing, report: Report) -> None:
    """The policy's fields over the whole conversation: a follow-up can supply what the report lacked."""
    ctx.session.flush()
    query = (select(ReportMessage).where(ReportMessage.report_id == report.id, ReportMessage.direction == "in",
                                         ReportMessage.kind.in_(("report", "followup")))
             .order_by(ReportMessage.id))
    texts = [m.body_text for m in ctx.session.scalars(query) if not (m.meta or {}).get("unparseable")]
    fields, missing = merge_fields(texts)
    if fields != report.fields or missing != report.missing_fields:
        supplied = [name for name in report.missing_fields if name not in missing]
        report.fields, report.missing_fields = fields, missing
        ctx.event("report.fields", supplied=supplied, missing=missing)


def ignore(ctx: Processing) -> None:
    """A delivery-status notification that matches no report: kept with the reason, nothing else happens."""
    ctx.event("message.ignored", reason="delivery-status notification matching no report", message_id=ctx.m.message_id)


def bind_keys(ctx: Processing) -> None:
    """Keys in the reporter's mail are kept for answering that reporter on that report, nothing else."""
    pgp, report = ctx.protected, ctx.report
    if pgp is None or not pgp.keys_found or report is None:
        return
    if ctx.kind is MessageKind.FOLLOWUP and ctx.envelope_from != report.reporter:
        return
    for blob in pgp.keys_found[:3]:
        ctx.session.add(ReportKey(report=report, key_blob=blob, source="message", inbound_id=ctx.inbound.id,
                                  created_at=ctx.now))
    ctx.event("openpgp.reporter_key", count=min(len(pgp.keys_found), 3))
