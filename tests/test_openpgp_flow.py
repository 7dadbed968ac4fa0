"""OpenPGP end to end: real gpg, real SMTP in and out, both databases.

Client-side messages are built with :mod:`tests.gpgtools` (the way mail
clients build them, never through :mod:`mailer.pgpmime`); what the service
sends is read from the capture relay and checked from the recipient's side
with a recipient's own GnuPG home.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import textwrap
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from mailer.app import Service
from mailer.config import Maintainer
from mailer.models import Event, InboundMessage, Report, ReportKey, ReportMessage
from mailer.openpgp import OpenPGP
from mailer.pgpmime import Unwrapped
from mailer.wellknown import fingerprint_groups
from tests.conftest import make_config, smtp_port
from tests.gpgtools import Home, dearmor, flip_byte, inner_text_entity, pgpmime_encrypted, strip_outer, symmetric
from tests.gpgtools import unwrap_default as unwrap
from tests.relay import Captured, CaptureRelay
from tests.test_intake import CONTACT, asend

REPORTER = "rita@reporter.test"
ATTACKER = "mallory@attacker.test"
SENDKEY = "security-sendkey@example.org"
KEYED = "kim@project.test"  # maintainer whose pinned key is in the service keyring
NO_FPR = "nofpr@project.test"  # maintainer without a configured fingerprint
GONE = "gone@project.test"  # maintainer whose fingerprint is not in the keyring
GONE_FPR = "AB" * 20
SIGNER = "sam@project.test"  # maintainer whose pinned key is in the keyring but cannot encrypt

# Distinctive words: their presence or absence in raw bytes is what the tests check.
SECRET_SUBJECT = "Quokka overflow in frobnicate"
SECRET_BODY = ("Description: zygomorphic heap corruption in the parser\n"
               "Steps to reproduce: send 70000 xylophone bytes to port 4242\n"
               "Affected versions: 1.0 to 1.4\n")
SECRET_WORDS = ("Quokka", "frobnicate", "zygomorphic", "xylophone")


# --------------------------------------------------------------------------- keys (once per module)


@dataclass
class Keys:
    reporter: Home
    reporter_fpr: str
    attacker: Home
    attacker_fpr: str
    impostor_fpr: str  # in the attacker's home, user id claims the keyed maintainer's address
    maintainer: Home
    maintainer_fpr: str
    reader: Home  # a recipient holding no secret key at all, only (per test) the service public key
    signonly: Home
    signonly_fpr: str  # an Ed25519 key without an encryption subkey


@pytest.fixture(scope="module")
def keys() -> Iterator[Keys]:
    homes: list[Home] = []
    try:
        reporter, attacker, maintainer, reader, signonly = (Home() for _ in range(5))
        homes += [reporter, attacker, maintainer, reader, signonly]
        yield Keys(
            reporter=reporter,
            reporter_fpr=reporter.gen_key("Rita Reporter", REPORTER),
            attacker=attacker,
            attacker_fpr=attacker.gen_key("Mallory", ATTACKER),
            impostor_fpr=attacker.gen_key("Kim Keyholder", KEYED),
            maintainer=maintainer,
            maintainer_fpr=maintainer.gen_key("Kim Keyholder", KEYED),
            reader=reader,
            signonly=signonly,
            signonly_fpr=signonly.gen_key("Sam Signonly", SIGNER, encrypt_subkey=False),
        )
    finally:
        for home in homes:
            home.close()


def client_gpg(home: Home, service: Service) -> OpenPGP:
    """The OpenPGP API on a client's home that knows the service public key (to verify our signatures)."""
    home.import_(service.outbox.public_key.encode("ascii"))
    return OpenPGP(home.path)


def maintainers(keys: Keys) -> tuple[Maintainer, ...]:
    return (
        Maintainer(name="Kim Keyholder", address=KEYED, fingerprint=keys.maintainer_fpr),
        Maintainer(name="Nora Nofpr", address=NO_FPR, fingerprint=""),
        Maintainer(name="Gus Gone", address=GONE, fingerprint=GONE_FPR),
    )


@contextlib.asynccontextmanager
async def running(tmp_path: Path, db_url: str, relay: CaptureRelay, keys: Keys, *,
                  extra: Sequence[tuple[Maintainer, bytes]] = (), **sections: dict[str, Any]) -> AsyncIterator[Service]:
    """A started service whose maintainers are Kim (pinned key imported), Nora (no fingerprint), Gus (key absent).

    *extra* adds maintainers with their public key (imported into the service keyring).
    """
    cfg = make_config(tmp_path, db_url, relay.url, **sections)
    cfg = cfg.model_copy(update={"maintainers": maintainers(keys) + tuple(m for m, _ in extra)})
    svc = Service(cfg)
    svc.gpg.import_public(keys.maintainer.export(keys.maintainer_fpr))
    for _, key in extra:
        svc.gpg.import_public(key)
    await svc.start(background=False)
    try:
        yield svc
    finally:
        await svc.stop()
        svc.db.dispose()


# --------------------------------------------------------------------------- client-style messages

_ids = itertools.count(1)


def envelope(part: bytes, *, sender: str = REPORTER, subject: str = "...", extra: str = "") -> bytes:
    """Outer headers (CRLF) in front of a body entity that starts with its Content-* headers."""
    head = (f"From: <{sender}>\r\nTo: <{CONTACT}>\r\nSubject: {subject}\r\n"
            f"Date: Sat, 01 Feb 2025 10:00:00 +0000\r\nMessage-ID: <flow-{next(_ids)}@client.test>\r\n"
            f"{extra}MIME-Version: 1.0\r\n")
    return head.encode() + part


def encrypted_entity(armored: bytes) -> bytes:
    """A Thunderbird-style multipart/encrypted entity (Content-* headers and body, no outer headers)."""
    return strip_outer(pgpmime_encrypted(armored))


def thunderbird(home: Home, recipients: list[str], inner: bytes, *, signer: str | None = None,
                sender: str = REPORTER, extra: str = "") -> bytes:
    return envelope(encrypted_entity(home.encrypt(inner, recipients, signer=signer)), sender=sender, extra=extra)


def inner_with_key(body: str, subject: str, key: bytes) -> bytes:
    """Inside the encryption: text plus the sender's key as application/pgp-keys (Thunderbird's "attach my key")."""
    text = (f'Content-Type: multipart/mixed; boundary="ik"; protected-headers="v1"\n'
            f"Subject: {subject}\n\n"
            "--ik\nContent-Type: text/plain; charset=UTF-8\nContent-Transfer-Encoding: 8bit\n\n"
            f"{body}\n"
            '--ik\nContent-Type: application/pgp-keys; name="OpenPGP_0xRITA.asc"\n'
            'Content-Disposition: attachment; filename="OpenPGP_0xRITA.asc"\n\n'
            f"{key.decode('ascii')}\n"
            "--ik--\n")
    return text.replace("\n", "\r\n").encode()


def autocrypt_header(addr: str, home: Home, fpr: str) -> str:
    keydata = base64.b64encode(home.gpg("--export", fpr).stdout).decode()
    folded = "\r\n ".join(textwrap.wrap(keydata, 76))
    return f"Autocrypt: addr={addr}; prefer-encrypt=mutual; keydata=\r\n {folded}\r\n"


def plain(body: str, *, subject: str = "Bug report", sender: str = REPORTER, extra: str = "") -> bytes:
    part = ("Content-Type: text/plain; charset=UTF-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
            + body.replace("\n", "\r\n")).encode()
    return envelope(part, sender=sender, subject=subject, extra=extra)


# --------------------------------------------------------------------------- reading the database and the relay


def reports(service: Service) -> list[Report]:
    with service.db.session() as s:
        return list(s.scalars(select(Report).order_by(Report.id)))


def inbound_messages(service: Service, report: Report) -> list[ReportMessage]:
    with service.db.session() as s:
        query = select(ReportMessage).where(ReportMessage.report_id == report.id, ReportMessage.direction == "in")
        return list(s.scalars(query.order_by(ReportMessage.id)))


def events(service: Service, kind: str) -> list[Event]:
    with service.db.session() as s:
        return list(s.scalars(select(Event).where(Event.kind == kind).order_by(Event.id)))


def fingerprints(service: Service) -> set[str]:
    return {k.fingerprint for k in service.gpg.list_keys()}


def part_types(captured: Captured) -> list[str]:
    return [p.get_content_type() for p in captured.message.walk()]


def ciphertext(captured: Captured) -> bytes:
    """The OpenPGP message of a PGP/MIME encrypted mail."""
    for part in captured.message.walk():
        if part.get_content_type() == "application/octet-stream":
            data = part.get_payload(decode=True)
            assert isinstance(data, bytes)
            return data
    raise AssertionError("not PGP/MIME encrypted")


def assert_signed_by_service(captured: Captured, service: Service, reader: OpenPGP) -> Unwrapped:
    """The mail is RFC 3156 signed (not encrypted) and the signature is the service key's."""
    assert captured.message.get_content_type() == "multipart/signed"
    out = unwrap(captured.raw, reader)
    assert out.errors == [] and not out.encrypted
    assert out.text_parts and all(p.signature_valid and p.signer_fpr == service.fingerprint for p in out.text_parts)
    return out


def assert_encrypted_and_signed(captured: Captured, service: Service, recipient: OpenPGP) -> Unwrapped:
    """The mail is RFC 3156 encrypted, decrypts in *recipient*'s home, and the service key signed it."""
    assert captured.message.get_content_type() == "multipart/encrypted"
    out = unwrap(captured.raw, recipient)
    assert out.errors == [], out.errors
    assert out.encrypted and out.text_parts
    assert all(p.encrypted and p.signature_valid and p.signer_fpr == service.fingerprint for p in out.text_parts)
    return out


def attached_key(captured: Captured) -> str:
    [part] = [p for p in captured.message.walk() if p.get_content_type() == "application/pgp-keys"]
    data = part.get_payload(decode=True)
    assert isinstance(data, bytes)
    return data.decode("ascii").replace("\r\n", "\n")


def without_secrets(data: bytes | str) -> None:
    text = data if isinstance(data, str) else data.decode("utf-8", errors="replace")
    leaked = [w for w in SECRET_WORDS if w.lower() in text.lower()]
    assert leaked == [], f"report content leaked: {leaked}"


# --------------------------------------------------------------------------- 1. plaintext report


async def test_plain_report_ack_is_signed_and_carries_the_key(service: Service, relay: CaptureRelay,
                                                              keys: Keys) -> None:
    """A plaintext report's ack is PGP/MIME signed by the service key, names its fingerprint and attaches the key."""
    reader = client_gpg(keys.reader, service)
    await asend(smtp_port(service), plain("Description: a bug\n"))
    await service.settle()
    [report] = reports(service)
    [ack] = relay.handler.to(REPORTER)
    assert ack.message["Subject"].startswith(f"[{report.tracking_id}]")
    assert "multipart/encrypted" not in part_types(ack)
    out = assert_signed_by_service(ack, service, reader)
    assert fingerprint_groups(service.fingerprint) in out.text and report.tracking_id in out.text
    assert fingerprint_groups(service.fingerprint) in ack.text
    assert attached_key(ack).strip() == service.outbox.public_key.replace("\r\n", "\n").strip()
    # the reader finds the key twice: in the Autocrypt header (binary) and attached (armored)
    assert any(b"BEGIN PGP PUBLIC KEY BLOCK" in key for key in out.keys_found) and len(out.keys_found) == 2


# --------------------------------------------------------------------------- 2. encrypted report


async def test_encrypted_report_is_decrypted_filed_and_ack_is_generic(service: Service, relay: CaptureRelay,
                                                                      keys: Keys) -> None:
    """A Thunderbird PGP/MIME report with a protected Subject is filed decrypted; the ack repeats none of it."""
    reader = client_gpg(keys.reader, service)
    client_gpg(keys.reporter, service)
    inner = inner_text_entity(SECRET_BODY, subject=SECRET_SUBJECT)
    raw = thunderbird(keys.reporter, [service.fingerprint], inner, signer=keys.reporter_fpr)
    assert b"Quokka" not in raw and b"zygomorphic" not in raw
    await asend(smtp_port(service), raw)
    await service.settle()

    [report] = reports(service)
    assert report.subject == SECRET_SUBJECT
    assert report.flags.get("encrypted") is True and "openpgp_error" not in report.flags
    assert "zygomorphic heap corruption" in report.fields["description"]
    assert "xylophone" in report.fields["steps"]
    [message] = inbound_messages(service, report)
    assert "zygomorphic heap corruption" in message.body_text and "BEGIN PGP" not in message.body_text
    assert message.meta["protected_subject"] == SECRET_SUBJECT
    assert message.meta["openpgp"]["encrypted"] is True
    assert message.meta["openpgp"]["errors"] == []
    assert message.meta["openpgp"]["parts"][0]["signature_reason"] == "unknown signing key"  # we do not hold Rita's key

    [ack] = relay.handler.to(REPORTER)
    assert ack.message["Subject"] == f"[{report.tracking_id}] Your encrypted report was received"
    out = assert_signed_by_service(ack, service, reader)
    assert report.tracking_id in out.text
    without_secrets(ack.raw)
    without_secrets(ack.message["Subject"])
    without_secrets(out.text)


@pytest.mark.parametrize("processes", [0, 1])
async def test_unsigned_encrypted_report_is_decrypted_by_the_helper(tmp_path: Path, migrated: str,
                                                                   relay: CaptureRelay, keys: Keys,
                                                                   processes: int) -> None:
    """In a worker process or a thread, an unsigned encrypted report is decrypted by the helper, counted in
    the service's mailer_gpg_seconds, with no gpg --decrypt; a signed one is left to gpg."""
    from mailer.metrics import REGISTRY

    def count(op: str) -> float:
        return REGISTRY.get_sample_value("mailer_gpg_seconds_count", {"op": op}) or 0.0

    inner = inner_text_entity(SECRET_BODY, subject=SECRET_SUBJECT)
    async with running(tmp_path, migrated, relay, keys, worker={"processes": processes}) as service:
        client_gpg(keys.reporter, service)
        by_helper, by_gpg = count("decrypt-in-helper"), count("decrypt")
        await asend(smtp_port(service), thunderbird(keys.reporter, [service.fingerprint], inner))
        await service.settle()
        assert (count("decrypt-in-helper"), count("decrypt")) == (by_helper + 1, by_gpg)
        signed = thunderbird(keys.reporter, [service.fingerprint], inner, signer=keys.reporter_fpr,
                             sender="other@reporter.example")
        await asend(smtp_port(service), signed)
        await service.settle()
        assert count("decrypt-in-helper") == by_helper + 1 and count("decrypt") > by_gpg
        filed = reports(service)
    assert len(filed) == 2 and all(r.subject == SECRET_SUBJECT and r.flags.get("encrypted") for r in filed)


# --------------------------------------------------------------------------- 3. reporter key attached


@pytest.mark.parametrize("placement", ["inside", "autocrypt"])
async def test_ack_is_encrypted_to_the_key_the_reporter_sent(service: Service, relay: CaptureRelay, keys: Keys,
                                                             placement: str) -> None:
    """With the reporter's key in the mail the ack is encrypted to it and signed inside; the key is not imported."""
    rita = client_gpg(keys.reporter, service)
    before = fingerprints(service)
    if placement == "inside":
        inner = inner_with_key(SECRET_BODY, SECRET_SUBJECT, keys.reporter.export(keys.reporter_fpr))
        raw = thunderbird(keys.reporter, [service.fingerprint], inner)
    else:
        inner = inner_text_entity(SECRET_BODY, subject=SECRET_SUBJECT)
        raw = thunderbird(keys.reporter, [service.fingerprint], inner,
                          extra=autocrypt_header(REPORTER, keys.reporter, keys.reporter_fpr))
    await asend(smtp_port(service), raw)
    await service.settle()

    [report] = reports(service)
    assert "zygomorphic" in report.fields["description"]
    with service.db.session() as s:
        assert len(list(s.scalars(select(ReportKey).where(ReportKey.report_id == report.id)))) == 1
    [ack] = relay.handler.to(REPORTER)
    out = assert_encrypted_and_signed(ack, service, rita)
    assert report.tracking_id in out.text
    assert out.protected_headers.get("Subject") == f"[{report.tracking_id}] Your encrypted report was received"
    assert ack.message["Subject"] == "..."
    without_secrets(ack.raw)
    without_secrets(out.text)
    [queued] = events(service, "ack.queued")
    assert queued.detail["encrypted"] is True
    assert fingerprints(service) == before
    assert keys.reporter_fpr not in fingerprints(service)
    # nobody else can read it: the reader's home has no matching secret key
    assert not OpenPGP(keys.reader.path).decrypt(ciphertext(ack)).ok


async def test_unusable_reporter_key_falls_back_to_a_signed_ack(service: Service, relay: CaptureRelay,
                                                                keys: Keys) -> None:
    """A reporter key that cannot encrypt gives a signed ack with our key, and the log says it was not encrypted."""
    reader = client_gpg(keys.reader, service)
    await asend(smtp_port(service),
                plain("Description: a bug\n", extra=autocrypt_header(REPORTER, keys.signonly, keys.signonly_fpr)))
    await service.settle()
    [report] = reports(service)
    [ack] = relay.handler.to(REPORTER)
    out = assert_signed_by_service(ack, service, reader)
    assert report.tracking_id in out.text
    assert attached_key(ack).strip() == service.outbox.public_key.replace("\r\n", "\n").strip()
    [unusable] = events(service, "ack.reporter_key_unusable")
    assert "encryption subkey" in unusable.detail["reason"]
    [queued] = events(service, "ack.queued")
    assert queued.detail["encrypted"] is False, "the ack went out signed only, but the event log says encrypted"


# --------------------------------------------------------------------------- 4. resent ciphertext


async def test_replayed_ciphertext_gains_the_attacker_nothing(service: Service, relay: CaptureRelay,
                                                              keys: Keys) -> None:
    """An attacker resending a victim's ciphertext with their own key gets an ack with the tracking id only."""
    mallory = client_gpg(keys.attacker, service)
    client_gpg(keys.reporter, service)  # the victim knows the service key
    inner = inner_text_entity(SECRET_BODY, subject=SECRET_SUBJECT)
    victim = thunderbird(keys.reporter, [service.fingerprint], inner)
    await asend(smtp_port(service), victim)
    await service.settle()

    # the attacker captured the victim's mail on the way and re-sends its encrypted body as their own
    stolen = victim.split(b"\r\n\r\n", 1)[0]
    body = victim[len(stolen):]
    content = b"\r\n".join(line for line in stolen.split(b"\r\n") if line.lower().startswith((b"content-", b" ")))
    replay = envelope(content + body, sender=ATTACKER, subject="my findings",
                      extra=autocrypt_header(ATTACKER, keys.attacker, keys.attacker_fpr))
    await asend(smtp_port(service), replay, sender=ATTACKER)
    await service.settle()

    victim_report, replay_report = reports(service)
    assert replay_report.reporter == ATTACKER
    assert "zygomorphic" in inbound_messages(service, replay_report)[0].body_text  # maintainers see what it was
    [ack] = relay.handler.to(ATTACKER)
    out = assert_encrypted_and_signed(ack, service, mallory)
    assert replay_report.tracking_id in out.text
    assert victim_report.tracking_id not in out.text
    without_secrets(out.text)
    without_secrets("\n".join(out.protected_headers.values()))
    without_secrets(out.decrypted_mime or b"")
    without_secrets(ack.raw)
    assert keys.attacker_fpr not in fingerprints(service)


# --------------------------------------------------------------------------- 5. maintainer notices


async def test_notices_are_encrypted_to_pinned_keys_or_carry_no_content(tmp_path: Path, migrated: str,
                                                                        relay: CaptureRelay, keys: Keys) -> None:
    """Kim gets the report encrypted to her key; maintainers without a usable key get a notice without content."""
    async with running(tmp_path, migrated, relay, keys) as service:
        kim = client_gpg(keys.maintainer, service)
        reader = client_gpg(keys.reader, service)
        await asend(smtp_port(service), plain(SECRET_BODY, subject=SECRET_SUBJECT))
        await service.settle()
        [report] = reports(service)

        [notice] = relay.handler.to(KEYED)
        out = assert_encrypted_and_signed(notice, service, kim)
        assert "zygomorphic heap corruption" in out.text and SECRET_SUBJECT in out.text
        assert report.tracking_id in out.text
        without_secrets(notice.raw)

        for address in (NO_FPR, GONE):
            [bare] = relay.handler.to(address)
            assert bare.message["Subject"] == f"[{report.tracking_id}] New report"
            without_secrets(bare.raw)
            text = assert_signed_by_service(bare, service, reader).text
            assert "The content is not included" in text and report.tracking_id in text
        reasons = {e.detail["to"]: e.detail for e in events(service, "notice.without_encryption")}
        assert set(reasons) == {NO_FPR, GONE}
        assert reasons[NO_FPR]["reason"] == "no fingerprint configured"
        assert "not in the keyring" in reasons[GONE]["reason"]
        assert not any(d["content_included"] for d in reasons.values())


async def test_a_maintainer_without_a_key_is_warned_about_once_and_recorded_each_time(
        tmp_path: Path, migrated: str, relay: CaptureRelay, keys: Keys, caplog: pytest.LogCaptureFixture) -> None:
    """Every notice without encryption is an audit event; the log warns once per maintainer and problem."""
    from mailer import correspondence

    correspondence._warned.clear()  # this process may have warned in an earlier test
    with caplog.at_level("DEBUG", logger="mailer.correspondence"):
        async with running(tmp_path, migrated, relay, keys, worker={"processes": 0}) as service:
            for i in range(2):
                await asend(smtp_port(service), plain(f"{SECRET_BODY} ({i})", subject=f"{SECRET_SUBJECT} {i}"))
            await service.settle()
            notices = [e.detail for e in events(service, "notice.without_encryption") if e.detail["to"] == NO_FPR]
    said = [r for r in caplog.records if NO_FPR in r.getMessage() and "omits report content" in r.getMessage()]
    assert len(notices) == 2
    assert [r.levelname for r in said] == ["WARNING", "DEBUG"]


async def test_cleartext_to_maintainers_when_allowed(tmp_path: Path, migrated: str, relay: CaptureRelay,
                                                     keys: Keys) -> None:
    """With allow_cleartext_to_maintainers a keyless maintainer gets the content signed, not encrypted."""
    async with running(tmp_path, migrated, relay, keys, gnupg={"allow_cleartext_to_maintainers": True}) as service:
        reader = client_gpg(keys.reader, service)
        kim = client_gpg(keys.maintainer, service)
        await asend(smtp_port(service), plain(SECRET_BODY, subject=SECRET_SUBJECT))
        await service.settle()
        for address in (NO_FPR, GONE):
            [notice] = relay.handler.to(address)
            text = assert_signed_by_service(notice, service, reader).text
            assert "zygomorphic heap corruption" in text
        [notice] = relay.handler.to(KEYED)
        assert "zygomorphic" in assert_encrypted_and_signed(notice, service, kim).text
        assert all(e.detail["content_included"] for e in events(service, "notice.without_encryption"))


async def test_maintainer_key_that_cannot_encrypt_gets_no_content(tmp_path: Path, migrated: str,
                                                                  relay: CaptureRelay, keys: Keys) -> None:
    """A pinned maintainer key without an encryption subkey gets a notice without content; the report is still filed."""
    sam = Maintainer(name="Sam Signonly", address=SIGNER, fingerprint=keys.signonly_fpr)
    async with running(tmp_path, migrated, relay, keys, extra=[(sam, keys.signonly.export(keys.signonly_fpr))]) as service:
        kim = client_gpg(keys.maintainer, service)
        reader = client_gpg(keys.reader, service)
        await asend(smtp_port(service), plain(SECRET_BODY, subject=SECRET_SUBJECT))
        await service.settle()
        with service.db.session() as s:
            [row] = s.scalars(select(InboundMessage))
            assert (row.state, row.failed_step, row.last_error) == ("done", None, None)
        [report] = reports(service)
        [bare] = relay.handler.to(SIGNER)
        without_secrets(bare.raw)
        assert "The content is not included" in assert_signed_by_service(bare, service, reader).text
        [notice] = relay.handler.to(KEYED)
        assert "zygomorphic" in assert_encrypted_and_signed(notice, service, kim).text
        assert report.tracking_id in bare.message["Subject"]
        reasons = {e.detail["to"]: e.detail["reason"] for e in events(service, "notice.without_encryption")}
        assert reasons.get(SIGNER), reasons


# --------------------------------------------------------------------------- 6. bad input


async def test_bad_openpgp_input_is_filed_and_alerted(tmp_path: Path, migrated: str, relay: CaptureRelay,
                                                      keys: Keys) -> None:
    """Undecryptable input is filed with raw bytes and an alert to maintainers; the worker keeps going."""
    async with running(tmp_path, migrated, relay, keys) as service:
        kim = client_gpg(keys.maintainer, service)
        client_gpg(keys.reporter, service)
        inner = inner_text_entity(SECRET_BODY, subject=SECRET_SUBJECT)
        not_ours = keys.reporter.encrypt(inner, [keys.reporter_fpr])
        corrupt = (b"-----BEGIN PGP MESSAGE-----\n\nThis is !! not * base64 at all ~~~\nzzzz\n"
                   b"=abcd\n-----END PGP MESSAGE-----\n")
        tampered = base64.encodebytes(flip_byte(dearmor(keys.reporter, keys.reporter.encrypt(inner, [service.fingerprint]))))
        tampered_entity = (b'Content-Type: multipart/encrypted; protocol="application/pgp-encrypted"; boundary="t"\r\n\r\n'
                           b"--t\r\nContent-Type: application/pgp-encrypted\r\n\r\nVersion: 1\r\n\r\n"
                           b'--t\r\nContent-Type: application/octet-stream; name="encrypted.asc"\r\n'
                           b"Content-Transfer-Encoding: base64\r\n\r\n"
                           + tampered.replace(b"\n", b"\r\n") + b"--t--\r\n")
        cases = {
            "not ours": (envelope(encrypted_entity(not_ours)), "encrypted to a key we do not hold"),
            "corrupt": (envelope(encrypted_entity(corrupt)), "no OpenPGP data"),
            "tampered": (envelope(tampered_entity), "decryption failed"),
            "symmetric": (envelope(encrypted_entity(symmetric(keys.reporter, inner))), "symmetric"),
        }
        for raw, _ in cases.values():
            await asend(smtp_port(service), raw)
        await asend(smtp_port(service), plain("Description: a normal report after the bad ones\n", subject="normal"))
        await service.settle()

        filed = reports(service)
        assert len(filed) == 5
        with service.db.session() as s:
            rows = list(s.scalars(select(InboundMessage).order_by(InboundMessage.id)))
        assert [r.state for r in rows] == ["done"] * 5
        assert [r.raw for r in rows[:4]] == [raw for raw, _ in cases.values()]
        notices = relay.handler.to(KEYED)
        assert len(notices) == 5
        for (name, (_, reason)), report, notice in zip(cases.items(), filed, notices, strict=False):
            assert reason in report.flags.get("openpgp_error", ""), (name, report.flags)
            assert report.flags.get("encrypted") is True
            [message] = inbound_messages(service, report)
            assert message.meta["openpgp"]["errors"], name
            without_secrets(message.body_text)
            text = assert_encrypted_and_signed(notice, service, kim).text
            assert "OpenPGP problem" in text and reason in text, (name, text)
        assert len(events(service, "openpgp.problem")) == 4
        normal = filed[4]
        assert "openpgp_error" not in normal.flags and "encrypted" not in normal.flags
        assert "normal report after the bad ones" in normal.fields["description"]
        assert "OpenPGP problem" not in assert_encrypted_and_signed(notices[4], service, kim).text
        assert len(relay.handler.to(REPORTER)) == 5  # every report, bad or not, is acknowledged


# --------------------------------------------------------------------------- 7. partly encrypted


async def test_partly_encrypted_keeps_plaintext_apart(service: Service, relay: CaptureRelay, keys: Keys) -> None:
    """Plaintext beside an encrypted part is kept in meta, never merged into the report text."""
    client_gpg(keys.reporter, service)
    armored = keys.reporter.encrypt(inner_text_entity(SECRET_BODY), [service.fingerprint])
    outside = b"Content-Type: text/plain; charset=UTF-8\r\n\r\nPlaintext added by a forwarder: walrus\r\n"
    body = (b'Content-Type: multipart/mixed; boundary="mix"\r\n\r\n--mix\r\n' + outside
            + b"\r\n--mix\r\n" + encrypted_entity(armored) + b"\r\n--mix--\r\n")
    await asend(smtp_port(service), envelope(body, subject="partly"))
    await service.settle()
    [report] = reports(service)
    [message] = inbound_messages(service, report)
    assert "zygomorphic heap corruption" in message.body_text
    assert "walrus" not in message.body_text
    assert all("walrus" not in value for value in report.fields.values())
    assert [t.strip() for t in message.meta["openpgp"]["outside_text"]] == ["Plaintext added by a forwarder: walrus"]
    assert message.meta["openpgp"]["partly_encrypted"] is True
    assert report.flags["partly_encrypted"] is True and report.flags["encrypted"] is True


# --------------------------------------------------------------------------- 8. inline PGP


async def test_inline_pgp_is_decrypted_and_filed(service: Service, relay: CaptureRelay, keys: Keys) -> None:
    """An armored block in a text/plain body (Mailvelope) is decrypted and filed; the ack is generic."""
    client_gpg(keys.reporter, service)
    armored = keys.reporter.encrypt(SECRET_BODY.encode(), [service.fingerprint],
                                    extra=("--comment", "https://mailvelope.com"))
    part = b"Content-Type: text/plain; charset=UTF-8\r\nContent-Transfer-Encoding: 7bit\r\n\r\n" + armored.replace(b"\n", b"\r\n")
    await asend(smtp_port(service), envelope(part, subject="Encrypted message"))
    await service.settle()
    [report] = reports(service)
    [message] = inbound_messages(service, report)
    assert "zygomorphic heap corruption" in message.body_text and "BEGIN PGP" not in message.body_text
    assert message.meta["openpgp"]["encrypted"] is True
    assert report.flags.get("encrypted") is True and "partly_encrypted" not in report.flags
    assert "xylophone" in report.fields["steps"]
    [ack] = relay.handler.to(REPORTER)
    assert ack.message["Subject"] == f"[{report.tracking_id}] Your encrypted report was received"
    without_secrets(ack.raw)


# --------------------------------------------------------------------------- 9. sendkey


async def test_sendkey_answers_with_the_signed_key_and_files_nothing(service: Service, relay: CaptureRelay,
                                                                     keys: Keys) -> None:
    """Mail to security-sendkey@ gets a signed reply with the key; null senders and robots get nothing."""
    reader = client_gpg(keys.reader, service)
    await asend(smtp_port(service), plain("please send your key", subject="key?"), rcpts=(SENDKEY,))
    await service.settle()
    [reply] = relay.handler.to(REPORTER)
    out = assert_signed_by_service(reply, service, reader)
    assert fingerprint_groups(service.fingerprint) in out.text
    assert attached_key(reply).strip() == service.outbox.public_key.replace("\r\n", "\n").strip()
    assert reply.message["Auto-Submitted"] == "auto-replied"
    assert reports(service) == []

    await asend(smtp_port(service), plain("key?", sender="daemon@reporter.test"), sender="", rcpts=(SENDKEY,))
    await asend(smtp_port(service), plain("key?", extra="Auto-Submitted: auto-generated\r\n"), rcpts=(SENDKEY,))
    await service.settle()
    assert len(relay.messages) == 1
    assert reports(service) == []
    reasons = [e.detail["reason"] for e in events(service, "sendkey.suppressed")]
    assert sorted(reasons) == ["Auto-Submitted: auto-generated", "null envelope sender"]  # processed concurrently


# --------------------------------------------------------------------------- 10. impostor key


async def test_key_claiming_a_maintainer_address_gains_nothing(tmp_path: Path, migrated: str, relay: CaptureRelay,
                                                               keys: Keys) -> None:
    """A reporter's key whose user id claims Kim's address is not imported; Kim's notice is for her pinned key only."""
    async with running(tmp_path, migrated, relay, keys) as service:
        kim = client_gpg(keys.maintainer, service)
        mallory = client_gpg(keys.attacker, service)
        before = fingerprints(service)
        inner = inner_with_key(SECRET_BODY, SECRET_SUBJECT, keys.attacker.export(keys.impostor_fpr))
        raw = thunderbird(keys.attacker, [service.fingerprint], inner, sender=ATTACKER,
                          extra=autocrypt_header(KEYED, keys.attacker, keys.impostor_fpr))
        await asend(smtp_port(service), raw, sender=ATTACKER)
        await service.settle()
        assert fingerprints(service) == before
        assert keys.impostor_fpr not in fingerprints(service)

        [notice] = relay.handler.to(KEYED)
        assert notice.rcpt_tos == [KEYED]
        assert "zygomorphic" in assert_encrypted_and_signed(notice, service, kim).text
        result = kim.decrypt(ciphertext(notice))
        [subkey] = keys.maintainer.subkey_fingerprints(keys.maintainer_fpr)
        assert result.ok and result.recipients == (subkey[-16:],)
        assert not mallory.decrypt(ciphertext(notice)).ok
        assert not OpenPGP(keys.reader.path).decrypt(ciphertext(notice)).ok
        # the impostor key only served to encrypt the (generic) ack to the sender
        [ack] = relay.handler.to(ATTACKER)
        without_secrets(assert_encrypted_and_signed(ack, service, mallory).text)
        assert not kim.decrypt(ciphertext(ack)).ok
