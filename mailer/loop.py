"""The one service loop and the one backoff.

Every background component (worker, sender, reminders, the IMAP poller's
reconnects) runs a *pass* over and over: at once when woken, otherwise every
few seconds. A pass that raises is logged and the loop goes on; a cancel
stops the loop promptly, even when a library swallowed it on the way
(CPython gh-86296, 3.11: ``asyncio.wait_for`` can eat a cancel; this module
waits with ``asyncio.timeout`` and checks ``Task.cancelling()``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Awaitable, Callable


def backoff(attempt: int, *, base: float, cap: float) -> float:
    """Seconds to wait before retry number ``attempt`` (1 for the first retry): ``base * 2**(attempt-1)``, at most ``cap``."""
    if attempt < 1:
        raise ValueError(f"attempt counts from 1, got {attempt}")
    if base < 0 or cap < 0:
        raise ValueError("base and cap must not be negative")
    try:
        delay = base * 2.0 ** (attempt - 1)
    except OverflowError:
        return cap
    return cap if math.isnan(delay) else min(delay, cap)


async def yield_to_intake(busy: Callable[[], bool] | None, limit: float = 0.5) -> None:
    """Let pending DATA commits go first, for a moment (at most ``limit`` s): a sender waiting for 250 matters
    more than an ack's latency, but a flood arriving for minutes must not hold back everyone else's mail."""
    if busy is None:
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while busy() and loop.time() < deadline:
        await asyncio.sleep(0.005)


async def run_every(
    pass_: Callable[[], Awaitable[object]],
    *,
    every: float | Callable[[], float],
    wake: asyncio.Event | None = None,
    name: str,
    log: logging.Logger,
) -> None:
    """Run ``pass_`` now, then again whenever ``wake`` is set or ``every`` seconds pass, until cancelled.

    ``every`` may be a callable, read after each pass (a backoff that depends on the pass).
    ``wake`` is cleared *before* each pass, so a wake-up that arrives during a pass is not
    lost. An ``Exception`` from a pass is logged with its traceback and the loop goes on.
    A cancel propagates; when something inside a pass swallowed it, the loop notices
    (``Task.cancelling()``) right after the pass and raises :class:`asyncio.CancelledError` itself.
    """
    me = asyncio.current_task()
    while True:
        if wake is not None:
            wake.clear()
        try:
            await pass_()
        except Exception:
            log.exception("%s pass failed; retrying", name)
        if me is not None and me.cancelling():
            raise asyncio.CancelledError  # our cancel was swallowed on the way (gh-86296): honour it now
        delay = every() if callable(every) else every
        if wake is None:
            await asyncio.sleep(delay)
            continue
        # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel (CPython gh-86296).
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await wake.wait()
