"""Operations people run on the service's queues (``mailer failed retry``, ``mailer outbox retry|dismiss``).

Nothing here deletes a message: a retry puts it back in its queue, a dismissal
marks a failed outgoing mail as handled by a human, recorded as an event.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from mailer.db import Database
from mailer.errors import NotFound
from mailer.models import Event, InboundMessage, InboundState, OutboxMessage, OutboxState


def retry_failed(db: Database, inbound_id: int) -> None:
    """Put a failed (or retrying) received message back in the worker's queue now."""
    with db.session() as session:
        inbound = session.get(InboundMessage, inbound_id)
        if inbound is None or inbound.state not in (InboundState.FAILED.value, InboundState.RETRY.value):
            raise NotFound(f"no failed message with id {inbound_id}")
        inbound.state = InboundState.RETRY.value
        inbound.next_attempt_at = None
        inbound.attempts = 0


def retry_outgoing(db: Database, outbox_id: int, *, now: datetime) -> None:
    """Queue a failed (or waiting) outgoing message for delivery now, with a fresh deadline."""
    with db.session() as session:
        row = session.get(OutboxMessage, outbox_id)
        if row is None or row.state == OutboxState.SENT.value:
            raise NotFound(f"no unsent outgoing message with id {outbox_id}")
        row.state = OutboxState.PENDING.value
        row.next_attempt_at = now
        row.deliver_until = max(row.deliver_until, now + timedelta(hours=1))


def dismiss_outgoing(db: Database, outbox_id: int, *, now: datetime, by: str) -> None:
    """A failed outgoing mail was dealt with by a human: it stops counting as a problem."""
    with db.session() as session:
        row = session.get(OutboxMessage, outbox_id)
        if row is None or row.state != OutboxState.FAILED.value:
            raise NotFound(f"no failed outgoing message with id {outbox_id}")
        row.state = OutboxState.DISMISSED.value
        session.add(Event(report_id=row.report_id, kind="outbox.dismissed", actor=by, at=now,
                          detail={"outbox_id": row.id, "last_error": row.last_error}))


def received_by_kind(session: Session, since: datetime) -> dict[str, int]:
    """Received messages per classification since ``since``: what was filed, and what was not and as what."""
    query = (select(InboundMessage.classification, func.count(InboundMessage.id))
             .where(InboundMessage.received_at >= since).group_by(InboundMessage.classification))
    return {str(kind or "unprocessed"): int(n) for kind, n in session.execute(query)}
