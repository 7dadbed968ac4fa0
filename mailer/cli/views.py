"""What the CLI prints: the ``--json`` row shapes (a contract, see ``mailer.cli``) and the helpers every command uses."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any, TypeAlias

from sqlalchemy import select
from sqlalchemy.orm import Session

from mailer import app
from mailer.config import Config
from mailer.db import Database
from mailer.errors import NotFound
from mailer.models import InboundMessage, OutboxMessage, Report
from mailer.openpgp import OpenPGP, open_keyring

Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def report_summary(report: Report) -> dict[str, Any]:
    return {
        "id": report.tracking_id,
        "state": report.state,
        "reporter": report.reporter,
        "subject": report.subject,
        "created_at": iso(report.created_at),
        "updated_at": iso(report.updated_at),
        "acknowledged_at": iso(report.acknowledged_at),
        "missing_fields": list(report.missing_fields),
        "flags": dict(report.flags),
    }


def report_detail(report: Report) -> dict[str, Any]:
    data = report_summary(report)
    data["fields"] = dict(report.fields)
    data["messages"] = [
        {
            "id": m.id,
            "direction": m.direction,
            "kind": m.kind,
            "message_id": m.message_id,
            "sender": m.sender,
            "created_at": iso(m.created_at),
            "body_text": m.body_text,
            "attachments": [
                {"filename": a.filename, "content_type": a.content_type, "size": a.size, "kept": not a.truncated}
                for a in m.attachments
            ],
        }
        for m in report.messages
    ]
    data["events"] = [
        {"id": e.id, "at": iso(e.at), "kind": e.kind, "actor": e.actor, "detail": e.detail} for e in report.events
    ]
    return data


def outbox_row(row: OutboxMessage, tracking: dict[int, str]) -> dict[str, Any]:
    return {
        "id": row.id,
        "kind": row.kind,
        "state": row.state,
        "report": tracking.get(row.report_id) if row.report_id else None,
        "message_id": row.message_id,
        "to": list(row.rcpt_tos),
        "attempts": row.attempts,
        "created_at": iso(row.created_at),
        "next_attempt_at": iso(row.next_attempt_at),
        "deliver_until": iso(row.deliver_until),
        "sent_at": iso(row.sent_at),
        "last_error": row.last_error,
    }


def failed_row(row: InboundMessage) -> dict[str, Any]:
    return {
        "id": row.id,
        "state": row.state,
        "received_at": iso(row.received_at),
        "transport": row.transport,
        "mail_from": row.mail_from,
        "message_id": row.message_id,
        "size": row.size,
        "attempts": row.attempts,
        "failed_step": row.failed_step,
        "last_error": row.last_error,
    }


def print_result(data: Any, as_json: bool, text: str) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False) if as_json else text)


def table(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    if not rows:
        return "(none)"
    widths = {c: max(len(c), *(len(str(r.get(c) or "")) for r in rows)) for c in columns}
    lines = ["  ".join(c.upper().ljust(widths[c]) for c in columns)]
    lines += ["  ".join(str(r.get(c) or "").ljust(widths[c])[:80] for c in columns) for r in rows]
    return "\n".join(lines)


def find_report(session: Session, tracking_id: str) -> Report:
    report = session.scalar(select(Report).where(Report.tracking_id == tracking_id.upper()))
    if report is None:
        raise NotFound(f"no report {tracking_id}")
    return report


def open_db(config: Config) -> Database:
    return app.open_database(config)


def keyring(config: Config) -> OpenPGP:
    return open_keyring(config)
