"""A private Postfix in front of the service, configured as docs/postfix.md says.

:class:`Postfix` writes a ``config_directory`` of its own (main.cf, master.cf, the
recipient and transport maps, ``postmap``-ed) with ``queue_directory`` and
``data_directory`` beside it, and runs ``postfix -c DIR check`` / ``start`` /
``stop``: Debian's ``postfix`` package, never the system instance
(``/etc/postfix`` is not read). It listens on 127.0.0.1 only:

- ``port``: the MX-facing smtpd. Mail for the contact's domain is accepted only for
  the addresses in ``relay_recipient_maps`` (the contact and its ``-sendkey``
  address, ``+`` sub-addresses), everything else is refused at RCPT, and nothing
  else is relayed; accepted mail goes to the service by ``lmtp:inet:``.
- ``submission_port``: where the service's relay URL points; mail from loopback is
  relayed to ``relayhost`` (in the tests, the capture relay).

Postfix needs root (its daemons drop to ``mail_owner``), so the directory is made
under /tmp, traversable by the ``postfix`` user.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from tests.dovecot import free_port

POSTFIX = shutil.which("postfix") or ("/usr/sbin/postfix" if Path("/usr/sbin/postfix").exists() else None)
SBIN = Path(POSTFIX).parent if POSTFIX else Path("/usr/sbin")

_MAIN_CF = """\
compatibility_level = 3.6
# everything of this instance lives under {dir}; /etc/postfix is only read for postfix-files
queue_directory = {dir}/queue
data_directory = {dir}/data
meta_directory = /etc/postfix
mail_owner = postfix
setgid_group = postdrop
maillog_file = {dir}/maillog
maillog_file_prefixes = {dir}
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
myhostname = mx.postfix.test
mydomain = postfix.test
myorigin = $myhostname
mydestination =
mynetworks = 127.0.0.0/8
alias_maps =
alias_database =
local_recipient_maps =
biff = no
smtp_dns_support_level = disabled
smtputf8_enable = no
message_size_limit = 26214400

# --- the recipe of docs/postfix.md ---
relay_domains = {domain}
# only these recipients exist: unknown local parts get 550 at RCPT (no bounce, no backscatter)
relay_recipient_maps = hash:{conf}/relay_recipients
recipient_delimiter = +
transport_maps = hash:{conf}/transport
# the service answers per recipient over LMTP; Postfix keeps and retries what it defers
lmtp_destination_recipient_limit = 50

# the service's outgoing mail (its relay URL points at the submission port) goes on to:
relayhost = {relayhost}
# no rewriting of the service's signed mail
local_header_rewrite_clients =
"""

_MASTER_CF = """\
# service type  private unpriv  chroot  wakeup  maxproc command + args
127.0.0.1:{port} inet n - n - - smtpd
  -o syslog_name=postfix/mx
  -o smtpd_relay_restrictions=reject_unauth_destination
127.0.0.1:{submission_port} inet n - n - - smtpd
  -o syslog_name=postfix/submission
  -o smtpd_client_restrictions=permit_mynetworks,reject
  -o smtpd_relay_restrictions=permit_mynetworks,reject
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class PostfixUnavailable(RuntimeError):
    """Postfix is not installed, cannot run here, or did not start; the message says why."""


class Postfix:
    """One private Postfix instance relaying ``domain`` to the service's LMTP port."""

    def __init__(self, *, domain: str, recipients: list[str], lmtp_port: int, relayhost: str) -> None:
        if POSTFIX is None:
            raise PostfixUnavailable("postfix not found (apt-get install postfix)")
        if os.getuid() != 0:
            raise PostfixUnavailable("postfix needs root to start (its daemons run as mail_owner)")
        self.dir = Path(tempfile.mkdtemp(prefix="secmailer-postfix-"))
        self.dir.chmod(0o755)
        self.conf = self.dir / "conf"
        self.conf.mkdir(mode=0o755)
        self.port, self.submission_port = free_port(), free_port()
        self.lmtp_port = lmtp_port
        (self.dir / "queue").mkdir(mode=0o755)  # root-owned; `postfix check` creates what is inside
        (self.dir / "data").mkdir(mode=0o700)
        shutil.chown(self.dir / "data", "postfix", "postfix")
        (self.conf / "main.cf").write_text(
            _MAIN_CF.format(dir=self.dir, conf=self.conf, domain=domain, relayhost=relayhost)
        )
        (self.conf / "master.cf").write_text(_MASTER_CF.format(port=self.port, submission_port=self.submission_port))
        (self.conf / "relay_recipients").write_text("".join(f"{address} OK\n" for address in recipients))
        (self.conf / "transport").write_text(f"{domain} lmtp:inet:127.0.0.1:{lmtp_port}\n")
        try:
            for name in ("relay_recipients", "transport"):
                self._cmd("postmap", f"hash:{self.conf / name}")
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise

    def _cmd(self, program: str, *args: str, timeout: float = 60) -> str:
        argv = [str(SBIN / program), "-c", str(self.conf), *args]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
        if result.returncode != 0:
            raise PostfixUnavailable(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()} {self.log_tail()}")
        return result.stdout

    def check(self) -> None:
        """``postfix check``: creates the queue directories, fails on a config Postfix does not accept."""
        self._cmd("postfix", "check")

    def start(self, timeout: float = 30.0) -> None:
        self._cmd("postfix", "start")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.5) as sock:
                sock.settimeout(5)
                if sock.recv(100).startswith(b"220"):
                    return
            time.sleep(0.1)
        raise PostfixUnavailable(f"postfix did not answer on port {self.port} within {timeout}s: {self.log_tail()}")

    def stop(self) -> None:
        """``postfix stop`` and wait for the master to be gone (``abort`` when it lingers)."""
        pid_file = self.dir / "queue" / "pid" / "master.pid"
        if not pid_file.exists():
            return
        with contextlib.suppress(PostfixUnavailable):
            self._cmd("postfix", "stop")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and self.running():
            time.sleep(0.1)
        if self.running():
            with contextlib.suppress(PostfixUnavailable):
                self._cmd("postfix", "abort")

    def running(self) -> bool:
        return subprocess.run(
            [str(SBIN / "postfix"), "-c", str(self.conf), "status"], capture_output=True, timeout=30, check=False
        ).returncode == 0

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def flush(self) -> None:
        """``postqueue -f``: deliver the deferred mail now (and forget that the LMTP destination was down)."""
        self._cmd("postqueue", "-f")

    def queue(self) -> list[dict[str, object]]:
        """The queue as ``postqueue -j`` reports it: one dict per message (queue_name, recipients with delay_reason)."""
        out = self._cmd("postqueue", "-j")
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def log(self) -> str:
        path = self.dir / "maillog"
        return path.read_text(errors="replace") if path.exists() else ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log().splitlines()[-lines:])


def start_postfix(**kwargs: object) -> Postfix:
    """Configure, check and start a Postfix, or raise :class:`PostfixUnavailable` (cleaned up)."""
    server = Postfix(**kwargs)  # type: ignore[arg-type]
    try:
        server.check()
        server.start()
    except BaseException:
        server.cleanup()
        raise
    return server
