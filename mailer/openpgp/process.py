"""The bounded gpg process: every gpg run has a timeout, an output cap and a typed outcome.

:class:`BoundedGPG` is python-gnupg with two guards on every gpg it starts:

* a timer kills gpg after ``timeout`` seconds (the run is marked ``timed_out``);
* the stdout reader keeps at most ``max_output`` bytes; on the first byte beyond
  the cap it kills gpg and drops the rest (``output_truncated``), so memory
  stays bounded whatever gpg emits.

:meth:`BoundedGPG.run` (every operation of the service) drives gpg's three
pipes from the calling thread with a selector, the guards included, where
python-gnupg starts three threads per process and hands each status line to
Python as it comes: in a worker process those threads took the GIL from the
thread holding the database's write lock. python-gnupg's own methods (key
listing, import, export) keep its threads, with the same guards.

gpg always runs with ``--batch --no-tty`` (python-gnupg adds them), without any
automatic key retrieval and with a scrubbed environment (no DISPLAY/GPG_TTY,
so no pinentry pop-ups).  :meth:`BoundedGPG.run` returns a :class:`GpgRun`
record built where gpg ran: status lines in order, exit code, stdout and the
guard flags.  Everything here is blocking; call it through
``asyncio.to_thread`` from asyncio code.
"""

from __future__ import annotations

import contextlib
import os
import re
import selectors
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import IO, Any

import gnupg

from mailer.metrics import GPG
from mailer.openpgp.errors import GnuPGVersionError

__all__ = [
    "DEFAULT_MAX_OUTPUT",
    "DEFAULT_TIMEOUT",
    "MIN_GNUPG",
    "MIN_PYTHON_GNUPG",
    "BoundedGPG",
    "GpgRun",
    "check_versions",
    "kill_agent",
]

MIN_GNUPG: tuple[int, ...] = (2, 2, 36)
MIN_PYTHON_GNUPG: tuple[int, ...] = (0, 4, 4)

DEFAULT_TIMEOUT = 30.0
DEFAULT_MAX_OUTPUT = 32 * 1024 * 1024


# --------------------------------------------------------------------------- versions


def _fmt_version(version: Sequence[int]) -> str:
    return ".".join(str(v) for v in version)


def _parse_version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


def check_versions(
    gnupg_version: Sequence[int] | None = None,
    python_gnupg_version: str | None = None,
    gpgbinary: str = "gpg",
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Raise :class:`GnuPGVersionError` when GnuPG < 2.2.36 or python-gnupg < 0.4.4.

    Without arguments the installed versions are detected (``gpg --version``
    and ``gnupg.__version__``).  Returns the ``(gnupg, python_gnupg)`` versions.
    """
    if gnupg_version is None:
        out = subprocess.run([gpgbinary, "--batch", "--version"], capture_output=True, timeout=10, check=False)
        first = out.stdout.decode("utf-8", "replace").splitlines()[:1]
        gnupg_version = _parse_version(first[0]) if first else ()
    installed: str = gnupg.__version__
    pyver = _parse_version(python_gnupg_version if python_gnupg_version is not None else installed)
    gver = tuple(gnupg_version)
    if gver < MIN_GNUPG:
        raise GnuPGVersionError("GnuPG", _fmt_version(gver) or "unknown", _fmt_version(MIN_GNUPG))
    if pyver < MIN_PYTHON_GNUPG:
        raise GnuPGVersionError("python-gnupg", _fmt_version(pyver) or "unknown", _fmt_version(MIN_PYTHON_GNUPG))
    return gver, pyver


# --------------------------------------------------------------------------- one run


@dataclass(frozen=True)
class GpgRun:
    """What one gpg process left: its status lines (in order), exit code, stdout and guard flags.

    ``returncode`` is ``None`` only if gpg could not be waited for.  ``data``
    is whatever gpg printed, also on failure: the status rules decide whether
    it may be used (it is left out of ``repr``).
    """

    status: tuple[tuple[str, str], ...]
    returncode: int | None
    data: bytes = field(default=b"", repr=False)
    stderr: str = field(default="", repr=False)
    timed_out: bool = False
    output_truncated: bool = False
    input_broken: bool = False  # gpg exited (or was killed) before reading all of its input

    @property
    def keys(self) -> frozenset[str]:
        """The status keywords seen."""
        return frozenset(k for k, _ in self.status)

    def values(self, key: str) -> list[str]:
        """The arguments of every status line *key*, in order."""
        return [v for k, v in self.status if k == key]


class _Guard:
    """The kill switch of one gpg process (timeout and output cap)."""

    def __init__(self, process: subprocess.Popen[bytes] | None) -> None:
        self.process = process
        self.timed_out = False
        self.output_truncated = False
        self._lock = threading.Lock()

    def expire(self) -> None:
        with self._lock:
            self.timed_out = True
        _kill(self.process)

    def overflow(self) -> None:
        with self._lock:
            first = not self.output_truncated
            self.output_truncated = True
        if first:
            _kill(self.process)


# --------------------------------------------------------------------------- bounded gpg


class BoundedGPG(gnupg.GPG):  # type: ignore[misc]  # python-gnupg is untyped
    """python-gnupg with a per-process timeout and a cap on stdout (see the module docstring).

    The guards apply to every gpg this object starts, also through python-gnupg's
    own methods (``list_keys``, ``import_keys``, ...); :meth:`run` also reports them.
    """

    def __init__(self, gnupghome: str, *, timeout: float = DEFAULT_TIMEOUT,
                 max_output: int = DEFAULT_MAX_OUTPUT, gpgbinary: str = "gpg") -> None:
        # set before python-gnupg's __init__: it already runs gpg (--list-config)
        self.timeout = timeout
        self.max_output = max_output
        self._guards: dict[int, _Guard] = {}  # id(result object) -> guard of the process filling it
        self._guards_lock = threading.Lock()
        env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "TMPDIR")}
        env["LC_ALL"] = "C"
        env["LANGUAGE"] = "C"
        options = ["--no-auto-key-retrieve", "--no-auto-key-import", "--no-auto-key-locate",
                   "--no-greeting", "--exit-on-status-write-error", "--no-random-seed-file"]
        super().__init__(gpgbinary=gpgbinary, gnupghome=gnupghome, env=env, options=options,
                         encoding="latin-1")  # decoding gpg's stderr can never fail

    def run(self, args: Sequence[str], data: bytes = b"", passphrase: str | None = None) -> GpgRun:
        """Run gpg with *args*, feeding *data* on stdin (after *passphrase*, if given)."""
        if passphrase and not self.is_valid_passphrase(passphrase):
            raise ValueError("Invalid passphrase")  # as python-gnupg: a line break would inject input
        started = time.monotonic()
        stdin = (f"{passphrase}\n".encode(self.encoding) if passphrase else b"") + data
        process = subprocess.Popen(self.make_args(list(args), bool(passphrase)), stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=self.env)
        try:
            record = self._communicate(process, stdin, started + self.timeout)
        finally:
            if process.poll() is None:  # an exception on the way: never leave gpg behind
                _kill(process)
                process.wait()
        GPG.labels(_operation(args)).observe(time.monotonic() - started)
        return record

    def _communicate(self, process: subprocess.Popen[bytes], stdin: bytes, deadline: float) -> GpgRun:
        """Feed *stdin*, collect stdout (at most ``max_output`` bytes) and stderr until gpg exits or *deadline*."""
        pump = _Pump(process, stdin, self.max_output)
        pump.run(deadline)
        try:  # its pipes are closed: gpg is exiting
            returncode = process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pump.timed_out = True
            _kill(process)
            returncode = process.wait()
        stderr = b"".join(pump.err).decode(self.encoding)
        return GpgRun(status=_status_lines(stderr), returncode=returncode, data=b"".join(pump.out), stderr=stderr,
                      timed_out=pump.timed_out, output_truncated=pump.truncated, input_broken=pump.input_broken)

    # ------------------------------------------------------------------ python-gnupg hooks

    def _collect_output(self, process: subprocess.Popen[bytes], result: Any, writer: Any = None,
                        stdin: Any = None) -> int:
        guard = _Guard(process)
        with self._guards_lock:
            self._guards[id(result)] = guard
        timer = threading.Timer(self.timeout, guard.expire)
        timer.daemon = True
        timer.start()
        try:
            returncode: int = super()._collect_output(process, result, writer, stdin)
            return returncode
        finally:
            timer.cancel()
            with self._guards_lock:
                self._guards.pop(id(result), None)
            guard.process = None

    def _read_data(self, stream: IO[bytes], result: Any, on_data: Any = None, buffer_size: int = 1024) -> None:
        with self._guards_lock:
            guard = self._guards.get(id(result))
        chunks: list[bytes] = []
        total = 0
        while True:
            data = stream.read(buffer_size)
            if not data:
                break
            if total + len(data) > self.max_output:
                if guard is not None:
                    guard.overflow()
                continue  # drain (gpg is dead, EOF follows) without keeping
            chunks.append(data)
            total += len(data)
        result.data = b"".join(chunks)

    def _handle_io(self, args: list[str], fileobj_or_path: Any, result: Any, passphrase: str | None = None,
                   binary: bool = False) -> Any:
        # gpg may exit (or be killed by a guard) before reading all of its input;
        # the writer thread then fails with EPIPE, which python-gnupg re-raises
        # after the output was collected.  Not a programming error: keep the
        # result (the exit code and the guard flags tell the story).
        try:
            return super()._handle_io(args, fileobj_or_path, result, passphrase=passphrase, binary=binary)
        except BrokenPipeError:
            return result


class _Pump:
    """One gpg process's pipes, driven from one thread: stdin written, stdout (capped) and stderr read."""

    def __init__(self, process: subprocess.Popen[bytes], stdin: bytes, max_output: int) -> None:
        assert process.stdin is not None and process.stdout is not None and process.stderr is not None
        self.process = process
        self.stdin, self.stdout, self.stderr = process.stdin, process.stdout, process.stderr
        self.pending = memoryview(stdin)
        self.max_output = max_output
        self.out: list[bytes] = []
        self.err: list[bytes] = []
        self.kept = 0
        self.timed_out = self.truncated = self.input_broken = False

    def run(self, deadline: float) -> None:
        with selectors.DefaultSelector() as selector:
            if self.pending:
                os.set_blocking(self.stdin.fileno(), False)
                selector.register(self.stdin, selectors.EVENT_WRITE)
            else:
                self.stdin.close()
            selector.register(self.stdout, selectors.EVENT_READ)
            selector.register(self.stderr, selectors.EVENT_READ)
            while selector.get_map():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self.timed_out = True
                    _kill(self.process)
                    break
                for key, _events in selector.select(remaining):
                    if key.fileobj is self.stdin:
                        self._write(selector)
                    else:
                        self._read(selector, key.fileobj)
        for stream in (self.stdin, self.stdout, self.stderr):
            with contextlib.suppress(OSError):
                stream.close()

    def _write(self, selector: selectors.BaseSelector) -> None:
        try:
            self.pending = self.pending[os.write(self.stdin.fileno(), self.pending[:65536]):]
        except BlockingIOError:
            return
        except BrokenPipeError:  # gpg exited (or was killed) before reading it all
            self.input_broken, self.pending = True, self.pending[:0]
        if not self.pending:
            selector.unregister(self.stdin)
            self.stdin.close()

    def _read(self, selector: selectors.BaseSelector, stream: Any) -> None:
        chunk = os.read(stream.fileno(), 65536)
        if not chunk:
            selector.unregister(stream)
        elif stream is self.stderr:
            self.err.append(chunk)
        elif self.kept + len(chunk) > self.max_output:
            if not self.truncated:  # drain without keeping: EOF follows
                self.truncated = True
                _kill(self.process)
        else:
            self.out.append(chunk)
            self.kept += len(chunk)


def _status_lines(stderr: str) -> tuple[tuple[str, str], ...]:
    """The ``[GNUPG:]`` status lines of gpg's stderr, as python-gnupg reads them: (keyword, rest)."""
    status: list[tuple[str, str]] = []
    for line in stderr.splitlines():
        if line.startswith("[GNUPG:] "):
            fields = line[9:].rstrip().split(None, 1)
            if fields:
                status.append((fields[0], fields[1] if len(fields) > 1 else ""))
    return tuple(status)


def _operation(args: Sequence[str]) -> str:
    """The metrics label of a gpg run: its command option."""
    for arg in args:
        if arg in ("--decrypt", "--encrypt", "--sign", "--detach-sign", "--clear-sign", "--verify", "--import",
                   "--export", "--list-keys", "--gen-key", "--quick-gen-key", "--quick-add-key"):
            return arg.removeprefix("--")
    return "other"


def _kill(process: subprocess.Popen[bytes] | None) -> None:
    if process is None:
        return
    with contextlib.suppress(OSError):  # already gone
        process.kill()


def kill_agent(home: str) -> None:
    """Stop the gpg-agent (and other daemons) of the GnuPG home *home*."""
    subprocess.run(["gpgconf", "--homedir", home, "--kill", "all"], capture_output=True, timeout=10, check=False)
