"""Detached signatures made by the service's gpg-agent directly, without a gpg process per signature.

A ``gpg --detach-sign`` run costs a process start and a keyring load (about
4 ms of CPU here) around the one step that needs the secret key: gpg hashes
the data, sends the digest to its gpg-agent (``SIGKEY``, ``SETHASH``,
``PKSIGN`` over the agent's Assuan socket) and wraps the value the agent
returns in an OpenPGP signature packet (RFC 4880 §5.2.3). :class:`AgentSigner`
does the same steps from this process, over a connection of its own to the
same agent (one per signature: connecting costs about as much as a pool would
save): the secret key never leaves the agent, exactly as with gpg.

It is only ever used after it proved itself on this keyring
(:meth:`AgentSigner.setup`): gpg makes one signature (which tells the key gpg
itself signs with: ``SIG_CREATED`` names it, subkeys included), the agent
makes one over the same data, and ``gpg --verify`` must call that one valid
and by that key. Key algorithms other than EdDSA, ECDSA and RSA, or any
failure of the check, leave signing to gpg processes. A failure later (the
agent restarted, a wrong passphrase) falls back to a gpg process for that
signature: :meth:`mailer.openpgp.OpenPGP.sign_detached` is the interface,
this is how it is carried out.
"""

from __future__ import annotations

import base64
import hashlib
import socket
import struct
import subprocess
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["AgentError", "AgentKey", "AgentSigner", "armor", "crc24", "parse_sexp"]

#: OpenPGP public-key algorithm ids (RFC 4880 §9.1; 22 = EdDSA as GnuPG 2.2 writes it) -> the agent's name
_ALGORITHMS = {1: "rsa", 19: "ecdsa", 22: "eddsa"}
#: OpenPGP hash algorithm id of SHA-256 (also libgcrypt's GCRY_MD_SHA256, the number SETHASH takes)
SHA256 = 8
_TIMEOUT = 10.0  # seconds for one agent exchange (the agent answers in well under 1 ms)


class AgentError(Exception):
    """The agent refused or the exchange failed; the caller signs with a gpg process instead."""


@dataclass(frozen=True)
class AgentKey:
    """The (sub)key gpg signs with: its fingerprint, keygrip (the agent's name for it) and algorithm id."""

    fingerprint: str
    keygrip: str
    algorithm: int


# --------------------------------------------------------------------------- formats


def parse_sexp(data: bytes) -> list[object]:
    """A canonical S-expression (``(7:sig-val(5:eddsa(1:r32:...)))``) as nested lists of bytes."""
    stack: list[list[object]] = [[]]
    i = 0
    while i < len(data):
        c = data[i]
        if c == 0x28:  # (
            stack.append([])
            i += 1
        elif c == 0x29:  # )
            if len(stack) < 2:
                raise AgentError("unbalanced S-expression")
            done = stack.pop()
            stack[-1].append(done)
            i += 1
        elif 0x30 <= c <= 0x39:
            colon = data.find(b":", i)
            if colon < 0 or not data[i:colon].isdigit():
                raise AgentError("bad length in S-expression")
            length = int(data[i:colon])
            start = colon + 1
            if start + length > len(data):
                raise AgentError("truncated S-expression")
            stack[-1].append(data[start:start + length])
            i = start + length
        else:
            raise AgentError(f"unexpected byte {c:#x} in S-expression")
    if len(stack) != 1 or len(stack[0]) != 1 or not isinstance(stack[0][0], list):
        raise AgentError("not one S-expression")
    return stack[0][0]


def _mpi(value: bytes) -> bytes:
    """An OpenPGP multiprecision integer (RFC 4880 §3.2): bit count, then the bytes without leading zeros."""
    number = int.from_bytes(value, "big")
    bits = number.bit_length()
    return struct.pack(">H", bits) + number.to_bytes((bits + 7) // 8, "big")


def _subpacket(kind: int, body: bytes) -> bytes:
    length = len(body) + 1
    assert length < 192
    return bytes([length, kind]) + body


def _packet(tag: int, body: bytes) -> bytes:
    """A new-format packet header (RFC 4880 §4.2.2) and *body*."""
    n = len(body)
    if n < 192:
        length = bytes([n])
    elif n < 8384:
        n -= 192
        length = bytes([(n >> 8) + 192, n & 0xFF])
    else:
        length = b"\xff" + struct.pack(">I", n)
    return bytes([0xC0 | tag]) + length + body


def crc24(data: bytes) -> int:
    """The armor checksum (RFC 4880 §6.1)."""
    crc = 0xB704CE
    for byte in data:
        crc ^= byte << 16
        for _ in range(8):
            crc <<= 1
            if crc & 0x1000000:
                crc ^= 0x1864CFB
    return crc & 0xFFFFFF


def armor(packet: bytes, block: str = "SIGNATURE") -> bytes:
    """ASCII armor (RFC 4880 §6.2) as gpg writes it: LF line ends, 64 columns, the CRC line."""
    body = base64.b64encode(packet)
    lines = [body[i:i + 64] for i in range(0, len(body), 64)]
    checksum = base64.b64encode(crc24(packet).to_bytes(3, "big"))
    return b"\n".join([f"-----BEGIN PGP {block}-----".encode(), b"", *lines, b"=" + checksum,
                       f"-----END PGP {block}-----".encode(), b""])


def _signature_values(sexp: list[object], algorithm: int) -> bytes:
    """The MPIs of ``(sig-val (ALGO (r ..) (s ..)))`` in OpenPGP order."""
    if len(sexp) != 2 or sexp[0] != b"sig-val" or not isinstance(sexp[1], list) or not sexp[1]:
        raise AgentError("not a sig-val")
    inner = sexp[1]
    if inner[0] != _ALGORITHMS[algorithm].encode():
        raise AgentError(f"agent signed with {inner[0]!r}, expected {_ALGORITHMS[algorithm]}")
    values: dict[bytes, bytes] = {}
    for item in inner[1:]:
        if isinstance(item, list) and len(item) == 2 and isinstance(item[0], bytes) and isinstance(item[1], bytes):
            values[item[0]] = item[1]
    names = (b"s",) if algorithm == 1 else (b"r", b"s")
    if any(name not in values for name in names):
        raise AgentError("sig-val without its values")
    return b"".join(_mpi(values[name]) for name in names)


def signature_packet(data: bytes, key: AgentKey, sign_digest: Callable[[bytes], list[object]], *,
                     now: float | None = None) -> bytes:
    """A v4 binary-document signature packet over *data* (RFC 4880 §5.2.3, §5.2.4).

    ``sign_digest(digest) -> sig-val S-expression`` is the agent exchange. Hashed
    subpackets: issuer fingerprint (33) and creation time (2), as gpg writes them;
    unhashed: the issuer key id (16), for older verifiers.
    """
    fingerprint = bytes.fromhex(key.fingerprint)
    created = int(time.time() if now is None else now)
    hashed = _subpacket(33, b"\x04" + fingerprint) + _subpacket(2, struct.pack(">I", created))
    head = bytes([4, 0x00, key.algorithm, SHA256]) + struct.pack(">H", len(hashed)) + hashed
    digest = hashlib.sha256(data + head + b"\x04\xff" + struct.pack(">I", len(head))).digest()
    values = _signature_values(sign_digest(digest), key.algorithm)
    unhashed = _subpacket(16, fingerprint[-8:])
    return _packet(2, head + struct.pack(">H", len(unhashed)) + unhashed + digest[:2] + values)


# --------------------------------------------------------------------------- the Assuan exchange


def _escape(data: bytes) -> bytes:
    return data.replace(b"%", b"%25").replace(b"\r", b"%0D").replace(b"\n", b"%0A")


def _unescape(data: bytes) -> bytes:
    if b"%" not in data:
        return data
    out = bytearray()
    i = 0
    while i < len(data):
        if data[i] == 0x25 and i + 2 < len(data):
            out.append(int(data[i + 1:i + 3], 16))
            i += 3
        else:
            out.append(data[i])
            i += 1
    return bytes(out)


class _Connection:
    """One Assuan connection to the agent (one exchange at a time)."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(_TIMEOUT)
        try:
            self.sock.connect(path)
        except OSError as exc:
            self.sock.close()
            raise AgentError(f"cannot connect to gpg-agent: {exc}") from exc
        self.buffer = b""
        self.transact(None)  # the greeting

    def _line(self) -> bytes:
        while b"\n" not in self.buffer:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise AgentError("gpg-agent closed the connection")
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line

    def transact(self, command: bytes | None, inquiries: dict[bytes, bytes] | None = None) -> bytes:
        """Send *command*, answer INQUIREs from *inquiries*, return the D data; :class:`AgentError` on ERR."""
        try:
            if command is not None:
                self.sock.sendall(command + b"\n")
            data = b""
            while True:
                line = self._line()
                if line == b"OK" or line.startswith(b"OK "):
                    return data
                if line.startswith(b"D "):
                    data += _unescape(line[2:])
                elif line.startswith(b"ERR"):
                    raise AgentError(line.decode("latin-1")[:200])
                elif line.startswith(b"INQUIRE "):
                    keyword = line[8:].split(b" ", 1)[0]
                    answer = (inquiries or {}).get(keyword)
                    if answer is None:
                        self.sock.sendall(b"CAN\n")
                    else:
                        self.sock.sendall(b"D " + _escape(answer) + b"\nEND\n")
                # S (status) and # (comment) lines carry nothing needed here
        except OSError as exc:
            raise AgentError(f"gpg-agent exchange failed: {exc}") from exc

    def close(self) -> None:
        self.sock.close()


def _close_all(connections: list[_Connection]) -> None:
    for conn in connections:
        conn.close()
    connections.clear()


class AgentSigner:
    """Signs digests with one key of one gpg-agent (thread-safe: one connection per signature at a time).

    Connections are kept for the next signature (up to ``IDLE`` of them): each
    new one costs the agent a thread and us a round trip more. A kept connection
    the agent has dropped meanwhile (it was restarted) is replaced once.
    """

    IDLE = 8

    def __init__(self, socket_path: str, key: AgentKey, passphrase: str | None) -> None:
        if key.algorithm not in _ALGORITHMS:
            raise AgentError(f"public-key algorithm {key.algorithm} is signed by gpg processes")
        self.socket_path = socket_path
        self.key = key
        self.passphrase = passphrase
        self._idle: list[_Connection] = []
        self._lock = threading.Lock()
        # a signer dropped without close() (an OpenPGP object let go) still closes what it kept
        weakref.finalize(self, _close_all, self._idle)

    @staticmethod
    def socket_for(home: str, gpgconf: str = "gpgconf") -> str:
        """The agent socket of GNUPGHOME *home* (gpgconf knows where a long home path puts it)."""
        out = subprocess.run([gpgconf, "--homedir", home, "--list-dirs", "agent-socket"],
                             capture_output=True, timeout=_TIMEOUT, check=True).stdout
        return out.decode("utf-8").strip().replace("%3a", ":").replace("%3A", ":")

    def _open(self) -> _Connection:
        conn = _Connection(self.socket_path)
        try:
            conn.transact(b"OPTION pinentry-mode=" + (b"loopback" if self.passphrase is not None else b"error"))
        except AgentError:
            conn.close()
            raise
        return conn

    def _exchange(self, conn: _Connection, digest: bytes) -> list[object]:
        inquiries = {b"PASSPHRASE": self.passphrase.encode("utf-8")} if self.passphrase is not None else None
        conn.transact(b"SIGKEY " + self.key.keygrip.encode("ascii"))
        conn.transact(b"SETHASH %d " % SHA256 + digest.hex().upper().encode("ascii"))
        return parse_sexp(conn.transact(b"PKSIGN", inquiries))

    def sign_digest(self, digest: bytes) -> list[object]:
        """The agent's ``sig-val`` over a SHA-256 *digest* by the key."""
        while True:
            with self._lock:
                kept = self._idle.pop() if self._idle else None
            conn = kept or self._open()
            try:
                values = self._exchange(conn, digest)
            except AgentError:
                conn.close()
                if kept is not None:
                    continue  # a kept connection may have outlived its agent: once more on a new one
                raise
            with self._lock:
                if len(self._idle) < self.IDLE:
                    self._idle.append(conn)
                    return values
            conn.close()
            return values

    def close(self) -> None:
        """Close the kept connections."""
        with self._lock:
            _close_all(self._idle)

    def sign(self, data: bytes) -> bytes:
        """An armored detached signature over *data*, as ``gpg -sa --detach-sign --digest-algo SHA256`` makes."""
        return armor(signature_packet(data, self.key, self.sign_digest))
