"""New rows written by Core inserts ahead of the ORM's flush (mailer.inserts): the same rows as the ORM's, or the ORM's.

Each test counts the INSERT statements the database saw and reads the rows back in
a new session; `inserts.written` says whether this module or the ORM wrote them.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from sqlalchemy import event, select

from mailer import audit, inserts
from mailer.config import ParsingConfig
from mailer.db import Database
from mailer.models import Attachment, Event, InboundMessage, OutboxMessage, Report, ReportMessage
from mailer.openpgp import OpenPGP
from tests.conftest import gnupg_home

NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)


@pytest.fixture
def db(migrated: str) -> Iterator[Database]:
    database = Database(migrated)
    yield database
    database.engine.dispose()


@pytest.fixture
def statements(db: Database) -> list[str]:
    seen: list[str] = []
    event.listen(db.engine, "before_cursor_execute", lambda _c, _cur, sql, *_a: seen.append(sql.split(None, 3)[:3]))
    return seen  # type: ignore[return-value]


def inserted_tables(seen: list[str]) -> list[str]:
    return [words[2].strip('"') for words in seen if words[0] == "INSERT"]  # type: ignore[index]


def _inbound(db: Database) -> int:
    with db.session() as session:
        inbound = InboundMessage(raw=b"Subject: x\r\n\r\nbody\r\n", transport="smtp", mail_from="r@example.org",
                                 rcpt_tos=["security@example.org"], sha256="0" * 64, dedup_key="k", size=21)
        session.add(inbound)
    return inbound.id


def _outbox(message_id: str, report: Report | None) -> OutboxMessage:
    return OutboxMessage(kind="notice", report=report, message_id=message_id, mail_from="security@example.org",
                         rcpt_tos=["m@example.org"], raw=b"x", created_at=NOW, next_attempt_at=NOW, deliver_until=NOW)


def test_a_new_report_is_one_insert_per_table_with_what_the_orm_would_write(db: Database, statements: list[str]) -> None:
    inbound_id = _inbound(db)
    before = inserts.written
    statements.clear()
    with db.session() as session:
        inbound = session.get(InboundMessage, inbound_id)
        assert inbound is not None
        report = Report(tracking_id="SEC-1", reporter="r@example.org", subject="secret subject", created_at=NOW,
                        updated_at=NOW)
        message = ReportMessage(report=report, direction="in", kind="report", body_text="the details",
                                inbound_id=inbound_id, created_at=NOW)
        message.attachments = [Attachment(filename="a.txt", content_type="text/plain", size=1, data=b"a"),
                               Attachment(filename="b.txt", content_type="text/plain", size=1, data=b"b")]
        notices = [_outbox(f"<n{i}@example.org>", report) for i in range(2)]
        for outbox in notices:
            ReportMessage(report=report, direction="out", kind="notice", message_id=outbox.message_id, outbox=outbox,
                          created_at=NOW)
        session.add_all([report, *notices])
        for kind in ("report.filed", "ack.queued", "notice.queued"):
            session.add(Event(report=report, kind=kind, detail={"k": kind}, inbound_id=inbound_id, at=NOW))
        inbound.report = report
    assert inserts.written - before == 1 + 3 + 2 + 2 + 3
    # one multi-row statement per table, parents first (the inbound row's report_id is the ORM's UPDATE)
    # (attachments have no insert sentinel: on SQLite one row per statement, as the ORM writes them)
    tables = inserted_tables(statements)
    assert tables.count("attachments") in (1, 2) and all(tables.count(t) == 1 for t in set(tables) - {"attachments"})
    assert sorted(set(tables)) == ["attachments", "events", "outbox", "report_messages", "reports"]
    assert tables.index("reports") == 0 and tables.index("outbox") < tables.index("report_messages") < tables.index("attachments")
    # the objects hold what was written: ids, foreign keys, the columns' defaults
    assert report.id and report.state == "new" and report.fields == {} and report.missing_fields == []
    assert all(m.report_id == report.id for m in report.messages) and len(report.messages) == 3
    assert [a.report_message_id for a in message.attachments] == [message.id, message.id]
    with db.reading() as session:
        stored = session.get(Report, report.id)
        assert stored is not None and stored.subject == "secret subject" and stored.state == "new"
        rows = session.scalars(select(ReportMessage).where(ReportMessage.report_id == report.id)
                               .order_by(ReportMessage.id)).all()
        assert [(r.direction, r.outbox_id) for r in rows] == [("in", None)] + [("out", o.id) for o in notices]
        assert rows[0].body_text == "the details" and [a.data for a in rows[0].attachments] == [b"a", b"b"]
        assert session.scalars(select(Event.kind).where(Event.report_id == report.id).order_by(Event.id)).all() == [
            "report.filed", "ack.queued", "notice.queued"]
        linked = session.get(InboundMessage, inbound_id)
        assert linked is not None and linked.report_id == report.id
        # the events were chained at commit like any other
        result = audit.verify(session, OpenPGP(gnupg_home()), ParsingConfig())
        assert result.ok and result.events == 3, result.findings


def test_a_rolled_back_savepoint_takes_its_rows_and_events_with_it(db: Database) -> None:
    with db.session() as session:
        report = Report(tracking_id="SEC-2", reporter="r@example.org", created_at=NOW, updated_at=NOW)
        session.add(report)
        session.flush()
        savepoint = session.begin_nested()
        session.add(Event(report=report, kind="dropped", at=NOW))
        session.flush()
        savepoint.rollback()
        session.add(Event(report=report, kind="kept", at=NOW))
    with db.reading() as session:
        assert session.scalars(select(Event.kind)).all() == ["kept"]
        assert audit.verify(session, OpenPGP(gnupg_home()), ParsingConfig()).ok


def test_a_new_child_of_an_existing_parents_collection_is_left_to_the_orm(db: Database) -> None:
    with db.session() as session:
        report = Report(tracking_id="SEC-3", reporter="r@example.org", created_at=NOW, updated_at=NOW)
        message = ReportMessage(report=report, direction="in", kind="report", created_at=NOW)
        session.add(report)
    before = inserts.written
    with db.session() as session:
        stored = session.get(ReportMessage, message.id)
        assert stored is not None
        stored.attachments.append(Attachment(filename="late.txt", content_type="text/plain", size=4, data=b"late"))
    assert inserts.written == before  # the attachment knows its parent only from the collection: the ORM's
    with db.reading() as session:
        assert session.scalars(select(Attachment.report_message_id)).all() == [message.id]


def test_an_object_with_its_own_id_is_left_to_the_orm(db: Database) -> None:
    before = inserts.written
    with db.session() as session:
        session.add(Report(id=4242, tracking_id="SEC-4", reporter="r@example.org", created_at=NOW, updated_at=NOW))
    assert inserts.written == before
    with db.reading() as session:
        assert session.scalar(select(Report.tracking_id).where(Report.id == 4242)) == "SEC-4"


def test_a_class_with_insert_listeners_is_left_to_the_orm(db: Database) -> None:
    """A mapper event of the application (here: one that stamps the actor) must still run."""
    def stamp(_mapper: object, _connection: object, target: Event) -> None:
        target.actor = "stamped"

    event.listen(Event, "before_insert", stamp)
    try:
        before = inserts.written
        with db.session() as session:
            session.add(Event(kind="listened", at=NOW))
        assert inserts.written == before
    finally:
        event.remove(Event, "before_insert", stamp)
    with db.reading() as session:
        assert session.scalars(select(Event.actor)).all() == ["stamped"]
