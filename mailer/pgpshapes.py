"""How real clients shape OpenPGP mail, recognised by content: PGP/MIME problems, Exchange's mangling,
armor inside HTML, encrypted files, Autocrypt headers. Pure helpers of :mod:`mailer.pgpmime`."""

from __future__ import annotations

import base64
import binascii
import html
import re
from email.message import Message

from mailer.mimetree import (
    Entity,
)


def choose_alternative(children: list[Entity]) -> Entity:
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


def pgpmime_encrypted_problem(ent: Entity) -> str | None:
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


def pgpmime_signed_problem(ent: Entity) -> str | None:
    """Why *ent* is not a well-formed RFC 3156 multipart/signed, or ``None``."""
    protocol = (ent.param("protocol") or "").lower()
    if protocol != "application/pgp-signature":
        return f"wrong protocol {protocol!r}"
    if len(ent.children) != 2:
        return f"expected 2 parts, found {len(ent.children)}"
    if ent.children[1].ctype != "application/pgp-signature":
        return f"second part is {ent.children[1].ctype}"
    return None


def exchange_mangled_payload(ent: Entity) -> Entity | None:
    """The encrypted part of Exchange's rewrite of multipart/encrypted, found by content, or ``None``.

    Exchange turns RFC 3156 into multipart/mixed: an empty text part, the ``Version: 1``
    part, then ``encrypted.asc``; some servers also lose the final boundary (an
    extra empty part). It is repaired when a ``Version: 1`` part is followed by an
    armored OpenPGP message and every other part is empty.
    """
    children = ent.children
    for index, control in enumerate(children[:-1]):
        payload = children[index + 1]
        if (control.ctype == "application/pgp-encrypted"
                and re.search(rb"(?m)^Version:\s*1\s*$", control.payload()) is not None
                and b"-----BEGIN PGP MESSAGE-----" in payload.payload()):
            others = [c for i, c in enumerate(children) if i not in (index, index + 1)]
            if all(not c.children and not c.payload().strip() for c in others):
                return payload
            return None
    return None


def is_exchange_mangled(ent: Entity) -> bool:
    """Exchange's rewrite of multipart/encrypted (see :func:`exchange_mangled_payload`)."""
    return exchange_mangled_payload(ent) is not None


_ENCRYPTED_CONTENT = re.compile(rb"-----BEGIN PGP MESSAGE-----|multipart/encrypted", re.I)
_TAGS = re.compile(r"<[^>]*>")
_BLOCK_END = re.compile(r"<\s*(br|/p|/div|/pre|/li|/tr|/h[1-6]|p|div)\b[^>]*>", re.I)
_INVISIBLE = re.compile(r"<\s*(script|style|head)\b.*?<\s*/\s*\1\s*>", re.I | re.S)


def html_to_text(markup: str) -> str:
    """HTML as plain text: line breaks for ``<br>`` and blocks, tags dropped, entities decoded, NBSP as space."""
    text = _INVISIBLE.sub("", markup)
    text = text.replace("\r\n", "\n")
    text = _BLOCK_END.sub("\n", text)
    text = html.unescape(_TAGS.sub("", text)).replace("\xa0", " ").replace("\u200b", "")
    lines = [line.strip() for line in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n")


def clean_armor(block: str) -> str:
    """An armored block as gpg reads it: lines stripped, no blank lines inside the base64 (HTML and clients add them)."""
    lines = [line.strip().replace("\xa0", "") for line in block.replace("\r\n", "\n").split("\n")]
    if not lines or not lines[0].startswith("-----BEGIN PGP"):
        return block
    headers: list[str] = []
    index = 1
    while index < len(lines) and (not lines[index] or re.match(r"^[A-Za-z][A-Za-z-]*: ", lines[index])):
        if lines[index]:
            headers.append(lines[index])
        index += 1
    body = [line for line in lines[index:] if line]
    return "\n".join([lines[0], *headers, "", *body]) + "\n"


def looks_encrypted(data: bytes) -> bool:
    """An OpenPGP message by its content: armored, or binary starting with an encrypted session key packet."""
    head = data[:4096].lstrip()
    if head.startswith(b"-----BEGIN PGP MESSAGE-----"):
        return True
    if not data or not data[0] & 0x80:
        return False
    first = data[0]
    tag = first & 0x3F if first & 0x40 else (first >> 2) & 0x0F
    return tag in (1, 3) and len(data) > 12


def _is_text(data: bytes) -> bool:
    if b"\0" in data[:65536]:
        return False
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _leaves(entity: Entity) -> list[Entity]:
    stack, found = [entity], []
    while stack:
        ent = stack.pop()
        if ent.children:
            stack.extend(reversed(ent.children))
        elif not ent.ctype.startswith("multipart/"):
            found.append(ent)
    return found


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
