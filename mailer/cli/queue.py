"""``mailer outbox`` and ``mailer failed``: the outgoing and the received queues."""

from __future__ import annotations

import argparse
import getpass

from sqlalchemy import select

from mailer import queues
from mailer.cli.views import Subparsers, failed_row, open_db, outbox_row, print_result, table
from mailer.clock import SYSTEM
from mailer.config import Config
from mailer.models import InboundMessage, InboundState, OutboxMessage, Report


def cmd_outbox_list(config: Config, args: argparse.Namespace) -> int:
    db = open_db(config)
    with db.session() as session:
        tracking = {row[0]: row[1] for row in session.execute(select(Report.id, Report.tracking_id))}
        rows = [outbox_row(r, tracking) for r in session.scalars(select(OutboxMessage).order_by(OutboxMessage.id))]
    print_result(rows, args.json, table(rows, ("id", "kind", "state", "report", "to", "attempts", "last_error")))
    return 0


def cmd_outbox_retry(config: Config, args: argparse.Namespace) -> int:
    queues.retry_outgoing(open_db(config), args.id, now=SYSTEM())
    print(f"outgoing message {args.id} queued for delivery")
    return 0


def cmd_outbox_dismiss(config: Config, args: argparse.Namespace) -> int:
    queues.dismiss_outgoing(open_db(config), args.id, now=SYSTEM(), by=f"cli:{getpass.getuser()}")
    print(f"outgoing message {args.id} dismissed")
    return 0


def cmd_failed_list(config: Config, args: argparse.Namespace) -> int:
    db = open_db(config)
    states = [InboundState.FAILED.value, InboundState.RETRY.value]
    with db.session() as session:
        query = select(InboundMessage).where(InboundMessage.state.in_(states)).order_by(InboundMessage.id)
        rows = [failed_row(r) for r in session.scalars(query)]
    print_result(rows, args.json, table(rows, ("id", "state", "received_at", "mail_from", "failed_step", "last_error")))
    return 0


def cmd_failed_retry(config: Config, args: argparse.Namespace) -> int:
    queues.retry_failed(open_db(config), args.id)
    print(f"message {args.id} queued for processing")
    return 0


def register(sub: Subparsers) -> None:
    outbox = sub.add_parser("outbox", help="outgoing mail").add_subparsers(dest="outbox_command", required=True)
    p = outbox.add_parser("list", help="outgoing mail and its delivery state")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_outbox_list)
    p = outbox.add_parser("retry", help="deliver a failed message again")
    p.add_argument("id", type=int)
    p.set_defaults(func=cmd_outbox_retry)
    p = outbox.add_parser("dismiss", help="a failed message was dealt with: stop reporting it (recorded as an event)")
    p.add_argument("id", type=int)
    p.set_defaults(func=cmd_outbox_dismiss)

    failed = sub.add_parser("failed", help="received messages that could not be processed").add_subparsers(
        dest="failed_command", required=True
    )
    p = failed.add_parser("list", help="messages waiting for a retry or given up on")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_failed_list)
    p = failed.add_parser("retry", help="process a failed message again")
    p.add_argument("id", type=int)
    p.set_defaults(func=cmd_failed_retry)
