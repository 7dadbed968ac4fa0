"""Who may run commands: only text gpg verified, signed by one key pinned to a maintainer.

From, Reply-To, Sender and display names authorise nothing (Python 3.11 reads
``From: boss@corp <eve@evil>`` as ``boss@corp``). A command message is
honoured when **all** of its text is covered by exactly one valid signature
whose primary-key fingerprint belongs to a maintainer in the configuration,
the signature is younger than ``commands.max_signature_age_hours``, and the
same signed text was not applied before (replay).

The report a command message acts on must be named *inside the signed
text*: a ``#report SEC-…`` line or the tracking id anywhere in the signed
text (a reply quoting our notice carries it), or the protected Subject of an
encrypted message. The unsigned outer Subject and In-Reply-To only locate
the report; if they point elsewhere the message is refused. A signature made
for one report therefore cannot drive another.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from mailer.config import Config, Maintainer
from mailer.models import CommandSignature
from mailer.pgpmime import Unwrapped


@dataclass(frozen=True)
class Authenticated:
    maintainer: Maintainer
    fingerprint: str
    text: str
    digest: str


@dataclass(frozen=True)
class Refused:
    reason: str


def maintainer_by_fingerprint(config: Config, fingerprint: str | None) -> Maintainer | None:
    return next((m for m in config.maintainers if fingerprint and m.fingerprint == fingerprint), None)


def maintainer_by_address(config: Config, *addresses: str) -> Maintainer | None:
    wanted = {a.lower() for a in addresses if a}
    return next((m for m in config.maintainers if m.address in wanted), None)


def authenticate(pgp: Unwrapped | None, config: Config, session: Session, now: datetime) -> Authenticated | Refused:
    """Decide whether the message's commands may run; the refusal says why in words a maintainer understands."""
    if pgp is None or not pgp.text_parts:
        return Refused("the message is not signed")
    parts = [p for p in pgp.text_parts if p.text.strip()]
    if not any(p.signed for p in parts):
        return Refused("the message is not signed")
    if any(not p.signed for p in parts) or pgp.partly_signed:
        return Refused("there is text outside the signed part")
    invalid = next((p for p in parts if not p.signature_valid), None)
    if invalid is not None:
        return Refused(f"the signature is not valid: {invalid.signature_reason}")
    signers = {p.signer_fpr for p in parts}
    if len(signers) != 1:
        return Refused("the parts are signed by different keys")
    fingerprint = signers.pop() or ""
    maintainer = maintainer_by_fingerprint(config, fingerprint)
    if maintainer is None:
        return Refused(f"the signing key {fingerprint} is not a maintainer's key")
    created = min((p.signature_created or 0) for p in parts)
    max_age = timedelta(hours=config.commands.max_signature_age_hours)
    if not created or now - datetime.fromtimestamp(created, UTC) > max_age:
        return Refused(f"the signature is older than {config.commands.max_signature_age_hours:g} hours")
    text = "\n".join(p.text for p in parts)
    digest = hashlib.sha256(f"{fingerprint}\n{created}\n{text}".encode("utf-8", "surrogatepass")).hexdigest()
    if session.scalar(select(CommandSignature.id).where(CommandSignature.digest == digest)) is not None:
        return Refused("this signed message was already applied (replayed)")
    return Authenticated(maintainer, fingerprint, text, digest)
