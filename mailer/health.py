"""Health that tells the truth: liveness (is the process there and listening) and readiness (can it do its job).

The running service writes ``<data_dir>/health.json`` (0600) every
``health.write_seconds`` and removes it on a clean exit; :func:`check` reads it,
sees whether its pid is alive and its listeners accept a connection, then asks
the database (opened read-only: ``mailer health`` never creates anything) about
the queues. Each problem is one line naming what and since when.

- **down** (exit 2): no service (no health file, a stale one whose pid is gone,
  not updated for ``health.stale_seconds``), a listener that refuses
  connections, a stopped task, the database unreachable or not migrated;
- **degraded** (exit 1): the relay failing for longer than
  ``health.relay_grace_seconds`` since its last success, IMAP not connected, the
  oldest pending outgoing mail older than ``health.outbox_pending_seconds``, a
  received message unprocessed for ``health.received_stuck_seconds``, a message
  given up on (``mailer failed retry ID``), an outgoing mail that failed for
  good (listed with its id until ``mailer outbox dismiss ID``).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import Engine, create_engine, func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from mailer.config import Config, sqlite_path
from mailer.db import check_migrated
from mailer.errors import DeliveryError, MailerError
from mailer.models import InboundMessage, InboundState, OutboxMessage, OutboxState, Report
from mailer.queues import received_by_kind

HEALTH_FILE = "health.json"
OK, DEGRADED, DOWN = "ok", "degraded", "down"
EXIT = {OK: 0, DEGRADED: 1, DOWN: 2}
#: at most this many failed rows are listed one by one
MAX_LISTED = 10


def health_path(config: Config) -> Path:
    return config.service.data_dir / HEALTH_FILE


def _iso(value: datetime | None) -> str | None:
    return value.isoformat(timespec="seconds") if value else None


def _when(value: datetime | str | None) -> str:
    if value is None:
        return "an unknown time"
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


# -- the service's side ---------------------------------------------------------------------------


def write_file(path: Path, data: dict[str, Any]) -> None:
    """Replace the health file atomically, 0600 whatever the umask."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, json.dumps(data, indent=2).encode("utf-8"))
    finally:
        os.close(fd)
    os.replace(tmp, path)


def remove_file(path: Path, pid: int | None = None) -> None:
    """Remove the health file on a clean exit (only ours: another instance's file stays)."""
    with contextlib.suppress(OSError, ValueError):
        if pid is not None and json.loads(path.read_text(encoding="utf-8")).get("pid") != pid:
            return
        path.unlink()


class RelayWatch:
    """Wraps the relay transport: remembers when it last worked and since when it fails (for health and probes)."""

    def __init__(self, transport: Any, url: str, *, clock: Callable[[], datetime]) -> None:
        self.transport = transport
        self.url = url
        self.clock = clock
        self.last_ok_at: datetime | None = None
        self.failing_since: datetime | None = None
        self.last_error: str | None = None

    async def send(self, envelope: Any) -> None:
        try:
            await self.transport.send(envelope)
        except DeliveryError as exc:
            # a permanent refusal (550 for one address) says the relay is there
            self._failed(str(exc)) if exc.temporary else self._ok()
            raise
        self._ok()

    async def close(self) -> None:
        await self.transport.close()

    def _ok(self) -> None:
        self.last_ok_at, self.failing_since, self.last_error = self.clock(), None, None

    def _failed(self, error: str) -> None:
        self.failing_since = self.failing_since or self.clock()
        self.last_error = error[:500]

    async def probe(self, timeout: float = 10.0) -> None:
        """Connect and say QUIT (SMTP), or check the maildir is writable; records the result."""
        import asyncio

        parts = urlsplit(self.url)
        try:
            if self.url.startswith("maildir:"):
                path = Path(self.url.removeprefix("maildir:"))
                probe = path if path.exists() else path.parent
                if not os.access(probe, os.W_OK):
                    raise OSError(f"{probe} is not writable")
            else:
                import aiosmtplib

                tls = parts.scheme == "smtps"
                client = aiosmtplib.SMTP(hostname=parts.hostname or "localhost", port=parts.port or (465 if tls else 25),
                                         use_tls=tls, start_tls=False, timeout=timeout)
                await asyncio.wait_for(client.connect(), timeout)
                with contextlib.suppress(Exception):
                    await client.quit()
        except (OSError, TimeoutError, Exception) as exc:  # noqa: BLE001 - any failure means "not reachable"
            self._failed(f"relay unreachable: {exc}")
            return
        self._ok()

    @property
    def status(self) -> dict[str, Any]:
        return {"url": _redacted(self.url), "last_ok_at": _iso(self.last_ok_at),
                "failing_since": _iso(self.failing_since), "last_error": self.last_error}


def _redacted(url: str) -> str:
    head, sep, tail = url.rpartition("@")
    return f"{head.split('//')[0]}//***@{tail}" if sep else url


# -- the checker's side ---------------------------------------------------------------------------


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def accepts(host: str, port: int, timeout: float = 3.0) -> str | None:
    """None when a TCP connection to host:port succeeds, else why not."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as exc:
        return exc.strerror or str(exc)


class _Problems:
    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []

    def down(self, text: str) -> None:
        self.items.append((DOWN, text))

    def degraded(self, text: str) -> None:
        self.items.append((DEGRADED, text))

    @property
    def status(self) -> str:
        levels = {level for level, _ in self.items}
        return DOWN if DOWN in levels else DEGRADED if DEGRADED in levels else OK


def _read_only_engine(config: Config) -> Engine:
    """The database without creating it (a mistyped data_dir must not get an empty database)."""
    path = sqlite_path(config.database_url)
    if path is not None:
        if not path.is_file():
            raise MailerError(f"database {path} does not exist: wrong service.data_dir or database.url, "
                              "or `mailer db upgrade` never ran")
        uri = f"file:{path.resolve()}?mode=ro"
        return create_engine("sqlite://", creator=lambda: sqlite3.connect(uri, uri=True, timeout=5))
    url = config.database_url
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    return create_engine(url, connect_args={"connect_timeout": 5}, pool_pre_ping=False)


def check_liveness(config: Config, problems: _Problems, now: datetime) -> dict[str, Any] | None:
    """The health file, its pid, its age, its listeners and tasks; returns the file's content."""
    path = health_path(config)
    try:
        live: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        problems.down(f"service not running: no health file at {path} (is `mailer serve` running with this configuration?)")
        return None
    except (OSError, ValueError) as exc:
        problems.down(f"health file {path} unreadable: {exc}")
        return None
    updated = datetime.fromisoformat(live["updated_at"]) if live.get("updated_at") else None
    pid = live.get("pid")
    if isinstance(pid, int) and not pid_alive(pid):
        problems.down(f"service not running: pid {pid} of the stale health file is gone (last update {_when(updated)})")
        return live
    stale = config.health.stale_seconds
    if updated is None or (now - updated).total_seconds() > stale:
        problems.down(f"service stuck: health file not updated since {_when(updated)} (more than {stale:.0f} s)")
    for name, address in (live.get("listeners") or {}).items():
        host, _, port = str(address).rpartition(":")
        why = accepts(host.strip("[]"), int(port))
        if why is not None:
            problems.down(f"{name} listener {address} refuses connections since at least {_when(now)}: {why}")
    for name, state in (live.get("tasks") or {}).items():
        if state != "running":
            problems.down(f"task {name} stopped (as of {_when(updated)}): see the service log")
    relay = live.get("relay")
    if isinstance(relay, dict) and relay.get("failing_since"):
        last_ok = relay.get("last_ok_at")
        reference = datetime.fromisoformat(last_ok or relay["failing_since"])
        if (now - reference).total_seconds() >= config.health.relay_grace_seconds:
            since = f"last success {_when(last_ok)}" if last_ok else "no success since the start"
            problems.degraded(f"relay {relay.get('url')} failing since {_when(relay['failing_since'])} ({since}): "
                              f"{relay.get('last_error')}")
    imap = live.get("imap")
    if isinstance(imap, dict) and not imap.get("connected"):
        since_imap: str | None = imap.get("disconnected_since") or imap.get("last_error_at") or live.get("started_at")
        problems.degraded(f"IMAP not connected since {_when(since_imap)}: {imap.get('last_error') or imap.get('state')}")
    return live


def check_database(config: Config, problems: _Problems, now: datetime) -> dict[str, Any] | None:
    """Reachable and migrated; then the queues (columns only: no report content is read)."""
    try:
        engine = _read_only_engine(config)
    except MailerError as exc:
        problems.down(str(exc))
        return None
    try:
        check_migrated(engine, config.database_url)
        with Session(engine) as session:
            return _queues(session, config, problems, now)
    except MailerError as exc:
        problems.down(f"database not ready: {exc}")
    except (SQLAlchemyError, OSError) as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        problems.down(f"database unreachable (as of {_when(now)}): {reason}")
    finally:
        engine.dispose()
    return None


def _queues(session: Session, config: Config, problems: _Problems, now: datetime) -> dict[str, Any]:
    def count(model: Any, *states: str) -> int:
        return session.scalar(select(func.count(model.id)).where(model.state.in_(states))) or 0

    waiting_states = (InboundState.RECEIVED.value, InboundState.RETRY.value)
    queues: dict[str, Any] = {
        "inbound_waiting": count(InboundMessage, *waiting_states),
        "inbound_failed": count(InboundMessage, InboundState.FAILED.value),
        "outbox_pending": count(OutboxMessage, OutboxState.PENDING.value),
        "outbox_failed": count(OutboxMessage, OutboxState.FAILED.value),
    }
    # the daily count of what came in, by classification (ignored, bounce, command, … are visible here)
    queues["received_last_day"] = received_by_kind(session, now - timedelta(days=1))
    tracking: dict[int | None, str] = dict(session.execute(select(Report.id, Report.tracking_id)).all()) if queues["outbox_failed"] or \
        queues["outbox_pending"] else {}

    stuck = now - timedelta(seconds=config.health.received_stuck_seconds)
    oldest = session.execute(
        select(InboundMessage.id, InboundMessage.received_at).where(InboundMessage.state.in_(waiting_states),
                                                                    InboundMessage.received_at < stuck)
        .order_by(InboundMessage.id).limit(1)).first()
    if oldest is not None:
        problems.degraded(f"received message {oldest[0]} not processed since {_when(oldest[1])} "
                          f"({queues['inbound_waiting']} waiting): see `mailer failed list` and the log")

    late = now - timedelta(seconds=config.health.outbox_pending_seconds)
    pending = session.execute(
        select(OutboxMessage.id, OutboxMessage.kind, OutboxMessage.report_id, OutboxMessage.created_at,
               OutboxMessage.last_error)
        .where(OutboxMessage.state == OutboxState.PENDING.value, OutboxMessage.created_at < late)
        .order_by(OutboxMessage.created_at).limit(1)).first()
    if pending is not None:
        row_id, kind, report_id, created, error = pending
        problems.degraded(f"outgoing mail {row_id} ({kind}, {tracking.get(report_id, 'no report')}) pending since "
                          f"{_when(created)} ({queues['outbox_pending']} pending): {error or 'not attempted yet'}")

    failed_in = session.execute(
        select(InboundMessage.id, InboundMessage.received_at, InboundMessage.failed_step)
        .where(InboundMessage.state == InboundState.FAILED.value).order_by(InboundMessage.id).limit(MAX_LISTED)).all()
    for row_id, received, step in failed_in:
        problems.degraded(f"received message {row_id} (received {_when(received)}) failed in step {step}: "
                          f"`mailer failed retry {row_id}` after fixing the cause")
    if queues["inbound_failed"] > MAX_LISTED:
        problems.degraded(f"… and {queues['inbound_failed'] - MAX_LISTED} more failed received messages: `mailer failed list`")

    failed_out = session.execute(
        select(OutboxMessage.id, OutboxMessage.kind, OutboxMessage.report_id, OutboxMessage.created_at,
               OutboxMessage.last_error)
        .where(OutboxMessage.state == OutboxState.FAILED.value).order_by(OutboxMessage.id).limit(MAX_LISTED)).all()
    for row_id, kind, report_id, created, error in failed_out:
        problems.degraded(f"outgoing mail {row_id} ({kind}, {tracking.get(report_id, 'no report')}, queued "
                          f"{_when(created)}) not delivered: {error}; `mailer outbox dismiss {row_id}` once dealt with")
    if queues["outbox_failed"] > MAX_LISTED:
        problems.degraded(f"… and {queues['outbox_failed'] - MAX_LISTED} more undeliverable outgoing mails: "
                          "`mailer outbox list`")
    return queues


def check(config: Config, *, now: datetime | None = None) -> dict[str, Any]:
    """Liveness and readiness as one JSON-ready object: ``status``, ``ok``, ``problems`` (one line each), …"""
    now = now or datetime.now(UTC)
    problems = _Problems()
    live = check_liveness(config, problems, now)
    alive = problems.status != DOWN
    queues = check_database(config, problems, now)
    status = problems.status
    return {
        "status": status,
        "ok": status == OK,
        "live": alive,
        "problems": [text for _, text in problems.items],
        "levels": [level for level, _ in problems.items],
        "checked_at": _iso(now),
        "service": live,
        "queues": queues,
    }


def text(report: dict[str, Any]) -> str:
    """The human form: the status, then one line per problem."""
    lines = [report["status"]]
    lines += [f"{level}: {problem}" for level, problem in zip(report["levels"], report["problems"], strict=True)]
    queues = dict(report.get("queues") or {})
    last_day = queues.pop("received_last_day", None)
    if queues:
        lines.append("  ".join(f"{k}={v}" for k, v in queues.items()))
    if last_day:
        lines.append("received in the last 24 h: " + "  ".join(f"{k}={v}" for k, v in sorted(last_day.items())))
    return "\n".join(lines)
