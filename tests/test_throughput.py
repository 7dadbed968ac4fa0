"""Processing several messages at once stays exactly-once, and senders take turns (no timed assertions here:
speed is measured by bench/intake.py and bench/flood.py)."""

from __future__ import annotations

import asyncio
import os
import queue
import signal
import threading
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

from mailer.app import Service
from mailer.metrics import REGISTRY
from mailer.models import InboundMessage, Report
from mailer.pipeline import PREPARE, Pipeline
from mailer.processing import Processing
from mailer.worker import Worker
from tests.conftest import make_config, smtp_port
from tests.relay import CaptureRelay
from tests.test_intake import asend, report_bytes

MAINTAINERS = {"mara@project.test", "max@project.test"}


@pytest.fixture
async def started(request: pytest.FixtureRequest, tmp_path: Path, migrated: str, relay: CaptureRelay) -> AsyncIterator[Service]:
    """The service with the ``[worker]`` settings of the test's param (default: concurrency 4, threads)."""
    worker = getattr(request, "param", {"concurrency": 4})
    config = make_config(tmp_path, migrated, relay.url, worker=worker, service={"acks_per_sender_per_day": 1000})
    svc = Service(config)
    await svc.start(background=False)
    yield svc
    await svc.stop()
    svc.db.dispose()


def acks(relay: CaptureRelay) -> Counter[str]:
    return Counter(str(m.message["In-Reply-To"]) for m in relay.messages if not set(m.rcpt_tos) & MAINTAINERS)


@pytest.mark.parametrize("started", [{"concurrency": 4}, {"concurrency": 4, "processes": 2}], indirect=True,
                         ids=["threads", "processes"])
async def test_concurrent_processing_files_and_acks_each_report_once(started: Service, relay: CaptureRelay) -> None:
    """40 reports from 8 senders, processed four at a time (threads, or two worker processes): 40 reports,
    40 acks, 80 notices, unique tracking ids."""
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


@pytest.mark.parametrize("started", [{"concurrency": 1}], indirect=True)
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


async def settle_all(service: Service, rounds: int = 100) -> None:
    """settle() until no message waits (a failed attempt is retried after a short backoff)."""
    for _ in range(rounds):
        await service.settle()
        with service.db.session() as s:
            waiting = s.scalar(select(func.count(InboundMessage.id)).where(InboundMessage.state.in_(("received", "retry"))))
        if not waiting:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{waiting} message(s) still waiting")


@pytest.mark.parametrize("started", [{"concurrency": 2, "processes": 1, "retry_base_seconds": 0.01}], indirect=True)
async def test_a_worker_process_killed_mid_burst_loses_and_duplicates_nothing(started: Service, relay: CaptureRelay) -> None:
    """SIGKILL a worker process while a burst is processed: its message's transaction rolls back, the
    failure is recorded, new processes take over, and every report is filed and acknowledged exactly once."""
    ids = [f"<kill-{i}@reporter.test>" for i in range(24)]
    for i, msgid in enumerate(ids):
        await asend(smtp_port(started), report_bytes(msgid=msgid, body=f"Description: bug {i}\n"), sender=f"k{i}@reporter.test")
    settling = asyncio.ensure_future(started.settle())
    killed: set[int] = set()
    for _ in range(400):  # kill the first worker process seen once some reports are filed, then once more
        await asyncio.sleep(0.02)
        with started.db.session() as s:
            filed = s.scalar(select(func.count(Report.id))) or 0
        children = [pid for pid in started.worker.process_ids() if pid not in killed]
        if filed >= 2 * len(killed) + 2 and children:
            os.kill(children[0], signal.SIGKILL)
            killed.add(children[0])
        if len(killed) == 2 or settling.done():
            break
    await settling
    await settle_all(started)
    assert killed, "no worker process was seen"
    with started.db.session() as s:
        tracking = list(s.scalars(select(Report.tracking_id)))
        states = Counter(s.scalars(select(InboundMessage.state)))
        retried = s.scalar(select(func.count(InboundMessage.id)).where(InboundMessage.attempts > 0))
    assert retried, "the kill hit no message in flight"  # the messages in flight were failed attempts, then done
    assert len(tracking) == len(set(tracking)) == 24
    assert states == Counter({"done": 24})
    assert acks(relay) == Counter({msgid: 1 for msgid in ids})
    assert len(relay.messages) == 3 * 24


@pytest.mark.parametrize("started", [{"concurrency": 2, "processes": 1}], indirect=True)
async def test_a_worker_process_killed_while_idle_is_replaced(started: Service, relay: CaptureRelay) -> None:
    """A worker process killed while it has nothing to do: the next message goes to a new one (it was sent
    to the dead one, and never answered)."""
    await asend(smtp_port(started), report_bytes(msgid="<idle-1@reporter.test>"), sender="i1@reporter.test")
    await started.settle()
    [child] = started.worker.process_ids()
    os.kill(child, signal.SIGKILL)
    for _ in range(200):  # until the pool has seen it die
        if child not in started.worker.process_ids():
            break
        await asyncio.sleep(0.05)
    await asend(smtp_port(started), report_bytes(msgid="<idle-2@reporter.test>"), sender="i2@reporter.test")
    await asyncio.wait_for(started.settle(), 60)
    assert acks(relay) == Counter({"<idle-1@reporter.test>": 1, "<idle-2@reporter.test>": 1})
    assert started.worker.process_ids() not in ([], [child])


def gpg_calls(operation: str) -> float:
    return REGISTRY.get_sample_value("mailer_gpg_seconds_count", {"op": operation}) or 0.0


@pytest.mark.parametrize("started", [{"concurrency": 2, "processes": 1}], indirect=True)
async def test_gpg_calls_in_a_worker_process_are_counted_by_the_service(started: Service, relay: CaptureRelay) -> None:
    """A report carrying an OpenPGP block is verified in the worker process; /metrics (served by the service
    process) counts that gpg call. The service process itself only signs here (the sender: detach-sign)."""
    before = gpg_calls("decrypt")
    block = "-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA256\n\nDescription: x\n-----BEGIN PGP SIGNATURE-----\n\n" \
            "iQEzBAEBCAAdFiEE\n=abcd\n-----END PGP SIGNATURE-----\n"
    await asend(smtp_port(started), report_bytes(msgid="<signed@reporter.test>", body=block), sender="v@reporter.test")
    await started.settle()
    assert acks(relay)["<signed@reporter.test>"] == 1
    assert gpg_calls("decrypt") > before  # gpg --decrypt checks a cleartext signature


@pytest.mark.parametrize("started", [{"concurrency": 4, "processes": 0}], indirect=True)
async def test_shutdown_while_a_pass_waits_loses_no_outcome(started: Service, relay: CaptureRelay) -> None:
    """The shutdown (Worker.finish) and a running pass both wait for the messages in flight; whichever
    wakes first takes a finished message, and the other does not fail on it."""
    port = smtp_port(started)
    for i in range(2):
        await asend(port, report_bytes(msgid=f"<gate-{i}@reporter.test>", body=f"Description: gate {i}\n"),
                    sender=f"gate{i}@reporter.test")
    with started.db.session() as s:
        first, second = s.scalars(select(InboundMessage.id).order_by(InboundMessage.id))
    arrivals: queue.Queue[int] = queue.Queue()  # in the order the messages reach the gate (SQLite: one at a time)
    go = {first: threading.Event(), second: threading.Event()}

    def gate(ctx: Processing) -> None:
        arrivals.put(ctx.inbound.id)
        go[ctx.inbound.id].wait(30)

    worker = Worker(started.db, started.config, started.outbox, gpg=started.gpg, pipeline=Pipeline(prepare=(gate, *PREPARE)))
    passing = asyncio.ensure_future(worker.drain())
    one = await asyncio.to_thread(arrivals.get, True, 30)
    stopping = asyncio.ensure_future(worker.finish(timeout=30))
    await asyncio.sleep(0.1)  # finish() waits on both messages now
    go[one].set()  # the pass takes it and waits again: after finish() this time
    other = await asyncio.to_thread(arrivals.get, True, 30)
    go[other].set()  # finish() wakes first and takes it
    assert await stopping == 0
    assert await passing in (1, 2)  # the pass ends without an error
    with started.db.session() as s:
        assert list(s.scalars(select(InboundMessage.state))) == ["done", "done"]


def test_malloc_arenas_are_capped_unless_ops_chose_their_own() -> None:
    """`mailer serve` and each worker process cap glibc's malloc arenas (one per thread otherwise, a flood's
    memory kept in each); MALLOC_ARENA_MAX in the environment is left to glibc."""
    import subprocess
    import sys

    code = "from mailer.workerproc import limit_malloc_arenas; print(limit_malloc_arenas())"
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    ours = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60, check=True)
    theirs = subprocess.run([sys.executable, "-c", code], env={**env, "MALLOC_ARENA_MAX": "4"}, capture_output=True,
                            text=True, timeout=60, check=True)
    assert (ours.stdout.strip(), theirs.stdout.strip()) == ("True", "False")


@pytest.mark.parametrize("started", [{"concurrency": 2, "processes": 1}], indirect=True)
async def test_a_worker_process_is_a_fresh_interpreter_of_the_service(started: Service, relay: CaptureRelay) -> None:
    """The worker process is started by the service itself (no multiprocessing helper process in between or
    beside it) and runs the bootstrap of mailer.workerproc."""
    await asend(smtp_port(started), report_bytes(msgid="<fresh-1@reporter.test>"), sender="f1@reporter.test")
    await started.settle()
    [child] = started.worker.process_ids()
    status = Path(f"/proc/{child}/status").read_text()
    assert f"PPid:\t{os.getpid()}" in status
    assert b"mailer.workerproc" in Path(f"/proc/{child}/cmdline").read_bytes()
    assert acks(relay) == Counter({"<fresh-1@reporter.test>": 1})
