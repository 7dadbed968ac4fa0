"""`mailer health` tells the truth: up, stopped, stale, relay down, database down, a permanent failure and its dismissal."""

from __future__ import annotations

import asyncio
import json
import os
import socket
from pathlib import Path

import pytest

from mailer.app import Service
from mailer.config import Config
from mailer.db import upgrade
from tests.conftest import make_config, smtp_port
from tests.relay import CaptureRelay
from tests.test_cli import _json, mailer
from tests.test_intake import asend, report_bytes


@pytest.fixture
def lite(tmp_path: Path, relay: CaptureRelay, monkeypatch: pytest.MonkeyPatch) -> Config:
    """SQLite only (health is about the process and the file, not the backend), the relay's failures counted at once."""
    monkeypatch.setenv("MAILER_HEALTH_RELAY_GRACE_SECONDS", "0")  # for the CLI in its subprocess
    url = f"sqlite:///{tmp_path / 'var' / 'mailer.db'}"
    upgrade(url)
    return make_config(tmp_path, url, relay.url, health={"relay_grace_seconds": 0, "write_seconds": 0.2})


async def _health(config: Config) -> tuple[int, dict]:
    code, out = await mailer(config, "health", "--json")
    data = _json(out)
    assert isinstance(data, dict), out
    assert "Traceback" not in out
    return code, data


async def test_up_then_stopped_then_stale(lite: Config) -> None:
    """ok while running; down (exit 2) once stopped (the file is removed); a stale file is recognised by its pid."""
    svc = Service(lite)
    await svc.start(background=True)
    path = lite.service.data_dir / "health.json"
    try:
        for _ in range(100):
            if path.exists():
                break
            await asyncio.sleep(0.05)
        assert path.stat().st_mode & 0o777 == 0o600
        code, data = await _health(lite)
        assert code == 0 and data["status"] == "ok" and data["live"] is True, data
        assert data["service"]["relay"]["last_ok_at"]  # probed at the start
    finally:
        await svc.stop()
        svc.db.dispose()
    assert not path.exists()
    code, data = await _health(lite)
    assert code == 2 and data["status"] == "down" and "no health file" in data["problems"][0]
    # a crashed service leaves its file behind: its pid is gone
    proc = await asyncio.create_subprocess_exec("true")
    await proc.wait()
    path.write_text(json.dumps({"pid": proc.pid, "updated_at": "2026-01-01T00:00:00+00:00", "listeners": {}, "tasks": {}}))
    code, out = await mailer(lite, "health")
    assert code == 2 and f"pid {proc.pid} of the stale health file is gone" in out and "2026-01-01" in out


def _relay_to(svc: Service, port: int) -> None:
    """Point the running service's relay at 127.0.0.1:``port``."""
    url = f"smtp://127.0.0.1:{port}"
    svc.relay.transport.config = svc.relay.transport.config.model_copy(update={"url": url})
    svc.relay.transport.port = port
    svc.relay.url = url


async def test_relay_down_then_permanent_failure_until_dismissed(lite: Config, relay: CaptureRelay) -> None:
    """Relay unreachable: degraded naming it; a 550 is listed with its id until `mailer outbox dismiss ID`."""
    svc = Service(lite)
    await svc.start(background=False)
    # the relay is down: a port bound but not listening refuses connections (a stopped relay's port
    # could be taken by another test's server meanwhile)
    down = socket.socket()
    down.bind(("127.0.0.1", 0))
    try:
        svc.write_health_now()
        code, data = await _health(lite)
        assert code == 0, data
        _relay_to(svc, down.getsockname()[1])
        await asend(smtp_port(svc), report_bytes())
        await svc.settle()
        svc.write_health_now()
        code, data = await _health(lite)
        assert code == 1 and data["status"] == "degraded", data
        [line] = [p for p in data["problems"] if p.startswith("relay ")]
        assert "failing since" in line and "relay unreachable" in line
        # the relay is back, and refuses the reporter's address for good
        _relay_to(svc, relay.port)
        relay.handler.replies = ["550 5.1.1 no such user"] * 5
        from sqlalchemy import update

        from mailer.models import OutboxMessage
        with svc.db.session() as session:
            session.execute(update(OutboxMessage).values(next_attempt_at=svc.clock()))
        await svc.sender.drain()
        await svc.relay.probe()
        svc.write_health_now()
        code, data = await _health(lite)
        failed = [p for p in data["problems"] if "not delivered" in p]
        assert code == 1 and len(failed) >= 1, data
        outbox_id = int(failed[0].split()[2])
        assert f"`mailer outbox dismiss {outbox_id}`" in failed[0] and "550" in failed[0]
        assert not [p for p in data["problems"] if p.startswith("relay ")]  # the relay answered: it is up
        for line in failed:
            code, out = await mailer(lite, "outbox", "dismiss", line.split()[2])
            assert code == 0, out
        code, data = await _health(lite)
        assert code == 0 and data["problems"] == [], data
    finally:
        down.close()
        await svc.stop()
        svc.db.dispose()


async def test_database_down_and_wrong_data_dir(tmp_path: Path) -> None:
    """Database unreachable or missing: one line, exit 2, `--json` still an object; nothing is created."""
    down = Config.model_validate({"service": {"data_dir": str(tmp_path / "d")},
                                  "database": {"url": "postgresql+psycopg://postgres@127.0.0.1:1/nothing"}})
    code, data = await _health(down)
    assert code == 2 and any(p.startswith("database unreachable") for p in data["problems"]), data
    code, out = await mailer(down, "health")
    assert code == 2 and "Traceback" not in out and "database unreachable" in out
    typo = Config.model_validate({"service": {"data_dir": str(tmp_path / "typo")}})
    code, data = await _health(typo)
    assert code == 2 and any("does not exist" in p for p in data["problems"]), data
    assert not (tmp_path / "typo").exists()
    # other commands: one line, exit 2, retry advice
    code, out = await mailer(down, "reports", "list")
    assert code == 2 and "Traceback" not in out and "retry" in out, out
    assert len([line for line in out.splitlines() if line.startswith("mailer:")]) == 1


async def test_health_json_on_a_configuration_error(tmp_path: Path) -> None:
    env_before = dict(os.environ)
    os.environ["MAILER_SMTP_LISEN"] = "127.0.0.1:1"
    try:
        code, data = await _health(Config.model_validate({"service": {"data_dir": str(tmp_path)}}))
    finally:
        os.environ.clear()
        os.environ.update(env_before)
    assert code == 2 and "did you mean MAILER_SMTP_LISTEN?" in data["problems"][0]
