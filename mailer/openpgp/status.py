"""The trust rules, as pure functions over what one gpg run left (:class:`GpgRun`).

Nothing here runs gpg; every function looks only at the status lines, the exit
code, gpg's stderr text and the guard flags of a run.  Each rule has a test in
``tests/test_crypto.py``.

* **Decryption** counts only when gpg reports ``DECRYPTION_OKAY`` *and*
  ``GOODMDC`` *and* exits 0 *and* none of the known failure signals was seen
  (no MDC, tampering, several literal data packets, output cap, timeout,
  symmetric encryption).  Integrity comes from ``GOODMDC`` + ``DECRYPTION_OKAY``
  + exit 0, never from the ``DECRYPTION_INFO`` fields alone.
* **A signature** counts only with exactly one signature, gpg exit 0, no key
  problem (``EXPKEYSIG``, ``REVKEYSIG``, ``KEYEXPIRED``, ``KEYREVOKED``,
  ``BADSIG``, ``ERRSIG``, ``NO_PUBKEY``, ...) and a ``VALIDSIG`` line carrying
  the primary-key fingerprint, which becomes :attr:`SignatureResult.signer_fpr`.
  python-gnupg's ``status == 'signature valid'`` is *not* used: it is also
  reported for revoked and expired keys.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from mailer.openpgp.process import GpgRun

__all__ = ["Reason", "SignatureResult", "decrypt_failure", "evaluate_signature", "failure_text",
           "only_signature_failed", "recipients", "signature_micalg", "verify_inline_failure"]

Status = Sequence[tuple[str, str]]


class Reason(StrEnum):
    """Why a decryption or signature does (not) count; the values are shown to operators."""

    OK = "ok"
    TOO_LARGE = "too large"
    TIMEOUT = "timed out"
    NO_MDC = "no integrity protection"
    SEVERAL_LITERALS = "several literal data packets"
    SYMMETRIC = "symmetric (passphrase) encryption is not accepted"
    NO_SECKEY = "encrypted to a key we do not hold"
    NO_DATA = "no OpenPGP data (corrupt armor?)"
    NOT_ENCRYPTED = "not encrypted"
    ENCRYPTED = "message is encrypted"
    BAD_MDC = "integrity check failed (tampered)"
    FAILED = "decryption failed"
    INPUT_UNREAD = "gpg stopped before reading all input"
    # signatures
    NO_SIGNATURE = "no signature"
    SEVERAL_SIGNATURES = "several signatures"
    BAD_SIGNATURE = "bad signature"
    UNKNOWN_KEY = "unknown signing key"
    SIGNATURE_ERROR = "signature error"
    KEY_EXPIRED = "signing key expired"
    KEY_REVOKED = "signing key revoked"
    SIGNATURE_EXPIRED = "signature expired"
    GPG_FAILED = "gpg failed"
    NO_VALIDSIG = "no VALIDSIG from gpg"
    VALID = "valid"


@dataclass(frozen=True)
class SignatureResult:
    """Outcome of a signature check; ``signer_fpr`` is the *primary* key fingerprint."""

    valid: bool
    reason: Reason
    signer_fpr: str | None = None
    signing_key_fpr: str | None = None
    count: int = 0
    created: int | None = None

    @classmethod
    def none(cls) -> SignatureResult:
        return cls(valid=False, reason=Reason.NO_SIGNATURE)


_FPR_RE = re.compile(r"^[0-9A-F]{40}$")
_HASH_NAMES = {1: "md5", 2: "sha1", 3: "ripemd160", 8: "sha256", 9: "sha384", 10: "sha512", 11: "sha224"}
_SIG_START = {"GOODSIG", "BADSIG", "ERRSIG", "EXPSIG", "EXPKEYSIG", "REVKEYSIG"}
_SIG_PROBLEMS = (  # first match wins
    ("BADSIG", Reason.BAD_SIGNATURE), ("NO_PUBKEY", Reason.UNKNOWN_KEY), ("ERRSIG", Reason.SIGNATURE_ERROR),
    ("REVKEYSIG", Reason.KEY_REVOKED), ("KEYREVOKED", Reason.KEY_REVOKED),
    ("EXPKEYSIG", Reason.KEY_EXPIRED), ("KEYEXPIRED", Reason.KEY_EXPIRED),
    ("EXPSIG", Reason.SIGNATURE_EXPIRED), ("SIGEXPIRED", Reason.SIGNATURE_EXPIRED),
)


def _keys(status: Status) -> set[str]:
    return {k for k, _ in status}


def _signature_count(status: Status) -> int:
    keys = [k for k, _ in status]
    sig_ids = {v.split()[0] for k, v in status if k == "SIG_ID" and v.split()}
    validsigs = sum(1 for k in keys if k == "VALIDSIG")
    return max(keys.count("NEWSIG"), sum(1 for k in keys if k in _SIG_START), len(sig_ids), validsigs)


def evaluate_signature(status: Status, returncode: int | None) -> SignatureResult:
    """Apply the signature rules to the status lines and exit code of one gpg run."""
    keys = _keys(status)
    count = _signature_count(status)
    validsigs = [v.split() for k, v in status if k == "VALIDSIG"]
    signer = signing_key = None
    created = None
    if len(validsigs) == 1 and len(validsigs[0]) >= 10:
        signing_key, signer = validsigs[0][0], validsigs[0][9]
        created = int(validsigs[0][2]) if validsigs[0][2].isdigit() else None

    def bad(reason: Reason) -> SignatureResult:
        return SignatureResult(False, reason, signer, signing_key, count, created)

    if count == 0:
        return SignatureResult.none()
    if count > 1:
        return bad(Reason.SEVERAL_SIGNATURES)
    for key, reason in _SIG_PROBLEMS:
        if key in keys:
            return bad(reason)
    if returncode != 0:
        return bad(Reason.GPG_FAILED)
    if "GOODSIG" not in keys or signer is None or not _FPR_RE.match(signer):
        return bad(Reason.NO_VALIDSIG)
    if "NO_SECKEY" in keys:  # a secret key the data names is missing: not a clean run
        return bad(Reason.SIGNATURE_ERROR)
    return SignatureResult(True, Reason.VALID, signer, signing_key, 1, created)


def decrypt_failure(run: GpgRun) -> Reason | None:
    """Why the decryption of *run* must not count, or ``None`` if it does."""
    keys = run.keys
    if run.timed_out:
        return Reason.TIMEOUT
    if run.output_truncated or "exceeded --max-output" in run.stderr:
        return Reason.TOO_LARGE
    if run.input_broken:
        return Reason.INPUT_UNREAD
    if "NEED_PASSPHRASE_SYM" in keys or "SYMKEY" in " ".join(run.values("ERROR")):
        return Reason.SYMMETRIC
    if "multiple plaintexts" in run.stderr:
        return Reason.SEVERAL_LITERALS
    # DECRYPTION_INFO's mdc field is 0 for AEAD (OCB/EAX) too, which is integrity protected: it decides nothing.
    if "not integrity protected" in run.stderr:
        return Reason.NO_MDC
    if "BADMDC" in keys:
        return Reason.BAD_MDC
    if "NODATA" in keys and "BEGIN_DECRYPTION" not in keys:
        return Reason.NO_DATA
    if "BEGIN_DECRYPTION" not in keys and "ENC_TO" not in keys and "DECRYPTION_FAILED" not in keys:
        return Reason.NOT_ENCRYPTED if run.returncode == 0 else Reason.NO_DATA
    if "DECRYPTION_OKAY" not in keys or "DECRYPTION_FAILED" in keys:
        if "NO_SECKEY" in keys and "DECRYPTION_OKAY" not in keys:
            return Reason.NO_SECKEY
        return Reason.FAILED
    if run.returncode != 0:
        return Reason.FAILED
    if "GOODMDC" not in keys:  # integrity is GOODMDC + DECRYPTION_OKAY + exit 0, whatever DECRYPTION_INFO says
        return Reason.NO_MDC
    return None


def only_signature_failed(status: Status) -> bool:
    """True if gpg decrypted fine and only an embedded signature made it fail."""
    keys = _keys(status)
    return ("DECRYPTION_OKAY" in keys and "DECRYPTION_FAILED" not in keys
            and "BADMDC" not in keys and bool(keys & {"ERRSIG", "BADSIG", "NO_PUBKEY"}))


def verify_inline_failure(run: GpgRun) -> Reason | None:
    """Why the output of a ``--decrypt`` run over signed-only data cannot be the signed text, or ``None``."""
    keys = run.keys
    if "BEGIN_DECRYPTION" in keys or "ENC_TO" in keys or "NEED_PASSPHRASE_SYM" in keys:
        return Reason.ENCRYPTED
    if run.timed_out:
        return Reason.TIMEOUT
    if run.output_truncated or "exceeded --max-output" in run.stderr:
        return Reason.TOO_LARGE
    if "multiple plaintexts" in run.stderr:
        return Reason.SEVERAL_LITERALS
    return None


def recipients(status: Status) -> tuple[str, ...]:
    """The key ids of the ``ENC_TO`` lines (``0000000000000000`` for hidden recipients)."""
    return tuple(v.split()[0] for k, v in status if k == "ENC_TO" and v.split())


def signature_micalg(run: GpgRun) -> str | None:
    """The RFC 3156 ``micalg`` of the signature *run* created, or ``None`` if signing failed."""
    if run.returncode != 0 or run.timed_out or run.output_truncated or not run.data:
        return None
    last = [(k, v) for k, v in run.status if k in ("SIG_CREATED", "KEYEXPIRED", "SIGEXPIRED", "KEYREVOKED",
                                                    "BAD_PASSPHRASE", "INV_SGNR", "INV_RECP")]
    if not last or last[-1][0] != "SIG_CREATED":
        return None
    fields = last[-1][1].split()
    algo = int(fields[2]) if len(fields) > 2 and fields[2].isdigit() else 0
    return f"pgp-{_HASH_NAMES.get(algo, 'sha256')}"


def failure_text(run: GpgRun) -> str:
    """A short account of why a gpg run failed, for error messages."""
    if run.timed_out:
        return str(Reason.TIMEOUT)
    if run.output_truncated:
        return str(Reason.TOO_LARGE)
    for key in ("INV_RECP", "INV_SGNR", "KEYEXPIRED", "KEYREVOKED", "BAD_PASSPHRASE", "FAILURE", "ERROR"):
        for value in run.values(key):
            return f"{key} {value}".strip()
    return f"gpg exit code {run.returncode}"
