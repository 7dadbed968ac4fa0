"""Issue 8 end to end: a report's whole disclosure timeline over SMTP, signed commands and a moving FakeClock.

Everything is real: the SMTP listener, the capture relay, GnuPG homes for the
maintainers, the embargo members and the reporter (each reads their mail with
their own secret key), SQLite and PostgreSQL. Time only moves when a test moves
the :class:`~mailer.clock.FakeClock`; command mails are signed at the fake time
(``gpg --faked-system-time``) like a maintainer's client would sign them then.
The walk starts on Monday 2026-03-23 in Europe/Berlin with German holidays, so
``#disclose +5`` lands on Monday 2026-03-30 09:00 CEST, after the DST change.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import shutil
import signal
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email import policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import func, select

from mailer.app import Service
from mailer.clock import FakeClock
from mailer.config import Config, Maintainer
from mailer.db import Database
from mailer.models import Event, OutboxMessage, Report, ScheduledMail
from tests.conftest import make_config, run, smtp_port
from tests.gpgtools import Home, SignedParts, signed_part
from tests.relay import Captured, CaptureRelay
from tests.test_commands import open_for
from tests.test_crash import free_port, start_service
from tests.test_intake import asend

BERLIN = ZoneInfo("Europe/Berlin")
START = datetime(2026, 3, 23, 10, tzinfo=BERLIN)  # Monday, CET
DISCLOSE = datetime(2026, 3, 30, 9, tzinfo=BERLIN)  # +5 workdays: Monday after the DST change (CEST)
ADVANCE = datetime(2026, 3, 26, 9, tzinfo=BERLIN)  # advance_notice_workdays = 2
LIST = "sec-announce@example.org"
MARA, MAX = "mara@project.test", "max@project.test"
DANA, ERIK, NOKEY = "dana@distro.test", "erik@distro.test", "nokey@distro.test"
RITA = "rita@reporter.test"
SUBJECT = "Heap overflow in the frobnicator"
DESCRIPTION = "Description: a crafted zorblax header overflows the frobnicator buffer in libquux"
REPORT_WORDS = ("frobnicator", "zorblax", "libquux", "Heap overflow", "rita", "reporter.test")
VECTOR = "CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:N/A:N"  # 7.5, high
RELEASE_URL = "https://example.org/releases/1.2.3"
ADVISORY_URL = "https://example.org/advisories/GHSA-1"


def berlin(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=BERLIN)


# --------------------------------------------------------------------------- people and their keys


@dataclass
class Person:
    home: Home
    fpr: str
    address: str

    def read(self, captured: Captured) -> str:
        """The mail as this person's client shows it, decrypted with their own secret key."""
        assert b"multipart/encrypted" in captured.raw, f"mail to {self.address} is not encrypted"
        return " ".join(open_for(self.home, captured.raw).split())


@pytest.fixture(scope="module")
def people() -> Iterator[dict[str, Person]]:
    """Maintainers, embargo members and the reporter, each with a key born long before the fake clock."""
    born = "20250601T000000"
    out: dict[str, Person] = {}
    try:
        for name, address in (("Mara", MARA), ("Max", MAX), ("Dana", DANA), ("Erik", ERIK), ("Rita", RITA)):
            home = Home()
            out[address] = Person(home, home.gen_key(f"{name} Test", address, faked_time=born), address)
        yield out
    finally:
        for person in out.values():
            person.home.close()


def lifecycle_config(tmp_path: Path, db_url: str, relay_url: str, people: dict[str, Person], **extra: Any) -> Config:
    sections: dict[str, dict[str, Any]] = {
        "schedule": {"timezone": "Europe/Berlin", "holidays_country": "DE"},
        "announce": {"lists": [LIST], "advance_notice_workdays": 2, "preview_workdays": 1,
                     "advisory_base_url": "https://example.org/advisories", "project": "Quux"},
        "policy": {"supported_versions": ["1.2"]},
    }
    for name, values in extra.items():
        sections.setdefault(name, {}).update(values)
    cfg = make_config(tmp_path, db_url, relay_url, **sections)
    return cfg.model_copy(update={"maintainers": (
        Maintainer(name="Mara", address=MARA, fingerprint=people[MARA].fpr),
        Maintainer(name="Max", address=MAX, fingerprint=people[MAX].fpr),
    )})


# --------------------------------------------------------------------------- the driver


class Life:
    """One service on a fake clock, driven like its users would: SMTP in, signed commands, the capture relay out."""

    def __init__(self, svc: Service, clock: FakeClock, relay: CaptureRelay, people: dict[str, Person]) -> None:
        self.svc, self.clock, self.relay, self.people = svc, clock, relay, people
        self.sequence = 0

    @property
    def mara(self) -> Person:
        return self.people[MARA]

    async def file(self, *, subject: str = SUBJECT, body: str = DESCRIPTION, with_key: bool = True) -> str:
        """The reporter mails a report (with her key attached, as "attach my public key" does); returns its id."""
        self.sequence += 1
        msg = EmailMessage()
        msg["From"], msg["To"], msg["Subject"] = f"Rita <{RITA}>", "security@example.org", subject
        msg["Message-ID"] = f"<report-{self.sequence}@reporter.test>"
        msg.set_content(body + "\n")
        if with_key:
            rita = self.people[RITA]
            msg.add_attachment(rita.home.export(rita.fpr), maintype="application", subtype="pgp-keys",
                               filename="OpenPGP_0xRITA.asc")
        await asend(smtp_port(self.svc), msg.as_bytes(policy=policy.SMTP))
        await self.svc.settle()
        with self.svc.db.session() as s:
            return str(s.scalars(select(Report.tracking_id).order_by(Report.id.desc())).first())

    async def command(self, tracking: str, *lines: str, attach: bytes | None = None) -> str:
        """Mara sends signed commands (signed at the fake time); returns her decrypted transcript."""
        self.sequence += 1
        body = "\n".join([f"#report {tracking}", *lines]) + "\n\n-- \nMara\n"
        faked = self.clock().astimezone(UTC).strftime("%Y%m%dT%H%M%S")
        parts = signed_part(body) if attach is None else with_attachment(body, attach)
        signature = self.mara.home.sign_detached(parts.signed_part, self.mara.fpr, faked_time=faked)
        rest = parts.message(signature).partition(b"MIME-Version: 1.0\r\n")[2]
        head = (f"From: Mara <{MARA}>\r\nTo: security@example.org\r\nSubject: Re: [{tracking}] report\r\n"
                f"Message-ID: <cmd-{self.sequence}@project.test>\r\nMIME-Version: 1.0\r\n").encode()
        before = len(self.relay.handler.to(MARA))
        await asend(smtp_port(self.svc), head + rest, sender=MARA)
        await self.svc.settle()
        new = self.relay.handler.to(MARA)[before:]
        assert len(new) == 1, f"expected one transcript, got {len(new)}"
        return self.mara.read(new[0])

    async def drain(self) -> int:
        """What the service's schedule loop does once at the clock's instant, then the mail goes out."""
        handled = self.svc.scheduler.drain()
        await self.svc.settle()
        return handled

    async def at(self, when: datetime) -> int:
        self.clock.set(when)
        return await self.drain()

    def to(self, address: str) -> list[Captured]:
        return self.relay.handler.to(address)

    def report(self, tracking: str) -> Report:
        with self.svc.db.session() as s:
            report = s.scalars(select(Report).where(Report.tracking_id == tracking)).one()
            s.expunge(report)
            return report

    def rows(self, kind: str | None = None) -> list[ScheduledMail]:
        with self.svc.db.session() as s:
            query = select(ScheduledMail).order_by(ScheduledMail.id)
            return list(s.scalars(query if kind is None else query.where(ScheduledMail.kind == kind)))


def with_attachment(body: str, key: bytes) -> SignedParts:
    """A signed multipart/mixed: the command text and a public key attached (Thunderbird's "attach key")."""
    b64 = base64.encodebytes(key).decode()
    entity = ('Content-Type: multipart/mixed; boundary="att-b"\n\n'
              "--att-b\nContent-Type: text/plain; charset=UTF-8\nContent-Transfer-Encoding: 7bit\n\n"
              f"{body}\n"
              '--att-b\nContent-Type: application/pgp-keys; name="erik.asc"\n'
              'Content-Disposition: attachment; filename="erik.asc"\nContent-Transfer-Encoding: base64\n\n'
              f"{b64}--att-b--\n")
    return SignedParts(entity.replace("\n", "\r\n").encode())


@pytest.fixture
async def life(tmp_path: Path, migrated: str, relay: CaptureRelay, people: dict[str, Person]) -> AsyncIterator[Life]:
    cfg = lifecycle_config(tmp_path, migrated, relay.url, people)
    clock = FakeClock(START)
    svc = Service(cfg, clock=clock)
    # what `mailer keys import` does: the maintainers' keys and Dana's (Erik's comes attached to #embargo add)
    for address in (MARA, MAX, DANA):
        svc.gpg.import_public(people[address].home.export(people[address].fpr))
    await svc.start(background=False)
    yield Life(svc, clock, relay, people)
    await svc.stop()
    svc.db.dispose()


async def scheduled_report(life: Life, *, complete: bool = True, members: tuple[str, ...] = (DANA,)) -> str:
    """A report accepted and scheduled for DISCLOSE by signed commands (complete: the release email is ready)."""
    tid = await life.file()
    lines = ["#accept", "#severity high", "#disclose +5", *(f"#embargo add {m}" for m in members)]
    if complete:
        lines += [f"#release 1.2.3 {RELEASE_URL}", f"#advisory {ADVISORY_URL}", "#cve none"]
    transcript = await life.command(tid, *lines)
    assert "All commands were applied." in transcript, transcript
    assert same_instant(life.report(tid).disclose_at, DISCLOSE.astimezone(UTC))
    return tid


def flat(text: str) -> str:
    """Text with its line breaks and runs of spaces collapsed (templates wrap lines)."""
    return " ".join(text.split())


def same_instant(a: datetime | None, b: datetime) -> bool:
    assert a is not None
    return (a if a.tzinfo else a.replace(tzinfo=UTC)) == b


# --------------------------------------------------------------------------- 1. the whole life


@pytest.mark.slow
async def test_a_report_lives_its_whole_disclosure_timeline(life: Life, people: dict[str, Person]) -> None:
    """Report, commands, encrypted embargo notices, preview, a detail-free advance notice, the release at the instant, all told."""
    erik = people[ERIK]
    tid = await life.file()
    assert len(life.to(RITA)) == 1 and life.report(tid).state == "acknowledged"  # the acknowledgement

    out = await life.command(tid, "#accept", "#severity high", f"#cvss {VECTOR}", "#cve requested via GitHub",
                             "#embargo add dana@distro.test", "#embargo add nokey@distro.test")
    assert "All commands were applied." in out and "CVSS 7.5" in out
    assert "nokey@distro.test gets NOTHING" in out
    out = await life.command(tid, "#embargo add erik@distro.test", attach=erik.home.export(erik.fpr))
    assert f"key {erik.fpr} imported for {ERIK}" in out

    await embargo_phase(life, people, tid)
    await announce_phase(life, people, tid)
    await release_phase(life, people, tid)


async def embargo_phase(life: Life, people: dict[str, Person], tid: str) -> None:
    """Notices to the members with keys (not the third), the maintainers told; the date set, the notices again."""
    dana, erik, mara = people[DANA], people[ERIK], people[MARA]
    mara_before = len(life.to(MARA))
    await life.drain()
    notices = {who.address: who.read(life.to(who.address)[-1]) for who in (dana, erik)}
    assert not life.to(NOKEY)  # fail closed: no key, no mail
    for text in notices.values():
        assert SUBJECT in text and "Severity: high (CVSS:3.1/" in text and "Disclosure: not set yet" in text
        assert "must not be shared beyond this embargo list" in text
        assert "exactly what information leaked and to whom" in text and "security@example.org" in text
    told = [mara.read(m) for m in life.to(MARA)[mara_before:]]
    assert any(f"embargo member {NOKEY} has no usable OpenPGP key and got nothing" in t for t in told)
    assert not any("embargo member" in t for t in told if DANA in t or ERIK in t)

    out = await life.command(tid, "#disclose +5")
    assert "2026-03-30 09:00 CEST (Europe/Berlin)" in out
    assert life.report(tid).state == "scheduled"
    await life.drain()  # the date changed: a new notice to each member, the change stated first
    for who in (dana, erik):
        assert len(life.to(who.address)) == 2
        text = who.read(life.to(who.address)[-1])
        assert text.startswith("CHANGED:") and "disclosure: not set yet -> 2026-03-30 09:00 CEST (Europe/Berlin)" in text
        assert "Disclosure: 2026-03-30 09:00 CEST (Europe/Berlin)" in text and SUBJECT in text


async def announce_phase(life: Life, people: dict[str, Person], tid: str) -> None:
    """The preview, then the advance notice exactly at its instant, with none of the report's words."""
    mara = people[MARA]
    # the preview of the advance notice, one workday before it, to the maintainers, encrypted
    mara_before = len(life.to(MARA))
    await life.at(berlin(2026, 3, 25, 9))
    previews = [t for t in (mara.read(m) for m in life.to(MARA)[mara_before:]) if "PREVIEW of the advance notice" in t]
    assert len(previews) == 1 and "forthcoming security release" in previews[0] and "2026-03-30" in previews[0]
    assert not life.to(LIST)

    assert await life.at(ADVANCE - timedelta(minutes=1)) >= 0
    assert not life.to(LIST) and life.report(tid).state == "scheduled"
    await life.at(ADVANCE)
    [advance] = life.to(LIST)
    text = flat(advance.text)
    assert "Quux project would like to announce a forthcoming security release" in text
    assert "2026-03-30" in text and "CEST" in text and "https://example.org/advisories" in text and "High" in text
    for word in (*REPORT_WORDS, tid, "GitHub", DANA, "CVSS:3.1"):
        assert word not in text and word.encode() not in advance.raw, word
    assert b"multipart/encrypted" not in advance.raw
    assert life.report(tid).state == "announced"


async def release_phase(life: Life, people: dict[str, Person], tid: str) -> None:
    """The release details recorded, the release preview, the release email exactly at the instant, everyone told."""
    dana, erik, rita, mara = people[DANA], people[ERIK], people[RITA], people[MARA]
    out = await life.command(tid, "#cve CVE-2026-4242", f"#advisory {ADVISORY_URL}", f"#release 1.2.3 {RELEASE_URL}")
    assert "the release email goes out 2026-03-30 09:00 CEST (Europe/Berlin)" in out

    await life.at(berlin(2026, 3, 27, 9))  # Friday: the release preview
    assert any("PREVIEW of the release" in mara.read(m) and RELEASE_URL in mara.read(m) for m in life.to(MARA)[-3:])

    await life.at(DISCLOSE - timedelta(minutes=1))  # Monday 08:59 CEST, after the weekend and the DST change
    assert len(life.to(LIST)) == 1 and not life.rows("release") and life.report(tid).state == "announced"
    members_before = {who.address: len(life.to(who.address)) for who in (dana, erik)}
    rita_before = len(life.to(RITA))
    await life.at(DISCLOSE)
    [release_row] = life.rows("release")
    assert same_instant(release_row.due_at, DISCLOSE.astimezone(UTC)) and release_row.late_seconds == 0
    assert len(life.to(LIST)) == 2
    release = flat(life.to(LIST)[-1].text)
    for expected in ("Security release available", "1.2.3", RELEASE_URL, ADVISORY_URL, "High", "CVE-2026-4242"):
        assert expected in release, expected
    for word in REPORT_WORDS:
        assert word not in release
    report = life.report(tid)
    assert report.state == "published" and same_instant(report.published_at, DISCLOSE.astimezone(UTC))
    for who in (dana, erik):
        [lifted] = life.to(who.address)[members_before[who.address]:]
        assert "embargo on Quux security issue" in who.read(lifted) and "is lifted" in who.read(lifted)
    [status] = life.to(RITA)[rita_before:]
    assert "the fix is released and the embargo is lifted" in rita.read(status) and RELEASE_URL in rita.read(status)
    assert await life.drain() == 0  # nothing goes twice


# --------------------------------------------------------------------------- 2. held


async def test_an_incomplete_release_is_held_at_the_instant_and_maintainers_alerted(
    life: Life, people: dict[str, Person]
) -> None:
    """One workday before, an incomplete release email is reminded; at the instant it is held and alerted, never sent half-filled."""
    mara, maxi = people[MARA], people[MAX]
    tid = await scheduled_report(life, complete=False)
    await life.at(ADVANCE)
    assert len(life.to(LIST)) == 1
    before = len(life.to(MARA))
    await life.at(berlin(2026, 3, 27, 9))  # one workday before: the daily alert starts
    texts = [mara.read(m) for m in life.to(MARA)[before:]]
    assert any("the release email is incomplete" in t and "#advisory URL" in t for t in texts)
    seen = {p.address: len(life.to(p.address)) for p in (mara, maxi)}
    await life.at(DISCLOSE)
    [held] = life.rows("release_held")
    assert held.state == "held" and "release" in (held.reason or "") and "advisory" in (held.reason or "")
    for person in (mara, maxi):
        alerts = [person.read(m) for m in life.to(person.address)[seen[person.address]:]]
        assert any("the security release email for" in a and "is HELD" in a for a in alerts)
    assert len(life.to(LIST)) == 1 and not life.rows("release")  # the advance notice only
    assert life.report(tid).state == "announced"
    await life.at(DISCLOSE + timedelta(minutes=30))
    assert len(life.rows("release_held")) == 1 and len(life.to(LIST)) == 1
    # completed later, it goes out then, whole
    await life.command(tid, f"#release 1.2.3 {RELEASE_URL}", f"#advisory {ADVISORY_URL}", "#cve CVE-2026-4243")
    await life.drain()
    assert len(life.to(LIST)) == 2 and "CVE-2026-4243" in life.to(LIST)[-1].text
    assert life.report(tid).state == "published"


# --------------------------------------------------------------------------- 3. #publish


async def test_publish_needs_the_one_time_token(life: Life, people: dict[str, Person]) -> None:
    """#publish answers with a token and sends nothing; a wrong token is refused; the right one sends the release at once."""
    dana = people[DANA]
    tid = await scheduled_report(life)
    await life.drain()
    assert len(life.to(DANA)) == 1
    out = await life.command(tid, "#publish")
    assert "nothing sent yet" in out and RELEASE_URL in out
    match = re.search(r"#publish (\S{12,})", out)
    assert match is not None, out
    token = match[1]
    await life.at(START + timedelta(hours=1))
    assert not life.to(LIST) and life.report(tid).state == "scheduled"

    out = await life.command(tid, "#publish wrong-token-123456")
    assert "wrong publish token" in out and "NOTHING was applied" in out
    await life.drain()
    assert not life.to(LIST)

    life.clock.advance(minutes=5)
    out = await life.command(tid, f"#publish {token}")
    assert "the release email goes out now" in out
    await life.drain()
    [release] = life.to(LIST)  # no advance notice: the release went first
    assert "Security release available" in release.text and RELEASE_URL in release.text
    assert life.report(tid).state == "published"
    lifted = dana.read(life.to(DANA)[-1])
    assert "is lifted, earlier than the agreed date" in lifted
    life.clock.advance(minutes=1)
    out = await life.command(tid, f"#publish {token}")
    assert "cannot publish a report in state published" in out


# --------------------------------------------------------------------------- 4. #extend


async def test_extend_is_told_to_the_reporter_and_each_member(life: Life, people: dict[str, Person]) -> None:
    """The reporter and each member hear of an extension, encrypted, with the reason; beyond max_embargo_days needs --force."""
    dana, erik, rita = people[DANA], people[ERIK], people[RITA]
    tid = await scheduled_report(life)
    out = await life.command(tid, "#embargo add erik@distro.test", attach=erik.home.export(erik.fpr))
    await life.drain()
    before = {p.address: len(life.to(p.address)) for p in (dana, erik, rita)}
    life.clock.advance(hours=2)
    out = await life.command(tid, "#extend 2026-04-15 waiting for a distribution fix")
    assert "disclosure extended to 2026-04-15 09:00 CEST (Europe/Berlin)" in out
    for person in (dana, erik):
        texts = [person.read(m) for m in life.to(person.address)[before[person.address]:]]
        assert any("has been extended" in t and "waiting for a distribution fix" in t
                   and "2026-04-15 09:00 CEST (Europe/Berlin)" in t for t in texts), texts
    [status] = life.to(RITA)[before[RITA]:]
    text = rita.read(status)
    assert "disclosure extended" in text and "waiting for a distribution fix" in text and "2026-04-15" in text
    await life.drain()  # the date changed: the embargo notice again, change first
    assert dana.read(life.to(DANA)[-1]).startswith("CHANGED:")

    out = await life.command(tid, "#extend 2026-07-01 distro freeze")
    assert "NOTHING was applied" in out and "more than 90 days after acceptance" in out and "--force" in out
    assert life.report(tid).disclose_at.date().isoformat() == "2026-04-15"  # type: ignore[union-attr]
    out = await life.command(tid, "#extend 2026-07-01 distro freeze --force")
    assert "All commands were applied." in out and "beyond the 90-day embargo maximum (forced)" in out
    with life.svc.db.session() as s:
        forced = [e.detail for e in s.scalars(select(Event).where(Event.kind == "state.extend"))]
    assert [d.get("forced") for d in forced] == [False, True]


# --------------------------------------------------------------------------- 5. guards


async def test_guards_refuse_with_the_reason_and_apply_nothing(life: Life) -> None:
    """A past date, a weekend or holiday without --force, and #release before #disclose are refused; nothing applied."""
    tid = await life.file()
    await life.command(tid, "#accept")
    cases = [
        ("#disclose 2026-03-20", "2026-03-20 is in the past"),
        ("#disclose 2026-03-28", "2026-03-28 is not a workday (Saturday); add --force"),
        ("#disclose 2026-04-03", "2026-04-03 is not a workday (Good Friday)"),  # a public holiday in DE
        (f"#release 1.2.3 {RELEASE_URL}", "set the disclosure date first"),
        ("#disclose 2026-09-01", "more than 90 days after acceptance"),
        ("#fixed 1.1.9", "1.1.9 is not in a supported version line (1.2)"),
    ]
    for line, reason in cases:
        out = await life.command(tid, "#severity low", line)
        assert "NOTHING was applied" in out and reason in out, (line, out)
        report = life.report(tid)
        assert (report.state, report.severity, report.disclose_at, report.release_version) == ("accepted", None, None, None)
    await life.drain()
    assert not life.to(LIST) and not life.rows("advance_notice")
    out = await life.command(tid, "#disclose 2026-03-31 15:00")  # no zone given: the configured one, shown
    assert "2026-03-31 15:00 CEST (Europe/Berlin)" in out
    out = await life.command(tid, "#disclose 2026-03-28 --force", "#fixed 1.1.9 --unsupported")
    assert "All commands were applied." in out and "outside the supported versions" in out
    assert life.report(tid).disclose_at is not None


# --------------------------------------------------------------------------- 6. reminders


@pytest.mark.slow
async def test_every_reminder_fires_at_most_once_a_day(life: Life, people: dict[str, Person]) -> None:
    """Unanswered, untriaged reports are reminded once per workday (drained 4x a day, twice each), never on days off."""
    mara = people[MARA]
    tid = await life.file()
    seen: dict[tuple[str, str], int] = {}
    day = START.date()
    while day <= berlin(2026, 4, 7).date():
        for hour, minute in ((8, 0), (9, 0), (10, 30), (16, 0)):
            before_rows, before_mail = len(life.rows("reminder")), len(life.to(MARA))
            await life.at(datetime(day.year, day.month, day.day, hour, minute, tzinfo=BERLIN))
            assert await life.drain() == 0  # a second drain at the same instant sends nothing
            new = life.rows("reminder")[before_rows:]
            assert len(life.to(MARA)) - before_mail == len(new)  # one mail to Mara per reminder
            for row in new:
                topic = str(row.detail["topic"])
                assert row.sent_at is not None
                sent_day = (row.sent_at if row.sent_at.tzinfo else row.sent_at.replace(tzinfo=UTC)).astimezone(BERLIN)
                seen[(topic, sent_day.date().isoformat())] = seen.get((topic, sent_day.date().isoformat()), 0) + 1
        day += timedelta(days=1)
    assert all(count == 1 for count in seen.values()), seen
    ack_days = sorted(d for topic, d in seen if topic == "ack")
    # from the 24-hour deadline on, each workday; not the weekend, not Good Friday or Easter Monday
    assert ack_days == ["2026-03-24", "2026-03-25", "2026-03-26", "2026-03-27", "2026-03-30", "2026-03-31",
                        "2026-04-01", "2026-04-02", "2026-04-07"]
    triage_days = sorted(d for topic, d in seen if topic == "triage")
    assert triage_days[0] == "2026-03-25" and "2026-03-28" not in triage_days and len(triage_days) == 8
    reminder = mara.read(life.to(MARA)[-1])
    assert tid in reminder and ("#accept" in reminder)
    # answered: the reminders stop
    await life.command(tid, "#accept")
    before = len(life.rows("reminder"))
    await life.at(berlin(2026, 4, 8, 9))
    assert not [r for r in life.rows("reminder")[before:] if r.detail["topic"] in ("ack", "triage")]


# --------------------------------------------------------------------------- 7. two processes


def write_config(cfg: Config, path: Path, smtp_listen: str, gnupg: str) -> Path:
    """The test's Config as a TOML file for a `mailer` subprocess."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return str(v)
        if isinstance(v, list | tuple):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'

    lines = [
        "[service]", f"data_dir = {value(cfg.service.data_dir)}", 'contact = "security@example.org"',
        "[smtp]", f"listen = {value(smtp_listen)}",
        "[database]", f"url = {value(cfg.database_url)}",
        "[relay]", f"url = {value(cfg.relay_url)}",
        "[worker]", "retry_base_seconds = 0.01", "poll_seconds = 0.2",
        "[gnupg]", f"home = {value(gnupg)}",
        "[schedule]", 'timezone = "Europe/Berlin"', 'holidays_country = "DE"',
        "[announce]", f"lists = {value(list(cfg.announce.lists))}", "advance_notice_workdays = 2",
        'advisory_base_url = "https://example.org/advisories"', 'project = "Quux"',
    ]
    for m in cfg.maintainers:
        lines += ["[[maintainers]]", f"name = {value(m.name)}", f"address = {value(m.address)}",
                  f"fingerprint = {value(m.fingerprint)}"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def copy_home(source: str, tmp: str) -> str:
    shutil.copytree(source, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns("S.*", "*.lock", "*.tmp"))
    return tmp


@pytest.mark.slow
@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
async def test_two_service_processes_send_every_scheduled_mail_once(
    life: Life, people: dict[str, Person], tmp_path: Path
) -> None:
    """Two `mailer serve` processes on one PostgreSQL database, both draining an overdue schedule, send each mail exactly once."""
    from tests.gpgtools import short_tmpdir

    count = 5
    tids = [await scheduled_report(life) for _ in range(count)]
    cfg = life.svc.config
    await life.svc.stop()  # the fake-clock instance is done: the processes run on the real clock (all is overdue)
    before = {a: len(life.to(a)) for a in (LIST, DANA, RITA)}
    homes = [copy_home(str(cfg.gnupg_home), short_tmpdir()) for _ in range(2)]
    procs: list[asyncio.subprocess.Process] = []
    try:
        configs = [write_config(cfg, tmp_path / f"mailer{i}.toml", f"127.0.0.1:{free_port()}", homes[i]) for i in range(2)]
        procs = list(await asyncio.gather(*(start_service({"MAILER_CONFIG": str(c)}) for c in configs)))
        expected = {LIST: 1 + count, DANA: 2 * count, RITA: count}  # one shared advance notice + releases; notice + lifted
        for _ in range(600):
            if all(len(life.to(a)) - before[a] >= n for a, n in expected.items()):
                break
            await asyncio.sleep(0.1)
        db = Database(cfg.database_url)
        try:
            for _ in range(100):  # until both senders have nothing left to send
                with db.session() as s:
                    pending = s.scalar(select(func.count()).select_from(OutboxMessage)
                                       .where(OutboxMessage.state != "sent")) or 0
                if not pending:
                    break
                await asyncio.sleep(0.1)
            with db.session() as s:
                keys = list(s.scalars(select(ScheduledMail.key)))
                row_states = set(s.scalars(select(ScheduledMail.state)))
                states = {t: s.scalar(select(Report.state).where(Report.tracking_id == t)) for t in tids}
        finally:
            db.dispose()
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            await asyncio.wait_for(proc.wait(), 30)
        for home in homes:
            from tests.gpgtools import kill_and_remove

            kill_and_remove(home)
    got = {a: len(life.to(a)) - before[a] for a in expected}
    assert got == expected
    assert len(keys) == len(set(keys)) and row_states == {"sent"}
    assert set(states.values()) == {"published"}


# --------------------------------------------------------------------------- 8. down over the instant


async def test_a_service_down_over_the_instant_sends_late_and_records_it(
    life: Life, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The release due while the service was stopped goes on the next drain, with late_seconds recorded and a warning logged."""
    tid = await scheduled_report(life)
    await life.at(ADVANCE)
    assert life.report(tid).state == "announced"
    await life.svc.stop()
    life.clock.set(berlin(2026, 4, 2, 10))  # Thursday after: three days and an hour late
    svc = Service(life.svc.config, clock=life.clock)
    await svc.start(background=False)
    try:
        life.svc = svc
        with caplog.at_level(logging.WARNING, logger="mailer.scheduler"):
            await life.drain()
        [release] = life.rows("release")
        assert release.late_seconds == pytest.approx((berlin(2026, 4, 2, 10) - DISCLOSE).total_seconds())
        assert life.report(tid).state == "published" and len(life.to(LIST)) == 2
        assert any("late" in r.getMessage() and "release" in r.getMessage() for r in caplog.records)
        with svc.db.session() as s:
            late = [e.detail["late_seconds"] for e in s.scalars(select(Event).where(Event.kind == "schedule.sent"))
                    if e.detail.get("kind") == "release"]
        assert late == [pytest.approx(release.late_seconds)]
        # a release that goes out now is not also reminded as "passed and nothing published"
        assert not [r for r in life.rows("reminder") if r.detail["topic"] == "disclosure_passed"]
    finally:
        await svc.stop()
        svc.db.dispose()


# --------------------------------------------------------------------------- 9. the CLI


@pytest.mark.slow
async def test_schedule_list_and_dry_run_show_the_contract_fields(life: Life, tmp_path: Path) -> None:
    """`schedule list --json` and `schedule run --dry-run --at ISO --json` give the contract fields; members only on request."""
    tid = await scheduled_report(life, complete=False, members=(DANA, NOKEY))
    await life.drain()
    cfg = life.svc.config
    await life.svc.stop()
    config = write_config(cfg, tmp_path / "cli.toml", "127.0.0.1:0", str(cfg.gnupg_home))

    async def cli(*argv: str) -> Any:
        code = f"import sys; from mailer.cli import main; sys.exit(main({list(argv)!r}))"
        import os

        os.environ["MAILER_CONFIG"] = str(config)
        try:
            rc, out = await run(sys.executable, "-c", code)
        finally:
            os.environ.pop("MAILER_CONFIG", None)
        assert rc == 0, out
        import json

        start = min(i for i in (out.find("["), out.find("{")) if i >= 0)
        return json.loads(out[start:])

    listing = await cli("schedule", "list", "--json")
    assert listing and all({"report", "kind", "due_at", "state"} <= set(e) for e in listing)
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", e["due_at"]) for e in listing)
    assert {e["state"] for e in listing} <= {"planned", "held", "sent", "failed"}
    by_kind = {e["kind"]: e for e in listing if e["report"] == tid}
    assert {"embargo_notice", "advance_notice", "release_held"} <= set(by_kind)
    assert by_kind["embargo_notice"]["state"] == "sent"
    held = by_kind["release_held"]
    assert held["state"] == "held" and "advisory" in held["reason"] and held["due_at"] == "2026-03-30T07:00:00Z"
    assert all("reason" not in e for e in listing if e["state"] == "planned")
    assert DANA not in repr(listing) and NOKEY not in repr(listing) and "1 embargo member" in repr(listing)
    assert DANA in repr(await cli("schedule", "list", "--json", "--members"))

    rows_before, mail_before = len(life.rows()), len(life.relay.messages)
    early = await cli("schedule", "run", "--dry-run", "--at", "2026-03-30T08:59:00+02:00", "--json")
    assert "release_held" not in {e["kind"] for e in early} and "advance_notice" in {e["kind"] for e in early}
    at = await cli("schedule", "run", "--dry-run", "--at", "2026-03-30T09:00:00+02:00", "--json")
    [would] = [e for e in at if e["kind"] == "release_held"]
    assert would["report"] == tid and would["state"] == "held" and would["due_at"] == "2026-03-30T07:00:00Z"
    assert "release (#release VERSION URL)" in would["reason"]
    assert all({"report", "kind", "due_at", "state"} <= set(e) for e in at)
    assert DANA not in repr(at)
    assert (len(life.rows()), len(life.relay.messages)) == (rows_before, mail_before)  # a dry run sends nothing
