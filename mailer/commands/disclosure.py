"""Commands of the disclosure timeline: the date, its extension, the embargo list, leaks, the release."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import datetime, timedelta

from sqlalchemy import select

from mailer.commands.base import (
    Command,
    CommandContext,
    CommandError,
    LeakAlert,
    MembersTold,
    ReporterStatus,
    check_supported,
    clean_address,
    clean_arg,
    split_flags,
    transition,
)
from mailer.commands.details import URL, VERSION
from mailer.models import EmbargoMember, Report
from mailer.schedule import BadDate, check_disclosure, format_local, parse_when

PUBLISH_TOKEN_HOURS = 24


def _when(ctx: CommandContext, text: str, *, force: bool) -> tuple[datetime, list[str]]:
    """A disclosure instant that passes the guards; the notes go into the transcript."""
    try:
        when = parse_when(clean_arg(text, "date", 64), now=ctx.now, config=ctx.config.schedule)
    except BadDate as exc:
        raise CommandError(str(exc)) from None
    report = ctx.need_report()
    check = check_disclosure(when, now=ctx.now, accepted_at=report.accepted_at, config=ctx.config.schedule,
                             lead_workdays=ctx.config.announce.advance_notice_workdays, force=force)
    if not check.ok:
        raise CommandError("; ".join(check.refusals))
    return when, [f"Note: {note}" for note in check.notes]


def _release_missing(report: Report) -> list[str]:
    missing = []
    if not (report.release_version and report.release_url):
        missing.append("#release VERSION URL")
    if not report.advisory_url:
        missing.append("#advisory URL")
    if not (report.severity or report.cvss_score is not None):
        missing.append("#severity or #cvss")
    if not (report.cve or report.cve_none):
        missing.append("#cve CVE-… or #cve none")
    return missing


class Release(Command):
    name, argument_description = "release", "VERSION URL [--unsupported]"
    description = "record the fixed release; the release email goes out at the disclosure instant"

    def run(self, ctx: CommandContext, args: str) -> str:
        text, flags = split_flags(args, "--unsupported")
        version, _, url = clean_arg(text, "release").partition(" ")
        url = url.strip()
        if not VERSION.match(version) or not URL.match(url):
            raise CommandError("expected `#release VERSION https://…`")
        report = ctx.need_report()
        if report.disclose_at is None or report.state not in ("scheduled", "announced"):
            raise CommandError("set the disclosure date first (#disclose DATE): the release email goes out on that date")
        note = check_supported(ctx, version, flags)
        report.release_version, report.release_url = version, url
        report.updated_at = ctx.now
        ctx.event("report.release", version=version, url=url, unsupported=note is not None)
        if note:
            ctx.output.append(note)
        missing = _release_missing(report)
        when = format_local(report.disclose_at, ctx.config.schedule)
        if missing:
            return f"release {version} recorded; the release email still needs: {', '.join(missing)} (due {when})"
        return f"release {version} recorded; the release email goes out {when}"


class Disclose(Command):
    name = "disclose"
    argument_description = "YYYY-MM-DD[ HH:MM TZ] | +N | now [--force]"
    description = "set the public disclosure date (+N: N workdays from today; now: publish at once)"

    def run(self, ctx: CommandContext, args: str) -> str:
        text, flags = split_flags(args, "--force")
        report = ctx.need_report()
        if text.strip().lower() == "now":
            if report.state not in ("scheduled", "announced"):
                raise CommandError("#disclose now needs a scheduled report (set a date with #disclose DATE first)")
            report.disclose_at = report.publish_requested_at = ctx.now
            ctx.event("state.disclose", disclose_at=ctx.now.isoformat(), now=True)
            missing = _release_missing(report)
            if missing:
                return "disclosure now: the release email is HELD until it is complete: " + ", ".join(missing)
            return "disclosure now: the release email goes out at once"
        when, notes = _when(ctx, text or f"+{ctx.config.schedule.disclosure_workdays}", force="--force" in flags)
        result = transition(ctx, "disclose", disclose_at=when.isoformat())
        report.disclose_at = when
        ctx.output.extend(notes)
        ctx.effects.append(ReporterStatus("disclosure date set", disclose_at=when))
        return f"{result}; disclosure {format_local(when, ctx.config.schedule)}"


class Extend(Command):
    name, argument_description = "extend", "DATE REASON [--force]"
    description = "move the disclosure date later; the reporter and the embargo list are told why"

    def run(self, ctx: CommandContext, args: str) -> str:
        text, flags = split_flags(args, "--force")
        date_text, _, reason = clean_arg(text, "date and reason").partition(" ")
        reason = clean_arg(reason, "reason")
        report = ctx.need_report()
        when, notes = _when(ctx, date_text, force="--force" in flags)
        if report.disclose_at is not None and when <= report.disclose_at:
            raise CommandError(f"{date_text} is not later than the current date {report.disclose_at:%Y-%m-%d}")
        transition(ctx, "extend", disclose_at=when.isoformat(), reason=reason, forced="--force" in flags)
        report.disclose_at = when
        ctx.output.extend(notes)
        ctx.effects.append(ReporterStatus("disclosure extended", reason=reason, disclose_at=when))
        shown = format_local(when, ctx.config.schedule)
        ctx.effects.append(MembersTold(f"[{report.tracking_id}] Embargo extended", "embargo_extended.txt.j2",
                                       {"report": report, "reason": reason, "disclosure": shown}))
        return f"disclosure extended to {shown}"


class Embargo(Command):
    name, argument_description = "embargo", "add ADDRESS | remove ADDRESS | list"
    description = "manage who gets details under embargo (attach the member's key to #embargo add)"

    def run(self, ctx: CommandContext, args: str) -> str:
        report = ctx.need_report()
        action, _, rest = args.strip().partition(" ")
        members = list(ctx.session.scalars(select(EmbargoMember).where(EmbargoMember.report_id == report.id)))
        if action == "list":
            lines = [f"{m.address} ({ctx.services.member_key_problem(m.address) or 'key ok'})" for m in members]
            return "embargo list: " + (", ".join(lines) or "(empty)")
        address = clean_address(rest)
        current = {m.address: m for m in members}
        if action == "add":
            if address in current:
                raise CommandError(f"{address} is already on the embargo list")
            ctx.output.append(ctx.services.import_keys(address))
            ctx.session.add(EmbargoMember(report_id=report.id, address=address, added_by=ctx.fingerprint, added_at=ctx.now))
            problem = ctx.services.member_key_problem(address)
            if problem:
                ctx.output.append(f"Note: {address} gets NOTHING until they have a usable key: {problem}. "
                                  "Import it (mailer keys import FILE) or attach it to #embargo add.")
        elif action == "remove":
            if address not in current:
                raise CommandError(f"{address} is not on the embargo list")
            ctx.session.delete(current[address])
        else:
            raise CommandError("expected `#embargo add ADDRESS`, `#embargo remove ADDRESS` or `#embargo list`")
        ctx.event(f"embargo.{action}", address=address)
        return f"embargo {action}: {address}"


class Leak(Command):
    name, argument_description = "leak", "WHO WHAT"
    description = "record a leak: to whom (first word) and what; maintainers and the embargo list are told"

    def run(self, ctx: CommandContext, args: str) -> str:
        who, _, what = clean_arg(args, "leak", 2000).partition(" ")
        what = clean_arg(what, "what leaked (after WHO)", 2000)
        report = ctx.need_report()
        report.leaked_at = ctx.now
        ctx.event("leak", who=who, what=what, text=f"{who}: {what}")
        ctx.effects.append(LeakAlert(who, what))
        return "leak recorded; maintainers and embargo members alerted; decide by the next workday (#disclose now, or keep the date)"


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class Publish(Command):
    name, argument_description = "publish", "[TOKEN]"
    description = "publish early: without TOKEN, a preview and a one-time token; with it, the release email goes now"

    def run(self, ctx: CommandContext, args: str) -> str:
        report = ctx.need_report()
        if report.state not in ("scheduled", "announced"):
            raise CommandError(f"cannot publish a report in state {report.state} (only scheduled or announced)")
        missing = _release_missing(report)
        if missing:
            raise CommandError("the release email is incomplete: " + ", ".join(missing))
        token = args.strip()
        if not token:
            token = secrets.token_urlsafe(12)
            report.publish_token_hash = _token_hash(token)
            report.publish_token_until = ctx.now + timedelta(hours=PUBLISH_TOKEN_HOURS)
            ctx.event("publish.requested")
            ctx.output.append(
                f"The release email would announce {report.release_version} ({report.release_url}), advisory "
                f"{report.advisory_url}, severity {report.severity or report.cvss_score}, CVE {report.cve or 'none'}, "
                f"to {', '.join(ctx.config.announce.lists) or '(no announce list configured)'}; the embargo list is "
                f"told the embargo ended early.\nTo send it now, reply within {PUBLISH_TOKEN_HOURS} hours with a signed:\n"
                f"  #report {report.tracking_id}\n  #publish {token}"
            )
            return "nothing sent yet: confirm with the token below"
        expected, until = report.publish_token_hash, report.publish_token_until
        if not expected or until is None or ctx.now > until:
            raise CommandError("no valid publish token (they expire after 24 hours): send #publish without a token first")
        if not hmac.compare_digest(expected, _token_hash(clean_arg(token, "token", 64))):
            raise CommandError("wrong publish token")
        report.publish_token_hash, report.publish_token_until = None, None
        report.publish_requested_at = ctx.now
        ctx.event("publish.confirmed")
        return "the release email goes out now; embargo members are told the embargo ended early"
