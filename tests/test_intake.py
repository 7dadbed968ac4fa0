"""The SMTP/LMTP edge: recipient checks, size limit, durability before 250, faults as 451."""

from __future__ import annotations

import asyncio
import smtplib
from email.message import EmailMessage

import pytest
from sqlalchemy import func, select, text

from inbound.smtp import IntakeHandler
from mailer.app import Service
from mailer.config import Config
from mailer.intake import Stored
from mailer.models import InboundMessage, OutboxMessage, Report
from tests.conftest import make_config, run, smtp_port
from tests.relay import CaptureRelay

CONTACT = "security@example.org"


def report_bytes(msgid: str = "<r1@reporter.test>", body: str = "Description: a bug\n", subject: str = "Bug") -> bytes:
    msg = EmailMessage()
    msg["From"] = "Rita <rita@reporter.test>"
    msg["To"] = CONTACT
    msg["Subject"] = subject
    if msgid:
        msg["Message-ID"] = msgid
    msg.set_content(body)
    return msg.as_bytes()


def send(port: int, raw: bytes, *, sender: str = "rita@reporter.test", rcpts: tuple[str, ...] = (CONTACT,)) -> dict:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        return client.sendmail(sender, list(rcpts), raw)


async def asend(port: int, raw: bytes, **kw: object) -> dict:
    return await asyncio.to_thread(send, port, raw, **kw)  # type: ignore[arg-type]


def count(service: Service, model: type) -> int:
    with service.db.session() as s:
        return s.scalar(select(func.count()).select_from(model)) or 0


async def test_foreign_recipient_is_refused_at_rcpt(service: Service) -> None:
    """A recipient other than the contact gets 550 at RCPT: the service is never an open relay."""
    with pytest.raises(smtplib.SMTPRecipientsRefused) as info:
        await asend(smtp_port(service), report_bytes(), rcpts=("someone@elsewhere.test",))
    code, _ = info.value.recipients["someone@elsewhere.test"]
    assert code == 550
    assert count(service, InboundMessage) == 0


async def test_foreign_recipient_with_swaks(service: Service, swaks: str) -> None:
    """swaks sees 550 for a foreign recipient and the message is not taken."""
    rc, out = await run(swaks, "--server", f"127.0.0.1:{smtp_port(service)}", "--to", "other@example.org",
                        "--from", "rita@reporter.test")
    assert rc != 0
    assert "550 5.1.1" in out
    assert count(service, InboundMessage) == 0


async def test_oversize_message_gets_552(tmp_path, migrated: str, relay: CaptureRelay) -> None:
    """A message over the configured size limit is refused with 552 and not stored."""
    svc = Service(make_config(tmp_path, migrated, relay.url, smtp={"max_message_size": 2048}))
    await svc.start(background=False)
    try:
        with pytest.raises(smtplib.SMTPResponseException) as info:
            await asend(smtp_port(svc), report_bytes(body="x" * 5000))
        assert info.value.smtp_code == 552
        assert count(svc, InboundMessage) == 0
    finally:
        await svc.stop()
        svc.db.dispose()


async def test_store_fault_answers_451_and_stores_nothing(service: Service) -> None:
    """When the database refuses the write, the client gets a temporary 451 without internals, then 250 on retry."""
    with service.db.session() as s:
        s.execute(text("ALTER TABLE inbound_messages RENAME TO inbound_messages_away"))
    try:
        with pytest.raises(smtplib.SMTPDataError) as info:
            await asend(smtp_port(service), report_bytes())
        assert info.value.smtp_code == 451
        assert b"inbound_messages" not in info.value.smtp_error
        assert b"Error" not in info.value.smtp_error
    finally:
        with service.db.session() as s:
            s.execute(text("ALTER TABLE inbound_messages_away RENAME TO inbound_messages"))
    assert count(service, InboundMessage) == 0
    await asend(smtp_port(service), report_bytes())
    assert count(service, InboundMessage) == 1


class CrashAfterCommit(IntakeHandler):
    """Fault injection: the process 'dies' after the commit, before 250 goes out (once)."""

    crashes = 1

    def stored(self, stored: Stored) -> None:
        super().stored(stored)
        if self.crashes:
            self.crashes -= 1
            raise RuntimeError("simulated crash between commit and 250")


class CrashingService(Service):
    def handler(self, transport: str) -> IntakeHandler:
        return CrashAfterCommit(self.writer, self.accepts, transport=transport, on_stored=self._stored)


async def test_redelivery_after_crash_between_commit_and_250_gives_one_report(config: Config, relay: CaptureRelay) -> None:
    """The MTA redelivers after no 250; the same bytes become one report and one ack."""
    svc = CrashingService(config)
    await svc.start(background=False)
    try:
        raw = report_bytes()
        with pytest.raises(smtplib.SMTPDataError) as info:
            await asend(smtp_port(svc), raw)
        assert info.value.smtp_code == 451
        await asend(smtp_port(svc), raw)  # the MTA's retry
        await svc.settle()
        assert count(svc, InboundMessage) == 1
        assert count(svc, Report) == 1
        assert len(relay.handler.to("rita@reporter.test")) == 1
    finally:
        await svc.stop()
        svc.db.dispose()


async def test_same_message_id_with_other_content_is_filed_too(service: Service) -> None:
    """A different message reusing a Message-ID is never dropped as a duplicate."""
    await asend(smtp_port(service), report_bytes(body="first report\n"))
    await asend(smtp_port(service), report_bytes(body="second, different report\n"))
    await service.settle()
    assert count(service, Report) == 2


async def test_message_without_message_id_is_filed(service: Service, relay: CaptureRelay) -> None:
    """A report with no Message-ID header is filed and acknowledged."""
    await asend(smtp_port(service), report_bytes(msgid=""))
    await service.settle()
    assert count(service, Report) == 1
    assert len(relay.handler.to("rita@reporter.test")) == 1


async def _raw_session(port: int, lines: list[bytes]) -> list[bytes]:
    """Speak SMTP/LMTP byte by byte (pipelined, ending with QUIT) and collect every reply line."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    replies: list[bytes] = [await reader.readline()]
    for line in lines:
        writer.write(line)
    await writer.drain()
    try:
        while line := await asyncio.wait_for(reader.readline(), 10):
            replies.append(line)
    finally:
        writer.close()
    return replies


async def test_smtp_smuggling_gives_one_message(service: Service) -> None:
    """A ``<LF>.<CR><LF>`` inside the data does not end it: no second message is smuggled in."""
    smuggled = (
        b"From: rita@reporter.test\r\nSubject: outer\r\nMessage-ID: <outer@reporter.test>\r\n\r\nhello\n.\r\n"
        b"MAIL FROM:<eve@evil.test>\r\nRCPT TO:<security@example.org>\r\nDATA\r\n"
        b"From: boss@example.org\r\nSubject: smuggled\r\n\r\nowned\r\n.\r\n"
    )
    await _raw_session(
        smtp_port(service),
        [b"EHLO client.test\r\n", b"MAIL FROM:<rita@reporter.test>\r\n", b"RCPT TO:<security@example.org>\r\n",
         b"DATA\r\n", smuggled, b"QUIT\r\n"],
        )
    await service.settle()
    with service.db.session() as s:
        rows = list(s.scalars(select(InboundMessage)))
    assert len(rows) == 1
    assert b"smuggled" in rows[0].raw  # it stayed part of the one message's content


def _lmtp_config(config: Config, **lmtp: object) -> Config:
    return config.model_copy(update={"lmtp": config.lmtp.model_copy(update={"listen": "127.0.0.1:0", **lmtp})})


async def _lmtp_service(config: Config, cls: type[Service] = Service, **lmtp: object) -> Service:
    svc = cls(_lmtp_config(config, **lmtp))
    await svc.start(background=False)
    return svc


LMTP_TWO_RCPTS = [
    b"LHLO client.test\r\n",
    b"MAIL FROM:<rita@reporter.test>\r\n",
    b"RCPT TO:<security@example.org>\r\n",
    b"RCPT TO:<nobody@elsewhere.test>\r\n",
    b"RCPT TO:<security-sendkey@example.org>\r\n",
    b"DATA\r\n",
]


def _final_replies(replies: list[bytes]) -> list[bytes]:
    """The reply lines after the 354 (LMTP answers once per accepted recipient there)."""
    index = next(i for i, r in enumerate(replies) if r.startswith(b"354"))
    return [r for r in replies[index + 1 :] if not r.startswith(b"221")]


async def test_lmtp_answers_once_per_recipient_in_order(config: Config) -> None:
    """LMTP gives one 250 per accepted recipient after DATA (RFC 2033), the refused one got 550 at RCPT."""
    svc = await _lmtp_service(config)
    try:
        replies = await _raw_session(
            svc.listening()["lmtp"][1], [*LMTP_TWO_RCPTS, report_bytes().replace(b"\n", b"\r\n") + b".\r\n", b"QUIT\r\n"],
        )
        assert any(r.startswith(b"550") for r in replies)
        final = _final_replies(replies)
        assert [r[:3] for r in final] == [b"250", b"250"]
        assert count(svc, InboundMessage) == 1
    finally:
        await svc.stop()
        svc.db.dispose()


async def test_lmtp_oversize_answers_552_per_recipient(config: Config) -> None:
    """An oversized LMTP message gets one 552 per recipient."""
    svc = await _lmtp_service(config, max_message_size=2048)
    try:
        body = report_bytes(body="y" * 6000).replace(b"\n", b"\r\n") + b".\r\n"
        replies = await _raw_session(svc.listening()["lmtp"][1], [*LMTP_TWO_RCPTS, body, b"QUIT\r\n"])
        assert [r[:3] for r in _final_replies(replies)] == [b"552", b"552"]
        assert count(svc, InboundMessage) == 0
    finally:
        await svc.stop()
        svc.db.dispose()


async def test_lmtp_fault_answers_451_per_recipient(config: Config) -> None:
    """A fault after the commit answers 451 once per recipient, and the redelivery is recognised."""
    svc = await _lmtp_service(config, cls=CrashingService)
    try:
        body = report_bytes().replace(b"\n", b"\r\n") + b".\r\n"
        port = svc.listening()["lmtp"][1]
        replies = await _raw_session(port, [*LMTP_TWO_RCPTS, body, b"QUIT\r\n"])
        final = _final_replies(replies)
        assert [r[:3] for r in final] == [b"451", b"451"]
        assert all(b"simulated" not in r for r in final)
        replies = await _raw_session(port, [*LMTP_TWO_RCPTS, body, b"QUIT\r\n"])
        assert [r[:3] for r in _final_replies(replies)] == [b"250", b"250"]
        await svc.settle()
        assert count(svc, InboundMessage) == 1
        assert count(svc, Report) == 1
    finally:
        await svc.stop()
        svc.db.dispose()


async def test_raw_bytes_are_kept_exactly(service: Service) -> None:
    """The stored message is byte for byte what the client sent (after SMTP dot-unstuffing)."""
    raw = report_bytes(body="line one\n.leading dot\nend\n").replace(b"\n", b"\r\n")
    await asend(smtp_port(service), raw)
    with service.db.session() as s:
        stored = s.scalar(select(InboundMessage))
    assert stored is not None
    assert stored.raw == raw
    assert stored.message_id == "<r1@reporter.test>"
    assert stored.rcpt_tos == [CONTACT]
    assert stored.mail_from == "rita@reporter.test"
    assert count(service, OutboxMessage) == 0  # nothing is processed before the worker runs
