"""IMAP intake over TLS against a real Dovecot: implicit TLS, STARTTLS, and a certificate from the wrong CA."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from inbound.imap import ImapPoller
from mailer.config import Config
from mailer.db import Database
from mailer.models import InboundMessage, Report
from tests.conftest import make_config, unavailable
from tests.dovecot import Dovecot, DovecotUnavailable, make_message, start_dovecot
from tests.relay import CaptureRelay
from tests.test_imap import acked, append, count, running, service, uids, until

SAN = "subjectAltName = DNS:localhost, IP:127.0.0.1"


@dataclass(frozen=True)
class Pki:
    """A CA the poller trusts, a server cert it signed, and an equally named server cert from another CA."""

    ca: Path
    cert: tuple[Path, Path]
    rogue_cert: tuple[Path, Path]


def _openssl(*args: str | Path) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        unavailable("openssl CLI (apt-get install openssl)")
    assert openssl is not None
    result = subprocess.run([openssl, *map(str, args)], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, f"openssl {' '.join(map(str, args))}: {result.stderr}"


def _make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    crt, key = directory / f"{name}.crt", directory / f"{name}.key"
    _openssl(
        "req", "-x509", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-sha256",
        "-days", "2", "-subj", f"/CN={name}", "-keyout", key, "-out", crt,
        "-addext", "basicConstraints = critical, CA:TRUE", "-addext", "keyUsage = critical, keyCertSign, cRLSign",
    )
    return crt, key


def _make_server_cert(directory: Path, name: str, ca: tuple[Path, Path]) -> tuple[Path, Path]:
    crt, key, csr, ext = (directory / f"{name}{suffix}" for suffix in (".crt", ".key", ".csr", ".ext"))
    _openssl(
        "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-sha256",
        "-subj", "/CN=localhost", "-keyout", key, "-out", csr,
    )
    ext.write_text(
        f"{SAN}\nbasicConstraints = critical, CA:FALSE\nkeyUsage = critical, digitalSignature\n"
        "extendedKeyUsage = serverAuth\n"
    )
    _openssl(
        "x509", "-req", "-in", csr, "-CA", ca[0], "-CAkey", ca[1], "-CAcreateserial", "-days", "2", "-sha256",
        "-extfile", ext, "-out", crt,
    )
    key.chmod(0o600)
    return crt, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca, rogue_ca = _make_ca(directory, "test-ca"), _make_ca(directory, "rogue-ca")
    return Pki(
        ca=ca[0],
        cert=_make_server_cert(directory, "server", ca),
        rogue_cert=_make_server_cert(directory, "rogue-server", rogue_ca),
    )


def _start(directory: Path, cert: tuple[Path, Path]) -> Dovecot:
    try:
        return start_dovecot(directory, cert=cert)
    except (DovecotUnavailable, OSError) as exc:
        unavailable(f"dovecot with TLS ({exc})")
        raise


@pytest.fixture
def tls_dovecot(tmp_path: Path, pki: Pki) -> Iterator[Dovecot]:
    server = _start(tmp_path / "dovecot", pki.cert)
    yield server
    server.cleanup()


@pytest.fixture
def rogue_dovecot(tmp_path: Path, pki: Pki) -> Iterator[Dovecot]:
    server = _start(tmp_path / "dovecot-rogue", pki.rogue_cert)
    yield server
    server.cleanup()


def tls_config(
    tmp_path: Path, db_url: str, relay: CaptureRelay, server: Dovecot, *, pki: Pki, security: str, **imap: Any
) -> Config:
    """IMAP alone over TLS, trusting only the test CA: implicit TLS on the imaps port, STARTTLS on the plain one."""
    values = {
        "enabled": True, "port": server.imaps_port if security == "tls" else server.port,
        "host": "localhost" if security == "tls" else "127.0.0.1",  # both names are in the certificate
        "username": server.user, "password": server.password, "security": security, "ca_file": str(pki.ca),
        "poll_seconds": 60, "idle_seconds": 60,
    }
    values.update(imap)
    return make_config(tmp_path, db_url, relay.url, smtp={"listen": ""}, imap=values)


def logins(server: Dovecot) -> list[str]:
    """Successful IMAP logins in Dovecot's log, each with its TLS state."""
    log = server.dir / "dovecot.log"
    return [line for line in log.read_text(errors="replace").splitlines() if "imap-login: Info: Login: user=" in line]


@pytest.mark.parametrize("security", ["tls", "starttls"])
async def test_messages_are_fetched_and_filed_over_tls(
    tmp_path: Path, migrated: str, relay: CaptureRelay, tls_dovecot: Dovecot, *, pki: Pki, security: str
) -> None:
    """Trusting the server's CA via ca_file, the poller logs in over TLS, stores, files and moves every message."""
    await append(tls_dovecot, [make_message(i, tag=security) for i in range(5)])
    async with service(tls_config(tmp_path, migrated, relay, tls_dovecot, pki=pki, security=security)) as svc:
        await until(lambda: svc.imap.counters.stored >= 5, "5 stored over TLS")
        await svc.settle()
        assert count(svc.db, InboundMessage) == 5 and count(svc.db, Report) == 5
        await until(lambda: svc.imap.health["state"] == "idle", "IDLE over TLS")
        assert svc.imap.health["connected"] is True and svc.imap.health["last_error"] is None
    assert acked(relay, 5) == 5
    assert await uids(tls_dovecot, "INBOX") == []
    assert len(await uids(tls_dovecot, "Processed")) == 5
    ours = [line for line in logins(tls_dovecot) if "TLS" in line and "user=<security>" in line]
    assert ours, logins(tls_dovecot)


@pytest.mark.parametrize("security", ["tls", "starttls"])
async def test_certificate_from_another_ca_is_refused(
    tmp_path: Path, migrated: str, relay: CaptureRelay, rogue_dovecot: Dovecot, *, pki: Pki, security: str
) -> None:
    """A certificate not signed by ca_file is refused: no login, nothing stored, the poller keeps retrying and says why."""
    await append(rogue_dovecot, [make_message(i, tag="rogue") for i in range(3)])
    before = logins(rogue_dovecot)  # the fixture's own plaintext APPEND session
    config = tls_config(tmp_path, migrated, relay, rogue_dovecot, pki=pki, security=security)
    db = Database(config.database.url)
    poller = ImapPoller(config.imap, db, backoff_initial=0.1, backoff_max=0.2)
    try:
        async with running(poller) as task:
            await until(lambda: poller.health["consecutive_failures"] >= 3, "three refused attempts")
            assert not task.done()
            health = poller.health
            assert health["connected"] is False and health["state"] in ("backoff", "connecting")
            assert "certificate verify failed" in (health["last_error"] or ""), health["last_error"]
            await asyncio.sleep(0.5)
            assert not task.done()
        assert poller.counters.stored == 0 and poller.polled.is_set() is False
        assert count(db, InboundMessage) == 0
    finally:
        db.dispose()
    assert logins(rogue_dovecot) == before
    assert len(await uids(rogue_dovecot, "INBOX")) == 3
    assert await uids(rogue_dovecot, "Processed") == []
