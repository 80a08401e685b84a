"""The answering side of a client connection: each request, in order, to its answer.

Routing, the middleware chain's request hooks, and the endpoint: a direct response, a response
proxyd makes itself (chain answers, errors), or an upstream exchange (forward.py), whose end
hands the connection on to the next queued request. A mixin of DownstreamProtocol
(downstream.py), which owns the connection: parsing, deadlines, reading and writing.
"""

from __future__ import annotations

import asyncio
from abc import abstractmethod
from collections import deque
from typing import Final

from proxyd.middleware.base import Context, Pending, Response, json_response
from proxyd.proxy.forward import Exchange
from proxyd.proxy.head import (
    CRLF,
    body_length,
    error_response,
    parse_fields,
    render_response,
    request_start,
)
from proxyd.proxy.headers import REQUEST_DROP, Piece, forwarded_fields
from proxyd.proxy.path import BadPath, needs_normalizing, normalize_path
from proxyd.proxy.pipeline import Pipeline, req_id
from proxyd.proxy.request import Reject, Request
from proxyd.proxy.router import DirectResponse, normalize_host
from proxyd.proxy.websocket import Tunnel, new_key

# Reasons to stop reading from the client; reading resumes when none is left.
PAUSE_PIPELINE: Final = 1  # a pipelined request waits for the one in flight
PAUSE_UPSTREAM: Final = 2  # the upstream socket's write buffer is full
PAUSE_PENDING: Final = 4  # body bytes piled up while the upstream connection is being opened


class Answering:
    """Dispatch, local answers and errors of DownstreamProtocol; no state of its own.

    The I/O methods below stand for DownstreamProtocol's, which override them: a base class,
    not a mixin of declarations only, because the compiled build needs every method defined.
    """

    # The connection's state, kept by DownstreamProtocol (declared for the type checker).
    p: Pipeline
    scheme: bytes
    transport: asyncio.Transport | None
    client_ip: bytes
    tls_version: str  # "TLSv1.3", ...; "" on plain HTTP: for the access log
    trusted_peer: bool
    forwarded_memo: tuple[bytes | None, bytes] | None
    host_memo: tuple[bytes | None, bytes | None] | None
    req: Request | None
    active: Request | None
    queue: deque[Request]
    deadline: float
    closed: bool
    requests: int
    close_after: bool
    tunnel: Tunnel | None
    cert_fields: bytes
    ws_early: list[bytes] | None
    reading_body: bool
    _paused: int
    _advancing: bool

    @abstractmethod
    def send(self, data: Piece) -> None: ...

    @abstractmethod
    def flush(self) -> None: ...

    @abstractmethod
    def close(self) -> None: ...

    @abstractmethod
    def abort(self) -> None: ...

    @abstractmethod
    def _pause(self, reason: int) -> None: ...

    @abstractmethod
    def _resume(self, reason: int) -> None: ...

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
            if self.req is None:
                if self.p.draining:
                    self.close()  # idle between requests: the only state a drain closes
                else:
                    self.deadline = self.p.deadlines.now + self.p.keepalive_timeout
            elif not self.reading_body:
                # The next request's head began while this one was in flight (pipelined) and
                # is still unfinished: it gets the header timeout, or it could idle forever.
                self.deadline = self.p.deadlines.now + self.p.header_timeout

    def must_close(self, req: Request) -> bool:
        # An upgrade the upstream refused: what the client sent after it is not HTTP.
        # The keep-alive cap: the last request a connection may carry says so.
        return (not req.keep_alive or req.close_requested or self.p.draining or self.close_after
                or req.ws_upstream_key is not None
                or self.requests >= self.p.max_keepalive_requests)

    def request_id(self, req: Request) -> str:
        if req.ctx is not None:
            return req.ctx.id()  # trace_id may have taken the client's, or made one
        return req_id(req, self.p)

    def _dispatch(self, req: Request) -> None:
        self.active = req
        self.requests += 1
        p = self.p
        p.requests += 1
        # The clock this read refreshed (timers.Deadlines): no second reading per request.
        req.started = p.deadlines.now
        path, _, query = req.url.partition(b"?")
        if needs_normalizing(path):
            # Routed and forwarded in one form only, or a spelling could dodge a route.
            try:
                path = normalize_path(path, p.keep_encoded_slashes)
            except BadPath as exc:
                p.metrics.inc("gateway_client_limits_total", ("bad_path",))
                self.send_error(req, 400, exc.message)
                return
        req.path, req.query = path, query
        if ((path == p.probe_live or path == p.probe_ready)
                and (builtin := p.builtin(req.method, path)) is not None):
            req.route_name = "_health"
            self._send_direct(req, builtin)
            return
        hdrs = {k: v for k, _, v in req.headers} if p.router.needs_headers else {}
        host = req.host
        memo = self.host_memo  # a connection's requests nearly always name the same Host
        if memo is not None and memo[0] == host:
            matched_host = memo[1]
        else:
            matched_host = normalize_host(host)
            self.host_memo = (host, matched_host)
        route, wrong_method = p.router.match(req.method, matched_host, path, hdrs)
        if route is None:
            if wrong_method is not None:
                req.route_name = wrong_method.name
                self.send_error(req, 405, "method not allowed", extra=wrong_method.allow_header)
            else:
                self.send_error(req, 404, "no route")
            return
        req.route = route
        req.route_name = route.name
        if req.expect is not None and req.expect != b"100-continue":
            self.send_error(req, 417, "unsupported expectation")
            return
        chain = route.chain
        if chain:
            ctx = req.ctx = Context(req.method, path, query, req.host, req.headers,
                                    self.client_ip, route.name, p.request_id_maker,
                                    req.xfp if self.trusted_peer and req.xfp else self.scheme)
            if req.inbound_id is not None:
                ctx.request_id = req_id(req, p)  # as on routes without middleware
            req.chain = chain
            answer, index = chain.request(ctx)
            if answer is not None:
                self._chain_answer(req, answer, index)
                return
        self._endpoint(req)

    def _chain_answer(self, req: Request, answer: Response | Pending, index: int) -> None:
        if isinstance(answer, Pending):
            # Only this request waits (Redis); its body keeps arriving into req.pending.
            answer.future.add_done_callback(lambda f: self._chain_resumed(req, f, index))
            return
        assert req.ctx is not None
        req.chain.response(req.ctx, answer, index)
        self._send_response(req, answer)

    def _chain_resumed(self, req: Request, future: asyncio.Future[Response | None],
                       index: int) -> None:
        # Compared through a local: narrowing self.active here would let the compiled build
        # assume it still holds a Request below, after _chain_answer may have cleared it.
        active = self.active
        if self.closed or active is not req or req.ctx is None:
            return
        if future.cancelled() or future.exception() is not None:
            self.send_error(req, 500, "middleware failed")
            return
        answer, index = req.chain.resume(req.ctx, index, future.result())
        if answer is not None:
            self._chain_answer(req, answer, index)
            if self.active is None and not self.closed:
                self._advance()  # answered locally, late: start what was pipelined behind it
        else:
            self._endpoint(req)
        self.flush()
        ex = req.exchange
        if ex is not None and ex.conn is not None:
            ex.conn.flush()

    def _endpoint(self, req: Request) -> None:
        """The innermost element: a direct response, or the upstream exchange."""
        route = req.route
        assert route is not None
        ctx = req.ctx
        limit = ctx.max_body_size if ctx is not None else None
        if limit is not None:
            # A chunked body is checked as it streams (on_body); what arrived while the
            # request waited its turn (pipelined) is checked here.
            if (req.content_length or 0) > limit or req.body_size > limit:
                self.send_error(req, 413, "request body too large")
                return
            req.body_limit = min(req.body_limit, limit)
        if route.respond is not None:
            if ctx is None:
                self._send_direct(req, route.respond)
            else:
                direct = route.respond
                resp = direct.response(self._placeholders(req) if direct.templated else None)
                req.chain.response(ctx, resp)
                self._send_response(req, resp)
            return
        pool = self.p.pools[route.upstream]  # type: ignore[index]
        if req.expect is not None and req.http11 and not req.body_done:
            self.send(b"HTTP/1.1 100 Continue\r\n\r\n")
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
        memo = self.forwarded_memo
        if memo is not None and memo[0] == req.host and req.via is None:
            parts.append(memo[1])
        else:
            forwarded = forwarded_fields(
                self.client_ip, self.trusted_peer, req.xff, req.xfp, req.xfh, req.host,
                req.via, self.scheme,
            )
            parts.append(forwarded)
            if not self.trusted_peer and req.via is None:
                # From an untrusted peer, without Via, the lines depend on the Host alone
                # (address and scheme are the connection's): kept for its next request.
                self.forwarded_memo = (req.host, forwarded)
        if self.cert_fields:
            parts.append(self.cert_fields)
        if req.chunked:
            parts.append(b"Transfer-Encoding: chunked\r\n")
        elif req.content_length is not None:
            parts.append(b"Content-Length: %d\r\n" % req.content_length)
        host_line = b"Host: " + req.host + CRLF if pool.preserve_host and req.host else None
        # self is the DownstreamProtocol this mixin is part of.
        Exchange(self, req, pool).start(b"".join(parts), host_line)  # type: ignore[arg-type]

    def _send_direct(self, req: Request, direct: DirectResponse) -> None:
        close = self.must_close(req) or (req.expect is not None and not req.body_done)
        head_only = req.method == b"HEAD"
        if direct.templated:
            data, req.bytes_out = direct.render_filled(self._placeholders(req), close=close,
                                                       head_only=head_only)
            self.send(data)
        else:
            self.send(direct.render(close=close, head_only=head_only))
            req.bytes_out = 0 if head_only else len(direct.body)
        req.status = direct.status
        self._local_done(req, close)

    def _placeholders(self, req: Request) -> tuple[bytes, ...]:
        """The values of a templated respond's placeholders (router.PLACEHOLDERS): scheme,
        host (the Host's name, without port), path (normalised, as routed), query (with its
        "?", or nothing), request id."""
        scheme = req.xfp if self.trusted_peer and req.xfp else self.scheme
        host = normalize_host(req.host) or b""
        query = b"?" + req.query if req.query else b""
        return scheme, host, req.path, query, self.request_id(req).encode()

    def _send_response(self, req: Request, resp: Response) -> None:
        """A response made by middleware or proxyd itself, rendered with its length."""
        close = self.must_close(req) or (req.expect is not None and not req.body_done)
        data, req.bytes_out = render_response(resp, close=close, head=req.method == b"HEAD")
        self.send(data)
        req.status = resp.status
        self._local_done(req, close)

    def _local_done(self, req: Request, close: bool) -> None:
        """A response proxyd wrote itself is out; the request body, if any, is dropped."""
        # The exchange: the upstream of a 502/504.
        self.p.observe(req, self.client_ip, req.exchange, self.tls_version)
        if close:
            self.close()
            return
        if req.body_done:
            self.active = None
        else:
            req.discard = True  # on_message_complete releases the connection
            req.pending.clear()

    def send_error(self, req: Request, status: int, message: str, extra: bytes = b"",
                   kind: str | None = None) -> None:
        # A body still on the wire after an error answer: close rather than read it all.
        close = self.must_close(req) or not req.body_done
        head_only = req.method == b"HEAD"
        if req.ctx is None:
            data = error_response(status, message, self.request_id(req), close=close,
                                  head_only=head_only, extra=extra)
            req.bytes_out = 0 if head_only else body_length(data)
        else:
            # Errors pass the route's response hooks too (CORS, trace id, security headers).
            resp = json_response(status, message, req.ctx.id(), parse_fields(extra))
            req.chain.response(req.ctx, resp)
            data, req.bytes_out = render_response(resp, close=close, head=head_only)
            status = resp.status  # a hook may have answered instead (stale-if-error)
        self.send(data)
        req.status = status
        self._local_done(req, close)
        if self.active is None and not close:
            self._advance()
        self.flush()

    def start_tunnel(self, tunnel: Tunnel, exchange: Exchange) -> None:
        """The upstream accepted the upgrade: this connection is a WebSocket relay now."""
        req = exchange.req
        req.status = 101
        self.p.observe(req, self.client_ip, exchange, self.tls_version)
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

    def exchange_done(self, exchange: Exchange, *, close: bool) -> None:
        req = exchange.req
        req.status = exchange.resp_status
        req.bytes_out = exchange.bytes_out
        self.p.observe(req, self.client_ip, exchange, self.tls_version)
        req.exchange = None  # the Request <-> Exchange cycle: freed by refcount, not the GC
        self.active = None
        if close or self.close_after:
            self.close()
        else:
            self._advance()

    def _reject(self, refusal: Reject) -> None:
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
        status = refusal.status
        data = error_response(status, refusal.message, self.request_id(req), close=True)
        self.send(data)
        # Refused by the parser or a limit, dispatched or not: logged and counted like every
        # answered request (route "none" when it never reached one), and the reason counted.
        self.p.metrics.inc("gateway_client_limits_total", (refusal.reason,))
        if not req.started:
            req.started = self.p.deadlines.now
        req.status = status
        req.bytes_out = body_length(data)
        self.p.observe(req, self.client_ip, req.exchange, self.tls_version)
        self.close()
