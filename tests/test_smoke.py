"""The spine end to end through swaks: report in, ack out to the capture relay."""

from __future__ import annotations

from sqlalchemy import select

from mailer.app import Service
from mailer.models import Report
from tests.conftest import run, smtp_port
from tests.relay import CaptureRelay


async def test_swaks_report_is_filed_acknowledged_and_threaded(service: Service, relay: CaptureRelay, swaks: str, tmp_path) -> None:
    """A plain report sent by swaks is filed with a tracking id and answered with a threaded ack."""
    body = tmp_path / "report.txt"
    body.write_text("Description: heap overflow\nSteps to reproduce: run it\nVersions: 1.2\n")
    rc, out = await run(
        swaks, "--server", f"127.0.0.1:{smtp_port(service)}", "--to", "security@example.org",
        "--from", "rita@reporter.test", "--body", f"@{body}", "--h-Subject", "Overflow",
        "--header", "Message-Id: <report-1@reporter.test>",
    )
    assert rc == 0, out
    assert "250 2.0.0 Message accepted" in out
    await service.settle()
    with service.db.session() as s:
        reports = list(s.scalars(select(Report)))
    assert len(reports) == 1
    tracking_id = reports[0].tracking_id
    acks = relay.handler.to("rita@reporter.test")
    assert len(acks) == 1
    ack = acks[0].message
    assert f"[{tracking_id}]" in ack["Subject"]
    assert ack["In-Reply-To"] == "<report-1@reporter.test>"
    assert "<report-1@reporter.test>" in ack["References"]
    assert ack["Auto-Submitted"] == "auto-replied"
    assert b"\r\n" in acks[0].raw and b"\n" not in acks[0].raw.replace(b"\r\n", b"")
    assert relay.handler.to("mara@project.test") and relay.handler.to("max@project.test")
