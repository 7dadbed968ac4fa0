"""``mailer audit verify`` and ``mailer audit show``: the tamper-evident trail (``mailer.audit``)."""

from __future__ import annotations

import argparse
import json

from mailer import audit
from mailer.cli.views import Subparsers, find_report, keyring, open_db, print_result
from mailer.config import Config
from mailer.openpgp import check_versions

EXIT_BROKEN = 1


def cmd_audit_verify(config: Config, args: argparse.Namespace) -> int:
    check_versions()
    with open_db(config).session() as session:
        result = audit.verify(session, keyring(config), config.parsing)
    data = result.as_dict()
    text = (f"ok: {result.events} events chained ({result.unchained} from before the chain), "
            f"{result.signatures} command signatures verified" if result.ok else
            "\n".join(f"BROKEN: event {f.event_id}: {f.what}" if f.event_id else f"BROKEN: {f.what}"
                      for f in result.findings))
    print_result(data, args.json, text)
    return 0 if result.ok else EXIT_BROKEN


def cmd_audit_show(config: Config, args: argparse.Namespace) -> int:
    with open_db(config).session() as session:
        report = find_report(session, args.id)
        rows = audit.history(session, report.id)
    text = "\n".join(f"{r['at']}  {r['kind']:<24} {r['actor']:<40} {json.dumps(r['detail'], ensure_ascii=False)}"
                     for r in rows)
    print_result(rows, args.json, text or "(no events)")
    return 0


def register(sub: Subparsers) -> None:
    commands = sub.add_parser("audit", help="the tamper-evident audit trail").add_subparsers(
        dest="audit_command", required=True)
    p = commands.add_parser("verify", help="walk the hash chain and re-verify every kept command signature; exit 1 if broken")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_audit_verify)
    p = commands.add_parser("show", help="a report's history with signers' fingerprints, in time order")
    p.add_argument("id", help="tracking id, e.g. SEC-2026-0001")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_audit_show)
