"""The decryption helper process (run by path, not imported: :mod:`mailer.openpgp.helper` is its parent).

It holds the service's *encryption* subkeys (exported from gpg-agent by the
parent, nothing else of the key) and decrypts messages with Sequoia-PGP in a
process of its own, under an address-space limit: a compression bomb makes an
allocation fail, Rust aborts, and only this process dies (the parent lets gpg,
with ``--max-output``, give the message its answer). It imports nothing of the
service, so it starts fast and parses nothing but OpenPGP.

Wire format (stdin and stdout, both ways): a frame is a 4-byte big-endian length
and that many bytes; the first byte of a frame says what it is.

* set-up, parent -> child: ``{json limits and passphrase}``, then the key bytes;
  answered by ``K`` (ready) or ``E<reason>``;
* request: the ciphertext; answer: ``D`` + recipient count (1 byte) + 8-byte key
  ids + plaintext, or ``S`` (signed: gpg must judge the signature), ``B`` (more
  than ``max_output`` bytes), ``X<reason>`` (the fast path does not take it:
  shape, unknown key, anything Sequoia refuses).

The child exits when its stdin closes (the parent, or the parent's process, is gone).
"""

from __future__ import annotations

import json
import os
import resource
import signal
import struct
import sys
from typing import Any, BinaryIO

import pysequoia
from pysequoia.packet import PacketPile, Tag


class _Signed(Exception):
    """The message carries a signature (the verification callback was given issuers)."""


class _Unsigned(Exception):
    """The message carries no signature (the verification callback was given none)."""


def _probe(issuers: Any) -> list[Any]:
    """pysequoia's certificate lookup, called once the signatures' issuers are known: it only tells which."""
    raise _Signed if list(issuers) else _Unsigned


def _read_frame(stream: BinaryIO) -> bytes | None:
    header = stream.read(4)
    if len(header) < 4:
        return None
    (length,) = struct.unpack(">I", header)
    body = stream.read(length)
    return body if len(body) == length else None


def _write_frame(stream: BinaryIO, body: bytes) -> None:
    stream.write(struct.pack(">I", len(body)) + body)
    stream.flush()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]


def _vm_size() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


def _shape(ciphertext: bytes) -> list[bytes] | str:
    """The PKESK recipients of a message of exactly the shape gpg would decrypt the same, or why not.

    Exactly: one or more public-key encrypted session keys, then one SEIPD v1
    (encrypted, with MDC), and nothing after. No passphrase packet, no
    second message, no SEIPD v2 (GnuPG 2.2 cannot decrypt it: the answer would
    depend on who decrypted).
    """
    try:
        packets = list(PacketPile.from_bytes(ciphertext))
    except Exception as exc:  # noqa: BLE001  # anything Sequoia cannot parse is gpg's to answer
        return f"unparsed: {_first_line(exc)}"
    if len(packets) < 2 or packets[-1].tag != Tag.SEIP:
        return "not PKESK... SEIPD"
    keyids: list[bytes] = []
    for packet in packets[:-1]:
        body = packet.body
        if packet.tag != Tag.PKESK or len(body) < 10 or body[0] != 3:
            return f"unexpected packet {packet.tag}"
        keyids.append(body[1:9])
    if packets[-1].body[:1] != b"\x01":
        return "SEIPD version is not 1"
    return keyids


def _decrypt(ciphertext: bytes, decryptor: Any, max_output: int) -> bytes:
    if ciphertext.count(b"-----BEGIN PGP ") > 1:  # Sequoia reads the first armored block only
        return b"Xseveral armored blocks"
    shape = _shape(ciphertext)
    if isinstance(shape, str):
        return b"X" + shape.encode()

    # With a lookup, pysequoia insists on a verified signature; without one, it ignores signatures. So
    # ask first (the lookup raises, telling which), and decrypt unsigned messages a second time without.
    try:
        pysequoia.decrypt(ciphertext, decryptor=decryptor, store=_probe)
    except _Signed:
        return b"S"
    except _Unsigned:
        pass
    except Exception as exc:  # noqa: BLE001  # pysequoia raises RuntimeError: gpg answers
        return b"X" + _first_line(exc).encode("utf-8", "replace")
    else:
        return b"Xverified without a lookup"
    try:
        result = pysequoia.decrypt(ciphertext, decryptor=decryptor)
    except Exception as exc:  # noqa: BLE001
        return b"X" + _first_line(exc).encode("utf-8", "replace")
    plaintext = result.bytes or b""
    if len(plaintext) > max_output:
        return b"B"
    return b"D" + bytes([len(shape)]) + b"".join(shape) + plaintext


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's ^C is for the service; stdin EOF ends this
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    setup, key = _read_frame(stdin), _read_frame(stdin)
    if setup is None or key is None:
        return 1
    options = json.loads(setup)
    max_output = int(options["max_output"])
    try:
        decryptor = pysequoia.Tsk.from_bytes(key).decryptor(options.get("passphrase"))
    except Exception as exc:  # noqa: BLE001
        _write_frame(stdout, b"E" + _first_line(exc).encode("utf-8", "replace"))
        return 1
    del key
    limit = _vm_size() + int(options["memory_bytes"])
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    _write_frame(stdout, b"K")
    while (request := _read_frame(stdin)) is not None:
        try:
            answer = _decrypt(request, decryptor, max_output)
        except Exception as exc:  # noqa: BLE001  # a bug here must not cost the helper: gpg answers
            answer = b"X" + _first_line(exc).encode("utf-8", "replace")
        _write_frame(stdout, answer)
    return 0


if __name__ == "__main__":
    os.umask(0o077)
    sys.exit(main())
