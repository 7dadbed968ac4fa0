"""Outgoing mail carries an Autocrypt header that a strict reader accepts and that holds the service key."""

from __future__ import annotations

import base64
import re

from mailer.app import Service
from tests.conftest import smtp_port
from tests.gpgtools import Home
from tests.relay import CaptureRelay
from tests.test_intake import asend, report_bytes

REPORTER = "rita@reporter.test"


def strict_autocrypt(raw: bytes) -> dict[str, str]:
    """Read the Autocrypt header as autocrypt.org level 1 says, refusing anything it does not allow.

    Header lines are unfolded per RFC 5322 §2.2.3; attributes are ``name=value``
    pairs separated by ``;``; ``addr`` and ``keydata`` are required; unknown
    critical attributes (not starting with ``_``) are an error; keydata is
    base64 with optional whitespace.
    """
    head = raw.split(b"\r\n\r\n", 1)[0].decode("ascii")
    for line in head.split("\r\n"):
        assert len(line) <= 998, "a header line longer than RFC 5322 allows"
    unfolded = re.sub(r"\r\n(?=[ \t])", "", head)
    [value] = [line.split(":", 1)[1] for line in unfolded.split("\r\n") if line.lower().startswith("autocrypt:")]
    attributes: dict[str, str] = {}
    for item in value.split(";"):
        name, sep, val = item.strip().partition("=")
        assert sep and name, f"not an attribute: {item!r}"
        assert name not in attributes, f"duplicate attribute {name}"
        attributes[name] = val.strip()
    assert {"addr", "keydata"} <= attributes.keys()
    unknown = set(attributes) - {"addr", "keydata", "prefer-encrypt"}
    assert all(name.startswith("_") for name in unknown), f"unknown critical attributes {unknown}"
    assert attributes.get("prefer-encrypt", "mutual") in ("mutual", "nopreference")
    attributes["keydata"] = re.sub(r"\s+", "", attributes["keydata"])
    return attributes


async def test_ack_carries_an_autocrypt_header_with_the_service_key(service: Service, relay: CaptureRelay) -> None:
    """The ack's Autocrypt header names the contact, prefers mutual, and its key data is the service key."""
    await asend(smtp_port(service), report_bytes())
    await service.settle()
    [ack] = relay.handler.to(REPORTER)
    header = strict_autocrypt(ack.raw)
    assert header["addr"] == "security@example.org"
    assert header["prefer-encrypt"] == "mutual"
    reader = Home()
    try:
        reader.gpg("--import", data=base64.b64decode(header["keydata"], validate=True))
        assert reader.fingerprint("security@example.org") == service.fingerprint
    finally:
        reader.close()
