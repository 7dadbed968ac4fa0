"""The disclosure timeline as a plan: which mail is due when, to whom — pure, no database, no I/O.

:func:`plan_all` turns the facts of the open reports (:class:`ReportFacts`)
into :class:`Planned` items. Each item has a deterministic ``key``: report,
kind, recipient and a *generation* derived from what the mail says, so the
same facts always give the same key (sent once), and a change that matters
(new date, fix, severity; a new day for a reminder) gives a new one. The
runner (:mod:`mailer.scheduler`) sends what is due and records the key.

Rules (issue 8): embargo notices to members with a usable key when added and
after a change of date/fix/severity (members without one get nothing: the
maintainers are reminded); the removed member is told only that; one advance
notice per announce-list set and local disclosure date (highest severity),
moving the reports to ``announced``; the release at the instant only when
complete (else held, with daily alerts from one workday before), moving the
report to ``published``; then ``embargo_lifted`` to members and a status to
the reporter; previews of each announcement to the maintainers; reminders at
most once per deadline per local day.
"""

from __future__ import annotations

import enum
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from mailer import schedule
from mailer.config import Config

SEVERITIES = ("none", "low", "medium", "high", "critical")
OPEN_STATES = frozenset({"new", "acknowledged", "accepted", "scheduled", "announced"})
EMBARGO_STATES = OPEN_STATES
PLANNED_STATES = OPEN_STATES | {"published"}
CVE_GRACE = timedelta(days=2)


class Kind(enum.StrEnum):
    EMBARGO_NOTICE = "embargo_notice"
    EMBARGO_REMOVED = "embargo_removed"
    ADVANCE_NOTICE = "advance_notice"
    PREVIEW = "preview"
    RELEASE = "release"
    RELEASE_HELD = "release_held"
    EMBARGO_LIFTED = "embargo_lifted"
    REPORTER_STATUS = "reporter_status"
    REMINDER = "reminder"


class Audience(enum.StrEnum):
    MAINTAINERS = "maintainers"  # the incident manager, or all maintainers while none is assigned
    ALL_MAINTAINERS = "all_maintainers"
    MEMBER = "member"  # one embargo member, encrypted to their key or nothing
    REPORTER = "reporter"
    LISTS = "lists"  # public announce lists: signed, never encrypted


@dataclass(frozen=True)
class Member:
    address: str
    key_ok: bool
    added_at: datetime


@dataclass(frozen=True)
class ReportFacts:
    """What the plan depends on, read from a Report row, its members, events and sent mail."""

    report_id: int
    tracking_id: str
    state: str
    created_at: datetime
    summary: str = ""
    severity: str | None = None
    cvss_vector: str | None = None
    cvss_score: float | None = None
    cve: str | None = None
    cve_none: bool = False
    cve_requested_at: datetime | None = None
    affected: str | None = None
    fixed: str | None = None
    advisory_url: str | None = None
    release_version: str | None = None
    release_url: str | None = None
    disclose_at: datetime | None = None
    first_response_at: datetime | None = None  # #accept/#reject/#duplicate/#reply
    triaged_at: datetime | None = None  # #accept/#reject/#duplicate
    accepted_at: datetime | None = None
    published_at: datetime | None = None
    leaked_at: datetime | None = None
    publish_requested_at: datetime | None = None  # `#publish TOKEN`: release at once
    changed_at: datetime | None = None  # latest change of date, fix or severity
    members: tuple[Member, ...] = ()
    removed: tuple[tuple[str, datetime], ...] = ()  # (address, when) not re-added since
    notified: Mapping[str, Mapping[str, str]] = field(default_factory=dict)  # member → last notice's snapshot

    @property
    def severity_label(self) -> str:
        """``severity`` or the CVSS rating of ``cvss_score``; "" when neither is known."""
        if self.severity:
            return self.severity
        if self.cvss_score is None:
            return ""
        score = self.cvss_score
        return "critical" if score >= 9 else "high" if score >= 7 else "medium" if score >= 4 else "low" if score > 0 else "none"

    def release_missing(self) -> list[str]:
        """What the release email still needs (empty: complete)."""
        missing = []
        if not (self.release_version and self.release_url):
            missing.append("release (#release VERSION URL)")
        if not self.advisory_url:
            missing.append("advisory URL (#advisory URL)")
        if not self.severity_label:
            missing.append("severity (#severity or #cvss)")
        if not (self.cve or self.cve_none):
            missing.append("CVE id (#cve CVE-… or #cve none)")
        return missing


@dataclass(frozen=True)
class Planned:
    """One scheduled mail. ``state`` is ``planned`` or ``held`` (with ``reason``)."""

    report: str
    kind: Kind
    key: str
    due_at: datetime
    audience: Audience
    recipients: tuple[str, ...]
    template: str
    subject: str
    context: Mapping[str, Any]
    state: str = "planned"
    reason: str | None = None
    moves_to: str | None = None
    reports: tuple[str, ...] = ()
    report_ids: tuple[int, ...] = ()
    detail: Mapping[str, Any] = field(default_factory=dict)


def digest(*parts: object, size: int = 16) -> str:
    """A short stable hash of ``parts`` (JSON-encoded)."""
    text = json.dumps(parts, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:size]


def _rank(label: str) -> int:
    return SEVERITIES.index(label) if label in SEVERITIES else -1


def _snapshot(facts: ReportFacts, config: Config) -> dict[str, str]:
    severity = facts.severity_label + (f" ({facts.cvss_vector})" if facts.cvss_vector else "")
    date = schedule.format_local(facts.disclose_at, config.schedule) if facts.disclose_at else "not set yet"
    return {"disclosure": date, "fixed": facts.fixed or "not yet", "severity": severity or "not yet rated"}


def _base(facts: ReportFacts, kind: Kind, key: str, due: datetime, *, audience: Audience,
          recipients: tuple[str, ...], template: str, subject: str, context: dict[str, Any], **extra: Any) -> Planned:
    return Planned(
        report=facts.tracking_id, kind=kind, key=key, due_at=due, audience=audience, recipients=recipients,
        template=template, subject=subject, context={"tracking_id": facts.tracking_id, **context},
        reports=(facts.tracking_id,), report_ids=(facts.report_id,), **extra,
    )


def _embargo(facts: ReportFacts, config: Config) -> list[Planned]:
    """Notices to members with a usable key; the removed are told only that."""
    tid, items = facts.tracking_id, []
    if facts.state in EMBARGO_STATES:
        snapshot = _snapshot(facts, config)
        for member in facts.members:
            if not member.key_ok:
                continue  # fail closed: the member_key reminder tells the maintainers
            previous = facts.notified.get(member.address)
            changes = [f"{name}: {previous.get(name, '?')} -> {value}" for name, value in snapshot.items()
                       if previous is not None and previous.get(name) != value]
            due = max(member.added_at, facts.changed_at or member.added_at) if changes else member.added_at
            context = {
                "summary": facts.summary, "affected": facts.affected or "not yet known", "fixed": snapshot["fixed"],
                "cve": facts.cve or ("none" if facts.cve_none else "not assigned yet"), "severity": snapshot["severity"],
                "disclosure": snapshot["disclosure"], "changes": changes, "contact": config.service.contact,
            }
            key = f"{tid}:{Kind.EMBARGO_NOTICE}:{digest(member.address)}:{digest(member.added_at, snapshot)}"
            subject = f"[{tid}] Embargoed security issue" + (": changed" if changes else "")
            items.append(_base(facts, Kind.EMBARGO_NOTICE, key, due, audience=Audience.MEMBER,
                               recipients=(member.address,), template="embargo_notice.txt.j2", subject=subject,
                               context=context, detail={"snapshot": snapshot}))
    for address, when in facts.removed:
        key = f"{tid}:{Kind.EMBARGO_REMOVED}:{digest(address)}:{digest(when)}"
        items.append(_base(facts, Kind.EMBARGO_REMOVED, key, when, audience=Audience.MEMBER, recipients=(address,),
                           template="embargo_removed.txt.j2", subject=f"[{tid}] Removed from an embargo list",
                           context={}))
    return items


def _announcements(facts: ReportFacts, config: Config, now: datetime) -> list[Planned]:
    """The advance notice (per report, merged later) and the release, with what follows the release."""
    tid, items, lists = facts.tracking_id, [], tuple(config.announce.lists)
    project = config.project
    if facts.state in ("scheduled", "announced") and facts.disclose_at and not facts.publish_requested_at:
        due = schedule.advance_notice_at(facts.disclose_at, config.schedule, config.announce.advance_notice_workdays)
        wall = schedule.local(facts.disclose_at, config.schedule)
        context = {"project": project, "date": f"{wall:%Y-%m-%d}", "time": f"{wall:%H:%M %Z}",
                   "timezone": config.schedule.timezone, "advisory_base_url": config.announce.advisory_base_url,
                   "severity": facts.severity_label or "not yet rated"}
        group = f"{Kind.ADVANCE_NOTICE}:{digest(lists)}:{wall:%Y-%m-%d}"
        items.append(Planned(
            report=tid, kind=Kind.ADVANCE_NOTICE, key=group, due_at=due, audience=Audience.LISTS, recipients=lists,
            template="advance_notice.txt.j2", subject=f"{project}: forthcoming security release", context=context,
            moves_to="announced", reports=(tid,), report_ids=(facts.report_id,),
        ))
    due_release = facts.publish_requested_at or facts.disclose_at
    if facts.state in ("scheduled", "announced") and due_release is not None:
        missing = facts.release_missing()
        context = {
            "project": project, "version": facts.release_version or "", "release_url": facts.release_url or "",
            "advisory_url": facts.advisory_url or "", "severity": facts.severity_label,
            "cve": facts.cve or "", "date": f"{schedule.local(due_release, config.schedule):%Y-%m-%d}",
        }
        if not missing:
            items.append(_base(facts, Kind.RELEASE, f"{tid}:{Kind.RELEASE}", due_release, audience=Audience.LISTS,
                               recipients=lists, template="release.txt.j2",
                               subject=f"{project}: security release {facts.release_version}",
                               context=context, moves_to="published"))
        else:
            reason = "incomplete, missing: " + ", ".join(missing)
            held: dict[str, Any] = {"missing": missing, "disclosure": schedule.format_local(due_release, config.schedule)}
            items.append(_base(facts, Kind.RELEASE_HELD, f"{tid}:{Kind.RELEASE_HELD}:{digest(missing)}", due_release,
                               audience=Audience.ALL_MAINTAINERS, recipients=(Audience.ALL_MAINTAINERS.value,),
                               template="release_held.txt.j2", subject=f"[{tid}] ALERT: security release held",
                               context=held, state="held", reason=reason))
    if facts.state == "published" and facts.published_at is not None:
        early = facts.disclose_at is not None and facts.published_at < facts.disclose_at
        lifted: dict[str, Any] = {"version": facts.release_version or "", "release_url": facts.release_url or "",
                   "advisory_url": facts.advisory_url or "", "early": early}
        for member in facts.members:
            if member.key_ok:
                items.append(_base(facts, Kind.EMBARGO_LIFTED, f"{tid}:{Kind.EMBARGO_LIFTED}:{digest(member.address)}",
                                   facts.published_at, audience=Audience.MEMBER, recipients=(member.address,),
                                   template="embargo_lifted.txt.j2", subject=f"[{tid}] Embargo lifted", context=lifted))
        status: dict[str, Any] = {"change": "the fix is released and the embargo is lifted",
                  "reason": f"Release {facts.release_version}: {facts.release_url}\nAdvisory: {facts.advisory_url}"}
        items.append(_base(facts, Kind.REPORTER_STATUS, f"{tid}:{Kind.REPORTER_STATUS}:published", facts.published_at,
                           audience=Audience.REPORTER, recipients=(Audience.REPORTER.value,), template="status.txt.j2",
                           subject=f"[{tid}] Published", context=status))
    return items


def _reminder(facts: ReportFacts, config: Config, now: datetime, topic: str, deadline: datetime, *,
              due: str, command: str, repeat: bool = True, until: datetime | None = None) -> list[Planned]:
    """A reminder at ``deadline``, then (``repeat``) on each workday at ``reminder_hour``; one per local day."""
    cfg = config.schedule
    if until is not None and now >= until:
        return []
    instants = [deadline]
    if now >= deadline and repeat:
        instants = [max(deadline, schedule.last_reminder_at(now, cfg))]
        instants.append(schedule.next_reminder_at(instants[0], cfg))
    items = []
    for at in instants:
        if until is not None and at >= until:
            continue
        day = f"{schedule.local(at, cfg):%Y-%m-%d}"
        context = {"topic": topic, "due": due, "command": command,
                   "deadline": schedule.format_local(deadline, cfg), "repeat": repeat}
        title = topic.split(":", 1)[0].replace("_", " ")
        items.append(_base(facts, Kind.REMINDER, f"{facts.tracking_id}:{Kind.REMINDER}:{topic}:{day}", at,
                           audience=Audience.MAINTAINERS, recipients=(Audience.MAINTAINERS.value,),
                           template="reminder.txt.j2", subject=f"[{facts.tracking_id}] Reminder: {title}",
                           context=context, detail={"topic": topic}))
    return items


def _reminders(facts: ReportFacts, config: Config, now: datetime) -> list[Planned]:
    cfg, out = config.schedule, []
    is_open = facts.state in OPEN_STATES
    if is_open and facts.first_response_at is None:
        out += _reminder(facts, config, now, "ack", facts.created_at + timedelta(hours=config.service.ack_sla_hours),
                         due="the report has no answer from a maintainer",
                         command="#accept, #reject REASON, #duplicate SEC-… or #reply")
    if facts.state in ("new", "acknowledged") and facts.triaged_at is None:
        triage = schedule.shift_workdays(facts.created_at, cfg.triage_sla_workdays, cfg)
        out += _reminder(facts, config, now, "triage", triage,
                         due="the report is not triaged", command="#accept, #reject REASON or #duplicate SEC-…")
    if facts.state in ("scheduled", "announced") and facts.disclose_at is not None:
        lacking = [name for name, value in (("fix", facts.fixed or facts.release_version), ("release", facts.release_url),
                                            ("advisory", facts.advisory_url)) if not value]
        one_before = schedule.shift_workdays(facts.disclose_at, -1, cfg)
        if lacking:
            out += _reminder(facts, config, now, "disclosure_soon", schedule.shift_workdays(facts.disclose_at, -2, cfg),
                             due="disclosure is close and no " + "/".join(lacking) + " is recorded",
                             command="#fixed VERSION, #release VERSION URL, #advisory URL", until=one_before)
        missing = facts.release_missing()
        if missing:
            out += _reminder(facts, config, now, "release_incomplete", one_before,
                             due="the release email is incomplete: " + ", ".join(missing),
                             command="the commands named above", until=facts.disclose_at)
        if missing:  # a complete release goes out at the instant (late, on the next drain): nothing to remind
            out += _reminder(facts, config, now, "disclosure_passed", facts.disclose_at,
                             due="the disclosure date has passed and nothing is published (missing: "
                             + ", ".join(missing) + ")",
                             command="complete the release (see above), or #extend DATE REASON")
    if is_open and facts.cve_requested_at and not facts.cve and not facts.cve_none:
        out += _reminder(facts, config, now, "cve", facts.cve_requested_at + CVE_GRACE,
                         due="a CVE was requested and none is recorded", command="#cve CVE-YYYY-NNNN or #cve none")
    if facts.state in EMBARGO_STATES:
        for member in facts.members:
            if not member.key_ok:
                out += _reminder(facts, config, now, f"member_key:{digest(member.address, size=8)}", member.added_at,
                                 due=f"embargo member {member.address} has no usable OpenPGP key and got nothing",
                                 command="mailer keys import FILE, or #embargo remove ADDRESS")
    if facts.leaked_at is not None:
        if is_open:
            decide = schedule.reminder_at(schedule.next_workday(schedule.local(facts.leaked_at, cfg).date(), cfg), cfg)
            out += _reminder(facts, config, now, "leak_decision", decide,
                             due="a leak was recorded: decide whether to publish at once",
                             command="#disclose now to publish at once, or keep the date", repeat=False)
        if facts.published_at is not None and facts.published_at >= facts.leaked_at:
            retro = schedule.reminder_at(schedule.next_workday(schedule.local(facts.published_at, cfg).date(), cfg), cfg)
            out += _reminder(facts, config, now, "retrospective", retro,
                             due="the embargo policy asks for a retrospective of the leak",
                             command="#note with the retrospective's outcome", repeat=False)
    return out


def _merge_advance(items: Sequence[Planned]) -> Planned:
    """Several reports due the same local day share one advance notice with the highest severity."""
    ordered = sorted(items, key=lambda item: (item.due_at, item.report))
    top = max(ordered, key=lambda item: _rank(str(item.context["severity"])))
    first = ordered[0]
    context = {**first.context, "severity": top.context["severity"]}
    reports = tuple(sorted({tid for item in items for tid in item.reports}))
    ids = tuple(sorted({rid for item in items for rid in item.report_ids}))
    key = f"{first.key}:{digest(context['severity'], first.context['time'], size=8)}"
    return replace(first, key=key, context=context, reports=reports, report_ids=ids, report=reports[0])


def _preview(item: Planned, config: Config, now: datetime) -> Planned | None:
    """The exact text of an announcement to the maintainers, ``preview_workdays`` before it."""
    if item.due_at <= now or item.state != "planned":
        return None
    due = schedule.preview_at(item.due_at, config.schedule, config.announce.preview_workdays)
    context = {**item.context, "announcement_template": item.template, "announcement_subject": item.subject,
               "announcement_kind": str(item.kind), "announcement_to": ", ".join(item.recipients) or "(no list configured)",
               "announcement_at": schedule.format_local(item.due_at, config.schedule), "reports": list(item.reports)}
    key = f"{item.report}:{Kind.PREVIEW}:{item.kind}:{digest(item.key, item.subject, item.context, item.due_at)}"
    return replace(item, kind=Kind.PREVIEW, key=key, due_at=due, audience=Audience.MAINTAINERS,
                   recipients=(Audience.MAINTAINERS.value,), template="preview.txt.j2",
                   subject=f"[{', '.join(item.reports)}] Preview: {str(item.kind).replace('_', ' ')}",
                   context=context, moves_to=None, detail={"announces": str(item.kind)})


def plan_all(facts: Iterable[ReportFacts], config: Config, now: datetime, *,
             due_by: datetime | None = None) -> list[Planned]:
    """Every mail of the timeline for these reports, past-due and future, sorted by due time.

    With ``due_by`` only the items due by then are kept: *facts* is consumed as it comes and the rest
    of each report's plan is dropped at once (the scheduler's pass over thousands of open reports,
    every minute, would otherwise hold all of their plans at the same time).
    """
    items: list[Planned] = []
    advance: dict[str, list[Planned]] = {}

    def add(new: Iterable[Planned]) -> None:
        for item in new:
            if item.kind in (Kind.ADVANCE_NOTICE, Kind.RELEASE):
                preview = _preview(item, config, now)
                if preview is not None and (due_by is None or preview.due_at <= due_by):
                    items.append(preview)
            if due_by is None or item.due_at <= due_by:
                items.append(item)

    for one in facts:
        if one.state not in PLANNED_STATES:
            continue
        add(_embargo(one, config))
        announcements = []
        for item in _announcements(one, config, now):
            if item.kind is Kind.ADVANCE_NOTICE:
                advance.setdefault(item.key, []).append(item)
            else:
                announcements.append(item)
        add(announcements)
        add(_reminders(one, config, now))
    add(_merge_advance(group) for group in advance.values())
    return sorted(items, key=lambda item: (item.due_at, item.key))


def plan(facts: ReportFacts, config: Config, now: datetime) -> list[Planned]:
    """The timeline of one report (an advance notice here covers only this report)."""
    return plan_all([facts], config, now)


def due(items: Iterable[Planned], now: datetime) -> list[Planned]:
    """The items whose instant has come: nothing is ever sent before its ``due_at``."""
    return [item for item in items if item.due_at <= now]
