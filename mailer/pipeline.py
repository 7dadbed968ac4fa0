"""The processing pipeline: what happens to every stored message, as a table.

Every message takes the ``PREPARE`` steps; ``classify`` decides once what it
is, and the message then follows that kind's route. No step re-checks the
kind. All steps of one message run in one database transaction (the worker's):
the report, its events and its outgoing mail are committed together or not at
all. A step that raises is re-raised as :class:`StepError` naming it.

    parse → unwrap_openpgp → count_acks → inspect → classify ─┬─ new       → file_report, bind_keys, acknowledge, notify_maintainers
                                                              ├─ followup  → thread, bind_keys, notify_maintainers
                                                              ├─ bounce    → thread
                                                              ├─ autoreply → thread
                                                              ├─ command   → run_commands
                                                              ├─ sendkey   → answer_sendkey
                                                              └─ ignored   → ignore

The leading steps that only read (``UNLOCKED``: parsing, decryption, counting the
sender's recent acknowledgements, what the message's text and headers say) run
first, in a read transaction, so the write transaction (SQLite's single writer)
holds the lock only for the rest.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from mailer.classify import MessageKind
from mailer.errors import StepError
from mailer.filing import bind_keys, file_report, ignore, thread
from mailer.maintainers import run_commands
from mailer.prepare import classify, inspect, parse, unwrap_openpgp
from mailer.processing import Processing, Step
from mailer.replies import acknowledge, answer_sendkey, count_acks, notify_maintainers

PREPARE: tuple[Step, ...] = (parse, unwrap_openpgp, count_acks, inspect, classify)
#: the steps that only read (the message, the keyring, committed rows): run before the write transaction
UNLOCKED: frozenset[Step] = frozenset({parse, unwrap_openpgp, count_acks, inspect})

ROUTES: Mapping[MessageKind, tuple[Step, ...]] = {
    MessageKind.NEW: (file_report, bind_keys, acknowledge, notify_maintainers),
    MessageKind.FOLLOWUP: (thread, bind_keys, notify_maintainers),
    MessageKind.BOUNCE: (thread,),
    MessageKind.AUTOREPLY: (thread,),
    MessageKind.COMMAND: (run_commands,),
    MessageKind.SENDKEY: (answer_sendkey,),
    MessageKind.IGNORED: (ignore,),
}


@dataclass(frozen=True)
class Pipeline:
    """The steps every message takes, then one route per kind."""

    prepare: tuple[Step, ...] = PREPARE
    routes: Mapping[MessageKind, tuple[Step, ...]] = field(default_factory=lambda: dict(ROUTES))

    def run(self, ctx: Processing) -> None:
        self.read(ctx)
        self.write(ctx)

    def read(self, ctx: Processing) -> None:
        """The leading steps that need no database (parsing, decryption): outside the write lock."""
        _run_steps(ctx, self._leading())

    def write(self, ctx: Processing) -> None:
        """The rest of the preparation, then the route of the kind classification chose."""
        _run_steps(ctx, self.prepare[len(self._leading()):])
        assert ctx.kind is not None, "classification chose no route"
        _run_steps(ctx, self.routes[ctx.kind])

    def _leading(self) -> tuple[Step, ...]:
        count = 0
        while count < len(self.prepare) and self.prepare[count] in UNLOCKED:
            count += 1
        return self.prepare[:count]


def _run_steps(ctx: Processing, steps: tuple[Step, ...]) -> None:
    for step in steps:
        try:
            step(ctx)
        except Exception as exc:
            raise StepError(step.__name__, exc) from exc


DEFAULT = Pipeline()
