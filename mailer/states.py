"""The report life cycle as a visible state machine.

    new → acknowledged → accepted → scheduled (disclosure date set) → announced → published → closed
                       ↘ rejected / duplicate (→ reopen → acknowledged)

An action from a state not listed for it is an error, never a silent no-op.
``announced`` and ``published`` are reached when the schedule sends the
advance-disclosure and the security-release mail (``mailer.scheduler``).
"""

from __future__ import annotations

from mailer.models import Report
from mailer.models import ReportState as S

TRANSITIONS: dict[str, tuple[frozenset[S], S | None]] = {
    "accept": (frozenset({S.NEW, S.ACKNOWLEDGED}), S.ACCEPTED),
    "reject": (frozenset({S.NEW, S.ACKNOWLEDGED, S.ACCEPTED}), S.REJECTED),
    "duplicate": (frozenset({S.NEW, S.ACKNOWLEDGED, S.ACCEPTED}), S.DUPLICATE),
    "disclose": (frozenset({S.ACCEPTED, S.SCHEDULED}), S.SCHEDULED),
    "extend": (frozenset({S.SCHEDULED, S.ANNOUNCED}), None),  # the date moves, the state stays
    # taken by the schedule (mailer.scheduler), not by a command:
    "announce": (frozenset({S.SCHEDULED}), S.ANNOUNCED),  # the advance notice went out
    "publish": (frozenset({S.SCHEDULED, S.ANNOUNCED}), S.PUBLISHED),  # the release email went out
    "close": (frozenset({S.PUBLISHED, S.REJECTED, S.DUPLICATE}), S.CLOSED),
    "reopen": (frozenset({S.REJECTED, S.DUPLICATE, S.CLOSED}), S.ACKNOWLEDGED),
}

OPEN = frozenset({S.NEW, S.ACKNOWLEDGED, S.ACCEPTED, S.SCHEDULED, S.ANNOUNCED})


class InvalidTransition(ValueError):
    def __init__(self, action: str, state: str, allowed: frozenset[S]) -> None:
        self.action, self.state = action, state
        names = ", ".join(sorted(s.value for s in allowed))
        super().__init__(f"cannot {action} a report in state {state} (only from: {names})")


def apply(report: Report, action: str) -> tuple[str, str]:
    """Move ``report`` by ``action``; returns (old, new) state. :raises InvalidTransition:"""
    allowed, target = TRANSITIONS[action]
    old = report.state
    if S(old) not in allowed:
        raise InvalidTransition(action, old, allowed)
    if target is not None:
        report.state = target.value
    return old, report.state
