"""IMAP intake: take reports out of a mailbox the way the SMTP edge takes them off the wire.

Safety rules (the reason for the order of every step below):

1. **Store before move.** A fetched batch is committed with :func:`mailer.intake.store_batch`
   (``BODY.PEEK[]``, so reading it changes nothing on the server) *before* it is moved
   to ``processed_mailbox`` with ``UID MOVE``, or, on a server without MOVE, flagged
   ``\\Seen`` plus the keyword ``$SecMailerStored``. A crash between the commit and the
   move leaves the message where it was; the next scan fetches it again and the
   duplicate check (Message-ID + SHA-256) turns it into the same stored row, so it
   becomes one report, then it is moved.
2. **Never delete, never expunge.** A message over ``max_message_size`` (checked with
   ``RFC822.SIZE`` before the body is fetched) is left in place, logged at ERROR with
   ``ALERT`` and listed in :attr:`ImapPoller.oversized`. A message expunged by another
   client between SEARCH and FETCH is simply gone: it is skipped.
3. **UID commands only** (UID SEARCH / FETCH / MOVE / STORE): sequence numbers shift
   under concurrent expunges, UIDs do not. UIDVALIDITY is tracked in memory; when it
   changes (mailbox recreated) every message still in the mailbox is scanned again
   and the duplicate check keeps that from creating a second report.
4. **First start takes unread mail only.** Messages already ``\\Seen`` when the poller
   first selects the mailbox are left alone (:func:`import_since` takes them on
   request); everything that arrives afterwards is taken, read or not. Messages we
   flagged (``UNKEYWORD $SecMailerStored``) are never taken again.
5. **Keep running.** Any failure (network, TLS, login, BYE, a database error) closes
   the session, is logged and shown in :attr:`ImapPoller.health`, and the poller
   reconnects with exponential backoff. IDLE is used when offered, re-issued every
   ``idle_seconds`` (servers drop idlers silently), and the mailbox is scanned at
   least every ``poll_seconds`` in any case.

aioimaplib is used only in this module; its errors become :class:`ImapError`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import re
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import date, datetime
from email.parser import BytesHeaderParser
from email.utils import parseaddr
from typing import Any

import aioimaplib

from mailer.config import ImapConfig
from mailer.db import Database
from mailer.errors import MailerError
from mailer.intake import Received, Stored, store_batch
from mailer.models import utcnow

log = logging.getLogger(__name__)

KEYWORD = "$SecMailerStored"
FETCH_MAX_MESSAGES = 100
FETCH_MAX_BYTES = 16 * 1024 * 1024
# aioimaplib parses one network read recursively, a frame per response line: keep responses
# (and UID sets on the command line) well under Python's recursion limit.
SIZE_SLICE = 250
COMMAND_TIMEOUT = 60.0
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_FETCH_LINE = re.compile(rb"^\d+ FETCH \(")
_UID = re.compile(rb"\bUID (\d+)")
_SIZE = re.compile(rb"\bRFC822\.SIZE (\d+)")
_LITERAL = re.compile(rb"\{(\d+)\}$")
_PUSH_CHANGES = re.compile(rb"^\d+ (EXISTS|RECENT|EXPUNGE|FETCH)\b")
_PUSH_TROUBLE = re.compile(rb"^(NO|BAD)\b")


class ImapError(MailerError):
    """The IMAP server could not be reached, refused us, or the session broke; the message says which."""


@dataclass(frozen=True)
class Oversized:
    """A message left in the mailbox because it is larger than ``max_message_size``."""

    mailbox: str
    uidvalidity: int
    uid: int
    size: int
    limit: int
    headers: str
    seen_at: datetime


@dataclass
class _Counters:
    stored: int = 0
    duplicates: int = 0
    moved: int = 0
    flagged: int = 0
    vanished: int = 0


# --- small pure helpers -------------------------------------------------------------------


def imap_utf7(name: str) -> str:
    """RFC 3501 §5.1.3 modified UTF-7 for mailbox names."""
    out, pending = [], ""

    def flush() -> None:
        nonlocal pending
        if pending:
            encoded = base64.b64encode(pending.encode("utf-16-be")).decode().rstrip("=")
            out.append("&" + encoded.replace("/", ",") + "-")
            pending = ""

    for char in name:
        if 0x20 <= ord(char) <= 0x7E:
            flush()
            out.append("&-" if char == "&" else char)
        else:
            pending += char
    flush()
    return "".join(out)


def mailbox_arg(name: str) -> str:
    """A mailbox name as a quoted IMAP string argument."""
    return aioimaplib.quoted(imap_utf7(name))


def uid_set(uids: Iterable[int]) -> str:
    """``[1, 2, 3, 7]`` -> ``"1:3,7"``."""
    ranges: list[list[int]] = []
    for uid in sorted(set(uids)):
        if ranges and uid == ranges[-1][1] + 1:
            ranges[-1][1] = uid
        else:
            ranges.append([uid, uid])
    return ",".join(f"{a}" if a == b else f"{a}:{b}" for a, b in ranges)


def imap_date(day: date) -> str:
    return f"{day.day}-{_MONTHS[day.month - 1]}-{day.year}"


def response_code(lines: list[Any], name: str) -> int | None:
    """A numeric response code such as ``[UIDVALIDITY 123]`` from a SELECT response."""
    pattern = re.compile(rb"\[" + name.encode() + rb" (\d+)\]")
    for line in lines:
        if isinstance(line, (bytes, bytearray)) and (match := pattern.search(bytes(line))):
            return int(match.group(1))
    return None


def search_uids(lines: list[Any]) -> list[int]:
    """UIDs from a UID SEARCH response (the last line is the tagged completion text)."""
    uids: list[int] = []
    for line in lines[:-1]:
        tokens = bytes(line).split()
        if tokens and tokens[0] == b"SEARCH":
            tokens = tokens[1:]
        if all(token.isdigit() for token in tokens):
            uids.extend(int(token) for token in tokens)
    return sorted(set(uids))


def fetch_sizes(lines: list[Any]) -> dict[int, int]:
    """``{uid: RFC822.SIZE}`` from a ``UID FETCH ... (UID RFC822.SIZE)`` response."""
    sizes: dict[int, int] = {}
    for line in lines:
        if isinstance(line, bytes) and _FETCH_LINE.match(line):
            uid, size = _UID.search(line), _SIZE.search(line)
            if uid and size:
                sizes[int(uid.group(1))] = int(size.group(1))
    return sizes


def fetch_literals(lines: list[Any]) -> dict[int, bytes]:
    """``{uid: literal}`` from a FETCH response with one literal item per message (BODY[] or a header part).

    aioimaplib hands the literal over as a separate ``bytearray`` after the line
    announcing it; the UID may come before the literal or in the line after it.
    Untagged FETCH responses without a literal (flag updates) are ignored.
    """
    found: dict[int, bytes] = {}
    index = 0
    while index < len(lines):
        line = lines[index]
        if isinstance(line, bytes) and _FETCH_LINE.match(line) and _LITERAL.search(line):
            literal = lines[index + 1] if index + 1 < len(lines) else None
            tail = lines[index + 2] if index + 2 < len(lines) else b""
            uid = _UID.search(line) or (_UID.search(bytes(tail)) if isinstance(tail, (bytes, bytearray)) else None)
            if uid and isinstance(literal, bytearray):
                found[int(uid.group(1))] = bytes(literal)
            index += 2
            continue
        index += 1
    return found


def return_path(raw: bytes) -> str:
    """The envelope sender recorded by the final MTA (topmost Return-Path), '' if absent or null."""
    headers = BytesHeaderParser().parsebytes(raw[:256 * 1024])
    value = headers.get("Return-Path")
    if value is None:
        return ""
    return parseaddr(str(value))[1] or str(value).strip().strip("<>").strip()


def chunks(uids: list[int], sizes: dict[int, int]) -> list[list[int]]:
    """Fetch batches bounded by count and bytes (one message per batch when it is large)."""
    batches: list[list[int]] = []
    current: list[int] = []
    total = 0
    for uid in uids:
        size = sizes.get(uid, 0)
        if current and (len(current) >= FETCH_MAX_MESSAGES or total + size > FETCH_MAX_BYTES):
            batches.append(current)
            current, total = [], 0
        current.append(uid)
        total += size
    if current:
        batches.append(current)
    return batches


def tls_context(config: ImapConfig) -> ssl.SSLContext:
    """Certificate and host name verification on; the CA file replaces the system store when given."""
    context = ssl.create_default_context(cafile=str(config.ca_file) if config.ca_file else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# --- one IMAP session -----------------------------------------------------------------------


class _Connection:
    """One IMAP session. Every aioimaplib call goes through :meth:`call`, which translates
    failures to :class:`ImapError` and gives up at once when the connection is lost."""

    def __init__(self, config: ImapConfig, timeout: float) -> None:
        self.config = config
        self.timeout = timeout
        self._lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        context = tls_context(config) if config.security == "tls" else None
        self.client = aioimaplib.IMAP4(
            config.host, config.port, timeout=timeout, conn_lost_cb=self._on_lost, ssl_context=context
        )

    def _on_lost(self, _exc: Exception | None) -> None:
        if not self._lost.done():
            self._lost.set_result(None)

    @property
    def lost(self) -> bool:
        return self._lost.done()

    def has(self, capability: str) -> bool:
        return self.client.has_capability(capability)

    async def call(self, awaitable: Awaitable[Any], what: str, timeout: float | None = None) -> Any:
        """Await one client operation; raise :class:`ImapError` on failure, timeout or connection loss."""
        task = asyncio.ensure_future(awaitable)
        if self.lost:
            task.cancel()
            raise ImapError(f"{what}: connection lost")
        try:
            done, _ = await asyncio.wait(
                {task, self._lost}, timeout=timeout or self.timeout, return_when=asyncio.FIRST_COMPLETED
            )
        except asyncio.CancelledError:
            task.cancel()
            raise
        if task not in done:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            raise ImapError(f"{what}: connection lost" if self.lost else f"{what}: no answer within {timeout or self.timeout:.0f}s")
        try:
            return task.result()
        except (aioimaplib.AioImapException, OSError, asyncio.TimeoutError, ValueError, EOFError) as exc:
            raise ImapError(f"{what}: {_describe(exc)}") from None

    async def command(self, awaitable: Awaitable[Any], what: str, *, accept: tuple[str, ...] = ()) -> list[Any]:
        """:meth:`call` plus a check of the tagged result; returns the response lines."""
        response = await self.call(awaitable, what)
        text = b" ".join(bytes(line) for line in response.lines[-1:]).decode(errors="replace")
        if response.result != "OK" and not any(marker in text for marker in accept):
            raise ImapError(f"{what}: server answered {response.result} {text}")
        return list(response.lines)

    async def open(self) -> None:
        """Greeting, STARTTLS when configured, LOGIN, capabilities."""
        host = f"{self.config.host}:{self.config.port}"
        await self.call(self.client.wait_hello_from_server(), f"connect to {host} ({self.config.security})")
        if self.config.security == "starttls":
            await self._starttls()
        response = await self.call(self.client.login(self.config.username, self.config.secret()), "LOGIN")
        if response.result != "OK":
            text = bytes(response.lines[-1]).decode(errors="replace") if response.lines else ""
            raise ImapError(f"LOGIN as {self.config.username!r} refused: {text}")
        if not any(b"CAPABILITY" in bytes(line) for line in response.lines):
            await self.call(self.client.protocol.capability(), "CAPABILITY")

    async def _starttls(self) -> None:
        if not self.has("STARTTLS"):
            raise ImapError("server does not offer STARTTLS; refusing to log in without TLS")
        protocol = self.client.protocol
        command = aioimaplib.Command("STARTTLS", protocol.new_tag(), loop=protocol.loop)
        await self.command(protocol.execute(command), "STARTTLS")
        loop = asyncio.get_running_loop()
        transport = await self.call(
            loop.start_tls(protocol.transport, protocol, tls_context(self.config), server_hostname=self.config.host),
            "TLS handshake after STARTTLS",
        )
        protocol.transport = transport
        await self.call(protocol.capability(), "CAPABILITY")

    async def select(self, mailbox: str) -> tuple[int, int]:
        """SELECT; returns (UIDVALIDITY, UIDNEXT)."""
        lines = await self.command(self.client.select(mailbox_arg(mailbox)), f"SELECT {mailbox}")
        validity = response_code(lines, "UIDVALIDITY")
        if validity is None:
            raise ImapError(f"SELECT {mailbox}: server sent no UIDVALIDITY")
        return validity, response_code(lines, "UIDNEXT") or 0

    async def ensure_mailbox(self, name: str) -> None:
        lines = await self.command(self.client.list('""', mailbox_arg(name)), f"LIST {name}")
        if len(lines) > 1:
            return
        await self.command(self.client.create(mailbox_arg(name)), f"CREATE {name}", accept=("ALREADYEXISTS",))
        log.info("IMAP: created mailbox %r for processed mail", name)

    async def search(self, *criteria: str) -> list[int]:
        lines = await self.command(self.client.uid_search(*criteria, charset=None), "UID SEARCH " + " ".join(criteria))
        return search_uids(lines)

    async def fetch(self, uids: list[int], items: str) -> list[Any]:
        # EXPUNGEISSUED / "no longer exist": another client expunged some of them; the rest is valid.
        return await self.command(
            self.client.uid("fetch", uid_set(uids), items), f"UID FETCH {items}",
            accept=("EXPUNGEISSUED", "no longer exist"),
        )

    async def move(self, uids: list[int], mailbox: str) -> None:
        await self.command(self.client.uid("move", uid_set(uids), mailbox_arg(mailbox)), f"UID MOVE to {mailbox}")

    async def flag(self, uids: list[int]) -> None:
        await self.command(
            self.client.uid("store", uid_set(uids), "+FLAGS.SILENT", f"(\\Seen {KEYWORD})"), "UID STORE +FLAGS"
        )

    async def noop(self) -> None:
        await self.command(self.client.noop(), "NOOP")

    async def wait(self, seconds: float) -> None:
        """Sleep, but return at once when the connection drops (the next command then fails)."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._lost), seconds)

    async def idle(self, seconds: float, on_idling: Callable[[], None] | None = None) -> bool:
        """IDLE until the mailbox changes or ``seconds`` pass; True when the server pushed a change.

        :raises ImapError: on BYE, connection loss, or when DONE is not answered (a dead idler).
        """
        queue: asyncio.Queue[list[bytes]] = self.client.protocol.idle_queue
        while not queue.empty():
            queue.get_nowait()
        idle_task = await self.call(self.client.idle_start(timeout=aioimaplib.TWENTY_NINE_MINUTES), "IDLE")
        if on_idling is not None:
            on_idling()
        changed = False
        try:
            changed = await self._await_push(queue, time.monotonic() + seconds)
        finally:
            if self.lost:
                idle_task.cancel()
            else:
                self.client.idle_done()
                await self.call(idle_task, "IDLE DONE")
        return changed

    async def _await_push(self, queue: asyncio.Queue[list[bytes]], deadline: float) -> bool:
        while (remaining := deadline - time.monotonic()) > 0:
            getter = asyncio.ensure_future(queue.get())
            try:
                done, _ = await asyncio.wait({getter, self._lost}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            finally:
                getter.cancel()
            if getter in done:
                pushed = [bytes(line) for line in getter.result() if isinstance(line, (bytes, bytearray))]
                if any(line.startswith(b"BYE") for line in pushed):
                    raise ImapError(f"server said {pushed[-1].decode(errors='replace')!r} during IDLE")
                if trouble := [line for line in pushed if _PUSH_TROUBLE.match(line)]:
                    # e.g. Dovecot after the selected mailbox was deleted: start a fresh session
                    raise ImapError(f"server said {trouble[-1].decode(errors='replace')!r} during IDLE")
                if any(_PUSH_CHANGES.match(line) for line in pushed):
                    return True
            elif self.lost:
                raise ImapError("connection lost during IDLE")
        return False

    async def logout(self) -> None:
        with contextlib.suppress(ImapError):
            if not self.lost:
                await self.call(self.client.logout(), "LOGOUT", timeout=5)
        self.abort()

    def abort(self) -> None:
        transport = self.client.protocol.transport if self.client.protocol else None
        if transport is not None:
            transport.close()
        for task in list(self.client.tasks) + list(self.client.protocol.tasks):
            task.cancel()


# --- the poller -----------------------------------------------------------------------------


@dataclass
class _MailboxState:
    """What we know about the selected mailbox, in memory only (see rule 3 and 4)."""

    uidvalidity: int | None = None
    baseline: int = 0  # read messages with UID <= baseline are left alone
    last_uid: int = 0
    skipped: set[int] = field(default_factory=set)  # oversized UIDs already alerted on


class ImapPoller:
    """Watches one mailbox and stores every new message; see the module docstring for the rules."""

    def __init__(
        self,
        config: ImapConfig,
        db: Database,
        *,
        on_stored: Callable[[Stored], None] | None = None,
        backoff_initial: float = 1.0,
        backoff_max: float = 300.0,
        command_timeout: float = COMMAND_TIMEOUT,
        clock: Callable[[], datetime] = utcnow,
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
        self._last_poll_at: datetime | None = None
        self._failures = 0
        self.polled = asyncio.Event()  # set after every completed scan (tests wait on it)

    # -- health --------------------------------------------------------------------------

    @property
    def health(self) -> dict[str, Any]:
        """What the poller is doing and what is wrong, JSON-ready."""
        iso = lambda value: value.isoformat() if value else None  # noqa: E731
        return {
            "connected": self._connected,
            "state": self._state,
            "mailbox": self.config.mailbox,
            "last_error": self._last_error,
            "last_error_at": iso(self._last_error_at),
            "last_poll_at": iso(self._last_poll_at),
            "consecutive_failures": self._failures,
            "idle": self._capabilities.get("IDLE", False),
            "move": self._capabilities.get("MOVE", False),
            "uidvalidity": self._mailbox.uidvalidity,
            "last_uid": self._mailbox.last_uid,
            "stored": self.counters.stored,
            "duplicates": self.counters.duplicates,
            "oversized": len(self.oversized),
        }

    # -- the loop ------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve until cancelled; every failure is logged, shown in :attr:`health`, and retried with backoff."""
        delay = self.backoff_initial
        healthy_after = min(self.config.idle_seconds, self.config.poll_seconds)
        while True:
            started: float | None = None
            try:
                async with self._session() as conn:
                    started = time.monotonic()
                    await self._serve(conn)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the service keeps running; health says why
                if started is not None and time.monotonic() - started >= healthy_after:
                    delay = self.backoff_initial  # a session that lasted: start the backoff over
                self._record_failure(exc, delay)
            self._state = "backoff"
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.backoff_max)

    def _record_failure(self, exc: Exception, delay: float) -> None:
        self._connected = False
        self._failures += 1
        self._last_error = str(exc) if isinstance(exc, ImapError) else _describe(exc)
        self._last_error_at = self.clock()
        if isinstance(exc, ImapError):
            log.warning("IMAP %s@%s: %s; reconnecting in %.1fs", self.config.username, self.config.host, exc, delay)
        else:
            log.error("IMAP intake fault: %s; reconnecting in %.1fs", self._last_error, delay, exc_info=exc)

    @contextlib.asynccontextmanager
    async def _session(self) -> Any:
        """A logged-in connection with the mailbox selected; closed on the way out, whatever happens."""
        self._state = "connecting"
        conn = _Connection(self.config, self.command_timeout)
        try:
            await conn.open()
            self._capabilities = {name: conn.has(name) for name in ("IDLE", "MOVE")}
            if conn.has("MOVE"):
                await conn.ensure_mailbox(self.config.processed_mailbox)
            self._connected = True
            log.info(
                "IMAP: watching %s@%s:%d/%s (idle=%s, move=%s)", self.config.username, self.config.host,
                self.config.port, self.config.mailbox, conn.has("IDLE"), conn.has("MOVE"),
            )
            yield conn
        except BaseException:  # including cancellation: drop the connection, no goodbye
            conn.abort()
            raise
        else:
            await conn.logout()
        finally:
            self._connected = False

    async def _select(self, conn: _Connection) -> None:
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

    async def _serve(self, conn: _Connection) -> None:
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

    async def scan(self, conn: _Connection) -> int:
        """Take every new message in the selected mailbox; returns how many were stored (duplicates included)."""
        self._state = "scanning"
        uids = await self._candidates(conn)
        count = await self._ingest(conn, uids) if uids else 0
        self._last_poll_at = self.clock()
        self._failures = 0
        self.polled.set()
        return count

    async def _candidates(self, conn: _Connection) -> list[int]:
        state = self._mailbox
        unseen = await conn.search("UNSEEN", "UNKEYWORD", KEYWORD)
        # "N:*" always matches the highest UID, even below N: filter on our side.
        newer = [uid for uid in await conn.search("UID", f"{state.baseline + 1}:*", "UNKEYWORD", KEYWORD) if uid > state.baseline]
        return sorted((set(unseen) | set(newer)) - state.skipped)

    async def _ingest(self, conn: _Connection, uids: list[int]) -> int:
        """Size check, then fetch/store/move in bounded batches; returns how many were stored."""
        count = 0
        for start in range(0, len(uids), SIZE_SLICE):
            part = uids[start:start + SIZE_SLICE]
            sizes = fetch_sizes(await conn.fetch(part, "(UID RFC822.SIZE)"))
            wanted = [uid for uid in part if uid in sizes]
            too_big = [uid for uid in wanted if sizes[uid] > self.config.max_message_size]
            if too_big:
                await self._alert_oversized(conn, too_big, sizes)
            for batch in chunks([uid for uid in wanted if uid not in too_big], sizes):
                count += await self._ingest_batch(conn, batch)
        return count

    async def _ingest_batch(self, conn: _Connection, batch: list[int]) -> int:
        await self.before_fetch(batch)
        bodies = fetch_literals(await conn.fetch(batch, "(UID BODY.PEEK[])"))
        fetched: list[tuple[int, bytes]] = []
        for uid in batch:
            raw = bodies.get(uid)
            if raw is None:
                self.counters.vanished += 1
                log.info("IMAP: UID %d in %s vanished before it was fetched (expunged elsewhere); skipped", uid, self.config.mailbox)
                continue
            fetched.append((uid, raw))
        if fetched:
            await self._store(fetched)
            await self._mark_processed(conn, [uid for uid, _ in fetched])
        return len(fetched)

    async def before_fetch(self, uids: list[int]) -> None:
        """Hook called before each body fetch (tests use it to race another client); does nothing."""

    async def _store(self, fetched: list[tuple[int, bytes]]) -> list[Stored]:
        """The durable commit of a whole batch in one transaction (rule 1), then ``on_stored`` for each."""
        state = self._mailbox
        where = f"imap://{self.config.host}:{self.config.port}/{self.config.mailbox};UIDVALIDITY={state.uidvalidity}/"
        batch = [
            Received(raw, "imap", f"{where};UID={uid}", return_path(raw), (self.config.username,)) for uid, raw in fetched
        ]
        results = await asyncio.to_thread(store_batch, self.db, batch)
        for (uid, _), stored in zip(fetched, results):
            state.last_uid = max(state.last_uid, uid)
            self.counters.stored += 1
            self.counters.duplicates += stored.duplicate
            log.debug("IMAP: UID %d stored as inbound %d%s", uid, stored.id, " (duplicate)" if stored.duplicate else "")
            if self.on_stored is not None:
                self.on_stored(stored)
        return results

    async def _mark_processed(self, conn: _Connection, uids: list[int]) -> None:
        """Only after the commit (rule 1): MOVE to the processed mailbox, or flag where MOVE is missing."""
        if conn.has("MOVE"):
            await conn.move(uids, self.config.processed_mailbox)
            self.counters.moved += len(uids)
        else:
            await conn.flag(uids)
            self.counters.flagged += len(uids)
        log.info("IMAP: %d message(s) stored and %s", len(uids), "moved" if conn.has("MOVE") else "flagged")

    async def _alert_oversized(self, conn: _Connection, uids: list[int], sizes: dict[int, int]) -> None:
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
