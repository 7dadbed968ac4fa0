"""The decryption helper (mailer.openpgp.helper): unsigned mail without a gpg process, the same answers as gpg.

Real gpg, real keys and the real helper process; the fast path must never
change an answer: every refusal and every signed message is gpg's to decide.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from mailer.metrics import REGISTRY
from mailer.openpgp import OpenPGP, Reason
from mailer.openpgp.helper import DecryptHelper
from tests.gpgtools import (
    Home,
    compression_bomb,
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
    svc: OpenPGP  # the helper on (the default)
    plain: OpenPGP  # the same home, gpg only
    svc_fpr: str
    client: Home
    alice: str  # known to the service
    mallory: str  # not known to the service


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    home = short_tmpdir()
    client = Home()
    svc = OpenPGP(home)
    try:
        svc_fpr = svc.ensure_service_key("Security Team", "security@example.com")
        alice = client.gen_key("Alice", "alice@example.org")
        mallory = client.gen_key("Mallory", "mallory@example.org")
        client.gpg("--import", data=svc.export_public(svc_fpr).encode())
        svc.import_public(client.gpg("--export", alice).stdout)
        yield World(svc, OpenPGP(home, decrypt_helper=False), svc_fpr, client, alice, mallory)
    finally:
        kill_and_remove(home)
        kill_and_remove(client.path)


def runs(op: str) -> float:
    """How many times ``op`` ran in this process (mailer_gpg_seconds)."""
    return REGISTRY.get_sample_value("mailer_gpg_seconds_count", {"op": op}) or 0.0


def helper_for(world: World, **kwargs: float) -> DecryptHelper:
    return DecryptHelper(world.svc.export_decryption_subkeys, passphrase=None, max_output=world.svc.max_output,
                         timeout=world.svc.timeout, **kwargs)


def test_unsigned_message_is_decrypted_without_gpg(world: World) -> None:
    """An unsigned message to the service key is decrypted by the helper: no gpg --decrypt, gpg's result."""
    ct = world.client.encrypt(SECRET * 50, [world.svc_fpr])
    by_gpg, by_helper = runs("decrypt"), runs("decrypt-in-helper")
    res = world.svc.decrypt(ct)
    assert (runs("decrypt"), runs("decrypt-in-helper")) == (by_gpg, by_helper + 1)
    assert res == world.plain.decrypt(ct)
    assert res.ok and res.data == SECRET * 50 and res.reason == Reason.OK and not res.signature.valid
    assert len(res.recipients) == 1 and res.recipients[0] != "0000000000000000"


@pytest.mark.parametrize("armor", [True, False])
def test_binary_and_armored_give_the_same(world: World, armor: bool) -> None:
    """Binary and armored messages both take the fast path and give gpg's recipients (hidden ones as zeros)."""
    for throw_keyids in (False, True):
        ct = world.client.encrypt(SECRET, [world.svc_fpr], armor=armor, throw_keyids=throw_keyids)
        by_helper = runs("decrypt-in-helper")
        assert world.svc.decrypt(ct) == world.plain.decrypt(ct)
        assert runs("decrypt-in-helper") == by_helper + 1


@pytest.mark.parametrize("signer", ["alice", "mallory"])
def test_signed_message_is_left_to_gpg(world: World, signer: str) -> None:
    """A signed and encrypted message is decrypted by gpg, which alone judges the signature (valid or unknown)."""
    ct = world.client.encrypt(SECRET, [world.svc_fpr], signer=getattr(world, signer))
    by_gpg, by_helper = runs("decrypt"), runs("decrypt-in-helper")
    res = world.svc.decrypt(ct)
    assert runs("decrypt-in-helper") == by_helper and runs("decrypt") > by_gpg
    assert res.ok and res.data == SECRET
    assert res.signature.valid is (signer == "alice")
    assert res.signature.reason == (Reason.VALID if signer == "alice" else Reason.UNKNOWN_KEY)


def _refusals(world: World) -> dict[str, bytes]:
    client, fpr = world.client, world.svc_fpr
    one = client.encrypt(SECRET, [fpr])
    return {
        "no MDC": no_mdc_to_key(client, SECRET, fpr),
        "passphrase": symmetric(client, SECRET),
        "not our key": client.encrypt(SECRET, [world.alice]),
        "several literals": encrypt_raw_packets(client, literal_packets(client, b"a\n", b"b\n"), fpr),
        "tampered": flip_byte(client.encrypt(SECRET * 20, [fpr], armor=False)),
        "two messages, binary": client.encrypt(SECRET, [fpr], armor=False) * 2,
        "two armored blocks": one + one,
        "garbage armor": b"-----BEGIN PGP MESSAGE-----\n\n%%%%\n-----END PGP MESSAGE-----\n",
        "empty": b"",
        "not OpenPGP": b"hello, not PGP at all",
    }


def test_every_refusal_is_gpgs(world: World) -> None:
    """Messages gpg refuses get gpg's answer, reason and no data, whether or not the helper is on."""
    for name, ct in _refusals(world).items():
        res = world.svc.decrypt(ct)
        assert res == world.plain.decrypt(ct), name
        assert not res.ok and res.data is None, name


def test_compression_bomb_kills_only_the_helper(world: World, caplog: pytest.LogCaptureFixture) -> None:
    """A bomb exhausts the helper's memory limit: the helper dies, gpg answers 'too large', the caller lives on."""
    capped = OpenPGP(world.svc.home, max_output=1024 * 1024)
    helper = capped.helper
    assert helper is not None
    helper.restart_after = 0
    try:
        ct = world.client.encrypt(SECRET, [world.svc_fpr])
        assert capped.decrypt(ct).ok
        first = helper.pid
        assert first is not None
        with caplog.at_level(logging.WARNING, "mailer.openpgp.helper"):
            res = capped.decrypt(compression_bomb(world.client, world.svc_fpr, mib=100))
        assert not res.ok and res.reason == Reason.TOO_LARGE and res.data is None
        assert "out of its memory limit" in caplog.text
        assert helper.pid is None
        by_helper = runs("decrypt-in-helper")
        assert capped.decrypt(ct).data == SECRET and runs("decrypt-in-helper") == by_helper + 1
        assert helper.pid not in (None, first)
    finally:
        helper.close()


def test_helper_that_died_is_not_started_again_at_once(world: World) -> None:
    """After the helper is killed gpg decrypts (same answer) until restart_after passed, then a new helper does."""
    helper = helper_for(world, restart_after=0.5)
    try:
        ct = world.client.encrypt(SECRET, [world.svc_fpr])
        assert helper.decrypt(ct) is not None
        pid = helper.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        assert helper.decrypt(ct) is None  # gpg's to do: the helper is gone
        assert helper.decrypt(ct) is None and helper.pid is None  # and not started again yet
        time.sleep(0.6)
        again = helper.decrypt(ct)
        assert again is not None and again.data == SECRET and helper.pid not in (None, pid)
    finally:
        helper.close()


def test_helper_is_replaced_when_the_key_may_have_changed(world: World) -> None:
    """forget() (a key imported or generated here) and max_age (changed elsewhere) each start a new helper."""
    helper = helper_for(world, max_age=0.3)
    try:
        ct = world.client.encrypt(SECRET, [world.svc_fpr])
        assert helper.decrypt(ct) is not None
        first = helper.pid
        helper.forget()
        assert helper.pid is None and helper.decrypt(ct) is not None
        second = helper.pid
        time.sleep(0.4)
        assert helper.decrypt(ct) is not None
        assert len({first, second, helper.pid}) == 3
    finally:
        helper.close()


def test_importing_a_public_key_keeps_the_helper_a_secret_key_replaces_it(world: World) -> None:
    """A public key imported (a maintainer's) leaves the helper running; ensure_service_key starts a new one."""
    ct = world.client.encrypt(SECRET, [world.svc_fpr])
    helper = world.svc.helper
    assert helper is not None and world.svc.decrypt(ct).ok
    first = helper.pid
    world.svc.import_public(world.client.gpg("--export", world.mallory).stdout)
    assert world.svc.decrypt(ct).ok and helper.pid == first
    assert world.svc.ensure_service_key("Security Team", "security@example.com") == world.svc_fpr
    assert helper.pid is None
    assert world.svc.decrypt(ct).data == SECRET and helper.pid not in (None, first)


def test_closed_helper_process_is_gone(world: World) -> None:
    """close() ends the helper process (it exits on the end of its input) and reaps it."""
    helper = helper_for(world)
    assert helper.decrypt(world.client.encrypt(SECRET, [world.svc_fpr])) is not None
    pid = helper.pid
    assert pid is not None
    helper.close()
    assert helper.pid is None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_only_the_encryption_subkey_leaves_the_agent(world: World) -> None:
    """What the helper gets holds the encryption subkey's secret and a stub of the primary: it cannot sign."""
    scratch = Home()
    try:
        scratch.gpg("--import", data=world.svc.export_decryption_subkeys())
        listing = scratch.gpg("--with-colons", "--list-secret-keys").stdout.decode()
        records = [line.split(":") for line in listing.splitlines()]
        assert [(r[0], r[14]) for r in records if r[0] in ("sec", "ssb")] == [("sec", "#"), ("ssb", "+")]
        signed = scratch.gpg("--local-user", world.svc_fpr, "--sign", data=SECRET, check=False)
        assert signed.returncode != 0
    finally:
        kill_and_remove(scratch.path)


def test_passphrase_protected_key(world: World) -> None:
    """A service key with a passphrase: the helper unlocks the exported subkey with it and decrypts."""
    home = short_tmpdir()
    try:
        svc = OpenPGP(home, passphrase="pässwörd with spaces")
        fpr = svc.ensure_service_key("Security Team", "security@example.com")
        world.client.gpg("--import", data=svc.export_public(fpr).encode())
        ct = world.client.encrypt(SECRET, [fpr])
        by_helper = runs("decrypt-in-helper")
        res = svc.decrypt(ct)
        assert res.ok and res.data == SECRET and runs("decrypt-in-helper") == by_helper + 1
    finally:
        kill_and_remove(home)


def test_wrong_passphrase_leaves_decryption_to_gpg(world: World, caplog: pytest.LogCaptureFixture) -> None:
    """With a wrong passphrase the subkey cannot be exported: one warning, and gpg's answer (a failure)."""
    home = short_tmpdir()
    try:
        fpr = OpenPGP(home, passphrase="right").ensure_service_key("Security Team", "security@example.com")
        world.client.gpg("--import", data=OpenPGP(home).export_public(fpr).encode())
        ct = world.client.encrypt(SECRET, [fpr])
        subprocess.run(["gpgconf", "--homedir", home, "--kill", "gpg-agent"], check=True)  # forget the passphrase
        wrong = OpenPGP(home, passphrase="wrong")
        with caplog.at_level(logging.WARNING, "mailer.openpgp.helper"):
            first, second = wrong.decrypt(ct), wrong.decrypt(ct)
        assert not first.ok and first == second
        assert caplog.text.count("not in a helper process") == 1
    finally:
        kill_and_remove(home)


def test_turned_off_every_decryption_is_a_gpg_process(world: World) -> None:
    """decrypt_helper=False (gnupg.decrypt_helper = false): the subkey stays in the agent, gpg decrypts."""
    ct = world.client.encrypt(SECRET, [world.svc_fpr])
    by_gpg, by_helper = runs("decrypt"), runs("decrypt-in-helper")
    assert world.plain.decrypt(ct).data == SECRET
    assert (runs("decrypt"), runs("decrypt-in-helper")) == (by_gpg + 1, by_helper)


def test_concurrent_callers_each_get_their_own_plaintext(world: World) -> None:
    """Threads sharing one helper get their own message back (one exchange at a time)."""
    from concurrent.futures import ThreadPoolExecutor

    texts = [f"report {i}\n".encode() * (i + 1) for i in range(24)]
    cts = [world.client.encrypt(t, [world.svc_fpr]) for t in texts]
    decrypt: Callable[[bytes], object] = world.svc.decrypt
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(decrypt, cts))
    assert [getattr(r, "data", None) for r in results] == texts
