"""The HTTP/2 client connection: h2's state machine on an accepted socket.

A connection starts as HTTP/1.1 (connection.ClientConnection) and is handed over here when TLS
negotiated "h2" by ALPN, or when its first bytes are the HTTP/2 preface on a cleartext listener
that allows h2c by prior knowledge. From then on h2 (python-hyper; sans-IO) parses and frames,
fed from ``data_received``; every stream is an Exchange whose client side is an Http2Stream
(h2_stream.py), so routing, the chain, the cache, limits, metrics and the access log are the
same as on HTTP/1.1.

Defences, each because a peer has shown how to hurt a server without it:
- concurrent streams are capped by SETTINGS_MAX_CONCURRENT_STREAMS (h2 refuses more);
- the header list is capped by SETTINGS_MAX_HEADER_LIST_SIZE (HPACK decoder) and a header
  block by h2's limit on CONTINUATION frames (CVE-2024-27316 buffered them without end);
- rapid reset (CVE-2023-44487): a client that resets most of the streams it opens, before
  their response, has the connection closed (GOAWAY ENHANCE_YOUR_CALM) after RESET_BURST;
- SETTINGS, PING, PRIORITY and empty DATA frames cost a token each from a small bucket that
  refills with time and with streams opened: a flood of them is a GOAWAY too;
- the streams one connection may open in its life are server.limits.max_keepalive_requests
  (as nginx's keepalive_requests): then a graceful GOAWAY;
- windows: each stream's receive window is STREAM_WINDOW, the connection's enough for every
  stream at once; DATA is acknowledged only as it moves on (h2_stream.py), so what a
  connection holds is bounded.

Drain (reload, stop): a GOAWAY naming the last stream taken; the streams in flight finish
(within drain_timeout, as the worker's drain bounds it), then the connection closes (h2 is
taught to let them: h2_state.py).
"""

from __future__ import annotations

import asyncio
import contextlib
from time import monotonic
from typing import TYPE_CHECKING, Final

import h2.events as ev
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.exceptions import ProtocolError, StreamClosedError
from h2.settings import SettingCodes, Settings

from proxyd.proxy.h2_fields import Malformed, check_trailers, request_of, split_answer
from proxyd.proxy.h2_state import graceful
from proxyd.proxy.h2_stream import Http2Stream
from proxyd.proxy.head import error_response
from proxyd.proxy.request import Reject

if TYPE_CHECKING:
    from proxyd.proxy.connection import ClientConnection

__all__ = ["MAX_CONCURRENT_STREAMS", "Http2Connection"]

MAX_CONCURRENT_STREAMS: Final = 128  # nginx's http2_max_concurrent_streams
STREAM_WINDOW: Final = 64 * 1024 - 1  # the protocol's default initial window
CONNECTION_WINDOW: Final = MAX_CONCURRENT_STREAMS * STREAM_WINDOW
RESET_BURST: Final = 100  # streams reset before their response, then the ratio counts
CONTROL_BURST: Final = 200.0  # control frames in a burst ...
CONTROL_RATE: Final = 20.0  # ... refilled per second ...
CONTROL_PER_STREAM: Final = 4.0  # ... and per stream opened


class Http2Connection:
    def __init__(self, ds: ClientConnection) -> None:
        self.p = ds.p
        self.limits = ds.limits
        self.transport = ds.transport
        self.client_ip = ds.client_ip
        self.trusted_peer = ds.trusted_peer
        self.scheme = ds.scheme
        self.cert_fields = ds.cert_fields
        self.tls_version = ds.tls_version
        self.forwarded_memo = ds.forwarded_memo
        self.host_memo = ds.host_memo
        # Inbound: h2_fields validates each request itself, so that a malformed one is its
        # stream's error. Outbound: what proxyd sends is already lowercase, stripped and
        # free of connection-specific fields (h2_fields.response_fields); h2 checking it
        # again is CPU spent on every response for nothing.
        config = H2Configuration(client_side=False, header_encoding=None,
                                 validate_inbound_headers=False,
                                 validate_outbound_headers=False,
                                 normalize_outbound_headers=False)
        h2 = self.h2 = graceful(H2Connection(config))
        h2.local_settings = Settings(client=False, initial_values={
            SettingCodes.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS,
            # The fields and the pseudo-fields (the target among them), as HPACK measures them;
            # request_of then holds each to its own limit, 431 or 414, as on HTTP/1.1.
            SettingCodes.MAX_HEADER_LIST_SIZE: self.limits.max_head_bytes + 1024,
            SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            SettingCodes.ENABLE_PUSH: 0,
        })
        self.streams: dict[int, Http2Stream] = {}
        self.waiting: dict[int, Http2Stream] = {}  # streams with DATA waiting for a window
        self.opened = 0
        self.premature_resets = 0
        self.tokens = CONTROL_BURST
        self.tokens_at = monotonic()
        self.parsing = False
        self.flush_pending = False
        self.write_paused = False
        self.closed = False
        self.going_away = False  # a GOAWAY went out: no new streams, close when none is left
        self.last_stream = 0  # the highest stream taken
        self.deadline = 0.0
        h2.initiate_connection()
        h2.increment_flow_control_window(CONNECTION_WINDOW - 65535)

    # -- taking over ----------------------------------------------------------------------------
    @classmethod
    def take_over(cls, ds: ClientConnection, data: bytes) -> Http2Connection:
        """The HTTP/1.1 protocol of an accepted connection hands it over: same socket, same
        place in the worker's connections and deadlines; ``data``: what was read already."""
        conn = cls(ds)
        p = conn.p
        p.connections.discard(ds)
        p.deadlines.discard(ds)
        ds.closed = True  # inert: its transport belongs to the new protocol
        p.connections.add(conn)
        p.deadlines.add(conn)
        transport = conn.transport
        assert transport is not None
        transport.set_protocol(conn)  # type: ignore[arg-type]  # duck-typed protocol
        conn.deadline = p.deadlines.now + conn.limits.header_timeout
        conn.flush()
        if data:
            conn.data_received(data)
        return conn

    # -- asyncio protocol -----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        pass  # never called: the connection is taken over (take_over)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        p = self.p
        p.connections.discard(self)
        p.deadlines.discard(self)
        for stream in list(self.streams.values()):
            stream.reset_by_client()
        self.streams.clear()
        self.waiting.clear()

    def pause_writing(self) -> None:
        self.write_paused = True
        self.deadline = self.p.deadlines.now + self.limits.send_timeout \
            if self.limits.send_timeout else self.deadline
        for stream in self.streams.values():
            if not stream.write_paused:
                stream.write_paused = True
                if stream.exchange is not None:
                    stream.exchange.pause_upstream()

    def resume_writing(self) -> None:
        self.write_paused = False
        self._arm()
        for stream in list(self.streams.values()):
            if stream.write_paused and not stream.out:
                stream.write_paused = False
                if stream.exchange is not None:
                    stream.exchange.resume_upstream()

    def data_received(self, data: bytes) -> None:
        p = self.p
        p.deadlines.now = monotonic()
        if self.closed:
            return
        try:
            events = self.h2.receive_data(data)
        except ProtocolError:
            # A connection error (h2 queued its GOAWAY): what h2 refused, including the
            # header list and CONTINUATION limits, and flow-control violations.
            self.p.metrics.client_limits.inc(("http2_protocol",))
            self.close()
            return
        # While the read's events are handled, the streams' exchanges leave their writes to
        # the end of it (Exchange reads ``parsing``): one write per upstream, one to the client.
        self.parsing = True
        streams = self.streams
        for stream in streams.values():
            stream.parsing = True
        try:
            for event in events:
                self._event(event)
                if self.closed:
                    return
        finally:
            self.parsing = False
            for stream in streams.values():
                stream.parsing = False
        for stream in list(streams.values()):
            if stream.exchange is not None:
                stream.exchange.flush_upstream()
        self.flush()
        self._arm()

    def _event(self, event: ev.Event) -> None:
        if isinstance(event, ev.DataReceived):
            stream = self.streams.get(event.stream_id or 0)
            length = event.flow_controlled_length or 0
            if not event.data and not event.stream_ended and not self._spend():
                return
            if stream is None:
                self.acknowledge(event.stream_id or 0, length)  # a stream already answered
                return
            stream.data(event.data or b"", length)
        elif isinstance(event, ev.RequestReceived):
            self._request(event.stream_id or 0, event.headers or [],
                          event.stream_ended is not None)
        elif isinstance(event, ev.StreamEnded):
            stream = self.streams.get(event.stream_id or 0)
            if stream is not None:
                stream.body_ended()
                self.stream_done(stream)
        elif isinstance(event, ev.StreamReset):
            stream = self.streams.pop(event.stream_id or 0, None)
            if stream is not None:
                self.waiting.pop(stream.stream_id, None)
                if not stream.ended and event.remote_reset:
                    self.premature_resets += 1
                    if (self.premature_resets >= RESET_BURST
                            and self.premature_resets * 2 >= self.opened):
                        self._calm("rapid_reset")
                stream.reset_by_client()
        elif isinstance(event, ev.WindowUpdated):
            if event.stream_id:
                stream = self.waiting.get(event.stream_id)
                if stream is not None:
                    stream.window_opened()
            else:
                for stream in list(self.waiting.values()):
                    stream.window_opened()
        elif isinstance(event, ev.TrailersReceived):
            stream = self.streams.get(event.stream_id or 0)
            try:
                check_trailers(event.headers or [])
            except Malformed:
                if stream is not None:
                    stream.refuse(Reject(400, "malformed trailers"))
            # Trailers of a request body are not relayed to an HTTP/1.1 upstream.
        elif isinstance(event, (ev.PingReceived, ev.RemoteSettingsChanged,
                                ev.PriorityUpdated)):
            self._spend()
        elif isinstance(event, ev.ConnectionTerminated):
            self.going_away = True
            if not self.streams:
                self.close()

    # -- streams --------------------------------------------------------------------------------
    def _request(self, stream_id: int, headers: list[tuple[bytes, bytes]], ended: bool
                 ) -> None:
        if self.going_away:
            self._reset(stream_id, ErrorCodes.REFUSED_STREAM)  # after our GOAWAY
            return
        self.opened += 1
        self.last_stream = stream_id
        self.tokens = min(CONTROL_BURST, self.tokens + CONTROL_PER_STREAM)
        try:
            req = request_of(headers, ended, self.limits)
        except Malformed:
            self.p.metrics.client_limits.inc(("malformed",))
            self._reset(stream_id, ErrorCodes.PROTOCOL_ERROR)
            return
        except Reject as refusal:
            self._refuse(stream_id, refusal, ended)
            return
        except ValueError:
            self._reset(stream_id, ErrorCodes.PROTOCOL_ERROR)
            return
        stream = Http2Stream(self, stream_id, req)
        self.streams[stream_id] = stream
        req.started = self.p.deadlines.now
        if self.opened >= self.limits.max_keepalive_requests:
            self.go_away()  # the last stream this connection takes; it is served
        stream.start()

    def _refuse(self, stream_id: int, refusal: Reject, ended: bool) -> None:
        """A request over a limit: its status, as HTTP/1.1 answers it, on its stream."""
        self.p.metrics.client_limits.inc((refusal.reason,))
        data = error_response(refusal.status, refusal.message, self.p.ids.next(), close=False)
        status, fields, body = split_answer(data)
        try:
            self.h2.send_headers(stream_id, [(b":status", b"%d" % status), *fields])
            self.h2.send_data(stream_id, body, end_stream=True)
            if not ended:
                self.h2.reset_stream(stream_id, ErrorCodes.NO_ERROR)
        except (ProtocolError, StreamClosedError):
            pass

    def _reset(self, stream_id: int, code: int) -> None:
        with contextlib.suppress(ProtocolError, StreamClosedError):
            self.h2.reset_stream(stream_id, code)

    def acknowledge(self, stream_id: int, length: int) -> None:
        if length and not self.closed:
            with contextlib.suppress(ProtocolError, StreamClosedError):
                self.h2.acknowledge_received_data(length, stream_id)

    def blocked(self, stream: Http2Stream) -> None:
        if not self.waiting and self.limits.send_timeout and not self.write_paused:
            self.deadline = self.p.deadlines.now + self.limits.send_timeout
        self.waiting[stream.stream_id] = stream

    def unblocked(self, stream: Http2Stream) -> None:
        self.waiting.pop(stream.stream_id, None)

    def stream_done(self, stream: Http2Stream) -> None:
        """Forget a stream once its exchange is over and its response is all out; a request
        body still arriving is refused politely (RST_STREAM NO_ERROR, RFC 9113 §8.1)."""
        if stream.exchange is not None or stream.out or not stream.ended:
            return
        if not stream.remote_done:
            stream.reset(ErrorCodes.NO_ERROR)
        self.streams.pop(stream.stream_id, None)
        self.waiting.pop(stream.stream_id, None)
        if not self.streams:
            if self.going_away:
                self.flush()
                self.close()
            else:
                self._arm()  # idle now: keepalive_timeout

    # -- writing, limits, the end ---------------------------------------------------------------
    def flush_soon(self) -> None:
        """A stream has output outside this connection's read (its upstream answered): written
        once the loop's current callbacks are done, so that the answers of the streams that
        one upstream read completed leave in one write."""
        if not self.flush_pending:
            self.flush_pending = True
            asyncio.get_running_loop().call_soon(self._flush_later)

    def _flush_later(self) -> None:
        self.flush_pending = False
        if not self.closed:
            self.flush()

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _spend(self) -> bool:
        """One control frame from the bucket; False (and the connection closes) when empty."""
        now = self.p.deadlines.now
        self.tokens = min(CONTROL_BURST, self.tokens + (now - self.tokens_at) * CONTROL_RATE)
        self.tokens_at = now
        self.tokens -= 1.0
        if self.tokens < 0:
            self._calm("http2_flood")
            return False
        return True

    def _calm(self, reason: str) -> None:
        """ENHANCE_YOUR_CALM: a GOAWAY and the close."""
        self.p.metrics.client_limits.inc((reason,))
        self._goaway(ErrorCodes.ENHANCE_YOUR_CALM)
        self.close()

    def _goaway(self, code: int) -> None:
        with contextlib.suppress(ProtocolError):
            self.h2.close_connection(code, last_stream_id=self.last_stream)
        self.flush()

    def go_away(self) -> None:
        """Graceful: the client opens no more streams here; those taken finish."""
        if self.going_away or self.closed:
            return
        self.going_away = True
        self._goaway(ErrorCodes.NO_ERROR)
        if not self.streams:
            self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.flush()
        if self.transport is not None:
            self.transport.close()

    def _arm(self) -> None:
        """The connection's deadline: idle without streams (keepalive_timeout), a body that
        stopped arriving (body_timeout), or a client that reads nothing (send_timeout)."""
        if self.closed:
            return
        now = self.p.deadlines.now
        if self.write_paused:
            return  # armed by pause_writing
        if not self.streams:
            self.deadline = now + (self.limits.keepalive_timeout
                                   if self.opened else self.limits.header_timeout)
        elif self.waiting and self.limits.send_timeout:
            # A stream waits for the client to open its window: as a full socket would.
            self.deadline = now + self.limits.send_timeout
        elif any(not s.remote_done for s in self.streams.values()):
            self.deadline = now + self.limits.body_timeout
        else:
            self.deadline = 0.0  # the upstreams' own timeouts bound the rest

    def on_deadline(self) -> None:
        if self.write_paused or (self.waiting and self.limits.send_timeout):
            self.p.metrics.client_limits.inc(("send_timeout",))
            self.closed = True
            if self.transport is not None:
                self.transport.abort()
            return
        if self.streams:
            self.p.metrics.client_limits.inc(("body_timeout",))
            for stream in list(self.streams.values()):
                if not stream.remote_done:
                    stream.refuse(Reject(408, "request body timeout"))
            self.flush()
            self._arm()
            return
        self.go_away()
