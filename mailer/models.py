"""Database models (SQLAlchemy 2). The schema is owned by the alembic migrations in ``migrations/``."""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import JSON, BigInteger, DateTime, Float, ForeignKey, Index, Integer, LargeBinary, String, Text
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, orm_insert_sentinel, relationship
from sqlalchemy.types import TypeDecorator

from mailer.atrest import EncryptedBytes, EncryptedJSON, EncryptedText


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes on every backend (SQLite has no time zones: store naive UTC)."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the database; use mailer.models.utcnow()")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {datetime: UTCDateTime(), dict[str, Any]: JSON, list[Any]: JSON}


class InboundState(enum.StrEnum):
    RECEIVED = "received"  # stored, waiting for the worker
    RETRY = "retry"  # a step failed; retried after next_attempt_at
    DONE = "done"
    FAILED = "failed"  # gave up after max attempts; `mailer failed retry ID` replays it


class ReportState(enum.StrEnum):
    NEW = "new"
    ACKNOWLEDGED = "acknowledged"
    ACCEPTED = "accepted"
    SCHEDULED = "scheduled"
    ANNOUNCED = "announced"
    PUBLISHED = "published"
    CLOSED = "closed"
    REJECTED = "rejected"
    DUPLICATE = "duplicate"


class OutboxState(enum.StrEnum):
    PENDING = "pending"
    SENT = "sent"
    FAILED = "failed"  # permanent failure or retry deadline passed
    DISMISSED = "dismissed"  # a failed one a human dealt with (`mailer outbox dismiss ID`)


class InboundMessage(Base):
    """A message exactly as it was received, stored before the sender was told 250."""

    __tablename__ = "inbound_messages"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    received_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    transport: Mapped[str] = mapped_column(String(16))  # smtp | lmtp | imap
    peer: Mapped[str] = mapped_column(String(255), default="")
    mail_from: Mapped[str] = mapped_column(String(998), default="")
    rcpt_tos: Mapped[list[Any]] = mapped_column(default=list)
    message_id: Mapped[str | None] = mapped_column(String(998))
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    # Redeliveries are recognised by Message-ID *and* content hash together.
    dedup_key: Mapped[str] = mapped_column(String(1100), unique=True)
    size: Mapped[int] = mapped_column(BigInteger)
    raw: Mapped[bytes] = mapped_column(EncryptedBytes("inbound_messages.raw"))  # encrypted at rest (mailer.atrest)
    state: Mapped[str] = mapped_column(String(16), default=InboundState.RECEIVED.value)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column()
    failed_step: Mapped[str | None] = mapped_column(String(64))
    last_error: Mapped[str | None] = mapped_column(Text)
    classification: Mapped[str | None] = mapped_column(String(32))
    report_id: Mapped[int | None] = mapped_column(ForeignKey("reports.id"))
    processed_at: Mapped[datetime | None] = mapped_column()
    # the instance processing it, until when (mailer.worker): another instance takes it over after that
    claimed_by: Mapped[str | None] = mapped_column(String(128))
    claimed_until: Mapped[datetime | None] = mapped_column()

    report: Mapped[Report | None] = relationship()

    __table_args__ = (
        Index("ix_inbound_state_next", "state", "next_attempt_at"),
        Index("ix_inbound_state_sender", "state", "mail_from", "id"),
    )


class Report(Base):
    __tablename__ = "reports"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tracking_id: Mapped[str] = mapped_column(String(32), unique=True)
    state: Mapped[str] = mapped_column(String(16), default=ReportState.NEW.value, index=True)
    reporter: Mapped[str] = mapped_column(String(998))
    # report content is encrypted at rest (mailer.atrest)
    subject: Mapped[str] = mapped_column(EncryptedText("reports.subject"), default="")
    fields: Mapped[dict[str, Any]] = mapped_column(EncryptedJSON("reports.fields"), default=dict)
    missing_fields: Mapped[list[Any]] = mapped_column(default=list)
    flags: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    acknowledged_at: Mapped[datetime | None] = mapped_column()
    # Set by maintainers' signed commands (mailer.commands).
    incident_manager: Mapped[str | None] = mapped_column(String(254))
    severity: Mapped[str | None] = mapped_column(String(16))
    cvss_vector: Mapped[str | None] = mapped_column(String(255))
    cvss_score: Mapped[float | None] = mapped_column(Float)
    cve: Mapped[str | None] = mapped_column(String(32))
    cve_requested_at: Mapped[datetime | None] = mapped_column()
    affected: Mapped[str | None] = mapped_column(String(500))
    fixed: Mapped[str | None] = mapped_column(String(100))
    advisory_url: Mapped[str | None] = mapped_column(String(500))
    release_version: Mapped[str | None] = mapped_column(String(100))
    release_url: Mapped[str | None] = mapped_column(String(500))
    disclose_at: Mapped[datetime | None] = mapped_column(index=True)
    duplicate_of: Mapped[str | None] = mapped_column(String(32))
    # what the advisory says in public (#summary), and how the reporter is credited (#credit; never their address)
    summary: Mapped[str | None] = mapped_column(String(500))
    credit: Mapped[str | None] = mapped_column(String(200))
    credit_none: Mapped[bool] = mapped_column(default=False)
    # The disclosure timeline (mailer.timeline, mailer.scheduler).
    accepted_at: Mapped[datetime | None] = mapped_column()
    cve_none: Mapped[bool] = mapped_column(default=False)  # `#cve none`: the release needs no CVE id
    published_at: Mapped[datetime | None] = mapped_column()  # the release email went out
    leaked_at: Mapped[datetime | None] = mapped_column()  # latest `#leak`
    publish_token_hash: Mapped[str | None] = mapped_column(String(64))  # sha256 of the one-time `#publish` token
    publish_token_until: Mapped[datetime | None] = mapped_column()
    publish_requested_at: Mapped[datetime | None] = mapped_column()  # `#publish TOKEN`: release at once

    messages: Mapped[list[ReportMessage]] = relationship(back_populates="report", order_by="ReportMessage.id")
    events: Mapped[list[Event]] = relationship(back_populates="report", order_by="Event.id")


class ReportMessage(Base):
    """A message of a report, in either direction."""

    __tablename__ = "report_messages"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    report_id: Mapped[int] = mapped_column(ForeignKey("reports.id"), index=True)
    direction: Mapped[str] = mapped_column(String(3))  # in | out
    kind: Mapped[str] = mapped_column(String(32))  # report | followup | bounce | autoreply | ack | notice
    message_id: Mapped[str | None] = mapped_column(String(998), index=True)
    sender: Mapped[str] = mapped_column(String(998), default="")
    inbound_id: Mapped[int | None] = mapped_column(ForeignKey("inbound_messages.id"))
    outbox_id: Mapped[int | None] = mapped_column(ForeignKey("outbox.id"))
    body_text: Mapped[str] = mapped_column(EncryptedText("report_messages.body_text"), default="")
    meta: Mapped[dict[str, Any]] = mapped_column(EncryptedJSON("report_messages.meta"), default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # lets one INSERT … RETURNING write several messages on SQLite (migration 0011); no meaning otherwise
    insert_sentinel: Mapped[int | None] = orm_insert_sentinel()

    report: Mapped[Report] = relationship(back_populates="messages")
    attachments: Mapped[list[Attachment]] = relationship(order_by="Attachment.id")
    #: set with the row (no flush needed for its id)
    outbox: Mapped[OutboxMessage | None] = relationship()


class Attachment(Base):
    __tablename__ = "attachments"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    report_message_id: Mapped[int] = mapped_column(ForeignKey("report_messages.id"), index=True)
    filename: Mapped[str] = mapped_column(EncryptedText("attachments.filename"), default="")
    content_type: Mapped[str] = mapped_column(String(255))
    size: Mapped[int] = mapped_column(BigInteger)
    data: Mapped[bytes | None] = mapped_column(EncryptedBytes("attachments.data"))  # None when over the size cap
    truncated: Mapped[bool] = mapped_column(default=False)


class Event(Base):
    """Append-only log: who did what to which report, and when."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    report_id: Mapped[int | None] = mapped_column(ForeignKey("reports.id"), index=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    kind: Mapped[str] = mapped_column(String(64))
    actor: Mapped[str] = mapped_column(String(998), default="system")
    detail: Mapped[dict[str, Any]] = mapped_column(EncryptedJSON("events.detail"), default=dict)
    inbound_id: Mapped[int | None] = mapped_column(ForeignKey("inbound_messages.id"))
    # the audit chain (mailer.audit): set in the transaction that adds the event
    prev_hash: Mapped[str | None] = mapped_column(String(64))
    hash: Mapped[str | None] = mapped_column(String(64), unique=True)
    seq: Mapped[int | None] = mapped_column(Integer, unique=True)  # place in the chain (1, 2, ...)
    # lets one INSERT … RETURNING write several events on SQLite (migration 0011); no meaning otherwise
    insert_sentinel: Mapped[int | None] = orm_insert_sentinel()

    report: Mapped[Report | None] = relationship(back_populates="events")


class AuditHead(Base):
    """The newest link of the audit chain (one row); updating it serialises the writers of events."""

    __tablename__ = "audit_head"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    last_hash: Mapped[str] = mapped_column(String(64))
    length: Mapped[int] = mapped_column(Integer, default=0)


class OutboxMessage(Base):
    """Outgoing mail: durable first, delivered by the sender task."""

    __tablename__ = "outbox"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    kind: Mapped[str] = mapped_column(String(32))  # ack | notice | alert | ...
    report_id: Mapped[int | None] = mapped_column(ForeignKey("reports.id"), index=True)
    # unique and set by us: it lets one INSERT … RETURNING take several rows on SQLite too (an insert sentinel)
    message_id: Mapped[str] = mapped_column(String(998), unique=True, insert_sentinel=True)
    mail_from: Mapped[str] = mapped_column(String(998))
    rcpt_tos: Mapped[list[Any]] = mapped_column()
    # lower-cased recipient the rate limit counts against (acks only)
    rate_key: Mapped[str | None] = mapped_column(String(998))
    raw: Mapped[bytes] = mapped_column(EncryptedBytes("outbox.raw"))  # a plain ack repeats the subject: encrypted at rest
    # queued unsigned: the sender signs it (outside the processing transaction) before the first attempt
    needs_signature: Mapped[bool] = mapped_column(default=False)
    # with needs_signature: the pinned keys (fingerprints) the sender encrypts it to, signed, before the first attempt
    encrypt_to: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)
    state: Mapped[str] = mapped_column(String(16), default=OutboxState.PENDING.value)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    deliver_until: Mapped[datetime] = mapped_column()
    last_error: Mapped[str | None] = mapped_column(Text)
    sent_at: Mapped[datetime | None] = mapped_column()
    # the instance delivering it, until when (outbound.sender)
    claimed_by: Mapped[str | None] = mapped_column(String(128))
    claimed_until: Mapped[datetime | None] = mapped_column()

    report: Mapped[Report | None] = relationship()

    __table_args__ = (
        Index("ix_outbox_state_next", "state", "next_attempt_at"),
        Index("ix_outbox_rate", "rate_key", "created_at"),
    )


class Counter(Base):
    """Named sequences, e.g. the tracking-id number per year."""

    __tablename__ = "counters"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[int] = mapped_column(Integer, default=0)


class Lease(Base):
    """A named lease one instance holds at a time (e.g. polling one IMAP mailbox), renewed while held."""

    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    holder: Mapped[str] = mapped_column(String(128))
    until: Mapped[datetime] = mapped_column()
    acquired_at: Mapped[datetime] = mapped_column(default=utcnow)


class ReportKey(Base):
    """An OpenPGP key a reporter sent: used only to encrypt to that reporter on that report.

    It is never imported into the service keyring, so it can authorise nothing.
    """

    __tablename__ = "report_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    report_id: Mapped[int] = mapped_column(ForeignKey("reports.id"), index=True)
    fingerprint: Mapped[str] = mapped_column(String(64), default="")
    key_blob: Mapped[bytes] = mapped_column(LargeBinary)
    source: Mapped[str] = mapped_column(String(32))  # message (an attachment or an Autocrypt header)
    inbound_id: Mapped[int | None] = mapped_column(ForeignKey("inbound_messages.id"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    report: Mapped[Report] = relationship()


class EmbargoMember(Base):
    """Who receives a report's details under embargo before disclosure."""

    __tablename__ = "embargo_members"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    report_id: Mapped[int] = mapped_column(ForeignKey("reports.id"), index=True)
    address: Mapped[str] = mapped_column(String(254))
    added_by: Mapped[str] = mapped_column(String(64))
    added_at: Mapped[datetime] = mapped_column(default=utcnow)


class CommandSignature(Base):
    """Signed command messages already applied: a signature is honoured once (replay protection)."""

    __tablename__ = "command_signatures"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    digest: Mapped[str] = mapped_column(String(64), unique=True)
    fingerprint: Mapped[str] = mapped_column(String(64))
    inbound_id: Mapped[int | None] = mapped_column(ForeignKey("inbound_messages.id"))
    applied_at: Mapped[datetime] = mapped_column(default=utcnow)


class ScheduledMailState(enum.StrEnum):
    PLANNED = "planned"  # only in a plan, never stored
    HELD = "held"  # due, but not sent (e.g. an incomplete release); recorded once
    SENT = "sent"
    FAILED = "failed"


class ScheduledMail(Base):
    """A timeline mail that fell due: the row with its unique key is the claim that it was handled.

    A shared advance notice has no ``report_id``; its reports' tracking ids are in ``reports``.
    """

    __tablename__ = "scheduled_mail"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(255), unique=True)
    report_id: Mapped[int | None] = mapped_column(ForeignKey("reports.id"), index=True)
    reports: Mapped[list[Any]] = mapped_column(default=list)
    kind: Mapped[str] = mapped_column(String(32))
    due_at: Mapped[datetime] = mapped_column()
    state: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(Text)
    recipients: Mapped[list[Any]] = mapped_column(default=list)
    detail: Mapped[dict[str, Any]] = mapped_column(EncryptedJSON("scheduled_mail.detail"), default=dict)
    sent_at: Mapped[datetime | None] = mapped_column()
    late_seconds: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
