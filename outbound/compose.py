"""Composing outgoing mail from templates. No user-supplied text enters a header unfiltered."""

from __future__ import annotations

import base64
import re
from datetime import datetime
from email import policy
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
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


def make_environment(directory: Path = TEMPLATES) -> SandboxedEnvironment:
    """Templates are plain text (no HTML escaping) rendered in jinja2's sandbox."""
    env = SandboxedEnvironment(
        loader=FileSystemLoader(str(directory)),
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


def _msgids(values: tuple[str, ...] | list[str]) -> list[str]:
    return [v for v in values if v and _MSGID.match(v)]


def compose(config: Config, outgoing: Outgoing, body: str, *, message_id: str, now: datetime,
            autocrypt: str = "") -> EmailMessage:
    """A complete RFC 5322 message; serialise with ``policy.SMTP`` (CRLF) for the wire."""
    msg = EmailMessage(policy=policy.SMTP)
    msg["From"] = Address(display_name=header_safe(config.service.contact_name), addr_spec=config.service.contact)
    msg["To"] = header_safe(outgoing.to, 254)
    msg["Subject"] = header_safe(outgoing.subject, 200)
    msg["Date"] = format_datetime(now)
    msg["Message-ID"] = message_id
    in_reply_to = _msgids([outgoing.in_reply_to or ""])
    if in_reply_to:
        msg["In-Reply-To"] = in_reply_to[0]
    references = _msgids(list(outgoing.references))
    if references:
        msg["References"] = " ".join(references)
    # RFC 3834: mark our mail as automatic so other robots do not answer it; X-Loop stops our own loops.
    msg["Auto-Submitted"] = "auto-replied" if outgoing.kind is MailKind.ACK else "auto-generated"
    msg["X-Loop"] = config.service.contact
    msg["X-Auto-Response-Suppress"] = "All"
    if autocrypt:
        msg["Autocrypt"] = autocrypt
    msg.set_content(body, charset="utf-8")
    return msg


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
