"""Tests of mailer.openpgp against the real GnuPG binary (no mocks), and of its pure status rules."""

from __future__ import annotations

import os
import subprocess
import time
import tracemalloc
from collections.abc import Iterator
from dataclasses import dataclass

import gnupg
import pytest

from mailer.metrics import REGISTRY
from mailer.openpgp import CryptoError, GnuPGVersionError, KeyImportError, OpenPGP, Reason, UnusableKey, check_versions
from mailer.openpgp.process import GpgRun
from mailer.openpgp.status import decrypt_failure, evaluate_signature
from tests.gpgtools import (
    Home,
    compression_bomb,
    dearmor,
    encrypt_raw_packets,
    flip_byte,
    kill_and_remove,
    literal_packets,
    no_mdc_to_key,
    short_tmpdir,
    symmetric,
)

SECRET = b"the vulnerability is in parse_header()\n"


@dataclass
class World:
    svc: OpenPGP
    svc_fpr: str
    client: Home
    alice: str  # ed25519/cv25519
    bob: str  # RSA-2048
    carol: str  # expired (created in 2020, 1 day validity)
    dave: str  # revoked
    eve: str  # sign-only, no encryption subkey
    frank: str  # signs with a subkey
    mallory: str  # not known to the service
    carol_sig: bytes  # signature made while carol's key was valid
    dave_sig: bytes  # signature made before dave's key was revoked


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    home = short_tmpdir()
    client = Home()
    try:
        svc = OpenPGP(home)
        svc_fpr = svc.ensure_service_key("Security Team", "security@example.com")
        alice = client.gen_key("Alice", "alice@example.org")
        bob = client.gen_key("Bob", "bob@example.org", algo="rsa2048")
        carol = client.gen_key("Carol", "carol@example.org", expire="1d", faked_time="20200101T000000")
        carol_sig = client.sign_detached(SECRET, carol, faked_time="20200101T120000")
        dave = client.gen_key("Dave", "dave@example.org")
        dave_sig = client.sign_detached(SECRET, dave)
        client.revoke(dave)
        eve = client.gen_key("Eve", "eve@example.org", encrypt_subkey=False)
        frank = client.gen_key("Frank", "frank@example.org")
        client.add_signing_subkey(frank)
        mallory = client.gen_key("Mallory", "mallory@example.org")
        for fpr in (alice, bob, carol, dave, eve, frank):
            svc.import_public(client.export(fpr))
        client.import_(svc.export_public(svc_fpr).encode())
        yield World(svc, svc_fpr, client, alice, bob, carol, dave, eve, frank, mallory, carol_sig, dave_sig)
    finally:
        client.close()
        kill_and_remove(home)


# --------------------------------------------------------------------------- versions


def test_check_versions_accepts_installed() -> None:
    """The installed GnuPG and python-gnupg satisfy the minimum versions."""
    gver, pyver = check_versions()
    assert gver >= (2, 2, 36) and pyver >= (0, 4, 4)


def test_check_versions_rejects_old_gnupg() -> None:
    """A GnuPG older than 2.2.36 is refused with the version named."""
    with pytest.raises(GnuPGVersionError) as exc:
        check_versions(gnupg_version=(2, 2, 35), python_gnupg_version=gnupg.__version__)
    assert exc.value.found == "2.2.35" and "2.2.35" in str(exc.value) and exc.value.required == "2.2.36"


def test_check_versions_rejects_old_python_gnupg() -> None:
    """A python-gnupg older than 0.4.4 is refused with the version named."""
    with pytest.raises(GnuPGVersionError) as exc:
        check_versions(gnupg_version=(2, 2, 40), python_gnupg_version="0.4.3")
    assert exc.value.component == "python-gnupg" and "0.4.3" in str(exc.value)


# --------------------------------------------------------------------------- keys


def test_ensure_service_key_generates_ed25519_with_cv25519(world: World) -> None:
    """The service key is an Ed25519 signing key with a Curve25519 encryption subkey and the right uid."""
    info = world.svc.key_info(world.svc_fpr)
    assert info is not None and info.has_secret and info.can_sign and info.can_encrypt
    assert info.uids == ("Security Team <security@example.com>",) and info.expires is None
    out = world.svc._gpg.list_keys(keys=[world.svc_fpr])[0]
    assert out["algo"] == "22" and out["curve"] == "ed25519"
    assert [s[1] for s in out["subkeys"]] and out["subkey_info"][out["subkeys"][0][0]]["curve"] == "cv25519"


def test_ensure_service_key_is_idempotent(world: World) -> None:
    """A second call returns the existing secret key's fingerprint instead of generating one."""
    assert world.svc.ensure_service_key("Other", "other@example.com") == world.svc_fpr
    assert len(world.svc.list_keys(secret=True)) == 1


def test_ensure_service_key_rejects_parameter_injection() -> None:
    """Names with newlines or angle brackets are refused (they would inject gpg batch parameters)."""
    home = short_tmpdir()
    try:
        with pytest.raises(CryptoError):
            OpenPGP(home).ensure_service_key("X\nKey-Type: dsa", "x@example.com")
        with pytest.raises(CryptoError):
            OpenPGP(home).ensure_service_key("X", "not an address")
    finally:
        kill_and_remove(home)


def test_passphrase_protected_service_key() -> None:
    """A service key generated with a (non-ASCII) passphrase signs and decrypts with it."""
    home = short_tmpdir()
    try:
        pgp = OpenPGP(home)
        fpr = pgp.ensure_service_key("Sec", "sec@example.com", passphrase="pässwörd")
        sig = pgp.sign_detached(SECRET)
        assert pgp.verify_detached(SECRET, sig.signature).signer_fpr == fpr
        res = pgp.decrypt(pgp.encrypt(SECRET, [fpr]))
        assert res.ok and res.data == SECRET
        pgp.kill_agent()  # gpg-agent caches passphrases: a fresh agent must need one to export
        export = subprocess.run(["gpg", "--homedir", home, "--batch", "--pinentry-mode", "error",
                                 "--export-secret-keys", fpr], capture_output=True, check=False)
        assert export.returncode != 0
    finally:
        kill_and_remove(home)


def test_import_public_refuses_secret_material(world: World) -> None:
    """import_public rejects secret keys, armored or binary, and imports nothing."""
    secret = world.client.export_secret(world.mallory)
    with pytest.raises(KeyImportError):
        world.svc.import_public(secret)
    with pytest.raises(KeyImportError):
        world.svc.import_public(dearmor(world.client, secret))
    assert world.svc.key_info(world.mallory) is None


def test_import_public_rejects_garbage(world: World) -> None:
    """import_public raises KeyImportError for data holding no key."""
    with pytest.raises(KeyImportError):
        world.svc.import_public(b"-----BEGIN PGP PUBLIC KEY BLOCK-----\n\nnope\n-----END PGP PUBLIC KEY BLOCK-----\n")


def test_import_secret_and_export_public_round_trip() -> None:
    """A secret key imported into a new home becomes its service key; export_public returns armor."""
    src, dst = Home(), short_tmpdir()
    try:
        fpr = src.gen_key("Backup", "backup@example.com")
        pgp = OpenPGP(dst)
        assert pgp.import_secret(src.export_secret(fpr)) == [fpr]
        assert pgp.ensure_service_key("Ignored", "ignored@example.com") == fpr
        armored = pgp.export_public(fpr)
        assert armored.startswith("-----BEGIN PGP PUBLIC KEY BLOCK-----") and "PRIVATE" not in armored
    finally:
        src.close()
        kill_and_remove(dst)


def test_key_info_reports_usability(world: World) -> None:
    """key_info flags expired, revoked and sign-only keys and returns None for unknown keys."""
    carol, dave, eve = (world.svc.key_info(f) for f in (world.carol, world.dave, world.eve))
    assert carol and carol.expired and not carol.can_encrypt and carol.expires is not None
    assert dave and dave.revoked and not dave.can_encrypt and not dave.can_sign
    assert eve and eve.can_sign and not eve.can_encrypt and not eve.revoked
    assert world.svc.key_info(world.mallory) is None
    assert {k.fingerprint for k in world.svc.list_keys()} >= {world.alice, world.bob, world.svc_fpr}


# --------------------------------------------------------------------------- encryption


@pytest.mark.parametrize("who", ["alice", "bob"])
def test_encrypt_to_pinned_key_round_trips(world: World, who: str) -> None:
    """encrypt() produces armored ciphertext the recipient (Ed25519 or RSA-2048) can decrypt."""
    fpr = getattr(world, who)
    ct = world.svc.encrypt(SECRET, [fpr])
    assert ct.startswith(b"-----BEGIN PGP MESSAGE-----")
    assert world.client.gpg("--decrypt", data=ct).stdout == SECRET


@pytest.mark.parametrize("who,reason", [("carol", "expired"), ("dave", "revoked"),
                                        ("eve", "encryption"), ("mallory", "not in keyring")])
def test_encrypt_refuses_unusable_keys(world: World, who: str, reason: str) -> None:
    """encrypt() raises UnusableKey naming the fingerprint for expired, revoked, sign-only and unknown keys."""
    fpr = getattr(world, who)
    with pytest.raises(UnusableKey) as exc:
        world.svc.encrypt(SECRET, [world.alice, fpr])
    assert exc.value.fingerprint == fpr and reason in exc.value.key_reason


def test_encrypt_rejects_non_fingerprint_recipient(world: World) -> None:
    """Recipients must be full fingerprints, not user ids or short key ids."""
    with pytest.raises(CryptoError):
        world.svc.encrypt(SECRET, ["alice@example.org"])


def gpg_runs(op: str) -> float:
    """How many OpenPGP operations of kind *op* this process has timed (``mailer_gpg_seconds``)."""
    return REGISTRY.get_sample_value("mailer_gpg_seconds_count", {"op": op}) or 0.0


def decrypt_status(home: Home, ciphertext: bytes) -> tuple[bytes, str]:
    """(plaintext, status lines) of *home*'s gpg decrypting *ciphertext*; gpg must exit 0."""
    proc = home.gpg("--status-fd", "2", "--decrypt", data=ciphertext)
    return proc.stdout, proc.stderr.decode(errors="replace")


def test_unsigned_encryption_to_pinned_keys_starts_no_gpg(world: World) -> None:
    """Encrypting (unsigned) to pinned Ed25519 and RSA keys runs in process: no gpg --encrypt; the
    recipients' gpg decrypts it with integrity protection (DECRYPTION_OKAY, GOODMDC, exit 0)."""
    in_process, by_gpg = gpg_runs("encrypt-in-process"), gpg_runs("encrypt")
    ct = world.svc.encrypt(SECRET, [world.alice, world.bob])
    assert (gpg_runs("encrypt-in-process"), gpg_runs("encrypt")) == (in_process + 1, by_gpg)
    assert ct.startswith(b"-----BEGIN PGP MESSAGE-----")
    plain, status = decrypt_status(world.client, ct)
    assert plain == SECRET
    assert "[GNUPG:] DECRYPTION_OKAY" in status and "[GNUPG:] GOODMDC" in status
    binary = world.svc.encrypt(SECRET, [world.alice], armor=False)
    assert binary[:1] != b"-" and decrypt_status(world.client, binary)[0] == SECRET


def test_key_sequoia_refuses_is_encrypted_to_by_gpg(world: World, caplog: pytest.LogCaptureFixture) -> None:
    """A key whose bindings use SHA-1 (Sequoia's policy refuses it, GnuPG 2.2 does not) still gets mail:
    gpg encrypts to it, and the fallback is logged once, not per mail."""
    old = world.client.gen_key("Old Key", "old@example.org", sha1_bindings=True)
    world.svc.import_public(world.client.export(old))
    by_gpg = gpg_runs("encrypt")
    with caplog.at_level("WARNING", logger="mailer.openpgp.inprocess"):
        first = world.svc.encrypt(SECRET, [old])
        second = world.svc.encrypt(SECRET, [old, world.alice])
    assert gpg_runs("encrypt") == by_gpg + 2
    assert decrypt_status(world.client, first)[0] == SECRET == decrypt_status(world.client, second)[0]
    refusals = [r for r in caplog.records if "Sequoia refuses" in r.getMessage()]
    assert len(refusals) == 1 and old in refusals[0].getMessage()


def test_key_changed_by_another_process_is_read_again(world: World) -> None:
    """A key updated in the keyring by another process (``mailer keys import``) is used as it is now once the
    key listing is read again: mail goes to its new encryption subkey too."""
    grace = world.client.gen_key("Grace", "grace@example.org")
    world.svc.import_public(world.client.export(grace))
    world.svc.encrypt(SECRET, [grace])  # the certificate is parsed and kept
    world.client.gpg("--quick-add-key", grace, "cv25519", "encr", "0")
    new_subkey = world.client.subkey_fingerprints(grace)[-1]
    OpenPGP(world.svc.home).import_public(world.client.export(grace))  # the keyring as another process sees it
    world.svc.LISTING_TTL = 0.0  # type: ignore[misc]  # this object's listing is stale now
    try:
        _plain, status = decrypt_status(world.client, world.svc.encrypt(SECRET, [grace]))
    finally:
        del world.svc.LISTING_TTL
    assert f"[GNUPG:] ENC_TO {new_subkey[-16:]}" in status


def test_encrypt_to_key_blob_uses_scratch_home(world: World) -> None:
    """encrypt_to_key_blob encrypts to a reporter's key without adding it to the service keyring."""
    reporter = Home()
    try:
        fpr = reporter.gen_key("Reporter", "reporter@example.org")
        ct, got = world.svc.encrypt_to_key_blob(SECRET, reporter.export(fpr), also_to=[world.alice])
        assert got == fpr and world.svc.key_info(fpr) is None
        assert reporter.gpg("--decrypt", data=ct).stdout == SECRET
        assert world.client.gpg("--decrypt", data=ct).stdout == SECRET  # alice as also_to
    finally:
        reporter.close()


def test_encrypt_to_key_blob_refuses_bad_blobs(world: World) -> None:
    """Blobs with secret material, several keys or an expired key are refused."""
    with pytest.raises(KeyImportError):
        world.svc.encrypt_to_key_blob(SECRET, world.client.export_secret(world.mallory))
    with pytest.raises(KeyImportError):
        world.svc.encrypt_to_key_blob(SECRET, world.client.export(world.mallory) + world.client.export(world.alice))
    with pytest.raises(UnusableKey):
        world.svc.encrypt_to_key_blob(SECRET, world.client.export(world.carol))


def test_sign_detached_returns_sha256_signature(world: World) -> None:
    """sign_detached returns an armored signature by the service key and micalg pgp-sha256."""
    sig = world.svc.sign_detached(SECRET)
    assert sig.micalg == "pgp-sha256" and sig.signature.startswith(b"-----BEGIN PGP SIGNATURE-----")
    res = world.svc.verify_detached(SECRET, sig.signature)
    assert res.valid and res.signer_fpr == world.svc_fpr


# --------------------------------------------------------------------------- decryption


def test_decrypt_signed_and_encrypted(world: World) -> None:
    """A message signed and encrypted in one packet decrypts with a valid signature by the signer's primary key."""
    ct = world.client.encrypt(SECRET, [world.svc_fpr], signer=world.alice)
    res = world.svc.decrypt(ct)
    assert res.ok and res.data == SECRET
    assert res.signature.valid and res.signature.signer_fpr == world.alice


def test_decrypt_signed_by_unknown_key(world: World) -> None:
    """A message signed by an unknown key still decrypts (re-run with --skip-verify) but the signature is invalid."""
    ct = world.client.encrypt(SECRET, [world.svc_fpr], signer=world.mallory)
    assert world.client.gpg("--homedir", world.svc.home, "--decrypt", data=ct, check=False).returncode != 0
    res = world.svc.decrypt(ct)
    assert res.ok and res.data == SECRET
    assert not res.signature.valid and res.signature.reason == Reason.UNKNOWN_KEY and res.signature.signer_fpr is None


def test_decrypt_hidden_recipient(world: World) -> None:
    """A message with hidden recipients (--throw-keyids) still decrypts."""
    ct = world.client.encrypt(SECRET, [world.svc_fpr], throw_keyids=True)
    res = world.svc.decrypt(ct)
    assert res.ok and res.data == SECRET and res.recipients == ("0000000000000000",)


def test_decrypt_symmetric_is_refused(world: World) -> None:
    """A passphrase-encrypted message is refused with a clear reason and no data."""
    res = world.svc.decrypt(symmetric(world.client, SECRET))
    assert not res.ok and res.reason == Reason.SYMMETRIC and res.data is None


def test_decrypt_unknown_recipient(world: World) -> None:
    """A message encrypted to a key we don't hold reports that reason."""
    res = world.svc.decrypt(world.client.encrypt(SECRET, [world.alice]))
    assert not res.ok and res.reason == Reason.NO_SECKEY and res.data is None


def test_decrypt_corrupt_armor(world: World) -> None:
    """Corrupt armor gives a reason instead of an exception."""
    ct = world.client.encrypt(SECRET, [world.svc_fpr])
    lines = ct.split(b"\n")
    lines[3] = b"!!!!" + lines[3][4:]
    for bad in (b"\n".join(lines), b"-----BEGIN PGP MESSAGE-----\n\n%%%%\n-----END PGP MESSAGE-----\n", b""):
        res = world.svc.decrypt(bad)
        assert not res.ok and res.data is None and res.reason


def test_decrypt_without_mdc_never_exposes_plaintext(world: World) -> None:
    """A message without integrity protection is refused and its plaintext dropped, though gpg printed it."""
    ct = no_mdc_to_key(world.client, SECRET, world.svc_fpr)
    raw = gnupg.GPG(gnupghome=world.svc.home).decrypt(ct)
    assert SECRET in raw.data  # python-gnupg alone leaks it
    res = world.svc.decrypt(ct)
    assert not res.ok and res.reason == Reason.NO_MDC and res.data is None
    assert SECRET.decode() not in repr(res)


def test_decrypt_tampered_ciphertext(world: World) -> None:
    """Flipping one ciphertext byte makes decryption fail without any data."""
    ct = flip_byte(world.client.encrypt(SECRET * 20, [world.svc_fpr], armor=False))
    res = world.svc.decrypt(ct)
    assert not res.ok and res.data is None and res.reason
    assert SECRET.decode() not in repr(res)


def test_decrypt_several_literal_packets(world: World) -> None:
    """An encrypted message holding two literal-data packets is refused (gpg still says DECRYPTION_OKAY)."""
    packets = literal_packets(world.client, b"first part\n", b"second part\n")
    ct = encrypt_raw_packets(world.client, packets, world.svc_fpr)
    res = world.svc.decrypt(ct)
    assert not res.ok and res.reason == Reason.SEVERAL_LITERALS and res.data is None


def test_decrypt_not_encrypted(world: World) -> None:
    """A signed-only or plain literal message is not accepted as a decryption."""
    signed = world.client.gpg("--local-user", world.alice, "--armor", "--sign", data=SECRET).stdout
    res = world.svc.decrypt(signed)
    assert not res.ok and res.reason == Reason.NOT_ENCRYPTED and res.data is None
    res = world.svc.decrypt(b"hello, not PGP at all")
    assert not res.ok and res.reason == Reason.NO_DATA


def test_decrypt_compression_bomb_is_bounded(world: World) -> None:
    """A compression bomb stops at the output cap: reason 'too large', no data, bounded memory."""
    bomb = compression_bomb(world.client, world.svc_fpr, mib=50)
    assert len(bomb) < 200_000
    capped = OpenPGP(world.svc.home, max_output=1024 * 1024)
    tracemalloc.start()
    try:
        res = capped.decrypt(bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert not res.ok and res.reason == Reason.TOO_LARGE and res.data is None
    assert peak < 8 * 1024 * 1024


def test_decrypt_timeout(world: World) -> None:
    """A gpg run exceeding the timeout is killed and reported as 'timed out'."""
    bomb = compression_bomb(world.client, world.svc_fpr, mib=200)
    slow = OpenPGP(world.svc.home, timeout=0.01, max_output=1024 * 1024 * 1024)
    started = time.monotonic()
    res = slow.decrypt(bomb)
    assert not res.ok and res.reason == Reason.TIMEOUT and res.data is None
    assert time.monotonic() - started < 5


# --------------------------------------------------------------------------- signatures


def test_verify_valid_rsa_signature(world: World) -> None:
    """A detached signature by a known RSA-2048 key is valid and names its fingerprint."""
    sig = world.client.sign_detached(SECRET, world.bob)
    res = world.svc.verify_detached(SECRET, sig)
    assert res.valid and res.signer_fpr == world.bob and res.count == 1


def test_verify_subkey_signature_reports_primary(world: World) -> None:
    """A signature made by a signing subkey reports the primary-key fingerprint from VALIDSIG."""
    sub = world.client.subkey_fingerprints(world.frank)[-1]
    sig = world.client.sign_detached(SECRET, sub)
    res = world.svc.verify_detached(SECRET, sig)
    assert res.valid and res.signer_fpr == world.frank and res.signing_key_fpr == sub


def test_verify_expired_key_is_invalid(world: World) -> None:
    """A signature by a now-expired key is invalid."""
    res = world.svc.verify_detached(SECRET, world.carol_sig)
    assert not res.valid and res.reason == Reason.KEY_EXPIRED


def test_verify_revoked_key_is_invalid(world: World) -> None:
    """A signature by a revoked key is invalid although python-gnupg reports 'signature valid'."""
    sigpath = os.path.join(world.client.path, "dave.sig")
    with open(sigpath, "wb") as fh:
        fh.write(world.dave_sig)
    raw = gnupg.GPG(gnupghome=world.svc.home).verify_data(sigpath, SECRET)
    assert raw.status == "signature valid"
    res = world.svc.verify_detached(SECRET, world.dave_sig)
    assert not res.valid and res.reason == Reason.KEY_REVOKED


def test_verify_two_signatures_is_invalid(world: World) -> None:
    """Exactly one signature is required: two signatures give 'several signatures'."""
    sig = world.client.sign_detached(SECRET, world.alice, world.bob)
    res = world.svc.verify_detached(SECRET, sig)
    assert not res.valid and res.reason == Reason.SEVERAL_SIGNATURES and res.count == 2


def test_verify_tampered_text_is_invalid(world: World) -> None:
    """A signature over different bytes is a bad signature."""
    sig = world.client.sign_detached(SECRET, world.alice)
    res = world.svc.verify_detached(SECRET + b"!", sig)
    assert not res.valid and res.reason == Reason.BAD_SIGNATURE and res.signer_fpr is None


def test_verify_unknown_key_is_invalid(world: World) -> None:
    """A signature by a key not in the keyring is invalid ('unknown signing key')."""
    sig = world.client.sign_detached(SECRET, world.mallory)
    res = world.svc.verify_detached(SECRET, sig)
    assert not res.valid and res.reason == Reason.UNKNOWN_KEY


def test_verify_inline_cleartext(world: World) -> None:
    """verify_inline returns gpg's signed text for a valid cleartext signature and nothing when tampered."""
    signed = world.client.clearsign(b"- dash line\nhello\n", world.alice)
    res = world.svc.verify_inline(signed)
    assert res.signature.valid and res.signature.signer_fpr == world.alice
    assert res.data is not None and b"- dash line" in res.data and b"hello" in res.data
    bad = world.svc.verify_inline(signed.replace(b"hello", b"HELLO"))
    assert not bad.signature.valid and bad.data is None


# --------------------------------------------------------------------------- status rules (pure functions)

FPR = "0123456789ABCDEF0123456789ABCDEF01234567"
DECRYPTED = (("ENC_TO", "89ABCDEF01234567 18 0"), ("BEGIN_DECRYPTION", ""), ("DECRYPTION_INFO", "2 9 0"),
             ("PLAINTEXT", "62 0 "), ("DECRYPTION_OKAY", ""), ("GOODMDC", ""), ("END_DECRYPTION", ""))
SIGNED = (("NEWSIG", ""), ("GOODSIG", "89ABCDEF01234567 Alice <alice@example.org>"),
          ("VALIDSIG", f"{FPR} 2025-02-01 1738368000 0 4 0 22 8 00 {FPR}"), ("TRUST_UNDEFINED", "0 pgp"))


def test_decrypt_rule_accepts_okay_goodmdc_exit_0() -> None:
    """DECRYPTION_OKAY + GOODMDC + exit 0 (and no failure signal) is a decryption."""
    assert decrypt_failure(GpgRun(DECRYPTED, 0)) is None


@pytest.mark.parametrize("drop,returncode,reason", [
    ("GOODMDC", 0, Reason.NO_MDC),  # DECRYPTION_INFO announces an MDC, gpg never confirmed it
    ("DECRYPTION_OKAY", 0, Reason.FAILED),
    (None, 2, Reason.FAILED),
])
def test_decrypt_rule_integrity_is_goodmdc_okay_and_exit_0(drop: str | None, returncode: int, reason: Reason) -> None:
    """Integrity never comes from the DECRYPTION_INFO fields alone: all three signals are needed."""
    status = tuple(line for line in DECRYPTED if line[0] != drop)
    assert decrypt_failure(GpgRun(status, returncode)) == reason


# What GnuPG 2.2.40 printed for a message without MDC (``--rfc2440``): the plaintext, then a forced failure.
NO_MDC_RUN = GpgRun((("ENC_TO", "09E7026F20848B16 18 0"), ("BEGIN_DECRYPTION", ""), ("DECRYPTION_INFO", "0 9 0"),
                     ("PLAINTEXT", "62 0 "), ("DECRYPTION_FAILED", ""), ("END_DECRYPTION", "")), 2,
                    stderr="gpg: WARNING: message was not integrity protected\ngpg: decryption forced to fail!\n")
# ... and for an AEAD (OCB) message, which is integrity protected although DECRYPTION_INFO's mdc field is 0.
AEAD = tuple(("DECRYPTION_INFO", "0 9 0") if k == "DECRYPTION_INFO" else (k, v) for k, v in DECRYPTED)


def test_decrypt_rule_refuses_no_mdc_and_tampering() -> None:
    """No MDC and BADMDC are refused, even when gpg says DECRYPTION_OKAY and exits 0."""
    assert decrypt_failure(NO_MDC_RUN) == Reason.NO_MDC
    warned = GpgRun(AEAD, 0, stderr="gpg: WARNING: message was not integrity protected\n")
    assert decrypt_failure(warned) == Reason.NO_MDC
    assert decrypt_failure(GpgRun(tuple(line for line in AEAD if line[0] != "GOODMDC"), 0)) == Reason.NO_MDC
    assert decrypt_failure(GpgRun((*DECRYPTED, ("BADMDC", "")), 0)) == Reason.BAD_MDC
    assert decrypt_failure(GpgRun(DECRYPTED, 0, output_truncated=True)) == Reason.TOO_LARGE
    assert decrypt_failure(GpgRun(DECRYPTED, 0, timed_out=True)) == Reason.TIMEOUT


def test_decrypt_rule_accepts_aead_by_goodmdc_okay_and_exit_0() -> None:
    """Issue 11 item 10: AEAD (DECRYPTION_INFO 0 9 0, then DECRYPTION_OKAY, GOODMDC, exit 0) is a decryption;
    a tampered AEAD chunk makes gpg exit 2 (after OKAY and GOODMDC): refused."""
    assert decrypt_failure(GpgRun(AEAD, 0)) is None
    assert decrypt_failure(GpgRun((*AEAD, ("NODATA", "3")), 2)) == Reason.FAILED


def test_signature_rule_needs_one_validsig_and_exit_0() -> None:
    """One GOODSIG with VALIDSIG and exit 0 is valid; a non-zero exit, a key problem or no VALIDSIG is not."""
    good = evaluate_signature(SIGNED, 0)
    assert good.valid and good.reason == Reason.VALID and good.signer_fpr == FPR and good.created == 1738368000
    assert evaluate_signature(SIGNED, 1).reason == Reason.GPG_FAILED
    assert evaluate_signature((*SIGNED, ("KEYREVOKED", "")), 0).reason == Reason.KEY_REVOKED
    assert evaluate_signature(tuple(line for line in SIGNED if line[0] != "VALIDSIG"), 0).reason == Reason.NO_VALIDSIG
    assert evaluate_signature((), 0).reason == Reason.NO_SIGNATURE
