"""One proxied exchange: a client request relayed to an upstream and its response relayed back.

Both bodies stream chunk by chunk; back-pressure runs both ways through pause/resume_reading.
Every message is re-framed by proxyd: Content-Length passes through, chunked is re-chunked, and
a close-delimited upstream body becomes chunked for HTTP/1.1 clients.

Exchange owns the state of one exchange, the request side, its tries (retries, timeouts,
failures) and its endings; the response side, which the response parser calls into, is the
ResponseRelay mixin (relay.py).
"""

from __future__ import annotations

import logging
from time import monotonic
from typing import TYPE_CHECKING, Final

import httptools

from proxyd.middleware.base import BodyFilter, Response
from proxyd.observe.throttle import ThrottledLog
from proxyd.proxy.head import CRLF, upstream_head
from proxyd.proxy.relay import NO_BODY_STATUSES, Abandoned, ResponseRelay
from proxyd.proxy.upstream_conn import ERROR_RESET, ERROR_TIMEOUT

if TYPE_CHECKING:
    from proxyd.proxy.downstream import DownstreamProtocol, Request
    from proxyd.proxy.upstream import TargetPool, Timeouts, UpstreamConnection, UpstreamPool

__all__ = ["NO_BODY_STATUSES", "PENDING_BODY_LIMIT", "Abandoned", "Exchange"]

UPSTREAM_ERRORS: Final = ThrottledLog(logging.getLogger("proxyd.upstream"))
PENDING_BODY_LIMIT: Final = 256 * 1024  # buffered before the upstream connects; then reading pauses


class Exchange(ResponseRelay):
    __slots__ = (
        "admitted",
        "body_cut",
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
        "raw_left",
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
        self.body_cut = False  # answered mid-body: the rest is dropped, the upstream unusable
        self.resp_started = False
        self.resp_status = 0
        self.resp_reason = b""
        self.resp_headers: list[tuple[bytes, bytes]] = []
        self.client_chunked = False
        self.read_to_close = False
        self.raw_left = 0  # Content-Length body bytes still to relay past the parser
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
        pool = self.pool
        # Inside the client's read the clock is fresh; a start from another callback
        # (middleware that waited on Redis) reads it again, as the total deadline is armed
        # from it (timers.Deadlines).
        if not self.ds.parsing:
            pool.deadlines.now = monotonic()
        self.started_at = pool.deadlines.now
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
        if self.pool.proxy_header is not None:
            conn.send(self._proxy_header(conn))  # a new connection: never pooled (upstream.py)
        conn.send(upstream_head(self.head, host))
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

    def _proxy_header(self, conn: UpstreamConnection) -> bytes:
        """The client's address and the listener's, as a PROXY protocol header."""
        make = self.pool.proxy_header
        assert make is not None
        ds = self.ds
        transport = ds.transport
        peer = transport.get_extra_info("peername") if transport is not None else None
        local = transport.get_extra_info("sockname") if transport is not None else None
        src_port = peer[1] if peer else 0
        dst, dst_port = (local[0], local[1]) if local else ("127.0.0.1", 0)
        return make(ds.client_ip.decode(), src_port, dst, dst_port)

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

    # -- endings ----------------------------------------------------------------------------
    def _finish(self, *, reusable: bool) -> None:
        self.done = True
        # The parser holds this exchange's bound methods: a reference cycle per request that
        # only the cyclic GC would free (a heavy share of a worker's CPU). Callbacks still
        # running in this feed check self.done and never touch the parser again.
        self.parser = None
        conn, self.conn = self.conn, None
        if conn is not None:
            # The client's connection closing (Connection: close, the keep-alive cap) is no
            # reason to drop the upstream's: it is reusable if the whole request went out.
            if reusable and not self.body_cut:
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

    def connect_failed(self, status: int, message: str, kind: str) -> None:
        """The pool could not connect for this try: nothing was sent, any method may retry."""
        if not self._retry(sent=False, same_ok=False):
            self.upstream_failed(status, message, kind)

    def on_deadline(self) -> None:
        """The exchange's own deadline (timed exchanges only): per-try or total timeout."""
        now = self.pool.deadlines.now
        total = self.total_deadline
        if total and now >= total:
            self.upstream_failed(504, "upstream total timeout", ERROR_TIMEOUT)
            return
        if self.try_deadline and now >= self.try_deadline and not self.resp_status:
            self.try_deadline = 0.0
            if self.target is not None:
                self.pool.try_failed(self.target)
            if not self._retry(sent=self.conn is not None, same_ok=False):
                self.upstream_failed(504, "upstream per-try timeout", ERROR_TIMEOUT)
            return
        self.deadline = total

    def upstream_failed(self, status: int, message: str, kind: str) -> None:
        """Connect error, bad response, timeout: an error answer if nothing was sent yet."""
        if self.done:
            return
        self.done = True
        if self.admitted or self.timed:
            self._leave()
        self.ds.p.metrics.inc("gateway_upstream_errors_total", (self.pool.name, kind))
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.exchange = None
            conn.close()
        # The client gets a short reason (the part before any ": "); what follows it (an OS
        # or TLS error, a parser's complaint) is for the operator's log, never the client.
        reason, _, detail = message.partition(": ")
        if detail:
            UPSTREAM_ERRORS.warning("request %s: upstream %s: %s", self.ds.request_id(self.req),
                                    self.pool.name, message)
        if self.resp_started:
            self.ds.abort()  # a truncated response must not look complete
        else:
            self.ds.send_error(self.req, status, reason)

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
        self.upstream_failed(502, "upstream closed the connection", ERROR_RESET)

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
        self.upstream_failed(504, "upstream read timeout", ERROR_TIMEOUT)

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
