"""Configuration: one TOML file, overridable key by key from the environment.

Read once at the entry point into a typed, validated :class:`Config` and passed
down. Every key is documented in ``config/mailer.example.toml``. Any key
``[section] key`` can be overridden by ``MAILER_<SECTION>_<KEY>``; the file is
named by ``--config`` or ``MAILER_CONFIG``. A wrong value stops the start with
a :class:`ConfigError` naming the key and the expected form."""

from __future__ import annotations

from mailer.config.core import (
    CommandsConfig,
    DatabaseConfig,
    GnupgConfig,
    ImapConfig,
    ListenerConfig,
    LmtpConfig,
    Maintainer,
    ParsingConfig,
    RelayConfig,
    ServiceConfig,
    SmtpConfig,
    StorageConfig,
    WorkerConfig,
    parse_hostport,
    read_secret,
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
from mailer.config.files import check_files, check_private_files, named_files, private_dir, sqlite_path
from mailer.config.loading import check_environment, known_variables, load_config
from mailer.config.model import Config

__all__ = [
    "AdvisoryConfig",
    "AnnounceConfig",
    "CommandsConfig",
    "Config",
    "DatabaseConfig",
    "DigestConfig",
    "GnupgConfig",
    "HealthConfig",
    "ImapConfig",
    "ListenerConfig",
    "LmtpConfig",
    "LoggingConfig",
    "Maintainer",
    "MetricsConfig",
    "ParsingConfig",
    "PolicyConfig",
    "RelayConfig",
    "RetentionConfig",
    "ScheduleConfig",
    "SecurityTxtConfig",
    "ServiceConfig",
    "SmtpConfig",
    "StorageConfig",
    "WorkerConfig",
    "check_environment",
    "check_files",
    "check_private_files",
    "known_variables",
    "load_config",
    "named_files",
    "parse_hostport",
    "private_dir",
    "read_secret",
    "sqlite_path",
]
