"""The command route: signed commands in, transcripts and status mail out.

A message classified as commands (its text starts with a known command and it
claims a maintainer) is authenticated (``mailer.authn``); its commands are
applied atomically (``mailer.commands``) and their typed effects applied here;
the maintainer gets one transcript, encrypted to their pinned key. An
unauthenticated one is refused with the reason, never executed.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import select

from mailer import commands, tracking
from mailer.authn import Authenticated, Refused, authenticate
from mailer.commands import LeakAlert, MaintainersTold, MembersTold, ReporterReply, ReporterStatus
from mailer.config import Maintainer
from mailer.correspondence import reporter_key
from mailer.models import CommandSignature, EmbargoMember, Report, ReportMessage, ScheduledMail
from mailer.openpgp import CryptoError
from mailer.outgoing import MailKind, Outgoing
from mailer.prepare import claimed_maintainer, traits
from mailer.processing import Processing
from mailer.schedule import format_local
from mailer.scheduler import facts_from_report
from mailer.timeline import plan

log = logging.getLogger(__name__)


def _named_report(ctx: Processing, auth: Authenticated) -> tuple[Report | None, str | None]:
    """The report named inside the signed text; an error if the unsigned headers point at another."""
    prefix = ctx.config.service.tracking_prefix
    protected = ctx.protected.protected_headers.get("Subject", "") if ctx.protected else ""
    named = tracking.find(prefix, auth.text) or tracking.find(prefix, protected)
    located = ctx.report.tracking_id if ctx.report is not None else None
    if named is None:
        return None, None
    if located is not None and located != named:
        return None, f"the signed text names {named} but the message is about {located}"
    report = ctx.session.scalar(select(Report).where(Report.tracking_id == named))
    return report, None if report is not None else f"no report {named}"


class Services:
    """What commands may ask of the service (:class:`mailer.commands.base.CommandServices`) for one message."""

    def __init__(self, ctx: Processing) -> None:
        self.ctx = ctx

    def member_key_problem(self, address: str) -> str | None:
        return self.ctx.mail.member_key_problem(address)

    def import_keys(self, address: str) -> str:
        blobs = self.ctx.protected.keys_found if self.ctx.protected is not None else []
        if not blobs:
            return f"no key attached for {address}"
        imported: list[str] = []
        for blob in blobs[:5]:
            try:
                imported += self.ctx.gpg.import_public(blob)
            except CryptoError as exc:
                return f"the attached key was not imported: {exc}"
        found = self.ctx.mail.member_key(address)
        if found is None:
            return f"imported {', '.join(imported)}, but no usable key in it carries the address {address}"
        return f"key {found} imported for {address}"

    def reporter_key_problem(self, report: Report) -> str | None:
        blob = reporter_key(self.ctx.session, report)
        if blob is None:
            return "the reporter has not sent an OpenPGP key"
        try:
            self.ctx.gpg.encrypt_to_key_blob(b"probe", blob)
        except CryptoError as exc:
            return f"the reporter's key cannot be used: {exc}"
        return None

    def next_deadline(self, report: Report) -> str:
        ctx = self.ctx
        facts = facts_from_report(ctx.session, report, lambda address: self.member_key_problem(address) is None)
        upcoming = [item for item in plan(facts, ctx.config, ctx.now) if item.due_at >= ctx.now]
        if not upcoming:
            return ""
        first = upcoming[0]
        what = first.detail.get("topic", "") if first.kind == "reminder" else str(first.kind)
        return f"next: {format_local(first.due_at, ctx.config.schedule)} {what}"

    def schedule_lines(self, report: Report) -> list[str]:
        ctx, cfg = self.ctx, self.ctx.config.schedule
        facts = facts_from_report(ctx.session, report, lambda address: self.member_key_problem(address) is None)
        sent = ctx.session.scalars(select(ScheduledMail).where(ScheduledMail.report_id == report.id)
                                   .order_by(ScheduledMail.due_at))
        planned = plan(facts, ctx.config, ctx.now)
        # a reminder line says what it is about (e.g. which embargo member has no usable key)
        about = {str(i.detail.get("topic")): str(i.context.get("due", "")) for i in planned if i.kind == "reminder"}

        def what(kind: str, detail: dict[str, Any]) -> str:
            topic = str(detail.get("topic", "")) if kind == "reminder" else ""
            return f": {about.get(topic) or topic.split(':', 1)[0]}" if topic else ""

        lines = [f"{format_local(row.due_at, cfg)}  {row.kind:<15} {row.state}" + (f" ({row.reason})" if row.reason else "")
                 + what(row.kind, row.detail or {}) for row in sent]
        recorded = {row.key for row in ctx.session.scalars(select(ScheduledMail).where(ScheduledMail.report_id == report.id))}
        for item in planned:
            if item.key not in recorded:
                lines.append(f"{format_local(item.due_at, cfg)}  {item.kind:<15} {item.state}"
                             + (f" ({item.reason})" if item.reason else "") + what(str(item.kind), dict(item.detail)))
        return lines


def run_commands(ctx: Processing) -> None:
    auth = authenticate(ctx.protected, ctx.config, ctx.session, ctx.now)
    if isinstance(auth, Refused):
        ctx.session.info["commands"] = {"ok": False, "reason": auth.reason}  # for the message's log line
        _refuse(ctx, auth.reason)
        return
    invocations, free_text = commands.parse(auth.text)
    report, problem = _named_report(ctx, auth)
    ctx.report = report
    cctx = commands.CommandContext(
        ctx.session, ctx.config, auth.maintainer, auth.fingerprint, ctx.now, report, free_text, ctx.inbound.id,
        Services(ctx),
    )
    if problem is not None:
        outcomes = [commands.Outcome(i.line, False, problem) for i in invocations]
    else:
        outcomes = commands.apply_all(cctx, invocations)
    ctx.session.add(CommandSignature(digest=auth.digest, fingerprint=auth.fingerprint, inbound_id=ctx.inbound.id,
                                     applied_at=ctx.now))
    # for the message's log line (mailer.logs.summarise): names, signer and outcome, never arguments
    ctx.session.info["commands"] = {
        "names": [i.name for i in invocations], "signer": auth.fingerprint, "ok": all(o.ok for o in outcomes),
        "failed": [i.name for i, o in zip(invocations, outcomes, strict=False) if not o.ok] or None,
    }
    if all(o.ok for o in outcomes):
        _apply_effects(ctx, cctx)
        _tell_other_maintainers(ctx, auth.maintainer, outcomes)
    _transcript(ctx, auth.maintainer, outcomes, cctx.output)


def _reply_to_maintainer(ctx: Processing, maintainer: Maintainer, subject: str, template: str,
                         context: dict[str, Any]) -> None:
    msgid = ctx.m.message_id
    outbox = ctx.mail.to_maintainer(maintainer, Outgoing(
        kind=MailKind.NOTICE, to="", subject=subject, template=template, context=context,
        report=ctx.report,
        in_reply_to=msgid, references=(msgid,) if msgid else (),
    ), reply=True)
    ctx.record_outgoing(outbox, "transcript")


def _refuse(ctx: Processing, reason: str) -> None:
    """Commands that are not authenticated are never run; the maintainer named is told why."""
    ctx.event("command.refused", reason=reason, message_id=ctx.m.message_id)
    log.warning("command message %s refused: %s", ctx.inbound.id, reason)
    maintainer = claimed_maintainer(ctx)
    if maintainer is None or traits(ctx).no_reply:
        return
    # Sent to the configured address, not the (forgeable) sender: a forgery alerts the real maintainer.
    _reply_to_maintainer(ctx, maintainer, "Commands refused", "refused.txt.j2", {"reason": reason})


def _transcript(ctx: Processing, maintainer: Maintainer, outcomes: list[commands.Outcome], output: list[str]) -> None:
    ok = all(o.ok for o in outcomes)
    verdict = f"Commands {'applied' if ok else 'NOT applied'}"
    subject = f"[{ctx.report.tracking_id}] {verdict}" if ctx.report is not None else verdict
    members: list[str] = []
    if ctx.report is not None:
        query = select(EmbargoMember.address).where(EmbargoMember.report_id == ctx.report.id)
        members = list(ctx.session.scalars(query))
    _reply_to_maintainer(
        ctx, maintainer, subject, "transcript.txt.j2",
        {"outcomes": outcomes, "ok": ok, "report": ctx.report, "output": output, "embargo": members},
    )


def _tell_other_maintainers(ctx: Processing, actor: Maintainer, outcomes: list[commands.Outcome]) -> None:
    """Changes reach the other maintainers (or only the incident manager), encrypted like every notice."""
    changes = [o for o in outcomes if o.changes]
    if ctx.report is None or not changes:
        return
    for maintainer in ctx.mail.maintainers_for(ctx.report):
        if maintainer.address != actor.address:
            _reply_to_maintainer(
                ctx, maintainer, f"[{ctx.report.tracking_id}] Changed by {actor.name}", "changes.txt.j2",
                {"report": ctx.report, "outcomes": changes, "actor": actor},
            )


def _apply_effects(ctx: Processing, cctx: commands.CommandContext) -> None:
    report = ctx.report
    if report is None:
        return
    for effect in cctx.effects:
        match effect:
            case LeakAlert(who=who, what=what):
                leak = {"report": report, "who": who, "text": what, "by": cctx.actor.address}
                for maintainer in ctx.config.maintainers:
                    _reply_to_maintainer(ctx, maintainer, f"[{report.tracking_id}] ALERT: leak recorded", "leak.txt.j2",
                                         leak)
                _to_members(ctx, cctx, report, MembersTold(f"[{report.tracking_id}] Embargo: leak recorded",
                                                           "leak_member.txt.j2", leak))
            case MembersTold():
                _to_members(ctx, cctx, report, effect)
            case MaintainersTold(subject=subject, template=template, context=context):
                for maintainer in ctx.mail.maintainers_for(report):
                    _reply_to_maintainer(ctx, maintainer, subject, template, context)
            case ReporterReply(text=text, unencrypted=unencrypted):
                _to_reporter(ctx, cctx, report, "reply", subject="Re: your security report", template="reply.txt.j2",
                             context={"text": text},
                             must_encrypt=bool(report.flags.get("encrypted")) and not unencrypted)
            case ReporterStatus(change=change, reason=reason, disclose_at=disclose_at):
                status: dict[str, Any] = {"change": change}
                if reason is not None:
                    status["reason"] = reason
                if disclose_at is not None:
                    status["disclose_at"] = disclose_at
                _to_reporter(ctx, cctx, report, "status", subject=f"Status: {change}", template="status.txt.j2", context=status)


def _to_members(ctx: Processing, cctx: commands.CommandContext, report: Report, told: MembersTold) -> None:
    """Each embargo member, encrypted to their key; the transcript names those who got nothing."""
    members = ctx.session.scalars(select(EmbargoMember.address).where(EmbargoMember.report_id == report.id))
    for address in members:
        outbox = ctx.mail.to_member(address, Outgoing(
            kind=MailKind.NOTICE, to="", subject=told.subject, template=told.template, context=told.context,
            report=report,
        ))
        if outbox is None:
            cctx.output.append(f"Note: embargo member {address} was NOT told (no usable OpenPGP key).")
        ctx.record_outgoing(outbox, "embargo")


def _reporter_thread(ctx: Processing, report: Report) -> tuple[str | None, tuple[str, ...]]:
    """Mail to the reporter answers their last message."""
    query = (select(ReportMessage.message_id)
             .where(ReportMessage.report_id == report.id, ReportMessage.direction == "in",
                    ReportMessage.sender == report.reporter, ReportMessage.message_id.is_not(None))
             .order_by(ReportMessage.id.desc()).limit(10))
    ids = [m for m in ctx.session.scalars(query) if m]
    return (ids[0] if ids else None), tuple(reversed(ids))


def _to_reporter(ctx: Processing, cctx: commands.CommandContext, report: Report, kind: str, *, subject: str,
                 template: str, context: dict[str, Any], must_encrypt: bool = False) -> None:
    """Status changes and #reply text go to the reporter, encrypted to their key when we have one."""
    in_reply_to, references = _reporter_thread(ctx, report)
    sent = ctx.mail.to_reporter(report, Outgoing(
        kind=MailKind.NOTICE, to="", subject=f"[{report.tracking_id}] {subject}", template=template,
        context=context, report=report, in_reply_to=in_reply_to, references=references,
    ), what=kind, must_encrypt=must_encrypt)
    if sent is None:
        if must_encrypt:
            cctx.output.append(f"Note: the {kind} mail was NOT sent: it could not be encrypted to the reporter.")
        return
    ctx.record_outgoing(sent.outbox, kind)
    if not sent.encrypted:
        cctx.output.append(f"Note: the {kind} mail to the reporter could not be encrypted "
                           "(they have not sent an OpenPGP key) and went out signed only.")
