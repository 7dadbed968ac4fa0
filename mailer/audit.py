"""A tamper-evident audit trail: every event is chained to the one before it by SHA-256.

Each :class:`~mailer.models.Event` row carries ``prev_hash`` (the hash of the
event before it, over the whole database) and ``hash`` (SHA-256 of
``prev_hash`` and the event's canonical content). The chain is extended in
the transaction that adds the events (:func:`chain_new_events`, an
``after_flush`` hook): the single :class:`~mailer.models.AuditHead` row is
updated first, which serialises writers on both SQLite and PostgreSQL, so
the chain stays linear with several instances.

:func:`verify` walks the chain and reports the first broken link, and
re-verifies the OpenPGP signature of every command mail kept
(:class:`~mailer.models.CommandSignature` → the raw bytes received) against
the maintainer key recorded when it was applied. Events written before the
chain existed (an older database) have no hash and are reported as such;
they must all come before the first chained event.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC
from typing import Any, cast

from sqlalchemy import Table, bindparam, select, update
from sqlalchemy.orm import Session

from mailer.config import ParsingConfig
from mailer.models import AuditHead, CommandSignature, Event, InboundMessage
from mailer.openpgp import OpenPGP
from mailer.pgpmime import unwrap

GENESIS = "0" * 64


def canonical(item: Event) -> bytes:
    """The event's content as hashed: compact JSON with sorted keys, times in UTC."""
    at = item.at
    stamp = (at if at.tzinfo is not None else at.replace(tzinfo=UTC)).astimezone(UTC).isoformat()
    content = {"id": item.id, "report_id": item.report_id, "at": stamp, "kind": item.kind, "actor": item.actor,
               "detail": item.detail, "inbound_id": item.inbound_id}
    return json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str).encode("utf-8")


def link(prev_hash: str, content: bytes) -> str:
    return hashlib.sha256(prev_hash.encode("ascii") + b"\n" + content).hexdigest()


def chain_new_events(session: Session, _flush_context: object) -> None:
    """``after_flush``: give the events just inserted their place in the chain (ids are known now)."""
    new = sorted((obj for obj in session.new if isinstance(obj, Event)), key=lambda e: e.id)
    if not new:
        return
    connection = session.connection()
    # Updating the head first takes the write lock (SQLite) / the row lock (PostgreSQL) until commit.
    prev = connection.execute(
        update(AuditHead).where(AuditHead.id == 1).values(length=AuditHead.length + len(new)).returning(AuditHead.last_hash)
    ).scalar_one()
    links = []
    for item in new:
        digest = link(prev, canonical(item))
        links.append({"event_id": item.id, "prev": prev, "digest": digest})
        prev = digest
    events = cast(Table, Event.__table__)
    connection.execute(update(events).where(events.c.id == bindparam("event_id"))
                       .values(prev_hash=bindparam("prev"), hash=bindparam("digest")), links)
    connection.execute(update(AuditHead).where(AuditHead.id == 1).values(last_hash=prev))


@dataclass
class Finding:
    event_id: int | None
    what: str


@dataclass
class Verification:
    events: int = 0
    unchained: int = 0  # events from before the chain existed
    signatures: int = 0
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "events": self.events, "unchained_before_chain": self.unchained,
                "signatures_checked": self.signatures,
                "findings": [{"event_id": f.event_id, "what": f.what} for f in self.findings]}


def _events(session: Session, batch: int = 500) -> Iterator[Event]:
    last = 0
    while True:
        rows = list(session.scalars(select(Event).where(Event.id > last).order_by(Event.id).limit(batch)))
        if not rows:
            return
        yield from rows
        last = rows[-1].id


def _check_chain(session: Session, result: Verification) -> None:
    prev: str | None = None
    for item in _events(session):
        result.events += 1
        if item.hash is None:
            if prev is not None:
                result.findings.append(Finding(item.id, "event has no hash after the chain began (hash removed?)"))
                return
            result.unchained += 1
            continue
        expected_prev = GENESIS if prev is None else prev
        if item.prev_hash != expected_prev:
            result.findings.append(Finding(item.id, "link broken: prev_hash does not match the event before it "
                                                    "(an event was deleted, inserted or reordered)"))
            return
        content = canonical(item)
        if link(item.prev_hash, content) != item.hash:
            result.findings.append(Finding(item.id, f"content changed: event {item.id} ({item.kind}) no longer "
                                                    "matches its hash"))
            return
        prev = item.hash
    head = session.get(AuditHead, 1)
    if head is not None and prev is not None and head.last_hash != prev:
        result.findings.append(Finding(None, "the newest events were removed: the chain head names a later event"))


def _check_signatures(session: Session, gpg: OpenPGP, limits: ParsingConfig, result: Verification) -> None:
    for signature in session.scalars(select(CommandSignature).order_by(CommandSignature.id)):
        result.signatures += 1
        inbound = session.get(InboundMessage, signature.inbound_id) if signature.inbound_id else None
        if inbound is None or not inbound.raw:
            result.findings.append(Finding(None, f"command mail {signature.inbound_id} signed by "
                                                 f"{signature.fingerprint} is missing its raw bytes"))
            continue
        parts = unwrap(inbound.raw, gpg, limits=limits).text_parts
        if not any(p.signature_valid and p.signer_fpr == signature.fingerprint for p in parts):
            result.findings.append(Finding(None, f"command mail {inbound.id}: the signature by "
                                                 f"{signature.fingerprint} no longer verifies over the kept bytes"))


def verify(session: Session, gpg: OpenPGP, limits: ParsingConfig) -> Verification:
    """Walk the chain and re-verify every kept command signature; the findings say what broke, first first."""
    result = Verification()
    _check_chain(session, result)
    _check_signatures(session, gpg, limits, result)
    return result


def history(session: Session, report_id: int) -> list[dict[str, Any]]:
    """A report's events in time order, with the actor (a maintainer's fingerprint for commands)."""
    rows = session.scalars(select(Event).where(Event.report_id == report_id).order_by(Event.at, Event.id))
    return [{"id": e.id, "at": e.at.isoformat(), "kind": e.kind, "actor": e.actor, "hash": e.hash,
             "detail": e.detail} for e in rows]
