"""Composing outgoing mail from templates. No user-supplied text enters a header unfiltered."""

from __future__ import annotations

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

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
_MSGID = re.compile(r"^<[\x21-\x3b\x3d\x3f-\x7e]{1,250}>$")


def make_environment(directory: Path = TEMPLATES) -> SandboxedEnvironment:
    """Templates are plain text (no HTML escaping) rendered in jinja2's sandbox."""
    return SandboxedEnvironment(
        loader=FileSystemLoader(str(directory)),
        undefined=StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def new_message_id(config: Config) -> str:
    return make_msgid(idstring="secmail", domain=config.hostname)


def _msgids(values: tuple[str, ...] | list[str]) -> list[str]:
    return [v for v in values if v and _MSGID.match(v)]


def compose(config: Config, outgoing: Outgoing, body: str, *, message_id: str, now: datetime) -> EmailMessage:
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
    msg.set_content(body, charset="utf-8")
    return msg


def render(env: SandboxedEnvironment, template: str, context: dict[str, Any]) -> str:
    return env.get_template(template).render(**context)
