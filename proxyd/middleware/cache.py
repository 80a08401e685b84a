"""The response cache as a chain element: hits answer here and skip what follows.

RFC 9111 shared-cache rules come from proxyd/cache/policy.py; the store is the worker's
(memory LRU, or Redis). Misses for one key in one worker are coalesced: the first goes upstream,
the others wait (bounded) for its entry. Stale entries are revalidated with a conditional
request, served while revalidating in the background (stale-while-revalidate), or served when
the upstream fails (stale-if-error) — never where the response or the request forbids it.
Every response carries RFC 9211 Cache-Status (and X-Cache). This module decides (keys,
lookups, coalescing, what to store or serve); the entries themselves are made and answered
from in cache_entry.py, and a miss's state lives on Context.cache (cache_request.py).
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any, Final

from proxyd.cache import fields, policy
from proxyd.cache.store import Entry
from proxyd.middleware.base import Context, Middleware, Pending, Response
from proxyd.middleware.cache_entry import (
    NOT_STORED,
    Tee,
    new_entry,
    not_modified,
    refreshed,
    requested_range,
    stored_fields,
)
from proxyd.middleware.cache_request import (
    BYPASS,
    HIT,
    MISS,
    REVALIDATED,
    STALE,
    CacheRequest,
)
from proxyd.middleware.element_options import CacheOptions
from proxyd.proxy.field_rules import content_length
from proxyd.proxy.path import BadPath, needs_normalizing, normalize_path

if TYPE_CHECKING:
    from proxyd.cache.service import CacheService
    from proxyd.middleware.services import Services
    from proxyd.proxy.router import CompiledRoute

SAFE: Final = policy.SAFE_METHODS
HIT_STATUS: Final = b"proxyd; hit"


def heuristic_ttl(config: Any, route_cache: Any) -> float:
    """The lifetime a route gives a heuristically cacheable response without one: its
    ``cache.ttl``, else ``cache.default_ttl`` (0 by default: none, not stored)."""
    if route_cache is not None and route_cache.ttl is not None:
        return float(route_cache.ttl)
    return float(config.cache.default_ttl)


def describe_freshness(config: Any, route_cache: Any) -> str:
    """Which freshness applies on a route (``check-config``, ``proxyd explain``)."""
    if route_cache is not None and not route_cache.enabled:
        return "off (cache.enabled: false on this route)"
    if route_cache is not None and route_cache.force_ttl is not None:
        return f"every stored response fresh for {route_cache.force_ttl:g}s (route force_ttl)"
    ttl = heuristic_ttl(config, route_cache)
    if ttl <= 0:
        return "freshness from the origin only; without it, not stored (cache.default_ttl 0)"
    source = ("route cache.ttl" if route_cache is not None and route_cache.ttl is not None
              else "cache.default_ttl")
    return (f"freshness from the origin, else {ttl:g}s for heuristically cacheable statuses "
            f"({source})")


class Cache(Middleware):
    type = "cache"
    options_model = CacheOptions
    # A miss whose body has a Content-Length within max_object_size is read whole before its
    # head goes out: stored as it comes, and relayed with the origin's Content-Length (a body
    # copied while streaming would have to go out chunked).
    buffers_body = True

    def __init__(self, options: CacheOptions) -> None:
        super().__init__(options)
        self.o = options
        self.key_headers = [h.lower().encode() for h in options.key_headers]
        self.inflight: dict[str, asyncio.Future[bool]] = {}
        self.refreshing: set[str] = set()
        self.store: Any = None
        self.remote = False  # the store answers asynchronously past its L1 (Redis)
        self._lookups: set[asyncio.Task[Entry | None]] = set()
        self.service: CacheService | None = None
        self.services: Services | None = None
        self.route: CompiledRoute | None = None
        self.rules = policy.Rules(allow_set_cookie=options.allow_set_cookie,
                                  targeted=(b"cdn-cache-control",))
        self.max_object_size = 0
        self.not_stored = NOT_STORED
        self.enabled = True

    def bind(self, services: Services, route: CompiledRoute) -> None:
        cfg = services.config.cache
        service = services.cache
        assert service is not None
        self.services = services
        self.service = service
        self.route = route
        self.store = service.store
        self.remote = bool(getattr(self.store, "remote", False))
        self.max_object_size = int(self.store.max_object_size)
        route_cfg = route.config.cache if route.config is not None else None
        if route_cfg is not None:
            self.enabled = route_cfg.enabled
        self.rules = policy.Rules(
            heuristic_ttl(services.config, route_cfg),
            route_cfg.force_ttl if route_cfg is not None else None,
            cfg.statuses, [name.lower().encode() for name in cfg.targeted_fields],
            self.o.allow_set_cookie)
        # A request id that a trace_id element after this one adds to the response belongs to
        # the request that went upstream: it must not be stored and replayed to others.
        chain = route.chain.middleware
        after = chain[chain.index(self) + 1:] if self in chain else []
        self.not_stored = NOT_STORED | frozenset(
            getattr(mw, "lname", b"") for mw in after if mw.type == "trace_id")
        # Coalescing state is per worker, shared by every route's instance of the middleware.
        self.inflight = service.inflight
        self.refreshing = service.refreshing

    # -- keys and headers ---------------------------------------------------------------------
    def primary(self, ctx: Context, path: bytes | None = None, query: bytes | None = None
                ) -> str:
        """The request's key; with ``path`` (and ``query``), another URI of its origin."""
        query = policy.normalize_query(ctx.query if path is None else query or b"",
                                       self.o.sort_query, self.o.ignore_query_params)
        extra = [(name, ctx.header(name)) for name in self.key_headers]
        return policy.primary_key(ctx.scheme, ctx.host, path if path is not None else ctx.path,
                                  query, extra)

    @staticmethod
    def pairs(ctx: Context) -> list[tuple[bytes, bytes]]:
        return [(lname, value) for lname, _, value in ctx.headers]

    def _status(self, resp: Response, status: bytes, x_cache: bytes) -> None:
        resp.set(b"Cache-Status", b"proxyd; " + status)
        if self.o.x_cache:
            resp.set(b"X-Cache", x_cache)

    def _from_entry(self, entry: Entry, now: float, status: bytes) -> Response:
        # Stored entries never hold Age, Cache-Status or X-Cache (NOT_STORED): appending
        # needs no search of the header list on the hit path. Age is the upstream's Age
        # plus the time in this cache (Entry.age).
        headers = list(entry.headers)
        headers.append((b"Age", b"%d" % int(entry.age(now))))
        headers.append((b"Cache-Status", status))
        if self.o.x_cache:
            headers.append((b"X-Cache", b"HIT"))
        resp = Response(entry.status, headers, entry.body)
        resp.rendered = (entry.rendered(), len(entry.headers))
        return resp

    # -- request ------------------------------------------------------------------------------
    def on_request(self, ctx: Context) -> Response | Pending | None:
        if not self.enabled or self.store is None:
            return None
        method = ctx.method
        if method != b"GET" and method != b"HEAD":
            if method not in SAFE:  # unknown methods included (RFC 9111 §4.4)
                state = ctx.cache = CacheRequest("", [], 0.0)
                state.invalidate = True
            return None
        request_headers = self.pairs(ctx)
        # Most requests carry none of these fields: then no directive parsing, and a hit
        # needs no validator comparison or range.
        directives = conditional = False
        for lname, _ in request_headers:
            if lname == b"cache-control" or lname == b"pragma":
                directives = True
            elif (lname == b"if-none-match" or lname == b"if-modified-since"
                  or lname == b"range"):
                conditional = True
        if directives and "no-store" in fields.cache_control(request_headers):
            state = ctx.cache = CacheRequest("", request_headers, 0.0)
            state.bypass = True
            ctx.cache_outcome = BYPASS
            return None
        key = self.primary(ctx)
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
        wants = policy.RequestDirectives(request_headers) if directives else None
        stale_ok = wants is None or wants.stale_ok
        if entry is not None:
            age = entry.age(now)
            if (age < entry.lifetime) if wants is None else wants.accepts(age, entry.lifetime):
                ctx.cache_outcome = HIT
                return self._hit(ctx, entry, now, HIT_STATUS, conditional)
            # Stale (a request that states max-age, min-fresh or no-cache never gets here: it
            # is not stale_ok), within stale-while-revalidate, which the response allowed.
            if stale_ok and age < entry.lifetime + entry.stale_while_revalidate:
                ctx.cache_outcome = HIT
                self._refresh_in_background(ctx, key, entry)
                return self._hit(ctx, entry, now, b"proxyd; hit; fwd=stale", conditional)
        state = ctx.cache = CacheRequest(key, request_headers, now)
        state.stale_ok = stale_ok
        ctx.cache_outcome = MISS
        if entry is not None:
            state.stale = entry
            # Fresh, but the request's directives refused it: fwd=request (RFC 9211).
            state.forced = entry.age(now) < entry.lifetime
            if ctx.header(b"if-none-match") is None and ctx.header(b"if-modified-since") is None:
                etag, modified = entry.header(b"etag"), entry.header(b"last-modified")
                if etag is not None:
                    ctx.set_request.append((b"If-None-Match", etag))
                if modified is not None:
                    ctx.set_request.append((b"If-Modified-Since", modified))
                state.revalidating = etag is not None or modified is not None
        if ctx.method != b"GET" or not self.o.coalesce:
            return None
        leader = self.inflight.get(key)
        if leader is None:
            if ctx.header(b"range") is not None:
                return None  # its answer (a 206) is not stored: it must not keep others waiting
            loop = asyncio.get_running_loop()
            leader = self.inflight[key] = state.leader = loop.create_future()
            # A leader whose response never comes (client gone, body cut off) must not hold
            # the key: after the wait bound the next miss leads instead.
            state.leader_timer = loop.call_later(
                self.o.coalesce_timeout, self._expire_leader, key, leader)
            return None
        if wants is not None and wants.revalidate:
            return None  # it asked for the origin's answer, not one that began before it
        return Pending(self._follow(ctx, key, leader, wants))

    def _hit(self, ctx: Context, entry: Entry, now: float, status: bytes,
             conditional: bool = True) -> Response:
        """``conditional``: the request may carry If-None-Match, If-Modified-Since or Range."""
        resp = self._from_entry(entry, now, status)
        if conditional:
            if not_modified(ctx, entry):
                # The client's own validator matches: 304 (RFC 9111 §4.3.2), no body.
                resp.status, resp.body = 304, None
                resp.remove(b"content-length")
            else:
                span = requested_range(ctx, entry)
                if span is not None:
                    self._partial(resp, entry, span)
        return resp

    @staticmethod
    def _partial(resp: Response, entry: Entry, span: tuple[int, int]) -> None:
        """A 206 of a range of the complete stored body (RFC 9110 §14.4), or 416."""
        size = len(entry.body)
        if span == fields.UNSATISFIABLE:
            resp.status, resp.body = 416, b""
            resp.add(b"Content-Range", b"bytes */%d" % size)
            return
        first, last = span
        resp.status, resp.body = 206, entry.body[first:last + 1]
        resp.add(b"Content-Range", b"bytes %d-%d/%d" % (first, last, size))

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

    def _follow(self, ctx: Context, key: str, leader: asyncio.Future[bool],
                wants: policy.RequestDirectives | None) -> asyncio.Future[Response | None]:
        """A coalesced miss: the leader's entry when it lands, else go upstream."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Response | None] = loop.create_future()

        def settle(_: object = None) -> None:
            timer.cancel()
            if waiter.done():
                return
            now = time.time()
            entry = self.store.get(key, self.pairs(ctx))
            if entry is not None and (entry.fresh(now) if wants is None
                                      else wants.accepts(entry.age(now), entry.lifetime)):
                ctx.cache_outcome = HIT
                ctx.cache = None
                waiter.set_result(self._hit(ctx, entry, now, b"proxyd; hit; collapsed"))
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

    def _release(self, state: CacheRequest, stored: bool) -> None:
        leader = state.leader
        if leader is not None:
            state.leader = None
            if state.leader_timer is not None:
                state.leader_timer.cancel()
            if self.inflight.get(state.key) is leader:
                del self.inflight[state.key]
            if not leader.done():
                leader.set_result(stored)

    # -- response -----------------------------------------------------------------------------
    def wants_body(self, ctx: Context, resp: Response) -> bool:
        """A storable GET response with a Content-Length within max_object_size."""
        state = ctx.cache
        if state is None or not state.key or ctx.method != b"GET":
            return False
        size = resp.upstream_length
        if size < 0:
            length = resp.get(b"content-length")
            if length is None:
                return False  # streamed through a Tee: chunked or close-delimited anyway
            size = content_length(length)
        if size > self.max_object_size:
            return False
        verdict = state.verdict = policy.verdict(ctx.method, resp.status, state.request_headers,
                                                 resp.headers, self.rules, time.time())
        return verdict.store

    def on_response(self, ctx: Context, resp: Response) -> None:
        state = ctx.cache
        if state is None:
            return
        if state.invalidate:
            if 200 <= resp.status < 400:
                self._invalidate(ctx, resp)
            resp.set(b"Cache-Status", b"proxyd; fwd=method")
            return
        if state.bypass:
            self._status(resp, b"fwd=bypass", b"MISS")
            return
        key = state.key
        stale = state.stale
        now = time.time()
        if stale is not None:
            if resp.status == 304 and state.revalidating:
                self._revalidated(ctx, state, resp, now)
                return
            if (resp.status >= 500 and state.stale_ok
                    and stale.age(now) - stale.lifetime < stale.stale_if_error):
                self._serve_stale(ctx, state, resp, now)
                return
        fwd = b"fwd=miss" if stale is None else (
            b"fwd=request" if state.forced else b"fwd=stale")
        if ctx.method != b"GET":
            self._status(resp, fwd, b"MISS")  # HEAD: answered from GET entries, never stored
            return
        request_headers = state.request_headers
        verdict = state.verdict
        if verdict is None:
            verdict = policy.verdict(ctx.method, resp.status, request_headers, resp.headers,
                                     self.rules, now)
        if not verdict.store:
            self._status(resp, fwd + b"; detail=" + verdict.reason.encode(), b"MISS")
            self._release(state, False)
            return
        stored_headers = stored_fields(resp.headers, self.not_stored)
        # RFC 9111 §4.2.3: the upstream's Age plus the time the response took to come.
        age = fields.age_value(resp.headers) + max(0.0, now - state.requested_at)
        status = resp.status  # not resp itself: resp -> its Tee -> store would be a cycle

        def store(body: bytes | None) -> None:
            stored = body is not None and self._put(key, request_headers, status,
                                                    stored_headers, body, now, age, verdict)
            self._release(state, stored)

        length = resp.get(b"content-length")
        if resp.body is not None:
            store(resp.body)
        elif length is not None and content_length(length) > self.max_object_size:
            self._status(resp, fwd + b"; detail=too-large", b"MISS")
            self._release(state, False)
            return
        else:
            resp.filters.append(Tee(store, self.max_object_size))
        self._status(resp, fwd + b"; stored", b"MISS")

    def _put(self, key: str, request_headers: list[tuple[bytes, bytes]], status: int,
             headers: list[tuple[bytes, bytes]], body: bytes, received: float,
             initial_age: float, verdict: policy.Verdict) -> bool:
        entry = new_entry(status, headers, body, received, initial_age, verdict)
        return bool(self.store.put(key, request_headers, entry))

    def _answer_with(self, resp: Response, served: Response) -> None:
        """Turn the upstream's response into one made from a stored entry."""
        resp.status, resp.reason = served.status, b""
        resp.headers, resp.body, resp.drop_body = served.headers, served.body, False
        resp.filters = []

    def _revalidated(self, ctx: Context, state: CacheRequest, resp: Response,
                     now: float) -> None:
        stale = state.stale
        assert stale is not None
        age = fields.age_value(resp.headers) + max(0.0, now - state.requested_at)
        entry, keep = refreshed(stale, resp.headers, state.request_headers, self.rules, age,
                                self.not_stored)
        if keep:
            self.store.put(state.key, state.request_headers, entry)
        else:
            self.store.delete(state.key)  # the 304 says it may not be stored any more
        self._release(state, keep)
        ctx.cache_outcome = REVALIDATED
        fwd = b"proxyd; fwd=request" if state.forced else b"proxyd; fwd=stale"
        self._answer_with(resp, self._hit(ctx, entry, now, fwd + b"; fwd-status=304"))

    def _serve_stale(self, ctx: Context, state: CacheRequest, resp: Response,
                     now: float) -> None:
        stale = state.stale
        assert stale is not None
        self._release(state, False)
        ctx.cache_outcome = STALE
        status = b"proxyd; hit; fwd=stale; fwd-status=%d" % resp.status
        self._answer_with(resp, self._hit(ctx, stale, now, status))

    def _invalidate(self, ctx: Context, resp: Response) -> None:
        """The target URI, and the Location and Content-Location URIs of the same origin
        (RFC 9111 §4.4); each with all its variants, in every worker's store."""
        keys = [self.primary(ctx)]
        for name in (b"location", b"content-location"):
            value = resp.get(name)
            if value is None:
                continue
            target = policy.same_origin_target(ctx.scheme, ctx.host, ctx.path, value)
            if target is None:
                continue  # another origin: not ours to invalidate
            path, query = target
            if needs_normalizing(path):  # keys hold the normalised path (proxy/path.py)
                try:
                    path = normalize_path(path, True)
                except BadPath:
                    continue
            keys.append(self.primary(ctx, path, query))
        for key in keys:
            self.store.delete(key)
        share = self.service.invalidated if self.service is not None else None
        if share is not None:
            share(keys)

    def _refresh_in_background(self, ctx: Context, key: str, entry: Entry) -> None:
        if (key in self.refreshing or self.service is None or self.services is None
                or self.route is None):
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
                assert self.service is not None and self.route is not None
                asked = time.time()
                result = await self.service.fetch(self.route, ctx.path, ctx.query, headers)
                if result is None:
                    return
                status, resp_headers, body = result
                now = time.time()
                age = fields.age_value(resp_headers) + max(0.0, now - asked)
                if status == 304:
                    fresh, keep = refreshed(entry, resp_headers, request_headers, self.rules,
                                            age, self.not_stored)
                    if keep:
                        self.store.put(key, request_headers, fresh)
                    return
                verdict = policy.verdict(b"GET", status, request_headers, resp_headers,
                                         self.rules, now)
                if verdict.store:
                    self._put(key, request_headers, status,
                              stored_fields(resp_headers, self.not_stored),
                              body, now, age, verdict)
            finally:
                self.refreshing.discard(key)

        self.services.spawn(refresh())
