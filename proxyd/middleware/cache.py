"""The response cache as a chain element: hits answer here and skip what follows.

RFC 9111 shared-cache rules come from proxyd/cache/policy.py; the store is the worker's
(memory LRU, or Redis). Misses for one key in one worker are coalesced: the first goes upstream,
the others wait (bounded) for its entry. Stale entries are revalidated with a conditional
request, served while revalidating in the background (stale-while-revalidate), or served when
the upstream fails (stale-if-error). Every response carries RFC 9211 Cache-Status and X-Cache.
This module decides (keys, lookups, coalescing, what to store or serve); the entries themselves
are made and matched in cache_entry.py.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any, Final

from proxyd.cache import policy
from proxyd.cache.store import Entry
from proxyd.middleware.base import Context, Middleware, Pending, Response
from proxyd.middleware.cache_entry import NOT_STORED, Tee, new_entry, not_modified, refreshed
from proxyd.middleware.options import CacheOptions
from proxyd.proxy.headers import content_length

if TYPE_CHECKING:
    from proxyd.proxy.pipeline import Pipeline
    from proxyd.proxy.router import CompiledRoute

UNSAFE: Final = frozenset({b"POST", b"PUT", b"PATCH", b"DELETE"})


class Cache(Middleware):
    type = "cache"
    options_model = CacheOptions

    def __init__(self, options: CacheOptions) -> None:
        super().__init__(options)
        self.o = options
        self.key_headers = [h.lower().encode() for h in options.key_headers]
        self.inflight: dict[str, asyncio.Future[bool]] = {}
        self.refreshing: set[str] = set()
        self.store: Any = None
        self.remote = False  # the store answers asynchronously past its L1 (Redis)
        self._lookups: set[asyncio.Task[Entry | None]] = set()
        self.pipeline: Pipeline | None = None
        self.route: CompiledRoute | None = None
        self.default_ttl = 300.0
        self.force_ttl: float | None = None
        self.statuses: frozenset[int] = frozenset({200, 301, 302})
        self.enabled = True

    def bind(self, pipeline: Pipeline, route: CompiledRoute) -> None:
        cfg = pipeline.config.cache
        self.pipeline = pipeline
        self.route = route
        self.store = pipeline.cache_store
        self.remote = bool(getattr(self.store, "remote", False))
        self.statuses = frozenset(cfg.statuses)
        self.default_ttl = cfg.default_ttl
        route_cfg = route.config.cache if route.config is not None else None
        if route_cfg is not None:
            self.enabled = route_cfg.enabled
            if route_cfg.ttl is not None:
                self.default_ttl = route_cfg.ttl
            self.force_ttl = route_cfg.force_ttl
        # Coalescing state is per worker, shared by every route's instance of the middleware.
        self.inflight = pipeline.cache_inflight
        self.refreshing = pipeline.cache_refreshing

    # -- keys and headers ---------------------------------------------------------------------
    def primary(self, ctx: Context, path: bytes | None = None) -> str:
        query = policy.normalize_query(ctx.query, self.o.sort_query, self.o.ignore_query_params)
        extra = [(name, ctx.header(name)) for name in self.key_headers]
        return policy.primary_key(b"http", ctx.host, path if path is not None else ctx.path,
                                  query if path is None else b"", extra)

    @staticmethod
    def pairs(ctx: Context) -> list[tuple[bytes, bytes]]:
        return [(lname, value) for lname, _, value in ctx.headers]

    def _status(self, resp: Response, status: bytes, x_cache: bytes) -> None:
        resp.set(b"Cache-Status", b"proxyd; " + status)
        if self.o.x_cache:
            resp.set(b"X-Cache", x_cache)

    def _from_entry(self, entry: Entry, now: float, status: bytes, x_cache: bytes) -> Response:
        # Stored entries never hold Age, Cache-Status or X-Cache (NOT_STORED): appending
        # needs no search of the header list on the hit path.
        headers = list(entry.headers)
        headers.append((b"Age", b"%d" % int(entry.age(now))))
        headers.append((b"Cache-Status", b"proxyd; " + status))
        if self.o.x_cache:
            headers.append((b"X-Cache", x_cache))
        resp = Response(entry.status, headers, entry.body)
        resp.rendered = (entry.rendered(), len(entry.headers))
        return resp

    # -- request ------------------------------------------------------------------------------
    def on_request(self, ctx: Context) -> Response | Pending | None:
        if not self.enabled or self.store is None:
            return None
        method = ctx.method
        if method not in (b"GET", b"HEAD"):
            if method in UNSAFE:
                ctx.state["cache_invalidate"] = True
            return None
        request_headers = self.pairs(ctx)
        # Most requests carry none of these fields: then no directive parsing, and a hit
        # needs no validator comparison.
        directives = conditional = False
        for lname, _ in request_headers:
            if lname == b"cache-control" or lname == b"pragma":
                directives = True
            elif lname == b"if-none-match" or lname == b"if-modified-since":
                conditional = True
        if directives and "no-store" in policy.cache_control(request_headers):
            ctx.state["cache"] = "bypass"
            return None
        key = self.primary(ctx)
        ctx.state["cache_key"] = key
        entry = self.store.get(key, request_headers)  # memory, or the Redis store's L1
        if entry is None and self.remote and key not in self.inflight:
            # A miss in L1 asks Redis; only this request waits. (A miss already in flight
            # here needs no round trip: this request will follow it.)
            return Pending(self._remote_lookup(ctx, key, request_headers))
        return self.decide(ctx, key, request_headers, entry, directives, conditional)

    def decide(self, ctx: Context, key: str, request_headers: list[tuple[bytes, bytes]],
               entry: Entry | None, directives: bool = True, conditional: bool = True
               ) -> Response | Pending | None:
        """What the lookup's result means for this request: a hit, a miss to lead, or one to
        follow. One decision for both the synchronous (memory) and the Redis lookup."""
        now = time.time()
        if entry is not None:
            revalidate, max_age = (policy.request_wants_fresh(request_headers) if directives
                                   else (False, None))
            age = entry.age(now)
            if not revalidate and age < entry.lifetime and (max_age is None or age <= max_age):
                ctx.state["cache"] = "hit"
                return self._hit(ctx, entry, now, b"hit", conditional)
            if (not revalidate and max_age is None
                    and age < entry.lifetime + entry.stale_while_revalidate):
                # Stale, within stale-while-revalidate (not for a client that set max-age).
                ctx.state["cache"] = "hit"
                self._refresh_in_background(ctx, key, entry)
                return self._hit(ctx, entry, now, b"hit; fwd=stale", conditional)
            ctx.state["stale"] = entry
            ctx.state["forced"] = revalidate  # the client asked (no-cache): fwd=request
            if ctx.header(b"if-none-match") is None and ctx.header(b"if-modified-since") is None:
                etag, modified = entry.header(b"etag"), entry.header(b"last-modified")
                if etag is not None:
                    ctx.set_request.append((b"If-None-Match", etag))
                if modified is not None:
                    ctx.set_request.append((b"If-Modified-Since", modified))
                ctx.state["revalidating"] = etag is not None or modified is not None
        ctx.state["cache"] = "miss"
        if ctx.method != b"GET" or not self.o.coalesce:
            return None
        leader = self.inflight.get(key)
        if leader is None:
            loop = asyncio.get_running_loop()
            leader = self.inflight[key] = ctx.state["leader"] = loop.create_future()
            # A leader whose response never comes (client gone, body cut off) must not hold
            # the key: after the wait bound the next miss leads instead.
            ctx.state["leader_timer"] = loop.call_later(
                self.o.coalesce_timeout, self._expire_leader, key, leader)
            return None
        return Pending(self._follow(ctx, key, leader))

    def _hit(self, ctx: Context, entry: Entry, now: float, status: bytes,
             conditional: bool = True) -> Response:
        """``conditional``: the request may carry If-None-Match or If-Modified-Since."""
        resp = self._from_entry(entry, now, status, b"HIT")
        if conditional and not_modified(ctx, entry):
            # The client's own validator matches: 304 (RFC 9111 §4.3.2), no body.
            resp.status, resp.body = 304, None
            resp.remove(b"content-length")
        return resp

    def _remote_lookup(self, ctx: Context, key: str, request_headers: list[tuple[bytes, bytes]]
                       ) -> asyncio.Future[Response | None]:
        """Ask the remote store, then decide; a follower's own wait is chained into ours."""
        loop = asyncio.get_running_loop()
        result: asyncio.Future[Response | None] = loop.create_future()
        task = loop.create_task(self.store.aget(key, request_headers))
        self._lookups.add(task)  # the loop keeps only weak references to tasks

        def relay(inner: asyncio.Future[Response | None]) -> None:
            if result.done():
                return
            if inner.cancelled():
                result.cancel()
            elif (exc := inner.exception()) is not None:
                result.set_exception(exc)
            else:
                result.set_result(inner.result())

        def looked_up(done: asyncio.Task[Entry | None]) -> None:
            self._lookups.discard(done)
            if result.done():
                return
            # The store turns Redis trouble into misses; anything else is a miss here too.
            entry = done.result() if not done.cancelled() and done.exception() is None else None
            try:
                answer = self.decide(ctx, key, request_headers, entry)
            except Exception as exc:
                result.set_exception(exc)
                return
            if isinstance(answer, Pending):
                answer.future.add_done_callback(relay)
            else:
                result.set_result(answer)

        task.add_done_callback(looked_up)
        return result

    def _follow(self, ctx: Context, key: str, leader: asyncio.Future[bool]
                ) -> asyncio.Future[Response | None]:
        """A coalesced miss: the leader's entry when it lands, else go upstream."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Response | None] = loop.create_future()

        def settle(_: object = None) -> None:
            timer.cancel()
            if waiter.done():
                return
            now = time.time()
            entry = self.store.get(key, self.pairs(ctx))
            if entry is not None and entry.fresh(now):
                ctx.state["cache"] = "hit"
                ctx.state.pop("stale", None)
                waiter.set_result(self._hit(ctx, entry, now, b"hit; collapsed"))
            else:
                waiter.set_result(None)

        timer = loop.call_later(self.o.coalesce_timeout, settle)
        leader.add_done_callback(settle)
        return waiter

    def _expire_leader(self, key: str, leader: asyncio.Future[bool]) -> None:
        if self.inflight.get(key) is leader:
            del self.inflight[key]
        if not leader.done():
            leader.set_result(False)

    def _release(self, ctx: Context, stored: bool) -> None:
        leader = ctx.state.pop("leader", None)
        if leader is not None:
            ctx.state.pop("leader_timer").cancel()
            if self.inflight.get(ctx.state["cache_key"]) is leader:
                del self.inflight[ctx.state["cache_key"]]
            if not leader.done():
                leader.set_result(stored)

    # -- response -----------------------------------------------------------------------------
    def on_response(self, ctx: Context, resp: Response) -> None:
        state = ctx.state
        if state.pop("cache_invalidate", False):
            if resp.status < 400:
                self._invalidate(ctx, resp)
            return
        key = state.get("cache_key")
        if key is None:
            if state.get("cache") == "bypass":
                self._status(resp, b"fwd=bypass", b"MISS")
            return
        stale: Entry | None = state.get("stale")
        if stale is not None:
            if resp.status == 304 and state.get("revalidating"):
                self._revalidated(ctx, key, stale, resp)
                return
            if resp.status >= 500 and (
                stale.age(time.time()) - stale.lifetime < stale.stale_if_error
            ):
                self._serve_stale(ctx, stale, resp)
                return
        if ctx.method != b"GET":
            return
        request_headers = self.pairs(ctx)
        ok, reason = policy.storable(ctx.method, resp.status, request_headers, resp.headers,
                                     self.statuses, self.o.allow_set_cookie)
        fwd = b"fwd=miss" if stale is None else (
            b"fwd=request" if state.get("forced") else b"fwd=stale")
        if not ok:
            self._status(resp, fwd + b"; detail=" + reason.replace(" ", "-").encode(), b"MISS")
            self._release(ctx, False)
            return
        stored_headers = [(n, v) for n, v in resp.headers if n.lower() not in NOT_STORED]
        received = time.time()
        age = policy.initial_age(resp.headers, received)  # Age itself is not stored

        status = resp.status  # not resp itself: resp -> its Tee -> store would be a cycle

        def store(body: bytes | None) -> None:
            stored = body is not None and self._put(key, request_headers, status,
                                                    stored_headers, body, received, age)
            self._release(ctx, stored)

        length = resp.get(b"content-length")
        if resp.body is not None:
            store(resp.body)
        elif length is not None and content_length(length) > self.store.max_object_size:
            self._release(ctx, False)
        else:
            resp.filters.append(Tee(store, self.store.max_object_size))
        self._status(resp, fwd + b"; stored", b"MISS")

    def _put(self, key: str, request_headers: list[tuple[bytes, bytes]], status: int,
             headers: list[tuple[bytes, bytes]], body: bytes, received: float,
             initial_age: float) -> bool:
        entry = new_entry(status, headers, body, received, initial_age, self.default_ttl,
                          self.force_ttl)
        return bool(self.store.put(key, request_headers, entry))

    def _revalidated(self, ctx: Context, key: str, stale: Entry, resp: Response) -> None:
        entry = refreshed(stale, resp.headers, self.default_ttl, self.force_ttl)
        self.store.put(key, self.pairs(ctx), entry)
        self._release(ctx, True)
        ctx.state["cache"] = "revalidated"
        served = self._from_entry(entry, time.time(), b"fwd=stale; fwd-status=304", b"HIT")
        resp.status, resp.reason = served.status, b""
        resp.headers, resp.body, resp.drop_body = served.headers, served.body, False

    def _serve_stale(self, ctx: Context, stale: Entry, resp: Response) -> None:
        self._release(ctx, False)
        ctx.state["cache"] = "stale"
        status = b"hit; fwd=stale; fwd-status=%d" % resp.status
        served = self._from_entry(stale, time.time(), status, b"HIT")
        resp.status, resp.reason = served.status, b""
        resp.headers, resp.body, resp.drop_body = served.headers, served.body, False
        resp.filters = []

    def _invalidate(self, ctx: Context, resp: Response) -> None:
        self.store.delete(self.primary(ctx))
        for name in (b"location", b"content-location"):
            value = resp.get(name)
            if value is None:
                continue
            if value.startswith(b"/"):
                path = value.split(b"?", 1)[0]
            elif b"://" in value and value.split(b"://", 1)[1].split(b"/", 1)[0].lower() == (
                (ctx.host or b"").lower()
            ):
                rest = value.split(b"://", 1)[1]
                path = b"/" + rest.split(b"/", 1)[1].split(b"?", 1)[0] if b"/" in rest else b"/"
            else:
                continue  # another origin: not ours to invalidate (RFC 9111 §4.4)
            self.store.delete(self.primary(ctx, path))

    def _refresh_in_background(self, ctx: Context, key: str, entry: Entry) -> None:
        if key in self.refreshing or self.pipeline is None or self.route is None:
            return
        self.refreshing.add(key)
        headers = [(n, v) for n, _, v in ctx.headers
                   if n in entry.vary or n in self.key_headers
                   or n in (b"host", b"accept-encoding")]
        etag, modified = entry.header(b"etag"), entry.header(b"last-modified")
        if etag is not None:
            headers.append((b"if-none-match", etag))
        if modified is not None:
            headers.append((b"if-modified-since", modified))
        request_headers = self.pairs(ctx)

        async def refresh() -> None:
            try:
                assert self.pipeline is not None and self.route is not None
                result = await self.pipeline.fetch(self.route, ctx.path, ctx.query, headers)
                if result is None:
                    return
                status, resp_headers, body = result
                if status == 304:
                    self.store.put(key, request_headers,
                                   refreshed(entry, resp_headers, self.default_ttl, self.force_ttl))
                elif policy.storable(b"GET", status, request_headers, resp_headers,
                                     self.statuses, self.o.allow_set_cookie)[0]:
                    kept = [(n, v) for n, v in resp_headers if n.lower() not in NOT_STORED]
                    now = time.time()
                    self._put(key, request_headers, status, kept, body, now,
                              policy.initial_age(resp_headers, now))
            finally:
                self.refreshing.discard(key)

        self.pipeline.spawn(refresh())
