"""The HTTP/1.1 client connection: one asyncio.Protocol per accepted connection.

It parses (llhttp, through httptools), enforces the limits and the framing rules
(docs/architecture.md, "HTTP rules") before anything reaches an upstream, queues pipelined
requests, writes, pauses and resumes reading, keeps the client's deadlines, drains and closes
(in stages when the client may still be sending). It knows nothing of routes, chains or
upstreams: each request, in its turn, becomes an Exchange (exchange.py), which hands it a
response's parts (send_head, send_body, end_body, ...) that this connection frames for
HTTP/1.1, and tells it when it is over (exchange_ended).

Requests on a connection are answered strictly in order. A pipelined request that arrives while
another is in flight is queued with its body (reading pauses, so the queue is bounded by one
read).
"""

from __future__ import annotations

import asyncio
from collections import deque
from time import monotonic
from typing import TYPE_CHECKING, Final, cast

import httptools

from proxyd.listener_tls import client_cert_fields
from proxyd.proxy.downstream import Downstream
from proxyd.proxy.exchange import Exchange
from proxyd.proxy.field_rules import REQUEST_NAMES, Piece, lower_name, write_pieces
from proxyd.proxy.h2_connection import Http2Connection
from proxyd.proxy.head import body_length, error_response, framing, response_head
from proxyd.proxy.pipeline import Pipeline, req_id
from proxyd.proxy.proxy_protocol import HeaderReader, ListenerPolicy, refused
from proxyd.proxy.request import SPECIAL, Reject, Request, special_header
from proxyd.proxy.websocket import Tunnel

if TYPE_CHECKING:
    from proxyd.config.models import WebSocket
    from proxyd.proxy.upstream import UpstreamConnection

__all__ = ["PAUSE_PENDING", "PAUSE_PIPELINE", "PAUSE_UPSTREAM", "ClientConnection", "Request",
           "SendWatch"]

# Reasons to stop reading from the client; reading resumes when none is left.
PAUSE_PIPELINE: Final = 1  # a pipelined request waits for the one in flight
PAUSE_UPSTREAM: Final = 2  # the upstream socket's write buffer is full
PAUSE_PENDING: Final = 4  # body bytes piled up while the upstream connection is being opened


class _Discard:
    """The parser of a closed connection: whatever the client still sends is dropped."""

    @staticmethod
    def feed_data(data: bytes) -> None:
        pass


class SendWatch:
    """The send timeout of one client, in the deadline sweep only while its writes are paused
    (a full socket buffer): the common path pays nothing for it. Like nginx's send_timeout it
    measures time without progress: a buffer that shrank since the last look buys another
    period, so a slow but live reader is never cut off."""

    __slots__ = ("buffered", "deadline", "ds")

    def __init__(self, ds: ClientConnection) -> None:
        self.ds = ds
        self.deadline = 0.0
        self.buffered = 0

    def arm(self, transport: asyncio.Transport | None, now: float, timeout: float) -> None:
        self.buffered = transport.get_write_buffer_size() if transport is not None else 0
        self.deadline = now + timeout

    def on_deadline(self) -> None:
        ds = self.ds
        transport = ds.transport
        if transport is not None and transport.get_write_buffer_size() < self.buffered:
            self.arm(transport, ds.p.deadlines.now, ds.limits.send_timeout)  # it reads: wait on
        else:
            ds.send_timed_out()


def foreign_protocol(read: bytes, req: Request) -> bool:
    """Whether the request line in ``read`` names RTSP or ICE, which llhttp accepts besides
    HTTP and reports with the same version numbers. (A request line split across reads
    just before its protocol is not seen; proxyd re-renders it as HTTP/1.1 either way.)"""
    line = req.method + b" " + req.url + b" "
    at = read.find(line)
    if at >= 0:
        return read.startswith((b"RTSP/", b"ICE/"), at + len(line))
    eol = read.find(b"\n")
    return read.startswith((b"RTSP/", b"ICE/")) or read.find(b" RTSP/", 0, eol) >= 0 \
        or read.find(b" ICE/", 0, eol) >= 0


def absolute_form(req: Request) -> None:
    """A target in absolute-form (RFC 9112 §3.2.2): its authority is the request's host, the
    Host field is ignored, and the request is routed and forwarded in origin-form."""
    scheme, sep, rest = req.url.partition(b"://")
    if not sep or scheme.lower() not in (b"http", b"https"):
        raise Reject(400, "request target must be origin-form or absolute-form")
    end = len(rest)
    for stop in (b"/", b"?"):
        at = rest.find(stop)
        if 0 <= at < end:
            end = at
    authority, path = rest[:end], rest[end:]
    if not authority or b"@" in authority:
        raise Reject(400, "request target has no usable authority")
    req.url = path if path.startswith(b"/") else b"/" + path
    req.host = authority


class UpgradeBody:
    """The parser's protocol after a request that asked to upgrade, with a body, was not
    upgraded (proxyd never upgrades a request that has a body).

    llhttp gives such a request no body callbacks: it ends the message at its head and hands
    everything after it to "the new protocol". Forwarding the head alone would leave the
    upstream waiting for a body that the next request on its connection would then fill. So a
    fresh parser is fed a head that only states the request's framing, then the bytes that
    followed: the body of its first message is that request's, and every later message is an
    ordinary request of the connection, passed straight through.
    """

    __slots__ = ("ds", "in_body")

    def __init__(self, ds: ClientConnection) -> None:
        self.ds = ds
        self.in_body = True

    @staticmethod
    def framing(req: Request) -> bytes:
        head = b"PUT / HTTP/1.1\r\nHost: -\r\n"
        if req.chunked:
            head += b"Transfer-Encoding: chunked\r\n"
        else:
            head += b"Content-Length: %d\r\n" % (req.content_length or 0)
        if not req.keep_alive:
            head += b"Connection: close\r\n"
        return head + b"\r\n"

    def on_message_begin(self) -> None:
        if not self.in_body:
            self.ds.on_message_begin()

    def on_url(self, url: bytes) -> None:
        if not self.in_body:
            self.ds.on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.in_body:
            self.ds.on_header(name, value)

    def on_headers_complete(self) -> None:
        if not self.in_body:
            self.ds.on_headers_complete()

    def on_body(self, chunk: bytes) -> None:
        self.ds.on_body(chunk)

    def on_message_complete(self) -> None:
        if self.in_body:
            self.in_body = False
            req = self.ds.req
            if req is not None:
                req.upgrade_body = False
        self.ds.on_message_complete()


# A connection closed while its client may still be sending (an answer given before the
# request was read in full) closes in stages, as RFC 9112 §9.6 asks: the answer, a half-close,
# then what still arrives is read and dropped until the client closes too, or for at most
# LINGER_TIME seconds, LINGER_TIMEOUT seconds without a byte, or LINGER_BYTES bytes; only then
# the close. Closing with unread bytes would send a reset, which can destroy the answer in the
# client's receive buffer before it is read. (nginx's lingering_time and lingering_timeout.)
LINGER_TIME: Final = 30.0
LINGER_TIMEOUT: Final = 5.0
LINGER_BYTES: Final = 64 * 1024 * 1024
# A connection refused over max_connections lingers for less: it holds no request of value.
REFUSED_LINGER: Final = 1.0


# The preface an HTTP/2 client with prior knowledge starts with (RFC 9113 §3.4).
H2_PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


# Not an asyncio.Protocol subclass, for the same reason as UpstreamConnection.
class ClientConnection(Downstream):
    def __init__(self, pipeline: Pipeline, tls: bool = False,
                 proxy: ListenerPolicy | None = None, client_certs: bool = False,
                 http2: bool = False) -> None:
        self.p = pipeline
        # HTTP/2: by ALPN on TLS, by its preface (prior knowledge) on cleartext; looked for
        # in the first read only.
        self.http2 = http2
        self.h2_watch = http2 and not tls
        self.limits = pipeline.limits
        self.proxy = proxy  # the listener reads a PROXY protocol header first
        self.client_certs = client_certs  # tell upstreams who a client certificate named
        self.cert_fields = b""  # ... in these lines
        # The client's address when a PROXY header read before TLS gave it (TLSGate).
        self.client_address: str | None = None
        self.scheme = b"https" if tls else b"http"  # of the listener: X-Forwarded-Proto
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.client_ip = b""
        self.tls_version = ""
        self.trusted_peer = False
        self.forwarded_memo: tuple[bytes | None, bytes] | None = None  # (Host, X-Forwarded-*)
        self.host_memo: tuple[bytes | None, bytes | None] | None = None  # (Host, for matching)
        self.req: Request | None = None  # the request being parsed
        self.active: Request | None = None  # the request being answered
        self.queue: deque[Request] = deque()
        self.deadline = 0.0
        self.closed = False
        self.write_paused = False
        self.requests = 0
        self.close_after = False  # a later request was malformed: close once this one is out
        self.tunnel: Tunnel | None = None  # a WebSocket relay owns the connection
        self.ws_early: list[bytes] | None = None  # set while an upgrade awaits the upstream
        self.parsing = False  # inside data_received: upstream writes wait for its final flush
        self.reading_body = False  # a request body is arriving: the deadline is body_timeout
        self.send_watch: SendWatch | None = None
        self.read: bytes | None = None  # the read being parsed
        self.lingering = False  # closed in stages: reading and dropping until the client closes
        self.linger_left = 0  # bytes the lingering close still reads
        self.linger_end = 0.0
        self._paused = 0
        self._out: list[Piece] = []
        self.chunked = False  # the response being written has a chunked body
        self._advancing = False

    # -- connection lifecycle ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        peer = transport.get_extra_info("peername")
        ip = peer[0] if peer else "127.0.0.1"
        if self.client_address is not None:
            ip = self.client_address
        self.client_ip = ip.encode()
        self.trusted_peer = ip in self.limits.trusted
        if self.scheme == b"https":  # once per connection: the handshake is done by now
            ssl_object = transport.get_extra_info("ssl_object")
            if ssl_object is not None:
                self.tls_version = ssl_object.version() or ""
        p = self.p
        if self.client_certs:
            self.cert_fields = client_cert_fields(transport.get_extra_info("ssl_object"))
        if self.proxy is not None:
            # The header comes first: read by a stand-in for the parser (no cost to others).
            self.parser = HeaderReader(self, ip in self.proxy.trusted)  # type: ignore[assignment]
        if len(p.connections) >= self.limits.max_connections:
            self._refuse()
            return
        p.connections.add(self)
        p.deadlines.add(self)
        # Armed from a fresh clock, as on every read (timers.Deadlines): the sweep's last
        # reading may be a tick old, and the deadline would fire that much early.
        p.deadlines.now = monotonic()
        self.deadline = p.deadlines.now + self.limits.header_timeout
        if self.http2 and self.scheme == b"https":
            ssl_object = transport.get_extra_info("ssl_object")
            if ssl_object is not None and ssl_object.selected_alpn_protocol() == "h2":
                Http2Connection.take_over(self, b"")

    def set_client_address(self, address: str) -> None:
        """The client's address as a PROXY protocol header gave it."""
        self.client_ip = address.encode()
        self.trusted_peer = address in self.limits.trusted

    def refuse_proxy_header(self, reason: str) -> None:
        """A missing, malformed or unwelcome PROXY protocol header: the connection is closed
        without an answer (its peer is a balancer out of step, or a client forging one)."""
        refused(self.p.metrics, self.client_ip.decode(), reason)
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def _refuse(self) -> None:
        """Over max_connections: a 503 and a close, so the connections already open keep
        their share of the worker. The refused one never counts as open."""
        p, transport = self.p, self.transport
        assert transport is not None
        p.metrics.client_limits.inc(("max_connections",))
        transport.write(error_response(503, "too many connections", p.ids.next(),
                                       close=True, extra=b"Retry-After: 1\r\n"))
        p.deadlines.add(self)
        self._linger(transport, REFUSED_LINGER)

    def eof_received(self) -> bool:
        """The client half-closed: the transport closes (asyncio.Protocol's default, written
        out because this class does not inherit it); what is in flight ends in connection_lost."""
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.tunnel is not None:
            self.tunnel.lost()
        self.p.connections.discard(self)
        self.p.deadlines.discard(self)
        if self.send_watch is not None:
            self.p.deadlines.discard(self.send_watch)
        # The request being answered ends as 499 ("client closed request", as nginx logs it);
        # those queued behind it were never dispatched.
        active = self.active
        if active is not None and active.exchange is not None:
            active.exchange.client_gone()
        self.queue.clear()

    def on_deadline(self) -> None:
        if self.lingering:
            if self.transport is not None:
                self.transport.close()
            return
        if self.tunnel is not None:
            self.tunnel.idle()
            return
        if self.reading_body:
            if not self._paused:  # a paused read is proxyd waiting, not the client; resuming
                self._body_timed_out()  # re-arms the deadline
            return
        if self.active is None and self.transport is not None:
            if self.req is not None:
                # A header section begun and not finished in time (slowloris, or a client
                # that stalled): answered 408, logged and counted, then closed.
                self._reject(Reject(408, "request header timeout"))
            else:
                self.transport.close()  # idle keep-alive (or nothing ever sent): no one waits

    def _body_timed_out(self) -> None:
        """body_timeout: the client stopped sending the body it announced."""
        self.p.metrics.client_limits.inc(("body_timeout",))
        self.reading_body = False
        req = self.req
        if req is None or req is not self.active or req.discard:
            self.close()  # answered already (its body was being dropped), or nobody waits
            return
        ex = req.exchange
        if ex is None:
            self.close()  # (a dispatched request has its exchange until it ends)
            return
        # The upstream has part of a body: that exchange cannot finish. A 408, and the close
        # (the body is unfinished); or a response cut short, which the client must see
        # truncated.
        ex.fail(408, "request body timeout")

    def send_timed_out(self) -> None:
        """send_timeout: the client has read nothing for that long; its upstream connection
        (paused while the client's buffer is full) goes with it."""
        if self.send_watch is not None:
            self.p.deadlines.discard(self.send_watch)
        self.p.metrics.client_limits.inc(("send_timeout",))
        self.closed = True
        if self.transport is not None:
            self.transport.abort()  # close() would wait for the buffer to drain: forever

    # -- writing ----------------------------------------------------------------------------
    # What an exchange sends: a response's parts. How they go on the wire (the status line,
    # the framing of a body, Connection) is this connection's: HTTP/1.1 here.
    def send_answer(self, data: bytes) -> None:
        """A whole response proxyd rendered (a local answer, an error, a 101)."""
        self._out.append(data)

    def send_continue(self) -> None:
        self._out.append(b"HTTP/1.1 100 Continue\r\n\r\n")

    def send_interim(self, status: int, reason: bytes, fields: bytes) -> None:
        """A 1xx other than 100 (103 Early Hints): only an HTTP/1.1 client takes one."""
        self._out.append(response_head(status, reason, fields, b""))

    def frames_any_length(self, req: Request) -> bool:
        """Whether a body of unknown length can be framed for this client: chunked, for
        HTTP/1.1; for HTTP/1.0 the end of the connection ends the body."""
        return req.http11

    def send_head(self, req: Request, status: int, reason: bytes, fields: bytes,
                  length_known: bool, close: bool) -> None:
        """The final response head: ``fields`` rendered, then the framing of its body (chunked
        when its length is not known) and Connection as the exchange decided."""
        http11 = req.http11
        chunked = self.chunked = not length_known and http11
        self._out.append(response_head(status, reason, fields, framing(chunked, close, http11)))

    def send_body(self, data: bytes) -> None:
        """A piece of the response body, framed as its head said."""
        if self.chunked:
            self._out.append(b"%x\r\n%b\r\n" % (len(data), data))
        else:
            self._out.append(data)

    def send_raw(self, data: Piece) -> None:
        """A piece of a body whose length the head gave (never chunked), as it was read."""
        self._out.append(data)

    def end_body(self) -> None:
        """The response body is complete."""
        if self.chunked:
            self.chunked = False
            self._out.append(b"0\r\n\r\n")

    def flush(self) -> None:
        out = self._out
        if out and self.transport is not None and not self.closed:
            write_pieces(self.transport, out)
        out.clear()

    def close(self) -> None:
        """Close once what is queued is written; in stages if the client may still be
        sending (a request begun and not read to its end: see LINGER_TIME)."""
        self.flush()
        transport = self.transport
        if self.lingering or transport is None:
            self.closed = True
            return
        if self.req is not None and not self.closed and not transport.is_closing():
            self._linger(transport, LINGER_TIME)
            return
        self.closed = True
        transport.close()

    def _linger(self, transport: asyncio.Transport, limit: float) -> None:
        self.closed = True  # nothing more is parsed, answered or written
        self.lingering = True
        # (The parser may be inside feed_data: its callbacks for the rest of this read run as
        # before, on a closed connection; later reads never reach a parser.)
        self.parser = _Discard()  # type: ignore[assignment]
        if transport.can_write_eof():
            transport.write_eof()  # after what is queued: the client reads the answer, then EOF
        # (TLS cannot half-close: the answer's framing tells the client it is complete.)
        self._paused = 0
        transport.resume_reading()
        now = self.p.deadlines.now
        self.linger_left = LINGER_BYTES
        self.linger_end = now + limit
        self.deadline = min(now + LINGER_TIMEOUT, self.linger_end)

    def _lingered(self, n: int) -> None:
        """Bytes that arrived during a lingering close: dropped."""
        self.linger_left -= n
        if self.linger_left <= 0:
            if self.transport is not None:
                self.transport.close()
            return
        self.deadline = min(self.p.deadlines.now + LINGER_TIMEOUT, self.linger_end)

    def pause_writing(self) -> None:
        self.write_paused = True
        p = self.p
        if self.limits.send_timeout:
            watch = self.send_watch
            if watch is None:
                watch = self.send_watch = SendWatch(self)
            watch.arm(self.transport, p.deadlines.now, self.limits.send_timeout)
            p.deadlines.add(watch)
        if self.tunnel is not None:
            self.tunnel.conn.pause_reading()
            return
        ex = self.active.exchange if self.active is not None else None
        if ex is not None:
            ex.pause_upstream()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.send_watch is not None:
            self.p.deadlines.discard(self.send_watch)
        if self.tunnel is not None:
            self.tunnel.conn.resume_reading()
            return
        ex = self.active.exchange if self.active is not None else None
        if ex is not None:
            ex.resume_upstream()

    def _pause(self, reason: int) -> None:
        if not self._paused and self.transport is not None:
            self.transport.pause_reading()
        self._paused |= reason

    def _resume(self, reason: int) -> None:
        if self._paused & reason:
            self._paused &= ~reason
            if not self._paused and self.transport is not None and not self.closed:
                self.transport.resume_reading()
                if self.reading_body:  # the client's turn again: body_timeout starts afresh
                    self.deadline = self.p.deadlines.now + self.limits.body_timeout

    def pause_reading_for_upstream(self) -> None:
        self._pause(PAUSE_UPSTREAM)

    def resume_reading_for_upstream(self) -> None:
        self._resume(PAUSE_UPSTREAM)

    def pause_reading_for_pending(self) -> None:
        self._pause(PAUSE_PENDING)

    def resume_reading_for_pending(self) -> None:
        self._resume(PAUSE_PENDING)

    # -- exchanges --------------------------------------------------------------------------
    def _advance(self) -> None:
        """Start queued requests, in order, while nothing is in flight."""
        if self._advancing:
            return  # called from inside a dispatch; the outer loop continues
        self._advancing = True
        p = self.p
        try:
            while self.active is None and self.queue and not self.closed:
                req = self.active = self.queue.popleft()
                self.requests += 1
                p.requests += 1
                Exchange(self, req).dispatch()
        finally:
            self._advancing = False
        if not self.queue:
            self._resume(PAUSE_PIPELINE)
        if self.active is None and not self.closed:
            if self.req is None:
                if p.draining:
                    self.close()  # idle between requests: the only state a drain closes
                else:
                    self.deadline = p.deadlines.now + self.limits.keepalive_timeout
            elif not self.reading_body:
                # The next request's head began while this one was in flight (pipelined) and
                # is still unfinished: it gets the header timeout, or it could idle forever.
                self.deadline = p.deadlines.now + self.limits.header_timeout

    def exchange_ended(self, ex: Exchange) -> None:
        """An exchange is over (exchange.Exchange._end): recorded once, then the connection
        closes (as the exchange decided), goes on to the next request, or reads and drops
        the rest of this one's body first."""
        req = ex.req
        self.p.observe(req, self.client_ip, ex, self.tls_version)
        req.exchange = None  # the Request <-> Exchange cycle: freed by refcount, not the GC
        if self.active is not req:
            return  # the connection is gone, or has moved on (a refusal)
        self._resume(PAUSE_PENDING)  # a body held for the upstream is not wanted any more
        if ex.close_client or self.close_after:
            self.active = None
            self.close()
        elif req.body_done:
            self.active = None
            self._advance()
        else:
            req.discard = True  # on_message_complete releases the connection
            req.pending.clear()
        if not self.parsing:
            self.flush()  # (else data_received flushes once the whole read is parsed)

    def start_tunnel(self, conn: UpstreamConnection, settings: WebSocket, ex: Exchange,
                     rest: bytes) -> None:
        """The upstream accepted the upgrade: this connection is a WebSocket relay now."""
        tunnel = Tunnel(self, conn, self.p, settings)
        conn.become_tunnel(tunnel)  # relays are long-lived: they leave the pool's count
        self.p.observe(ex.req, self.client_ip, ex, self.tls_version)
        ex.req.exchange = None
        self.active = None
        self.queue.clear()
        self.tunnel = tunnel
        tunnel.touch()
        early, self.ws_early = self.ws_early or [], []
        for data in early:
            tunnel.from_client(data)
        self._paused = 0
        if self.transport is not None:
            self.transport.resume_reading()
        if rest:
            tunnel.from_upstream(rest)

    def _reject(self, refusal: Reject) -> None:
        """A request that cannot be parsed safely: answer (in turn) and close."""
        active = self.active
        if active is not None and active is self.req:
            # The request in flight is the bad one (its body went over the limit).
            self.queue.clear()
            ex = active.exchange
            if ex is None:  # answered already; its body was being dropped
                self.active = None
                self.close()
                return
            self.p.metrics.client_limits.inc((refusal.reason,))
            # The answer and the close; or, once the client has part of the response, a
            # response cut short, which the client must see truncated.
            ex.fail(refusal.status, refusal.message)
            return
        self.queue.clear()
        if self.active is not None:
            # An earlier response is still streaming: let it finish, then close unanswered.
            self._pause(PAUSE_PIPELINE)
            self.close_after = True
            return
        req = self.req or Request()
        status = refusal.status
        data = error_response(status, refusal.message, req_id(req, self.p), close=True)
        self.send_answer(data)
        # Refused by the parser or a limit, dispatched or not: logged and counted like every
        # answered request (route "none" when it never reached one), and the reason counted.
        self.p.metrics.client_limits.inc((refusal.reason,))
        if not req.started:
            req.started = self.p.deadlines.now
        req.status = status
        req.bytes_out = body_length(data)
        self.p.observe(req, self.client_ip, None, self.tls_version)
        self.close()

    # -- parsing ----------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        # The time deadlines are armed from: fresh for every read, so that none of them is
        # computed from a stale clock and fires early (timers.Deadlines).
        p = self.p
        p.deadlines.now = monotonic()
        if self.closed:
            if self.lingering:
                self._lingered(len(data))
            return
        if self.h2_watch and self._prior_knowledge(data):
            return
        if self.ws_early is not None:
            # A WebSocket relay: bytes pass through once the upstream said 101, wait until then.
            if self.tunnel is not None:
                self.tunnel.from_client(data)
            else:
                self.ws_early.append(data)
                self._pause(PAUSE_PENDING)  # one read held at most; start_tunnel resumes
            return
        before = self.req
        self.parsing = True
        self.read = data  # for on_headers_complete's look at the request line (rarely needed)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            rest = data[exc.args[0]:] if exc.args else b""
            active = self.active
            req = self.req
            if req is not None and req.upgrade_body:
                # Not upgraded, and its body follows: read as HTTP (see UpgradeBody).
                self.parser = httptools.HttpRequestParser(UpgradeBody(self))
                self.parser.feed_data(UpgradeBody.framing(req))
                self.parsing = False
                self.data_received(rest)
                return
            if active is not None and active.ws_upstream_key is not None:
                self.ws_early = [rest] if rest else []  # frames sent ahead of our 101
            else:
                # Upgrade asked on a plain route: the request was handled as ordinary HTTP and
                # the connection stays HTTP, so parse what follows with a fresh parser.
                self.parser = httptools.HttpRequestParser(self)
                if rest:
                    self.parsing = False
                    self.data_received(rest)
                    return
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, Reject):
                self._reject(cause)
            else:
                raise
        except httptools.HttpParserError as exc:
            self._reject(Reject(400, f"malformed request: {exc}"))
        else:
            req = self.req
            if req is not None and not req.method and (req is before or before is None):
                # All of this read is part of an unfinished header section. httptools buffers a
                # field until its line ends, so on_header alone would let one endless line grow
                # without bound; this caps the buffering at the limits plus one read.
                req.head_bytes += len(data)
                if req.head_bytes > self.limits.max_head_bytes:
                    self._reject(Reject(431, "request header section too large"))
        self.parsing = False
        self.read = None  # not kept: an idle connection would hold its last read
        self.flush()
        ex = self.active.exchange if self.active is not None else None
        if ex is not None:
            ex.flush_upstream()

    def _prior_knowledge(self, data: bytes) -> bool:
        """On the first read of a cleartext connection: the HTTP/2 preface hands it over."""
        head = (self.read or b"") + data
        if H2_PREFACE.startswith(head[:len(H2_PREFACE)]):
            if len(head) < len(H2_PREFACE):
                self.read = head  # a preface split across reads: wait for the rest
                return True
            self.h2_watch = False
            self.read = None
            Http2Connection.take_over(self, head)
            return True
        self.h2_watch = False
        if self.read is not None:  # a split start that was not the preface after all
            self.read = None
            self.data_received(head)
            return True
        return False

    def on_message_begin(self) -> None:
        self.req = Request()
        if self.active is None:
            self.deadline = self.p.deadlines.now + self.limits.header_timeout

    def on_url(self, url: bytes) -> None:
        req = self.req
        assert req is not None
        req.url += url
        if len(req.url) > self.limits.max_uri_size:
            raise Reject(414, "request URI too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        req = self.req
        assert req is not None
        req.header_bytes += len(name) + len(value) + 4
        if req.header_bytes > self.limits.max_header_size:
            raise Reject(431, "request header section too large")
        if len(req.headers) >= self.limits.max_headers:
            raise Reject(431, "too many request header fields")
        lname = REQUEST_NAMES.get(name)
        if lname is None:
            # A name not in the table; and never one with an underscore (lower_name keeps
            # those out of it), so the check costs nothing on the common path.
            lname = lower_name(name, REQUEST_NAMES)
            if lname.find(b"_") >= 0 and self._underscore_dropped():
                return
        req.headers.append((lname, name, value))
        if lname in SPECIAL:
            special_header(req, lname, value)

    def _underscore_dropped(self) -> bool:
        """server.headers_with_underscores: some servers read X_Forwarded_For as the dashed
        name, so a client could pass one past a proxy that sets or strips the dashed one."""
        policy = self.limits.underscores
        if policy == "allow":
            return False
        if policy == "reject":
            raise Reject(400, "underscore in a header field name", "underscore_header")
        return True

    def on_headers_complete(self) -> None:
        req = self.req
        assert req is not None
        parser = self.parser
        keep_alive = parser.should_keep_alive()
        if keep_alive and req.conn_tokens is None:
            # With neither Connection nor Proxy-Connection, llhttp keeps only HTTP/1.1 alive
            # (it accepts 0.9, 1.0, 1.1 and 2.0): the version without get_http_version(),
            # which formats a string — the costliest line of a request head.
            req.http11 = True
        else:
            version = parser.get_http_version()
            if version not in ("1.1", "1.0"):
                raise Reject(400, f"unsupported HTTP version {version}", "bad_version")
            req.http11 = version == "1.1"
        req.method = method = parser.get_method()
        req.keep_alive = keep_alive
        read = self.read
        if read is not None and (method == b"SOURCE" or read.find(b" RTSP/") >= 0) \
                and foreign_protocol(read, req):
            raise Reject(400, "not an HTTP request (protocol is not HTTP)", "bad_version")
        if req.http11 and req.host is None:
            raise Reject(400, "missing Host header")
        if req.chunked and not req.http11:
            # RFC 9112 §6.1: Transfer-Encoding in an HTTP/1.0 message is faulty framing (an
            # HTTP/1.0 hop behind proxyd could read the body by other rules).
            raise Reject(400, "Transfer-Encoding in an HTTP/1.0 request")
        if not req.url.startswith(b"/") and not (req.url == b"*" and method == b"OPTIONS"):
            absolute_form(req)
        if req.content_length is not None and req.content_length > self.limits.max_body_size:
            raise Reject(413, "request body too large")
        req.body_limit = self.limits.max_body_size
        req.has_body = req.chunked or bool(req.content_length)
        req.body_done = not req.has_body
        if req.has_body and req.upgrade is not None and parser.should_upgrade():
            req.upgrade_body = True  # never upgraded; the body is read as HTTP (UpgradeBody)
        if req.has_body:
            self.reading_body = True
            self.deadline = self.p.deadlines.now + self.limits.body_timeout
        else:
            self.deadline = 0.0
        self.queue.append(req)
        if self.active is None:
            self._advance()
        else:
            self._pause(PAUSE_PIPELINE)

    def on_body(self, chunk: bytes) -> None:
        req = self.req
        assert req is not None
        req.body_size += len(chunk)
        if req.body_size > req.body_limit:
            raise Reject(413, "request body too large")
        self.deadline = self.p.deadlines.now + self.limits.body_timeout
        if req.discard:
            return
        ex = req.exchange
        if ex is not None:
            ex.body(chunk)
        else:
            req.pending.append(chunk)  # queued behind the request in flight

    def on_message_complete(self) -> None:
        req = self.req
        assert req is not None
        if req.upgrade_body:
            return  # llhttp skipped the body; UpgradeBody reads it and ends the message
        self.req = None
        req.body_done = True
        if self.reading_body:
            self.reading_body = False
            self.deadline = 0.0
        if req.exchange is not None:
            req.exchange.body_end()
        elif req.discard and self.active is req:
            self.active = None
            self._advance()
