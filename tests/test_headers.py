"""mailer.headers: parsed header values are kept, and what is kept is what email's own registry gives."""

from __future__ import annotations

from email import policy
from email.parser import BytesParser

from mailer.headers import DEFAULT, KeptHeaders

RAW = (b'From: "Boss, Corp" <boss@corp.example>, eve@evil.example\r\n'
       b"To: security@example.org\r\n"
       b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?= and more\r\n"
       b"Date: Mon, 07 Dec 2026 01:02:03 +0000\r\n"
       b"Message-ID: <a@b.example>\r\n"
       b"MIME-Version: 1.0\r\n"
       b'Content-Type: multipart/mixed; boundary="BB"\r\n\r\n'
       b"--BB\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nhello\r\n"
       b'--BB\r\nContent-Type: application/octet-stream; name="x.bin"\r\n'
       b'Content-Disposition: attachment; filename="x.bin"\r\nContent-Transfer-Encoding: base64\r\n\r\nAAAA\r\n'
       b"--BB--\r\n")


def test_headers_read_through_the_kept_registry_equal_the_standard_ones() -> None:
    kept = BytesParser(policy=DEFAULT).parsebytes(RAW)
    plain = BytesParser(policy=policy.default).parsebytes(RAW)
    for name in ("From", "To", "Subject", "Date", "Message-ID", "Content-Type"):
        assert str(kept[name]) == str(plain[name]), name
        assert type(kept[name]).__name__ == type(plain[name]).__name__, name  # each registry makes its classes
    assert [a.addr_spec for a in kept["From"].addresses] == ["boss@corp.example", "eve@evil.example"]
    assert kept["Date"].datetime == plain["Date"].datetime
    assert [p.get_content_type() for p in kept.walk()] == [p.get_content_type() for p in plain.walk()]
    assert [p.get_filename() for p in kept.walk()] == [None, None, "x.bin"]
    assert kept.as_bytes(policy=policy.SMTP) == plain.as_bytes(policy=policy.SMTP)


def test_a_value_is_parsed_once_long_values_are_not_kept_and_the_store_is_bounded() -> None:
    registry = KeptHeaders(size=8)
    first = registry("Content-Type", "text/plain; charset=utf-8")
    assert registry("Content-Type", "text/plain; charset=utf-8") is first
    assert registry("content-type", "text/plain; charset=utf-8") is not first  # the name as written is part of it
    long_value = "x" * (KeptHeaders.LONGEST + 1)
    assert registry("Subject", long_value) is not registry("Subject", long_value)
    for i in range(20):
        registry("Subject", f"subject {i}")
    assert len(registry._kept) <= 8
    assert str(registry("Subject", "subject 19")) == "subject 19"
