"""Composing outgoing mail from templates, straight to wire bytes. No user-supplied text enters a header unfiltered.

Every outgoing mail is built here, as CRLF bytes in the form ``policy.SMTP``
writes (7bit: ASCII header fields folded at 78 columns, non-ASCII text as
RFC 2047 encoded words, the body 7bit or quoted-printable). The stdlib's
``EmailMessage`` parses every header it is given and again every header it is
asked for; building the few fields of our own mail directly costs a small
fraction of that, and the queued bytes are already what RFC 3156 signs
(:func:`outbound.pgpmime.sign_bytes` wraps them without re-parsing).
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets
from collections.abc import Iterable
from datetime import datetime
from email.header import Header
from email.utils import format_datetime, formataddr, make_msgid
from pathlib import Path
from typing import Any

from jinja2 import FileSystemLoader, StrictUndefined
from jinja2.sandbox import SandboxedEnvironment

from mailer.config import Config
from mailer.outgoing import MailKind, Outgoing
from mailer.text import header_safe
from mailer.wellknown import fingerprint_groups

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
_MSGID = re.compile(r"^<[\x21-\x3b\x3d\x3f-\x7e]{1,250}>$")
_LINE = 78  # RFC 5322 §2.1.1: SHOULD fold header lines and 7bit body lines at 78 characters
_TOKEN = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")  # RFC 2045 token: a parameter value that needs no quotes

#: (file name, content type, data) of a part after the text
Attachment = tuple[str, str, bytes]


def make_environment(directory: Path = TEMPLATES) -> SandboxedEnvironment:
    """Templates are plain text (no HTML escaping) rendered in jinja2's sandbox."""
    env = SandboxedEnvironment(
        loader=FileSystemLoader(str(directory)),
        auto_reload=False,  # templates are read once per process, not stat()ed at every use
        undefined=StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["fingerprint_groups"] = fingerprint_groups
    return env


def new_message_id(config: Config) -> str:
    return make_msgid(idstring="secmail", domain=config.hostname)


def _msgids(values: Iterable[str]) -> list[str]:
    return [v for v in values if v and _MSGID.match(v)]


def field(name: str, value: str) -> bytes:
    """One header field as CRLF bytes: ASCII folded at spaces within 78 columns, else RFC 2047 (UTF-8)."""
    if not value.isascii():
        encoded = Header(value, "utf-8", header_name=name).encode(linesep="\r\n")
        return f"{name}: {encoded}\r\n".encode("ascii")
    lines: list[str] = []
    line = f"{name}:"
    for index, word in enumerate(value.split(" ")):
        if index and len(line) + 1 + len(word) > _LINE:
            lines.append(line)
            line = " " + word
        else:
            line += " " + word
    lines.append(line)
    return ("\r\n".join(lines) + "\r\n").encode("ascii")


def _param(value: str) -> str:
    return value if _TOKEN.match(value) else '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _crlf_lines(data: bytes) -> list[bytes]:
    return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")


def text_part(body: str) -> bytes:
    """A ``text/plain; charset=utf-8`` entity: 7bit when ASCII with short lines, else quoted-printable."""
    data = body.encode("utf-8")
    lines = _crlf_lines(data)
    if lines[-1] == b"":
        lines.pop()
    if data.isascii() and all(len(line) <= _LINE for line in lines):
        cte, payload = "7bit", b"".join(line + b"\r\n" for line in lines)
    else:
        encoded = binascii.b2a_qp(b"\n".join(lines) + b"\n", quotetabs=False, istext=True)
        cte, payload = "quoted-printable", encoded.replace(b"\n", b"\r\n")
    return (b'Content-Type: text/plain; charset="utf-8"\r\n'
            + f"Content-Transfer-Encoding: {cte}\r\n\r\n".encode("ascii") + payload)


def attachment_part(filename: str, content_type: str, data: bytes) -> bytes:
    """A base64 attachment entity; an unusable type becomes ``application/octet-stream``."""
    maintype, _, subtype = content_type.partition("/")
    if maintype in ("multipart", "message") or not subtype or not _TOKEN.match(maintype) or not _TOKEN.match(subtype):
        maintype, subtype = "application", "octet-stream"
    name = header_safe(filename, 200) or "attachment"
    disposition = (f"attachment; filename={_param(name)}" if name.isascii()
                   else f"attachment; filename*=utf-8''{_percent(name)}")  # RFC 2231
    encoded = base64.encodebytes(data).replace(b"\n", b"\r\n")
    return (f"Content-Type: {maintype.lower()}/{subtype.lower()}\r\n".encode("ascii")
            + field("Content-Disposition", disposition)
            + b"Content-Transfer-Encoding: base64\r\n\r\n" + encoded)


def _percent(text: str) -> str:
    return "".join(chr(b) if _TOKEN.match(chr(b)) and chr(b) not in "%'*" else f"%{b:02X}" for b in text.encode("utf-8"))


def boundary(*avoid: bytes) -> str:
    """A multipart boundary found in none of ``avoid``."""
    while True:
        candidate = "=-" + secrets.token_hex(12)
        if not any(candidate.encode("ascii") in data for data in avoid):
            return candidate


def mixed(parts: list[bytes]) -> bytes:
    """A ``multipart/mixed`` entity of ``parts`` (each headers + CRLF + body, ending in CRLF)."""
    mark = boundary(*parts)
    delimiter = b"--" + mark.encode("ascii")
    body = b"".join(delimiter + b"\r\n" + part for part in parts) + delimiter + b"--\r\n"
    return field("Content-Type", f'multipart/mixed; boundary="{mark}"') + b"\r\n" + body


def compose(config: Config, outgoing: Outgoing, body: str, *, message_id: str, now: datetime,
            autocrypt: str = "", attachments: Iterable[Attachment] = ()) -> bytes:
    """A complete RFC 5322 message as wire bytes (CRLF, 7bit), the text first and then ``attachments``."""
    service = config.service
    head = [
        field("From", formataddr((header_safe(service.contact_name), service.contact), charset="utf-8")),
        field("To", header_safe(outgoing.to, 254)),
        field("Subject", header_safe(outgoing.subject, 200)),
        field("Date", format_datetime(now)),
        field("Message-ID", message_id),
    ]
    in_reply_to = _msgids([outgoing.in_reply_to or ""])
    if in_reply_to:
        head.append(field("In-Reply-To", in_reply_to[0]))
    references = _msgids(outgoing.references)
    if references:
        head.append(field("References", " ".join(references)))
    # RFC 3834: mark our mail as automatic so other robots do not answer it; X-Loop stops our own loops.
    head.append(field("Auto-Submitted", "auto-replied" if outgoing.kind is MailKind.ACK else "auto-generated"))
    head.append(field("X-Loop", service.contact))
    head.append(field("X-Auto-Response-Suppress", "All"))
    if autocrypt:
        head.append(field("Autocrypt", autocrypt))
    head.append(b"MIME-Version: 1.0\r\n")
    parts = [attachment_part(*item) for item in attachments]
    entity = mixed([text_part(body), *parts]) if parts else text_part(body)
    return b"".join(head) + entity


def autocrypt_header(addr: str, keydata: bytes) -> str:
    """The ``Autocrypt:`` value (autocrypt.org level 1): our address, mutual preference, the minimal key.

    The base64 key data starts on its own word and carries folding whitespace
    every 64 characters (the spec allows whitespace in it), so every word fits
    a 78-character line: the header folds at spaces and is never turned into
    RFC 2047 encoded words, which Autocrypt readers do not decode.
    """
    b64 = base64.b64encode(keydata).decode("ascii")
    folded = " ".join(b64[i:i + 64] for i in range(0, len(b64), 64))
    return f"addr={addr}; prefer-encrypt=mutual; keydata= {folded}"


def render(env: SandboxedEnvironment, template: str, context: dict[str, Any]) -> str:
    return env.get_template(template).render(**context)
