"""The ``mailer`` command line.

``--json`` shapes are a contract (ops scripts depend on them):

- ``reports list --json``: a JSON array of report objects
  ``{"id", "state", "reporter", "subject", "created_at", "updated_at", "acknowledged_at", "missing_fields", "flags"}``
  where ``id`` is the tracking id and times are ISO 8601 UTC.
- ``reports show ID --json``: one report object plus ``"fields"``, ``"messages"``
  (``{"id", "direction", "kind", "message_id", "sender", "created_at", "body_text", "attachments"}``)
  and ``"events"`` (``{"id", "at", "kind", "actor", "detail"}``).
- ``outbox list --json``: an array of ``{"id", "kind", "state", "report", "message_id", "to", "attempts", "created_at", "next_attempt_at", "deliver_until", "sent_at", "last_error"}``.
- ``keys list --json``: an array of ``{"fingerprint", "uids", "created", "expires", "revoked", "expired", "can_encrypt", "can_sign", "usable", "problem", "roles"}``; ``keys show FPR --json`` is one such object.
- ``imap import --since DATE --json``: ``{"imported": N}``.
- ``health --json``: ``{"ok", "problems": [...], "service": {"pid", "updated_at", "listeners", "service_key", "imap", "tasks"} | null, "queues": {"inbound_waiting", "inbound_failed", "outbox_pending", "outbox_failed"}}``; exit 1 when not ok.
- ``failed list --json``: an array of ``{"id", "state", "received_at", "transport", "mail_from", "message_id", "size", "attempts", "failed_step", "last_error"}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from collections.abc import Sequence
from datetime import date, datetime, timezone
from typing import Any

from sqlalchemy import func, select

from mailer import db as dbmod
from mailer.config import Config, load_config
from mailer.errors import ConfigError, MailerError, NotFound
from mailer.models import InboundMessage, InboundState, OutboxMessage, Report

EXIT_ERROR = 1
EXIT_USAGE = 2


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def report_summary(report: Report) -> dict[str, Any]:
    return {
        "id": report.tracking_id,
        "state": report.state,
        "reporter": report.reporter,
        "subject": report.subject,
        "created_at": _iso(report.created_at),
        "updated_at": _iso(report.updated_at),
        "acknowledged_at": _iso(report.acknowledged_at),
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
            "created_at": _iso(m.created_at),
            "body_text": m.body_text,
            "attachments": [
                {"filename": a.filename, "content_type": a.content_type, "size": a.size, "kept": not a.truncated}
                for a in m.attachments
            ],
        }
        for m in report.messages
    ]
    data["events"] = [
        {"id": e.id, "at": _iso(e.at), "kind": e.kind, "actor": e.actor, "detail": e.detail} for e in report.events
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
        "created_at": _iso(row.created_at),
        "next_attempt_at": _iso(row.next_attempt_at),
        "deliver_until": _iso(row.deliver_until),
        "sent_at": _iso(row.sent_at),
        "last_error": row.last_error,
    }


def failed_row(row: InboundMessage) -> dict[str, Any]:
    return {
        "id": row.id,
        "state": row.state,
        "received_at": _iso(row.received_at),
        "transport": row.transport,
        "mail_from": row.mail_from,
        "message_id": row.message_id,
        "size": row.size,
        "attempts": row.attempts,
        "failed_step": row.failed_step,
        "last_error": row.last_error,
    }


def _print(data: Any, as_json: bool, text: str) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False) if as_json else text)


def _table(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    if not rows:
        return "(none)"
    widths = {c: max(len(c), *(len(str(r.get(c) or "")) for r in rows)) for c in columns}
    lines = ["  ".join(c.upper().ljust(widths[c]) for c in columns)]
    lines += ["  ".join(str(r.get(c) or "").ljust(widths[c])[:80] for c in columns) for r in rows]
    return "\n".join(lines)


def cmd_reports_list(config: Config, args: argparse.Namespace) -> int:
    db = _open(config)
    with db.session() as session:
        rows = [report_summary(r) for r in session.scalars(select(Report).order_by(Report.id))]
    _print(rows, args.json, _table(rows, ("id", "state", "reporter", "created_at", "subject")))
    return 0


def _report(session: Any, tracking_id: str) -> Report:
    report = session.scalar(select(Report).where(Report.tracking_id == tracking_id.upper()))
    if report is None:
        raise NotFound(f"no report {tracking_id}")
    return report


def cmd_reports_show(config: Config, args: argparse.Namespace) -> int:
    db = _open(config)
    with db.session() as session:
        data = report_detail(_report(session, args.id))
    if args.json:
        _print(data, True, "")
        return 0
    lines = [f"{k}: {data[k]}" for k in ("id", "state", "reporter", "subject", "created_at", "missing_fields")]
    for name, value in data["fields"].items():
        lines.append(f"\n## {name}\n{value}")
    for m in data["messages"]:
        lines.append(f"\n--- {m['direction']} {m['kind']} {m['created_at']} {m['sender']} {m['message_id'] or ''}")
        if m["direction"] == "in":
            lines.append(m["body_text"])
    lines.append("\nevents:")
    lines += [f"  {e['at']} {e['kind']} {e['actor']} {json.dumps(e['detail'])}" for e in data["events"]]
    print("\n".join(lines))
    return 0


def cmd_outbox_list(config: Config, args: argparse.Namespace) -> int:
    db = _open(config)
    with db.session() as session:
        tracking = {row[0]: row[1] for row in session.execute(select(Report.id, Report.tracking_id))}
        rows = [outbox_row(r, tracking) for r in session.scalars(select(OutboxMessage).order_by(OutboxMessage.id))]
    _print(rows, args.json, _table(rows, ("id", "kind", "state", "report", "to", "attempts", "last_error")))
    return 0


def cmd_outbox_retry(config: Config, args: argparse.Namespace) -> int:
    from outbound.outbox import retry

    retry(_open(config), args.id)
    print(f"outgoing message {args.id} queued for delivery")
    return 0


def cmd_failed_list(config: Config, args: argparse.Namespace) -> int:
    db = _open(config)
    states = [InboundState.FAILED.value, InboundState.RETRY.value]
    with db.session() as session:
        query = select(InboundMessage).where(InboundMessage.state.in_(states)).order_by(InboundMessage.id)
        rows = [failed_row(r) for r in session.scalars(query)]
    _print(rows, args.json, _table(rows, ("id", "state", "received_at", "mail_from", "failed_step", "last_error")))
    return 0


def cmd_failed_retry(config: Config, args: argparse.Namespace) -> int:
    from mailer.worker import retry_failed

    retry_failed(_open(config), args.id)
    print(f"message {args.id} queued for processing")
    return 0


def cmd_db_upgrade(config: Config, args: argparse.Namespace) -> int:
    dbmod.upgrade(config.database_url)
    print(f"database at {_redacted(config.database_url)} is up to date")
    return 0


def cmd_serve(config: Config, args: argparse.Namespace) -> int:
    from mailer.app import Service

    async def serve() -> None:
        service = Service(config)
        await service.start()
        print(f"service OpenPGP key: {service.fingerprint} ({config.service.contact_name} <{config.service.contact}>)")
        print(f"key requests: mail to {config.sendkey_address}; export with `mailer keys export`")
        for name, (host, port) in service.listening().items():
            print(f"{name.upper()} listening on {host}:{port}", flush=True)
        print(f"database: {_redacted(config.database_url)}", flush=True)
        print(f"outgoing mail (acknowledgements, notices) goes to: {config.relay_url}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await service.stop()
        service.db.dispose()

    asyncio.run(serve())
    return 0


def _redacted(url: str) -> str:
    head, sep, tail = url.rpartition("@")
    if not sep or ":" not in head.split("//", 1)[-1]:
        return url
    scheme, _, user = head.partition("//")
    return f"{scheme}//{user.split(':', 1)[0]}:***@{tail}"


def _open(config: Config) -> dbmod.Database:
    db = dbmod.Database(config.database_url)
    db.check()
    return db


def _keyring(config: Config) -> Any:
    from mailer.crypto import OpenPGP

    return OpenPGP(str(config.gnupg_home), passphrase=config.gnupg.secret(), timeout=config.gnupg.timeout_seconds)


def key_row(info: Any, config: Config) -> dict[str, Any]:
    roles = [f"maintainer {m.address}" for m in config.maintainers if m.fingerprint == info.fingerprint]
    if info.has_secret:
        roles.append("service key")
    return {
        "fingerprint": info.fingerprint,
        "uids": list(info.uids),
        "created": _iso(info.created),
        "expires": _iso(info.expires),
        "revoked": info.revoked,
        "expired": info.expired,
        "can_encrypt": info.can_encrypt,
        "can_sign": info.can_sign,
        "usable": info.problem is None,
        "problem": info.problem,
        "roles": roles,
    }


def cmd_keys_list(config: Config, args: argparse.Namespace) -> int:
    rows = [key_row(k, config) for k in _keyring(config).list_keys()]
    text = "\n".join(
        f"{r['fingerprint']}  {'usable' if r['usable'] else r['problem']:<10}  {', '.join(r['uids'])}"
        + (f"  [{'; '.join(r['roles'])}]" if r["roles"] else "")
        for r in rows
    )
    _print(rows, args.json, text or "(no keys)")
    return 0


def cmd_keys_show(config: Config, args: argparse.Namespace) -> int:
    info = _keyring(config).key_info(args.fingerprint)
    if info is None:
        raise NotFound(f"no key {args.fingerprint} in {config.gnupg_home}")
    row = key_row(info, config)
    _print(row, args.json, "\n".join(f"{k}: {v}" for k, v in row.items()))
    return 0


def _read(path: str) -> bytes:
    if path == "-":
        return sys.stdin.buffer.read()
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise NotFound(f"cannot read {path}: {exc.strerror}") from None


def cmd_keys_import(config: Config, args: argparse.Namespace) -> int:
    fingerprints = _keyring(config).import_public(_read(args.file))
    for fpr in fingerprints:
        print(f"imported {fpr}")
    return 0


def cmd_keys_import_secret(config: Config, args: argparse.Namespace) -> int:
    fingerprints = _keyring(config).import_secret(_read(args.file), config.gnupg.secret())
    for fpr in fingerprints:
        print(f"imported secret key {fpr}")
    return 0


def cmd_keys_export(config: Config, args: argparse.Namespace) -> int:
    from mailer.crypto import check_versions

    check_versions()
    gpg = _keyring(config)
    service = config.service
    fingerprint = gpg.ensure_service_key(service.contact_name, service.contact, config.gnupg.secret())
    print(gpg.export_public(fingerprint), end="")
    return 0


def cmd_imap_import(config: Config, args: argparse.Namespace) -> int:
    from inbound.imap import import_since

    if not config.imap.host:
        raise ConfigError("imap.host is required (set [imap] host or MAILER_IMAP_HOST)")
    count = asyncio.run(import_since(config.imap, _open(config), args.since))
    _print({"imported": count}, args.json, f"imported {count} message(s)")
    return 0


HEALTH_STALE_SECONDS = 60


def health_report(config: Config) -> tuple[dict[str, Any], list[str]]:
    """The running service's own view (health.json) plus queue depths from the database, and the problems."""
    problems: list[str] = []
    path = config.service.data_dir / "health.json"
    try:
        live = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        live = None
        problems.append(f"no health file at {path}: is `mailer serve` running with this configuration?")
    if live is not None:
        age = (datetime.now(timezone.utc) - datetime.fromisoformat(live["updated_at"])).total_seconds()
        if age > HEALTH_STALE_SECONDS:
            problems.append(f"health file is {age:.0f} s old: the service is not running or is stuck")
        imap = live.get("imap")
        if imap is not None and not imap.get("connected"):
            problems.append(f"IMAP not connected: {imap.get('last_error') or imap.get('state')}")
        problems += [f"task {name} stopped" for name, state in live.get("tasks", {}).items() if state != "running"]
    db = _open(config)
    with db.session() as session:
        def count(model: Any, *states: str) -> int:
            return session.scalar(select(func.count(model.id)).where(model.state.in_(states))) or 0

        queues = {
            "inbound_waiting": count(InboundMessage, InboundState.RECEIVED.value, InboundState.RETRY.value),
            "inbound_failed": count(InboundMessage, InboundState.FAILED.value),
            "outbox_pending": count(OutboxMessage, "pending"),
            "outbox_failed": count(OutboxMessage, "failed"),
        }
    if queues["inbound_failed"]:
        problems.append(f"{queues['inbound_failed']} message(s) failed processing: `mailer failed list`")
    if queues["outbox_failed"]:
        problems.append(f"{queues['outbox_failed']} outgoing message(s) undeliverable: `mailer outbox list`")
    return {"ok": not problems, "problems": problems, "service": live, "queues": queues}, problems


def cmd_health(config: Config, args: argparse.Namespace) -> int:
    data, problems = health_report(config)
    text = "ok" if not problems else "\n".join(f"problem: {p}" for p in problems)
    text += "\n" + "  ".join(f"{k}={v}" for k, v in data["queues"].items())
    _print(data, args.json, text)
    return 0 if not problems else EXIT_ERROR


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mailer", description="security-mailer: the security contact's mailbox")
    parser.add_argument("--config", help="TOML configuration file (default: $MAILER_CONFIG, else built-in defaults)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("serve", help="run the service").set_defaults(func=cmd_serve)
    p = sub.add_parser("health", help="is the service running and well? exit 1 with the problems if not")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_health)

    db = sub.add_parser("db", help="database schema").add_subparsers(dest="db_command", required=True)
    db.add_parser("upgrade", help="migrate the schema to this version").set_defaults(func=cmd_db_upgrade)

    reports = sub.add_parser("reports", help="security reports").add_subparsers(dest="reports_command", required=True)
    p = reports.add_parser("list", help="all reports")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_reports_list)
    p = reports.add_parser("show", help="one report with its messages and events")
    p.add_argument("id", help="tracking id, e.g. SEC-2026-0001")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_reports_show)

    outbox = sub.add_parser("outbox", help="outgoing mail").add_subparsers(dest="outbox_command", required=True)
    p = outbox.add_parser("list", help="outgoing mail and its delivery state")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_outbox_list)
    p = outbox.add_parser("retry", help="deliver a failed message again")
    p.add_argument("id", type=int)
    p.set_defaults(func=cmd_outbox_retry)

    failed = sub.add_parser("failed", help="received messages that could not be processed").add_subparsers(
        dest="failed_command", required=True
    )
    p = failed.add_parser("list", help="messages waiting for a retry or given up on")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_failed_list)
    p = failed.add_parser("retry", help="process a failed message again")
    p.add_argument("id", type=int)
    p.set_defaults(func=cmd_failed_retry)

    keys = sub.add_parser("keys", help="OpenPGP keys").add_subparsers(dest="keys_command", required=True)
    p = keys.add_parser("list", help="keys in the service keyring, with usability and role")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_keys_list)
    p = keys.add_parser("show", help="one key with expiry and usability")
    p.add_argument("fingerprint")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_keys_show)
    p = keys.add_parser("import", help="import public keys (maintainers, embargo list members); FILE or -")
    p.add_argument("file")
    p.set_defaults(func=cmd_keys_import)
    p = keys.add_parser("import-secret", help="use your own service key instead of the generated one")
    p.add_argument("file")
    p.set_defaults(func=cmd_keys_import_secret)
    keys.add_parser("export", help="print the service's public key (generated if missing)").set_defaults(
        func=cmd_keys_export
    )

    imap = sub.add_parser("imap", help="IMAP mailbox intake").add_subparsers(dest="imap_command", required=True)
    p = imap.add_parser("import", help="take messages already read in the mailbox, from a date on")
    p.add_argument("--since", type=date.fromisoformat, required=True, help="YYYY-MM-DD")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_imap_import)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not args.verbose:
        # aiosmtpd logs every SMTP line at INFO; alembic every migration context
        logging.getLogger("mail.log").setLevel(logging.WARNING)
        logging.getLogger("alembic").setLevel(logging.WARNING)
        logging.getLogger("aioimaplib").setLevel(logging.WARNING)
    try:
        config = load_config(args.config)
        return int(args.func(config, args))
    except MailerError as exc:
        print(f"mailer: {exc}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
