"""The response cache of one worker: its store, and what every route's cache element shares.

One per worker (proxy/pipeline.py builds it): the store (memory, or Redis with a memory L1),
the coalescing maps (the lookups and refreshes in flight, keyed by cache key, shared by every
route's element so one miss fills the entry for all), where invalidations go for the sibling
workers, the background fetch a refresh makes, and purges.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from proxyd.cache.memory import MemoryStore
from proxyd.cache.redis import RedisStore

if TYPE_CHECKING:
    from proxyd.config.models import Cache as CacheSettings
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
        self._session: Any = None  # aiohttp ClientSession for background fetches, lazily

    @property
    def redis_unavailable(self) -> bool:
        store = self.store
        return isinstance(store, RedisStore) and store.open

    async def fetch(self, route: CompiledRoute, path: bytes, query: bytes,
                    headers: list[tuple[bytes, bytes]]) -> Fetched | None:
        """An upstream GET outside any client exchange (a background refresh)."""
        import aiohttp

        if route.upstream is None:
            return None
        if self._session is None:
            self._session = aiohttp.ClientSession(auto_decompress=False)
        pool = self.pools[route.upstream]
        target = pool.pick()
        if target is None:
            return None
        url_path = route.rewrite_path(path) if route.strip_prefix or route.rewrite else path
        url = f"{target.scheme}://{target.host}:{target.port}{url_path.decode('latin-1')}"
        if query:
            url += "?" + query.decode("latin-1")
        try:
            async with self._session.get(
                url, headers=[(n.decode("latin-1"), v.decode("latin-1")) for n, v in headers],
                timeout=aiohttp.ClientTimeout(total=target.read_timeout),
                allow_redirects=False, ssl=pool.ssl if pool.ssl is not None else True,
                server_hostname=target.server_hostname,
            ) as resp:
                body = await resp.read()
                return resp.status, [(k, v) for k, v in resp.raw_headers], body
        except (aiohttp.ClientError, TimeoutError, OSError):
            return None

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
        if self._session is not None:
            out.append(self._session.close())
        if isinstance(self.store, RedisStore):
            out.append(self.store.close())
        return out
