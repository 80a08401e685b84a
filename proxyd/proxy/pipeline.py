"""Everything a worker needs to serve, built from one config after fork.

A reload never edits a Pipeline: the new generation of workers builds its own.
"""

from __future__ import annotations

import asyncio
import math
import os
from collections.abc import Callable, Coroutine
from time import monotonic
from typing import TYPE_CHECKING, Any, Final

from proxyd.cache.memory import MemoryStore
from proxyd.cache.redis import RedisStore
from proxyd.config.models import GatewayConfig, Respond
from proxyd.middleware import build_chain
from proxyd.observe.access_log import AccessLog
from proxyd.observe.metrics import WorkerMetrics, bucket
from proxyd.proxy.headers import TrustedProxies
from proxyd.proxy.resolver import Resolver
from proxyd.proxy.router import CompiledRoute, DirectResponse, Router
from proxyd.proxy.timers import Deadlines
from proxyd.proxy.upstream import UpstreamPool
from proxyd.proxy.upstream_conn import ReadBuffer

if TYPE_CHECKING:
    from proxyd.proxy.exchange import Exchange
    from proxyd.proxy.request import Request
    from proxyd.proxy.websocket import Tunnel

# next_request_id's digits: n in hex for n < 256, and the last two digits of larger n.
HEX_DIGITS: Final = tuple("%x" % i for i in range(256))  # noqa: UP031
HEX_PAIRS: Final = tuple("%02x" % i for i in range(256))  # noqa: UP031
KNOWN_METHODS: Final = (b"GET", b"HEAD", b"POST", b"PUT", b"PATCH", b"DELETE", b"OPTIONS",
                        b"TRACE", b"CONNECT")


def req_id(req: Request, pipeline: Pipeline) -> str:
    """The id a request without middleware context is known by (error bodies, access log)."""
    if req._id is None:
        inbound = req.inbound_id
        if inbound and len(inbound) <= 200 and inbound.isascii():
            req._id = inbound.decode()
        else:
            req._id = pipeline.next_request_id()
    return req._id


class Pipeline:
    def __init__(self, config: GatewayConfig, loop: asyncio.AbstractEventLoop) -> None:
        server = config.server
        limits = server.limits
        self.config = config
        self.loop = loop
        self.router = Router(config.routes)
        cache = config.cache
        self.cache_store: MemoryStore | RedisStore
        if cache.backend == "redis":  # shared by workers and instances; connects on first use
            self.cache_store = RedisStore(config.redis.url, cache.max_entries, cache.max_bytes,
                                          cache.max_object_size, spawn=self.spawn)
        else:
            self.cache_store = MemoryStore(cache.max_entries, cache.max_bytes,
                                           cache.max_object_size)
        self.cache_inflight: dict[str, asyncio.Future[bool]] = {}
        self.cache_refreshing: set[str] = set()
        # Set by a worker whose siblings keep memory stores of their own: the keys an unsafe
        # request invalidated here go to them too (through the master).
        self.cache_invalidated: Callable[[list[str]], None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._session: Any = None  # aiohttp ClientSession for background fetches, lazily
        # middleware resources (Redis)
        self.closers: list[Callable[[], Coroutine[Any, Any, None]]] = []
        self.redis_fallback = 0.0  # gauge: a Redis-backed limiter is on its fallback
        self.limiters_on_fallback: set[Any] = set()  # rate limiters on their fallback
        self.tunnels: set[Tunnel] = set()  # live WebSocket relays
        self.max_body_size = limits.max_body_size
        self.max_header_size = limits.max_header_size
        self.max_uri_size = limits.max_uri_size
        self.max_headers = limits.max_headers
        # Request line + header section, raw: the URI and field limits plus the fixed parts.
        self.max_head_bytes = limits.max_uri_size + limits.max_header_size + 64
        self.header_timeout = limits.header_timeout
        # 0 turns a timeout or cap off: infinity compares false against any time or count.
        self.body_timeout = limits.body_timeout or math.inf
        self.send_timeout = limits.send_timeout
        self.max_connections = limits.max_connections or math.inf
        self.max_keepalive_requests = limits.max_keepalive_requests or math.inf
        self.keepalive_timeout = server.keepalive_timeout
        self.trusted = TrustedProxies(server.trusted_proxies)
        # How a request path with %2F, %5C or a backslash is treated (proxy/path.py).
        self.keep_encoded_slashes = server.encoded_slashes == "keep"
        self.underscores = server.headers_with_underscores
        pool_timeouts = [u.pool.read_timeout for u in config.upstreams.values()]
        # Per-try and total timeouts, and the circuit breaker's open time, run on this clock too.
        pool_timeouts += [t for u in config.upstreams.values() for t in (
            u.pool.total_timeout, u.retries.per_try_timeout,
            u.circuit_breaker.open_for if u.circuit_breaker.error_rate else None) if t]
        pool_timeouts += [t for r in config.routes if r.timeouts is not None
                          for t in (r.timeouts.read, r.timeouts.total) if t]
        self.deadlines = Deadlines(
            loop,
            Deadlines.tick_for(self.header_timeout, self.keepalive_timeout, limits.body_timeout,
                               self.send_timeout, *pool_timeouts),
        )
        resolver = Resolver()
        self.metrics = WorkerMetrics()
        self.metrics_enabled = config.metrics.enabled  # off: no per-request counting at all
        reads = ReadBuffer()  # one for every upstream connection of this event loop
        self.pools = {
            name: UpstreamPool(name, cfg, self.deadlines, resolver, self.metrics, reads)
            for name, cfg in config.upstreams.items()
        }
        self.draining = False
        # The master's live worker count (a "workers" message after SIGTTIN/SIGTTOU), for
        # what is shared among the workers (memory rate limits); until then, the configured.
        self.workers = server.worker_count()
        self.on_workers: list[Callable[[int], None]] = []
        for route in self.router.routes:
            assert route.config is not None
            if route.config.timeouts is not None and route.upstream in self.pools:
                route.timeouts = self.pools[route.upstream].timeouts.override(
                    route.config.timeouts)
            route.chain = build_chain(config, route.config)  # disabled entries left out
            for mw in route.chain.middleware:
                mw.bind(self, route)
        # Kubernetes probes on the traffic port (server.probes): GET and HEAD of these paths
        # are answered before routing. b"" when off: no request path is empty.
        probes = server.probes
        self.probe_live = probes.live.encode() if probes.enabled else b""
        self.probe_ready = probes.ready.encode() if probes.enabled else b""
        json_type = {"Content-Type": "application/json"}
        self.health = DirectResponse(Respond(body='{"status":"ok"}', headers=json_type))
        self.ready = DirectResponse(Respond(body='{"ready":true}', headers=json_type))
        self.not_ready = DirectResponse(
            Respond(status=503, body='{"ready":false,"state":"draining"}', headers=json_type)
        )
        self.connections: set[object] = set()
        self.requests = 0
        # Request ids: a per-process random prefix and a counter — unique without a syscall
        # or uuid4 per request.
        self._id_prefix = os.urandom(4).hex()
        self._id_dash = self._id_prefix + "-"
        self._id_count = 0
        self._id_high = 0  # next_request_id's counter >> 8, and its ids' shared part
        self._id_block = self._id_dash
        # For each Context: one bound method for the worker's life, not one per request.
        self.request_id_maker: Callable[[], str] = self.next_request_id
        self.access_log: AccessLog | None = None
        if config.access_log.enabled:
            self.access_log = AccessLog(config.access_log, loop, self._id_prefix, self.metrics)
        # metrics.enabled: false and no access log: nothing to record per request.
        self.observing = self.metrics_enabled or self.access_log is not None
        self._upstream_hist = self.metrics.upstream_durations
        self._methods: dict[bytes, str] = {m: m.decode() for m in KNOWN_METHODS}

    def observe(self, req: Request, client_ip: bytes, exchange: Exchange | None = None,
                tls: str = "") -> None:
        """Once per answered request: metrics, and the access log line. ``tls``: the
        connection's TLS version, "" on plain HTTP."""
        if req.observed:
            return
        req.observed = True
        if not self.observing:
            return
        now = monotonic()
        duration = now - req.started
        method = self._methods.get(req.method, "OTHER")  # bounded label values
        route = req.route_name or "none"
        if self.metrics_enabled:
            self.metrics.request(route, method, req.status, duration)
        cache = req.ctx.cache_outcome if req.ctx is not None else ""
        if cache and self.metrics_enabled:
            if cache == "hit":
                self.metrics.inc("gateway_cache_hits_total", (route,))
            elif cache in ("miss", "revalidated", "stale"):
                self.metrics.inc("gateway_cache_misses_total", (route,))
        upstream_time = None
        upstream = ""
        tries = 0
        target_url = ""
        pool = exchange.pool if exchange is not None else None
        if exchange is not None and pool is not None:
            upstream = pool.name
            tries = exchange.tries
            # Timed only when a try began: a request the circuit breaker, a full queue or no
            # target up refused at once never met the upstream, and its near-zero time would
            # drag the upstream's latency down exactly when it fails.
            if tries:
                upstream_time = now - exchange.started_at
                target = exchange.target
                if target is not None:
                    target_url = target.url
                if self.metrics_enabled:  # else the access log's upstream_ms only
                    row = pool.duration_row
                    if row is None:
                        row = pool.duration_row = self.metrics.row(self._upstream_hist,
                                                                   (upstream,))
                    row[bucket(upstream_time)] += 1  # WorkerMetrics.request's, inlined
                    row[-1] += upstream_time
        if self.access_log is not None:
            if req.ctx is not None:
                rid: str | int = req.ctx.id()
            elif req._id is not None or req.inbound_id:
                rid = req_id(req, self)
            else:
                rid = self._id_count = self._id_count + 1  # the log makes the id, at its flush
            self.access_log.record(  # request_id, client_ip, method, host, target, status,
                # bytes_in, bytes_out, duration, upstream, upstream_time, cache, route,
                # request fields, HTTP/1.1, target URL, tries, TLS version
                rid, client_ip,
                req.method, req.host, req.url, req.status, req.body_size, req.bytes_out,
                duration, upstream, upstream_time, cache, route,
                req.headers, req.http11, target_url, tries, tls,
            )

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def fetch(self, route: CompiledRoute, path: bytes, query: bytes,
                    headers: list[tuple[bytes, bytes]]
                    ) -> tuple[int, list[tuple[bytes, bytes]], bytes] | None:
        """An upstream GET outside any client exchange (cache refresh), through aiohttp."""
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

    def gauges(self) -> dict[str, dict[tuple[str, ...], float]]:
        in_use: dict[tuple[str, ...], float] = {}
        idle: dict[tuple[str, ...], float] = {}
        target_in_use: dict[tuple[str, ...], float] = {}
        target_idle: dict[tuple[str, ...], float] = {}
        ejected: dict[tuple[str, ...], float] = {}
        breaker_open: dict[tuple[str, ...], float] = {}
        for name, pool in self.pools.items():
            in_use[(name,)] = sum(t.in_use for t in pool.targets)
            idle[(name,)] = sum(len(t.idle) for t in pool.targets)
            breaker_open[(name,)] = float(pool.breaker.state != "closed")
            for t in pool.targets:
                target_in_use[(name, t.url)] = float(t.in_use)
                target_idle[(name, t.url)] = float(len(t.idle))
                ejected[(name, t.url)] = float(t.ejected_until > self.deadlines.now)
        return {
            "gateway_active_connections": {(): float(len(self.connections))},
            "gateway_pool_connections_active": in_use,
            "gateway_pool_connections_idle": idle,
            "gateway_upstream_target_connections_active": target_in_use,
            "gateway_upstream_target_connections_idle": target_idle,
            "gateway_upstream_target_ejected": ejected,
            "gateway_upstream_circuit_open": breaker_open,
            "gateway_rate_limit_redis_fallback_active": {(): self.redis_fallback},
            "gateway_cache_redis_unavailable": {(): float(
                isinstance(self.cache_store, RedisStore) and self.cache_store.open)},
            "gateway_websocket_connections_active": {(): float(len(self.tunnels))},
        }

    def set_workers(self, count: int) -> None:
        """The number of workers the master now runs (a ``workers`` control message)."""
        if count >= 1 and count != self.workers:
            self.workers = count
            for listener in self.on_workers:
                listener(count)

    def set_health(self, upstreams: dict[str, dict[str, bool]]) -> None:
        """The master's active health check results (a ``health`` control message)."""
        for name, states in upstreams.items():
            pool = self.pools.get(name)
            if pool is not None and isinstance(states, dict):
                pool.set_health(states)

    def builtin(self, method: bytes, path: bytes) -> DirectResponse | None:
        """The probe answer for a request to a probe path; None for other methods."""
        if method != b"GET" and method != b"HEAD":
            return None
        if path == self.probe_live:
            return self.health
        if path == self.probe_ready:
            return self.not_ready if self.draining else self.ready
        return None

    def next_request_id(self) -> str:
        """``<prefix>-<counter in hex>``. The hex digits but the last two are formatted once
        per 256 requests and those two come from a table: formatting every id (%, hex() or
        an f-string) cost far more."""
        n = self._id_count = self._id_count + 1
        if n < 256:
            return self._id_dash + HEX_DIGITS[n]
        high = n >> 8
        if high != self._id_high:  # also when the access log took counter values
            self._id_high = high
            self._id_block = self._id_dash + "%x" % high  # noqa: UP031
        return self._id_block + HEX_PAIRS[n & 0xFF]

    def start(self) -> None:
        self.deadlines.start()

    async def purge(self, key: str | None = None, prefix: str | None = None,
                    shared: bool = True) -> tuple[int, bool]:
        """(entries removed, whether Redis was unreachable and the purge waits to be
        replayed). With Redis, only the worker the master asks (``shared``) purges the shared
        store and counts; the others drop their L1 copies."""
        store = self.cache_store
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

    def close(self) -> None:
        if self._session is not None:
            self.spawn(self._session.close())
        if isinstance(self.cache_store, RedisStore):
            self.spawn(self.cache_store.close())
        for closer in self.closers:
            self.spawn(closer())
        if self.access_log is not None:
            self.access_log.close()
        self.deadlines.stop()
        for pool in self.pools.values():
            pool.close()
