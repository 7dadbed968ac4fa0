"""SQLite's writer turn (mailer.db.WriteLock): intake goes ahead of writers that come after it, and the holder re-enters.

Each WriteLock object stands for one process (its own thread lock and open files, so its
flock locks conflict with the others' as another process's would).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from mailer.db import WriteLock


def _in_thread(target: object) -> threading.Thread:
    thread = threading.Thread(target=target, daemon=True)  # type: ignore[arg-type]
    thread.start()
    return thread


def test_intake_waiting_for_the_turn_goes_before_a_writer_that_came_after_it(tmp_path: Path) -> None:
    database = tmp_path / "mailer.db"
    holder, intake, worker = WriteLock(database), WriteLock(database), WriteLock(database)
    order: list[str] = []
    release = threading.Event()

    def hold() -> None:
        with holder:
            order.append("holder")
            release.wait(10)

    def write_first() -> None:
        with intake.first():
            order.append("intake")

    def write() -> None:
        with worker:
            order.append("worker")

    threads = [_in_thread(hold)]
    while not order:
        time.sleep(0.01)
    threads.append(_in_thread(write_first))
    time.sleep(0.2)  # intake now holds the gate and waits for the writer's turn
    threads.append(_in_thread(write))
    time.sleep(0.2)
    assert order == ["holder"]
    # the worker waits at the gate, not in the queue for the turn (there it would hold its own thread lock)
    assert worker._threads.acquire(blocking=False)
    worker._threads.release()
    release.set()
    for thread in threads:
        thread.join(10)
    assert order == ["holder", "intake", "worker"]


def test_the_holder_enters_again_while_intake_waits(tmp_path: Path) -> None:
    """A writer re-entering its own turn must not wait at the gate (intake waits for that very turn)."""
    database = tmp_path / "mailer.db"
    holder, intake = WriteLock(database), WriteLock(database)
    entered = threading.Event()
    done: list[str] = []

    def hold() -> None:
        with holder:
            entered.set()
            time.sleep(0.2)  # intake queues meanwhile
            with holder:
                done.append("again")

    def write_first() -> None:
        with intake.first():
            done.append("intake")

    first = _in_thread(hold)
    entered.wait(10)
    second = _in_thread(write_first)
    first.join(10)
    second.join(10)
    assert done == ["again", "intake"]
