"""The service keyring (one GNUPGHOME): listing with a short cache, import, export, the service key.

Keys found in reporters' mail are never imported here; public keys are
imported only through :meth:`Keyring.import_public`, which refuses any secret
key material.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar

from mailer.openpgp.errors import CryptoError, KeyImportError, UnusableKey
from mailer.openpgp.process import DEFAULT_MAX_OUTPUT, DEFAULT_TIMEOUT, BoundedGPG, kill_agent

__all__ = ["KeyInfo", "Keyring", "normalise_fpr"]

_FPR_RE = re.compile(r"^[0-9A-F]{40}$")
_UID_FORBIDDEN = re.compile(r"[\x00-\x1f\x7f<>]")
_ADDR_RE = re.compile(r"^[^\s<>@\x00-\x1f\x7f]+@[^\s<>@\x00-\x1f\x7f]+$")


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


def normalise_fpr(fpr: str) -> str:
    """*fpr* as 40 upper-case hex digits; :class:`CryptoError` if it is not a v4 fingerprint."""
    clean = fpr.replace(" ", "").upper()
    if not _FPR_RE.match(clean):
        raise CryptoError(f"not a v4 fingerprint: {fpr!r}")
    return clean


def _colon_time(value: str) -> datetime | None:
    if not value:
        return None
    if value.isdigit():
        return datetime.fromtimestamp(int(value), tz=UTC)
    try:
        return datetime.strptime(value, "%Y%m%dT%H%M%S").replace(tzinfo=UTC)
    except ValueError:
        return None


def _key_info(raw: dict[str, Any], has_secret: bool) -> KeyInfo:
    validity = raw.get("trust", "")
    cap = raw.get("cap", "")
    expires = _colon_time(raw.get("expires", ""))
    expired = validity == "e" or (expires is not None and expires <= datetime.now(UTC))
    return KeyInfo(
        fingerprint=str(raw["fingerprint"]),
        uids=tuple(raw.get("uids", ())),
        created=_colon_time(raw.get("date", "")),
        expires=expires,
        revoked=validity == "r",
        expired=expired,
        can_encrypt="E" in cap,
        can_sign="S" in cap,
        has_secret=has_secret,
    )


def _as_bytes(data: bytes | str) -> bytes:
    return data.encode() if isinstance(data, str) else data


class Keyring:
    """The keys of one GNUPGHOME and the service key in it.

    ``passphrase`` protects the service secret key (``None``: unprotected).
    ``timeout`` (seconds) and ``max_output`` (bytes) bound every gpg run.
    """

    #: how long a keyring listing is reused (seconds); imports through this object refresh it at once,
    #: changes made by another process (``mailer keys import``) are seen within this time
    LISTING_TTL: ClassVar[float] = 30.0

    def __init__(self, home: str, *, passphrase: str | None = None, timeout: float = DEFAULT_TIMEOUT,
                 max_output: int = DEFAULT_MAX_OUTPUT, gpgbinary: str = "gpg") -> None:
        os.makedirs(home, mode=0o700, exist_ok=True)
        self.home = home
        self.passphrase = passphrase
        self.timeout = timeout
        self.max_output = max_output
        self.gpgbinary = gpgbinary
        self._gpg = BoundedGPG(home, timeout=timeout, max_output=max_output, gpgbinary=gpgbinary)
        self._cache: tuple[float, list[KeyInfo]] | None = None  # (monotonic time, listing)
        self._service_fpr: str | None = None

    # ------------------------------------------------------------------ passphrase

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
        kill_agent(self.home)

    # ------------------------------------------------------------------ listing

    def list_keys(self, *, secret: bool = False) -> list[KeyInfo]:
        """All keys (or only those with a secret part) of the keyring."""
        secret_fprs = {k["fingerprint"] for k in self._gpg.list_keys(secret=True)}
        keys = self._gpg.list_keys(secret=secret)
        return [_key_info(k, k["fingerprint"] in secret_fprs) for k in keys]

    def _listing(self) -> list[KeyInfo]:
        now = time.monotonic()
        if self._cache is None or now - self._cache[0] > self.LISTING_TTL:
            self._cache = (now, self.list_keys())
            self._listing_renewed()
        return self._cache[1]

    def _listing_renewed(self) -> None:
        """Called when the key listing was read again (the keyring may have changed since)."""

    def _forget(self) -> None:
        self._cache = None
        self._service_fpr = None

    def _secret_changed(self) -> None:
        """Called when the home's secret keys may change (a service key generated or imported here)."""

    def key_info(self, fpr: str) -> KeyInfo | None:
        """Information about the key with primary fingerprint *fpr*, or ``None``."""
        try:
            clean = normalise_fpr(fpr)
        except CryptoError:
            return None
        for info in self._listing():
            if info.fingerprint == clean:
                return info
        return None

    def _check_usable(self, fpr: str, *, encrypt: bool = True) -> str:
        """The normalised *fpr*; :class:`UnusableKey` if it is unknown, revoked, expired or cannot encrypt."""
        clean = normalise_fpr(fpr)
        info = self.key_info(clean)
        if info is None:
            raise UnusableKey(clean, "key not in keyring")
        if info.problem:
            raise UnusableKey(clean, info.problem)
        if encrypt and not info.can_encrypt:
            raise UnusableKey(clean, "key has no usable encryption subkey")
        return clean

    # ------------------------------------------------------------------ the service key

    def service_fingerprint(self) -> str:
        """Fingerprint of the (single) secret key of this home (looked up once)."""
        if self._service_fpr:
            return self._service_fpr
        secrets = self._gpg.list_keys(secret=True)
        if not secrets:
            raise CryptoError("no service key in keyring")
        fpr = str(secrets[0]["fingerprint"])
        self._service_fpr = fpr
        return fpr

    def ensure_service_key(self, name: str, address: str, passphrase: str | None = None) -> str:
        """Return the fingerprint of the secret key, generating one if the home has none.

        The generated key is an Ed25519 signing primary key with a Curve25519
        encryption subkey, user id ``Name <address>``, without expiry, and
        without passphrase unless one is given (then it is also remembered
        for signing and decrypting).
        """
        self._forget()
        self._secret_changed()
        if passphrase is not None:
            self.passphrase = passphrase
        secrets = self._gpg.list_keys(secret=True)
        if secrets:
            return str(secrets[0]["fingerprint"])
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

    # ------------------------------------------------------------------ import / export

    def _scan(self, data: bytes) -> list[tuple[str, str]]:
        """``(record type, fingerprint)`` of the primary keys in *data* without importing."""
        run = self._gpg.run(["--with-colons", "--import-options", "show-only", "--import"], data)
        records: list[tuple[str, str]] = []
        pending: str | None = None
        for line in run.data.decode("utf-8", "replace").splitlines():
            fields = line.split(":")
            if fields[0] in ("pub", "sec", "sub", "ssb"):
                pending = fields[0]
            elif fields[0] == "fpr" and pending is not None and len(fields) > 9:
                records.append((pending, fields[9]))
                pending = None
        return records

    def import_public(self, data: bytes | str) -> list[str]:
        """Import public keys; refuses any secret key material.  Returns fingerprints."""
        self._forget()
        raw = _as_bytes(data)
        if b"PRIVATE KEY BLOCK" in raw:
            raise KeyImportError("secret key material refused")
        records = self._scan(raw)
        if any(kind in ("sec", "ssb") for kind, _ in records):
            raise KeyImportError("secret key material refused")
        if not any(kind == "pub" for kind, _ in records):
            raise KeyImportError("no public key found")
        result = self._gpg.import_keys(raw)
        if result.returncode != 0 or not result.fingerprints:
            raise KeyImportError("import failed")
        return sorted({str(f) for f in result.fingerprints})

    def import_secret(self, data: bytes | str, passphrase: str | None = None) -> list[str]:
        """Import a secret key (e.g. a backup of the service key).  Returns fingerprints."""
        self._forget()
        self._secret_changed()
        result = self._gpg.import_keys(_as_bytes(data), passphrase=passphrase,
                                       extra_args=[] if passphrase else ["--pinentry-mode", "error"])
        if result.returncode != 0 or (not result.sec_imported and not result.sec_dups):
            raise KeyImportError("no secret key imported")
        return sorted({str(f) for f in result.fingerprints})

    def export_minimal(self, fpr: str) -> bytes:
        """The binary public key *fpr*, minimal (no third-party signatures): for WKD and Autocrypt."""
        clean = normalise_fpr(fpr)
        out = self._gpg.export_keys(clean, armor=False, minimal=True)
        data = out if isinstance(out, bytes) else str(out).encode("latin-1")
        if not data:
            raise CryptoError(f"no such key: {clean}")
        return data

    def export_public(self, fpr: str) -> str:
        """The armored public key *fpr* (minimal: no third-party signatures)."""
        clean = normalise_fpr(fpr)
        out = self._gpg.export_keys(clean, armor=True, minimal=True)
        text = out if isinstance(out, str) else bytes(out).decode()
        if "BEGIN PGP PUBLIC KEY BLOCK" not in text:
            raise CryptoError(f"no such key: {clean}")
        return text
