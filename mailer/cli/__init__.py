"""The ``mailer`` command line.

``--json`` shapes are a contract (ops scripts depend on them):

- ``reports list --json``: a JSON array of report objects
  ``{"id", "state", "reporter", "subject", "created_at", "updated_at", "acknowledged_at", "missing_fields", "flags"}``
  where ``id`` is the tracking id and times are ISO 8601 UTC.
- ``reports show ID --json``: one report object plus ``"fields"``, ``"messages"``
  (``{"id", "direction", "kind", "message_id", "sender", "created_at", "body_text", "attachments"}``),
  ``"events"`` (``{"id", "at", "kind", "actor", "detail"}``) and ``"schedule"`` (as in ``schedule list``).
- ``outbox list --json``: an array of ``{"id", "kind", "state", "report", "message_id", "to", "attempts",
  "created_at", "next_attempt_at", "deliver_until", "sent_at", "last_error"}``.
- ``keys list --json``: an array of ``{"fingerprint", "uids", "created", "expires", "revoked", "expired",
  "can_encrypt", "can_sign", "usable", "problem", "roles"}``; ``keys show FPR --json`` is one such object.
- ``imap import --since DATE --json``: ``{"imported": N}``.
- ``health --json``: ``{"ok", "problems": [...], "service": {"pid", "updated_at", "listeners", "service_key",
  "imap", "tasks"} | null, "queues": {"inbound_waiting", "inbound_failed", "outbox_pending", "outbox_failed"}}``;
  exit 1 when not ok.
- ``schedule list --json``: an array of ``{"report", "reports", "kind", "due_at", "state", "reason",
  "recipients", "key"}``: ``kind`` is one of ``embargo_notice``, ``embargo_removed``, ``advance_notice``,
  ``preview``, ``release``, ``release_held``, ``embargo_lifted``, ``reporter_status``, ``reminder``; ``due_at``
  ISO 8601 UTC; ``state`` is ``planned``, ``held``, ``sent`` or ``failed``; ``recipients`` names lists and counts
  members (addresses only with ``--members``). ``schedule run --dry-run --at ISO --json``: the same objects for
  what would go out then.
- ``failed list --json``: an array of ``{"id", "state", "received_at", "transport", "mail_from", "message_id",
  "size", "attempts", "failed_step", "last_error"}``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from mailer.cli import keys, queue, reports, service
from mailer.config import load_config
from mailer.errors import MailerError

EXIT_ERROR = 1
EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mailer", description="security-mailer: the security contact's mailbox")
    parser.add_argument("--config", help="TOML configuration file (default: $MAILER_CONFIG, else built-in defaults)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (service, reports, queue, keys):
        module.register(sub)
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
