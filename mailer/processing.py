"""What the pipeline's steps share while one stored message is processed.

Two views of the message sit side by side and are never merged:

- ``message``: the received bytes parsed once (:func:`mailer.parsing.parse_message`),
- ``protected``: what OpenPGP unwrapping found (decrypted parts, signatures,
  protected headers), or ``None`` when the message carries no OpenPGP.

Which text counts as the report's is decided in one place (:attr:`Processing.text`):
only the encrypted parts when any part was decrypted.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property

from sqlalchemy.orm import Session

from mailer.classify import MessageKind, Traits
from mailer.config import Config
from mailer.correspondence import Correspondence
from mailer.models import Event, InboundMessage, OutboxMessage, Report, ReportMessage
from mailer.openpgp import OpenPGP
from mailer.outgoing import Postman
from mailer.parsing import AttachmentData, Parsed
from mailer.pgpmime import Unwrapped
from mailer.text import header_safe

_PGP_CONTROL_TYPES = ("application/pgp-keys", "application/pgp-encrypted", "application/pgp-signature")


@dataclass
class Processing:
    """One message's processing: its views, what classification decided, and what filing produced."""

    session: Session
    config: Config
    postman: Postman
    gpg: OpenPGP
    inbound: InboundMessage
    now: datetime
    envelope_from: str = ""
    envelope_unknown: bool = False  # no envelope sender was recorded (not the null sender)
    message: Parsed | None = None
    protected: Unwrapped | None = None
    # the sender wrote encrypted, whether or not we could decrypt it
    encrypted_input: bool = False
    kind: MessageKind | None = None
    #: acknowledgements the sender got in the last day, counted before the write transaction (``count_acks``)
    acks_sent_today: int | None = None
    report: Report | None = None
    report_message: ReportMessage | None = None
    #: the received bytes, read once (the write transaction takes the read phase's row as it is)
    received: bytes | None = None
    #: the policy's fields found in :attr:`text` and the names missing (``inspect``, before the write lock)
    fields: tuple[dict[str, str], list[str]] | None = None
    #: what the message itself shows (:func:`mailer.prepare.traits`)
    traits: Traits | None = None

    def carried_to(self, session: Session, inbound: InboundMessage, now: datetime) -> Processing:
        """A new context in ``session`` with what the steps run so far found (the message's views)."""
        return Processing(session, self.config, self.postman, self.gpg, inbound, now,
                          envelope_from=self.envelope_from, envelope_unknown=self.envelope_unknown,
                          message=self.message, protected=self.protected, encrypted_input=self.encrypted_input,
                          kind=self.kind, acks_sent_today=self.acks_sent_today, received=self.received,
                          fields=self.fields, traits=self.traits)

    @property
    def raw(self) -> bytes:
        """The message as received."""
        if self.received is None:
            self.received = self.inbound.raw
        return self.received

    @property
    def m(self) -> Parsed:
        """The parsed message (set by the first step, ``parse``)."""
        assert self.message is not None, "the parse step has not run"
        return self.message

    @cached_property
    def mail(self) -> Correspondence:
        return Correspondence(self.session, self.config, self.postman, self.gpg, now=self.now, inbound_id=self.inbound.id)

    def event(self, kind: str, **detail: object) -> None:
        self.session.add(Event(report=self.report, kind=kind, detail=detail, inbound_id=self.inbound.id, at=self.now))

    @property
    def text(self) -> str:
        """The message's text as the report sees it: encrypted parts only when any part was decrypted."""
        pgp = self.protected
        if pgp is None or not pgp.text_parts:
            return self.m.body_text
        if pgp.encrypted:
            return "\n\n".join(part.text for part in pgp.text_parts if part.encrypted)
        return "\n\n".join(part.text for part in pgp.text_parts)

    @property
    def attachments(self) -> tuple[AttachmentData, ...]:
        pgp = self.protected
        if pgp is None or not (pgp.text_parts or pgp.attachments):
            return self.m.attachments
        return tuple(
            AttachmentData(header_safe(a.filename or "", 255), header_safe(a.content_type, 255), a.data)
            for a in pgp.attachments
            if a.content_type not in _PGP_CONTROL_TYPES
        )

    @property
    def protected_subject(self) -> str:
        """The Subject from inside a decrypted payload (never from outside it)."""
        if self.protected is None or not self.protected.encrypted:
            return ""
        return header_safe(self.protected.protected_headers.get("Subject", ""), 500)

    def record_outgoing(self, outbox: OutboxMessage | None, kind: str) -> None:
        """Keep an outgoing mail in the report's conversation."""
        if outbox is None or self.report is None:
            return
        self.session.add(ReportMessage(
            report=self.report, direction="out", kind=kind, message_id=outbox.message_id,
            sender=self.config.service.contact, outbox=outbox, meta={"to": outbox.rcpt_tos}, created_at=self.now,
        ))


Step = Callable[[Processing], None]


def openpgp_summary(pgp: Unwrapped | None) -> dict[str, object]:
    """What the report records per message about its protection."""
    if pgp is None:
        return {"encrypted": False, "signed": False}
    return {
        "encrypted": pgp.encrypted,
        "partly_encrypted": pgp.partly_encrypted,
        "signed": any(part.signed for part in pgp.text_parts),
        "errors": list(pgp.errors),
        "parts": [
            {
                "encrypted": part.encrypted,
                "signed": part.signed,
                "signature_valid": part.signature_valid,
                "signer": part.signer_fpr,
                "signature_reason": part.signature_reason,
            }
            for part in pgp.text_parts
        ],
        # plaintext that came beside the encrypted part: kept apart, never merged
        "outside_text": [part.text for part in pgp.text_parts if pgp.encrypted and not part.encrypted],
        # encrypted content seen but not decrypted: the sender wrote encrypted (never "not encrypted")
        "encrypted_seen": pgp.encrypted_seen,
        # authors of forwarded (message/rfc822) encrypted messages: the forwarder is not the author
        "forwarded_from": list(pgp.forwarded_from),
    }


_MSGID = re.compile(rb"<[\x21-\x3b\x3d\x3f-\x7e]{1,250}>")


def embedded_msgids(raw: bytes) -> list[str]:
    """Message-IDs anywhere in a bounce (DSNs quote the original headers)."""
    return [m.decode("ascii") for m in _MSGID.findall(raw[:1_000_000])[:200]]
