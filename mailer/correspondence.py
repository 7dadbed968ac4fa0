"""Who receives what, and whether it is encrypted: the one place outgoing mail is addressed.

Every part of the service that writes to a person (the pipeline, the
commands, the reminders, the schedule) goes through :class:`Correspondence`,
so the rules are written once:

- **Maintainers** get report content only encrypted to their pinned key. A
  maintainer whose key is missing or unusable gets the mail without details
  (``detailed=False`` in the template context), unless
  ``gnupg.allow_cleartext_to_maintainers`` is set; the problem is recorded.
- **The reporter** gets mail encrypted to the key they sent with the report,
  when there is one. A report that arrived encrypted gets no details in clear
  mail (``private=False`` in the template context).
- **Embargo members** get mail only encrypted to their key in the service
  keyring: without a usable key, nothing is sent (fail closed).
- **Announce lists** get public mail, signed and never encrypted.

Each method fills in ``Outgoing.to`` and the encryption fields; callers pass
the rest (``to=""``).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, replace
from datetime import datetime
from email.utils import parseaddr

from sqlalchemy import inspect, select
from sqlalchemy.orm import Session

from mailer.config import Config, Maintainer
from mailer.models import Event, OutboxMessage, Report, ReportKey
from mailer.openpgp import CryptoError, OpenPGP
from mailer.outgoing import Outgoing, Postman
from mailer.text import valid_address

log = logging.getLogger(__name__)

#: (address, problem, content included) already warned about in this process: each notice is an audit event
#: (``notice.without_encryption``), the log says it once, not for every report of a burst
_warned: set[tuple[str, str, bool]] = set()
_warned_lock = threading.Lock()


def _warn_once(address: str, problem: str, detailed: bool) -> None:
    with _warned_lock:
        first = (address, problem, detailed) not in _warned
        _warned.add((address, problem, detailed))
    log.log(logging.WARNING if first else logging.DEBUG, "mail to %s %s report content: %s%s", address,
            "carries" if detailed else "omits", problem, "" if first else " (again)")


def maintainer_key_problem(gpg: OpenPGP, fingerprint: str) -> str | None:
    """Why we cannot encrypt to this maintainer's pinned key, or None."""
    if not fingerprint:
        return "no fingerprint configured"
    info = gpg.key_info(fingerprint)
    if info is None:
        return f"key {fingerprint} is not in the keyring (mailer keys import FILE)"
    if info.problem:
        return info.problem
    if not info.can_encrypt:
        return f"key {fingerprint} has no usable encryption subkey"
    return None


def notice_recipients(config: Config, report: Report | None) -> list[Maintainer]:
    """All maintainers, or only the incident manager once assigned when ``commands.notify`` says so."""
    if report is not None and config.commands.notify == "incident_manager" and report.incident_manager:
        chosen = [m for m in config.maintainers if m.address == report.incident_manager]
        if chosen:
            return chosen
    return list(config.maintainers)


def reporter_key(session: Session, report: Report) -> bytes | None:
    """The newest key the reporter sent for this report, if any."""
    if not inspect(report).has_identity:  # filed in this transaction, not flushed: its keys were added with it
        added = [item for item in session.new if isinstance(item, ReportKey) and item.report is report]
        return added[-1].key_blob if added else None
    query = select(ReportKey.key_blob).where(ReportKey.report_id == report.id).order_by(ReportKey.id.desc()).limit(1)
    return session.scalar(query)


@dataclass(frozen=True)
class Delivery:
    """An outgoing mail queued for a person, and whether it is encrypted to them."""

    outbox: OutboxMessage
    encrypted: bool


class Correspondence:
    """Addressing and encryption rules for one transaction (``session``) at one instant (``now``)."""

    def __init__(self, session: Session, config: Config, postman: Postman, gpg: OpenPGP, *,
                 now: datetime, inbound_id: int | None = None) -> None:
        self.session, self.config, self.postman, self.gpg = session, config, postman, gpg
        self.now, self.inbound_id = now, inbound_id

    def _event(self, report: Report | None, kind: str, **detail: object) -> None:
        self.session.add(Event(report=report, kind=kind, detail=detail, inbound_id=self.inbound_id, at=self.now))

    # ----------------------------------------------------------------- maintainers

    def key_problem(self, maintainer: Maintainer) -> str | None:
        return maintainer_key_problem(self.gpg, maintainer.fingerprint)

    def maintainers_for(self, report: Report | None) -> list[Maintainer]:
        return notice_recipients(self.config, report)

    def to_maintainer(self, maintainer: Maintainer, outgoing: Outgoing, *, reply: bool = False) -> OutboxMessage:
        """Encrypted to the pinned key; without a usable key, the mail goes without details (fail closed).

        Notices carry details in clear only when ``gnupg.allow_cleartext_to_maintainers``
        is set, and each unencrypted one is recorded. ``reply=True`` (transcripts,
        refusals: answers to the maintainer's own mail) never carries details in clear.
        """
        problem = self.key_problem(maintainer)
        detailed = problem is None or (not reply and self.config.gnupg.allow_cleartext_to_maintainers)
        mail = replace(
            outgoing, to=maintainer.address,
            context={**outgoing.context, "maintainer": maintainer, "detailed": detailed, "key_problem": problem},
            encrypt_to=(maintainer.fingerprint,) if problem is None else (),
        )
        if problem is not None and not reply:
            _warn_once(maintainer.address, problem, detailed)
            self._event(outgoing.report, "notice.without_encryption", to=maintainer.address,
                        reason=problem, content_included=detailed)
        try:
            return self.postman.enqueue(self.session, mail)
        except CryptoError as exc:  # the key went bad since we looked: fail closed, still tell them
            self._event(outgoing.report, "notice.without_encryption", to=maintainer.address,
                        reason=str(exc), content_included=False)
            context = {**mail.context, "detailed": False, "key_problem": str(exc)}
            return self.postman.enqueue(self.session, replace(mail, context=context, encrypt_to=()))

    def to_maintainers(self, report: Report | None, outgoing: Outgoing, *,
                       exclude: str | None = None, reply: bool = False) -> list[OutboxMessage]:
        """To the incident manager (or every maintainer), each encrypted to their own key."""
        return [
            self.to_maintainer(m, outgoing, reply=reply)
            for m in self.maintainers_for(report)
            if m.address != exclude
        ]

    # ----------------------------------------------------------------- reporter

    def to_reporter(self, report: Report, outgoing: Outgoing, *, what: str,
                    must_encrypt: bool = False) -> Delivery | None:
        """Encrypted to the reporter's own key when they sent one; None when the address cannot receive mail.

        The template context gets ``have_key`` (the mail is encrypted) and
        ``private`` (details may be written: always when encrypted, never in
        clear mail about a report that arrived encrypted). ``what`` names the
        mail in the events recorded (``ack``, ``status``, ``reply``). With
        ``must_encrypt`` nothing is sent unless it can be encrypted.
        """
        if valid_address(report.reporter) is None:
            self._event(report, f"{what}.not_sent", reason=f"reporter address {report.reporter!r} is not deliverable")
            return None
        key_blob = reporter_key(self.session, report)
        clear_ok = not report.flags.get("encrypted")
        if key_blob is None and must_encrypt:
            self._event(report, f"{what}.not_sent", reason="the reporter has sent no OpenPGP key")
            return None
        mail = replace(outgoing, to=report.reporter, key_blob=key_blob, attach_key=key_blob is None, context={
            **outgoing.context, "report": report, "have_key": key_blob is not None,
            "private": key_blob is not None or clear_ok,
        })
        try:
            return Delivery(self.postman.enqueue(self.session, mail), encrypted=key_blob is not None)
        except CryptoError as exc:  # the reporter's key is expired or cannot encrypt
            self._event(report, f"{what}.reporter_key_unusable", reason=str(exc))
            if must_encrypt:
                return None
            mail = replace(mail, key_blob=None, attach_key=True,
                           context={**mail.context, "have_key": False, "private": clear_ok})
            return Delivery(self.postman.enqueue(self.session, mail), encrypted=False)

    # ----------------------------------------------------------------- embargo members, lists

    def member_key(self, address: str) -> str | None:
        """The fingerprint of a usable encryption key in the service keyring for ``address``."""
        wanted = address.lower()
        for info in self.gpg.list_keys():
            if info.problem or not info.can_encrypt:
                continue
            if any(parseaddr(uid)[1].lower() == wanted for uid in info.uids):
                return info.fingerprint
        return None

    def member_key_problem(self, address: str) -> str | None:
        if self.member_key(address) is None:
            return f"no usable OpenPGP key for {address} in the service keyring (mailer keys import FILE)"
        return None

    def to_member(self, address: str, outgoing: Outgoing) -> OutboxMessage | None:
        """Encrypted to the member's key, or nothing at all (fail closed)."""
        fingerprint = self.member_key(address)
        if fingerprint is None:
            self._event(outgoing.report, f"{outgoing.kind.value}.not_sent", to=address,
                        reason="no usable OpenPGP key for this embargo member")
            return None
        try:
            return self.postman.enqueue(self.session, replace(outgoing, to=address, encrypt_to=(fingerprint,)))
        except CryptoError as exc:
            self._event(outgoing.report, f"{outgoing.kind.value}.not_sent", to=address, reason=str(exc))
            return None

    def to_list(self, address: str, outgoing: Outgoing) -> OutboxMessage:
        """Public mail to an announce list: signed, never encrypted, never carrying report details."""
        return self.postman.enqueue(self.session, replace(outgoing, to=address, encrypt_to=(), key_blob=None))
