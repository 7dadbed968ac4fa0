"""The processing pipeline: what happens to every stored message, in order.

Each step is a function of :class:`mailer.workflow.Processing`; a step may end
the pipeline early (a command message, a key request, an ignored bounce).
"""

from __future__ import annotations

from mailer.maintainers import classify_commands, run_commands
from mailer.workflow import (
    Step,
    acknowledge,
    answer_sendkey,
    bind_keys,
    classify_message,
    file,
    notify_maintainers,
    parse,
    unwrap_openpgp,
)

PIPELINE: tuple[Step, ...] = (
    parse,
    unwrap_openpgp,
    classify_message,
    classify_commands,
    answer_sendkey,
    run_commands,
    file,
    bind_keys,
    acknowledge,
    notify_maintainers,
)
