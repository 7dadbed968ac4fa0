"""Text that crosses a trust boundary: the one control-character rule and the one address check.

Anything that may reach an outgoing header goes through :func:`header_safe`;
any address we would write to goes through :func:`valid_address`.
"""

from __future__ import annotations

import re
import unicodedata

from email_validator import EmailNotValidError, validate_email

CONTROL = re.compile(r"[\x00-\x1f\x7f\u0085\u2028\u2029]")
"""Control characters and line separators: never allowed in a header or a one-line argument."""


def header_safe(text: str | None, limit: int = 200) -> str:
    """Text fit for an outgoing header: no control or line-separator characters, bounded length."""
    if not text:
        return ""
    text = unicodedata.normalize("NFC", str(text))
    text = CONTROL.sub(" ", text)
    text = " ".join(text.split())
    return text[:limit]


def normalise_address(address: str) -> str:
    """The normalised form of a mailbox address. :raises ValueError: saying why it is not one."""
    try:
        return validate_email(address, check_deliverability=False, test_environment=True).normalized
    except EmailNotValidError as exc:
        raise ValueError(str(exc)) from None


def valid_address(address: str) -> str | None:
    """The normalised address when it is a deliverable-looking mailbox, else None."""
    try:
        return normalise_address(address)
    except ValueError:
        return None
