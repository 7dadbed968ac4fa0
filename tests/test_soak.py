"""A SIGKILL soak: `mailer serve` killed at random moments, many times, while an MTA-like client streams reports.

The kill schedule comes from a seeded RNG (``SOAK_SEED`` replays one; the seed is printed and is in
every assertion message). The client behaves like an MTA: a message that got no 250 (connection refused or
reset, 421, 451, timeout) is sent again later with the same bytes, alternating SMTP and LMTP; a message that
got 250 is never sent again. At the end, with the service running and its queues drained, every message is
filed once and acknowledged once at the capture relay (an ack sent again after a kill between the relay's
250 and the outbox commit carries the same Message-ID).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import smtplib
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from sqlalchemy import func, select

from mailer.db import Database
from mailer.models import InboundMessage, InboundState, OutboxMessage, OutboxState, Report
from tests.test_crash import free_port
from tests.test_instances import CONTACT, MAINTAINER_ADDRESSES, Cluster, Instance, cluster, message, spawn

KILLS = 10
CLIENTS = 4
GIVE_UP_SECONDS = 30.0  # a message not accepted within this is a failure (the service stayed down)


@dataclass
class Mta:
    """The sending side: which messages it took on, which got 250, what each attempt was told."""

    smtp: int
    lmtp: int
    rng: random.Random
    taken: dict[str, bytes] = field(default_factory=dict)
    accepted: set[str] = field(default_factory=set)
    rejected: dict[str, str] = field(default_factory=dict)  # 5xx, or never accepted
    outcomes: Counter[str] = field(default_factory=Counter)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    next_index: int = 0

    async def client(self) -> None:
        while not self.stop.is_set():
            i, self.next_index = self.next_index, self.next_index + 1
            sender, msgid, raw = message(i, "soak")
            self.taken[msgid] = raw
            await self.deliver(i, sender, msgid, raw)
            await asyncio.sleep(self.rng.uniform(0.1, 0.3))

    async def deliver(self, i: int, sender: str, msgid: str, raw: bytes) -> None:
        """Until 250: the same bytes again after a pause, alternating SMTP and LMTP; a 5xx is final."""
        deadline = time.monotonic() + GIVE_UP_SECONDS
        attempt = 0
        while time.monotonic() < deadline:
            lmtp = (i + attempt) % 2 == 1
            outcome = await asyncio.to_thread(attempt_once, self.lmtp if lmtp else self.smtp, lmtp, sender, raw)
            self.outcomes[outcome] += 1
            if outcome == "250":
                self.accepted.add(msgid)
                return
            if outcome.startswith("5"):
                self.rejected[msgid] = outcome
                return
            attempt += 1
            await asyncio.sleep(self.rng.uniform(0.1, 0.4))
        self.rejected[msgid] = f"not accepted within {GIVE_UP_SECONDS}s"


def attempt_once(port: int, lmtp: bool, sender: str, raw: bytes) -> str:
    """One SMTP or LMTP transaction: "250" when the data was accepted, else what went wrong."""
    try:
        client = (smtplib.LMTP if lmtp else smtplib.SMTP)("127.0.0.1", port, timeout=5)
    except ConnectionRefusedError:
        return "refused"
    except smtplib.SMTPConnectError as exc:
        return str(exc.smtp_code)
    except (smtplib.SMTPServerDisconnected, ConnectionError):
        return "reset"
    except TimeoutError:
        return "timeout"
    except OSError as exc:
        return f"oserror {exc.errno}"
    try:
        client.sendmail(sender, [CONTACT], raw)
        return "250"  # what happens at QUIT does not matter: the message is the server's now
    except smtplib.SMTPRecipientsRefused as exc:
        return str(next(iter(exc.recipients.values()))[0])
    except smtplib.SMTPResponseException as exc:
        return str(exc.smtp_code)
    except (smtplib.SMTPServerDisconnected, ConnectionError):
        return "reset"
    except TimeoutError:
        return "timeout"
    except OSError as exc:
        return f"oserror {exc.errno}"
    finally:
        with contextlib.suppress(smtplib.SMTPException, OSError):
            client.quit()
        client.close()


@dataclass
class Counts:
    reports: int
    tracking_ids: int
    inbound: int
    filed_per_message: Counter[str]
    waiting: int  # inbound messages not processed yet
    failed_inbound: int
    pending: int  # outgoing mail not sent yet
    failed_outbox: int
    acks_per_report: Counter[int]
    outbox_ids: set[str]
    ack_ids: dict[str, str]  # report's Message-ID -> the Message-ID of its ack (from the outbox)

    def __str__(self) -> str:
        return (f"{self.reports} reports, {self.tracking_ids} tracking ids, {self.inbound} inbound, {self.waiting} waiting,"
                f" {self.failed_inbound} failed, {self.pending} outgoing pending, {self.failed_outbox} failed,"
                f" {len(self.outbox_ids)} outgoing")


def counts(db_url: str) -> Counts:
    db = Database(db_url)
    try:
        with db.session() as s:
            inbound_states = Counter(str(state) for state in s.scalars(select(InboundMessage.state)))
            outbox_states = Counter(str(state) for state in s.scalars(select(OutboxMessage.state)))
            report_msgid = dict(s.execute(
                select(InboundMessage.report_id, InboundMessage.message_id).where(InboundMessage.report_id.is_not(None))
            ).all())
            acks = s.execute(select(OutboxMessage.report_id, OutboxMessage.message_id).where(OutboxMessage.kind == "ack")).all()
            return Counts(
                reports=s.scalar(select(func.count()).select_from(Report)) or 0,
                tracking_ids=s.scalar(select(func.count(func.distinct(Report.tracking_id)))) or 0,
                inbound=sum(inbound_states.values()),
                filed_per_message=Counter(
                    str(msgid) for msgid in s.scalars(
                        select(InboundMessage.message_id).where(InboundMessage.report_id.is_not(None))
                    )
                ),
                waiting=inbound_states[InboundState.RECEIVED.value] + inbound_states[InboundState.RETRY.value],
                failed_inbound=inbound_states[InboundState.FAILED.value],
                pending=outbox_states[OutboxState.PENDING.value],
                failed_outbox=outbox_states[OutboxState.FAILED.value],
                acks_per_report=Counter(report_id for report_id, _ in acks if report_id is not None),
                outbox_ids=set(s.scalars(select(OutboxMessage.message_id))),
                ack_ids={str(report_msgid.get(report_id)): str(msgid) for report_id, msgid in acks},
            )
    finally:
        db.dispose()


def relayed_acks(group: Cluster) -> dict[str, Counter[str]]:
    """Acks at the relay: the reporter's Message-ID (In-Reply-To) -> copies per ack Message-ID."""
    acks: dict[str, Counter[str]] = {}
    for m in group.relay.messages:
        if not set(m.rcpt_tos) & MAINTAINER_ADDRESSES:
            acks.setdefault(str(m.message["In-Reply-To"]), Counter())[str(m.message["Message-ID"])] += 1
    return acks


async def drained(db_url: str, group: Cluster, ids: set[str], seed: int, timeout: float) -> Counts:
    """Poll until every message is filed and processed, no mail is pending and every report's ack reached the relay."""
    deadline = time.monotonic() + timeout
    while True:
        now = await asyncio.to_thread(counts, db_url)
        if (now.reports >= len(ids) and now.waiting == 0 and now.pending == 0
                and ids <= set(relayed_acks(group))):
            return now
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"seed {seed}: not drained after {timeout}s: {now.reports} of {len(ids)} reports, {now.waiting} inbound"
                f" waiting, {now.pending} outgoing pending, {len(ids & set(relayed_acks(group)))} acks at the relay"
            )
        await asyncio.sleep(0.2)


async def soak(group: Cluster, rng: random.Random, seed: int) -> tuple[Mta, Instance]:
    """Stream reports from the MTA while the service is killed ``KILLS`` times and restarted; the running instance."""
    smtp, lmtp = free_port(), free_port()  # the same ports after each restart, as an MTA would retry them
    env, log = group.env("soak", smtp, lmtp), group.tmp / "soak.log"

    async def start() -> Instance:
        instance = Instance(await spawn(env, log), smtp, lmtp, log)
        group.instances.append(instance)
        return instance

    instance = await start()
    mta = Mta(smtp, lmtp, random.Random(rng.random()))
    clients: asyncio.Future[list[None]] = asyncio.gather(*(mta.client() for _ in range(CLIENTS)))
    kills: list[tuple[float, int]] = []
    started = time.monotonic()
    for _ in range(KILLS):
        await asyncio.sleep(rng.uniform(0.05, 1.5))  # after "listening": in intake, in the worker, in the sender
        assert not clients.done(), f"seed {seed}: the clients stopped: {clients}"
        instance.proc.send_signal(signal.SIGKILL)
        await instance.proc.wait()
        kills.append((round(time.monotonic() - started, 2), len(mta.accepted)))
        await asyncio.sleep(rng.uniform(0.0, 0.3))
        instance = await start()
    await asyncio.sleep(1.0)  # some reports after the last restart too
    mta.stop.set()
    await asyncio.wait_for(clients, GIVE_UP_SECONDS + 10)
    print(f"kills (seconds, accepted so far): {kills}")
    print(f"{len(mta.taken)} messages, attempts: {dict(mta.outcomes)}")
    return mta, instance


@pytest.mark.slow
async def test_sigkill_soak_files_and_acks_each_accepted_message_once(migrated: str, tmp_path: Path) -> None:
    """Many SIGKILLs at seeded random moments under an SMTP+LMTP stream with MTA retries: each message filed once, acked once."""
    seed = int(os.environ.get("SOAK_SEED") or random.SystemRandom().randrange(2**32))
    print(f"soak seed {seed} (SOAK_SEED={seed} replays the kill schedule)")
    rng = random.Random(seed)
    async with cluster(migrated, tmp_path, MAILER_WORKER_LEASE_SECONDS="2") as group:
        mta, instance = await soak(group, rng, seed)

        ids = set(mta.taken)
        assert mta.rejected == {}, f"seed {seed}: {mta.rejected}"
        assert mta.accepted == ids
        assert sum(n for outcome, n in mta.outcomes.items() if outcome != "250") > 0, "nothing was retried: nothing was tested"

        draining = time.monotonic()
        now = await drained(migrated, group, ids, seed, timeout=45)
        print(f"drained in {time.monotonic() - draining:.1f}s")
        acks = relayed_acks(group)
        resent = {msgid: copies for by_id in acks.values() for msgid, copies in by_id.items() if copies > 1}
        print(f"acks sent more than once (same Message-ID): {resent}")
        errors = instance.errors()
        print(f"ERROR log lines: {len(errors)} {errors[:3]}")

        # filed exactly once
        assert (now.reports, now.tracking_ids, now.inbound) == (len(ids),) * 3, f"seed {seed}: {now!s}"
        assert set(now.filed_per_message) == ids, f"seed {seed}: lost {sorted(ids - set(now.filed_per_message))[:5]}"
        duplicated = {msgid: n for msgid, n in now.filed_per_message.items() if n > 1}
        assert duplicated == {}, f"seed {seed}: filed more than once: {duplicated}"
        assert (now.failed_inbound, now.failed_outbox) == (0, 0), f"seed {seed}: {now!s}"
        # acknowledged exactly once: one ack composed per report, and at the relay one ack Message-ID per report
        assert set(now.acks_per_report.values()) == {1} and len(now.acks_per_report) == len(ids), f"seed {seed}"
        assert set(acks) == ids, (
            f"seed {seed}: no ack for {sorted(ids - set(acks))[:5]}, acks for unknown {sorted(set(acks) - ids)[:5]}")
        composed_twice = {report: sorted(by_id) for report, by_id in acks.items() if len(by_id) != 1}
        assert composed_twice == {}, f"seed {seed}: acks with different Message-IDs for one report: {composed_twice}"
        assert {report: next(iter(by_id)) for report, by_id in acks.items()} == now.ack_ids, f"seed {seed}"
        # and every mail at the relay is an outbox row (a resend repeats its row's Message-ID)
        relayed = {str(m.message["Message-ID"]) for m in group.relay.messages}
        assert relayed == now.outbox_ids, f"seed {seed}: {len(relayed ^ now.outbox_ids)} differ"
        assert errors == [], f"seed {seed}: {errors[:5]}"
