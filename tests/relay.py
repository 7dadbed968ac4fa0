"""A capture SMTP server used as the service's relay: tests read exactly what was sent."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser

from aiosmtpd.smtp import SMTP, Envelope, Session


@dataclass
class Captured:
    mail_from: str
    rcpt_tos: list[str]
    raw: bytes

    @property
    def message(self) -> EmailMessage:
        msg = BytesParser(policy=policy.default).parsebytes(self.raw)
        assert isinstance(msg, EmailMessage)
        return msg

    @property
    def text(self) -> str:
        """The first text/plain part (our mail is signed: multipart/signed around the text)."""
        for part in self.message.walk():
            if part.get_content_type() == "text/plain":
                content = part.get_content()
                assert isinstance(content, str)
                return content
        raise AssertionError("no text/plain part")


@dataclass
class CaptureHandler:
    messages: list[Captured] = field(default_factory=list)
    # replies to give instead of 250, one per DATA, for fault injection ("451 ...", "550 ...")
    replies: list[str] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.replies:
            return self.replies.pop(0)
        raw = envelope.original_content
        assert isinstance(raw, bytes)
        self.messages.append(Captured(str(envelope.mail_from), list(envelope.rcpt_tos), raw))
        self.arrived.set()
        return "250 2.0.0 captured"

    def to(self, address: str) -> list[Captured]:
        return [m for m in self.messages if address in m.rcpt_tos]


class CaptureRelay:
    def __init__(self) -> None:
        self.handler = CaptureHandler()
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: SMTP(self.handler, hostname="relay.test", decode_data=False), "127.0.0.1", 0
        )
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    @property
    def url(self) -> str:
        return f"smtp://127.0.0.1:{self.port}"

    @property
    def messages(self) -> list[Captured]:
        return self.handler.messages
