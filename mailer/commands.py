"""The maintainers' command language: ``#name arguments`` lines at the top of a signed mail.

Commands are the lines starting with ``#`` at the top of the text, up to the
first line that is not one; what follows (minus quoted ``>`` lines and the
signature) is the free text, sent to the reporter by ``#reply``. Each command
is a small object with ``name``, ``argument_description``, ``description``
and ``run``; ``run`` validates its arguments and raises :class:`CommandError`
with a reason, or returns what it did. The caller applies all commands of a
message in one savepoint: if any fails, none takes effect.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from cvss import CVSS3, CVSS4
from cvss.exceptions import CVSSError
from email_validator import EmailNotValidError, validate_email
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from mailer import states, tracking
from mailer.config import Config, Maintainer
from mailer.errors import MailerError
from mailer.models import EmbargoMember, Event, Report
from mailer.schedule import BadDate, parse_when

_LINE_SEPARATORS = re.compile(r"[\x00-\x1f\x7f\u0085\u2028\u2029]")
_COMMAND_LINE = re.compile(r"^#([a-z]+)(?:[ \t]+(.*))?$")
_CVE = re.compile(r"^CVE-\d{4}-\d{4,7}$")
_URL = re.compile(r"^https://[^\s<>\"']{3,480}$")
_VERSION = re.compile(r"^[\w.+\-~]{1,100}$")
LIST_LIMIT = 200


class CommandError(MailerError):
    """A command that cannot run; the reason goes into the transcript."""


@dataclass(frozen=True)
class Invocation:
    name: str
    args: str
    line: str


@dataclass
class CommandContext:
    """What a command may touch. ``notify`` collects mail to send once every command succeeded."""

    session: Session
    config: Config
    actor: Maintainer
    fingerprint: str
    now: datetime
    report: Report | None
    message_text: str
    inbound_id: int | None
    notify: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    output: list[str] = field(default_factory=list)

    def need_report(self) -> Report:
        if self.report is None:
            raise CommandError("no report named: add a line `#report SEC-…` to the signed text")
        return self.report

    def event(self, kind: str, **detail: Any) -> None:
        self.session.add(
            Event(report=self.report, kind=kind, actor=self.fingerprint, detail=detail, inbound_id=self.inbound_id, at=self.now)
        )


def parse(text: str) -> tuple[list[Invocation], str]:
    """Split the signed text into command lines and the free text after them."""
    lines = text.replace("\r\n", "\n").split("\n")
    while lines and not lines[0].strip():
        lines.pop(0)
    commands: list[Invocation] = []
    while lines and lines[0].startswith("#"):
        line = lines.pop(0).rstrip()
        match = _COMMAND_LINE.match(line)
        name, args = (match[1], (match[2] or "").strip()) if match else (line[1:].split(" ", 1)[0], "")
        commands.append(Invocation(name, args, line))
    free: list[str] = []
    for line in lines:
        if line.rstrip() == "--":
            break
        if not line.startswith(">"):
            free.append(line)
    return commands, "\n".join(free).strip()


def looks_like_commands(text: str) -> bool:
    """True when the first non-blank line is a known command (so a reporter's '#1 bug' is not one)."""
    for line in text.splitlines():
        if line.strip():
            match = _COMMAND_LINE.match(line.rstrip())
            return bool(match and match[1] in REGISTRY)
    return False


def clean_arg(value: str, what: str, limit: int = 500) -> str:
    if _LINE_SEPARATORS.search(value):
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
            raise CommandError(f"address {value!r} mixes scripts ({', '.join(sorted(_scripts(part)))}): refused as a possible look-alike")
    try:
        return validate_email(value, check_deliverability=False, test_environment=True).normalized.lower()
    except EmailNotValidError as exc:
        raise CommandError(f"not a valid address: {exc}") from None


class Command:
    name = ""
    argument_description = ""
    description = ""

    def run(self, ctx: CommandContext, args: str) -> str:
        raise NotImplementedError


def _transition(ctx: CommandContext, action: str, **detail: Any) -> str:
    report = ctx.need_report()
    try:
        old, new = states.apply(report, action)
    except states.InvalidTransition as exc:
        raise CommandError(str(exc)) from None
    report.updated_at = ctx.now
    ctx.event(f"state.{action}", old=old, new=new, **detail)
    return f"{report.tracking_id}: {old} → {new}"


class Accept(Command):
    name, description = "accept", "accept the report as a vulnerability (investigation goes on in private)"

    def run(self, ctx: CommandContext, args: str) -> str:
        result = _transition(ctx, "accept")
        ctx.notify.append(("status", {"change": "accepted"}))
        return result


class Reject(Command):
    name, argument_description, description = "reject", "REASON", "reject the report; the reason is told to the reporter"

    def run(self, ctx: CommandContext, args: str) -> str:
        reason = clean_arg(args, "reason")
        result = _transition(ctx, "reject", reason=reason)
        ctx.notify.append(("status", {"change": "rejected", "reason": reason}))
        return result


class Duplicate(Command):
    name, argument_description, description = "duplicate", "SEC-…", "mark as a duplicate of another report"

    def run(self, ctx: CommandContext, args: str) -> str:
        report = ctx.need_report()
        other = tracking.find(ctx.config.service.tracking_prefix, clean_arg(args, "tracking id", 32))
        if other is None or other == report.tracking_id:
            raise CommandError(f"expected the tracking id of another report, got {args!r}")
        if ctx.session.scalar(select(Report.id).where(Report.tracking_id == other)) is None:
            raise CommandError(f"no report {other}")
        result = _transition(ctx, "duplicate", of=other)
        report.duplicate_of = other
        ctx.notify.append(("status", {"change": "duplicate", "reason": f"a duplicate of {other}"}))
        return result


class Reopen(Command):
    name, description = "reopen", "reopen a rejected, duplicate or closed report"

    def run(self, ctx: CommandContext, args: str) -> str:
        ctx.need_report().duplicate_of = None
        return _transition(ctx, "reopen")


class Close(Command):
    name, description = "close", "close a published, rejected or duplicate report"

    def run(self, ctx: CommandContext, args: str) -> str:
        return _transition(ctx, "close")


class Assign(Command):
    name, argument_description, description = "assign", "ADDRESS|me", "make a maintainer the incident manager"

    def run(self, ctx: CommandContext, args: str) -> str:
        report = ctx.need_report()
        address = ctx.actor.address if args.strip().lower() == "me" else clean_address(args)
        if address not in {m.address for m in ctx.config.maintainers}:
            raise CommandError(f"{address} is not a maintainer")
        report.incident_manager = address
        ctx.event("report.assigned", incident_manager=address)
        return f"incident manager: {address}"


class Severity(Command):
    name, argument_description, description = "severity", "critical|high|medium|low", "set the severity"

    def run(self, ctx: CommandContext, args: str) -> str:
        value = args.strip().lower()
        if value not in ("critical", "high", "medium", "low"):
            raise CommandError(f"expected critical, high, medium or low, got {args!r}")
        ctx.need_report().severity = value
        ctx.event("report.severity", severity=value)
        return f"severity: {value}"


class Cvss(Command):
    name, argument_description, description = "cvss", "VECTOR", "set the CVSS 3.1 or 4.0 vector; the score is computed"

    def run(self, ctx: CommandContext, args: str) -> str:
        vector = clean_arg(args, "vector", 255)
        try:
            if vector.startswith("CVSS:4.0/"):
                c4 = CVSS4(vector)
                score, label = float(c4.base_score), str(c4.severity)
            elif vector.startswith(("CVSS:3.1/", "CVSS:3.0/")):
                c3 = CVSS3(vector)
                score, label = float(c3.scores()[0]), str(c3.severities()[0])
            else:
                raise CommandError("expected a vector starting with CVSS:3.1/ or CVSS:4.0/")
        except CVSSError as exc:
            raise CommandError(f"invalid CVSS vector: {exc}") from None
        report = ctx.need_report()
        report.cvss_vector, report.cvss_score = vector, score
        ctx.event("report.cvss", vector=vector, score=score)
        return f"CVSS {score} ({label})"


class Cve(Command):
    name, argument_description, description = "cve", "CVE-YYYY-NNNN | requested [NOTE]", "record the CVE id, or that one was requested"

    def run(self, ctx: CommandContext, args: str) -> str:
        report = ctx.need_report()
        value = clean_arg(args, "CVE")
        if value.lower().startswith("requested"):
            report.cve_requested_at = ctx.now
            ctx.event("report.cve_requested", note=value[len("requested"):].strip())
            return "CVE requested (you will be reminded until it is recorded)"
        if not _CVE.match(value.upper()):
            raise CommandError(f"expected CVE-YYYY-NNNN, got {value!r}")
        report.cve = value.upper()
        ctx.event("report.cve", cve=report.cve)
        return f"CVE: {report.cve}"


class Affected(Command):
    name, argument_description, description = "affected", "VERSIONS", "record the affected versions"

    def run(self, ctx: CommandContext, args: str) -> str:
        ctx.need_report().affected = value = clean_arg(args, "versions")
        ctx.event("report.affected", versions=value)
        return f"affected: {value}"


class Fixed(Command):
    name, argument_description, description = "fixed", "VERSION", "record the version with the fix"

    def run(self, ctx: CommandContext, args: str) -> str:
        value = clean_arg(args, "version", 100)
        if not _VERSION.match(value):
            raise CommandError(f"expected a version like 1.2.3, got {value!r}")
        ctx.need_report().fixed = value
        ctx.event("report.fixed", version=value)
        return f"fixed in: {value}"


class Advisory(Command):
    name, argument_description, description = "advisory", "URL", "record the advisory URL (https)"

    def run(self, ctx: CommandContext, args: str) -> str:
        url = clean_arg(args, "URL")
        if not _URL.match(url):
            raise CommandError(f"expected an https:// URL, got {url!r}")
        ctx.need_report().advisory_url = url
        ctx.event("report.advisory", url=url)
        return f"advisory: {url}"


class Release(Command):
    name, argument_description, description = "release", "VERSION URL", "the fixed release is out: the report is published"

    def run(self, ctx: CommandContext, args: str) -> str:
        version, _, url = clean_arg(args, "release").partition(" ")
        url = url.strip()
        if not _VERSION.match(version) or not _URL.match(url):
            raise CommandError("expected `#release VERSION https://…`")
        report = ctx.need_report()
        result = _transition(ctx, "release", version=version, url=url)
        report.release_version, report.release_url = version, url
        ctx.notify.append(("status", {"change": "published", "reason": f"fixed in {version}: {url}"}))
        return result


class Disclose(Command):
    name = "disclose"
    argument_description = "YYYY-MM-DD[ HH:MM TZ] | +N"
    description = "set the public disclosure date (+N: N workdays from today)"

    def run(self, ctx: CommandContext, args: str) -> str:
        text = args.strip() or f"+{ctx.config.schedule.disclosure_workdays}"
        try:
            when = parse_when(clean_arg(text, "date", 64), now=ctx.now, config=ctx.config.schedule)
        except BadDate as exc:
            raise CommandError(str(exc)) from None
        report = ctx.need_report()
        result = _transition(ctx, "disclose", disclose_at=when.isoformat())
        report.disclose_at = when
        ctx.notify.append(("status", {"change": "disclosure date set", "disclose_at": when}))
        return f"{result}; disclosure {when:%Y-%m-%d %H:%M %Z}"


class Extend(Command):
    name, argument_description, description = "extend", "DATE REASON", "move the disclosure date later; the reporter is told why"

    def run(self, ctx: CommandContext, args: str) -> str:
        date_text, _, reason = clean_arg(args, "date and reason").partition(" ")
        reason = clean_arg(reason, "reason")
        report = ctx.need_report()
        try:
            when = parse_when(date_text, now=ctx.now, config=ctx.config.schedule)
        except BadDate as exc:
            raise CommandError(str(exc)) from None
        if report.disclose_at is not None and when <= report.disclose_at:
            raise CommandError(f"{date_text} is not later than the current date {report.disclose_at:%Y-%m-%d}")
        _transition(ctx, "extend", disclose_at=when.isoformat(), reason=reason)
        report.disclose_at = when
        ctx.notify.append(("status", {"change": "disclosure extended", "disclose_at": when, "reason": reason}))
        return f"disclosure extended to {when:%Y-%m-%d %H:%M %Z}"


class Embargo(Command):
    name, argument_description, description = "embargo", "add ADDRESS | remove ADDRESS | list", "manage who gets details under embargo"

    def run(self, ctx: CommandContext, args: str) -> str:
        report = ctx.need_report()
        action, _, rest = args.strip().partition(" ")
        members = list(ctx.session.scalars(select(EmbargoMember).where(EmbargoMember.report_id == report.id)))
        if action == "list":
            return "embargo list: " + (", ".join(m.address for m in members) or "(empty)")
        address = clean_address(rest)
        current = {m.address: m for m in members}
        if action == "add":
            if address in current:
                raise CommandError(f"{address} is already on the embargo list")
            ctx.session.add(EmbargoMember(report_id=report.id, address=address, added_by=ctx.fingerprint, added_at=ctx.now))
        elif action == "remove":
            if address not in current:
                raise CommandError(f"{address} is not on the embargo list")
            ctx.session.delete(current[address])
        else:
            raise CommandError("expected `#embargo add ADDRESS`, `#embargo remove ADDRESS` or `#embargo list`")
        ctx.event(f"embargo.{action}", address=address)
        return f"embargo {action}: {address}"


class Reply(Command):
    name, description = "reply", "send the free text after the commands to the reporter (encrypted when possible)"

    def run(self, ctx: CommandContext, args: str) -> str:
        ctx.need_report()
        text = ctx.message_text
        if not text:
            raise CommandError("there is no text after the commands to send")
        ctx.notify.append(("reply", {"text": text}))
        ctx.event("reply.sent", length=len(text))
        return "reply queued to the reporter"


class Note(Command):
    name, argument_description, description = "note", "TEXT", "an internal note in the report's log"

    def run(self, ctx: CommandContext, args: str) -> str:
        ctx.need_report()
        ctx.event("note", text=clean_arg(args, "note", 2000))
        return "note recorded"


class Leak(Command):
    name, argument_description, description = "leak", "TEXT", "record a leak under the embargo policy; every maintainer is alerted"

    def run(self, ctx: CommandContext, args: str) -> str:
        text = clean_arg(args, "leak description", 2000)
        ctx.need_report()
        ctx.event("leak", text=text)
        ctx.notify.append(("leak", {"text": text}))
        return "leak recorded; all maintainers alerted"


class Report_(Command):
    name, argument_description, description = "report", "SEC-…", "name the report these commands act on"

    def run(self, ctx: CommandContext, args: str) -> str:
        return f"report {ctx.need_report().tracking_id}"


class Status(Command):
    name, description = "status", "the report's current summary"

    def run(self, ctx: CommandContext, args: str) -> str:
        ctx.need_report()
        return "summary below"


class List_(Command):
    name, argument_description, description = "list", "[open|all]", "list reports"

    def run(self, ctx: CommandContext, args: str) -> str:
        which = args.strip().lower() or "open"
        if which not in ("open", "all"):
            raise CommandError("expected `#list open` or `#list all`")
        query = select(Report.tracking_id, Report.state, Report.severity, Report.disclose_at)
        count = select(func.count(Report.id))
        if which == "open":
            open_states = [s.value for s in states.OPEN]
            query, count = query.where(Report.state.in_(open_states)), count.where(Report.state.in_(open_states))
        total = ctx.session.scalar(count) or 0
        rows = ctx.session.execute(query.order_by(Report.id.desc()).limit(LIST_LIMIT)).all()
        lines = [f"  {t}  {s:<12} {sev or '-':<8} {d:%Y-%m-%d}" if d else f"  {t}  {s:<12} {sev or '-':<8}" for t, s, sev, d in rows]
        more = f"\n  … and {total - len(rows)} more" if total > len(rows) else ""
        ctx.output.append(f"{which} reports ({total}):\n" + "\n".join(lines) + more)
        return f"{total} {which} report(s)"


class Help(Command):
    name, description = "help", "this list"

    def run(self, ctx: CommandContext, args: str) -> str:
        ctx.output.append(help_text())
        return "commands listed below"


REGISTRY: dict[str, Command] = {
    c.name: c
    for c in (
        Accept(), Reject(), Duplicate(), Reopen(), Close(), Assign(), Severity(), Cvss(), Cve(), Affected(), Fixed(),
        Advisory(), Release(), Disclose(), Extend(), Embargo(), Reply(), Note(), Leak(), Report_(), Status(), List_(), Help(),
    )
}
NEEDS_NO_REPORT = frozenset({"list", "help"})


def help_text() -> str:
    width = max(len(f"#{c.name} {c.argument_description}") for c in REGISTRY.values())
    return "\n".join(f"  {f'#{c.name} {c.argument_description}'.ljust(width)}  {c.description}" for c in REGISTRY.values())


@dataclass(frozen=True)
class Outcome:
    line: str
    ok: bool
    message: str


def apply_all(ctx: CommandContext, invocations: list[Invocation]) -> list[Outcome]:
    """Run every command in one savepoint; if one fails, roll all of them back."""
    outcomes: list[Outcome] = []
    failed = False
    savepoint = ctx.session.begin_nested()
    for invocation in invocations:
        if failed:
            outcomes.append(Outcome(invocation.line, False, "not run: an earlier command failed"))
            continue
        command = REGISTRY.get(invocation.name)
        try:
            if command is None:
                raise CommandError(f"unknown command #{invocation.name} (see #help)")
            message = command.run(ctx, invocation.args)
            ctx.session.flush()
            outcomes.append(Outcome(invocation.line, True, message))
        except CommandError as exc:
            failed = True
            outcomes.append(Outcome(invocation.line, False, str(exc)))
    if failed:
        savepoint.rollback()
        ctx.notify.clear()
        ctx.output.clear()
        outcomes = [Outcome(o.line, False, o.message if not o.ok else "rolled back: another command failed") for o in outcomes]
    else:
        savepoint.commit()
    return outcomes
