"""The disclosure timeline's date math (mailer.schedule) and pure planning (mailer.timeline), rule by rule."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from mailer import schedule
from mailer.clock import FakeClock
from mailer.config import Config
from mailer.timeline import Kind, Member, Planned, ReportFacts, due, plan, plan_all

BERLIN = ZoneInfo("Europe/Berlin")


def make_config(**announce: object) -> Config:
    return Config.model_validate({
        "service": {"project": "Example"},
        "schedule": {"timezone": "Europe/Berlin", "holidays_country": "DE"},
        "announce": {"lists": ["sec-announce@example.org"], **announce},
    })


CONFIG = make_config()
SCHED = CONFIG.schedule


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def berlin(*args: int) -> datetime:
    return datetime(*args, tzinfo=BERLIN)


def facts(**changes: object) -> ReportFacts:
    base = ReportFacts(report_id=1, tracking_id="SEC-2026-0001", state="scheduled", created_at=utc(2026, 3, 2, 10),
                       summary="Heap overflow in the frobnicator", first_response_at=utc(2026, 3, 2, 11),
                       triaged_at=utc(2026, 3, 2, 11), accepted_at=utc(2026, 3, 2, 11))
    return replace(base, **changes)  # type: ignore[arg-type]


def complete(**changes: object) -> ReportFacts:
    values: dict[str, object] = {"severity": "high", "cve": "CVE-2026-1234", "fixed": "1.2.3", "release_version": "1.2.3",
                                 "release_url": "https://example.org/r/1.2.3", "advisory_url": "https://example.org/a/1"}
    return facts(**{**values, **changes})


def topic(items: list[Planned], name: str, now: datetime) -> list[Planned]:
    """The due reminders about ``name``."""
    return [item for item in due(items, now) if item.context.get("topic") == name]


def kinds(items: list[Planned], kind: Kind) -> list[Planned]:
    return [item for item in items if item.kind is kind]


# ---------------------------------------------------------------- schedule math


def test_workdays_skip_weekends_holidays_and_the_year_end() -> None:
    """Counting workdays skips Saturday, Sunday, Christmas and New Year (DE) across the year end."""
    assert schedule.add_workdays(date(2026, 12, 23), 3, SCHED) == date(2026, 12, 29)
    assert schedule.add_workdays(date(2026, 12, 30), 2, SCHED) == date(2027, 1, 4)
    assert schedule.add_workdays(date(2027, 1, 4), -2, SCHED) == date(2026, 12, 30)
    assert not schedule.is_workday(date(2026, 12, 25), SCHED) and not schedule.is_workday(date(2026, 3, 28), SCHED)


def test_parse_when_date_only_is_business_start_in_the_configured_zone() -> None:
    """A date without time or zone means 09:00 local; +N counts workdays from today; the past is refused."""
    now = utc(2026, 3, 20, 12)
    assert schedule.parse_when("2026-03-30", now=now, config=SCHED) == berlin(2026, 3, 30, 9)
    assert schedule.parse_when("+5", now=now, config=SCHED) == berlin(2026, 3, 27, 9)
    assert schedule.parse_when("2026-03-30 14:00 UTC", now=now, config=SCHED) == utc(2026, 3, 30, 14)
    assert schedule.parse_when("2026-03-20", now=now, config=SCHED).date() == date(2026, 3, 20)
    with pytest.raises(schedule.BadDate, match="past"):
        schedule.parse_when("2026-03-19", now=now, config=SCHED)


def test_advance_notice_over_a_dst_change_is_at_business_start_local() -> None:
    """Five workdays before 2026-03-30 09:00 CEST is 2026-03-23 09:00 CET: 08:00 UTC, then 07:00 UTC."""
    disclose = schedule.disclosure_instant(date(2026, 3, 30), SCHED)
    assert disclose == utc(2026, 3, 30, 7)
    assert schedule.advance_notice_at(disclose, SCHED, 5) == utc(2026, 3, 23, 8)
    assert schedule.preview_at(utc(2026, 3, 30, 7), SCHED, 1) == utc(2026, 3, 27, 8)


def test_advance_notice_is_clamped_between_the_maximum_and_the_instant() -> None:
    """The notice is never more than max_advance_notice_days before, and never after, the disclosure."""
    disclose = utc(2026, 6, 15, 7)
    assert schedule.advance_notice_at(disclose, SCHED, 30) == disclose - timedelta(days=14)
    late = berlin(2026, 6, 15, 8, 30)
    assert schedule.advance_notice_at(late, SCHED, 0) == late.astimezone(UTC)


def test_next_reminder_skips_the_weekend_and_the_holiday() -> None:
    """After Friday's reminder hour the next reminder is Monday 09:00; after Christmas Eve it is the 28th."""
    assert schedule.next_reminder_at(berlin(2026, 3, 27, 10), SCHED) == berlin(2026, 3, 30, 9)
    assert schedule.next_reminder_at(berlin(2026, 12, 24, 9, 30), SCHED) == berlin(2026, 12, 28, 9)
    assert schedule.last_reminder_at(berlin(2026, 3, 29, 12), SCHED) == berlin(2026, 3, 27, 9)


def test_guards_refuse_past_weekend_holiday_and_too_long_embargo() -> None:
    """Past, weekend, holiday and beyond max_embargo_days are refused; --force lifts the last two."""
    now, accepted = utc(2026, 3, 2, 12), utc(2026, 3, 2, 11)

    def check(when: datetime, force: bool = False) -> schedule.DateCheck:
        return schedule.check_disclosure(when, now=now, accepted_at=accepted, config=SCHED, lead_workdays=5, force=force)

    assert "in the past" in check(utc(2026, 3, 1, 8)).refusals[0]
    assert "Saturday" in check(berlin(2026, 3, 7, 9)).refusals[0]
    assert "not a workday" in check(berlin(2026, 12, 25, 9)).refusals[0]
    assert "90 days" in check(berlin(2026, 7, 1, 9)).refusals[0]
    assert check(berlin(2026, 7, 1, 9), force=True).ok
    assert check(berlin(2026, 3, 7, 9), force=True).ok
    fine = check(berlin(2026, 3, 16, 9))
    assert fine.ok and not fine.notes


def test_a_date_inside_the_lead_is_accepted_with_a_note() -> None:
    """A date closer than the advance-notice lead is not refused: the notice goes at once."""
    result = schedule.check_disclosure(berlin(2026, 3, 4, 9), now=utc(2026, 3, 2, 12), accepted_at=None,
                                       config=SCHED, lead_workdays=5)
    assert result.ok and "at once" in result.notes[0]


# ---------------------------------------------------------------- planning


def test_embargo_notice_only_to_members_with_a_key_and_an_alert_for_the_other() -> None:
    """A member without a usable key gets nothing; the maintainers get a member_key reminder instead."""
    added = utc(2026, 3, 3, 10)
    items = plan(facts(members=(Member("a@distro.test", True, added), Member("b@distro.test", False, added))),
                 CONFIG, utc(2026, 3, 3, 11))
    notices = kinds(items, Kind.EMBARGO_NOTICE)
    assert [n.recipients for n in notices] == [("a@distro.test",)] and notices[0].due_at == added
    assert notices[0].context["summary"] == "Heap overflow in the frobnicator"
    alerts = [i for i in kinds(items, Kind.REMINDER) if i.context["topic"].startswith("member_key")]
    assert alerts and alerts[0].due_at == added and alerts[0].recipients == ("maintainers",)


def test_embargo_notice_key_changes_with_date_fix_and_severity_and_states_the_change() -> None:
    """A new date, fix or severity makes a new notice whose text starts with the change."""
    added, now = utc(2026, 3, 3, 10), utc(2026, 3, 4, 11)
    member = Member("a@distro.test", True, added)
    first = kinds(plan(facts(members=(member,), severity="high"), CONFIG, now), Kind.EMBARGO_NOTICE)[0]
    same = kinds(plan(facts(members=(member,), severity="high"), CONFIG, now), Kind.EMBARGO_NOTICE)[0]
    assert first.key == same.key and not first.context["changes"]
    for change in ({"severity": "critical"}, {"fixed": "1.2.4"}, {"disclose_at": utc(2026, 3, 20, 8)}):
        values: dict[str, object] = {"members": (member,), "severity": "high", "changed_at": utc(2026, 3, 4, 10),
                                     "notified": {"a@distro.test": dict(first.detail["snapshot"])}}
        changed = facts(**{**values, **change})
        notice = kinds(plan(changed, CONFIG, now), Kind.EMBARGO_NOTICE)[0]
        assert notice.key != first.key and notice.context["changes"] and notice.due_at == utc(2026, 3, 4, 10)


def test_removed_member_is_told_only_that() -> None:
    """A removal plans one embargo_removed mail to that member with no report details."""
    items = kinds(plan(facts(removed=(("x@distro.test", utc(2026, 3, 5, 9)),)), CONFIG, utc(2026, 3, 5, 10)),
                  Kind.EMBARGO_REMOVED)
    assert len(items) == 1 and "summary" not in items[0].context and items[0].recipients == ("x@distro.test",)


def test_reports_due_the_same_day_share_one_advance_notice_with_the_highest_severity() -> None:
    """Two reports disclosed the same local day give one advance notice, highest severity, no details."""
    one = facts(disclose_at=berlin(2026, 3, 30, 9), severity="medium")
    two = replace(facts(disclose_at=berlin(2026, 3, 30, 14), severity="critical"), report_id=2, tracking_id="SEC-2026-0002")
    notices = kinds(plan_all([one, two], CONFIG, utc(2026, 3, 10)), Kind.ADVANCE_NOTICE)
    assert len(notices) == 1
    notice = notices[0]
    assert notice.reports == ("SEC-2026-0001", "SEC-2026-0002") and notice.context["severity"] == "critical"
    assert notice.moves_to == "announced" and notice.due_at == utc(2026, 3, 23, 8)
    assert notice.recipients == ("sec-announce@example.org",)
    assert "frobnicator" not in repr(notice.context) and "SEC-" not in repr(notice.context)


def test_release_goes_at_the_instant_only_when_complete() -> None:
    """A complete release is planned at the instant and moves to published; an incomplete one is held."""
    at = berlin(2026, 3, 30, 9)
    ready = kinds(plan(complete(disclose_at=at, state="announced"), CONFIG, utc(2026, 3, 29)), Kind.RELEASE)
    assert len(ready) == 1 and ready[0].due_at == at and ready[0].moves_to == "published" and ready[0].state == "planned"
    items = plan(facts(disclose_at=at, severity="high", state="announced"), CONFIG, utc(2026, 3, 30, 8))
    assert not kinds(items, Kind.RELEASE)
    held = kinds(items, Kind.RELEASE_HELD)[0]
    assert held.state == "held" and "#release" in (held.reason or "") and "CVE" in (held.reason or "")
    assert held.recipients == ("all_maintainers",)


def test_cve_none_completes_the_release() -> None:
    """`#cve none` stands in for a CVE id."""
    ready = complete(disclose_at=berlin(2026, 3, 30, 9), cve=None, cve_none=True)
    assert kinds(plan(ready, CONFIG, utc(2026, 3, 29)), Kind.RELEASE)


def test_incomplete_release_alerts_daily_from_one_workday_before() -> None:
    """From one workday before the instant, an incomplete release makes one reminder per day."""
    at = berlin(2026, 3, 30, 9)  # Monday: one workday before is Friday 27th 09:00
    clock = FakeClock(berlin(2026, 3, 26, 12))
    assert not topic(plan(facts(disclose_at=at), CONFIG, clock()), "release_incomplete", clock())
    clock.set(berlin(2026, 3, 27, 9, 30))
    fired = topic(plan(facts(disclose_at=at), CONFIG, clock()), "release_incomplete", clock())
    assert len(fired) == 1 and fired[0].key.endswith("2026-03-27")
    clock.advance(hours=3)
    again = topic(plan(facts(disclose_at=at), CONFIG, clock()), "release_incomplete", clock())
    assert [i.key for i in again] == [fired[0].key]


def test_publication_tells_members_and_the_reporter() -> None:
    """Once published, each member with a key gets embargo_lifted and the reporter a status."""
    members = (Member("a@distro.test", True, utc(2026, 3, 3)), Member("b@distro.test", False, utc(2026, 3, 3)))
    items = plan(complete(state="published", published_at=utc(2026, 3, 25), disclose_at=utc(2026, 3, 30, 7),
                          members=members), CONFIG, utc(2026, 3, 25, 1))
    lifted = kinds(items, Kind.EMBARGO_LIFTED)
    assert [i.recipients for i in lifted] == [("a@distro.test",)] and lifted[0].context["early"] is True
    assert kinds(items, Kind.REPORTER_STATUS)[0].recipients == ("reporter",)
    assert not kinds(items, Kind.RELEASE) and not kinds(items, Kind.EMBARGO_NOTICE)


def test_previews_come_before_each_announcement_and_again_after_a_change() -> None:
    """Each announcement has a preview one workday before; a text change gives a new preview key."""
    now = utc(2026, 3, 10)
    items = plan(complete(disclose_at=berlin(2026, 3, 30, 9)), CONFIG, now)
    previews = kinds(items, Kind.PREVIEW)
    assert {p.context["announcement_kind"] for p in previews} == {"advance_notice", "release"}
    release_preview = next(p for p in previews if p.context["announcement_kind"] == "release")
    assert release_preview.due_at == berlin(2026, 3, 27, 9) and release_preview.recipients == ("maintainers",)
    changed = kinds(plan(complete(disclose_at=berlin(2026, 3, 30, 9), release_version="1.2.4"), CONFIG, now), Kind.PREVIEW)
    assert release_preview.key not in {p.key for p in changed}


def test_ack_reminder_fires_once_per_day_after_the_sla() -> None:
    """Without a maintainer answer the ack reminder is due at created+24h, then once per workday."""
    report = facts(state="new", first_response_at=None, triaged_at=None, created_at=utc(2026, 3, 2, 10))
    clock = FakeClock(utc(2026, 3, 3, 9))
    assert not [i for i in due(plan(report, CONFIG, clock()), clock()) if i.context.get("topic") == "ack"]
    clock.set(utc(2026, 3, 3, 10, 5))
    first = [i for i in due(plan(report, CONFIG, clock()), clock()) if i.context.get("topic") == "ack"]
    assert len(first) == 1 and "#accept" in first[0].context["command"]
    clock.advance(hours=5)
    assert [i.key for i in due(plan(report, CONFIG, clock()), clock()) if i.context.get("topic") == "ack"] == [first[0].key]
    clock.set(berlin(2026, 3, 4, 9, 1))
    nxt = [i for i in due(plan(report, CONFIG, clock()), clock()) if i.context.get("topic") == "ack"]
    assert len(nxt) == 1 and nxt[0].key != first[0].key
    answered = replace(report, first_response_at=utc(2026, 3, 4, 7))
    assert not [i for i in plan(answered, CONFIG, clock()) if i.context.get("topic") == "ack"]


def test_triage_cve_and_disclosure_passed_reminders() -> None:
    """Untriaged after two workdays, CVE requested two days ago, and a passed date each make a reminder."""
    now = utc(2026, 3, 12, 12)
    untriaged = facts(state="acknowledged", triaged_at=None, created_at=utc(2026, 3, 6, 10))  # Friday
    topics = {i.context.get("topic") for i in due(plan(untriaged, CONFIG, now), now)}
    assert "triage" in topics
    cve = complete(cve=None, cve_requested_at=utc(2026, 3, 9), disclose_at=utc(2026, 3, 11, 8))
    topics = {i.context.get("topic") for i in due(plan(cve, CONFIG, now), now)}
    assert {"cve", "disclosure_passed"} <= topics


def test_leak_decision_next_workday_and_retrospective_after_publication() -> None:
    """A leak gives one decision reminder the next workday and, after publication, one retrospective reminder."""
    leaked = facts(leaked_at=berlin(2026, 3, 27, 15))  # Friday
    decision = [i for i in plan(leaked, CONFIG, utc(2026, 3, 27, 16)) if i.context.get("topic") == "leak_decision"]
    assert len(decision) == 1 and decision[0].due_at == berlin(2026, 3, 30, 9)
    published = complete(leaked_at=berlin(2026, 3, 27, 15), state="published", published_at=berlin(2026, 3, 31, 9))
    retro = [i for i in plan(published, CONFIG, utc(2026, 4, 1, 8)) if i.context.get("topic") == "retrospective"]
    assert len(retro) == 1 and retro[0].due_at == berlin(2026, 4, 1, 9)


def test_nothing_is_due_before_its_instant() -> None:
    """due() never returns an item whose instant is still ahead."""
    now = utc(2026, 3, 10)
    items = plan(complete(disclose_at=berlin(2026, 3, 30, 9)), CONFIG, now)
    assert all(item.due_at <= now for item in due(items, now))
    assert not kinds(due(items, now), Kind.RELEASE)


def test_a_plan_cut_at_an_instant_is_exactly_what_is_due_by_then_in_the_whole_plan() -> None:
    """plan_all(due_by=T) (the scheduler's pass: nothing else is held) keeps the full plan's items due by T, in its
    order: previews, the shared advance notice of two reports, releases, embargo notices and reminders alike."""
    members = (Member("a@distro.test", True, utc(2026, 3, 3)),)
    reports = [complete(disclose_at=berlin(2026, 3, 30, 9), members=members),
               replace(complete(disclose_at=berlin(2026, 3, 30, 14), severity="critical"), report_id=2,
                       tracking_id="SEC-2026-0002"),
               replace(facts(state="new", first_response_at=None, triaged_at=None, accepted_at=None), report_id=3,
                       tracking_id="SEC-2026-0003")]
    now = utc(2026, 3, 10)
    whole = plan_all(reports, CONFIG, now)
    assert {Kind.PREVIEW, Kind.ADVANCE_NOTICE, Kind.RELEASE, Kind.EMBARGO_NOTICE} <= {item.kind for item in whole}
    sizes = []
    for cut in (now, berlin(2026, 3, 20, 12), berlin(2026, 3, 23, 9), berlin(2026, 3, 27, 10), berlin(2026, 3, 31)):
        expected = [item for item in whole if item.due_at <= cut]
        assert plan_all(iter(reports), CONFIG, now, due_by=cut) == expected
        sizes.append(len(expected))
    assert 0 < sizes[0] < sizes[2] < sizes[-1] == len(whole)  # the cuts do cut, the last one takes all
