"""Worker processes: the pipeline of a message run in a process of its own (``worker.processes``).

The service process receives mail, sends mail and claims messages; with
``worker.processes = N`` the pipeline (parsing, filing, rendering, the
database writes) runs in N child processes, each with its own interpreter, so
the Python work of processing no longer shares one core (and one GIL) with
intake, the sender and its gpg calls. The guarantees are the thread mode's:
the parent claims a message, a child processes it in one transaction checked
against the parent's claim, and returns what the parent logs and counts.

A child runs two messages at once, each in a thread of its own
(:class:`ChildPool`, :data:`CHILD_THREADS`): while one waits for gpg to decrypt
or for the disk to sync its commit, the other one's Python runs. A process pool
of the standard library runs one call at a time per process, which left a child
idle for a third of each encrypted report. The calls in flight beyond that wait
in the child, so it never waits for the next claim.

A child that dies (killed, out of memory) breaks the pool: its messages'
transactions rolled back, the parent records the failures (each message is tried
again, and after ``max_attempts`` it is ``failed``), and starts a new pool.
A child never outlives the service: it asks the kernel for SIGKILL when its
parent dies (``PR_SET_PDEATHSIG``), and watches its parent besides.

A child is a fresh interpreter started by :mod:`subprocess` on a socket pair
(:func:`_bootstrap`), not by :mod:`multiprocessing`'s ``spawn``: that one also
starts a resource tracker process (13 MB of RSS for the service's lifetime,
for semaphores the pool never makes) and re-imports the parent's ``__main__``.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import itertools
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from mailer.config import Config

if TYPE_CHECKING:
    from mailer.worker import Outcome, Worker

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1

#: The thread switch interval of the service's processes (CPython's default is 5 ms). A thread holding
#: SQLite's write lock gives the GIL up at every statement and, with 5 ms, may wait that long to get it
#: back from a thread parsing another message, while every other writer waits on the lock (py-spy: the
#: worker threads spent a third of their time waiting for the write lock). bench/intake.py --encrypted:
#: 42 reports/s at 5 ms, 44-46 at 1 ms, in both processes.
SWITCH_INTERVAL = 0.001


def tune_switching() -> None:
    """Hand the GIL over sooner (:data:`SWITCH_INTERVAL`); the service and each worker process call it at start."""
    sys.setswitchinterval(SWITCH_INTERVAL)


_M_ARENA_MAX = -8  # glibc's mallopt parameter

#: glibc malloc arenas per process. By default each thread that allocates may get an arena of its own (up to
#: 8 per core), and memory freed in one is not reused by the others: in bench/flood.py six thread arenas of
#: the service process held 23 MB after 3 000 reports; capped, its peak over 10 000 was 19 MB lower. The GIL
#: serialises most allocations anyway.
MALLOC_ARENAS = 1


def limit_malloc_arenas() -> bool:
    """Cap glibc's malloc arenas (:data:`MALLOC_ARENAS`) before this process starts threads; whether it was done.

    ``MALLOC_ARENA_MAX`` in the environment (ops' choice) wins, and a C library without ``mallopt`` (musl) is
    left as it is."""
    if os.environ.get("MALLOC_ARENA_MAX"):
        return False
    try:
        return bool(ctypes.CDLL(ctypes.util.find_library("c")).mallopt(_M_ARENA_MAX, MALLOC_ARENAS))
    except (OSError, AttributeError):
        return False


@dataclass(frozen=True)
class ServiceKey:
    """What the outbox of a child needs of the service key (read once by the parent)."""

    fingerprint: str
    public_key: str
    autocrypt: str


_worker: Worker | None = None


#: Messages a worker process runs at once: one's Python runs while another waits for gpg or the disk; more
#: only contend for the GIL and the write lock. bench/intake.py (reports/s, 2 cores) with 1 / 2 / 4 threads:
#: plain 80, 80 / 74-78 / 60-66; encrypted 41, 41 / 44-50 / 42-50.
CHILD_THREADS = 2


def start_pool(config: Config, owner: str, key: ServiceKey, *, log_level: int, log_format: str) -> ChildPool:
    """``worker.processes`` fresh interpreters (nothing of the parent's threads or connections is copied),
    each running up to :data:`CHILD_THREADS` of the ``worker.concurrency`` messages in flight at once."""
    processes = config.worker.processes
    return ChildPool(processes, min(CHILD_THREADS, math.ceil(config.worker.concurrency / processes)),
                     (config, owner, key, os.getpid(), (log_level, log_format)))


#: What a child runs: read the parent's ``sys.path`` and then the pool's arguments from the socket (fd in argv[1]).
_BOOTSTRAP = ("import sys\n"
              "from multiprocessing.connection import Connection\n"
              "conn = Connection(int(sys.argv[1]))\n"
              "sys.path[:] = conn.recv()\n"
              "from mailer.workerproc import _bootstrap\n"
              "_bootstrap(conn)\n")


def _start_child(threads: int, init_args: tuple[Any, ...]) -> tuple[subprocess.Popen[bytes], Connection]:
    """A fresh interpreter (the parent's, with its flags) joined to us by a socket pair."""
    ours, theirs = socket.socketpair()
    try:
        process = subprocess.Popen(
            [sys.executable, *subprocess._args_from_interpreter_flags(),  # type: ignore[attr-defined]
             "-c", _BOOTSTRAP, str(theirs.fileno())],
            stdin=subprocess.DEVNULL, pass_fds=(theirs.fileno(),))
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    conn = Connection(ours.detach())
    try:
        conn.send(sys.path)
        conn.send((threads, init_args))
    except BaseException:  # it died at once: reaped before the error goes up
        conn.close()
        process.kill()
        process.wait()
        raise
    return process, conn


@dataclass
class _Child:
    process: subprocess.Popen[bytes]
    conn: Connection
    send_lock: threading.Lock
    running: dict[int, Future[Any]]


class ChildPool(Executor):
    """Child processes that each run up to ``threads`` calls at once (an :class:`~concurrent.futures.Executor`).

    A call is sent to the child with the fewest running and counts as running
    from then on (it cannot be cancelled: the child may have begun). Results
    come back as each call finishes. When a child dies, every call not yet
    answered fails with :class:`~concurrent.futures.process.BrokenProcessPool`,
    the other children are stopped and the pool refuses new calls, as the
    standard library's process pool does.
    """

    def __init__(self, processes: int, threads: int, init_args: tuple[Any, ...]) -> None:
        self._lock = threading.Lock()
        self._tasks = itertools.count()
        self._broken: str | None = None
        self._stopping = False
        self._children: list[_Child] = []
        for _ in range(processes):
            process, conn = _start_child(threads, init_args)
            child = _Child(process, conn, threading.Lock(), {})
            self._children.append(child)
            threading.Thread(target=self._results, args=(child,), name="worker-results", daemon=True).start()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        future.set_running_or_notify_cancel()
        with self._lock:
            if self._broken is not None:
                raise BrokenProcessPool(self._broken)
            if self._stopping:
                raise RuntimeError("cannot schedule new calls after shutdown")
            child = min(self._children, key=lambda c: len(c.running))
            task = next(self._tasks)
            child.running[task] = future
        try:
            with child.send_lock:
                child.conn.send((task, fn, args, kwargs))
        except (OSError, ValueError) as exc:  # the child is gone
            self._break(child, f"a worker process is gone ({exc})")
        return future

    def _results(self, child: _Child) -> None:
        """Per child: hand each answer to its future; at the end of the pipe, fail what is still unanswered."""
        while True:
            try:
                task, ok, value = child.conn.recv()
            except (EOFError, OSError):
                break
            with self._lock:
                future = child.running.pop(task, None)
            if future is None:
                continue
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)
        try:
            child.process.wait(1)  # the socket ends when the process does
        except subprocess.TimeoutExpired:  # it closed the socket and lingers: it is of no use any more
            child.process.kill()
            child.process.wait()  # reaped here, always: no zombie, no Popen collected while it runs
        self._break(child, f"a worker process exited (exit code {child.process.returncode})")

    def _break(self, gone: _Child, reason: str) -> None:
        """*gone* ended. Unless the pool was shutting down, the pool takes no more calls, each call not yet
        answered (by any child) fails and the other children are stopped; else only *gone*'s calls fail
        (none: a child stops once its calls are answered, unless it was killed meanwhile)."""
        with self._lock:
            if not self._stopping and self._broken is None:
                self._broken = reason
            broken = self._broken is not None
            failing = self._children if broken else [gone]
            unanswered = [f for c in failing for f in c.running.values()]
            for c in failing:
                c.running.clear()
        for future in unanswered:
            future.set_exception(BrokenProcessPool(reason))
        if broken:
            for c in self._children:
                if c.process.poll() is None:
                    c.process.kill()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Ask each child to stop once its running calls are done (none is cancelled: each has begun)."""
        with self._lock:
            self._stopping = True
        for child in self._children:
            try:
                with child.send_lock:
                    child.conn.send(None)
            except (OSError, ValueError):
                pass
        if wait:
            self.join()

    def join(self, timeout: float | None = None) -> None:
        """Wait (at most *timeout* seconds in all) for the children to exit."""
        until = None if timeout is None else time.monotonic() + timeout
        for child in self._children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.process.wait(None if until is None else max(0.0, until - time.monotonic()))

    @property
    def pids(self) -> list[int]:
        """The process ids of the children still running."""
        return [child.process.pid for child in self._children if child.process.poll() is None]


def _bootstrap(conn: Connection) -> None:
    """The child's entry point (:data:`_BOOTSTRAP`), its ``sys.path`` already the parent's."""
    limit_malloc_arenas()
    threads, init_args = conn.recv()
    _child_main(conn, threads, init_args)


def _child_main(conn: Connection, threads: int, init_args: tuple[Any, ...]) -> None:
    """A child: set up once, then run each call received in a thread, answering as each finishes."""
    _init(*init_args)
    send_lock = threading.Lock()

    def answer(task: int, future: Future[Any]) -> None:
        try:
            reply: tuple[int, bool, Any] = (task, True, future.result())
        except BaseException as exc:  # noqa: BLE001 - every failure goes back to the caller
            reply = (task, False, RuntimeError(f"{type(exc).__name__}: {exc}"))
        with send_lock:
            conn.send(reply)

    pool = ThreadPoolExecutor(threads, thread_name_prefix="worker")
    while True:
        try:
            call = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            break
        if call is None:
            break
        task, fn, args, kwargs = call
        pool.submit(fn, *args, **kwargs).add_done_callback(functools.partial(answer, task))
    pool.shutdown(wait=True)
    conn.close()


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
    tune_switching()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop (Ctrl-C reaches the group)
    from mailer import logs
    from mailer.atrest import install_configured
    from mailer.db import Database
    from mailer.openpgp import open_keyring
    from mailer.openpgp import operations as operations_module
    from mailer.openpgp import process as process_module
    from mailer.worker import Worker
    from outbound.outbox import Outbox

    logs.setup(logging.getLevelName(logging_[0]), logging_[1])
    process_module.GPG = _gpg_times  # type: ignore[attr-defined,assignment]  # the parent serves /metrics
    operations_module.GPG = _gpg_times  # type: ignore[attr-defined,assignment]  # the helper's decryptions, the agent's signatures
    install_configured(config)
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
