"""HTTP/2 to upstreams (``protocol: h2`` over TLS with ALPN, ``h2c`` by prior knowledge).

A target's pool (H2TargetPool) keeps a few multiplexed connections per worker. An exchange
borrows a stream, not a connection: an H2UpstreamStream is an UpstreamConnection to the
exchange (the same start / send_head / send_body / end_body / release / drop, and the same
callbacks back: on_head, on_body, on_end, upstream_lost, ...), so the exchange neither knows
nor cares that its request shares a socket. A connection takes streams up to the peer's
SETTINGS_MAX_CONCURRENT_STREAMS (and proxyd's own cap); when every connection is full, another
is opened (up to pool.max_connections), and then exchanges wait in line.

- GOAWAY: streams above its last stream id were never processed; their exchanges are told so
  (``unprocessed``) and retry on another connection whatever their method. The connection
  takes no new streams and closes when its last one ends. REFUSED_STREAM is the same, for one.
- Flow control: response DATA is acknowledged once handed to the exchange, except while the
  exchange has paused reading (its client is slow): then the stream's window closes, which
  is the upstream's backpressure. Request DATA goes out within the upstream's windows; what
  does not fit waits, and the client stops being read meanwhile.
- An idle connection is PINGed; one that does not answer in time is closed, and one idle for
  keepalive_expiry closes too.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from time import monotonic
from typing import TYPE_CHECKING, Final, cast

import h2.events as ev
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.exceptions import ProtocolError, StreamClosedError
from h2.settings import SettingCodes, Settings

from proxyd.proxy.h2_fields import CONNECTION_SPECIFIC
from proxyd.proxy.h2_state import graceful, send_within_windows
from proxyd.proxy.head import CRLF
from proxyd.proxy.upstream import TargetPool
from proxyd.proxy.upstream_conn import ERROR_CONNECT, ERROR_TIMEOUT, UpstreamConnection

if TYPE_CHECKING:
    from proxyd.config.models import Pool
    from proxyd.proxy.upstream import UpstreamPool
    from proxyd.proxy.upstream_conn import Borrower

__all__ = ["H2TargetPool", "H2UpstreamConnection", "H2UpstreamStream", "request_fields"]

MAX_STREAMS: Final = 100  # per connection, at most, whatever the peer allows
STREAM_WINDOW: Final = 256 * 1024  # what an upstream may send on a stream ahead of the client
CONNECTION_WINDOW: Final = 16 * 1024 * 1024
PING_INTERVAL: Final = 10.0  # an idle connection is checked this often ...
PING_TIMEOUT: Final = 5.0  # ... and closed when its PING is not answered in this long
# Request fields an HTTP/2 request never carries (RFC 9113 §8.2.2), and Host, which becomes
# :authority.
_NOT_SENT: Final = CONNECTION_SPECIFIC | {b"host", b"te"}


def request_fields(head: bytes, scheme: bytes) -> list[tuple[bytes, bytes]]:
    """A request head as the exchange rendered it for HTTP/1.1 (request line, field lines,
    Host) as an HTTP/2 header list: pseudo-fields first, names lowercased, connection-specific
    fields out. ``te: trailers`` is always sent: gRPC needs it, and proxyd relays trailers."""
    lines = head.split(CRLF)
    method, _, rest = lines[0].partition(b" ")
    target = rest.rpartition(b" ")[0]
    authority = b""
    fields: list[tuple[bytes, bytes]] = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep:
            continue
        lname = name.strip().lower()
        value = value.strip()
        if lname == b"host":
            authority = value
        elif lname not in _NOT_SENT:
            fields.append((lname, value))
    return [(b":method", method), (b":scheme", scheme), (b":authority", authority),
            (b":path", target), (b"te", b"trailers"), *fields]


class H2UpstreamStream(UpstreamConnection):
    """One stream of an upstream HTTP/2 connection, lent to one exchange."""

    def __init__(self, pool: TargetPool, conn: H2UpstreamConnection, stream_id: int) -> None:
        super().__init__(pool)
        self.conn = conn
        self.stream_id = stream_id
        self.transport = conn.transport
        self.ended_local = False  # END_STREAM sent
        self.done = False  # the response ended, or the stream was reset
        self.waiting: list[bytes] = []  # request DATA held for the window
        self.end_waiting = False
        self.held = 0  # response DATA bytes not acknowledged while reading is paused

    @property
    def frames_bodies(self) -> bool:
        return True

    def start(self, exchange: Borrower) -> None:
        self.exchange = exchange
        self.deadline = self.pool.deadlines.now + exchange.timeouts.read
        self.pool.deadlines.add(self)

    def keeps_alive(self) -> bool:
        return True  # a stream is never reused; its connection is, whatever this response was

    # -- the request ----------------------------------------------------------------------------
    def send(self, data: bytes) -> None:
        raise AssertionError("an HTTP/2 stream takes a head and a body, not bytes")

    def send_head(self, head: bytes, end: bool) -> None:
        conn = self.conn
        try:
            conn.h2.send_headers(self.stream_id, request_fields(head, conn.scheme),
                                 end_stream=end)
        except (ProtocolError, StreamClosedError):
            return
        self.ended_local = end

    def send_body(self, chunk: bytes, chunked: bool) -> None:
        if self.ended_local or not chunk:
            return
        if self.waiting:
            self.waiting.append(chunk)
            return
        self._send(chunk)

    def end_body(self, chunked: bool) -> None:
        if self.ended_local:
            return
        if self.waiting:
            self.end_waiting = True
            return
        self.ended_local = True
        with contextlib.suppress(ProtocolError, StreamClosedError):
            self.conn.h2.end_stream(self.stream_id)

    def _send(self, data: bytes) -> None:
        at = send_within_windows(self.conn.h2, self.stream_id, data)
        if at < 0:
            return  # reset meanwhile: its end comes as an event
        if at < len(data):
            self.waiting.append(data[at:])
            exchange = self.exchange
            if exchange is not None:
                exchange.ds.pause_reading_for_upstream()  # as a full socket would

    def window_opened(self) -> None:
        if not self.waiting:
            return
        waiting = b"".join(self.waiting)
        self.waiting.clear()
        self._send(waiting)
        if self.waiting:
            return
        if self.end_waiting:
            self.end_waiting = False
            self.end_body(False)
        exchange = self.exchange
        if exchange is not None:
            exchange.ds.resume_reading_for_upstream()

    def flush(self) -> None:
        self.conn.flush()

    # -- reading: paused per stream, by its window ----------------------------------------------
    def pause_reading(self) -> None:
        if not self.read_paused:
            self.read_paused = True
            self.deadline = 0.0

    def resume_reading(self) -> None:
        if self.read_paused:
            self.read_paused = False
            exchange = self.exchange
            if exchange is not None:
                self.deadline = self.pool.deadlines.now + exchange.timeouts.read
            if self.held:
                held, self.held = self.held, 0
                self.conn.acknowledge(self.stream_id, held)
                self.conn.flush()

    # -- the exchange lets go -------------------------------------------------------------------
    def drop(self) -> None:
        """The exchange cannot finish with this stream (its client left, a timeout): reset."""
        self.exchange = None
        if not self.done:
            self.done = True
            with contextlib.suppress(ProtocolError, StreamClosedError):
                self.conn.h2.reset_stream(self.stream_id, ErrorCodes.CANCEL)
            self.conn.flush()
        self.conn.forget(self)

    def close(self) -> None:
        self.drop()

    def on_deadline(self) -> None:
        exchange = self.exchange
        if exchange is not None:
            exchange.upstream_timeout()


class H2UpstreamConnection:
    """One HTTP/2 connection to a target, carrying the streams of many exchanges."""

    def __init__(self, pool: H2TargetPool) -> None:
        self.pool = pool
        self.scheme = b"https" if pool.ssl is not None else b"http"
        # Outbound fields are checked already (request_fields: lowercase, stripped, nothing
        # connection-specific); the upstream's are validated by h2 as they come. Normalising
        # stays on: it keeps Authorization and short cookies out of HPACK's shared table, and
        # this connection carries many clients' requests.
        self.h2 = graceful(H2Connection(H2Configuration(
            client_side=True, header_encoding=None, validate_outbound_headers=False)))
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, H2UpstreamStream] = {}
        self.ready = False
        self.going_away = False
        self.closed = False
        self.opened = 0  # streams opened over its life
        self.deadline = 0.0
        self.idle_since = 0.0
        self.ping_sent = False
        self.write_paused = False
        # Set when the upstream's first SETTINGS came (its concurrency limit is known).
        self.settled: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # -- asyncio protocol -----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        h2 = self.h2
        # As initial values, not an update: h2 sizes each stream's receive window from the
        # values in force, and an update is in force only once acknowledged.
        h2.local_settings = Settings(client=True, initial_values={
            SettingCodes.ENABLE_PUSH: 0,
            SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
        })
        h2.initiate_connection()
        h2.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self.flush()
        self.pool.deadlines.add(self)
        self._idle()

    def data_received(self, data: bytes) -> None:
        self.pool.deadlines.now = monotonic()
        try:
            events = self.h2.receive_data(data)
        except ProtocolError as exc:
            self.flush()
            self._fail(f"upstream HTTP/2 protocol error: {exc}")
            return
        touched: dict[int, H2UpstreamStream] = {}  # in order, once each
        for event in events:
            self._event(event, touched)
        self.flush()
        for stream in touched.values():
            exchange = stream.exchange
            if exchange is not None:
                exchange.read_done()

    def _event(self, event: ev.Event, touched: dict[int, H2UpstreamStream]) -> None:
        if isinstance(event, ev.DataReceived):
            sid = event.stream_id or 0
            length = event.flow_controlled_length or 0
            stream = self.streams.get(sid)
            exchange = stream.exchange if stream is not None else None
            if stream is None or exchange is None:
                self.acknowledge(sid, length)
                return
            stream.deadline = self.pool.deadlines.now + exchange.timeouts.read
            if event.data:  # (END_STREAM often comes as an empty DATA frame)
                exchange.on_body(event.data)
            if stream.read_paused:
                stream.held += length
            else:
                self.acknowledge(sid, length)
            touched[sid] = stream
        elif isinstance(event, ev.ResponseReceived):
            stream = self.streams.get(event.stream_id or 0)
            if stream is not None and stream.exchange is not None:
                headers = list(event.headers or [])
                status = int(next((v for n, v in headers if n == b":status"), b"502"))
                fields = [(n, v) for n, v in headers if not n.startswith(b":")]
                stream.exchange.on_head(status, b"", fields)
                touched[stream.stream_id] = stream
        elif isinstance(event, ev.InformationalResponseReceived):
            stream = self.streams.get(event.stream_id or 0)
            if stream is not None and stream.exchange is not None:
                headers = list(event.headers or [])
                status = int(next((v for n, v in headers if n == b":status"), b"100"))
                stream.exchange.on_interim(
                    status, b"", [(n, v) for n, v in headers if not n.startswith(b":")])
        elif isinstance(event, ev.TrailersReceived):
            stream = self.streams.get(event.stream_id or 0)
            if stream is not None and stream.exchange is not None:
                stream.exchange.on_trailers(list(event.headers or []))
        elif isinstance(event, ev.StreamEnded):
            stream = self.streams.get(event.stream_id or 0)
            if stream is not None:
                stream.done = True
                exchange = stream.exchange
                if exchange is not None:
                    exchange.on_end(True)
                    touched[stream.stream_id] = stream
                self.forget(stream)
        elif isinstance(event, ev.StreamReset):
            stream = self.streams.get(event.stream_id or 0)
            if stream is not None:
                stream.done = True
                stream.unprocessed = event.error_code == ErrorCodes.REFUSED_STREAM
                self._lost(stream)
        elif isinstance(event, ev.WindowUpdated):
            if event.stream_id:
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream.window_opened()
            else:
                for stream in list(self.streams.values()):
                    stream.window_opened()
        elif isinstance(event, ev.RemoteSettingsChanged):
            if not self.ready:
                self.ready = True
                if not self.settled.done():
                    self.settled.set_result(None)
            else:
                self.pool.serve_waiters()
        elif isinstance(event, ev.PingAckReceived):
            self.ping_sent = False
            if not self.streams:
                self.deadline = self.pool.deadlines.now + self._ping_interval()
        elif isinstance(event, ev.ConnectionTerminated):
            self.going_away = True
            last = event.last_stream_id or 0
            for sid, stream in list(self.streams.items()):
                if sid > last:
                    stream.unprocessed = True  # never processed: retried elsewhere
                    stream.done = True
                    self._lost(stream)
            self.pool.went_away(self)
            if not self.streams:
                self.close()

    def _lost(self, stream: H2UpstreamStream) -> None:
        exchange = stream.exchange
        self.forget(stream)
        stream.exchange = None
        if exchange is not None:
            exchange.upstream_lost(stream)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.settled.done():
            self.settled.set_exception(OSError("the upstream closed the connection"))
        self.pool.deadlines.discard(self)
        self.pool.lost_connection(self)
        for stream in list(self.streams.values()):
            stream.done = True
            self._lost(stream)

    def pause_writing(self) -> None:
        self.write_paused = True
        for stream in self.streams.values():
            exchange = stream.exchange
            if exchange is not None:
                exchange.ds.pause_reading_for_upstream()

    def resume_writing(self) -> None:
        self.write_paused = False
        for stream in list(self.streams.values()):
            exchange = stream.exchange
            if exchange is not None and not stream.waiting:
                exchange.ds.resume_reading_for_upstream()

    # -- streams --------------------------------------------------------------------------------
    def capacity(self) -> int:
        """How many more streams this connection takes now."""
        if not self.ready or self.going_away or self.closed:
            return 0
        peer = self.h2.remote_settings.max_concurrent_streams
        return min(peer, MAX_STREAMS) - len(self.streams)

    def open_stream(self) -> H2UpstreamStream:
        sid = self.h2.get_next_available_stream_id()
        stream = H2UpstreamStream(self.pool, self, sid)
        stream.reused = self.opened > 0
        self.opened += 1
        self.streams[sid] = stream
        self.deadline = 0.0  # busy: the streams' read timeouts watch it now
        self.ping_sent = False
        return stream

    def forget(self, stream: H2UpstreamStream) -> None:
        """A stream is over for this connection (ended, reset, or let go by its exchange)."""
        self.pool.deadlines.discard(stream)
        if self.streams.pop(stream.stream_id, None) is None:
            return
        if not self.streams:
            if self.going_away:
                self.close()
                return
            self._idle()
        self.pool.serve_waiters()

    def acknowledge(self, stream_id: int, length: int) -> None:
        if length:
            with contextlib.suppress(ProtocolError, StreamClosedError):
                self.h2.acknowledge_received_data(length, stream_id)

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def close(self) -> None:
        if not self.closed and self.transport is not None:
            self.closed = True
            with contextlib.suppress(ProtocolError):
                self.h2.close_connection()
            self.flush()
            self.transport.close()

    def _fail(self, message: str) -> None:
        for stream in list(self.streams.values()):
            exchange = stream.exchange
            self.forget(stream)
            stream.exchange = None
            stream.done = True
            if exchange is not None:
                exchange.protocol_error(message)
        self.close()

    # -- idle: PING, keepalive_expiry -----------------------------------------------------------
    def _ping_interval(self) -> float:
        # At least once within keepalive_expiry: a connection found dead is not lent.
        return min(PING_INTERVAL, self.pool.keepalive_expiry / 2)

    def _idle(self) -> None:
        self.idle_since = self.pool.deadlines.now
        self.deadline = self.idle_since + self._ping_interval()

    def on_deadline(self) -> None:
        if self.streams:
            return  # busy: each stream's read timeout watches it
        now = self.pool.deadlines.now
        if self.ping_sent or now - self.idle_since >= self.pool.keepalive_expiry:
            self.close()  # no answer to the PING, or idle long enough
            return
        self.ping_sent = True
        self.h2.ping(b"proxyd\x00\x00")
        self.flush()
        self.deadline = now + min(PING_TIMEOUT, self._ping_interval())


class H2TargetPool(TargetPool):
    """A target's multiplexed HTTP/2 connections in one worker."""

    def __init__(self, url: str, weight: int, cfg: Pool, upstream: UpstreamPool) -> None:
        super().__init__(url, weight, cfg, upstream)
        self.conns: list[H2UpstreamConnection] = []
        self.connecting = 0
        self.opened_connections = 0  # over the pool's life

    @property
    def in_use(self) -> int:
        return sum(1 for c in self.conns if c.streams)

    @property
    def streams(self) -> int:
        return sum(len(c.streams) for c in self.conns)

    def acquire(self, exchange: Borrower) -> None:
        for conn in self.conns:
            if conn.capacity() > 0:
                exchange.attach(conn.open_stream())
                return
        if self.open < self.max_connections and (
                not self.connecting or len(self.waiters) >= MAX_STREAMS * self.connecting):
            self._open_connection(exchange)
            self.waiters.append(exchange)
        else:
            self.wait(exchange)

    def _open_connection(self, exchange: Borrower) -> None:
        self.opened_connections += 1
        self.open += 1
        self.connecting += 1
        self.spawn(self._dial(exchange))

    async def _dial(self, exchange: Borrower) -> None:
        try:
            async with asyncio.timeout(exchange.timeouts.connect):
                conn = cast(H2UpstreamConnection,
                            await self.dial(lambda: H2UpstreamConnection(self)))
                transport = conn.transport
                if self.ssl is not None and transport is not None:
                    ssl_object = transport.get_extra_info("ssl_object")
                    if ssl_object is None or ssl_object.selected_alpn_protocol() != "h2":
                        transport.close()
                        raise OSError("the upstream did not agree to h2 (ALPN)")
                await conn.settled
        except TimeoutError:
            self._dial_failed(504, "upstream connect timeout", ERROR_TIMEOUT)
        except OSError as exc:  # ssl.SSLError (e.g. verification) is one too
            self._dial_failed(502, f"upstream connect failed: {exc.strerror or exc}",
                              ERROR_CONNECT)
        else:
            sock = conn.transport.get_extra_info("socket") if conn.transport else None
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.connected(conn)

    def connected(self, conn: H2UpstreamConnection) -> None:
        """The connection is ready (the peer's SETTINGS are in): it takes the waiters."""
        self.connecting -= 1
        self.conns.append(conn)
        self.serve_waiters()

    def _dial_failed(self, status: int, message: str, kind: str) -> None:
        self.open -= 1
        self.connecting -= 1
        self.upstream.try_failed(self)
        # Those waiting for a connection of this target: each told (it may retry elsewhere).
        waiters = [w for w in self.waiters if w.waiting_for(self)]
        self.waiters.clear()
        for waiter in waiters:
            waiter.connect_failed(status, message, kind)

    def serve_waiters(self) -> None:
        while self.waiters:
            waiter = self.waiters[0]
            if not waiter.waiting_for(self):
                self.waiters.popleft()
                continue
            conn = next((c for c in self.conns if c.capacity() > 0), None)
            if conn is None:
                if self.open < self.max_connections and not self.connecting:
                    self._open_connection(waiter)
                return
            self.waiters.popleft()
            waiter.attach(conn.open_stream())

    def went_away(self, conn: H2UpstreamConnection) -> None:
        """A GOAWAY: the connection takes no new streams; a new one may be opened."""
        if conn in self.conns:
            self.conns.remove(conn)
            self.open -= 1
        self.serve_waiters()

    def lost_connection(self, conn: H2UpstreamConnection) -> None:
        if conn in self.conns:
            self.conns.remove(conn)
            self.open -= 1
            self.serve_waiters()
        # (Not among them: it went away before, or never got ready, and was counted then.)

    def release(self, conn: UpstreamConnection) -> None:
        """The exchange is done with its stream: the stream goes, the connection stays."""
        conn.exchange = None
        if isinstance(conn, H2UpstreamStream):
            conn.conn.forget(conn)

    def lost(self, conn: UpstreamConnection) -> None:
        pass  # streams are not counted as connections

    def close_idle(self) -> None:
        for conn in list(self.conns):
            if not conn.streams:
                conn.close()
