"""Reading PGP/MIME (RFC 3156) and inline PGP in received messages.

:func:`unwrap` turns the raw bytes of a received message into text parts and
attachments, each flagged with how it was protected.  It works on the raw
bytes with its own boundary splitter (:mod:`mailer.mimetree`), so a
multipart/signed first part is verified over exactly the bytes that were
received (line endings normalised to CRLF, as RFC 3156 requires) and never
over a re-serialised message.  A bare CR or LF in the header block of a CRLF
message is not a line break (:func:`mailer.mimetree.normalise_message`).
It never raises on bad input: structural problems, limits (depth and part
count from :class:`mailer.config.ParsingConfig`, :data:`MAX_DECRYPTIONS`)
and failed decryptions end up in ``errors``/``reason``.

Rules: content outside the encrypted part is never merged into the decrypted
text (it is kept as separate, unencrypted parts and ``partly_encrypted`` is
set); ``protected_headers`` only come from inside a decrypted payload;
``signer_fpr`` is only set on parts whose signature is valid.

Building PGP/MIME messages is :mod:`outbound.pgpmime`.
"""

from __future__ import annotations

import email.errors
import re
from dataclasses import dataclass, field, replace

from mailer.config import ParsingConfig
from mailer.mimetree import (
    Entity,
    LimitExceeded,
    MimeParser,
    decode_header_value,
    looks_like_mime,
    normalise_crlf,
    normalise_message,
)
from mailer.openpgp import OpenPGP, SignatureResult

__all__ = ["MAX_DECRYPTIONS", "PROTECTED_HEADER_NAMES", "Attachment", "TextPart", "Unwrapped", "unwrap"]

from mailer.pgpshapes import (
    _ENCRYPTED_CONTENT,
    _is_text,
    _leaves,
    autocrypt_keys,
    choose_alternative,
    clean_armor,
    cleartext_body,
    exchange_mangled_payload,
    html_to_text,
    looks_encrypted,
    pgpmime_encrypted_problem,
    pgpmime_signed_problem,
)

MAX_DECRYPTIONS = 4
PROTECTED_HEADER_NAMES = ("Subject", "From", "To", "Cc", "Reply-To", "Date", "Message-ID",
                          "In-Reply-To", "References")

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
    # encrypted content was found (decrypted or not): the sender wrote encrypted
    encrypted_seen: bool = False
    # From addresses of forwarded messages (message/rfc822) whose encrypted content was decrypted
    forwarded_from: list[str] = field(default_factory=list)

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


# --------------------------------------------------------------------------- unwrap


@dataclass(frozen=True)
class _Ctx:
    """How the content being walked is protected."""

    encrypted: bool = False
    sig: SignatureResult | None = None
    top_of_decrypted: bool = False
    # the first child of a multipart/mixed at the top of a decrypted payload: where a legacy display part sits
    legacy_display_slot: bool = False

    @property
    def signer_fpr(self) -> str | None:
        return self.sig.signer_fpr if self.sig is not None and self.sig.valid else None

    @property
    def valid(self) -> bool:
        return self.sig is not None and self.sig.valid

    def inherit(self) -> _Ctx:
        """The protection of a child entity (``top_of_decrypted`` does not carry over)."""
        return _Ctx(self.encrypted, self.sig)


class _Walker:
    """Walks an entity tree, decrypting/verifying and collecting results."""

    def __init__(self, gpg: OpenPGP, out: Unwrapped, limits: ParsingConfig) -> None:
        self.gpg = gpg
        self.out = out
        self.parser = MimeParser(max_parts=limits.max_parts, max_depth=limits.max_depth)
        self.decryptions = 0

    # ---------------------------------------------------------------- collect

    def add_text(self, text: str, ctx: _Ctx, content_type: str = "text/plain") -> None:
        sig = ctx.sig
        self.out.text_parts.append(TextPart(
            text=text.replace("\r\n", "\n"), encrypted=ctx.encrypted, signed=sig is not None,
            signer_fpr=ctx.signer_fpr, signature_valid=ctx.valid,
            signature_reason=str(sig.reason) if sig is not None else "no signature",
            content_type=content_type, signature_created=sig.created if sig is not None else None))

    def add_attachment(self, ent: Entity, ctx: _Ctx) -> None:
        self.out.attachments.append(Attachment(
            ent.filename(), ent.ctype, ent.payload(), encrypted=ctx.encrypted, signed=ctx.sig is not None,
            signer_fpr=ctx.signer_fpr, signature_valid=ctx.valid))

    # ---------------------------------------------------------------- dispatch

    def walk(self, ent: Entity, ctx: _Ctx) -> None:
        ctype = ent.ctype
        inline = ent.headers.get_content_disposition() != "attachment"
        if ctype == "multipart/encrypted":
            self.encrypted(ent, ctx)
        elif ctype == "multipart/signed":
            self.signed(ent, ctx)
        elif ctype == "multipart/mixed" and (payload := exchange_mangled_payload(ent)) is not None:
            self.out.notes.append("repaired Exchange-mangled PGP/MIME")
            self.decrypt_payload(payload, ctx)
        elif ctype == "multipart/alternative" and ent.children:
            self.alternative(ent, ctx)
        elif ctype.startswith("multipart/"):
            for index, child in enumerate(ent.children):
                slot = index == 0 and ctype == "multipart/mixed" and ctx.top_of_decrypted
                self.walk(child, replace(ctx.inherit(), legacy_display_slot=slot))
        elif ctype == "message/rfc822" and _ENCRYPTED_CONTENT.search(ent.payload()):
            self.forwarded(ent, ctx)
        elif ctype == "text/plain" and inline:
            self.text(ent, ctx)
        elif ctype == "text/html" and inline and (ctx.encrypted or "-----BEGIN PGP " in html_to_text(ent.text())):
            self.html(ent, ctx)
        elif ctype == "application/pgp-keys":
            self.out.keys_found.append(ent.payload())
        elif looks_encrypted(ent.payload()):
            self.encrypted_file(ent, ctx)
        else:
            self.add_attachment(ent, ctx)

    def alternative(self, ent: Entity, ctx: _Ctx) -> None:
        """The preferred alternative; when it yields no text (a skipped or empty part), the next ones in turn."""
        chosen = choose_alternative(ent.children)
        if not ctx.encrypted:
            self.walk(chosen, ctx.inherit())
            return
        order = [chosen, *sorted((c for c in ent.children if c is not chosen), key=lambda c: c.ctype != "text/html")]
        for child in order:
            before = len(self.out.text_parts), len(self.out.attachments)
            self.walk(child, ctx.inherit())
            if any(p.text.strip() for p in self.out.text_parts[before[0]:]) or len(self.out.attachments) > before[1]:
                return
            if child is chosen:
                self.out.notes.append(f"alternative {child.ctype} gave no text; trying the others")

    def html(self, ent: Entity, ctx: _Ctx) -> None:
        """HTML as text: armor in it (entities decoded, NBSP as spaces) is decrypted like inline PGP."""
        text = html_to_text(ent.text())
        if "-----BEGIN PGP " in text and _ARMOR_RE.search(text):
            self.inline(text, ctx)
        elif "-----BEGIN PGP MESSAGE-----" in text:
            self.out.encrypted_seen = True
            self.out.errors.append("inline decryption failed: the PGP armor in the HTML part is incomplete")
        else:
            self.add_text(text, ctx, "text/html")

    def encrypted_file(self, ent: Entity, ctx: _Ctx) -> None:
        """An attached OpenPGP message (``gpg -ea`` → ``message.txt.asc``, or binary ``.gpg``): kept decrypted."""
        self.count_decryption()
        self.out.encrypted_seen = True
        name = ent.filename()
        result = self.gpg.decrypt(ent.payload())
        if not result.ok or result.data is None:
            self.out.errors.append(f"decryption of attachment {name or '(unnamed)'} failed: {result.reason}")
            self.add_attachment(ent, ctx)
            return
        sig = result.signature if result.signature.count else ctx.sig
        inner = _Ctx(True, sig)
        data = result.data
        plain_name = re.sub(r"\.(asc|gpg|pgp)$", "", name, flags=re.I) if name else None
        textual = _is_text(data) and (plain_name is None or "." not in plain_name or plain_name.lower().endswith(".txt"))
        if textual:
            self.add_text(data.decode("utf-8"), inner)
        ctype = "text/plain" if textual else "application/octet-stream"
        self.out.attachments.append(Attachment(plain_name, ctype, data, encrypted=True, signed=sig is not None,
                                               signer_fpr=inner.signer_fpr, signature_valid=inner.valid))
        self.out.notes.append(f"decrypted attachment {name or '(unnamed)'}")

    def forwarded(self, ent: Entity, ctx: _Ctx) -> None:
        """A forwarded message (message/rfc822) holding encrypted content: decrypted, recorded as forwarded."""
        inner = self.parser.parse(normalise_crlf(ent.payload()), ent.depth + 1)
        before = len(self.out.text_parts), len(self.out.attachments)
        self.walk(inner, ctx.inherit())
        decrypted = any(p.encrypted for p in self.out.text_parts[before[0]:]) or any(
            a.encrypted for a in self.out.attachments[before[1]:])
        if decrypted:
            author = decode_header_value(str(inner.headers.get("From", "") or ""))
            self.out.forwarded_from.append(author[:254])
            self.out.notes.append(f"decrypted a forwarded message from {author[:254]}")
        self.add_attachment(ent, ctx)  # the forwarded message as it came, for the record

    def encrypted(self, ent: Entity, ctx: _Ctx) -> None:
        problem = pgpmime_encrypted_problem(ent)
        if problem:
            self.out.errors.append(f"broken PGP/MIME encrypted structure: {problem}")
            for child in ent.children:
                self.add_attachment(child, ctx)
            return
        self.decrypt_payload(ent.children[1], ctx)

    def count_decryption(self) -> None:
        self.decryptions += 1
        if self.decryptions > MAX_DECRYPTIONS:
            raise LimitExceeded(f"more than {MAX_DECRYPTIONS} encrypted parts")

    def decrypt_payload(self, part: Entity, ctx: _Ctx) -> None:
        self.count_decryption()
        self.out.encrypted_seen = True
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
        if part.depth <= 1:  # the message's own encryption, not one wrapped by a list or forwarded
            self.collect_protected_headers(entity)
        before = len(self.out.text_parts)
        self.walk(entity, _Ctx(True, sig, top_of_decrypted=True))
        if not any(p.encrypted and p.text.strip() for p in self.out.text_parts[before:]):
            self.fallback_text(entity, _Ctx(True, sig))

    def fallback_text(self, entity: Entity, ctx: _Ctx) -> None:
        """A decryption that succeeded yields text: any text part, else the HTML converted to text."""
        leaves = [e for e in _leaves(entity) if e.ctype in ("text/plain", "text/html")
                  and e.headers.get_content_disposition() != "attachment"]
        for leaf in sorted(leaves, key=lambda e: e.ctype != "text/plain"):
            text = leaf.text() if leaf.ctype == "text/plain" else html_to_text(leaf.text())
            if text.strip():
                self.out.notes.append(f"decrypted payload: text taken from {leaf.ctype}")
                self.add_text(text, ctx, leaf.ctype)
                return

    def collect_protected_headers(self, entity: Entity) -> None:
        """Protected headers (draft-autocrypt-lamps) only from the top part of the payload marked ``protected-headers="v1"``."""
        source = entity
        if entity.ctype == "multipart/signed" and entity.children:
            source = entity.children[0]
        if (source.param("protected-headers") or "").lower() != "v1":
            return
        for name in PROTECTED_HEADER_NAMES:
            value = source.headers.get(name)
            if value is not None and name not in self.out.protected_headers:
                self.out.protected_headers[name] = decode_header_value(value)

    def signed(self, ent: Entity, ctx: _Ctx) -> None:
        problem = pgpmime_signed_problem(ent)
        if problem:
            self.out.errors.append(f"broken PGP/MIME signed structure: {problem}")
            for child in ent.children:
                if child.ctype != "application/pgp-signature":
                    self.walk(child, ctx.inherit())
            return
        first, sig_part = ent.children
        result = self.gpg.verify_detached(first.raw, sig_part.payload())
        if not result.valid:
            self.out.errors.append(f"signature not valid: {result.reason}")
        self.walk(first, _Ctx(ctx.encrypted, result, ctx.top_of_decrypted))

    def text(self, ent: Entity, ctx: _Ctx) -> None:
        if ent.param("protected-headers") and ctx.encrypted and ctx.legacy_display_slot:
            self.out.notes.append("skipped protected-headers legacy display part")
            return
        text = ent.text().replace("\xa0", " ")
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
            self.add_text(segment.strip("\r\n"), ctx.inherit())

    def inline_encrypted(self, block: str, ctx: _Ctx) -> None:
        self.count_decryption()
        self.out.encrypted_seen = True
        result = self.gpg.decrypt(clean_armor(block).encode("utf-8", errors="replace"))
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


def _finish_flags(out: Unwrapped) -> None:
    """Compute partly_encrypted/partly_signed from the per-part flags."""
    items = [(p.encrypted, p.signed, bool(p.text.strip())) for p in out.text_parts]
    items += [(a.encrypted, a.signed, bool(a.data)) for a in out.attachments]
    content = [(enc, sig) for enc, sig, nonempty in items if nonempty]
    if any(enc for enc, _ in content) and not all(enc for enc, _ in content):
        out.partly_encrypted = True
    if any(sig for _, sig in content) and not all(sig for _, sig in content):
        out.partly_signed = True


def unwrap(raw: bytes, gpg: OpenPGP, *, limits: ParsingConfig) -> Unwrapped:
    """Decrypt/verify a received message given as raw bytes.  Never raises on bad input.

    *limits* bounds the MIME structure (``max_parts`` entities in all, decrypted
    payloads included, nested at most ``max_depth`` deep).
    """
    data = normalise_message(raw)
    out = Unwrapped(raw=data)
    walker = _Walker(gpg, out, limits)
    try:
        top = walker.parser.parse(data, 0)
        keys, problems = autocrypt_keys(top.headers)
        out.keys_found.extend(keys)
        out.errors.extend(problems)
        walker.walk(top, _Ctx())
    except LimitExceeded as exc:
        out.errors.append(f"message too complex: {exc}")
    except RecursionError:
        out.errors.append("message too complex: recursion limit")
    except (email.errors.MessageError, ValueError, LookupError, UnicodeError) as exc:
        out.errors.append(f"malformed message: {exc}")
    _finish_flags(out)
    return out
