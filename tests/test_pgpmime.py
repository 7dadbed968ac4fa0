"""Tests of mailer.pgpmime (reading) and outbound.pgpmime (building) with real GnuPG and client-style messages (no mocks)."""

from __future__ import annotations

import base64
import email.policy
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import EmailMessage

import pytest

from mailer.config import ParsingConfig
from mailer.openpgp import OpenPGP
from mailer.pgpmime import unwrap
from outbound.pgpmime import build_encrypted, build_signed, encrypt_bytes
from tests.gpgtools import (
    Home,
    compression_bomb,
    exchange_mangled,
    inner_text_entity,
    kill_and_remove,
    mixed_message,
    no_mdc_to_key,
    pgpmime_encrypted,
    plain_message,
    short_tmpdir,
    signed_part,
    strip_outer,
    symmetric,
)

LIMITS = ParsingConfig()
BODY = "Heap overflow in parse_header() — details below.\nSteps: send 70000 bytes.\n"


@dataclass
class World:
    svc: OpenPGP
    svc_fpr: str
    client: Home
    alice: str  # Ed25519/cv25519 reporter key, known to the service
    bob: str  # RSA-2048 reporter key, known to the service
    dave: str  # revoked key, known to the service


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    home = short_tmpdir()
    client = Home()
    try:
        svc = OpenPGP(home)
        svc_fpr = svc.ensure_service_key("Security Team", "security@example.com")
        alice = client.gen_key("Alice", "alice@example.org")
        bob = client.gen_key("Bob", "bob@example.org", algo="rsa2048")
        dave = client.gen_key("Dave", "dave@example.org")
        for fpr in (alice, bob, dave):
            svc.import_public(client.export(fpr))
        client.import_(svc.export_public(svc_fpr).encode())
        yield World(svc, svc_fpr, client, alice, bob, dave)
    finally:
        client.close()
        kill_and_remove(home)


def outgoing(body: str = BODY, subject: str = "Re: your report") -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "Security Team <security@example.com>"
    msg["To"] = "Alice <alice@example.org>"
    msg["Subject"] = subject
    msg["Message-ID"] = "<reply-1@example.com>"
    msg.set_content(body)
    msg.add_attachment(b"\x00\x01patch", maintype="application", subtype="octet-stream", filename="fix.bin")
    return msg


def smtp_bytes(msg: EmailMessage) -> bytes:
    return msg.as_bytes(policy=email.policy.SMTP)


# --------------------------------------------------------------------------- PGP/MIME encrypted


def test_thunderbird_encrypted_and_signed(world: World) -> None:
    """PGP/MIME encrypted+signed in one packet decrypts with a valid signature and protected Subject."""
    inner = inner_text_entity(BODY, subject="Heap overflow", attachment=("poc.py", b"print('x')\n"))
    raw = pgpmime_encrypted(world.client.encrypt(inner, [world.svc_fpr], signer=world.alice))
    res = unwrap(raw, world.svc, limits=LIMITS)
    assert res.errors == [] and not res.partly_encrypted
    [part] = res.text_parts
    assert part.encrypted and part.signature_valid and part.signer_fpr == world.alice
    assert "Heap overflow in parse_header()" in part.text
    assert res.protected_headers == {"Subject": "Heap overflow"}
    assert res.decrypted_mime is not None and res.decrypted_mime.startswith(b"Content-Type: multipart/mixed")
    [att] = res.attachments
    assert att.filename == "poc.py" and att.data == b"print('x')\n" and att.encrypted


def test_encrypted_to_rsa_key_unsigned(world: World) -> None:
    """A PGP/MIME message encrypted (unsigned) to the service is decrypted and marked unsigned."""
    raw = pgpmime_encrypted(world.client.encrypt(inner_text_entity(BODY), [world.svc_fpr]))
    res = unwrap(raw, world.svc, limits=LIMITS)
    [part] = res.text_parts
    assert part.encrypted and not part.signed and part.signer_fpr is None and "70000 bytes" in part.text


def test_hidden_recipient_pgpmime_decrypts(world: World) -> None:
    """A PGP/MIME message with a hidden recipient (throw-keyids) decrypts."""
    raw = pgpmime_encrypted(world.client.encrypt(inner_text_entity(BODY), [world.svc_fpr], throw_keyids=True))
    res = unwrap(raw, world.svc, limits=LIMITS)
    assert res.errors == [] and res.text_parts[0].encrypted


def test_multipart_signed_inside_encryption(world: World) -> None:
    """A multipart/signed entity inside the decrypted payload is verified over its exact bytes."""
    sp = signed_part(BODY)
    inner = strip_outer(sp.message(world.client.sign_detached(sp.signed_part, world.bob)))
    raw = pgpmime_encrypted(world.client.encrypt(inner, [world.svc_fpr]))
    res = unwrap(raw, world.svc, limits=LIMITS)
    [part] = res.text_parts
    assert part.encrypted and part.signature_valid and part.signer_fpr == world.bob


def test_exchange_mangled_is_repaired(world: World) -> None:
    """Exchange's multipart/mixed rewrite of PGP/MIME is recognised, repaired and decrypted."""
    raw = exchange_mangled(world.client.encrypt(inner_text_entity(BODY), [world.svc_fpr], signer=world.alice))
    res = unwrap(raw, world.svc, limits=LIMITS)
    assert res.errors == [] and "repaired Exchange-mangled PGP/MIME" in res.notes
    [part] = res.text_parts
    assert part.encrypted and part.signature_valid and not res.partly_encrypted


@pytest.mark.parametrize("mangle,expected", [
    (lambda m: m.replace(b'protocol="application/pgp-encrypted"', b'protocol="application/x-foo"'),
     "wrong protocol"),
    (lambda m: m.replace(b"--enc-b--", b"--enc-b\r\nContent-Type: text/plain\r\n\r\nextra\r\n--enc-b--"),
     "expected 2 parts"),
    (lambda m: m.replace(b"Version: 1", b"Version: 2"), "Version: 1"),
])
def test_broken_pgpmime_encrypted_structure(world: World, mangle, expected: str) -> None:  # type: ignore[no-untyped-def]
    """Wrong protocol, wrong part count or a missing 'Version: 1' give a reason and no decryption."""
    raw = mangle(pgpmime_encrypted(world.client.encrypt(inner_text_entity(BODY), [world.svc_fpr])))
    res = unwrap(raw, world.svc, limits=LIMITS)
    assert expected in res.reason and res.decrypted_mime is None
    assert not any(p.encrypted for p in res.text_parts) and not res.encrypted


def test_plaintext_outside_encrypted_part_is_flagged(world: World) -> None:
    """A plaintext part next to the encrypted part is kept apart, unencrypted, and flagged partly_encrypted."""
    enc = strip_outer(pgpmime_encrypted(world.client.encrypt(inner_text_entity("secret text"), [world.svc_fpr])))
    raw = mixed_message(b"Content-Type: text/plain\r\n\r\nforwarded: please also wire money", enc)
    res = unwrap(raw, world.svc, limits=LIMITS)
    assert res.partly_encrypted
    plain = [p for p in res.text_parts if not p.encrypted]
    secret = [p for p in res.text_parts if p.encrypted]
    assert [p.text.strip() for p in plain] == ["forwarded: please also wire money"]
    assert [p.text.strip() for p in secret] == ["secret text"]


def test_compression_bomb_in_pgpmime(world: World) -> None:
    """A compression bomb in a PGP/MIME message yields reason 'too large' and no plaintext."""
    capped = OpenPGP(world.svc.home, max_output=1024 * 1024)
    armored = world.client.gpg("--enarmor", data=compression_bomb(world.client, world.svc_fpr, mib=20)).stdout
    armored = armored.replace(b"ARMORED FILE", b"MESSAGE")
    res = unwrap(pgpmime_encrypted(armored), capped, limits=LIMITS)
    assert "too large" in res.reason and res.text_parts == [] and res.decrypted_mime is None


def test_decrypt_failure_exposes_no_plaintext(world: World) -> None:
    """A message without MDC (gpg prints the plaintext, then fails) exposes nothing of the plaintext."""
    ct = no_mdc_to_key(world.client, inner_text_entity("TOP-SECRET-PAYLOAD"), world.svc_fpr)
    res = unwrap(pgpmime_encrypted(ct), world.svc, limits=LIMITS)
    assert "no integrity protection" in res.reason
    assert res.decrypted_mime is None and res.text_parts == []
    assert "TOP-SECRET-PAYLOAD" not in repr(res) and all(b"TOP-SECRET" not in a.data for a in res.attachments)


def test_symmetric_and_unknown_key_give_reasons(world: World) -> None:
    """Passphrase-encrypted and foreign-key messages produce a reason and never raise."""
    sym = unwrap(pgpmime_encrypted(symmetric(world.client, inner_text_entity(BODY))), world.svc, limits=LIMITS)
    assert "symmetric" in sym.reason
    foreign_raw = pgpmime_encrypted(world.client.encrypt(inner_text_entity(BODY), [world.bob]))
    foreign = unwrap(foreign_raw, world.svc, limits=LIMITS)
    assert "key we do not hold" in foreign.reason


# --------------------------------------------------------------------------- PGP/MIME signed


@pytest.mark.parametrize("line_ending", [b"\r\n", b"\n"])
def test_pgpmime_signed_valid(world: World, line_ending: bytes) -> None:
    """multipart/signed verifies over the first part's exact bytes, whether received with CRLF or LF."""
    sp = signed_part("Hello =\n  trailing spaces kept   \n-- \nAlice\n")
    raw = sp.message(world.client.sign_detached(sp.signed_part, world.alice), line_ending=line_ending)
    res = unwrap(raw, world.svc, limits=LIMITS)
    assert res.errors == []
    [part] = res.text_parts
    assert part.signed and part.signature_valid and part.signer_fpr == world.alice and not part.encrypted


def test_pgpmime_signed_tampered(world: World) -> None:
    """Changing one byte of the signed part makes the signature invalid (bad signature)."""
    sp = signed_part("Pay 10 EUR\n")
    raw = sp.message(world.client.sign_detached(sp.signed_part, world.alice)).replace(b"10 EUR", b"99 EUR")
    res = unwrap(raw, world.svc, limits=LIMITS)
    [part] = res.text_parts
    assert part.signed and not part.signature_valid and part.signer_fpr is None
    assert part.signature_reason == "bad signature" and "signature not valid" in res.reason


def test_pgpmime_signed_by_revoked_key(world: World) -> None:
    """A multipart/signed message by a key revoked since is not valid."""
    sp = signed_part("signed before revocation\n")
    sig = world.client.sign_detached(sp.signed_part, world.dave)
    world.client.revoke(world.dave)  # dave is used by this test only
    world.svc.import_public(world.client.export(world.dave))
    res = unwrap(sp.message(sig), world.svc, limits=LIMITS)
    [part] = res.text_parts
    assert not part.signature_valid and part.signature_reason == "signing key revoked"


@pytest.mark.parametrize("kwargs,expected", [
    ({"protocol": "application/pgp-encrypted"}, "wrong protocol"),
    ({"extra_parts": 1}, "expected 2 parts"),
])
def test_broken_pgpmime_signed_structure(world: World, kwargs: dict, expected: str) -> None:  # type: ignore[type-arg]
    """A multipart/signed with the wrong protocol or part count is reported, its text kept as unsigned."""
    sp = signed_part("hello\n")
    raw = sp.message(world.client.sign_detached(sp.signed_part, world.alice), **kwargs)
    res = unwrap(raw, world.svc, limits=LIMITS)
    assert expected in res.reason
    assert res.text_parts and not any(p.signed for p in res.text_parts)


# --------------------------------------------------------------------------- inline PGP


def test_inline_encrypted_with_outside_text(world: World) -> None:
    """An inline armored block (K-9/Mailvelope) decrypts; text around it stays separate and is flagged."""
    block = world.client.encrypt(b"inline secret\n", [world.svc_fpr], signer=world.bob).decode()
    raw = plain_message(f"Hi,\n\n{block}\n-- \nsent from my phone")
    res = unwrap(raw, world.svc, limits=LIMITS)
    assert res.partly_encrypted
    enc = [p for p in res.text_parts if p.encrypted]
    assert [p.text for p in enc] == ["inline secret\n"] and enc[0].signer_fpr == world.bob
    assert all("inline secret" not in p.text for p in res.text_parts if not p.encrypted)


def test_cleartext_signed(world: World) -> None:
    """A cleartext-signed block is verified; only gpg's signed text is marked signed."""
    signed = world.client.clearsign(b"- I found a bug\nreally\n", world.alice).decode()
    res = unwrap(plain_message(f"unsigned intro\n{signed}"), world.svc, limits=LIMITS)
    signed_parts = [p for p in res.text_parts if p.signed]
    [sp] = signed_parts
    assert sp.signature_valid and sp.signer_fpr == world.alice and "- I found a bug" in sp.text
    assert res.partly_signed and not res.partly_encrypted


def test_cleartext_signed_tampered(world: World) -> None:
    """A tampered cleartext signature is invalid and carries the unverified text, flagged."""
    signed = world.client.clearsign(b"pay 10\n", world.alice).decode().replace("pay 10", "pay 99")
    res = unwrap(plain_message(signed), world.svc, limits=LIMITS)
    [part] = res.text_parts
    assert part.signed and not part.signature_valid and part.signer_fpr is None and "pay 99" in part.text


# --------------------------------------------------------------------------- plain / bad input


def test_plain_message(world: World) -> None:
    """A plain message yields its text, unflagged, with no errors."""
    res = unwrap(plain_message("just text"), world.svc, limits=LIMITS)
    assert [p.text.strip() for p in res.text_parts] == ["just text"]
    assert res.errors == [] and not res.encrypted and not res.text_parts[0].signed


def test_keys_found_in_attachment_and_autocrypt(world: World) -> None:
    """application/pgp-keys attachments and Autocrypt keydata are collected as key blobs."""
    key = world.client.export(world.alice)
    binkey = world.client.gpg("--export", world.alice).stdout
    keydata = base64.b64encode(binkey).decode()
    folded = "\n ".join(keydata[i:i + 70] for i in range(0, len(keydata), 70))
    header = f"Autocrypt: addr=alice@example.org; prefer-encrypt=mutual; keydata=\n {folded}\n"
    att = b"Content-Type: application/pgp-keys; name=\"key.asc\"\r\n\r\n" + key.replace(b"\n", b"\r\n")
    raw = mixed_message(b"Content-Type: text/plain\r\n\r\nmy key", att, extra_headers=header)
    res = unwrap(raw, world.svc, limits=LIMITS)
    assert binkey in res.keys_found and any(b"BEGIN PGP PUBLIC KEY BLOCK" in k for k in res.keys_found)
    assert world.svc.key_info(world.alice) is not None  # (already pinned) nothing imported implicitly


def test_deeply_nested_mime_is_bounded(world: World) -> None:
    """Pathologically nested multiparts stop at the depth limit with a reason, no exception."""
    body = b"Content-Type: text/plain\r\n\r\nbottom"
    for i in range(LIMITS.max_depth + 50):
        body = (f'Content-Type: multipart/mixed; boundary="b{i}"\r\n\r\n--b{i}\r\n'.encode()
                + body + f"\r\n--b{i}--\r\n".encode())
    res = unwrap(b"Subject: x\r\n" + body, world.svc, limits=LIMITS)
    assert "too complex" in res.reason


def test_limits_come_from_parsing_config(world: World) -> None:
    """unwrap stops at the max_parts and max_depth of the ParsingConfig it is given."""
    raw = mixed_message(*(f"Content-Type: text/plain\r\n\r\npart {i}".encode() for i in range(5)))
    assert unwrap(raw, world.svc, limits=LIMITS).errors == []  # 6 parts
    few = unwrap(raw, world.svc, limits=ParsingConfig(max_parts=3))
    assert few.reason == "message too complex: more than 3 MIME parts"
    nested = b"Content-Type: text/plain\r\n\r\nbottom"
    for i in range(3):
        nested = (f'Content-Type: multipart/mixed; boundary="n{i}"\r\n\r\n--n{i}\r\n'.encode()
                  + nested + f"\r\n--n{i}--\r\n".encode())
    nested = b"Subject: nested\r\n" + nested
    assert unwrap(nested, world.svc, limits=LIMITS).errors == []  # depth 3
    shallow = unwrap(nested, world.svc, limits=ParsingConfig(max_depth=2))
    assert shallow.reason == "message too complex: MIME nesting deeper than 2"


@pytest.mark.parametrize("bare", [b"\n", b"\r"])
def test_bare_line_break_in_crlf_header_block_smuggles_no_header(world: World, bare: bytes) -> None:
    """In a CRLF message a bare LF or CR in the header block is no line break: ``Subject: x<LF>Autocrypt: ...``
    stays one header, as a strict MTA and mailer.parsing read it, so the reader finds no Autocrypt key."""
    keydata = base64.b64encode(world.client.gpg("--export", world.alice).stdout).decode()
    honest = plain_message("hello", extra_headers=f"Autocrypt: addr=alice@example.org; keydata={keydata}\n")
    assert unwrap(honest, world.svc, limits=LIMITS).keys_found  # the same header on its own CRLF line counts
    smuggled = honest.replace(b"\r\nAutocrypt: ", bare + b"Autocrypt: ", 1)
    assert smuggled != honest
    res = unwrap(smuggled, world.svc, limits=LIMITS)
    assert res.keys_found == [] and res.errors == []
    assert [p.text.strip() for p in res.text_parts] == ["hello"]


@pytest.mark.parametrize("raw", [b"", b"\x00\xff\xfe garbage", b"Content-Type: multipart/mixed\r\n\r\nno boundary",
                                 b"Content-Type: multipart/encrypted; boundary=x\r\n\r\n--x\r\n",
                                 b"Content-Type: text/plain; charset=no-such-charset\r\n\r\n\xff\xfe"])
def test_garbage_never_raises(world: World, raw: bytes) -> None:
    """Garbage and half-formed MIME never raise out of unwrap."""
    res = unwrap(raw, world.svc, limits=LIMITS)
    assert isinstance(res.errors, list)


# --------------------------------------------------------------------------- building


def test_build_signed_round_trip(world: World) -> None:
    """build_signed produces RFC 3156 multipart/signed that unwrap verifies as signed by the service key."""
    msg = build_signed(outgoing(), world.svc)
    assert msg.get_content_type() == "multipart/signed" and msg.get_param("micalg") == "pgp-sha256"
    assert msg["Subject"] == "Re: your report" and msg["Message-ID"] == "<reply-1@example.com>"
    assert msg.get_payload(0)["Subject"] is None  # outer headers moved to the wrapper
    res = unwrap(smtp_bytes(msg), world.svc, limits=LIMITS)
    assert res.errors == []
    assert all(p.signature_valid and p.signer_fpr == world.svc_fpr for p in res.text_parts)
    assert res.attachments[0].data == b"\x00\x01patch" and res.attachments[0].signature_valid
    # and a client verifies it too: gpg over the CRLF bytes of the first part
    first = msg.get_payload(0).as_bytes(policy=email.policy.SMTP)
    sig = msg.get_payload(1).get_payload().encode()
    path = f"{world.client.path}/s.asc"
    with open(path, "wb") as fh:
        fh.write(sig)
    world.client.gpg("--verify", path, "-", data=first)


def test_build_encrypted_round_trip(world: World) -> None:
    """build_encrypted to a pinned key decrypts at the recipient with a valid service signature."""
    msg = build_encrypted(outgoing(subject="Your report #42"), world.svc, [world.alice])
    assert msg.get_content_type() == "multipart/encrypted" and msg["Subject"] == "..."
    recipient_home = short_tmpdir()
    try:
        recipient = OpenPGP(recipient_home)
        recipient.import_secret(world.client.export_secret(world.alice))
        recipient.import_public(world.svc.export_public(world.svc_fpr))
        res = unwrap(smtp_bytes(msg), recipient, limits=LIMITS)
    finally:
        kill_and_remove(recipient_home)
    assert res.errors == [] and res.protected_headers["Subject"] == "Your report #42"
    [part] = res.text_parts
    assert part.encrypted and part.signature_valid and part.signer_fpr == world.svc_fpr
    assert "parse_header()" in part.text and res.attachments[0].data == b"\x00\x01patch"


def test_build_encrypted_to_key_blob_round_trip(world: World) -> None:
    """build_encrypted to a reporter's key blob nests a signed part and leaves the service keyring untouched."""
    reporter = Home()
    recipient_home = short_tmpdir()
    try:
        fpr = reporter.gen_key("Reporter", "reporter@example.org")
        msg = build_encrypted(outgoing(), world.svc, [], key_blob=reporter.export(fpr))
        assert world.svc.key_info(fpr) is None
        recipient = OpenPGP(recipient_home)
        recipient.import_secret(reporter.export_secret(fpr))
        recipient.import_public(world.svc.export_public(world.svc_fpr))
        res = unwrap(smtp_bytes(msg), recipient, limits=LIMITS)
    finally:
        reporter.close()
        kill_and_remove(recipient_home)
    assert res.errors == [] and res.protected_headers["Subject"] == "Re: your report"
    assert all(p.encrypted and p.signature_valid and p.signer_fpr == world.svc_fpr for p in res.text_parts)


@pytest.mark.parametrize("body", ["Fix: the details\n", "Café: the details\n"], ids=["7bit-as-queued", "8bit-reencoded"])
def test_encrypt_bytes_of_a_queued_mail_round_trips_with_protected_headers(world: World, body: str) -> None:
    """encrypt_bytes (the sender's path for pinned keys) on mail as the outbox queues it (7bit: encrypted as it
    is; 8bit: through build_encrypted): the recipient decrypts it with a valid service signature, the real
    Subject protected inside, "..." outside, the attachment intact."""
    queued = smtp_bytes(outgoing(body=body, subject="[SEC-2026-0001] New report"))
    assert queued.isascii() == body.isascii()  # the two paths
    raw = encrypt_bytes(queued, world.svc, [world.alice])
    assert b"New report" not in raw and b"details" not in raw and b"\r\nSubject: ...\r\n" in raw
    assert b"\n" not in raw.replace(b"\r\n", b"")
    recipient_home = short_tmpdir()
    try:
        recipient = OpenPGP(recipient_home)
        recipient.import_secret(world.client.export_secret(world.alice))
        recipient.import_public(world.svc.export_public(world.svc_fpr))
        res = unwrap(raw, recipient, limits=LIMITS)
    finally:
        kill_and_remove(recipient_home)
    assert res.errors == [] and res.protected_headers["Subject"] == "[SEC-2026-0001] New report"
    [part] = res.text_parts
    assert part.encrypted and part.signature_valid and part.signer_fpr == world.svc_fpr
    assert body.strip() in part.text
    assert [a.data for a in res.attachments] == [b"\x00\x01patch"]
