"""What the core asks the outbound side to send: a typed request, not a composed message.

``mailer`` never imports ``outbound``; the composition root hands the workflow
a :class:`Postman` (``outbound.outbox.Outbox``) that renders, composes and
queues the mail in the caller's transaction.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Protocol

from sqlalchemy.orm import Session

from mailer.models import OutboxMessage, Report


class MailKind(enum.StrEnum):
    ACK = "ack"  # auto-reply to a reporter (RFC 3834 rules apply)
    NOTICE = "notice"  # to maintainers
    ALERT = "alert"  # something needs a human


@dataclass(frozen=True)
class Outgoing:
    kind: MailKind
    to: str
    subject: str
    template: str
    context: dict[str, Any] = field(default_factory=dict)
    # the report the mail is about: an object, so a report filed in the same transaction needs no flush first
    report: Report | None = None
    in_reply_to: str | None = None
    references: tuple[str, ...] = ()
    rate_key: str | None = None
    # OpenPGP: every message is signed by the service key. encrypt_to names
    # pinned keys in the service keyring (maintainers); key_blob is a reporter's
    # own key, used for this message only and never imported.
    encrypt_to: tuple[str, ...] = ()
    key_blob: bytes | None = None
    attach_key: bool = False
    # (filename, content type, data): attached only when the mail is encrypted (report attachments to maintainers)
    attachments: tuple[tuple[str, str, bytes], ...] = ()
    # attached to the mail whatever its protection: only what is public by design (a release's OSV record)
    public_attachments: tuple[tuple[str, str, bytes], ...] = ()

    @property
    def encrypted(self) -> bool:
        return bool(self.encrypt_to or self.key_blob)


class Postman(Protocol):
    def enqueue(self, session: Session, outgoing: Outgoing) -> OutboxMessage:
        """Render, compose and add the message to the outbox in ``session``'s transaction."""
        ...
