"""Per-worker LRU bounded by entry count and by bytes, both counted exactly.

Keys are the primary key plus, for responses with Vary, the request's values of the varied
fields; ``_vary`` remembers which fields a primary key varies on, so a lookup needs no scan.
"""

from __future__ import annotations

from collections import OrderedDict

from mypy_extensions import mypyc_attr

from proxyd.cache.policy import Headers
from proxyd.cache.store import Entry, full_key


# The Redis store's L1 (cache/redis.py, not compiled) is a subclass.
@mypyc_attr(allow_interpreted_subclasses=True)
class MemoryStore:
    def __init__(self, max_entries: int, max_bytes: int, max_object_size: int) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.max_object_size = max_object_size
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        self._vary: dict[str, tuple[bytes, ...]] = {}
        self._variants: dict[str, set[str]] = {}
        self.bytes = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, primary: str, request_headers: Headers) -> Entry | None:
        vary = self._vary.get(primary)
        if vary is None:
            return None
        key = full_key(primary, vary, request_headers)
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def put(self, primary: str, request_headers: Headers, entry: Entry) -> bool:
        if len(entry.body) > self.max_object_size or entry.size > self.max_bytes:
            return False
        if self._vary.get(primary, entry.vary) != entry.vary:
            self.delete(primary)  # the upstream changed what it varies on: old variants are moot
        self._vary[primary] = entry.vary
        key = full_key(primary, entry.vary, request_headers)
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= old.size
        self._entries[key] = entry
        self._variants.setdefault(primary, set()).add(key)
        self.bytes += entry.size
        while len(self._entries) > self.max_entries or self.bytes > self.max_bytes:
            self._evict_oldest()
        return True

    def _evict_oldest(self) -> None:
        key, entry = self._entries.popitem(last=False)
        self.bytes -= entry.size
        self.evictions += 1
        primary = key.split("\0", 1)[0]
        variants = self._variants.get(primary)
        if variants is not None:
            variants.discard(key)
            if not variants:
                del self._variants[primary]
                self._vary.pop(primary, None)

    def delete(self, primary: str) -> int:
        keys = self._variants.pop(primary, set())
        self._vary.pop(primary, None)
        for key in keys:
            entry = self._entries.pop(key, None)
            if entry is not None:
                self.bytes -= entry.size
        return len(keys)

    def delete_prefix(self, prefix: str) -> int:
        return sum(self.delete(p) for p in [p for p in self._variants if p.startswith(prefix)])

    def clear(self) -> None:
        self._entries.clear()
        self._vary.clear()
        self._variants.clear()
        self.bytes = 0
