"""Issue 8, leaks and the embargo list: `#leak`, `#embargo remove`, `#status` and `#disclose now` over SMTP.

Built on :mod:`tests.test_lifecycle`: the same real service on a FakeClock, the
same people with their own GnuPG homes, commands signed at the fake time. The
report is scheduled on Monday 2026-03-23 10:00 CET for Monday 2026-03-30 09:00
CEST (Europe/Berlin, German holidays, reminder hour 09:00).
"""

from __future__ import annotations

from datetime import UTC

from sqlalchemy import select

from mailer.models import Event
from tests import test_lifecycle
from tests.conftest import smtp_port
from tests.gpgtools import signed_part
from tests.test_intake import asend
from tests.test_lifecycle import (
    ADVANCE,
    ADVISORY_URL,
    DANA,
    DISCLOSE,
    ERIK,
    LIST,
    MARA,
    MAX,
    NOKEY,
    RELEASE_URL,
    REPORT_WORDS,
    SUBJECT,
    Life,
    Person,
    berlin,
    scheduled_report,
)

life, people = test_lifecycle.life, test_lifecycle.people  # the fixtures

WHO = "journalist@news.test"
WHAT = "the affected function name and a proof of concept were posted to a public pastebin"


async def command_all(life: Life, tid: str, *lines: str) -> list[str]:
    """Mara sends signed commands; returns every new mail to her, decrypted (the transcript and any alert)."""
    life.sequence += 1
    body = "\n".join([f"#report {tid}", *lines]) + "\n\n-- \nMara\n"
    faked = life.clock().astimezone(UTC).strftime("%Y%m%dT%H%M%S")
    parts = signed_part(body)
    signature = life.mara.home.sign_detached(parts.signed_part, life.mara.fpr, faked_time=faked)
    rest = parts.message(signature).partition(b"MIME-Version: 1.0\r\n")[2]
    head = (f"From: Mara <{MARA}>\r\nTo: security@example.org\r\nSubject: Re: [{tid}] report\r\n"
            f"Message-ID: <leakcmd-{life.sequence}@project.test>\r\nMIME-Version: 1.0\r\n").encode()
    before = len(life.to(MARA))
    await asend(smtp_port(life.svc), head + rest, sender=MARA)
    await life.svc.settle()
    return [life.mara.read(m) for m in life.to(MARA)[before:]]


def texts(life: Life, person: Person, since: int = 0) -> list[str]:
    return [person.read(m) for m in life.to(person.address)[since:]]


def topics(life: Life, topic: str) -> list[str]:
    """The keys of the recorded reminder rows of one topic (one row per sent reminder)."""
    return [str(r.key) for r in life.rows("reminder") if str(r.detail.get("topic")) == topic]


async def leaky_report(life: Life, people: dict[str, Person]) -> str:
    """A complete scheduled report with Dana and Erik (keys) and nokey (none) on its embargo list, notices sent."""
    erik = people[ERIK]
    tid = await scheduled_report(life, members=(DANA, NOKEY))
    life.clock.advance(minutes=10)
    out = await life.command(tid, "#embargo add erik@distro.test", attach=erik.home.export(erik.fpr))
    assert f"key {erik.fpr} imported for {ERIK}" in out
    await life.drain()
    assert len(life.to(DANA)) == 1 and len(life.to(ERIK)) == 1 and not life.to(NOKEY)
    return tid


# --------------------------------------------------------------------------- 1. #leak


async def test_leak_alerts_everyone_with_a_key_and_reminds_to_decide_then_to_look_back(
    life: Life, people: dict[str, Person]
) -> None:
    """A leak reaches maintainers and keyed members encrypted, not the keyless one; decision and retrospective reminders go once."""
    mara, maxi, dana, erik = people[MARA], people[MAX], people[DANA], people[ERIK]
    tid = await leaky_report(life, people)
    life.clock.advance(minutes=50)  # Monday 11:00
    seen = {p.address: len(life.to(p.address)) for p in (maxi, dana, erik)}
    got = await command_all(life, tid, f"#leak {WHO} {WHAT}")
    [transcript] = [t for t in got if "All commands were applied." in t]
    assert "leak recorded" in transcript
    assert f"embargo member {NOKEY} was NOT told (no usable OpenPGP key)" in transcript
    alerts = {MARA: [t for t in got if "ALERT: a leak of embargoed information" in t]}
    alerts[MAX] = [t for t in texts(life, maxi, seen[MAX]) if "ALERT: a leak of embargoed information" in t]
    for address, found in alerts.items():
        assert len(found) == 1, (address, found)
        assert f"Leaked to: {WHO}" in found[0] and f"What leaked: {WHAT}" in found[0] and tid in found[0]
    for member in (dana, erik):
        [notice] = texts(life, member, seen[member.address])  # decrypted with the member's own key
        assert f"Leaked to: {WHO}" in notice and f"What leaked: {WHAT}" in notice and tid in notice
    assert not life.to(NOKEY)
    with life.svc.db.session() as s:
        [event] = s.scalars(select(Event).where(Event.kind == "leak")).all()
        assert event.actor == mara.fpr and event.detail["who"] == WHO and event.detail["what"] == WHAT

    # the decision reminder: the next workday at the reminder hour, to the maintainers, once
    await life.at(berlin(2026, 3, 24, 8, 59))
    assert not topics(life, "leak_decision")
    before = {p.address: len(life.to(p.address)) for p in (mara, maxi)}
    await life.at(berlin(2026, 3, 24, 9))
    assert len(topics(life, "leak_decision")) == 1
    for person in (mara, maxi):
        decisions = [t for t in texts(life, person, before[person.address]) if "a leak was recorded" in t]
        assert len(decisions) == 1, person.address
        assert "#disclose now" in decisions[0] and "keep the date" in decisions[0]
    assert await life.drain() == 0
    await life.at(berlin(2026, 3, 25, 9))
    assert len(topics(life, "leak_decision")) == 1

    # kept the date: published at the instant, then one retrospective reminder the next workday
    await life.at(ADVANCE)
    await life.at(DISCLOSE)
    assert life.report(tid).state == "published" and not topics(life, "retrospective")
    before = {p.address: len(life.to(p.address)) for p in (mara, maxi)}
    await life.at(berlin(2026, 3, 31, 9))
    await life.at(berlin(2026, 3, 31, 15))
    await life.at(berlin(2026, 4, 1, 9))
    assert len(topics(life, "retrospective")) == 1
    for person in (mara, maxi):
        retro = [t for t in texts(life, person, before[person.address]) if "retrospective" in t]
        assert len(retro) == 1, person.address
    assert len(topics(life, "leak_decision")) == 1


# --------------------------------------------------------------------------- 2. #embargo remove


async def test_a_removed_member_is_told_only_that_and_nothing_after(life: Life, people: dict[str, Person]) -> None:
    """The removed member gets one mail without report details and none of the later notices the others get."""
    dana, erik = people[DANA], people[ERIK]
    tid = await leaky_report(life, people)
    life.clock.advance(hours=1)
    out = await life.command(tid, "#embargo remove dana@distro.test")
    assert "All commands were applied." in out and "embargo remove: dana@distro.test" in out
    await life.drain()
    [removed] = life.to(DANA)[1:]
    text = dana.read(removed)
    assert "You have been removed from an embargo list" in text and "no further mail" in text
    for word in (*REPORT_WORDS, SUBJECT, "CVE", "Severity", "high", RELEASE_URL, ADVISORY_URL, "2026-03-30", ERIK):
        assert word not in text and word not in str(removed.message["Subject"]), word
    assert await life.drain() == 0 and len(life.to(DANA)) == 2

    # later: a leak, an extension (and the changed notice), the release: Erik hears of each, Dana of none
    erik_before = len(life.to(ERIK))
    life.clock.advance(hours=1)
    await command_all(life, tid, f"#leak {WHO} {WHAT}")
    life.clock.advance(hours=1)
    out = await life.command(tid, "#extend 2026-04-15 waiting for a distribution fix")
    assert "disclosure extended to 2026-04-15" in out
    await life.drain()
    await life.at(berlin(2026, 4, 15, 9))
    assert life.report(tid).state == "published"
    later = texts(life, erik, erik_before)
    assert any("Leaked to:" in t for t in later) and any("has been extended" in t for t in later)
    assert any(t.startswith("CHANGED:") for t in later) and any("is lifted" in t for t in later)
    assert len(life.to(DANA)) == 2


# --------------------------------------------------------------------------- 3. #status


async def test_status_lists_deadlines_and_planned_mail_with_the_keyless_member(
    life: Life, people: dict[str, Person]
) -> None:
    """#status shows the sent and planned mail with their instants, and the keyless member through its reminder."""
    tid = await scheduled_report(life, complete=False, members=(DANA, NOKEY))
    await life.drain()
    life.clock.advance(minutes=5)
    out = await life.command(tid, "#status")
    assert "deadlines and planned mail:" in out
    block = out.split("deadlines and planned mail:", 1)[1]
    assert "embargo_notice sent" in block  # Dana's, sent at once
    assert "2026-03-26 09:00 CET (Europe/Berlin) advance_notice planned" in block
    assert "2026-03-30 09:00 CEST (Europe/Berlin) release_held held" in block
    assert "2026-03-25 09:00 CET (Europe/Berlin) preview planned" in block
    keyless = f"reminder planned: embargo member {NOKEY} has no usable OpenPGP key and got nothing"
    assert f"2026-03-24 09:00 CET (Europe/Berlin) {keyless}" in block, block
    assert f"reminder sent: embargo member {NOKEY} has no usable OpenPGP key" in block  # today's, already sent
    assert "release_incomplete" not in block and "the release email is incomplete" in block


# --------------------------------------------------------------------------- 4. #disclose now after a leak


async def test_disclose_now_after_a_leak_sends_the_release_on_the_next_drain(
    life: Life, people: dict[str, Person]
) -> None:
    """After a leak, `#disclose now` on a complete release sends the release email on the next drain; members told."""
    dana = people[DANA]
    tid = await leaky_report(life, people)
    life.clock.advance(hours=1)
    await command_all(life, tid, f"#leak {WHO} {WHAT}")
    await life.at(berlin(2026, 3, 24, 9))  # the decision reminder
    assert len(topics(life, "leak_decision")) == 1 and not life.to(LIST)
    life.clock.advance(minutes=20)
    out = await life.command(tid, "#disclose now")
    assert "disclosure now: the release email goes out at once" in out
    assert not life.to(LIST)  # nothing until the scheduler runs
    await life.drain()
    [release] = life.to(LIST)  # the release, no advance notice
    text = " ".join(release.text.split())
    assert "Security release available" in text and RELEASE_URL in text and ADVISORY_URL in text
    for word in REPORT_WORDS:
        assert word not in text, word
    assert life.report(tid).state == "published"
    changed, lifted = (dana.read(m) for m in life.to(DANA)[-2:])  # the new date, then the lifting
    assert changed.startswith("CHANGED:") and "2026-03-30 09:00 CEST (Europe/Berlin) -> 2026-03-24 09:20 CET" in changed
    assert "is lifted" in lifted and RELEASE_URL in lifted
    assert await life.drain() == 0 and len(life.to(LIST)) == 1
