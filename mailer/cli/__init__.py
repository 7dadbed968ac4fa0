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
- ``health --json``: ``{"status": "ok"|"degraded"|"down", "ok", "live", "problems": [one line each], "levels",
  "checked_at", "service": {"pid", "started_at", "updated_at", "listeners", "service_key", "relay", "imap", "metrics",
  "tasks"} | null, "queues": {"inbound_waiting", "inbound_failed", "outbox_pending", "outbox_failed"} | null}``;
  exit 0 ok, 1 degraded, 2 down (also on a configuration error or an unreachable database).
- ``stats --json``: ``mailer.metrics.database_stats``; ``backup``/``restore --json``: the archive's manifest.
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
import sys
from collections.abc import Sequence

from sqlalchemy.exc import SQLAlchemyError

from mailer import logs
from mailer.cli import audit, data, inbound, keys, publish, queue, reports, service
from mailer.config import load_config
from mailer.errors import ConfigError, MailerError

EXIT_ERROR = 1
EXIT_USAGE = 2
#: the environment is not usable (database unreachable, data dir not creatable): retry after fixing it
EXIT_ENVIRONMENT = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mailer", description="security-mailer: the security contact's mailbox")
    parser.add_argument("--config", help="TOML configuration file (default: $MAILER_CONFIG, else built-in defaults)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (service, reports, queue, keys, publish, audit, data, inbound):
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # until the configuration is read: its [logging] section decides the rest
    logs.setup("DEBUG" if args.verbose else "INFO", "text", verbose=args.verbose)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"mailer: {exc}", file=sys.stderr)
        return service.config_error_exit(args, exc)
    logs.setup(config.logging.level, config.logging.format, verbose=args.verbose)
    try:
        return int(args.func(config, args))
    except MailerError as exc:
        print(f"mailer: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except (OSError, SQLAlchemyError) as exc:
        # the environment, not the code: one line, no traceback
        print(f"mailer: {_environment_problem(exc)}", file=sys.stderr)
        return EXIT_ENVIRONMENT


def _environment_problem(exc: BaseException) -> str:
    if isinstance(exc, SQLAlchemyError):
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()
        return (f"database unreachable: {reason[0] if reason else type(exc).__name__}; check database.url "
                "(MAILER_DATABASE_URL) and that the server is up, then retry")
    if isinstance(exc, OSError) and exc.filename:
        return f"{exc.strerror or exc}: {exc.filename}; check service.data_dir and the file permissions, then retry"
    return f"{exc}; retry once the cause is fixed"


if __name__ == "__main__":
    sys.exit(main())
