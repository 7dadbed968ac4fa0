"""Fixtures: real components on loopback, started by the tests themselves.

Every test that takes ``db_url`` runs twice: on SQLite (the embedded default)
and on PostgreSQL (127.0.0.1:5432; each test creates and drops its own
database). Under CI=true a component that cannot start fails the test run.
"""

from __future__ import annotations

import asyncio
import functools
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from mailer.app import Service
from mailer.config import Config
from mailer.db import upgrade
from mailer.openpgp import OpenPGP
from tests.relay import CaptureRelay

PG_ADMIN = os.environ.get("MAILER_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def unavailable(what: str) -> None:
    """A real component is missing: fail under CI, skip on a developer machine."""
    if IN_CI or os.environ.get("MAILER_TEST_STRICT"):
        pytest.fail(f"{what} is not available (CI=true: this is a failure, not a skip)")
    pytest.skip(f"{what} is not available")


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'mailer.db'}"
        return
    name = f"mailer_test_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        unavailable(f"PostgreSQL at {PG_ADMIN} ({exc})")
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def migrated(db_url: str) -> str:
    upgrade(db_url)
    return db_url


@pytest.fixture
async def relay() -> AsyncIterator[CaptureRelay]:
    relay = CaptureRelay()
    await relay.start()
    yield relay
    await relay.stop()


_HOMES: list[str] = []


@functools.cache
def _service_key_template() -> str:
    """One service key per test session (key generation is the slow part); each test gets a copy."""
    home = tempfile.mkdtemp(prefix="gt", dir="/tmp")
    gpg = OpenPGP(home)
    gpg.ensure_service_key("Example Security Contact", "security@example.org")
    gpg.kill_agent()
    return home


def gnupg_home() -> str:
    """A private, short (socket paths are limited) GNUPGHOME holding the test service key."""
    home = tempfile.mkdtemp(prefix="gh", dir="/tmp")
    shutil.copytree(_service_key_template(), home, dirs_exist_ok=True, ignore=shutil.ignore_patterns("S.*", "*.lock"))
    _HOMES.append(home)
    return home


def _kill_home(home: str) -> None:
    subprocess.run(["gpgconf", "--homedir", home, "--kill", "all"], capture_output=True, timeout=10, check=False)
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(autouse=True)
def _gnupg_homes() -> Iterator[None]:
    """Stop the gpg-agents of the homes a test created, and remove them."""
    yield
    while _HOMES:
        _kill_home(_HOMES.pop())


@pytest.fixture(scope="session", autouse=True)
def _gnupg_template_cleanup() -> Iterator[None]:
    yield
    if _service_key_template.cache_info().currsize:
        _kill_home(_service_key_template())


MAINTAINERS = [
    {"name": "Mara Maintainer", "address": "mara@project.test", "fingerprint": ""},
    {"name": "Max Maintainer", "address": "max@project.test", "fingerprint": ""},
]


def make_config(tmp_path: Path, db_url: str, relay_url: str, **sections: dict[str, Any]) -> Config:
    """A Config for one test: loopback listener on a free port, the capture relay, a private data dir."""
    raw: dict[str, Any] = {
        "service": {"data_dir": str(tmp_path / "var"), "contact": "security@example.org", "project": "Example"},
        "smtp": {"listen": "127.0.0.1:0"},
        "database": {"url": db_url},
        "relay": {"url": relay_url},
        "worker": {"retry_base_seconds": 0.01},
        "gnupg": {"home": gnupg_home()},
        "maintainers": MAINTAINERS,
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return Config.model_validate(raw)


@pytest.fixture
def config(tmp_path: Path, migrated: str, relay: CaptureRelay) -> Config:
    return make_config(tmp_path, migrated, relay.url)


@pytest.fixture
async def service(config: Config) -> AsyncIterator[Service]:
    """The service with its listener up; worker and sender are driven by ``settle()``, not background tasks."""
    svc = Service(config)
    await svc.start(background=False)
    yield svc
    await svc.stop()
    svc.db.dispose()


def smtp_port(svc: Service, name: str = "smtp") -> int:
    return svc.listening()[name][1]


async def run(*argv: str, stdin: bytes | None = None, timeout: float = 30) -> tuple[int, str]:
    """Run a real client program (swaks, gpg, the CLI) without blocking the event loop."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(proc.communicate(stdin), timeout)
    return proc.returncode or 0, out.decode("utf-8", errors="replace")


@pytest.fixture(scope="session")
def swaks() -> str:
    path = shutil.which("swaks")
    if path is None:
        unavailable("swaks (apt-get install swaks)")
    assert path is not None
    return path
