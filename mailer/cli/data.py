"""``mailer backup|restore``, ``mailer export``, ``mailer reports attachments`` and ``mailer retention run``."""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from mailer import backup, retention
from mailer.cli.views import Subparsers, find_report, open_db, print_result, report_detail
from mailer.clock import SYSTEM
from mailer.config import Config, private_dir


def _config_path(args: argparse.Namespace) -> str | None:
    return args.config or os.environ.get("MAILER_CONFIG") or None


def cmd_backup(config: Config, args: argparse.Namespace) -> int:
    manifest = backup.backup(config, Path(args.dest), config_path=_config_path(args))
    text = (f"backup written to {manifest['archive']} ({manifest['reports']} report(s), last {manifest['last_tracking_id']}, "
            f"service key {manifest['service_key']}): {', '.join(manifest['contents'])}")
    if manifest.get("database_note"):
        text += f"\nnote: {manifest['database_note']}"
    print_result(manifest, args.json, text)
    return 0


def cmd_restore(config: Config, args: argparse.Namespace) -> int:
    manifest = backup.restore(config, Path(args.archive))
    text = (f"restored {manifest.get('reports')} report(s) (last {manifest.get('last_tracking_id')}) into "
            f"{config.service.data_dir}; service key {manifest.get('service_key')}")
    if manifest.get("next_step"):
        text += f"\nnext: {manifest['next_step']}"
    print_result(manifest, args.json, text)
    return 0


def export_report(config: Config, tracking_id: str) -> dict[str, Any]:
    """One report with its messages (decrypted text), attachments (base64) and events, JSON-ready."""
    db = open_db(config)
    with db.session() as session:
        report = find_report(session, tracking_id)
        data = report_detail(report)
        for item, message in zip(data["messages"], report.messages, strict=True):
            item["attachments"] = [
                {"filename": a.filename, "content_type": a.content_type, "size": a.size, "truncated": a.truncated,
                 "data_base64": base64.b64encode(a.data).decode("ascii") if a.data is not None else None}
                for a in message.attachments
            ]
    data["export"] = {"format": 1, "exported_at": SYSTEM().isoformat()}
    return data


def _private_write(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def cmd_export(config: Config, args: argparse.Namespace) -> int:
    text = json.dumps(export_report(config, args.id), indent=2, ensure_ascii=False)
    if args.output in (None, "-"):
        print(text)
    else:
        _private_write(Path(args.output), text.encode("utf-8"))
        print(f"{args.id.upper()} written to {args.output}", file=sys.stderr)
    return 0


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def cmd_attachments(config: Config, args: argparse.Namespace) -> int:
    out = private_dir(Path(args.output))
    db = open_db(config)
    written: list[dict[str, Any]] = []
    with db.session() as session:
        report = find_report(session, args.id)
        for message in report.messages:
            for attachment in message.attachments:
                if attachment.data is None:
                    written.append({"message": message.id, "size": attachment.size, "path": None, "reason": "over the size cap"})
                    continue
                name = _UNSAFE.sub("_", Path(attachment.filename or "attachment").name).strip("._") or "attachment"
                path = out / f"{message.id}-{attachment.id}-{name}"
                _private_write(path, attachment.data)
                written.append({"message": message.id, "size": attachment.size, "path": str(path)})
    lines = [f"{w['path']} ({w['size']} bytes)" if w["path"] else f"message {w['message']}: not kept ({w['reason']})"
             for w in written]
    print_result(written, args.json, "\n".join(lines) or "(no attachments)")
    return 0


def cmd_retention(config: Config, args: argparse.Namespace) -> int:
    done = retention.purge(open_db(config), config, now=SYSTEM(), dry_run=args.dry_run)
    verb = "would purge" if args.dry_run else "purged"
    text = (f"{verb} raw messages of {len(done['raw_purged'])} report(s), {len(done['reports_purged'])} closed report(s) "
            f"entirely" + (f": {', '.join(done['reports_purged'])}" if done["reports_purged"] else ""))
    print_result(done, args.json, text)
    return 0


def register(sub: Subparsers) -> None:
    p = sub.add_parser("backup", help="write a consistent archive (database, GnuPG home, data key, config) while running")
    p.add_argument("dest", help="archive file, or a directory to write mailer-backup-<time>.tar.gz into")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_backup)
    p = sub.add_parser("restore", help="unpack a backup archive into an empty data dir")
    p.add_argument("archive")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_restore)
    p = sub.add_parser("export", help="one report with messages, attachments and events as JSON")
    p.add_argument("id", help="tracking id, e.g. SEC-2026-0001")
    p.add_argument("--output", help="file to write (0600); default: standard output")
    p.set_defaults(func=cmd_export)
    retention_parser = sub.add_parser("retention", help="purge what [retention] keeps no longer")
    actions = retention_parser.add_subparsers(dest="retention_command", required=True)
    p = actions.add_parser("run", help="purge now (the service also does it hourly)")
    p.add_argument("--dry-run", action="store_true", help="only say what would be purged")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_retention)
