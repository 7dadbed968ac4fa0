"""The steps every message takes before its route is chosen: parse → unwrap_openpgp → inspect → classify.

``classify`` decides once, up front, what the message is (:class:`MessageKind`);
the kind names the route it then follows (``mailer.pipeline.ROUTES``). No
later step re-checks the kind.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from sqlalchemy import select

from mailer import classify as rules
from mailer import commands, tracking
from mailer.authn import maintainer_by_address, maintainer_by_fingerprint
from mailer.classify import MessageKind, Traits
from mailer.config import Maintainer
from mailer.models import Report, ReportMessage
from mailer.parsing import FIELDS, UNKNOWN_ENVELOPE, envelope_address, extract_fields, parse_message
from mailer.pgpmime import unwrap
from mailer.pgpshapes import looks_encrypted
from mailer.processing import Processing, embedded_msgids

# One scan of the raw bytes: is there OpenPGP to look at, and did the sender write encrypted?
_OPENPGP = re.compile(rb"-----BEGIN PGP (?:MESSAGE)?|application/pgp-|multipart/(?:encrypted|signed)|^autocrypt:", re.I | re.M)
_ENCRYPTED_MARKERS = (b"-----begin pgp message", b"multipart/encrypted")


def parse(ctx: Processing) -> None:
    ctx.message = parse_message(ctx.raw, ctx.config.parsing)
    if ctx.inbound.mail_from == UNKNOWN_ENVELOPE:
        # no Return-Path (an IMAP append): the sender is unknown, not null; the From address stands in
        ctx.envelope_unknown = True
        ctx.envelope_from = ctx.message.from_address
    else:
        ctx.envelope_from = envelope_address(ctx.inbound.mail_from)


def unwrap_openpgp(ctx: Processing) -> None:
    """Decrypt and verify over the raw bytes as received, into the separate ``protected`` view."""
    raw = ctx.raw
    markers = {m.lower() for m in _OPENPGP.findall(raw)}
    # OpenPGP the raw bytes do not show: in a base64 or quoted-printable part, an attached .asc or .gpg, HTML
    hidden = "-----BEGIN PGP " in ctx.m.body_text or any(
        looks_encrypted(a.data) or b"-----BEGIN PGP MESSAGE-----" in a.data[:1_000_000] for a in ctx.m.attachments)
    if not markers and not hidden:
        return
    ctx.protected = pgp = unwrap(raw, ctx.gpg, limits=ctx.config.parsing)
    ctx.encrypted_input = pgp.encrypted or pgp.encrypted_seen or any(m in markers for m in _ENCRYPTED_MARKERS)


def inspect(ctx: Processing) -> None:
    """What the message says, read before the write transaction: the policy's fields (filing a report
    uses them) and the traits classification and the answers go by."""
    policy_fields(ctx)
    traits(ctx)


def policy_fields(ctx: Processing) -> tuple[dict[str, str], list[str]]:
    """The policy's fields found in the message's text and the names of those missing, worked out once."""
    if ctx.fields is None:
        ctx.fields = extract_fields(ctx.text) if ctx.m.error is None else ({}, list(FIELDS))
    return ctx.fields


def traits(ctx: Processing) -> Traits:
    """Bounce, auto-reply, commands, why not to answer: from the message alone, worked out once."""
    if ctx.traits is None:
        m = ctx.m
        ctx.traits = Traits(bounce=rules.is_bounce(m, ctx.envelope_from), auto_reply=rules.is_auto_reply(m),
                            commands=commands.looks_like_commands(ctx.text),
                            no_reply=rules.no_reply_reason(m, ctx.envelope_from, ctx.config.service.contact))
    return ctx.traits


def _report_by_references(ctx: Processing, msgids: Sequence[str]) -> Report | None:
    if not msgids:
        return None
    found = ctx.session.scalar(
        select(ReportMessage.report_id).where(ReportMessage.message_id.in_(list(msgids[:100]))).limit(1)
    )
    return ctx.session.get(Report, found) if found is not None else None


def _report_by_tracking_id(ctx: Processing) -> Report | None:
    prefix = ctx.config.service.tracking_prefix
    tracking_id = tracking.find(prefix, ctx.m.subject) or tracking.find(prefix, ctx.protected_subject)
    if tracking_id is None:
        return None
    return ctx.session.scalar(select(Report).where(Report.tracking_id == tracking_id))


def signed_maintainer(ctx: Processing) -> Maintainer | None:
    """The maintainer whose pinned key made a valid signature in the message, if any."""
    if ctx.protected is None:
        return None
    for part in ctx.protected.text_parts:
        maintainer = maintainer_by_fingerprint(ctx.config, part.signer_fpr)
        if maintainer is not None:
            return maintainer
    return None


def claimed_maintainer(ctx: Processing) -> Maintainer | None:
    """The maintainer the message claims to come from: by signature, else by (forgeable) address."""
    return signed_maintainer(ctx) or maintainer_by_address(ctx.config, ctx.envelope_from, ctx.m.from_address)


def _kind(ctx: Processing) -> MessageKind:
    m = ctx.m
    rcpts = {str(r).strip("<>").lower() for r in ctx.inbound.rcpt_tos}
    if ctx.config.sendkey_address in rcpts and ctx.config.service.contact not in rcpts:
        return MessageKind.SENDKEY
    shows = traits(ctx)
    if shows.bounce:
        ctx.report = _report_by_references(ctx, [*m.references, *embedded_msgids(ctx.raw)])
        ctx.report = ctx.report or _report_by_tracking_id(ctx)
        return MessageKind.BOUNCE if ctx.report is not None else MessageKind.IGNORED
    ctx.report = _report_by_references(ctx, m.references) or _report_by_tracking_id(ctx)
    # Commands look like commands and claim a maintainer; they are authenticated on their route.
    if shows.commands and claimed_maintainer(ctx) is not None:
        return MessageKind.COMMAND
    if shows.auto_reply and ctx.report is not None:
        return MessageKind.AUTOREPLY
    # anything else is filed: automated mail (noreply@, the null sender, unmatched auto-replies) unanswered
    return MessageKind.FOLLOWUP if ctx.report is not None else MessageKind.NEW


def classify(ctx: Processing) -> None:
    ctx.kind = _kind(ctx)
    ctx.inbound.classification = ctx.kind.value
