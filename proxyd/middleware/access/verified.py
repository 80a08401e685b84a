"""A bounded cache of credentials already verified, each entry until its own expiry.

What makes an authenticated request cheap: a token's signature or a password's hash is checked
once, and later requests with the same credential cost a digest and a dictionary lookup.
Least recently used entries go first when it is full, so a flood of distinct (failing or
one-off) credentials cannot grow it, and the credentials in steady use stay.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, TypeVar

T = TypeVar("T")


class VerifiedCache(Generic[T]):
    """digest of a credential → (what verifying it gave, expiry on the wall clock)."""

    __slots__ = ("_entries", "size")

    def __init__(self, size: int) -> None:
        self.size = size  # 0: nothing is kept
        self._entries: OrderedDict[bytes, tuple[T, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes, now: float) -> T | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[1] <= now:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry[0]

    def put(self, key: bytes, value: T, expires: float) -> None:
        if self.size <= 0:
            return
        entries = self._entries
        entries[key] = (value, expires)
        entries.move_to_end(key)
        while len(entries) > self.size:
            entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()
