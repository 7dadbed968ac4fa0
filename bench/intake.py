#!/usr/bin/env python3
"""Intake benchmark: the service's SMTP intake next to two bare aiosmtpd sinks, in one run.

    .venv/bin/python bench/intake.py [-n 500] [--size 4096] [--concurrency 4] [--database URL] [--json]

Everything runs in one process and one event loop on loopback (free ports):

* ``sink``        aiosmtpd that only answers 250;
* ``fsync sink``  aiosmtpd that writes each message to its own file in a temp
                  dir and fsyncs it (in a thread, like the service's commit)
                  before answering 250;
* ``service``     :class:`mailer.app.Service` with its worker and sender loops
                  running, a freshly migrated database (a SQLite file in a temp
                  dir unless ``--database`` is given) and ``tests.relay``'s
                  capture relay as its SMTP relay.

The same client drives all three: ``--concurrency`` aiosmtplib connections,
each opened once and sending its share of the N messages one after the
other (MAIL/RCPT/DATA per message, no reconnect). Throughput is N divided by
the time from the first MAIL to the last 250. Every message has a unique
Message-ID and a unique envelope sender (so the per-sender ack rate limit
never applies). Ack latency is, per report, the time from the client's 250 to
the arrival at the capture relay of the ack whose In-Reply-To is the report's
Message-ID. The run is bounded by ``--timeout``; missing acks are an error
(exit status 1).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import math
import os
import random
import re
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import aiosmtplib  # noqa: E402
from aiosmtpd.smtp import SMTP, Envelope, Session  # noqa: E402

from mailer.app import Service  # noqa: E402
from mailer.config import Config, WorkerConfig  # noqa: E402
from mailer.db import upgrade  # noqa: E402
from tests.relay import CaptureHandler, CaptureRelay  # noqa: E402

CONTACT = "security@example.org"
HOSTNAME = "example.org"
MAINTAINERS = [
    {"name": "Mara Maintainer", "address": "mara@project.test", "fingerprint": ""},
    {"name": "Max Maintainer", "address": "max@project.test", "fingerprint": ""},
]
ACCEPTED = "2.0.0 Message accepted"  # the text of inbound.smtp.OK, answered by the sinks too
_IN_REPLY_TO = re.compile(rb"^in-reply-to:[ \t]*(<[^<>\s]+>)", re.IGNORECASE | re.MULTILINE)


class BenchError(Exception):
    """The run could not complete (refused message, missing acks, timeout)."""


# --------------------------------------------------------------------------- messages


@dataclass(frozen=True)
class Report:
    sender: str
    message_id: str
    raw: bytes


def make_reports(tag: str, count: int, size: int, run_id: str) -> list[Report]:
    """``count`` distinct plain-text reports of ``size`` bytes each (CRLF, as on the wire)."""
    filler = b"The parser reads past the end of the buffer when the length field is zero. "
    reports = []
    for i in range(count):
        sender = f"reporter-{tag}-{i}-{run_id}@reporter.test"
        message_id = f"<{tag}-{i}-{run_id}@reporter.test>"
        head = (
            f"From: Reporter {i} <{sender}>\r\n"
            f"To: {CONTACT}\r\n"
            f"Subject: Heap overflow in frobnicate() #{i}\r\n"
            f"Date: Mon, 01 Jan 2024 12:00:00 +0000\r\n"
            f"Message-ID: {message_id}\r\n"
            "MIME-Version: 1.0\r\n"
            "Content-Type: text/plain; charset=utf-8\r\n"
            "\r\n"
            "Description: heap overflow in frobnicate()\r\n"
            "Steps to reproduce: run frobnicate on an empty file\r\n"
            "Versions: 1.2.3\r\n"
            "\r\n"
        ).encode()
        body = bytearray()
        room = max(0, size - len(head) - 2)
        while len(body) < room:
            line = filler[: min(len(filler), room - len(body))].rstrip()
            body += line + b"\r\n"
            if len(line) == 0:
                break
        raw = (head + bytes(body))[: max(size - 2, len(head))] + b"\r\n"
        reports.append(Report(sender, message_id, raw))
    return reports


# --------------------------------------------------------------------------- client


@dataclass
class LoadResult:
    elapsed: float  # first MAIL .. last 250, seconds
    started: float  # perf_counter at the start
    accepted_at: dict[str, float]  # Message-ID -> perf_counter of the client's 250
    smtp_latency: list[float]  # per message, seconds from MAIL to 250


async def run_load(port: int, reports: Sequence[Report], concurrency: int, timeout: float) -> LoadResult:
    """Send every report over ``concurrency`` persistent connections, each sending sequentially."""
    clients = [aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=timeout) for _ in range(concurrency)]
    await asyncio.gather(*(c.connect() for c in clients))
    await asyncio.gather(*(c.ehlo() for c in clients))
    queue = iter(reports)
    accepted_at: dict[str, float] = {}
    latency: list[float] = []

    async def connection(client: aiosmtplib.SMTP) -> None:
        for report in queue:  # shared iterator: each report is taken by exactly one connection
            t0 = time.perf_counter()
            errors, response = await client.sendmail(report.sender, [CONTACT], report.raw)
            t1 = time.perf_counter()
            if errors or response != ACCEPTED:
                # aiosmtplib raises on a non-250 DATA reply; this catches refused recipients and
                # the service's "already accepted" (a duplicate would skip the worker)
                raise BenchError(f"message {report.message_id} not accepted: {errors or response}")
            accepted_at[report.message_id] = t1
            latency.append(t1 - t0)

    started = time.perf_counter()
    try:
        await asyncio.gather(*(connection(c) for c in clients))
    except aiosmtplib.SMTPException as exc:
        raise BenchError(f"SMTP error from the server on port {port}: {exc}") from exc
    finally:
        elapsed = time.perf_counter() - started
        for c in clients:
            try:
                await c.quit()
            except (aiosmtplib.SMTPException, OSError):
                c.close()
    return LoadResult(elapsed, started, accepted_at, latency)


# --------------------------------------------------------------------------- baseline servers


class SinkHandler:
    """Answers 250 and forgets the message."""

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        return "250 " + ACCEPTED


class FsyncSinkHandler:
    """Writes each message to its own file and fsyncs it before answering 250."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.counter = itertools.count()

    def _write(self, raw: bytes) -> None:
        path = self.directory / f"{next(self.counter)}.eml"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(raw)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or b""
        assert isinstance(raw, bytes)
        await asyncio.to_thread(self._write, raw)
        return "250 " + ACCEPTED


async def start_smtp(handler: Any) -> asyncio.Server:
    """A bare aiosmtpd server in this loop, configured like the service's listener."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(
        lambda: SMTP(handler, hostname=HOSTNAME, decode_data=False, enable_SMTPUTF8=True,
                     data_size_limit=25 * 1024 * 1024, ident="bench-sink"),
        "127.0.0.1",
        0,
    )


async def measure_server(handler: Any, reports: list[Report], warmup: list[Report], args: argparse.Namespace) -> LoadResult:
    server = await start_smtp(handler)
    try:
        port = server.sockets[0].getsockname()[1]
        if warmup:
            await run_load(port, warmup, args.concurrency, args.timeout)
        return await run_load(port, reports, args.concurrency, args.timeout)
    finally:
        server.close()
        await server.wait_closed()


# --------------------------------------------------------------------------- the service


@dataclass
class TimedCapture(CaptureHandler):
    """tests.relay's capture handler that also timestamps each ack by its In-Reply-To."""

    ack_at: dict[str, float] = field(default_factory=dict)
    #: every mail (ack and notices) by the report's Message-ID in its In-Reply-To: arrival times
    mail_at: dict[str, list[float]] = field(default_factory=dict)
    expected: set[str] = field(default_factory=set)
    all_arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        now = time.perf_counter()
        reply = await super().handle_DATA(server, session, envelope)
        raw = envelope.original_content or b""
        head = raw.split(b"\r\n\r\n", 1)[0]
        match = _IN_REPLY_TO.search(head)
        # acks only: maintainer notices carry the report's Message-ID in In-Reply-To too
        to_maintainer = {str(a).lower() for a in envelope.rcpt_tos} & {m["address"] for m in MAINTAINERS}
        if reply.startswith("250") and match:
            self.mail_at.setdefault(match.group(1).decode("ascii", "replace"), []).append(now)
        if reply.startswith("250") and match and not to_maintainer:
            message_id = match.group(1).decode("ascii", "replace")
            self.ack_at.setdefault(message_id, now)
            if self.expected and self.expected.issubset(self.ack_at.keys()):
                self.all_arrived.set()
        return reply

    def expect(self, message_ids: set[str]) -> None:
        self.expected = set(message_ids)
        self.all_arrived.clear()
        if self.expected.issubset(self.ack_at.keys()):
            self.all_arrived.set()


def normalise_db_url(url: str) -> str:
    if url.startswith("postgresql://"):
        return "postgresql+psycopg://" + url.removeprefix("postgresql://")
    return url


def redact(url: str) -> str:
    return re.sub(r"://([^:/@]+):[^@/]*@", r"://\1:***@", url)


async def wait_acks(relay: TimedCapture, ids: set[str], deadline: float, what: str) -> None:
    """Wait for the acks of ``ids`` until ``deadline`` (loop time)."""
    relay.expect(ids)
    loop = asyncio.get_running_loop()
    try:
        await asyncio.wait_for(relay.all_arrived.wait(), max(0.0, deadline - loop.time()))
    except TimeoutError:
        got = len(ids & relay.ack_at.keys())
        raise BenchError(f"{what}: only {got} of {len(ids)} acks reached the relay before the "
                         f"--timeout deadline") from None


async def wait_mail(relay: TimedCapture, ids: set[str], per_report: int, deadline: float) -> float:
    """Wait until every report of ``ids`` has its ``per_report`` mails (ack and notices); the last arrival."""
    loop = asyncio.get_running_loop()
    while any(len(relay.mail_at.get(i, ())) < per_report for i in ids):
        if loop.time() > deadline:
            done = sum(len(relay.mail_at.get(i, ())) >= per_report for i in ids)
            raise BenchError(f"service: only {done} of {len(ids)} reports had their ack and notices at the relay "
                             "before the --timeout deadline")
        await asyncio.sleep(0.01)
    return max(max(relay.mail_at[i]) for i in ids)


@dataclass
class ServiceResult:
    load: LoadResult
    ack_latency: list[float]
    last_ack: float
    outgoing_captured: int
    last_mail: float  # the last ack or notice of the measured reports


async def measure_service(reports: list[Report], warmup: list[Report], db_url: str, workdir: Path,
                          args: argparse.Namespace, *, home: str | None = None,
                          maintainers: list[dict[str, str]] | None = None,
                          load_fn: Callable[[int, Sequence[Report]], Awaitable[LoadResult]] | None = None) -> ServiceResult:
    """Start the service, send ``warmup`` (acks awaited), then ``reports`` (``load_fn``, else :func:`run_load`)."""
    await asyncio.to_thread(upgrade, db_url)
    relay = CaptureRelay()
    capture = TimedCapture()
    relay.handler = capture
    await relay.start()
    config = Config.model_validate({
        "service": {
            "data_dir": str(workdir / "var"),
            "contact": CONTACT,
            "contact_name": "Example Security Contact",
            "project": "Example",
            # every sender is unique anyway; this keeps a reused database from suppressing acks
            "acks_per_sender_per_day": max(5, len(reports) + len(warmup)),
        },
        "smtp": {"listen": "127.0.0.1:0"},
        "database": {"url": db_url},
        "relay": {"url": relay.url, "timeout_seconds": args.timeout},
        "maintainers": MAINTAINERS[: args.maintainers] if maintainers is None else maintainers,
        "gnupg": {"decrypt_helper": not args.gpg_decrypt,
                  **({"home": home, "timeout_seconds": max(30.0, args.timeout)} if home else {})},
        **({"worker": {"processes": args.processes}} if args.processes is not None else {}),
    })
    service = Service(config)
    try:
        await service.start(background=True)
        port = service.listening()["smtp"][1]
        if warmup:
            await run_load(port, warmup, args.concurrency, args.timeout)
            await wait_acks(capture, {r.message_id for r in warmup}, args.deadline, "warm-up")
        if load_fn is None:
            load = await run_load(port, reports, args.concurrency, args.timeout)
        else:
            load = await load_fn(port, reports)
        ids = {r.message_id for r in reports}
        await wait_acks(capture, ids, args.deadline, "service")
        latency = [capture.ack_at[r.message_id] - load.accepted_at[r.message_id] for r in reports]
        last_ack = max(capture.ack_at[i] for i in ids)
        last_mail = await wait_mail(capture, ids, 1 + len(config.maintainers), args.deadline)
        return ServiceResult(load, latency, last_ack, len(capture.messages), last_mail)
    finally:
        await stop_service(service)
        await relay.stop()


async def stop_service(service: Service) -> None:
    """``service.stop()``, made bounded.

    On Python 3.11 ``asyncio.wait_for`` returns normally when the task is
    cancelled in the same loop iteration as the awaited event fires (CPython
    gh-86296), so the sender's or worker's ``wait_for(self.wake.wait(), ...)``
    can swallow ``stop()``'s single cancel and loop on, and ``stop()`` then
    awaits it forever. Cancel the loops until they are really done first.
    """
    for task in service.tasks:
        for _ in range(100):
            if task.done():
                break
            task.cancel()
            await asyncio.wait({task}, timeout=0.1)
        else:
            raise BenchError(f"service task {task.get_name()} ignores cancellation")
    await service.stop()
    service.db.dispose()


# --------------------------------------------------------------------------- statistics and output


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    pos = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


# --------------------------------------------------------------------------- open loop (--rate)


async def run_open_loop(port: int, reports: Sequence[Report], rate: float, timeout: float,
                        seed: int = 12) -> LoadResult:
    """Send ``reports`` at Poisson arrival times of mean ``rate``/s, whatever the server's pace (open loop).

    Each arrival takes an idle persistent connection, or opens one when all are busy, so a slow
    250 never delays the next arrival.
    """
    rng = random.Random(seed)
    idle: list[aiosmtplib.SMTP] = []
    opened: list[aiosmtplib.SMTP] = []
    accepted_at: dict[str, float] = {}
    latency: list[float] = []

    async def one(report: Report) -> None:
        if idle:
            client = idle.pop()
        else:
            client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=timeout)
            opened.append(client)
            await client.connect()
            await client.ehlo()
        t0 = time.perf_counter()
        errors, response = await client.sendmail(report.sender, [CONTACT], report.raw)
        t1 = time.perf_counter()
        if errors or response != ACCEPTED:
            raise BenchError(f"message {report.message_id} not accepted: {errors or response}")
        accepted_at[report.message_id] = t1
        latency.append(t1 - t0)
        idle.append(client)

    loop = asyncio.get_running_loop()
    started = time.perf_counter()
    due = loop.time()
    tasks = []
    try:
        for report in reports:
            due += rng.expovariate(rate)
            await asyncio.sleep(max(0.0, due - loop.time()))
            tasks.append(asyncio.ensure_future(one(report)))
        await asyncio.gather(*tasks)
    except aiosmtplib.SMTPException as exc:
        raise BenchError(f"SMTP error from the server on port {port}: {exc}") from exc
    finally:
        for task in tasks:
            task.cancel()
        elapsed = time.perf_counter() - started
        for c in opened:
            try:
                await c.quit()
            except (aiosmtplib.SMTPException, OSError):
                c.close()
    return LoadResult(elapsed, started, accepted_at, latency)


# --------------------------------------------------------------------------- the GnuPG bound

PARALLELISM = (1, 2, 4, 8)


def gpg_rates(gpg: Any, operations: dict[str, Callable[[int], None]], count: int) -> dict[str, dict[str, float]]:
    """Per operation kind: ops/s with 1, 2, 4 and 8 calls at once (``count`` calls each), in threads.

    The calls are the service's own (:class:`mailer.openpgp.OpenPGP`, python-gnupg, one gpg process each).
    """
    from concurrent.futures import ThreadPoolExecutor

    rates: dict[str, dict[str, float]] = {}
    for kind, op in operations.items():
        op(0)  # untimed: the agent has the key loaded, caches are warm
        rates[kind] = {}
        for parallel in PARALLELISM:
            with ThreadPoolExecutor(parallel) as pool:
                t0 = time.perf_counter()
                list(pool.map(op, range(count)))
                rates[kind][str(parallel)] = round(count / (time.perf_counter() - t0), 1)
    return rates


def gpg_bound(rates: dict[str, dict[str, float]], per_report: dict[str, int]) -> float:
    """Reports/s if gpg were all there is: each kind at its best parallelism, costs added per report."""
    seconds = sum(n / max(rates[kind].values()) for kind, n in per_report.items() if n)
    return 1 / seconds if seconds else math.inf


def plain_operations(gpg: Any, size: int, maintainer_fprs: list[str]) -> dict[str, Callable[[int], None]]:
    data = [(f"{i}\r\n".encode() * (size // 4 + 1))[:size] for i in range(64)]
    ops: dict[str, Callable[[int], None]] = {
        "sign": lambda i: gpg.sign_detached(data[i % len(data)], via_agent=False) and None}
    if maintainer_fprs:
        ops["sign_encrypt"] = lambda i: gpg.encrypt(data[i % len(data)], [maintainer_fprs[i % len(maintainer_fprs)]],
                                                    sign=True) and None
    return ops


def make_home() -> str:
    return tempfile.mkdtemp(prefix="g", dir="/tmp")  # gpg-agent socket paths must stay short


def kill_home(home: str) -> None:
    import shutil
    import subprocess

    subprocess.run(["gpgconf", "--homedir", home, "--kill", "all"], capture_output=True, timeout=10, check=False)
    shutil.rmtree(home, ignore_errors=True)


# --------------------------------------------------------------------------- the run


async def bench(args: argparse.Namespace) -> dict[str, Any]:  # noqa: PLR0915 - one run, start to end
    run_id = uuid.uuid4().hex[:12]
    rate_mode = args.rate is not None
    home = make_home()
    client: Any = None
    try:
        with tempfile.TemporaryDirectory(prefix="mailer-bench-") as tmp:
            workdir = Path(tmp)
            db_url = normalise_db_url(args.database or f"sqlite:///{workdir / 'mailer.db'}")
            n = math.ceil(args.rate * args.duration) if rate_mode else args.n

            # keys: the service key (and, --encrypted, one pinned key per maintainer) before the service starts
            from mailer.openpgp import OpenPGP

            gpg = OpenPGP(home, timeout=max(30.0, args.timeout))
            maintainers: list[dict[str, str]] = list(MAINTAINERS[: args.maintainers])
            if args.encrypted:
                from bench import openpgp as pgpbench
                from tests.gpgtools import Home

                client = Home()
                args.maintainer_keys = True
                keys = await asyncio.to_thread(pgpbench.prepare_keys, home, client, args)
                maintainers = keys.maintainers

                def batch(tag: str) -> tuple[list[Report], list[Report]]:
                    build = pgpbench.make_reports
                    return (build(client, keys.service_fpr, tag, count=n, size=args.size, run_id=run_id, threads=8),
                            build(client, keys.service_fpr, f"{tag}-warm", count=args.warmup, size=args.size,
                                  run_id=run_id, threads=8))
            else:
                await asyncio.to_thread(gpg.ensure_service_key, "Example Security Contact", CONTACT)

                def batch(tag: str) -> tuple[list[Report], list[Report]]:
                    return (make_reports(tag, n, args.size, run_id),
                            make_reports(f"{tag}-warm", args.warmup, args.size, run_id))

            sink = fsync = None
            if not rate_mode and not args.encrypted:
                sink_reports, sink_warm = batch("sink")
                sink = await measure_server(SinkHandler(), sink_reports, sink_warm, args)
                fsync_dir = workdir / "fsync-sink"
                fsync_dir.mkdir()
                fsync_reports, fsync_warm = batch("fsync")
                fsync = await measure_server(FsyncSinkHandler(fsync_dir), fsync_reports, fsync_warm, args)

            svc_reports, svc_warm = await asyncio.to_thread(batch, "svc")
            load_fn = None
            if rate_mode:
                def load_fn(port: int, reports: Sequence[Report]) -> Awaitable[LoadResult]:
                    return run_open_loop(port, reports, args.rate, args.timeout)
            svc = await measure_service(svc_reports, svc_warm, db_url, workdir, args, home=home,
                                        maintainers=maintainers, load_fn=load_fn)

            rates: dict[str, dict[str, float]] = {}
            per_report: dict[str, int] = {}
            if not rate_mode and args.gpg_ops > 0:
                # the GnuPG bound: after the service stopped, same home, keys and sizes
                keyed = [m["fingerprint"] for m in maintainers if m["fingerprint"]]
                ops = plain_operations(gpg, args.size, keyed)
                per_report = {"sign": 1 + len(maintainers) - len(keyed), "sign_encrypt": len(keyed)}
                if args.encrypted:
                    armored = [r.armored for r in svc_reports[:64]]  # type: ignore[attr-defined]
                    ops["decrypt"] = lambda i: gpg.decrypt(armored[i % len(armored)], via_helper=False) and None
                    per_report["decrypt"] = 1
                rates = await asyncio.to_thread(gpg_rates, gpg, ops, args.gpg_ops)
    finally:
        if client is not None:
            await asyncio.to_thread(client.close)
        await asyncio.to_thread(kill_home, home)

    acks_rate = n / (svc.last_ack - svc.load.started)
    # the "sustained processing": stored -> acknowledged AND maintainers notified (acks leave first)
    reports_rate = n / (svc.last_mail - svc.load.started)
    result: dict[str, Any] = {
        "mode": ("open loop" if rate_mode else "burst") + (", encrypted" if args.encrypted else ", plain"),
        "service_msgs_per_s": round(n / svc.load.elapsed, 1),
    }
    if sink is not None and fsync is not None:
        service_rate, sink_rate, fsync_rate = n / svc.load.elapsed, n / sink.elapsed, n / fsync.elapsed
        result |= {
            "sink_msgs_per_s": round(sink_rate, 1),
            "fsync_sink_msgs_per_s": round(fsync_rate, 1),
            "ratio_vs_sink": round(service_rate / sink_rate, 3),
            "ratio_vs_fsync_sink": round(service_rate / fsync_rate, 3),
        }
    result |= {
        "ack_latency_ms_p50": ms(percentile(svc.ack_latency, 50)),
        "ack_latency_ms_p99": ms(percentile(svc.ack_latency, 99)),
        "ack_latency_ms_max": ms(max(svc.ack_latency)),
        # reports acknowledged per second, from the first MAIL to the last ack at the relay
        "service_acks_per_s": round(acks_rate, 2),
        # reports fully handled per second: to the last ack or maintainer notice of the run at the relay
        "service_reports_per_s": round(reports_rate, 2),
    }
    if rates:
        bound = gpg_bound(rates, per_report)
        result |= {
            "gpg_bound_reports_per_s": round(bound, 2),
            "ratio_vs_gpg_bound": round(reports_rate / bound, 3),
            "gpg_ops_per_report": {k: v for k, v in per_report.items() if v},
            "gpg_ops_per_s": {k: v for k, v in rates.items() if per_report.get(k)},
        }
    if rate_mode:
        result |= {"offered_rate_per_s": args.rate, "duration_s": args.duration,
                   "arrival_elapsed_s": round(svc.load.elapsed, 2)}
    smtp = {"service": svc.load}
    if sink is not None and fsync is not None:
        smtp |= {"sink": sink, "fsync_sink": fsync}
    result |= {
        "smtp_latency_ms_p50": {k: ms(percentile(v.smtp_latency, 50)) for k, v in smtp.items()},
        "smtp_latency_ms_p99": {k: ms(percentile(v.smtp_latency, 99)) for k, v in smtp.items()},
        "n": n,
        "size_bytes": args.size,
        "concurrency": args.concurrency,
        "warmup": args.warmup,
        "maintainers": args.maintainers,
        "database": redact(args.database) if args.database else "sqlite (temp file)",
        "worker_processes": args.processes if args.processes is not None else WorkerConfig().processes,
        "decrypt_helper": not args.gpg_decrypt,
    }
    return result


def summary(r: dict[str, Any]) -> str:
    lat50, lat99 = r["smtp_latency_ms_p50"], r["smtp_latency_ms_p99"]
    lines = [
        f"intake benchmark ({r['mode']}): n={r['n']} size={r['size_bytes']} B concurrency={r['concurrency']} "
        f"(persistent connections) warmup={r['warmup']} maintainers={r['maintainers']} database={r['database']}",
        "",
    ]
    if "sink_msgs_per_s" in r:
        rows = [
            ("server", "msgs/s", "ratio", "250 p50 ms", "250 p99 ms"),
            ("sink (250 only)", f"{r['sink_msgs_per_s']:.1f}", "1.000", f"{lat50['sink']:.2f}", f"{lat99['sink']:.2f}"),
            ("fsync sink", f"{r['fsync_sink_msgs_per_s']:.1f}",
             f"{r['fsync_sink_msgs_per_s'] / r['sink_msgs_per_s']:.3f}", f"{lat50['fsync_sink']:.2f}",
             f"{lat99['fsync_sink']:.2f}"),
            ("service", f"{r['service_msgs_per_s']:.1f}", f"{r['ratio_vs_sink']:.3f}", f"{lat50['service']:.2f}",
             f"{lat99['service']:.2f}"),
        ]
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        fmt = lambda row: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=False)))  # noqa: E731
        lines += [
            fmt(rows[0]),
            fmt(tuple("-" * w for w in widths)),
            *(fmt(row) for row in rows[1:]),
            "",
            f"service / fsync sink: {r['ratio_vs_fsync_sink']:.3f}  (target >= 0.8: "
            f"{'met' if r['ratio_vs_fsync_sink'] >= 0.8 else 'NOT met'})",
            f"service / sink:       {r['ratio_vs_sink']:.3f}",
        ]
    else:
        lines.append(f"intake: {r['service_msgs_per_s']:.1f} msgs/s, 250 p50 {lat50['service']:.2f} ms, "
                     f"p99 {lat99['service']:.2f} ms")
    if "offered_rate_per_s" in r:
        lines.append(f"open loop: Poisson arrivals at {r['offered_rate_per_s']}/s for {r['duration_s']} s")
    lines += [
        f"ack latency (client 250 -> ack at relay): p50 {r['ack_latency_ms_p50']:.1f} ms, "
        f"p99 {r['ack_latency_ms_p99']:.1f} ms, max {r['ack_latency_ms_max']:.1f} ms",
        f"acks delivered: {r['service_acks_per_s']:.2f} reports/s (first MAIL to last ack)",
        f"reports handled: {r['service_reports_per_s']:.2f} reports/s (first MAIL to the last ack or notice)",
    ]
    if "gpg_bound_reports_per_s" in r:
        lines.append(f"GnuPG bound: {r['gpg_bound_reports_per_s']:.2f} reports/s "
                     f"(ops per report {r['gpg_ops_per_report']}, ops/s by parallelism {r['gpg_ops_per_s']}); "
                     f"service / bound: {r['ratio_vs_gpg_bound']:.3f} (target >= 0.8)")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=500, help="reports per server (default 500)")
    parser.add_argument("--size", type=int, default=4096, help="bytes per report (default 4096)")
    parser.add_argument("--concurrency", type=int, default=4,
                        help="parallel SMTP connections, each sending sequentially (default 4)")
    parser.add_argument("--database", default=None,
                        help="database URL for the service (default: a SQLite file in a temp dir); "
                             "postgresql://USER@HOST/DB is migrated and written to: use a throwaway database")
    parser.add_argument("--warmup", type=int, default=20,
                        help="unmeasured messages sent to each server first (default 20)")
    parser.add_argument("--maintainers", type=int, default=2, choices=range(len(MAINTAINERS) + 1),
                        help="maintainers notified per report, i.e. extra outgoing mails besides the ack (default 2)")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds for the whole run before it gives up (default 300)")
    parser.add_argument("--encrypted", action="store_true",
                        help="PGP/MIME reports encrypted to the service key, maintainers with pinned keys "
                             "(encrypted notices); no sink baselines")
    parser.add_argument("--rate", type=float, default=None,
                        help="open loop: Poisson arrivals at RATE reports/s for --duration s (no sinks, no bound)")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals with --rate (default 60)")
    parser.add_argument("--gpg-ops", type=int, default=32,
                        help="gpg calls per operation kind and parallelism for the GnuPG bound (default 32; 0: skip)")
    parser.add_argument("--processes", type=int, default=None,
                        help="worker.processes for the service (default: the service's default)")
    parser.add_argument("--gpg-decrypt", action="store_true",
                        help="the service decrypts with a gpg process each (gnupg.decrypt_helper = false)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args(argv)
    args.threads = 8
    if args.n < 1 or args.concurrency < 1 or args.warmup < 0 or args.size < 512:
        parser.error("-n and --concurrency must be >= 1, --warmup >= 0, --size >= 512")
    if args.rate is not None and (args.rate <= 0 or args.duration <= 0):
        parser.error("--rate and --duration must be > 0")
    return args


def run_bounded(
    name: str,
    args: argparse.Namespace,
    bench_fn: Callable[[argparse.Namespace], Awaitable[dict[str, Any]]],
    summary_fn: Callable[[dict[str, Any]], str],
) -> int:
    """Run one benchmark under ``--timeout`` and print JSON or the summary; 1 with a message on failure."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")

    async def bounded() -> dict[str, Any]:
        # loop.time() is time.monotonic(): waits inside the run share this deadline; wait_for is the backstop
        args.deadline = asyncio.get_running_loop().time() + args.timeout
        try:
            return await asyncio.wait_for(bench_fn(args), args.timeout + 10)
        except TimeoutError:
            raise BenchError(f"the run did not finish within --timeout {args.timeout:.0f}s") from None

    try:
        result = asyncio.run(bounded())
    except BenchError as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result) if args.json else summary_fn(result))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_bounded("bench/intake.py", parse_args(argv), bench, summary)


if __name__ == "__main__":
    sys.exit(main())
