"""The response half of an exchange: the upstream's response, parsed and relayed to the client.

The exchange is the response parser's protocol object, so llhttp (httptools) calls straight
into these methods. The head loses its hop-by-hop fields and gets the framing and Connection the
client needs; on a route with middleware the response hooks see it first, and may change it,
supply a body, hold the body whole (a buffering middleware) or filter it as it streams. A 101
answers the client's WebSocket handshake and turns both connections into a Tunnel. A mixin of
Exchange (forward.py), which owns the state and the request side.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import TYPE_CHECKING, Final, cast

import httptools

from proxyd.middleware.base import BodyFilter, Response
from proxyd.proxy.head import CRLF, render_fields, response_head, switching_protocols
from proxyd.proxy.headers import (
    HOP_BY_HOP,
    RESPONSE_DROP,
    RESPONSE_DROP_SHAPES,
    RESPONSE_NAMES,
    Piece,
    connection_tokens,
    content_length,
    lower_name,
    name_shape,
)
from proxyd.proxy.upstream_conn import ERROR_PROTOCOL
from proxyd.proxy.websocket import Tunnel, accept_key

if TYPE_CHECKING:
    from proxyd.proxy.downstream import DownstreamProtocol, Request
    from proxyd.proxy.upstream import TargetPool, UpstreamConnection, UpstreamPool

NO_BODY_STATUSES: Final = frozenset({204, 304})
# Reads at least this large that open a 2xx response have their head parsed apart from the
# body (ResponseRelay._feed_split); the head must end within them.
SPLIT_READ: Final = 16 * 1024
# Connection options that name no other field: nothing more to drop for them.
CONNECTION_OPTIONS: Final = HOP_BY_HOP | {b"close", b""}


def body_of(resp: Response) -> bytes | None:
    return resp.body


class Abandoned(Exception):
    """Raised from a response-parser callback: this try's response is dropped (a retry on
    another target has begun); the parser stops at once."""


class ResponseRelay:
    """The response-parser callbacks of Exchange and the relay of the response to the client."""

    # Exchange holds the state (its __slots__; in the compiled build, fixed fields). The
    # methods below stand for Exchange's, which override them: a base class, not a mixin of
    # declarations only, because the compiled build needs every method it calls defined.

    # The exchange's state, kept by Exchange (declared for the type checker).
    ds: DownstreamProtocol
    req: Request
    pool: UpstreamPool
    target: TargetPool | None
    conn: UpstreamConnection | None
    parser: httptools.HttpResponseParser | None
    done: bool
    resp_started: bool
    resp_status: int
    resp_reason: bytes
    resp_headers: list[tuple[bytes, bytes]]
    client_chunked: bool
    read_to_close: bool
    raw_left: int
    close_client: bool
    body_cut: bool
    resp: Response | None
    buffer: list[bytes] | None
    filters: list[BodyFilter]
    drop: bool
    bytes_out: int
    upgrade_headers: list[tuple[bytes, bytes]] | None
    admitted: bool
    timed: bool
    deadline: float
    total_deadline: float
    interim_sent: bool

    @abstractmethod
    def _retry(self, *, sent: bool, same_ok: bool) -> bool: ...

    @abstractmethod
    def _finish(self, *, reusable: bool) -> None: ...

    @abstractmethod
    def _leave(self) -> None: ...

    @abstractmethod
    def upstream_failed(self, status: int, message: str, kind: str) -> None: ...

    # -- response side: llhttp callbacks ----------------------------------------------------
    def feed_response(self, data: Piece, whole: bytes | bytearray) -> None:
        """One read from the upstream: bytes, or a view of the connection's read buffer
        (upstream_conn.ReadBuffer), which is `whole` (to search the head in; the read starts
        at its offset 0)."""
        left = self.raw_left
        if left:
            self._relay_raw(data, left)
            return
        # A large read that opens a 2xx response (b"2" is 50): see _feed_split.
        if len(data) >= SPLIT_READ and whole.startswith(b"HTTP/1.") and whole[9] == 50:
            end = whole.find(b"\r\n\r\n", 0, SPLIT_READ)
            if end >= 0:
                self._feed_split(data, end + 4)
                return
        self._feed(data)
        self.ds.flush()

    def _feed_split(self, data: Piece, end: int) -> None:
        """The head alone through the parser; a body that on_headers_complete lets go past
        the parser (_relay_raw) is then sent as a view of this read. Through llhttp, on_body
        would first copy it into a new bytes object: 64 KiB per /big response."""
        view = memoryview(data)
        if self._feed(view[:end]) and not self.done:
            rest = view[end:]
            left = self.raw_left
            if left and rest:
                self._relay_raw(rest, left)
                return
            if rest:
                self._feed(rest)  # not raw (chunked, a filter, ...): the parser has it all
        # (done already, with bytes past the head: a HEAD's answer or an upstream out of
        # step; dropped, as the parser dropped them before.)
        self.ds.flush()

    def _feed(self, data: Piece) -> bool:
        """Through the parser; False when it stopped (an error, a retry, an upgrade)."""
        try:
            self.parser.feed_data(data)  # type: ignore[union-attr]
        except httptools.HttpParserUpgrade as exc:
            if self.upgrade_headers is not None and self.req.ws_upstream_key is not None:
                self._start_tunnel(bytes(data[exc.args[0]:]) if exc.args else b"")
            else:
                self.upstream_failed(502, "upstream switched protocols on a plain HTTP route",
                                     ERROR_PROTOCOL)
            return False
        except httptools.HttpParserError as exc:
            if not self.done and not isinstance(exc.__context__, Abandoned):
                self.upstream_failed(502, f"invalid upstream response: {exc}", ERROR_PROTOCOL)
            return False
        return True

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
                ds.send(response_head(status, reason, self._filter(headers), b""))
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
        # One pass over the upstream's fields: the framing, and what goes on to the client
        # (as bytes when no middleware looks at them; else pairs, and their lowercase names).
        ctx = req.ctx
        length: bytes | None = None
        chunked = False
        named: set[bytes] | None = None  # fields a Connection header names (rare)
        keep: list[bytes] = []  # name, ": ", value, CRLF, ...
        # For middleware: the parser's pairs less the dropped fields, and their lowercase
        # names. The pairs are read as objects: compiled, a pair read as tuple[bytes, bytes]
        # and appended to another list would be a new tuple (~8 allocations a response).
        pairs: list[object] = []
        lnames: list[bytes] = []
        for field in cast("list[object]", headers):
            name, value = cast("tuple[bytes, bytes]", field)
            # Without middleware only a field shaped like a dropped one needs its lowercase
            # name (RESPONSE_DROP_SHAPES): most are relayed without one.
            if ctx is not None or RESPONSE_DROP_SHAPES[name_shape(name)]:
                lname = lower_name(name, RESPONSE_NAMES)
                if lname in RESPONSE_DROP:
                    if lname == b"content-length":
                        length = value.strip()  # llhttp refused duplicates and non-digits
                    elif lname == b"transfer-encoding":
                        # Chunked only if chunked is the final coding; any other ends at the
                        # close (RFC 9112 §6.3), as llhttp reads it: proxyd re-frames it.
                        chunked = value.rpartition(b",")[2].strip().lower() == b"chunked"
                    elif (lname == b"connection"
                          and lower_name(value, RESPONSE_NAMES) not in CONNECTION_OPTIONS):
                        # (The usual single keep-alive or close names no field: no parsing.)
                        tokens = connection_tokens(value) - CONNECTION_OPTIONS
                        if tokens:
                            named = tokens if named is None else named | tokens
                    continue
                if ctx is not None:
                    pairs.append(field)
                    lnames.append(lname)
                    continue
            keep.append(name)  # four appends: compiled, a tuple and a list += cost twice that
            keep.append(b": ")
            keep.append(value)
            keep.append(CRLF)
        no_body = req.method == b"HEAD" or status in NO_BODY_STATUSES
        self.read_to_close = length is None and not chunked and not no_body
        size = -1 if length is None else content_length(length)  # parsed once, here
        if ctx is None:
            fields = self._filter(headers, named) if named else b"".join(keep)
            if length is not None:
                fields += b"Content-Length: " + length + CRLF
                if not no_body:
                    self.raw_left = size  # see _relay_raw
            self._send_head(status, reason, fields, length is not None, no_body)
        else:
            chain = req.chain
            if named:
                resp = Response(status, self._filter_list(headers, named), None, reason,
                                upstream_length=size)
            else:
                # The lowercase names made here once, not again by the first hook asking.
                resp = Response(status, cast("list[tuple[bytes, bytes]]", pairs), None, reason,
                                lnames, size)
                if length is not None:
                    resp.add(b"Content-Length", length, b"content-length")  # middleware read it
            if not no_body and chain.wants_body(ctx, resp):
                self.resp = resp
                self.buffer = []  # the head waits for the body (etag); CL ≤ its max_size
                return
            chain.response(ctx, resp)
            self._send_middleware_head(resp, no_body, length)
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
        self.body_cut = not req.body_done
        if close:
            extra += b"Connection: close\r\n"
        elif not req.http11:
            extra += b"Connection: keep-alive\r\n"
        ds.send(response_head(status, reason, fields, extra))
        self.resp_status = status  # what the client got (middleware may have changed it)
        self.resp_started = True

    def _send_middleware_head(self, resp: Response, no_body: bool, length: bytes | None
                              ) -> None:
        """``length``: the upstream's Content-Length. When no hook touches the body and the
        client is told that same length, the body goes out past the parser (_relay_raw)."""
        raw = False
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
        elif length is not None:
            raw = resp.get(b"content-length") == length
        fields = render_fields(resp.headers, resp.blocks)
        self._send_head(resp.status, resp.reason, fields, resp.has(b"content-length"), no_body)
        if raw:
            self.raw_left = resp.upstream_length  # the relay's parse of ``length``
        if resp.body is not None and not no_body and self.req.method != b"HEAD":
            self.ds.send(resp.body)
            self.bytes_out += len(resp.body)

    @staticmethod
    def _named(headers: list[tuple[bytes, bytes]]) -> set[bytes]:
        """The fields named by every Connection header, however many there are."""
        named: set[bytes] = set()
        for name, value in headers:
            if name.lower() == b"connection":
                named.update(t.strip().lower() for t in value.split(b","))
        return named

    @classmethod
    def _filter(cls, headers: list[tuple[bytes, bytes]], named: set[bytes] | None = None
                ) -> bytes:
        """The fields to relay, rendered; ``named``: the Connection-named ones, if known."""
        drop = RESPONSE_DROP | (named if named is not None else cls._named(headers))
        return render_fields([(n, v) for n, v in headers if n.lower() not in drop])

    @classmethod
    def _filter_list(cls, headers: list[tuple[bytes, bytes]], named: set[bytes]
                     ) -> list[tuple[bytes, bytes]]:
        """Like _filter, for middleware: a list, and Content-Length kept for them to read."""
        drop = HOP_BY_HOP | named
        return [(name, value) for name, value in headers if name.lower() not in drop]

    def on_body(self, data: bytes) -> None:
        if self.done:
            return
        if self.raw_left:
            self.raw_left -= len(data)
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
        self.raw_left = 0
        if self.buffer is not None:
            self._send_buffered()
        elif not self.resp_started:
            return  # a 1xx interim response ended
        self._end_body()
        keep = self.parser.should_keep_alive() and self.req.body_done  # type: ignore[union-attr]
        self._finish(reusable=keep and not self.read_to_close)

    def _relay_raw(self, data: Piece, left: int) -> None:
        """What follows the head's read of a Content-Length body, past the parser: each read
        goes to the client as it came. (Through llhttp, every read would be copied into a new
        bytes object for on_body: ~64 KiB of copying per /big response, for no decision.)"""
        ds = self.ds
        n = len(data)
        if n < SPLIT_READ and not isinstance(data, bytes):
            # A small piece of the read buffer: copied, so that a slow client's queue does
            # not keep a whole buffer (upstream_conn.ReadBuffer) for a few bytes.
            data = bytes(data)
        excess = n > left
        if excess:  # bytes past the body: the upstream is out of step
            data = data[:left]
            n = left
        self.raw_left = left - n
        self.bytes_out += n
        ds.send(data)
        if not self.raw_left:
            keep = (self.parser.should_keep_alive()  # type: ignore[union-attr]
                    and self.req.body_done and not excess)
            self._end_body()
            self._finish(reusable=keep)
        ds.flush()

    def _send_buffered(self) -> None:
        resp, body = self.resp, b"".join(self.buffer or ())
        self.buffer = None
        assert resp is not None and self.req.ctx is not None
        resp.body = body
        self.req.chain.response(self.req.ctx, resp)
        # Read back through a function: the assignment above narrowed resp.body to bytes, and
        # the compiled build would trust that over a hook that set it to None.
        after = body_of(resp)
        same = after is body  # no hook replaced it: the upstream's Content-Length holds
        body = after or b""
        no_body = resp.drop_body or resp.status in NO_BODY_STATUSES
        if not no_body and not (same and resp.has(b"content-length")):
            resp.set(b"Content-Length", str(len(body)).encode())
        fields = render_fields(resp.headers, resp.blocks)
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
            self.upstream_failed(502, "upstream sent a wrong Sec-WebSocket-Accept",
                                 ERROR_PROTOCOL)
            return
        chosen = [(name, value) for name, value in headers
                  if name.lower() in (b"sec-websocket-protocol", b"sec-websocket-extensions")]
        ds.send(switching_protocols(accept_key(req.ws_key), chosen))
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
        ds.start_tunnel(tunnel, self)  # type: ignore[arg-type]  # self is the Exchange
        if rest:
            tunnel.from_upstream(rest)
