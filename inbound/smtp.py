"""SMTP and LMTP intake on aiosmtpd, in the service's own event loop.

The edge does as little as possible: it refuses unknown recipients at RCPT
(550: never an open relay), lets aiosmtpd enforce the size limit (552), commits
the raw bytes, and only then answers 250. Any fault of ours answers 451 so the
MTA keeps the message and retries; no exception text goes on the wire.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP, Envelope, Session

from mailer.intake import IntakeWriter, Received, Stored

log = logging.getLogger(__name__)

OK = "250 2.0.0 Message accepted"
OK_DUPLICATE = "250 2.0.0 Message already accepted"
TEMPFAIL = "451 4.3.0 Temporary local problem, please try again later"
UNKNOWN_RECIPIENT = "550 5.1.1 No such recipient here"


class IntakeHandler:
    """aiosmtpd handler: recipient check at RCPT, durable store at DATA."""

    def __init__(
        self,
        writer: IntakeWriter,
        accepts: Callable[[str], bool],
        *,
        transport: str = "smtp",
        on_stored: Callable[[Stored], None] | None = None,
    ) -> None:
        self.writer = writer
        self.accepts = accepts
        self.transport = transport
        self.on_stored = on_stored

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        if not self.accepts(address):
            return UNKNOWN_RECIPIENT
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or b""
        assert isinstance(raw, bytes)
        peer = session.peer if isinstance(session.peer, str) else ":".join(map(str, session.peer or ()))
        received = Received(raw, self.transport, peer, str(envelope.mail_from or ""), tuple(envelope.rcpt_tos))
        stored = await self.writer.store(received)
        self.stored(stored)
        return OK_DUPLICATE if stored.duplicate else OK

    def stored(self, stored: Stored) -> None:
        """Called after the commit, before 250 is sent."""
        if self.on_stored is not None:
            self.on_stored(stored)

    async def handle_exception(self, error: Exception) -> str:
        log.error("intake fault, answering 451: %s", error, exc_info=error)
        return TEMPFAIL


class SMTPServer(SMTP):
    """aiosmtpd's SMTP with our 451-on-fault (its default would be a permanent 500)."""


class LMTPServer(LMTP):
    """LMTP that answers once per accepted recipient after DATA, in order, on every path (RFC 2033 §4.2).

    aiosmtpd's LMTP sends a single reply; here every reply to the data phase
    (accepted, 552 too large, 451 fault) is repeated for each recipient.
    """

    _replies_due = 0
    _data_phase = False

    async def smtp_DATA(self, arg: str) -> None:
        self._replies_due = len(self.envelope.rcpt_tos) if self.envelope else 0
        try:
            await super().smtp_DATA(arg)
        except (asyncio.CancelledError, ConnectionError):
            raise
        except Exception as error:
            log.error("LMTP intake fault, answering 451: %s", error, exc_info=error)
            await self.push(TEMPFAIL)
        finally:
            self._replies_due = 0
            self._data_phase = False

    async def push(self, status: Any) -> None:
        text = status.decode() if isinstance(status, bytes) else str(status)
        if self._replies_due and text.startswith("354"):
            self._data_phase = True
            await super().push(text)
            return
        if self._data_phase:
            count, self._replies_due, self._data_phase = self._replies_due, 0, False
            for _ in range(count):
                await super().push(text)
            return
        await super().push(text)


def server_factory(
    handler: IntakeHandler, *, lmtp: bool, hostname: str, data_size_limit: int
) -> Callable[[], SMTP]:
    cls = LMTPServer if lmtp else SMTPServer

    def factory() -> SMTP:
        return cls(
            handler,
            hostname=hostname,
            data_size_limit=data_size_limit,
            enable_SMTPUTF8=True,
            decode_data=False,
            ident="security-mailer",
        )

    return factory


async def start_listener(
    handler: IntakeHandler, host: str, port: int, *, lmtp: bool, hostname: str, data_size_limit: int
) -> asyncio.Server:
    """Listen in the running loop (no threaded Controller)."""
    loop = asyncio.get_running_loop()
    factory = server_factory(handler, lmtp=lmtp, hostname=hostname, data_size_limit=data_size_limit)
    return await loop.create_server(factory, host=host, port=port)
