"""``mailer serve``, ``mailer health``, ``mailer db upgrade`` and ``mailer imap import``."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Coroutine
from datetime import UTC, date, datetime
from typing import Any, NoReturn

from mailer import app, health, workerproc
from mailer.cli.views import Subparsers, open_db, print_result
from mailer.config import Config
from mailer.db import upgrade as upgrade_database
from mailer.errors import ConfigError

log = logging.getLogger(__name__)

EXIT_ERROR = 1


def cmd_db_upgrade(config: Config, args: argparse.Namespace) -> int:
    upgrade_database(config.database_url)
    print(f"database at {_redacted(config.database_url)} is up to date")
    return 0


def cmd_serve(config: Config, args: argparse.Namespace) -> int:
    os.umask(0o077)  # everything the service creates is private (report text, keys, the health file)
    workerproc.limit_malloc_arenas()  # before the first thread

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

    _run_without_waiting_for_threads(serve())  # exits the process


#: How long the exit waits, in all, for the threads left after the stop (idle ones leave at once).
EXIT_JOIN_SECONDS = 0.25


def _run_without_waiting_for_threads(main: Coroutine[Any, Any, None]) -> NoReturn:
    """Like ``asyncio.run``, but the process exits as soon as the service has stopped.

    After a clean stop (within ``service.shutdown_grace_seconds``) a thread may
    still wait for gpg (its own timeout is longer). Its transaction is not
    committed and its claim expires, so another run processes that message
    again: exiting without it loses nothing. The interpreter's own teardown is
    skipped too: freeing the service's modules one by one took 0.3 s of CPU on
    the 2-core machine (0.5-0.8 s when it was busy), past the grace period that
    ``mailer.app.Service.stop`` keeps for the exit. By then everything is
    committed and closed, and the worker processes die with this one
    (``PR_SET_PDEATHSIG``).
    """
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(main)
        leftovers = asyncio.all_tasks(loop)
        for task in leftovers:
            task.cancel()
        if leftovers:
            loop.run_until_complete(asyncio.gather(*leftovers, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
    finally:
        loop.close()  # shuts the default executor down without waiting
    others = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    until = time.monotonic() + EXIT_JOIN_SECONDS
    for thread in others:  # idle executor threads leave at once; one inside gpg does not
        thread.join(timeout=max(0.0, until - time.monotonic()))
    busy = [t for t in others if t.is_alive()]
    if busy:
        log.warning("exiting while %d worker thread(s) still wait for gpg; their messages are processed again later",
                    len(busy))
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


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


def cmd_health(config: Config, args: argparse.Namespace) -> int:
    """Liveness and readiness (mailer.health): exit 0 ok, 1 degraded, 2 down; never creates anything."""
    report = health.check(config)
    print_result(report, args.json, health.text(report))
    return health.EXIT[report["status"]]


def config_error_exit(args: argparse.Namespace, exc: Exception) -> int:
    """A configuration error before any command ran; `health --json` still prints an object."""
    if getattr(args, "func", None) is cmd_health:
        if getattr(args, "json", False):
            print(json.dumps({"status": health.DOWN, "ok": False, "live": False, "problems": [f"configuration: {exc}"],
                              "levels": [health.DOWN], "service": None, "queues": None}))
        return health.EXIT[health.DOWN]
    return EXIT_ERROR


def cmd_stats(config: Config, args: argparse.Namespace) -> int:
    """What the metrics say, from the database (for people without Prometheus)."""
    from mailer.metrics import database_stats

    db = open_db(config)
    with db.session() as session:
        data = database_stats(session, datetime.now(UTC))
    print_result(data, args.json, _stats_text(data))
    return 0


def _stats_text(data: dict[str, Any], prefix: str = "") -> str:
    lines = []
    for key, value in data.items():
        if isinstance(value, dict):
            inner = _stats_text(value, f"{prefix}{key}.")
            lines.append(inner if inner else f"{prefix}{key}: -")
        else:
            lines.append(f"{prefix}{key}: {value}")
    return "\n".join(line for line in lines if line)


def register(sub: Subparsers) -> None:
    sub.add_parser("serve", help="run the service").set_defaults(func=cmd_serve)
    p = sub.add_parser("health", help="is the service running and well? exit 0 ok, 1 degraded, 2 down, one line per problem")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_health)
    p = sub.add_parser("stats", help="counts from the database: received, classified, acks, commands, queues, schedule")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_stats)

    db = sub.add_parser("db", help="database schema").add_subparsers(dest="db_command", required=True)
    db.add_parser("upgrade", help="migrate the schema to this version").set_defaults(func=cmd_db_upgrade)

    imap = sub.add_parser("imap", help="IMAP mailbox intake").add_subparsers(dest="imap_command", required=True)
    p = imap.add_parser("import", help="take messages already read in the mailbox, from a date on")
    p.add_argument("--since", type=date.fromisoformat, required=True, help="YYYY-MM-DD")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_imap_import)
