"""Configuration: one TOML file, overridable key by key from the environment.

Read once at the entry point into a typed, validated :class:`Config` and passed
down. Every key is documented in ``config/mailer.example.toml``. Any key
``[section] key`` can be overridden by ``MAILER_<SECTION>_<KEY>``; the file is
named by ``--config`` or ``MAILER_CONFIG``. A wrong value stops the start with
a :class:`ConfigError` naming the key and the expected form.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from datetime import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from mailer.errors import ConfigError

_HOSTPORT = re.compile(r"^(?P<host>\[[0-9a-fA-F:]+\]|[A-Za-z0-9.\-]+):(?P<port>\d{1,5})$")
_FINGERPRINT = re.compile(r"^[0-9A-F]{40}$")


def parse_hostport(value: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (IPv6 in brackets) into its parts."""
    match = _HOSTPORT.match(value)
    if not match or not 0 <= int(match["port"]) < 65536:
        raise ValueError(f"expected HOST:PORT (port 0 picks a free one), got {value!r}")
    return match["host"].strip("[]"), int(match["port"])


def read_secret(value: SecretStr, path: Path | None) -> str:
    """A secret from its file (preferred: kept out of the environment) or the config value."""
    if path is not None:
        try:
            return path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"cannot read secret file {path}: {exc.strerror}") from None
    return value.get_secret_value()


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServiceConfig(_Section):
    contact: str = "security@example.org"
    contact_name: str = "Example Security Contact"
    project: str = "Example"
    data_dir: Path = Path("./var")
    tracking_prefix: str = "SEC"
    ack_sla_hours: int = Field(24, ge=1)
    acks_per_sender_per_day: int = Field(5, ge=0)
    hostname: str = ""

    @field_validator("contact")
    @classmethod
    def _contact(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9._+\-]+@[A-Za-z0-9.\-]+\.[A-Za-z]{2,}", value):
            raise ValueError(f"expected an email address like security@example.org, got {value!r}")
        return value.lower()

    @field_validator("tracking_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Z][A-Z0-9]{1,9}", value):
            raise ValueError("expected 2-10 upper-case letters or digits, starting with a letter")
        return value

    @property
    def contact_domain(self) -> str:
        return self.contact.rpartition("@")[2]


class ListenerConfig(_Section):
    listen: str = ""
    max_message_size: int = Field(25 * 1024 * 1024, ge=1024)

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        if value:
            parse_hostport(value)
        return value

    @property
    def address(self) -> tuple[str, int] | None:
        return parse_hostport(self.listen) if self.listen else None


class SmtpConfig(ListenerConfig):
    listen: str = "127.0.0.1:8025"


class LmtpConfig(ListenerConfig):
    """LMTP is off unless a listen address is given."""


class DatabaseConfig(_Section):
    url: str = ""

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if value and not re.match(r"^(sqlite|postgresql(\+psycopg)?)://", value):
            raise ValueError("expected sqlite:///PATH or postgresql+psycopg://USER@HOST/DB")
        return value


class RelayConfig(_Section):
    url: str = ""
    starttls: bool = False
    username: str = ""
    password: SecretStr = SecretStr("")
    password_file: Path | None = None
    timeout_seconds: float = Field(30.0, gt=0)
    retry_hours: float = Field(48.0, gt=0)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if value and not re.match(r"^(smtp|smtps)://[^/:]+(:\d+)?/?$|^maildir:.+$", value):
            raise ValueError("expected smtp://HOST:PORT, smtps://HOST:PORT or maildir:PATH")
        return value

    def secret(self) -> str:
        return read_secret(self.password, self.password_file)


class ImapConfig(_Section):
    enabled: bool = False
    host: str = ""
    port: int = Field(993, ge=1, le=65535)
    username: str = ""
    password: SecretStr = SecretStr("")
    password_file: Path | None = None
    mailbox: str = "INBOX"
    processed_mailbox: str = "Processed"
    security: str = "tls"
    ca_file: Path | None = None
    poll_seconds: float = Field(60.0, gt=0)
    idle_seconds: float = Field(240.0, gt=0)
    max_message_size: int = Field(25 * 1024 * 1024, ge=1024)

    @field_validator("security")
    @classmethod
    def _security(cls, value: str) -> str:
        if value not in ("tls", "starttls", "none"):
            raise ValueError("expected tls, starttls or none")
        return value

    @model_validator(mode="after")
    def _cleartext_only_on_loopback(self) -> ImapConfig:
        if self.enabled and not self.host:
            raise ValueError("imap.host is required when imap.enabled is true")
        if self.enabled and self.security == "none" and self.host not in ("127.0.0.1", "::1", "localhost"):
            raise ValueError("imap.security = none is only allowed for a loopback host")
        return self

    def secret(self) -> str:
        return read_secret(self.password, self.password_file)


class GnupgConfig(_Section):
    home: Path | None = None
    passphrase: SecretStr = SecretStr("")
    passphrase_file: Path | None = None
    sendkey_suffix: str = "sendkey"
    allow_cleartext_to_maintainers: bool = False
    timeout_seconds: float = Field(30.0, gt=0)
    max_output_bytes: int = Field(32 * 1024 * 1024, ge=1024 * 1024)

    @field_validator("sendkey_suffix")
    @classmethod
    def _suffix(cls, value: str) -> str:
        if not re.fullmatch(r"[a-z0-9]{1,32}", value):
            raise ValueError("expected 1-32 lower-case letters or digits")
        return value

    def secret(self) -> str | None:
        return read_secret(self.passphrase, self.passphrase_file) or None


class CommandsConfig(_Section):
    max_signature_age_hours: float = Field(72.0, gt=0)
    notify: str = "all"

    @field_validator("notify")
    @classmethod
    def _notify(cls, value: str) -> str:
        if value not in ("all", "incident_manager"):
            raise ValueError("expected all or incident_manager")
        return value


_HOURS = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-3]):([0-5]\d)$")


def _addresses(value: Any) -> Any:
    """A list of addresses; from the environment a comma-separated string."""
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    return value


class AnnounceConfig(_Section):
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


class PolicyConfig(_Section):
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


class ScheduleConfig(_Section):
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


class WorkerConfig(_Section):
    max_attempts: int = Field(5, ge=1)
    retry_base_seconds: float = Field(30.0, gt=0)
    poll_seconds: float = Field(5.0, gt=0)


class ParsingConfig(_Section):
    max_parts: int = Field(200, ge=1)
    max_depth: int = Field(20, ge=1)
    max_attachment_bytes: int = Field(10 * 1024 * 1024, ge=0)


class Maintainer(_Section):
    name: str
    address: str
    fingerprint: str = ""

    @field_validator("fingerprint")
    @classmethod
    def _fpr(cls, value: str) -> str:
        value = value.replace(" ", "").upper()
        if value and not _FINGERPRINT.match(value):
            raise ValueError("expected a 40-hex-digit OpenPGP v4 fingerprint")
        return value

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        if not re.fullmatch(r"[^@\s<>]+@[^@\s<>]+", value):
            raise ValueError(f"expected an email address, got {value!r}")
        return value.lower()


class Config(_Section):
    service: ServiceConfig = ServiceConfig()
    smtp: SmtpConfig = SmtpConfig()
    lmtp: LmtpConfig = LmtpConfig()
    database: DatabaseConfig = DatabaseConfig()
    relay: RelayConfig = RelayConfig()
    imap: ImapConfig = ImapConfig()
    gnupg: GnupgConfig = GnupgConfig()
    commands: CommandsConfig = CommandsConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    announce: AnnounceConfig = AnnounceConfig()
    policy: PolicyConfig = PolicyConfig()
    worker: WorkerConfig = WorkerConfig()
    parsing: ParsingConfig = ParsingConfig()
    maintainers: tuple[Maintainer, ...] = ()

    @property
    def database_url(self) -> str:
        return self.database.url or f"sqlite:///{self.service.data_dir / 'mailer.db'}"

    @property
    def relay_url(self) -> str:
        return self.relay.url or f"maildir:{self.service.data_dir / 'outgoing'}"

    @property
    def gnupg_home(self) -> Path:
        return self.gnupg.home or self.service.data_dir / "gnupg"

    @property
    def sendkey_address(self) -> str:
        local, _, domain = self.service.contact.partition("@")
        return f"{local}-{self.gnupg.sendkey_suffix}@{domain}"

    @property
    def hostname(self) -> str:
        return self.service.hostname or self.service.contact_domain

    @property
    def project(self) -> str:
        """The project named in announcements: ``announce.project``, else ``service.project``."""
        return self.announce.project or self.service.project


_SECTIONS = {name: field.annotation for name, field in Config.model_fields.items() if name != "maintainers"}


def _env_overrides(raw: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """Apply ``MAILER_<SECTION>_<KEY>`` variables on top of the file's values."""
    merged = {key: dict(value) if isinstance(value, dict) else value for key, value in raw.items()}
    for section, model in _SECTIONS.items():
        for key in model.model_fields:  # type: ignore[union-attr]
            env = f"MAILER_{section}_{key}".upper()
            if env in environ:
                merged.setdefault(section, {})[key] = environ[env]
    return merged


def _describe(error: ValidationError, environ: Mapping[str, str]) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"])
        env = "MAILER_" + "_".join(str(p) for p in item["loc"]).upper()
        origin = f" (from {env})" if env in environ else ""
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        lines.append(f"{key}{origin}: {message}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def load_config(path: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Read the TOML file (if any) and the environment into a validated Config.

    :raises ConfigError: naming the key and the expected form.
    """
    environ = os.environ if environ is None else environ
    path = path or environ.get("MAILER_CONFIG") or None
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"configuration file not found: {path}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"configuration file {path} is not valid TOML: {exc}") from None
    try:
        return Config.model_validate(_env_overrides(raw, environ))
    except ValidationError as exc:
        raise ConfigError(_describe(exc, environ)) from None
