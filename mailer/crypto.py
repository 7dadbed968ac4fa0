"""OpenPGP primitives for security-mailer, on top of python-gnupg and GnuPG 2.2.

Everything here is synchronous and blocking (GnuPG runs as a subprocess); from
asyncio code call the methods through ``asyncio.to_thread``.  Every call of gpg
runs with ``--batch --no-tty``, a wall-clock timeout and a cap on the bytes read
from its stdout (see :class:`BoundedGPG`), never with ``--ignore-mdc-error``.

Trust rules implemented here (each has a test in ``tests/test_crypto.py``):

* A decryption counts only when gpg reports ``DECRYPTION_OKAY`` *and* exits 0
  *and* none of the known failure signals were seen (no MDC, several literal
  data packets, output cap, timeout, symmetric encryption).  Otherwise the
  result carries a ``reason`` and **no** data: python-gnupg hands back whatever
  gpg printed, e.g. the plaintext of a message without integrity protection,
  and that buffer is dropped here.
* A signature counts only with exactly one signature, gpg exit 0, no key
  problem (``EXPKEYSIG``, ``REVKEYSIG``, ``KEYEXPIRED``, ``KEYREVOKED``,
  ``BADSIG``, ``ERRSIG``, ``NO_PUBKEY``, ...) and a ``VALIDSIG`` line carrying
  the primary-key fingerprint, which becomes :attr:`SignatureResult.signer_fpr`.
  python-gnupg's ``status == 'signature valid'`` alone is *not* used: it is also
  reported for revoked and expired keys.
* Recipients are pinned fingerprints, encryption uses ``--trust-model always``
  after checking the key is usable.  Keys found in reporters' mail are never
  imported into the service keyring: :meth:`OpenPGP.encrypt_to_key_blob`
  imports the blob into a throw-away GNUPGHOME that is deleted afterwards.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterable, Sequence

import gnupg

from mailer.errors import MailerError

__all__ = [
    "CryptoError",
    "GnuPGVersionError",
    "UnusableKey",
    "KeyImportError",
    "BoundedGPG",
    "DecryptResult",
    "DetachedSignature",
    "KeyInfo",
    "OpenPGP",
    "SignatureResult",
    "VerifiedText",
    "check_versions",
    "MIN_GNUPG",
    "MIN_PYTHON_GNUPG",
]

MIN_GNUPG: tuple[int, ...] = (2, 2, 36)
MIN_PYTHON_GNUPG: tuple[int, ...] = (0, 4, 4)

DEFAULT_TIMEOUT = 30.0
DEFAULT_MAX_OUTPUT = 32 * 1024 * 1024

# Decryption / verification reasons (stable strings, shown to operators).
REASON_OK = "ok"
REASON_TOO_LARGE = "too large"
REASON_TIMEOUT = "timed out"
REASON_NO_MDC = "no integrity protection"
REASON_SEVERAL_LITERALS = "several literal data packets"
REASON_SYMMETRIC = "symmetric (passphrase) encryption is not accepted"
REASON_NO_SECKEY = "encrypted to a key we do not hold"
REASON_NO_DATA = "no OpenPGP data (corrupt armor?)"
REASON_NOT_ENCRYPTED = "not encrypted"
REASON_ENCRYPTED = "message is encrypted"
REASON_BAD_MDC = "integrity check failed (tampered)"
REASON_FAILED = "decryption failed"
REASON_INPUT_UNREAD = "gpg stopped before reading all input"

SIG_NONE = "no signature"
SIG_SEVERAL = "several signatures"
SIG_BAD = "bad signature"
SIG_NO_PUBKEY = "unknown signing key"
SIG_ERROR = "signature error"
SIG_KEY_EXPIRED = "signing key expired"
SIG_KEY_REVOKED = "signing key revoked"
SIG_EXPIRED = "signature expired"
SIG_GPG_FAILED = "gpg failed"
SIG_NO_VALIDSIG = "no VALIDSIG from gpg"
SIG_VALID = "valid"

_HASH_NAMES = {1: "md5", 2: "sha1", 3: "ripemd160", 8: "sha256", 9: "sha384", 10: "sha512", 11: "sha224"}
_FPR_RE = re.compile(r"^[0-9A-F]{40}$")
_UID_FORBIDDEN = re.compile(r"[\x00-\x1f\x7f<>]")
_ADDR_RE = re.compile(r"^[^\s<>@\x00-\x1f\x7f]+@[^\s<>@\x00-\x1f\x7f]+$")


# --------------------------------------------------------------------------- errors


class CryptoError(MailerError):
    """Base error of the OpenPGP layer; ``reason`` is a short human string."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class UnusableKey(CryptoError):
    """A key cannot be used for the requested operation (expired, revoked, ...)."""

    def __init__(self, fingerprint: str, reason: str) -> None:
        super().__init__(f"{fingerprint}: {reason}")
        self.fingerprint = fingerprint
        self.key_reason = reason


class KeyImportError(CryptoError):
    """Key material was refused or could not be imported."""


class GnuPGVersionError(CryptoError):
    """GnuPG or python-gnupg is older than required."""

    def __init__(self, component: str, found: str, required: str) -> None:
        super().__init__(f"{component} {found} is too old, {required} or newer is required")
        self.component = component
        self.found = found
        self.required = required


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
    pyver = _parse_version(python_gnupg_version if python_gnupg_version is not None else gnupg.__version__)
    gver = tuple(gnupg_version)
    if gver < MIN_GNUPG:
        raise GnuPGVersionError("GnuPG", _fmt_version(gver) or "unknown", _fmt_version(MIN_GNUPG))
    if pyver < MIN_PYTHON_GNUPG:
        raise GnuPGVersionError("python-gnupg", _fmt_version(pyver) or "unknown", _fmt_version(MIN_PYTHON_GNUPG))
    return gver, pyver


# --------------------------------------------------------------------------- bounded gpg


class _StatusCollector(gnupg.StatusHandler):
    """Result object for raw gpg runs: keeps every status line in order."""

    def __init__(self, gpg: gnupg.GPG) -> None:
        super().__init__(gpg)
        self.status: list[tuple[str, str]] = []
        self.data = b""
        self.stderr = ""
        self.returncode: int | None = None

    def handle_status(self, key: str, value: str) -> None:
        self.status.append((key, value))


class BoundedGPG(gnupg.GPG):
    """python-gnupg with a per-call timeout and a cap on stdout.

    * The stdout reader keeps at most ``max_output`` bytes; on the first byte
      beyond the cap it kills gpg, stops buffering and marks the result with
      ``output_truncated = True``.  Memory stays bounded whatever gpg emits.
    * A timer kills gpg after ``timeout`` seconds and marks ``timed_out``.
    * gpg always runs with ``--batch --no-tty`` (python-gnupg adds them) and
      a scrubbed environment (no DISPLAY/GPG_TTY, so no pinentry pop-ups).
    """

    def __init__(self, gnupghome: str, *, timeout: float = DEFAULT_TIMEOUT,
                 max_output: int = DEFAULT_MAX_OUTPUT, gpgbinary: str = "gpg") -> None:
        self.timeout = timeout
        self.max_output = max_output
        env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "TMPDIR")}
        env["LC_ALL"] = "C"
        env["LANGUAGE"] = "C"
        options = ["--no-auto-key-retrieve", "--no-auto-key-import", "--no-auto-key-locate",
                   "--no-greeting", "--exit-on-status-write-error"]
        super().__init__(gpgbinary=gpgbinary, gnupghome=gnupghome, env=env, options=options,
                         encoding="latin-1")  # decoding gpg's stderr can never fail

    def _collect_output(self, process: Any, result: Any, writer: Any = None, stdin: Any = None) -> int:
        result.output_truncated = False
        result.timed_out = False
        result._bounded_process = process

        def on_timeout() -> None:
            result.timed_out = True
            _kill(process)

        timer = threading.Timer(self.timeout, on_timeout)
        timer.daemon = True
        timer.start()
        try:
            return super()._collect_output(process, result, writer, stdin)
        finally:
            timer.cancel()
            result._bounded_process = None

    def _read_data(self, stream: Any, result: Any, on_data: Any = None, buffer_size: int = 1024) -> None:
        chunks: list[bytes] = []
        total = 0
        while True:
            data = stream.read(buffer_size)
            if not data:
                break
            if total + len(data) > self.max_output:
                if not result.output_truncated:
                    result.output_truncated = True
                    _kill(getattr(result, "_bounded_process", None))
                continue  # drain (process is dead, EOF follows) without keeping
            chunks.append(data)
            total += len(data)
        result.data = b"".join(chunks)

    def _handle_io(self, args: Any, fileobj_or_path: Any, result: Any, passphrase: Any = None,
                   binary: bool = False) -> Any:
        # gpg may exit (or be killed by us) before reading all of its input; the
        # writer thread then fails with EPIPE, which python-gnupg re-raises
        # after the output was collected.  That is not a programming error:
        # keep the result (returncode != 0 or the kill flags tell the story).
        try:
            return super()._handle_io(args, fileobj_or_path, result, passphrase=passphrase, binary=binary)
        except BrokenPipeError:
            result.input_broken = True
            return result

    def run_raw(self, args: list[str], data: bytes = b"", passphrase: str | None = None) -> _StatusCollector:
        """Run gpg with *args*, feeding *data* on stdin; returns all status lines."""
        import io

        result = _StatusCollector(self)
        self._handle_io(args, io.BytesIO(data), result, passphrase=passphrase, binary=True)
        return result


def _kill(process: Any) -> None:
    if process is None:
        return
    try:
        process.kill()
    except OSError:
        pass


def _status_lines(stderr: str) -> list[tuple[str, str]]:
    """Parse the ``[GNUPG:]`` lines of gpg's status output, in order."""
    lines: list[tuple[str, str]] = []
    for line in (stderr or "").splitlines():
        if line.startswith("[GNUPG:] "):
            key, _, value = line[9:].strip().partition(" ")
            lines.append((key, value))
    return lines


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class SignatureResult:
    """Outcome of a signature check; ``signer_fpr`` is the *primary* key fingerprint."""

    valid: bool
    reason: str
    signer_fpr: str | None = None
    signing_key_fpr: str | None = None
    count: int = 0
    created: int | None = None

    @classmethod
    def none(cls) -> "SignatureResult":
        return cls(valid=False, reason=SIG_NONE)


@dataclass(frozen=True)
class DecryptResult:
    """Outcome of :meth:`OpenPGP.decrypt`.  ``data`` is ``None`` unless ``ok``."""

    ok: bool
    reason: str
    data: bytes | None = None
    signature: SignatureResult = field(default_factory=SignatureResult.none)
    recipients: tuple[str, ...] = ()


@dataclass(frozen=True)
class VerifiedText:
    """Outcome of :meth:`OpenPGP.verify_inline`: the signed content gpg output."""

    signature: SignatureResult
    data: bytes | None
    reason: str


@dataclass(frozen=True)
class DetachedSignature:
    """An armored detached signature and the RFC 3156 ``micalg`` to announce."""

    signature: bytes
    micalg: str


@dataclass(frozen=True)
class KeyInfo:
    """What we know about one key of the keyring (usability is for the whole key)."""

    fingerprint: str
    uids: tuple[str, ...]
    created: datetime | None
    expires: datetime | None
    revoked: bool
    expired: bool
    can_encrypt: bool
    can_sign: bool
    has_secret: bool = False

    @property
    def problem(self) -> str | None:
        """Why the key is unusable, or ``None``."""
        if self.revoked:
            return "key is revoked"
        if self.expired:
            return "key is expired"
        return None


# --------------------------------------------------------------------------- status evaluation


_SIG_START = {"GOODSIG", "BADSIG", "ERRSIG", "EXPSIG", "EXPKEYSIG", "REVKEYSIG"}


def evaluate_signature(status: list[tuple[str, str]], returncode: int | None,
                       py_result: Any | None = None) -> SignatureResult:
    """Apply the signature rules of this module to gpg's status lines."""
    keys = [k for k, _ in status]
    count = max(keys.count("NEWSIG"), sum(1 for k in keys if k in _SIG_START))
    if py_result is not None:
        count = max(count, len(getattr(py_result, "sig_info", {}) or {}))
    validsigs = [v.split() for k, v in status if k == "VALIDSIG"]
    count = max(count, len(validsigs))
    signer = signing_key = None
    created = None
    if len(validsigs) == 1 and len(validsigs[0]) >= 10:
        signing_key, signer = validsigs[0][0], validsigs[0][9]
        created = int(validsigs[0][2]) if validsigs[0][2].isdigit() else None

    def bad(reason: str) -> SignatureResult:
        return SignatureResult(False, reason, signer, signing_key, count, created)

    if count == 0:
        return SignatureResult.none()
    if count > 1:
        return bad(SIG_SEVERAL)
    checks = [
        ("BADSIG", SIG_BAD), ("NO_PUBKEY", SIG_NO_PUBKEY), ("ERRSIG", SIG_ERROR),
        ("REVKEYSIG", SIG_KEY_REVOKED), ("KEYREVOKED", SIG_KEY_REVOKED),
        ("EXPKEYSIG", SIG_KEY_EXPIRED), ("KEYEXPIRED", SIG_KEY_EXPIRED),
        ("EXPSIG", SIG_EXPIRED), ("SIGEXPIRED", SIG_EXPIRED),
    ]
    for key, reason in checks:
        if key in keys:
            return bad(reason)
    if returncode != 0:
        return bad(SIG_GPG_FAILED)
    if "GOODSIG" not in keys or signer is None or not _FPR_RE.match(signer):
        return bad(SIG_NO_VALIDSIG)
    if py_result is not None:
        # Cross-check python-gnupg's view: it must agree on the primary key and
        # must not have recorded problems.
        if getattr(py_result, "problems", None) or getattr(py_result, "key_status", None):
            return bad(SIG_ERROR)
        if getattr(py_result, "pubkey_fingerprint", signer) != signer:
            return bad(SIG_ERROR)
    return SignatureResult(True, SIG_VALID, signer, signing_key, 1, created)


def _decrypt_failure_reason(status: list[tuple[str, str]], stderr: str, returncode: int | None,
                            result: Any) -> str | None:
    """Return why a decryption must not count, or ``None`` if it does."""
    keys = {k for k, _ in status}
    if getattr(result, "timed_out", False):
        return REASON_TIMEOUT
    if getattr(result, "output_truncated", False) or "exceeded --max-output" in stderr:
        return REASON_TOO_LARGE
    if getattr(result, "input_broken", False):
        return REASON_INPUT_UNREAD
    if "NEED_PASSPHRASE_SYM" in keys or "SYMKEY" in " ".join(v for k, v in status if k == "ERROR"):
        return REASON_SYMMETRIC
    if "multiple plaintexts" in stderr:
        return REASON_SEVERAL_LITERALS
    infos = [v.split() for k, v in status if k == "DECRYPTION_INFO"]
    if any(parts and parts[0] == "0" for parts in infos) or "not integrity protected" in stderr:
        return REASON_NO_MDC
    if "BADMDC" in keys:
        return REASON_BAD_MDC
    if "NODATA" in keys and "BEGIN_DECRYPTION" not in keys:
        return REASON_NO_DATA
    if "BEGIN_DECRYPTION" not in keys and "ENC_TO" not in keys and "DECRYPTION_FAILED" not in keys:
        return REASON_NOT_ENCRYPTED if returncode == 0 else REASON_NO_DATA
    if "DECRYPTION_OKAY" not in keys or "DECRYPTION_FAILED" in keys:
        if "NO_SECKEY" in keys and "DECRYPTION_OKAY" not in keys:
            return REASON_NO_SECKEY
        return REASON_FAILED
    if returncode != 0:
        return REASON_FAILED
    return None


def _only_signature_failed(status: list[tuple[str, str]]) -> bool:
    """True if gpg decrypted fine and only an embedded signature made it fail."""
    keys = {k for k, _ in status}
    return ("DECRYPTION_OKAY" in keys and "DECRYPTION_FAILED" not in keys and "BADMDC" not in keys
            and bool(keys & {"ERRSIG", "BADSIG", "NO_PUBKEY"}))


def _colon_time(value: str) -> datetime | None:
    if not value:
        return None
    if value.isdigit():
        return datetime.fromtimestamp(int(value), tz=timezone.utc)
    try:
        return datetime.strptime(value, "%Y%m%dT%H%M%S").replace(tzinfo=timezone.utc)
    except ValueError:
        return None


def _normalise_fpr(fpr: str) -> str:
    clean = fpr.replace(" ", "").upper()
    if not _FPR_RE.match(clean):
        raise CryptoError(f"not a v4 fingerprint: {fpr!r}")
    return clean


# --------------------------------------------------------------------------- facade


class OpenPGP:
    """The service's OpenPGP keyring (one GNUPGHOME) and the operations on it.

    ``passphrase`` protects the service secret key (``None``: unprotected).
    ``timeout`` (seconds) and ``max_output`` (bytes) bound every gpg run.
    """

    def __init__(self, home: str, *, passphrase: str | None = None, timeout: float = DEFAULT_TIMEOUT,
                 max_output: int = DEFAULT_MAX_OUTPUT, gpgbinary: str = "gpg") -> None:
        os.makedirs(home, mode=0o700, exist_ok=True)
        self.home = home
        self.passphrase = passphrase
        self.timeout = timeout
        self.max_output = max_output
        self.gpgbinary = gpgbinary
        self._gpg = BoundedGPG(home, timeout=timeout, max_output=max_output, gpgbinary=gpgbinary)

    # ------------------------------------------------------------------ helpers

    def _pin_args(self) -> list[str]:
        """Never ask a pinentry; with a passphrase python-gnupg sets loopback."""
        return [] if self.passphrase is not None else ["--pinentry-mode", "error"]

    def _wire_passphrase(self) -> str | None:
        """The passphrase as python-gnupg (latin-1 wire encoding) must get it to send UTF-8."""
        if self.passphrase is None:
            return None
        return self.passphrase.encode("utf-8").decode("latin-1")

    def kill_agent(self) -> None:
        """Stop the gpg-agent of this home (call at shutdown)."""
        subprocess.run(["gpgconf", "--homedir", self.home, "--kill", "all"],
                       capture_output=True, timeout=10, check=False)

    # ------------------------------------------------------------------ keys

    def list_keys(self, *, secret: bool = False) -> list[KeyInfo]:
        """All keys (or only those with a secret part) of the keyring."""
        secret_fprs = {k["fingerprint"] for k in self._gpg.list_keys(secret=True)}
        keys = self._gpg.list_keys(secret=secret)
        return [self._key_info(k, k["fingerprint"] in secret_fprs) for k in keys]

    #: how long a keyring listing is reused (seconds); imports through this object refresh it at once,
    #: changes made by another process (``mailer keys import``) are seen within this time
    LISTING_TTL = 30.0

    def _listing(self) -> list[KeyInfo]:
        now = time.monotonic()
        cache = getattr(self, "_cache", None)
        if cache is None or now - cache[0] > self.LISTING_TTL:
            cache = self._cache = (now, self.list_keys())
        return cache[1]

    def _forget(self) -> None:
        self._cache = None
        self._service_fpr: str | None = None

    def key_info(self, fpr: str) -> KeyInfo | None:
        """Information about the key with primary fingerprint *fpr*, or ``None``."""
        try:
            clean = _normalise_fpr(fpr)
        except CryptoError:
            return None
        for info in self._listing():
            if info.fingerprint == clean:
                return info
        return None

    @staticmethod
    def _key_info(raw: dict[str, Any], has_secret: bool) -> KeyInfo:
        validity = raw.get("trust", "")
        cap = raw.get("cap", "")
        expires = _colon_time(raw.get("expires", ""))
        expired = validity == "e" or (expires is not None and expires <= datetime.now(timezone.utc))
        return KeyInfo(
            fingerprint=raw["fingerprint"],
            uids=tuple(raw.get("uids", ())),
            created=_colon_time(raw.get("date", "")),
            expires=expires,
            revoked=validity == "r",
            expired=expired,
            can_encrypt="E" in cap,
            can_sign="S" in cap,
            has_secret=has_secret,
        )

    def service_fingerprint(self) -> str:
        """Fingerprint of the (single) secret key of this home (looked up once)."""
        cached = getattr(self, "_service_fpr", None)
        if cached:
            return cached
        secrets = self._gpg.list_keys(secret=True)
        if not secrets:
            raise CryptoError("no service key in keyring")
        self._service_fpr = secrets[0]["fingerprint"]
        return self._service_fpr

    def ensure_service_key(self, name: str, address: str, passphrase: str | None = None) -> str:
        """Return the fingerprint of the secret key, generating one if the home has none.

        The generated key is an Ed25519 signing primary key with a Curve25519
        encryption subkey, user id ``Name <address>``, without expiry, and
        without passphrase unless one is given (then it is also remembered
        for signing and decrypting).
        """
        self._forget()
        if passphrase is not None:
            self.passphrase = passphrase
        secrets = self._gpg.list_keys(secret=True)
        if secrets:
            return secrets[0]["fingerprint"]
        if _UID_FORBIDDEN.search(name) or not name.strip():
            raise CryptoError("invalid key name")
        if not _ADDR_RE.match(address):
            raise CryptoError("invalid key address")
        if self.passphrase is not None and re.search(r"[\x00-\x1f\x7f]", self.passphrase):
            raise CryptoError("passphrase must not contain control characters")
        params = [
            "Key-Type: eddsa", "Key-Curve: ed25519", "Key-Usage: sign",
            "Subkey-Type: ecdh", "Subkey-Curve: cv25519", "Subkey-Usage: encrypt",
            f"Name-Real: {name.strip()}", f"Name-Email: {address}", "Expire-Date: 0",
        ]
        if self.passphrase is None:
            params.insert(0, "%no-protection")
        else:
            params.append(f"Passphrase: {self.passphrase}")
        params.append("%commit")
        result = self._gpg.gen_key(("\n".join(params) + "\n").encode("utf-8"))
        if result.returncode != 0 or not result.fingerprint:
            raise CryptoError(f"key generation failed: {result.stderr[-500:]}")
        return str(result.fingerprint)

    def _scan(self, data: bytes) -> list[tuple[str, str]]:
        """``(record type, fingerprint)`` of the primary keys in *data* without importing."""
        run = self._gpg.run_raw(["--with-colons", "--import-options", "show-only", "--import"], data)
        records: list[tuple[str, str]] = []
        pending: str | None = None
        for line in run.data.decode("utf-8", "replace").splitlines():
            fields = line.split(":")
            if fields[0] in ("pub", "sec", "sub", "ssb"):
                pending = fields[0]
            elif fields[0] == "fpr" and pending is not None:
                records.append((pending, fields[9]))
                pending = None
        return records

    def import_public(self, data: bytes | str) -> list[str]:
        """Import public keys; refuses any secret key material.  Returns fingerprints."""
        self._forget()
        raw = data.encode() if isinstance(data, str) else data
        if b"PRIVATE KEY BLOCK" in raw:
            raise KeyImportError("secret key material refused")
        records = self._scan(raw)
        if any(kind in ("sec", "ssb") for kind, _ in records):
            raise KeyImportError("secret key material refused")
        if not any(kind == "pub" for kind, _ in records):
            raise KeyImportError("no public key found")
        return self._import(raw)

    def import_secret(self, data: bytes | str, passphrase: str | None = None) -> list[str]:
        """Import a secret key (e.g. a backup of the service key).  Returns fingerprints."""
        self._forget()
        raw = data.encode() if isinstance(data, str) else data
        result = self._gpg.import_keys(raw, passphrase=passphrase,
                                       extra_args=[] if passphrase else ["--pinentry-mode", "error"])
        if result.returncode != 0 or not result.sec_imported and not result.sec_dups:
            raise KeyImportError("no secret key imported")
        return sorted(set(result.fingerprints))

    def _import(self, raw: bytes) -> list[str]:
        result = self._gpg.import_keys(raw)
        if result.returncode != 0 or not result.fingerprints:
            raise KeyImportError("import failed")
        return sorted(set(result.fingerprints))

    def export_public(self, fpr: str) -> str:
        """The armored public key *fpr* (minimal: no third-party signatures)."""
        clean = _normalise_fpr(fpr)
        out = self._gpg.export_keys(clean, armor=True, minimal=True)
        text = out if isinstance(out, str) else out.decode()
        if "BEGIN PGP PUBLIC KEY BLOCK" not in text:
            raise CryptoError(f"no such key: {clean}")
        return text

    # ------------------------------------------------------------------ encrypt / sign

    def _check_usable(self, fpr: str, *, encrypt: bool = True) -> str:
        clean = _normalise_fpr(fpr)
        info = self.key_info(clean)
        if info is None:
            raise UnusableKey(clean, "key not in keyring")
        if info.problem:
            raise UnusableKey(clean, info.problem)
        if encrypt and not info.can_encrypt:
            raise UnusableKey(clean, "key has no usable encryption subkey")
        return clean

    def encrypt(self, data: bytes, recipients: list[str], *, armor: bool = True, sign: bool = False) -> bytes:
        """Encrypt *data* to pinned fingerprints (``--trust-model always``).

        Raises :class:`UnusableKey` for unknown, expired, revoked or
        encrypt-incapable recipients.  ``sign=True`` signs with the service key
        in the same OpenPGP message.
        """
        if not recipients:
            raise CryptoError("no recipients")
        fprs = [self._check_usable(r) for r in recipients]
        return self._encrypt_with(self._gpg, data, fprs, armor=armor,
                                  signer=self.service_fingerprint() if sign else None)

    def _encrypt_with(self, gpg: BoundedGPG, data: bytes, fprs: list[str], *, armor: bool,
                      signer: str | None) -> bytes:
        extra = ["--no-encrypt-to", "--digest-algo", "SHA256", "--compress-algo", "zlib"]
        if signer is not None:
            extra += self._pin_args()
        result = gpg.encrypt(data, fprs, armor=armor, always_trust=True, sign=signer,
                             passphrase=self._wire_passphrase() if signer else None, extra_args=extra)
        if result.returncode != 0 or not result.ok or getattr(result, "output_truncated", False):
            raise CryptoError(f"encryption failed: {result.status}")
        return bytes(result.data)

    def sign_detached(self, data: bytes) -> DetachedSignature:
        """Armored detached SHA-256 signature by the service key, plus its micalg."""
        signer = self.service_fingerprint()
        result = self._gpg.sign(data, keyid=signer, detach=True, clearsign=False, binary=False,
                                passphrase=self._wire_passphrase(),
                                extra_args=["--digest-algo", "SHA256"] + self._pin_args())
        if result.returncode != 0 or not result.data or result.status != "signature created":
            raise CryptoError(f"signing failed: {result.status}")
        algo = _HASH_NAMES.get(int(result.hash_algo or 0), "sha256")
        return DetachedSignature(signature=bytes(result.data), micalg=f"pgp-{algo}")

    def encrypt_to_key_blob(self, data: bytes, key_blob: bytes | str, *, armor: bool = True,
                            also_to: Iterable[str] = ()) -> tuple[bytes, str]:
        """Encrypt to a one-off public key (e.g. found in a reporter's mail).

        The blob is imported into a scratch GNUPGHOME (``tempfile.mkdtemp``)
        that is deleted afterwards; the service keyring never sees it.  It must
        hold exactly one usable public key and no secret material.  Pinned
        keys of the service keyring listed in *also_to* are copied into the
        scratch home and added as recipients.  Returns ``(ciphertext, fpr)``.
        """
        extra_keys = [self.export_public(self._check_usable(f)) for f in also_to]
        scratch = tempfile.mkdtemp(prefix="g")
        try:
            tmp = OpenPGP(scratch, timeout=self.timeout, max_output=self.max_output, gpgbinary=self.gpgbinary)
            raw = key_blob.encode() if isinstance(key_blob, str) else key_blob
            records = [r for r in tmp._scan(raw) if r[0] in ("pub", "sec")]
            if len(records) != 1:
                raise KeyImportError(f"key blob must hold exactly one key, found {len(records)}")
            fpr = tmp.import_public(raw)[0]
            tmp._check_usable(fpr)
            extra_fprs = [tmp.import_public(k)[0] for k in extra_keys]
            ciphertext = tmp._encrypt_with(tmp._gpg, data, [fpr, *extra_fprs], armor=armor, signer=None)
            return ciphertext, fpr
        finally:
            subprocess.run(["gpgconf", "--homedir", scratch, "--kill", "all"],
                           capture_output=True, timeout=10, check=False)
            shutil.rmtree(scratch, ignore_errors=True)

    # ------------------------------------------------------------------ decrypt / verify

    def decrypt(self, data: bytes) -> DecryptResult:
        """Decrypt an OpenPGP message (armored or binary).  Never raises on bad input.

        ``ok`` only when gpg reports DECRYPTION_OKAY, exits 0 and no failure
        signal was seen; otherwise ``data`` is ``None`` and ``reason`` says why.
        A signature inside the message is evaluated into ``signature``.
        """
        result = self._run_decrypt(data)
        status = _status_lines(result.stderr)
        recipients = tuple(v.split()[0] for k, v in status if k == "ENC_TO" and v)
        reason = _decrypt_failure_reason(status, result.stderr, result.returncode, result)
        if reason == REASON_FAILED and _only_signature_failed(status):
            # gpg exits non-zero when an embedded signature cannot be checked
            # (unknown or bad signer).  The decryption itself must still pass
            # the exit-0 rule: decrypt again without verification and report
            # the signature from the first run (never valid: exit was != 0).
            signature = evaluate_signature(status, result.returncode, result)
            result.data = b""
            again = self._run_decrypt(data, skip_verify=True)
            again_status = _status_lines(again.stderr)
            if _decrypt_failure_reason(again_status, again.stderr, again.returncode, again) is None:
                return DecryptResult(True, REASON_OK, bytes(again.data), signature, recipients)
            again.data = b""
        if reason is not None:
            result.data = b""  # drop whatever gpg printed before failing
            return DecryptResult(False, reason, None, SignatureResult.none(), recipients)
        signature = evaluate_signature(status, result.returncode, result)
        return DecryptResult(True, REASON_OK, bytes(result.data), signature, recipients)

    def _run_decrypt(self, data: bytes, *, skip_verify: bool = False) -> Any:
        extra = ["--max-output", str(self.max_output), "--no-allow-multiple-messages"]
        if skip_verify:
            extra.append("--skip-verify")
        extra += self._pin_args()
        return self._gpg.decrypt(data, passphrase=self._wire_passphrase(), extra_args=extra)

    def verify_inline(self, data: bytes) -> VerifiedText:
        """Verify a cleartext-signed (or inline signed) block; returns the signed content.

        Refuses encrypted input (use :meth:`decrypt`).  ``data`` is set only
        when exactly the signature rules hold.
        """
        result = self._run_decrypt(data)
        status = _status_lines(result.stderr)
        keys = {k for k, _ in status}
        if "BEGIN_DECRYPTION" in keys or "ENC_TO" in keys or "NEED_PASSPHRASE_SYM" in keys:
            return VerifiedText(SignatureResult.none(), None, REASON_ENCRYPTED)
        if getattr(result, "timed_out", False):
            return VerifiedText(SignatureResult.none(), None, REASON_TIMEOUT)
        if result.output_truncated or "exceeded --max-output" in result.stderr:
            return VerifiedText(SignatureResult.none(), None, REASON_TOO_LARGE)
        if "multiple plaintexts" in result.stderr:
            return VerifiedText(SignatureResult.none(), None, REASON_SEVERAL_LITERALS)
        signature = evaluate_signature(status, result.returncode, result)
        if not signature.valid:
            return VerifiedText(signature, None, signature.reason)
        return VerifiedText(signature, bytes(result.data), REASON_OK)

    def verify_detached(self, data: bytes, signature: bytes | str) -> SignatureResult:
        """Check a detached signature over exactly *data*."""
        sig = signature.encode() if isinstance(signature, str) else signature
        tmpdir = tempfile.mkdtemp(prefix="s")
        try:
            path = os.path.join(tmpdir, "sig")
            with open(path, "wb") as fh:
                fh.write(sig)
            result = self._gpg.verify_data(path, data)
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)
        if getattr(result, "timed_out", False):
            return SignatureResult(False, REASON_TIMEOUT)
        return evaluate_signature(_status_lines(result.stderr), result.returncode, result)
