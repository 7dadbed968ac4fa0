"""Test helpers: throw-away GnuPG homes, test keys and client-style messages.

Everything runs the real ``gpg`` binary (no mocks).  Homes live under /tmp
with short names (gpg-agent socket paths are limited to ~100 chars) and are
torn down with ``gpgconf --kill all``.  The message builders produce bytes the
way mail clients do (Thunderbird/Enigmail, Mutt, K-9/FairEmail, Mailvelope,
Outlook/Exchange mangling) without going through :mod:`mailer.pgpmime`;
:func:`unwrap_default` reads what the service sent with the default limits.
"""

from __future__ import annotations

import base64
import shutil
import subprocess
import tempfile
from dataclasses import dataclass

from mailer.config import ParsingConfig
from mailer.openpgp import OpenPGP
from mailer.pgpmime import Unwrapped, unwrap

GPG = "/usr/bin/gpg"


class Home:
    """A temporary GNUPGHOME driven by direct gpg calls (the "client" side)."""

    def __init__(self) -> None:
        self.path = tempfile.mkdtemp(prefix="g")
        assert len(self.path) < 80

    def gpg(self, *args: str, data: bytes = b"", check: bool = True) -> subprocess.CompletedProcess[bytes]:
        """Run ``gpg --batch --homedir HOME args...`` with *data* on stdin."""
        cmd = [GPG, "--homedir", self.path, "--batch", "--no-tty", "--pinentry-mode", "loopback",
               "--passphrase", "", *args]
        proc = subprocess.run(cmd, input=data, capture_output=True, timeout=120, check=False)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{cmd} failed: {proc.stderr.decode(errors='replace')}")
        return proc

    def gen_key(self, name: str, email: str, *, algo: str = "ed25519", expire: str = "0",
                faked_time: str | None = None, encrypt_subkey: bool = True, sha1_bindings: bool = False) -> str:
        """Generate an unprotected key (``ed25519``+cv25519 or ``rsa2048``); returns its fingerprint.

        ``sha1_bindings``: its self-signatures use SHA-1, as keys made before ~2014 do.
        """
        if algo == "ed25519":
            params = ["Key-Type: eddsa", "Key-Curve: ed25519", "Key-Usage: sign"]
            sub = ["Subkey-Type: ecdh", "Subkey-Curve: cv25519", "Subkey-Usage: encrypt"]
        elif algo == "rsa2048":
            params = ["Key-Type: RSA", "Key-Length: 2048", "Key-Usage: sign"]
            sub = ["Subkey-Type: RSA", "Subkey-Length: 2048", "Subkey-Usage: encrypt"]
        else:
            raise ValueError(algo)
        lines = ["%no-protection", *params, *(sub if encrypt_subkey else []),
                 f"Name-Real: {name}", f"Name-Email: {email}", f"Expire-Date: {expire}", "%commit", ""]
        extra = ["--faked-system-time", faked_time] if faked_time else []
        if sha1_bindings:
            extra += ["--cert-digest-algo", "SHA1"]
        self.gpg(*extra, "--gen-key", data="\n".join(lines).encode())
        return self.fingerprint(email)

    def add_signing_subkey(self, fpr: str) -> None:
        """Add an Ed25519 signing subkey (so signatures are made by a subkey)."""
        self.gpg("--quick-add-key", fpr, "ed25519", "sign", "0")

    def fingerprint(self, query: str) -> str:
        out = self.gpg("--with-colons", "--list-keys", query).stdout.decode()
        return next(line.split(":")[9] for line in out.splitlines() if line.startswith("fpr:"))

    def subkey_fingerprints(self, fpr: str) -> list[str]:
        out = self.gpg("--with-colons", "--list-keys", fpr).stdout.decode()
        return [line.split(":")[9] for line in out.splitlines() if line.startswith("fpr:")][1:]

    def revoke(self, fpr: str) -> None:
        """Import the revocation certificate gpg stored at key generation."""
        with open(f"{self.path}/openpgp-revocs.d/{fpr}.rev", "rb") as fh:
            cert = fh.read().replace(b":-----BEGIN", b"-----BEGIN")
        self.gpg("--import", data=cert)

    def export(self, fpr: str) -> bytes:
        return self.gpg("--armor", "--export", fpr).stdout

    def export_secret(self, fpr: str) -> bytes:
        return self.gpg("--armor", "--export-secret-keys", fpr).stdout

    def import_(self, data: bytes) -> None:
        self.gpg("--import", data=data)

    def encrypt(self, data: bytes, recipients: list[str], *, signer: str | None = None,
                armor: bool = True, throw_keyids: bool = False, extra: tuple[str, ...] = ()) -> bytes:
        """Encrypt like a client (optionally signed in the same message, hidden recipients)."""
        args = ["--trust-model", "always", *extra]
        for r in recipients:
            args += ["-R" if throw_keyids else "-r", r]
        if armor:
            args.append("--armor")
        if signer:
            args += ["--local-user", signer, "--sign"]
        return self.gpg(*args, "--encrypt", data=data).stdout

    def sign_detached(self, data: bytes, *signers: str, faked_time: str | None = None) -> bytes:
        args = [a for s in signers for a in ("--local-user", s + "!")]
        extra = ["--faked-system-time", faked_time] if faked_time else []
        return self.gpg(*extra, *args, "--digest-algo", "SHA256", "--armor", "--detach-sign", data=data).stdout

    def clearsign(self, text: bytes, signer: str) -> bytes:
        return self.gpg("--local-user", signer, "--clearsign", data=text).stdout

    def close(self) -> None:
        subprocess.run(["gpgconf", "--homedir", self.path, "--kill", "all"], capture_output=True, check=False)
        shutil.rmtree(self.path, ignore_errors=True)


def short_tmpdir() -> str:
    """A fresh short directory under /tmp (for service homes)."""
    path = tempfile.mkdtemp(prefix="g")
    assert len(path) < 80
    return path


def kill_and_remove(path: str) -> None:
    subprocess.run(["gpgconf", "--homedir", path, "--kill", "all"], capture_output=True, check=False)
    shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------- special messages


def literal_packets(home: Home, *texts: bytes) -> bytes:
    """Concatenated binary literal-data packets (``gpg --store``)."""
    return b"".join(home.gpg("--compress-algo", "none", "--store", data=t).stdout for t in texts)


def encrypt_raw_packets(home: Home, packets: bytes, recipient: str) -> bytes:
    """Encrypt *packets* without wrapping them in a literal packet (``--no-literal``)."""
    return home.gpg("--trust-model", "always", "--no-literal", "--compress-algo", "none", "--armor",
                    "-r", recipient, "--encrypt", data=packets).stdout


def symmetric(home: Home, data: bytes, passphrase: str = "secret", *, rfc2440: bool = False) -> bytes:
    """Passphrase-encrypted message; ``rfc2440=True`` gives one without MDC."""
    extra = ["--rfc2440", "--cipher-algo", "AES256"] if rfc2440 else []
    cmd = [GPG, "--homedir", home.path, "--batch", "--no-tty", "--pinentry-mode", "loopback",
           "--passphrase", passphrase, *extra, "--armor", "--symmetric"]
    return subprocess.run(cmd, input=data, capture_output=True, check=True, timeout=60).stdout


def no_mdc_to_key(home: Home, data: bytes, recipient: str) -> bytes:
    """Public-key encrypted message without integrity protection (``--rfc2440``)."""
    return home.gpg("--trust-model", "always", "--rfc2440", "--cipher-algo", "AES256", "--armor",
                    "-r", recipient, "--encrypt", data=data).stdout


def compression_bomb(home: Home, recipient: str, mib: int = 50) -> bytes:
    """A small message whose plaintext is *mib* MiB of zeros (compresses ~1000:1)."""
    zeros = b"\0" * (mib * 1024 * 1024)
    return home.gpg("--trust-model", "always", "--compress-level", "9", "-r", recipient,
                    "--encrypt", data=zeros).stdout


def flip_byte(binary: bytes, offset_from_end: int = 30) -> bytes:
    """Flip one bit near the end of a binary OpenPGP message (inside the ciphertext)."""
    buf = bytearray(binary)
    buf[-offset_from_end] ^= 0x01
    return bytes(buf)


def dearmor(home: Home, armored: bytes) -> bytes:
    return home.gpg("--dearmor", data=armored).stdout


# --------------------------------------------------------------------------- MIME builders (client style)

CRLF = b"\r\n"


def _lines(text: str) -> bytes:
    """Join LF text and convert to CRLF."""
    return text.replace("\n", "\r\n").encode("utf-8")


def outer_headers(subject: str = "Report", extra: str = "") -> str:
    return ("From: Reporter <reporter@example.org>\n"
            "To: Security <security@example.com>\n"
            f"Subject: {subject}\n"
            "Date: Sat, 01 Feb 2025 10:00:00 +0000\n"
            "Message-ID: <test@example.org>\n"
            f"{extra}"
            "MIME-Version: 1.0\n")


def inner_text_entity(body: str, *, subject: str | None = None, attachment: tuple[str, bytes] | None = None) -> bytes:
    """An inner MIME entity as Thunderbird puts it inside encryption (CRLF).

    With *subject*, the entity carries protected headers (``protected-headers="v1"``).
    """
    ph = '; protected-headers="v1"' if subject else ""
    head = f"Subject: {subject}\n" if subject else ""
    if attachment is None:
        text = (f"Content-Type: text/plain; charset=UTF-8{ph}\n{head}"
                "Content-Transfer-Encoding: 8bit\n\n" + body + "\n")
        return _lines(text)
    name, data = attachment
    b64 = base64.encodebytes(data).decode()
    text = (f'Content-Type: multipart/mixed; boundary="inner-b"{ph}\n{head}\n'
            "--inner-b\nContent-Type: text/plain; charset=UTF-8\nContent-Transfer-Encoding: 8bit\n\n"
            f"{body}\n"
            f'--inner-b\nContent-Type: application/octet-stream; name="{name}"\n'
            f'Content-Disposition: attachment; filename="{name}"\nContent-Transfer-Encoding: base64\n\n'
            f"{b64}"
            "--inner-b--\n")
    return _lines(text)


def pgpmime_encrypted(armored: bytes, *, subject: str = "...", extra_headers: str = "") -> bytes:
    """RFC 3156 multipart/encrypted as Thunderbird/Mutt send it."""
    text = (outer_headers(subject, extra_headers) +
            'Content-Type: multipart/encrypted; protocol="application/pgp-encrypted";\n'
            ' boundary="enc-b"\n\n'
            "This is an OpenPGP/MIME encrypted message (RFC 4880 and 3156)\n"
            "--enc-b\nContent-Type: application/pgp-encrypted\n"
            "Content-Description: PGP/MIME version identification\n\nVersion: 1\n\n"
            '--enc-b\nContent-Type: application/octet-stream; name="encrypted.asc"\n'
            "Content-Description: OpenPGP encrypted message\n"
            'Content-Disposition: inline; filename="encrypted.asc"\n\n'
            + armored.decode("ascii") + "\n--enc-b--\n")
    return _lines(text)


def exchange_mangled(armored: bytes) -> bytes:
    """What Exchange/Outlook makes of a PGP/MIME encrypted message."""
    text = (outer_headers("...") +
            'Content-Type: multipart/mixed; boundary="ex-b"\n\n'
            "--ex-b\nContent-Type: text/plain; charset=us-ascii\n\n\n"
            '--ex-b\nContent-Type: application/pgp-encrypted; name="PGPMIME version identification"\n'
            "Content-Description: PGP/MIME version identification\n"
            'Content-Disposition: attachment; filename="PGPMIME version identification"\n'
            "Content-Transfer-Encoding: base64\n\n"
            + base64.encodebytes(b"Version: 1\r\n").decode() +
            '\n--ex-b\nContent-Type: application/octet-stream; name="encrypted.asc"\n'
            'Content-Disposition: attachment; filename="encrypted.asc"\n'
            "Content-Transfer-Encoding: base64\n\n"
            + base64.encodebytes(armored).decode() + "\n--ex-b--\n")
    return _lines(text)


@dataclass
class SignedParts:
    """The exact first part of a multipart/signed and the builder for the whole mail."""

    signed_part: bytes  # CRLF, exactly what the signature covers

    def message(self, signature: bytes, *, line_ending: bytes = CRLF, micalg: str = "pgp-sha256",
                protocol: str = "application/pgp-signature", extra_parts: int = 0) -> bytes:
        text = (outer_headers() +
                f'Content-Type: multipart/signed; micalg={micalg};\n protocol="{protocol}";\n'
                ' boundary="sig-b"\n\nThis is an OpenPGP/MIME signed message (RFC 4880 and 3156)\n'
                "--sig-b\n").replace("\n", "\r\n").encode()
        text += self.signed_part
        text += (b"\r\n--sig-b\r\nContent-Type: application/pgp-signature; name=\"signature.asc\"\r\n"
                 b"Content-Description: OpenPGP digital signature\r\n"
                 b"Content-Disposition: attachment; filename=\"signature.asc\"\r\n\r\n"
                 + signature.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))
        for i in range(extra_parts):
            text += f"\r\n--sig-b\r\nContent-Type: text/plain\r\n\r\nextra {i}\r\n".encode()
        text += b"\r\n--sig-b--\r\n"
        if line_ending != CRLF:
            text = text.replace(CRLF, line_ending)
        return text


def signed_part(body: str) -> SignedParts:
    """A quoted-printable text part as Thunderbird signs it (CRLF)."""
    part = _lines("Content-Type: text/plain; charset=UTF-8\nContent-Transfer-Encoding: quoted-printable\n\n"
                  + body)
    return SignedParts(part)


def plain_message(body: str, *, content_type: str = "text/plain; charset=UTF-8", extra_headers: str = "") -> bytes:
    return _lines(outer_headers(extra=extra_headers) + f"Content-Type: {content_type}\n\n{body}\n")


def mixed_message(*parts: bytes, extra_headers: str = "") -> bytes:
    """multipart/mixed of raw CRLF part bytes (each starting with its headers)."""
    body = _lines(outer_headers(extra=extra_headers) + 'Content-Type: multipart/mixed; boundary="mix-b"\n\n')
    for p in parts:
        body += b"--mix-b\r\n" + p + b"\r\n"
    return body + b"--mix-b--\r\n"


def strip_outer(message: bytes) -> bytes:
    """The message without the From/To/Subject/... header lines (to nest it as a part)."""
    head, _, body = message.partition(b"\r\n\r\n")
    keep = [line for line in head.split(b"\r\n") if line.lower().startswith((b"content-", b" ", b"\t"))]
    return b"\r\n".join(keep) + b"\r\n\r\n" + body


# --------------------------------------------------------------------------- reading (service side)


def unwrap_default(raw: bytes, gpg: OpenPGP) -> Unwrapped:
    """:func:`mailer.pgpmime.unwrap` with the default :class:`~mailer.config.ParsingConfig` limits."""
    return unwrap(raw, gpg, limits=ParsingConfig())
