"""Pooled upstream connections: one pool per target, and the upstream over its targets.

The hot path takes an idle keep-alive connection synchronously (LIFO, so the warmest socket is
reused and surplus ones age out); only a pool miss pays for a coroutine (DNS + connect).
UpstreamPool picks the target (balancing, health, passive outlier detection), admits or refuses
exchanges (circuit breaker, max_concurrent) and holds the retry settings; the connection itself,
one asyncio.Protocol per TCP connection, is in upstream_conn.py.
"""

from __future__ import annotations

import asyncio
import socket
from collections import deque
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Final, cast
from urllib.parse import urlsplit

from proxyd.config.models import Pool, Upstream
from proxyd.proxy.balance import HashRing, make_balancer
from proxyd.proxy.proxy_protocol import header_v1, header_v2
from proxyd.proxy.resilience import RetryBudget, upstream_breaker
from proxyd.proxy.resolver import Resolver
from proxyd.proxy.timers import Deadlines
from proxyd.proxy.upstream_conn import (
    ERROR_CONNECT,
    ERROR_TIMEOUT,
    ReadBuffer,
    Timeouts,
    UpstreamConnection,
)
from proxyd.proxy.upstream_tls import client_context

if TYPE_CHECKING:
    from proxyd.observe.metrics import WorkerMetrics
    from proxyd.proxy.upstream_conn import Borrower

__all__ = ["TargetPool", "Timeouts", "UpstreamConnection", "UpstreamPool"]

INF: Final = float("inf")
REPLAY_H2: Final = 64 * 1024
HASH_CLIENT_IP, HASH_HEADER, HASH_COOKIE = 0, 1, 2


class TargetPool:
    """Connections of one worker to one upstream server."""

    def __init__(self, url: str, weight: int, cfg: Pool, upstream: UpstreamPool) -> None:
        parts = urlsplit(url)
        self.url = url
        self.weight = weight
        self.scheme = parts.scheme.lower()
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.ssl = upstream.ssl if self.scheme == "https" else None
        self.server_hostname = (upstream.server_name or self.host) if self.ssl else None
        # Eligibility: ``healthy`` from the master's active checks, ``ejected_until`` from this
        # worker's passive outlier detection; ``up`` is both, kept by UpstreamPool.refresh().
        self.up = True
        self.healthy = True
        self.failures = 0  # consecutive
        self.ejected_until = 0.0
        self.ejections = 0  # in a row; the cool-down doubles with each
        self.returned_at = 0.0
        default_port = self.port == (443 if parts.scheme == "https" else 80)
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = (host if default_port else f"{host}:{self.port}").encode()
        self.upstream = upstream
        self.deadlines = upstream.deadlines
        self.reads = upstream.reads
        self.max_connections = cfg.max_connections
        self.max_keepalive = cfg.max_keepalive
        self.keepalive_expiry = cfg.keepalive_expiry
        self.connect_timeout = cfg.connect_timeout
        self.read_timeout = cfg.read_timeout
        self.idle: list[UpstreamConnection] = []
        self.open = 0  # connected or connecting
        self.waiters: deque[Borrower] = deque()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def in_use(self) -> int:
        return self.open - len(self.idle)

    @property
    def streams(self) -> int:
        """Requests in flight on this target's connections (HTTP/2 multiplexes them)."""
        return self.in_use

    def acquire(self, exchange: Borrower) -> None:
        idle = self.idle
        while idle:
            conn = idle.pop()
            if conn.transport is None or conn.transport.is_closing():
                continue
            conn.reused = True
            exchange.attach(conn)
            return
        if self.open < self.max_connections:
            self._connect_for(exchange)
        else:
            self.wait(exchange)

    def wait(self, exchange: Borrower) -> None:
        """No connection to lend now: wait in line, or 503 when the line is full."""
        if (limit := self.upstream.max_pending) is not None and len(self.waiters) >= limit:
            exchange.refuse("pending", "upstream connection pool is full")
        else:
            self.waiters.append(exchange)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """A connect in the background, held until it is done (the loop keeps weak refs)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _connect_for(self, exchange: Borrower) -> None:
        self.open += 1
        self.spawn(self._connect(exchange, exchange.tries))

    async def dial(self, make: Callable[[], object]) -> object:
        """A new connection to this target, its name resolved now, TLS for https://; the
        protocol object ``make`` made."""
        loop = asyncio.get_running_loop()
        addr = await self.upstream.resolver.resolve(self.host, self.port)
        if self.ssl is None:
            _, conn = await loop.create_connection(make, addr, self.port)  # type: ignore[type-var]
        else:
            _, conn = await loop.create_connection(  # type: ignore[type-var]
                make, addr, self.port, ssl=self.ssl, server_hostname=self.server_hostname)
        return conn

    async def _connect(self, exchange: Borrower, attempt: int) -> None:
        try:
            async with asyncio.timeout(exchange.timeouts.connect):
                conn = cast(UpstreamConnection,
                            await self.dial(lambda: UpstreamConnection(self)))
        except TimeoutError:
            self._connect_failed(exchange, attempt, 504, "upstream connect timeout",
                                 ERROR_TIMEOUT)
        except OSError as exc:  # ssl.SSLError (e.g. verification) is one too
            self._connect_failed(exchange, attempt, 502,
                                 f"upstream connect failed: {exc.strerror or exc}", ERROR_CONNECT)
        else:
            sock = conn.transport.get_extra_info("socket") if conn.transport else None
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if exchange.tries != attempt or not exchange.waiting_for(self):
                # The client left, or that try timed out and another one went elsewhere:
                # keep the socket for the next request.
                self.release(conn)
            else:
                exchange.attach(conn)

    def _connect_failed(self, exchange: Borrower, attempt: int, status: int,
                        message: str, kind: str) -> None:
        self.open -= 1
        self.upstream.try_failed(self)
        if exchange.tries == attempt and exchange.waiting_for(self):
            exchange.connect_failed(status, message, kind)
        self._serve_waiter()

    # -- passive outlier detection ------------------------------------------------------------
    def failed(self) -> None:
        """A try on this target failed (connect error, timeout, reset, failure status)."""
        outlier = self.upstream.outlier
        if outlier is None:
            return
        self.failures += 1
        if self.failures >= outlier.consecutive_failures and self.ejected_until == 0.0:
            now = self.deadlines.now
            if now - self.returned_at > outlier.max_ejection:
                self.ejections = 0  # long enough back in service: the next cool-down is short
            self.ejections += 1
            cool_down = min(outlier.base_ejection * 2 ** (self.ejections - 1),
                            outlier.max_ejection)
            self.ejected_until = now + cool_down
            upstream = self.upstream
            if upstream.metrics is not None:
                upstream.metrics.upstream_ejections.inc((upstream.name, self.url))
            upstream.refresh()

    def release(self, conn: UpstreamConnection) -> None:
        """An exchange finished cleanly with ``conn``: hand it on or keep it idle."""
        conn.exchange = None
        conn.parser = None
        conn.resume_reading()
        while self.waiters and self.upstream.proxy_header is None:
            waiter = self.waiters.popleft()
            if waiter.waiting_for(self):
                conn.reused = True
                waiter.attach(conn)
                return
        if (len(self.idle) < self.max_keepalive and not self.upstream.closed
                and self.upstream.proxy_header is None):  # that header names one client
            conn.deadline = self.deadlines.now + self.keepalive_expiry
            self.idle.append(conn)
        else:
            conn.close()

    def detach(self, conn: UpstreamConnection) -> None:
        """A connection became a WebSocket relay: it no longer counts against the pool."""
        self.open -= 1
        self._serve_waiter()

    def lost(self, conn: UpstreamConnection) -> None:
        self.open -= 1
        if conn in self.idle:
            self.idle.remove(conn)
        self._serve_waiter()

    def _serve_waiter(self) -> None:
        while self.waiters and self.open < self.max_connections:
            waiter = self.waiters.popleft()
            if waiter.waiting_for(self):
                self._connect_for(waiter)
                return

    def close_idle(self) -> None:
        for conn in self.idle:
            conn.close()


class UpstreamPool:
    """All targets of one named upstream, and the balancer that picks between them."""

    def __init__(
        self, name: str, cfg: Upstream, deadlines: Deadlines, resolver: Resolver,
        metrics: WorkerMetrics | None = None, reads: ReadBuffer | None = None,
    ) -> None:
        self.name = name
        self.deadlines = deadlines
        self.reads = reads if reads is not None else ReadBuffer()  # the pipeline's, shared
        self.resolver = resolver
        self.metrics = metrics
        # This upstream's row of gateway_upstream_request_duration_seconds, once it has one:
        # the per-request update then needs no label tuple or dict lookup.
        self.closed = False
        self.preserve_host = cfg.preserve_host
        self.multiplexed = cfg.protocol != "http1"  # HTTP/2: streams on shared connections
        # A PROXY protocol header ahead of each connection: header_v1, header_v2, or None.
        self.proxy_header = (None if cfg.proxy_protocol == "off"
                             else header_v1 if cfg.proxy_protocol == "v1" else header_v2)
        self.ssl = client_context(cfg)  # once per upstream, shared by its https targets
        self.server_name = cfg.tls.server_name
        pool = cfg.pool
        self.timeouts = Timeouts(pool.connect_timeout, pool.read_timeout, pool.total_timeout,
                                 cfg.retries.per_try_timeout)
        # retries
        retries = cfg.retries
        self.retry_attempts = retries.attempts
        self.retry_methods = frozenset(m.encode() for m in retries.methods)
        can_retry = retries.attempts > 1
        self.retry_statuses = frozenset(retries.on_statuses if can_retry else ())
        self.max_body = retries.max_body if can_retry else 0
        # What of a request body is kept to be sent again: max_body; over HTTP/2 at least
        # REPLAY_H2, as a stream the upstream refused unprocessed (REFUSED_STREAM, above a
        # GOAWAY's last stream) may go again whatever its method.
        self.replay_limit = max(self.max_body, REPLAY_H2) if can_retry and self.multiplexed \
            else self.max_body
        self.budget = RetryBudget(retries, deadlines)
        # outlier detection and the circuit breaker
        self.outlier = cfg.outlier_detection if cfg.outlier_detection.enabled else None
        self.failure_statuses = frozenset(self.outlier.failure_statuses if self.outlier else ())
        self.panic = cfg.panic_mode
        breaker = cfg.circuit_breaker
        self.breaker = upstream_breaker(breaker, deadlines)
        self.max_concurrent = breaker.max_concurrent
        self.max_pending = breaker.max_pending
        # Exchanges go through admit() only when something can refuse or queue them.
        self.guarded = self.breaker.enabled or breaker.max_concurrent is not None
        # on_headers_complete reports statuses only when something counts them.
        self.watch_status = bool(self.failure_statuses) or self.breaker.enabled
        self.active = 0  # exchanges admitted and not finished
        self.queue: deque[Borrower] = deque()  # waiting for one of max_concurrent
        self._dequeuing = False
        # balancing
        self.kind = cfg.balance
        if cfg.protocol == "http1":
            self.targets = [
                TargetPool(t.url, t.weight, cfg.pool, self) for t in cfg.targets
            ]
        else:
            from proxyd.proxy.h2_upstream import H2TargetPool  # (it builds on this module)
            self.targets = [
                H2TargetPool(t.url, t.weight, cfg.pool, self) for t in cfg.targets
            ]
        self.ring = HashRing(self.targets) if cfg.balance == "hash" else None
        key = cfg.hash_key or "client_ip"
        kind, _, field = key.partition(":")
        self.hash_kind = {"header": HASH_HEADER, "cookie": HASH_COOKIE}.get(kind, HASH_CLIENT_IP)
        self.hash_name = field.lower().encode() if kind == "header" else field.encode()
        self.available = list(self.targets)
        self._pick: Callable[[], TargetPool] = make_balancer(cfg.balance, self.available)
        self._eject_recheck = INF  # when the next ejection ends
        self._recheck = self.budget.next_roll  # ... or the retry budget's slot, if sooner

    # -- choosing a target ------------------------------------------------------------------
    def pick(self, key: bytes = b"", skip: TargetPool | None = None) -> TargetPool | None:
        """A target that is up, other than ``skip`` (the one a retry moves away from); None
        when there is none (the caller answers 503), unless panic_mode picks the least bad."""
        if self.deadlines.now >= self._recheck:
            self._periodic()
        available = self.available
        if not available:
            return self._least_bad() if self.panic and skip is None else None
        if skip is not None and len(available) == 1:
            return None if available[0] is skip else available[0]
        if self.ring is not None:
            return self.ring.get(key, skip)
        target = self._pick()
        if target is skip:
            target = self._pick()  # round robin moves on; the others may pick it again
            if target is skip:
                target = next(t for t in available if t is not skip)
        return target

    def _least_bad(self) -> TargetPool:
        return min(self.targets, key=lambda t: (not t.healthy, t.ejected_until, t.failures))

    def hash_key(self, client_ip: bytes, headers: list[tuple[bytes, bytes, bytes]]) -> bytes:
        """The request's key on the ring; the client ip when the header or cookie is absent."""
        kind, name = self.hash_kind, self.hash_name
        if kind == HASH_HEADER:
            for lname, _, value in headers:
                if lname == name:
                    return value
        elif kind == HASH_COOKIE:
            for lname, _, value in headers:
                if lname == b"cookie":
                    for part in value.split(b";"):
                        k, _, v = part.strip().partition(b"=")
                        if k == name:
                            return v
        return client_ip

    def _periodic(self) -> None:
        """Due now and then from pick(): roll the retry budget, end ejections."""
        self.budget.roll()
        if self.deadlines.now >= self._eject_recheck:
            self.refresh()
        self._recheck = min(self._eject_recheck, self.budget.next_roll)

    def refresh(self) -> None:
        """Recompute which targets are up; rebuild the balancer when that changed."""
        now = self.deadlines.now
        recheck = INF
        available = []
        threshold = self.outlier.consecutive_failures if self.outlier else 1
        for t in self.targets:
            if t.ejected_until > now:
                recheck = min(recheck, t.ejected_until)
                t.up = False
                continue
            if t.ejected_until:
                # Back from a cool-down on probation: one more failure ejects it again.
                t.ejected_until = 0.0
                t.returned_at = now
                t.failures = threshold - 1
            t.up = t.healthy
            if t.up:
                available.append(t)
        self._eject_recheck = recheck
        self._recheck = min(recheck, self.budget.next_roll)
        if available != self.available:
            self.available = available
            if available:
                self._pick = make_balancer(self.kind, available)

    def set_health(self, states: dict[str, bool]) -> None:
        """Results of the master's active checks (the targets it knows of)."""
        for t in self.targets:
            healthy = states.get(t.url)
            if healthy is not None:
                t.healthy = bool(healthy)
        self.refresh()

    # -- outcomes ---------------------------------------------------------------------------
    def try_failed(self, target: TargetPool) -> None:
        target.failed()
        self.breaker.record(False)

    def response(self, target: TargetPool, status: int) -> None:
        """A final response head from ``target``: success or failure for outlier detection
        and the breaker."""
        if status in self.failure_statuses:
            target.failed()
        else:
            target.failures = 0
        if self.breaker.enabled:
            self.breaker.record(status < 500)

    # -- admission (circuit breaking) ---------------------------------------------------------
    def admit(self, exchange: Borrower) -> bool:
        """True: go ahead now. False: refused with a 503, or queued for a slot."""
        if not self.breaker.allow():
            exchange.refuse("open", "upstream circuit breaker is open")
            return False
        limit = self.max_concurrent
        if limit is not None and self.active >= limit:
            pending = self.max_pending
            if pending is not None and len(self.queue) >= pending:
                exchange.refuse("concurrency", "too many concurrent requests to the upstream")
            else:
                self.queue.append(exchange)
            return False
        self.active += 1
        return True

    def leave(self) -> None:
        """An admitted exchange ended: its slot goes to the first queued one still waiting."""
        self.active -= 1
        if not self.queue or self._dequeuing:
            return
        self._dequeuing = True  # iterative: a dequeued exchange that fails at once re-enters
        try:
            limit = self.max_concurrent or 0
            while self.queue and self.active < limit:
                exchange = self.queue.popleft()
                if exchange.queued():
                    self.active += 1
                    exchange.admitted = True
                    exchange.begin()
        finally:
            self._dequeuing = False

    def close(self) -> None:
        self.closed = True
        for target in self.targets:
            target.close_idle()
