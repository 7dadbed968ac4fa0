"""Parsed header values, kept: ``email``'s standard policies parse a header anew at every access.

With :data:`email.policy.default` a ``msg.get("Content-Type")`` runs the RFC 5322
header parser each time it is called, and ``email``'s own parser and walkers ask
for a part's Content-Type several times over; a received report's headers were
parsed some ten times each. :class:`KeptHeaders` is the standard registry, each
parsed value kept by (name, value): header objects are immutable, so the same
one can be handed to every caller.
"""

from __future__ import annotations

from email import policy
from email.headerregistry import BaseHeader, HeaderRegistry
from email.message import EmailMessage
from email.policy import EmailPolicy


class KeptHeaders(HeaderRegistry):
    """:class:`~email.headerregistry.HeaderRegistry`, remembering up to ``size`` parsed values (short ones).

    A parsed header keeps its parse tree, about 12 KB for a From or Content-Type value: 256 of them cover
    the messages being processed at once (a report has some 10-30 header values) for about 3 MB.
    """

    LONGEST = 2000  # characters: longer values are parsed each time (nothing big is kept)

    def __init__(self, size: int = 256) -> None:
        super().__init__()
        self.size = size
        self._kept: dict[tuple[str, str], BaseHeader] = {}

    def __call__(self, name: str, value: str) -> BaseHeader:
        if len(value) > self.LONGEST:
            return super().__call__(name, value)
        key = (name, value)
        header = self._kept.get(key)
        if header is None:
            header = super().__call__(name, value)
            if len(self._kept) >= self.size:
                self._kept.clear()
            self._kept[key] = header
        return header


#: :data:`email.policy.default` with kept header values: received mail is parsed with it
DEFAULT: EmailPolicy[EmailMessage] = policy.default.clone(header_factory=KeptHeaders())
