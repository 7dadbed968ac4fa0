"""OpenPGP for security-mailer, on top of python-gnupg and GnuPG 2.2.

* :mod:`~mailer.openpgp.process`: the bounded gpg process (timeouts, output caps, versions);
* :mod:`~mailer.openpgp.status`: the trust rules, pure functions over gpg's status lines;
* :mod:`~mailer.openpgp.keyring`: key listing, import and export, the service key;
* :mod:`~mailer.openpgp.operations`: :class:`OpenPGP`, encrypt/sign/decrypt/verify with typed results.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mailer.openpgp.errors import CryptoError, GnuPGVersionError, KeyImportError, UnusableKey
from mailer.openpgp.keyring import KeyInfo
from mailer.openpgp.operations import DecryptResult, DetachedSignature, OpenPGP, VerifiedText
from mailer.openpgp.process import BoundedGPG, check_versions
from mailer.openpgp.status import Reason, SignatureResult

if TYPE_CHECKING:
    from mailer.config import Config

__all__ = [
    "BoundedGPG",
    "CryptoError",
    "DecryptResult",
    "DetachedSignature",
    "GnuPGVersionError",
    "KeyImportError",
    "KeyInfo",
    "OpenPGP",
    "Reason",
    "SignatureResult",
    "UnusableKey",
    "VerifiedText",
    "check_versions",
    "open_keyring",
]


def open_keyring(config: Config) -> OpenPGP:
    """The service's GnuPG home, with the configured bounds."""
    return OpenPGP(
        str(config.gnupg_home), passphrase=config.gnupg.secret(),
        timeout=config.gnupg.timeout_seconds, max_output=config.gnupg.max_output_bytes,
        decrypt_helper=config.gnupg.decrypt_helper,
    )
