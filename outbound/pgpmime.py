"""Building PGP/MIME (RFC 3156) messages: :func:`build_signed` and :func:`build_encrypted`.

Serialise their result with ``msg.as_bytes(policy=email.policy.SMTP)``: the
signature covers the first part exactly as ``policy.SMTP`` writes it (CRLF,
7bit), and :func:`build_signed` checks that the wrapper serialises to those
bytes.  Reading such messages is :func:`mailer.pgpmime.unwrap`.
"""

from __future__ import annotations

import base64
import copy
import email
import email.policy
import quopri
import re
from collections.abc import Iterable
from email.message import EmailMessage, Message

from mailer.mimetree import normalise_crlf
from mailer.openpgp import CryptoError, OpenPGP
from outbound.compose import boundary, field

__all__ = ["ENCRYPTED_SUBJECT", "build_encrypted", "build_signed", "encrypt_bytes", "sign_bytes"]

ENCRYPTED_SUBJECT = "..."


# the fixed parts of RFC 3156 messages: header fields, written by the bytes builders and the EmailMessage ones alike
_SIGNATURE_PART = (("Content-Type", 'application/pgp-signature; name="signature.asc"'),
                   ("Content-Description", "OpenPGP digital signature"),
                   ("Content-Disposition", 'attachment; filename="signature.asc"'))
_CONTROL_PART = (("Content-Type", "application/pgp-encrypted"),
                 ("Content-Description", "PGP/MIME version identification"))
_ENCRYPTED_PART = (("Content-Type", 'application/octet-stream; name="encrypted.asc"'),
                   ("Content-Description", "OpenPGP encrypted message"),
                   ("Content-Disposition", 'inline; filename="encrypted.asc"'))


def _head(fields: tuple[tuple[str, str], ...]) -> bytes:
    return b"".join(f"{name}: {value}\r\n".encode("ascii") for name, value in fields)


def _content_entity(msg: EmailMessage) -> EmailMessage:
    """A copy of *msg* keeping only its Content-* headers (the body entity)."""
    inner = copy.deepcopy(msg)
    content_type = msg.get("Content-Type")
    for name in {k.lower() for k in inner}:
        if not name.startswith("content-"):
            del inner[name]
    if content_type is None:
        inner["Content-Type"] = "text/plain; charset=us-ascii"
    _make_7bit(inner)
    return inner


def _make_7bit(entity: Message) -> None:
    """Re-encode 8bit/binary leaves (RFC 3156 §3: signed data must be 7bit)."""
    for part in entity.walk():
        if part.is_multipart():
            continue
        cte = (part.get("Content-Transfer-Encoding") or "7bit").lower()
        if cte in ("base64", "quoted-printable"):
            continue
        decoded = part.get_payload(decode=True)
        payload = decoded if isinstance(decoded, bytes) else b""
        if cte == "7bit" and payload.isascii() and all(len(line) <= 998 for line in payload.splitlines()):
            continue
        del part["Content-Transfer-Encoding"]
        if part.get_content_maintype() == "text":
            part["Content-Transfer-Encoding"] = "quoted-printable"
            part.set_payload(quopri.encodestring(normalise_crlf(payload).replace(b"\r\n", b"\n")).decode("ascii"))
        else:
            part["Content-Transfer-Encoding"] = "base64"
            part.set_payload(base64.encodebytes(payload).decode("ascii"))


def _serialise(entity: Message) -> bytes:
    return entity.as_bytes(policy=email.policy.SMTP)


def _wrapper(msg: EmailMessage, content_type: str, parts: Iterable[Message], preamble: str) -> EmailMessage:
    out = EmailMessage(policy=email.policy.SMTP)
    for name, value in msg.items():
        if not name.lower().startswith("content-") and name.lower() != "mime-version":
            out[name] = value
    out["MIME-Version"] = "1.0"
    out["Content-Type"] = content_type
    out.preamble = preamble
    out.set_payload(list(parts))
    return out


def _signed_entity(inner: EmailMessage, gpg: OpenPGP, outer: EmailMessage) -> EmailMessage:
    signed_bytes = _serialise(inner)
    signature = gpg.sign_detached(signed_bytes)
    first = email.message_from_bytes(signed_bytes, policy=email.policy.SMTP)
    sig = EmailMessage(policy=email.policy.SMTP)
    for name, value in _SIGNATURE_PART:
        sig[name] = value
    sig.set_payload(signature.signature.decode("ascii"))
    mark = boundary(signed_bytes)
    content_type = (f'multipart/signed; micalg="{signature.micalg}"; '
                    f'protocol="application/pgp-signature"; boundary="{mark}"')
    wrapped = _wrapper(outer, content_type, [first, sig], _SIGNED_PREAMBLE)
    if b"\r\n" + signed_bytes + b"\r\n--" + mark.encode() not in _serialise(wrapped):
        raise CryptoError("signed part does not serialise to the signed bytes")
    return wrapped


_SIGNED_PREAMBLE = "This is an OpenPGP/MIME signed message (RFC 4880 and 3156)"


_FIELD_NAME = re.compile(rb"^[\x21-\x39\x3b-\x7e]+$")  # RFC 5322 §3.6.8 field name


def _split_plain(raw: bytes) -> tuple[bytes, bytes] | None:
    """(outer header fields, body entity) of a 7bit CRLF message, byte for byte; None for anything else.

    The entity is the message's Content-* fields and body exactly as queued:
    signing it needs no re-parse and no re-serialisation.
    """
    fields = _fields(raw)
    if fields is None:
        return None
    outer, content, body = fields
    return b"".join(f + b"\r\n" for f in outer), b"".join(f + b"\r\n" for f in content) + body


def _fields(raw: bytes) -> tuple[list[bytes], list[bytes], bytes] | None:
    """The outer fields, the Content-* fields (each with its folded lines, no final CRLF) and the
    body (from the blank line) of a 7bit CRLF message; None for anything else."""
    end = raw.find(b"\r\n\r\n")
    crlf = raw.count(b"\r\n")
    if end < 0 or not raw.isascii() or raw.count(b"\n") != crlf or raw.count(b"\r") != crlf:
        return None
    if any(len(line) > 998 for line in raw.split(b"\r\n")):
        return None
    outer: list[bytes] = []
    content: list[bytes] = []
    current: list[bytes] | None = None
    for line in raw[:end].split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):
            if current is None:
                return None
            current[-1] += b"\r\n" + line
            continue
        name, colon, _ = line.partition(b":")
        if not colon or not _FIELD_NAME.match(name):
            return None
        lower = name.lower()
        current = content if lower.startswith(b"content-") else outer if lower != b"mime-version" else []
        current.append(line)
    return outer, content or [b"Content-Type: text/plain; charset=us-ascii"], raw[end + 2:]


_PROTECTED = (b"subject", b"from", b"to", b"cc", b"date")


def _name(field_bytes: bytes) -> bytes:
    return field_bytes.partition(b":")[0].strip().lower()


def encrypt_bytes(raw: bytes, gpg: OpenPGP, recipients: list[str]) -> bytes:
    """:func:`build_encrypted` (signed, protected headers) to pinned keys for a queued message: bytes in, bytes out.

    A 7bit CRLF message (all the service composes) is signed and encrypted as
    it is queued: its Content-* fields with ``protected-headers="v1"``, the real
    Subject, From, To, Cc and Date, and its body, in an RFC 3156 multipart/signed
    inside the encryption (§6.1); the outer Subject is "...". Anything else
    takes :func:`build_encrypted`.
    """
    fields = _fields(raw)
    if fields is None:
        message = email.message_from_bytes(raw, policy=email.policy.SMTP)
        assert isinstance(message, EmailMessage)
        return build_encrypted(message, gpg, recipients, sign=True).as_bytes(policy=email.policy.SMTP)
    outer, content, body = fields
    content = [f + b'; protected-headers="v1"' if _name(f) == b"content-type" else f for f in content]
    protected = [f for f in outer if _name(f) in _PROTECTED]
    inner = b"".join(f + b"\r\n" for f in (*content, *protected)) + body
    ciphertext = gpg.encrypt(_multipart_signed(inner, gpg), recipients)
    head = [f if _name(f) != b"subject" else b"Subject: " + ENCRYPTED_SUBJECT.encode("ascii") for f in outer]
    mark = boundary(ciphertext)
    content_type = f'multipart/encrypted; protocol="application/pgp-encrypted"; boundary="{mark}"'
    delimiter = b"\r\n--" + mark.encode("ascii")
    armor = ciphertext.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    return (b"".join(f + b"\r\n" for f in head) + b"MIME-Version: 1.0\r\n" + field("Content-Type", content_type)
            + b"\r\n" + _ENCRYPTED_PREAMBLE.encode("ascii") + delimiter + b"\r\n"
            + _head(_CONTROL_PART) + b"\r\nVersion: 1\r\n" + delimiter + b"\r\n" + _head(_ENCRYPTED_PART) + b"\r\n"
            + armor + (b"" if armor.endswith(b"\r\n") else b"\r\n") + delimiter + b"--\r\n")


_ENCRYPTED_PREAMBLE = "This is an OpenPGP/MIME encrypted message (RFC 4880 and 3156)"


def _signature_part(signature: bytes) -> bytes:
    armor = signature.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    return (_head(_SIGNATURE_PART) + b"\r\n"
            + armor + (b"" if armor.endswith(b"\r\n") else b"\r\n"))


def sign_bytes(raw: bytes, gpg: OpenPGP) -> bytes:
    """:func:`build_signed` for a queued message: bytes in, bytes out.

    A 7bit CRLF message (all the service composes, :mod:`outbound.compose`)
    is wrapped around its own bytes: the first part is byte for byte what was
    signed, with no parse and no copy of the message. Anything else is parsed,
    re-encoded to 7bit and serialised first.
    """
    split = _split_plain(raw)
    if split is None:
        split = _split_plain(_serialise(_reencoded(raw)))
        if split is None:
            raise CryptoError("message cannot be made 7bit for signing")
    outer, signed_bytes = split
    return outer + b"MIME-Version: 1.0\r\n" + _multipart_signed(signed_bytes, gpg)


def _multipart_signed(signed_bytes: bytes, gpg: OpenPGP) -> bytes:
    """The multipart/signed entity (its Content-Type field, then its body) around the 7bit CRLF entity
    *signed_bytes*, taken byte for byte."""
    signature = gpg.sign_detached(signed_bytes)
    mark = boundary(signed_bytes)
    content_type = (f'multipart/signed; micalg="{signature.micalg}"; '
                    f'protocol="application/pgp-signature"; boundary="{mark}"')
    delimiter = b"\r\n--" + mark.encode("ascii")
    return (field("Content-Type", content_type) + b"\r\n"
            + _SIGNED_PREAMBLE.encode("ascii") + delimiter + b"\r\n" + signed_bytes
            + delimiter + b"\r\n" + _signature_part(signature.signature) + delimiter + b"--\r\n")


def _reencoded(raw: bytes) -> EmailMessage:
    msg = email.message_from_bytes(raw, policy=email.policy.SMTP)
    assert isinstance(msg, EmailMessage)
    _make_7bit(msg)
    return msg


def build_signed(msg: EmailMessage, gpg: OpenPGP) -> EmailMessage:
    """RFC 3156 multipart/signed of *msg*'s body, signed by the service key.

    The outer headers (From/To/Subject/Message-ID/...) move to the wrapper;
    the signature covers the first part serialised with ``email.policy.SMTP``.
    """
    return _signed_entity(_content_entity(msg), gpg, msg)


def build_encrypted(msg: EmailMessage, gpg: OpenPGP, recipients: list[str], *, key_blob: bytes | str | None = None,
                    sign: bool = True, protect_subject: bool = True) -> EmailMessage:
    """RFC 3156 multipart/encrypted of *msg*'s body.

    Without *key_blob* the body is encrypted to the pinned *recipients*; with
    *key_blob* (a reporter's key, never imported into the service keyring) to
    that key plus *recipients*. ``sign`` nests an RFC 3156 multipart/signed
    inside the encryption (RFC 3156 §6.1): the signature is the service's
    detached one (gpg-agent), the encryption needs no secret key.  With
    ``protect_subject`` the real Subject (and From/To/Cc/Date) travel in the
    encrypted part (``protected-headers="v1"``) and the outer Subject is "...".
    """
    inner = _content_entity(msg)
    if protect_subject:
        for name in ("Subject", "From", "To", "Cc", "Date"):
            if msg.get(name) is not None:
                inner[name] = msg[name]
        inner.set_param("protected-headers", "v1")
    payload_entity: Message = _signed_entity(inner, gpg, EmailMessage()) if sign else inner
    if key_blob is not None:
        ciphertext, _fpr = gpg.encrypt_to_key_blob(_serialise(payload_entity), key_blob, also_to=recipients)
    else:
        ciphertext = gpg.encrypt(_serialise(payload_entity), recipients)
    control = EmailMessage(policy=email.policy.SMTP)
    for name, value in _CONTROL_PART:
        control[name] = value
    control.set_payload("Version: 1\r\n")
    body = EmailMessage(policy=email.policy.SMTP)
    for name, value in _ENCRYPTED_PART:
        body[name] = value
    body.set_payload(ciphertext.decode("ascii"))
    mark = boundary(ciphertext)
    content_type = f'multipart/encrypted; protocol="application/pgp-encrypted"; boundary="{mark}"'
    outer = _wrapper(msg, content_type, [control, body], _ENCRYPTED_PREAMBLE)
    if protect_subject and outer.get("Subject") is not None:
        outer.replace_header("Subject", ENCRYPTED_SUBJECT)
    return outer
