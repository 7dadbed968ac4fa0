"""What a project publishes so people can find and check the contact: security.txt and a Web Key Directory.

- :func:`security_txt` writes RFC 9116 ``security.txt`` (Contact, Encryption,
  Policy, Preferred-Languages, Canonical, Expires), clearsigned with the
  service key as RFC 9116 §2.3 allows.
- :func:`write_wkd` writes the Web Key Directory (draft-koch-openpgp-webkey-service)
  for the contact address in both layouts, so mail clients and
  ``gpg --locate-keys`` find the service key by address.
- :func:`fingerprint_groups` is the fingerprint in the groups-of-four form
  people compare by eye.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta
from pathlib import Path

from mailer.config import Config
from mailer.openpgp import OpenPGP

_ZBASE32 = "ybndrfg8ejkmcpqxot1uwisza345h769"


def zbase32(data: bytes) -> str:
    """z-base-32 (RFC 6189 §5.1.6) of ``data``: 5 bits per character, most significant first."""
    bits = int.from_bytes(data, "big")
    count = len(data) * 8
    chars = []
    for shift in range(count - 5, -5, -5):
        chunk = (bits >> shift) & 0x1F if shift >= 0 else (bits << -shift) & 0x1F
        chars.append(_ZBASE32[chunk])
    return "".join(chars)


def wkd_hash(local_part: str) -> str:
    """The WKD name of a local part: z-base-32 of the SHA-1 of its lower-cased form."""
    # SHA-1 is what the WKD spec fixes for naming, not a security choice
    return zbase32(hashlib.sha1(local_part.lower().encode("utf-8"), usedforsecurity=False).digest())


def fingerprint_groups(fingerprint: str) -> str:
    """``ABCD EF01 …``: groups of four, two blocks of five groups."""
    groups = [fingerprint[i:i + 4] for i in range(0, len(fingerprint), 4)]
    return " ".join(groups[:5]) + ("  " + " ".join(groups[5:]) if len(groups) > 5 else "")


def write_wkd(config: Config, gpg: OpenPGP, root: Path) -> list[Path]:
    """Write ``.well-known/openpgpkey`` (advanced and direct layout) under ``root``; returns the files written."""
    local, _, domain = config.service.contact.partition("@")
    key = gpg.export_minimal(gpg.service_fingerprint())
    name = wkd_hash(local)
    base = root / ".well-known" / "openpgpkey"
    written: list[Path] = []
    for layout in (base / domain.lower(), base):  # advanced, then direct
        (layout / "hu").mkdir(parents=True, exist_ok=True)
        target = layout / "hu" / name
        target.write_bytes(key)
        policy = layout / "policy"
        policy.write_text("# security-mailer: keys are published by the project, not submitted\n", encoding="utf-8")
        written += [target, policy]
    return written


def security_txt(config: Config, gpg: OpenPGP, *, now: datetime) -> bytes:
    """RFC 9116 security.txt for the contact, clearsigned by the service key."""
    st = config.security_txt
    expires = now + timedelta(days=st.expires_days)
    lines = [f"Contact: mailto:{config.service.contact}"]
    if st.encryption_url:
        lines.append(f"Encryption: {st.encryption_url}")
    if st.policy_url:
        lines.append(f"Policy: {st.policy_url}")
    if st.canonical_url:
        lines.append(f"Canonical: {st.canonical_url}")
    lines.append(f"Preferred-Languages: {st.preferred_languages}")
    lines.append(f"Expires: {expires.strftime('%Y-%m-%dT%H:%M:%S.000Z')}")
    body = "# OpenPGP key fingerprint: " + fingerprint_groups(gpg.service_fingerprint()) + "\n" + "\n".join(lines) + "\n"
    return gpg.sign_clear(body.encode("utf-8"))
