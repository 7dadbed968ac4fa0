"""IMAP intake against a real Dovecot: store before move, duplicates, IDLE, reconnects, limits."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from inbound.imap import ImapPoller, import_since
from inbound.imap_client import uid_set
from mailer.app import Service
from mailer.atrest import install_configured as install_data_key
from mailer.config import Config
from mailer.db import Database
from mailer.models import InboundMessage, Report
from tests.conftest import make_config, unavailable
from tests.dovecot import (
    Dovecot,
    DovecotUnavailable,
    append_messages,
    imap_session,
    mailbox_uids,
    make_message,
    start_dovecot,
)
from tests.relay import CaptureRelay

WAIT = 20.0  # generous bound for anything that should happen "promptly"


@pytest.fixture
def dovecot(tmp_path: Path) -> Iterator[Dovecot]:
    try:
        server = start_dovecot(tmp_path / "dovecot")
    except (DovecotUnavailable, OSError) as exc:
        unavailable(f"dovecot ({exc})")
        raise
    yield server
    server.cleanup()


def imap_config(
    tmp_path: Path, db_url: str, relay: CaptureRelay, server: Dovecot, **imap: Any
) -> Config:
    """IMAP alone (no SMTP listener), plaintext on loopback."""
    values = {
        "enabled": True, "host": "127.0.0.1", "port": server.port, "username": server.user,
        "password": server.password, "security": "none", "poll_seconds": 60, "idle_seconds": 60,
    }
    values.update(imap)
    return make_config(tmp_path, db_url, relay.url, smtp={"listen": ""}, imap=values)


async def until(condition: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


async def append(server: Dovecot, messages: list[bytes], mailbox: str = "INBOX", flags: str = "") -> None:
    await asyncio.to_thread(append_messages, server, messages, mailbox, flags)


async def uids(server: Dovecot, mailbox: str, criteria: str = "ALL") -> list[int]:
    return await asyncio.to_thread(mailbox_uids, server, mailbox, criteria)


def count(db: Database, model: Any) -> int:
    with db.session() as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


@contextlib.asynccontextmanager
async def running(poller: ImapPoller) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(poller.run())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@contextlib.asynccontextmanager
async def service(config: Config) -> AsyncIterator[Service]:
    svc = Service(config)
    await svc.start(background=False)
    try:
        yield svc
    finally:
        await svc.stop()
        svc.db.dispose()


def acked(relay: CaptureRelay, n: int) -> int:
    return sum(1 for i in range(n) if relay.handler.to(f"reporter{i}@reporter.test"))


async def test_batch_of_200_becomes_200_reports(tmp_path: Path, migrated: str, relay: CaptureRelay, dovecot: Dovecot) -> None:
    """200 unread messages become 200 reports and 200 acks, and all 200 are moved to the processed folder."""
    await append(dovecot, [make_message(i) for i in range(200)])
    async with service(imap_config(tmp_path, migrated, relay, dovecot)) as svc:
        await until(lambda: svc.imap.counters.stored >= 200, "200 stored")
        await svc.settle()
        assert count(svc.db, Report) == 200
        with svc.db.session() as session:
            row = session.scalars(select(InboundMessage).order_by(InboundMessage.id)).first()
            assert row is not None and row.transport == "imap"
            assert row.mail_from == "reporter0@reporter.test" and row.rcpt_tos == [dovecot.user]
        assert svc.imap.health["connected"] is True and svc.imap.health["last_error"] is None
    assert acked(relay, 200) == 200
    assert await uids(dovecot, "INBOX") == []
    assert len(await uids(dovecot, "Processed")) == 200


class CrashBeforeSecondMove(ImapPoller):
    """Fault injection: the process dies after the second batch is committed, before it is moved."""

    commit_batch = 100  # 200 messages: two commits, two moves
    batches = 0

    async def _mark_processed(self, conn: Any, uids: list[int]) -> None:
        self.batches += 1
        if self.batches == 2:
            raise asyncio.CancelledError
        await super()._mark_processed(conn, uids)


async def test_crash_between_commit_and_move_makes_no_duplicate(
    tmp_path: Path, migrated: str, relay: CaptureRelay, dovecot: Dovecot
) -> None:
    """A poller killed after committing but before moving re-fetches on restart, and dedup keeps it one report each."""
    await append(dovecot, [make_message(i) for i in range(200)])
    config = imap_config(tmp_path, migrated, relay, dovecot)
    install_data_key(config)  # the poller seals what it stores with the data key, as in the service it runs in
    db = Database(migrated)
    task = asyncio.create_task(CrashBeforeSecondMove(config.imap, db).run())
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, WAIT)
    db.dispose()
    assert len(await uids(dovecot, "INBOX")) == 100  # first batch moved, second batch stored but not moved
    async with service(config) as svc:
        # each fetched batch is committed in one transaction: the second batch is stored whole, not moved
        before = count(svc.db, InboundMessage)
        assert before == 200
        await until(lambda: svc.imap.counters.stored >= 100, "the rest stored")
        assert svc.imap.counters.duplicates == before - 100
        await svc.settle()
        assert count(svc.db, InboundMessage) == 200
        assert count(svc.db, Report) == 200
    assert acked(relay, 200) == 200 and len(relay.messages) == 200 * 3  # one ack + two maintainer notes each
    assert await uids(dovecot, "INBOX") == []


async def test_uidvalidity_change_rescans_without_duplicates(
    tmp_path: Path, migrated: str, relay: CaptureRelay, dovecot: Dovecot
) -> None:
    """A mailbox deleted and recreated with the same messages is rescanned, and no report is filed twice."""
    with imap_session(dovecot, None) as conn:
        assert conn.create("Reports")[0] == "OK"
    batch = [make_message(i) for i in range(20)]
    await append(dovecot, batch, "Reports")
    config = imap_config(tmp_path, migrated, relay, dovecot, mailbox="Reports", poll_seconds=0.5)
    async with service(config) as svc:
        await until(lambda: svc.imap.counters.stored >= 20, "first 20 stored")
        first = svc.imap.health["uidvalidity"]
        await until(lambda: svc.imap.health["state"] == "idle", "idle")

        def recreate() -> None:
            with imap_session(dovecot, None) as conn:
                assert conn.delete("Reports")[0] == "OK"
                assert conn.create("Reports")[0] == "OK"

        await asyncio.to_thread(recreate)
        await append(dovecot, batch, "Reports")
        await until(lambda: svc.imap.counters.stored >= 40, "the same 20 seen again")
        assert svc.imap.health["uidvalidity"] != first
        assert svc.imap.counters.duplicates == 20
        await svc.settle()
        assert count(svc.db, InboundMessage) == 20 and count(svc.db, Report) == 20
    assert acked(relay, 20) == 20 and len(relay.messages) == 20 * 3
    assert await uids(dovecot, "Reports") == []


async def test_idle_delivers_a_new_message_promptly(tmp_path: Path, migrated: str, relay: CaptureRelay, dovecot: Dovecot) -> None:
    """With polls a minute apart, a message appended while the poller idles is stored within seconds."""
    config = imap_config(tmp_path, migrated, relay, dovecot, poll_seconds=60, idle_seconds=60)
    db = Database(migrated)
    poller = ImapPoller(config.imap, db)
    async with running(poller):
        await until(lambda: poller.health["state"] == "idle", "IDLE")
        assert poller.health["idle"] is True
        await append(dovecot, [make_message(1, tag="idle")])
        await until(lambda: poller.counters.stored == 1, "the IDLE push", timeout=10)
        await until(lambda: poller.counters.moved == 1, "its move (after the commit)")
    db.dispose()
    assert await uids(dovecot, "INBOX") == []


async def test_dovecot_restart_under_the_service(
    tmp_path: Path, migrated: str, relay: CaptureRelay, dovecot: Dovecot, caplog: pytest.LogCaptureFixture
) -> None:
    """Dovecot restarting (BYE during IDLE) is logged and shown in health; the poller reconnects and keeps going."""
    caplog.set_level(logging.WARNING, logger="inbound.imap")
    async with service(imap_config(tmp_path, migrated, relay, dovecot)) as svc:
        poller = svc.imap
        await until(lambda: poller.health["state"] == "idle", "IDLE")
        await asyncio.to_thread(dovecot.stop)
        await until(lambda: not poller.health["connected"], "the disconnect to be noticed")
        assert poller.health["last_error"]
        await asyncio.sleep(1.5)  # at least one failed reconnect while the server is down
        await asyncio.to_thread(dovecot.start)
        await until(lambda: poller.health["connected"] and poller.health["state"] == "idle", "reconnect")
        await append(dovecot, [make_message(7, tag="restart")])
        await until(lambda: poller.counters.stored == 1, "the message after the restart")
        await svc.settle()
        assert count(svc.db, Report) == 1
    assert any("reconnecting" in r.getMessage() for r in caplog.records)
    assert relay.handler.to("reporter7@reporter.test")


async def test_oversized_message_is_left_in_place_and_alerted(
    tmp_path: Path, migrated: str, relay: CaptureRelay, dovecot: Dovecot, caplog: pytest.LogCaptureFixture
) -> None:
    """A message over the size limit is never fetched, moved or deleted: it stays, ALERT is logged once, it is listed."""
    caplog.set_level(logging.INFO, logger="inbound.imap")
    await append(dovecot, [make_message(1, tag="small"), make_message(2, tag="huge", size=8000), make_message(3, tag="small")])
    config = imap_config(tmp_path, migrated, relay, dovecot, max_message_size=4096, poll_seconds=0.3, idle_seconds=0.3)
    db = Database(migrated)
    poller = ImapPoller(config.imap, db)
    async with running(poller):
        await until(lambda: poller.counters.stored == 2, "the two small ones")
        for _ in range(3):  # later scans skip it quietly
            poller.polled.clear()
            await until(poller.polled.is_set, "another scan")
    db.dispose()
    assert [(o.uid, o.size > 4096) for o in poller.oversized] == [(2, True)]
    assert "huge-2@reporter.test" in poller.oversized[0].headers
    alerts = [r for r in caplog.records if r.levelno == logging.ERROR and "ALERT" in r.getMessage()]
    assert len(alerts) == 1
    assert await uids(dovecot, "INBOX") == [2]
    assert await uids(dovecot, "INBOX", "UNSEEN") == [2]
    assert poller.health["oversized"] == 1 and poller.health["last_error"] is None


class ExpungingPoller(ImapPoller):
    """Another client expunges UID 2 after the poller searched and sized it, before the body fetch."""

    def __init__(self, *args: Any, server: Dovecot, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.server = server
        self.raced = False

    async def before_fetch(self, uids: list[int]) -> None:
        if not self.raced and 2 in uids:
            self.raced = True
            await asyncio.to_thread(self._expunge, 2)

    def _expunge(self, uid: int) -> None:
        with imap_session(self.server) as conn:
            assert conn.uid("STORE", str(uid), "+FLAGS.SILENT", r"(\Deleted)")[0] == "OK"
            assert conn.expunge()[0] == "OK"


async def test_message_expunged_mid_fetch_is_skipped(
    tmp_path: Path, migrated: str, relay: CaptureRelay, dovecot: Dovecot
) -> None:
    """A message expunged by another client between SEARCH and FETCH is skipped without an error."""
    await append(dovecot, [make_message(i, tag="race") for i in range(1, 5)])
    config = imap_config(tmp_path, migrated, relay, dovecot)
    db = Database(migrated)
    poller = ExpungingPoller(config.imap, db, server=dovecot)
    async with running(poller):
        await until(lambda: poller.counters.stored == 3, "the three others")
        await until(lambda: poller.health["state"] == "idle", "IDLE after the scan")
    assert poller.raced and poller.counters.vanished == 1
    assert poller.health["last_error"] is None and poller.health["consecutive_failures"] == 0
    assert count(db, InboundMessage) == 3
    db.dispose()
    assert await uids(dovecot, "INBOX") == []


async def test_without_move_messages_are_flagged_and_never_taken_twice(
    tmp_path: Path, migrated: str, relay: CaptureRelay
) -> None:
    """On a server without MOVE, stored messages get \\Seen + $SecMailerStored and a restarted poller skips them."""
    caps = "IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE UIDPLUS LITERAL+"
    try:
        server = start_dovecot(tmp_path / "dovecot-nomove", extra_conf=f"imap_capability = {caps}")
    except DovecotUnavailable as exc:
        unavailable(f"dovecot ({exc})")
        raise
    try:
        await append(server, [make_message(i, tag="flag") for i in range(5)])
        config = imap_config(tmp_path, migrated, relay, server, poll_seconds=0.3)
        db = Database(migrated)
        for _ in range(2):  # the second poller is the "restart": it must find nothing to take
            poller = ImapPoller(config.imap, db)
            async with running(poller):
                await until(poller.polled.is_set, "a scan")
                poller.polled.clear()
                await until(poller.polled.is_set, "a second scan")
            assert poller.health["move"] is False
        assert count(db, InboundMessage) == 5
        assert poller.counters.stored == 0
        db.dispose()
        assert len(await uids(server, "INBOX", "KEYWORD $SecMailerStored SEEN")) == 5
        assert await uids(server, "Processed") == []
    finally:
        server.cleanup()


async def test_first_start_leaves_read_mail_alone_until_imported(
    tmp_path: Path, migrated: str, relay: CaptureRelay, dovecot: Dovecot
) -> None:
    """Read messages present at first start stay put; import_since takes them; later arrivals are taken read or not."""
    await append(dovecot, [make_message(i, tag="old") for i in range(3)], flags=r"\Seen")
    await append(dovecot, [make_message(i, tag="unread") for i in range(2)])
    config = imap_config(tmp_path, migrated, relay, dovecot)
    db = Database(migrated)
    poller = ImapPoller(config.imap, db)
    async with running(poller):
        await until(lambda: poller.counters.stored == 2, "the unread two")
        await until(lambda: poller.health["state"] == "idle", "IDLE")
        await append(dovecot, [make_message(9, tag="late-but-read")], flags=r"\Seen")
        await until(lambda: poller.counters.stored == 3, "a read message that arrived after the start")
        await until(lambda: poller.counters.moved == 3, "its move (after the commit)")
    assert await uids(dovecot, "INBOX") == [1, 2, 3]
    imported = await import_since(config.imap, db, date.today() - timedelta(days=1))
    assert imported == 3
    assert await import_since(config.imap, db, date.today() - timedelta(days=1)) == 0
    assert count(db, InboundMessage) == 6
    db.dispose()
    assert await uids(dovecot, "INBOX") == []


def test_uid_set_compresses_ranges() -> None:
    """UID sets are sent as compact ranges."""
    assert uid_set([7, 1, 2, 3, 5, 6, 9]) == "1:3,5:7,9"
