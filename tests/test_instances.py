"""Several real `mailer serve` processes: claims share the work on PostgreSQL, SQLite stays single-instance,
SIGTERM drains within the grace period.

Every test here runs real processes against a real database and the capture relay;
the clients retry like an MTA (another instance, or the same one after a pause).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import signal
import smtplib
import socket
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import func, select

from mailer.db import Database, upgrade
from mailer.models import InboundMessage, OutboxMessage, Report
from tests import test_imap
from tests.conftest import MAINTAINERS, PG_ADMIN, gnupg_home, unavailable
from tests.dovecot import Dovecot
from tests.relay import CaptureRelay
from tests.test_crash import free_port
from tests.test_intake import report_bytes

CONTACT = "security@example.org"
MAINTAINER_ADDRESSES = {m["address"] for m in MAINTAINERS}
SENDERS = [f"sender{i}@reporter.test" for i in range(7)]
_DRAINING: set[asyncio.Future[bytes]] = set()
dovecot = test_imap.dovecot  # the fixture


# --------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh, migrated PostgreSQL database (these tests are about several instances: PostgreSQL only)."""
    name = f"mailer_inst_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        unavailable(f"PostgreSQL at {PG_ADMIN} ({exc})")
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = f"{PG_ADMIN.rsplit('/', 1)[0].replace('postgresql://', 'postgresql+psycopg://')}/{name}"
    try:
        upgrade(url)
        yield url
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@dataclass
class Instance:
    proc: asyncio.subprocess.Process
    smtp: int
    lmtp: int
    log: Path

    def errors(self) -> list[str]:
        return [line for line in self.log.read_text(encoding="utf-8", errors="replace").splitlines() if " ERROR " in line]


@dataclass
class Cluster:
    """The environment shared by the instances of one test: database, relay, data dirs."""

    db_url: str
    relay: CaptureRelay
    tmp: Path
    extra: dict[str, str] = field(default_factory=dict)
    instances: list[Instance] = field(default_factory=list)
    # instances that share a database share its data key (report content is encrypted at rest)
    data_key: str = field(default_factory=lambda: base64.b64encode(os.urandom(32)).decode())

    def env(self, name: str, smtp: int, lmtp: int) -> dict[str, str]:
        config = self.tmp / "mailer.toml"
        if not config.exists():
            config.write_text("".join(
                f'[[maintainers]]\nname = "{m["name"]}"\naddress = "{m["address"]}"\n\n' for m in MAINTAINERS
            ), encoding="utf-8")
        return {
            "MAILER_CONFIG": str(config),
            "MAILER_DATABASE_URL": self.db_url,
            "MAILER_SMTP_LISTEN": f"127.0.0.1:{smtp}",
            "MAILER_LMTP_LISTEN": f"127.0.0.1:{lmtp}",
            "MAILER_RELAY_URL": self.relay.url,
            # one service key (a copy of the same home per instance, as on separate machines)
            "MAILER_GNUPG_HOME": gnupg_home(),
            "MAILER_SERVICE_DATA_DIR": str(self.tmp / name),
            "MAILER_DATA_KEY": self.data_key,
            "MAILER_SERVICE_ACKS_PER_SENDER_PER_DAY": "1000",
            "MAILER_WORKER_POLL_SECONDS": "0.3",
            "MAILER_WORKER_LEASE_SECONDS": "3",
            **self.extra,
        }

    async def start(self, name: str, *, smtp: int = 0, lmtp: int = 0) -> Instance:
        smtp, lmtp = smtp or free_port(), lmtp or free_port()
        log = self.tmp / f"{name}.log"
        instance = Instance(await spawn(self.env(name, smtp, lmtp), log), smtp, lmtp, log)
        self.instances.append(instance)
        return instance


async def spawn(env: dict[str, str], log: Path) -> asyncio.subprocess.Process:
    """`mailer serve`, its log in ``log``; returns once it listens."""
    with log.open("ab") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", "import sys; from mailer.cli import main; sys.exit(main(['serve']))",
            env={**os.environ, **env}, stdout=asyncio.subprocess.PIPE, stderr=err,
        )
    assert proc.stdout is not None
    while b"database:" not in (line := await asyncio.wait_for(proc.stdout.readline(), 60)):
        assert line, f"mailer serve exited before listening: {log.read_text()[-2000:]}"
    _DRAINING.add(asyncio.ensure_future(proc.stdout.read()))  # keep the pipe drained
    return proc


@contextlib.asynccontextmanager
async def cluster(db_url: str, tmp: Path, **extra: str) -> AsyncIterator[Cluster]:
    relay = CaptureRelay()
    await relay.start()
    group = Cluster(db_url, relay, tmp, {key: str(value) for key, value in extra.items()})
    try:
        yield group
    finally:
        for instance in group.instances:
            if instance.proc.returncode is None:
                instance.proc.send_signal(signal.SIGTERM)
        for instance in group.instances:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(instance.proc.wait(), 20)
            if instance.proc.returncode is None:
                instance.proc.kill()
                await instance.proc.wait()
        await relay.stop()


def message(i: int, tag: str) -> tuple[str, str, bytes]:
    """(envelope sender, Message-ID, bytes) of report ``i``; several reports per sender."""
    msgid = f"<{tag}-{i}@reporter.test>"
    return SENDERS[i % len(SENDERS)], msgid, report_bytes(msgid=msgid, body=f"Description: bug number {i}\n", subject=f"Bug {i}")


def deliver_once(port: int, lmtp: bool, sender: str, raw: bytes) -> bool:
    """One SMTP or LMTP transaction; True only when the server said 250 to the data."""
    try:
        if lmtp:
            with smtplib.LMTP("127.0.0.1", port, timeout=15) as client:
                client.sendmail(sender, [CONTACT], raw)
        else:
            with smtplib.SMTP("127.0.0.1", port, timeout=15) as client:
                client.sendmail(sender, [CONTACT], raw)
        return True
    except (smtplib.SMTPException, OSError):
        return False


def endpoints(instances: list[Instance]) -> list[tuple[int, bool]]:
    return [(i.smtp, False) for i in instances] + [(i.lmtp, True) for i in instances]


async def deliver(targets: list[tuple[int, bool]], sender: str, raw: bytes, *, first: int, tries: int = 40) -> None:
    """Like an MTA: try the endpoints in turn, starting at ``first``, pausing between rounds, until one says 250."""
    for attempt in range(tries):
        port, lmtp = targets[(first + attempt) % len(targets)]
        if await asyncio.to_thread(deliver_once, port, lmtp, sender, raw):
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"not accepted after {tries} tries")


async def stream(targets: list[tuple[int, bool]], messages: list[tuple[str, str, bytes]], *, clients: int = 6) -> None:
    """Send every message once (retrying until accepted), ``clients`` at a time, spread over the endpoints."""
    queue = iter(enumerate(messages))

    async def client() -> None:
        for i, (sender, _, raw) in queue:
            await deliver(targets, sender, raw, first=i)

    await asyncio.gather(*(client() for _ in range(clients)))


def acks(relay: CaptureRelay) -> Counter[str]:
    """Acknowledgements at the relay by the report they answer (maintainer notices also carry In-Reply-To)."""
    return Counter(
        str(m.message["In-Reply-To"]) for m in relay.messages if not set(m.rcpt_tos) & MAINTAINER_ADDRESSES
    )


async def wait_for_acks(relay: CaptureRelay, expected: set[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if expected <= set(acks(relay)):
            return
        await asyncio.sleep(0.2)
    missing = expected - set(acks(relay))
    raise AssertionError(f"{len(missing)} of {len(expected)} reports not acknowledged, e.g. {sorted(missing)[:3]}")


def filed(db_url: str) -> tuple[int, int, int, Counter[str]]:
    """(reports, distinct tracking ids, inbound rows, filed reports per Message-ID)."""
    db = Database(db_url)
    try:
        with db.session() as s:
            reports = s.scalar(select(func.count()).select_from(Report)) or 0
            tracking = s.scalar(select(func.count(func.distinct(Report.tracking_id)))) or 0
            inbound = s.scalar(select(func.count()).select_from(InboundMessage)) or 0
            per_message = Counter(
                str(msgid) for msgid in s.scalars(
                    select(InboundMessage.message_id).where(InboundMessage.report_id.is_not(None))
                )
            )
            return reports, tracking, inbound, per_message
    finally:
        db.dispose()


def exactly_once(db_url: str, relay: CaptureRelay, ids: set[str], *, resent_ok: bool = False) -> None:
    reports, tracking, inbound, per_message = filed(db_url)
    assert reports == len(ids) == tracking == inbound, (reports, tracking, inbound, len(ids))
    assert set(per_message) == ids and set(per_message.values()) == {1}
    counted = acks(relay)
    assert set(counted) == ids
    if resent_ok:
        # a mail sent just before its sender was killed may go out again: with the Message-ID of its outbox row
        distinct: dict[str, set[str]] = {}
        for m in relay.messages:
            if not set(m.rcpt_tos) & MAINTAINER_ADDRESSES:
                distinct.setdefault(str(m.message["In-Reply-To"]), set()).add(str(m.message["Message-ID"]))
        assert {len(v) for v in distinct.values()} == {1}, "an ack was composed twice"
    else:
        assert set(counted.values()) == {1}, [k for k, v in counted.items() if v > 1][:5]
        assert len(relay.messages) == 3 * len(ids)  # the ack and two maintainer notices each


# --------------------------------------------------------------------------- PostgreSQL: several instances


@pytest.mark.slow
async def test_instances_share_the_work_exactly_once(pg_url: str, tmp_path: Path) -> None:
    """Two instances on one database under a stream over SMTP and LMTP: each report filed once, acked once.

    (Three instances: the SIGKILL test below.)
    """
    count, n = 2, 80
    messages = [message(i, f"share{count}") for i in range(n)]
    async with cluster(pg_url, tmp_path) as group:
        instances = [await group.start(f"i{k}") for k in range(count)]
        await stream(endpoints(instances), messages)
        ids = {msgid for _, msgid, _ in messages}
        await wait_for_acks(group.relay, ids, timeout=90)
        await asyncio.sleep(1.0)  # a duplicate would show up now
        exactly_once(pg_url, group.relay, ids)
        for instance in instances:
            instance.proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(instance.proc.wait(), 20) == 0
        for instance in instances:
            assert instance.errors() == [], instance.errors()[:3]
    exactly_once(pg_url, group.relay, ids)


@pytest.mark.slow
async def test_a_killed_instance_claims_are_taken_over(pg_url: str, tmp_path: Path) -> None:
    """SIGKILL one of three instances mid-stream: after its lease the others finish its work, still exactly once."""
    n = 80
    messages = [message(i, "kill") for i in range(n)]
    async with cluster(pg_url, tmp_path) as group:
        instances = [await group.start(f"k{k}") for k in range(3)]
        victim = instances[0]
        sending = asyncio.ensure_future(stream(endpoints(instances), messages))
        # kill it while it holds work (claims on stored messages or outgoing mail), early in the stream:
        # once the stream is in, a fast victim may have finished its share and hold nothing any more
        await wait_for_acks(group.relay, {msgid for _, msgid, _ in messages[:3]}, timeout=60)
        held = await held_by(pg_url, victim.proc.pid, timeout=30)
        victim.proc.send_signal(signal.SIGKILL)
        await victim.proc.wait()
        await sending  # its endpoints refuse now: the clients go to the others
        ids = {msgid for _, msgid, _ in messages}
        await wait_for_acks(group.relay, ids, timeout=90)
        # the acks may all be the others' own: the victim's last claims (notices) run out after the
        # 3 s lease and the others' senders take them on their next pass (every 5 s when idle)
        assert await released_by(pg_url, victim.proc.pid, timeout=30) == ([], [])  # all taken over, finished
        exactly_once(pg_url, group.relay, ids, resent_ok=True)
        assert held != ([], [])
        for instance in instances[1:]:
            assert instance.errors() == [], instance.errors()[:3]


async def released_by(db_url: str, pid: int, *, timeout: float) -> tuple[list[int], list[int]]:
    """What the instance with ``pid`` still holds, once it holds nothing or after ``timeout``."""
    deadline = time.monotonic() + timeout
    while (held := await held_by(db_url, pid, timeout=0)) != ([], []) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    return held


async def held_by(db_url: str, pid: int, *, timeout: float) -> tuple[list[int], list[int]]:
    """Ids of the inbound and outbox rows claimed by the instance with ``pid``, waiting up to ``timeout`` for some."""
    db = Database(db_url)
    deadline = time.monotonic() + timeout
    try:
        while True:
            with db.session() as s:
                inbound = list(s.scalars(select(InboundMessage.id).where(InboundMessage.claimed_by.like(f"%:{pid}:%"))))
                outbox = list(s.scalars(select(OutboxMessage.id).where(OutboxMessage.claimed_by.like(f"%:{pid}:%"))))
            if inbound or outbox or time.monotonic() >= deadline:
                return inbound, outbox
            await asyncio.sleep(0.01)
    finally:
        db.dispose()


# --------------------------------------------------------------------------- SQLite: one instance


async def test_second_serve_on_one_sqlite_database_is_refused(tmp_path: Path) -> None:
    """The second `serve` exits 1 with one line naming the first one's pid and host; the first keeps serving."""
    db_url = f"sqlite:///{tmp_path / 'shared' / 'mailer.db'}"
    upgrade(db_url)
    async with cluster(db_url, tmp_path) as group:
        first = await group.start("one")
        env = group.env("two", free_port(), free_port())
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", "import sys; from mailer.cli import main; sys.exit(main(['serve']))",
            env={**os.environ, **env}, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 1
        lines = [line for line in err.decode().splitlines() if line.startswith("mailer:")]
        assert len(lines) == 1, err.decode()
        assert f"pid {first.proc.pid} on {os.uname().nodename}" in lines[0]
        assert "SQLite" in lines[0] and "PostgreSQL" in lines[0]
        assert b"listening" not in out
        assert await asyncio.to_thread(deliver_once, first.smtp, False, SENDERS[0], message(0, "lock")[2])
        await wait_for_acks(group.relay, {message(0, "lock")[1]}, timeout=30)


# --------------------------------------------------------------------------- SIGTERM


@pytest.mark.slow
async def test_sigterm_mid_burst_exits_within_the_grace_period_and_loses_nothing(tmp_path: Path) -> None:
    """SIGTERM during a burst: 421 to new connections, exit within the grace period; after a restart every
    message that got 250 is filed once and acked once, and the client's retries of the others file them once too."""
    db_url = f"sqlite:///{tmp_path / 'mailer.db'}"
    upgrade(db_url)
    grace = 4.0
    n = 80
    messages = [message(i, "term") for i in range(n)]
    accepted: set[int] = set()
    async with cluster(db_url, tmp_path, MAILER_SERVICE_SHUTDOWN_GRACE_SECONDS=str(grace)) as group:
        instance = await group.start("t")
        queue = iter(enumerate(messages))

        async def client(lmtp: bool) -> None:
            for i, (sender, _, raw) in queue:
                port = instance.lmtp if lmtp else instance.smtp
                if await asyncio.to_thread(deliver_once, port, lmtp, sender, raw):
                    accepted.add(i)

        clients = asyncio.ensure_future(asyncio.gather(*(client(k % 2 == 1) for k in range(6))))
        while len(accepted) < 25:
            await asyncio.sleep(0.02)
        # a client that stalls mid-DATA: the service waits for it, then gives up with 451 (it keeps the message)
        stalled = await asyncio.to_thread(_stalled_data, instance.smtp)
        started = time.monotonic()
        instance.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        # while it drains, a new connection is told 421
        assert (await asyncio.to_thread(_greeting, instance.smtp)).startswith(b"421")
        reply = await asyncio.to_thread(stalled.recv, 200)
        assert reply.startswith(b"451"), reply
        stalled.close()
        assert await asyncio.wait_for(instance.proc.wait(), grace + 5) == 0
        elapsed = time.monotonic() - started
        await clients
        assert elapsed <= grace, f"exit took {elapsed:.2f}s, grace period {grace}s"
        assert instance.errors() == [], instance.errors()[:3]
        assert len(accepted) < n, "the burst ended before the SIGTERM: nothing was tested"

        restarted = await group.start("t", smtp=instance.smtp, lmtp=instance.lmtp)
        # the MTA retries what got no 250, and some of what did (it cannot always tell): harmless
        for i, (sender, _, raw) in enumerate(messages):
            if i not in accepted or i % 5 == 0:
                await deliver(endpoints([restarted]), sender, raw, first=i)
        ids = {msgid for _, msgid, _ in messages}
        await wait_for_acks(group.relay, ids, timeout=90)
        await asyncio.sleep(0.5)
        exactly_once(db_url, group.relay, ids, resent_ok=True)


def _greeting(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=3) as sock:
        return sock.recv(200)


def _stalled_data(port: int) -> socket.socket:
    """An SMTP session that sent half a message after DATA and then waits (its socket, reading the next reply)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    reader = sock.makefile("rb")

    def command(line: bytes, code: bytes) -> None:
        sock.sendall(line + b"\r\n")
        while (reply := reader.readline())[3:4] == b"-":
            pass
        assert reply.startswith(code), (line, reply)

    assert reader.readline().startswith(b"220")
    command(b"EHLO client.test", b"250")
    command(b"MAIL FROM:<stall@reporter.test>", b"250")
    command(b"RCPT TO:<security@example.org>", b"250")
    command(b"DATA", b"354")
    sock.sendall(b"Subject: half\r\nMessage-ID: <stalled@reporter.test>\r\n\r\nDescription: only the first li")
    return sock



# --------------------------------------------------------------------------- leases (IMAP: one poller per mailbox)


def test_a_lease_has_one_holder_until_it_expires_or_is_released(migrated: str) -> None:
    """The second instance is told who holds the mailbox; it gets it once the lease runs out or is handed back."""
    from datetime import timedelta

    from mailer.db import acquire_lease, release_lease
    from mailer.models import utcnow

    first, second = Database(migrated), Database(migrated)
    try:
        now = utcnow()
        assert acquire_lease(first, "imap:x", now=now, seconds=30) is None
        assert acquire_lease(second, "imap:x", now=now, seconds=30) == first.owner
        assert acquire_lease(first, "imap:x", now=now + timedelta(seconds=20), seconds=30) is None  # renewed
        assert acquire_lease(second, "imap:x", now=now + timedelta(seconds=40), seconds=30) == first.owner
        assert acquire_lease(second, "imap:x", now=now + timedelta(seconds=51), seconds=30) is None  # expired: taken over
        assert acquire_lease(first, "imap:x", now=now + timedelta(seconds=52), seconds=30) == second.owner
        release_lease(second, "imap:x")
        assert acquire_lease(first, "imap:x", now=now + timedelta(seconds=53), seconds=30) is None
    finally:
        first.dispose()
        second.dispose()


async def test_one_poller_per_mailbox_and_a_standby_takes_over(tmp_path: Path, migrated: str, relay: CaptureRelay,
                                                               dovecot: Dovecot) -> None:
    """Two instances watch one mailbox: one polls, the other stands by; when the first stops, the second polls."""
    from inbound.imap import ImapPoller
    from tests.test_imap import append, imap_config, make_message, running, uids, until

    config = imap_config(tmp_path, migrated, relay, dovecot, poll_seconds=0.5, idle_seconds=0.5)
    first_db, second_db = Database(migrated), Database(migrated)
    first = ImapPoller(config.imap, first_db, lease_seconds=1.5)
    second = ImapPoller(config.imap, second_db, lease_seconds=1.5)
    try:
        async with running(first):
            await until(lambda: first.health["connected"], "the first poller")
            async with running(second):
                await until(lambda: second.health["state"] == "standby", "the second to stand by")
                await append(dovecot, [make_message(i, tag="lease") for i in range(5)])
                await until(lambda: first.counters.stored == 5, "the first to store them")
                await asyncio.sleep(1.0)
                assert second.health["standby_for"] == first_db.owner and not second.health["connected"]
                assert second.counters.stored == 0
            async with running(second):
                await until(lambda: second.health["state"] == "standby", "the second to stand by again")
                await asyncio.sleep(0.1)
        # the first stopped and handed the lease back: the standby takes over within a third of the lease
        async with running(second):
            await until(lambda: second.health["connected"], "the takeover", timeout=5)
            await append(dovecot, [make_message(9, tag="after")])
            await until(lambda: second.counters.stored == 1, "the second to store the new one")
            # stored (committed) comes first, the move out of INBOX after it: wait for that before stopping
            deadline = time.monotonic() + 10
            while await uids(dovecot, "INBOX") and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
    finally:
        first_db.dispose()
        second_db.dispose()
    assert first.counters.stored == 5 and second.counters.stored == 1
    assert await uids(dovecot, "INBOX") == []
