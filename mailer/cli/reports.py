"""``mailer reports`` and ``mailer schedule``: the reports and their disclosure timeline."""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime

from sqlalchemy import select

from mailer import app
from mailer.cli.data import cmd_attachments
from mailer.cli.views import Subparsers, find_report, open_db, print_result, report_detail, report_summary, table
from mailer.clock import SYSTEM
from mailer.config import Config
from mailer.errors import ConfigError
from mailer.models import Report
from mailer.scheduler import listing_entry, show_recipients


def cmd_reports_list(config: Config, args: argparse.Namespace) -> int:
    db = open_db(config)
    with db.session() as session:
        rows = [report_summary(r) for r in session.scalars(select(Report).order_by(Report.id))]
    print_result(rows, args.json, table(rows, ("id", "state", "reporter", "created_at", "subject")))
    return 0


def cmd_reports_show(config: Config, args: argparse.Namespace) -> int:
    db = open_db(config)
    with db.session() as session:
        data = report_detail(find_report(session, args.id))
    data["schedule"] = [row for row in app.open_scheduler(config, db).listing() if data["id"] in row["reports"]]
    if args.json:
        print_result(data, True, "")
        return 0
    lines = [f"{k}: {data[k]}" for k in ("id", "state", "reporter", "subject", "created_at", "missing_fields")]
    for name, value in data["fields"].items():
        lines.append(f"\n## {name}\n{value}")
    for m in data["messages"]:
        lines.append(f"\n--- {m['direction']} {m['kind']} {m['created_at']} {m['sender']} {m['message_id'] or ''}")
        if m["direction"] == "in":
            lines.append(m["body_text"])
    lines.append("\ndeadlines and scheduled mail:")
    lines += [f"  {r['due_at']} {r['kind']} {r['state']} {r.get('reason') or ''}" for r in data["schedule"]] or ["  (none)"]
    lines.append("\nevents:")
    lines += [f"  {e['at']} {e['kind']} {e['actor']} {json.dumps(e['detail'])}" for e in data["events"]]
    print("\n".join(lines))
    return 0


def cmd_schedule_list(config: Config, args: argparse.Namespace) -> int:
    rows = app.open_scheduler(config, open_db(config)).listing(members=args.members)
    if args.report:
        rows = [r for r in rows if args.report.upper() in r["reports"]]
    print_result(rows, args.json, table(rows, ("due_at", "kind", "state", "reports", "recipients", "reason")))
    return 0


def _instant(text: str) -> datetime:
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"--at: expected an ISO 8601 instant like 2026-12-01T09:00:00+01:00, got {text!r}") from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def cmd_schedule_run(config: Config, args: argparse.Namespace) -> int:
    scheduler = app.open_scheduler(config, open_db(config))
    if not args.dry_run:
        if args.at:
            raise ConfigError("--at only goes with --dry-run: mail is never sent before its instant")
        count = scheduler.drain()
        print_result({"handled": count}, args.json, f"{count} scheduled mail(s) sent or held")
        return 0
    at = _instant(args.at) if args.at else SYSTEM()
    rows = [listing_entry(report=i.report, reports=list(i.reports), kind=str(i.kind), due_at=i.due_at, state=i.state,
                          reason=i.reason, recipients=show_recipients(i.audience.value, i.recipients), key=i.key)
            for i in scheduler.preview(at)]
    print_result(rows, args.json, table(rows, ("due_at", "kind", "state", "reports", "recipients", "reason"))
           if rows else f"nothing would go out at {at.isoformat()}")
    return 0


def register(sub: Subparsers) -> None:
    reports = sub.add_parser("reports", help="security reports").add_subparsers(dest="reports_command", required=True)
    p = reports.add_parser("list", help="all reports")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_reports_list)
    p = reports.add_parser("show", help="one report with its messages and events")
    p.add_argument("id", help="tracking id, e.g. SEC-2026-0001")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_reports_show)
    p = reports.add_parser("attachments", help="write a report's attachments into a directory (files 0600)")
    p.add_argument("id", help="tracking id")
    p.add_argument("--output", required=True, help="directory (created 0700)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_attachments)

    schedule = sub.add_parser("schedule", help="the disclosure timeline: what is sent when, to whom").add_subparsers(
        dest="schedule_command", required=True)
    p = schedule.add_parser("list", help="planned, held, sent and failed scheduled mail")
    p.add_argument("--json", action="store_true")
    p.add_argument("--members", action="store_true", help="show embargo member addresses")
    p.add_argument("--report", help="only this report (SEC-…)")
    p.set_defaults(func=cmd_schedule_list)
    p = schedule.add_parser("run", help="send what is due now (the service does this itself)")
    p.add_argument("--dry-run", action="store_true", help="only show what would go out")
    p.add_argument("--at", help="with --dry-run: the instant to look at (ISO 8601)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_schedule_run)
