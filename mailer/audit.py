"""A tamper-evident audit trail: every event is chained to the one before it by SHA-256.

Each :class:`~mailer.models.Event` row carries ``prev_hash`` (the hash of the
event before it, over the whole database), ``hash`` (SHA-256 of ``prev_hash``
and the event's canonical content) and ``seq``, its place in the chain. The
chain is extended when the transaction that adds the events commits
(:func:`chain_events`, a ``before_commit`` hook; :func:`collect_events`
notes the events each flush inserts, by the ORM or by :mod:`mailer.inserts`): the single
:class:`~mailer.models.AuditHead` row is updated first, which serialises the
writers' chaining on both SQLite and PostgreSQL, so the chain stays linear
with several instances. On PostgreSQL the ids of concurrent transactions'
events interleave; chain order is ``seq``, which is what :func:`verify` walks.
One chaining per transaction (not per flush) keeps the head row locked only
for the commit itself.

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
from sqlalchemy.orm import Session, SessionTransaction

from mailer.config import ParsingConfig
from mailer.models import AuditHead, CommandSignature, Event, InboundMessage
from mailer.openpgp import OpenPGP
from mailer.pgpmime import unwrap

GENESIS = "0" * 64
_UNCHAINED = "audit_unchained"  # session.info: events flushed, not chained yet


def canonical(item: Event) -> bytes:
    """The event's content as hashed: compact JSON with sorted keys, times in UTC."""
    at = item.at
    stamp = (at if at.tzinfo is not None else at.replace(tzinfo=UTC)).astimezone(UTC).isoformat()
    content = {"id": item.id, "report_id": item.report_id, "at": stamp, "kind": item.kind, "actor": item.actor,
               "detail": item.detail, "inbound_id": item.inbound_id}
    return json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str).encode("utf-8")


def link(prev_hash: str, content: bytes) -> str:
    return hashlib.sha256(prev_hash.encode("ascii") + b"\n" + content).hexdigest()


def collect_events(session: Session, instance: object) -> None:
    """``pending_to_persistent``: note an event just inserted (its id is known now), to be chained at commit."""
    if isinstance(instance, Event):
        session.info.setdefault(_UNCHAINED, []).append(instance)


def forget_events(session: Session, previous: SessionTransaction) -> None:
    """``after_soft_rollback``: events of a transaction that rolled back are not chained (a savepoint's
    are dropped at commit: the rollback expunged them)."""
    if previous.parent is None:
        session.info.pop(_UNCHAINED, None)


def chain_events(session: Session) -> None:
    """``before_commit``: give the transaction's events their place in the chain, in one go."""
    if session.in_nested_transaction():
        return  # a savepoint: its events are chained with the transaction's
    session.flush()
    noted = session.info.pop(_UNCHAINED, None)
    # events of a savepoint that rolled back were expunged: they are not in the database
    new = sorted((item for item in noted or () if item in session), key=lambda e: e.id)
    if not new:
        return
    connection = session.connection()
    # Updating the head first takes the write lock (SQLite) / the row lock (PostgreSQL) until commit.
    prev, length = connection.execute(_EXTEND, {"count": len(new)}).one()
    links = []
    for seq, item in enumerate(new, start=length - len(new) + 1):
        digest = link(prev, canonical(item))
        links.append({"event_id": item.id, "prev": prev, "digest": digest, "position": seq})
        prev = digest
    connection.execute(_LINK, links)
    connection.execute(_HEAD, {"last": prev})


# the chaining's statements, built once (each commit of a processed message runs them)
_EVENTS = cast(Table, Event.__table__)
_EXTEND = (update(AuditHead).where(AuditHead.id == 1).values(length=AuditHead.length + bindparam("count"))
           .returning(AuditHead.last_hash, AuditHead.length))
_LINK = (update(_EVENTS).where(_EVENTS.c.id == bindparam("event_id"))
         .values(prev_hash=bindparam("prev"), hash=bindparam("digest"), seq=bindparam("position")))
_HEAD = update(AuditHead).where(AuditHead.id == 1).values(last_hash=bindparam("last"))


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


def _events(session: Session, *, chained: bool, batch: int = 500) -> Iterator[Event]:
    """The events before the chain (no ``seq``) in id order, or the chained ones in chain order."""
    order = Event.seq if chained else Event.id
    where = Event.seq.is_not(None) if chained else Event.seq.is_(None)
    last = 0
    while True:
        rows = list(session.scalars(select(Event).where(where, order > last).order_by(order).limit(batch)))
        if not rows:
            return
        yield from rows
        last = (rows[-1].seq or 0) if chained else rows[-1].id


def _check_chain(session: Session, result: Verification) -> None:
    last_unchained = 0
    for item in _events(session, chained=False):
        result.events += 1
        if item.hash is not None or item.prev_hash is not None:
            result.findings.append(Finding(item.id, "event has a hash but no place in the chain (seq removed?)"))
            return
        result.unchained += 1
        last_unchained = item.id
    prev = GENESIS
    for position, item in enumerate(_events(session, chained=True), start=1):
        result.events += 1
        if item.hash is None:
            result.findings.append(Finding(item.id, "event has no hash after the chain began (hash removed?)"))
            return
        if item.id < last_unchained:
            result.findings.append(Finding(last_unchained, "event has no hash after the chain began (hash removed?)"))
            return
        if item.seq != position or item.prev_hash != prev:
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
    if head is not None and head.last_hash != prev:
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
