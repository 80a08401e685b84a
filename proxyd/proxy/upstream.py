"""Pooled upstream connections: one asyncio.Protocol per TCP connection, one pool per target.

The hot path takes an idle keep-alive connection synchronously (LIFO, so the warmest socket is
reused and surplus ones age out); only a pool miss pays for a coroutine (DNS + connect).
A connection's response parser belongs to the exchange using it (see forward.py), so parser
state never leaks from one exchange to the next.
"""

from __future__ import annotations

import asyncio
import socket
from collections import deque
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import urlsplit

from proxyd.config.models import Pool, Upstream
from proxyd.proxy.balance import make_balancer
from proxyd.proxy.resolver import Resolver
from proxyd.proxy.timers import Deadlines

if TYPE_CHECKING:
    from proxyd.proxy.forward import Exchange
    from proxyd.proxy.websocket import Tunnel


class UpstreamConnection(asyncio.Protocol):
    __slots__ = (
        "_out",
        "deadline",
        "exchange",
        "parser",
        "pool",
        "read_paused",
        "reused",
        "transport",
        "tunnel",
    )

    def __init__(self, pool: TargetPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.exchange: Exchange | None = None
        self.parser: Any = None  # httptools.HttpResponseParser bound to the exchange
        self.deadline = 0.0
        self.reused = False
        self.tunnel: Tunnel | None = None
        self.read_paused = False
        self._out: list[bytes] = []

    # -- writing: callers queue with send() and flush() once per event, so a request head and
    # the body bytes that arrived with it leave in one syscall.
    def send(self, data: bytes) -> None:
        self._out.append(data)

    def flush(self) -> None:
        out = self._out
        if out and self.transport is not None:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))
        out.clear()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def pause_reading(self) -> None:
        """The client is not keeping up: stop reading, and stop the read timeout with it —
        the upstream is not the one we are waiting for."""
        if not self.read_paused and self.transport is not None:
            self.read_paused = True
            self.transport.pause_reading()
            self.deadline = 0.0

    def resume_reading(self) -> None:
        if self.read_paused and self.transport is not None:
            self.read_paused = False
            self.transport.resume_reading()
            if self.tunnel is None:  # a relay's idle timeout runs on the client side
                self.deadline = self.pool.deadlines.now + self.pool.read_timeout

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.pool.deadlines.add(self)

    def data_received(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None:
            if self.tunnel is not None:
                self.tunnel.from_upstream(data)
                return
            # Bytes on an idle connection: the upstream is out of step; never reuse it.
            self.close()
            return
        self.deadline = self.pool.deadlines.now + self.pool.read_timeout
        exchange.feed_response(data)

    def eof_received(self) -> bool:
        return False  # close our side too; connection_lost does the bookkeeping

    def connection_lost(self, exc: Exception | None) -> None:
        if self.tunnel is None:
            self.pool.lost(self)  # a relay was handed back to the pool's count at upgrade
        self.pool.deadlines.discard(self)
        exchange, self.exchange = self.exchange, None
        if exchange is not None:
            exchange.upstream_lost(self, exc)
        if self.tunnel is not None:
            self.tunnel.lost()

    def pause_writing(self) -> None:
        if self.tunnel is not None:
            self.tunnel.ds.pause_reading_for_upstream()
        elif self.exchange is not None:
            self.exchange.ds.pause_reading_for_upstream()

    def resume_writing(self) -> None:
        if self.tunnel is not None:
            self.tunnel.ds.resume_reading_for_upstream()
        elif self.exchange is not None:
            self.exchange.ds.resume_reading_for_upstream()

    def on_deadline(self) -> None:
        if self.exchange is not None:
            self.exchange.upstream_timeout()
        else:
            self.close()  # idle past keepalive_expiry


class TargetPool:
    """Connections of one worker to one upstream server."""

    def __init__(self, url: str, weight: int, cfg: Pool, upstream: UpstreamPool) -> None:
        parts = urlsplit(url)
        self.url = url
        self.weight = weight
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        default_port = self.port == (443 if parts.scheme == "https" else 80)
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = (host if default_port else f"{host}:{self.port}").encode()
        self.upstream = upstream
        self.deadlines = upstream.deadlines
        self.max_connections = cfg.max_connections
        self.max_keepalive = cfg.max_keepalive
        self.keepalive_expiry = cfg.keepalive_expiry
        self.connect_timeout = cfg.connect_timeout
        self.read_timeout = cfg.read_timeout
        self.idle: list[UpstreamConnection] = []
        self.open = 0  # connected or connecting
        self.waiters: deque[Exchange] = deque()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def in_use(self) -> int:
        return self.open - len(self.idle)

    def acquire(self, exchange: Exchange) -> None:
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
            self.waiters.append(exchange)

    def _connect_for(self, exchange: Exchange) -> None:
        self.open += 1
        task = asyncio.get_running_loop().create_task(self._connect(exchange))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect(self, exchange: Exchange) -> None:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                addr = await self.upstream.resolver.resolve(self.host, self.port)
                _, conn = await loop.create_connection(
                    lambda: UpstreamConnection(self), addr, self.port
                )
        except TimeoutError:
            self._connect_failed()
            exchange.upstream_failed(504, "upstream connect timeout")
        except OSError as exc:
            self._connect_failed()
            exchange.upstream_failed(502, f"upstream connect failed: {exc.strerror or exc}")
        else:
            sock = conn.transport.get_extra_info("socket") if conn.transport else None
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if exchange.done:
                self.release(conn)  # the client left while we connected: keep the socket
            else:
                exchange.attach(conn)

    def _connect_failed(self) -> None:
        self.open -= 1
        self._serve_waiter()

    def release(self, conn: UpstreamConnection) -> None:
        """An exchange finished cleanly with ``conn``: hand it on or keep it idle."""
        conn.exchange = None
        conn.parser = None
        conn.resume_reading()
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done:
                conn.reused = True
                waiter.attach(conn)
                return
        if len(self.idle) < self.max_keepalive and not self.upstream.closed:
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
            if not waiter.done:
                self._connect_for(waiter)
                return

    def close_idle(self) -> None:
        for conn in self.idle:
            conn.close()


class UpstreamPool:
    """All targets of one named upstream, and the balancer that picks between them."""

    def __init__(
        self, name: str, cfg: Upstream, deadlines: Deadlines, resolver: Resolver
    ) -> None:
        self.name = name
        self.deadlines = deadlines
        self.resolver = resolver
        self.closed = False
        self.retry_attempts = cfg.retries.attempts
        self.preserve_host = cfg.preserve_host
        self.targets = [
            TargetPool(t.url, t.weight, cfg.pool, self) for t in cfg.targets
        ]
        self.pick = make_balancer(cfg.balance, self.targets)

    def close(self) -> None:
        self.closed = True
        for target in self.targets:
            target.close_idle()
