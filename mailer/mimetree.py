"""A bounded parser of raw MIME bytes into a tree of entities that keep their exact bytes.

The :mod:`email` package re-serialises what it parses; signatures must be
checked over the bytes that were received, so :class:`MimeParser` splits
multiparts itself (RFC 2046 boundaries) and each :class:`Entity` keeps its raw
bytes next to its parsed headers.  Input is CRLF (see :func:`normalise_message`);
depth and part count are bounded (:class:`LimitExceeded`).
"""

from __future__ import annotations

import base64
import binascii
import email.errors
import email.utils
import quopri
import re
from dataclasses import dataclass, field
from email.header import decode_header, make_header
from email.message import Message
from email.parser import BytesHeaderParser
from email.policy import compat32

__all__ = ["Entity", "LimitExceeded", "MimeParser", "decode_header_value", "looks_like_mime", "normalise_crlf",
           "normalise_message", "split_multipart"]

_BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n")


class LimitExceeded(Exception):
    """Input exceeds a structural limit (depth, part count, decryptions)."""


def normalise_crlf(data: bytes) -> bytes:
    """Convert LF and CRLF line endings to CRLF."""
    return re.sub(rb"\r?\n", b"\r\n", data)


def normalise_message(raw: bytes) -> bytes:
    """A received message with CRLF line endings, its header block read as a strict MTA reads it.

    A message whose first line ends in CRLF (the wire form) has CRLF as its
    only line ending in the header block: a bare CR or LF there is not a line
    break and becomes a space, so it cannot smuggle a header (``Subject:
    x<LF>X-Loop: y`` stays one Subject), as in
    :func:`mailer.parsing.normalise_line_endings`.  Elsewhere, and in a
    message written with bare LFs from its first line on, LF counts as a line
    break (:func:`normalise_crlf`).
    """
    first = raw.find(b"\n")
    if first <= 0 or raw[first - 1 : first] != b"\r":
        return normalise_crlf(raw)
    head, sep, body = raw.partition(b"\r\n\r\n")
    return _BARE.sub(b" ", head) + sep + normalise_crlf(body)


def decode_header_value(value: str) -> str:
    """An RFC 2047 encoded header value as text (the raw value if it cannot be decoded)."""
    try:
        return str(make_header(decode_header(value)))
    except (email.errors.HeaderParseError, LookupError, UnicodeError, ValueError):
        return value


def looks_like_mime(data: bytes) -> bool:
    """True if the CRLF *data* starts with a header block holding a Content-Type."""
    head = data.split(b"\r\n\r\n", 1)[0]
    return bool(re.match(rb"[!-9;-~]+:", head)) and re.search(rb"(?im)^content-type:", head) is not None


@dataclass
class Entity:
    """A MIME entity as received: its exact bytes, parsed headers and children."""

    raw: bytes
    headers: Message
    body: bytes
    children: list[Entity] = field(default_factory=list)
    depth: int = 0

    @property
    def ctype(self) -> str:
        return self.headers.get_content_type()

    def param(self, name: str) -> str | None:
        value = self.headers.get_param(name)
        if isinstance(value, tuple):  # RFC 2231
            value = email.utils.collapse_rfc2231_value(value)
        return str(value) if value is not None else None

    def payload(self) -> bytes:
        """The body decoded from its Content-Transfer-Encoding."""
        cte = (self.headers.get("Content-Transfer-Encoding") or "").strip().lower()
        if cte == "base64":
            try:
                return base64.b64decode(re.sub(rb"[^A-Za-z0-9+/=]", b"", self.body) + b"===")
            except (binascii.Error, ValueError):
                return b""
        if cte == "quoted-printable":
            return quopri.decodestring(self.body)
        return self.body

    def text(self) -> str:
        charset = self.headers.get_content_charset() or "utf-8"
        data = self.payload()
        try:
            return data.decode(charset, errors="replace")
        except LookupError:
            return data.decode("utf-8", errors="replace")

    def filename(self) -> str | None:
        name = self.headers.get_filename() or self.param("name")
        return str(make_header(decode_header(name))) if name else None


class MimeParser:
    """Bounded parser of raw (CRLF) MIME bytes into :class:`Entity` trees.

    One parser counts the parts of everything it parses (a message and the
    decrypted payloads inside it): at most *max_parts* entities, nested at
    most *max_depth* deep.
    """

    def __init__(self, *, max_parts: int, max_depth: int) -> None:
        self.max_parts = max_parts
        self.max_depth = max_depth
        self.parts = 0

    def parse(self, raw: bytes, depth: int = 0) -> Entity:
        self.parts += 1
        if self.parts > self.max_parts:
            raise LimitExceeded(f"more than {self.max_parts} MIME parts")
        if depth > self.max_depth:
            raise LimitExceeded(f"MIME nesting deeper than {self.max_depth}")
        if raw.startswith(b"\r\n"):
            head, body = b"", raw[2:]
        else:
            head, sep, body = raw.partition(b"\r\n\r\n")
            if not sep:
                head, body = raw, b""
        headers = BytesHeaderParser(policy=compat32).parsebytes(head + b"\r\n\r\n")
        entity = Entity(raw, headers, body, [], depth)
        if entity.ctype.startswith("multipart/"):
            boundary = headers.get_boundary()
            if boundary:
                entity.children = [self.parse(p, depth + 1) for p in split_multipart(body, boundary)]
        return entity


def split_multipart(body: bytes, boundary: str) -> list[bytes]:
    """The exact bytes of each body part (RFC 2046: the CRLF before a delimiter belongs to it)."""
    delim = re.escape(b"--" + boundary.encode("ascii", "replace"))
    pattern = re.compile(rb"(?:\A|\r\n)" + delim + rb"(--)?[ \t]*(?=\r\n|\Z)")
    parts: list[bytes] = []
    start: int | None = None
    for match in pattern.finditer(body):
        if start is not None:
            parts.append(body[start:match.start()])
        if match.group(1):
            return parts
        start = match.end() + 2
    if start is not None:  # no close delimiter: take the rest (lenient)
        parts.append(body[start:])
    return parts
