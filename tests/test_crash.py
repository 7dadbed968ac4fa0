"""A real crash: `mailer serve` killed with SIGKILL mid-burst loses nothing and duplicates nothing."""

from __future__ import annotations

import asyncio
import os
import signal
import smtplib
import socket
import sys
from pathlib import Path

import pytest
from sqlalchemy import func, select

from mailer.db import Database
from mailer.models import InboundMessage, Report
from tests.conftest import gnupg_home
from tests.relay import CaptureRelay
from tests.test_intake import report_bytes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def start_service(env: dict[str, str]) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import sys; from mailer.cli import main; sys.exit(main(['serve']))",
        env={**os.environ, **env}, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    while b"SMTP listening" not in (line := await asyncio.wait_for(proc.stdout.readline(), 60)):
        assert line, "mailer serve exited before listening"
    return proc


def deliver(port: int, raw: bytes, sender: str) -> bool:
    """One SMTP transaction; True only when the server said 250 to the data."""
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            client.sendmail(sender, ["security@example.org"], raw)
        return True
    except (smtplib.SMTPException, OSError):
        return False


def worker_processes(pid: int) -> list[int]:
    """The multiprocessing children of ``pid`` (not its gpg calls)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat, cmdline = (entry / "stat").read_text(), (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid and b"multiprocessing" in cmdline:
                found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting for a reaper)."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("processes", [0, 1], ids=["threads", "worker-process"])
async def test_sigkill_mid_burst_then_redelivery_gives_each_report_once(migrated: str, relay: CaptureRelay, tmp_path: Path,
                                                                         processes: int) -> None:
    """Kill -9 during a burst; the 'MTA' retries what got no 250; after restart every report exists once with one ack.
    With a worker process, it dies with the service (no orphan keeps a claim or the database)."""
    port = free_port()
    env = {
        "MAILER_DATABASE_URL": migrated,
        "MAILER_SMTP_LISTEN": f"127.0.0.1:{port}",
        "MAILER_RELAY_URL": relay.url,
        "MAILER_GNUPG_HOME": gnupg_home(),
        "MAILER_SERVICE_DATA_DIR": str(tmp_path / "var"),
        "MAILER_SERVICE_ACKS_PER_SENDER_PER_DAY": "100",
        "MAILER_WORKER_POLL_SECONDS": "0.2",
        "MAILER_WORKER_PROCESSES": str(processes),
    }
    messages = [report_bytes(msgid=f"<burst-{i}@reporter.test>", body=f"Description: bug number {i}\n") for i in range(30)]
    proc = await start_service(env)
    accepted: set[int] = set()
    try:
        for i, raw in enumerate(messages):
            if await asyncio.to_thread(deliver, port, raw, f"r{i}@reporter.test"):
                accepted.add(i)
            if i == 14:
                children: list[int] = []
                for _ in range(200 if processes else 0):  # the worker process starts with the first message
                    if children := worker_processes(proc.pid):
                        break
                    await asyncio.sleep(0.05)
                assert bool(children) == bool(processes), children
                proc.send_signal(signal.SIGKILL)
                await proc.wait()
                for _ in range(100):
                    if not any(alive(child) for child in children):
                        break
                    await asyncio.sleep(0.05)
                assert not any(alive(child) for child in children), "a worker process outlived the service"
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    proc = await start_service(env)
    try:
        for i, raw in enumerate(messages):  # the MTA retries everything it is unsure of; redelivery is harmless
            if i not in accepted or i % 3 == 0:
                assert await asyncio.to_thread(deliver, port, raw, f"r{i}@reporter.test")
        for _ in range(300):
            if len({m.message["In-Reply-To"] for m in relay.messages}) == len(messages):
                break
            await asyncio.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 30)
    db = Database(migrated)
    try:
        with db.session() as s:
            assert s.scalar(select(func.count()).select_from(Report)) == len(messages)
            assert s.scalar(select(func.count()).select_from(InboundMessage)) == len(messages)
    finally:
        db.dispose()
    # An ack sent just before the kill may go out again after the restart: with the same Message-ID,
    # fixed when its outbox row was created, so the copy is recognisable downstream.
    acks = {m.message["Message-ID"]: m.message["In-Reply-To"] for m in relay.messages}
    assert sorted(acks.values()) == sorted(f"<burst-{i}@reporter.test>" for i in range(30))
