"""The IMAP client side of intake: one aioimaplib session and the IMAP codecs.

aioimaplib is used only in this module; its errors become :class:`ImapError`.
:class:`ImapConnection` speaks UID commands only (UID SEARCH / FETCH / MOVE / STORE)
and never deletes or expunges; the rules for what is fetched, stored and moved
are the poller's (:mod:`inbound.imap`).
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
from dataclasses import dataclass
from datetime import date, datetime
from email.parser import BytesHeaderParser
from email.utils import parseaddr
from typing import Any

import aioimaplib

from mailer.config import ImapConfig
from mailer.errors import MailerError
from mailer.parsing import UNKNOWN_ENVELOPE

log = logging.getLogger(__name__)

KEYWORD = "$SecMailerStored"
# aioimaplib checks whether a FETCH response is complete by rescanning every line received so far,
# once per line: its cost grows with the square of the messages per FETCH. 25 a command keeps
# that small next to the round trip (100 a command parses about half as fast).
FETCH_MAX_MESSAGES = 25
FETCH_MAX_BYTES = 16 * 1024 * 1024
#: a message at most this big needs no RFC822.SIZE of its own: any FETCH_MAX_MESSAGES of them fit in FETCH_MAX_BYTES
SMALL_MESSAGE = FETCH_MAX_BYTES // FETCH_MAX_MESSAGES
#: UIDs per ``UID FETCH (RFC822.SIZE)`` (the same quadratic parse as above)
SIZE_FETCH_MESSAGES = 100
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
    return str(aioimaplib.quoted(imap_utf7(name)))


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
    """The envelope sender recorded by the final MTA (topmost Return-Path); '' if null (``<>``).

    Without a Return-Path (a message appended by a client) the sender is unknown, not null:
    :data:`mailer.parsing.UNKNOWN_ENVELOPE`, and the message is filed and answered by its From.
    """
    value: Any = _leading_return_path(raw)
    if value is None:
        headers = BytesHeaderParser().parsebytes(raw[:_HEADER_LIMIT])
        value = headers.get("Return-Path")
        if value is None:
            return UNKNOWN_ENVELOPE
    return parseaddr(str(value))[1] or str(value).strip().strip("<>").strip()


_HEADER_LIMIT = 256 * 1024
_RETURN_PATH = b"return-path:"


def _leading_return_path(raw: bytes) -> str | None:
    """The usual case without a header parse: the message starts with the delivering MTA's
    Return-Path on one unfolded ASCII line. The value is what :class:`~email.parser.BytesHeaderParser`
    would give (``compat32``: the text after the colon, leading blanks and the line end removed);
    None whenever that is not plain (folded, non-ASCII, a bare CR), and the parser decides.
    """
    if raw[:len(_RETURN_PATH)].lower() != _RETURN_PATH:
        return None
    end = raw.find(b"\n", 0, _HEADER_LIMIT)
    if end < 0 or raw[end + 1:end + 2] in (b" ", b"\t"):
        return None
    line = raw[len(_RETURN_PATH):end]
    if line.endswith(b"\r"):
        line = line[:-1]
    if b"\r" in line or not line.isascii():
        return None
    return line.decode("ascii").lstrip(" \t")


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


def describe_error(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# --- one IMAP session -----------------------------------------------------------------------


class ImapConnection:
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
        return bool(self.client.has_capability(capability))

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
            reason = "connection lost" if self.lost else f"no answer within {timeout or self.timeout:.0f}s"
            raise ImapError(f"{what}: {reason}")
        try:
            return task.result()
        except (aioimaplib.AioImapException, OSError, TimeoutError, ValueError, EOFError) as exc:
            raise ImapError(f"{what}: {describe_error(exc)}") from None

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
        # No aioimaplib timer (it would re-arm one for every line received): :meth:`call` bounds the whole command.
        return await self.command(
            self.client.protocol.uid("fetch", uid_set(uids), items, timeout=None), f"UID FETCH {items}",
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
            waiters: set[asyncio.Future[Any]] = {getter, self._lost}
            try:
                done, _ = await asyncio.wait(waiters, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
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
