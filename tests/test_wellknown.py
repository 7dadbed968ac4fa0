"""What the project publishes: a Web Key Directory, a signed security.txt, fingerprints people can compare."""

from __future__ import annotations

import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

from mailer.config import Config
from mailer.openpgp import OpenPGP
from mailer.wellknown import fingerprint_groups, security_txt, wkd_hash, write_wkd
from tests.conftest import gnupg_home
from tests.gpgtools import Home


def _config(tmp_path: Path, **security_txt: str) -> Config:
    return Config.model_validate({
        "service": {"data_dir": str(tmp_path / "var"), "contact": "security@example.org"},
        "gnupg": {"home": gnupg_home()},
        "security_txt": security_txt,
    })


def test_wkd_hash_matches_the_specification_example() -> None:
    """The draft's own example: joe.doe hashes to iy9q119eutrkn8s1mk4r39qejnbu3n5q (case-insensitive)."""
    assert wkd_hash("Joe.Doe") == "iy9q119eutrkn8s1mk4r39qejnbu3n5q"


def test_wkd_tree_names_match_gnupg_and_hold_the_service_key(tmp_path: Path) -> None:
    """Both layouts are written under the hash GnuPG itself computes, and the file is the service key."""
    config = _config(tmp_path)
    gpg = OpenPGP(str(config.gnupg_home))
    fpr = gpg.service_fingerprint()
    written = write_wkd(config, gpg, tmp_path / "www")
    listing = subprocess.run(
        ["gpg", "--homedir", str(config.gnupg_home), "--with-wkd-hash", "-k", fpr],
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout
    # GnuPG prints the WKD name of each uid on the line after it: "<hash>@example.org"
    [gnupg_hash] = [line.strip().split("@")[0] for line in listing.splitlines()
                    if line.strip().endswith("@example.org") and not line.lstrip().startswith("uid")]
    advanced = tmp_path / "www/.well-known/openpgpkey/example.org/hu" / gnupg_hash
    direct = tmp_path / "www/.well-known/openpgpkey/hu" / gnupg_hash
    assert advanced in written and direct in written
    assert (tmp_path / "www/.well-known/openpgpkey/example.org/policy").exists()
    reader = Home()
    try:
        reader.gpg("--import", data=advanced.read_bytes())
        assert reader.fingerprint("security@example.org") == fpr
    finally:
        reader.close()


def test_security_txt_is_clearsigned_by_the_service_key(tmp_path: Path) -> None:
    """RFC 9116 fields are present, Expires is a year ahead, and gpg verifies the signature with the service key."""
    config = _config(tmp_path, policy_url="https://example.org/SECURITY.md",
                     encryption_url="https://example.org/.well-known/openpgpkey/hu/x")
    gpg = OpenPGP(str(config.gnupg_home))
    now = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
    signed = security_txt(config, gpg, now=now).decode()
    assert signed.startswith("-----BEGIN PGP SIGNED MESSAGE-----")
    assert "Contact: mailto:security@example.org" in signed
    assert "Policy: https://example.org/SECURITY.md" in signed
    assert "Encryption: https://example.org/.well-known/openpgpkey/hu/x" in signed
    expires = next(line.split(": ", 1)[1] for line in signed.splitlines() if line.startswith("Expires: "))
    assert datetime.fromisoformat(expires.replace("Z", "+00:00")) - now == timedelta(days=365)
    assert fingerprint_groups(gpg.service_fingerprint()) in signed
    reader = Home()
    try:
        reader.gpg("--import", data=gpg.export_public(gpg.service_fingerprint()).encode())
        verified = reader.gpg("--status-fd", "1", "--verify", data=signed.encode())
        assert f"VALIDSIG {gpg.service_fingerprint()}".encode() in verified.stdout
        tampered = signed.replace("mailto:security@", "mailto:attacker@")
        assert reader.gpg("--verify", data=tampered.encode(), check=False).returncode != 0
    finally:
        reader.close()


def test_fingerprint_groups_form() -> None:
    """Ten groups of four, a double space in the middle, as GnuPG prints it."""
    fpr = "0123456789ABCDEF0123456789ABCDEF01234567"
    assert fingerprint_groups(fpr) == "0123 4567 89AB CDEF 0123  4567 89AB CDEF 0123 4567"
