"""The sections of the workflow around the mailbox: commands, timeline, publishing, operations."""

from __future__ import annotations

import re
from datetime import time
from typing import Any

from pydantic import Field, field_validator

from mailer.config.core import Listening, Section

_HOURS = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-3]):([0-5]\d)$")


def _addresses(value: Any) -> Any:
    """A list of addresses; from the environment a comma-separated string."""
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    return value


class AnnounceConfig(Section):
    """Public announce lists: the advance-disclosure and security-release mail (issue 8)."""

    lists: tuple[str, ...] = ()
    advance_notice_workdays: int = Field(5, ge=0, le=60)
    preview_workdays: int = Field(1, ge=0, le=30)
    advisory_base_url: str = "https://github.com/advisories"
    project: str = ""

    @field_validator("lists", mode="before")
    @classmethod
    def _lists_from_env(cls, value: Any) -> Any:
        return _addresses(value)

    @field_validator("lists")
    @classmethod
    def _lists(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for address in value:
            if not re.fullmatch(r"[A-Za-z0-9._+\-]+@[A-Za-z0-9.\-]+\.[A-Za-z]{2,}", address):
                raise ValueError(f"expected email addresses like sec-announce@example.org, got {address!r}")
        return tuple(address.lower() for address in value)

    @field_validator("advisory_base_url")
    @classmethod
    def _advisory(cls, value: str) -> str:
        if not re.fullmatch(r"https://[^\s<>\"']{3,480}", value):
            raise ValueError(f"expected an https:// URL, got {value!r}")
        return value


class PolicyConfig(Section):
    """The security policy's supported release lines (e.g. ["0.14"]); empty: any version."""

    supported_versions: tuple[str, ...] = ()

    @field_validator("supported_versions", mode="before")
    @classmethod
    def _versions_from_env(cls, value: Any) -> Any:
        return _addresses(value)

    @field_validator("supported_versions")
    @classmethod
    def _versions(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for version in value:
            if not re.fullmatch(r"[\w.+\-~]{1,100}", version):
                raise ValueError(f"expected version lines like 0.14, got {version!r}")
        return value


class ScheduleConfig(Section):
    holidays_country: str = ""
    timezone: str = "UTC"
    disclosure_workdays: int = Field(5, ge=1, le=90)
    max_embargo_days: int = Field(90, ge=1)
    max_advance_notice_days: int = Field(14, ge=1)
    business_hours: str = "09:00-17:00"
    triage_sla_workdays: int = Field(2, ge=1)
    reminder_hour: int = Field(9, ge=0, le=23)

    @field_validator("business_hours")
    @classmethod
    def _hours(cls, value: str) -> str:
        match = _HOURS.match(value.replace(" ", ""))
        if not match or (match[3], match[4]) <= (match[1], match[2]):
            raise ValueError(f"expected HH:MM-HH:MM with the start before the end, like 09:00-17:00, got {value!r}")
        return value.replace(" ", "")

    @property
    def business_start(self) -> time:
        """The local hour at which date-only disclosures happen."""
        return time.fromisoformat(self.business_hours.split("-")[0])

    @property
    def business_end(self) -> time:
        return time.fromisoformat(self.business_hours.split("-")[1])

    @field_validator("timezone")
    @classmethod
    def _tz(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"expected an IANA time zone like Europe/Berlin, got {value!r}") from None
        return value

    @field_validator("holidays_country")
    @classmethod
    def _country(cls, value: str) -> str:
        if value:
            import holidays

            try:
                holidays.country_holidays(value)
            except NotImplementedError:
                raise ValueError(f"expected a country code known to the holidays library, got {value!r}") from None
        return value


class SecurityTxtConfig(Section):
    """What ``mailer security-txt`` writes besides the contact (RFC 9116); URLs are https."""

    encryption_url: str = ""  # where the service key is published, e.g. https://example.org/.well-known/openpgpkey/...
    policy_url: str = ""  # the SECURITY.md or policy page
    canonical_url: str = ""  # where this security.txt is served
    preferred_languages: str = "en"
    expires_days: int = Field(365, ge=1, le=366)

    @field_validator("encryption_url", "policy_url", "canonical_url")
    @classmethod
    def _https(cls, value: str) -> str:
        if value and not re.fullmatch(r"https://[^\s<>\"]{3,480}", value):
            raise ValueError(f"expected an https:// URL, got {value!r}")
        return value


class DigestConfig(Section):
    """The maintainers' daily digest of open reports (workdays only; none when nothing is open)."""

    hour: int | None = Field(8, ge=0, le=23)  # local time ([schedule] timezone); empty/None: no digest


class AdvisoryConfig(Section):
    """What advisory records (``mailer advisory``) say about the package."""

    ecosystem: str = ""  # OSV ecosystem, e.g. PyPI, npm, crates.io, Go, GitHub Actions
    package: str = ""
    repository: str = ""  # https URL of the source repository
    vendor: str = ""  # CVE record vendor; defaults to the project
    cve_org_id: str = ""  # the CNA's org UUID for CVE records (cvelib fills it in on submission when empty)
    attach_osv: bool = True  # the security-release email carries the OSV record when one can be written


class LoggingConfig(Section):
    """One line per message at INFO, never its content (mailer.logs)."""

    level: str = "INFO"
    format: str = "text"

    @field_validator("level")
    @classmethod
    def _level(cls, value: str) -> str:
        if value.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ValueError(f"expected DEBUG, INFO, WARNING or ERROR, got {value!r}")
        return value.upper()

    @field_validator("format")
    @classmethod
    def _format(cls, value: str) -> str:
        if value not in ("text", "json"):
            raise ValueError(f"expected text or json, got {value!r}")
        return value


class MetricsConfig(Listening):
    """The optional Prometheus endpoint (mailer.metrics); off when ``listen`` is empty."""


class HealthConfig(Section):
    """Thresholds of ``mailer health`` (mailer.health)."""

    # the service writes <data_dir>/health.json this often; older than stale_seconds counts as stuck
    write_seconds: float = Field(10.0, gt=0)
    stale_seconds: float = Field(60.0, gt=0)
    # the relay may fail this long (since its last success) before health says so
    relay_grace_seconds: float = Field(300.0, ge=0)
    # a pending outgoing mail older than this, or a received message unprocessed this long, is a problem
    outbox_pending_seconds: float = Field(900.0, ge=0)
    received_stuck_seconds: float = Field(300.0, ge=0)


class RetentionConfig(Section):
    """What is purged, and when (mailer.retention); 0 keeps everything."""

    raw_messages_days: int = Field(0, ge=0)
    closed_reports_days: int = Field(0, ge=0)
