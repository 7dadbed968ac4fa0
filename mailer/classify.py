"""Deciding what a parsed message is, and whether it may be answered (RFC 3834)."""

from __future__ import annotations

import enum
import re

from mailer.parsing import Parsed

_DAEMON = re.compile(r"^(mailer-daemon|postmaster|mail-daemon|mailerdaemon|bounces?|noreply|no-reply|do-not-reply)([+\-].*)?@", re.I)
_AUTO_REPLY_HEADERS = ("X-Autoreply", "X-Autorespond", "X-Auto-Response-Suppress")


class MessageKind(enum.StrEnum):
    """What a received message is; each kind names its route (``mailer.pipeline.ROUTES``)."""

    NEW = "new"
    FOLLOWUP = "followup"
    BOUNCE = "bounce"
    AUTOREPLY = "autoreply"
    IGNORED = "ignored"  # a bounce or auto-reply matching no report
    SENDKEY = "sendkey"  # a request for the service's public key
    COMMAND = "command"  # looks like maintainer commands: authenticated or refused, never filed


def is_bounce(parsed: Parsed, envelope_from: str) -> bool:
    ctype = parsed.header("Content-Type").lower()
    report = "multipart/report" in ctype and "delivery-status" in ctype
    return not envelope_from or report or bool(_DAEMON.match(parsed.from_address or ""))


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
