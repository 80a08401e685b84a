"""The response cache of one worker: its store, and what every route's cache element shares.

One per worker (proxy/pipeline.py builds it): the store (memory, or Redis with a memory L1),
the coalescing maps (the lookups and refreshes in flight, keyed by cache key, shared by every
route's element so one miss fills the entry for all), where invalidations go for the sibling
workers, the background fetch a refresh makes (through the upstream pool, as a subrequest), and
purges.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from proxyd.cache.memory import MemoryStore
from proxyd.cache.redis import RedisStore
from proxyd.proxy import subrequest

if TYPE_CHECKING:
    from proxyd.config.models import CacheSettings
    from proxyd.proxy.router import CompiledRoute
    from proxyd.proxy.upstream import UpstreamPool

Fetched = tuple[int, list[tuple[bytes, bytes]], bytes]


class CacheService:
    def __init__(self, cache: CacheSettings, redis_url: str, pools: dict[str, UpstreamPool],
                 spawn: Callable[[Coroutine[Any, Any, None]], None]) -> None:
        self.store: MemoryStore | RedisStore
        if cache.backend == "redis":  # shared by workers and instances; connects on first use
            self.store = RedisStore(redis_url, cache.max_entries, cache.max_bytes,
                                    cache.max_object_size, spawn=spawn)
        else:
            self.store = MemoryStore(cache.max_entries, cache.max_bytes, cache.max_object_size)
        self.pools = pools
        self.inflight: dict[str, asyncio.Future[bool]] = {}
        self.refreshing: set[str] = set()
        # Set by a worker whose siblings keep memory stores of their own: the keys an unsafe
        # request invalidated here go to them too (through the master).
        self.invalidated: Callable[[list[str]], None] | None = None

    @property
    def redis_unavailable(self) -> bool:
        store = self.store
        return isinstance(store, RedisStore) and store.open

    async def fetch(self, route: CompiledRoute, path: bytes, query: bytes,
                    headers: list[tuple[bytes, bytes]]) -> Fetched | None:
        """An upstream GET outside any client exchange (a background refresh), through the
        route's upstream pool like a client request (proxy/subrequest.py): its balancer,
        breaker, timeouts, retries and keep-alive connections. A body past what the store
        keeps is not read whole."""
        return await subrequest.fetch(self.pools, route, path, query, headers,
                                      max_body=int(self.store.max_object_size))

    async def purge(self, key: str | None = None, prefix: str | None = None,
                    shared: bool = True) -> tuple[int, bool]:
        """(entries removed, whether Redis was unreachable and the purge waits to be
        replayed). With Redis, only the worker the master asks (``shared``) purges the shared
        store and counts; the others drop their L1 copies."""
        store = self.store
        if isinstance(store, RedisStore):
            if shared:
                return await store.apurge(key, prefix)
            if key:
                store.l1.delete(key)
            if prefix:
                store.l1.delete_prefix(prefix)
            return 0, False
        removed = 0
        if key:
            removed += store.delete(key)
        if prefix:
            removed += store.delete_prefix(prefix)
        return removed, False

    def closers(self) -> list[Coroutine[Any, Any, None]]:
        """What must be awaited when the worker stops."""
        out: list[Coroutine[Any, Any, None]] = []
        if isinstance(self.store, RedisStore):
            out.append(self.store.close())
        return out
