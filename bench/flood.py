#!/usr/bin/env python3
"""Flood benchmark: one sender floods the contact while 20 others send one report each.

    .venv/bin/python bench/flood.py [--n 10000] [--others 20] [--concurrency 4] [--json]

Loopback only, with the client pieces of ``bench/intake.py``. The service
runs as ops run it, ``mailer serve`` in a process of its own (configured by
``MAILER_*`` variables; ``--in-process`` runs :class:`mailer.app.Service` in
the bench's event loop instead), with a fresh SQLite database and the default
per-sender ack cap, and relays to a capture relay in the bench that keeps only
the ack arrival times.

* the flood: ``--n`` plain reports of ``--size`` bytes from ONE envelope
  sender (one address, from 127.0.0.1), over ``--concurrency`` persistent
  connections, built lazily one at a time;
* the others: once ``--others-after`` flood messages are accepted, ``--others``
  senders each send one report on its own connection, one every
  ``--others-every`` seconds.

Printed: the others' ack latency (client 250 -> ack at the relay) p50 and max,
how many of them were refused (must be 0), the flood's intake and filing rate
(all N stored messages processed: state ``done``), whether it was filed in
full, and the service's peak RSS: the ``mailer serve`` process and its worker
processes sampled together, their sum's peak (``peak_rss_mb``), each part's
peak, their PSS, and apart the gpg processes (short-lived children). With
``--in-process`` it is the bench process's peak, client and relay included.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import aiosmtplib  # noqa: E402
from aiosmtpd.smtp import SMTP, Envelope, Session  # noqa: E402
from sqlalchemy import func, select  # noqa: E402

from bench.intake import (  # noqa: E402
    _IN_REPLY_TO,
    ACCEPTED,
    CONTACT,
    MAINTAINERS,
    BenchError,
    Report,
    kill_home,
    make_home,
    make_reports,
    ms,
    percentile,
    run_bounded,
    stop_service,
)
from mailer.app import Service  # noqa: E402
from mailer.config import Config  # noqa: E402
from mailer.db import Database, upgrade  # noqa: E402
from mailer.models import InboundMessage, InboundState  # noqa: E402
from mailer.openpgp import OpenPGP  # noqa: E402
from tests.relay import CaptureRelay  # noqa: E402


class AckClock:
    """A relay handler that answers 250 and only notes when each ack (by In-Reply-To) arrived."""

    def __init__(self) -> None:
        self.ack_at: dict[str, float] = {}
        self.delivered = 0

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        now = time.perf_counter()
        self.delivered += 1
        raw = envelope.original_content or b""
        match = _IN_REPLY_TO.search(raw.split(b"\r\n\r\n", 1)[0])
        to_maintainer = {str(a).lower() for a in envelope.rcpt_tos} & {m["address"] for m in MAINTAINERS}
        if match and not to_maintainer:  # acks only: notices carry the report's Message-ID too
            self.ack_at.setdefault(match.group(1).decode("ascii", "replace"), now)
        return "250 2.0.0 captured"


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


@dataclass
class Peak:
    """The highest RSS (MB) seen of each part of the service, and of their sum (sampled together)."""

    total: float = 0.0
    pss: float = 0.0
    parent: float = 0.0
    workers: float = 0.0
    gpg: float = 0.0

    def see(self, parent: float, workers: float, gpg: float, pss: float) -> None:
        self.total = max(self.total, parent + workers)
        self.pss = max(self.pss, pss)
        self.parent = max(self.parent, parent)
        self.workers = max(self.workers, workers)
        self.gpg = max(self.gpg, gpg)


def proc_mb(pid: int, field: str, name: str = "status") -> float:
    """A ``kB`` field of /proc/PID/status (or smaps_rollup), in MB; 0 for a process gone meanwhile."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int(Path(f"/proc/{pid}/{name}").read_text().split(f"{field}:")[1].split()[0]) / 1024
    return 0.0


def children_of(pid: int) -> list[int]:
    with contextlib.suppress(OSError, ValueError):
        return [int(c) for t in Path(f"/proc/{pid}/task").iterdir() for c in (t / "children").read_text().split()]
    return []


def cmdline(pid: int) -> bytes:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    return b""


class InProcess:
    """The service in this process (``--in-process``): its RSS is the process's, client and relay included."""

    def __init__(self, config: Config) -> None:
        self.service = Service(config)

    async def start(self, deadline: float) -> int:
        await self.service.start(background=True)
        return int(self.service.listening()["smtp"][1])

    def filed(self, sender: str) -> int:
        return filed(self.service.db, sender)

    async def sample(self, peak: Peak) -> None:
        while True:
            workers = sum(proc_mb(pid, "VmRSS") for pid in self.service.worker.process_ids())
            peak.see(rss_mb(), workers, 0.0, 0.0)
            await asyncio.sleep(0.5)

    async def stop(self) -> None:
        await stop_service(self.service)


class Standalone:
    """The service as ops run it: ``mailer serve`` in a process of its own, configured by MAILER_* variables.

    Sampled every 0.25 s: the RSS of the service process plus its worker processes (``peak_rss_mb``, the
    issue's "service's RSS"), their summed PSS (shared pages counted once), and apart the gpg processes of
    the moment (short-lived, each a few MB; gpg-agent is a daemon of its own and not counted).
    """

    def __init__(self, config: Config, workdir: Path) -> None:
        self.config = config
        self.workdir = workdir
        self.proc: asyncio.subprocess.Process | None = None
        self.db = Database(config.database_url)

    async def start(self, deadline: float) -> int:
        config = self.config
        env = {k: v for k, v in os.environ.items() if not k.startswith("MAILER_")}
        env.update({
            "MAILER_SERVICE_DATA_DIR": str(config.service.data_dir), "MAILER_SERVICE_CONTACT": config.service.contact,
            "MAILER_SERVICE_CONTACT_NAME": config.service.contact_name, "MAILER_SERVICE_PROJECT": config.service.project,
            "MAILER_SMTP_LISTEN": "127.0.0.1:0", "MAILER_DATABASE_URL": config.database_url,
            "MAILER_RELAY_URL": config.relay_url, "MAILER_RELAY_TIMEOUT_SECONDS": str(config.relay.timeout_seconds),
            "MAILER_GNUPG_HOME": str(config.gnupg_home), "MAILER_GNUPG_TIMEOUT_SECONDS": str(config.gnupg.timeout_seconds),
            "MAILER_WORKER_PROCESSES": str(config.worker.processes),
            "MAILER_MAINTAINERS": json.dumps([m.model_dump(mode="json") for m in config.maintainers]),
        })
        mailer = Path(sys.executable).with_name("mailer")
        self.log = (self.workdir / "serve.log").open("wb")
        self.proc = await asyncio.create_subprocess_exec(
            str(mailer), "serve", env=env, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=self.log)
        assert self.proc.stdout is not None
        loop = asyncio.get_running_loop()
        while True:
            line = await asyncio.wait_for(self.proc.stdout.readline(), max(1.0, deadline - loop.time()))
            if not line:
                raise BenchError(f"mailer serve exited ({await self.proc.wait()}): "
                                 f"{(self.workdir / 'serve.log').read_text(errors='replace')[-2000:]}")
            if line.startswith(b"SMTP listening on "):
                self.drain = asyncio.ensure_future(self._drain(self.proc.stdout))
                return int(line.rsplit(b":", 1)[1])

    @staticmethod
    async def _drain(stream: asyncio.StreamReader) -> None:
        while await stream.read(65536):
            pass

    def filed(self, sender: str) -> int:
        return filed(self.db, sender)

    async def sample(self, peak: Peak) -> None:
        assert self.proc is not None
        pid = self.proc.pid
        while True:
            children = children_of(pid)
            workers = [c for c in children if b"mailer.workerproc" in cmdline(c)]
            gpg = [g for c in [pid, *workers] for g in children_of(c) if g not in workers]
            rss = [proc_mb(p, "VmRSS") for p in [pid, *workers]]
            pss = sum(proc_mb(p, "Pss", "smaps_rollup") for p in [pid, *workers])
            peak.see(rss[0], sum(rss[1:]), sum(proc_mb(g, "VmRSS") for g in gpg), pss)
            await asyncio.sleep(0.25)

    async def stop(self) -> None:
        self.db.dispose()
        if self.proc is None:
            return
        if self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 30)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        self.log.close()


def flood_reports(n: int, size: int, run_id: str) -> Iterator[Report]:
    """``n`` reports from one sender, built one at a time."""
    sender = f"flood-{run_id}@reporter.test"
    for i in range(n):
        report = make_reports(f"flood-{i}", 1, size, run_id)[0]
        yield Report(sender, report.message_id, report.raw.replace(report.sender.encode(), sender.encode()))


async def send_flood(port: int, reports: Iterator[Report], concurrency: int, timeout: float,
                     accepted: list[float]) -> None:
    clients = [aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=timeout) for _ in range(concurrency)]
    for c in clients:
        await c.connect()
        await c.ehlo()

    async def connection(client: aiosmtplib.SMTP) -> None:
        for report in reports:  # shared iterator
            errors, response = await client.sendmail(report.sender, [CONTACT], report.raw)
            if errors or response != ACCEPTED:
                raise BenchError(f"flood message {report.message_id} not accepted: {errors or response}")
            accepted.append(time.perf_counter())

    try:
        await asyncio.gather(*(connection(c) for c in clients))
    finally:
        for c in clients:
            try:
                await c.quit()
            except (aiosmtplib.SMTPException, OSError):
                c.close()


async def send_one(port: int, report: Report, timeout: float) -> float:
    """One report on its own connection; the perf_counter of its 250."""
    try:
        errors, response = await aiosmtplib.send(report.raw, sender=report.sender, recipients=[CONTACT],
                                                 hostname="127.0.0.1", port=port, timeout=timeout)
    except aiosmtplib.SMTPException as exc:
        raise BenchError(f"report {report.message_id} of another sender refused: {exc}") from exc
    if errors or not response.endswith(ACCEPTED):
        raise BenchError(f"report {report.message_id} of another sender not accepted: {errors or response}")
    return time.perf_counter()


def filed(db: Database, sender: str) -> int:
    with db.session() as session:
        query = select(func.count()).select_from(InboundMessage).where(
            InboundMessage.mail_from == sender, InboundMessage.state == InboundState.DONE.value)
        return int(session.scalar(query) or 0)


async def bench(args: argparse.Namespace) -> dict[str, Any]:  # noqa: PLR0915 - one run, start to end
    run_id = uuid.uuid4().hex[:12]
    home = make_home()
    loop = asyncio.get_running_loop()
    peak = Peak()
    try:
        with tempfile.TemporaryDirectory(prefix="mailer-flood-") as tmp:
            workdir = Path(tmp)
            db_url = f"sqlite:///{workdir / 'mailer.db'}"
            await asyncio.to_thread(upgrade, db_url)
            await asyncio.to_thread(OpenPGP(home).ensure_service_key, "Example Security Contact", CONTACT)
            relay = CaptureRelay()
            clock = AckClock()
            relay.handler = clock  # type: ignore[assignment]
            await relay.start()
            config = Config.model_validate({
                "service": {"data_dir": str(workdir / "var"), "contact": CONTACT,
                            "contact_name": "Example Security Contact", "project": "Example"},
                "smtp": {"listen": "127.0.0.1:0"},
                "database": {"url": db_url},
                "relay": {"url": relay.url, "timeout_seconds": args.timeout},
                "gnupg": {"home": home, "timeout_seconds": max(30.0, args.timeout)},
                "maintainers": MAINTAINERS[: args.maintainers],
                **({"worker": {"processes": args.processes}} if args.processes is not None else {}),
            })
            runner: InProcess | Standalone = InProcess(config) if args.in_process else Standalone(config, workdir)
            rss_before = rss_mb()
            sampling: asyncio.Future[None] | None = None
            try:
                port = await runner.start(args.deadline)
                sampling = asyncio.ensure_future(runner.sample(peak))
                flood = flood_reports(args.n, args.size, run_id)
                flood_sender = f"flood-{run_id}@reporter.test"
                others = make_reports("other", args.others, args.size, run_id)
                accepted: list[float] = []
                started = time.perf_counter()
                flood_task = asyncio.ensure_future(send_flood(port, flood, args.concurrency, args.timeout, accepted))
                after = min(args.others_after, args.n)
                while len(accepted) < after and not flood_task.done():
                    await asyncio.sleep(0.01)
                if flood_task.done():
                    flood_task.result()  # raises what stopped it
                other_250: dict[str, float] = {}

                async def other(i: int, report: Report) -> None:
                    await asyncio.sleep(i * args.others_every)
                    other_250[report.message_id] = await send_one(port, report, args.timeout)

                await asyncio.gather(*(other(i, r) for i, r in enumerate(others)))
                ids = {r.message_id for r in others}
                while not ids <= clock.ack_at.keys():
                    if loop.time() > args.deadline:
                        raise BenchError(f"only {len(ids & clock.ack_at.keys())} of {len(ids)} other senders' "
                                         "acks arrived before --timeout")
                    await asyncio.sleep(0.05)
                others_done = time.perf_counter()
                await flood_task
                flood_accepted = time.perf_counter()
                done = 0
                while True:
                    done = await asyncio.to_thread(runner.filed, flood_sender)
                    if done >= args.n:
                        break
                    if loop.time() > args.deadline:
                        break
                    await asyncio.sleep(0.25)
                flood_filed = time.perf_counter()
            finally:
                if sampling is not None:
                    if sampling.done():
                        sampling.result()  # raises what stopped the sampling
                    sampling.cancel()
                await runner.stop()
                await relay.stop()
    finally:
        await asyncio.to_thread(kill_home, home)

    latency = [clock.ack_at[i] - other_250[i] for i in ids]
    return {
        "others_ack_ms_p50": ms(percentile(latency, 50)),
        "others_ack_ms_max": ms(max(latency)),
        "others_refused": 0,  # a refusal ends the run with an error
        "others_acked_after_s": round(others_done - started, 2),
        "flood_intake_msgs_per_s": round(args.n / (flood_accepted - started), 1),
        "flood_filed_per_s": round(done / (flood_filed - started), 2),
        "flood_filed": done,
        "flood_filed_in_full": done == args.n,
        "flood_acks": sum(1 for k in clock.ack_at if k.startswith("<flood-")),
        "peak_rss_mb": round(rss_mb() if args.in_process else peak.total, 1),
        "service_peak_pss_mb": None if args.in_process else round(peak.pss, 1),
        "service_process_peak_rss_mb": round(rss_mb() if args.in_process else peak.parent, 1),
        "rss_before_service_mb": round(rss_before, 1) if args.in_process else None,
        "worker_processes": config.worker.processes,
        "worker_processes_peak_rss_mb": round(peak.workers, 1),
        "gpg_processes_peak_rss_mb": None if args.in_process else round(peak.gpg, 1),
        "standalone": not args.in_process,
        "n": args.n,
        "others": args.others,
        "size_bytes": args.size,
        "concurrency": args.concurrency,
        "maintainers": args.maintainers,
    }


def summary(r: dict[str, Any]) -> str:
    return "\n".join([
        f"flood benchmark: n={r['n']} from one sender, {r['others']} other senders, size={r['size_bytes']} B",
        f"other senders' ack latency: p50 {r['others_ack_ms_p50']:.1f} ms, max {r['others_ack_ms_max']:.1f} ms "
        f"(target: each < 5000 ms)",
        f"flood: intake {r['flood_intake_msgs_per_s']:.1f} msgs/s, filed {r['flood_filed']}/{r['n']} "
        f"({'in full' if r['flood_filed_in_full'] else 'NOT in full'}) at {r['flood_filed_per_s']:.2f}/s, "
        f"{r['flood_acks']} acks (per-sender cap)",
        (f"the service's peak RSS {r['peak_rss_mb']:.1f} MB (target < 200 MB): its process "
         f"{r['service_process_peak_rss_mb']:.1f} MB, {r['worker_processes']} worker process(es) "
         f"{r['worker_processes_peak_rss_mb']:.1f} MB; PSS {r['service_peak_pss_mb']:.1f} MB"
         if r["standalone"] else
         f"peak RSS of this process (service, client and relay) {r['peak_rss_mb']:.1f} MB "
         f"(before the service started {r['rss_before_service_mb']:.1f} MB)"),
    ])


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=10_000, help="flood reports from one sender (default 10000)")
    parser.add_argument("--others", type=int, default=20, help="other senders, one report each (default 20)")
    parser.add_argument("--others-after", type=int, default=250,
                        help="flood messages accepted before the others start (default 250)")
    parser.add_argument("--others-every", type=float, default=0.25,
                        help="seconds between two other senders' reports (default 0.25)")
    parser.add_argument("--size", type=int, default=4096, help="bytes per report (default 4096)")
    parser.add_argument("--concurrency", type=int, default=4, help="the flood's SMTP connections (default 4)")
    parser.add_argument("--maintainers", type=int, default=2, choices=range(len(MAINTAINERS) + 1),
                        help="maintainers notified per report (default 2)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds for the whole run (default 3600)")
    parser.add_argument("--processes", type=int, default=None,
                        help="worker.processes for the service (default: the service's default)")
    parser.add_argument("--in-process", action="store_true",
                        help="run the service in this process (its RSS then includes the client's and the relay's) "
                             "instead of as `mailer serve`")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the summary")
    args = parser.parse_args(argv)
    if args.n < 1 or args.others < 1 or args.concurrency < 1 or args.size < 512:
        parser.error("--n, --others and --concurrency must be >= 1, --size >= 512")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    return run_bounded("bench/flood.py", parse_args(argv), bench, summary)


if __name__ == "__main__":
    sys.exit(main())
