"""The one place that talks SMTP to the relay (or writes the local maildir).

Temporary failures (4xx, connection problems) are retried with exponential
backoff until the row's ``deliver_until``; then the row is ``failed`` and an
alert is logged and recorded. Permanent failures (5xx) are recorded at once.
aiosmtplib's types stop here: callers see :class:`DeliveryError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import mailbox
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Protocol, cast
from urllib.parse import urlsplit

import aiosmtplib
from sqlalchemy import LargeBinary, Table, bindparam, case, select, update
from sqlalchemy.orm import Session

from mailer import logs
from mailer.atrest import EncryptedBytes
from mailer.clock import SYSTEM, Clock
from mailer.config import RelayConfig
from mailer.db import Database, claim_for, claimable, release_claims, renew_claims
from mailer.errors import DeliveryError
from mailer.loop import backoff, run_every, yield_to_intake
from mailer.models import Event, OutboxMessage, OutboxState, Report
from mailer.outgoing import MailKind

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

    async def close(self) -> None:
        """Close a connection kept open between sends (nothing to do for a maildir)."""
        ...


class MaildirTransport:
    """Writes each message into a local maildir (the embedded default: inspectable, no relay)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _write(self, raw: bytes) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        box = mailbox.Maildir(str(self.path), create=True)  # directories 0700
        key = box.add(raw)
        fd = os.open(os.path.join(self.path, "new", key), os.O_RDONLY)
        try:
            os.fchmod(fd, 0o600)  # private whatever the umask
            os.fsync(fd)
        finally:
            os.close(fd)

    async def send(self, envelope: Envelope) -> None:
        try:
            await asyncio.to_thread(self._write, envelope.raw)
        except OSError as exc:
            raise DeliveryError(f"maildir write failed: {exc}", temporary=True) from exc

    async def close(self) -> None:
        """Nothing is kept open between deliveries."""


class SmtpTransport:
    """Delivers to the relay over one SMTP connection, reused for the next message while it lasts.

    The connection is checked with NOOP when it sat idle, and dropped after any
    error (the message is then retried by the sender with its backoff) and when
    the sender has nothing more to send (:meth:`close`).
    """

    IDLE_CHECK = 1.0  # seconds idle after which a NOOP checks the connection before it is reused

    def __init__(self, config: RelayConfig) -> None:
        parts = urlsplit(config.url)
        self.host = parts.hostname or "localhost"
        self.tls = parts.scheme == "smtps"
        self.port = parts.port or (465 if self.tls else 25)
        self.config = config
        # read once, at start: a missing password file stops the start (mailer.config.check_files names it)
        self.password = config.secret() or None
        self._client: aiosmtplib.SMTP | None = None
        self._used_at = 0.0
        self.connections = 0  # opened so far (tests and the benchmark read it)

    async def _connection(self) -> aiosmtplib.SMTP:
        loop = asyncio.get_running_loop()
        client = self._client
        if client is not None and client.is_connected and loop.time() - self._used_at > self.IDLE_CHECK:
            try:
                await client.noop()
            except (aiosmtplib.SMTPException, OSError, TimeoutError):
                self._drop()
                client = None
        if client is None or not client.is_connected:
            client = aiosmtplib.SMTP(
                hostname=self.host, port=self.port, use_tls=self.tls,
                start_tls=self.config.starttls or None if not self.tls else False,
                username=self.config.username or None, password=self.password,
                timeout=self.config.timeout_seconds,
            )
            await client.connect()
            self._client = client
            self.connections += 1
        return client

    def _drop(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    async def send(self, envelope: Envelope) -> None:
        try:
            client = await self._connection()
            errors, _response = await client.sendmail(envelope.mail_from, envelope.rcpt_tos, envelope.raw)
            self._used_at = asyncio.get_running_loop().time()
        except aiosmtplib.SMTPRecipientsRefused as exc:
            codes = [r.code for r in exc.recipients]
            raise DeliveryError(f"all recipients refused: {exc}", temporary=all(400 <= c < 500 for c in codes)) from exc
        except aiosmtplib.SMTPResponseException as exc:
            self._drop()
            temporary = 400 <= exc.code < 500
            raise DeliveryError(f"relay answered {exc.code} {exc.message}", temporary=temporary, code=exc.code) from exc
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            self._drop()
            raise DeliveryError(f"relay unreachable: {exc}", temporary=True) from exc
        if errors:
            refused = ", ".join(f"{addr}: {resp.code}" for addr, resp in errors.items())
            log.warning("some recipients refused: %s", refused)

    async def close(self) -> None:
        """QUIT the open connection, if any."""
        client, self._client = self._client, None
        if client is not None and client.is_connected:
            try:
                await client.quit()
            except (aiosmtplib.SMTPException, OSError, TimeoutError):
                client.close()


def transport_for(url: str, config: RelayConfig) -> Transport:
    if url.startswith("maildir:"):
        return MaildirTransport(Path(url.removeprefix("maildir:")))
    return SmtpTransport(config.model_copy(update={"url": url}))


#: one attempt: the row as sent (its signed bytes, if signed now) and the relay's refusal, if any
Attempt = tuple[OutboxMessage, DeliveryError | None]

#: the outbox's bytes column, and the plain type its bytes are bound with once sealed (:meth:`Sender._sign`)
_RAW = cast(EncryptedBytes, cast(Table, OutboxMessage.__table__).c.raw.type)
_SEALED = LargeBinary()

@functools.lru_cache(maxsize=64)
def _outcome_update(columns: tuple[str, ...]) -> Any:
    """``UPDATE outbox SET <columns> WHERE id = :row_id``, built once per set of columns an outcome writes."""
    table = cast(Table, OutboxMessage.__table__)
    return update(table).where(table.c.id == bindparam("row_id")).values(
        {name: bindparam(name, type_=_SEALED if name == "raw" else table.c[name].type) for name in columns})


def _ids(outcomes: list[Attempt]) -> frozenset[int]:
    return frozenset(row.id for row, _ in outcomes)


#: acknowledgements first (the reporters' SLA), then in the order queued
ACKS_FIRST = (case((OutboxMessage.kind == MailKind.ACK.value, 0), else_=1), OutboxMessage.id)


class Sender:
    """Delivers the outbox: claims due rows, sends them one after the other, records the outcomes in batches.

    Rows are *claimed* (:func:`mailer.db.claim`) so several instances never send
    one row twice; the claim is renewed while the batch is being sent and expires
    ``lease`` seconds after an instance died. A row sent but not yet recorded when
    the process dies is sent again after the lease, with the same Message-ID.
    """

    BATCH = 50  # rows claimed at once
    CHUNK = 8  # rows signed before the first of them is sent
    RECORD_EVERY = 10  # outcomes recorded per transaction (across batches; the rest when a pass ends)

    SIGNING = 4  # gpg signatures made at once (subprocesses: they use every core)

    def __init__(self, db: Database, transport: Transport, *, clock: Clock = SYSTEM, lease: float = 30.0,
                 signer: Callable[[bytes, tuple[str, ...]], bytes] | None = None,
                 intake_busy: Callable[[], bool] | None = None) -> None:
        self.db = db
        #: True while the intake commits DATA: a batch waits for it a moment (:func:`mailer.loop.yield_to_intake`)
        self.intake_busy = intake_busy
        self.transport = transport
        #: signs mail queued unsigned (``needs_signature``): :meth:`outbound.outbox.Outbox.sign`
        self.signer = signer
        self.clock = clock
        self.lease = lease
        self.wake = asyncio.Event()
        #: set at shutdown: the row being sent is finished and recorded, the rest handed back
        self.stopping = asyncio.Event()
        self.busy = False  # inside a drain (shutdown waits for the mail being sent)
        self._held: list[int] = []
        #: rows signed in this pass (by id: the very object signed, and its bytes as stored), not stored yet
        self._signed: dict[int, tuple[OutboxMessage, bytes]] = {}

    def _claim(self, skip: frozenset[int] = frozenset()) -> list[OutboxMessage]:
        now = self.clock()
        due = (
            select(OutboxMessage.id)
            .where(OutboxMessage.state == OutboxState.PENDING.value, OutboxMessage.next_attempt_at <= now,
                   claimable(OutboxMessage, now))
            # acknowledgements first (the reporters' SLA), then in order
            .order_by(*ACKS_FIRST)
            .limit(self.BATCH)
        )
        if skip:
            due = due.where(OutboxMessage.id.not_in(sorted(skip)))
        with self.db.reading() as session:  # outside the write lock; the claim re-checks every row
            candidates = list(session.scalars(due))
        if not candidates:
            return []
        got = claim_for(self.db, OutboxMessage, candidates, now=now, lease=self.lease,
                        where=OutboxMessage.state == OutboxState.PENDING.value)
        if not got:
            return []
        with self.db.reading() as session:  # ours now: the rows (and their sealed bytes) are read without the lock
            return list(session.scalars(select(OutboxMessage).where(OutboxMessage.id.in_(got)).order_by(*ACKS_FIRST)))

    def _record_many(self, outcomes: list[Attempt]) -> None:
        """The outcomes of a batch in one transaction, with the bytes signed for it (:meth:`_sign`).

        The rows' current state is read without their bytes; a row no longer ours
        (taken over after our lease ran out, dismissed) is left alone.
        """
        now = self.clock()
        table = cast(Table, OutboxMessage.__table__)
        # the tracking ids (for the log lines) never change: read before the write lock
        report_ids = {row.report_id for row, _ in outcomes if row.report_id is not None}
        tracking: dict[int, str] = {}
        if report_ids:
            with self.db.reading() as session:
                query = select(Report.id, Report.tracking_id).where(Report.id.in_(report_ids))
                tracking.update((report_id, tracking_id) for report_id, tracking_id in session.execute(query))
        with self.db.session() as session:
            current = {
                found.id: found for found in session.execute(
                    select(table.c.id, table.c.claimed_by, table.c.state, table.c.attempts, table.c.deliver_until)
                    .where(table.c.id.in_([row.id for row, _ in outcomes])).with_for_update()
                )
            }
            changes: dict[tuple[str, ...], list[dict[str, object]]] = {}
            for row, error in outcomes:
                found = current.get(row.id)
                if found is None:  # removed meanwhile (`mailer outbox dismiss`, retention)
                    continue
                if found.claimed_by not in (None, self.db.owner) or found.state != OutboxState.PENDING.value:
                    log.warning("outgoing message %s was taken over by %s while we sent it", row.id, found.claimed_by)
                    continue
                values = self._apply(session, row, attempts=found.attempts, deliver_until=found.deliver_until,
                                     error=error, now=now, tracking=tracking.get(row.report_id or 0))
                signed = self._signed.get(row.id)
                if signed is not None and signed[0] is row:  # signed now (a row claimed again is another object)
                    values["raw"], values["needs_signature"] = signed[1], False
                changes.setdefault(tuple(sorted(values)), []).append({**values, "row_id": row.id})
            for columns, params in changes.items():
                session.connection().execute(_outcome_update(columns), params)
        for row, _ in outcomes:
            self._signed.pop(row.id, None)

    def _apply(self, session: Session, row: OutboxMessage, *, attempts: int, deliver_until: datetime,
               error: DeliveryError | None, now: datetime, tracking: str | None) -> dict[str, object]:
        """The row's new column values for this outcome (logged, and alerted on when it failed for good)."""
        row.attempts = attempts + 1
        values: dict[str, object] = {"attempts": row.attempts, "claimed_by": None, "claimed_until": None}
        if error is None:
            values.update(state=OutboxState.SENT.value, sent_at=now, last_error=None)
            logs.delivery(row, "sent", None, tracking)
            return values
        values["last_error"] = row.last_error = str(error)[:4000]
        expired = now >= deliver_until
        if error.temporary and not expired:
            delay = backoff(row.attempts, base=RETRY_BASE.total_seconds(), cap=MAX_BACKOFF.total_seconds())
            values["next_attempt_at"] = now + timedelta(seconds=delay)
            logs.delivery(row, "deferred", error, tracking)
            return values
        values["state"] = OutboxState.FAILED.value
        logs.delivery(row, "failed", error, tracking)
        reason = "retry deadline passed" if error.temporary else "permanent failure"
        log.error("ALERT: outgoing message %s to %s not delivered (%s): %s", row.id, row.rcpt_tos, reason, error)
        session.add(
            Event(report_id=row.report_id, kind="delivery.failed", at=now,
                  detail={"outbox_id": row.id, "reason": reason, "error": row.last_error, "to": row.rcpt_tos})
        )
        return values

    async def _keep_claims(self) -> None:
        """Renew the claims on the rows in hand every third of the lease while a batch is sent."""
        while True:
            await asyncio.sleep(self.lease / 3)
            with contextlib.suppress(Exception):
                await asyncio.to_thread(renew_claims, self.db, OutboxMessage, list(self._held), now=self.clock(), lease=self.lease)

    async def drain(self) -> int:
        """Attempt every message due now once; returns how many were sent."""
        sent = 0
        seen: set[int] = set()  # attempted in this batch (the rest is handed back)
        failed: set[int] = set()  # not taken again in this pass (sent rows are no longer due anyway)
        # attempted, not recorded yet: recorded RECORD_EVERY at a time across batches (one write transaction
        # per ~5 mails was a sixth of SQLite's write lock in a burst), and all of them when the pass ends.
        # Until then they stay ours: the next claim skips them and their claims are renewed.
        outcomes: list[Attempt] = []
        keeper = asyncio.ensure_future(self._keep_claims())
        self.busy = True
        self._signed.clear()  # what an aborted pass signed was never stored: its rows are signed again
        try:
            while not self.stopping.is_set() and (rows := await self._next_batch(frozenset(failed) | _ids(outcomes))):
                seen.clear()
                self._held = [row.id for row in rows] + sorted(_ids(outcomes))
                # signed a chunk at a time, the next chunk while this one is sent: the first mail
                # goes out after a few signatures, not after the whole batch's
                chunks = [rows[i:i + self.CHUNK] for i in range(0, len(rows), self.CHUNK)]
                signing = asyncio.ensure_future(self._sign(chunks[0]))
                try:
                    for index, chunk in enumerate(chunks):
                        unsigned = await signing
                        if index + 1 < len(chunks):
                            signing = asyncio.ensure_future(self._sign(chunks[index + 1]))
                        for row in chunk:
                            if self.stopping.is_set():
                                break
                            seen.add(row.id)
                            outcomes.append(attempt := await self._attempt(row, unsigned))
                            if attempt[1] is None:
                                sent += 1
                            else:
                                failed.add(row.id)
                            if len(outcomes) >= self.RECORD_EVERY:
                                await self._flush(outcomes)
                        if self.stopping.is_set():
                            break
                finally:
                    # a chunk being signed is finished before its claims are handed back (its bytes are dropped)
                    await asyncio.shield(asyncio.gather(signing, return_exceptions=True))
                    # shielded: a cancel (shutdown) still records what went out, and hands back the rest
                    unsent = [row.id for row in rows if row.id not in seen]
                    for row_id in unsent:
                        self._signed.pop(row_id, None)
                    full = self.stopping.is_set() or len(outcomes) >= self.RECORD_EVERY
                    await asyncio.shield(self._settle(outcomes if full else [], unsent))
        finally:
            # the pass ended (nothing more due, shutdown, or an error): every attempt is recorded, shielded
            await asyncio.shield(self._settle(outcomes, []))
            self.busy = False
            keeper.cancel()
            self._held = []
            await self._close_transport()
        return sent

    async def _attempt(self, row: OutboxMessage, unsigned: dict[int, DeliveryError]) -> Attempt:
        """One row handed to the relay, or why not: its refusal, or its signing failed (a temporary failure)."""
        if row.id in unsigned:
            return row, unsigned[row.id]
        try:
            await self.transport.send(Envelope(row.mail_from, list(row.rcpt_tos), row.raw))
        except DeliveryError as exc:
            return row, exc
        return row, None

    async def _next_batch(self, skip: frozenset[int]) -> list[OutboxMessage]:
        """The next rows to send, claimed once the intake's pending commits went first (it shares the cores)."""
        await yield_to_intake(self.intake_busy)
        return await asyncio.to_thread(self._claim, skip)

    async def _sign(self, rows: list[OutboxMessage]) -> dict[int, DeliveryError]:
        """Sign the rows queued unsigned, several at once; returns the rows that could not be, with the reason.

        The signed bytes replace the row's in memory and are stored with the
        outcome of their attempt (:meth:`_record_many`), so a deferred mail is
        retried with the same bytes. A mail sent but not recorded (the process
        died in between) is signed again for its next attempt: the same
        Message-ID and content, a new signature.
        """
        pending = [row for row in rows if row.needs_signature]
        if not pending or self.signer is None:
            return {}
        signer, limit = self.signer, asyncio.Semaphore(self.SIGNING)

        def sign(row: OutboxMessage) -> tuple[bytes, bytes]:
            signed = signer(row.raw, tuple(row.encrypt_to or ()))
            return signed, _RAW.seal(signed)  # sealed at rest here, not under the write lock

        async def one(row: OutboxMessage) -> tuple[OutboxMessage, tuple[bytes, bytes] | Exception]:
            async with limit:
                try:
                    return row, await asyncio.to_thread(sign, row)
                except Exception as exc:  # noqa: BLE001 - recorded on the row as a temporary failure
                    return row, exc

        failed: dict[int, DeliveryError] = {}
        for row, result in await asyncio.gather(*(one(row) for row in pending)):
            if isinstance(result, Exception):
                log.error("outgoing message %s could not be signed (or encrypted): %s", row.id, result)
                failed[row.id] = DeliveryError(f"signing failed: {result}", temporary=True)
            else:
                row.raw, row.needs_signature = result[0], False
                self._signed[row.id] = (row, result[1])
        return failed

    async def _flush(self, outcomes: list[Attempt]) -> None:
        batch = list(outcomes)
        outcomes.clear()
        await asyncio.to_thread(self._record_many, batch)

    async def _settle(self, outcomes: list[Attempt], unsent: list[int]) -> None:
        """Record ``outcomes`` (the list is emptied) and hand back the claims on ``unsent``."""
        if outcomes:
            await self._flush(outcomes)
        if unsent:
            await asyncio.to_thread(release_claims, self.db, OutboxMessage, unsent)

    async def _close_transport(self) -> None:
        with contextlib.suppress(Exception):  # closing is best effort: the relay may already be gone
            await self.transport.close()

    async def run(self, poll_seconds: float = 5.0) -> None:
        """Deliver on wake-up (new rows) or every ``poll_seconds``; a failed pass is logged and retried."""
        await run_every(self.drain, every=poll_seconds, wake=self.wake, name="sender", log=log)
