"""One proxied exchange: a client request relayed to an upstream and its response relayed back.

The exchange is the response parser's protocol object, so llhttp calls straight into it. Both
bodies stream chunk by chunk; back-pressure runs both ways through pause/resume_reading. Every
message is re-framed by proxyd: Content-Length passes through, chunked is re-chunked, and a
close-delimited upstream body becomes chunked for HTTP/1.1 clients.
"""

from __future__ import annotations

from time import monotonic
from typing import TYPE_CHECKING

import httptools

from proxyd.middleware.base import BodyFilter, Response
from proxyd.proxy.headers import CRLF, HOP_BY_HOP, RESPONSE_DROP, status_line
from proxyd.proxy.websocket import Tunnel, accept_key

if TYPE_CHECKING:
    from proxyd.proxy.downstream import DownstreamProtocol, Request
    from proxyd.proxy.upstream import TargetPool, Timeouts, UpstreamConnection, UpstreamPool

NO_BODY_STATUSES = frozenset({204, 304})
PENDING_BODY_LIMIT = 256 * 1024  # buffered before the upstream connects; then reading pauses


class Abandoned(Exception):
    """Raised from a response-parser callback: this try's response is dropped (a retry on
    another target has begun); the parser stops at once."""


class Exchange:
    __slots__ = (
        "admitted",
        "buffer",
        "bytes_out",
        "client_chunked",
        "close_client",
        "conn",
        "deadline",
        "done",
        "drop",
        "ds",
        "filters",
        "head",
        "host_line",
        "interim_sent",
        "key",
        "parser",
        "pool",
        "read_to_close",
        "req",
        "resp",
        "resp_headers",
        "resp_reason",
        "resp_started",
        "resp_status",
        "sent_body",
        "started_at",
        "target",
        "timed",
        "timeouts",
        "total_deadline",
        "tries",
        "try_deadline",
        "upgrade_headers",
    )

    def __init__(self, ds: DownstreamProtocol, req: Request, pool: UpstreamPool) -> None:
        self.ds = ds
        self.req = req
        self.pool = pool
        self.target: TargetPool | None = None
        self.conn: UpstreamConnection | None = None
        self.parser: httptools.HttpResponseParser | None = None
        self.head = b""
        self.host_line: bytes | None = None
        self.done = False
        self.tries = 0
        self.close_client = False
        self.resp_started = False
        self.resp_status = 0
        self.resp_reason = b""
        self.resp_headers: list[tuple[bytes, bytes]] = []
        self.client_chunked = False
        self.read_to_close = False
        self.resp: Response | None = None  # the head middleware work on
        self.buffer: list[bytes] | None = None  # body held for a buffering middleware
        self.filters: list[BodyFilter] = []
        self.drop = False  # read the upstream body but do not send it
        self.bytes_out = 0
        self.started_at = 0.0
        self.upgrade_headers: list[tuple[bytes, bytes]] | None = None
        self.timeouts: Timeouts = pool.timeouts
        self.admitted = False  # holds one of the upstream's max_concurrent slots
        self.timed = False  # a member of the worker's deadlines (per-try or total timeout)
        # deadline, try_deadline, total_deadline: set by start() when timed, read only then
        self.key = b""  # hash balancing
        self.sent_body: list[bytes] | None = None  # body chunks kept for a replay
        self.interim_sent = False  # a 1xx went to the client: no retry after that

    # -- request side ---------------------------------------------------------------------
    def start(self, head_without_host: bytes, host_line: bytes | None) -> None:
        """``host_line`` None means: send the target's own host (preserve_host: false)."""
        self.head = head_without_host
        self.host_line = host_line
        req = self.req
        req.exchange = self
        self.started_at = monotonic()
        pool = self.pool
        route = req.route
        if route is not None and route.timeouts is not None:
            self.timeouts = route.timeouts
        t = self.timeouts
        if t.timed:
            self.deadline = self.total_deadline = (
                pool.deadlines.now + t.total if t.total else 0.0)
            self.try_deadline = 0.0
            self.timed = True
            pool.deadlines.add(self)
        if pool.guarded:
            if not pool.admit(self):
                return  # refused, or queued until begin()
            self.admitted = True
        self.begin()

    def begin(self) -> None:
        """The first try: at once, or when the upstream's queue lets it through."""
        pool, req = self.pool, self.req
        pool.budget.requests += 1
        if pool.ring is not None:
            self.key = pool.hash_key(self.ds.client_ip, req.headers)
        if req.has_body and pool.max_body and req.method in pool.retry_methods \
                and (req.content_length or 0) <= pool.max_body:
            self.sent_body = []  # small enough to replay: keep what is sent
        target = pool.pick(self.key)
        if target is None:
            self.refuse("unavailable", "no healthy upstream target")
            return
        self.tries = 1
        self.target = target
        if self.timeouts.per_try:
            self._per_try()
        target.acquire(self)

    def _try(self, target: TargetPool) -> None:
        self.tries += 1
        self.target = target
        if self.timeouts.per_try:
            self._per_try()
        target.acquire(self)

    def _per_try(self) -> None:
        self.try_deadline = self.pool.deadlines.now + self.timeouts.per_try
        total = self.total_deadline
        self.deadline = min(self.try_deadline, total) if total else self.try_deadline

    def waiting_for(self, target: TargetPool) -> bool:
        """Still waiting for a connection from ``target`` (not gone, timed out, or moved)."""
        return not self.done and self.conn is None and self.target is target

    def attach(self, conn: UpstreamConnection) -> None:
        """Called by the pool with a connection, at once (idle hit) or after connecting."""
        target = conn.pool
        self.conn = conn
        conn.exchange = self
        self.parser = httptools.HttpResponseParser(self)
        conn.deadline = target.deadlines.now + self.timeouts.read
        if self.ds.write_paused:
            conn.pause_reading()  # (which also holds the read timeout)
        host = self.host_line or b"Host: " + target.host_header + CRLF
        conn.send(self.head + host + CRLF)
        req = self.req
        for chunk in req.pending:
            conn.send(self._frame(chunk))
        if self.sent_body is not None:
            self.sent_body += req.pending
        req.pending.clear()
        if req.body_done and req.chunked:
            conn.send(b"0\r\n\r\n")
        if not self.ds.parsing:
            # Else the client's data_received flushes once it has parsed the whole read: the
            # head and the body bytes that came with it leave in one write, and a framing
            # error later in that read drops the head before any byte of it is sent.
            conn.flush()
        self.ds.resume_reading_for_pending()

    def body(self, chunk: bytes) -> None:
        if self.resp_started and self.close_client:
            return  # upstream already answered; the rest of the body is discarded
        conn = self.conn
        if self.sent_body is not None and self.req.body_size > self.pool.max_body:
            self.sent_body = None  # too big to replay: no retry once any of it went out
        if conn is not None:
            conn.send(self._frame(chunk))
            if self.sent_body is not None:
                self.sent_body.append(chunk)
            # The read timeout counts from the last byte either way: while the request is
            # still being sent, the upstream owes no answer yet.
            conn.deadline = conn.pool.deadlines.now + self.timeouts.read
        else:
            pending = self.req.pending
            pending.append(chunk)
            if sum(map(len, pending)) > PENDING_BODY_LIMIT:
                self.ds.pause_reading_for_pending()

    def body_end(self) -> None:
        if self.conn is not None and self.req.chunked and not self.close_client:
            self.conn.send(b"0\r\n\r\n")

    def _frame(self, chunk: bytes) -> bytes:
        if self.req.chunked:
            return b"%x\r\n%b\r\n" % (len(chunk), chunk)
        return chunk

    # -- response side: llhttp callbacks ----------------------------------------------------
    def feed_response(self, data: bytes) -> None:
        ds = self.ds
        try:
            self.parser.feed_data(data)  # type: ignore[union-attr]
        except httptools.HttpParserUpgrade as exc:
            if self.upgrade_headers is not None and self.req.ws_upstream_key is not None:
                self._start_tunnel(data[exc.args[0]:] if exc.args else b"")
            else:
                self.upstream_failed(502, "upstream switched protocols on a plain HTTP route")
        except httptools.HttpParserError as exc:
            if not self.done and not isinstance(exc.__context__, Abandoned):
                self.upstream_failed(502, f"invalid upstream response: {exc}")
        ds.flush()

    def on_status(self, reason: bytes) -> None:
        self.resp_reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self.resp_headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self.done:
            return
        status = self.parser.get_status_code()  # type: ignore[union-attr]
        headers, self.resp_headers = self.resp_headers, []
        reason, self.resp_reason = self.resp_reason, b""
        ds, req = self.ds, self.req
        if status == 101:
            self.upgrade_headers = headers  # llhttp raises HttpParserUpgrade right after this
            return
        if status < 200:
            # 100 was answered by proxyd itself; other 1xx (103 Early Hints) are relayed
            # to HTTP/1.1 clients and are never the final response.
            if status != 100 and status != 101 and req.http11:
                ds.send(status_line(status, reason) + self._filter(headers) + CRLF)
                self.interim_sent = True
            return
        pool = self.pool
        if pool.watch_status:
            pool.response(self.target, status)  # type: ignore[arg-type]
        else:
            self.target.failures = 0  # type: ignore[union-attr]  # an answer: not failing
        if status in pool.retry_statuses and self._retry(sent=True, same_ok=False):
            raise Abandoned  # decided before any byte of this response went to the client
        if self.timed:
            self.deadline = self.total_deadline  # the head is in: the per-try limit is over
        self.resp_status = status
        length: bytes | None = None
        chunked = False
        for name, value in headers:
            lname = name.lower()
            if lname == b"content-length":
                length = value.strip()  # llhttp already refused duplicates and non-digits
            elif lname == b"transfer-encoding":
                chunked = True
        no_body = req.method == b"HEAD" or status in NO_BODY_STATUSES
        self.read_to_close = length is None and not chunked and not no_body
        ctx = req.ctx
        if ctx is None:
            fields = self._filter(headers)
            if length is not None:
                fields += b"Content-Length: " + length + CRLF
            self._send_head(status, reason, fields, length is not None, no_body)
        else:
            chain = req.chain
            resp = Response(status, self._filter_list(headers), None, reason)
            if not no_body and chain.wants_body(ctx, resp):
                self.resp = resp
                self.buffer = []  # the head waits for the body (etag); CL ≤ its max_size
                return
            chain.response(ctx, resp)
            self._send_middleware_head(resp, no_body)
        if req.method == b"HEAD":
            # llhttp cannot be told "no body"; the exchange owns this parser, so finish now
            # and let the connection get a fresh parser with its next exchange.
            self._finish(reusable=self.parser.should_keep_alive())  # type: ignore[union-attr]

    def _send_head(self, status: int, reason: bytes, fields: bytes, has_length: bool,
                   no_body: bool) -> None:
        """Write the final response head with the framing and Connection the client needs."""
        ds, req = self.ds, self.req
        # Answered before the request body ended: the body's remainder is discarded and
        # neither connection can carry another message.
        close = ds.must_close(req) or not req.body_done
        if has_length or no_body:
            extra = b""
        elif req.http11:
            self.client_chunked = True
            extra = b"Transfer-Encoding: chunked\r\n"
        else:
            extra = b""
            close = True  # HTTP/1.0 client: the end of the body is the end of the connection
        self.close_client = close
        if close:
            extra += b"Connection: close\r\n"
        elif not req.http11:
            extra += b"Connection: keep-alive\r\n"
        ds.send(status_line(status, reason) + fields + extra + CRLF)
        self.resp_status = status  # what the client got (middleware may have changed it)
        self.resp_started = True

    def _send_middleware_head(self, resp: Response, no_body: bool) -> None:
        if resp.body is not None and not resp.drop_body and resp.status not in NO_BODY_STATUSES:
            # A hook supplied the body (a cache entry revalidated by a 304, or served stale on
            # an error): it wins over the upstream's, which is read and dropped.
            self.drop = True
            no_body = self.req.method == b"HEAD"
            resp.set(b"Content-Length", str(len(resp.body)).encode())
        elif resp.drop_body or no_body:
            self.drop = True  # e.g. a 304 made from a 200: the upstream body is read, not sent
            no_body = True
        elif resp.filters:
            self.filters = resp.filters
            resp.remove(b"content-length")
        fields = b"".join(name + b": " + value + CRLF for name, value in resp.headers)
        self._send_head(resp.status, resp.reason, fields, resp.has(b"content-length"), no_body)
        if resp.body is not None and not no_body and self.req.method != b"HEAD":
            self.ds.send(resp.body)
            self.bytes_out += len(resp.body)

    @staticmethod
    def _filter(headers: list[tuple[bytes, bytes]]) -> bytes:
        drop: set[bytes] | frozenset[bytes] = RESPONSE_DROP
        for name, value in headers:
            if name.lower() == b"connection":
                drop = RESPONSE_DROP | {t.strip().lower() for t in value.split(b",")}
        return b"".join(
            name + b": " + value + CRLF for name, value in headers if name.lower() not in drop
        )

    @staticmethod
    def _filter_list(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        """Like _filter, for middleware: a list, and Content-Length kept for them to read."""
        drop: set[bytes] | frozenset[bytes] = HOP_BY_HOP
        for name, value in headers:
            if name.lower() == b"connection":
                drop = HOP_BY_HOP | {t.strip().lower() for t in value.split(b",")}
        return [(name, value) for name, value in headers if name.lower() not in drop]

    def on_body(self, data: bytes) -> None:
        if self.done:
            return
        if self.buffer is not None:
            self.buffer.append(data)
            return
        if self.drop:
            return
        if self.filters:
            for body_filter in self.filters:
                data = body_filter.feed(data)
            if not data:
                return
        self.bytes_out += len(data)
        if self.client_chunked:
            self.ds.send(b"%x\r\n%b\r\n" % (len(data), data))
        else:
            self.ds.send(data)

    def on_message_complete(self) -> None:
        if self.done:
            return
        if self.buffer is not None:
            self._send_buffered()
        elif not self.resp_started:
            return  # a 1xx interim response ended
        self._end_body()
        keep = self.parser.should_keep_alive() and self.req.body_done  # type: ignore[union-attr]
        self._finish(reusable=keep and not self.read_to_close)

    def _send_buffered(self) -> None:
        resp, body = self.resp, b"".join(self.buffer or ())
        self.buffer = None
        assert resp is not None and self.req.ctx is not None
        resp.body = body
        self.req.chain.response(self.req.ctx, resp)
        body = resp.body or b""
        no_body = resp.drop_body or resp.status in NO_BODY_STATUSES
        if not no_body:
            resp.set(b"Content-Length", str(len(body)).encode())
        fields = b"".join(name + b": " + value + CRLF for name, value in resp.headers)
        self._send_head(resp.status, resp.reason, fields, True, no_body)
        if not no_body:
            self.ds.send(body)
            self.bytes_out += len(body)

    def _end_body(self) -> None:
        if self.filters and not self.drop:
            tail = b""
            for body_filter in self.filters:  # each filter's tail goes through the next one
                tail = (body_filter.feed(tail) if tail else b"") + body_filter.finish()
            if tail:
                self.bytes_out += len(tail)
                self.ds.send(b"%x\r\n%b\r\n" % (len(tail), tail) if self.client_chunked else tail)
        if self.client_chunked:
            self.ds.send(b"0\r\n\r\n")

    def _start_tunnel(self, rest: bytes) -> None:
        """The upstream's 101: answer the client's handshake, then relay bytes both ways."""
        headers = self.upgrade_headers or []
        req, ds, conn = self.req, self.ds, self.conn
        assert req.ws_key is not None and req.ws_upstream_key is not None and conn is not None
        got = next((v.strip() for n, v in headers if n.lower() == b"sec-websocket-accept"), b"")
        if got != accept_key(req.ws_upstream_key):
            self.upstream_failed(502, "upstream sent a wrong Sec-WebSocket-Accept")
            return
        lines = [b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                 b"Connection: Upgrade\r\nSec-WebSocket-Accept: ", accept_key(req.ws_key), CRLF]
        for name, value in headers:
            if name.lower() in (b"sec-websocket-protocol", b"sec-websocket-extensions"):
                lines += (name, b": ", value, CRLF)
        lines.append(CRLF)
        ds.send(b"".join(lines))
        ds.flush()
        self.done = True
        if self.admitted or self.timed:
            self._leave()
        self.resp_status = 101
        self.conn = None
        conn.exchange = None
        conn.deadline = 0.0  # the relay's idle timeout runs on the client side
        route = req.route
        assert route is not None and route.websocket is not None
        tunnel = Tunnel(ds, conn, ds.p, route.websocket)
        conn.tunnel = tunnel
        conn.pool.detach(conn)  # relays are long-lived: they must not starve the pool
        ds.start_tunnel(tunnel, self)
        if rest:
            tunnel.from_upstream(rest)

    # -- endings ----------------------------------------------------------------------------
    def _finish(self, *, reusable: bool) -> None:
        self.done = True
        conn, self.conn = self.conn, None
        if conn is not None:
            if reusable and not self.close_client:
                conn.pool.release(conn)
            else:
                conn.exchange = None
                conn.close()
        if self.admitted or self.timed:
            self._leave()
        self.ds.exchange_done(self, close=self.close_client)

    def _leave(self) -> None:
        """Give back the concurrency slot and the deadline membership, once."""
        if self.timed:
            self.timed = False
            self.pool.deadlines.discard(self)
        if self.admitted:
            self.admitted = False
            self.pool.leave()

    def refuse(self, reason: str, message: str) -> None:
        """503 at once: the circuit breaker, a full queue, or no target up."""
        if self.done:
            return
        self.done = True
        self._leave()
        self.ds.p.metrics.inc("gateway_upstream_rejected_total", (self.pool.name, reason))
        self.ds.send_error(self.req, 503, message)

    # -- retries ----------------------------------------------------------------------------
    def _retry(self, *, sent: bool, same_ok: bool) -> bool:
        """Start another try if this one may be repeated; False: the caller gives up.

        ``sent``: the request (or part of it) may have reached the upstream, so only the
        retry methods qualify, and a body only when it was kept whole. ``same_ok``: the same
        target may take it again (a pooled connection that was stale, not a failing target).
        """
        pool, req = self.pool, self.req
        if (self.done or self.resp_started or self.resp_status or self.interim_sent
                or self.tries >= pool.retry_attempts):
            return False
        if sent and (req.method not in pool.retry_methods
                     or (req.has_body and self.sent_body is None)):
            return False
        if not pool.budget.allow():
            return False
        target = pool.pick(self.key, self.target)  # another target, preferably
        if target is None and same_ok:
            target = pool.pick(self.key)
        if target is None:
            return False
        pool.budget.spend()
        self.ds.p.metrics.inc("gateway_upstream_retries_total", (pool.name,))
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.exchange = None
            conn.close()
        self.parser = None
        self.resp_headers = []
        self.resp_reason = b""
        if self.sent_body:
            req.pending[:0] = self.sent_body  # replayed ahead of what is still to come
            self.sent_body = []
        self._try(target)
        return True

    def connect_failed(self, status: int, message: str) -> None:
        """The pool could not connect for this try: nothing was sent, any method may retry."""
        if not self._retry(sent=False, same_ok=False):
            self.upstream_failed(status, message)

    def on_deadline(self) -> None:
        """The exchange's own deadline (timed exchanges only): per-try or total timeout."""
        now = self.pool.deadlines.now
        total = self.total_deadline
        if total and now >= total:
            self.upstream_failed(504, "upstream total timeout")
            return
        if self.try_deadline and now >= self.try_deadline and not self.resp_status:
            self.try_deadline = 0.0
            if self.target is not None:
                self.pool.try_failed(self.target)
            if not self._retry(sent=self.conn is not None, same_ok=False):
                self.upstream_failed(504, "upstream per-try timeout")
            return
        self.deadline = total

    def upstream_failed(self, status: int, message: str) -> None:
        """Connect error, bad response, timeout: an error answer if nothing was sent yet."""
        if self.done:
            return
        self.done = True
        if self.admitted or self.timed:
            self._leave()
        kind = ("timeout" if status == 504 else "connect" if "connect" in message
                else "reset" if "closed" in message else "protocol")
        self.ds.p.metrics.inc("gateway_upstream_errors_total", (self.pool.name, kind))
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.exchange = None
            conn.close()
        if self.resp_started:
            self.ds.abort()  # a truncated response must not look complete
        else:
            self.ds.send_error(self.req, status, message)

    def upstream_lost(self, conn: UpstreamConnection, exc: Exception | None) -> None:
        if self.done:
            return
        if self.resp_started and self.read_to_close:
            self.on_body_end_at_close()
            return
        if not self.resp_started and not self.resp_status:
            # Closed before any answer. A pooled connection the upstream closed as we reused
            # it is a race, not a failing target: the same target may take the retry.
            stale = conn.reused and self.conn is conn
            if not stale and self.target is not None:
                self.pool.try_failed(self.target)
            self.conn = None
            if self._retry(sent=True, same_ok=stale):
                return
        self.upstream_failed(502, "upstream closed the connection")

    def on_body_end_at_close(self) -> None:
        self._end_body()
        self.conn = None
        self._finish(reusable=False)
        self.ds.flush()

    def upstream_timeout(self) -> None:
        if not self.resp_started and not self.resp_status:
            if self.target is not None:
                self.pool.try_failed(self.target)
            if self._retry(sent=True, same_ok=False):
                return
        self.upstream_failed(504, "upstream read timeout")

    def client_gone(self) -> None:
        """The client connection closed mid-exchange: the upstream one cannot be reused."""
        if self.done:
            return
        self.done = True
        if self.admitted or self.timed:
            self._leave()
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.exchange = None
            conn.close()
