"""The composition root: the only module that wires ``inbound`` and ``outbound`` to the core.

:class:`Service` owns the listeners, the worker and the sender in one event loop.
The CLI asks this module for what it needs (:func:`open_database`,
:func:`open_keyring`, :func:`import_imap_since`) and builds nothing itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from datetime import date
from pathlib import Path
from typing import Any

from inbound.smtp import IntakeHandler, start_listener
from mailer.classify import is_own_address
from mailer.clock import SYSTEM, Clock
from mailer.config import Config
from mailer.correspondence import maintainer_key_problem
from mailer.db import Database
from mailer.errors import ConfigError
from mailer.intake import IntakeWriter, Stored
from mailer.openpgp import OpenPGP, check_versions
from mailer.scheduler import Scheduler
from mailer.worker import Worker
from outbound.outbox import Outbox
from outbound.sender import Sender, Transport, transport_for

log = logging.getLogger(__name__)


def open_database(config: Config, *, check: bool = True) -> Database:
    """The configured database; with ``check``, refuse one that is not migrated to this version."""
    db = Database(config.database_url)
    if check:
        db.check()
    return db


def open_keyring(config: Config) -> OpenPGP:
    """The service's GnuPG home, with the configured bounds."""
    return OpenPGP(
        str(config.gnupg_home), passphrase=config.gnupg.secret(),
        timeout=config.gnupg.timeout_seconds, max_output=config.gnupg.max_output_bytes,
    )


def open_scheduler(config: Config, db: Database, *, clock: Clock = SYSTEM) -> Scheduler:
    """The disclosure timeline outside the service (``mailer schedule …``), with a ready outbox."""
    gpg = open_keyring(config)
    check_versions()
    outbox = Outbox(config, gpg, clock=clock)
    outbox.fingerprint = gpg.service_fingerprint()
    outbox.public_key = gpg.export_public(outbox.fingerprint)
    return Scheduler(db, config, outbox, gpg, clock=clock)


async def import_imap_since(config: Config, db: Database, since: date) -> int:
    """Take already-read messages from the IMAP mailbox (``mailer imap import``)."""
    from inbound.imap import import_since

    return await import_since(config.imap, db, since)


class Service:
    def __init__(
        self,
        config: Config,
        *,
        db: Database | None = None,
        clock: Clock = SYSTEM,
        transport: Transport | None = None,
    ) -> None:
        self.config = config
        self.db = db or Database(config.database_url)
        self.writer = IntakeWriter(self.db)
        self.clock = clock
        self.gpg = open_keyring(config)
        self.outbox = Outbox(config, self.gpg, clock=clock)
        self.sender = Sender(self.db, transport or transport_for(config.relay_url, config.relay), clock=clock)
        self.worker = Worker(
            self.db, config, self.outbox, gpg=self.gpg, clock=clock, on_done=self.sender.wake.set, intake_busy=lambda: self.writer.busy
        )
        self.scheduler = Scheduler(self.db, config, self.outbox, self.gpg, clock=clock)
        self.servers: dict[str, asyncio.Server] = {}
        self.tasks: list[asyncio.Task[None]] = []
        self.imap: Any = None  # inbound.imap.ImapPoller when [imap] enabled

    def accepts(self, address: str) -> bool:
        """Recipients we take mail for: the contact and its sub-addresses. Everything else is 550."""
        return is_own_address(address.strip("<>").lower(), self.config.service.contact)

    def handler(self, transport: str) -> IntakeHandler:
        return IntakeHandler(self.writer, self.accepts, transport=transport, on_stored=self._stored)

    def _stored(self, stored: Stored) -> None:
        if not stored.duplicate:
            self.worker.wake.set()

    def _prepare_keys(self) -> str:
        check_versions()
        service = self.config.service
        fingerprint = self.gpg.ensure_service_key(service.contact_name, service.contact, self.config.gnupg.secret())
        self.outbox.fingerprint = fingerprint
        self.outbox.public_key = self.gpg.export_public(fingerprint)
        for maintainer in self.config.maintainers:
            problem = maintainer_key_problem(self.gpg, maintainer.fingerprint)
            if problem:
                log.warning("maintainer %s: %s; they get notices without report content", maintainer.address, problem)
        return fingerprint

    def health(self) -> dict[str, Any]:
        """What this process is doing, JSON-ready (written to <data_dir>/health.json by the running service)."""
        return {
            "pid": os.getpid(),
            "updated_at": self.clock().isoformat(),
            "listeners": {name: f"{host}:{port}" for name, (host, port) in self.listening().items()},
            "service_key": self.fingerprint,
            "imap": self.imap.health if self.imap is not None else None,
            "tasks": {task.get_name(): "running" if not task.done() else "stopped" for task in self.tasks},
        }

    async def write_health(self, every: float = 10.0) -> None:
        """Keep <data_dir>/health.json current, for `mailer health` and container health checks."""
        path = self.config.service.data_dir / "health.json"
        while True:
            try:
                await asyncio.to_thread(_write_atomically, path, json.dumps(self.health(), indent=2))
            except OSError as exc:
                log.warning("cannot write %s: %s", path, exc)
            await asyncio.sleep(every)

    @property
    def fingerprint(self) -> str:
        return self.outbox.fingerprint

    async def start(self, *, background: bool = True) -> None:
        """Check the schema and the service key, open the listeners, start the worker and sender loops."""
        await asyncio.to_thread(self.db.check)
        await asyncio.to_thread(self._prepare_keys)
        for name, section in (("smtp", self.config.smtp), ("lmtp", self.config.lmtp)):
            if section.address is None:
                continue
            host, port = section.address
            try:
                server = await start_listener(
                    self.handler(name), host, port, lmtp=name == "lmtp",
                    hostname=self.config.hostname, data_size_limit=section.max_message_size,
                )
            except OSError as exc:
                await self.stop()
                raise ConfigError(f"{name}.listen: cannot listen on {host}:{port}: {exc.strerror or exc}") from None
            self.servers[name] = server
        if not self.servers and not self.config.imap.enabled:
            raise ConfigError("nothing receives mail: set smtp.listen, lmtp.listen or imap.enabled")
        if background:
            self.tasks.append(asyncio.create_task(self.worker.run(), name="worker"))
            self.tasks.append(asyncio.create_task(self.sender.run(), name="sender"))
            self.tasks.append(asyncio.create_task(self.scheduler.run(), name="schedule"))
            self.tasks.append(asyncio.create_task(self.write_health(), name="health"))
        if self.config.imap.enabled:
            from inbound.imap import ImapPoller

            self.imap = ImapPoller(self.config.imap, self.db, on_stored=self._stored, clock=self.clock)
            self.tasks.append(asyncio.create_task(self.imap.run(), name="imap"))

    def listening(self) -> dict[str, tuple[str, int]]:
        """Where each listener is bound (the port is real even when 0 was configured)."""
        return {name: server.sockets[0].getsockname()[:2] for name, server in self.servers.items()}

    async def stop(self) -> None:
        for server in self.servers.values():
            server.close()
            await server.wait_closed()
        for task in self.tasks:
            # Cancel until done: on 3.11 a wait_for inside a library can swallow one cancel.
            while not task.done():
                task.cancel()
                await asyncio.wait({task}, timeout=1)
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.worker.finish()
        self.servers.clear()
        self.tasks.clear()

    async def settle(self) -> None:
        """Run worker and sender until nothing is due (tests and the benchmark use this)."""
        while await self.worker.drain() + await self.sender.drain():
            pass


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
