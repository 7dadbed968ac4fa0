"""Metrics: Prometheus counters the service updates as mail flows, and gauges read from the database.

The endpoint is optional (``[metrics] listen = "127.0.0.1:9325"``, off by
default). Counters live in this process (:data:`REGISTRY`); queue depths,
ages and totals are read from the database at each scrape
(:class:`DatabaseCollector`), by the same :func:`database_stats` that
``mailer stats`` prints for people without Prometheus. Labels are bounded:
kinds, states, transports and reason *labels* (:func:`reason_label`), never
addresses or text.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from sqlalchemy import func, select
from sqlalchemy.orm import Session

REGISTRY = CollectorRegistry(auto_describe=True)

RECEIVED = Counter("mailer_messages_received", "Messages received, by transport and outcome (stored, duplicate, tempfail)",
                   ["transport", "outcome"], registry=REGISTRY)
CLASSIFIED = Counter("mailer_messages_classified", "Processed messages by classification", ["kind"], registry=REGISTRY)
FILED = Counter("mailer_reports_filed", "New reports filed", registry=REGISTRY)
ACKS = Counter("mailer_acks", "Acknowledgements queued or suppressed (by reason)", ["result", "reason"], registry=REGISTRY)
COMMANDS = Counter("mailer_commands", "Command messages by outcome (ok, failed, refused)", ["outcome"], registry=REGISTRY)
SENDS = Counter("mailer_sends", "Delivery attempts of outgoing mail by result (sent, deferred, failed)", ["result", "kind"],
                registry=REGISTRY)
FAILURES = Counter("mailer_processing_failures", "Processing attempts that failed, by step", ["step"], registry=REGISTRY)
SCHEDULED = Counter("mailer_scheduled_mail", "Timeline mail that fell due, by what happened (sent, held, failed)", ["state"],
                    registry=REGISTRY)
LATENCY = Histogram("mailer_processing_seconds", "From received to acknowledged (ack queued)", registry=REGISTRY,
                    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600))
GPG = Histogram("mailer_gpg_seconds", "GnuPG operation latency", ["op"], registry=REGISTRY,
                buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))

_LABEL = re.compile(r"^[^:'\"\d]{1,60}")


def reason_label(reason: str | None) -> str:
    """A bounded label for a reason text ("Auto-Submitted: auto-replied" → "Auto-Submitted")."""
    if not reason:
        return ""
    match = _LABEL.match(reason)
    return (match.group(0) if match else "other").strip() or "other"


# -- from the database --------------------------------------------------------------------------


def database_stats(session: Session, now: datetime) -> dict[str, Any]:
    """What the database says: received by transport/state, classification, reports, acks, commands, queues, schedule."""
    from mailer.models import (
        CommandSignature,
        Event,
        InboundMessage,
        OutboxMessage,
        OutboxState,
        Report,
        ScheduledMail,
    )

    def grouped(*columns: Any) -> dict[str, int]:
        query = select(*columns, func.count()).group_by(*columns)
        return {"/".join(str(v) for v in row[:-1]): int(row[-1]) for row in session.execute(query)}

    suppressed: dict[str, int] = {}
    for detail in session.scalars(select(Event.detail).where(Event.kind == "ack.suppressed")):
        label = reason_label((detail or {}).get("reason"))
        suppressed[label] = suppressed.get(label, 0) + 1
    acks_queued = session.scalar(select(func.count(Event.id)).where(Event.kind == "ack.queued")) or 0
    acks_not_sent = session.scalar(select(func.count(Event.id)).where(Event.kind == "ack.not_sent")) or 0
    oldest = session.scalar(select(func.min(OutboxMessage.created_at)).where(OutboxMessage.state == OutboxState.PENDING.value))
    acked = session.execute(select(Report.created_at, Report.acknowledged_at).where(Report.acknowledged_at.is_not(None))
                            .order_by(Report.id.desc()).limit(1000)).all()
    delays = sorted((a - c).total_seconds() for c, a in acked if a is not None)
    return {
        "received": {"by_transport": grouped(InboundMessage.transport), "by_state": grouped(InboundMessage.state)},
        "classified": grouped(InboundMessage.classification),
        "reports": {"total": session.scalar(select(func.count(Report.id))) or 0, "by_state": grouped(Report.state)},
        "acks": {"queued": acks_queued, "not_sent": acks_not_sent, "suppressed": suppressed},
        "commands": {
            "applied": session.scalar(select(func.count(CommandSignature.id))) or 0,
            "refused": session.scalar(select(func.count(Event.id)).where(Event.kind == "command.refused")) or 0,
        },
        "outbox": {
            "by_state": grouped(OutboxMessage.state),
            "by_kind_state": grouped(OutboxMessage.kind, OutboxMessage.state),
            "pending": session.scalar(select(func.count(OutboxMessage.id))
                                      .where(OutboxMessage.state == OutboxState.PENDING.value)) or 0,
            "oldest_pending_seconds": round((now - oldest).total_seconds(), 1) if oldest is not None else 0.0,
        },
        "failed_messages": session.scalar(select(func.count(InboundMessage.id)).where(InboundMessage.state == "failed")) or 0,
        "scheduled": grouped(ScheduledMail.state),
        "ack_latency_seconds": {
            "count": len(delays),
            "median": round(delays[len(delays) // 2], 3) if delays else None,
            "max": round(delays[-1], 3) if delays else None,
        },
    }


class DatabaseCollector:
    """Gauges read at scrape time: queue depths, oldest pending outgoing mail, totals, IMAP connection."""

    def __init__(self, stats: Callable[[], dict[str, Any]], imap_connected: Callable[[], bool | None]) -> None:
        self.stats = stats
        self.imap_connected = imap_connected

    def collect(self) -> Iterator[Metric]:
        try:
            data = self.stats()
        except Exception:  # noqa: BLE001 - a scrape while the database is away still answers
            up = GaugeMetricFamily("mailer_database_up", "The database answered this scrape")
            up.add_metric([], 0)
            yield up
            return
        up = GaugeMetricFamily("mailer_database_up", "The database answered this scrape")
        up.add_metric([], 1)
        yield up
        yield _family("mailer_inbound_messages", "Received messages by state", "state", data["received"]["by_state"])
        yield _family("mailer_reports", "Reports by state", "state", data["reports"]["by_state"])
        yield _family("mailer_outbox_messages", "Outgoing mail by state", "state", data["outbox"]["by_state"])
        yield _family("mailer_scheduled_mail_rows", "Timeline mail handled, by state (held, sent, failed)", "state",
                      data["scheduled"])
        depth = GaugeMetricFamily("mailer_outbox_pending", "Outgoing mail waiting for delivery")
        depth.add_metric([], data["outbox"]["pending"])
        yield depth
        age = GaugeMetricFamily("mailer_outbox_oldest_pending_seconds", "Age of the oldest pending outgoing mail")
        age.add_metric([], data["outbox"]["oldest_pending_seconds"])
        yield age
        failed = GaugeMetricFamily("mailer_failed_messages", "Received messages given up on (`mailer failed list`)")
        failed.add_metric([], data["failed_messages"])
        yield failed
        connected = self.imap_connected()
        if connected is not None:
            imap = GaugeMetricFamily("mailer_imap_connected", "1 while the IMAP session is up")
            imap.add_metric([], 1 if connected else 0)
            yield imap


def _family(name: str, doc: str, label: str, values: dict[str, int]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=[label])
    for key, value in sorted(values.items()):
        family.add_metric([key], value)
    return family


class _Process:
    """Forwards this process's counters into a per-service registry."""

    def collect(self) -> Iterator[Metric]:
        yield from REGISTRY.collect()


class Endpoint:
    """The HTTP endpoint (``/metrics``) in a thread of its own."""

    def __init__(self, host: str, port: int, collector: DatabaseCollector) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Process())
        self.registry.register(collector)
        self.server, self.thread = start_http_server(port, addr=host, registry=self.registry)
        self._lock = threading.Lock()

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.server.server_address[:2]
        return str(host), int(port)

    def close(self) -> None:
        with self._lock:
            self.server.shutdown()
            self.server.server_close()
