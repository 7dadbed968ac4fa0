"""More of issue 10's health and metrics: IMAP against a real Dovecot, a refusing listener, a stuck message, `mailer stats`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import func, select

from mailer.app import Service
from mailer.config import Config, Maintainer
from mailer.db import upgrade
from mailer.models import CommandSignature, Event, InboundMessage, OutboxMessage, Report
from tests.conftest import make_config, smtp_port
from tests.dovecot import Dovecot, make_message
from tests.gpgtools import Home
from tests.relay import CaptureRelay
from tests.test_cli import _json, mailer
from tests.test_commands import MARA, mara, signed  # noqa: F401 - mara is a fixture
from tests.test_imap import dovecot, imap_config, until  # noqa: F401 - dovecot is a fixture
from tests.test_intake import asend
from tests.test_logs import _scrape


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A migrated SQLite database in the service's data dir (health reads the file, not the backend)."""
    url = f"sqlite:///{tmp_path / 'var' / 'mailer.db'}"
    upgrade(url)
    return url


@pytest.fixture
async def started(tmp_path: Path, sqlite_url: str, relay: CaptureRelay) -> AsyncIterator[Service]:
    """The service with its SMTP listener up, worker and sender driven by ``settle()``."""
    svc = Service(make_config(tmp_path, sqlite_url, relay.url))
    await svc.start(background=False)
    yield svc
    await svc.stop()
    svc.db.dispose()


async def _health(config: Config) -> tuple[int, dict]:
    code, out = await mailer(config, "health", "--json")
    data = _json(out)
    assert isinstance(data, dict) and "Traceback" not in out, out
    return code, data


def _at(line: str) -> datetime:
    """The first ``YYYY-MM-DD HH:MM:SS UTC`` instant named in a health line."""
    stamp = line.split(" since ", 1)[1][:19]
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC)


@pytest.mark.slow
async def test_imap_connected_then_dovecot_stopped(tmp_path: Path, sqlite_url: str, relay: CaptureRelay,
                                                   dovecot: Dovecot) -> None:  # noqa: F811
    """IMAP connected is ok; Dovecot stopped is degraded with one line naming IMAP and since when."""
    svc = Service(imap_config(tmp_path, sqlite_url, relay, dovecot))
    await svc.start(background=False)
    try:
        await until(lambda: svc.imap.health["connected"] and svc.imap.health["state"] == "idle", "IDLE")
        svc.write_health_now()
        code, data = await _health(svc.config)
        assert code == 0 and data["status"] == "ok" and data["problems"] == [], data
        assert data["service"]["imap"]["connected"] is True
        stopped_at = datetime.now(UTC).replace(microsecond=0)
        await asyncio.to_thread(dovecot.stop)
        await until(lambda: not svc.imap.health["connected"], "the disconnect to be noticed")
        first_failure = datetime.fromisoformat(svc.imap.health["last_error_at"]).replace(microsecond=0)
        # a failed reconnect while Dovecot stays down must not move "since when"
        await until(lambda: svc.imap.health["consecutive_failures"] >= 2, "a failed reconnect")
        svc.write_health_now()
        code, data = await _health(svc.config)
        assert code == 1 and data["status"] == "degraded", data
        [line] = [p for p in data["problems"] if p.startswith("IMAP ")]
        assert data["problems"] == [line] and "not connected since" in line
        assert stopped_at <= _at(line) <= first_failure, (line, first_failure)
    finally:
        await svc.stop()
        svc.db.dispose()


async def test_listener_refusing_connections_is_down(started: Service) -> None:
    """A current health file naming a listener nothing accepts on is down (exit 2) with a line naming the listener."""
    started.write_health_now()
    code, data = await _health(started.config)
    assert code == 0, data
    port = smtp_port(started)
    server = started.servers.pop("smtp")
    server.close()
    await server.wait_closed()
    code, out = await mailer(started.config, "health")
    assert code == 2 and out.splitlines()[0] == "down", out
    [line] = [p for p in out.splitlines() if "listener" in p]
    assert line.startswith(f"down: smtp listener 127.0.0.1:{port} refuses connections since"), line
    code, data = await _health(started.config)
    assert code == 2 and data["status"] == "down" and data["live"] is False, data


async def test_message_stuck_in_received_is_degraded(started: Service, monkeypatch: pytest.MonkeyPatch) -> None:
    """A message left in `received` beyond `[health] received_stuck_seconds` is degraded, named by its id."""
    await asend(smtp_port(started), make_message(1, tag="stuck"), sender="reporter1@reporter.test")
    started.write_health_now()
    code, data = await _health(started.config)  # within the default 300 s: fine
    assert code == 0 and data["queues"]["inbound_waiting"] == 1, data
    with started.db.session() as session:
        [inbound_id] = session.scalars(select(InboundMessage.id).where(InboundMessage.state == "received")).all()
    monkeypatch.setenv("MAILER_HEALTH_RECEIVED_STUCK_SECONDS", "0")
    code, data = await _health(started.config)
    assert code == 1 and data["status"] == "degraded", data
    [line] = data["problems"]
    assert line.startswith(f"received message {inbound_id} not processed since ") and "(1 waiting)" in line, line
    await started.settle()
    code, data = await _health(started.config)
    assert code == 0 and data["problems"] == [], data


async def test_stats_match_the_database_and_metrics_move(tmp_path: Path, sqlite_url: str, relay: CaptureRelay,
                                                          mara: tuple[Home, str]) -> None:  # noqa: F811
    """`mailer stats --json` counts what the database holds; the scraped counters move with reports and a signed command."""
    home, fpr = mara
    config = make_config(tmp_path, sqlite_url, relay.url, metrics={"listen": "127.0.0.1:0"})
    config = config.model_copy(update={"maintainers": (Maintainer(name="Mara", address=MARA, fingerprint=fpr),)})
    svc = Service(config)
    svc.gpg.import_public(home.export(fpr))
    await svc.start(background=False)
    try:
        before = await asyncio.to_thread(_scrape, svc.metrics.address)
        for i in (1, 2):
            await asend(smtp_port(svc), make_message(i, tag="stats"), sender=f"reporter{i}@reporter.test")
        await svc.settle()
        with svc.db.session() as session:
            tracking = session.scalars(select(Report.tracking_id).order_by(Report.id)).first()
        body = f"#report {tracking}\n#accept\n"
        await asend(smtp_port(svc), signed(home, fpr, body, subject=f"Re: [{tracking}]"), sender=MARA)
        await svc.settle()
        after = await asyncio.to_thread(_scrape, svc.metrics.address)
        code, out = await mailer(config, "stats", "--json")
        assert code == 0, out
        stats = _json(out)
        assert isinstance(stats, dict), out
        with svc.db.session() as session:
            def grouped(column: object) -> dict[str, int]:
                return {str(k): int(v) for k, v in session.execute(select(column, func.count()).group_by(column))}

            def events(kind: str) -> int:
                return int(session.scalar(select(func.count(Event.id)).where(Event.kind == kind)) or 0)

            assert stats["received"]["by_state"] == grouped(InboundMessage.state)
            assert stats["received"]["by_transport"] == grouped(InboundMessage.transport) == {"smtp": 3}
            assert stats["reports"]["total"] == 2 and stats["reports"]["by_state"] == grouped(Report.state)
            assert stats["acks"]["queued"] == events("ack.queued") == 2
            assert stats["commands"] == {"applied": int(session.scalar(select(func.count(CommandSignature.id))) or 0),
                                         "refused": events("command.refused")} == {"applied": 1, "refused": 0}
            assert stats["outbox"]["by_state"] == grouped(OutboxMessage.state)
            assert stats["outbox"]["pending"] == 0 and stats["failed_messages"] == 0
        assert sum(stats["outbox"]["by_state"].values()) == len(relay.messages)
    finally:
        await svc.stop()
        svc.db.dispose()

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert delta("mailer_reports_filed_total") == 2
    assert delta('mailer_messages_received_total{outcome="stored",transport="smtp"}') == 3
    assert delta('mailer_commands_total{outcome="ok"}') == 1
    assert delta('mailer_commands_total{outcome="refused"}') == 0
    assert after['mailer_reports{state="accepted"}'] == 1 and after["mailer_outbox_pending"] == 0
