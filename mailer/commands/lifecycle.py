"""Commands that move a report through its life cycle (``mailer.states``) or name who handles it."""

from __future__ import annotations

from sqlalchemy import select

from mailer import tracking
from mailer.commands.base import Command, CommandContext, CommandError, ReporterStatus, clean_address, clean_arg, transition
from mailer.models import Report


class Accept(Command):
    name, description = "accept", "accept the report as a vulnerability (investigation goes on in private)"

    def run(self, ctx: CommandContext, args: str) -> str:
        result = transition(ctx, "accept")
        ctx.need_report().accepted_at = ctx.now
        ctx.effects.append(ReporterStatus("accepted"))
        return result


class Reject(Command):
    name, argument_description, description = "reject", "REASON", "reject the report; the reason is told to the reporter"

    def run(self, ctx: CommandContext, args: str) -> str:
        reason = clean_arg(args, "reason")
        result = transition(ctx, "reject", reason=reason)
        ctx.effects.append(ReporterStatus("rejected", reason=reason))
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
        result = transition(ctx, "duplicate", of=other)
        report.duplicate_of = other
        ctx.effects.append(ReporterStatus("duplicate", reason=f"a duplicate of {other}"))
        return result


class Reopen(Command):
    name, description = "reopen", "reopen a rejected, duplicate or closed report"

    def run(self, ctx: CommandContext, args: str) -> str:
        ctx.need_report().duplicate_of = None
        result = transition(ctx, "reopen")
        ctx.effects.append(ReporterStatus("reopened"))
        return result


class Close(Command):
    name, description = "close", "close a published, rejected or duplicate report"

    def run(self, ctx: CommandContext, args: str) -> str:
        result = transition(ctx, "close")
        ctx.effects.append(ReporterStatus("closed"))
        return result


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


class Report_(Command):
    name, argument_description, description = "report", "SEC-…", "name the report these commands act on"
    changes = False

    def run(self, ctx: CommandContext, args: str) -> str:
        return f"report {ctx.need_report().tracking_id}"
