"""Backup of a running service under load, restore into a fresh dir; export, attachments and retention."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update

from mailer import backup, retention
from mailer.app import Service
from mailer.config import Config
from mailer.db import upgrade
from mailer.models import InboundMessage, Report, ReportMessage
from tests.conftest import gnupg_home, make_config, smtp_port
from tests.relay import CaptureRelay
from tests.test_cli import mailer
from tests.test_intake import asend, report_bytes


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short base directory: a GnuPG home inside the data dir needs a socket path under 108 bytes."""
    base = Path(tempfile.mkdtemp(prefix="bk", dir="/tmp"))
    yield base
    for home in base.glob("*/gnupg"):
        subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"], capture_output=True, timeout=10, check=False)
    shutil.rmtree(base, ignore_errors=True)


def _config(tmp_path: Path, relay: CaptureRelay, name: str) -> Config:
    data = tmp_path / name
    url = f"sqlite:///{data / 'mailer.db'}"
    cfg = make_config(tmp_path / name, url, relay.url, gnupg={"home": str(data / "gnupg")})
    return cfg.model_copy(update={"service": cfg.service.model_copy(update={"data_dir": data})})


def _reports(cfg: Config) -> dict[str, str]:
    from mailer.app import open_database

    db = open_database(cfg)
    try:
        with db.session() as session:
            return {r.tracking_id: r.subject for r in session.scalars(select(Report))}
    finally:
        db.dispose()


@pytest.mark.slow
async def test_backup_under_load_restores_every_report_and_the_key(short_tmp: Path, relay: CaptureRelay) -> None:
    source = _config(short_tmp, relay, "source")
    upgrade(source.database_url)
    shutil.copytree(gnupg_home(), source.gnupg_home, ignore=shutil.ignore_patterns("S.*"))
    os.chmod(source.gnupg_home, 0o700)
    svc = Service(source)
    await svc.start(background=True)
    try:
        async def load() -> None:
            for i in range(40):
                await asend(smtp_port(svc), report_bytes(msgid=f"<load{i}@reporter.test>", subject=f"Bug {i}"))

        sender = asyncio.create_task(load())
        await asyncio.sleep(0.5)
        archive = short_tmp / "backup.tar.gz"
        manifest = await asyncio.to_thread(backup.backup, source, archive)
        await sender
        for _ in range(200):
            if len(_reports(source)) == 40:
                break
            await asyncio.sleep(0.1)
        original_key = svc.fingerprint
    finally:
        await svc.stop()
        svc.db.dispose()
    assert archive.stat().st_mode & 0o777 == 0o600
    assert manifest["service_key"] == original_key and {"mailer.db", "gnupg"} <= set(manifest["contents"])
    restored = _config(short_tmp, relay, "restored")
    done = await asyncio.to_thread(backup.restore, restored, archive)
    assert done["reports"] == manifest["reports"]
    copy, live = _reports(restored), _reports(source)
    assert len(copy) == manifest["reports"] and all(live[t] == s for t, s in copy.items())  # every report, intact
    svc = Service(restored)
    await svc.start(background=False)
    try:
        assert svc.fingerprint == original_key
        await asend(smtp_port(svc), report_bytes(msgid="<after@reporter.test>"))
        await svc.settle()
    finally:
        await svc.stop()
        svc.db.dispose()
    numbers = sorted(int(t.rsplit("-", 1)[1]) for t in _reports(restored))
    assert numbers == list(range(1, len(numbers) + 1))  # the next tracking id continues the sequence
    with pytest.raises(backup.BackupError, match="not empty"):
        backup.restore(restored, archive)


async def test_export_attachments_and_retention(service: Service, tmp_path: Path) -> None:
    """`mailer export` and `reports attachments` write a report's data; retention purges closed reports, events stay."""
    from email.message import EmailMessage

    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"], msg["Message-ID"] = "rita@reporter.test", "security@example.org", "Bug", "<a@r>"
    msg.set_content("Description: overflow\n")
    msg.add_attachment(b"crash input", maintype="application", subtype="octet-stream", filename="../poc.bin")
    await asend(smtp_port(service), msg.as_bytes())
    await service.settle()
    with service.db.session() as session:
        tracking = session.scalar(select(Report.tracking_id))
    assert tracking
    out = tmp_path / "export.json"
    code, text = await mailer(service.config, "export", tracking, "--output", str(out))
    assert code == 0, text
    data = json.loads(out.read_text())
    assert out.stat().st_mode & 0o777 == 0o600
    assert data["id"] == tracking and data["messages"][0]["body_text"].startswith("Description: overflow")
    assert data["messages"][0]["attachments"][0]["data_base64"] and data["events"]
    code, text = await mailer(service.config, "reports", "attachments", tracking, "--output", str(tmp_path / "att"))
    assert code == 0, text
    [written] = list((tmp_path / "att").iterdir())
    assert written.read_bytes() == b"crash input" and written.name.endswith("poc.bin")
    # closed long ago: purged, the tombstone keeps the tracking id and the events
    now = service.clock()
    with service.db.session() as session:
        session.execute(update(Report).values(state="closed", updated_at=now - timedelta(days=40)))
    keep = service.config.model_copy(update={"retention": service.config.retention.model_copy(
        update={"closed_reports_days": 30, "raw_messages_days": 10})})
    done = retention.purge(service.db, keep, now=now)
    assert done == {"raw_purged": [], "reports_purged": [tracking]}
    with service.db.session() as session:
        report = session.scalar(select(Report))
        assert report is not None and report.tracking_id == tracking and report.subject == "" and report.reporter == ""
        assert "retention.report_purged" in [e.kind for e in report.events] and "report.filed" in [e.kind for e in report.events]
        assert session.scalar(select(ReportMessage)) is None
        assert all(raw == b"" for raw in session.scalars(select(InboundMessage.raw)))
    assert retention.purge(service.db, keep, now=now) == {"raw_purged": [], "reports_purged": []}
