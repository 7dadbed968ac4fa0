"""A private Dovecot for the IMAP tests and the benchmark.

:class:`Dovecot` writes a config under a directory of its own (base_dir, state,
maildirs, log, a passwd-file user with a ``{PLAIN}`` password), runs
``dovecot -c CONF -F`` as a child process on a free loopback port and can be
stopped and started again on the same port (to test reconnects). Plaintext
LOGIN without TLS is allowed only because it listens on 127.0.0.1.
:func:`append_messages` and :func:`imap_session` are small ``imaplib`` helpers
(blocking: call them with ``asyncio.to_thread``) so the tests feed the server
the way a real MTA-side client would.
"""

from __future__ import annotations

import contextlib
import grp
import imaplib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

DOVECOT = shutil.which("dovecot") or ("/usr/sbin/dovecot" if Path("/usr/sbin/dovecot").exists() else None)
USER = "security"
PASSWORD = "s3cret-imap"

_CONF = """\
base_dir = {dir}/run
state_dir = {dir}/state
instance_name = secmailer-test-{port}
log_path = {dir}/dovecot.log
protocols = imap
listen = 127.0.0.1
ssl = {ssl}
{ssl_files}
disable_plaintext_auth = no
auth_mechanisms = plain login
mail_location = maildir:{dir}/mail/%u
mail_uid = {uid}
mail_gid = {gid}
first_valid_uid = 0
first_valid_gid = 0
{users}
mailbox_idle_check_interval = 1 secs
imap_idle_notify_interval = 10 secs
{extra}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {dir}/users
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={dir}/home/%u
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {imaps_port}
    ssl = yes
  }}
}}
"""


class DovecotUnavailable(RuntimeError):
    """Dovecot is not installed or did not start; the message says why."""


def _service_users() -> str:
    """Root: Debian's dovecot/dovenull users (imap-login refuses root); otherwise everything as us, unchrooted."""
    if os.getuid() == 0:
        return "default_internal_user = dovecot\ndefault_login_user = dovenull"
    user, group = pwd.getpwuid(os.getuid()).pw_name, grp.getgrgid(os.getgid()).gr_name
    return (
        f"default_internal_user = {user}\ndefault_internal_group = {group}\ndefault_login_user = {user}\n"
        "service anvil {\n  chroot =\n}\nservice imap-login {\n  chroot =\n}"
    )


def _mail_ids() -> tuple[int, int]:
    """Dovecot never touches mail as root: as root, the mail belongs to Debian's ``dovecot`` user."""
    if os.getuid() == 0:
        entry = pwd.getpwnam("dovecot")
        return entry.pw_uid, entry.pw_gid
    return os.getuid(), os.getgid()


def _private_dir(requested: Path) -> tuple[Path, bool]:
    """As root the mail user must traverse the path, and pytest's tmp dirs are 0700: use our own under /tmp."""
    if os.getuid() != 0:
        requested.mkdir(parents=True, exist_ok=True)
        return requested, False
    path = Path(tempfile.mkdtemp(prefix="secmailer-dovecot-"))
    path.chmod(0o755)
    requested.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(OSError):
        (requested / "dovecot-dir").symlink_to(path)
    return path, True


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _children(parent: int) -> dict[int, bytes]:
    """Direct children of ``parent`` with their command lines (to re-check before signalling)."""
    found: dict[int, bytes] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
            found[int(entry.name)] = _cmdline(int(entry.name))
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Dovecot:
    """One Dovecot instance with one user, confined to ``directory``."""

    def __init__(
        self, directory: Path, *, extra_conf: str = "", cert: tuple[Path, Path] | None = None
    ) -> None:
        if DOVECOT is None:
            raise DovecotUnavailable("dovecot binary not found (apt-get install dovecot-imapd)")
        self.dir, self._owned = _private_dir(directory)
        directory = self.dir
        self.port = free_port()
        self.imaps_port = free_port() if cert else 0
        self.user, self.password = USER, PASSWORD
        self.conf = directory / "dovecot.conf"
        self.process: subprocess.Popen[bytes] | None = None
        mail_uid, mail_gid = _mail_ids()
        for sub in ("run", "state", "mail", "home"):
            (directory / sub).mkdir(parents=True, exist_ok=True)
            if sub in ("mail", "home"):
                os.chown(directory / sub, mail_uid, mail_gid)
        (directory / "users").write_text(f"{USER}:{{PLAIN}}{PASSWORD}::::::\n")
        ssl_files = f"ssl_cert = <{cert[0]}\nssl_key = <{cert[1]}" if cert else ""
        self.conf.write_text(
            _CONF.format(
                dir=directory, port=self.port, imaps_port=self.imaps_port, ssl="yes" if cert else "no",
                ssl_files=ssl_files, uid=mail_uid, gid=mail_gid, extra=extra_conf,
                users=_service_users(),
            )
        )

    @property
    def maildir(self) -> Path:
        return self.dir / "mail" / USER

    def check(self) -> None:
        """``dovecot -n``: the config parses (raises with Dovecot's own words otherwise)."""
        assert DOVECOT is not None
        result = subprocess.run([DOVECOT, "-c", str(self.conf), "-n"], capture_output=True, text=True, timeout=30, check=False)
        if result.returncode != 0:
            raise DovecotUnavailable(f"dovecot -n failed: {result.stderr.strip() or result.stdout.strip()}")

    def start(self, timeout: float = 15.0) -> None:
        assert DOVECOT is not None and self.process is None
        self.process = subprocess.Popen(
            [DOVECOT, "-c", str(self.conf), "-F"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode(errors="replace") if self.process.stderr else ""
                self.process = None
                raise DovecotUnavailable(f"dovecot exited at start: {err.strip()} {self.log_tail()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.5) as sock:
                sock.settimeout(2)
                if sock.recv(100).startswith(b"* OK"):
                    return
            time.sleep(0.05)
        self.stop()
        raise DovecotUnavailable(f"dovecot did not answer on port {self.port} within {timeout}s: {self.log_tail()}")

    def stop(self) -> None:
        """Stop the master and its children (dovecot sends BYE to open sessions)."""
        if self.process is None:
            return
        process, self.process = self.process, None
        children = _children(process.pid)
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
        if process.stderr:
            process.stderr.close()
        # Orphaned imap/log/stats children linger for a while after the master: end them now, by pid,
        # so a restart really disconnects clients (each imap process says BYE on SIGTERM).
        for pid, cmdline in children.items():
            with contextlib.suppress(OSError):
                if _cmdline(pid) == cmdline:
                    os.kill(pid, signal.SIGTERM)
        # the master is gone; wait until the port is free again so a restart can bind it
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), 0.2):
                    pass
            except OSError:
                return
            time.sleep(0.05)

    def cleanup(self) -> None:
        """Stop, and remove the directory when it was created here."""
        self.stop()
        if self._owned:
            shutil.rmtree(self.dir, ignore_errors=True)

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_tail(self, lines: int = 20) -> str:
        log = self.dir / "dovecot.log"
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else ""


def start_dovecot(directory: Path, **kwargs: object) -> Dovecot:
    """Configure, check and start a Dovecot, or raise :class:`DovecotUnavailable`."""
    server = Dovecot(directory, **kwargs)  # type: ignore[arg-type]
    server.check()
    server.start()
    return server


@contextlib.contextmanager
def imap_session(server: Dovecot, mailbox: str | None = "INBOX") -> Iterator[imaplib.IMAP4]:
    """A logged-in ``imaplib`` connection (mailbox selected unless None)."""
    conn = imaplib.IMAP4("127.0.0.1", server.port, timeout=30)
    try:
        conn.login(server.user, server.password)
        if mailbox is not None:
            typ, data = conn.select(mailbox)
            assert typ == "OK", data
        yield conn
    finally:
        with contextlib.suppress(Exception):
            conn.logout()


def append_messages(server: Dovecot, messages: Iterable[bytes], mailbox: str = "INBOX", flags: str = "") -> int:
    """APPEND every message over one connection; returns how many."""
    count = 0
    with imap_session(server, None) as conn:
        for raw in messages:
            typ, data = conn.append(mailbox, f"({flags})" if flags else None, None, raw)
            assert typ == "OK", data
            count += 1
    return count


def mailbox_uids(server: Dovecot, mailbox: str, criteria: str = "ALL") -> list[int]:
    """UIDs in ``mailbox`` matching a SEARCH; [] when the mailbox does not exist."""
    with imap_session(server, None) as conn:
        typ, _ = conn.select(mailbox, readonly=True)
        if typ != "OK":
            return []
        typ, data = conn.uid("SEARCH", criteria)
        assert typ == "OK", data
        return [int(u) for u in (data[0] or b"").split()]


def make_message(index: int, *, sender: str | None = None, size: int = 0, tag: str = "batch") -> bytes:
    """A plain report from its own sender (acks are rate limited per sender), CRLF line ends."""
    sender = sender or f"reporter{index}@reporter.test"
    body = f"Description: bug number {index}\r\nSteps to reproduce: run case {index}\r\nVersions: 1.{index}\r\n"
    if size:
        body += ("x" * 76 + "\r\n") * (size // 78 + 1)
    return (
        f"Return-Path: <{sender}>\r\n"
        f"From: Reporter {index} <{sender}>\r\n"
        f"To: security@example.org\r\n"
        f"Subject: {tag} issue {index}\r\n"
        f"Message-ID: <{tag}-{index}@reporter.test>\r\n"
        f"Date: Mon, 01 Jan 2024 10:00:00 +0000\r\n"
        f"\r\n{body}"
    ).encode()
