"""Turning received bytes into something the workflow can use, safely.

Everything here treats its input as hostile: line endings are normalised before
parsing, MIME depth and part count are bounded, and any text that may later
reach an outgoing header goes through :func:`header_safe`.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from email.message import EmailMessage, Message
from email.parser import BytesParser
from email.utils import getaddresses, parseaddr

from mailer.config import ParsingConfig
from mailer.headers import DEFAULT as RECEIVED
from mailer.text import header_safe

# The fields the security policy asks reporters for.
FIELDS = {
    "description": "description of the problem",
    "steps": "precise and detailed steps to reproduce",
    "versions": "the affected version(s)",
    "mitigations": "any possible mitigations",
}
_FIELD_NAMES = {
    "description": ("description", "summary", "problem", "details", "issue"),
    "steps": ("steps", "steps to reproduce", "reproduction", "reproduce", "how to reproduce", "poc", "proof of concept"),
    "versions": ("versions", "version", "affected versions", "affected version", "affected", "affected version(s)"),
    "mitigations": ("mitigations", "mitigation", "workaround", "workarounds", "possible mitigations", "fix"),
}
_HEADING = re.compile(r"^\s*(?:#{1,6}\s*|\*\*)?(?P<name>[A-Za-z][A-Za-z ()/]{1,40}?)(?:\*\*)?\s*:?\s*(?:\*\*)?\s*$")
_KEYLINE = re.compile(r"^\s*(?P<name>[A-Za-z][A-Za-z ()/]{1,40}?)\s*:\s+(?P<value>\S.*)$")
#: a character no line matching _HEADING has: such lines skip it (it backtracks through every prose line, 4 µs each)
_NOT_HEADING = re.compile(r"[^\sA-Za-z#*:()/]")


#: ``mail_from`` of a message whose envelope sender is unknown (an IMAP message without ``Return-Path``):
#: not the null sender; the From address stands in for it.
UNKNOWN_ENVELOPE = "(unknown)"


class Unparseable(Exception):
    """The message is beyond our parsing bounds or malformed; the raw bytes are still kept."""


_BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n")


def normalise_line_endings(raw: bytes) -> bytes:
    """Return the bytes with LF line endings, the form the parser reads.

    A message whose first line ends in CRLF (the wire form: SMTP, LMTP, IMAP)
    has CRLF as its only line ending: a bare CR or LF inside its header block
    is not a line break and becomes a space, so it cannot smuggle a header
    (``Subject: x<LF>X-Loop: ...`` stays one Subject, as a strict MTA reads
    it). In the body, bare CR and LF count as line breaks. A message written
    with bare LFs from its first line on (a local file, a sloppy client) uses LF.
    """
    first = raw.find(b"\n")
    if first <= 0 or raw[first - 1 : first] != b"\r":
        return raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    head, sep, body = raw.partition(b"\r\n\r\n")
    head = _BARE.sub(b" ", head).replace(b"\r\n", b"\n")
    body = body.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    return head + (b"\n\n" if sep else b"") + body


@dataclass(frozen=True)
class AttachmentData:
    filename: str
    content_type: str
    data: bytes


@dataclass(frozen=True)
class Parsed:
    """The received message parsed once (immutable); ``error`` is set when the body could not be parsed.

    OpenPGP unwrapping never changes it: its result is a separate view
    (``mailer.processing.Processing.protected``).
    """

    headers: Message
    message: EmailMessage | None
    subject: str
    from_address: str
    message_id: str | None
    references: tuple[str, ...]
    body_text: str = ""
    attachments: tuple[AttachmentData, ...] = ()
    error: str | None = None

    def header(self, name: str) -> str:
        return str(self.headers.get(name, "") or "")

    @functools.cached_property
    def content_types(self) -> tuple[str, ...]:
        """The content type of every part, the message itself first (none when the body did not parse)."""
        return () if self.message is None else tuple(part.get_content_type() for part in self.message.walk())


def _msgids(value: str) -> list[str]:
    return re.findall(r"<[^<>\s]+>", value or "")


def _count_structure(raw: bytes, limits: ParsingConfig) -> None:
    """Refuse, before parsing, what would exhaust the parser (boundary lines are an upper bound on parts)."""
    parts = raw.count(b"\n--")
    if parts > 2 * limits.max_parts + 2:
        raise Unparseable(f"too many MIME parts (more than {limits.max_parts})")
    if raw.lower().count(b"multipart/") > limits.max_parts:
        raise Unparseable(f"too many multipart containers (more than {limits.max_parts})")


def _depth(message: Message, limits: ParsingConfig) -> None:
    stack = [(message, 1)]
    count = 0
    while stack:
        part, depth = stack.pop()
        count += 1
        if depth > limits.max_depth:
            raise Unparseable(f"MIME nesting deeper than {limits.max_depth}")
        if count > limits.max_parts:
            raise Unparseable(f"more than {limits.max_parts} MIME parts")
        payload = part.get_payload() if part.is_multipart() else None
        if isinstance(payload, list):
            stack.extend((child, depth + 1) for child in payload if isinstance(child, Message))


def _text_of(part: Message) -> str:
    try:
        content = part.get_content()  # type: ignore[attr-defined]
    except (LookupError, ValueError, AssertionError):
        payload = part.get_payload(decode=True) or b""
        content = payload.decode("utf-8", errors="replace") if isinstance(payload, bytes) else str(payload)
    return content if isinstance(content, str) else content.decode("utf-8", errors="replace")


def _walk(message: EmailMessage, limits: ParsingConfig) -> tuple[str, list[AttachmentData]]:
    texts: list[str] = []
    attachments: list[AttachmentData] = []
    for part in message.walk():
        if part.is_multipart():
            continue
        ctype = part.get_content_type()
        disposition = part.get_content_disposition()
        if ctype == "text/plain" and disposition != "attachment":
            texts.append(_text_of(part))
        elif ctype == "text/html" and disposition != "attachment" and not texts:
            texts.append(re.sub(r"<[^>]+>", " ", _text_of(part)))
        else:
            data = part.get_payload(decode=True)
            if not isinstance(data, bytes):
                data = str(part.get_payload()).encode("utf-8", errors="replace")
            filename = header_safe(part.get_filename() or "", 255)
            attachments.append(AttachmentData(filename, header_safe(ctype, 255), data))
    return "\n\n".join(t.strip("\n") for t in texts), attachments


def parse_message(raw: bytes, limits: ParsingConfig) -> Parsed:
    """Parse received bytes; headers always, the body within bounds (else ``error`` says why)."""
    normalised = normalise_line_endings(raw)
    message: EmailMessage | None = None
    body_text, error = "", None
    attachments: list[AttachmentData] = []
    try:
        _count_structure(normalised, limits)
        parsed = BytesParser(policy=RECEIVED).parsebytes(normalised)
        _depth(parsed, limits)
        assert isinstance(parsed, EmailMessage)
        message = parsed
        body_text, attachments = _walk(message, limits)
    except Unparseable as exc:
        error = str(exc)
    except RecursionError:
        error = "MIME structure too deeply nested"
    # the whole message's headers when it parsed; else its header block alone (it is never out of bounds)
    headers = message if message is not None else BytesParser(policy=RECEIVED).parsebytes(
        normalised, headersonly=True)
    try:
        subject = str(headers.get("Subject", "") or "")
    except Exception:  # noqa: BLE001 - a malformed encoded word must not lose the message
        subject = ""
    return Parsed(
        headers=headers,
        message=message,
        subject=header_safe(subject, 500),
        from_address=_first_address(headers),
        message_id=next(iter(_msgids(str(headers.get("Message-ID", "") or ""))), None),
        references=tuple(_msgids(str(headers.get("In-Reply-To", "") or "")) + _msgids(str(headers.get("References", "") or ""))),
        body_text=body_text,
        attachments=tuple(attachments),
        error=error,
    )


def _first_address(headers: Message) -> str:
    """The From address, for display only: never authorise by it."""
    try:
        pairs = getaddresses([str(v) for v in headers.get_all("From", [])])
    except Exception:  # noqa: BLE001
        return ""
    for _name, address in pairs:
        if "@" in address:
            return header_safe(address, 254).lower()
    return ""


def envelope_address(mail_from: str) -> str:
    """The envelope sender without angle brackets; '' for the null sender."""
    address = parseaddr(mail_from or "")[1] or (mail_from or "").strip("<> ")
    return header_safe(address, 254).lower()


def _field_for(name: str) -> str | None:
    key = name.strip().lower().rstrip(":").strip()
    for field_name, aliases in _FIELD_NAMES.items():
        if key in aliases:
            return field_name
    return None


def extract_fields(text: str) -> tuple[dict[str, str], list[str]]:
    """Split the body into the policy's fields by headings or ``Key: value`` lines.

    Free text outside any recognised heading falls into ``description``.
    Returns the fields found and the names of those missing.
    """
    found: dict[str, list[str]] = {}
    current = "description"
    for line in text.splitlines():
        heading = None if _NOT_HEADING.search(line) else _HEADING.match(line)
        if heading and _field_for(heading["name"]):
            current = _field_for(heading["name"]) or current
            continue
        keyline = _KEYLINE.match(line)
        if keyline and _field_for(keyline["name"]):
            current = _field_for(keyline["name"]) or current
            found.setdefault(current, []).append(keyline["value"])
            continue
        found.setdefault(current, []).append(line)
    fields = {name: "\n".join(lines).strip() for name, lines in found.items()}
    fields = {name: value for name, value in fields.items() if value}
    if "versions" not in fields and (versions := versions_in_prose(text)):
        fields["versions"] = ", ".join(versions)
    missing = [name for name in FIELDS if name not in fields]
    return fields, missing


# "I use version 2.1", "affected release: 3", "v1.2", "0.13.0" (not an IP address, not "line 42")
_VERSION_NEAR_WORD = re.compile(r"\b(?:versions?|releases?|ver\.)\s*(?:is|was|:|=)?\s*(v?\d{1,4}(?:\.\d{1,4}){0,3}[a-z0-9.+-]*)",
                                re.I)
_VERSION_TOKEN = re.compile(r"(?<![\w.])(v\d{1,4}(?:\.\d{1,4}){1,3}|\d{1,4}\.\d{1,4}\.\d{1,4})(?!\.?\d)")


def versions_in_prose(text: str) -> list[str]:
    """Version-like tokens in free text: a number after "version"/"release", ``v1.2``, ``0.13.0``."""
    found: list[str] = []
    for match in (*_VERSION_NEAR_WORD.finditer(text), *_VERSION_TOKEN.finditer(text)):
        value = match.group(1).rstrip(".,;:)")
        if value and value not in found:
            found.append(value)
    return found[:10]


def merge_fields(texts: list[str]) -> tuple[dict[str, str], list[str]]:
    """The policy's fields over a whole conversation: each message's fields, joined in order."""
    merged: dict[str, list[str]] = {}
    for text in texts:
        fields, _ = extract_fields(text)
        for name, value in fields.items():
            if value not in merged.setdefault(name, []):
                merged[name].append(value)
    result = {name: "\n\n".join(values) for name, values in merged.items() if values}
    return result, [name for name in FIELDS if name not in result]
