"""Request ids: ``<prefix>-<counter in hex>``, unique in the worker without a syscall or a uuid4
per request. The prefix is random per process; the counter is shared with the access log, which
formats the id of a request that never needed one only when it writes the line."""

from __future__ import annotations

import os
from typing import Final

# next()'s digits: n in hex for n < 256, and the last two digits of larger n.
HEX_DIGITS: Final = tuple("%x" % i for i in range(256))  # noqa: UP031
HEX_PAIRS: Final = tuple("%02x" % i for i in range(256))  # noqa: UP031


class RequestIds:
    __slots__ = ("_block", "_dash", "_high", "count", "prefix")

    def __init__(self) -> None:
        self.prefix = os.urandom(4).hex()
        self._dash = self.prefix + "-"
        self.count = 0
        self._high = 0  # count >> 8 when _block was made, and the ids' shared part
        self._block = self._dash

    def next(self) -> str:
        """The hex digits but the last two are formatted once per 256 ids and those two come
        from a table: formatting every id (%, hex() or an f-string) cost far more."""
        n = self.count = self.count + 1
        if n < 256:
            return self._dash + HEX_DIGITS[n]
        high = n >> 8
        if high != self._high:  # also when the access log took counter values
            self._high = high
            self._block = self._dash + "%x" % high  # noqa: UP031
        return self._block + HEX_PAIRS[n & 0xFF]

    def deferred(self) -> int:
        """A counter value the access log turns into an id when it writes the line."""
        n = self.count = self.count + 1
        return n
