"""mailer.loop: the one service loop (run_every) and the one backoff."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math

import pytest

from mailer.loop import backoff, run_every

log = logging.getLogger("tests.loop")

GUARD = 5.0  # only against a hang: no assertion depends on how long anything takes
NEVER = 3600.0  # an interval that cannot elapse during a test: only a wake-up can start a pass


class Passes:
    """A pass that counts its calls and lets a test wait for the n-th one."""

    def __init__(self, fail_first: int = 0) -> None:
        self.calls = 0
        self.fail_first = fail_first
        self.changed = asyncio.Event()

    async def __call__(self) -> None:
        self.calls += 1
        self.changed.set()
        if self.calls <= self.fail_first:
            raise RuntimeError(f"pass {self.calls} broke")

    async def reach(self, n: int) -> None:
        async with asyncio.timeout(GUARD):
            while self.calls < n:
                self.changed.clear()
                await self.changed.wait()


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def test_a_pass_that_raises_keeps_the_loop_alive(caplog: pytest.LogCaptureFixture) -> None:
    """An exception from a pass is logged with its traceback and the next pass still runs."""
    passes = Passes(fail_first=2)
    task = asyncio.create_task(run_every(passes, every=0.01, name="unit", log=log))
    try:
        await passes.reach(3)
        assert not task.done()
    finally:
        await stop(task)
    failures = [r for r in caplog.records if r.name == "tests.loop" and r.levelno == logging.ERROR]
    assert len(failures) == 2
    assert all("unit pass failed" in r.getMessage() and r.exc_info for r in failures)


async def test_a_wake_runs_a_pass_promptly() -> None:
    """With an interval that cannot elapse, setting the wake event starts the next pass."""
    wake = asyncio.Event()
    passes = Passes()
    task = asyncio.create_task(run_every(passes, every=NEVER, wake=wake, name="unit", log=log))
    try:
        await passes.reach(1)
        wake.set()
        await passes.reach(2)
        wake.set()
        await passes.reach(3)
    finally:
        await stop(task)


async def test_a_wake_during_a_pass_is_not_lost() -> None:
    """The event is cleared before a pass, so a wake-up that arrives while it runs starts another one."""
    wake = asyncio.Event()
    calls = 0
    second = asyncio.Event()

    async def pass_() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            wake.set()  # new work arrives while the pass is running
        else:
            second.set()

    task = asyncio.create_task(run_every(pass_, every=NEVER, wake=wake, name="unit", log=log))
    try:
        async with asyncio.timeout(GUARD):
            await second.wait()
    finally:
        await stop(task)


async def test_without_a_wake_event_passes_repeat_on_the_interval() -> None:
    passes = Passes()
    task = asyncio.create_task(run_every(passes, every=0.01, name="unit", log=log))
    try:
        await passes.reach(3)
    finally:
        await stop(task)


async def test_every_may_be_read_after_each_pass() -> None:
    """A callable interval is asked once per pass (the IMAP poller's reconnect backoff)."""
    asked: list[int] = []
    passes = Passes()

    def every() -> float:
        asked.append(passes.calls)
        return 0.01

    task = asyncio.create_task(run_every(passes, every=every, name="unit", log=log))
    try:
        await passes.reach(3)
    finally:
        await stop(task)
    assert asked[:2] == [1, 2]


async def test_cancel_stops_the_loop_while_it_waits() -> None:
    passes = Passes()
    task = asyncio.create_task(run_every(passes, every=NEVER, wake=asyncio.Event(), name="unit", log=log))
    await passes.reach(1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled() and passes.calls == 1


async def test_cancel_stops_the_loop_during_a_pass() -> None:
    started = asyncio.Event()

    async def pass_() -> None:
        started.set()
        await asyncio.Future()  # never completes

    task = asyncio.create_task(run_every(pass_, every=0.01, name="unit", log=log))
    async with asyncio.timeout(GUARD):
        await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_swallowed_cancel_still_ends_the_loop() -> None:
    """A library that eats the CancelledError (CPython gh-86296) does not keep the loop running."""
    started = asyncio.Event()
    calls = 0

    async def pass_() -> None:
        nonlocal calls
        calls += 1
        started.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.Future()

    task = asyncio.create_task(run_every(pass_, every=NEVER, wake=asyncio.Event(), name="unit", log=log))
    async with asyncio.timeout(GUARD):
        await started.wait()
    task.cancel()
    async with asyncio.timeout(GUARD):
        await asyncio.wait({task})
    assert task.cancelled() and calls == 1


def test_backoff_doubles_from_the_base_up_to_the_cap() -> None:
    assert [backoff(n, base=1.0, cap=300.0) for n in range(1, 11)] == [1, 2, 4, 8, 16, 32, 64, 128, 256, 300]
    assert [backoff(n, base=30.0, cap=3600.0) for n in (1, 2, 3, 7, 8)] == [30, 60, 120, 1920, 3600]
    assert backoff(3, base=0.01, cap=math.inf) == pytest.approx(0.04)


def test_backoff_never_overflows() -> None:
    assert backoff(10_000, base=30.0, cap=3600.0) == 3600.0
    assert backoff(10_000, base=1.0, cap=math.inf) == math.inf


def test_backoff_counts_attempts_from_one() -> None:
    with pytest.raises(ValueError, match="from 1"):
        backoff(0, base=1.0, cap=10.0)
