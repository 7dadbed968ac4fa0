"""``mailer serve``, ``mailer health``, ``mailer db upgrade`` and ``mailer imap import``."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy import func, select

from mailer import app
from mailer.cli.views import Subparsers, open_db, print_result
from mailer.config import Config
from mailer.db import upgrade as upgrade_database
from mailer.errors import ConfigError
from mailer.models import InboundMessage, InboundState, OutboxMessage

EXIT_ERROR = 1


def cmd_db_upgrade(config: Config, args: argparse.Namespace) -> int:
    upgrade_database(config.database_url)
    print(f"database at {_redacted(config.database_url)} is up to date")
    return 0


def cmd_serve(config: Config, args: argparse.Namespace) -> int:
    async def serve() -> None:
        service = app.Service(config)
        await service.start()
        print(f"service OpenPGP key: {service.fingerprint} ({config.service.contact_name} <{config.service.contact}>)")
        print(f"key requests: mail to {config.sendkey_address}; export with `mailer keys export`")
        for name, (host, port) in service.listening().items():
            print(f"{name.upper()} listening on {host}:{port}", flush=True)
        print(f"database: {_redacted(config.database_url)}", flush=True)
        print(f"outgoing mail (acknowledgements, notices) goes to: {config.relay_url}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await service.stop()
        service.db.dispose()

    asyncio.run(serve())
    return 0


def _redacted(url: str) -> str:
    head, sep, tail = url.rpartition("@")
    if not sep or ":" not in head.split("//", 1)[-1]:
        return url
    scheme, _, user = head.partition("//")
    return f"{scheme}//{user.split(':', 1)[0]}:***@{tail}"


def cmd_imap_import(config: Config, args: argparse.Namespace) -> int:
    if not config.imap.host:
        raise ConfigError("imap.host is required (set [imap] host or MAILER_IMAP_HOST)")
    count = asyncio.run(app.import_imap_since(config, open_db(config), args.since))
    print_result({"imported": count}, args.json, f"imported {count} message(s)")
    return 0


HEALTH_STALE_SECONDS = 60


def health_report(config: Config) -> tuple[dict[str, Any], list[str]]:
    """The running service's own view (health.json) plus queue depths from the database, and the problems."""
    problems: list[str] = []
    path = config.service.data_dir / "health.json"
    try:
        live = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        live = None
        problems.append(f"no health file at {path}: is `mailer serve` running with this configuration?")
    if live is not None:
        age = (datetime.now(UTC) - datetime.fromisoformat(live["updated_at"])).total_seconds()
        if age > HEALTH_STALE_SECONDS:
            problems.append(f"health file is {age:.0f} s old: the service is not running or is stuck")
        imap = live.get("imap")
        if imap is not None and not imap.get("connected"):
            problems.append(f"IMAP not connected: {imap.get('last_error') or imap.get('state')}")
        problems += [f"task {name} stopped" for name, state in live.get("tasks", {}).items() if state != "running"]
    db = open_db(config)
    with db.session() as session:
        def count(model: Any, *states: str) -> int:
            return session.scalar(select(func.count(model.id)).where(model.state.in_(states))) or 0

        queues = {
            "inbound_waiting": count(InboundMessage, InboundState.RECEIVED.value, InboundState.RETRY.value),
            "inbound_failed": count(InboundMessage, InboundState.FAILED.value),
            "outbox_pending": count(OutboxMessage, "pending"),
            "outbox_failed": count(OutboxMessage, "failed"),
        }
    if queues["inbound_failed"]:
        problems.append(f"{queues['inbound_failed']} message(s) failed processing: `mailer failed list`")
    if queues["outbox_failed"]:
        problems.append(f"{queues['outbox_failed']} outgoing message(s) undeliverable: `mailer outbox list`")
    return {"ok": not problems, "problems": problems, "service": live, "queues": queues}, problems


def cmd_health(config: Config, args: argparse.Namespace) -> int:
    data, problems = health_report(config)
    text = "ok" if not problems else "\n".join(f"problem: {p}" for p in problems)
    text += "\n" + "  ".join(f"{k}={v}" for k, v in data["queues"].items())
    print_result(data, args.json, text)
    return 0 if not problems else EXIT_ERROR


def register(sub: Subparsers) -> None:
    sub.add_parser("serve", help="run the service").set_defaults(func=cmd_serve)
    p = sub.add_parser("health", help="is the service running and well? exit 1 with the problems if not")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_health)

    db = sub.add_parser("db", help="database schema").add_subparsers(dest="db_command", required=True)
    db.add_parser("upgrade", help="migrate the schema to this version").set_defaults(func=cmd_db_upgrade)

    imap = sub.add_parser("imap", help="IMAP mailbox intake").add_subparsers(dest="imap_command", required=True)
    p = imap.add_parser("import", help="take messages already read in the mailbox, from a date on")
    p.add_argument("--since", type=date.fromisoformat, required=True, help="YYYY-MM-DD")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_imap_import)
