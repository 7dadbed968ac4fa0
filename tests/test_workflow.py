"""Processing: filing, threading follow-ups, RFC 3834 loop rules, hostile structure, failures."""

from __future__ import annotations

import base64
from email.message import EmailMessage

from sqlalchemy import func, select

from mailer.app import Service
from mailer.clock import FakeClock
from mailer.config import Config
from mailer.models import Event, InboundMessage, InboundState, Report, ReportMessage
from mailer.pipeline import PREPARE, Pipeline
from mailer.processing import Processing
from mailer.queues import retry_failed
from mailer.worker import Worker
from tests.conftest import smtp_port
from tests.relay import CaptureRelay
from tests.test_intake import CONTACT, asend, report_bytes

REPORTER = "rita@reporter.test"


def mail(subject: str = "Bug", body: str = "Description: a bug\n", *, msgid: str | None = None, **headers: str) -> bytes:
    msg = EmailMessage()
    msg["From"] = REPORTER
    msg["To"] = CONTACT
    msg["Subject"] = subject
    if msgid:
        msg["Message-ID"] = msgid
    for name, value in headers.items():
        msg[name.replace("_", "-")] = value
    msg.set_content(body)
    return msg.as_bytes()


def reports(service: Service) -> list[Report]:
    with service.db.session() as s:
        return list(s.scalars(select(Report).order_by(Report.id)))


def messages_of(service: Service, tracking_id: str) -> list[ReportMessage]:
    with service.db.session() as s:
        report = s.scalar(select(Report).where(Report.tracking_id == tracking_id))
        assert report is not None
        return list(report.messages)


def events(service: Service, kind: str) -> list[Event]:
    with service.db.session() as s:
        return list(s.scalars(select(Event).where(Event.kind == kind)))


async def file_one(service: Service, relay: CaptureRelay) -> tuple[Report, str]:
    await asend(smtp_port(service), mail(msgid="<orig@reporter.test>"))
    await service.settle()
    [report] = reports(service)
    [ack] = relay.handler.to(REPORTER)
    return report, ack.message["Message-ID"]


async def test_report_fields_are_parsed_and_missing_ones_named(service: Service, relay: CaptureRelay) -> None:
    """Headings and Key: lines fill the policy's fields; the ack names the missing ones."""
    body = "Intro text.\n\n## Steps to reproduce\n1. run it\n2. crash\n\nAffected versions: 1.0 to 1.4\n"
    await asend(smtp_port(service), mail(body=body))
    await service.settle()
    [report] = reports(service)
    assert report.fields["steps"] == "1. run it\n2. crash"
    assert report.fields["versions"] == "1.0 to 1.4"
    assert report.fields["description"] == "Intro text."
    assert report.missing_fields == ["mitigations"]
    ack = relay.handler.to(REPORTER)[0].text
    assert "any possible mitigations" in ack
    assert "the affected version(s)" not in ack
    assert report.tracking_id in ack


async def test_reply_to_ack_is_a_followup(service: Service, relay: CaptureRelay) -> None:
    """A reply whose In-Reply-To names our ack is attached to the report, not filed anew."""
    report, ack_id = await file_one(service, relay)
    await asend(smtp_port(service), mail("Re: something", "more details", msgid="<f1@reporter.test>", In_Reply_To=ack_id))
    await service.settle()
    assert len(reports(service)) == 1
    kinds = [(m.direction, m.kind) for m in messages_of(service, report.tracking_id)]
    assert ("in", "followup") in kinds
    assert len(relay.handler.to(REPORTER)) == 1  # follow-ups are not acknowledged again


async def test_tracking_id_in_subject_is_a_followup(service: Service, relay: CaptureRelay) -> None:
    """Any mail whose subject carries the tracking id joins that report."""
    report, _ = await file_one(service, relay)
    await asend(smtp_port(service), mail(f"about {report.tracking_id.lower()}", "new info"))
    await service.settle()
    assert len(reports(service)) == 1
    assert [m.kind for m in messages_of(service, report.tracking_id) if m.direction == "in"] == ["report", "followup"]


async def test_references_to_the_report_is_a_followup(service: Service, relay: CaptureRelay) -> None:
    """A mail whose References names the original report joins it."""
    _report, _ = await file_one(service, relay)
    await asend(smtp_port(service), mail("Another thing", "x", References="<unrelated@x.test> <orig@reporter.test>"))
    await service.settle()
    assert len(reports(service)) == 1


async def test_unknown_tracking_id_files_a_new_report(service: Service, relay: CaptureRelay) -> None:
    """A subject naming a tracking id that does not exist is a new report."""
    await asend(smtp_port(service), mail("Re: [SEC-2020-0042] old", "x"))
    await service.settle()
    assert len(reports(service)) == 1


async def test_bounce_of_our_ack_is_recorded_not_acknowledged(service: Service, relay: CaptureRelay) -> None:
    """A DSN from the null sender that quotes our ack's Message-ID is recorded against the report."""
    report, ack_id = await file_one(service, relay)
    dsn = (
        "From: MAILER-DAEMON@mx.reporter.test\r\nTo: security@example.org\r\nSubject: Undelivered Mail\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="b"\r\nMIME-Version: 1.0\r\n\r\n'
        "--b\r\nContent-Type: text/plain\r\n\r\nDelivery failed.\r\n"
        "--b\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx\r\n\r\n"
        "Final-Recipient: rfc822; rita@reporter.test\r\nAction: failed\r\nStatus: 5.1.1\r\n"
        f"--b\r\nContent-Type: text/rfc822-headers\r\n\r\nMessage-ID: {ack_id}\r\nSubject: ack\r\n--b--\r\n"
    ).encode()
    await asend(smtp_port(service), dsn, sender="")
    await service.settle()
    assert len(reports(service)) == 1
    kinds = [m.kind for m in messages_of(service, report.tracking_id) if m.direction == "in"]
    assert kinds == ["report", "bounce"]
    assert len(relay.messages) == 3  # the ack and two maintainer notices; nothing for the bounce


async def test_vacation_reply_to_our_ack_is_recorded_not_acknowledged(service: Service, relay: CaptureRelay) -> None:
    """An auto-reply (Auto-Submitted: auto-replied) threaded to our ack is recorded, not answered."""
    report, ack_id = await file_one(service, relay)
    await asend(
        smtp_port(service),
        mail("Out of office", "I am away", In_Reply_To=ack_id, Auto_Submitted="auto-replied"),
    )
    await service.settle()
    assert len(reports(service)) == 1
    kinds = [m.kind for m in messages_of(service, report.tracking_id) if m.direction == "in"]
    assert kinds == ["report", "autoreply"]
    assert len(relay.handler.to(REPORTER)) == 1
    assert not relay.handler.to("mara@project.test")[1:]  # no notice for an auto-reply


async def test_unmatched_bounce_is_ignored_but_kept(service: Service, relay: CaptureRelay) -> None:
    """A bounce that matches no report files nothing, sends nothing, and keeps the raw message."""
    await asend(smtp_port(service), mail("Undelivered", "failed"), sender="")
    await service.settle()
    assert reports(service) == []
    assert relay.messages == []
    with service.db.session() as s:
        [row] = s.scalars(select(InboundMessage))
        assert row.classification == "ignored" and row.state == "done"


async def test_automatic_mail_is_filed_without_ack(service: Service, relay: CaptureRelay) -> None:
    """Bulk, list and auto-generated mail is filed as a report but never answered (RFC 3834)."""
    cases = [
        {"Precedence": "bulk"},
        {"Precedence": "list"},
        {"List_Id": "<dev.lists.test>"},
        {"Auto_Submitted": "auto-generated"},
        {"X_Loop": CONTACT},
    ]
    for i, headers in enumerate(cases):
        await asend(smtp_port(service), mail(f"scan {i}", "finding", **headers))
    await asend(smtp_port(service), mail("daemon", "x"), sender="postmaster@reporter.test")
    await service.settle()
    assert len(reports(service)) == len(cases) + 1
    assert relay.handler.to(REPORTER) == [] and relay.handler.to("postmaster@reporter.test") == []
    assert len(events(service, "ack.suppressed")) == len(cases) + 1


async def test_auto_submitted_no_is_answered(service: Service, relay: CaptureRelay) -> None:
    """``Auto-Submitted: no`` is a human message and gets an ack."""
    await asend(smtp_port(service), mail(Auto_Submitted="no"))
    await service.settle()
    assert len(relay.handler.to(REPORTER)) == 1


async def test_bare_lf_cannot_smuggle_loop_headers(service: Service, relay: CaptureRelay) -> None:
    """A bare LF inside a CRLF header line does not create an X-Loop or Auto-Submitted header."""
    raw = (
        b"From: rita@reporter.test\r\nTo: security@example.org\r\n"
        b"Subject: hello\nAuto-Submitted: auto-replied\nX-Loop: security@example.org\r\n"
        b"Message-ID: <lf@reporter.test>\r\n\r\nDescription: bug\r\n"
    )
    await asend(smtp_port(service), raw)
    await service.settle()
    [report] = reports(service)
    assert len(relay.handler.to(REPORTER)) == 1  # not suppressed as an auto-reply or loop
    assert "\n" not in report.subject


async def test_encoded_word_crlf_never_reaches_an_outgoing_header(service: Service, relay: CaptureRelay) -> None:
    """A subject whose encoded word decodes to CR/LF cannot inject a header into the ack."""
    payload = base64.b64encode(b"Hi\r\nBcc: victim@evil.test\r\nX-Injected: 1").decode()
    raw = (
        "From: rita@reporter.test\r\nTo: security@example.org\r\n"
        f"Subject: =?utf-8?b?{payload}?=\r\nMessage-ID: <ew@reporter.test>\r\n\r\nbody\r\n"
    ).encode()
    await asend(smtp_port(service), raw)
    await service.settle()
    [ack] = relay.handler.to(REPORTER)
    head = ack.raw.split(b"\r\n\r\n", 1)[0]
    lines = head.split(b"\r\n")
    assert not any(line.lower().startswith((b"bcc:", b"x-injected:")) for line in lines)
    assert ack.rcpt_tos == [REPORTER]
    assert "Bcc: victim@evil.test" in ack.message["Subject"]  # kept as inert text on one line


async def test_burst_from_one_sender_is_rate_limited(service: Service, relay: CaptureRelay, config: Config) -> None:
    """Twenty reports from one sender are all filed; only the configured number of acks go out."""
    for i in range(20):
        await asend(smtp_port(service), mail(f"report {i}", f"body {i}"))
    await service.settle()
    assert len(reports(service)) == 20
    assert len(relay.handler.to(REPORTER)) == config.service.acks_per_sender_per_day == 5
    assert len(events(service, "ack.suppressed")) == 15


def nested(depth: int) -> bytes:
    head = "From: rita@reporter.test\r\nTo: security@example.org\r\nSubject: deep\r\nMIME-Version: 1.0\r\n"
    parts = []
    for i in range(depth):
        parts.append(f'Content-Type: multipart/mixed; boundary="b{i}"\r\n\r\n--b{i}\r\n')
    tail = "Content-Type: text/plain\r\n\r\ninnermost\r\n" + "".join(f"--b{i}--\r\n" for i in reversed(range(depth)))
    return (head + "".join(parts) + tail).encode()


def many_parts(count_: int) -> bytes:
    head = ('From: rita@reporter.test\r\nTo: security@example.org\r\nSubject: wide\r\nMIME-Version: 1.0\r\n'
            'Content-Type: multipart/mixed; boundary="w"\r\n\r\n')
    body = "".join(f"--w\r\nContent-Type: text/plain\r\n\r\npart {i}\r\n" for i in range(count_))
    return (head + body + "--w--\r\n").encode()


async def test_hostile_mime_structure_is_bounded(service: Service, relay: CaptureRelay) -> None:
    """Deep nesting and a huge part count are filed as unparseable with raw bytes kept, without crashing the worker."""
    deep, wide = nested(3000), many_parts(20000)
    await asend(smtp_port(service), deep)
    await asend(smtp_port(service), wide)
    await asend(smtp_port(service), mail("normal", "after the hostile ones"))
    await service.settle()
    filed = reports(service)
    assert len(filed) == 3
    assert "MIME parts" in filed[0].flags["unparseable"]
    assert "MIME parts" in filed[1].flags["unparseable"]
    assert "unparseable" not in filed[2].flags
    with service.db.session() as s:
        raws = [r.raw for r in s.scalars(select(InboundMessage).order_by(InboundMessage.id))]
        assert all(r.state == "done" for r in s.scalars(select(InboundMessage)))
    assert raws[0] == deep and raws[1] == wide
    assert len(relay.handler.to(REPORTER)) == 3  # each report is acknowledged


async def test_nesting_that_exhausts_the_parser_is_caught(service: Service) -> None:
    """Nesting within the part-count bound but deep enough to exhaust Python's parser recursion is caught."""
    await asend(smtp_port(service), nested(199))
    await asend(smtp_port(service), mail("normal", "after"))
    await service.settle()
    first, second = reports(service)
    assert first.flags["unparseable"] in ("MIME structure too deeply nested", "MIME nesting deeper than 20")
    assert "unparseable" not in second.flags


async def test_moderately_deep_nesting_beyond_limit_is_unparseable(service: Service) -> None:
    """Nesting just past max_depth (not enough to hit Python's recursion limit) is refused by our bound."""
    await asend(smtp_port(service), nested(30))
    await service.settle()
    [report] = reports(service)
    assert "nesting deeper than 20" in report.flags["unparseable"]


def boom(ctx: Processing) -> None:
    if b"poison" in ctx.inbound.raw:
        raise ValueError("cannot handle this one")


async def test_failing_step_is_recorded_retried_then_kept_for_failed_retry(service: Service, relay: CaptureRelay) -> None:
    """A step that raises leaves the message failed with the step name; others go through; `failed retry` replays it."""
    clock = FakeClock()
    pipeline = Pipeline(prepare=(PREPARE[0], boom, *PREPARE[1:]))
    worker = Worker(service.db, service.config, service.outbox, gpg=service.gpg, pipeline=pipeline, clock=clock)
    await asend(smtp_port(service), mail("poison", "poison pill"))
    await asend(smtp_port(service), mail("fine", "a normal report"))
    for _ in range(service.config.worker.max_attempts + 2):
        await worker.drain()
        clock.advance(hours=1)  # past any retry backoff
    with service.db.session() as s:
        rows = list(s.scalars(select(InboundMessage).order_by(InboundMessage.id)))
        assert [r.state for r in rows] == [InboundState.FAILED.value, InboundState.DONE.value]
        assert rows[0].failed_step == "boom"
        assert "cannot handle this one" in (rows[0].last_error or "")
        assert rows[0].attempts == service.config.worker.max_attempts
        poison_id = rows[0].id
    assert len(reports(service)) == 1  # the failed message left no half-filed report
    retry_failed(service.db, poison_id)
    await service.settle()  # the real pipeline now handles it
    assert len(reports(service)) == 2


async def test_ack_body_tells_tracking_id_and_next_steps(service: Service, relay: CaptureRelay) -> None:
    """The acknowledgement states the tracking id, what happens next and how to encrypt."""
    await asend(smtp_port(service), report_bytes())
    await service.settle()
    text = relay.handler.to(REPORTER)[0].text
    assert "SEC-" in text and "What happens next" in text and "OpenPGP" in text


async def test_event_log_records_filing(service: Service) -> None:
    """Filing and acknowledging are events in the report's log."""
    await asend(smtp_port(service), report_bytes())
    await service.settle()
    kinds = [e.kind for e in events(service, "report.filed") + events(service, "ack.queued")]
    assert kinds == ["report.filed", "ack.queued"]
    with service.db.session() as s:
        assert s.scalar(select(func.count()).select_from(Event)) >= 2


async def test_background_loops_deliver_the_ack_without_settle(config: Config, relay: CaptureRelay) -> None:
    """With the worker and sender running as tasks, an ack arrives at the relay on its own."""
    import asyncio

    svc = Service(config)
    await svc.start(background=True)
    try:
        await asend(smtp_port(svc), report_bytes())
        await asyncio.wait_for(relay.handler.arrived.wait(), timeout=20)
        assert relay.messages
    finally:
        await svc.stop()
        svc.db.dispose()


async def test_keyless_maintainer_is_alerted_to_undecryptable_reports(service: Service, relay: CaptureRelay) -> None:
    """The reason a report could not be decrypted reaches every maintainer, even without a key (it holds no content)."""
    from tests.gpgtools import Home, inner_text_entity, pgpmime_encrypted

    home = Home()
    try:
        other = home.gen_key("Someone Else", "else@elsewhere.test")
        raw = pgpmime_encrypted(home.encrypt(inner_text_entity("secret words"), [other]))
        await asend(smtp_port(service), raw)
        await service.settle()
    finally:
        home.close()
    [report] = reports(service)
    assert report.flags.get("openpgp_error")
    notice = relay.handler.to("mara@project.test")[-1]
    assert "ALERT:           OpenPGP problem" in notice.text
    assert b"secret words" not in notice.raw
