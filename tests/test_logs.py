"""Logs without content, JSON lines with tracking ids, metrics over HTTP, configuration checked at start, private files."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import shutil
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailer import logs
from mailer.app import Service
from mailer.config import Config
from mailer.db import upgrade
from tests.conftest import gnupg_home, make_config, run, smtp_port
from tests.gpgtools import inner_text_entity, pgpmime_encrypted
from tests.relay import CaptureRelay
from tests.test_intake import asend, report_bytes

MARKERS = ("Zanzibarquux", "Plinthorange", "Wobblesecret", "Quagmirevault", "Fennelcipher", "Jubilantpayload")


@pytest.fixture
def lite(tmp_path: Path, relay: CaptureRelay) -> Config:
    url = f"sqlite:///{tmp_path / 'var' / 'mailer.db'}"
    upgrade(url)
    return make_config(tmp_path, url, relay.url, metrics={"listen": "127.0.0.1:0"})


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """The process's logging at DEBUG, as JSON lines, into a buffer (the handlers are restored afterwards)."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    stream = io.StringIO()
    logs.setup("DEBUG", "json", stream=stream)
    yield stream
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in saved[0]:
        root.addHandler(handler)
    root.setLevel(saved[1])


def _scrape(address: tuple[str, int]) -> dict[str, float]:
    with urllib.request.urlopen(f"http://{address[0]}:{address[1]}/metrics", timeout=10) as response:
        text = response.read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


async def test_logs_hold_no_content_and_metrics_move(lite: Config, captured: io.StringIO, relay: CaptureRelay) -> None:
    """A plain and an encrypted report at DEBUG: no marker word in the log; JSON lines with tracking ids; metrics move."""
    svc = Service(lite)
    await svc.start(background=False)
    try:
        before = await asyncio.to_thread(_scrape, svc.metrics.address)
        plain = report_bytes(subject=f"{MARKERS[0]} overflow", body=f"Description: {MARKERS[1]} in the parser\n")
        await asend(smtp_port(svc), plain)
        inner = inner_text_entity(f"Description: {MARKERS[2]} in the encoder", subject=f"{MARKERS[3]} report",
                                  attachment=(f"{MARKERS[4]}.txt", MARKERS[5].encode()))
        armored = await asyncio.to_thread(svc.gpg.encrypt, inner, [svc.fingerprint])
        await asend(smtp_port(svc), pgpmime_encrypted(armored), sender="reporter@example.org")
        await svc.settle()
        after = await asyncio.to_thread(_scrape, svc.metrics.address)
    finally:
        await svc.stop()
        svc.db.dispose()
    text = captured.getvalue()
    for marker in MARKERS:
        assert marker.lower() not in text.lower(), f"{marker} reached the log"
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    assert all({"ts", "level", "event"} <= set(line) for line in lines)
    received = [line for line in lines if line["event"] == "message.received"]
    processed = [line for line in lines if line["event"] == "message.processed"]
    assert len(received) == 2 and all(line["transport"] == "smtp" and line["inbound_id"] for line in received)
    assert len(processed) == 2 and all(line["tracking_id"].startswith("SEC-") and line["ack"] == "queued" for line in processed)
    sent = [line for line in lines if line["event"] == "outbox.sent"]
    assert {line["tracking_id"] for line in sent} == {line["tracking_id"] for line in processed}
    assert any(line["event"] == "outbox.queued" and line["kind"] == "ack" for line in lines)
    # metrics scraped over HTTP moved with the mail
    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert delta("mailer_reports_filed_total") == 2
    assert delta('mailer_messages_received_total{outcome="stored",transport="smtp"}') == 2
    assert delta('mailer_acks_total{reason="",result="queued"}') == 2
    assert delta('mailer_sends_total{kind="ack",result="sent"}') == 2
    assert after["mailer_processing_seconds_count"] - before.get("mailer_processing_seconds_count", 0) == 2
    assert after['mailer_reports{state="acknowledged"}'] == 2 and after["mailer_outbox_pending"] == 0
    assert any(name.startswith("mailer_gpg_seconds_count") for name in after)


async def _cli(env: dict[str, str], *argv: str) -> tuple[int, str]:
    code = f"import sys; from mailer.cli import main; sys.exit(main({list(argv)!r}))"
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        return await run(os.sys.executable, "-c", code)  # type: ignore[attr-defined]
    finally:
        os.environ.clear()
        os.environ.update(saved)


async def test_configuration_problems_are_one_line(tmp_path: Path) -> None:
    """Each bad file and misspelled variable: one line naming the key and the path, no traceback."""
    base = {"MAILER_SERVICE_DATA_DIR": str(tmp_path / "var"), "MAILER_SMTP_LISTEN": "127.0.0.1:0"}
    empty = tmp_path / "empty"
    empty.write_text("")
    bad_ca = tmp_path / "ca.pem"
    bad_ca.write_text("not a certificate")
    cases = [
        ({"MAILER_SMTP_LISEN": "127.0.0.1:25"}, "unknown environment variable MAILER_SMTP_LISEN: did you mean MAILER_SMTP_LISTEN?"),
        ({"MAILER_RELAY_PASSWORD_FILE": str(tmp_path / "missing")}, f"relay.password_file: cannot read {tmp_path / 'missing'}"),
        ({"MAILER_RELAY_PASSWORD_FILE": str(empty)}, f"relay.password_file: {empty} is empty"),
        ({"MAILER_GNUPG_PASSPHRASE_FILE": str(tmp_path / "nope")}, "gnupg.passphrase_file: cannot read"),
        ({"MAILER_IMAP_ENABLED": "true", "MAILER_IMAP_HOST": "imap.example.org", "MAILER_IMAP_CA_FILE": str(bad_ca)},
         f"imap.ca_file: {bad_ca} holds no usable PEM certificate"),
        ({"MAILER_MAINTAINERS": "{not json"}, "MAILER_MAINTAINERS: expected a JSON array"),
        ({"MAILER_SERVICE_DATA_DIR": "/proc/forbidden/var"}, "cannot create directory /proc/forbidden/var"),
    ]
    for env, expected in cases:
        code, out = await _cli({**base, **env}, "serve")
        assert code in (1, 2) and expected in out, (env, out)
        assert "Traceback" not in out and len([line for line in out.splitlines() if line.startswith("mailer:")]) == 1, out


async def test_maintainers_from_the_environment(tmp_path: Path) -> None:
    from mailer.config import load_config

    path = tmp_path / "m.toml"
    path.write_text('[[maintainers]]\nname = "Mara"\naddress = "mara@example.org"\n')
    assert load_config(None, {"MAILER_MAINTAINERS_FILE": str(path)}).maintainers[0].address == "mara@example.org"
    cfg = load_config(None, {"MAILER_MAINTAINERS": '[{"name": "Max", "address": "max@example.org"}]'})
    assert cfg.maintainers[0].name == "Max"


async def test_files_are_private_under_umask_022(tmp_path: Path, relay: CaptureRelay) -> None:
    """Data dir, database, WAL, GnuPG home, maildir and health file: 0700/0600; a shared GnuPG home is refused."""
    old = os.umask(0o022)
    try:
        data = tmp_path / "var"
        url = f"sqlite:///{data / 'mailer.db'}"
        upgrade(url)
        shutil.copytree(gnupg_home(), data / "gnupg", ignore=shutil.ignore_patterns("S.*"))
        os.chmod(data / "gnupg", 0o755)
        cfg = make_config(tmp_path, url, f"maildir:{data / 'outgoing'}", gnupg={"home": str(data / "gnupg")})
        svc = Service(cfg)
        with pytest.raises(Exception, match=r"gnupg home .* is readable by others \(mode 0755\)"):
            await svc.start(background=False)
        svc.db.dispose()
        os.chmod(data / "gnupg", 0o700)
        svc = Service(cfg)
        await svc.start(background=False)
        try:
            await asend(smtp_port(svc), report_bytes())
            await svc.settle()
            svc.write_health_now()
            modes = {p.name: p.stat().st_mode & 0o777 for p in (data, data / "mailer.db", data / "mailer.db-wal",
                                                                data / "gnupg", data / "outgoing", data / "health.json")}
            mails = list((data / "outgoing" / "new").iterdir())
        finally:
            await svc.stop()
            svc.db.dispose()
    finally:
        os.umask(old)
    assert modes == {"var": 0o700, "mailer.db": 0o600, "mailer.db-wal": 0o600, "gnupg": 0o700, "outgoing": 0o700,
                     "health.json": 0o600}
    assert mails and all(m.stat().st_mode & 0o777 == 0o600 for m in mails)
