"""The files the configuration names, checked at start: readable, and private where they hold secrets."""

from __future__ import annotations

import os
from pathlib import Path

from mailer.config.model import Config
from mailer.errors import ConfigError


def named_files(config: Config) -> list[tuple[str, Path]]:
    """Every file the configuration names, with its key."""
    files = [
        ("relay.password_file", config.relay.password_file),
        ("imap.password_file", config.imap.password_file if config.imap.enabled else None),
        ("imap.ca_file", config.imap.ca_file if config.imap.enabled else None),
        ("gnupg.passphrase_file", config.gnupg.passphrase_file),
    ]
    return [(key, path) for key, path in files if path is not None]


def check_files(config: Config) -> None:
    """Read and validate every file named in the configuration.

    :raises ConfigError: naming the key and the path of a missing, unreadable or invalid one.
    """
    for key, path in named_files(config):
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"{key}: cannot read {path}: {exc.strerror or exc}") from None
        if key.endswith("ca_file"):
            import ssl

            try:
                ssl.create_default_context(cafile=str(path))
            except (ssl.SSLError, ValueError) as exc:
                raise ConfigError(f"{key}: {path} holds no usable PEM certificate: {exc}") from None
        elif not data.strip():
            raise ConfigError(f"{key}: {path} is empty")
        else:
            try:
                data.decode("utf-8")
            except UnicodeDecodeError:
                raise ConfigError(f"{key}: {path} is not UTF-8 text") from None


def private_dir(path: Path) -> Path:
    """Create a directory (and missing parents) 0700 whatever the umask; an existing one is left as it is.

    :raises ConfigError: when it cannot be created.
    """
    missing = []
    probe = path
    while not probe.exists():
        missing.append(probe)
        if probe.parent == probe:
            break
        probe = probe.parent
    try:
        for item in reversed(missing):
            item.mkdir(mode=0o700, exist_ok=True)
            os.chmod(item, 0o700)
    except OSError as exc:
        raise ConfigError(f"cannot create directory {path}: {exc.strerror or exc}") from None
    if not path.is_dir():
        raise ConfigError(f"{path} is not a directory")
    return path


def sqlite_path(url: str) -> Path | None:
    """The file of a SQLite URL (None for PostgreSQL or an in-memory database)."""
    if not url.startswith("sqlite"):
        return None
    path = url.split("///", 1)[-1]
    return Path(path) if path and path != ":memory:" else None


def check_private_files(config: Config) -> None:
    """Refuse a GnuPG home or database readable by others (``service.allow_shared_files`` allows it).

    :raises ConfigError: naming the file, its mode and the fix.
    """
    if config.service.allow_shared_files:
        return
    candidates: list[tuple[str, Path]] = [("gnupg home", config.gnupg_home)]
    db = sqlite_path(config.database_url)
    if db is not None:
        candidates += [("database", db), ("database", Path(f"{db}-wal")), ("database", Path(f"{db}-shm"))]
    for what, path in candidates:
        try:
            mode = path.stat().st_mode & 0o777
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise ConfigError(f"cannot inspect {what} {path}: {exc.strerror or exc}") from None
        if mode & 0o044:
            want = "700" if path.is_dir() else "600"
            raise ConfigError(
                f"{what} {path} is readable by others (mode {mode:04o}): chmod {want} {path}, "
                "or set service.allow_shared_files = true"
            )
