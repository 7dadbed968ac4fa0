"""The worker: runs the pipeline over stored messages, one transaction each.

A message whose step fails is rolled back, marked ``retry`` with the step name
and error, and tried again after a backoff; after ``max_attempts`` it is
``failed`` and waits for ``mailer failed retry ID``. It never blocks the
messages behind it, and it is never deleted.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from datetime import timedelta

from sqlalchemy import or_, select

from mailer.clock import SYSTEM, Clock
from mailer.config import Config
from mailer.db import Database
from mailer.errors import StepError
from mailer.loop import backoff, run_every
from mailer.models import InboundMessage, InboundState
from mailer.openpgp import OpenPGP
from mailer.outgoing import Postman
from mailer.pipeline import DEFAULT, Pipeline
from mailer.processing import Processing

log = logging.getLogger(__name__)

BATCH = 50


class Worker:
    def __init__(
        self,
        db: Database,
        config: Config,
        postman: Postman,
        *,
        gpg: OpenPGP,
        clock: Clock = SYSTEM,
        pipeline: Pipeline = DEFAULT,
        on_done: Callable[[], None] | None = None,
        intake_busy: Callable[[], bool] | None = None,
    ) -> None:
        self.db = db
        self.config = config
        self.postman = postman
        self.gpg = gpg
        self.clock = clock
        self.pipeline = pipeline
        self.on_done = on_done
        self.intake_busy = intake_busy
        self.wake = asyncio.Event()
        self._current: asyncio.Future[bool] | None = None


    async def finish(self) -> None:
        """Wait for the message being processed, if any (called at shutdown after the loop is cancelled)."""
        if self._current is not None and not self._current.done():
            await asyncio.wait({self._current})

    def due(self) -> list[int]:
        now = self.clock()
        with self.db.session() as session:
            query = (
                select(InboundMessage.id)
                .where(InboundMessage.state.in_([InboundState.RECEIVED.value, InboundState.RETRY.value]))
                .where(or_(InboundMessage.next_attempt_at.is_(None), InboundMessage.next_attempt_at <= now))
                .order_by(InboundMessage.id)
                .limit(BATCH)
            )
            return list(session.scalars(query))

    def process(self, inbound_id: int) -> bool:
        """Run the pipeline for one message; True when it completed."""
        try:
            with self.db.session() as session:
                inbound = session.get(InboundMessage, inbound_id)
                if inbound is None or inbound.state not in (InboundState.RECEIVED.value, InboundState.RETRY.value):
                    return False
                ctx = Processing(session, self.config, self.postman, self.gpg, inbound, self.clock())
                self.pipeline.run(ctx)
                inbound.state = InboundState.DONE.value
                inbound.processed_at = ctx.now
                inbound.failed_step = inbound.last_error = None
            return True
        except StepError as exc:
            self._record_failure(inbound_id, exc.step, exc)
        except Exception as exc:  # noqa: BLE001 - e.g. the database went away mid-commit
            self._record_failure(inbound_id, "commit", exc)
        return False

    def _record_failure(self, inbound_id: int, step: str, exc: BaseException) -> None:
        log.error("message %s failed in step %s: %s", inbound_id, step, exc, exc_info=exc)
        with self.db.session() as session:
            inbound = session.get(InboundMessage, inbound_id)
            if inbound is None:
                return
            inbound.attempts += 1
            inbound.failed_step = step
            inbound.last_error = f"{type(exc).__name__}: {exc}"[:4000]
            if inbound.attempts >= self.config.worker.max_attempts:
                inbound.state = InboundState.FAILED.value
                inbound.next_attempt_at = None
            else:
                delay = backoff(inbound.attempts, base=self.config.worker.retry_base_seconds, cap=math.inf)
                inbound.state = InboundState.RETRY.value
                inbound.next_attempt_at = self.clock() + timedelta(seconds=delay)

    async def drain(self) -> int:
        """Process every message due now, each at most once per call; returns how many completed."""
        done = 0
        seen: set[int] = set()
        while ids := [i for i in await asyncio.to_thread(self.due) if i not in seen]:
            for inbound_id in ids:
                seen.add(inbound_id)
                await self._yield_to_intake()
                # shielded: a cancel (shutdown) lets the message's transaction finish instead of abandoning the thread
                self._current = asyncio.ensure_future(asyncio.to_thread(self.process, inbound_id))
                done += await asyncio.shield(self._current)
            if self.on_done is not None:
                self.on_done()
        return done

    async def _yield_to_intake(self, limit: float = 2.0) -> None:
        """Let pending DATA commits go first: a sender waiting for 250 matters more than an ack's latency."""
        if self.intake_busy is None:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        while self.intake_busy() and loop.time() < deadline:
            await asyncio.sleep(0.005)

    async def run(self) -> None:
        """Process on wake-up (new mail) or every ``poll_seconds``; a failed pass (database away) is logged and retried."""
        await run_every(self.drain, every=self.config.worker.poll_seconds, wake=self.wake, name="worker", log=log)

