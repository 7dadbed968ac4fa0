"""The sections the service needs to run: identity, listeners, database, relay, IMAP, GnuPG, worker, parsing."""

from __future__ import annotations

import os
import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from mailer.errors import ConfigError
from mailer.text import normalise_address

_HOSTPORT = re.compile(r"^(?P<host>\[[0-9a-fA-F:]+\]|[A-Za-z0-9.\-]+):(?P<port>\d{1,5})$")
_FINGERPRINT = re.compile(r"^[0-9A-F]{40}$")


def _address(value: str, example: str) -> str:
    """The one address check (mailer.text), lower-cased; the error says what was expected."""
    try:
        return normalise_address(value).lower()
    except ValueError as exc:
        raise ValueError(f"expected an email address{' ' + example if example else ''}, got {value!r} ({exc})") from None


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


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServiceConfig(Section):
    contact: str = "security@example.org"
    contact_name: str = "Example Security Contact"
    project: str = "Example"
    data_dir: Path = Path("./var")
    tracking_prefix: str = "SEC"
    ack_sla_hours: int = Field(24, ge=1)
    acks_per_sender_per_day: int = Field(5, ge=0)
    hostname: str = ""
    # refuse to start when the GnuPG home or the database is readable by others, unless this is true
    allow_shared_files: bool = False
    shutdown_grace_seconds: float = Field(10.0, gt=0)

    @field_validator("contact")
    @classmethod
    def _contact(cls, value: str) -> str:
        return _address(value, "like security@example.org")

    @field_validator("tracking_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Z][A-Z0-9]{1,9}", value):
            raise ValueError("expected 2-10 upper-case letters or digits, starting with a letter")
        return value

    @property
    def contact_domain(self) -> str:
        return self.contact.rpartition("@")[2]


class Listening(Section):
    """A section with a ``listen = "HOST:PORT"`` key (empty: off)."""

    listen: str = ""

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        if value:
            parse_hostport(value)
        return value

    @property
    def address(self) -> tuple[str, int] | None:
        return parse_hostport(self.listen) if self.listen else None


class ListenerConfig(Listening):
    max_message_size: int = Field(25 * 1024 * 1024, ge=1024)


class SmtpConfig(ListenerConfig):
    listen: str = "127.0.0.1:8025"


class LmtpConfig(ListenerConfig):
    """LMTP is off unless a listen address is given."""


class DatabaseConfig(Section):
    url: str = ""

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if value and not re.match(r"^(sqlite|postgresql(\+psycopg)?)://", value):
            raise ValueError("expected sqlite:///PATH or postgresql+psycopg://USER@HOST/DB")
        return value


class RelayConfig(Section):
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


class ImapConfig(Section):
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


class GnupgConfig(Section):
    home: Path | None = None
    passphrase: SecretStr = SecretStr("")
    passphrase_file: Path | None = None
    sendkey_suffix: str = "sendkey"
    allow_cleartext_to_maintainers: bool = False
    timeout_seconds: float = Field(30.0, gt=0)
    max_output_bytes: int = Field(32 * 1024 * 1024, ge=1024 * 1024)
    #: unsigned encrypted mail is decrypted by a helper process holding the encryption subkey (mailer.openpgp.helper)
    decrypt_helper: bool = True

    @field_validator("sendkey_suffix")
    @classmethod
    def _suffix(cls, value: str) -> str:
        if not re.fullmatch(r"[a-z0-9]{1,32}", value):
            raise ValueError("expected 1-32 lower-case letters or digits")
        return value

    def secret(self) -> str | None:
        return read_secret(self.passphrase, self.passphrase_file) or None


class CommandsConfig(Section):
    max_signature_age_hours: float = Field(72.0, gt=0)
    notify: str = "all"

    @field_validator("notify")
    @classmethod
    def _notify(cls, value: str) -> str:
        if value not in ("all", "incident_manager"):
            raise ValueError("expected all or incident_manager")
        return value


def available_cpus() -> float:
    """The CPUs this process may use: its affinity, capped by a cgroup v2 CPU quota (a container's ``--cpus``)."""
    cpus: float = len(os.sched_getaffinity(0))
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text(encoding="ascii").split()[:2]
        if quota != "max":
            cpus = min(cpus, int(quota) / int(period))
    except (OSError, ValueError, ZeroDivisionError):  # no cgroup v2 file, or one we cannot read: the affinity
        pass
    return cpus


def default_worker_processes() -> int:
    """One worker process when the service has two CPUs or more (processing gets a core of its own), else threads."""
    return 1 if available_cpus() >= 2 else 0


class WorkerConfig(Section):
    max_attempts: int = Field(5, ge=1)
    retry_base_seconds: float = Field(30.0, gt=0)
    poll_seconds: float = Field(5.0, gt=0)
    concurrency: int = Field(4, ge=1, le=64)
    lease_seconds: float = Field(30.0, gt=0)
    #: 0: messages are processed in threads of the service process; N: in N worker processes
    #: (mailer.workerproc), so processing has cores of its own beside intake and the sender.
    #: Default: 1 with two CPUs or more (:func:`default_worker_processes`), else 0.
    processes: int = Field(default_factory=default_worker_processes, ge=0, le=16)


class ParsingConfig(Section):
    max_parts: int = Field(200, ge=1)
    max_depth: int = Field(20, ge=1)
    max_attachment_bytes: int = Field(10 * 1024 * 1024, ge=0)
    # attachments ride along with the maintainers' notice (encrypted) up to this total; larger ones are listed
    notice_attachment_bytes: int = Field(5 * 1024 * 1024, ge=0)


class StorageConfig(Section):
    """Report content is encrypted at rest (mailer.atrest) under a data key kept outside the database."""

    # the key file (base64 keys, one a line, the last one current); default <data_dir>/data.key, created 0600.
    # MAILER_DATA_KEY (the keys themselves) takes precedence.
    data_key_file: Path | None = None


class Maintainer(Section):
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
        return _address(value, "")
