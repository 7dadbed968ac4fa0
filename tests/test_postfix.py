"""A real Postfix in front of the service, set up as docs/postfix.md says.

reporter ─SMTP─► Postfix (MX port) ─LMTP─► ``mailer serve`` ─SMTP─► Postfix (submission port) ─► capture relay

The service runs as a subprocess (``mailer db upgrade`` then ``mailer serve``, configured
by environment variables only, as in the container) so it can be stopped and started
while Postfix keeps the mail. Under CI=true a Postfix that cannot start fails the test.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import smtplib
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import gnupg_home, unavailable
from tests.dovecot import free_port, make_message
from tests.postfix import Postfix, PostfixUnavailable, start_postfix
from tests.relay import CaptureRelay

pytestmark = pytest.mark.slow

CONTACT = "security@example.org"
SENDKEY = "security-sendkey@example.org"
MAILER = str(Path(sys.executable).with_name("mailer"))


class ServiceProcess:
    """``mailer serve`` with LMTP only, its relay pointing back at Postfix's submission port."""

    def __init__(self, directory: Path, lmtp_port: int, relay_url: str) -> None:
        self.dir = directory
        self.lmtp_port = lmtp_port
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("MAILER_")}
        self.env.update({
            "MAILER_SERVICE_CONTACT": CONTACT,
            "MAILER_SERVICE_DATA_DIR": str(directory / "var"),
            "MAILER_GNUPG_HOME": gnupg_home(),
            "MAILER_DATABASE_URL": f"sqlite:///{directory / 'var' / 'mailer.db'}",
            "MAILER_SMTP_LISTEN": "",
            "MAILER_LMTP_LISTEN": f"127.0.0.1:{lmtp_port}",
            "MAILER_RELAY_URL": relay_url,
        })
        self.process: subprocess.Popen[bytes] | None = None
        self.log = directory / "serve.log"
        self.cli("db", "upgrade")

    def cli(self, *args: str) -> str:
        result = subprocess.run([MAILER, *args], env=self.env, capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 0, f"mailer {' '.join(args)}: {result.stdout}{result.stderr}"
        return result.stdout

    def reports(self) -> list[dict[str, object]]:
        return list(json.loads(self.cli("reports", "list", "--json")))

    async def start(self, timeout: float = 60) -> None:
        assert self.process is None
        offset = len(self.output())  # the log is appended to across restarts
        with self.log.open("ab") as log:
            self.process = subprocess.Popen([MAILER, "serve"], env=self.env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        marker = f"LMTP listening on 127.0.0.1:{self.lmtp_port}"
        while marker not in self.output()[offset:]:
            assert self.process.poll() is None, f"mailer serve exited {self.process.returncode}: {self.output()[-3000:]}"
            assert time.monotonic() < deadline, f"mailer serve did not listen within {timeout} s: {self.output()[-3000:]}"
            await asyncio.sleep(0.1)

    async def stop(self) -> None:
        if self.process is None:
            return
        process, self.process = self.process, None
        process.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(process.wait, 30)
        assert code == 0, f"mailer serve exited {code} on SIGTERM: {self.output()[-3000:]}"

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            self.process = None

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@pytest.fixture
async def capture() -> AsyncIterator[CaptureRelay]:
    relay = CaptureRelay()
    await relay.start()
    yield relay
    await relay.stop()


@pytest.fixture
def postfix(capture: CaptureRelay) -> Iterator[Postfix]:
    try:
        server = start_postfix(
            domain="example.org", recipients=[CONTACT, SENDKEY], lmtp_port=free_port(), relayhost=f"[127.0.0.1]:{capture.port}"
        )
    except PostfixUnavailable as exc:
        unavailable(f"Postfix ({exc})")
        raise
    yield server
    server.cleanup()


@pytest.fixture
async def mailer(tmp_path: Path, postfix: Postfix) -> AsyncIterator[ServiceProcess]:
    service = ServiceProcess(tmp_path, postfix.lmtp_port, f"smtp://127.0.0.1:{postfix.submission_port}")
    await service.start()
    yield service
    try:
        await service.stop()
    finally:
        service.kill()


def send(postfix: Postfix, messages: list[tuple[str, str, bytes]]) -> None:
    """Hand messages to Postfix's MX port in one SMTP session, as a sending MTA would."""
    with smtplib.SMTP("127.0.0.1", postfix.port, timeout=30) as client:
        for sender, recipient, raw in messages:
            client.sendmail(sender, [recipient], raw)


def reports_for(indexes: range, tag: str) -> list[tuple[str, str, bytes]]:
    return [(f"reporter{i}@reporter.test", CONTACT, make_message(i, tag=tag)) for i in indexes]


async def until(check: Callable[[], Awaitable[bool] | bool], what: str, postfix: Postfix, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if isinstance(result, Awaitable):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; postfix log:\n{postfix.log_tail(40)}")
        await asyncio.sleep(0.25)


def acks_per_reporter(capture: CaptureRelay) -> dict[str, int]:
    counts: dict[str, int] = {}
    for message in capture.messages:
        for rcpt in message.rcpt_tos:
            if rcpt.endswith("@reporter.test"):
                counts[rcpt] = counts.get(rcpt, 0) + 1
    return counts


def queue_empty(postfix: Postfix) -> bool:
    return not postfix.queue()


async def test_reports_through_postfix_are_filed_and_acked_once(
    postfix: Postfix, mailer: ServiceProcess, capture: CaptureRelay
) -> None:
    await asyncio.to_thread(send, postfix, reports_for(range(20), "pf"))
    expected = {f"reporter{i}@reporter.test" for i in range(20)}
    await until(lambda: set(acks_per_reporter(capture)) == expected and queue_empty(postfix), "20 acks via Postfix", postfix)
    await asyncio.sleep(1)  # a duplicate would arrive now
    assert acks_per_reporter(capture) == dict.fromkeys(expected, 1)
    reports = mailer.reports()
    assert sorted(str(r["reporter"]) for r in reports) == sorted(expected)
    assert len({r["id"] for r in reports}) == 20
    log = postfix.log()
    assert log.count("status=sent") >= 40, log  # 20 LMTP deliveries to the service, 20 acks to the relay
    assert "relay=127.0.0.1[127.0.0.1]:" + str(postfix.lmtp_port) in log

    # the -sendkey address is listed too: the key request reaches the service and is answered
    await asyncio.to_thread(send, postfix, [("keen@reporter.test", SENDKEY, make_message(99, sender="keen@reporter.test", tag="key"))])
    await until(lambda: bool(capture.handler.to("keen@reporter.test")), "the sendkey answer", postfix)
    assert len(mailer.reports()) == 20


async def test_unknown_local_part_is_refused_at_rcpt_without_bounce(
    postfix: Postfix, mailer: ServiceProcess, capture: CaptureRelay
) -> None:
    forged = "victim@forged.test"
    for rcpt in ("nobody@example.org", "security-other@example.org", "postmaster@example.org"):
        with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
            await asyncio.to_thread(send, postfix, [(forged, rcpt, make_message(1, sender=forged, tag="unknown"))])
        code, text = refused.value.recipients[rcpt]
        assert code == 550 and b"User unknown in relay recipient table" in text, (code, text)
    # the contact with a + sub-address is accepted (recipient_delimiter), then filed
    rita = ("rita@reporter.test", "security+web@example.org", make_message(2, sender="rita@reporter.test"))
    await asyncio.to_thread(send, postfix, [rita])
    await until(lambda: bool(capture.handler.to("rita@reporter.test")) and queue_empty(postfix), "the ack to rita", postfix)
    await asyncio.sleep(1)
    assert capture.handler.to(forged) == []  # no bounce, no backscatter
    assert queue_empty(postfix)
    log = postfix.log()
    assert "status=bounced" not in log and "sender non-delivery notification" not in log, log
    assert log.count("NOQUEUE: reject: RCPT") == 3
    assert [r["reporter"] for r in mailer.reports()] == ["rita@reporter.test"]


async def test_service_down_postfix_defers_then_flush_files_each_once(
    postfix: Postfix, mailer: ServiceProcess, capture: CaptureRelay
) -> None:
    await asyncio.to_thread(send, postfix, reports_for(range(5), "before"))
    await until(lambda: len(acks_per_reporter(capture)) == 5 and queue_empty(postfix), "the first 5 acks", postfix)

    await mailer.stop()
    await asyncio.to_thread(send, postfix, reports_for(range(5, 20), "while-down"))

    def all_deferred() -> bool:
        queue = postfix.queue()
        return len(queue) == 15 and all(m["queue_name"] == "deferred" for m in queue)

    await until(all_deferred, "15 deferred messages", postfix)
    reasons = {str(r["delay_reason"]) for m in postfix.queue() for r in m["recipients"]}  # type: ignore[attr-defined]
    assert all("Connection refused" in r or "delivery temporarily suspended" in r for r in reasons), reasons
    assert len(mailer.reports()) == 5  # nothing was filed while the service was down

    await mailer.start()
    await asyncio.to_thread(postfix.flush)
    await until(lambda: queue_empty(postfix) and len(acks_per_reporter(capture)) == 20, "the deferred reports after flush", postfix)
    await asyncio.to_thread(postfix.flush)  # a second flush finds nothing to deliver again
    await asyncio.sleep(1)
    reports = mailer.reports()
    assert sorted(str(r["reporter"]) for r in reports) == sorted(f"reporter{i}@reporter.test" for i in range(20))
    assert len({r["id"] for r in reports}) == 20
    assert acks_per_reporter(capture) == {f"reporter{i}@reporter.test": 1 for i in range(20)}
