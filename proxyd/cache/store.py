"""Cache entries and the store interface shared by the memory and Redis backends."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final, Protocol

from proxyd.cache.policy import Headers, variant_key

# Per-entry bookkeeping counted against max_bytes besides header and body bytes: dict slots,
# the key strings, the dataclass. An estimate, but a stable one.
ENTRY_OVERHEAD: Final = 256


@dataclass(slots=True)
class Entry:
    status: int
    headers: list[tuple[bytes, bytes]]  # as stored: no hop-by-hop, Content-Length or Age
    body: bytes
    stored_at: float  # wall clock, seconds
    initial_age: float
    lifetime: float
    stale_while_revalidate: float = 0.0
    stale_if_error: float = 0.0
    vary: tuple[bytes, ...] = ()
    size: int = field(default=0)
    # The stored fields as "Name: value\r\n" lines, made at the first hit: every later hit
    # sends them as they are (never persisted; an entry's headers do not change).
    lines: bytes | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.size = (len(self.body) + sum(len(n) + len(v) + 4 for n, v in self.headers)
                     + ENTRY_OVERHEAD)

    def age(self, now: float) -> float:
        since = now - self.stored_at  # (a conditional, not max(): asked on every hit)
        return self.initial_age + since if since > 0.0 else self.initial_age

    def fresh(self, now: float) -> bool:
        return self.age(now) < self.lifetime

    def rendered(self) -> bytes:
        lines = self.lines
        if lines is None:
            lines = self.lines = b"".join(b"%s: %s\r\n" % pair for pair in self.headers)
        return lines

    def header(self, lname: bytes) -> bytes | None:
        for name, value in self.headers:
            if name.lower() == lname:
                return value
        return None


class Store(Protocol):
    """Synchronous stores answer inline; the Redis store has async twins of these."""

    def get(self, primary: str, request_headers: Headers) -> Entry | None: ...

    def put(self, primary: str, request_headers: Headers, entry: Entry) -> bool: ...

    def delete(self, primary: str) -> int: ...

    def delete_prefix(self, prefix: str) -> int: ...


def full_key(primary: str, vary: tuple[bytes, ...], request_headers: Headers) -> str:
    if not vary:
        return primary
    return primary + "\0" + variant_key(vary, request_headers).decode("latin-1")
