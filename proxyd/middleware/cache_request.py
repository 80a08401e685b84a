"""What the cache middleware knows of one request between its request and response hooks.

A hit is answered in the request hook and needs none of this; a miss, a revalidation, a
bypass or an invalidating request keeps it on ``Context.cache`` (typed, not a string-keyed
dict entry) until its response comes back.
"""

from __future__ import annotations

import asyncio
from typing import Final

from proxyd.cache.policy import Verdict
from proxyd.cache.store import Entry

# What became of a request in the cache: Context.cache_outcome, read by the access log and
# the hit/miss counters.
HIT: Final = "hit"
MISS: Final = "miss"
REVALIDATED: Final = "revalidated"
STALE: Final = "stale"
BYPASS: Final = "bypass"


class CacheRequest:
    __slots__ = ("bypass", "forced", "invalidate", "key", "leader", "leader_timer",
                 "request_headers", "requested_at", "revalidating", "stale", "stale_ok",
                 "verdict")

    def __init__(self, key: str, request_headers: list[tuple[bytes, bytes]],
                 requested_at: float) -> None:
        self.key = key  # the primary key ("" for a bypass or an invalidating request)
        self.request_headers = request_headers
        # When the request went upstream: the response delay of RFC 9111 §4.2.3 is added to
        # the upstream's Age.
        self.requested_at = requested_at
        self.bypass = False  # the client said no-store: neither looked up nor stored
        self.invalidate = False  # a method not known to be safe (RFC 9111 §4.4)
        self.stale: Entry | None = None  # the stored response this miss may refresh
        self.forced = False  # the client asked for validation (no-cache, max-age=0)
        self.revalidating = False  # proxyd's own validators went with the request
        # The request's directives leave room for a stale answer (stale-if-error).
        self.stale_ok = True
        self.leader: asyncio.Future[bool] | None = None  # the coalesced miss this one leads
        self.leader_timer: asyncio.TimerHandle | None = None
        self.verdict: Verdict | None = None  # decided on the head, when the body is buffered
