"""Issue 11: nothing dropped silently (items 3-5), the encrypted mail real clients send (6-11), attachments to
maintainers (12) and the missing fields over a conversation (13).

Each message is built the way the named client builds it: real gpg for the ciphertext (``gpg -ea``, Thunderbird
PGP/MIME, Exchange's rewrite, an HTML-only webmail with Mailvelope armor), an AEAD (OCB) message packet by packet
(:mod:`tests.openpgp_aead`), real DSNs and notifications.
"""

# ruff: noqa: F811 - the `keys` fixture is imported from tests.test_openpgp_flow and named by the tests
from __future__ import annotations

import base64
import quopri
import random
import subprocess
from pathlib import Path

import pytest
from sqlalchemy import select

from inbound.imap_client import return_path
from mailer import parsing
from mailer.app import Service
from mailer.intake import Received, store_batch
from mailer.models import Attachment, Event, InboundMessage, Report, ReportMessage
from mailer.parsing import UNKNOWN_ENVELOPE, extract_fields
from tests.conftest import smtp_port
from tests.gpgtools import exchange_mangled, inner_text_entity
from tests.gpgtools import unwrap_default as unwrap
from tests.openpgp_aead import ocb_message, tamper
from tests.relay import CaptureRelay
from tests.test_intake import CONTACT, asend
from tests.test_openpgp_flow import (
    KEYED,
    REPORTER,
    Keys,
    client_gpg,
    encrypted_entity,
    envelope,
    keys,  # noqa: F401 - the module-scoped key fixture
    running,
    thunderbird,
)

BODY = "Description: heap overflow in the tokenizer\nSteps to reproduce: feed it 70000 brackets\nAffected versions: 2.1\n"


def reports(service: Service) -> list[Report]:
    with service.db.session() as s:
        return list(s.scalars(select(Report).order_by(Report.id)))


def in_messages(service: Service) -> list[ReportMessage]:
    with service.db.session() as s:
        return list(s.scalars(select(ReportMessage).where(ReportMessage.direction == "in").order_by(ReportMessage.id)))


def notice_text(relay: CaptureRelay, keys: Keys) -> str:
    """The newest notice to Kim (the maintainer with a pinned key), decrypted with Kim's key."""
    from mailer.openpgp import OpenPGP

    notice = relay.handler.to(KEYED)[-1]
    out = unwrap(notice.raw, OpenPGP(keys.maintainer.path))
    assert out.encrypted, "the notice is encrypted to the maintainer"
    return out.text


def plain_mail(*, sender: str, subject: str, body: str, extra: str = "", msgid: str = "<n1@notify.test>") -> bytes:
    return (f"From: {sender}\r\nTo: {CONTACT}\r\nSubject: {subject}\r\nMessage-ID: {msgid}\r\n"
            f"Date: Sat, 01 Feb 2025 10:00:00 +0000\r\n{extra}MIME-Version: 1.0\r\n"
            f"Content-Type: text/plain; charset=UTF-8\r\n\r\n{body}\r\n").encode()


# --------------------------------------------------------------------------- items 3, 4, 5: nothing dropped


async def test_noreply_notification_is_filed_as_automated(service: Service, relay: CaptureRelay) -> None:
    """Item 3: a GitHub-style notification from noreply@ is a report (no ack, flagged automated), not a bounce."""
    raw = plain_mail(sender="GitHub <noreply@github.com>", subject="[example/app] Security advisory GHSA-xxxx opened",
                     body="A security advisory was reported privately for example/app: path traversal in upload.",
                     extra="X-GitHub-Reason: security_alert\r\n")
    await asend(smtp_port(service), raw, sender="noreply@github.com")
    await service.settle()
    [report] = reports(service)
    assert report.flags["automated"] == "sender is a mailer daemon"
    assert "path traversal" in report.fields["description"]
    assert relay.handler.to("noreply@github.com") == []
    with service.db.session() as s:
        [row] = s.scalars(select(InboundMessage))
        assert row.classification == "new"


async def test_null_sender_without_dsn_content_is_filed(service: Service, relay: CaptureRelay) -> None:
    """Item 3: the null sender alone does not make a bounce (a calendar robot): filed, not answered."""
    await asend(smtp_port(service), plain_mail(sender="calendar@reporter.test", subject="Invitation: security sync",
                                               body="You are invited."), sender="")
    await service.settle()
    [report] = reports(service)
    assert report.flags["automated"] == "null envelope sender"
    assert relay.handler.to("calendar@reporter.test") == []


def dsn(original_msgid: str) -> bytes:
    """A Postfix DSN (RFC 3464) about a message we never sent."""
    return ("From: MAILER-DAEMON@mx.elsewhere.test (Mail Delivery System)\r\nTo: security@example.org\r\n"
            "Subject: Undelivered Mail Returned to Sender\r\nAuto-Submitted: auto-replied\r\nMIME-Version: 1.0\r\n"
            'Content-Type: multipart/report; report-type=delivery-status; boundary="dsn-b"\r\n\r\n'
            "--dsn-b\r\nContent-Description: Notification\r\nContent-Type: text/plain\r\n\r\n"
            "I'm sorry to have to inform you that your message could not be delivered.\r\n\r\n"
            "--dsn-b\r\nContent-Description: Delivery report\r\nContent-Type: message/delivery-status\r\n\r\n"
            "Reporting-MTA: dns; mx.elsewhere.test\r\n\r\nFinal-Recipient: rfc822; nobody@elsewhere.test\r\n"
            "Action: failed\r\nStatus: 5.1.1\r\n\r\n"
            "--dsn-b\r\nContent-Description: Undelivered Message Headers\r\nContent-Type: text/rfc822-headers\r\n\r\n"
            f"Message-ID: {original_msgid}\r\nSubject: hello\r\n\r\n--dsn-b--\r\n").encode()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_inbound_list_shows_what_was_not_filed_and_why(service: Service, relay: CaptureRelay) -> None:
    """Item 5: `mailer inbound list` names the ignored DSN and the key request, with the reason; not the report."""
    from tests.test_cli import _json, mailer

    await asend(smtp_port(service), dsn("<never@elsewhere.test>"), sender="")
    await asend(smtp_port(service), plain_mail(sender=REPORTER, subject="key?", body="your key please"),
                rcpts=("security-sendkey@example.org",))
    await asend(smtp_port(service), plain_mail(sender=REPORTER, subject="Bug", body="Description: x",
                                               msgid="<r@reporter.test>"))
    await service.settle()
    code, out = await mailer(service.config, "inbound", "list", "--json")
    assert code == 0, out
    rows = _json(out)
    assert isinstance(rows, list)
    by_kind = {r["classification"]: r for r in rows}
    assert set(by_kind) == {"ignored", "sendkey"}
    assert "delivery-status notification matching no report" in by_kind["ignored"]["reason"]
    assert by_kind["ignored"]["mail_from"] in ("", "<>") and by_kind["ignored"]["from"].startswith("MAILER-DAEMON")
    code, out = await mailer(service.config, "inbound", "list", "--state", "ignored", "--json")
    assert code == 0 and [r["classification"] for r in _json(out)] == ["ignored"]  # type: ignore[union-attr]


async def test_imap_message_without_return_path_is_filed_and_acknowledged(service: Service,
                                                                           relay: CaptureRelay) -> None:
    """Item 4: a message appended to the mailbox without Return-Path: the sender is unknown, not null."""
    raw = plain_mail(sender="Rita <rita@reporter.test>", subject="XSS in the admin panel",
                     body="Description: stored XSS in the admin panel\nAffected versions: 3.0")
    assert return_path(raw) == UNKNOWN_ENVELOPE
    assert return_path(b"Return-Path: <>\r\n" + raw) == ""
    # what the IMAP poller stores: Received(raw, "imap", where, return_path(raw), (username,))
    store_batch(service.db, [Received(raw, "imap", "INBOX;UID=7", return_path(raw), ("security",))])
    await service.settle()
    [report] = reports(service)
    assert report.reporter == "rita@reporter.test" and "envelope_sender" in report.flags
    [ack] = relay.handler.to("rita@reporter.test")
    assert report.tracking_id in ack.message["Subject"]


# --------------------------------------------------------------------------- item 10: AEAD


def service_key_colons(service: Service) -> str:
    return subprocess.run(["gpg", "--homedir", str(service.config.gnupg_home), "--batch", "--with-colons",
                           "--with-key-data", "--list-keys", service.fingerprint],
                          capture_output=True, text=True, check=True, timeout=30).stdout


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_aead_ocb_message_is_accepted_and_tampering_refused(tmp_path: Path, migrated: str,
                                                                   relay: CaptureRelay, keys: Keys) -> None:
    """Item 10: an OCB (AEAD) PGP/MIME report is decrypted and filed; the same with one bit flipped is refused."""
    async with running(tmp_path, migrated, relay, keys) as service:
        colons = service_key_colons(service)
        inner = inner_text_entity(BODY, subject="Tokenizer overflow")
        armored = ocb_message(inner, colons)
        bad = unwrap(envelope(encrypted_entity(tamper(ocb_message(inner, colons)))), service.gpg)
        assert not bad.encrypted and bad.errors and "70000" not in bad.text
        await asend(smtp_port(service), envelope(encrypted_entity(armored)))
        await service.settle()
        [report] = reports(service)
        assert report.flags.get("encrypted") is True and "openpgp_error" not in report.flags, report.flags
        assert report.subject == "Tokenizer overflow" and "70000 brackets" in report.fields["steps"]


# --------------------------------------------------------------------------- item 6: gpg -ea as an attachment


def with_attachment(content_type: str, data: bytes, *, cte: str = "base64") -> bytes:
    """A client attaching ``message.txt.asc`` (the policy's recipe) to a short clear text."""
    encoded = base64.encodebytes(data).decode() if cte == "base64" else data.decode("ascii")
    part = ('Content-Type: multipart/mixed; boundary="att-b"\r\n\r\n'
            "--att-b\r\nContent-Type: text/plain; charset=UTF-8\r\n\r\n"
            "Hello, my report is attached, encrypted with your key as your policy says.\r\n"
            f'--att-b\r\nContent-Type: {content_type}; name="message.txt.asc"\r\n'
            'Content-Disposition: attachment; filename="message.txt.asc"\r\n'
            f"Content-Transfer-Encoding: {cte}\r\n\r\n{encoded}\r\n--att-b--\r\n").encode()
    return envelope(part, subject="Security report")


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("content_type,cte", [("application/pgp-encrypted", "7bit"),
                                              ("application/octet-stream", "base64"),
                                              ("text/plain", "7bit")])
async def test_attached_asc_from_gpg_ea_is_decrypted(  # noqa: PLR0917 - pytest passes fixtures by name
        tmp_path: Path, migrated: str, relay: CaptureRelay, keys: Keys, content_type: str, cte: str) -> None:
    """Item 6: `gpg -ea message.txt` attached as .asc (three content types) is decrypted and kept as message.txt."""
    async with running(tmp_path, migrated, relay, keys) as service:
        client_gpg(keys.reporter, service)
        asc = keys.reporter.gpg("--trust-model", "always", "-ea", "-r", service.fingerprint, data=BODY.encode()).stdout
        await asend(smtp_port(service), with_attachment(content_type, asc, cte=cte))
        await service.settle()
        [report] = reports(service)
        assert report.flags.get("encrypted") is True and "openpgp_error" not in report.flags
        assert "70000 brackets" in report.fields["steps"]
        with service.db.session() as s:
            [attachment] = s.scalars(select(Attachment))
            assert (attachment.filename, attachment.data) == ("message.txt", BODY.encode())
        text = notice_text(relay, keys)
        assert "OpenPGP:         encrypted" in text and "message.txt text/plain" in text


# --------------------------------------------------------------------------- item 7: inline PGP in HTML


def html_only(armored: bytes) -> bytes:
    """An HTML-only webmail with Mailvelope armor: <br> lines, &nbsp;, entities, quoted-printable."""
    lines = armored.decode("ascii").replace("\r\n", "\n").strip().split("\n")
    lines.insert(1, "Comment:&nbsp;https://mailvelope.com")
    html = '<div dir="ltr"><p>Hello&nbsp;security team,</p><p>' + "<br>\n".join(
        line.replace("+", "&#43;") + ("&nbsp;" if i % 3 == 0 else "") for i, line in enumerate(lines)) + "</p></div>"
    qp = quopri.encodestring(html.encode()).decode()
    part = f"Content-Type: text/html; charset=UTF-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n{qp}\r\n"
    return envelope(part.encode(), subject="Report")


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_inline_pgp_in_html_is_decrypted_or_alerted(tmp_path: Path, migrated: str, relay: CaptureRelay,
                                                           keys: Keys) -> None:
    """Item 7: armor in text/html (NBSP, entities) is decrypted; broken armor is an alert, never "not encrypted"."""
    async with running(tmp_path, migrated, relay, keys) as service:
        client_gpg(keys.reporter, service)
        armored = keys.reporter.encrypt(BODY.encode(), [service.fingerprint])
        await asend(smtp_port(service), html_only(armored))
        broken = armored.replace(armored.split(b"\n")[5], b"AAAA" + armored.split(b"\n")[5][4:])
        await asend(smtp_port(service), html_only(broken).replace(b"Message-ID: <", b"Message-ID: <x"))
        await service.settle()
        good, bad = reports(service)
        assert good.flags.get("encrypted") is True and "openpgp_error" not in good.flags
        assert "70000 brackets" in good.fields["steps"]
        assert bad.flags.get("encrypted") is True and "decryption failed" in bad.flags["openpgp_error"]
        text = notice_text(relay, keys)
        assert "ALERT:" in text and "not encrypted" not in text.replace("NOT decrypted", "")


# --------------------------------------------------------------------------- item 8: misplaced protected-headers


def misplaced_alternative() -> bytes:
    """A decrypted multipart/alternative whose text/plain carries protected-headers (no v1 at the top)."""
    text = ('Content-Type: multipart/alternative; boundary="alt-b"\n\n'
            '--alt-b\nContent-Type: text/plain; charset=UTF-8; protected-headers="v1"\n'
            "Subject: Injected subject\n\n" + BODY +
            "--alt-b\nContent-Type: text/html; charset=UTF-8\n\n<p>" + BODY.replace("\n", "<br>") + "</p>\n"
            "--alt-b--\n")
    return text.replace("\n", "\r\n").encode()


def legacy_display_then_html() -> bytes:
    """protected-headers v1 at the top, a legacy display part, and the body only as HTML."""
    text = ('Content-Type: multipart/mixed; boundary="mx-b"; protected-headers="v1"\nSubject: Real subject\n\n'
            '--mx-b\nContent-Type: text/plain; charset=UTF-8; protected-headers="v1"\n'
            "Content-Disposition: inline\n\nSubject: Real subject\n"
            "--mx-b\nContent-Type: text/html; charset=UTF-8\n\n<p>" + BODY.replace("\n", "<br>") + "</p>\n"
            "--mx-b--\n")
    return text.replace("\n", "\r\n").encode()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_decrypted_alternative_keeps_its_body(tmp_path: Path, migrated: str, relay: CaptureRelay,
                                                    keys: Keys) -> None:
    """Item 8: the body is kept (HTML as text when needed), it counts as encrypted, headers only from v1 at the top."""
    async with running(tmp_path, migrated, relay, keys) as service:
        client_gpg(keys.reporter, service)
        for inner in (misplaced_alternative(), legacy_display_then_html()):
            out = unwrap(thunderbird(keys.reporter, [service.fingerprint], inner), service.gpg)
            assert out.encrypted and "70000 brackets" in out.text, out
        await asend(smtp_port(service), thunderbird(keys.reporter, [service.fingerprint], misplaced_alternative()))
        await service.settle()
        [report] = reports(service)
        assert report.subject == "..." and "70000 brackets" in report.fields["steps"]
        [message] = in_messages(service)
        assert message.meta["openpgp"]["encrypted"] is True
        # a list-wrapped encrypted part does not override the outer Subject
        wrapped = envelope((b'Content-Type: multipart/mixed; boundary="list-b"\r\n\r\n--list-b\r\n')
                           + encrypted_entity(keys.reporter.encrypt(legacy_display_then_html(), [service.fingerprint]))
                           + b"\r\n--list-b\r\nContent-Type: text/plain\r\n\r\n_______________\r\ndev mailing list\r\n"
                           b"--list-b--\r\n", subject="[dev] Outer subject")
        out = unwrap(wrapped, service.gpg)
        assert out.encrypted and out.protected_headers == {}


# --------------------------------------------------------------------------- item 9: Exchange, no final boundary


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_exchange_mangled_without_final_boundary_is_repaired(tmp_path: Path, migrated: str,
                                                                   relay: CaptureRelay, keys: Keys) -> None:
    """Item 9: Exchange's rewrite whose final boundary lost its `--` (an extra empty part) is decrypted."""
    async with running(tmp_path, migrated, relay, keys) as service:
        client_gpg(keys.reporter, service)
        raw = exchange_mangled(keys.reporter.encrypt(inner_text_entity(BODY, subject="Tokenizer"), [service.fingerprint]))
        assert raw.endswith(b"--ex-b--\r\n")
        raw = raw[: -len(b"--ex-b--\r\n")] + b"--ex-b\r\n\r\n"
        await asend(smtp_port(service), raw)
        await service.settle()
        [report] = reports(service)
        assert report.flags.get("encrypted") is True and "openpgp_error" not in report.flags
        assert "70000 brackets" in report.fields["steps"]
        [ack] = relay.handler.to(REPORTER)
        assert "Your encrypted report was received" in ack.message["Subject"]
        assert "encrypted.asc" not in notice_text(relay, keys)


# --------------------------------------------------------------------------- item 11: forwarded encrypted message


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_forwarded_encrypted_message_is_decrypted_and_recorded(tmp_path: Path, migrated: str,
                                                                     relay: CaptureRelay, keys: Keys) -> None:
    """Item 11: Thunderbird "forward as attachment" of an encrypted report: decrypted, recorded as forwarded."""
    async with running(tmp_path, migrated, relay, keys) as service:
        client_gpg(keys.reporter, service)
        original = thunderbird(keys.reporter, [service.fingerprint], inner_text_entity(BODY, subject="Tokenizer"))
        part = (b'Content-Type: multipart/mixed; boundary="fw-b"\r\n\r\n'
                b"--fw-b\r\nContent-Type: text/plain; charset=UTF-8\r\n\r\nFYI, this reached me instead of you.\r\n"
                b'--fw-b\r\nContent-Type: message/rfc822; name="Tokenizer.eml"\r\n'
                b'Content-Disposition: attachment; filename="Tokenizer.eml"\r\n\r\n') + original + b"\r\n--fw-b--\r\n"
        await asend(smtp_port(service), envelope(part, sender="fred@forwarder.test", subject="Fwd: ..."),
                    sender="fred@forwarder.test")
        await service.settle()
        [report] = reports(service)
        assert "70000 brackets" in report.fields["steps"]
        assert report.flags["forwarded"] == {"by": "fred@forwarder.test", "from": [f"<{REPORTER}>"]}
        assert "Forwarded:" in notice_text(relay, keys)


# --------------------------------------------------------------------------- item 12: attachments to maintainers


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_attachments_reach_maintainers_encrypted_up_to_the_cap(tmp_path: Path, migrated: str,
                                                                     relay: CaptureRelay, keys: Keys) -> None:
    """Item 12: the PoC rides along (encrypted) with the notice; one over the cap is listed with the CLI to fetch it."""
    from mailer.openpgp import OpenPGP

    async with running(tmp_path, migrated, relay, keys, parsing={"notice_attachment_bytes": 2000}) as service:
        client_gpg(keys.reporter, service)
        big = bytes(range(256)) * 20
        inner = ('Content-Type: multipart/mixed; boundary="in-b"; protected-headers="v1"\nSubject: PoC\n\n'
                 "--in-b\nContent-Type: text/plain; charset=UTF-8\n\n" + BODY +
                 '--in-b\nContent-Type: text/x-python; name="poc.py"\nContent-Disposition: attachment; filename="poc.py"\n\n'
                 "print('proof')\n"
                 '--in-b\nContent-Type: image/png; name="screen.png"\nContent-Disposition: attachment; filename="screen.png"\n'
                 "Content-Transfer-Encoding: base64\n\n" + base64.encodebytes(big).decode() + "--in-b--\n")
        await asend(smtp_port(service), thunderbird(keys.reporter, [service.fingerprint],
                                                     inner.replace("\n", "\r\n").encode()))
        await service.settle()
        [report] = reports(service)
        notice = relay.handler.to(KEYED)[-1]
        assert b"proof" not in notice.raw
        out = unwrap(notice.raw, OpenPGP(keys.maintainer.path))
        assert [(a.filename, a.data.strip()) for a in out.attachments] == [("poc.py", b"print('proof')")]
        assert "screen.png image/png 5120 bytes: not attached" in out.text
        assert f"mailer reports attachments {report.tracking_id} --output DIR" in out.text
        # the keyless maintainers' notices carry no attachment at all
        for other in relay.handler.to("nofpr@project.test"):
            assert b"proof" not in other.raw and b"poc.py" not in other.raw


# --------------------------------------------------------------------------- item 13: fields over the conversation


def test_versions_are_recognised_in_prose() -> None:
    """Item 13: "I use version 2.1", "v1.2", "0.13.0" fill the versions field; an IP address or a line does not."""
    for text, expected in (("It crashes. I use version 2.1 on Debian.", "2.1"), ("Tested on v1.2 only.", "v1.2"),
                           ("Broken since 0.13.0.", "0.13.0")):
        fields, missing = extract_fields(text)
        assert fields["versions"] == expected and "versions" not in missing
    fields, missing = extract_fields("The server at 192.168.1.1 crashes, see line 42.")
    assert "versions" in missing


def test_the_heading_prefilter_never_hides_a_heading() -> None:
    """extract_fields skips the heading pattern on lines with a character no heading has: over random
    lines of heading-ish pieces, the skip never changes whether a line is a heading."""
    rng = random.Random(11)
    pieces = [*"abcXYZ ()/#*:\t\u00a0\u2003.,1-_\u00e9\u3000", "Steps to reproduce", "Versions", "## ", "**"]
    headings = 0
    for _ in range(50_000):
        line = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 8)))
        if parsing._HEADING.match(line) is not None:
            headings += 1
            assert parsing._NOT_HEADING.search(line) is None, repr(line)
    assert headings > 1000  # the lines do include headings
    fields, _ = extract_fields("## Steps to reproduce\nrun it.\n**Versions**\n1.2.3\n")
    assert fields["steps"] == "run it." and fields["versions"] == "1.2.3"


async def test_followup_supplies_missing_fields(service: Service, relay: CaptureRelay) -> None:
    """Item 13: a follow-up that gives the steps and the version updates the report's fields."""
    await asend(smtp_port(service), plain_mail(sender=REPORTER, subject="Crash", body="Description: the parser crashes",
                                               msgid="<c1@reporter.test>"))
    await service.settle()
    [report] = reports(service)
    assert set(report.missing_fields) == {"steps", "versions", "mitigations"}
    follow = plain_mail(sender=REPORTER, subject=f"Re: [{report.tracking_id}] Crash", msgid="<c2@reporter.test>",
                        body="Steps to reproduce: run it on an empty file.\n\nI use version 2.1.")
    await asend(smtp_port(service), follow)
    await service.settle()
    [report] = reports(service)
    assert report.missing_fields == ["mitigations"]
    assert "empty file" in report.fields["steps"] and "2.1" in report.fields["versions"]
    with service.db.session() as s:
        [event] = s.scalars(select(Event).where(Event.kind == "report.fields"))
        assert event.detail["supplied"] == ["steps", "versions"]
