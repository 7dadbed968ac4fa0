"""Maintainers drive the workflow by OpenPGP-signed mail; everything else is refused, never executed."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from mailer.app import Service
from mailer.clock import FakeClock
from mailer.config import Maintainer
from mailer.models import Event, Report, ReportMessage, utcnow
from mailer.openpgp import OpenPGP
from tests.conftest import make_config, smtp_port
from tests.gpgtools import Home, mixed_message, signed_part
from tests.gpgtools import unwrap_default as unwrap
from tests.relay import CaptureRelay
from tests.test_intake import asend, report_bytes

MARA = "mara@project.test"
MAX = "max@project.test"


@pytest.fixture(scope="module")
def mara() -> Iterator[tuple[Home, str]]:
    home = Home()
    # created in the past so that a test can sign "10 days ago" with it
    born = (utcnow() - timedelta(days=60)).strftime("%Y%m%dT%H%M%S")
    fpr = home.gen_key("Mara Maintainer", MARA, faked_time=born)
    yield home, fpr
    home.close()


@pytest.fixture(scope="module")
def eve() -> Iterator[tuple[Home, str]]:
    """An attacker whose key even claims Mara's address."""
    home = Home()
    fpr = home.gen_key("Mara Maintainer", MARA)
    yield home, fpr
    home.close()


@pytest.fixture
async def svc(tmp_path: Path, migrated: str, relay: CaptureRelay, mara: tuple[Home, str]) -> AsyncIterator[Service]:
    home, fpr = mara
    cfg = make_config(tmp_path, migrated, relay.url)
    cfg = cfg.model_copy(update={"maintainers": (
        Maintainer(name="Mara", address=MARA, fingerprint=fpr),
        Maintainer(name="Max", address=MAX, fingerprint=""),
    )})
    service = Service(cfg, clock=FakeClock())
    service.gpg.import_public(home.export(fpr))
    await service.start(background=False)
    yield service
    await service.stop()
    service.db.dispose()


def headers(subject: str, msgid: str, from_: str = MARA, extra: str = "") -> bytes:
    return (f"From: {from_}\r\nTo: security@example.org\r\nSubject: {subject}\r\nMessage-ID: {msgid}\r\n"
            f"{extra}MIME-Version: 1.0\r\n").encode()


def signed(home: Home, fpr: str, body: str, *, subject: str = "cmd", msgid: str = "<c1@project.test>",
           from_: str = MARA, faked_time: str | None = None, extra: str = "") -> bytes:
    """A PGP/MIME signed mail as Thunderbird builds it, signature over the exact first part."""
    parts = signed_part(body)
    message = parts.message(home.sign_detached(parts.signed_part, fpr, faked_time=faked_time))
    rest = message.partition(b"MIME-Version: 1.0\r\n")[2]
    return headers(subject, msgid, from_, extra) + rest


async def file_report(service: Service) -> Report:
    await asend(smtp_port(service), report_bytes(body="Description: overflow in parser\n"))
    await service.settle()
    return reports(service)[-1]


def reports(service: Service) -> list[Report]:
    with service.db.session() as s:
        return list(s.scalars(select(Report).order_by(Report.id)))


def events(service: Service, kind: str) -> list[Event]:
    with service.db.session() as s:
        return list(s.scalars(select(Event).where(Event.kind == kind)))


def open_for(home: Home, raw: bytes) -> str:
    """Decrypt a mail the way the recipient's client would, returning its text."""
    reader = OpenPGP(home.path)
    return unwrap(raw, reader).text


async def send_command(service: Service, raw: bytes, sender: str = MARA) -> None:
    await asend(smtp_port(service), raw, sender=sender)
    await service.settle()


async def test_signed_commands_are_applied_and_answered_with_an_encrypted_transcript(
    svc: Service, relay: CaptureRelay, mara: tuple[Home, str]
) -> None:
    """A maintainer-signed #accept/#severity/#assign runs, is logged with the key, and the transcript is encrypted."""
    home, fpr = mara
    report = await file_report(svc)
    body = f"#report {report.tracking_id}\n#accept\n#severity high\n#assign me\n\nThanks."
    await send_command(svc, signed(home, fpr, body, subject=f"Re: [{report.tracking_id}] New report"))
    [after] = reports(svc)
    assert (after.state, after.severity, after.incident_manager) == ("accepted", "high", MARA)
    [event] = events(svc, "state.accept")
    assert event.actor == fpr
    transcript = relay.handler.to(MARA)[-1]
    assert b"Commands applied" not in transcript.raw  # the subject is protected inside the encryption
    assert b"multipart/encrypted" in transcript.raw
    text = open_for(home, transcript.raw)
    assert "All commands were applied." in text and "state:             accepted" in text
    status = relay.handler.to("rita@reporter.test")[-1]
    assert "accepted" in status.text


async def test_unsigned_commands_from_a_maintainer_are_refused(svc: Service, relay: CaptureRelay, mara: tuple[Home, str]) -> None:
    """Unsigned commands from a maintainer's address change nothing and get a refusal naming the reason."""
    report = await file_report(svc)
    raw = headers(f"[{report.tracking_id}]", "<u1@project.test>") + b"Content-Type: text/plain\r\n\r\n#accept\r\n"
    await send_command(svc, raw)
    assert reports(svc)[0].state == "acknowledged"
    [refusal] = events(svc, "command.refused")
    assert refusal.detail["reason"] == "the message is not signed"
    assert "not signed" in open_for(mara[0], relay.handler.to(MARA)[-1].raw)


async def test_display_name_trick_authorises_nothing(svc: Service, relay: CaptureRelay) -> None:
    """`From: mara@project.test <eve@evil.test>` is read as Mara by Python, but only a signature counts."""
    report = await file_report(svc)
    raw = headers(f"[{report.tracking_id}]", "<u2@evil.test>", from_=f"{MARA} <eve@evil.test>")
    await send_command(svc, raw + b"Content-Type: text/plain\r\n\r\n#accept\r\n#reply you are owned\r\n", sender="eve@evil.test")
    assert reports(svc)[0].state == "acknowledged"
    assert events(svc, "command.refused")
    assert not relay.handler.to("eve@evil.test")  # the refusal goes to Mara's configured address only


async def test_key_claiming_a_maintainer_address_is_not_a_maintainer(svc: Service, eve: tuple[Home, str]) -> None:
    """A valid signature by a key not pinned in the configuration runs nothing, whatever its user id says."""
    report = await file_report(svc)
    home, fpr = eve
    svc.gpg.import_public(home.export(fpr))  # even a key in the keyring is not a maintainer's
    await send_command(svc, signed(home, fpr, f"#report {report.tracking_id}\n#accept\n"))
    assert reports(svc)[0].state == "acknowledged"
    [refusal] = events(svc, "command.refused")
    assert "not a maintainer's key" in refusal.detail["reason"]


async def test_replayed_signature_is_refused(svc: Service, mara: tuple[Home, str]) -> None:
    """The same signed text applied once is refused when it comes again in a new envelope."""
    home, fpr = mara
    report = await file_report(svc)
    raw = signed(home, fpr, f"#report {report.tracking_id}\n#note first\n")
    await send_command(svc, raw)
    assert len(events(svc, "note")) == 1
    replay = raw.replace(b"<c1@project.test>", b"<replay@evil.test>")
    await send_command(svc, replay)
    assert len(events(svc, "note")) == 1
    [refusal] = events(svc, "command.refused")
    assert "replayed" in refusal.detail["reason"]


async def test_signature_for_one_report_cannot_drive_another(svc: Service, mara: tuple[Home, str]) -> None:
    """Signed text naming SEC-A sent in a thread of SEC-B is refused; nothing changes on either."""
    home, fpr = mara
    first, second = await file_report(svc), None
    await asend(smtp_port(svc), report_bytes(msgid="<r2@reporter.test>", body="another bug"))
    await svc.settle()
    second = reports(svc)[1]
    raw = signed(home, fpr, f"#report {first.tracking_id}\n#accept\n", subject=f"Re: [{second.tracking_id}]")
    await send_command(svc, raw)
    assert [r.state for r in reports(svc)] == ["acknowledged", "acknowledged"]


async def test_old_signature_is_refused(svc: Service, mara: tuple[Home, str]) -> None:
    """A signature made longer ago than the configured window is refused."""
    home, fpr = mara
    report = await file_report(svc)
    old = (utcnow() - timedelta(days=10)).strftime("%Y%m%dT%H%M%S")
    await send_command(svc, signed(home, fpr, f"#report {report.tracking_id}\n#accept\n", faked_time=old))
    assert reports(svc)[0].state == "acknowledged"
    assert "older than" in events(svc, "command.refused")[0].detail["reason"]


async def test_commands_are_atomic(svc: Service, relay: CaptureRelay, mara: tuple[Home, str]) -> None:
    """If one command is invalid, none runs, and the transcript says which and why."""
    home, fpr = mara
    report = await file_report(svc)
    await send_command(svc, signed(home, fpr, f"#report {report.tracking_id}\n#accept\n#severity extreme\n#cve CVE-2026-1234\n"))
    [after] = reports(svc)
    assert (after.state, after.severity, after.cve) == ("acknowledged", None, None)
    text = open_for(home, relay.handler.to(MARA)[-1].raw)
    assert "NOTHING was applied" in text
    assert "expected critical, high, medium or low" in text
    assert "not run: an earlier command failed" in text


async def test_invalid_transition_is_an_error(svc: Service, relay: CaptureRelay, mara: tuple[Home, str]) -> None:
    """Closing a report that is only acknowledged is refused by the state machine."""
    home, fpr = mara
    report = await file_report(svc)
    await send_command(svc, signed(home, fpr, f"#report {report.tracking_id}\n#close\n"))
    assert reports(svc)[0].state == "acknowledged"
    assert "cannot close a report in state acknowledged" in open_for(home, relay.handler.to(MARA)[-1].raw)


async def test_reporter_writing_commands_is_a_normal_followup(svc: Service) -> None:
    """A reporter's '#accept' is just text in a follow-up."""
    report = await file_report(svc)
    await asend(smtp_port(svc), report_bytes(msgid="<f@reporter.test>", subject=f"Re: [{report.tracking_id}]", body="#accept\nplease"))
    await svc.settle()
    assert reports(svc)[0].state == "acknowledged"
    with svc.db.session() as s:
        kinds = [m.kind for m in s.scalars(select(ReportMessage).where(ReportMessage.direction == "in"))]
    assert kinds == ["report", "followup"]
    assert not events(svc, "command.refused")


async def test_disclose_extend_and_reply_reach_the_reporter(svc: Service, relay: CaptureRelay, mara: tuple[Home, str]) -> None:
    """#disclose +N counts workdays; #extend needs a later date and a reason; #reply sends the free text from the service."""
    home, fpr = mara
    report = await file_report(svc)
    tid = report.tracking_id
    await send_command(svc, signed(home, fpr, f"#report {tid}\n#accept\n#disclose +5\n#reply\n\nWe confirmed the bug.\n", msgid="<d1@p>"))
    [after] = reports(svc)
    assert after.state == "scheduled" and after.disclose_at is not None
    assert after.disclose_at.weekday() < 5
    later = (after.disclose_at + timedelta(days=14)).strftime("%Y-%m-%d")
    await send_command(svc, signed(home, fpr, f"#report {tid}\n#extend {later} waiting for a distro fix\n", msgid="<d2@p>"))
    assert reports(svc)[0].disclose_at.strftime("%Y-%m-%d") == later  # type: ignore[union-attr]
    texts = [m.text for m in relay.handler.to("rita@reporter.test")]
    assert any("We confirmed the bug." in t for t in texts)
    transcripts = [open_for(home, m.raw) for m in relay.handler.to(MARA)]
    assert any("the reply mail to the reporter could not be encrypted" in t for t in transcripts)
    assert any("waiting for a distro fix" in t for t in texts)
    assert all(MARA.encode() not in m.raw for m in relay.handler.to("rita@reporter.test"))


async def test_list_help_and_argument_validation(svc: Service, relay: CaptureRelay, mara: tuple[Home, str]) -> None:
    """#list and #help answer without a report; addresses are validated, mixed scripts refused."""
    home, fpr = mara
    report = await file_report(svc)
    await send_command(svc, signed(home, fpr, "#list all\n#help\n", msgid="<l1@p>"))
    text = open_for(home, relay.handler.to(MARA)[-1].raw)
    assert report.tracking_id in text and "#disclose" in text
    await send_command(svc, signed(home, fpr, f"#report {report.tracking_id}\n#embargo add аlice@example.org\n", msgid="<l2@p>"))
    assert "mixes scripts" in open_for(home, relay.handler.to(MARA)[-1].raw)
    await send_command(svc, signed(
        home, fpr, f"#report {report.tracking_id}\n#embargo add alice@distro.test\n#cvss CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:H/A:H\n",
        msgid="<l3@p>",
    ))
    [after] = reports(svc)
    assert after.cvss_score == 9.8
    assert "alice@distro.test" in open_for(home, relay.handler.to(MARA)[-1].raw)


async def test_text_outside_the_signed_part_is_refused(svc: Service, mara: tuple[Home, str]) -> None:
    """A signed part next to an unsigned one does not authorise the unsigned text."""
    home, fpr = mara
    report = await file_report(svc)
    inner = signed(home, fpr, f"#report {report.tracking_id}\n#note ok\n")
    signed_entity = inner.partition(b"MIME-Version: 1.0\r\n")[2]
    raw = mixed_message(b"Content-Type: text/plain\r\n\r\n#accept\r\n", signed_entity)
    raw = raw.replace(b"From: Reporter <reporter@example.org>", f"From: {MARA}".encode())
    await send_command(svc, raw)
    assert reports(svc)[0].state == "acknowledged"
    assert not events(svc, "note")


async def test_forwarded_signed_message_never_runs(svc: Service, mara: tuple[Home, str]) -> None:
    """A maintainer's signed message attached as message/rfc822 does not run its commands."""
    home, fpr = mara
    report = await file_report(svc)
    original = signed(home, fpr, f"#report {report.tracking_id}\n#accept\n")
    raw = (headers(f"Fwd: [{report.tracking_id}]", "<fwd@evil.test>", from_="eve@evil.test")
           + b'Content-Type: multipart/mixed; boundary="f"\r\n\r\n--f\r\nContent-Type: text/plain\r\n\r\n#accept\r\n'
           + b"--f\r\nContent-Type: message/rfc822\r\n\r\n" + original + b"\r\n--f--\r\n")
    await send_command(svc, raw, sender="eve@evil.test")
    assert reports(svc)[0].state == "acknowledged"


async def test_inline_clearsigned_commands_run(svc: Service, mara: tuple[Home, str]) -> None:
    """Commands in an inline (cleartext-signed) message, as Mutt or Mailvelope send it, are honoured."""
    home, fpr = mara
    report = await file_report(svc)
    block = home.clearsign(f"#report {report.tracking_id}\n#severity low\n".encode(), fpr).replace(b"\n", b"\r\n")
    raw = headers(f"Re: [{report.tracking_id}]", "<inline@p>") + b"Content-Type: text/plain\r\n\r\n" + block
    await send_command(svc, raw)
    assert reports(svc)[0].severity == "low"


async def test_signed_and_encrypted_commands_run(svc: Service, mara: tuple[Home, str]) -> None:
    """A command mail signed and encrypted to the service key in one OpenPGP message is honoured."""
    from tests.gpgtools import inner_text_entity, pgpmime_encrypted

    home, fpr = mara
    report = await file_report(svc)
    home.import_(svc.gpg.export_public(svc.fingerprint).encode())
    inner = inner_text_entity(f"#report {report.tracking_id}\n#accept\n", subject=f"Re: [{report.tracking_id}]")
    armored = home.encrypt(inner, [svc.fingerprint], signer=fpr)
    raw = pgpmime_encrypted(armored).replace(b"From: Reporter <reporter@example.org>", f"From: {MARA}".encode())
    await send_command(svc, raw)
    assert reports(svc)[0].state == "accepted"


async def test_only_the_incident_manager_is_notified_when_configured(
    svc: Service, relay: CaptureRelay, mara: tuple[Home, str]
) -> None:
    """With commands.notify = incident_manager, follow-ups after #assign go to that maintainer only."""
    home, fpr = mara
    svc.config = svc.worker.config = svc.config.model_copy(
        update={"commands": svc.config.commands.model_copy(update={"notify": "incident_manager"})}
    )
    report = await file_report(svc)
    await send_command(svc, signed(home, fpr, f"#report {report.tracking_id}\n#assign me\n"))
    before_max = len(relay.handler.to(MAX))
    await asend(smtp_port(svc), report_bytes(msgid="<f2@reporter.test>", subject=f"Re: [{report.tracking_id}]", body="more"))
    await svc.settle()
    assert len(relay.handler.to(MAX)) == before_max
    notice = relay.handler.to(MARA)[-1]
    assert "more" in open_for(home, notice.raw)


async def test_list_answers_with_many_reports(svc: Service, relay: CaptureRelay, mara: tuple[Home, str]) -> None:
    """#list with 10 000 reports counts them all and lists a bounded page."""
    from sqlalchemy import insert

    home, fpr = mara
    now = utcnow()
    rows = [{"tracking_id": f"SEC-2025-{i:05d}", "state": "accepted", "reporter": "x@y.test", "subject": "",
             "fields": {}, "missing_fields": [], "flags": {}, "created_at": now, "updated_at": now} for i in range(10_000)]
    with svc.db.session() as s:
        s.execute(insert(Report), rows)
    await send_command(svc, signed(home, fpr, "#list open\n", msgid="<many@p>"))
    text = open_for(home, relay.handler.to(MARA)[-1].raw)
    assert "open reports (10000):" in text
    assert "… and 9800 more" in text


async def test_other_maintainers_hear_of_changes(svc: Service, relay: CaptureRelay, mara: tuple[Home, str]) -> None:
    """A state change by one maintainer reaches the others; without a usable key, without details."""
    home, fpr = mara
    report = await file_report(svc)
    before = len(relay.handler.to(MAX))
    await send_command(svc, signed(home, fpr, f"#report {report.tracking_id}\n#accept\n#note secret-internal-note\n"))
    [change] = relay.handler.to(MAX)[before:]
    assert "Changed by Mara" in change.message["Subject"]
    assert "is now accepted" in change.text
    assert b"secret-internal-note" not in change.raw  # Max has no key: no details in clear


async def test_requested_cve_is_reminded_daily_until_recorded(svc: Service, relay: CaptureRelay, mara: tuple[Home, str]) -> None:
    """`#cve requested` is tracked: after two days maintainers are reminded, once a day, until `#cve` records it."""
    home, fpr = mara
    clock = svc.clock
    assert isinstance(clock, FakeClock)
    report = await file_report(svc)
    await send_command(svc, signed(home, fpr, f"#report {report.tracking_id}\n#accept\n#cve requested via GitHub\n", msgid="<cr@p>"))
    assert svc.scheduler.drain() == 0  # not yet due
    clock.advance(days=3)
    assert svc.scheduler.drain() == 1
    assert svc.scheduler.drain() == 0  # once a day
    await svc.settle()
    assert "Reminder" not in (relay.handler.to(MARA)[-1].message["Subject"] or "")  # the subject is protected
    text = open_for(home, relay.handler.to(MARA)[-1].raw)
    assert "a CVE was requested and none is recorded" in text and "#cve CVE-YYYY-NNNN" in text
    signed_now = clock().strftime("%Y%m%dT%H%M%S")  # the maintainer signs on the (moved) day
    await send_command(svc, signed(home, fpr, f"#report {report.tracking_id}\n#cve CVE-2026-4242\n", msgid="<cr2@p>",
                                   faked_time=signed_now))
    clock.advance(days=2)
    assert svc.scheduler.drain() == 0


async def test_revoked_or_doubly_signed_commands_are_refused(tmp_path: Path, migrated: str, relay: CaptureRelay) -> None:
    """A maintainer key revoked since, or a message with two signatures, runs nothing and the refusal says why."""
    home = Home()
    try:
        born = (utcnow() - timedelta(days=60)).strftime("%Y%m%dT%H%M%S")
        fpr = home.gen_key("Rhea Maintainer", "rhea@project.test", faked_time=born)
        other = home.gen_key("Second Key", "second@project.test", faked_time=born)
        cfg = make_config(tmp_path, migrated, relay.url).model_copy(update={"maintainers": (
            Maintainer(name="Rhea", address="rhea@project.test", fingerprint=fpr),
            Maintainer(name="Sam", address="second@project.test", fingerprint=other),
        )})
        service = Service(cfg)
        service.gpg.import_public(home.export(fpr) + home.export(other))
        await service.start(background=False)
        try:
            report = await file_report(service)
            parts = signed_part(f"#report {report.tracking_id}\n#accept\n")
            double = parts.message(home.sign_detached(parts.signed_part, fpr, other))
            double = headers("cmd", "<two@p>", from_="rhea@project.test") + double.partition(b"MIME-Version: 1.0\r\n")[2]
            await send_command(service, double, sender="rhea@project.test")
            before_revocation = signed(home, fpr, f"#report {report.tracking_id}\n#accept\n", msgid="<rev@p>",
                                       from_="rhea@project.test")
            home.revoke(fpr)
            service.gpg.import_public(home.export(fpr))
            await send_command(service, before_revocation, sender="rhea@project.test")
            assert reports(service)[0].state == "acknowledged"
            reasons = [e.detail["reason"] for e in events(service, "command.refused")]
            assert len(reasons) == 2
            assert "several" in reasons[0] or "signatures" in reasons[0]
            assert "revoked" in reasons[1]
        finally:
            await service.stop()
            service.db.dispose()
    finally:
        home.close()


async def test_status_mail_falls_back_when_the_reporter_key_cannot_encrypt(
    svc: Service, relay: CaptureRelay, mara: tuple[Home, str]
) -> None:
    """A reporter key without an encryption subkey does not block the command: the status goes out signed, and the maintainer is told."""
    from email import policy
    from email.message import EmailMessage

    home, fpr = mara
    reporter = Home()
    try:
        sign_only = reporter.gen_key("Rita", "rita@reporter.test", encrypt_subkey=False)
        msg = EmailMessage()
        msg["From"], msg["To"], msg["Subject"], msg["Message-ID"] = "rita@reporter.test", "security@example.org", "Bug", "<k@r.test>"
        msg.set_content("Description: overflow\n")
        msg.add_attachment(reporter.export(sign_only), maintype="application", subtype="pgp-keys", filename="key.asc")
        await asend(smtp_port(svc), msg.as_bytes(policy=policy.SMTP))
        await svc.settle()
    finally:
        reporter.close()
    [report] = reports(svc)
    await send_command(svc, signed(home, fpr, f"#report {report.tracking_id}\n#accept\n"))
    assert reports(svc)[0].state == "accepted"
    assert events(svc, "status.reporter_key_unusable")
    status = relay.handler.to("rita@reporter.test")[-1]
    assert b"multipart/signed" in status.raw and "accepted" in status.text
    assert "could not be encrypted" in open_for(home, relay.handler.to(MARA)[-1].raw)
