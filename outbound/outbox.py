"""The durable outbox: every outgoing mail is a row before anything is sent.

The Message-ID is fixed when the row is created, so a retry after an unknown
outcome (connection lost after DATA) is recognisable downstream.

Mail to a reporter's own key (``key_blob``, used for this message only) is
encrypted here, in the caller's transaction: whether that key is usable
decides what the mail may say (``mailer.correspondence``). Every other mail is
queued unsigned (``needs_signature``; sealed at rest like every outbox row)
and signed, or signed and encrypted to the pinned keys named in
``encrypt_to`` (maintainers, embargo members: checked usable before the mail
was written), by the sender before its first attempt (:meth:`Outbox.sign`),
outside the processing transaction and several at once. A pinned key that
fails then is a delivery failure, retried and alerted on: the mail is never
sent in clear.
"""

from __future__ import annotations

import email
from datetime import timedelta
from email import policy
from email.message import EmailMessage

from sqlalchemy.orm import Session

from mailer.clock import SYSTEM, Clock
from mailer.config import Config
from mailer.models import OutboxMessage
from mailer.openpgp import OpenPGP
from mailer.outgoing import Outgoing
from outbound.compose import Attachment, compose, make_environment, new_message_id, render
from outbound.pgpmime import build_encrypted, encrypt_bytes, sign_bytes


class Outbox:
    """Implements :class:`mailer.outgoing.Postman`: render, compose, sign/encrypt, queue."""

    def __init__(self, config: Config, gpg: OpenPGP, *, clock: Clock = SYSTEM) -> None:
        self.config = config
        self.gpg = gpg
        self.clock = clock
        self.env = make_environment()
        # the service key, set once at start (see Service.start): no gpg call per message
        self.fingerprint = ""
        self.public_key = ""
        self.autocrypt = ""  # the Autocrypt: header value every outgoing mail carries

    def _encrypt(self, raw: bytes, recipients: list[str], key_blob: bytes | None = None) -> bytes:
        """Encrypt (and sign) the composed mail. :raises CryptoError: when a key is unusable."""
        message = email.message_from_bytes(raw, policy=policy.SMTP)
        assert isinstance(message, EmailMessage)
        return build_encrypted(message, self.gpg, recipients, key_blob=key_blob, sign=True).as_bytes(policy=policy.SMTP)

    def sign(self, raw: bytes, encrypt_to: tuple[str, ...] = ()) -> bytes:
        """The signed (with ``encrypt_to``: signed and encrypted) form of a message queued unsigned (the sender
        calls this). :raises CryptoError:"""
        if encrypt_to:
            return encrypt_bytes(raw, self.gpg, list(encrypt_to))
        return sign_bytes(raw, self.gpg)

    def enqueue(self, session: Session, outgoing: Outgoing) -> OutboxMessage:
        now = self.clock()
        context = {"config": self.config, "service": self.config.service, "key_fingerprint": self.fingerprint,
                   **outgoing.context}
        body = render(self.env, outgoing.template, context)
        message_id = new_message_id(self.config)
        attachments: list[Attachment] = []
        if outgoing.attach_key:
            attachments.append((f"{self.config.service.contact}.asc", "application/pgp-keys", self.public_key.encode("ascii")))
        if outgoing.encrypted:  # report content (its attachments): only ever inside the encryption
            attachments.extend(outgoing.attachments)
        attachments.extend(outgoing.public_attachments)
        raw = compose(self.config, outgoing, body, message_id=message_id, now=now, autocrypt=self.autocrypt,
                      attachments=attachments)
        if outgoing.key_blob is not None:
            raw = self._encrypt(raw, list(outgoing.encrypt_to), outgoing.key_blob)
        row = OutboxMessage(
            kind=outgoing.kind.value,
            report=outgoing.report,
            message_id=message_id,
            mail_from=self.config.service.contact,
            rcpt_tos=[outgoing.to],
            rate_key=outgoing.rate_key,
            raw=raw,
            needs_signature=outgoing.key_blob is None,
            encrypt_to=list(outgoing.encrypt_to) if outgoing.key_blob is None and outgoing.encrypt_to else None,
            created_at=now,
            next_attempt_at=now,
            deliver_until=now + timedelta(hours=self.config.relay.retry_hours),
        )
        session.add(row)  # flushed with the rest of the transaction (the caller links to the object, not its id)
        return row

