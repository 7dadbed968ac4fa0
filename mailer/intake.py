"""The durable write at the edge: a received message is committed before anyone is told 250."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from mailer.db import Database
from mailer.models import InboundMessage

_MESSAGE_ID = re.compile(rb"^message-id:[ \t]*(<[^<>\s]{1,900}>)", re.IGNORECASE | re.MULTILINE)


@dataclass(frozen=True)
class Stored:
    id: int
    duplicate: bool


def header_message_id(raw: bytes) -> str | None:
    """The Message-ID from the header block, read without a full parse."""
    head = raw.split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0]
    match = _MESSAGE_ID.search(head)
    return match.group(1).decode("ascii", errors="replace") if match else None


def store_inbound(
    db: Database, raw: bytes, *, transport: str, peer: str, mail_from: str, rcpt_tos: list[str]
) -> Stored:
    """Commit the message exactly as received; a redelivery (same Message-ID *and* bytes) is recognised.

    A different message that reuses a Message-ID has another hash and is stored too.
    """
    digest = hashlib.sha256(raw).hexdigest()
    message_id = header_message_id(raw)
    dedup_key = f"{digest}|{message_id or ''}"
    row = InboundMessage(
        transport=transport,
        peer=peer[:255],
        mail_from=mail_from[:998],
        rcpt_tos=list(rcpt_tos),
        message_id=message_id,
        sha256=digest,
        dedup_key=dedup_key,
        size=len(raw),
        raw=raw,
    )
    try:
        with db.session() as session:
            session.add(row)
            session.flush()
            return Stored(row.id, duplicate=False)
    except IntegrityError:
        with db.session() as session:
            existing = session.scalar(select(InboundMessage.id).where(InboundMessage.dedup_key == dedup_key))
        if existing is None:
            raise
        return Stored(existing, duplicate=True)
