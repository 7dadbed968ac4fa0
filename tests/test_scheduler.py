"""The timeline runner on a real database (SQLite and PostgreSQL): exactly once, never early, late but logged."""

from __future__ import annotations

import functools
import json
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import select, update

from mailer.app import Service
from mailer.clock import FakeClock
from mailer.config import AdvisoryConfig
from mailer.db import Database
from mailer.models import EmbargoMember, Event, OutboxMessage, Report, ScheduledMail
from mailer.scheduler import Scheduler
from tests.conftest import make_config
from tests.gpgtools import Home

BERLIN = ZoneInfo("Europe/Berlin")
LIST = "sec-announce@example.org"
MEMBER = "dana@distro.test"
NO_KEY = "nokey@distro.test"
DISCLOSE = datetime(2026, 3, 30, 9, tzinfo=BERLIN)  # Monday after the DST change: 07:00 UTC


def berlin(*args: int) -> datetime:
    return datetime(*args, tzinfo=BERLIN)


@functools.cache
def member_key() -> bytes:
    """One embargo member's public key per test session (generation is the slow part)."""
    home = Home()
    try:
        return home.export(home.gen_key("Dana Distro", MEMBER))
    finally:
        home.close()


@dataclass
class Env:
    service: Service
    scheduler: Scheduler
    clock: FakeClock

    @property
    def db(self) -> Database:
        return self.service.db


@pytest.fixture
def env(tmp_path: Path, migrated: str) -> Iterator[Env]:
    config = make_config(
        tmp_path, migrated, f"maildir:{tmp_path / 'out'}",
        schedule={"timezone": "Europe/Berlin", "holidays_country": "DE"},
        announce={"lists": [LIST]},
    )
    clock = FakeClock(berlin(2026, 3, 20, 10))
    service = Service(config, clock=clock)
    service._prepare_keys()
    service.gpg.import_public(member_key())
    yield Env(service, Scheduler(service.db, config, service.outbox, service.gpg, clock=clock), clock)
    service.db.dispose()


def add_report(db: Database, number: int = 1, *, complete: bool = True, disclose: datetime = DISCLOSE,
               state: str = "scheduled", members: tuple[str, ...] = (MEMBER,)) -> str:
    """A report accepted on 2026-03-16 with a disclosure date, created directly with the ORM."""
    tracking = f"SEC-2026-{number:04d}"
    accepted = berlin(2026, 3, 16, 11)
    with db.session() as session:
        report = Report(tracking_id=tracking, state=state, reporter="rita@reporter.test",
                        subject="Heap overflow in the frobnicator", created_at=berlin(2026, 3, 16, 10),
                        accepted_at=accepted, disclose_at=disclose, severity="high")
        if complete:
            report.release_version, report.release_url = "1.2.3", "https://example.org/releases/1.2.3"
            report.advisory_url, report.cve, report.fixed = "https://example.org/advisories/1", "CVE-2026-1234", "1.2.3"
        session.add(report)
        session.flush()
        session.add(Event(report_id=report.id, kind="state.accept", at=accepted))
        for address in members:
            session.add(EmbargoMember(report_id=report.id, address=address, added_by="test", added_at=berlin(2026, 3, 17, 10)))
    return tracking


def rows(db: Database, kind: str | None = None) -> list[ScheduledMail]:
    with db.session() as session:
        query = select(ScheduledMail).order_by(ScheduledMail.id)
        return list(session.scalars(query if kind is None else query.where(ScheduledMail.kind == kind)))


def outbox(db: Database, to: str | None = None) -> list[OutboxMessage]:
    with db.session() as session:
        return [m for m in session.scalars(select(OutboxMessage).order_by(OutboxMessage.id)) if to is None or to in m.rcpt_tos]


def state_of(db: Database, tracking: str) -> str:
    with db.session() as session:
        return str(session.scalar(select(Report.state).where(Report.tracking_id == tracking)))


def text(raw: bytes) -> str:
    """The text/plain parts of a (signed) message, whitespace collapsed."""
    message = message_from_bytes(raw, policy=policy.default)
    parts = [str(part.get_content()) for part in message.walk() if part.get_content_type() == "text/plain"]
    return " ".join(" ".join(parts).split())


def test_drain_twice_sends_each_mail_once(env: Env) -> None:
    """A second drain at the same instant finds everything recorded: no new row, no new outbox mail."""
    add_report(env.db)
    env.clock.set(DISCLOSE + timedelta(minutes=1))
    assert env.scheduler.drain() > 0
    first_rows, first_mail = len(rows(env.db)), len(outbox(env.db))
    assert env.scheduler.drain() == 0
    assert (len(rows(env.db)), len(outbox(env.db))) == (first_rows, first_mail)
    assert len(outbox(env.db, LIST)) == 2  # the advance notice (at once: it was overdue) and the release


def test_timeline_walk_through_a_weekend_and_a_dst_change(env: Env) -> None:
    """Embargo notice at once, advance notice and preview at their instants, release exactly at disclosure."""
    tracking = add_report(env.db, members=(MEMBER, NO_KEY))
    env.scheduler.drain()
    notices = outbox(env.db, MEMBER)
    # queued to be encrypted to the member's key by the sender, before its first attempt
    assert len(notices) == 1 and notices[0].needs_signature and len(notices[0].encrypt_to or []) == 1
    assert b"multipart/encrypted" in env.service.outbox.sign(notices[0].raw, tuple(notices[0].encrypt_to or ()))
    assert not outbox(env.db, NO_KEY)
    assert any("member_key" in (r.detail.get("topic") or "") for r in rows(env.db, "reminder"))
    env.clock.set(berlin(2026, 3, 23, 8, 59))  # Monday, CET: the notice is due at 09:00 local = 08:00 UTC
    env.scheduler.drain()
    assert not outbox(env.db, LIST) and state_of(env.db, tracking) == "scheduled"
    env.clock.set(berlin(2026, 3, 23, 9))
    env.scheduler.drain()
    announce = outbox(env.db, LIST)
    assert len(announce) == 1 and state_of(env.db, tracking) == "announced"
    body = text(announce[0].raw)
    assert "forthcoming security release" in body and "2026-03-30" in body and "High" in body
    for word in ("frobnicator", "Heap", tracking, "CVE-2026-1234", "rita", "1.2.3"):
        assert word not in body
    env.clock.set(berlin(2026, 3, 27, 9))  # Friday: the release preview, one workday before
    env.scheduler.drain()
    previews = {r.detail["announces"]: r for r in rows(env.db, "preview")}
    assert sorted(previews) == ["advance_notice", "release"]
    assert previews["release"].due_at == berlin(2026, 3, 27, 9) and previews["release"].late_seconds == 0
    env.clock.set(DISCLOSE - timedelta(seconds=1))  # Monday 08:59:59 CEST, after the weekend and the DST change
    env.scheduler.drain()
    assert not rows(env.db, "release")
    env.clock.set(DISCLOSE)
    env.scheduler.drain()
    (release,) = rows(env.db, "release")
    assert release.due_at == DISCLOSE.astimezone(UTC) and release.late_seconds == 0
    assert state_of(env.db, tracking) == "published" and len(outbox(env.db, LIST)) == 2
    assert "1.2.3" in text(outbox(env.db, LIST)[-1].raw)
    assert len(outbox(env.db, MEMBER)) == 2 and outbox(env.db, "rita@reporter.test")
    assert len(rows(env.db, "embargo_lifted")) == 1


def test_a_service_down_over_the_instant_sends_late_and_says_so(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    """Three days after the instant the release goes on the first drain, with late_seconds recorded and logged."""
    tracking = add_report(env.db)
    env.scheduler.drain()
    env.clock.set(DISCLOSE + timedelta(days=3))
    with caplog.at_level(logging.WARNING, logger="mailer.scheduler"):
        env.scheduler.drain()
    (release,) = rows(env.db, "release")
    assert release.late_seconds == pytest.approx(3 * 86400)
    assert state_of(env.db, tracking) == "published"
    assert any("late" in record.getMessage() and "release" in record.getMessage() for record in caplog.records)


def test_an_incomplete_release_is_held_once_and_goes_when_complete(env: Env) -> None:
    """At the instant an incomplete release is held (maintainers alerted), never sent half-filled."""
    tracking = add_report(env.db, complete=False)
    env.clock.set(DISCLOSE)
    env.scheduler.drain()
    (held,) = rows(env.db, "release_held")
    assert held.state == "held" and "release" in (held.reason or "") and "advisory" in (held.reason or "")
    assert len([m for m in outbox(env.db) if m.kind == "alert" and b"HELD" in m.raw]) == 2  # both maintainers
    assert len(outbox(env.db, LIST)) == 1  # the advance notice only
    env.clock.advance(minutes=5)
    env.scheduler.drain()
    assert len(rows(env.db, "release_held")) == 1 and state_of(env.db, tracking) == "announced"
    with env.db.session() as session:
        report = session.scalars(select(Report).where(Report.tracking_id == tracking)).one()
        report.release_version, report.release_url = "1.2.3", "https://example.org/releases/1.2.3"
        report.advisory_url, report.cve_none = "https://example.org/advisories/1", True
    env.clock.advance(minutes=5)
    env.scheduler.drain()
    assert len(rows(env.db, "release")) == 1 and state_of(env.db, tracking) == "published"


def test_two_schedulers_on_one_database_send_each_mail_once(env: Env) -> None:
    """Two instances draining concurrently from two threads produce every scheduled mail exactly once."""
    for number in range(1, 5):
        add_report(env.db, number, disclose=DISCLOSE + timedelta(hours=number))
    other_db = Database(env.db.url)
    try:
        other = Scheduler(other_db, env.service.config, env.service.outbox, env.service.gpg, clock=env.clock)
        env.clock.set(DISCLOSE + timedelta(days=1))
        barrier = threading.Barrier(2)
        errors: list[BaseException] = []

        def run(scheduler: Scheduler) -> None:
            try:
                barrier.wait()
                scheduler.drain()
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(s,)) for s in (env.scheduler, other)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert not errors
    finally:
        other_db.dispose()
    by_recipient: dict[str, int] = {}
    for message in outbox(env.db):
        by_recipient[message.rcpt_tos[0]] = by_recipient.get(message.rcpt_tos[0], 0) + 1
    assert by_recipient[LIST] == 1 + 4  # one shared advance notice, four releases
    assert by_recipient[MEMBER] == 4 + 4  # a notice and an embargo_lifted per report
    assert by_recipient["rita@reporter.test"] == 4
    assert all(state_of(env.db, f"SEC-2026-{n:04d}") == "published" for n in range(1, 5))
    keys = [r.key for r in rows(env.db)]
    assert len(keys) == len(set(keys))


def test_listing_and_dry_run_show_without_sending(env: Env) -> None:
    """The listing shows kinds, UTC instants and member counts (addresses only on request); dry-run sends nothing."""
    add_report(env.db, members=(MEMBER, NO_KEY))
    listing = env.scheduler.listing()
    kinds = {entry["kind"] for entry in listing}
    assert {"embargo_notice", "advance_notice", "release", "preview"} <= kinds
    release = next(e for e in listing if e["kind"] == "release")
    assert release["due_at"] == "2026-03-30T07:00:00Z" and release["state"] == "planned"
    assert MEMBER not in repr(listing) and "1 embargo member" in repr(listing)
    assert MEMBER in repr(env.scheduler.listing(members=True))
    would = env.scheduler.preview(DISCLOSE)
    assert {"release", "advance_notice"} <= {str(item.kind) for item in would}
    assert not rows(env.db) and not outbox(env.db)


def release_mails(db: Database) -> list[EmailMessage]:
    mails = [message_from_bytes(row.raw, policy=policy.default) for row in outbox(db, LIST)]
    return [m for m in mails if isinstance(m, EmailMessage) and "Security release available" in text(m.as_bytes())]


def json_parts(mail: EmailMessage) -> list[tuple[str | None, bytes]]:
    return [(part.get_filename(), part.get_payload(decode=True)) for part in mail.walk()
            if part.get_content_type() == "application/json"]


def test_the_release_email_attaches_the_osv_record(env: Env) -> None:
    """[advisory] ecosystem and package set and a #summary given: the list's release mail carries the report's
    OSV record (schema-valid: osv_record validates it), with the summary and the fixed version, nothing of the reporter."""
    config = env.service.config.model_copy(update={"advisory": AdvisoryConfig(ecosystem="PyPI", package="frobnicator")})
    scheduler = Scheduler(env.db, config, env.service.outbox, env.service.gpg, clock=env.clock)
    tracking = add_report(env.db)
    with env.db.session() as session:
        session.execute(update(Report).where(Report.tracking_id == tracking).values(summary="Heap overflow in frob()"))
    env.clock.set(DISCLOSE)
    scheduler.drain()
    (release,) = release_mails(env.db)
    ((name, data),) = json_parts(release)
    record = json.loads(data)
    assert name == f"{tracking}.osv.json" and record["id"] == tracking and record["summary"] == "Heap overflow in frob()"
    assert record["affected"][0]["package"] == {"ecosystem": "PyPI", "name": "frobnicator"}
    assert {"fixed": "1.2.3"} in record["affected"][0]["ranges"][0]["events"] and record["aliases"] == ["CVE-2026-1234"]
    assert "rita" not in data.decode() and "attached" in text(release.as_bytes())


def test_the_release_email_goes_without_a_record_that_cannot_be_written(env: Env) -> None:
    """No [advisory] package configured (the default), or no #summary: the release goes, with no attachment."""
    add_report(env.db)
    env.clock.set(DISCLOSE)
    env.scheduler.drain()
    (release,) = release_mails(env.db)
    assert json_parts(release) == [] and "OSV" not in text(release.as_bytes())
