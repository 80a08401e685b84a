"""One proxied exchange: a client request relayed to an upstream and its response relayed back.

The exchange is the response parser's protocol object, so llhttp calls straight into it. Both
bodies stream chunk by chunk; back-pressure runs both ways through pause/resume_reading. Every
message is re-framed by proxyd: Content-Length passes through, chunked is re-chunked, and a
close-delimited upstream body becomes chunked for HTTP/1.1 clients.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import httptools

from proxyd.proxy.headers import CRLF, RESPONSE_DROP, status_line

if TYPE_CHECKING:
    from proxyd.proxy.downstream import DownstreamProtocol, Request
    from proxyd.proxy.upstream import TargetPool, UpstreamConnection, UpstreamPool

IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})
NO_BODY_STATUSES = frozenset({204, 304})
PENDING_BODY_LIMIT = 256 * 1024  # buffered before the upstream connects; then reading pauses


class Exchange:
    __slots__ = (
        "client_chunked",
        "close_client",
        "conn",
        "done",
        "ds",
        "head",
        "host_line",
        "parser",
        "pool",
        "read_to_close",
        "req",
        "resp_headers",
        "resp_reason",
        "resp_started",
        "resp_status",
        "target",
        "tries",
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

    # -- request side ---------------------------------------------------------------------
    def start(self, head_without_host: bytes, host_line: bytes | None) -> None:
        """``host_line`` None means: send the target's own host (preserve_host: false)."""
        self.head = head_without_host
        self.host_line = host_line
        self.req.exchange = self
        self.tries += 1
        self.target = self.pool.pick()
        self.target.acquire(self)

    def attach(self, conn: UpstreamConnection) -> None:
        """Called by the pool with a connection, at once (idle hit) or after connecting."""
        target = conn.pool
        self.conn = conn
        conn.exchange = self
        self.parser = httptools.HttpResponseParser(self)
        conn.deadline = target.deadlines.now + target.read_timeout
        if self.ds.write_paused:
            conn.pause_reading()  # (which also holds the read timeout)
        host = self.host_line or b"Host: " + target.host_header + CRLF
        conn.send(self.head + host + CRLF)
        req = self.req
        for chunk in req.pending:
            conn.send(self._frame(chunk))
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
        if conn is not None:
            conn.send(self._frame(chunk))
            # The read timeout counts from the last byte either way: while the request is
            # still being sent, the upstream owes no answer yet.
            conn.deadline = conn.pool.deadlines.now + conn.pool.read_timeout
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
        except httptools.HttpParserUpgrade:
            self.upstream_failed(502, "upstream switched protocols on a plain HTTP route")
        except httptools.HttpParserError as exc:
            if not self.done:
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
        if status < 200:
            # 100 was answered by proxyd itself; other 1xx (103 Early Hints) are relayed
            # to HTTP/1.1 clients and are never the final response.
            if status != 100 and status != 101 and req.http11:
                ds.send(status_line(status, reason) + self._filter(headers) + CRLF)
            return
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
        # Answered before the request body ended: the body's remainder is discarded and
        # neither connection can carry another message.
        close = ds.must_close(req) or not req.body_done
        if length is not None:
            extra = b"Content-Length: " + length + CRLF
        elif no_body:
            extra = b""
        else:
            self.read_to_close = not chunked
            if req.http11:
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
        ds.send(
            status_line(status, reason) + self._filter(headers) + extra + CRLF
        )
        self.resp_started = True
        if req.method == b"HEAD":
            # llhttp cannot be told "no body"; the exchange owns this parser, so finish now
            # and let the connection get a fresh parser with its next exchange.
            self._finish(reusable=self.parser.should_keep_alive())  # type: ignore[union-attr]

    @staticmethod
    def _filter(headers: list[tuple[bytes, bytes]]) -> bytes:
        drop: set[bytes] | frozenset[bytes] = RESPONSE_DROP
        for name, value in headers:
            if name.lower() == b"connection":
                drop = RESPONSE_DROP | {t.strip().lower() for t in value.split(b",")}
        return b"".join(
            name + b": " + value + CRLF for name, value in headers if name.lower() not in drop
        )

    def on_body(self, data: bytes) -> None:
        if self.done:
            return
        if self.client_chunked:
            self.ds.send(b"%x\r\n%b\r\n" % (len(data), data))
        else:
            self.ds.send(data)

    def on_message_complete(self) -> None:
        if self.done or not self.resp_started:
            return  # a 1xx interim response ended
        if self.client_chunked:
            self.ds.send(b"0\r\n\r\n")
        keep = self.parser.should_keep_alive() and self.req.body_done  # type: ignore[union-attr]
        self._finish(reusable=keep and not self.read_to_close)

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
        self.ds.exchange_done(self, close=self.close_client)

    def upstream_failed(self, status: int, message: str) -> None:
        """Connect error, bad response, timeout: an error answer if nothing was sent yet."""
        if self.done:
            return
        self.done = True
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
        req = self.req
        if (
            not self.resp_started
            and conn.reused
            and req.method in IDEMPOTENT
            and not req.has_body
            and self.tries < self.pool.retry_attempts  # attempts = tries in total
        ):
            # A pooled connection the upstream closed as we reused it: nothing was answered,
            # nothing unrepeatable was sent, so one more try on a fresh connection is safe.
            self.conn = None
            self.parser = None
            self.tries += 1
            self.target = self.pool.pick()
            self.target.acquire(self)
            return
        self.upstream_failed(502, "upstream closed the connection")

    def on_body_end_at_close(self) -> None:
        if self.client_chunked:
            self.ds.send(b"0\r\n\r\n")
        self.conn = None
        self._finish(reusable=False)
        self.ds.flush()

    def upstream_timeout(self) -> None:
        self.upstream_failed(504, "upstream read timeout")

    def client_gone(self) -> None:
        """The client connection closed mid-exchange: the upstream one cannot be reused."""
        if self.done:
            return
        self.done = True
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.exchange = None
            conn.close()
