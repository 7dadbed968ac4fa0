"""The audit trail is a hash chain: an edited or deleted event, or tampered command bytes, are found and named."""

from __future__ import annotations

import contextlib

from sqlalchemy import delete, select, text, update

from mailer import audit
from mailer.app import Service
from mailer.config import ParsingConfig
from mailer.db import Database
from mailer.models import CommandSignature, Event, InboundMessage
from mailer.openpgp import OpenPGP
from tests.conftest import gnupg_home
from tests.gpgtools import Home
from tests.test_cli import mailer
from tests.test_commands import file_report, mara, send_command, signed, svc

__all__ = ["mara", "svc"]


def verify(service: Service) -> audit.Verification:
    with service.db.session() as session:
        return audit.verify(session, service.gpg, service.config.parsing)


async def _life(service: Service, home: Home, fpr: str) -> str:
    report = await file_report(service)
    await send_command(service, signed(home, fpr, f"#report {report.tracking_id}\n#accept\n#severity high\n", msgid="<a1@p>"))
    return report.tracking_id


async def test_untouched_chain_verifies_with_its_command_signature(svc: Service, mara: tuple[Home, str]) -> None:
    """Every event is chained and the signed command mail still verifies against the maintainer's key."""
    home, fpr = mara
    await _life(svc, home, fpr)
    result = verify(svc)
    assert result.ok, result.findings
    assert result.events > 3 and result.unchained == 0 and result.signatures == 1
    with svc.db.session() as session:
        hashes = list(session.scalars(select(Event.hash).order_by(Event.id)))
    assert all(hashes) and len(set(hashes)) == len(hashes)


async def test_an_event_edited_with_plain_sql_is_named(svc: Service, mara: tuple[Home, str]) -> None:
    """Changing one event's content in the database breaks its link, and verify names that event."""
    home, fpr = mara
    await _life(svc, home, fpr)
    with svc.db.session() as session:
        target = session.scalar(select(Event.id).where(Event.kind == "report.severity"))
        session.execute(text("UPDATE events SET actor = 'someone-else' WHERE id = :id"), {"id": target})
    result = verify(svc)
    assert not result.ok
    assert result.findings[0].event_id == target and "content changed" in result.findings[0].what


async def test_a_deleted_event_breaks_the_link_after_it(svc: Service, mara: tuple[Home, str]) -> None:
    """Removing an event from the middle is found at the next event's link."""
    home, fpr = mara
    await _life(svc, home, fpr)
    with svc.db.session() as session:
        ids = list(session.scalars(select(Event.id).order_by(Event.id)))
        session.execute(delete(Event).where(Event.id == ids[2]))
    result = verify(svc)
    assert not result.ok and result.findings[0].event_id == ids[3] and "link broken" in result.findings[0].what


async def test_tampered_command_bytes_are_reported(svc: Service, mara: tuple[Home, str]) -> None:
    """A kept command mail whose bytes were changed no longer verifies; verify says which and by whom."""
    home, fpr = mara
    await _life(svc, home, fpr)
    with svc.db.session() as session:
        inbound_id = session.scalar(select(CommandSignature.inbound_id))
        raw = session.scalar(select(InboundMessage.raw).where(InboundMessage.id == inbound_id))
        assert raw is not None and b"#severity high" in raw
        session.execute(update(InboundMessage).where(InboundMessage.id == inbound_id)
                        .values(raw=raw.replace(b"#severity high", b"#severity  low")))
    result = verify(svc)
    assert not result.ok
    assert any(fpr in f.what and "no longer verifies" in f.what for f in result.findings)


async def test_cli_audit_verify_and_show(svc: Service, mara: tuple[Home, str]) -> None:
    """`mailer audit verify --json` exits 0 then 1 after tampering; `audit show` lists the signer's fingerprint."""
    home, fpr = mara
    tracking_id = await _life(svc, home, fpr)
    code, out = await mailer(svc.config, "audit", "verify", "--json")
    assert code == 0 and '"ok": true' in out
    code, out = await mailer(svc.config, "audit", "show", tracking_id)
    assert code == 0 and fpr in out and "state.accept" in out
    with svc.db.session() as session:
        session.execute(text("UPDATE events SET kind = 'note' WHERE kind = 'state.accept'"))
    code, out = await mailer(svc.config, "audit", "verify")
    assert code == 1 and "BROKEN" in out


def test_interleaved_transactions_chain_in_commit_order(migrated: str) -> None:
    """Two writers whose events' ids interleave (PostgreSQL takes ids at INSERT): the chain is in commit order,
    every event of a rolled-back savepoint or transaction stays out of it, and the whole chain verifies."""
    db = Database(migrated)
    try:
        first, second = db._sessions(), db._sessions()  # two transactions at once, as two instances have
        if db.is_sqlite:  # one writer at a time: the second transaction's inserts wait for the first commit
            first.add(Event(kind="a.1"))
            first.flush()
            first.add(Event(kind="a.2"))
            first.commit()
            second.add(Event(kind="b.1"))
            second.commit()
        else:
            first.add(Event(kind="a.1"))
            first.flush()
            second.add(Event(kind="b.1"))
            second.flush()
            first.add(Event(kind="a.2"))
            first.flush()
            first.commit()  # chains a.1, a.2 (ids 1 and 3)
            second.commit()  # then b.1 (id 2)
        with db.session() as session:
            session.add(Event(kind="kept"))
            savepoint = session.begin_nested()
            session.add(Event(kind="rolled back with its savepoint"))
            session.flush()
            savepoint.rollback()
        with contextlib.suppress(RuntimeError), db.session() as session:
            session.add(Event(kind="rolled back with its transaction"))
            session.flush()
            raise RuntimeError("the transaction fails after its flush")
        with db.session() as session:
            rows = list(session.execute(select(Event.kind, Event.seq, Event.id).order_by(Event.seq)))
            result = audit.verify(session, OpenPGP(gnupg_home()), ParsingConfig())
        assert [kind for kind, _seq, _id in rows] == ["a.1", "a.2", "b.1", "kept"]
        assert [seq for _kind, seq, _id in rows] == [1, 2, 3, 4]
        if not db.is_sqlite:
            assert [id_ for _kind, _seq, id_ in rows][:3] != sorted(id_ for _kind, _seq, id_ in rows)[:3]
        assert result.ok, result.findings
        assert result.events == 4
    finally:
        first.close()
        second.close()
        db.dispose()


async def test_a_removed_place_in_the_chain_is_found(svc: Service, mara: tuple[Home, str]) -> None:
    """An event taken out of the chain order (seq and hash cleared) is named, as a hash removed."""
    home, fpr = mara
    await _life(svc, home, fpr)
    with svc.db.session() as session:
        ids = list(session.scalars(select(Event.id).order_by(Event.seq)))
        session.execute(update(Event).where(Event.id == ids[3]).values(seq=None, hash=None, prev_hash=None))
    result = verify(svc)
    assert not result.ok and "no hash after the chain began" in result.findings[0].what
