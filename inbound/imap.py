"""IMAP intake: take reports out of a mailbox the way the SMTP edge takes them off the wire.

Safety rules (the reason for the order of every step below):

1. **Store before move.** Fetched messages (``BODY.PEEK[]``, so reading them changes nothing
   on the server) are committed a group at a time with :func:`mailer.intake.store_batch`
   *before* the group is moved to ``processed_mailbox`` with one ``UID MOVE``, or, on a
   server without MOVE, flagged ``\\Seen`` plus the keyword ``$SecMailerStored`` with one
   ``UID STORE`` (:meth:`ImapPoller._ingest`: the next group is fetched and committed while
   the server moves the last one). A crash between the commit and the move leaves the
   messages where they were; the next scan fetches them again and the duplicate check
   (Message-ID + SHA-256) turns each into the same stored row, so it becomes one report,
   then it is moved.
2. **Never delete, never expunge.** A message over ``max_message_size`` (found with ``UID
   SEARCH LARGER`` and measured with ``RFC822.SIZE`` before any body is fetched) is left in
   place, logged at ERROR with ``ALERT`` and listed in :attr:`ImapPoller.oversized`. A
   message expunged by another client between SEARCH and FETCH is simply gone: it is skipped.
3. **UID commands only** (UID SEARCH / FETCH / MOVE / STORE): sequence numbers shift
   under concurrent expunges, UIDs do not. UIDVALIDITY is tracked in memory; when it
   changes (mailbox recreated) every message still in the mailbox is scanned again
   and the duplicate check keeps that from creating a second report.
4. **First start takes unread mail only.** Messages already ``\\Seen`` when the poller
   first selects the mailbox are left alone (:func:`import_since` takes them on
   request); everything that arrives afterwards is taken, read or not. Messages we
   flagged (``UNKEYWORD $SecMailerStored``) are never taken again.
5. **One poller per mailbox.** Several instances may watch the same mailbox; a lease row
   (:func:`mailer.db.acquire_lease`, renewed every third of ``lease_seconds``) lets one of
   them poll while the others stand by, and one of those takes over when the lease
   expires (the holder died) or is released (the holder stopped). The lease is asked for
   while connecting (a standby instance asks first and connects only once it holds it);
   nothing is selected or fetched before it is held.
6. **Keep running.** Any failure (network, TLS, login, BYE, a database error) closes
   the session, is logged and shown in :attr:`ImapPoller.health`, and the poller
   reconnects with exponential backoff. IDLE is used when offered, re-issued every
   ``idle_seconds`` (servers drop idlers silently), and the mailbox is scanned at
   least every ``poll_seconds`` in any case.

The IMAP session and codecs are in :mod:`inbound.imap_client`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

from inbound.imap_client import (
    COMMAND_TIMEOUT,
    FETCH_MAX_BYTES,
    KEYWORD,
    SIZE_FETCH_MESSAGES,
    SIZE_SLICE,
    SMALL_MESSAGE,
    ImapConnection,
    ImapError,
    Oversized,
    chunks,
    describe_error,
    fetch_literals,
    fetch_sizes,
    imap_date,
    return_path,
)
from mailer import logs
from mailer.clock import SYSTEM, Clock
from mailer.config import ImapConfig
from mailer.db import Database, acquire_lease, release_lease
from mailer.intake import Received, Stored, header_message_id, store_batch
from mailer.loop import backoff, run_every

log = logging.getLogger(__name__)


@dataclass
class _Counters:
    stored: int = 0
    duplicates: int = 0
    moved: int = 0
    flagged: int = 0
    vanished: int = 0


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


# --- the poller -----------------------------------------------------------------------------


class _StandBy(Exception):
    """Another instance took the mailbox's lease while we connected: drop the session and stand by."""


@dataclass
class _MailboxState:
    """What we know about the selected mailbox, in memory only (see rule 3 and 4)."""

    uidvalidity: int | None = None
    baseline: int = 0  # read messages with UID <= baseline are left alone
    last_uid: int = 0
    skipped: set[int] = field(default_factory=set)  # oversized UIDs already alerted on


@dataclass
class _Flow:
    """One scan's messages between the server and the database (see :meth:`ImapPoller._ingest`)."""

    group: list[tuple[int, bytes]] = field(default_factory=list)  # fetched, for the next commit
    group_bytes: int = 0
    storing: asyncio.Future[list[Stored]] | None = None  # the commit under way
    storing_uids: list[int] = field(default_factory=list)  # what it stores
    stored: int = 0  # committed (duplicates included)

    def add(self, fetched: list[tuple[int, bytes]]) -> None:
        self.group.extend(fetched)
        self.group_bytes += sum(len(raw) for _, raw in fetched)


def _store_fetched(db: Database, where: str, username: str, fetched: list[tuple[int, bytes]]) -> list[Stored]:
    """In a worker thread: build the rows (hashing, Return-Path) and commit them in one transaction."""
    batch = [Received(raw, "imap", f"{where};UID={uid}", return_path(raw), (username,)) for uid, raw in fetched]
    return store_batch(db, batch)


class ImapPoller:
    """Watches one mailbox and stores every new message; see the module docstring for the rules."""

    #: messages committed in one transaction, then moved with one command (its answer has a line per
    #: message: no more than SIZE_SLICE, see there)
    commit_batch = SIZE_SLICE

    def __init__(
        self,
        config: ImapConfig,
        db: Database,
        *,
        on_stored: Callable[[Stored], None] | None = None,
        backoff_initial: float = 1.0,
        backoff_max: float = 300.0,
        command_timeout: float = COMMAND_TIMEOUT,
        clock: Clock = SYSTEM,
        lease_seconds: float = 30.0,
    ) -> None:
        self.config = config
        self.db = db
        self.on_stored = on_stored
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.command_timeout = command_timeout
        self.clock = clock
        self.oversized: list[Oversized] = []
        self.counters = _Counters()
        self._mailbox = _MailboxState()
        self._connected = False
        self._state = "starting"
        self._capabilities: dict[str, bool] = {}
        self._last_error: str | None = None
        self._last_error_at: datetime | None = None
        self._down_since: datetime | None = None  # the first failure since the last connect
        self._last_poll_at: datetime | None = None
        self._failures = 0
        self._retries = 0  # reconnect waits since the last session that lasted
        self.polled = asyncio.Event()  # set after every completed scan (tests wait on it)
        self.lease_seconds = lease_seconds
        self.lease_name = f"imap:{config.username}@{config.host}:{config.port}/{config.mailbox}"[:255]
        self._standby_for: str | None = None  # the instance holding the mailbox's lease while we stand by

    # -- health --------------------------------------------------------------------------

    @property
    def health(self) -> dict[str, Any]:
        """What the poller is doing and what is wrong, JSON-ready."""
        return {
            "connected": self._connected,
            "state": self._state,
            "mailbox": self.config.mailbox,
            "last_error": self._last_error,
            "last_error_at": _iso(self._last_error_at),
            "disconnected_since": _iso(self._down_since),
            "last_poll_at": _iso(self._last_poll_at),
            "consecutive_failures": self._failures,
            "idle": self._capabilities.get("IDLE", False),
            "move": self._capabilities.get("MOVE", False),
            "uidvalidity": self._mailbox.uidvalidity,
            "last_uid": self._mailbox.last_uid,
            "stored": self.counters.stored,
            "duplicates": self.counters.duplicates,
            "oversized": len(self.oversized),
            "standby_for": self._standby_for,
        }

    # -- the loop ------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve until cancelled; every failure is logged, shown in :attr:`health`, and retried with backoff."""
        try:
            await run_every(self._connect_and_serve, every=self._next_wait, name="IMAP intake", log=log)
        finally:
            # hand the mailbox to a standby instance at once instead of after the lease
            with contextlib.suppress(Exception):
                await asyncio.to_thread(release_lease, self.db, self.lease_name)

    async def _take_lease(self) -> bool:
        """True when this instance holds (or just took) the mailbox's lease; else stand by."""
        holder = await asyncio.to_thread(acquire_lease, self.db, self.lease_name, now=self.clock(), seconds=self.lease_seconds)
        if holder is None:
            if self._standby_for is not None:
                log.info("IMAP: taking over %s from %s", self.config.mailbox, self._standby_for)
            self._standby_for = None
            return True
        if self._standby_for is None:
            log.info("IMAP: %s is polled by %s; standing by", self.config.mailbox, holder)
        self._standby_for = holder
        self._state = "standby"
        return False

    async def _keep_lease(self) -> None:
        """Renew the lease while serving; lost (another instance took it after a stall) ends the session."""
        while True:
            await asyncio.sleep(self.lease_seconds / 3)
            if not await self._take_lease():
                raise ImapError(f"the lease on {self.config.mailbox} passed to {self._standby_for}; standing by")

    async def _serve_leased(self, conn: ImapConnection) -> None:
        serve = asyncio.ensure_future(self._serve(conn))
        keep = asyncio.ensure_future(self._keep_lease())
        try:
            done, _ = await asyncio.wait({serve, keep}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (serve, keep):
                task.cancel()
            await asyncio.wait({serve, keep})
        for task in done:
            task.result()

    async def _connect_and_serve(self) -> None:
        """One session, from connect until it fails; the failure is recorded, not raised."""
        healthy_after = min(self.config.idle_seconds, self.config.poll_seconds)
        started: float | None = None
        lease: asyncio.Future[bool] | None = None
        try:
            if self._standby_for is not None:  # standing by: no connection before the lease is ours
                if not await self._take_lease():
                    return
            else:  # the lease is usually ours: ask for it while connecting (rule 5 still holds before SELECT)
                lease = asyncio.ensure_future(self._take_lease())
            async with self._session(lease) as conn:
                started = time.monotonic()
                await self._serve_leased(conn)
        except _StandBy:
            return
        except Exception as exc:  # noqa: BLE001 - the service keeps running; health says why
            if started is not None and time.monotonic() - started >= healthy_after:
                self._retries = 0  # a session that lasted: start the backoff over
            self._record_failure(exc, self._reconnect_delay())
        finally:
            if lease is not None and not lease.done():  # the connection failed first: the lease answer still counts
                with contextlib.suppress(Exception):
                    await asyncio.shield(lease)
        self._state = "backoff"

    def _reconnect_delay(self) -> float:
        return backoff(self._retries + 1, base=self.backoff_initial, cap=self.backoff_max)

    def _next_wait(self) -> float:
        """The wait before the next connect (called once per session by :func:`run_every`)."""
        if self._standby_for is not None:
            return self.lease_seconds / 3
        delay = self._reconnect_delay()
        self._retries += 1
        return delay

    def _record_failure(self, exc: Exception, delay: float) -> None:
        self._connected = False
        self._failures += 1
        self._last_error = str(exc) if isinstance(exc, ImapError) else describe_error(exc)
        self._last_error_at = self.clock()
        self._down_since = self._down_since or self._last_error_at
        if isinstance(exc, ImapError):
            log.warning("IMAP %s@%s: %s; reconnecting in %.1fs", self.config.username, self.config.host, exc, delay)
        else:
            log.error("IMAP intake fault: %s; reconnecting in %.1fs", self._last_error, delay, exc_info=exc)

    @contextlib.asynccontextmanager
    async def _session(self, lease: Awaitable[bool] | None = None) -> AsyncIterator[ImapConnection]:
        """A logged-in connection with the mailbox selected; closed on the way out, whatever happens.

        ``lease`` (:meth:`_take_lease` under way) is awaited before the session is used:
        when another instance holds the mailbox, the connection is closed and :class:`_StandBy` raised.
        """
        self._state = "connecting"
        conn = ImapConnection(self.config, self.command_timeout)
        try:
            await conn.open()
            capabilities = {name: conn.has(name) for name in ("IDLE", "MOVE")}
            if conn.has("MOVE"):
                await conn.ensure_mailbox(self.config.processed_mailbox)
            if lease is not None and not await lease:
                raise _StandBy
            self._capabilities = capabilities
            self._connected = True
            self._down_since = None
            log.info(
                "IMAP: watching %s@%s:%d/%s (idle=%s, move=%s)", self.config.username, self.config.host,
                self.config.port, self.config.mailbox, conn.has("IDLE"), conn.has("MOVE"),
            )
            yield conn
        except _StandBy:
            await conn.logout()
            raise
        except BaseException:  # including cancellation: drop the connection, no goodbye
            conn.abort()
            raise
        else:
            await conn.logout()
        finally:
            self._connected = False

    async def _select(self, conn: ImapConnection) -> None:
        """SELECT the mailbox; the first time sets the baseline (rule 4), a new UIDVALIDITY rescans (rule 3)."""
        validity, uidnext = await conn.select(self.config.mailbox)
        state = self._mailbox
        if state.uidvalidity is None:
            self._mailbox = _MailboxState(uidvalidity=validity, baseline=max(uidnext - 1, 0))
        elif state.uidvalidity != validity:
            log.warning(
                "IMAP: UIDVALIDITY of %s changed from %d to %d (mailbox recreated): rescanning all of it; "
                "duplicates are recognised", self.config.mailbox, state.uidvalidity, validity,
            )
            self._mailbox = _MailboxState(uidvalidity=validity, baseline=0)

    async def _serve(self, conn: ImapConnection) -> None:
        """(Re-)select, scan, then wait for a push or the poll/watchdog interval, forever.

        SELECT every time: some servers (Dovecot) keep serving a stale view of a selected
        mailbox that was deleted and recreated, and only a new SELECT shows the new UIDVALIDITY.
        """
        interval = min(self.config.idle_seconds, self.config.poll_seconds)
        while True:
            await self._select(conn)
            await self.scan(conn)
            if conn.has("IDLE"):
                self._state = "starting idle"
                await conn.idle(interval, on_idling=self._idling)
            else:
                self._state = "waiting"
                await conn.wait(interval)
                await conn.noop()

    def _idling(self) -> None:
        self._state = "idle"

    # -- one scan ------------------------------------------------------------------------

    async def scan(self, conn: ImapConnection) -> int:
        """Take every new message in the selected mailbox; returns how many were stored (duplicates included)."""
        self._state = "scanning"
        uids = await self._candidates(conn)
        count = await self._ingest(conn, uids) if uids else 0
        self._last_poll_at = self.clock()
        self._failures = 0
        self.polled.set()
        return count

    async def _candidates(self, conn: ImapConnection) -> list[int]:
        state = self._mailbox
        unseen = await conn.search("UNSEEN", "UNKEYWORD", KEYWORD)
        # "N:*" always matches the highest UID, even below N: filter on our side.
        newer = [uid for uid in await conn.search("UID", f"{state.baseline + 1}:*", "UNKEYWORD", KEYWORD) if uid > state.baseline]
        return sorted((set(unseen) | set(newer)) - state.skipped)

    async def _ingest(self, conn: ImapConnection, uids: list[int]) -> int:
        """Size check, then fetch, store and move/flag in groups; returns how many were stored.

        Bodies are fetched with one ``UID FETCH`` per batch (:func:`~inbound.imap_client.chunks`)
        until a group of :attr:`commit_batch` messages (or ``FETCH_MAX_BYTES``) is together. The
        group is committed in one transaction in a worker thread; meanwhile the group before it,
        whose commit has returned, is moved or flagged with one command over its UID set, and the
        next group is fetched. Nothing is moved before the commit that stored it has returned
        (rule 1). Should anything fail, a commit under way still finishes, and nothing more is moved.
        """
        sizes, large = await self._sizes(conn, uids)
        too_big = [uid for uid in uids if uid in large and sizes[uid] > self.config.max_message_size]
        for start in range(0, len(too_big), SIZE_SLICE):
            await self._alert_oversized(conn, too_big[start:start + SIZE_SLICE], sizes)
        skip = set(too_big)
        wanted = [uid for uid in uids if uid in sizes and uid not in skip]
        flow = _Flow()
        try:
            for batch in chunks(wanted, sizes):
                if flow.group and flow.group_bytes + sum(sizes[uid] for uid in batch if uid in large) > FETCH_MAX_BYTES:
                    await self._hand_over(conn, flow)
                flow.add(await self._fetch_batch(conn, batch))
                if len(flow.group) >= self.commit_batch or flow.group_bytes >= FETCH_MAX_BYTES:
                    await self._hand_over(conn, flow)
            while flow.group or flow.storing is not None:
                await self._hand_over(conn, flow)
        except BaseException:
            if flow.storing is not None:
                with contextlib.suppress(Exception):
                    await asyncio.shield(flow.storing)
            raise
        return flow.stored

    async def _sizes(self, conn: ImapConnection, uids: list[int]) -> tuple[dict[int, int], set[int]]:
        """The size check (rule 2): ``{uid: size}`` for ``uids``, and which of them were measured.

        ``UID SEARCH LARGER`` (the server compares RFC822.SIZE) picks out the few messages that
        need their own ``RFC822.SIZE``: those that may be over the limit or too big to batch
        blindly. Every other one counts as the bound that search used. A measured UID that is
        gone meanwhile is left out (nothing to fetch).
        """
        bound = min(self.config.max_message_size, SMALL_MESSAGE)
        wanted = set(uids)
        large = [uid for uid in await conn.search("LARGER", str(bound)) if uid in wanted]
        sizes = dict.fromkeys(uids, bound)
        for uid in large:
            del sizes[uid]
        for start in range(0, len(large), SIZE_FETCH_MESSAGES):
            part = large[start:start + SIZE_FETCH_MESSAGES]
            sizes.update((uid, size) for uid, size in fetch_sizes(await conn.fetch(part, "(UID RFC822.SIZE)")).items()
                         if uid in wanted)
        return sizes, {uid for uid in large if uid in sizes}

    async def _fetch_batch(self, conn: ImapConnection, batch: list[int]) -> list[tuple[int, bytes]]:
        """One ``UID FETCH BODY.PEEK[]`` over a UID set; a message expunged meanwhile is skipped."""
        await self.before_fetch(batch)
        bodies = fetch_literals(await conn.fetch(batch, "(UID BODY.PEEK[])"))
        fetched: list[tuple[int, bytes]] = []
        for uid in batch:
            raw = bodies.get(uid)
            if raw is None:
                self.counters.vanished += 1
                log.info(
                    "IMAP: UID %d in %s vanished before it was fetched (expunged elsewhere); skipped", uid, self.config.mailbox
                )
                continue
            fetched.append((uid, raw))
        return fetched

    async def _hand_over(self, conn: ImapConnection, flow: _Flow) -> None:
        """Wait for the commit under way, start committing the group fetched since, then move/flag
        what the finished commit stored (the server moves while we commit)."""
        done: list[int] = []
        if flow.storing is not None:
            await asyncio.shield(flow.storing)  # cancelled meanwhile: the commit still finishes, in the background
            done, flow.storing, flow.storing_uids = flow.storing_uids, None, []
            flow.stored += len(done)
        if flow.group:
            flow.storing = asyncio.ensure_future(self._store(flow.group))
            flow.storing_uids = [uid for uid, _ in flow.group]
            flow.group, flow.group_bytes = [], 0
        for start in range(0, len(done), SIZE_SLICE):
            await self._mark_processed(conn, done[start:start + SIZE_SLICE])

    async def before_fetch(self, uids: list[int]) -> None:
        """Hook called before each body fetch (tests use it to race another client); does nothing."""

    async def _store(self, fetched: list[tuple[int, bytes]]) -> list[Stored]:
        """The durable commit of a whole batch in one transaction (rule 1), then ``on_stored`` for each."""
        state = self._mailbox
        where = f"imap://{self.config.host}:{self.config.port}/{self.config.mailbox};UIDVALIDITY={state.uidvalidity}/"
        results = await asyncio.to_thread(_store_fetched, self.db, where, self.config.username, fetched)
        for (uid, raw), stored in zip(fetched, results, strict=True):
            state.last_uid = max(state.last_uid, uid)
            self.counters.stored += 1
            self.counters.duplicates += stored.duplicate
            log.debug("IMAP: UID %d stored as inbound %d%s", uid, stored.id, " (duplicate)" if stored.duplicate else "")
            logs.received("imap", len(raw), header_message_id(raw), stored.id, stored.duplicate)
            if self.on_stored is not None:
                self.on_stored(stored)
        return results

    async def _mark_processed(self, conn: ImapConnection, uids: list[int]) -> None:
        """Only after the commit (rule 1): MOVE to the processed mailbox, or flag where MOVE is missing."""
        if conn.has("MOVE"):
            await conn.move(uids, self.config.processed_mailbox)
            self.counters.moved += len(uids)
        else:
            await conn.flag(uids)
            self.counters.flagged += len(uids)
        log.info("IMAP: %d message(s) stored and %s", len(uids), "moved" if conn.has("MOVE") else "flagged")

    async def _alert_oversized(self, conn: ImapConnection, uids: list[int], sizes: dict[int, int]) -> None:
        headers = fetch_literals(await conn.fetch(uids, "(UID BODY.PEEK[HEADER.FIELDS (FROM SUBJECT MESSAGE-ID DATE)])"))
        state = self._mailbox
        for uid in uids:
            summary = " ".join(headers.get(uid, b"").decode("utf-8", errors="replace").split())
            record = Oversized(
                self.config.mailbox, state.uidvalidity or 0, uid, sizes[uid], self.config.max_message_size,
                summary, self.clock(),
            )
            self.oversized.append(record)
            state.skipped.add(uid)
            log.error(
                "ALERT: IMAP message UID %d in %s is %d bytes, over the %d-byte limit; left in place, "
                "NOT imported (%s). Handle it by hand.", uid, self.config.mailbox, record.size, record.limit, summary,
            )

    # -- one-off import ------------------------------------------------------------------

    async def import_since(self, since: date) -> int:
        """Take every message (read or not) that arrived on or after ``since``; returns how many were new."""
        before = self.counters.stored - self.counters.duplicates
        async with self._session() as conn:
            self._state = "importing"
            await self._select(conn)
            uids = await conn.search("SINCE", imap_date(since), "UNKEYWORD", KEYWORD)
            uids = [uid for uid in uids if uid not in self._mailbox.skipped]
            if uids:
                await self._ingest(conn, uids)
        return self.counters.stored - self.counters.duplicates - before


async def import_since(
    config: ImapConfig, db: Database, since: date, *, on_stored: Callable[[Stored], None] | None = None
) -> int:
    """``mailer imap import --since DATE``: import read and unread mail received since ``since``.

    Same rules as the poller (store, then move/flag; oversized left in place).
    Returns the number of newly stored messages.

    :raises ImapError: when the server cannot be reached or refuses.
    """
    return await ImapPoller(config, db, on_stored=on_stored).import_since(since)
