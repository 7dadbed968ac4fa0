"""The one place that talks SMTP to the relay (or writes the local maildir).

Temporary failures (4xx, connection problems) are retried with exponential
backoff until the row's ``deliver_until``; then the row is ``failed`` and an
alert is logged and recorded. Permanent failures (5xx) are recorded at once.
aiosmtplib's types stop here: callers see :class:`DeliveryError`.
"""

from __future__ import annotations

import asyncio
import logging
import mailbox
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

import aiosmtplib
from sqlalchemy import select

from mailer.clock import SYSTEM, Clock
from mailer.config import RelayConfig
from mailer.db import Database
from mailer.errors import DeliveryError
from mailer.loop import backoff, run_every
from mailer.models import Event, OutboxMessage, OutboxState

log = logging.getLogger(__name__)

RETRY_BASE = timedelta(seconds=30)
MAX_BACKOFF = timedelta(hours=1)


@dataclass(frozen=True)
class Envelope:
    mail_from: str
    rcpt_tos: list[str]
    raw: bytes


class Transport(Protocol):
    async def send(self, envelope: Envelope) -> None:
        """:raises DeliveryError: with ``temporary`` set for retryable failures."""
        ...


class MaildirTransport:
    """Writes each message into a local maildir (the embedded default: inspectable, no relay)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _write(self, raw: bytes) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        box = mailbox.Maildir(str(self.path), create=True)
        key = box.add(raw)
        fd = os.open(os.path.join(self.path, "new", key), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    async def send(self, envelope: Envelope) -> None:
        try:
            await asyncio.to_thread(self._write, envelope.raw)
        except OSError as exc:
            raise DeliveryError(f"maildir write failed: {exc}", temporary=True) from exc


class SmtpTransport:
    def __init__(self, config: RelayConfig) -> None:
        parts = urlsplit(config.url)
        self.host = parts.hostname or "localhost"
        self.tls = parts.scheme == "smtps"
        self.port = parts.port or (465 if self.tls else 25)
        self.config = config

    async def send(self, envelope: Envelope) -> None:
        try:
            errors, _response = await aiosmtplib.send(
                envelope.raw,
                sender=envelope.mail_from,
                recipients=envelope.rcpt_tos,
                hostname=self.host,
                port=self.port,
                use_tls=self.tls,
                start_tls=self.config.starttls or None if not self.tls else False,
                username=self.config.username or None,
                password=self.config.secret() or None,
                timeout=self.config.timeout_seconds,
            )
        except aiosmtplib.SMTPRecipientsRefused as exc:
            codes = [r.code for r in exc.recipients]
            raise DeliveryError(f"all recipients refused: {exc}", temporary=all(400 <= c < 500 for c in codes)) from exc
        except aiosmtplib.SMTPResponseException as exc:
            temporary = 400 <= exc.code < 500
            raise DeliveryError(f"relay answered {exc.code} {exc.message}", temporary=temporary, code=exc.code) from exc
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            raise DeliveryError(f"relay unreachable: {exc}", temporary=True) from exc
        if errors:
            refused = ", ".join(f"{addr}: {resp.code}" for addr, resp in errors.items())
            log.warning("some recipients refused: %s", refused)


def transport_for(url: str, config: RelayConfig) -> Transport:
    if url.startswith("maildir:"):
        return MaildirTransport(Path(url.removeprefix("maildir:")))
    return SmtpTransport(config.model_copy(update={"url": url}))


class Sender:
    def __init__(self, db: Database, transport: Transport, *, clock: Clock = SYSTEM) -> None:
        self.db = db
        self.transport = transport
        self.clock = clock
        self.wake = asyncio.Event()

    def _due(self) -> list[OutboxMessage]:
        with self.db.session() as session:
            query = (
                select(OutboxMessage)
                .where(OutboxMessage.state == OutboxState.PENDING.value, OutboxMessage.next_attempt_at <= self.clock())
                .order_by(OutboxMessage.id)
                .limit(100)
            )
            return list(session.scalars(query))

    def _record(self, row_id: int, error: DeliveryError | None) -> None:
        now = self.clock()
        with self.db.session() as session:
            row = session.get(OutboxMessage, row_id)
            assert row is not None
            row.attempts += 1
            if error is None:
                row.state, row.sent_at, row.last_error = OutboxState.SENT.value, now, None
                return
            row.last_error = str(error)[:4000]
            expired = now >= row.deliver_until
            if error.temporary and not expired:
                delay = backoff(row.attempts, base=RETRY_BASE.total_seconds(), cap=MAX_BACKOFF.total_seconds())
                row.next_attempt_at = now + timedelta(seconds=delay)
                return
            row.state = OutboxState.FAILED.value
            reason = "retry deadline passed" if error.temporary else "permanent failure"
            log.error("ALERT: outgoing message %s to %s not delivered (%s): %s", row.id, row.rcpt_tos, reason, error)
            session.add(
                Event(report_id=row.report_id, kind="delivery.failed", at=now,
                      detail={"outbox_id": row.id, "reason": reason, "error": row.last_error, "to": row.rcpt_tos})
            )

    async def drain(self) -> int:
        """Attempt every message due now once; returns how many were sent."""
        sent = 0
        seen: set[int] = set()
        while rows := [row for row in await asyncio.to_thread(self._due) if row.id not in seen]:
            for row in rows:
                seen.add(row.id)
                error: DeliveryError | None = None
                try:
                    await self.transport.send(Envelope(row.mail_from, list(row.rcpt_tos), row.raw))
                except DeliveryError as exc:
                    error = exc
                await asyncio.to_thread(self._record, row.id, error)
                sent += error is None
        return sent

    async def run(self, poll_seconds: float = 5.0) -> None:
        """Deliver on wake-up (new rows) or every ``poll_seconds``; a failed pass is logged and retried."""
        await run_every(self.drain, every=poll_seconds, wake=self.wake, name="sender", log=log)
