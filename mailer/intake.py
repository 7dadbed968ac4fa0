"""The durable write at the edge: a received message is committed before anyone is told 250."""

from __future__ import annotations

import asyncio
import hashlib
import re
from dataclasses import dataclass
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.exc import IntegrityError

from mailer.db import Database
from mailer.models import InboundMessage

_MESSAGE_ID = re.compile(rb"^message-id:[ \t]*(<[^<>\s]{1,900}>)", re.IGNORECASE | re.MULTILINE)


@dataclass(frozen=True)
class Stored:
    id: int
    duplicate: bool


def header_message_id(raw: bytes) -> str | None:
    """The Message-ID from the header block, read without a full parse."""
    head = raw.split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0]
    match = _MESSAGE_ID.search(head)
    return match.group(1).decode("ascii", errors="replace") if match else None


@dataclass(frozen=True)
class Received:
    """One message as the edge got it, before it is stored."""

    raw: bytes
    transport: str
    peer: str = ""
    mail_from: str = ""
    rcpt_tos: tuple[str, ...] = ()

    def row(self) -> dict[str, Any]:
        digest = hashlib.sha256(self.raw).hexdigest()
        message_id = header_message_id(self.raw)
        return {
            "transport": self.transport,
            "peer": self.peer[:255],
            "mail_from": self.mail_from[:998],
            "rcpt_tos": list(self.rcpt_tos),
            "message_id": message_id,
            "sha256": digest,
            # Redeliveries are recognised by Message-ID *and* content hash: a
            # different message reusing a Message-ID has another hash and is stored too.
            "dedup_key": f"{digest}|{message_id or ''}",
            "size": len(self.raw),
            "raw": self.raw,
        }


def store_batch(db: Database, batch: list[Received]) -> list[Stored]:
    """Commit several messages in one transaction (one fsync); each result says if it was a redelivery."""
    rows = [item.row() for item in batch]
    keys = [row["dedup_key"] for row in rows]
    try:
        with db.session(first=True) as session:  # a sender waits for 250 on this commit
            query = select(InboundMessage.dedup_key, InboundMessage.id).where(InboundMessage.dedup_key.in_(keys))
            known = {key: id_ for key, id_ in session.execute(query)}
            fresh: dict[str, dict[str, Any]] = {}
            for row in rows:
                if row["dedup_key"] not in known:
                    fresh.setdefault(row["dedup_key"], row)
            if fresh:
                # rows are matched by their key, not their order: the INSERT can be one multi-row statement
                statement = insert(InboundMessage).returning(InboundMessage.dedup_key, InboundMessage.id)
                known.update((key, id_) for key, id_ in session.execute(statement, list(fresh.values())))
    except IntegrityError:
        # another process stored one of them between our check and insert: fall back to one by one
        if len(batch) == 1:
            with db.session() as session:
                existing = session.scalar(select(InboundMessage.id).where(InboundMessage.dedup_key == keys[0]))
            if existing is None:
                raise
            return [Stored(existing, duplicate=True)]
        return [store_batch(db, [item])[0] for item in batch]
    first = {key: i for i, key in reversed(list(enumerate(keys)))}
    return [Stored(known[key], duplicate=key not in fresh or first[key] != i) for i, key in enumerate(keys)]


class IntakeWriter:
    """Group commit for the edge: DATA commands that arrive together share one transaction.

    Each caller gets its own result (or the exception) only after the commit,
    so nothing is acknowledged before it is durable.
    """

    def __init__(self, db: Database, *, max_batch: int = 64) -> None:
        self.db = db
        self.max_batch = max_batch
        self._queue: list[tuple[Received, asyncio.Future[Stored]]] = []
        self._task: asyncio.Task[None] | None = None
        self.in_flight = 0

    #: after a DATA arrived or committed, the edge counts as busy this long (seconds): in a burst the next
    #: DATA is on its way (a few ms apart); steady mail, even tens a second, leaves gaps of tens of ms, and
    #: a longer window there made the worker wait at nearly every claim (bench/intake.py --rate 33: acks
    #: fell behind, p99 18 s with 50 ms; 0.16-0.34 s with 10 ms, bursts still at the fsync sink's pace)
    QUIET = 0.01

    @property
    def busy(self) -> bool:
        """True while DATA commands wait for their commit, or a burst seems to be going on."""
        recent = asyncio.get_running_loop().time() - self._last < self.QUIET
        return bool(self._queue) or self.in_flight > 0 or recent

    _last = float("-inf")

    async def store(self, item: Received) -> Stored:
        loop = asyncio.get_running_loop()
        self._last = loop.time()
        future: asyncio.Future[Stored] = loop.create_future()
        self._queue.append((item, future))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._flush(), name="intake-writer")
        return await future

    async def _flush(self) -> None:
        while self._queue:
            batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
            self.in_flight = len(batch)
            try:
                results = await asyncio.to_thread(store_batch, self.db, [item for item, _ in batch])
            except Exception as exc:  # noqa: BLE001 - every waiting DATA answers 451
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
            else:
                for (_, future), result in zip(batch, results, strict=False):
                    if not future.done():
                        future.set_result(result)
            finally:
                self.in_flight = 0
                self._last = asyncio.get_running_loop().time()
