"""The container image, built and run as documented (README "Running it in production").

No image can be pulled here: the base ``debian:bookworm-slim`` is built locally by
``docker/build-base`` (debootstrap + ``docker import``) when it is missing, and the
image is built with the layer cache, so only the first run takes minutes. The
container runs with ``--network host`` on free loopback ports against a fresh named
volume; the capture relay of the test receives its mail.

Needs a running dockerd (``scripts/system-deps`` starts one) and, for the base,
root and debootstrap. Under CI=true a missing piece fails the test.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.conftest import run, unavailable
from tests.dovecot import free_port
from tests.relay import CaptureRelay

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
IMAGE = "security-mailer:test"
BASE = "debian:bookworm-slim"
# The image's own HEALTHCHECK command, checked every 2 s here instead of every 30 s.
HEALTH_INTERVAL = "2s"
# Locally added CAs (a TLS-intercepting proxy's) for pip inside the build; see the Dockerfile.
LOCAL_CAS = Path("/usr/local/share/ca-certificates")


def _docker(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DOCKER_BUILDKIT": "0"}  # the classic builder: no buildx needed, --network host works
    result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, check=False, env=env)
    if check and result.returncode != 0:
        output = (result.stdout + result.stderr).strip()  # the classic builder prints RUN failures on stdout
        raise AssertionError(f"docker {' '.join(args[:3])} … failed ({result.returncode}): {output[-3000:]}")
    return result


@pytest.fixture(scope="session")
def dockerd() -> None:
    if shutil.which("docker") is None:
        unavailable("docker (apt-get install docker.io)")
    info = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True, timeout=60, check=False)
    if info.returncode != 0:
        unavailable(f"dockerd (scripts/system-deps starts it): {info.stderr.strip()[-300:]}")


@pytest.fixture(scope="session")
def image(dockerd: None) -> str:
    """The base (built locally when missing), then the image from the work tree, with the layer cache."""
    if _docker("image", "inspect", BASE, check=False).returncode != 0:
        if shutil.which("debootstrap") is None and not Path("/usr/sbin/debootstrap").exists():
            unavailable(f"debootstrap (apt-get install debootstrap), to build {BASE}")
        if os.getuid() != 0:
            unavailable(f"root, to debootstrap {BASE}")
        started = time.monotonic()
        result = subprocess.run([str(ROOT / "docker" / "build-base")], capture_output=True, text=True, timeout=1800, check=False)
        assert result.returncode == 0, f"docker/build-base failed: {result.stderr[-3000:]}"
        print(f"built {BASE} in {time.monotonic() - started:.0f} s")
    cas = "".join(p.read_text() for p in sorted(LOCAL_CAS.glob("*.crt"))) if LOCAL_CAS.is_dir() else ""
    context = os.environ.get("MAILER_TEST_IMAGE_CONTEXT", str(ROOT))  # a clean checkout, to try a commit
    started = time.monotonic()
    _docker("build", "--force-rm", "--network", "host", "--build-arg", f"EXTRA_CA_CERTS={cas}", "-t", IMAGE, context, timeout=1800)
    print(f"built {IMAGE} in {time.monotonic() - started:.1f} s")
    # the images this tag pointed at before: gone (the layers still in use stay as the cache)
    _docker("image", "prune", "-f", "--filter", "label=org.opencontainers.image.title=security-mailer", check=False)
    return IMAGE


@pytest.fixture
def volume(dockerd: None) -> Iterator[str]:
    name = f"secmailer-test-{uuid.uuid4().hex[:10]}"
    _docker("volume", "create", name)
    yield name
    _docker("volume", "rm", "-f", name, check=False)


@pytest.fixture
async def container_relay() -> AsyncIterator[CaptureRelay]:
    relay = CaptureRelay()
    await relay.start()
    yield relay
    await relay.stop()


async def docker(*args: str, timeout: float = 120) -> tuple[int, str]:
    return await run("docker", *args, timeout=timeout)


async def _wait_for(predicate: object, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await predicate():  # type: ignore[operator]
            return
        await asyncio.sleep(0.5)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def test_image_metadata(image: str) -> None:
    """Non-root, the data dir a volume, both intake ports exposed, a health check, exec-form entry point."""
    config = json.loads(_docker("image", "inspect", image, "--format", "{{json .Config}}").stdout)
    assert config["User"] == "mailer"
    assert "/srv/mailer/var" in config["Volumes"]
    assert {"8025/tcp", "8024/tcp"} <= set(config["ExposedPorts"])
    assert config["Healthcheck"]["Test"] == ["CMD-SHELL", "mailer health || exit 1"]
    assert config["Entrypoint"] == ["/usr/local/bin/mailer-entrypoint"]
    assert config["Cmd"] == ["serve"]
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["MAILER_SMTP_LISTEN"] == "0.0.0.0:8025"
    assert env["MAILER_LMTP_LISTEN"] == "0.0.0.0:8024"
    # the volume's mount point exists in the image, owned by the service user, private
    listing = _docker("run", "--rm", "--network", "none", "--entrypoint", "stat", image,
                      "-c", "%U %a %n", "/srv/mailer/var", "/srv/mailer/var/gnupg").stdout.split("\n")
    assert listing[:2] == ["mailer 700 /srv/mailer/var", "mailer 700 /srv/mailer/var/gnupg"]


async def test_container_serves_acks_is_healthy_and_keeps_reports(
    image: str, volume: str, container_relay: CaptureRelay, swaks: str
) -> None:
    smtp, lmtp = free_port(), free_port()
    name = f"secmailer-test-{uuid.uuid4().hex[:10]}"
    code, out = await docker(
        "run", "-d", "--name", name, "--network", "host", "--health-interval", HEALTH_INTERVAL,
        "-v", f"{volume}:/srv/mailer/var",
        "-e", f"MAILER_SMTP_LISTEN=127.0.0.1:{smtp}", "-e", f"MAILER_LMTP_LISTEN=127.0.0.1:{lmtp}",
        "-e", f"MAILER_RELAY_URL={container_relay.url}", "-e", "MAILER_SERVICE_CONTACT=security@example.org",
        image,
    )
    assert code == 0, out
    try:
        async def listening() -> bool:
            state = json.loads((await docker("inspect", "--format", "{{json .State}}", name))[1])
            assert state["Running"], f"container exited {state['ExitCode']}: {(await docker('logs', name))[1][-3000:]}"
            _, logs = await docker("logs", name)
            return f"SMTP listening on 127.0.0.1:{smtp}" in logs

        await _wait_for(listening, "the SMTP listener", 120)
        _, logs = await docker("logs", name)
        assert "up to date" in logs  # the entry point migrated the fresh volume first

        # PID 1 is `mailer serve` itself (exec form), as the service user
        code, cmdline = await docker("exec", name, "cat", "/proc/1/cmdline")
        assert code == 0 and cmdline.split("\0")[-2:] == ["serve", ""] and "mailer" in cmdline, cmdline
        assert (await docker("exec", name, "id", "-u"))[1].strip() == "10001"

        code, out = await run(
            swaks, "--server", f"127.0.0.1:{smtp}", "--to", "security@example.org", "--from", "rita@reporter.test",
            "--header", "Subject: heap overflow in the parser",
            "--body", "Description: heap overflow in the parser\nVersions: 1.2\n",
        )
        assert code == 0, out

        async def acked() -> bool:
            return bool(container_relay.handler.to("rita@reporter.test"))

        await _wait_for(acked, "the acknowledgement at the capture relay", 60)
        [ack] = container_relay.handler.to("rita@reporter.test")
        assert "SEC-" in str(ack.message["Subject"])

        async def healthy() -> bool:
            status = (await docker("inspect", "--format", "{{.State.Health.Status}}", name))[1].strip()
            assert status != "unhealthy", (await docker("inspect", "--format", "{{json .State.Health}}", name))[1]
            return status == "healthy"

        await _wait_for(healthy, "docker inspect to report healthy", 90)

        started = time.monotonic()
        code, out = await docker("stop", name, timeout=60)
        assert code == 0, out
        stopped_in = time.monotonic() - started
        state = json.loads((await docker("inspect", "--format", "{{json .State}}", name))[1])
        assert state["ExitCode"] == 0, (state, (await docker("logs", name))[1][-3000:])  # a clean exit on SIGTERM
        assert stopped_in < 10, f"docker stop took {stopped_in:.1f} s: SIGTERM was not handled"
    finally:
        await docker("rm", "-f", name)

    # the report is in the volume: read it from a second container on the same volume
    code, out = await docker("run", "--rm", "--network", "none", "-v", f"{volume}:/srv/mailer/var", image, "reports", "list", "--json")
    assert code == 0, out
    reports = json.loads(out[out.index("[") :])
    assert [r["reporter"] for r in reports] == ["rita@reporter.test"]
    assert reports[0]["id"] in str(ack.message["Subject"])


async def test_skip_migrate_on_a_fresh_volume_refuses_to_serve(image: str, volume: str) -> None:
    """MAILER_SKIP_MIGRATE=1 leaves the schema alone: on a fresh volume `serve` stops with a clear message."""
    code, out = await docker(
        "run", "--rm", "--network", "none", "-e", "MAILER_SKIP_MIGRATE=1", "-e", "MAILER_SMTP_LISTEN=127.0.0.1:0",
        "-e", "MAILER_LMTP_LISTEN=", "-v", f"{volume}:/srv/mailer/var", image, timeout=120,
    )
    assert code != 0, out
    assert "up to date" not in out
    assert "db upgrade" in out, out
