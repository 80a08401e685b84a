"""One request, from dispatch to its last byte: the exchange.

The client connection (connection.py) parses a request and, in its turn, makes an Exchange of
it. The exchange normalises the path, routes, runs the chain's request hooks (and waits for
them), and ends at its endpoint: a direct response, an answer proxyd makes (a chain's answer,
an error), or the upstream — a try on a pooled connection (tries, retries, per-try and total
timeouts, the request body re-framed), the response head made fit for the client
(response_fields.py), its body relayed, filtered or held, or a WebSocket tunnel.

Where an exchange is, is its ``state`` (lifecycle.py), and every move is checked against the
table there. One method ends an exchange (``_end``), and one decides whether the client
connection closes after it (``closes``). The upstream talks to the exchange through a small
interface — ``on_head``, ``on_interim``, ``on_body``, ``on_end``, ``on_upgrade``,
``upstream_lost``, ``upstream_timeout`` — so the exchange never parses an upstream's bytes
(upstream_conn.py does, for HTTP/1.1).
"""

from __future__ import annotations

import logging
from time import monotonic
from typing import TYPE_CHECKING, Final

from proxyd.middleware.base import BodyFilter, Context, Pending, Response, json_response
from proxyd.observe.throttle import ThrottledLog
from proxyd.proxy.field_rules import REQUEST_DROP, forwarded_fields
from proxyd.proxy.head import (
    CRLF,
    body_length,
    error_response,
    parse_fields,
    render_fields,
    render_response,
    request_start,
    switching_protocols,
    upstream_head,
)
from proxyd.proxy.lifecycle import (
    AWAITING_HEAD,
    BUFFERING,
    CONNECTING,
    DONE,
    IN_CHAIN,
    MOVES,
    RELAYING,
    RETRYABLE,
    ROUTING,
    SENDING,
    TUNNEL,
    illegal_move,
)
from proxyd.proxy.path import BadPath, needs_normalizing, normalize_path
from proxyd.proxy.pipeline import req_id
from proxyd.proxy.response_fields import (
    NO_BODY_STATUSES,
    ResponseFields,
    filtered_fields,
    relay_fields,
)
from proxyd.proxy.router import DirectResponse, normalize_host
from proxyd.proxy.upstream_conn import ERROR_PROTOCOL, ERROR_RESET, ERROR_TIMEOUT, NO_TIMEOUTS
from proxyd.proxy.websocket import accept_key, new_key

if TYPE_CHECKING:
    import asyncio

    from proxyd.proxy.downstream import Downstream
    from proxyd.proxy.pipeline import Pipeline
    from proxyd.proxy.request import Request
    from proxyd.proxy.upstream import TargetPool, Timeouts, UpstreamConnection, UpstreamPool

__all__ = ["NO_BODY_STATUSES", "PENDING_BODY_LIMIT", "Exchange"]

UPSTREAM_ERRORS: Final = ThrottledLog(logging.getLogger("proxyd.upstream"))
PENDING_BODY_LIMIT: Final = 256 * 1024  # buffered before the upstream connects; then reading pauses


def body_of(resp: Response) -> bytes | None:
    return resp.body


class Exchange:
    __slots__ = (
        "admitted",
        "body_cut",
        "buffer",
        "bytes_out",
        "close_client",
        "conn",
        "deadline",
        "drop",
        "ds",
        "filters",
        "head",
        "host_line",
        "interim_sent",
        "key",
        "p",
        "pool",
        "read_to_close",
        "req",
        "resp",
        "resp_status",
        "sent_body",
        "started_at",
        "state",
        "target",
        "timed",
        "timeouts",
        "total_deadline",
        "trailers",
        "tries",
        "try_deadline",
    )

    def __init__(self, ds: Downstream, req: Request) -> None:
        self.ds = ds
        self.p: Pipeline = ds.p
        self.req = req
        req.exchange = self
        self.state = ROUTING
        self.pool: UpstreamPool | None = None
        self.target: TargetPool | None = None
        self.conn: UpstreamConnection | None = None
        self.head = b""
        self.host_line: bytes | None = None
        self.tries = 0
        self.close_client = False  # decided by closes() when the response head is made
        self.body_cut = False  # answered mid-body: the rest is dropped, the upstream unusable
        self.resp_status = 0  # the upstream's final status, then what the client got
        self.read_to_close = False  # the upstream's body ends when its connection does
        self.resp: Response | None = None  # the head a buffering middleware holds
        self.buffer: list[bytes] | None = None  # the body it holds it for
        self.filters: list[BodyFilter] | None = None  # body filters (compression)
        self.drop = False  # read the upstream body but do not send it
        self.bytes_out = 0
        self.started_at = 0.0
        self.timeouts: Timeouts = NO_TIMEOUTS
        self.admitted = False  # holds one of the upstream's max_concurrent slots
        self.timed = False  # a member of the worker's deadlines (per-try or total timeout)
        # deadline, try_deadline, total_deadline: set by _forward() when timed, read only then
        self.key = b""  # hash balancing
        self.sent_body: list[bytes] | None = None  # body chunks kept for a replay
        self.interim_sent = False  # a 1xx went to the client: no retry after that
        self.trailers: list[tuple[bytes, bytes]] | None = None  # an HTTP/2 upstream's

    def _move(self, to: int) -> None:
        if not MOVES[self.state] >> to & 1:
            raise illegal_move(self.state, to)
        self.state = to

    def request_id(self) -> str:
        req = self.req
        if req.ctx is not None:
            return req.ctx.id()  # trace_id may have taken the client's, or made one
        return req_id(req, self.p)

    # -- the one decision: does the client connection close after this response? ------------
    def closes(self, discard: bool = False, unframed: bool = False) -> bool:
        """``discard``: an unfinished request body may be read and dropped to keep the
        connection (an answer proxyd made that is not an error); otherwise it closes it (an
        upstream has part of it; an error may answer a request that is not what it seems).
        ``unframed``: the response body ends with the connection (an HTTP/1.0 client)."""
        req, ds, p = self.req, self.ds, self.p
        if (not req.keep_alive or req.close_requested or p.draining or ds.close_after
                or unframed
                # An upgrade the upstream refused: what the client sent after it is not HTTP.
                or req.ws_upstream_key is not None
                # The keep-alive cap: the last request a connection may carry says so.
                or ds.requests >= ds.limits.max_keepalive_requests):
            return True
        if req.body_done:
            return False
        # A client waiting for 100-continue may never send the body it announced.
        return not discard or req.expect is not None

    # -- the one end ------------------------------------------------------------------------
    def _end(self, reuse: bool = False) -> None:
        """The way every exchange ends: the state, the upstream connection (back to its pool
        when ``reuse`` and the whole request went out, else closed), the upstream's slot and
        the deadline, then the client connection is told (it records the request and goes on
        to the next, or closes)."""
        self._move(DONE)
        conn, self.conn = self.conn, None
        if conn is not None:
            # The client's connection closing (Connection: close, the keep-alive cap) is no
            # reason to drop the upstream's: it is reusable if the whole request went out.
            if reuse and not self.body_cut:
                conn.pool.release(conn)
            else:
                conn.drop()
        if self.admitted or self.timed:
            self._leave()
        self.ds.exchange_ended(self)

    def _leave(self) -> None:
        """Give back the concurrency slot and the deadline membership, once."""
        pool = self.pool
        assert pool is not None
        if self.timed:
            self.timed = False
            pool.deadlines.discard(self)
        if self.admitted:
            self.admitted = False
            pool.leave()

    # -- routing and the chain --------------------------------------------------------------
    def dispatch(self) -> None:
        req, ds, p = self.req, self.ds, self.p
        # The clock this read refreshed (timers.Deadlines): no second reading per request.
        req.started = p.deadlines.now
        path, _, query = req.url.partition(b"?")
        if needs_normalizing(path):
            # Routed and forwarded in one form only, or a spelling could dodge a route.
            try:
                path = normalize_path(path, p.limits.keep_encoded_slashes)
            except BadPath as exc:
                p.metrics.client_limits.inc(("bad_path",))
                self.error(400, exc.message)
                return
        req.path, req.query = path, query
        if ((path == p.probe_live or path == p.probe_ready)
                and (builtin := p.builtin(req.method, path)) is not None):
            req.route_name = "_health"
            self._direct(builtin)
            return
        hdrs = {k: v for k, _, v in req.headers} if p.router.needs_headers else {}
        host = req.host
        memo = ds.host_memo  # a connection's requests nearly always name the same Host
        if memo is not None and memo[0] == host:
            matched_host = memo[1]
        else:
            matched_host = normalize_host(host)
            ds.host_memo = (host, matched_host)
        route, wrong_method = p.router.match(req.method, matched_host, path, hdrs)
        if route is None:
            if wrong_method is not None:
                req.route_name = wrong_method.name
                self.error(405, "method not allowed", extra=wrong_method.allow_header)
            else:
                self.error(404, "no route")
            return
        req.route = route
        req.route_name = route.name
        if req.expect is not None and req.expect != b"100-continue":
            self.error(417, "unsupported expectation")
            return
        chain = route.chain
        if chain:
            ctx = req.ctx = Context(req.method, path, query, req.host, req.headers,
                                    ds.client_ip, route.name, p.request_id_maker,
                                    req.xfp if ds.trusted_peer and req.xfp else ds.scheme)
            if req.inbound_id is not None:
                ctx.request_id = req_id(req, p)  # as on routes without middleware
            req.chain = chain
            answer, index = chain.request(ctx)
            if answer is not None:
                self._chain_answer(answer, index)
                return
        self._endpoint()

    def _chain_answer(self, answer: Response | Pending, index: int) -> None:
        if isinstance(answer, Pending):
            # Only this request waits (Redis); its body keeps arriving into req.pending.
            self._move(IN_CHAIN)
            answer.future.add_done_callback(lambda f: self._chain_resumed(f, index))
            return
        req = self.req
        assert req.ctx is not None
        req.chain.response(req.ctx, answer, index)
        self._respond(answer)

    def _chain_resumed(self, future: asyncio.Future[Response | None], index: int) -> None:
        req = self.req
        if self.state != IN_CHAIN or req.ctx is None:
            return  # the client went away meanwhile
        if future.cancelled() or future.exception() is not None:
            self.error(500, "middleware failed")
            return
        answer, index = req.chain.resume(req.ctx, index, future.result())
        if answer is not None:
            self._chain_answer(answer, index)
        else:
            self._endpoint()
        self.ds.flush()
        self.flush_upstream()

    def _endpoint(self) -> None:
        """The innermost element: a direct response, or the upstream."""
        req = self.req
        route = req.route
        assert route is not None
        ctx = req.ctx
        limit = ctx.max_body_size if ctx is not None else None
        if limit is not None:
            # A chunked body is checked as it streams (the connection's on_body); what
            # arrived while the request waited its turn (pipelined) is checked here.
            if (req.content_length or 0) > limit or req.body_size > limit:
                self.error(413, "request body too large")
                return
            req.body_limit = min(req.body_limit, limit)
        if route.respond is not None:
            if ctx is None:
                self._direct(route.respond)
            else:
                direct = route.respond
                resp = direct.response(self._placeholders() if direct.templated else None)
                req.chain.response(ctx, resp)
                self._respond(resp)
            return
        self._forward(self.p.pools[route.upstream])  # type: ignore[index]

    # -- answers proxyd makes ---------------------------------------------------------------
    def _answered(self, data: bytes, status: int, bytes_out: int, close: bool) -> None:
        """A whole response proxyd made is written: the exchange ends with it."""
        self.ds.send_answer(data)
        req = self.req
        req.status = self.resp_status = status
        req.bytes_out = self.bytes_out = bytes_out
        self.close_client = close
        self._end()

    def _direct(self, direct: DirectResponse) -> None:
        close = self.closes(discard=True)
        head_only = self.req.method == b"HEAD"
        if direct.templated:
            data, size = direct.render_filled(self._placeholders(), close=close,
                                              head_only=head_only)
        else:
            data = direct.render(close=close, head_only=head_only)
            size = 0 if head_only else len(direct.body)
        self._answered(data, direct.status, size, close)

    def _placeholders(self) -> tuple[bytes, ...]:
        """The values of a templated respond's placeholders (router.PLACEHOLDERS): scheme,
        host (the Host's name, without port), path (normalised, as routed), query (with its
        "?", or nothing), request id."""
        req, ds = self.req, self.ds
        scheme = req.xfp if ds.trusted_peer and req.xfp else ds.scheme
        host = normalize_host(req.host) or b""
        query = b"?" + req.query if req.query else b""
        return scheme, host, req.path, query, self.request_id().encode()

    def _respond(self, resp: Response) -> None:
        """A response made by middleware or proxyd itself, rendered with its length."""
        close = self.closes(discard=True)
        data, size = render_response(resp, close=close, head=self.req.method == b"HEAD")
        self._answered(data, resp.status, size, close)

    def error(self, status: int, message: str, extra: bytes = b"") -> None:
        """An error answer, ending the exchange; once the client has the response head (or
        the exchange is over) there is nothing to answer with: see fail()."""
        req = self.req
        close = self.closes()
        head_only = req.method == b"HEAD"
        if req.ctx is None:
            data = error_response(status, message, self.request_id(), close=close,
                                  head_only=head_only, extra=extra)
            size = 0 if head_only else body_length(data)
        else:
            # Errors pass the route's response hooks too (CORS, trace id, security headers).
            resp = json_response(status, message, req.ctx.id(), parse_fields(extra))
            req.chain.response(req.ctx, resp)
            data, size = render_response(resp, close=close, head=head_only)
            status = resp.status  # a hook may have answered instead (stale-if-error)
        self._answered(data, status, size, close)

    def fail(self, status: int, message: str) -> None:
        """The request cannot go on (the client's body timed out or went over a limit, the
        upstream failed): an error answer, or, once the client has part of the response, a
        truncated one — it must not look complete."""
        state = self.state
        if state >= TUNNEL:
            return
        if state == RELAYING:
            self.req.status = self.resp_status or 502
            self.req.bytes_out = self.bytes_out
            self.close_client = True
            self.body_cut = True  # the upstream connection is closed, never reused
            self._end()
        else:
            self.body_cut = True
            self.error(status, message)

    def client_gone(self) -> None:
        """The client connection closed mid-exchange (nginx's 499, "client closed request");
        the upstream connection cannot be reused."""
        if self.state >= TUNNEL:
            return
        req = self.req
        req.status = 499
        req.bytes_out = self.bytes_out  # what was relayed before
        self.close_client = True
        self.body_cut = True
        self._end()

    # -- the upstream: tries ----------------------------------------------------------------
    def _forward(self, pool: UpstreamPool) -> None:
        """The request's head for the upstream, then the first try (at once, or when the
        upstream's admission lets it through)."""
        req, ds = self.req, self.ds
        route = req.route
        assert route is not None
        self._move(CONNECTING)
        self.pool = pool
        if req.expect is not None and req.http11 and not req.body_done:
            ds.send_continue()
        ctx = req.ctx
        path = req.path
        target = route.rewrite_path(path) if route.strip_prefix or route.rewrite else path
        if req.query or req.url.endswith(b"?"):
            target += b"?" + req.query
        drop = REQUEST_DROP | req.conn_tokens if req.conn_tokens else REQUEST_DROP
        # What middleware removes (trace_id: the inbound id) is tested on its own: a union
        # with the drop set would copy that set on every request.
        removed = ctx.remove_request if ctx is not None and ctx.remove_request else None
        parts = request_start(req.method, target)
        if (route.websocket is not None and req.upgrade == b"websocket" and req.ws_key
                and not req.has_body):
            # A fresh key towards the upstream; the client's Accept is computed from its own.
            req.ws_upstream_key = new_key()
            drop = drop | {b"sec-websocket-key"}
            parts += (b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: ",
                      req.ws_upstream_key, CRLF)
        for lname, name, value in req.headers:
            if lname not in drop and lname != b"host" and (removed is None
                                                            or lname not in removed):
                parts += (name, b": ", value, CRLF)
        if ctx is not None:
            for name, value in ctx.set_request:
                parts += (name, b": ", value, CRLF)
        memo = ds.forwarded_memo
        if memo is not None and memo[0] == req.host and req.via is None:
            parts.append(memo[1])
        else:
            forwarded = forwarded_fields(
                ds.client_ip, ds.trusted_peer, req.xff, req.xfp, req.xfh, req.host,
                req.via, ds.scheme,
            )
            parts.append(forwarded)
            if not ds.trusted_peer and req.via is None:
                # From an untrusted peer, without Via, the lines depend on the Host alone
                # (address and scheme are the connection's): kept for its next request.
                ds.forwarded_memo = (req.host, forwarded)
        if ds.cert_fields:
            parts.append(ds.cert_fields)
        if req.chunked:
            parts.append(b"Transfer-Encoding: chunked\r\n")
        elif req.content_length is not None:
            parts.append(b"Content-Length: %d\r\n" % req.content_length)
        self.head = b"".join(parts)
        # None: the target's own host is sent (preserve_host: false).
        self.host_line = b"Host: " + req.host + CRLF if pool.preserve_host and req.host else None
        # Inside the client's read the clock is fresh; a start from another callback
        # (middleware that waited on Redis) reads it again, as the total deadline is armed
        # from it (timers.Deadlines).
        if not ds.parsing:
            pool.deadlines.now = monotonic()
        self.started_at = pool.deadlines.now
        self.timeouts = route.timeouts if route.timeouts is not None else pool.timeouts
        if req.grpc_timeout:
            # gRPC's own deadline (grpc-timeout) bounds the whole exchange.
            self.timeouts = self.timeouts.within(req.grpc_timeout)
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
        assert pool is not None
        pool.budget.requests += 1
        if pool.ring is not None:
            self.key = pool.hash_key(self.ds.client_ip, req.headers)
        if req.has_body and pool.replay_limit and (req.method in pool.retry_methods
                                                   or pool.multiplexed) \
                and (req.content_length or 0) <= pool.replay_limit:
            # Small enough to replay: keep what is sent. (Over HTTP/2 for any method: a
            # stream the upstream refused unprocessed may be retried whatever its method.)
            self.sent_body = []
        target = pool.pick(self.key)
        if target is None:
            self.refuse("unavailable", "no healthy upstream target")
            return
        self._try(target)

    def _try(self, target: TargetPool) -> None:
        self.tries += 1
        self.target = target
        if self.timeouts.per_try:
            self.try_deadline = target.deadlines.now + self.timeouts.per_try
            total = self.total_deadline
            self.deadline = min(self.try_deadline, total) if total else self.try_deadline
        target.acquire(self)

    def waiting_for(self, target: TargetPool) -> bool:
        """Still waiting for a connection from ``target`` (not gone, timed out, or moved)."""
        return self.state == CONNECTING and self.conn is None and self.target is target

    def queued(self) -> bool:
        """Still waiting for an upstream slot (pool.admit queued it)."""
        return self.state == CONNECTING

    def attach(self, conn: UpstreamConnection) -> None:
        """Called by the pool with a connection, at once (idle hit) or after connecting."""
        req, ds = self.req, self.ds
        self._move(AWAITING_HEAD if req.body_done else SENDING)
        self.conn = conn
        conn.start(self)
        if ds.write_paused:
            conn.pause_reading()  # (which also holds the read timeout)
        host = self.host_line or b"Host: " + conn.pool.host_header + CRLF
        pool = self.pool
        assert pool is not None
        if pool.proxy_header is not None:
            conn.send(self._proxy_header())  # a new connection: never pooled (upstream.py)
        chunked = req.chunked
        conn.send_head(upstream_head(self.head, host), not req.has_body)
        for chunk in req.pending:
            conn.send_body(chunk, chunked)
        if self.sent_body is not None:
            self.sent_body += req.pending
        req.pending.clear()
        if req.body_done and req.has_body:
            conn.end_body(chunked)
        if not ds.parsing:
            # Else the client's data_received flushes once it has parsed the whole read: the
            # head and the body bytes that came with it leave in one write, and a framing
            # error later in that read drops the head before any byte of it is sent.
            conn.flush()
        ds.resume_reading_for_pending()

    def _proxy_header(self) -> bytes:
        """The client's address and the listener's, as a PROXY protocol header."""
        pool = self.pool
        assert pool is not None and pool.proxy_header is not None
        ds = self.ds
        transport = ds.transport
        peer = transport.get_extra_info("peername") if transport is not None else None
        local = transport.get_extra_info("sockname") if transport is not None else None
        src_port = peer[1] if peer else 0
        dst, dst_port = (local[0], local[1]) if local else ("127.0.0.1", 0)
        return pool.proxy_header(ds.client_ip.decode(), src_port, dst, dst_port)

    # -- the request body -------------------------------------------------------------------
    def body(self, chunk: bytes) -> None:
        """A piece of the client's body: to the upstream, or kept until it is connected."""
        if self.body_cut:
            return  # answered already; the rest of the body is discarded
        conn = self.conn
        if conn is not None:
            sent = self.sent_body
            if sent is not None:
                pool = self.pool
                assert pool is not None
                if self.req.body_size > pool.replay_limit:
                    self.sent_body = None  # too big to replay: no retry once it went out
                else:
                    sent.append(chunk)
            conn.send_body(chunk, self.req.chunked)
            # The read timeout counts from the last byte either way: while the request is
            # still being sent, the upstream owes no answer yet.
            conn.deadline = conn.pool.deadlines.now + self.timeouts.read
        else:
            pending = self.req.pending
            pending.append(chunk)
            if sum(map(len, pending)) > PENDING_BODY_LIMIT:
                self.ds.pause_reading_for_pending()

    def body_end(self) -> None:
        """The client's body is complete."""
        if self.state == SENDING:
            self._move(AWAITING_HEAD)
        if self.conn is not None and not self.body_cut:
            self.conn.end_body(self.req.chunked)

    def flush_upstream(self) -> None:
        if self.conn is not None:
            self.conn.flush()

    def pause_upstream(self) -> None:
        """The client's socket buffer is full: stop reading the upstream's response."""
        if self.conn is not None:
            self.conn.pause_reading()

    def resume_upstream(self) -> None:
        if self.conn is not None:
            self.conn.resume_reading()

    # -- the upstream failing ---------------------------------------------------------------
    def refuse(self, reason: str, message: str) -> None:
        """503 at once: the circuit breaker, a full queue, or no target up."""
        if self.state >= TUNNEL:
            return
        pool = self.pool
        assert pool is not None
        self.p.metrics.upstream_rejected.inc((pool.name, reason))
        self.error(503, message)

    def _retry(self, *, sent: bool, same_ok: bool) -> bool:
        """Start another try if this one may be repeated; False: the caller gives up.

        ``sent``: the request (or part of it) may have reached the upstream, so only the
        retry methods qualify, and a body only when it was kept whole. ``same_ok``: the same
        target may take it again (a pooled connection that was stale, not a failing target).
        """
        pool, req = self.pool, self.req
        assert pool is not None
        if (not RETRYABLE >> self.state & 1 or self.interim_sent
                or self.tries >= pool.retry_attempts):
            return False
        if sent and (req.method not in pool.retry_methods
                     or (req.has_body and (self.sent_body is None
                                           or req.body_size > pool.max_body))):
            return False
        if not pool.budget.allow():
            return False
        target = pool.pick(self.key, self.target)  # another target, preferably
        if target is None and same_ok:
            target = pool.pick(self.key)
        if target is None:
            return False
        pool.budget.spend()
        self.p.metrics.upstream_retries.inc((pool.name,))
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.drop()
        self._move(CONNECTING)
        if self.sent_body:
            req.pending[:0] = self.sent_body  # replayed ahead of what is still to come
            self.sent_body = []
        self._try(target)
        return True

    def connect_failed(self, status: int, message: str, kind: str) -> None:
        """The pool could not connect for this try: nothing was sent, any method may retry."""
        if not self._retry(sent=False, same_ok=False):
            self.upstream_failed(status, message, kind)

    def on_deadline(self) -> None:
        """The exchange's own deadline (timed exchanges only): per-try or total timeout."""
        pool = self.pool
        assert pool is not None
        now = pool.deadlines.now
        total = self.total_deadline
        if total and now >= total:
            self.upstream_failed(504, "upstream total timeout", ERROR_TIMEOUT)
            return
        if self.try_deadline and now >= self.try_deadline and not self.resp_status:
            self.try_deadline = 0.0
            if self.target is not None:
                pool.try_failed(self.target)
            if not self._retry(sent=self.conn is not None, same_ok=False):
                self.upstream_failed(504, "upstream per-try timeout", ERROR_TIMEOUT)
            return
        self.deadline = total

    def upstream_failed(self, status: int, message: str, kind: str) -> None:
        """Connect error, bad response, timeout: an error answer if nothing was sent yet."""
        if self.state >= TUNNEL:
            return
        pool = self.pool
        assert pool is not None
        self.p.metrics.upstream_errors.inc((pool.name, kind))
        # The client gets a short reason (the part before any ": "); what follows it (an OS
        # or TLS error, a parser's complaint) is for the operator's log, never the client.
        reason, _, detail = message.partition(": ")
        if detail:
            UPSTREAM_ERRORS.warning("request %s: upstream %s: %s", self.request_id(),
                                    pool.name, message)
        self.fail(status, reason)

    def upstream_lost(self, conn: UpstreamConnection) -> None:
        """The upstream connection closed (or was reset) while this exchange had it."""
        state = self.state
        if state >= TUNNEL:
            return
        if state == RELAYING and self.read_to_close:
            self._complete(False)  # a close-delimited body ends here
            return
        if RETRYABLE >> state & 1:
            # Closed before any answer. A pooled connection the upstream closed as we reused
            # it is a race, not a failing target: the same target may take the retry. A
            # stream an HTTP/2 upstream said it never processed (GOAWAY, REFUSED_STREAM) may
            # be retried whatever its method.
            stale = conn.reused and self.conn is conn
            # (Unprocessed, but with a body that was sent and not kept: it cannot go again.)
            unprocessed = conn.unprocessed and (not self.req.has_body
                                                or self.sent_body is not None)
            if not stale and not unprocessed and self.target is not None:
                self.pool.try_failed(self.target)  # type: ignore[union-attr]
            self.conn = None
            if self._retry(sent=not unprocessed, same_ok=stale or unprocessed):
                return
        self.upstream_failed(502, "upstream closed the connection", ERROR_RESET)

    def upstream_timeout(self) -> None:
        """The upstream's read timeout: nothing came from it for that long."""
        if RETRYABLE >> self.state & 1:
            if self.target is not None:
                self.pool.try_failed(self.target)  # type: ignore[union-attr]
            if self._retry(sent=True, same_ok=False):
                return
        self.upstream_failed(504, "upstream read timeout", ERROR_TIMEOUT)

    def protocol_error(self, message: str) -> None:
        """The upstream's bytes are not an HTTP response we can relay."""
        self.upstream_failed(502, message, ERROR_PROTOCOL)

    # -- the upstream's response ------------------------------------------------------------
    def on_interim(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]]
                   ) -> None:
        """A 1xx. 100 was answered by proxyd itself; others (103 Early Hints) are relayed to
        HTTP/1.1 clients and are never the final response."""
        if status != 100 and self.req.http11:
            self.ds.send_interim(status, reason, filtered_fields(headers))
            self.interim_sent = True

    def on_head(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]]) -> int:
        """The final response head. Returns how many body bytes may go to the client as
        they come, past the parser (a Content-Length body nothing looks at), else 0. When
        the head starts a retry instead, the exchange has let go of this connection."""
        pool = self.pool
        assert pool is not None
        if pool.watch_status:
            pool.response(self.target, status)  # type: ignore[arg-type]
        else:
            self.target.failures = 0  # type: ignore[union-attr]  # an answer: not failing
        if status in pool.retry_statuses and self._retry(sent=True, same_ok=False):
            return 0  # decided before any byte of this response went to the client
        if self.timed:
            self.deadline = self.total_deadline  # the head is in: the per-try limit is over
        self.resp_status = status
        req = self.req
        ctx = req.ctx
        no_body = req.method == b"HEAD" or status in NO_BODY_STATUSES
        f: ResponseFields = relay_fields(headers, ctx is not None)
        length = f.length
        conn = self.conn
        # HTTP/1.1 without a length or chunks: the body ends with the connection. (HTTP/2
        # frames every body: END_STREAM ends it.)
        self.read_to_close = length is None and not f.chunked and not no_body \
            and conn is not None and not conn.frames_bodies
        raw = 0
        if ctx is None:
            fields = f.fields
            if length is not None:
                fields += b"Content-Length: " + length + CRLF
                if not no_body:
                    raw = f.size
            self._send_head(status, reason, fields, length is not None, no_body)
        else:
            resp = f.response(status, reason)
            if not no_body and req.chain.wants_body(ctx, resp):
                self._move(BUFFERING)
                self.resp = resp
                self.buffer = []  # the head waits for the body (etag); CL ≤ its max_size
                return 0
            req.chain.response(ctx, resp)
            raw = self._send_middleware_head(resp, no_body, length)
        if req.method == b"HEAD":
            # llhttp cannot be told "no body": the exchange ends at the head.
            conn = self.conn
            self._complete(conn is not None and conn.keeps_alive())
            return 0
        return raw

    def _send_head(self, status: int, reason: bytes, fields: bytes, has_length: bool,
                   no_body: bool) -> None:
        """The final response head, to the client connection, which frames the body."""
        req, ds = self.req, self.ds
        length_known = has_length or no_body
        # Answered before the request body ended: the body's remainder is discarded and
        # neither connection can carry another message. A body of unknown length that the
        # client cannot have framed (HTTP/1.0) ends with the connection.
        close = self.closes(unframed=not length_known and not ds.frames_any_length(req))
        self.close_client = close
        # An HTTP/1.1 upstream that answers before the body ended will not read the rest;
        # an HTTP/2 one may (gRPC's bidirectional streams): the body goes on.
        conn = self.conn
        self.body_cut = not req.body_done and (conn is None or not conn.frames_bodies)
        ds.send_head(req, status, reason, fields, length_known, close)
        self.resp_status = status  # what the client got (middleware may have changed it)
        self._move(RELAYING)

    def _send_middleware_head(self, resp: Response, no_body: bool, length: bytes | None
                              ) -> int:
        """``length``: the upstream's Content-Length. When no hook touches the body and the
        client is told that same length, the body goes out past the parser: its size is
        returned (else 0)."""
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
        if resp.body is not None and not no_body and self.req.method != b"HEAD":
            self.ds.send_body(resp.body)
            self.bytes_out += len(resp.body)
        return resp.upstream_length if raw else 0

    def on_body(self, data: bytes) -> None:
        """A piece of the response body, as the parser read it."""
        if self.buffer is not None:
            self.buffer.append(data)
            return
        if self.drop or self.state != RELAYING:
            return
        filters = self.filters
        if filters is not None:
            for body_filter in filters:
                data = body_filter.feed(data)
            if not data:
                return
        self.bytes_out += len(data)
        self.ds.send_body(data)

    def on_raw(self, data: bytes | memoryview) -> None:
        """A piece of a body on_head let pass the parser: to the client as it came."""
        self.bytes_out += len(data)
        self.ds.send_raw(data)

    def on_end(self, keep_alive: bool) -> None:
        """The response is complete; ``keep_alive``: the upstream may carry another."""
        if self.buffer is not None:
            self._send_buffered()
        self._complete(keep_alive and not self.read_to_close)

    def on_trailers(self, fields: list[tuple[bytes, bytes]]) -> None:
        """An HTTP/2 upstream's trailers (gRPC's status): relayed where the client can take
        them, at the end of the body."""
        self.trailers = fields

    def read_done(self) -> None:
        """The upstream's read was handled: what it produced goes to the client."""
        self.ds.flush()

    def _complete(self, reusable: bool) -> None:
        """The response went out whole."""
        filters = self.filters
        if filters is not None and not self.drop:
            tail = b""
            for body_filter in filters:  # each filter's tail goes through the next one
                tail = (body_filter.feed(tail) if tail else b"") + body_filter.finish()
            if tail:
                self.bytes_out += len(tail)
                self.ds.send_body(tail)
        if self.trailers is not None and not self.drop:
            self.ds.send_trailers(self.trailers)
        else:
            self.ds.end_body()
        req = self.req
        req.status = self.resp_status
        req.bytes_out = self.bytes_out
        self._end(reusable and req.body_done)

    def _send_buffered(self) -> None:
        resp, body = self.resp, b"".join(self.buffer or ())
        self.buffer = None
        req = self.req
        assert resp is not None and req.ctx is not None
        resp.body = body
        req.chain.response(req.ctx, resp)
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
            self.ds.send_body(body)
            self.bytes_out += len(body)

    def on_upgrade(self, headers: list[tuple[bytes, bytes]] | None, rest: bytes) -> None:
        """The upstream switched protocols: answer the client's WebSocket handshake, then
        both connections are a Tunnel."""
        req, ds, conn = self.req, self.ds, self.conn
        if headers is None or req.ws_upstream_key is None or conn is None:
            self.protocol_error("upstream switched protocols on a plain HTTP route")
            return
        assert req.ws_key is not None
        got = next((v.strip() for n, v in headers if n.lower() == b"sec-websocket-accept"), b"")
        if got != accept_key(req.ws_upstream_key):
            self.protocol_error("upstream sent a wrong Sec-WebSocket-Accept")
            return
        chosen = [(name, value) for name, value in headers
                  if name.lower() in (b"sec-websocket-protocol", b"sec-websocket-extensions")]
        ds.send_answer(switching_protocols(accept_key(req.ws_key), chosen))
        ds.flush()
        self._move(TUNNEL)
        if self.admitted or self.timed:
            self._leave()
        self.resp_status = req.status = 101
        self.conn = None
        route = req.route
        assert route is not None and route.websocket is not None
        ds.start_tunnel(conn, route.websocket, self, rest)

