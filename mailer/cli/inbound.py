"""``mailer inbound list``: every received message that did not become a report or a follow-up, with the reason;
``mailer keys rotate-data-key``: a new data key for report content at rest (:mod:`mailer.atrest`).

``inbound list --json`` is an array of ``{"id", "received_at", "transport", "mail_from", "from", "message_id",
"size", "state", "classification", "report", "reason"}``; ``state`` is the processing state (``done``,
``received``, ``retry``, ``failed``), ``classification`` what the message was (``ignored``, ``bounce``,
``autoreply``, ``command``, ``sendkey``, ``new``, ``followup``).
"""

from __future__ import annotations

import argparse
from email.parser import BytesHeaderParser
from email.utils import parseaddr
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from mailer import app, atrest
from mailer.cli.views import Subparsers, iso, open_db, print_result, table
from mailer.config import Config
from mailer.errors import ConfigError
from mailer.models import Event, InboundMessage, Report

#: classifications that end as a report's message: not listed unless asked for
FILED = ("new", "followup")
_DEFAULT_REASONS = {
    "ignored": "delivery-status notification matching no report",
    "bounce": "delivery-status notification about mail to a report's reporter",
    "autoreply": "automatic reply (RFC 3834) to mail about a report",
    "command": "maintainer commands",
    "sendkey": "request for the service's public key",
}


def _from_header(raw: bytes) -> str:
    try:
        headers = BytesHeaderParser().parsebytes(raw[:64 * 1024], headersonly=True)
        return parseaddr(str(headers.get("From", "") or ""))[1]
    except Exception:  # noqa: BLE001 - a listing never fails on one bad message
        return ""


def _reasons(session: Session, ids: list[int]) -> dict[int, str]:
    """The recorded reason per inbound message (the last event of it that gives one)."""
    found: dict[int, str] = {}
    if not ids:
        return found
    query = select(Event.inbound_id, Event.kind, Event.detail).where(Event.inbound_id.in_(ids)).order_by(Event.id)
    for inbound_id, kind, detail in session.execute(query):
        if inbound_id is None:
            continue
        reason = detail.get("reason") if isinstance(detail, dict) else None
        if reason:
            found[inbound_id] = f"{kind}: {reason}"
        elif kind.startswith(("command", "commands")) and inbound_id not in found:
            found[inbound_id] = kind
    return found


def inbound_rows(session: Session, *, state: str | None = None, limit: int = 500) -> list[dict[str, Any]]:
    """Received messages that are not a report's own message (or those of one ``state``), newest first."""
    query = select(InboundMessage).order_by(InboundMessage.id.desc()).limit(limit)
    if state in ("received", "retry", "failed", "done"):
        query = query.where(InboundMessage.state == state)
    elif state == "all":
        pass
    elif state:
        query = query.where(InboundMessage.classification == state)
    else:
        query = query.where((InboundMessage.classification.is_(None)) | (InboundMessage.classification.not_in(FILED)))
    rows = list(session.scalars(query))
    reasons = _reasons(session, [r.id for r in rows])
    report_ids = [r.report_id for r in rows if r.report_id is not None]
    tracking: dict[int, str] = {}
    if report_ids:
        tracking = {rid: tid for rid, tid in session.execute(select(Report.id, Report.tracking_id).where(Report.id.in_(report_ids)))}
    out = []
    for row in rows:
        reason = reasons.get(row.id) or _DEFAULT_REASONS.get(row.classification or "", "")
        if row.state != "done" and not row.classification:
            reason = row.last_error or "waiting to be processed"
        out.append({
            "id": row.id,
            "received_at": iso(row.received_at),
            "transport": row.transport,
            "mail_from": row.mail_from,
            "from": _from_header(row.raw),
            "message_id": row.message_id,
            "size": row.size,
            "state": row.state,
            "classification": row.classification,
            "report": tracking.get(row.report_id) if row.report_id is not None else None,
            "reason": reason,
        })
    return out


def cmd_inbound_list(config: Config, args: argparse.Namespace) -> int:
    db = open_db(config)
    with db.session() as session:
        rows = inbound_rows(session, state=args.state, limit=args.limit)
    print_result(rows, args.json, table(rows, ("id", "received_at", "classification", "mail_from", "report", "reason")))
    return 0


def cmd_rotate_data_key(config: Config, args: argparse.Namespace) -> int:
    """A new current data key (appended to the key file), then every stored value re-encrypted with it."""
    ring = atrest.load_keyring(config.service.data_dir, config.storage.data_key_file)
    if ring.source == atrest.ENV:
        if not args.reencrypt_only:
            raise ConfigError(f"the data key comes from {atrest.ENV}: put a new key last in it (keys separated by "
                              "spaces; generate one with `openssl rand -base64 32`) and run "
                              "`mailer keys rotate-data-key --reencrypt-only`")
        new_id = ring.current
    elif args.reencrypt_only:
        new_id = ring.current
    else:
        new_id = atrest.add_key_to_file(atrest.key_file_path(config.service.data_dir, config.storage.data_key_file))
    db = app.open_database(config)  # loads the key file again: the new key is current
    current = atrest.installed()
    assert current is not None and current.current == new_id
    count = atrest.reseal(db.engine, current)
    db.dispose()
    result = {"key_id": new_id, "reencrypted": count.rows, "by_column": count.by_column}
    print_result(result, args.json, f"data key {new_id} is current; {count.rows} value(s) re-encrypted "
                 "(keep the older keys in the key file until the backups made with them are gone)")
    return 0


def register_keys(keys: Subparsers) -> None:
    """``mailer keys rotate-data-key`` (registered by :mod:`mailer.cli.keys`)."""
    p = keys.add_parser("rotate-data-key", help="a new data key for report content at rest; re-encrypts everything")
    p.add_argument("--reencrypt-only", action="store_true",
                   help="no new key: re-encrypt everything under the current (last) key")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_rotate_data_key)


def register(sub: Subparsers) -> None:
    inbound = sub.add_parser("inbound", help="received messages: what was not filed, and why").add_subparsers(
        dest="inbound_command", required=True)
    p = inbound.add_parser("list", help="messages that became no report or follow-up, with the reason")
    p.add_argument("--state", help="only these: ignored, bounce, autoreply, command, sendkey, new, followup "
                                   "(what the message was), received, retry, failed, done (its processing), or all")
    p.add_argument("--limit", type=int, default=500)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inbound_list)
