"""PGP/MIME (RFC 3156) and inline PGP at the message level.

:func:`unwrap` turns the raw bytes of a received message into text parts and
attachments, each flagged with how it was protected.  It works on the raw
bytes with its own boundary splitter, so a multipart/signed first part is
verified over exactly the bytes that were received (line endings normalised
to CRLF, as RFC 3156 requires) and never over a re-serialised message.
It never raises on bad input: structural problems, limits (depth, part count,
number of decryptions) and failed decryptions end up in ``errors``/``reason``.

Rules: content outside the encrypted part is never merged into the decrypted
text (it is kept as separate, unencrypted parts and ``partly_encrypted`` is
set); ``protected_headers`` only come from inside a decrypted payload;
``signer_fpr`` is only set on parts whose signature is valid.

:func:`build_signed` and :func:`build_encrypted` create RFC 3156 messages.
Serialise their result with ``msg.as_bytes(policy=email.policy.SMTP)``.
"""

from __future__ import annotations

import base64
import binascii
import copy
import email
import email.errors
import email.policy
import email.utils
import quopri
import re
import secrets
from dataclasses import dataclass, field
from email.header import decode_header, make_header
from email.message import EmailMessage, Message
from email.parser import BytesHeaderParser
from typing import Iterable

from mailer.crypto import CryptoError, OpenPGP, SignatureResult

__all__ = ["Attachment", "TextPart", "Unwrapped", "build_encrypted", "build_signed", "unwrap",
           "MAX_DEPTH", "MAX_PARTS", "MAX_DECRYPTIONS"]

MAX_DEPTH = 16
MAX_PARTS = 500
MAX_DECRYPTIONS = 4
ENCRYPTED_SUBJECT = "..."
PROTECTED_HEADER_NAMES = ("Subject", "From", "To", "Cc", "Reply-To", "Date", "Message-ID",
                          "In-Reply-To", "References")

_COMPAT = email.policy.compat32
_ARMOR_RE = re.compile(
    r"^-----BEGIN PGP (?P<kind>MESSAGE|SIGNED MESSAGE)-----[ \t]*\r?$"
    r".*?"
    r"^-----END PGP (?:MESSAGE|SIGNATURE)-----[ \t]*\r?$",
    re.S | re.M,
)


# --------------------------------------------------------------------------- results


@dataclass
class TextPart:
    """One piece of text and how it was protected."""

    text: str
    encrypted: bool = False
    signed: bool = False  # a signature was present over this text
    signer_fpr: str | None = None  # primary fingerprint, only when the signature is valid
    signature_valid: bool = False
    signature_reason: str = "no signature"
    content_type: str = "text/plain"
    signature_created: int | None = None  # signature creation time (Unix seconds), when signed


@dataclass
class Attachment:
    """A non-text part, decoded from its transfer encoding."""

    filename: str | None
    content_type: str
    data: bytes
    encrypted: bool = False
    signed: bool = False
    signer_fpr: str | None = None
    signature_valid: bool = False


@dataclass
class Unwrapped:
    """Everything :func:`unwrap` found in a message."""

    text_parts: list[TextPart] = field(default_factory=list)
    attachments: list[Attachment] = field(default_factory=list)
    partly_encrypted: bool = False
    partly_signed: bool = False
    protected_headers: dict[str, str] = field(default_factory=dict)
    decrypted_mime: bytes | None = field(default=None, repr=False)
    keys_found: list[bytes] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    raw: bytes = field(default=b"", repr=False)  # the input with CRLF line endings

    @property
    def reason(self) -> str:
        """The first problem found, or ``''``."""
        return self.errors[0] if self.errors else ""

    @property
    def encrypted(self) -> bool:
        """True if some content was decrypted."""
        return any(p.encrypted for p in self.text_parts) or any(a.encrypted for a in self.attachments)

    @property
    def text(self) -> str:
        """All text parts joined (for display; check the per-part flags for trust)."""
        return "\n".join(p.text for p in self.text_parts)


# --------------------------------------------------------------------------- raw MIME tree


class _LimitExceeded(Exception):
    """Input exceeds a structural limit (depth, part count, decryptions)."""


@dataclass
class _Entity:
    """A MIME entity as received: its exact bytes, parsed headers and children."""

    raw: bytes
    headers: Message
    body: bytes
    children: list["_Entity"]
    depth: int

    @property
    def ctype(self) -> str:
        return self.headers.get_content_type()

    def param(self, name: str) -> str | None:
        value = self.headers.get_param(name)
        if isinstance(value, tuple):  # RFC 2231
            value = email.utils.collapse_rfc2231_value(value)
        return str(value) if value is not None else None

    def payload(self) -> bytes:
        """The body decoded from its Content-Transfer-Encoding."""
        cte = (self.headers.get("Content-Transfer-Encoding") or "").strip().lower()
        if cte == "base64":
            try:
                return base64.b64decode(re.sub(rb"[^A-Za-z0-9+/=]", b"", self.body) + b"===")
            except (binascii.Error, ValueError):
                return b""
        if cte == "quoted-printable":
            return quopri.decodestring(self.body)
        return self.body

    def text(self) -> str:
        charset = self.headers.get_content_charset() or "utf-8"
        data = self.payload()
        try:
            return data.decode(charset, errors="replace")
        except LookupError:
            return data.decode("utf-8", errors="replace")

    def filename(self) -> str | None:
        name = self.headers.get_filename() or self.param("name")
        return str(make_header(decode_header(name))) if name else None


def normalise_crlf(data: bytes) -> bytes:
    """Convert LF and CRLF line endings to CRLF."""
    return re.sub(rb"\r?\n", b"\r\n", data)


class _Parser:
    """Bounded parser of raw (CRLF) MIME bytes into :class:`_Entity` trees."""

    def __init__(self) -> None:
        self.parts = 0

    def parse(self, raw: bytes, depth: int) -> _Entity:
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise _LimitExceeded(f"more than {MAX_PARTS} MIME parts")
        if depth > MAX_DEPTH:
            raise _LimitExceeded(f"MIME nesting deeper than {MAX_DEPTH}")
        if raw.startswith(b"\r\n"):
            head, body = b"", raw[2:]
        else:
            head, sep, body = raw.partition(b"\r\n\r\n")
            if not sep:
                head, body = raw, b""
        headers = BytesHeaderParser(policy=_COMPAT).parsebytes(head + b"\r\n\r\n")
        entity = _Entity(raw, headers, body, [], depth)
        if entity.ctype.startswith("multipart/"):
            boundary = headers.get_boundary()
            if boundary:
                entity.children = [self.parse(p, depth + 1) for p in split_multipart(body, boundary)]
        return entity


def split_multipart(body: bytes, boundary: str) -> list[bytes]:
    """The exact bytes of each body part (RFC 2046: the CRLF before a delimiter belongs to it)."""
    delim = re.escape(b"--" + boundary.encode("ascii", "replace"))
    pattern = re.compile(rb"(?:\A|\r\n)" + delim + rb"(--)?[ \t]*(?=\r\n|\Z)")
    parts: list[bytes] = []
    start: int | None = None
    for match in pattern.finditer(body):
        if start is not None:
            parts.append(body[start:match.start()])
        if match.group(1):
            return parts
        start = match.end() + 2
    if start is not None:  # no close delimiter: take the rest (lenient)
        parts.append(body[start:])
    return parts


# --------------------------------------------------------------------------- unwrap


@dataclass(frozen=True)
class _Ctx:
    encrypted: bool = False
    sig: SignatureResult | None = None
    top_of_decrypted: bool = False


class _Walker:
    """Walks an entity tree, decrypting/verifying and collecting results."""

    def __init__(self, gpg: OpenPGP, out: Unwrapped) -> None:
        self.gpg = gpg
        self.out = out
        self.parser = _Parser()
        self.decryptions = 0

    # ---------------------------------------------------------------- collect

    def _flags(self, ctx: _Ctx) -> dict[str, object]:
        sig = ctx.sig
        valid = bool(sig and sig.valid)
        return {"encrypted": ctx.encrypted, "signed": sig is not None, "signature_valid": valid,
                "signer_fpr": sig.signer_fpr if sig and sig.valid else None}

    def add_text(self, text: str, ctx: _Ctx, content_type: str = "text/plain") -> None:
        flags = self._flags(ctx)
        reason = ctx.sig.reason if ctx.sig else "no signature"
        text = text.replace("\r\n", "\n")
        created = ctx.sig.created if ctx.sig else None
        self.out.text_parts.append(TextPart(text=text, content_type=content_type, signature_reason=reason,
                                            signature_created=created, **flags))  # type: ignore[arg-type]

    def add_attachment(self, ent: _Entity, ctx: _Ctx) -> None:
        flags = self._flags(ctx)
        self.out.attachments.append(Attachment(ent.filename(), ent.ctype, ent.payload(),
                                               **flags))  # type: ignore[arg-type]

    # ---------------------------------------------------------------- dispatch

    def walk(self, ent: _Entity, ctx: _Ctx) -> None:
        ctype = ent.ctype
        if ctype == "multipart/encrypted":
            self.encrypted(ent, ctx)
        elif ctype == "multipart/signed":
            self.signed(ent, ctx)
        elif ctype == "multipart/mixed" and is_exchange_mangled(ent):
            self.out.notes.append("repaired Exchange-mangled PGP/MIME")
            self.decrypt_payload(ent.children[2], ctx)
        elif ctype == "multipart/alternative" and ent.children:
            self.walk(choose_alternative(ent.children), _Ctx(ctx.encrypted, ctx.sig))
        elif ctype.startswith("multipart/"):
            for child in ent.children:
                self.walk(child, _Ctx(ctx.encrypted, ctx.sig))
        elif ctype == "text/plain" and ent.headers.get_content_disposition() != "attachment":
            self.text(ent, ctx)
        elif ctype == "application/pgp-keys":
            self.out.keys_found.append(ent.payload())
        else:
            self.add_attachment(ent, ctx)

    def encrypted(self, ent: _Entity, ctx: _Ctx) -> None:
        problem = pgpmime_encrypted_problem(ent)
        if problem:
            self.out.errors.append(f"broken PGP/MIME encrypted structure: {problem}")
            for child in ent.children:
                self.add_attachment(child, ctx)
            return
        self.decrypt_payload(ent.children[1], ctx)

    def decrypt_payload(self, part: _Entity, ctx: _Ctx) -> None:
        self.decryptions += 1
        if self.decryptions > MAX_DECRYPTIONS:
            raise _LimitExceeded(f"more than {MAX_DECRYPTIONS} encrypted parts")
        result = self.gpg.decrypt(part.payload())
        if not result.ok or result.data is None:
            self.out.errors.append(f"decryption failed: {result.reason}")
            return
        inner = normalise_crlf(result.data)
        if self.out.decrypted_mime is None:
            self.out.decrypted_mime = inner
        sig = result.signature if result.signature.count else ctx.sig
        if not looks_like_mime(inner):
            self.add_text(inner.decode("utf-8", errors="replace"), _Ctx(True, sig))
            return
        entity = self.parser.parse(inner, part.depth + 1)
        self.collect_protected_headers(entity)
        self.walk(entity, _Ctx(True, sig, top_of_decrypted=True))

    def collect_protected_headers(self, entity: _Entity) -> None:
        source = entity
        if entity.ctype == "multipart/signed" and entity.children:
            source = entity.children[0]
        for name in PROTECTED_HEADER_NAMES:
            value = source.headers.get(name)
            if value is not None and name not in self.out.protected_headers:
                self.out.protected_headers[name] = decode_header_value(value)

    def signed(self, ent: _Entity, ctx: _Ctx) -> None:
        problem = pgpmime_signed_problem(ent)
        if problem:
            self.out.errors.append(f"broken PGP/MIME signed structure: {problem}")
            for child in ent.children:
                if child.ctype != "application/pgp-signature":
                    self.walk(child, _Ctx(ctx.encrypted, ctx.sig))
            return
        first, sig_part = ent.children
        result = self.gpg.verify_detached(first.raw, sig_part.payload())
        if not result.valid:
            self.out.errors.append(f"signature not valid: {result.reason}")
        self.walk(first, _Ctx(ctx.encrypted, result, ctx.top_of_decrypted))

    def text(self, ent: _Entity, ctx: _Ctx) -> None:
        if ent.param("protected-headers") and ctx.encrypted and not ctx.top_of_decrypted:
            self.out.notes.append("skipped protected-headers legacy display part")
            return
        text = ent.text()
        if "-----BEGIN PGP " in text and _ARMOR_RE.search(text):
            self.inline(text, ctx)
        else:
            self.add_text(text, ctx)

    def inline(self, text: str, ctx: _Ctx) -> None:
        pos = 0
        for match in _ARMOR_RE.finditer(text):
            self.outside(text[pos:match.start()], ctx)
            block = match.group(0)
            if match.group("kind") == "MESSAGE":
                self.inline_encrypted(block, ctx)
            else:
                self.inline_signed(block, ctx)
            pos = match.end()
        self.outside(text[pos:], ctx)

    def outside(self, segment: str, ctx: _Ctx) -> None:
        if segment.strip():
            self.add_text(segment.strip("\r\n"), _Ctx(ctx.encrypted, ctx.sig))

    def inline_encrypted(self, block: str, ctx: _Ctx) -> None:
        self.decryptions += 1
        if self.decryptions > MAX_DECRYPTIONS:
            raise _LimitExceeded(f"more than {MAX_DECRYPTIONS} encrypted parts")
        result = self.gpg.decrypt(block.encode("utf-8", errors="replace"))
        if not result.ok or result.data is None:
            self.out.errors.append(f"inline decryption failed: {result.reason}")
            return
        sig = result.signature if result.signature.count else ctx.sig
        self.add_text(result.data.decode("utf-8", errors="replace"), _Ctx(True, sig))

    def inline_signed(self, block: str, ctx: _Ctx) -> None:
        result = self.gpg.verify_inline(block.encode("utf-8", errors="replace"))
        if result.data is not None and result.signature.valid:
            self.add_text(result.data.decode("utf-8", errors="replace"), _Ctx(ctx.encrypted, result.signature))
            return
        self.out.errors.append(f"inline signature not valid: {result.reason}")
        sig = result.signature if result.signature.count else SignatureResult(False, result.reason, count=1)
        self.add_text(cleartext_body(block), _Ctx(ctx.encrypted, sig))


def decode_header_value(value: str) -> str:
    try:
        return str(make_header(decode_header(value)))
    except (email.errors.HeaderParseError, LookupError, UnicodeError, ValueError):
        return value


def looks_like_mime(data: bytes) -> bool:
    """True if *data* starts with a header block holding a Content-Type."""
    head = data.split(b"\r\n\r\n", 1)[0]
    return bool(re.match(rb"[!-9;-~]+:", head)) and re.search(rb"(?im)^content-type:", head) is not None


def choose_alternative(children: list[_Entity]) -> _Entity:
    """Prefer text/plain (or an encrypted/signed structure), else the last alternative."""
    for child in children:
        if child.ctype in ("text/plain", "multipart/encrypted", "multipart/signed"):
            return child
    return children[-1]


def cleartext_body(block: str) -> str:
    """The text of a cleartext-signed block (dash-escaping undone), without verification."""
    lines = block.replace("\r\n", "\n").split("\n")
    try:
        start = lines.index("") + 1
    except ValueError:
        return block
    body: list[str] = []
    for line in lines[start:]:
        if line.startswith("-----BEGIN PGP SIGNATURE-----"):
            break
        body.append(line[2:] if line.startswith("- ") else line)
    return "\n".join(body)


def pgpmime_encrypted_problem(ent: _Entity) -> str | None:
    """Why *ent* is not a well-formed RFC 3156 multipart/encrypted, or ``None``."""
    protocol = (ent.param("protocol") or "").lower()
    if protocol != "application/pgp-encrypted":
        return f"wrong protocol {protocol!r}"
    if len(ent.children) != 2:
        return f"expected 2 parts, found {len(ent.children)}"
    control, payload = ent.children
    if control.ctype != "application/pgp-encrypted":
        return f"first part is {control.ctype}"
    if not re.search(rb"(?m)^Version:\s*1\s*$", control.payload()):
        return "first part lacks 'Version: 1'"
    if payload.ctype != "application/octet-stream":
        return f"second part is {payload.ctype}"
    return None


def pgpmime_signed_problem(ent: _Entity) -> str | None:
    """Why *ent* is not a well-formed RFC 3156 multipart/signed, or ``None``."""
    protocol = (ent.param("protocol") or "").lower()
    if protocol != "application/pgp-signature":
        return f"wrong protocol {protocol!r}"
    if len(ent.children) != 2:
        return f"expected 2 parts, found {len(ent.children)}"
    if ent.children[1].ctype != "application/pgp-signature":
        return f"second part is {ent.children[1].ctype}"
    return None


def is_exchange_mangled(ent: _Entity) -> bool:
    """Exchange's rewrite of multipart/encrypted: empty text, version part, encrypted.asc."""
    if len(ent.children) != 3:
        return False
    text, control, payload = ent.children
    return (text.ctype == "text/plain" and not text.payload().strip()
            and control.ctype == "application/pgp-encrypted"
            and re.search(rb"(?m)^Version:\s*1\s*$", control.payload()) is not None
            and payload.ctype == "application/octet-stream"
            and b"-----BEGIN PGP MESSAGE-----" in payload.payload())


def autocrypt_keys(headers: Message) -> tuple[list[bytes], list[str]]:
    """``keydata`` of the Autocrypt headers, and problems found."""
    keys: list[bytes] = []
    problems: list[str] = []
    for value in headers.get_all("Autocrypt") or []:
        attrs = {}
        for item in re.sub(r"\s+", "", str(value)).split(";"):
            name, _, val = item.partition("=")
            attrs[name.lower()] = val
        if "keydata" not in attrs:
            problems.append("Autocrypt header without keydata")
            continue
        try:
            keys.append(base64.b64decode(attrs["keydata"], validate=True))
        except (binascii.Error, ValueError):
            problems.append("Autocrypt keydata is not base64")
    return keys, problems


def _finish_flags(out: Unwrapped) -> None:
    """Compute partly_encrypted/partly_signed from the per-part flags."""
    items = [(p.encrypted, p.signed, bool(p.text.strip())) for p in out.text_parts]
    items += [(a.encrypted, a.signed, bool(a.data)) for a in out.attachments]
    content = [(enc, sig) for enc, sig, nonempty in items if nonempty]
    if any(enc for enc, _ in content) and not all(enc for enc, _ in content):
        out.partly_encrypted = True
    if any(sig for _, sig in content) and not all(sig for _, sig in content):
        out.partly_signed = True


def unwrap(raw: bytes, gpg: OpenPGP) -> Unwrapped:
    """Decrypt/verify a received message given as raw bytes.  Never raises on bad input."""
    data = normalise_crlf(raw)
    out = Unwrapped(raw=data)
    walker = _Walker(gpg, out)
    try:
        top = walker.parser.parse(data, 0)
        keys, problems = autocrypt_keys(top.headers)
        out.keys_found.extend(keys)
        out.errors.extend(problems)
        walker.walk(top, _Ctx())
    except _LimitExceeded as exc:
        out.errors.append(f"message too complex: {exc}")
    except RecursionError:
        out.errors.append("message too complex: recursion limit")
    except (email.errors.MessageError, ValueError, LookupError, UnicodeError) as exc:
        out.errors.append(f"malformed message: {exc}")
    _finish_flags(out)
    return out


# --------------------------------------------------------------------------- building


def _content_entity(msg: EmailMessage) -> EmailMessage:
    """A copy of *msg* keeping only its Content-* headers (the body entity)."""
    inner = copy.deepcopy(msg)
    content_type = msg.get("Content-Type")
    for name in {k.lower() for k in inner.keys()}:
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
        payload = part.get_payload(decode=True) or b""
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
    wrapped = _wrapper(outer, content_type, [first, sig],  # type: ignore[list-item]
                       "This is an OpenPGP/MIME signed message (RFC 4880 and 3156)")
    if b"\r\n" + signed_bytes + b"\r\n--" + boundary.encode() not in _serialise(wrapped):
        raise CryptoError("signed part does not serialise to the signed bytes")
    return wrapped


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
