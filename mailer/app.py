"""The composition root: the only module that wires ``inbound`` and ``outbound`` to the core.

:class:`Service` owns the listeners, the worker and the sender in one event loop.
The CLI asks this module for what it needs (:func:`open_database`,
:func:`open_keyring`, :func:`import_imap_since`) and builds nothing itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from datetime import date
from pathlib import Path
from typing import Any

from inbound.smtp import Gate, IntakeHandler, start_listener
from mailer import atrest, workerproc
from mailer.atrest import install_configured as install_data_key
from mailer.classify import is_own_address
from mailer.clock import SYSTEM, Clock
from mailer.config import Config, check_files, check_private_files, private_dir
from mailer.correspondence import maintainer_key_problem
from mailer.db import Database, InstanceLock, release_claims
from mailer.digest import Digest
from mailer.errors import ConfigError
from mailer.health import RelayWatch, health_path, remove_file, write_file
from mailer.intake import IntakeWriter, Stored
from mailer.loop import run_every
from mailer.models import InboundMessage, OutboxMessage
from mailer.openpgp import check_versions, open_keyring
from mailer.scheduler import Scheduler
from mailer.worker import Worker
from outbound.compose import autocrypt_header
from outbound.outbox import Outbox
from outbound.sender import Sender, Transport, transport_for

log = logging.getLogger(__name__)


def open_database(config: Config, *, check: bool = True) -> Database:
    """The configured database; with ``check``, refuse one that is not migrated to this version."""
    install_data_key(config)
    db = Database(config.database_url)
    if check:
        db.check()
    return db


def open_scheduler(config: Config, db: Database, *, clock: Clock = SYSTEM) -> Scheduler:
    """The disclosure timeline outside the service (``mailer schedule …``), with a ready outbox."""
    gpg = open_keyring(config)
    check_versions()
    outbox = Outbox(config, gpg, clock=clock)
    outbox.fingerprint = gpg.service_fingerprint()
    outbox.public_key = gpg.export_public(outbox.fingerprint)
    outbox.autocrypt = autocrypt_header(config.service.contact, gpg.export_minimal(outbox.fingerprint))
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
        check_files(config)  # every file the configuration names, read now: a missing one stops the start
        private_dir(config.service.data_dir)  # 0700 whatever the umask, before anything is created in it
        install_data_key(config)
        self.db = db or Database(config.database_url)
        self._own_db = db is None
        self.writer = IntakeWriter(self.db)
        self.clock = clock
        self.gpg = open_keyring(config)
        self.outbox = Outbox(config, self.gpg, clock=clock)
        # the relay's last success and failure, for health (mailer.health)
        self.relay = RelayWatch(transport or transport_for(config.relay_url, config.relay), config.relay_url, clock=clock)
        self.sender = Sender(self.db, self.relay, clock=clock, lease=config.worker.lease_seconds, signer=self.outbox.sign,
                             intake_busy=lambda: self.writer.busy)
        self.worker = Worker(
            self.db, config, self.outbox, gpg=self.gpg, clock=clock, on_done=self.sender.wake.set, intake_busy=lambda: self.writer.busy
        )
        self.scheduler = Scheduler(self.db, config, self.outbox, self.gpg, clock=clock)
        self.digest = Digest(self.db, config, self.outbox, self.gpg, clock=clock)
        self.servers: dict[str, asyncio.Server] = {}
        self.tasks: list[asyncio.Task[None]] = []
        self.imap: Any = None  # inbound.imap.ImapPoller when [imap] enabled
        self.gate = Gate()  # closed at shutdown: new SMTP/LMTP sessions get 421
        self.lock: InstanceLock | None = None  # SQLite: this is the only instance on the database
        self.metrics: Any = None  # mailer.metrics.Endpoint when [metrics] listen is set
        self.started_at = clock()

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
        self.outbox.autocrypt = autocrypt_header(service.contact, self.gpg.export_minimal(fingerprint))
        for maintainer in self.config.maintainers:
            problem = maintainer_key_problem(self.gpg, maintainer.fingerprint)
            if problem:
                log.warning("maintainer %s: %s; they get notices without report content", maintainer.address, problem)
        return fingerprint

    def _worker_processes(self, fingerprint: str) -> None:
        """``worker.processes``: the pipeline in processes of its own (threads when a test drives the clock or the database)."""
        processes = self.config.worker.processes
        if not processes or self.clock is not SYSTEM or not self._own_db or self.db.engine.url.database in (None, "", ":memory:"):
            return
        key = workerproc.ServiceKey(fingerprint, self.outbox.public_key, self.outbox.autocrypt)
        level, fmt = workerproc.log_settings()
        config, owner = self.config, self.db.owner
        self.worker.use_processes(lambda: workerproc.start_pool(config, owner, key, log_level=level, log_format=fmt),
                                  processes)

    def health(self) -> dict[str, Any]:
        """What this process is doing, JSON-ready (written to <data_dir>/health.json by the running service)."""
        return {
            "pid": os.getpid(),
            "started_at": self.started_at.isoformat(),
            "updated_at": self.clock().isoformat(),
            "listeners": {name: f"{host}:{port}" for name, (host, port) in self.listening().items()},
            "service_key": self.fingerprint,
            "relay": self.relay.status,
            "imap": self.imap.health if self.imap is not None else None,
            "metrics": "{}:{}".format(*self.metrics.address) if self.metrics is not None else None,
            "tasks": {task.get_name(): "running" if not task.done() else "stopped" for task in self.tasks},
        }

    def write_health_now(self) -> None:
        """Write <data_dir>/health.json (0600) at once."""
        write_file(health_path(self.config), self.health())

    async def write_health(self, every: float | None = None) -> None:
        """Keep <data_dir>/health.json current, for `mailer health` and container health checks; removed on a clean exit.

        The relay is probed at the start and, while it fails, before each write (so a recovery is seen
        even when no mail is due).
        """
        every = every or self.config.health.write_seconds
        path = health_path(self.config)
        try:
            await self.relay.probe()
            while True:
                if self.relay.failing_since is not None:
                    await self.relay.probe()
                try:
                    self.write_health_now()
                except OSError as exc:
                    log.warning("cannot write %s: %s", path, exc)
                await asyncio.sleep(every)
        finally:
            remove_file(path, os.getpid())

    def _stats(self) -> dict[str, Any]:
        from mailer.metrics import database_stats

        with self.db.session() as session:
            return database_stats(session, self.clock())

    def _start_metrics(self) -> None:
        address = self.config.metrics.address
        if address is None:
            return
        from mailer.metrics import DatabaseCollector, Endpoint

        imap = lambda: self.imap.health["connected"] if self.imap is not None else None  # noqa: E731
        try:
            self.metrics = Endpoint(address[0], address[1], DatabaseCollector(self._stats, imap))
        except OSError as exc:
            raise ConfigError(f"metrics.listen: cannot listen on {address[0]}:{address[1]}: {exc.strerror or exc}") from None

    async def run_retention(self, every: float = 3600.0) -> None:
        """Purge what ``[retention]`` says is kept no longer, once an hour."""
        from mailer import retention
        from mailer.loop import run_every

        async def once() -> None:
            await asyncio.to_thread(retention.purge, self.db, self.config, now=self.clock())

        await run_every(once, every=every, name="retention", log=log)

    @property
    def fingerprint(self) -> str:
        return self.outbox.fingerprint

    async def start(self, *, background: bool = True) -> None:
        """Check the schema and the service key, open the listeners, start the worker and sender loops."""
        await asyncio.to_thread(check_private_files, self.config)
        await asyncio.to_thread(self.db.check)
        await asyncio.to_thread(self._single_instance)
        try:
            await asyncio.to_thread(atrest.seal_legacy, self.db.engine)  # values stored in the clear before 0006
            fingerprint = await asyncio.to_thread(self._prepare_keys)
        except BaseException:
            self._unlock()  # a start that fails leaves the database free for the next attempt
            raise
        self._worker_processes(fingerprint)
        workerproc.tune_switching()  # the service owns its process
        for name, section in (("smtp", self.config.smtp), ("lmtp", self.config.lmtp)):
            if section.address is None:
                continue
            host, port = section.address
            try:
                server = await start_listener(
                    self.handler(name), host, port, lmtp=name == "lmtp",
                    hostname=self.config.hostname, data_size_limit=section.max_message_size, gate=self.gate,
                )
            except OSError as exc:
                await self.stop()
                raise ConfigError(f"{name}.listen: cannot listen on {host}:{port}: {exc.strerror or exc}") from None
            self.servers[name] = server
        if not self.servers and not self.config.imap.enabled:
            self._unlock()
            raise ConfigError("nothing receives mail: set smtp.listen, lmtp.listen or imap.enabled")
        if background:
            self.tasks.append(asyncio.create_task(self.worker.run(), name="worker"))
            self.tasks.append(asyncio.create_task(self.sender.run(self.config.worker.poll_seconds), name="sender"))
            self.tasks.append(asyncio.create_task(self.scheduler.run(), name="schedule"))
            self.tasks.append(asyncio.create_task(
                run_every(lambda: asyncio.to_thread(self.digest.drain), every=300.0, name="digest", log=log), name="digest"))
            self.tasks.append(asyncio.create_task(self.write_health(), name="health"))
            if self.config.retention.raw_messages_days or self.config.retention.closed_reports_days:
                self.tasks.append(asyncio.create_task(self.run_retention(), name="retention"))
        self._start_metrics()
        if self.config.imap.enabled:
            from inbound.imap import ImapPoller

            self.imap = ImapPoller(self.config.imap, self.db, on_stored=self._stored, clock=self.clock,
                                   lease_seconds=self.config.worker.lease_seconds)
            self.tasks.append(asyncio.create_task(self.imap.run(), name="imap"))

    def listening(self) -> dict[str, tuple[str, int]]:
        """Where each listener is bound (the port is real even when 0 was configured)."""
        return {name: server.sockets[0].getsockname()[:2] for name, server in self.servers.items()}

    def _single_instance(self) -> None:
        """SQLite: take the instance lock (a second `serve` is refused), then clear claims a crashed run left."""
        path = self.db.sqlite_path()
        if path is None or self.lock is not None:
            return
        lock = InstanceLock(path)
        lock.acquire()
        self.lock = lock
        for model in (InboundMessage, OutboxMessage):
            release_claims(self.db, model, everyone=True)

    def _unlock(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    async def stop(self, grace: float | None = None) -> None:
        """Stop within ``grace`` seconds (default ``service.shutdown_grace_seconds``), losing nothing.

        New SMTP/LMTP sessions get 421 at once; sessions mid-DATA finish (or get 451
        when the time is up); the worker takes nothing new and finishes the messages
        in flight; the sender finishes the mail it is sending; what this instance
        still holds is handed back; the service's gpg-agent is stopped.
        """
        loop = asyncio.get_running_loop()
        grace = self.config.service.shutdown_grace_seconds if grace is None else grace
        deadline = loop.time() + grace - min(1.0, grace * 0.15)  # leave the process time to exit

        def left(share: float = 1.0) -> float:
            return max(0.0, (deadline - loop.time()) * share)

        log.info("shutting down: new sessions get 421; finishing work in progress (grace %.1f s)", grace)
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        self.worker.accepting = False
        self.sender.stopping.set()
        await self.gate.close()  # the listeners stay open until the end, answering 421
        intake_until = loop.time() + left(0.4)
        while self.gate.in_data and loop.time() < intake_until:
            await asyncio.sleep(0.02)
        await self.gate.abort()
        await self.worker.finish(timeout=left(0.8))
        sender_until = loop.time() + left(0.8)
        while self.sender.busy and loop.time() < sender_until:
            await asyncio.sleep(0.02)
        for server in self.servers.values():
            server.close()
            await server.wait_closed()
        for task in self.tasks:
            # Cancel until done: on 3.11 a wait_for inside a library can swallow one cancel.
            while not task.done():
                task.cancel()
                await asyncio.wait({task}, timeout=max(0.1, min(1.0, left())))
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for model in (InboundMessage, OutboxMessage):
            with contextlib.suppress(Exception):
                await asyncio.to_thread(release_claims, self.db, model)
        with contextlib.suppress(Exception):
            await asyncio.to_thread(self.gpg.kill_agent)
        self.worker.accepting = True  # a stopped service may be started again (tests)
        self.sender.stopping.clear()
        self.gate = Gate()
        self._unlock()
        self.servers.clear()
        self.tasks.clear()
        log.info("stopped")

    async def settle(self) -> None:
        """Run worker and sender until nothing is due (tests and the benchmark use this)."""
        while await self.worker.drain() + await self.sender.drain():
            pass


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)

