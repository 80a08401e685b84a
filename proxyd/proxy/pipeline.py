"""Everything a worker serves with, built from one config after fork.

A reload never edits a Pipeline: the new generation of workers builds its own. A Pipeline holds
the worker's services, each a typed object of its own: the client limits (limits.py), the
routes (router.py), the upstream pools (upstream.py), the observer (observe/observer.py, which
takes each finished request as plain values: observe() below), the cache (cache/service.py),
and what middleware are bound to (middleware/services.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from proxyd.cache.service import CacheService
from proxyd.config.models import GatewayConfig, Respond
from proxyd.middleware import build_chain
from proxyd.middleware.services import Fallbacks, Services, WorkerCount
from proxyd.observe.access_log import AccessLog
from proxyd.observe.metrics import WorkerMetrics
from proxyd.observe.observer import Observer
from proxyd.observe.request_ids import RequestIds
from proxyd.proxy.limits import ClientLimits
from proxyd.proxy.resolver import Resolver
from proxyd.proxy.router import DirectResponse, Router
from proxyd.proxy.timers import Deadlines
from proxyd.proxy.upstream import UpstreamPool
from proxyd.proxy.upstream_conn import ReadBuffer

if TYPE_CHECKING:
    from proxyd.proxy.exchange import Exchange
    from proxyd.proxy.request import Request
    from proxyd.proxy.websocket import Tunnel


def req_id(req: Request, pipeline: Pipeline) -> str:
    """The id a request without middleware context is known by (error bodies, access log)."""
    if req._id is None:
        inbound = req.inbound_id
        if inbound and len(inbound) <= 200 and inbound.isascii():
            req._id = inbound.decode()
        else:
            req._id = pipeline.ids.next()
    return req._id


class Pipeline:
    def __init__(self, config: GatewayConfig, loop: asyncio.AbstractEventLoop) -> None:
        server = config.server
        limits = server.limits
        self.config = config
        self.loop = loop
        self.limits = ClientLimits(server)
        self.router = Router(config.routes)
        pool_timeouts = [u.pool.read_timeout for u in config.upstreams.values()]
        # Per-try and total timeouts, and the circuit breaker's open time, run on this clock too.
        pool_timeouts += [t for u in config.upstreams.values() for t in (
            u.pool.total_timeout, u.retries.per_try_timeout,
            u.circuit_breaker.open_for if u.circuit_breaker.error_rate else None) if t]
        pool_timeouts += [t for r in config.routes if r.timeouts is not None
                          for t in (r.timeouts.read, r.timeouts.total) if t]
        self.deadlines = Deadlines(
            loop,
            Deadlines.tick_for(limits.header_timeout, server.keepalive_timeout,
                               limits.body_timeout, limits.send_timeout, *pool_timeouts),
        )
        resolver = Resolver()
        self.metrics = WorkerMetrics()
        reads = ReadBuffer()  # one for every upstream connection of this event loop
        self.pools = {
            name: UpstreamPool(name, cfg, self.deadlines, resolver, self.metrics, reads)
            for name, cfg in config.upstreams.items()
        }
        self.tunnels: set[Tunnel] = set()  # live WebSocket relays
        self.connections: set[object] = set()
        self.requests = 0
        self.draining = False
        # What middleware are bound to; its spawn keeps the worker's background tasks.
        self.services = Services(
            config, loop, self.metrics, config.metrics.enabled, self.limits.trusted,
            self.pools, None, WorkerCount(server.worker_count()), Fallbacks())
        self.cache = self.services.cache = CacheService(
            config.cache, config.redis.url, self.pools, self.services.spawn)
        for route in self.router.routes:
            assert route.config is not None
            if route.config.timeouts is not None and route.upstream in self.pools:
                route.timeouts = self.pools[route.upstream].timeouts.override(
                    route.config.timeouts)
            route.chain = build_chain(config, route.config)  # disabled entries left out
            for mw in route.chain.middleware:
                mw.bind(self.services, route)
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
        self.ids = RequestIds()
        # For each Context: one bound method for the worker's life, not one per request.
        self.request_id_maker = self.ids.next
        self.access_log: AccessLog | None = None
        if config.access_log.enabled:
            self.access_log = AccessLog(config.access_log, loop, self.ids.prefix, self.metrics)
        self.observer = Observer(self.metrics, config.metrics.enabled, self.access_log,
                                 self.ids)

    def observe(self, req: Request, client_ip: bytes, exchange: Exchange | None = None,
                tls: str = "", version: int = 0) -> None:
        """Once per answered request, its record to the observer. ``tls``: the connection's
        TLS version, "" on plain HTTP; ``version``: 20 for HTTP/2, else the request's."""
        if req.observed:
            return
        req.observed = True
        observer = self.observer
        if not observer.observing:
            return
        if not version:
            version = 11 if req.http11 else 10
        if req.ctx is not None:
            rid: str | None = req.ctx.id()
            cache = req.ctx.cache_outcome
        else:
            rid = req_id(req, self) if req._id is not None or req.inbound_id else None
            cache = ""
        pool = exchange.pool if exchange is not None else None
        if exchange is not None and pool is not None and exchange.tries:
            target = exchange.target
            observer.record(rid, client_ip, req.method, req.host, req.url, req.status,
                            req.body_size, req.bytes_out, req.started, req.route_name or "none",
                            cache, pool.name, exchange.started_at, exchange.tries,
                            target.url if target is not None else "", req.headers, version,
                            tls)
        else:
            observer.record(rid, client_ip, req.method, req.host, req.url, req.status,
                            req.body_size, req.bytes_out, req.started, req.route_name or "none",
                            cache, pool.name if pool is not None else "", 0.0, 0, "",
                            req.headers, version, tls)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        self.services.spawn(coro)

    def gauges(self) -> dict[str, dict[tuple[str, ...], float]]:
        in_use: dict[tuple[str, ...], float] = {}
        idle: dict[tuple[str, ...], float] = {}
        target_in_use: dict[tuple[str, ...], float] = {}
        target_idle: dict[tuple[str, ...], float] = {}
        target_streams: dict[tuple[str, ...], float] = {}
        ejected: dict[tuple[str, ...], float] = {}
        breaker_open: dict[tuple[str, ...], float] = {}
        for name, pool in self.pools.items():
            in_use[(name,)] = sum(t.in_use for t in pool.targets)
            idle[(name,)] = sum(len(t.idle) for t in pool.targets)
            breaker_open[(name,)] = float(pool.breaker.state != "closed")
            for t in pool.targets:
                target_in_use[(name, t.url)] = float(t.in_use)
                target_idle[(name, t.url)] = float(len(t.idle))
                target_streams[(name, t.url)] = float(t.streams)
                ejected[(name, t.url)] = float(t.ejected_until > self.deadlines.now)
        return {
            "gateway_active_connections": {(): float(len(self.connections))},
            "gateway_pool_connections_active": in_use,
            "gateway_pool_connections_idle": idle,
            "gateway_upstream_target_connections_active": target_in_use,
            "gateway_upstream_target_connections_idle": target_idle,
            "gateway_upstream_target_requests_active": target_streams,
            "gateway_upstream_target_ejected": ejected,
            "gateway_upstream_circuit_open": breaker_open,
            "gateway_rate_limit_redis_fallback_active": {(): self.services.fallbacks.active},
            "gateway_cache_redis_unavailable": {(): float(self.cache.redis_unavailable)},
            "gateway_websocket_connections_active": {(): float(len(self.tunnels))},
        }

    def set_workers(self, count: int) -> None:
        """The number of workers the master now runs (a ``workers`` control message)."""
        self.services.workers.set(count)

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

    def start(self) -> None:
        self.deadlines.start()

    def close(self) -> None:
        for closing in self.cache.closers():
            self.spawn(closing)
        for closer in self.services.closers:
            self.spawn(closer())
        if self.access_log is not None:
            self.access_log.close()
        self.deadlines.stop()
        for pool in self.pools.values():
            pool.close()
