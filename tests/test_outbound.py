"""The outbox and the sender: durable rows, retries with backoff, permanent failures, deadlines.

Time moves on a :class:`mailer.clock.FakeClock` given to the service: no sleeps, no SQL date rewrites.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from mailer.app import Service
from mailer.clock import FakeClock
from mailer.config import Config
from mailer.models import Event, OutboxMessage
from mailer.outgoing import MailKind, Outgoing
from tests.conftest import make_config, smtp_port
from tests.relay import CaptureRelay
from tests.test_intake import asend, report_bytes


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def service(config: Config, clock: FakeClock) -> AsyncIterator[Service]:
    """As in conftest, but every component reads the time from ``clock``."""
    svc = Service(config, clock=clock)
    await svc.start(background=False)
    yield svc
    await svc.stop()
    svc.db.dispose()


def rows(service: Service) -> list[OutboxMessage]:
    with service.db.session() as s:
        return list(s.scalars(select(OutboxMessage).order_by(OutboxMessage.id)))


def make_due(service: Service, clock: FakeClock) -> None:
    """Move the clock to the latest pending retry time: every pending row is due."""
    clock.set(max([clock(), *(r.next_attempt_at for r in rows(service) if r.state == "pending")]))


async def queue_one(service: Service) -> None:
    await asend(smtp_port(service), report_bytes())
    await service.worker.drain()


async def test_temporary_failure_is_retried_with_the_same_message_id(
    service: Service, relay: CaptureRelay, clock: FakeClock
) -> None:
    """A 451 from the relay leaves the row pending with a later attempt; the retry sends the same bytes."""
    await queue_one(service)
    relay.handler.replies = ["451 4.7.1 try later"] * 3
    await service.sender.drain()
    pending = rows(service)
    assert {r.state for r in pending} == {"pending"}
    assert all(r.attempts == 1 and r.next_attempt_at > clock() and "451" in (r.last_error or "") for r in pending)
    make_due(service, clock)
    await service.sender.drain()
    sent = rows(service)
    assert {r.state for r in sent} == {"sent"}
    assert sorted(m.raw for m in relay.messages) == sorted(r.raw for r in sent)


async def test_permanent_failure_is_recorded_at_once(
    service: Service, relay: CaptureRelay, caplog: pytest.LogCaptureFixture
) -> None:
    """A 550 marks the message failed immediately, with an event and an ALERT in the log."""
    await queue_one(service)
    relay.handler.replies = ["550 5.1.1 no such user"] * 3
    with caplog.at_level(logging.ERROR):
        await service.sender.drain()
    failed = rows(service)
    assert {r.state for r in failed} == {"failed"}
    assert "550" in (failed[0].last_error or "")
    assert "ALERT" in caplog.text
    with service.db.session() as s:
        events = list(s.scalars(select(Event).where(Event.kind == "delivery.failed")))
    assert len(events) == 3 and events[0].detail["reason"] == "permanent failure"


async def test_deadline_turns_temporary_failures_into_failed(
    service: Service, relay: CaptureRelay, clock: FakeClock
) -> None:
    """After deliver_until a temporary failure is final."""
    await queue_one(service)
    clock.set(max(r.deliver_until for r in rows(service)) + timedelta(seconds=1))
    relay.handler.replies = ["421 4.3.2 shutting down"] * 3
    await service.sender.drain()
    assert {r.state for r in rows(service)} == {"failed"}


async def test_unreachable_relay_is_temporary(tmp_path: Path, migrated: str) -> None:
    """A relay that refuses connections is a temporary failure, retried later."""
    svc = Service(make_config(tmp_path, migrated, "smtp://127.0.0.1:1"))
    await svc.start(background=False)
    try:
        await queue_one(svc)
        await svc.sender.drain()
        pending = rows(svc)
        assert {r.state for r in pending} == {"pending"}
        assert "unreachable" in (pending[0].last_error or "")
    finally:
        await svc.stop()
        svc.db.dispose()


async def test_maildir_transport_is_the_default(tmp_path: Path, migrated: str) -> None:
    """Without a relay the acknowledgement lands in <data_dir>/outgoing/new, CRLF-serialised."""
    cfg = make_config(tmp_path, migrated, "")
    svc = Service(cfg)
    await svc.start(background=False)
    try:
        await asend(smtp_port(svc), report_bytes())
        await svc.settle()
        assert {r.state for r in rows(svc)} == {"sent"}, [r.last_error for r in rows(svc)]
        files = sorted((cfg.service.data_dir / "outgoing" / "new").iterdir())
        assert len(files) == 3  # the ack and two maintainer notices
        raws = [f.read_bytes() for f in files]
        assert any(b"To: rita@reporter.test\r\n" in raw for raw in raws)
    finally:
        await svc.stop()
        svc.db.dispose()


async def test_outbox_rows_are_serialised_with_crlf(service: Service) -> None:
    """Every queued message uses CRLF line endings only (policy.SMTP on the wire)."""
    with service.db.session() as s:
        row = service.outbox.enqueue(s, Outgoing(kind=MailKind.ALERT, to="mara@project.test", subject="x\r\nBcc: a@b",
                                                 template="sendkey.txt.j2"))
        raw = row.raw
    assert b"\n" not in raw.replace(b"\r\n", b"")
    assert b"\r\nBcc:" not in raw


async def test_sign_only_mail_is_signed_by_the_sender_before_its_first_attempt(
    service: Service, relay: CaptureRelay
) -> None:
    """Acks are queued unsigned, signed by the sender and stored signed with the attempt: the relay got those bytes."""
    await queue_one(service)
    queued = rows(service)
    assert queued and all(r.needs_signature for r in queued)  # no maintainer has a key: all three are sign-only
    assert not any(b"multipart/signed" in r.raw for r in queued)
    await service.sender.drain()
    sent = rows(service)
    assert all(not r.needs_signature and r.state == "sent" and b"multipart/signed" in r.raw for r in sent)
    assert sorted(m.raw for m in relay.messages) == sorted(r.raw for r in sent)
    assert [r.message_id for r in sent] == [r.message_id for r in queued]


async def test_a_mail_that_cannot_be_signed_waits_and_nothing_goes_out_unsigned(
    service: Service, relay: CaptureRelay, clock: FakeClock
) -> None:
    """When signing fails the row stays pending with the reason; it is signed and sent on a later attempt."""
    await queue_one(service)

    def broken(raw: bytes) -> bytes:
        raise RuntimeError("gpg is gone")

    working, service.sender.signer = service.sender.signer, broken
    await service.sender.drain()
    assert relay.messages == []
    pending = rows(service)
    assert all(r.state == "pending" and r.needs_signature and "signing failed" in (r.last_error or "") for r in pending)
    service.sender.signer = working
    make_due(service, clock)
    await service.sender.drain()
    assert len(relay.messages) == len(pending) and all(b"multipart/signed" in m.raw for m in relay.messages)


async def test_a_long_drain_sends_every_batch_acks_first_and_skips_only_what_failed(
    service: Service, relay: CaptureRelay
) -> None:
    """More rows than one claimed batch: every row is sent once, each batch's acknowledgements first, and the
    claims skip only the rows that failed in this pass (a flood's thousands of sent rows never reach the query)."""
    port = smtp_port(service)
    for i in range(20):  # 20 acks and 40 notices: two batches of 50 and 10
        await asend(port, report_bytes(msgid=f"<batch-{i}@reporter.test>"), sender=f"b{i}@reporter.test")
    await service.worker.drain()
    skips: list[frozenset[int]] = []
    claim = service.sender._claim

    def recording(skip: frozenset[int] = frozenset()) -> list[OutboxMessage]:
        skips.append(skip)
        return claim(skip)

    service.sender._claim = recording  # type: ignore[method-assign]
    assert await service.sender.drain() == 60
    sent = rows(service)
    assert all(r.state == "sent" for r in sent) and len(relay.messages) == 60
    assert skips == [frozenset()] * 3  # two batches and the empty claim that ends the pass
    # the first batch of 50 holds the 20 acks, and they go first (in the order the relay got them)
    maintainers = {"mara@project.test", "max@project.test"}
    assert [not set(m.rcpt_tos) & maintainers for m in relay.messages] == [True] * 20 + [False] * 40


async def test_outcomes_are_recorded_across_batches_and_an_unrecorded_row_is_never_claimed_again(
    service: Service, relay: CaptureRelay
) -> None:
    """Outcomes wait for RECORD_EVERY of them across claimed batches: the rows sent but not recorded yet are
    skipped by the next claim (sent once), and every outcome is recorded when the pass ends."""
    port = smtp_port(service)
    for i in range(10):  # 10 acks and 20 notices
        await asend(port, report_bytes(msgid=f"<rec-{i}@reporter.test>"), sender=f"r{i}@reporter.test")
    await service.worker.drain()
    sender = service.sender
    sender.BATCH, sender.RECORD_EVERY = 4, 9  # type: ignore[misc]
    skips: list[frozenset[int]] = []
    recorded: list[int] = []
    claim, record = sender._claim, sender._record_many

    def claiming(skip: frozenset[int] = frozenset()) -> list[OutboxMessage]:
        skips.append(skip)
        return claim(skip)

    def recording(outcomes: list[tuple[OutboxMessage, object]]) -> None:
        recorded.append(len(outcomes))
        record(outcomes)  # type: ignore[arg-type]

    sender._claim = claiming  # type: ignore[method-assign]
    sender._record_many = recording  # type: ignore[method-assign]
    assert await sender.drain() == 30
    assert all(r.state == "sent" and r.attempts == 1 for r in rows(service))
    assert len(relay.messages) == 30 and len({m.message["Message-ID"] for m in relay.messages}) == 30
    # 7 batches of 4, one of 2 and the empty claim; what was sent and not recorded yet was skipped
    assert [len(s) for s in skips] == [0, 4, 8, 3, 7, 2, 6, 1, 3]
    assert recorded == [9, 9, 9, 3]  # not one transaction per batch of 4
