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
import secrets
from collections.abc import Iterable
from email.message import EmailMessage, Message

from mailer.mimetree import normalise_crlf
from mailer.openpgp import CryptoError, OpenPGP

__all__ = ["ENCRYPTED_SUBJECT", "build_encrypted", "build_signed", "sign_bytes"]

ENCRYPTED_SUBJECT = "..."


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


def _boundary(*avoid: bytes) -> str:
    while True:
        candidate = "=-" + secrets.token_hex(12)
        if not any(candidate.encode() in data for data in avoid):
            return candidate


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
    sig["Content-Type"] = 'application/pgp-signature; name="signature.asc"'
    sig["Content-Description"] = "OpenPGP digital signature"
    sig["Content-Disposition"] = 'attachment; filename="signature.asc"'
    sig.set_payload(signature.signature.decode("ascii"))
    boundary = _boundary(signed_bytes)
    content_type = (f'multipart/signed; micalg="{signature.micalg}"; '
                    f'protocol="application/pgp-signature"; boundary="{boundary}"')
    wrapped = _wrapper(outer, content_type, [first, sig], _SIGNED_PREAMBLE)
    if b"\r\n" + signed_bytes + b"\r\n--" + boundary.encode() not in _serialise(wrapped):
        raise CryptoError("signed part does not serialise to the signed bytes")
    return wrapped


_SIGNED_PREAMBLE = "This is an OpenPGP/MIME signed message (RFC 4880 and 3156)"


def sign_bytes(raw: bytes, gpg: OpenPGP) -> bytes:
    """:func:`build_signed` for a queued message: bytes in, bytes out, parsed once and serialised once.

    The wrapper is assembled around the signed bytes themselves, so the first
    part is byte for byte what was signed (no re-parse, no copy of the message).
    """
    msg = email.message_from_bytes(raw, policy=email.policy.SMTP)
    outer = [(k, v) for k, v in msg.items() if not k.lower().startswith("content-") and k.lower() != "mime-version"]
    for name in {k.lower() for k in msg}:
        if not name.startswith("content-"):
            del msg[name]
    if msg.get("Content-Type") is None:
        msg["Content-Type"] = "text/plain; charset=us-ascii"
    _make_7bit(msg)
    signed_bytes = _serialise(msg)
    signature = gpg.sign_detached(signed_bytes)
    boundary = _boundary(signed_bytes)
    head = EmailMessage(policy=email.policy.SMTP)
    for name, value in outer:
        head[name] = value
    head["MIME-Version"] = "1.0"
    head["Content-Type"] = (f'multipart/signed; micalg="{signature.micalg}"; '
                            f'protocol="application/pgp-signature"; boundary="{boundary}"')
    sig = EmailMessage(policy=email.policy.SMTP)
    sig["Content-Type"] = 'application/pgp-signature; name="signature.asc"'
    sig["Content-Description"] = "OpenPGP digital signature"
    sig["Content-Disposition"] = 'attachment; filename="signature.asc"'
    sig.set_payload(signature.signature.decode("ascii"))
    delimiter = b"\r\n--" + boundary.encode("ascii")
    header_block = b"".join(head.policy.fold_binary(name, value) for name, value in head.items()) + b"\r\n"
    return (header_block + _SIGNED_PREAMBLE.encode("ascii") + delimiter + b"\r\n" + signed_bytes
            + delimiter + b"\r\n" + _serialise(sig) + delimiter + b"--\r\n")


def build_signed(msg: EmailMessage, gpg: OpenPGP) -> EmailMessage:
    """RFC 3156 multipart/signed of *msg*'s body, signed by the service key.

    The outer headers (From/To/Subject/Message-ID/...) move to the wrapper;
    the signature covers the first part serialised with ``email.policy.SMTP``.
    """
    return _signed_entity(_content_entity(msg), gpg, msg)


def build_encrypted(msg: EmailMessage, gpg: OpenPGP, recipients: list[str], *, key_blob: bytes | str | None = None,
                    sign: bool = True, protect_subject: bool = True) -> EmailMessage:
    """RFC 3156 multipart/encrypted of *msg*'s body.

    Without *key_blob* the body is encrypted to the pinned *recipients* and,
    with ``sign``, signed in the same OpenPGP message.  With *key_blob* (a
    reporter's key, never imported into the service keyring) it is encrypted
    to that key plus *recipients*; ``sign`` then nests an RFC 3156
    multipart/signed inside the encryption (RFC 3156 §6.1).  With
    ``protect_subject`` the real Subject (and From/To/Cc/Date) travel in the
    encrypted part (``protected-headers="v1"``) and the outer Subject is "...".
    """
    inner = _content_entity(msg)
    if protect_subject:
        for name in ("Subject", "From", "To", "Cc", "Date"):
            if msg.get(name) is not None:
                inner[name] = msg[name]
        inner.set_param("protected-headers", "v1")
    if key_blob is not None:
        payload_entity: Message = _signed_entity(inner, gpg, EmailMessage()) if sign else inner
        ciphertext, _fpr = gpg.encrypt_to_key_blob(_serialise(payload_entity), key_blob, also_to=recipients)
    else:
        ciphertext = gpg.encrypt(_serialise(inner), recipients, sign=sign)
    control = EmailMessage(policy=email.policy.SMTP)
    control["Content-Type"] = "application/pgp-encrypted"
    control["Content-Description"] = "PGP/MIME version identification"
    control.set_payload("Version: 1\r\n")
    body = EmailMessage(policy=email.policy.SMTP)
    body["Content-Type"] = 'application/octet-stream; name="encrypted.asc"'
    body["Content-Description"] = "OpenPGP encrypted message"
    body["Content-Disposition"] = 'inline; filename="encrypted.asc"'
    body.set_payload(ciphertext.decode("ascii"))
    boundary = _boundary(ciphertext)
    content_type = f'multipart/encrypted; protocol="application/pgp-encrypted"; boundary="{boundary}"'
    outer = _wrapper(msg, content_type, [control, body],
                     "This is an OpenPGP/MIME encrypted message (RFC 4880 and 3156)")
    if protect_subject and outer.get("Subject") is not None:
        outer.replace_header("Subject", ENCRYPTED_SUBJECT)
    return outer
