"""Encrypting to pinned public keys in this process (Sequoia-PGP through pysequoia).

Encryption needs no secret: the session key is wrapped for each recipient's
public encryption subkey. Doing that here instead of in a gpg process per mail
takes a fork, an exec and a keyring read (~15 ms of CPU) down to ~0.2 ms.
GnuPG stays the keyring and the authority on which keys may be used: a
recipient is first checked usable by GnuPG's listing, and its certificate is
exported from the service keyring (never taken from elsewhere). Sequoia then
applies its own policy on top (it refuses, e.g., a binding signature made with
SHA-1); a recipient it refuses is encrypted to by gpg instead, so the result
never depends on which of the two encrypted.

The output is an ordinary OpenPGP message (SEIPD with MDC, what GnuPG 2.2
decrypts; RFC 9580 SEIPDv2 only for recipients whose keys ask for it).
Signatures are never made here: the service key stays in gpg-agent.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

import pysequoia

__all__ = ["InProcessEncryptor", "SequoiaRefused"]

log = logging.getLogger(__name__)


class SequoiaRefused(Exception):
    """Sequoia cannot encrypt to these recipients (the caller lets gpg do it)."""


def _first_line(exc: BaseException) -> str:
    """pysequoia's errors carry a Rust backtrace after the first line."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class InProcessEncryptor:
    """Certificates of pinned keys, parsed once per keyring listing, and encryption to them.

    *export* returns the binary public key of a primary fingerprint from the
    service keyring. :meth:`forget` drops every parsed certificate (the keyring
    changed); the caller does so whenever it refreshes its key listing.
    """

    def __init__(self, export: Callable[[str], bytes]) -> None:
        self._export = export
        self._certs: dict[str, pysequoia.Cert] = {}
        self._refusals: set[str] = set()  # refusals already logged (once per reason and listing)
        self._lock = threading.Lock()

    def forget(self) -> None:
        with self._lock:
            self._certs.clear()
            self._refusals.clear()

    def _cert(self, fpr: str) -> pysequoia.Cert:
        with self._lock:
            cert = self._certs.get(fpr)
        if cert is not None:
            return cert
        try:
            cert = pysequoia.Cert.from_bytes(self._export(fpr))
        except RuntimeError as exc:
            raise SequoiaRefused(f"{fpr}: {_first_line(exc)}") from None
        if cert.fingerprint.upper() != fpr:
            raise SequoiaRefused(f"{fpr}: the keyring exported {cert.fingerprint.upper()}")
        with self._lock:
            self._certs[fpr] = cert
        return cert

    def encrypt(self, data: bytes, fprs: Sequence[str], *, armor: bool) -> bytes:
        """*data* encrypted to every valid encryption subkey of each primary fingerprint in *fprs*.

        :raises SequoiaRefused: a certificate cannot be parsed or has no encryption subkey Sequoia accepts.
        """
        try:
            out = pysequoia.encrypt(data, recipients=[self._cert(fpr) for fpr in fprs], armor=armor)
        except RuntimeError as exc:
            reason = _first_line(exc)
        except SequoiaRefused as exc:
            reason = str(exc)
        else:
            return out if isinstance(out, bytes) else str(out).encode("ascii")
        with self._lock:
            fresh = reason not in self._refusals
            self._refusals.add(reason)
        if fresh:  # the reason names the key
            log.warning("encrypting with gpg, not in process: Sequoia refuses: %s", reason)
        raise SequoiaRefused(reason)
