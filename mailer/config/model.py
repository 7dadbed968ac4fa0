"""The whole configuration: one typed object, read once at the entry point and passed down."""

from __future__ import annotations

from pathlib import Path

from mailer.config.core import (
    CommandsConfig,
    DatabaseConfig,
    GnupgConfig,
    ImapConfig,
    LmtpConfig,
    Maintainer,
    ParsingConfig,
    RelayConfig,
    Section,
    ServiceConfig,
    SmtpConfig,
    StorageConfig,
    WorkerConfig,
)
from mailer.config.features import (
    AdvisoryConfig,
    AnnounceConfig,
    DigestConfig,
    HealthConfig,
    LoggingConfig,
    MetricsConfig,
    PolicyConfig,
    RetentionConfig,
    ScheduleConfig,
    SecurityTxtConfig,
)


class Config(Section):
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
    storage: StorageConfig = StorageConfig()
    logging: LoggingConfig = LoggingConfig()
    metrics: MetricsConfig = MetricsConfig()
    health: HealthConfig = HealthConfig()
    retention: RetentionConfig = RetentionConfig()
    security_txt: SecurityTxtConfig = SecurityTxtConfig()
    digest: DigestConfig = DigestConfig()
    advisory: AdvisoryConfig = AdvisoryConfig()
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
