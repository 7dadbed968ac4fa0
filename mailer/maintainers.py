"""The maintainers' side of the pipeline: signed commands in, transcripts and status mail out.

``run_commands`` is a pipeline step. A message whose text starts with a known
command and that is signed by a maintainer's key, or comes from a maintainer's
address, is a command message: it is authenticated (``mailer.authn``), its
commands are applied atomically (``mailer.commands``), and the maintainer gets
one transcript, encrypted to their pinned key. An unauthenticated one is
refused with the reason, never executed. Other mail (a reporter writing
``#accept``) continues down the pipeline as a normal message.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

from sqlalchemy import select

from mailer import commands, tracking
from mailer.authn import Authenticated, Refused, authenticate, maintainer_by_address, maintainer_by_fingerprint
from mailer.classify import Kind, no_reply_reason
from mailer.config import Maintainer
from mailer.crypto import CryptoError
from mailer.models import CommandSignature, EmbargoMember, Report
from mailer.outgoing import Kind as MailKind
from mailer.outgoing import Outgoing
from mailer.workflow import (
    Processing,
    maintainer_key_problem,
    notice_recipients,
    record_outgoing,
    reporter_key,
    valid_recipient,
)

log = logging.getLogger(__name__)


def _signed_maintainer(ctx: Processing) -> Maintainer | None:
    if ctx.pgp is None:
        return None
    for part in ctx.pgp.text_parts:
        maintainer = maintainer_by_fingerprint(ctx.config, part.signer_fpr)
        if maintainer is not None:
            return maintainer
    return None


def classify_commands(ctx: Processing) -> None:
    """Mark command messages (before the report classification treats them as follow-ups)."""
    if ctx.kind in (Kind.SENDKEY, Kind.BOUNCE) or not commands.looks_like_commands(ctx.p.body_text):
        return
    if _signed_maintainer(ctx) or maintainer_by_address(ctx.config, ctx.envelope_from, ctx.p.from_address):
        ctx.kind = Kind.COMMAND


def _named_report(ctx: Processing, auth: Authenticated) -> tuple[Report | None, str | None]:
    """The report named inside the signed text; an error if the unsigned headers point at another."""
    prefix = ctx.config.service.tracking_prefix
    protected = ctx.pgp.protected_headers.get("Subject", "") if ctx.pgp else ""
    named = tracking.find(prefix, auth.text) or tracking.find(prefix, protected)
    located = ctx.report.tracking_id if ctx.report is not None else None
    if named is None:
        return None, None
    if located is not None and located != named:
        return None, f"the signed text names {named} but the message is about {located}"
    report = ctx.session.scalar(select(Report).where(Report.tracking_id == named))
    return report, None if report is not None else f"no report {named}"


def run_commands(ctx: Processing) -> None:
    if ctx.kind is not Kind.COMMAND:
        return
    ctx.stop = True
    ctx.inbound.classification = Kind.COMMAND.value
    auth = authenticate(ctx.pgp, ctx.config, ctx.session, ctx.now)
    if isinstance(auth, Refused):
        _refuse(ctx, auth.reason)
        return
    invocations, free_text = commands.parse(auth.text)
    report, problem = _named_report(ctx, auth)
    ctx.report = report
    cctx = commands.CommandContext(
        ctx.session, ctx.config, auth.maintainer, auth.fingerprint, ctx.now, report, free_text, ctx.inbound.id
    )
    if problem is not None:
        outcomes = [commands.Outcome(i.line, False, problem) for i in invocations]
    else:
        outcomes = commands.apply_all(cctx, invocations)
    ctx.session.add(CommandSignature(digest=auth.digest, fingerprint=auth.fingerprint, inbound_id=ctx.inbound.id, applied_at=ctx.now))
    if all(o.ok for o in outcomes):
        _send_notifications(ctx, cctx)
        _tell_other_maintainers(ctx, auth.maintainer, outcomes)
    _transcript(ctx, auth.maintainer, outcomes, cctx.output)


def _reply_to_maintainer(ctx: Processing, maintainer: Maintainer, subject: str, template: str, context: dict[str, Any]) -> None:
    problem = maintainer_key_problem(ctx.gpg, maintainer.fingerprint)
    detailed = problem is None
    outbox = ctx.postman.enqueue(
        ctx.session,
        Outgoing(
            kind=MailKind.NOTICE, to=maintainer.address, subject=subject, template=template,
            context={**context, "detailed": detailed, "key_problem": problem},
            report_id=ctx.report.id if ctx.report is not None else None,
            in_reply_to=ctx.p.message_id, references=(ctx.p.message_id,) if ctx.p.message_id else (),
            encrypt_to=(maintainer.fingerprint,) if detailed else (),
        ),
    )
    if ctx.report is not None:
        record_outgoing(ctx, outbox, "transcript")


def _refuse(ctx: Processing, reason: str) -> None:
    """Commands that are not authenticated are never run; the maintainer named is told why."""
    ctx.event("command.refused", reason=reason, message_id=ctx.p.message_id)
    log.warning("command message %s refused: %s", ctx.inbound.id, reason)
    maintainer = _signed_maintainer(ctx) or maintainer_by_address(ctx.config, ctx.envelope_from, ctx.p.from_address)
    if maintainer is None or no_reply_reason(ctx.p, ctx.envelope_from, ctx.config.service.contact):
        return
    # Sent to the configured address, not the (forgeable) sender: a forgery alerts the real maintainer.
    _reply_to_maintainer(ctx, maintainer, "Commands refused", "refused.txt.j2", {"reason": reason})


def _transcript(ctx: Processing, maintainer: Maintainer, outcomes: list[commands.Outcome], output: list[str]) -> None:
    ok = all(o.ok for o in outcomes)
    tid = ctx.report.tracking_id if ctx.report is not None else None
    subject = f"[{tid}] Commands {'applied' if ok else 'NOT applied'}" if tid else f"Commands {'applied' if ok else 'NOT applied'}"
    members = []
    if ctx.report is not None:
        members = list(ctx.session.scalars(select(EmbargoMember.address).where(EmbargoMember.report_id == ctx.report.id)))
    _reply_to_maintainer(
        ctx, maintainer, subject, "transcript.txt.j2",
        {"outcomes": outcomes, "ok": ok, "report": ctx.report, "output": output, "embargo": members},
    )


_SILENT = frozenset({"status", "list", "help", "report"})


def _tell_other_maintainers(ctx: Processing, actor: Maintainer, outcomes: list[commands.Outcome]) -> None:
    """Changes reach the other maintainers (or only the incident manager), encrypted like every notice."""
    changes = [o for o in outcomes if o.line[1:].split(" ", 1)[0] not in _SILENT]
    if ctx.report is None or not changes:
        return
    for maintainer in notice_recipients(ctx.config, ctx.report):
        if maintainer.address == actor.address:
            continue
        _reply_to_maintainer(
            ctx, maintainer, f"[{ctx.report.tracking_id}] Changed by {actor.name}", "changes.txt.j2",
            {"report": ctx.report, "outcomes": changes, "actor": actor},
        )


def _send_notifications(ctx: Processing, cctx: commands.CommandContext) -> None:
    report = ctx.report
    for kind, data in cctx.notify:
        if report is None:
            continue
        if kind == "leak":
            for maintainer in ctx.config.maintainers:
                _reply_to_maintainer(ctx, maintainer, f"[{report.tracking_id}] ALERT: leak recorded", "leak.txt.j2",
                                     {"report": report, "text": data["text"], "by": cctx.actor.address})
            continue
        if not _to_reporter(ctx, report, kind, data):
            cctx.output.append(f"Note: the {kind} mail to the reporter could not be encrypted "
                               "(they have not sent an OpenPGP key) and went out signed only.")


def _to_reporter(ctx: Processing, report: Report, kind: str, data: dict[str, Any]) -> bool:
    """Status changes and #reply text go to the reporter, encrypted to their key when we have one.

    Returns whether the mail was encrypted (or not sent at all).
    """
    if valid_recipient(report.reporter) is None:
        ctx.event(f"{kind}.not_sent", reason=f"reporter address {report.reporter!r} is not deliverable")
        return True
    key_blob = reporter_key(ctx.session, report)
    private = key_blob is not None or not report.flags.get("encrypted")
    template = "reply.txt.j2" if kind == "reply" else "status.txt.j2"
    subject = f"[{report.tracking_id}] " + ("Re: your security report" if kind == "reply" else f"Status: {data.get('change')}")
    outgoing = Outgoing(
        kind=MailKind.NOTICE, to=report.reporter, subject=subject, template=template,
        context={"report": report, "private": private, **data},
        report_id=report.id, key_blob=key_blob, attach_key=key_blob is None,
    )
    try:
        outbox = ctx.postman.enqueue(ctx.session, outgoing)
    except CryptoError as exc:  # the reporter's key is expired or cannot encrypt
        ctx.event(f"{kind}.reporter_key_unusable", reason=str(exc))
        private = not report.flags.get("encrypted")
        outgoing = replace(outgoing, key_blob=None, attach_key=True, context={**outgoing.context, "private": private})
        outbox = ctx.postman.enqueue(ctx.session, outgoing)
    record_outgoing(ctx, outbox, kind)
    return outgoing.key_blob is not None
