"""Retention: what is kept no longer (``[retention]``; 0 keeps everything, the default).

- ``raw_messages_days``: the raw bytes of the messages of a report closed
  (closed, rejected, duplicate) that many days ago are emptied; the parsed
  text, attachments and events stay.
- ``closed_reports_days``: a report closed that many days ago is purged
  entirely: its messages, attachments, reporter keys, embargo members, the raw
  bytes of its received and sent mail, its subject, fields and reporter. The
  report row stays as a tombstone with its tracking id (numbers are never
  reused) and its events, plus one ``retention.report_purged`` event.

"Closed N days ago" is the report's ``updated_at``; the purge keeps it as it was.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, or_, select, update
from sqlalchemy.orm import Session

from mailer.config import Config
from mailer.db import Database
from mailer.logs import event as log_event
from mailer.models import (
    Attachment,
    EmbargoMember,
    Event,
    InboundMessage,
    OutboxMessage,
    Report,
    ReportKey,
    ReportMessage,
    ReportState,
)

log = logging.getLogger(__name__)

CLOSED = (ReportState.CLOSED.value, ReportState.REJECTED.value, ReportState.DUPLICATE.value)


def _inbound_ids(session: Session, report_id: int) -> list[int]:
    via_messages = select(ReportMessage.inbound_id).where(ReportMessage.report_id == report_id,
                                                          ReportMessage.inbound_id.is_not(None))
    query = select(InboundMessage.id).where(or_(InboundMessage.report_id == report_id, InboundMessage.id.in_(via_messages)))
    return list(session.scalars(query))


def _keep_updated_at(session: Session, report: Report, **values: Any) -> None:
    """Change report columns without touching ``updated_at`` (the retention clock)."""
    session.execute(update(Report).where(Report.id == report.id).values(updated_at=Report.updated_at, **values)
                    .execution_options(synchronize_session=False))


def purge_raw(session: Session, report: Report, now: datetime) -> int:
    ids = _inbound_ids(session, report.id)
    if ids:
        session.execute(update(InboundMessage).where(InboundMessage.id.in_(ids)).values(raw=b"")
                        .execution_options(synchronize_session=False))
    _keep_updated_at(session, report, flags={**dict(report.flags), "raw_purged": now.isoformat()})
    session.add(Event(report_id=report.id, kind="retention.raw_purged", at=now, detail={"messages": len(ids)}))
    return len(ids)


def purge_report(session: Session, report: Report, now: datetime) -> None:
    message_ids = select(ReportMessage.id).where(ReportMessage.report_id == report.id)
    inbound = _inbound_ids(session, report.id)
    session.execute(delete(Attachment).where(Attachment.report_message_id.in_(message_ids))
                    .execution_options(synchronize_session=False))
    session.execute(delete(ReportMessage).where(ReportMessage.report_id == report.id)
                    .execution_options(synchronize_session=False))
    session.execute(delete(ReportKey).where(ReportKey.report_id == report.id).execution_options(synchronize_session=False))
    session.execute(delete(EmbargoMember).where(EmbargoMember.report_id == report.id)
                    .execution_options(synchronize_session=False))
    if inbound:
        session.execute(update(InboundMessage).where(InboundMessage.id.in_(inbound))
                        .values(raw=b"", mail_from="", peer="").execution_options(synchronize_session=False))
    session.execute(update(OutboxMessage).where(OutboxMessage.report_id == report.id).values(raw=b"")
                    .execution_options(synchronize_session=False))
    _keep_updated_at(session, report, reporter="", subject="", fields={}, missing_fields=[],
                     flags={"purged": now.isoformat()}, affected=None)
    session.add(Event(report_id=report.id, kind="retention.report_purged", at=now, detail={"messages": len(inbound)}))


def purge(db: Database, config: Config, *, now: datetime, dry_run: bool = False) -> dict[str, list[str]]:
    """Apply ``[retention]``; returns the tracking ids whose raw bytes, and those entirely, were purged."""
    done: dict[str, list[str]] = {"raw_purged": [], "reports_purged": []}
    days_reports, days_raw = config.retention.closed_reports_days, config.retention.raw_messages_days
    if not days_reports and not days_raw:
        return done
    with db.session() as session:
        if days_reports:
            cutoff = now - timedelta(days=days_reports)
            for report in session.scalars(select(Report).where(Report.state.in_(CLOSED), Report.updated_at < cutoff)
                                          .order_by(Report.id)).all():
                if "purged" in (report.flags or {}):
                    continue
                done["reports_purged"].append(report.tracking_id)
                if not dry_run:
                    purge_report(session, report, now)
        if days_raw:
            cutoff = now - timedelta(days=days_raw)
            for report in session.scalars(select(Report).where(Report.state.in_(CLOSED), Report.updated_at < cutoff)
                                          .order_by(Report.id)).all():
                flags = report.flags or {}
                if "purged" in flags or "raw_purged" in flags or report.tracking_id in done["reports_purged"]:
                    continue
                done["raw_purged"].append(report.tracking_id)
                if not dry_run:
                    purge_raw(session, report, now)
    for tracking_id in done["reports_purged"]:
        log_event(log, "retention.report_purged", tracking_id=tracking_id, dry_run=dry_run or None)
    for tracking_id in done["raw_purged"]:
        log_event(log, "retention.raw_purged", tracking_id=tracking_id, dry_run=dry_run or None)
    return done
