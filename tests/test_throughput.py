"""Processing several messages at once stays exactly-once, and senders take turns (no timed assertions here:
speed is measured by bench/intake.py and bench/flood.py)."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import select

from mailer.app import Service
from mailer.models import InboundMessage, Report
from tests.conftest import make_config, smtp_port
from tests.relay import CaptureRelay
from tests.test_intake import asend, report_bytes

MAINTAINERS = {"mara@project.test", "max@project.test"}


@pytest.fixture
async def started(request: pytest.FixtureRequest, tmp_path: Path, migrated: str, relay: CaptureRelay) -> AsyncIterator[Service]:
    """The service with ``worker.concurrency`` from the test's ``concurrency`` marker-less param (default 4)."""
    concurrency = getattr(request, "param", 4)
    config = make_config(tmp_path, migrated, relay.url, worker={"concurrency": concurrency},
                         service={"acks_per_sender_per_day": 1000})
    svc = Service(config)
    await svc.start(background=False)
    yield svc
    await svc.stop()
    svc.db.dispose()


def acks(relay: CaptureRelay) -> Counter[str]:
    return Counter(str(m.message["In-Reply-To"]) for m in relay.messages if not set(m.rcpt_tos) & MAINTAINERS)


async def test_concurrent_processing_files_and_acks_each_report_once(started: Service, relay: CaptureRelay) -> None:
    """40 reports from 8 senders, processed four at a time: 40 reports, 40 acks, 80 notices, unique tracking ids."""
    ids = [f"<many-{i}@reporter.test>" for i in range(40)]
    for i, msgid in enumerate(ids):
        await asend(smtp_port(started), report_bytes(msgid=msgid, body=f"Description: bug {i}\n"), sender=f"s{i % 8}@reporter.test")
    await started.settle()
    with started.db.session() as s:
        tracking = list(s.scalars(select(Report.tracking_id)))
        claimed = list(s.scalars(select(InboundMessage.claimed_by).where(InboundMessage.claimed_by.is_not(None))))
    assert len(tracking) == len(set(tracking)) == 40
    assert claimed == []  # every claim was released with its commit
    assert acks(relay) == Counter({msgid: 1 for msgid in ids})
    assert len(relay.messages) == 3 * 40


@pytest.mark.parametrize("started", [1], indirect=True)
async def test_a_flood_from_one_sender_does_not_hold_back_another(started: Service, relay: CaptureRelay) -> None:
    """20 reports from one sender, then one from another: the other one is processed within one round (second)."""
    port = smtp_port(started)
    for i in range(20):
        await asend(port, report_bytes(msgid=f"<flood-{i}@reporter.test>", body=f"Description: flood {i}\n"), sender="flood@reporter.test")
    await asend(port, report_bytes(msgid="<single@reporter.test>", body="Description: mine\n"), sender="single@reporter.test")
    await started.settle()
    with started.db.session() as s:
        order = [reporter for reporter, in s.execute(select(Report.reporter).order_by(Report.id))]
    assert len(order) == 21
    assert order.index("single@reporter.test") <= 1, order[:5]
    assert acks(relay)["<single@reporter.test>"] == 1
    assert sum(acks(relay).values()) == 21
