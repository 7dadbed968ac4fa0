"""Decrypting unsigned messages without a gpg process: a helper process that holds the encryption subkey.

A gpg process per decryption costs ~7 ms of CPU (exec, keyring, agent
handshake) for ~0.4 ms of actual decryption; on an encrypted report that is
the largest single cost left (issue 12). The helper
(:mod:`mailer.openpgp.decrypt_child`) is one long-lived process per keyring
object that decrypts with Sequoia-PGP; this module is its parent side.

What it takes and what it leaves to gpg (the result must not depend on which
of the two decrypted):

* only messages of exactly the shape ``PKESK… SEIPD(v1)`` in one armored block
  or binary, at most ``max_output`` bytes, decrypted to at most ``max_output``
  bytes; everything else (no MDC, a passphrase packet, several messages,
  a key we do not hold, whatever Sequoia refuses) goes to gpg, whose answer
  (and reason) stands;
* only **unsigned** messages: a message carrying a signature goes to gpg, which
  alone decides on signatures (keyring, revocation, expiry);
* the helper runs under an address-space limit: a compression bomb kills the
  helper, not the service, and the message goes to gpg (``--max-output``). A
  helper that died is not started again for :data:`RESTART_AFTER` seconds.

Only the encryption subkeys leave gpg-agent (``--export-secret-subkeys`` of
those, protected by the service passphrase), straight into the helper's stdin;
the primary key, which signs, stays in the agent. The helper is restarted after
:data:`MAX_AGE` seconds, so a key removed from the keyring by another process is
not used for longer than a key listing is cached, and at once when a secret key
is generated or imported here (importing a public key leaves it running); an
export that failed (a wrong passphrase) is tried again after that long too.
``gnupg.decrypt_helper = false`` turns it off.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import struct
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["CHILD", "DecryptHelper", "Decrypted"]

log = logging.getLogger(__name__)

#: the child's script, run by path in isolated mode (``-I``): nothing of the service is imported there
CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "decrypt_child.py")
#: seconds before a helper that died (or failed to start) is started again; gpg decrypts meanwhile
RESTART_AFTER = 10.0
#: seconds a helper serves before it is replaced (the keyring may have changed: as ``Keyring.LISTING_TTL``)
MAX_AGE = 30.0
#: what a pipe holds on Linux (64 KiB): a request this size is written without waiting
_PIPE_ROOM = 65536
#: how long a helper may take to start (load its key) before gpg is used instead
START_TIMEOUT = 10.0


@dataclass(frozen=True)
class Decrypted:
    """An unsigned message the helper decrypted: the plaintext and the key ids it was encrypted to."""

    data: bytes
    recipients: tuple[str, ...]


class HelperGone(Exception):
    """The helper did not answer (it died, timed out, or never started)."""


def _frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


class _Child:
    """One running helper process and its pipes; one exchange at a time (the caller holds the lock)."""

    def __init__(self, key: bytes, passphrase: str | None, max_output: int, timeout: float) -> None:
        self.timeout = timeout
        self.started = time.monotonic()
        # stderr: nothing (Rust's abort message of a bomb); the exit status is logged here
        self.process = subprocess.Popen([sys.executable, "-I", CHILD], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                        env={"PATH": os.environ.get("PATH", ""), "RUST_BACKTRACE": "0",
                                             "RUST_LIB_BACKTRACE": "0"})
        assert self.process.stdin is not None and self.process.stdout is not None
        os.set_blocking(self.process.stdin.fileno(), False)
        self._poll = select.poll()  # kept for the helper's life: no epoll set up per exchange
        self._poll.register(self.process.stdout.fileno(), select.POLLIN)
        self._poll.register(self.process.stdin.fileno(), 0)
        setup = {"max_output": max_output, "memory_bytes": 6 * max_output + 64 * 1024 * 1024,
                 "passphrase": passphrase}
        try:
            answer = self.exchange(_frame(json.dumps(setup).encode()) + _frame(key), START_TIMEOUT)
        except HelperGone:
            self.close()
            raise
        if answer != b"K":
            self.close()
            raise HelperGone(f"did not start: {answer[1:].decode('utf-8', 'replace') or 'no answer'}")

    def exchange(self, request: bytes, timeout: float) -> bytes:
        """Write *request* (whole frames), read one answer frame; :class:`HelperGone` if none comes in time.

        The pipe is empty when a request starts (every earlier one was answered), so a request
        that fits in it is written at once; a larger one is written as the helper reads it.
        """
        process = self.process
        assert process.stdin is not None and process.stdout is not None
        stdin, stdout = process.stdin.fileno(), process.stdout.fileno()
        deadline = time.monotonic() + timeout
        pending = memoryview(request)
        try:
            pending = pending[os.write(stdin, pending[:_PIPE_ROOM]):]
        except BlockingIOError:
            pass
        except OSError as exc:  # the helper is gone (EPIPE)
            raise HelperGone(str(exc)) from None
        if pending:
            self._poll.modify(stdin, select.POLLOUT)
        received = bytearray()
        wanted: int | None = None
        while wanted is None or len(received) < wanted + 4:
            remaining = deadline - time.monotonic()
            events = self._poll.poll(max(0.0, remaining) * 1000) if remaining > 0 else []
            if not events:
                raise HelperGone("timed out")
            for fd, mask in events:
                if fd == stdin:
                    if mask & (select.POLLERR | select.POLLHUP):  # the helper closed its input: it is gone
                        raise HelperGone(_exit_text(process))
                    try:
                        pending = pending[os.write(stdin, pending[:1 << 20]):]
                    except BlockingIOError:
                        continue
                    except OSError as exc:
                        raise HelperGone(str(exc)) from None
                    if not pending:
                        self._poll.modify(stdin, 0)
                    continue
                chunk = os.read(stdout, 1 << 20)
                if not chunk:
                    raise HelperGone(_exit_text(process))
                received += chunk
                if wanted is None and len(received) >= 4:
                    (wanted,) = struct.unpack(">I", received[:4])
        return bytes(received[4:])

    def close(self) -> None:
        _stop(self.process)


def _exit_text(process: subprocess.Popen[bytes]) -> str:
    try:
        code = process.wait(1.0)
    except subprocess.TimeoutExpired:
        return "closed its output"
    if code == -6:
        return "aborted: out of its memory limit (a compression bomb?)"
    return f"exited with {code}" if code >= 0 else f"killed by signal {-code}"


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Close the helper's stdin (it exits), kill it if it does not, and reap it."""
    for stream in (process.stdin, process.stdout):
        with contextlib.suppress(OSError):
            if stream is not None:
                stream.close()
    try:
        process.wait(1.0)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class DecryptHelper:
    """The parent side: starts the helper on first use and hands it the messages it can take.

    *export_key* returns the service's encryption subkeys (binary, as gpg
    exports them, protected by *passphrase*). :meth:`decrypt` returns ``None``
    for anything that gpg must decrypt instead.
    """

    def __init__(self, export_key: Callable[[], bytes], *, passphrase: str | None, max_output: int,
                 timeout: float, restart_after: float = RESTART_AFTER, max_age: float = MAX_AGE) -> None:
        self._export_key = export_key
        self.restart_after = restart_after
        self.max_age = max_age
        self._passphrase = passphrase
        self.max_output = max_output
        self.timeout = timeout
        self._child: _Child | None = None
        self._down_until = 0.0  # monotonic time before which no helper is started
        self._unavailable: str | None = None  # why the subkey could not be exported, last time
        self._lock = threading.Lock()
        self._finalizer: weakref.finalize[[subprocess.Popen[bytes]], DecryptHelper] | None = None

    def decrypt(self, data: bytes) -> Decrypted | None:
        """*data* decrypted if it is an unsigned message the helper can take; ``None``: let gpg do it."""
        if len(data) > self.max_output:
            return None
        with self._lock:
            child = self._running()
            if child is None:
                return None
            try:
                answer = child.exchange(_frame(data), self.timeout)
            except HelperGone as exc:
                log.warning("the decryption helper failed (%s): gpg decrypts for %.0f s", exc, self.restart_after)
                self._drop(down=True)
                return None
        if answer[:1] != b"D" or len(answer) < 2:
            return None  # S (signed), B (too large), X (not for the helper): gpg answers
        count = answer[1]
        ids = answer[2:2 + 8 * count]
        recipients = tuple(ids[i:i + 8].hex().upper() for i in range(0, len(ids), 8))
        return Decrypted(answer[2 + 8 * count:], recipients)

    @property
    def pid(self) -> int | None:
        """The running helper's process id (``None``: none runs now)."""
        child = self._child
        return child.process.pid if child is not None else None

    def forget(self) -> None:
        """The service's secret key may have changed: the next decryption starts a new helper."""
        with self._lock:
            self._drop(down=False)
            self._unavailable = None
            self._down_until = 0.0

    def close(self) -> None:
        self.forget()

    def _running(self) -> _Child | None:
        now = time.monotonic()
        if self._child is not None and now - self._child.started > self.max_age:
            self._drop(down=False)
        if self._child is None and now >= self._down_until:
            try:
                key = self._export_key()
            except Exception as exc:  # noqa: BLE001  # no helper is never an error: gpg decrypts
                # a wrong passphrase stays wrong, a busy gpg may not: tried again after max_age, said once
                if str(exc) != self._unavailable:
                    log.warning("decrypting with gpg, not in a helper process: %s", exc)
                self._unavailable, self._down_until = str(exc), now + self.max_age
                return None
            self._unavailable = None
            try:
                self._child = _Child(key, self._passphrase, self.max_output, self.timeout)
            except (HelperGone, OSError) as exc:
                log.warning("decrypting with gpg, not in the helper, for %.0f s: %s", self.restart_after, exc)
                self._down_until = now + self.restart_after
                return None
            self._finalizer = weakref.finalize(self, _stop, self._child.process)
        return self._child

    def _drop(self, *, down: bool) -> None:
        child, self._child = self._child, None
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if child is not None:
            child.close()
        if down:
            self._down_until = time.monotonic() + self.restart_after
