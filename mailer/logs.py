"""Logging: one line per message through its life, never its content.

:func:`setup` is called once by the CLI (``mailer.cli.main``): ``[logging] level``
and ``format`` (``text`` or ``json``, one object per line), overridable by
``MAILER_LOGGING_LEVEL`` / ``MAILER_LOGGING_FORMAT``; ``-v`` is a shortcut for DEBUG.

:func:`event` writes one lifecycle line (``message.received``, ``message.processed``,
``outbox.sent`` …) with its fields as ``key=value`` (text) or as JSON keys. Only
identifiers, sizes, kinds, reasons and relay answers go in: never the subject,
the text, attachment names or anything decrypted. Third-party loggers that
would print protocol data (aiosmtpd's ``mail.log`` writes every DATA line at
DEBUG, aioimaplib every FETCH response) are capped at INFO, and a handler
filter drops their DEBUG records even if someone lowers the cap again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from datetime import UTC, datetime
from typing import IO, Any

from sqlalchemy import event as sa_event
from sqlalchemy.orm import Session

#: loggers that see message bytes at DEBUG (python-gnupg: gpg's stderr, e.g. file names): capped at INFO
PROTOCOL_LOGGERS = ("mail.log", "aioimaplib", "gnupg")
_FIELDS = "mailer_fields"
_EVENT = "mailer_event"


def message_id_hash(message_id: str | None) -> str | None:
    """A short, stable stand-in for a Message-ID in logs (the id itself can carry a name or a host)."""
    if not message_id:
        return None
    return hashlib.sha256(message_id.encode("utf-8", "replace")).hexdigest()[:16]


def _text(value: Any) -> str:
    if isinstance(value, list | tuple):
        return ",".join(_text(v) for v in value) or "-"
    text = str(value)
    return json.dumps(text) if (not text or any(c.isspace() or c in "\"=" for c in text)) else text


def event(logger: logging.Logger, name: str, /, *, level: int = logging.INFO, **fields: Any) -> None:
    """One lifecycle line: ``name key=value …``; ``None`` fields are left out."""
    fields = {key: value for key, value in fields.items() if value is not None}
    if not logger.isEnabledFor(level):
        return
    text = " ".join(f"{key}={_text(value)}" for key, value in fields.items())
    logger.log(level, "%s %s", name, text, extra={_EVENT: name, _FIELDS: fields})


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts``, ``level``, ``event``, ``logger``, ``message`` and the event's fields."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "event": getattr(record, _EVENT, "log"),
            "logger": record.name,
        }
        fields = getattr(record, _FIELDS, None)
        if isinstance(fields, dict):
            for key, value in fields.items():
                data.setdefault(key, value)
        else:
            data["message"] = record.getMessage()
        if record.exc_info:
            data["error"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str, ensure_ascii=False)


class _ProtocolFilter(logging.Filter):
    """Drops DEBUG records of the protocol loggers (their DEBUG lines carry message data)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.INFO:
            return True
        return not any(record.name == name or record.name.startswith(name + ".") for name in PROTOCOL_LOGGERS)


def setup(level: str = "INFO", fmt: str = "text", *, verbose: bool = False, stream: IO[str] | None = None) -> None:
    """Configure the root logger once for the process (replaces earlier handlers)."""
    numeric = logging.DEBUG if verbose else logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    handler = logging.StreamHandler(stream or sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_ProtocolFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric)
    cap_protocol_loggers(numeric)
    # alembic logs every migration context at INFO
    logging.getLogger("alembic").setLevel(max(numeric, logging.WARNING))


def cap_protocol_loggers(level: int = logging.INFO) -> None:
    """aiosmtpd and aioimaplib never log below INFO (their DEBUG lines hold DATA and FETCH bytes)."""
    for name in PROTOCOL_LOGGERS:
        # their INFO lines are one per SMTP command (addresses): shown only at DEBUG, never their DEBUG lines
        logging.getLogger(name).setLevel(logging.INFO if level <= logging.DEBUG else max(level, logging.WARNING))


# -- the lifecycle lines (called where the things happen) -------------------------------------------

LIFECYCLE = logging.getLogger("mailer.lifecycle")


@sa_event.listens_for(Session, "pending_to_persistent")
def _written(session: Session, instance: object) -> None:
    """Outgoing mail and events written in a transaction, for the message's log line (no query needed)."""
    from mailer.models import Event, OutboxMessage

    if isinstance(instance, OutboxMessage):
        session.info.setdefault("outgoing", []).append((instance.id, instance.kind))
    elif isinstance(instance, Event):
        session.info.setdefault("events", []).append((instance.id, instance.inbound_id, instance.kind, instance.detail))


def received(transport: str, size: int, message_id: str | None, inbound_id: int, duplicate: bool) -> None:
    """A message was stored (before the sender is told 250)."""
    from mailer import metrics

    metrics.RECEIVED.labels(transport, "duplicate" if duplicate else "stored").inc()
    event(LIFECYCLE, "message.received", inbound_id=inbound_id, transport=transport, size=size,
          message_id_hash=message_id_hash(message_id), duplicate=duplicate or None)


def summarise(ctx: Any) -> dict[str, Any]:
    """What processing one message did (call after its commit; reads only kinds, ids and reasons the
    transaction's flushes noted in ``session.info``, and attributes loaded before the commit)."""
    session = ctx.session
    events = [(kind, detail) for _, inbound_id, kind, detail in sorted(session.info.get("events", []), key=lambda e: e[0])
              if inbound_id == ctx.inbound.id]
    kinds = [kind for kind, _ in events]
    kind = ctx.kind.value if ctx.kind is not None else None
    summary: dict[str, Any] = {
        "inbound_id": ctx.inbound.id,
        "transport": ctx.inbound.transport,
        "kind": kind,
        "tracking_id": ctx.report.tracking_id if ctx.report is not None else None,
        "action": {"new": "filed", "followup": "threaded", "bounce": "threaded", "autoreply": "threaded",
                   "command": "commands", "sendkey": "sendkey", "ignored": "ignored"}.get(kind or "", kind),
    }
    for name, detail in events:
        if name in ("ack.queued", "ack.suppressed", "ack.not_sent"):
            summary["ack"] = name.partition(".")[2]
            summary["ack_reason"] = (detail or {}).get("reason")
    if kind == "new" and "ack" not in summary:
        summary["ack"] = "none"
    commands = session.info.get("commands")
    if isinstance(commands, dict):
        summary.update({f"command_{key}" if key != "names" else "commands": value for key, value in commands.items()})
    summary["outgoing"] = sorted(session.info.get("outgoing", []))
    summary["events"] = kinds
    if summary.get("ack") == "queued":
        summary["_latency"] = (ctx.now - ctx.inbound.received_at).total_seconds()
    return summary


def processed(summary: dict[str, Any]) -> None:
    """After the commit: one line for the message, one per outgoing mail it queued; the counters."""
    from mailer import metrics

    latency = summary.pop("_latency", None)
    outgoing = summary.pop("outgoing", [])
    metrics.CLASSIFIED.labels(summary.get("kind") or "unknown").inc()
    if summary.get("action") == "filed":
        metrics.FILED.inc()
    if summary.get("ack"):
        metrics.ACKS.labels(summary["ack"], metrics.reason_label(summary.get("ack_reason"))).inc()
    if "command_ok" in summary:
        metrics.COMMANDS.labels("ok" if summary["command_ok"] else "refused" if summary.get("command_reason") else "failed").inc()
    if latency is not None:
        metrics.LATENCY.observe(max(latency, 0.0))
    event(LIFECYCLE, "message.processed", **summary, outgoing=[f"{kind}:{row_id}" for row_id, kind in outgoing])
    for row_id, kind in outgoing:
        event(LIFECYCLE, "outbox.queued", outbox_id=row_id, kind=kind, tracking_id=summary.get("tracking_id"),
              inbound_id=summary.get("inbound_id"))


def delivery(row: Any, result: str, error: BaseException | None, tracking: str | None) -> None:
    """An outgoing mail was sent, deferred or failed (inside the sender's transaction)."""
    from mailer import metrics

    metrics.SENDS.labels(result, row.kind).inc()
    event(LIFECYCLE, f"outbox.{result}", level=logging.WARNING if result == "failed" else logging.INFO,
          outbox_id=row.id, kind=row.kind, tracking_id=tracking, attempts=row.attempts,
          relay=str(error)[:300] if error is not None else "accepted")


def scheduled(kind: str, key: str, state: str, tracking_ids: list[str], reason: str | None = None) -> None:
    """A timeline mail fell due and was sent, held or failed."""
    from mailer import metrics

    metrics.SCHEDULED.labels(state).inc()
    event(LIFECYCLE, "schedule.mail", kind=kind, key=key, state=state, tracking_id=",".join(tracking_ids) or None,
          reason=reason)
