"""The client side: one asyncio.Protocol per accepted connection, llhttp (httptools) parsing.

Requests on a connection are answered strictly in order. A pipelined request that arrives while
another is in flight is queued with its body (reading pauses, so the queue is bounded by one
read); the framing rules of DESIGN §6 are enforced here, before anything reaches an upstream.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import cast

import httptools

from proxyd.proxy.forward import Exchange
from proxyd.proxy.headers import (
    CRLF,
    REQUEST_DROP,
    connection_tokens,
    error_response,
    forwarded_fields,
)
from proxyd.proxy.pipeline import Pipeline
from proxyd.proxy.router import normalize_host, remove_dot_segments

# Reasons to stop reading from the client; reading resumes when none is left.
PAUSE_PIPELINE = 1  # a pipelined request waits for the one in flight
PAUSE_UPSTREAM = 2  # the upstream socket's write buffer is full
PAUSE_PENDING = 4  # body bytes piled up while the upstream connection is being opened

_SPECIAL = frozenset({
    b"host", b"content-length", b"transfer-encoding", b"connection", b"expect",
    b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"via", b"x-request-id",
})


class Reject(Exception):
    """Raised inside a parser callback: answer ``status`` and close."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Request:
    __slots__ = (
        "_id",
        "body_done",
        "body_size",
        "chunked",
        "close_requested",
        "conn_tokens",
        "content_length",
        "discard",
        "exchange",
        "expect",
        "has_body",
        "head_bytes",
        "header_bytes",
        "headers",
        "host",
        "http11",
        "inbound_id",
        "keep_alive",
        "method",
        "pending",
        "url",
        "via",
        "xff",
        "xfh",
        "xfp",
    )

    def __init__(self) -> None:
        self.url = b""
        self.method = b""
        self.headers: list[tuple[bytes, bytes, bytes]] = []  # (lowercase name, name, value)
        self.header_bytes = 0
        self.head_bytes = 0  # bytes of reads that held only this unfinished header section
        self.host: bytes | None = None
        self.content_length: int | None = None
        self.chunked = False
        self.has_body = False
        self.body_done = False
        self.body_size = 0
        self.pending: list[bytes] = []
        self.http11 = True
        self.keep_alive = True
        self.close_requested = False
        self.expect: bytes | None = None
        self.conn_tokens: set[bytes] | None = None
        self.xff: bytes | None = None
        self.xfp: bytes | None = None
        self.xfh: bytes | None = None
        self.via: bytes | None = None
        self.inbound_id: bytes | None = None
        self.exchange: Exchange | None = None
        self.discard = False
        self._id: str | None = None


class DownstreamProtocol(asyncio.Protocol):
    def __init__(self, pipeline: Pipeline) -> None:
        self.p = pipeline
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.client_ip = b""
        self.trusted_peer = False
        self.req: Request | None = None  # the request being parsed
        self.active: Request | None = None  # the request being answered
        self.queue: deque[Request] = deque()
        self.deadline = 0.0
        self.closed = False
        self.write_paused = False
        self.requests = 0
        self.close_after = False  # a later request was malformed: close once this one is out
        self.parsing = False  # inside data_received: upstream writes wait for its final flush
        self._paused = 0
        self._out: list[bytes] = []
        self._advancing = False

    # -- connection lifecycle ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        peer = transport.get_extra_info("peername")
        ip = peer[0] if peer else "127.0.0.1"
        self.client_ip = ip.encode()
        self.trusted_peer = ip in self.p.trusted
        self.p.connections.add(self)
        self.p.deadlines.add(self)
        self.deadline = self.p.deadlines.now + self.p.header_timeout

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.p.connections.discard(self)
        self.p.deadlines.discard(self)
        for req in (self.active, *self.queue):
            if req is not None and req.exchange is not None:
                req.exchange.client_gone()
        self.queue.clear()

    def on_deadline(self) -> None:
        # Header timeout or idle keep-alive: either way nobody is waiting for an answer.
        if self.active is None and self.transport is not None:
            self.transport.close()

    # -- writing ----------------------------------------------------------------------------
    def send(self, data: bytes) -> None:
        self._out.append(data)

    def flush(self) -> None:
        out = self._out
        if out and self.transport is not None and not self.closed:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))
        out.clear()

    def close(self) -> None:
        self.flush()
        if self.transport is not None:
            self.transport.close()
        self.closed = True

    def abort(self) -> None:
        """End a response that cannot be completed: the client must see it truncated."""
        self.active = None
        self.close()

    def pause_writing(self) -> None:
        self.write_paused = True
        ex = self.active.exchange if self.active is not None else None
        if ex is not None and ex.conn is not None:
            ex.conn.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        ex = self.active.exchange if self.active is not None else None
        if ex is not None and ex.conn is not None:
            ex.conn.resume_reading()

    def _pause(self, reason: int) -> None:
        if not self._paused and self.transport is not None:
            self.transport.pause_reading()
        self._paused |= reason

    def _resume(self, reason: int) -> None:
        if self._paused & reason:
            self._paused &= ~reason
            if not self._paused and self.transport is not None and not self.closed:
                self.transport.resume_reading()

    def pause_reading_for_upstream(self) -> None:
        self._pause(PAUSE_UPSTREAM)

    def resume_reading_for_upstream(self) -> None:
        self._resume(PAUSE_UPSTREAM)

    def pause_reading_for_pending(self) -> None:
        self._pause(PAUSE_PENDING)

    def resume_reading_for_pending(self) -> None:
        self._resume(PAUSE_PENDING)

    # -- parsing ----------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        before = self.req
        self.parsing = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            # Upgrade asked on a plain route: the request was handled as ordinary HTTP and the
            # connection stays HTTP, so parse what follows with a fresh parser.
            self.parser = httptools.HttpRequestParser(self)
            rest = data[exc.args[0]:] if exc.args else b""
            if rest:
                self.data_received(rest)
                return
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, Reject):
                self._reject(cause.status, cause.message)
            else:
                raise
        except httptools.HttpParserError as exc:
            self._reject(400, f"malformed request: {exc}")
        else:
            req = self.req
            if req is not None and not req.method and (req is before or before is None):
                # All of this read is part of an unfinished header section. httptools buffers a
                # field until its line ends, so on_header alone would let one endless line grow
                # without bound; this caps the buffering at the limits plus one read.
                req.head_bytes += len(data)
                if req.head_bytes > self.p.max_head_bytes:
                    self._reject(431, "request header section too large")
        self.parsing = False
        self.flush()
        ex = self.active.exchange if self.active is not None else None
        if ex is not None and ex.conn is not None:
            ex.conn.flush()

    def on_message_begin(self) -> None:
        self.req = Request()
        if self.active is None:
            self.deadline = self.p.deadlines.now + self.p.header_timeout

    def on_url(self, url: bytes) -> None:
        req = self.req
        assert req is not None
        req.url += url
        if len(req.url) > self.p.max_uri_size:
            raise Reject(414, "request URI too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        req = self.req
        assert req is not None
        req.header_bytes += len(name) + len(value) + 4
        if req.header_bytes > self.p.max_header_size:
            raise Reject(431, "request header section too large")
        if len(req.headers) >= self.p.max_headers:
            raise Reject(431, "too many request header fields")
        lname = name.lower()
        req.headers.append((lname, name, value))
        if lname in _SPECIAL:
            self._special_header(req, lname, value)

    @staticmethod
    def _special_header(req: Request, lname: bytes, value: bytes) -> None:
        if lname == b"host":
            if req.host is not None:
                raise Reject(400, "duplicate Host header")
            req.host = value
        elif lname == b"content-length":
            req.content_length = int(value)  # llhttp refused non-digits and duplicates
        elif lname == b"transfer-encoding":
            # llhttp accepts "gzip, chunked"; proxyd forwards only plain chunked bodies.
            if req.chunked or value.strip().lower() != b"chunked":
                raise Reject(400, "unsupported Transfer-Encoding")
            req.chunked = True
        elif lname == b"connection":
            tokens = connection_tokens(value)
            req.conn_tokens = (req.conn_tokens or set()) | tokens
            if b"close" in tokens:
                req.close_requested = True
        elif lname == b"expect":
            req.expect = value.strip().lower()
        elif lname == b"x-forwarded-for":
            req.xff = req.xff + b", " + value if req.xff else value
        elif lname == b"x-forwarded-proto":
            req.xfp = value
        elif lname == b"x-forwarded-host":
            req.xfh = value
        elif lname == b"via":
            req.via = req.via + b", " + value if req.via else value
        elif lname == b"x-request-id":
            req.inbound_id = value

    def on_headers_complete(self) -> None:
        req = self.req
        assert req is not None
        parser = self.parser
        version = parser.get_http_version()
        if version not in ("1.1", "1.0"):
            raise Reject(400, f"unsupported HTTP version {version}")
        req.method = parser.get_method()
        req.http11 = version == "1.1"
        req.keep_alive = parser.should_keep_alive()
        if req.http11 and req.host is None:
            raise Reject(400, "missing Host header")
        if not req.url.startswith(b"/") and not (req.url == b"*" and req.method == b"OPTIONS"):
            raise Reject(400, "request target must be origin-form (this is not a forward proxy)")
        if req.content_length is not None and req.content_length > self.p.max_body_size:
            raise Reject(413, "request body too large")
        req.has_body = req.chunked or bool(req.content_length)
        req.body_done = not req.has_body
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
        if req.body_size > self.p.max_body_size:
            raise Reject(413, "request body too large")
        if req.discard:
            return
        if req.exchange is not None:
            req.exchange.body(chunk)
        else:
            req.pending.append(chunk)

    def on_message_complete(self) -> None:
        req = self.req
        assert req is not None
        self.req = None
        req.body_done = True
        if req.exchange is not None:
            req.exchange.body_end()
        elif req.discard and self.active is req:
            self.active = None
            self._advance()

    # -- answering --------------------------------------------------------------------------
    def _advance(self) -> None:
        """Start queued requests, in order, while nothing is in flight."""
        if self._advancing:
            return  # called from inside a dispatch; the outer loop continues
        self._advancing = True
        try:
            while self.active is None and self.queue and not self.closed:
                self._dispatch(self.queue.popleft())
        finally:
            self._advancing = False
        if not self.queue:
            self._resume(PAUSE_PIPELINE)
        if self.active is None and not self.closed:
            if self.p.draining:
                self.close()
            elif self.req is None:
                self.deadline = self.p.deadlines.now + self.p.keepalive_timeout
            else:
                # The next request's head began while this one was in flight (pipelined) and
                # is still unfinished: it gets the header timeout, or it could idle forever.
                self.deadline = self.p.deadlines.now + self.p.header_timeout

    def must_close(self, req: Request) -> bool:
        return not req.keep_alive or req.close_requested or self.p.draining or self.close_after

    def request_id(self, req: Request) -> str:
        if req._id is None:
            inbound = req.inbound_id
            if inbound and len(inbound) <= 200 and inbound.isascii():
                req._id = inbound.decode()
            else:
                req._id = self.p.next_request_id()
        return req._id

    def _dispatch(self, req: Request) -> None:
        self.active = req
        self.requests += 1
        self.p.requests += 1
        raw_path, _, query = req.url.partition(b"?")
        path = remove_dot_segments(raw_path) if b"/." in raw_path else raw_path
        if path.startswith(b"/health") and (builtin := self.p.builtin(path)) is not None:
            close = self.must_close(req)
            self.send(builtin.render(close=close, head_only=req.method == b"HEAD"))
            self._local_done(req, close)
            return
        hdrs = {k: v for k, _, v in req.headers} if self.p.router.needs_headers else {}
        route, wrong_method = self.p.router.match(
            req.method, normalize_host(req.host), path, hdrs
        )
        if route is None:
            if wrong_method is not None:
                self.send_error(req, 405, "method not allowed", extra=wrong_method.allow_header)
            else:
                self.send_error(req, 404, "no route")
            return
        if req.expect is not None and req.expect != b"100-continue":
            self.send_error(req, 417, "unsupported expectation")
            return
        if route.respond is not None:
            close = self.must_close(req) or (req.expect is not None and not req.body_done)
            self.send(route.respond.render(close=close, head_only=req.method == b"HEAD"))
            self._local_done(req, close)
            return
        pool = self.p.pools[route.upstream]  # type: ignore[index]
        if req.expect is not None and req.http11 and not req.body_done:
            self.send(b"HTTP/1.1 100 Continue\r\n\r\n")
        target = route.rewrite_path(path) if route.strip_prefix or route.rewrite else path
        if query or req.url.endswith(b"?"):
            target += b"?" + query
        drop = REQUEST_DROP | req.conn_tokens if req.conn_tokens else REQUEST_DROP
        parts = [req.method, b" ", target, b" HTTP/1.1\r\n"]
        for lname, name, value in req.headers:
            if lname not in drop and lname != b"host":
                parts += (name, b": ", value, CRLF)
        parts.append(forwarded_fields(
            self.client_ip, self.trusted_peer, req.xff, req.xfp, req.xfh, req.host, req.via
        ))
        if req.chunked:
            parts.append(b"Transfer-Encoding: chunked\r\n")
        elif req.content_length is not None:
            parts.append(b"Content-Length: %d\r\n" % req.content_length)
        host_line = b"Host: " + req.host + CRLF if pool.preserve_host and req.host else None
        Exchange(self, req, pool).start(b"".join(parts), host_line)

    def _local_done(self, req: Request, close: bool) -> None:
        """A response proxyd wrote itself is out; the request body, if any, is dropped."""
        if close:
            self.close()
            return
        if req.body_done:
            self.active = None
        else:
            req.discard = True  # on_message_complete releases the connection
            req.pending.clear()

    def send_error(self, req: Request, status: int, message: str, extra: bytes = b"") -> None:
        # A body still on the wire after an error answer: close rather than read it all.
        close = self.must_close(req) or not req.body_done
        self.send(error_response(
            status, message, self.request_id(req), close=close,
            head_only=req.method == b"HEAD", extra=extra,
        ))
        self._local_done(req, close)
        if self.active is None and not close:
            self._advance()
        self.flush()

    def exchange_done(self, exchange: Exchange, *, close: bool) -> None:
        self.active = None
        if close or self.close_after:
            self.close()
        else:
            self._advance()

    def _reject(self, status: int, message: str) -> None:
        """A request that cannot be parsed safely: answer (in turn) and close."""
        active = self.active
        if active is not None and active is self.req:
            # The request in flight is the bad one (its body went over the limit).
            ex = active.exchange
            if active.discard or (ex is not None and ex.resp_started):
                if ex is not None:
                    ex.client_gone()
                self.abort()
                return
            if ex is not None:
                ex.client_gone()
            self.active = None
        self.queue.clear()
        if self.active is not None:
            # An earlier response is still streaming: let it finish, then close unanswered.
            self._pause(PAUSE_PIPELINE)
            self.close_after = True
            return
        req = self.req or Request()
        self.send(error_response(status, message, self.request_id(req), close=True))
        self.close()
