"""The OpenPGP operations of the service: :class:`OpenPGP` and the records it returns.

Everything here is synchronous and blocking (GnuPG runs as a subprocess); from
asyncio code call the methods through ``asyncio.to_thread``.  Every gpg run is
bounded (:class:`~mailer.openpgp.process.BoundedGPG`), never uses
``--ignore-mdc-error``, and each result record is built from that run's status
lines and exit code by the rules of :mod:`mailer.openpgp.status`:

* a failed decryption carries a ``reason`` and **no** data (gpg may have
  printed plaintext before failing, e.g. of a message without integrity
  protection: it is dropped here);
* recipients are pinned fingerprints; encryption uses ``--trust-model always``
  after checking the key is usable;
* keys found in reporters' mail are never imported into the service keyring:
  :meth:`OpenPGP.encrypt_to_key_blob` imports the blob into a throw-away
  GNUPGHOME that is deleted afterwards.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from mailer.metrics import GPG
from mailer.openpgp.agent import AgentError, AgentKey, AgentSigner
from mailer.openpgp.errors import CryptoError, KeyImportError
from mailer.openpgp.helper import DecryptHelper
from mailer.openpgp.inprocess import InProcessEncryptor, SequoiaRefused
from mailer.openpgp.keyring import Keyring
from mailer.openpgp.process import GpgRun, kill_agent
from mailer.openpgp.status import (
    Reason,
    SignatureResult,
    decrypt_failure,
    evaluate_signature,
    failure_text,
    only_signature_failed,
    recipients,
    signature_micalg,
    verify_inline_failure,
)

__all__ = ["DecryptResult", "DetachedSignature", "OpenPGP", "VerifiedText"]

log = logging.getLogger(__name__)

#: what the agent signs once, and gpg verifies, before the agent signs anything else (:meth:`OpenPGP._set_up_agent`)
_AGENT_PROBE = b"security-mailer: a detached signature made by gpg-agent directly, checked by gpg\r\n"


@dataclass(frozen=True)
class DecryptResult:
    """Outcome of :meth:`OpenPGP.decrypt`.  ``data`` is ``None`` unless ``ok``."""

    ok: bool
    reason: Reason
    data: bytes | None = None
    signature: SignatureResult = field(default_factory=SignatureResult.none)
    recipients: tuple[str, ...] = ()


@dataclass(frozen=True)
class VerifiedText:
    """Outcome of :meth:`OpenPGP.verify_inline`: the signed content gpg output."""

    signature: SignatureResult
    data: bytes | None
    reason: Reason


@dataclass(frozen=True)
class DetachedSignature:
    """An armored detached signature and the RFC 3156 ``micalg`` to announce."""

    signature: bytes
    micalg: str


class OpenPGP(Keyring):
    """The service's OpenPGP keyring (one GNUPGHOME) and the operations on it.

    Detached signatures are made by the home's gpg-agent directly once that has
    proved itself here (:mod:`mailer.openpgp.agent`), else by a gpg process each.
    Unsigned encryption to pinned keys runs in this process
    (:mod:`mailer.openpgp.inprocess`), else (a key Sequoia refuses) by gpg.
    Unsigned messages are decrypted by a helper process holding the encryption
    subkey (:mod:`mailer.openpgp.helper`; ``decrypt_helper=False``: never),
    everything else by gpg.
    """

    def __init__(self, home: str, *, decrypt_helper: bool = True, **kwargs: Any) -> None:
        super().__init__(home, **kwargs)
        self._agent: AgentSigner | None = None
        self._agent_checked = False  # set up (or found unusable) for the current service key
        self._agent_lock = threading.Lock()
        self._encryptor = InProcessEncryptor(self.export_minimal)
        self._helper = DecryptHelper(self.export_decryption_subkeys, passphrase=self.passphrase,
                                     max_output=self.max_output, timeout=self.timeout) if decrypt_helper else None

    @property
    def helper(self) -> DecryptHelper | None:
        """The decryption helper of this keyring (``None``: turned off)."""
        return self._helper

    def _forget(self) -> None:
        super()._forget()
        self._drop_agent()
        self._encryptor.forget()

    def _secret_changed(self) -> None:
        # a public key imported (a maintainer's, an embargo member's) leaves the helper's subkey as it is
        if self._helper is not None:
            self._helper.forget()

    def _listing_renewed(self) -> None:
        self._encryptor.forget()

    def _drop_agent(self) -> None:
        agent, self._agent, self._agent_checked = self._agent, None, False
        if agent is not None:
            agent.close()

    def kill_agent(self) -> None:
        self._drop_agent()
        super().kill_agent()

    # ------------------------------------------------------------------ encrypt / sign

    def encrypt(self, data: bytes, recipients: list[str], *, armor: bool = True, sign: bool = False) -> bytes:
        """Encrypt *data* to pinned fingerprints (``--trust-model always``).

        Raises :class:`UnusableKey` for unknown, expired, revoked or
        encrypt-incapable recipients.  ``sign=True`` signs with the service key
        in the same OpenPGP message (a gpg process); unsigned encryption runs in
        this process unless Sequoia refuses a recipient's key.
        """
        if not recipients:
            raise CryptoError("no recipients")
        fprs = [self._check_usable(r) for r in recipients]
        if not sign:
            started = time.monotonic()
            try:
                ciphertext = self._encryptor.encrypt(data, fprs, armor=armor)
            except SequoiaRefused:
                pass
            else:
                GPG.labels("encrypt-in-process").observe(time.monotonic() - started)
                return ciphertext
        return self._encrypt_to(data, fprs, armor=armor, signer=self.service_fingerprint() if sign else None)

    def _encrypt_to(self, data: bytes, fprs: list[str], *, armor: bool, signer: str | None) -> bytes:
        args = ["--encrypt"]
        for fpr in fprs:
            args += ["--recipient", fpr]
        if armor:
            args.append("--armor")
        if signer is not None:
            args += ["--sign", "--default-key", signer]
        args += ["--trust-model", "always", "--no-encrypt-to", "--digest-algo", "SHA256", "--compress-algo", "zlib"]
        if signer is not None:
            args += self._pin_args()
        run = self._gpg.run(args, data, passphrase=self._wire_passphrase() if signer else None)
        if run.returncode != 0 or "END_ENCRYPTION" not in run.keys or run.output_truncated or run.timed_out:
            raise CryptoError(f"encryption failed: {failure_text(run)}")
        return run.data

    def sign_detached(self, data: bytes, *, via_agent: bool = True) -> DetachedSignature:
        """Armored detached SHA-256 signature by the service key, plus its micalg.

        ``via_agent=False`` always starts a gpg process (benchmarks measure that cost).
        """
        agent = self._agent_signer() if via_agent else None
        if agent is not None:
            started = time.monotonic()
            try:
                signature = agent.sign(data)
            except AgentError as exc:
                log.warning("gpg-agent did not sign (%s): signing with gpg, then checking the agent again", exc)
                self._drop_agent()
            else:
                GPG.labels("agent-sign").observe(time.monotonic() - started)
                return DetachedSignature(signature=signature, micalg="pgp-sha256")
        return self._sign_with_gpg(data)[0]

    def _sign_with_gpg(self, data: bytes) -> tuple[DetachedSignature, GpgRun]:
        signer = self.service_fingerprint()
        run = self._gpg.run(["-sa", "--detach-sign", "--default-key", signer, "--digest-algo", "SHA256",
                             *self._pin_args()], data, passphrase=self._wire_passphrase())
        micalg = signature_micalg(run)
        if micalg is None:
            raise CryptoError(f"signing failed: {failure_text(run)}")
        return DetachedSignature(signature=run.data, micalg=micalg), run

    def _agent_signer(self) -> AgentSigner | None:
        if not self._agent_checked:
            with self._agent_lock:
                if not self._agent_checked:
                    self._agent = self._set_up_agent()
                    self._agent_checked = True
        return self._agent

    def _set_up_agent(self) -> AgentSigner | None:
        """An :class:`AgentSigner` for the key gpg signs with, once gpg verified one of its signatures."""
        try:
            _signature, run = self._sign_with_gpg(_AGENT_PROBE)
            fields = run.values("SIG_CREATED")[0].split()  # type class pk_algo hash_algo timestamp fingerprint
            algorithm, fpr = int(fields[1]), fields[5]
            agent = AgentSigner(AgentSigner.socket_for(self.home, _gpgconf(self.gpgbinary)),
                                AgentKey(fpr, self._keygrip(fpr), algorithm), self.passphrase)
            result = self.verify_detached(_AGENT_PROBE, agent.sign(_AGENT_PROBE))
            if not result.valid or result.signing_key_fpr != fpr:
                raise AgentError(f"gpg does not accept its signature ({result.reason.value})")
        except (AgentError, CryptoError, OSError, subprocess.SubprocessError, ValueError, IndexError) as exc:
            log.warning("signing with a gpg process per signature: gpg-agent cannot sign directly: %s", exc)
            return None
        return agent

    def _keygrip(self, fpr: str) -> str:
        """The keygrip of the (sub)key *fpr* of the service key."""
        run = self._gpg.run(["--with-colons", "--with-keygrip", "--list-secret-keys", self.service_fingerprint()])
        current = None
        for line in run.data.decode("latin-1").splitlines():
            fields = line.split(":")
            if fields[0] == "fpr" and len(fields) > 9:
                current = fields[9]
            elif fields[0] == "grp" and len(fields) > 9 and current == fpr:
                return fields[9]
        raise AgentError(f"no keygrip for {fpr}")

    def sign_clear(self, text: bytes) -> bytes:
        """A cleartext signature (RFC 4880 §7) by the service key over ``text`` (security.txt, RFC 9116)."""
        signer = self.service_fingerprint()
        run = self._gpg.run(["--clearsign", "--default-key", signer, "--digest-algo", "SHA256", *self._pin_args()],
                            text, passphrase=self._wire_passphrase())
        if signature_micalg(run) is None:
            raise CryptoError(f"signing failed: {failure_text(run)}")
        return run.data

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
            tmp = OpenPGP(scratch, timeout=self.timeout, max_output=self.max_output, gpgbinary=self.gpgbinary,
                          decrypt_helper=False)
            raw = key_blob.encode() if isinstance(key_blob, str) else key_blob
            records = [r for r in tmp._scan(raw) if r[0] in ("pub", "sec")]
            if len(records) != 1:
                raise KeyImportError(f"key blob must hold exactly one key, found {len(records)}")
            fpr = tmp.import_public(raw)[0]
            tmp._check_usable(fpr)
            extra_fprs = [tmp.import_public(k)[0] for k in extra_keys]
            ciphertext = tmp._encrypt_to(data, [fpr, *extra_fprs], armor=armor, signer=None)
            return ciphertext, fpr
        finally:
            kill_agent(scratch)
            shutil.rmtree(scratch, ignore_errors=True)

    # ------------------------------------------------------------------ decrypt / verify

    def decrypt(self, data: bytes, *, via_helper: bool = True) -> DecryptResult:
        """Decrypt an OpenPGP message (armored or binary).  Never raises on bad input.

        ``ok`` only when the decryption rules of :mod:`mailer.openpgp.status`
        hold; otherwise ``data`` is ``None`` and ``reason`` says why.  A
        signature inside the message is evaluated into ``signature`` (by gpg:
        the helper takes unsigned messages only). ``via_helper=False`` always
        starts a gpg process (benchmarks measure that cost).
        """
        if via_helper and self._helper is not None:
            started = time.monotonic()
            decrypted = self._helper.decrypt(data)
            if decrypted is not None:
                GPG.labels("decrypt-in-helper").observe(time.monotonic() - started)
                return DecryptResult(True, Reason.OK, decrypted.data, SignatureResult.none(), decrypted.recipients)
        run = self._run_decrypt(data)
        to = recipients(run.status)
        reason = decrypt_failure(run)
        if reason is Reason.FAILED and only_signature_failed(run.status):
            # gpg exits non-zero when an embedded signature cannot be checked
            # (unknown or bad signer).  The decryption itself must still pass
            # the exit-0 rule: decrypt again without verification and report
            # the signature from the first run (never valid: exit was != 0).
            signature = evaluate_signature(run.status, run.returncode)
            again = self._run_decrypt(data, skip_verify=True)
            if decrypt_failure(again) is None:
                return DecryptResult(True, Reason.OK, again.data, signature, to)
        if reason is not None:
            return DecryptResult(False, reason, None, SignatureResult.none(), to)
        return DecryptResult(True, Reason.OK, run.data, evaluate_signature(run.status, run.returncode), to)

    def export_decryption_subkeys(self) -> bytes:
        """The service key's encryption subkeys with their secrets (protected as in the agent), for the helper."""
        run = self._gpg.run(["--with-colons", "--list-secret-keys", self.service_fingerprint()])
        subkeys, pending = [], False
        for line in run.data.decode("latin-1").splitlines():
            fields = line.split(":")
            if fields[0] == "ssb":
                pending = len(fields) > 11 and "e" in fields[11] and fields[1] not in ("r", "e")
            elif fields[0] == "fpr" and pending and len(fields) > 9:
                subkeys.append(f"{fields[9]}!")
                pending = False
        if not subkeys:
            raise CryptoError("the service key has no usable encryption subkey")
        export = self._gpg.run(["--export-secret-subkeys", *self._pin_args(), *subkeys],
                               passphrase=self._wire_passphrase())
        if export.returncode != 0 or not export.data or export.output_truncated:
            raise CryptoError(f"exporting the encryption subkey failed: {failure_text(export)}")
        return export.data

    def _run_decrypt(self, data: bytes, *, skip_verify: bool = False) -> GpgRun:
        args = ["--decrypt", "--max-output", str(self.max_output), "--no-allow-multiple-messages"]
        if skip_verify:
            args.append("--skip-verify")
        args += self._pin_args()
        return self._gpg.run(args, data, passphrase=self._wire_passphrase())

    def verify_inline(self, data: bytes) -> VerifiedText:
        """Verify a cleartext-signed (or inline signed) block; returns the signed content.

        Refuses encrypted input (use :meth:`decrypt`).  ``data`` is set only
        when exactly the signature rules hold.
        """
        run = self._run_decrypt(data)
        failure = verify_inline_failure(run)
        if failure is not None:
            return VerifiedText(SignatureResult.none(), None, failure)
        signature = evaluate_signature(run.status, run.returncode)
        if not signature.valid:
            return VerifiedText(signature, None, signature.reason)
        return VerifiedText(signature, run.data, Reason.OK)

    def verify_detached(self, data: bytes, signature: bytes | str) -> SignatureResult:
        """Check a detached signature over exactly *data*."""
        sig = signature.encode() if isinstance(signature, str) else signature
        tmpdir = tempfile.mkdtemp(prefix="s")
        try:
            path = os.path.join(tmpdir, "sig")
            with open(path, "wb") as fh:
                fh.write(sig)
            run = self._gpg.run(["--verify", path, "-"], data)
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)
        if run.timed_out:
            return SignatureResult(False, Reason.TIMEOUT)
        return evaluate_signature(run.status, run.returncode)


def _gpgconf(gpgbinary: str) -> str:
    """gpgconf next to *gpgbinary* (``gpg`` on the PATH: ``gpgconf`` on the PATH)."""
    directory = os.path.dirname(gpgbinary)
    return os.path.join(directory, "gpgconf") if directory else "gpgconf"
