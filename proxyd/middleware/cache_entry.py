"""Cache entries as the cache middleware makes and matches them (cache.py).

What of a response is stored, and its freshness lifetime and stale windows (RFC 9111, rules
from proxyd/cache/policy.py); an entry refreshed by a 304; a client's own validators matched
against an entry; and the body filter that copies a streamed response body for the store.
"""

from __future__ import annotations

import time
from typing import Any, Final

from proxyd.cache import policy
from proxyd.cache.store import Entry
from proxyd.middleware.base import Context
from proxyd.proxy.headers import HOP_BY_HOP

# Fields never stored: per-hop, framing (re-made on every answer), and what the cache adds.
NOT_STORED: Final = HOP_BY_HOP | {b"age", b"content-length", b"cache-status", b"x-cache"}


class Tee:
    """A pass-through body filter that keeps a copy for the store, up to a size."""

    def __init__(self, done: Any, limit: int) -> None:
        self.parts: list[bytes] | None = []  # None once over the limit
        self.size = 0
        self.limit = limit
        self.done = done

    def feed(self, chunk: bytes) -> bytes:
        if self.parts is not None and chunk:
            self.size += len(chunk)
            if self.size > self.limit:
                self.parts = None
            else:
                self.parts.append(chunk)
        return chunk

    def finish(self) -> bytes:
        self.done(b"".join(self.parts) if self.parts is not None else None)
        return b""


def new_entry(status: int, headers: list[tuple[bytes, bytes]], body: bytes, received: float,
              initial_age: float, default_ttl: float, force_ttl: float | None) -> Entry:
    """The entry for a response received at ``received``; the route's TTLs apply when the
    origin gives no freshness (``default_ttl``) or whatever it gives (``force_ttl``)."""
    swr, sie = stale_windows(headers)
    return Entry(
        status=status, headers=headers, body=body, stored_at=received,
        initial_age=initial_age,
        lifetime=policy.freshness_lifetime(headers, default_ttl, force_ttl, received),
        stale_while_revalidate=swr, stale_if_error=sie,
        vary=policy.vary_names(headers),
    )


def stale_windows(headers: policy.Headers) -> tuple[float, float]:
    """(stale-while-revalidate, stale-if-error); none when the origin forbids stale use."""
    cc = policy.cache_control(headers)
    if "must-revalidate" in cc or "proxy-revalidate" in cc:
        return 0.0, 0.0  # RFC 9111 §5.2.2.2: never served stale, not even on errors
    return (float(policy.seconds(cc, "stale-while-revalidate") or 0),
            float(policy.seconds(cc, "stale-if-error") or 0))


def refreshed(stale: Entry, headers: policy.Headers, default_ttl: float,
              force_ttl: float | None) -> Entry:
    """A stored entry with the header fields of a 304 merged in (RFC 9111 §4.3.4)."""
    fresh = {n.lower() for n, _ in headers if n.lower() not in NOT_STORED}
    merged = [(n, v) for n, v in stale.headers if n.lower() not in fresh]
    merged += [(n, v) for n, v in headers if n.lower() not in NOT_STORED]
    now = time.time()
    swr, sie = stale_windows(merged)
    return Entry(
        status=stale.status, headers=merged, body=stale.body, stored_at=now,
        initial_age=policy.initial_age(headers, now),
        lifetime=policy.freshness_lifetime(merged, default_ttl, force_ttl, now),
        stale_while_revalidate=swr, stale_if_error=sie, vary=stale.vary,
    )


def not_modified(ctx: Context, entry: Entry) -> bool:
    """The client's own validator matches the entry: it gets a 304 (RFC 9111 §4.3.2)."""
    inm = ctx.header(b"if-none-match")
    if inm is not None:
        etag = entry.header(b"etag")
        if etag is None:
            return False
        if inm.strip() == b"*":
            return True
        wanted = etag.strip().removeprefix(b"W/")
        return any(t.strip().removeprefix(b"W/") == wanted for t in inm.split(b","))
    ims_value = ctx.header(b"if-modified-since")
    if ims_value is None:
        return False  # the common hit: no date parsing at all
    ims = policy.http_date(ims_value)
    modified = policy.http_date(entry.header(b"last-modified"))
    return ims is not None and modified is not None and modified <= ims
