"""SMTP and LMTP intake on aiosmtpd, in the service's own event loop.

The edge does as little as possible: it refuses unknown recipients at RCPT
(550: never an open relay), lets aiosmtpd enforce the size limit (552), commits
the raw bytes, and only then answers 250. Any fault of ours answers 451 so the
MTA keeps the message and retries; no exception text goes on the wire.

At shutdown the :class:`Gate` closes: new connections get 421 and are closed,
idle sessions get 421, a session mid-DATA finishes (its 250 after the commit)
and then gets 421; one still in DATA when the grace period is over gets 451.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP, Envelope, Session

from mailer import logs
from mailer.intake import IntakeWriter, Received, Stored, header_message_id

log = logging.getLogger(__name__)

OK = "250 2.0.0 Message accepted"
OK_DUPLICATE = "250 2.0.0 Message already accepted"
TEMPFAIL = "451 4.3.0 Temporary local problem, please try again later"
UNKNOWN_RECIPIENT = "550 5.1.1 No such recipient here"
SHUTTING_DOWN = "421 4.3.2 Service shutting down, try again later"


class Gate:
    """Whether the listeners take new sessions, and the sessions open now (for a graceful shutdown)."""

    def __init__(self) -> None:
        self.open = True
        self.sessions: set[GatedServer] = set()

    @property
    def in_data(self) -> int:
        """Sessions in the middle of a DATA command (receiving, storing, answering)."""
        return sum(1 for session in self.sessions if session.in_data)

    async def close(self) -> None:
        """Refuse new sessions; end the idle ones with 421 (those mid-DATA finish first)."""
        self.open = False
        await asyncio.gather(*(s.goodbye(SHUTTING_DOWN) for s in list(self.sessions) if not s.in_data))

    async def abort(self) -> None:
        """The grace period is over: a session still in DATA gets 451 (the sender keeps the message), others 421."""
        self.open = False
        await asyncio.gather(*(s.goodbye(TEMPFAIL if s.in_data else SHUTTING_DOWN) for s in list(self.sessions)))


class _Refuse(asyncio.Protocol):
    """A connection that arrives while shutting down: 421 and close."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(SHUTTING_DOWN.encode() + b"\r\n")
        transport.close()


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
        logs.received(self.transport, len(raw), header_message_id(raw), stored.id, stored.duplicate)
        self.stored(stored)
        return OK_DUPLICATE if stored.duplicate else OK

    def stored(self, stored: Stored) -> None:
        """Called after the commit, before 250 is sent."""
        if self.on_stored is not None:
            self.on_stored(stored)

    async def handle_exception(self, error: Exception) -> str:
        log.error("intake fault, answering 451: %s", error, exc_info=error)
        return TEMPFAIL


class GatedServer(SMTP):
    """An SMTP session that registers with the :class:`Gate` and can be ended politely."""

    gate: Gate | None = None
    in_data = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self.gate is not None:
            self.gate.sessions.add(self)

    def connection_lost(self, error: Exception | None) -> None:
        if self.gate is not None:
            self.gate.sessions.discard(self)
        super().connection_lost(error)

    async def smtp_DATA(self, arg: str) -> None:
        self.in_data = True
        try:
            await super().smtp_DATA(arg)
        finally:
            self.in_data = False
        if self.gate is not None and not self.gate.open:
            await self.goodbye(SHUTTING_DOWN)

    async def goodbye(self, status: str) -> None:
        """Say ``status`` (421 or 451) and close the connection."""
        if self.transport is None or self.transport.is_closing():
            return
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.push(status), 1.0)
        if self.transport is not None:
            self.transport.close()


class SMTPServer(GatedServer):
    """aiosmtpd's SMTP with our 451-on-fault (its default would be a permanent 500)."""


class LMTPServer(GatedServer, LMTP):
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
    handler: IntakeHandler, *, lmtp: bool, hostname: str, data_size_limit: int, gate: Gate | None = None
) -> Callable[[], asyncio.BaseProtocol]:
    cls = LMTPServer if lmtp else SMTPServer

    def factory() -> asyncio.BaseProtocol:
        if gate is not None and not gate.open:
            return _Refuse()
        server = cls(
            handler,
            hostname=hostname,
            data_size_limit=data_size_limit,
            enable_SMTPUTF8=True,
            decode_data=False,
            ident="security-mailer",
        )
        server.gate = gate
        return server

    return factory


async def start_listener(
    handler: IntakeHandler, host: str, port: int, *, lmtp: bool, hostname: str, data_size_limit: int,
    gate: Gate | None = None,
) -> asyncio.Server:
    """Listen in the running loop (no threaded Controller); with ``gate``, a shutdown can close it politely."""
    loop = asyncio.get_running_loop()
    factory = server_factory(handler, lmtp=lmtp, hostname=hostname, data_size_limit=data_size_limit, gate=gate)
    return await loop.create_server(factory, host=host, port=port)
