"""Commands that talk: a reply to the reporter, an internal note, the report's status, lists, help."""

from __future__ import annotations

from sqlalchemy import func, select

from mailer import states
from mailer.commands.base import Command, CommandContext, CommandError, ReporterReply, clean_arg, split_flags
from mailer.models import Report

LIST_LIMIT = 200


class Reply(Command):
    name, argument_description = "reply", "[--unencrypted]"
    description = ("send the free text after the commands to the reporter, encrypted to their key; a report "
                   "that arrived encrypted gets no clear-text reply unless --unencrypted")

    def run(self, ctx: CommandContext, args: str) -> str:
        _, flags = split_flags(args, "--unencrypted")
        report = ctx.need_report()
        text = ctx.message_text
        if not text:
            raise CommandError("there is no text after the commands to send")
        unencrypted = "--unencrypted" in flags
        problem = ctx.services.reporter_key_problem(report)
        if problem is not None and report.flags.get("encrypted") and not unencrypted:
            raise CommandError(
                f"the report arrived encrypted and the reply cannot be encrypted ({problem}); ask the reporter "
                "for their public key (attached, or by an Autocrypt header), or send `#reply --unencrypted` "
                "if the text may go in clear"
            )
        ctx.effects.append(ReporterReply(text, unencrypted=unencrypted))
        ctx.event("reply.sent", length=len(text), unencrypted=unencrypted and problem is not None)
        return "reply queued to the reporter" + (" IN CLEAR (--unencrypted)" if unencrypted and problem else "")


class Note(Command):
    name, argument_description, description = "note", "TEXT", "an internal note in the report's log"

    def run(self, ctx: CommandContext, args: str) -> str:
        ctx.need_report()
        ctx.event("note", text=clean_arg(args, "note", 2000))
        return "note recorded"


class Status(Command):
    name, description = "status", "the report's current summary"
    changes = False

    def run(self, ctx: CommandContext, args: str) -> str:
        lines = ctx.services.schedule_lines(ctx.need_report())
        ctx.output.append("deadlines and planned mail:\n" + ("\n".join(f"  {line}" for line in lines) or "  (none)"))
        return "summary below"


class List_(Command):
    name, argument_description, description = "list", "[open|all]", "list reports"
    changes = False

    def run(self, ctx: CommandContext, args: str) -> str:
        which = args.strip().lower() or "open"
        if which not in ("open", "all"):
            raise CommandError("expected `#list open` or `#list all`")
        query = select(Report)
        count = select(func.count(Report.id))
        open_states = [s.value for s in states.OPEN]
        if which == "open":
            query, count = query.where(Report.state.in_(open_states)), count.where(Report.state.in_(open_states))
        total = ctx.session.scalar(count) or 0
        lines = []
        for report in ctx.session.scalars(query.order_by(Report.id.desc()).limit(LIST_LIMIT)):
            disclose = f"{report.disclose_at:%Y-%m-%d}" if report.disclose_at else "-"
            upcoming = ctx.services.next_deadline(report) if report.state in open_states else ""
            lines.append(f"  {report.tracking_id}  {report.state:<12} {report.severity or '-':<8} {disclose:<10}  {upcoming}".rstrip())
        more = f"\n  … and {total - len(lines)} more" if total > len(lines) else ""
        ctx.output.append(f"{which} reports ({total}):\n" + "\n".join(lines) + more)
        return f"{total} {which} report(s)"
