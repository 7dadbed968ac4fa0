"""Errors of the OpenPGP layer (all are :class:`mailer.errors.MailerError`)."""

from __future__ import annotations

from mailer.errors import MailerError

__all__ = ["CryptoError", "GnuPGVersionError", "KeyImportError", "UnusableKey"]


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
