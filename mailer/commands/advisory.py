"""Commands for the public advisory: its one-line summary and how the reporter is credited."""

from __future__ import annotations

from mailer.commands.base import Command, CommandContext, clean_arg


class Summary(Command):
    name, argument_description = "summary", "TEXT"
    description = "the public one-line summary (the release email and advisory records use it, never the report's text)"

    def run(self, ctx: CommandContext, args: str) -> str:
        report = ctx.need_report()
        report.summary = clean_arg(args, "summary", 500)
        ctx.event("report.summary", summary=report.summary)
        return f"summary: {report.summary}"


class Credit(Command):
    name, argument_description = "credit", "NAME | none"
    description = "how the reporter wants to be credited in the advisory (their address is never used)"

    def run(self, ctx: CommandContext, args: str) -> str:
        report = ctx.need_report()
        value = clean_arg(args, "credit", 200)
        if value.lower() == "none":
            report.credit, report.credit_none = None, True
            ctx.event("report.credit", credit=None)
            return "credit: none (the advisory credits no one)"
        report.credit, report.credit_none = value, False
        ctx.event("report.credit", credit=value)
        return f"credit: {value}"
