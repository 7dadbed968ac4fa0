"""The maintainers' command language: ``#name arguments`` lines at the top of a signed mail.

Commands are the lines starting with ``#`` at the top of the text, up to the
first line that is not one; what follows (minus quoted ``>`` lines and the
signature) is the free text, sent to the reporter by ``#reply``. Each command
is a small object with ``name``, ``argument_description``, ``description``
and ``run`` (``mailer.commands.base``); ``run`` validates its arguments and
raises :class:`CommandError` with a reason, or returns what it did, and adds
typed effects (mail to send) to the context. :func:`apply_all` applies all
commands of a message in one savepoint: if any fails, none takes effect.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mailer.commands.advisory import Credit, Summary
from mailer.commands.base import (
    Command,
    CommandContext,
    CommandError,
    Effect,
    Invocation,
    LeakAlert,
    MaintainersTold,
    MembersTold,
    ReporterReply,
    ReporterStatus,
)
from mailer.commands.details import Advisory, Affected, Cve, Cvss, Fixed, Severity
from mailer.commands.disclosure import Disclose, Embargo, Extend, Leak, Publish, Release
from mailer.commands.info import List_, Note, Reply, Status
from mailer.commands.lifecycle import Accept, Assign, Close, Duplicate, Reject, Reopen, Report_

__all__ = [
    "REGISTRY", "Command", "CommandContext", "CommandError", "Effect", "Invocation", "LeakAlert", "MaintainersTold",
    "MembersTold", "Outcome", "ReporterReply", "ReporterStatus", "apply_all", "help_text", "looks_like_commands", "parse",
]

_COMMAND_LINE = re.compile(r"^#([a-z]+)(?:[ \t]+(.*))?$")


class Help(Command):
    name, description = "help", "this list"
    changes = False

    def run(self, ctx: CommandContext, args: str) -> str:
        ctx.output.append(help_text())
        return "commands listed below"


REGISTRY: dict[str, Command] = {
    c.name: c
    for c in (
        Accept(), Reject(), Duplicate(), Reopen(), Close(), Assign(), Severity(), Cvss(), Cve(), Affected(), Fixed(),
        Advisory(), Summary(), Credit(), Release(), Disclose(), Extend(), Publish(), Embargo(), Reply(), Note(), Leak(),
        Report_(), Status(), List_(), Help(),
    )
}


def help_text() -> str:
    width = max(len(f"#{c.name} {c.argument_description}") for c in REGISTRY.values())
    return "\n".join(f"  {f'#{c.name} {c.argument_description}'.ljust(width)}  {c.description}" for c in REGISTRY.values())


def parse(text: str) -> tuple[list[Invocation], str]:
    """Split the signed text into command lines and the free text after them."""
    lines = text.replace("\r\n", "\n").split("\n")
    while lines and not lines[0].strip():
        lines.pop(0)
    invocations: list[Invocation] = []
    while lines and lines[0].startswith("#"):
        line = lines.pop(0).rstrip()
        match = _COMMAND_LINE.match(line)
        name, args = (match[1], (match[2] or "").strip()) if match else (line[1:].split(" ", 1)[0], "")
        invocations.append(Invocation(name, args, line))
    free: list[str] = []
    for line in lines:
        if line.rstrip() == "--":
            break
        if not line.startswith(">"):
            free.append(line)
    return invocations, "\n".join(free).strip()


def looks_like_commands(text: str) -> bool:
    """True when the first non-blank line is a known command (so a reporter's '#1 bug' is not one)."""
    for line in text.splitlines():
        if line.strip():
            match = _COMMAND_LINE.match(line.rstrip())
            return bool(match and match[1] in REGISTRY)
    return False


@dataclass(frozen=True)
class Outcome:
    line: str
    ok: bool
    message: str
    # the command changed something (not #status, #list, #help, #report)
    changes: bool = False


def apply_all(ctx: CommandContext, invocations: list[Invocation]) -> list[Outcome]:
    """Run every command in one savepoint; if one fails, roll all of them back (and drop their effects)."""
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
            outcomes.append(Outcome(invocation.line, True, message, command.changes))
        except CommandError as exc:
            failed = True
            outcomes.append(Outcome(invocation.line, False, str(exc)))
    if failed:
        savepoint.rollback()
        ctx.effects.clear()
        ctx.output.clear()
        outcomes = [Outcome(o.line, False, o.message if not o.ok else "rolled back: another command failed")
                    for o in outcomes]
    else:
        savepoint.commit()
    return outcomes
