"""The worker: runs the pipeline over stored messages, several at once, one transaction each.

Messages are *claimed*, not selected (:func:`mailer.db.claim`): several
instances on one PostgreSQL database share the stored messages with no
duplicate and no loss, and the claims of an instance that died expire after
``worker.lease_seconds``. The processing transaction locks the message row and
checks the claim is still ours, so a message is filed once even when a lease
ran out under a slow run. On SQLite (one instance) no claim is written
(:func:`mailer.db.claim_for`): the messages in flight here are all there are.

Up to ``worker.concurrency`` messages are processed at once, each in its own
thread and transaction (their gpg calls are subprocesses, so they use more than
one core), or with ``worker.processes`` in worker processes of their own
(:mod:`mailer.workerproc`). Parsing, decryption and the other reads run
before the write transaction (:meth:`mailer.pipeline.Pipeline.read`). The pick is fair: envelope senders take turns (round-robin: the
sender served longest ago, or never, goes first, with its oldest due message),
and never two messages of one sender are processed at once (here or in another
instance), so one sender's flood cannot starve the others: a report from
anyone else waits at most one round.

A message whose step fails is rolled back, marked ``retry`` with the step name
and error, and tried again after a backoff; after ``max_attempts`` it is
``failed`` and waits for ``mailer failed retry ID``. It never blocks the
messages behind it, and it is never deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import and_, bindparam, func, or_, select

from mailer import logs, workerproc
from mailer.clock import SYSTEM, Clock
from mailer.config import Config
from mailer.db import Database, claim_for, claimable, release_claims
from mailer.errors import StepError
from mailer.loop import backoff, run_every, yield_to_intake
from mailer.metrics import FAILURES, GPG
from mailer.models import InboundMessage, InboundState
from mailer.openpgp import OpenPGP
from mailer.outgoing import Postman
from mailer.pipeline import DEFAULT, Pipeline
from mailer.processing import Processing

log = logging.getLogger(__name__)

WAITING = (InboundState.RECEIVED.value, InboundState.RETRY.value)
#: what may have changed of a message between the read phase and the write (built once: run for every message)
_CURRENT = (select(InboundMessage.state, InboundMessage.claimed_by).where(InboundMessage.id == bindparam("id"))
            .with_for_update())


@dataclass(frozen=True)
class Outcome:
    """What processing one message did, for the process that logs and counts (it may not be the one that processed)."""

    inbound_id: int
    completed: bool = False
    summary: dict[str, Any] | None = None
    failed_step: str | None = None  # a failure was recorded (retry or failed)
    #: gpg calls made in a worker process: (operation, seconds), for the service's mailer_gpg_seconds
    gpg_seconds: tuple[tuple[str, float], ...] = ()


def report(outcome: Outcome) -> None:
    """The message's log line and counters, after its commit."""
    for operation, seconds in outcome.gpg_seconds:
        GPG.labels(operation).observe(seconds)
    if outcome.summary is not None:
        logs.processed(dict(outcome.summary))
    if outcome.failed_step is not None:
        FAILURES.labels(outcome.failed_step).inc()


class Worker:
    #: the senders whose oldest due message is considered per pick (the oldest heads first). A pick takes
    #: at most ``worker.concurrency`` messages; for 800 waiting messages of distinct senders the heads query
    #: took 3.9 ms with 500 heads, 2.2 ms with 64 (the service process spends ~10 % of its samples in
    #: claims under bench/intake.py --encrypted). A flood's sender has one head, the oldest: it is always
    #: among them, and served after those not served since.
    SENDERS_CONSIDERED = 64

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
        self.concurrency = config.worker.concurrency
        self.lease = config.worker.lease_seconds
        #: False once shutdown began: nothing new is claimed
        self.accepting = True
        self._inflight: dict[asyncio.Future[Outcome], tuple[int, str]] = {}
        self._served: dict[str, int] = {}  # sender -> the turn it was last served in (round-robin)
        self._turn = 0
        self._executor: ThreadPoolExecutor | None = None
        #: worker processes (``worker.processes``): made on first use, remade after one died
        self._processes: Callable[[], Executor] | None = None
        self._process_pool: Executor | None = None

    # ------------------------------------------------------------------ claiming

    def claim(self, limit: int, *, busy: frozenset[str] = frozenset(), skip: frozenset[int] = frozenset()) -> list[tuple[int, str]]:
        """Claim up to ``limit`` due messages, senders in turn; ``(id, mail_from)`` of each one got.

        ``busy``: senders with a message in flight here; ``skip``: ids not to take again in this pass.
        """
        if limit <= 0:
            return []
        now = self.clock()
        due = and_(
            InboundMessage.state.in_(WAITING),
            or_(InboundMessage.next_attempt_at.is_(None), InboundMessage.next_attempt_at <= now),
            claimable(InboundMessage, now),
        )
        # senders with a message claimed anywhere (this instance or another): one at a time per sender
        held = select(InboundMessage.mail_from).where(InboundMessage.state.in_(WAITING), InboundMessage.claimed_until >= now)
        head = func.min(InboundMessage.id)
        query = select(head, InboundMessage.mail_from).where(due, InboundMessage.mail_from.not_in(held))
        if busy:
            query = query.where(InboundMessage.mail_from.not_in(sorted(busy)))
        if skip:
            query = query.where(InboundMessage.id.not_in(sorted(skip)))
        query = query.group_by(InboundMessage.mail_from).order_by(head).limit(self.SENDERS_CONSIDERED)
        # the choice is read outside the write lock; the claim re-checks it (a row or sender taken meanwhile is skipped)
        with self.db.reading() as session:
            heads = {id_: sender for id_, sender in session.execute(query)}
        # round-robin: the sender served longest ago (or never) first, then the oldest message
        candidates = sorted(heads, key=lambda id_: (self._served.get(heads[id_], 0), id_))[:limit]
        if not candidates:
            return []
        got = claim_for(self.db, InboundMessage, candidates, now=now, lease=self.lease,
                        where=and_(InboundMessage.state.in_(WAITING), InboundMessage.mail_from.not_in(held)))
        for id_ in got:
            self._turn += 1
            self._served[heads[id_]] = self._turn
        if len(self._served) > 4 * self.SENDERS_CONSIDERED:  # forget the senders served longest ago
            for sender, _ in sorted(self._served.items(), key=lambda item: item[1])[: len(self._served) // 2]:
                del self._served[sender]
        return [(id_, heads[id_]) for id_ in sorted(got, key=candidates.index)]

    def due(self) -> list[int]:
        """Ids of the messages due now, whoever holds them (for inspection; the worker claims)."""
        now = self.clock()
        with self.db.session() as session:
            query = (
                select(InboundMessage.id)
                .where(InboundMessage.state.in_(WAITING))
                .where(or_(InboundMessage.next_attempt_at.is_(None), InboundMessage.next_attempt_at <= now))
                .order_by(InboundMessage.id)
            )
            return list(session.scalars(query))

    # ------------------------------------------------------------------ one message

    def process_one(self, inbound_id: int) -> Outcome:
        """The pipeline for one message we claimed, in one transaction (here or in a worker process)."""
        try:
            # parsing and decryption first, outside the write transaction (SQLite has one writer)
            with self.db.reading() as session:
                inbound = session.get(InboundMessage, inbound_id)
                if inbound is None or not self._ours(inbound.state, inbound.claimed_by, inbound_id):
                    return Outcome(inbound_id)
                read = Processing(session, self.config, self.postman, self.gpg, inbound, self.clock())
                self.pipeline.read(read)
            with self.db.session() as session:
                # the row lock: a second instance whose claim raced ours waits here, then sees it done.
                # Only what may have changed since the read phase is read again (the state, the claim);
                # the row itself is the read phase's, joined to this session as it is (no second load)
                current = session.execute(_CURRENT, {"id": inbound_id}).one_or_none()
                if current is None or not self._ours(current.state, current.claimed_by, inbound_id):
                    return Outcome(inbound_id)
                inbound = read.inbound
                session.add(inbound)
                ctx = read.carried_to(session, inbound, self.clock())
                self.pipeline.write(ctx)
                inbound.state = InboundState.DONE.value
                inbound.processed_at = ctx.now
                inbound.failed_step = inbound.last_error = None
                inbound.claimed_by = inbound.claimed_until = None
            # after the commit (its flush gave every event and outgoing mail its id); nothing is expired on commit
            return Outcome(inbound_id, completed=True, summary=logs.summarise(ctx))
        except StepError as exc:
            return self._record_failure(inbound_id, exc.step, exc)
        except Exception as exc:  # noqa: BLE001 - e.g. the database went away mid-commit
            return self._record_failure(inbound_id, "commit", exc)

    def _ours(self, state: str, claimed_by: str | None, inbound_id: int) -> bool:
        """Whether the message is still waiting and not taken over by another instance."""
        if state not in WAITING:
            return False
        if claimed_by not in (None, self.db.owner):
            log.info("message %s was taken over by %s (our claim expired); skipped", inbound_id, claimed_by)
            return False
        return True

    def _record_failure(self, inbound_id: int, step: str, exc: BaseException) -> Outcome:
        log.error("message %s failed in step %s: %s", inbound_id, step, exc, exc_info=exc)
        outcome = Outcome(inbound_id, failed_step=step)
        with self.db.session() as session:
            inbound = session.get(InboundMessage, inbound_id, with_for_update=True)
            if inbound is None or inbound.state not in WAITING or inbound.claimed_by not in (None, self.db.owner):
                return outcome
            inbound.attempts += 1
            inbound.failed_step = step
            inbound.last_error = f"{type(exc).__name__}: {exc}"[:4000]
            inbound.claimed_by = inbound.claimed_until = None
            if inbound.attempts >= self.config.worker.max_attempts:
                inbound.state = InboundState.FAILED.value
                inbound.next_attempt_at = None
            else:
                delay = backoff(inbound.attempts, base=self.config.worker.retry_base_seconds, cap=math.inf)
                inbound.state = InboundState.RETRY.value
                inbound.next_attempt_at = self.clock() + timedelta(seconds=delay)
        return outcome

    def release(self, ids: list[int]) -> None:
        """Hand back claims we will not process (shutdown)."""
        if ids:
            release_claims(self.db, InboundMessage, ids)

    # ------------------------------------------------------------------ the loop

    def use_processes(self, pool: Callable[[], Executor], processes: int) -> None:
        """Process in worker processes (:mod:`mailer.workerproc`), ``pool()`` making the pool, instead of threads.

        ``worker.concurrency`` messages are in flight, shared among the
        processes, each running two at once (:data:`mailer.workerproc.CHILD_THREADS`).
        """
        self._processes = pool
        self.concurrency = max(self.config.worker.concurrency, processes)

    def process_ids(self) -> list[int]:
        """The worker processes running now (none in thread mode, or before the first message)."""
        pool = self._process_pool
        return pool.pids if isinstance(pool, workerproc.ChildPool) else []

    def _run_one(self, loop: asyncio.AbstractEventLoop, inbound_id: int) -> asyncio.Future[Outcome]:
        if self._processes is None:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self.concurrency, thread_name_prefix="worker")
            return loop.run_in_executor(self._executor, self.process_one, inbound_id)
        if self._process_pool is not None:
            try:
                return loop.run_in_executor(self._process_pool, workerproc.process, inbound_id)
            except BrokenProcessPool:  # a process died while idle: the pool refuses new work
                log.error("a worker process died; starting new ones")
                self._process_pool.shutdown(wait=False, cancel_futures=True)
        self._process_pool = self._processes()
        return loop.run_in_executor(self._process_pool, workerproc.process, inbound_id)

    def _lost(self, inbound_id: int, exc: BaseException) -> Outcome:
        """A worker process died with the message (its transaction rolled back): a failed attempt; a new pool."""
        pool, self._process_pool = self._process_pool, None
        if pool is not None:
            log.error("a worker process died (%s); starting new ones", exc or type(exc).__name__)
            pool.shutdown(wait=False, cancel_futures=True)
        return self._record_failure(inbound_id, "worker process", exc)

    async def drain(self) -> int:
        """Process every message due now, up to ``concurrency`` at once; returns how many completed.

        A message that fails is not taken again in the same call. Returns when
        nothing is claimable and nothing is in flight.
        """
        loop = asyncio.get_running_loop()
        done = 0
        failed: set[int] = set()
        while True:
            free = self._claimable()
            if free:
                await yield_to_intake(self.intake_busy)
                busy = frozenset(sender for _, sender in self._inflight.values())
                self.wake.clear()
                got = await asyncio.to_thread(self.claim, free, busy=busy, skip=frozenset(failed))
                if not self.accepting:  # the shutdown began while we claimed: hand them back, start nothing
                    await asyncio.to_thread(self.release, [inbound_id for inbound_id, _ in got])
                    got = []
                for inbound_id, sender in got:
                    self._inflight[self._run_one(loop, inbound_id)] = (inbound_id, sender)
            if not self._inflight:
                return done
            # a shutdown cancel lets the messages' transactions finish (see finish()) instead of abandoning them
            # new mail wakes us only while a slot is free (else the wake-up would spin)
            room = bool(self._claimable())
            waker: asyncio.Future[Any] = asyncio.ensure_future(self.wake.wait() if room else asyncio.Event().wait())
            try:
                finished, _ = await asyncio.wait({*self._inflight, waker}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waker.cancel()
            completed = 0
            for future in finished:
                if future is waker:
                    continue
                entry = self._inflight.pop(future, None)
                if entry is None:  # finish() (the shutdown) took it meanwhile and reported it
                    continue
                inbound_id, _sender = entry
                if future.cancelled():  # queued behind a worker process that died, never started: take it again
                    await asyncio.to_thread(self.release, [inbound_id])
                    continue
                try:
                    outcome = future.result()
                except Exception as exc:  # noqa: BLE001 - a worker process died (BrokenProcessPool)
                    outcome = await asyncio.to_thread(self._lost, inbound_id, exc)
                report(outcome)
                if outcome.completed:
                    completed += 1
                else:
                    failed.add(inbound_id)
            done += completed
            if completed and self.on_done is not None:
                self.on_done()

    def _claimable(self) -> int:
        """How many messages to claim now: the free slots, but while others are in flight only once at
        least half the slots are free (a claim costs two transactions; messages are claimed two or more
        at a time under load, one at a time when idle)."""
        free = self.concurrency - len(self._inflight)
        least = max(1, self.concurrency // 2) if self._inflight else 1
        return free if self.accepting and free >= least else 0

    async def finish(self, timeout: float | None = None) -> int:
        """Stop claiming and wait (at most ``timeout`` s) for the messages in flight; returns how many are still running."""
        self.accepting = False
        loop = asyncio.get_running_loop()
        until = None if timeout is None else loop.time() + timeout
        if self._inflight:
            await asyncio.wait(set(self._inflight), timeout=timeout)
        for future in [f for f in self._inflight if f.done()]:
            del self._inflight[future]
            if future.cancelled():  # never started: the message waits, unclaimed, for the next start
                continue
            with contextlib.suppress(Exception):
                report(future.result())
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
        if self._process_pool is not None:
            pool, self._process_pool = self._process_pool, None
            # idle processes exit now; one still busy past the grace period finishes its message, then exits.
            # Their exit is waited for within the timeout, not past it: they die with the service anyway.
            pool.shutdown(wait=False, cancel_futures=True)
            if not self._inflight and isinstance(pool, workerproc.ChildPool):
                await asyncio.to_thread(pool.join, None if until is None else max(0.0, until - loop.time()))
        if self._inflight:
            log.warning("%d message(s) still being processed at the end of the shutdown grace period; "
                        "their claims expire after %.0f s", len(self._inflight), self.lease)
        return len(self._inflight)

    async def run(self) -> None:
        """Process on wake-up (new mail) or every ``poll_seconds``; a failed pass (database away) is logged and retried."""
        await run_every(self.drain, every=self.config.worker.poll_seconds, wake=self.wake, name="worker", log=log)
