"""Deciding what a parsed message is, and whether it may be answered (RFC 3834)."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from mailer.parsing import Parsed

_DAEMON = re.compile(r"^(mailer-daemon|postmaster|mail-daemon|mailerdaemon|bounces?|noreply|no-reply|do-not-reply)([+\-].*)?@", re.I)
_AUTO_REPLY_HEADERS = ("X-Autoreply", "X-Autorespond", "X-Auto-Response-Suppress")


@dataclass(frozen=True)
class Traits:
    """What the message itself shows, no database needed: read once, before the write transaction."""

    bounce: bool  # a delivery-status notification (:func:`is_bounce`)
    auto_reply: bool  # :func:`is_auto_reply`
    commands: bool  # its text looks like maintainer commands (they are authenticated on their route)
    no_reply: str | None  # why it must not be answered automatically (:func:`no_reply_reason`), or None


class MessageKind(enum.StrEnum):
    """What a received message is; each kind names its route (``mailer.pipeline.ROUTES``)."""

    NEW = "new"
    FOLLOWUP = "followup"
    BOUNCE = "bounce"
    AUTOREPLY = "autoreply"
    IGNORED = "ignored"  # a delivery-status notification matching no report (kept, with the reason)
    SENDKEY = "sendkey"  # a request for the service's public key
    COMMAND = "command"  # looks like maintainer commands: authenticated or refused, never filed


# Subjects of bounces that predate RFC 3464 (qmail, old Exim and Sendmail), trusted only from the null sender.
_BOUNCE_SUBJECT = re.compile(
    r"^\s*(undeliver(ed|able)|delivery (status notification|failure|has failed)|failure notice|returned mail|"
    r"mail delivery (failed|failure|system)|non[- ]?delivery)", re.I)
_DSN_PARTS = ("message/delivery-status", "message/global-delivery-status")


def is_dsn_report(parsed: Parsed) -> bool:
    """A delivery-status notification by its content: ``multipart/report; report-type=delivery-status`` (RFC 3464)."""
    ctype = parsed.header("Content-Type").lower()
    if "multipart/report" in ctype and "delivery-status" in ctype:
        return True
    return any(content_type in _DSN_PARTS for content_type in parsed.content_types)


def is_bounce(parsed: Parsed, envelope_from: str) -> bool:
    """Only genuine delivery-status notifications: a DSN report, or a bounce-shaped message from the null sender.

    A ``noreply@`` sender or the null sender alone does not make a bounce: such
    mail is filed (as automated, never answered) so that nothing is dropped.
    """
    if is_dsn_report(parsed):
        return True
    if envelope_from:
        return False
    daemon = bool(_DAEMON.match(parsed.from_address or ""))
    return bool(_BOUNCE_SUBJECT.match(parsed.subject)) or (daemon and _quotes_a_message(parsed))


def _quotes_a_message(parsed: Parsed) -> bool:
    return any(content_type in ("message/rfc822", "text/rfc822-headers") for content_type in parsed.content_types)


def is_auto_reply(parsed: Parsed) -> bool:
    auto = parsed.header("Auto-Submitted").strip().lower()
    return auto.startswith("auto-replied") or any(parsed.header(h) for h in _AUTO_REPLY_HEADERS)


def no_reply_reason(parsed: Parsed, envelope_from: str, contact: str) -> str | None:
    """Why this message must not get an automatic answer (RFC 3834 §2), or None."""
    auto = parsed.header("Auto-Submitted").strip().lower()
    precedence = parsed.header("Precedence").strip().lower()
    if not envelope_from:
        return "null envelope sender"
    if auto and not auto.startswith("no"):
        return f"Auto-Submitted: {auto[:40]}"
    if precedence in ("bulk", "junk", "list"):
        return f"Precedence: {precedence}"
    if any(name.lower().startswith("list-") for name in parsed.headers):
        return "mailing-list message (List-* header)"
    if _DAEMON.match(envelope_from) or _DAEMON.match(parsed.from_address or ""):
        return "sender is a mailer daemon"
    if any(contact == value.strip().lower() for value in parsed.headers.get_all("X-Loop", [])):
        return "X-Loop names this service"
    if is_own_address(envelope_from, contact):
        return "sender is this service"
    return None


def is_own_address(address: str, contact: str) -> bool:
    """The contact itself or one of its sub-addresses (``security-sendkey@``, ``security+x@``)."""
    local, _, domain = address.lower().rpartition("@")
    own_local, _, own_domain = contact.lower().rpartition("@")
    return domain == own_domain and (local == own_local or local.startswith((own_local + "-", own_local + "+")))
