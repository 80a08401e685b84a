"""Cache entries as the cache middleware makes, refreshes and answers from them (cache.py).

What of a response is stored, with the lifetime and stale windows policy.py decided; an
entry refreshed by a 304 (RFC 9111 §4.3.4); a client's own conditions evaluated against an
entry (If-None-Match, If-Modified-Since, Range with If-Range: RFC 9110 §13.2.2's order); and
the body filter that copies a streamed response body for the store.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final

from proxyd.cache import fields, policy
from proxyd.cache.store import Entry
from proxyd.middleware.base import Context
from proxyd.proxy.field_rules import HOP_BY_HOP

# Fields never stored: per-hop and the proxy's own (RFC 9111 §3.1), framing (re-made on every
# answer), and what the cache adds.
NOT_STORED: Final = HOP_BY_HOP | {b"proxy-authentication-info", b"age", b"content-length",
                                  b"cache-status", b"x-cache"}


class Tee:
    """A pass-through body filter that keeps a copy for the store, up to a size."""

    def __init__(self, done: Callable[[bytes | None], None], limit: int) -> None:
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


def stored_fields(headers: policy.Headers, not_stored: frozenset[bytes] = NOT_STORED
                  ) -> list[tuple[bytes, bytes]]:
    return [(n, v) for n, v in headers if n.lower() not in not_stored]


def new_entry(status: int, headers: list[tuple[bytes, bytes]], body: bytes, received: float,
              initial_age: float, verdict: policy.Verdict) -> Entry:
    """The entry for a response received at ``received``, with the verdict's lifetime."""
    return Entry(
        status=status, headers=headers, body=body, stored_at=received,
        initial_age=initial_age, lifetime=verdict.lifetime,
        stale_while_revalidate=verdict.stale_while_revalidate,
        stale_if_error=verdict.stale_if_error, vary=policy.vary_names(headers),
    )


def refreshed(stale: Entry, headers: policy.Headers, request_headers: policy.Headers,
              rules: policy.Rules, initial_age: float,
              not_stored: frozenset[bytes] = NOT_STORED) -> tuple[Entry, bool]:
    """A stored entry with the header fields of a 304 merged in (RFC 9111 §3.2, §4.3.4), and
    whether the result may still be stored (the 304 may say no-store, or private)."""
    update = stored_fields(headers, not_stored)
    fresh = {n.lower() for n, _ in update}
    merged = [(n, v) for n, v in stale.headers if n.lower() not in fresh]
    merged += update
    now = time.time()
    verdict = policy.verdict(b"GET", stale.status, request_headers, merged, rules, now)
    return Entry(
        status=stale.status, headers=merged, body=stale.body, stored_at=now,
        initial_age=initial_age, lifetime=verdict.lifetime,
        stale_while_revalidate=verdict.stale_while_revalidate,
        stale_if_error=verdict.stale_if_error, vary=stale.vary,
    ), verdict.store


def not_modified(ctx: Context, entry: Entry) -> bool:
    """The client's own validator matches the entry: it gets a 304 (RFC 9111 §4.3.2)."""
    inm = ctx.header(b"if-none-match")
    if inm is not None:
        return fields.weak_match(inm, entry.header(b"etag"))
    ims_value = ctx.header(b"if-modified-since")
    if ims_value is None:
        return False  # the common hit: no date parsing at all
    since = fields.http_date(ims_value)  # invalid: the condition is ignored (§13.1.3)
    return since is not None and last_modified(entry) <= since


def last_modified(entry: Entry) -> float:
    """When the stored response last changed, as RFC 9111 §4.3.2 reads it: Last-Modified,
    else its Date, else when it was stored."""
    modified = fields.http_date(entry.header(b"last-modified"))
    if modified is None:
        modified = fields.http_date(entry.header(b"date"))
    return modified if modified is not None else entry.stored_at


def requested_range(ctx: Context, entry: Entry) -> tuple[int, int] | None:
    """The byte range a GET asks of a complete stored 200 (RFC 9110 §14.2), or None to answer
    the whole: no Range, one to ignore, or an If-Range that does not match (§13.1.5)."""
    value = ctx.header(b"range")
    if value is None or entry.status != 200 or ctx.method != b"GET":
        return None
    if_range = ctx.header(b"if-range")
    if if_range is not None and not if_range_matches(if_range, entry):
        return None
    return fields.byte_range(value, len(entry.body))


def if_range_matches(value: bytes, entry: Entry) -> bool:
    """An entity-tag matches by strong comparison; a date only when it is exactly the entry's
    Last-Modified and that is a strong validator (a second or more before its Date, §8.8.2.2)."""
    value = value.strip(b" \t")
    if value.startswith((b'"', b"W/")):
        return fields.strong_match(value, entry.header(b"etag"))
    wanted = fields.http_date(value)
    modified = fields.http_date(entry.header(b"last-modified"))
    if wanted is None or modified is None or wanted != modified:
        return False
    date = fields.http_date(entry.header(b"date"))
    return modified <= (date if date is not None else entry.stored_at) - 1.0
