"""Commands that record what the advisory will say: severity, CVSS, CVE, versions, advisory URL."""

from __future__ import annotations

import re

from cvss import CVSS3, CVSS4
from cvss.exceptions import CVSSError

from mailer.advisory import AdvisoryError, text_advisory
from mailer.commands.base import (
    Command,
    CommandContext,
    CommandError,
    MaintainersTold,
    check_supported,
    clean_arg,
    split_flags,
)

SEVERITIES = ("low", "medium", "high", "critical")


def cvss_rating(score: float | None) -> str | None:
    """The CVSS qualitative rating of a score (3.x and 4.0 use the same bands)."""
    if score is None:
        return None
    return "critical" if score >= 9 else "high" if score >= 7 else "medium" if score >= 4 else "low" if score > 0 else "none"


_CVE = re.compile(r"^CVE-\d{4}-\d{4,7}$")
URL = re.compile(r"^https://[^\s<>\"']{3,480}$")
VERSION = re.compile(r"^[\w.+\-~]{1,100}$")


class Severity(Command):
    name, argument_description, description = "severity", "critical|high|medium|low", "set the severity"

    def run(self, ctx: CommandContext, args: str) -> str:
        value = args.strip().lower()
        if value not in ("critical", "high", "medium", "low"):
            raise CommandError(f"expected critical, high, medium or low, got {args!r}")
        report = ctx.need_report()
        report.severity = value
        ctx.event("report.severity", severity=value)
        rated = cvss_rating(report.cvss_score)
        if rated and rated != value:
            ctx.output.append(f"Note: severity {value} does not match the CVSS score {report.cvss_score} ({rated}); "
                              "the announcements say what #severity says.")
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
        rated = cvss_rating(score)
        if report.severity and rated and report.severity != rated:
            ctx.output.append(f"Note: the CVSS score {score} rates {rated} but the severity is {report.severity}; "
                              f"send #severity {rated} if the score is right.")
        elif not report.severity and rated in SEVERITIES:
            report.severity = rated
            ctx.event("report.severity", severity=rated, from_cvss=score)
        return f"CVSS {score} ({label})"


class Cve(Command):
    name, argument_description = "cve", "CVE-YYYY-NNNN | requested [NOTE] | none"
    description = "record the CVE id, that one was requested, or that there will be none"

    def run(self, ctx: CommandContext, args: str) -> str:
        report = ctx.need_report()
        value = clean_arg(args, "CVE")
        if value.lower().startswith("requested"):
            report.cve_requested_at = ctx.now
            ctx.event("report.cve_requested", note=value[len("requested"):].strip())
            return "CVE requested (you will be reminded until it is recorded)"
        if value.lower() == "none":
            report.cve_none, report.cve = True, None
            ctx.event("report.cve_none")
            return "CVE: none (the release email goes out without one)"
        if not _CVE.match(value.upper()):
            raise CommandError(f"expected CVE-YYYY-NNNN, `requested` or `none`, got {value!r}")
        report.cve, report.cve_none = value.upper(), False
        ctx.event("report.cve", cve=report.cve)
        return f"CVE: {report.cve}"


class Affected(Command):
    name, argument_description, description = "affected", "VERSIONS", "record the affected versions"

    def run(self, ctx: CommandContext, args: str) -> str:
        ctx.need_report().affected = value = clean_arg(args, "versions")
        ctx.event("report.affected", versions=value)
        return f"affected: {value}"


class Fixed(Command):
    name, argument_description, description = "fixed", "VERSION [--unsupported]", "record the version with the fix"

    def run(self, ctx: CommandContext, args: str) -> str:
        text, flags = split_flags(args, "--unsupported")
        value = clean_arg(text, "version", 100)
        if not VERSION.match(value):
            raise CommandError(f"expected a version like 1.2.3, got {value!r}")
        note = check_supported(ctx, value, flags)
        ctx.need_report().fixed = value
        ctx.event("report.fixed", version=value, unsupported=note is not None)
        return f"fixed in: {value}" + (f" ({note})" if note else "")


class Advisory(Command):
    name, argument_description = "advisory", "[URL]"
    description = "record the advisory URL (https); without URL, the text advisory is drafted for review"

    def run(self, ctx: CommandContext, args: str) -> str:
        report = ctx.need_report()
        if not args.strip():
            try:
                draft = text_advisory(report, ctx.config)
            except AdvisoryError as exc:
                raise CommandError(str(exc)) from None
            ctx.effects.append(MaintainersTold(f"[{report.tracking_id}] Advisory draft for review", "advisory_draft.txt.j2",
                                               {"report": report, "draft": draft}))
            ctx.event("report.advisory_draft")
            return "advisory drafted: sent to the incident manager (or the maintainers) for review"
        url = clean_arg(args, "URL")
        if not URL.match(url):
            raise CommandError(f"expected an https:// URL, got {url!r}")
        ctx.need_report().advisory_url = url
        ctx.event("report.advisory", url=url)
        return f"advisory: {url}"
