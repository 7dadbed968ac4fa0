"""An AEAD (OCB) encrypted OpenPGP message, built packet by packet the way newer clients write it.

GnuPG 2.2 writes no AEAD packets itself, so this builds one with ``cryptography``:
a v3 public-key encrypted session key packet for a Cv25519 (ECDH, RFC 6637) key,
then an AEAD Encrypted Data packet (tag 20, rfc4880bis: AES-256, OCB, chunked),
holding a literal data packet. The recipient's key comes from ``gpg --with-key-data``.
"""

from __future__ import annotations

import hashlib
import os

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESOCB3
from cryptography.hazmat.primitives.keywrap import aes_key_wrap

from mailer.openpgp.agent import armor as armor_block

AES256, OCB, ECDH = 9, 2, 18


def _packet(tag: int, body: bytes) -> bytes:
    return bytes([0xC0 | tag, 0xFF]) + len(body).to_bytes(4, "big") + body


def _mpi(data: bytes) -> bytes:
    return (len(data) * 8 - (8 - data[0].bit_length())).to_bytes(2, "big") + data


def cv25519_subkey(colons: str) -> tuple[bytes, bytes, bytes, bytes]:
    """(fingerprint, curve OID with its length byte, public point without 0x40, KDF params) of the encryption subkey."""
    lines = colons.splitlines()
    for i, line in enumerate(lines):
        fields = line.split(":")
        if fields[0] == "sub" and "e" in fields[11] and fields[3] == "18":
            fpr = bytes.fromhex(lines[i + 1].split(":")[9])
            pkd = [ln.split(":")[3] for ln in lines[i + 2:i + 6] if ln.startswith("pkd:")]
            return fpr, bytes.fromhex(pkd[0]), bytes.fromhex(pkd[1])[1:], bytes.fromhex(pkd[2])
    raise ValueError("no Cv25519 encryption subkey")


def _pkesk(session_key: bytes, colons: str) -> bytes:
    fpr, oid, point, kdf = cv25519_subkey(colons)
    m = bytes([AES256]) + session_key + (sum(session_key) % 65536).to_bytes(2, "big")
    pad = 8 - len(m) % 8
    m += bytes([pad]) * pad
    eph = X25519PrivateKey.generate()
    shared = eph.exchange(X25519PublicKey.from_public_bytes(point))
    param = oid + bytes([ECDH]) + kdf + b"Anonymous Sender    " + fpr
    kek = hashlib.sha256(b"\x00\x00\x00\x01" + shared + param).digest()[: {7: 16, 8: 24, 9: 32}[kdf[3]]]
    wrapped = aes_key_wrap(kek, m)
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    eph_pub = eph.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    body = bytes([3]) + fpr[-8:] + bytes([ECDH]) + _mpi(b"\x40" + eph_pub) + bytes([len(wrapped)]) + wrapped
    return _packet(1, body)


def _aead(session_key: bytes, plaintext: bytes, chunk_byte: int = 4) -> bytes:
    """AEAD Encrypted Data packet (tag 20): version 1, AES-256, OCB, chunks of 2^(c+6) bytes."""
    size = 1 << (chunk_byte + 6)
    iv = os.urandom(15)
    head = bytes([0xC0 | 20, 1, AES256, OCB, chunk_byte])
    ocb = AESOCB3(session_key)

    def nonce(index: int) -> bytes:
        tail = (int.from_bytes(iv[-8:], "big") ^ index).to_bytes(8, "big")
        return iv[:-8] + tail

    chunks = [plaintext[i:i + size] for i in range(0, len(plaintext), size)] or [b""]
    out = b""
    for index, chunk in enumerate(chunks):
        out += ocb.encrypt(nonce(index), chunk, head + index.to_bytes(8, "big"))
    n = len(chunks)
    out += ocb.encrypt(nonce(n), b"", head + n.to_bytes(8, "big") + len(plaintext).to_bytes(8, "big"))
    return _packet(20, bytes([1, AES256, OCB, chunk_byte]) + iv + out)


def armor(binary: bytes) -> bytes:
    return armor_block(binary, "MESSAGE")


def ocb_message(plaintext: bytes, recipient_colons: str, *, armored: bool = True) -> bytes:
    """*plaintext* (as a binary literal) encrypted with AES-256-OCB to the Cv25519 key listed in *recipient_colons*."""
    session_key = os.urandom(32)
    literal = _packet(11, b"b\x00" + b"\x00\x00\x00\x00" + plaintext)
    binary = _pkesk(session_key, recipient_colons) + _aead(session_key, literal)
    return armor(binary) if armored else binary


def tamper(armored_or_binary: bytes) -> bytes:
    """The same message with one bit of the last AEAD chunk flipped (the tag must fail)."""
    data = bytearray(armored_or_binary)
    data[-40] ^= 0x01
    return bytes(data)
