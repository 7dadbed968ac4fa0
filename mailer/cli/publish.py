"""``mailer security-txt`` and ``mailer advisory``: what the project publishes (``mailer.wellknown``, ``mailer.advisory``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mailer import advisory
from mailer.cli.views import Subparsers, find_report, keyring, open_db
from mailer.clock import SYSTEM
from mailer.config import Config
from mailer.models import Event
from mailer.openpgp import check_versions
from mailer.wellknown import security_txt


def _write(data: bytes, output: Path | None) -> None:
    if output is None:
        sys.stdout.write(data.decode("utf-8"))
    else:
        output.write_bytes(data)
        print(f"written to {output}", file=sys.stderr)


def cmd_security_txt(config: Config, args: argparse.Namespace) -> int:
    check_versions()
    now = SYSTEM()
    data = security_txt(config, keyring(config), now=now)
    expires = next(line.split(":", 1)[1].strip() for line in data.decode().splitlines() if line.startswith("Expires:"))
    with open_db(config).session() as session:  # the expiry reminder reads this (mailer/timeline.py)
        session.add(Event(kind="security_txt.written", at=now, actor="cli", detail={"expires": expires}))
    _write(data, args.output)
    return 0


def cmd_advisory(config: Config, args: argparse.Namespace) -> int:
    now = SYSTEM()
    with open_db(config).session() as session:
        report = find_report(session, args.id)
        if args.format == "osv":
            data = json.dumps(advisory.osv_record(report, config, now=now), indent=2, ensure_ascii=False) + "\n"
        elif args.format == "cve5":
            data = json.dumps(advisory.cve5_container(report, config), indent=2, ensure_ascii=False) + "\n"
        else:
            data = advisory.text_advisory(report, config)
    _write(data.encode("utf-8"), args.output)
    return 0


def register(sub: Subparsers) -> None:
    p = sub.add_parser("advisory", help="write a report's advisory record (validated) from what the commands recorded")
    p.add_argument("id", help="tracking id, e.g. SEC-2026-0001")
    p.add_argument("--format", choices=("osv", "cve5", "text"), default="text")
    p.add_argument("--output", type=Path, help="file to write (default: standard output)")
    p.set_defaults(func=cmd_advisory)
    p = sub.add_parser("security-txt", help="write an RFC 9116 security.txt, clearsigned by the service key")
    p.add_argument("--output", type=Path, help="file to write (default: standard output)")
    p.set_defaults(func=cmd_security_txt)
