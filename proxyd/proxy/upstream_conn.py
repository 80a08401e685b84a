"""One pooled HTTP/1.1 upstream connection: an asyncio.Protocol per TCP connection, its time
limits, and the adapter between its response parser and the exchange using it.

The exchange (exchange.py) never parses an upstream's bytes: this connection runs llhttp
(httptools) and calls the exchange's on_head, on_interim, on_body, on_raw, on_end and
on_upgrade, and tells it of a close (upstream_lost) or a read timeout (upstream_timeout). Each
exchange gets a fresh parser (start), so parser state never leaks from one exchange to the
next. Writes are queued and flushed once per event; reading pauses while the client is not
keeping up, and the read timeout with it. The pools that open, lend and keep these
connections are in upstream.py.
"""

from __future__ import annotations

import asyncio
from sys import getrefcount
from time import monotonic
from typing import TYPE_CHECKING, Any, Final, cast

import httptools

from proxyd.config.models import RouteTimeouts
from proxyd.proxy.field_rules import Piece, write_pieces

if TYPE_CHECKING:
    from typing import TypeAlias

    from proxyd.proxy.exchange import Exchange
    from proxyd.proxy.subrequest import Subrequest
    from proxyd.proxy.upstream import TargetPool
    from proxyd.proxy.websocket import Tunnel

    # Who a connection is lent to: a client request's exchange, or a request proxyd makes
    # itself (subrequest.py). The exchange comes first: the compiled build tests for it
    # first and calls it natively.
    Borrower: TypeAlias = Exchange | Subrequest


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

    def within(self, total: float) -> Timeouts:
        """These limits, with the total cut to ``total`` seconds at most."""
        return Timeouts(self.connect, self.read, min(self.total, total) if self.total else total,
                        self.per_try)

    def override(self, route: RouteTimeouts) -> Timeouts:
        return Timeouts(
            route.connect if route.connect is not None else self.connect,
            route.read if route.read is not None else self.read,
            route.total if route.total is not None else self.total,
            self.per_try,
        )


# An exchange's limits until it meets an upstream (its route's or the upstream's then).
NO_TIMEOUTS: Final = Timeouts(0.0, 0.0, None, None)

# Reads at least this large that open a 2xx response have their head parsed apart from the
# body (UpstreamConnection._feed_split); the head must end within them.
SPLIT_READ: Final = 16 * 1024

# What one upstream read may bring (the loop reads up to this much at once).
READ_SIZE: Final = 128 * 1024


class ReadBuffer:
    """The buffer upstream reads land in: one per pipeline (one event loop, which handles
    reads one at a time), shared by all its upstream connections.

    uvloop's own read path copies every read into a new bytes object; with a buffer of ours
    (the buffered-protocol path) a body that goes past the parser (UpstreamConnection._relay_raw)
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


class Abandoned(Exception):
    """Raised from a response-parser callback: the exchange let go of this connection (a
    retry on another target has begun, or it ended at the head); the parser stops at once."""


# Not an asyncio.Protocol subclass: the event loop only calls these methods, and a class with
# a non-native base would lose the compiled build's fixed attribute layout (docs/architecture.md,
# "The compiled build").
class UpstreamConnection:
    __slots__ = (
        "_out",
        "deadline",
        "exchange",
        "fields",
        "interim",
        "parser",
        "pool",
        "raw_left",
        "read_paused",
        "reads",
        "reason",
        "reused",
        "transport",
        "tunnel",
        "unprocessed",
        "upgrade_fields",
    )

    def __init__(self, pool: TargetPool) -> None:
        self.pool = pool
        self.reads = pool.reads
        self.transport: asyncio.Transport | None = None
        self.exchange: Borrower | None = None
        self.parser: Any = None  # httptools.HttpResponseParser of the current exchange
        self.deadline = 0.0
        self.reused = False
        self.tunnel: Tunnel | None = None
        self.read_paused = False
        self.unprocessed = False  # (HTTP/2) the upstream said it never processed the request
        self._out: list[Piece] = []
        # The response being parsed: its reason phrase and fields, whether it is a 1xx, the
        # fields of a 101, and how many body bytes still go past the parser (_relay_raw).
        self.reason = b""
        self.fields: list[tuple[bytes, bytes]] = []
        self.interim = False
        self.upgrade_fields: list[tuple[bytes, bytes]] | None = None
        self.raw_left = 0

    def start(self, exchange: Borrower) -> None:
        """Lent to ``exchange``: a fresh parser, and the read timeout runs."""
        self.exchange = exchange
        self.parser = httptools.HttpResponseParser(self)
        self.reason = b""
        self.fields = []
        self.interim = False
        self.raw_left = 0
        self.deadline = self.pool.deadlines.now + exchange.timeouts.read

    def drop(self) -> None:
        """The exchange lets go of a connection that cannot be reused: it is closed."""
        self.exchange = None
        self.close()

    def become_tunnel(self, tunnel: Tunnel) -> None:
        """The upstream switched protocols: this connection is one end of a relay now."""
        self.exchange = None
        self.parser = None
        self.deadline = 0.0  # the relay's idle timeout runs on the client side
        self.tunnel = tunnel
        self.pool.detach(self)  # relays are long-lived: they must not starve the pool

    @property
    def frames_bodies(self) -> bool:
        """Whether every response body has an end of its own; an HTTP/1.1 body may end with
        the connection."""
        return False

    def keeps_alive(self) -> bool:
        """Whether the response so far lets this connection carry another."""
        return self.parser is not None and bool(self.parser.should_keep_alive())

    # -- writing: callers queue with send() and flush() once per event, so a request head and
    # the body bytes that arrived with it leave in one syscall.
    def send(self, data: bytes) -> None:
        self._out.append(data)

    def send_head(self, head: bytes, end: bool) -> None:
        """The request head, rendered for HTTP/1.1; ``end``: no body follows."""
        self._out.append(head)

    def send_body(self, chunk: bytes, chunked: bool) -> None:
        """A piece of the request body, framed as its head said."""
        self._out.append(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)

    def end_body(self, chunked: bool) -> None:
        """The request body is complete (a chunked one says so)."""
        if chunked:
            self._out.append(b"0\r\n\r\n")

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
        self._read(data, buf, exchange)

    def data_received(self, data: bytes) -> None:
        deadlines = self.pool.deadlines
        deadlines.now = monotonic()  # the clock deadlines are armed from (timers.Deadlines)
        exchange = self.exchange
        if exchange is None:
            self._idle_read(data)
            return
        self.deadline = deadlines.now + exchange.timeouts.read
        self._read(data, data, exchange)

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
        self.parser = None
        exchange, self.exchange = self.exchange, None
        if exchange is not None:
            exchange.upstream_lost(self)
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

    # -- the response: one read at a time ---------------------------------------------------
    def _read(self, data: Piece, whole: bytes | bytearray, exchange: Borrower) -> None:
        """One read from the upstream: bytes, or a view of the read buffer, which is
        ``whole`` (to search the head in; the read starts at its offset 0)."""
        left = self.raw_left
        if left:
            self._relay_raw(data, left, exchange)
        # A large read that opens a 2xx response (b"2" is 50): see _feed_split.
        elif len(data) >= SPLIT_READ and whole.startswith(b"HTTP/1.") and whole[9] == 50 \
                and (end := whole.find(b"\r\n\r\n", 0, SPLIT_READ)) >= 0:
            self._feed_split(data, end + 4, exchange)
        else:
            self._feed(data)
        # What this read produced goes to the client. (An exchange that ended in it has
        # flushed, and one that let go of this connection for a retry produced nothing.)
        if self.exchange is exchange:
            exchange.read_done()

    def _feed_split(self, data: Piece, end: int, exchange: Borrower) -> None:
        """The head alone through the parser; a body that on_head lets go past the parser
        (_relay_raw) is then sent as a view of this read. Through llhttp, on_body would
        first copy it into a new bytes object: 64 KiB per /big response."""
        view = memoryview(data)
        if self._feed(view[:end]) and self.exchange is exchange:
            rest = view[end:]
            left = self.raw_left
            if left and rest:
                self._relay_raw(rest, left, exchange)
            elif rest:
                self._feed(rest)  # not raw (chunked, a filter, ...): the parser has it all
        # (Let go of already, with bytes past the head: a HEAD's answer or an upstream out
        # of step; dropped, as the parser would have dropped them.)

    def _feed(self, data: Piece) -> bool:
        """Through the parser; False when it stopped (an error, a retry, an upgrade)."""
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            exchange = self.exchange
            if exchange is not None:
                exchange.on_upgrade(self.upgrade_fields,
                                    bytes(data[exc.args[0]:]) if exc.args else b"")
            return False
        except httptools.HttpParserError as exc:
            exchange = self.exchange
            if exchange is not None and not isinstance(exc.__context__, Abandoned):
                exchange.protocol_error(f"invalid upstream response: {exc}")
            return False
        return True

    def _relay_raw(self, data: Piece, left: int, exchange: Borrower) -> None:
        """What follows the head's read of a Content-Length body, past the parser: each read
        goes to the client as it came. (Through llhttp, every read would be copied into a new
        bytes object for on_body: ~64 KiB of copying per /big response, for no decision.)"""
        n = len(data)
        if n < SPLIT_READ and not isinstance(data, bytes):
            # A small piece of the read buffer: copied, so that a slow client's queue does
            # not keep a whole buffer (ReadBuffer) for a few bytes.
            data = bytes(data)
        excess = n > left
        if excess:  # bytes past the body: the upstream is out of step
            data = data[:left]
            n = left
        self.raw_left = left - n
        exchange.on_raw(data)
        if not self.raw_left:
            exchange.on_end(bool(self.parser.should_keep_alive()) and not excess)

    # -- llhttp callbacks -------------------------------------------------------------------
    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self.fields.append((name, value))

    def on_headers_complete(self) -> None:
        exchange = self.exchange
        if exchange is None:
            return
        status = self.parser.get_status_code()
        fields, self.fields = self.fields, []
        reason, self.reason = self.reason, b""
        if status < 200:
            self.interim = True
            if status == 101:
                self.upgrade_fields = fields  # llhttp raises HttpParserUpgrade right after
            else:
                exchange.on_interim(status, reason, fields)
            return
        self.raw_left = exchange.on_head(status, reason, fields)
        if self.exchange is not exchange:
            raise Abandoned  # a retry, or ended at the head: nothing more of this response

    def on_body(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None:
            return
        if self.raw_left:
            self.raw_left -= len(data)
        exchange.on_body(data)

    def on_message_complete(self) -> None:
        exchange = self.exchange
        if exchange is None:
            return
        if self.interim:
            self.interim = False  # a 1xx ended; the final response follows
            return
        self.raw_left = 0
        exchange.on_end(bool(self.parser.should_keep_alive()))
