"""Detached signatures made by gpg-agent directly (mailer/openpgp/agent.py), checked by real gpg.

Every signature here is verified by a separate gpg home that holds only the
service's public key, the way a reporter's mail client sees it.
"""

from __future__ import annotations

import base64
import re
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from mailer.metrics import GPG
from mailer.openpgp import CryptoError, OpenPGP
from mailer.openpgp.agent import AgentError, armor, crc24, parse_sexp
from tests.conftest import gnupg_home
from tests.gpgtools import Home, kill_and_remove, short_tmpdir

DATA = b"Content-Type: text/plain; charset=us-ascii\r\n\r\nThe report, 10 EUR.\r\n"


@pytest.fixture
def reader() -> Iterator[Home]:
    home = Home()
    yield home
    home.close()


def process_count(op: str) -> int:
    """How many ``op`` operations ``mailer_gpg_seconds`` counted (``agent-sign``: signatures by the agent)."""
    for metric in GPG.collect():
        for sample in metric.samples:
            if sample.name.endswith("_count") and sample.labels.get("op") == op:
                return int(sample.value)
    return 0


def agent_count() -> int:
    return process_count("agent-sign")


def verify(reader: Home, gpg: OpenPGP, data: bytes, signature: bytes, *, key_fpr: str | None = None) -> None:
    """*signature* is valid over *data* for a home that only has the service's public key."""
    reader.import_(gpg.export_public(gpg.service_fingerprint()).encode())
    with open(f"{reader.path}/sig.asc", "wb") as fh:
        fh.write(signature)
    out = reader.gpg("--status-fd", "1", "--verify", f"{reader.path}/sig.asc", "-", data=data).stdout.decode()
    validsig = re.search(r"^\[GNUPG:\] VALIDSIG (\S+) \S+ \S+ \S+ \S+ \S+ \S+ \S+ \S+ (\S+)$", out, re.M)
    assert validsig, out
    assert validsig.group(2) == gpg.service_fingerprint()
    assert validsig.group(1) == (key_fpr or gpg.service_fingerprint())
    assert "GOODSIG" in out


def test_agent_signatures_verify_and_no_gpg_process_runs(reader: Home) -> None:
    gpg = OpenPGP(gnupg_home())
    gpg.sign_detached(b"warm up\n")  # the set-up: one gpg signature, one agent signature gpg checks
    before, processes_before = agent_count(), process_count("detach-sign")
    with ThreadPoolExecutor(4) as pool:  # the sender signs several at once
        results = list(pool.map(lambda i: gpg.sign_detached(DATA + str(i).encode()), range(12)))
    assert agent_count() == before + 12
    assert process_count("detach-sign") == processes_before
    for i, result in enumerate(results):
        assert result.micalg == "pgp-sha256"
        verify(reader, gpg, DATA + str(i).encode(), result.signature)
    assert gpg.verify_detached(DATA + b"0", results[1].signature).reason.value == "bad signature"
    gpg.kill_agent()


def test_armor_is_the_one_gpg_writes(reader: Home) -> None:
    gpg = OpenPGP(gnupg_home())
    made_by_gpg = gpg.sign_detached(DATA, via_agent=False).signature
    body = made_by_gpg.split(b"\n\n", 1)[1].rsplit(b"\n=", 1)[0]
    packet = base64.b64decode(body)
    assert armor(packet) == made_by_gpg  # line length, CRC line, LF endings
    assert crc24(b"") == 0xB704CE
    gpg.kill_agent()


def test_passphrase_protected_key(reader: Home) -> None:
    home = short_tmpdir()
    try:
        gpg = OpenPGP(home)
        gpg.ensure_service_key("Security Team", "security@example.net", "pässword with spaces")
        before = agent_count()
        result = gpg.sign_detached(DATA)
        assert agent_count() == before + 1
        verify(reader, gpg, DATA, result.signature)
        wrong = OpenPGP(home, passphrase="not it")
        wrong.kill_agent()  # nothing cached: the agent must ask for (and refuse) the passphrase
        with pytest.raises(CryptoError):
            wrong.sign_detached(DATA)
        gpg.kill_agent()
    finally:
        kill_and_remove(home)


def test_rsa_key_signing_subkey(reader: Home) -> None:
    """gpg signs with the newest signing subkey; the agent must sign with that one too."""
    maker = Home()
    try:
        fpr = maker.gen_key("RSA Team", "rsa@example.net", algo="rsa2048")
        maker.add_signing_subkey(fpr)
        subkey = maker.subkey_fingerprints(fpr)[-1]
        home = short_tmpdir()
        try:
            gpg = OpenPGP(home)
            gpg.import_secret(maker.export_secret(fpr))
            before = agent_count()
            result = gpg.sign_detached(DATA)
            assert agent_count() == before + 1
            verify(reader, gpg, DATA, result.signature, key_fpr=subkey)
            gpg.kill_agent()
        finally:
            kill_and_remove(home)
        home = short_tmpdir()
        try:  # without the subkey: the RSA primary key
            plain = Home()
            rsa = plain.gen_key("RSA Only", "rsa-only@example.net", algo="rsa2048")
            gpg = OpenPGP(home)
            gpg.import_secret(plain.export_secret(rsa))
            plain.close()
            before = agent_count()
            result = gpg.sign_detached(DATA)
            assert agent_count() == before + 1
            verify(reader, gpg, DATA, result.signature)
            gpg.kill_agent()
        finally:
            kill_and_remove(home)
    finally:
        maker.close()


def test_unsupported_algorithm_signs_with_gpg(reader: Home) -> None:
    maker = Home()
    home = short_tmpdir()
    try:
        maker.gpg("--quick-gen-key", "DSA Team <dsa@example.net>", "dsa2048", "sign", "0")
        fpr = maker.fingerprint("dsa@example.net")
        gpg = OpenPGP(home)
        gpg.import_secret(maker.export_secret(fpr))
        before = agent_count()
        result = gpg.sign_detached(DATA)
        assert agent_count() == before
        assert result.micalg == "pgp-sha256"
        verify(reader, gpg, DATA, result.signature)
    finally:
        maker.close()
        kill_and_remove(home)


def test_agent_restarted_between_signatures(reader: Home) -> None:
    gpg = OpenPGP(gnupg_home())
    gpg.sign_detached(DATA)
    kill_and_remove_agent_only(gpg.home)  # the agent goes away under the open connections
    result = gpg.sign_detached(DATA)  # one gpg signature (which starts an agent), then the agent again
    verify(reader, gpg, DATA, result.signature)
    before = agent_count()
    verify(reader, gpg, DATA, gpg.sign_detached(DATA).signature)
    assert agent_count() == before + 1
    gpg.kill_agent()


def test_kept_connection_to_a_restarted_agent_is_replaced(reader: Home) -> None:
    """The agent restarted while a connection was kept: the next signature is still the agent's, on a new one."""
    gpg = OpenPGP(gnupg_home())
    gpg.sign_detached(DATA)  # the set-up; the connection is kept
    kill_and_remove_agent_only(gpg.home)
    subprocess.run(["gpg-connect-agent", "--homedir", gpg.home, "/bye"], capture_output=True, timeout=10, check=True)
    before, processes_before = agent_count(), process_count("detach-sign")
    result = gpg.sign_detached(DATA)
    assert (agent_count(), process_count("detach-sign")) == (before + 1, processes_before)
    verify(reader, gpg, DATA, result.signature)
    gpg.kill_agent()


def kill_and_remove_agent_only(home: str) -> None:
    subprocess.run(["gpgconf", "--homedir", home, "--kill", "gpg-agent"], capture_output=True, timeout=10, check=True)


@pytest.mark.parametrize("data", [b"", b"(", b"(3:abc", b"(9:abc)", b"x", b"(1:a)(1:b)", b"3:abc", b"(3abc)", b"(3x:abc)", b")"])
def test_malformed_sexp_is_an_agent_error(data: bytes) -> None:
    with pytest.raises(AgentError):
        parse_sexp(data)


def test_sexp() -> None:
    assert parse_sexp(b"(7:sig-val(5:eddsa(1:r3:\x00())(1:s1:))))") == [b"sig-val", [b"eddsa", [b"r", b"\x00()"], [b"s", b")"]]]
