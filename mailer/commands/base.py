"""What every command is made of: the context it may touch, the effects it returns, argument checks.

A command validates its arguments, changes the report in the caller's
transaction, and returns its result line; mail it wants sent is described as
typed :data:`Effect` values that the caller applies once every command of the
message succeeded (``mailer.maintainers``).
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from sqlalchemy.orm import Session

from mailer import states
from mailer.config import Config, Maintainer
from mailer.errors import MailerError
from mailer.models import Event, Report
from mailer.text import CONTROL, normalise_address


class CommandError(MailerError):
    """A command that cannot run; the reason goes into the transcript."""


# ---------------------------------------------------------------------- effects


@dataclass(frozen=True)
class ReporterStatus:
    """Tell the reporter about a change of their report (reasons only when it may be said)."""

    change: str
    reason: str | None = None
    disclose_at: datetime | None = None


@dataclass(frozen=True)
class ReporterReply:
    """Send the maintainer's free text to the reporter (``unencrypted``: the maintainer chose clear text)."""

    text: str
    unencrypted: bool = False


@dataclass(frozen=True)
class LeakAlert:
    """Every maintainer and every embargo member hears what leaked and to whom."""

    who: str
    what: str


@dataclass(frozen=True)
class MembersTold:
    """Each embargo member gets this mail, encrypted to their key (nothing without one)."""

    subject: str
    template: str
    context: dict[str, Any]


@dataclass(frozen=True)
class MaintainersTold:
    """The incident manager (or every maintainer) gets this mail, encrypted to their key."""

    subject: str
    template: str
    context: dict[str, Any]


Effect = ReporterStatus | ReporterReply | LeakAlert | MembersTold | MaintainersTold


class CommandServices(Protocol):
    """What commands may ask of the service beyond the database (keys, the schedule)."""

    def member_key_problem(self, address: str) -> str | None:
        """Why mail to this embargo member cannot be encrypted, or None."""
        ...

    def import_keys(self, address: str) -> str:
        """Import the keys attached to the command mail for ``address``; a line for the transcript."""
        ...

    def reporter_key_problem(self, report: Report) -> str | None:
        """Why mail to the reporter cannot be encrypted, or None."""
        ...

    def schedule_lines(self, report: Report) -> list[str]:
        """The report's deadlines and planned mail, one line each."""
        ...

    def next_deadline(self, report: Report) -> str:
        """The report's next deadline or planned mail, in one line ('' when none)."""
        ...


# ---------------------------------------------------------------------- context


@dataclass(frozen=True)
class Invocation:
    name: str
    args: str
    line: str


@dataclass
class CommandContext:
    """What a command may touch. ``effects`` collects mail to send once every command succeeded."""

    session: Session
    config: Config
    actor: Maintainer
    fingerprint: str
    now: datetime
    report: Report | None
    message_text: str
    inbound_id: int | None
    services: CommandServices
    effects: list[Effect] = field(default_factory=list)
    output: list[str] = field(default_factory=list)

    def need_report(self) -> Report:
        if self.report is None:
            raise CommandError("no report named: add a line `#report SEC-…` to the signed text")
        return self.report

    def event(self, kind: str, **detail: Any) -> None:
        self.session.add(Event(report=self.report, kind=kind, actor=self.fingerprint, detail=detail,
                               inbound_id=self.inbound_id, at=self.now))


class Command:
    """A command: ``#name argument_description`` — description. ``changes`` is False for read-only ones."""

    name = ""
    argument_description = ""
    description = ""
    changes = True

    def run(self, ctx: CommandContext, args: str) -> str:
        raise NotImplementedError


# ---------------------------------------------------------------------- argument checks


def clean_arg(value: str, what: str, limit: int = 500) -> str:
    if CONTROL.search(value):
        raise CommandError(f"{what} contains control characters or line separators")
    value = value.strip()
    if not value:
        raise CommandError(f"{what} is missing")
    if len(value) > limit:
        raise CommandError(f"{what} is longer than {limit} characters")
    return value


def _scripts(text: str) -> set[str]:
    return {unicodedata.name(ch, "UNKNOWN").split()[0] for ch in text if ch.isalpha()}


def clean_address(value: str) -> str:
    value = clean_arg(value, "address", 254)
    for part in value.rpartition("@")[::2]:
        if len(_scripts(part)) > 1:
            raise CommandError(f"address {value!r} mixes scripts ({', '.join(sorted(_scripts(part)))}): "
                               "refused as a possible look-alike")
    try:
        return normalise_address(value).lower()
    except ValueError as exc:
        raise CommandError(f"not a valid address: {exc}") from None


def transition(ctx: CommandContext, action: str, **detail: Any) -> str:
    """Move the report through the state machine; the transcript line says from where to where."""
    report = ctx.need_report()
    try:
        old, new = states.apply(report, action)
    except states.InvalidTransition as exc:
        raise CommandError(str(exc)) from None
    report.updated_at = ctx.now
    ctx.event(f"state.{action}", old=old, new=new, **detail)
    return f"{report.tracking_id}: {old} → {new}"


def split_flags(args: str, *known: str) -> tuple[str, set[str]]:
    """``args`` without the ``--flag`` words it contains, and those flags (unknown ones are an error)."""
    words, flags = [], set()
    for word in args.split():
        if word.startswith("--"):
            if word not in known:
                raise CommandError(f"unknown option {word} (known: {', '.join(known) or 'none'})")
            flags.add(word)
        else:
            words.append(word)
    return " ".join(words), flags


def check_supported(ctx: CommandContext, version: str, flags: set[str]) -> str | None:
    """A version outside ``policy.supported_versions`` is refused unless ``--unsupported``; returns a note."""
    lines = ctx.config.policy.supported_versions
    if not lines or any(version == line or version.startswith(line + ".") for line in lines):
        return None
    if "--unsupported" in flags:
        return f"note: {version} is outside the supported versions ({', '.join(lines)}), as --unsupported says"
    raise CommandError(f"{version} is not in a supported version line ({', '.join(lines)}); "
                       "add --unsupported if this fix is meant for it")
