"""One pooled upstream connection: an asyncio.Protocol per TCP connection, and its time limits.

A connection's response parser belongs to the exchange using it (see forward.py), so parser
state never leaks from one exchange to the next. Writes are queued and flushed once per event;
reading pauses while the client is not keeping up, and the read timeout with it. The pools that
open, lend and keep these connections are in upstream.py.
"""

from __future__ import annotations

import asyncio
from sys import getrefcount
from time import monotonic
from typing import TYPE_CHECKING, Any, Final, cast

from proxyd.config.models import RouteTimeouts
from proxyd.proxy.headers import Piece, write_pieces

if TYPE_CHECKING:
    from proxyd.proxy.forward import Exchange
    from proxyd.proxy.upstream import TargetPool
    from proxyd.proxy.websocket import Tunnel


# Why an upstream try failed: the label of gateway_upstream_errors_total{kind}, passed along
# with the failure rather than read back out of its message.
ERROR_CONNECT: Final = "connect"
ERROR_TIMEOUT: Final = "timeout"
ERROR_RESET: Final = "reset"
ERROR_PROTOCOL: Final = "protocol"

class Timeouts:
    """An exchange's time limits: the upstream's pool values, or a route's overrides of them."""

    __slots__ = ("connect", "per_try", "read", "timed", "total")

    def __init__(self, connect: float, read: float, total: float | None,
                 per_try: float | None) -> None:
        self.connect = connect
        self.read = read
        self.total = total or 0.0  # 0 = none
        self.per_try = per_try or 0.0
        self.timed = bool(self.total or self.per_try)  # the exchange keeps its own deadline

    def override(self, route: RouteTimeouts) -> Timeouts:
        return Timeouts(
            route.connect if route.connect is not None else self.connect,
            route.read if route.read is not None else self.read,
            route.total if route.total is not None else self.total,
            self.per_try,
        )


# What one upstream read may bring (the loop reads up to this much at once).
READ_SIZE: Final = 128 * 1024


class ReadBuffer:
    """The buffer upstream reads land in: one per pipeline (one event loop, which handles
    reads one at a time), shared by all its upstream connections.

    uvloop's own read path copies every read into a new bytes object; with a buffer of ours
    (the buffered-protocol path) a body that goes past the parser (ResponseRelay._relay_raw)
    reaches the client as a view of the read, never copied in user space. A view may outlive
    its read, queued behind a slow client: the buffer is then left to it and a new one made.
    """

    __slots__ = ("buf", "idle")

    def __init__(self) -> None:
        self.buf = bytearray(READ_SIZE)
        self.idle = self._refs()

    def fresh(self) -> None:
        self.buf = bytearray(READ_SIZE)
        self.idle = self._refs()

    def _refs(self) -> int:
        # Every live view of the buffer holds one reference to it (through its memoryview's
        # managed buffer), so more than a fresh buffer's count means some view still lives.
        # Counted by this one method, so the compiled and the pure build each compare like
        # with like.
        return getrefcount(self.buf)

    def take(self) -> bytearray:
        if self._refs() != self.idle:
            self.fresh()
        return self.buf


# Not an asyncio.Protocol subclass: the event loop only calls these methods, and a class with
# a non-native base would lose the compiled build's fixed attribute layout (docs/architecture.md,
# "The compiled build").
class UpstreamConnection:
    __slots__ = (
        "_out",
        "deadline",
        "exchange",
        "parser",
        "pool",
        "read_paused",
        "reads",
        "reused",
        "transport",
        "tunnel",
    )

    def __init__(self, pool: TargetPool) -> None:
        self.pool = pool
        self.reads = pool.reads
        self.transport: asyncio.Transport | None = None
        self.exchange: Exchange | None = None
        self.parser: Any = None  # httptools.HttpResponseParser bound to the exchange
        self.deadline = 0.0
        self.reused = False
        self.tunnel: Tunnel | None = None
        self.read_paused = False
        self._out: list[Piece] = []

    # -- writing: callers queue with send() and flush() once per event, so a request head and
    # the body bytes that arrived with it leave in one syscall.
    def send(self, data: bytes) -> None:
        self._out.append(data)

    def flush(self) -> None:
        out = self._out
        if out and self.transport is not None:
            write_pieces(self.transport, out)
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
                ex = self.exchange
                read = ex.timeouts.read if ex is not None else self.pool.read_timeout
                self.deadline = self.pool.deadlines.now + read

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.pool.deadlines.add(self)

    # uvloop reads into the buffer get_buffer gives (see ReadBuffer), then calls
    # buffer_updated; a loop without that path calls data_received with a bytes object.
    def get_buffer(self, sizehint: int) -> bytearray:
        return self.reads.take()

    def buffer_updated(self, nbytes: int) -> None:
        buf = self.reads.buf  # what get_buffer gave: nothing runs between the two calls
        data = memoryview(buf)[:nbytes]
        deadlines = self.pool.deadlines
        deadlines.now = monotonic()  # the clock deadlines are armed from (timers.Deadlines)
        exchange = self.exchange
        if exchange is None:
            self._idle_read(bytes(data))  # a tunnel's frames are read as bytes
            return
        self.deadline = deadlines.now + exchange.timeouts.read
        exchange.feed_response(data, buf)

    def data_received(self, data: bytes) -> None:
        deadlines = self.pool.deadlines
        deadlines.now = monotonic()  # the clock deadlines are armed from (timers.Deadlines)
        exchange = self.exchange
        if exchange is None:
            self._idle_read(data)
            return
        self.deadline = deadlines.now + exchange.timeouts.read
        exchange.feed_response(data, data)

    def _idle_read(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.from_upstream(data)
        else:  # bytes on an idle connection: the upstream is out of step; never reuse it
            self.close()

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
