"""Backups: one consistent archive of a running service, and its restore into an empty data dir.

The archive (``.tar.gz``, mode 0600: it holds the service's secret key) contains

- ``mailer.db``: a SQLite database copied with SQLite's online backup API
  (a consistent snapshot while the service writes; a plain ``cp`` of a WAL
  database is not), or ``database.sql`` from ``pg_dump`` for PostgreSQL when
  ``pg_dump`` is installed (else the archive says how to dump it);
- ``gnupg/``: the service's GnuPG home (its key pair and the maintainers' keys), without sockets and locks;
- ``data.key``: the key that encrypts report content at rest, when it is a file;
- ``config.toml``: the configuration file, when one is in use;
- ``manifest.json``: what is inside, the service key fingerprint, the report count and the last tracking id.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sqlite3
import subprocess
import tarfile
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mailer.config import Config, private_dir, sqlite_path
from mailer.errors import MailerError

FORMAT = 1
_SKIP = ("S.", ".#lk", "random_seed")


class BackupError(MailerError):
    """A backup or restore that cannot be done, with the reason."""


def _pg_url(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def _sqlite_snapshot(source: Path, target: Path) -> None:
    src = sqlite3.connect(f"file:{source.resolve()}?mode=ro", uri=True, timeout=30)
    dst = sqlite3.connect(target)
    try:
        src.backup(dst)  # one step: a consistent snapshot even while the service writes
        dst.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
        check = dst.execute("PRAGMA integrity_check").fetchone()
        if not check or check[0] != "ok":
            raise BackupError(f"the copy of {source} failed its integrity check: {check}")
    finally:
        src.close()
        dst.close()


def _facts(url: str) -> dict[str, Any]:
    """Report count and the last tracking id, read with plain SQL (no data key needed)."""
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            count = conn.execute(text("SELECT count(*) FROM reports")).scalar_one()
            last = conn.execute(text("SELECT tracking_id FROM reports ORDER BY id DESC LIMIT 1")).scalar()
            counters = {name: value for name, value in conn.execute(text("SELECT name, value FROM counters"))}
    finally:
        engine.dispose()
    return {"reports": int(count), "last_tracking_id": last, "counters": counters}


def _gnupg_filter(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
    name = Path(info.name).name
    if name.startswith(_SKIP) or name.endswith(".lock") or not (info.isfile() or info.isdir()):
        return None
    return info


def service_fingerprint(config: Config) -> str | None:
    try:
        from mailer.openpgp import open_keyring

        return open_keyring(config).service_fingerprint()
    except Exception:  # noqa: BLE001 - a backup without the fingerprint in its manifest is still a backup
        return None


def backup(config: Config, dest: Path, *, config_path: str | None = None) -> dict[str, Any]:
    """Write the archive; ``dest`` is a file name or an existing directory. Returns the manifest (plus ``archive``)."""
    now = datetime.now(UTC)
    if dest.is_dir():
        dest = dest / f"mailer-backup-{now.strftime('%Y%m%dT%H%M%SZ')}.tar.gz"
    manifest: dict[str, Any] = {"format": FORMAT, "created_at": now.isoformat(timespec="seconds"), "contents": []}
    with tempfile.TemporaryDirectory(prefix="mailer-backup-") as tmp_name:
        tmp = Path(tmp_name)
        db_file = sqlite_path(config.database_url)
        if db_file is not None:
            if not db_file.is_file():
                raise BackupError(f"database {db_file} does not exist")
            _sqlite_snapshot(db_file, tmp / "mailer.db")
            manifest["database"] = "sqlite"
            manifest.update(_facts(f"sqlite:///{tmp / 'mailer.db'}"))
        else:
            manifest["database"] = "postgresql"
            manifest.update(_facts(config.database_url))
            pg_dump = shutil.which("pg_dump")
            if pg_dump is None:
                manifest["database_note"] = ("pg_dump is not installed here: dump the database yourself, e.g. "
                                             "`pg_dump --no-owner --format=plain URL > database.sql`, and keep it with this archive")
            else:
                done = subprocess.run([pg_dump, "--no-owner", "--format=plain", "--file", str(tmp / "database.sql"),
                                       _pg_url(config.database_url)], capture_output=True, text=True, timeout=3600, check=False)
                if done.returncode != 0:
                    raise BackupError(f"pg_dump failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}")
        manifest["service_key"] = service_fingerprint(config)
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w:gz") as tar:
            for name in ("mailer.db", "database.sql"):
                if (tmp / name).exists():
                    tar.add(tmp / name, arcname=name)
                    manifest["contents"].append(name)
            if config.gnupg_home.is_dir():
                tar.add(config.gnupg_home, arcname="gnupg", filter=_gnupg_filter)
                manifest["contents"].append("gnupg")
            key_file = _data_key_file(config)
            if key_file is not None and key_file.is_file():
                tar.add(key_file, arcname="data.key")
                manifest["contents"].append("data.key")
            if config_path:
                tar.add(config_path, arcname="config.toml")
                manifest["contents"].append("config.toml")
            blob = json.dumps(manifest, indent=2).encode("utf-8")
            info = tarfile.TarInfo("manifest.json")
            info.size, info.mtime, info.mode = len(blob), int(now.timestamp()), 0o600
            tar.addfile(info, io.BytesIO(blob))
    manifest["archive"] = str(dest)
    return manifest


def _data_key_file(config: Config) -> Path | None:
    try:
        from mailer import atrest
    except ImportError:
        return None
    storage = getattr(config, "storage", None)
    return atrest.key_file_path(config.service.data_dir, getattr(storage, "data_key_file", None))


def _restore_gnupg(source: Path, home: Path) -> None:
    if not _empty(home):
        raise BackupError(f"GnuPG home {home} is not empty")
    if home.exists():
        home.rmdir()
    private_dir(home.parent)
    shutil.copytree(source, home)
    for root, _dirs, files in os.walk(home):
        os.chmod(root, 0o700)
        for name in files:
            os.chmod(os.path.join(root, name), 0o600)


def _empty(path: Path) -> bool:
    return not path.exists() or (path.is_dir() and not any(path.iterdir()))


def restore(config: Config, archive: Path) -> dict[str, Any]:
    """Unpack an archive into an empty data dir (and the configured database file and GnuPG home)."""
    data_dir = config.service.data_dir
    if not _empty(data_dir):
        raise BackupError(f"restore needs an empty data dir; {data_dir} is not empty")
    with tempfile.TemporaryDirectory(prefix="mailer-restore-") as tmp_name:
        tmp = Path(tmp_name)
        try:
            with tarfile.open(archive, mode="r:gz") as tar:
                tar.extractall(tmp, filter="data")
        except (OSError, tarfile.TarError) as exc:
            raise BackupError(f"cannot read {archive}: {exc}") from None
        try:
            manifest: dict[str, Any] = json.loads((tmp / "manifest.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise BackupError(f"{archive} is not a mailer backup (no manifest.json)") from None
        private_dir(data_dir)
        db_file = sqlite_path(config.database_url)
        if (tmp / "mailer.db").exists():
            if db_file is None:
                raise BackupError("the archive holds a SQLite database but database.url names PostgreSQL")
            if db_file.exists():
                raise BackupError(f"database {db_file} exists already")
            private_dir(db_file.parent)
            shutil.copyfile(tmp / "mailer.db", db_file)
            os.chmod(db_file, 0o600)
        elif (tmp / "database.sql").exists():
            target = data_dir / "database.sql"
            shutil.copyfile(tmp / "database.sql", target)
            os.chmod(target, 0o600)
            manifest["next_step"] = f"load the dump into an empty database: psql DATABASE_URL < {target}"
        if (tmp / "gnupg").is_dir():
            _restore_gnupg(tmp / "gnupg", config.gnupg_home)
        if (tmp / "data.key").exists():
            key_file = _data_key_file(config)
            if key_file is not None:
                if key_file.exists():
                    raise BackupError(f"data key file {key_file} exists already")
                shutil.copyfile(tmp / "data.key", key_file)
                os.chmod(key_file, 0o600)
        if (tmp / "config.toml").exists():
            target = data_dir / "config.restored.toml"
            shutil.copyfile(tmp / "config.toml", target)
            os.chmod(target, 0o600)
    return manifest
