#!/usr/bin/env python3
"""OpenPGP benchmark: encrypted reports end to end through the service vs one ``gpg --decrypt`` each.

    .venv/bin/python bench/openpgp.py [-n 100] [--size 4096] [--concurrency 4] [--json]

Everything runs in one process and one event loop on loopback (free ports),
with the client, the capture relay and the service stop helper of
``bench/intake.py``:

* a service GNUPGHOME (short path under /tmp) with a freshly generated service
  key (:meth:`mailer.openpgp.OpenPGP.ensure_service_key`) and, unless
  ``--no-maintainer-keys``, the public keys of the configured maintainers
  (:meth:`~mailer.openpgp.OpenPGP.import_public`), so notices go out encrypted;
* a client GNUPGHOME (``tests.gpgtools.Home``) that holds the service's public
  key and builds N Thunderbird-style PGP/MIME reports (inner text entity with
  protected headers, ``--size`` bytes of plaintext, encrypted to the service
  key, not signed), each with a unique Message-ID and envelope sender;
* ``baseline``  the same N armored ciphertexts, decrypted one after the other
  by a plain ``gpg --homedir H --batch --decrypt`` subprocess against the
  service home (``gpg_decrypts_per_s``);
* ``service``   :class:`mailer.app.Service` with ``[gnupg] home`` = that home,
  its worker and sender loops running, a freshly migrated SQLite database and
  ``tests.relay``'s capture relay as its relay. Throughput is N divided by the
  time from the first MAIL to the last ack arriving at the relay
  (``service_reports_per_s``).

``ratio_vs_gpg_decrypt`` = service_reports_per_s / gpg_decrypts_per_s. While
the service runs, every gpg process it starts and every call of the main
:class:`~mailer.openpgp.OpenPGP` methods is counted and timed by a wrapper
installed by this script only, so the output also says where the time goes.
The run is bounded by ``--timeout``; missing acks are an error (exit 1).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.intake import (  # noqa: E402
    CONTACT,
    BenchError,
    LoadResult,
    Report,
    TimedCapture,
    ms,
    percentile,
    run_bounded,
    run_load,
    stop_service,
    wait_acks,
)
from mailer.app import Service  # noqa: E402
from mailer.config import Config  # noqa: E402
from mailer.db import upgrade  # noqa: E402
from mailer.openpgp import BoundedGPG, OpenPGP  # noqa: E402
from mailer.worker import Outcome  # noqa: E402
from tests.gpgtools import GPG, Home, inner_text_entity, pgpmime_encrypted  # noqa: E402
from tests.relay import CaptureRelay  # noqa: E402

CONTACT_NAME = "Example Security Contact"
MAINTAINERS = [
    ("Mara Maintainer", "mara@project.test"),
    ("Max Maintainer", "max@project.test"),
]


# --------------------------------------------------------------------------- keys and messages


@dataclass(frozen=True)
class EncryptedReport(Report):
    plaintext: bytes = b""  # the inner MIME entity that was encrypted
    armored: bytes = b""  # the OpenPGP message inside the PGP/MIME body


@dataclass
class Keys:
    service_fpr: str
    maintainers: list[dict[str, str]]


def prepare_keys(home: str, client: Home, args: argparse.Namespace) -> Keys:
    """Service key in ``home``; its public key in the client home; maintainer keys both ways."""
    gpg = OpenPGP(home)
    fpr = gpg.ensure_service_key(CONTACT_NAME, CONTACT)
    client.import_(gpg.export_public(fpr).encode("ascii"))
    maintainers = []
    for name, address in MAINTAINERS[: args.maintainers]:
        m_fpr = ""
        if args.maintainer_keys:
            m_fpr = client.gen_key(name, address)
            gpg.import_public(client.export(m_fpr))
        maintainers.append({"name": name, "address": address, "fingerprint": m_fpr})
    return Keys(fpr, maintainers)


_WORDS = ("the parser reads past end of buffer when length field is zero and frobnicate copies header "  # noqa: SIM905
          "into stack allocated array without checking size so attacker controlled input overwrites return "
          "address crash reproduces with asan on release builds heap chunk metadata corrupted after free "
          "offset 0x41 0x7ffd4c2a1b30 segfault in libfrob.so version 1.2.3 fixed upstream maybe").split()


def report_body(i: int, size: int) -> str:
    """Report text such that the inner entity (headers included) is about ``size`` bytes.

    Seeded random words, not one repeated line: the client compresses before it
    encrypts, and a repeated line would shrink the ciphertext to almost nothing.
    """
    intro = (f"Description: heap overflow in frobnicate() #{i}\n"
             "Steps to reproduce: run frobnicate on an empty file\n"
             "Versions: 1.2.3\n\n")
    overhead = len(inner_text_entity("", subject=f"Heap overflow in frobnicate() #{i}"))
    room = max(0, size - overhead - len(intro))
    rng = random.Random(i)
    lines, length = [], 0
    while length < room:
        line = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(6, 12)))[: max(1, room - length - 2)]
        lines.append(line)
        length += len(line) + 2  # CRLF on the wire
    return intro + "\n".join(lines)


def make_report(client: Home, service_fpr: str, tag: str, *, i: int, size: int, run_id: str) -> EncryptedReport:
    sender = f"reporter-{tag}-{i}-{run_id}@reporter.test"
    message_id = f"<{tag}-{i}-{run_id}@reporter.test>"
    subject = f"Heap overflow in frobnicate() #{i}"
    plaintext = inner_text_entity(report_body(i, size), subject=subject)
    armored = client.encrypt(plaintext, [service_fpr])
    raw = pgpmime_encrypted(armored, subject="...")
    # tests.gpgtools writes fixed outer headers: make them this report's
    raw = raw.replace(b"From: Reporter <reporter@example.org>\r\n", f"From: Reporter {i} <{sender}>\r\n".encode(), 1)
    raw = raw.replace(b"To: Security <security@example.com>\r\n", f"To: Security <{CONTACT}>\r\n".encode(), 1)
    raw = raw.replace(b"Message-ID: <test@example.org>\r\n", f"Message-ID: {message_id}\r\n".encode(), 1)
    assert message_id.encode() in raw and sender.encode() in raw
    return EncryptedReport(sender, message_id, raw, plaintext, armored)


def make_reports(client: Home, service_fpr: str, tag: str, *, count: int, size: int, run_id: str,
                 threads: int) -> list[EncryptedReport]:
    build = functools.partial(make_report, client, service_fpr, tag, size=size, run_id=run_id)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(lambda i: build(i=i), range(count)))


def kill_agent(home: str) -> None:
    subprocess.run(["gpgconf", "--homedir", home, "--kill", "all"], capture_output=True, timeout=10, check=False)


# --------------------------------------------------------------------------- baseline


def gpg_baseline(home: str, reports: Sequence[EncryptedReport], warm: EncryptedReport | None,
                 deadline: float) -> tuple[float, list[float]]:
    """Decrypt every ciphertext with its own plain ``gpg --batch --decrypt``; returns (elapsed, per call)."""

    def decrypt(report: EncryptedReport) -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise BenchError("baseline: --timeout reached while decrypting")
        t0 = time.perf_counter()
        try:
            proc = subprocess.run([GPG, "--homedir", home, "--batch", "--decrypt"], input=report.armored,
                                  capture_output=True, timeout=remaining, check=False)
        except subprocess.TimeoutExpired:
            raise BenchError("baseline: --timeout reached while decrypting") from None
        took = time.perf_counter() - t0
        if proc.returncode != 0 or proc.stdout != report.plaintext:
            raise BenchError(f"baseline: gpg --decrypt of {report.message_id} failed (exit {proc.returncode}): "
                             f"{proc.stderr.decode(errors='replace')[-300:]}")
        return took

    if warm is not None:
        decrypt(warm)  # the agent loads the secret key once, as it has for the service
    started = time.perf_counter()
    each = [decrypt(r) for r in reports]
    return time.perf_counter() - started, each


# --------------------------------------------------------------------------- instrumentation (bench only)

_OPS = (  # first match wins: how a gpg command line is named in the breakdown
    ("--gen-key", "gen-key"), ("--decrypt", "decrypt"), ("--encrypt", "encrypt"),
    ("--detach-sign", "sign"), ("--sign", "sign"), ("-s", "sign"), ("--verify", "verify"),
    ("--list-secret-keys", "list-secret-keys"), ("--list-keys", "list-keys"),
    ("show-only", "scan-key"), ("--import", "import"), ("--export", "export"),
    ("--list-config", "list-config"), ("--version", "version"),
)
_METHODS = ("decrypt", "encrypt", "sign_detached", "encrypt_to_key_blob", "key_info", "list_keys",
            "service_fingerprint", "export_public", "verify_detached", "verify_inline")


def _op_name(args: Sequence[str]) -> str:
    for flag, name in _OPS:
        if flag in args:
            return name
    return "other"


class Meter:
    """Counts and times gpg processes (BoundedGPG.run; python-gnupg's own: Popen .. output collected) and
    OpenPGP calls."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.active = False
        self.procs: dict[str, list[float]] = defaultdict(list)
        self.calls: dict[str, list[float]] = defaultdict(list)
        self.worker: list[float] = []
        self.worker_idle = threading.Event()  # no Worker.process_one running (its thread outlives a cancel)
        self.worker_idle.set()
        self._started: dict[int, tuple[str, float]] = {}

    def reset(self, active: bool = True) -> None:
        with self.lock:
            self.procs.clear()
            self.calls.clear()
            self.worker.clear()
            self.active = active

    def record(self, table: dict[str, list[float]], key: str, seconds: float) -> None:
        with self.lock:
            if self.active:
                table[key].append(seconds)

    @contextmanager
    def installed(self) -> Iterator[None]:
        meter = self
        open_orig = BoundedGPG._open_subprocess
        collect_orig = BoundedGPG._collect_output
        run_orig = BoundedGPG.run
        methods = {name: getattr(OpenPGP, name) for name in _METHODS}

        def open_subprocess(self: BoundedGPG, args: Any, passphrase: Any = False) -> Any:
            t0 = time.perf_counter()
            process = open_orig(self, args, passphrase)
            with meter.lock:
                meter._started[id(process)] = (_op_name(list(args)), t0)
            return process

        def collect_output(self: BoundedGPG, process: Any, result: Any, writer: Any = None, stdin: Any = None) -> Any:
            try:
                return collect_orig(self, process, result, writer, stdin)
            finally:
                with meter.lock:
                    started = meter._started.pop(id(process), None)
                if started is not None:
                    meter.record(meter.procs, started[0], time.perf_counter() - started[1])

        def run(self: BoundedGPG, args: Sequence[str], data: bytes = b"", passphrase: str | None = None) -> Any:
            t0 = time.perf_counter()  # BoundedGPG.run: one gpg process, started, fed, read, waited for
            try:
                return run_orig(self, args, data, passphrase)
            finally:
                meter.record(meter.procs, _op_name(list(args)), time.perf_counter() - t0)

        def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
            @functools.wraps(fn)
            def wrapper(*a: Any, **kw: Any) -> Any:
                t0 = time.perf_counter()
                try:
                    return fn(*a, **kw)
                finally:
                    meter.record(meter.calls, name, time.perf_counter() - t0)
            return wrapper

        BoundedGPG._open_subprocess = open_subprocess
        BoundedGPG._collect_output = collect_output  # type: ignore[method-assign]
        BoundedGPG.run = run  # type: ignore[method-assign]
        for name, fn in methods.items():
            setattr(OpenPGP, name, timed(name, fn))
        try:
            yield
        finally:
            BoundedGPG._open_subprocess = open_orig
            BoundedGPG._collect_output = collect_orig  # type: ignore[method-assign]
            BoundedGPG.run = run_orig  # type: ignore[method-assign]
            for name, fn in methods.items():
                setattr(OpenPGP, name, fn)

    def time_worker(self, service: Service) -> None:
        """Time each ``Worker.process_one`` (one report's pipeline and commit, run in a thread)."""
        process = service.worker.process_one

        def timed(inbound_id: int) -> Outcome:
            self.worker_idle.clear()
            t0 = time.perf_counter()
            try:
                return process(inbound_id)
            finally:
                self.worker_idle.set()
                took = time.perf_counter() - t0
                with self.lock:
                    if self.active:
                        self.worker.append(took)

        service.worker.process_one = timed  # type: ignore[method-assign]


# --------------------------------------------------------------------------- the service


@dataclass
class ServiceResult:
    load: LoadResult
    ack_latency: list[float]
    first_ack: float
    last_ack: float


async def measure_service(reports: list[EncryptedReport], warmup: list[EncryptedReport], *, keys: Keys, home: str,
                          workdir: Path, meter: Meter, args: argparse.Namespace) -> ServiceResult:
    db_url = f"sqlite:///{workdir / 'mailer.db'}"
    await asyncio.to_thread(upgrade, db_url)
    relay = CaptureRelay()
    capture = TimedCapture()
    relay.handler = capture
    await relay.start()
    config = Config.model_validate({
        "service": {
            "data_dir": str(workdir / "var"),
            "contact": CONTACT,
            "contact_name": CONTACT_NAME,
            "project": "Example",
            "acks_per_sender_per_day": max(5, len(reports) + len(warmup)),
        },
        "smtp": {"listen": "127.0.0.1:0"},
        "database": {"url": db_url},
        "relay": {"url": relay.url, "timeout_seconds": args.timeout},
        "gnupg": {"home": home, "timeout_seconds": max(30.0, args.timeout)},
        "maintainers": keys.maintainers,
        # the breakdown's wrappers live in this process: threads unless --processes asks otherwise
        "worker": {"processes": args.processes},
    })
    service = Service(config)
    meter.time_worker(service)
    try:
        await service.start(background=True)
        if service.fingerprint != keys.service_fpr:
            raise BenchError(f"service uses key {service.fingerprint}, expected {keys.service_fpr}")
        port = service.listening()["smtp"][1]
        if warmup:
            await run_load(port, warmup, args.concurrency, args.timeout)
            await wait_acks(capture, {r.message_id for r in warmup}, args.deadline, "warm-up")
        meter.reset(active=True)
        load = await run_load(port, reports, args.concurrency, args.timeout)
        ids = {r.message_id for r in reports}
        await wait_acks(capture, ids, args.deadline, "service")
        meter.active = False
        latency = [capture.ack_at[r.message_id] - load.accepted_at[r.message_id] for r in reports]
        arrivals = [capture.ack_at[i] for i in ids]
        return ServiceResult(load, latency, min(arrivals), max(arrivals))
    finally:
        await stop_service(service)
        # cancelling the worker does not stop a report already in its thread: let it finish
        # before the caller removes the GNUPGHOME under it (on the error path)
        await asyncio.to_thread(meter.worker_idle.wait, config.gnupg.timeout_seconds)
        await relay.stop()


# --------------------------------------------------------------------------- run and output


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    run_id = uuid.uuid4().hex[:12]
    meter = Meter()
    home = tempfile.mkdtemp(prefix="g", dir="/tmp")  # gpg-agent socket paths must stay short
    client = Home()
    try:
        with tempfile.TemporaryDirectory(prefix="mailer-bench-") as tmp:
            keys = await asyncio.to_thread(prepare_keys, home, client, args)
            reports = await asyncio.to_thread(make_reports, client, keys.service_fpr, "pgp", count=args.n,
                                              size=args.size, run_id=run_id, threads=args.threads)
            warm = await asyncio.to_thread(make_reports, client, keys.service_fpr, "pgp-warm",
                                           count=max(1, args.warmup), size=args.size, run_id=run_id,
                                           threads=args.threads)
            gpg_elapsed, gpg_each = await asyncio.to_thread(gpg_baseline, home, reports, warm[0], args.deadline)
            with meter.installed():
                svc = await measure_service(reports, warm[: args.warmup], keys=keys, home=home, workdir=Path(tmp),
                                            meter=meter, args=args)
    finally:
        await asyncio.to_thread(kill_agent, home)
        shutil.rmtree(home, ignore_errors=True)
        await asyncio.to_thread(client.close)

    n = args.n
    e2e = svc.last_ack - svc.load.started
    service_rate = n / e2e
    gpg_rate = n / gpg_elapsed
    procs = {op: {"per_report": round(len(t) / n, 2), "mean_ms": ms(sum(t) / len(t)),
                  "total_s": round(sum(t), 3)} for op, t in sorted(meter.procs.items(), key=lambda kv: -sum(kv[1]))}
    calls = {name: {"per_report": round(len(t) / n, 2), "mean_ms": ms(sum(t) / len(t)),
                    "total_s": round(sum(t), 3)} for name, t in sorted(meter.calls.items(), key=lambda kv: -sum(kv[1]))}
    gpg_total = sum(sum(t) for t in meter.procs.values())
    worker_total = sum(meter.worker)
    return {
        "service_reports_per_s": round(service_rate, 2),
        "gpg_decrypts_per_s": round(gpg_rate, 2),
        "ratio_vs_gpg_decrypt": round(service_rate / gpg_rate, 3),
        "ack_latency_ms_p50": ms(percentile(svc.ack_latency, 50)),
        "ack_latency_ms_p99": ms(percentile(svc.ack_latency, 99)),
        "ack_latency_ms_max": ms(max(svc.ack_latency)),
        "gpg_decrypt_ms_p50": ms(percentile(gpg_each, 50)),
        "gpg_decrypt_ms_p99": ms(percentile(gpg_each, 99)),
        "service_elapsed_s": round(e2e, 3),
        "first_ack_after_s": round(svc.first_ack - svc.load.started, 3),  # first MAIL -> first ack
        "smtp_accept_elapsed_s": round(svc.load.elapsed, 3),
        "gpg_elapsed_s": round(gpg_elapsed, 3),
        "n": n,
        "size_bytes": len(reports[0].plaintext),  # plaintext (inner MIME entity) per report
        "wire_bytes": len(reports[0].raw),  # the PGP/MIME message as sent over SMTP
        "concurrency": args.concurrency,
        "warmup": args.warmup,
        "maintainers": args.maintainers,
        "maintainer_keys": args.maintainer_keys,
        "worker_processes": args.processes,
        "outgoing_per_report": 1 + args.maintainers,  # the ack and one notice per maintainer
        "gpg_processes_per_report": round(sum(len(t) for t in meter.procs.values()) / n, 2),
        "gpg_process_ms_per_report": ms(gpg_total / n),
        "worker_ms_per_report": ms(worker_total / n),
        "worker_busy_share": round(worker_total / e2e, 3),
        "gpg_share_of_worker": round(gpg_total / worker_total, 3) if worker_total else None,
        "gpg_processes": procs,
        "openpgp_calls": calls,
    }


def summary(r: dict[str, Any]) -> str:
    lines = [
        f"openpgp benchmark: n={r['n']} plaintext={r['size_bytes']} B (wire {r['wire_bytes']} B) "
        f"concurrency={r['concurrency']} warmup={r['warmup']} maintainers={r['maintainers']} "
        f"(keys: {'yes' if r['maintainer_keys'] else 'no'}) database=sqlite (temp file)",
        "",
        f"service, first MAIL -> last ack at relay: {r['service_reports_per_s']:8.2f} reports/s "
        f"({r['service_elapsed_s']:.2f} s; all 250s after {r['smtp_accept_elapsed_s']:.2f} s)",
        f"gpg --batch --decrypt, one by one:        {r['gpg_decrypts_per_s']:8.2f} decrypts/s "
        f"({r['gpg_elapsed_s']:.2f} s; p50 {r['gpg_decrypt_ms_p50']:.1f} ms, p99 {r['gpg_decrypt_ms_p99']:.1f} ms)",
        f"ratio_vs_gpg_decrypt: {r['ratio_vs_gpg_decrypt']:.3f}",
        f"ack latency (client 250 -> ack at relay): p50 {r['ack_latency_ms_p50']:.1f} ms, "
        f"p99 {r['ack_latency_ms_p99']:.1f} ms, max {r['ack_latency_ms_max']:.1f} ms; "
        f"first ack {r['first_ack_after_s']:.2f} s after the first MAIL",
        "",
        f"where the service's time goes (per report, measured phase; {r['outgoing_per_report']:.0f} outgoing mails each):",
        f"  worker pipeline+commit {r['worker_ms_per_report']:.1f} ms (worker busy {100 * r['worker_busy_share']:.0f}% "
        f"of the run), of which gpg processes {r['gpg_process_ms_per_report']:.1f} ms "
        f"in {r['gpg_processes_per_report']:.1f} processes",
        "",
        "  gpg process        per report   mean ms   total s",
    ]
    for op, v in r["gpg_processes"].items():
        lines.append(f"  {op:<18} {v['per_report']:>10.2f} {v['mean_ms']:>9.2f} {v['total_s']:>9.2f}")
    lines += ["", "  OpenPGP method     per report   mean ms   total s   (inclusive, nested calls overlap)"]
    for name, v in r["openpgp_calls"].items():
        lines.append(f"  {name:<18} {v['per_report']:>10.2f} {v['mean_ms']:>9.2f} {v['total_s']:>9.2f}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=100, help="encrypted reports (default 100)")
    parser.add_argument("--size", type=int, default=4096, help="plaintext bytes per report (default 4096)")
    parser.add_argument("--concurrency", type=int, default=4,
                        help="parallel SMTP connections, each sending sequentially (default 4)")
    parser.add_argument("--warmup", type=int, default=5,
                        help="unmeasured reports sent to the service first, acks awaited (default 5)")
    parser.add_argument("--maintainers", type=int, default=2, choices=range(len(MAINTAINERS) + 1),
                        help="maintainers notified per report (default 2)")
    parser.add_argument("--no-maintainer-keys", dest="maintainer_keys", action="store_false",
                        help="configure maintainers without fingerprints (signed notices without report "
                             "content) instead of pinned keys (encrypted notices, the default)")
    parser.add_argument("--processes", type=int, default=0,
                        help="worker.processes (default 0: threads, so the breakdown sees the worker; with N the "
                             "decryptions and the worker's time happen in worker processes and are not in it)")
    parser.add_argument("--threads", type=int, default=8, help="threads encrypting the reports up front (default 8)")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds for the whole run before it gives up (default 300)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the summary")
    args = parser.parse_args(argv)
    if args.n < 1 or args.concurrency < 1 or args.warmup < 0 or args.size < 512 or args.threads < 1:
        parser.error("-n, --concurrency and --threads must be >= 1, --warmup >= 0, --size >= 512")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    return run_bounded("bench/openpgp.py", parse_args(argv), bench, summary)


if __name__ == "__main__":
    sys.exit(main())
