"""Worker processes: the pipeline of a message run in a process of its own (``worker.processes``).

The service process receives mail, sends mail and claims messages; with
``worker.processes = N`` the pipeline (parsing, filing, rendering, the
database writes) runs in N child processes, each with its own interpreter, so
the Python work of processing no longer shares one core (and one GIL) with
intake, the sender and its gpg calls. The guarantees are the thread mode's:
the parent claims a message, a child processes it in one transaction checked
against the parent's claim, and returns what the parent logs and counts.

A child that dies (killed, out of memory) breaks the pool: its message's
transaction rolled back, the parent records the failure (the message is tried
again, and after ``max_attempts`` it is ``failed``), and starts a new pool.
A child never outlives the service: it asks the kernel for SIGKILL when its
parent dies (``PR_SET_PDEATHSIG``), and watches its parent besides.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import multiprocessing
import os
import signal
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from mailer.config import Config

if TYPE_CHECKING:
    from mailer.worker import Outcome, Worker

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class ServiceKey:
    """What the outbox of a child needs of the service key (read once by the parent)."""

    fingerprint: str
    public_key: str
    autocrypt: str


_worker: Worker | None = None


def start_pool(config: Config, owner: str, key: ServiceKey, *, log_level: int, log_format: str) -> ProcessPoolExecutor:
    """``worker.processes`` fresh interpreters (``spawn``: nothing of the parent's threads or connections is copied)."""
    return ProcessPoolExecutor(
        config.worker.processes, mp_context=multiprocessing.get_context("spawn"),
        initializer=_init, initargs=(config, owner, key, os.getpid(), (log_level, log_format)),
    )


def _die_with(parent: int) -> None:
    libc = ctypes.util.find_library("c")
    if libc:
        ctypes.CDLL(libc, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)

    def watch() -> None:  # belt and braces: a parent that died before prctl took effect
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _init(config: Config, owner: str, key: ServiceKey, parent: int, logging_: tuple[int, str]) -> None:
    global _worker  # noqa: PLW0603 - one worker per child process, built once
    _die_with(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop (Ctrl-C reaches the group)
    from mailer import logs
    from mailer.app import install_data_key, open_keyring
    from mailer.db import Database
    from mailer.openpgp import process as process_module
    from mailer.worker import Worker
    from outbound.outbox import Outbox

    logs.setup(logging.getLevelName(logging_[0]), logging_[1])
    process_module.GPG = _gpg_times  # type: ignore[attr-defined,assignment]  # the parent serves /metrics
    install_data_key(config)
    db = Database(config.database_url)
    db.owner = owner  # the claims are the parent's
    gpg = open_keyring(config)
    outbox = Outbox(config, gpg)
    outbox.fingerprint, outbox.public_key, outbox.autocrypt = key.fingerprint, key.public_key, key.autocrypt
    _worker = Worker(db, config, outbox, gpg=gpg)


class _GpgTimes:
    """Stands in for the ``mailer_gpg_seconds`` histogram in a child: the observations go back with the outcome."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, float]] = []

    def labels(self, operation: str) -> _Observe:
        return _Observe(self.seen, operation)


@dataclass(frozen=True)
class _Observe:
    seen: list[tuple[str, float]]
    operation: str

    def observe(self, seconds: float) -> None:
        self.seen.append((self.operation, seconds))


_gpg_times = _GpgTimes()


def process(inbound_id: int) -> Outcome:
    """Run in a child: one message, one transaction (:meth:`mailer.worker.Worker.process_one`)."""
    assert _worker is not None, "worker process not initialised"
    outcome = _worker.process_one(inbound_id)
    seen, _gpg_times.seen[:] = tuple(_gpg_times.seen), []
    return replace(outcome, gpg_seconds=seen)


def log_settings() -> tuple[int, str]:
    """The parent's log level and format, for the children (``text`` unless the JSON formatter is in use)."""
    from mailer.logs import JsonFormatter

    root = logging.getLogger()
    json = any(isinstance(handler.formatter, JsonFormatter) for handler in root.handlers)
    return root.level or logging.INFO, "json" if json else "text"
