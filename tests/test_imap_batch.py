"""IMAP catch-up in groups against a real Dovecot: a group is committed before it is moved, whatever happens.

The poller fetches, commits and moves a group of messages at a time, the next group
overlapping the last one's move (inbound.imap, rule 1). These tests watch that order
from inside (every UID handed to a move is in the database already) and from outside
(everything another client sees in the processed folder is in the database), and kill
a poller process with SIGKILL in the middle of catch-ups.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import signal
import sys
import threading
from collections.abc import Iterator
from email.parser import BytesHeaderParser
from email.utils import parseaddr
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import delete, func, select

from inbound.imap import ImapPoller
from inbound.imap_client import return_path
from mailer.config import ImapConfig
from mailer.db import Database
from mailer.models import InboundMessage, Lease
from mailer.parsing import UNKNOWN_ENVELOPE
from tests import test_imap
from tests.dovecot import Dovecot, append_messages, imap_session, mailbox_uids, make_message
from tests.test_imap import count, running, until

dovecot = test_imap.dovecot  # the fixture

_MESSAGE_ID = re.compile(rb"<([^<>\s]+)>")


def poller_config(server: Dovecot, **values: Any) -> ImapConfig:
    settings: dict[str, Any] = {
        "enabled": True, "host": "127.0.0.1", "port": server.port, "username": server.user,
        "password": server.password, "security": "none", "poll_seconds": 60, "idle_seconds": 60,
    }
    settings.update(values)
    return ImapConfig(**settings)


def stored_message_ids(db: Database) -> set[str]:
    with db.session() as session:
        return {mid for mid in session.scalars(select(InboundMessage.message_id)) if mid}


def stored_uids(db: Database) -> set[int]:
    """The UIDs the poller recorded (``...;UID=n`` in the peer column) for the stored messages."""
    with db.session() as session:
        return {int(peer.rsplit("UID=", 1)[1]) for peer in session.scalars(select(InboundMessage.peer)) if "UID=" in peer}


def message_ids(server: Dovecot, mailbox: str) -> set[str]:
    """Message-IDs of every message in ``mailbox`` as another client sees it right now."""
    with imap_session(server, None) as conn:
        typ, _ = conn.select(mailbox, readonly=True)
        if typ != "OK":
            return set()
        typ, data = conn.uid("FETCH", "1:*", "(BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])")
        assert typ == "OK", data
    found = set()
    for item in data:
        if isinstance(item, tuple) and (match := _MESSAGE_ID.search(item[1])):
            found.add(f"<{match.group(1).decode()}>")
    return found


class CheckingPoller(ImapPoller):
    """Checks, at every move, that the UIDs handed to it are in the database already."""

    commit_batch = 50

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.marks: list[list[int]] = []
        self.unstored: list[int] = []

    async def _mark_processed(self, conn: Any, uids: list[int]) -> None:
        stored = await asyncio.to_thread(stored_uids, self.db)
        self.unstored.extend(uid for uid in uids if uid not in stored)
        self.marks.append(list(uids))
        await super()._mark_processed(conn, uids)


@contextlib.contextmanager
def watching_processed(server: Dovecot, db: Database) -> Iterator[dict[str, Any]]:
    """Another client looks at the processed folder over and over, each time checking the database
    (read after the look) holds every message it saw there."""
    seen: dict[str, Any] = {"looks": 0, "partial": 0, "missing": set()}
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            moved = message_ids(server, "Processed")
            missing = moved - stored_message_ids(db)
            seen["looks"] += 1
            seen["partial"] += bool(moved)
            seen["missing"] |= missing

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        stop.set()
        thread.join(30)


async def test_every_moved_message_is_stored_before_the_move(migrated: str, dovecot: Dovecot) -> None:
    """300 messages in groups of 50: each UID MOVE names only UIDs already committed, and no other
    client ever finds a message in the processed folder that the database does not hold."""
    total = 300
    await asyncio.to_thread(append_messages, dovecot, [make_message(i, tag="order") for i in range(total)])
    db = Database(migrated)
    poller = CheckingPoller(poller_config(dovecot), db)
    with watching_processed(dovecot, db) as seen:
        async with running(poller):
            await until(lambda: poller.counters.moved == total, "all moved")
    assert poller.unstored == []
    assert len(poller.marks) >= total // CheckingPoller.commit_batch  # one UID MOVE per group, not per message
    assert sorted(uid for mark in poller.marks for uid in mark) == list(range(1, total + 1))
    assert seen["looks"] > 0 and seen["missing"] == set()
    assert count(db, InboundMessage) == total and poller.counters.duplicates == 0
    db.dispose()
    assert await asyncio.to_thread(mailbox_uids, dovecot, "INBOX") == []
    assert len(await asyncio.to_thread(mailbox_uids, dovecot, "Processed")) == total


class FailingCommit(CheckingPoller):
    """The database fails the second commit once (e.g. the disk filled up, then was cleaned)."""

    commits = 0

    async def _store(self, fetched: list[tuple[int, bytes]]) -> Any:
        self.commits += 1
        if self.commits == 2:
            raise OSError("database is unavailable (injected)")
        return await super()._store(fetched)


async def test_a_failed_commit_moves_nothing_of_its_group_and_is_retried(migrated: str, dovecot: Dovecot) -> None:
    """A commit that fails ends the session before its group is moved; the reconnect takes the rest, once each."""
    total = 150
    await asyncio.to_thread(append_messages, dovecot, [make_message(i, tag="dbfail") for i in range(total)])
    db = Database(migrated)
    poller = FailingCommit(poller_config(dovecot), db, backoff_initial=0.05, backoff_max=0.2)
    async with running(poller):
        await until(lambda: poller.counters.moved == total, "all moved after the retry")
    assert poller.unstored == []
    assert poller.health["last_error"] is not None and "injected" in poller.health["last_error"]
    assert count(db, InboundMessage) == total
    db.dispose()
    assert await asyncio.to_thread(mailbox_uids, dovecot, "INBOX") == []


async def test_large_messages_are_measured_and_oversized_left_alone(
    migrated: str, dovecot: Dovecot, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Messages over the blind-batching bound get their own RFC822.SIZE; one over the limit stays, alerted."""
    monkeypatch.setattr("inbound.imap.SMALL_MESSAGE", 2048)
    messages = [make_message(i, tag="mixed") for i in range(20)]
    messages += [make_message(i, tag="medium", size=5000) for i in range(20, 25)]
    messages.append(make_message(25, tag="huge", size=20000))
    await asyncio.to_thread(append_messages, dovecot, messages)
    db = Database(migrated)
    poller = ImapPoller(poller_config(dovecot, max_message_size=16384), db)
    async with running(poller):
        await until(lambda: poller.counters.moved == 25 and bool(poller.oversized), "25 moved, one alerted")
    db.dispose()
    assert [(o.uid, o.size > 16384) for o in poller.oversized] == [(26, True)]
    assert "huge-25@reporter.test" in poller.oversized[0].headers
    assert await asyncio.to_thread(mailbox_uids, dovecot, "INBOX") == [26]


_CHILD = """
import asyncio, sys
from inbound.imap import ImapPoller
from mailer.config import ImapConfig
from mailer.db import Database

url, port, user, password = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
config = ImapConfig(enabled=True, host="127.0.0.1", port=port, username=user, password=password,
                    security="none", poll_seconds=60, idle_seconds=60)
print("ready", flush=True)
asyncio.run(ImapPoller(config, Database(url)).run())
"""


def settled_view(server: Dovecot) -> tuple[set[str], set[str]]:
    """(processed, inbox) Message-IDs, once a MOVE the killed client left running on the server is over."""
    while True:
        moved = message_ids(server, "Processed")
        waiting = message_ids(server, "INBOX")
        if message_ids(server, "Processed") == moved:
            return moved, waiting


def status_messages(server: Dovecot, mailbox: str) -> int:
    with imap_session(server, None) as conn:
        typ, data = conn.status(mailbox, "(MESSAGES)")
    if typ != "OK":
        return 0
    match = re.search(rb"MESSAGES (\d+)", data[0] or b"")
    return int(match.group(1)) if match else 0


async def test_sigkill_during_catch_up_loses_nothing_and_stores_nothing_twice(migrated: str, dovecot: Dovecot) -> None:
    """A poller process killed (SIGKILL) just after one of its moves, again and again: whatever the
    processed folder holds is in the database every time, nothing leaves the server, and the last
    run finishes with every message stored once."""
    total = 1500
    await asyncio.to_thread(append_messages, dovecot, [make_message(i, tag="kill") for i in range(total)])
    with imap_session(dovecot, None) as conn:
        assert conn.create("Processed")[0] == "OK"
    everything = await asyncio.to_thread(message_ids, dovecot, "INBOX")
    assert len(everything) == total
    db = Database(migrated)
    root = Path(__file__).resolve().parent.parent
    rng = random.Random(7)
    kills = 0
    for _ in range(5):
        before = await asyncio.to_thread(status_messages, dovecot, "Processed")
        if before == total:
            break
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _CHILD, migrated, str(dovecot.port), dovecot.user, dovecot.password,
            cwd=root, env={**os.environ, "PYTHONPATH": str(root)}, stdout=asyncio.subprocess.PIPE,
        )
        assert proc.stdout is not None
        assert await asyncio.wait_for(proc.stdout.readline(), 60) == b"ready\n"
        # kill as soon as this run has moved something (a commit and the next fetches are under way)
        deadline = asyncio.get_running_loop().time() + 60
        while await asyncio.to_thread(status_messages, dovecot, "Processed") == before:
            assert asyncio.get_running_loop().time() < deadline, "the poller moved nothing"
            await asyncio.sleep(0.002)
        await asyncio.sleep(rng.uniform(0, 0.03))
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        kills += 1
        moved, waiting = await asyncio.to_thread(settled_view, dovecot)
        assert moved <= stored_message_ids(db), "a message was moved before it was committed"
        assert moved | waiting == everything and not moved & waiting  # nothing lost, nothing copied twice
        with db.session() as session:  # the dead process's lease would keep the next one standing by for 30 s
            session.execute(delete(Lease))
    assert kills >= 2
    poller = ImapPoller(poller_config(dovecot), db)
    async with running(poller):
        await until(lambda: poller.health["state"] == "idle", "the last run to finish its scan", timeout=60)
    with db.session() as session:
        assert session.scalar(select(func.count()).select_from(InboundMessage)) == total
        assert session.scalar(select(func.count(func.distinct(InboundMessage.message_id)))) == total
    db.dispose()
    assert await asyncio.to_thread(mailbox_uids, dovecot, "INBOX") == []
    assert len(await asyncio.to_thread(mailbox_uids, dovecot, "Processed")) == total


def _parsed_return_path(raw: bytes) -> str:
    """The Return-Path as the header parser gives it (what return_path did before its fast path)."""
    value = BytesHeaderParser().parsebytes(raw[:256 * 1024]).get("Return-Path")
    if value is None:
        return UNKNOWN_ENVELOPE
    return parseaddr(str(value))[1] or str(value).strip().strip("<>").strip()


def test_return_path_fast_path_agrees_with_the_header_parser() -> None:
    """return_path reads a leading one-line Return-Path without a header parse; on any input it
    answers what the parser would (random header soup, folded and non-ASCII lines included)."""
    pieces = [
        b"Return-Path:", b"return-path:", b"RETURN-PATH:", b" ", b"\t", b"<", b">", b"a@b.example", b"\r\n",
        b"\n", b"\r", b"x", b"\xc3\xa9", b"From: y@z.example\r\n", b"\r\n\r\n", b"(comment)", b'"q"', b"<>",
        b",", b":", b"@", b"Return-Path: <z@y.example>\r\n", b"\x00",
    ]
    rng = random.Random(12)
    for _ in range(20000):
        raw = b"".join(rng.choice(pieces) for _ in range(rng.randint(1, 10)))
        if rng.random() < 0.5:
            raw = b"Return-Path:" + raw
        assert return_path(raw) == _parsed_return_path(raw), raw
    for raw in (make_message(1), make_message(2, sender="a.b+c@d.example"), b"Return-Path: <>\r\n\r\nbody"):
        assert return_path(raw) == _parsed_return_path(raw)
