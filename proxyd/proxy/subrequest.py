"""Requests proxyd makes itself (an auth subrequest, a cache refresh), through the data
plane's own upstream client.

A ``Subrequest`` borrows connections from the same pools client requests use (upstream.py)
and takes the upstream connection's callbacks (upstream_conn.py) the way an exchange does, so
everything a pool does for a client request it does for these: balancing over the targets
its health checks and outlier detection leave up, the circuit breaker and ``max_concurrent``
admission, connect and read timeouts, retries within the retry budget, outcomes recorded for
outlier detection and the breaker, keep-alive reuse, the pool's connection counts. No client
connection is involved: the response is held in memory (up to ``max_body``) and given to the
caller through a Future, whole or as a failure.

Not a second HTTP client: the body is small and buffered, so none of the exchange's relaying,
filtering or back-pressure is needed, and its states are four.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from time import monotonic
from typing import TYPE_CHECKING, Final

from proxyd.proxy.field_rules import HOP_BY_HOP
from proxyd.proxy.head import CRLF, request_start, upstream_head
from proxyd.proxy.timers import Deadlines
from proxyd.proxy.upstream_conn import ERROR_PROTOCOL, ERROR_RESET, ERROR_TIMEOUT, Timeouts

if TYPE_CHECKING:
    from proxyd.proxy.router import CompiledRoute
    from proxyd.proxy.upstream import TargetPool, UpstreamConnection, UpstreamPool

__all__ = ["Answer", "Subrequest", "SubrequestError", "fetch"]

# What a failure was, besides upstream_conn's ERROR_* kinds (connect, timeout, reset,
# protocol): the body went past max_body; the pool refused it (the reasons of
# gateway_upstream_rejected_total: "open", "concurrency", "pending", "unavailable").
ERROR_TOO_LARGE: Final = "too_large"
ERROR_UNAVAILABLE: Final = "unavailable"

# The states (a subrequest only moves forward, except a retry, which goes back to CONNECTING
# from the two states before the response head).
CONNECTING: Final = 0  # waiting for admission, a target's connection, or connecting
AWAITING_HEAD: Final = 1  # the whole request went out
READING: Final = 2  # the head is in, the body is being read
DONE: Final = 3

# Fields the subrequest frames itself or that are about one connection.
_DROP: Final = HOP_BY_HOP | {b"host", b"content-length", b"expect"}
_NO_BODY_STATUSES: Final = frozenset({204, 304})
_WITH_BODY: Final = frozenset({b"POST", b"PUT", b"PATCH"})

# A cache refresh holds the whole response in memory before storing it.
FETCH_MAX_BODY: Final = 64 * 1024 * 1024


class Answer:
    """A whole response: status, reason phrase, fields as received, body."""

    __slots__ = ("body", "headers", "reason", "status")

    def __init__(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]],
                 body: bytes) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.body = body


class SubrequestError(Exception):
    """No answer: ``kind`` says why (ERROR_* above and in upstream_conn.py); the message is
    for a log, never for a client."""

    def __init__(self, kind: str, message: str, head: Answer | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        # ERROR_TOO_LARGE: the response's status, reason and fields (its body is empty).
        self.head = head


def fine_enough(deadlines: Deadlines, timeout: float) -> None:
    """Make the worker's sweep tick fine enough for ``timeout``: deadlines fire up to one
    tick late, and a subrequest's budget (forward_auth's timeout) may be shorter than any
    timeout the worker was built for."""
    tick = Deadlines.tick_for(timeout)
    if tick < deadlines.tick:
        deadlines.tick = tick


class Subrequest:
    """One request to an upstream pool that starts inside proxyd; ``start()`` gives the
    Future of its Answer (or SubrequestError). Cancelling that Future abandons it."""

    __slots__ = ("admitted", "body", "body_size", "chunks", "conn", "deadline", "ds",
                 "fields", "future", "head", "host_line", "max_body", "method", "pool",
                 "read_to_close", "reason", "state", "status", "target", "timed",
                 "timeouts", "total_deadline", "tries", "try_deadline")

    def __init__(self, pool: UpstreamPool, method: bytes, target: bytes,
                 headers: list[tuple[bytes, bytes]], body: bytes = b"", *,
                 timeout: float | None = None, max_body: int = 64 * 1024,
                 host: bytes | None = None) -> None:
        """``target``: the request target (path and query), sent as it is. ``headers``: the
        fields to send; framing and hop-by-hop ones are dropped (proxyd frames the request).
        ``timeout``: the whole subrequest's budget (else the pool's total_timeout, if any).
        ``host``: the Host to send; None sends the target's own."""
        self.pool = pool
        self.method = method
        self.body = body
        self.max_body = max_body
        parts = request_start(method, target)
        for name, value in headers:
            if name.lower() not in _DROP:
                parts += (name, b": ", value, CRLF)
        if body or method in _WITH_BODY:
            parts.append(b"Content-Length: %d\r\n" % len(body))
        self.head = b"".join(parts)
        self.host_line = b"Host: " + host + CRLF if host is not None else None
        self.timeouts: Timeouts = pool.timeouts
        self.future: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self.state = CONNECTING
        self.target: TargetPool | None = None
        self.conn: UpstreamConnection | None = None
        self.tries = 0
        self.admitted = False  # holds one of the pool's max_concurrent slots
        self.timed = False  # a member of the worker's deadlines
        self.deadline = 0.0
        self.total_deadline = timeout if timeout is not None else self.timeouts.total
        self.try_deadline = 0.0
        self.status = 0
        self.reason = b""
        self.fields: list[tuple[bytes, bytes]] = []
        self.chunks: list[bytes] = []
        self.body_size = 0
        self.read_to_close = False
        # The upstream connection pauses its writer's reader when its socket is full
        # (UpstreamConnection.pause_writing): a subrequest has no reader to pause, it
        # stands in for that reader itself.
        self.ds = self

    # -- the caller's side -----------------------------------------------------------------
    def start(self) -> asyncio.Future[Answer]:
        pool = self.pool
        deadlines = pool.deadlines
        deadlines.now = monotonic()  # not inside an upstream read: the clock may be a tick old
        budget = self.total_deadline
        if budget:
            fine_enough(deadlines, budget)
            self.deadline = self.total_deadline = deadlines.now + budget
            self.timed = True
            deadlines.add(self)
        if self.timeouts.per_try:
            fine_enough(deadlines, self.timeouts.per_try)
            if not self.timed:
                self.timed = True
                deadlines.add(self)
        self.future.add_done_callback(self._resolved)
        if pool.guarded:
            if not pool.admit(self):
                return self.future  # refused, or queued until begin()
            self.admitted = True
        self.begin()
        return self.future

    def _resolved(self, future: asyncio.Future[Answer]) -> None:
        if future.cancelled() and self.state != DONE:
            self._end(False)  # the caller stopped waiting: let go of everything

    # -- what the pool calls ---------------------------------------------------------------
    def begin(self) -> None:
        """The first try: at once, or when the pool's admission lets it through."""
        pool = self.pool
        pool.budget.requests += 1
        target = pool.pick()
        if target is None:
            self.refuse(ERROR_UNAVAILABLE, "no healthy upstream target")
            return
        self._try(target)

    def queued(self) -> bool:
        return self.state == CONNECTING

    def waiting_for(self, target: TargetPool) -> bool:
        return self.state == CONNECTING and self.conn is None and self.target is target

    def refuse(self, reason: str, message: str) -> None:
        """The pool would not take it: the breaker, a full queue, no target up."""
        metrics = self.pool.metrics
        if metrics is not None:
            metrics.upstream_rejected.inc((self.pool.name, reason))
        self._fail(reason, message, count=False)

    def attach(self, conn: UpstreamConnection) -> None:
        """A connection from the pool: the whole request goes out at once."""
        self.state = AWAITING_HEAD
        self.conn = conn
        conn.start(self)
        pool = self.pool
        if pool.proxy_header is not None:
            # No client behind this connection: the header says so (UNKNOWN / LOCAL-like
            # unspecified addresses), and such a connection is never pooled (upstream.py).
            conn.send(pool.proxy_header("0.0.0.0", 0, "::", 0))
        conn.send_head(upstream_head(
            self.head, self.host_line or b"Host: " + conn.pool.host_header + CRLF),
            not self.body)
        if self.body:
            conn.send_body(self.body, False)  # its head gave the Content-Length
            conn.end_body(False)
        conn.flush()

    def connect_failed(self, status: int, message: str, kind: str) -> None:
        """Nothing was sent: any method may be retried."""
        if not self._retry(sent=False, same_ok=False):
            self._fail(kind, message)

    def on_deadline(self) -> None:
        now = self.pool.deadlines.now
        total = self.total_deadline
        if total and now >= total:
            if self.state < READING and self.target is not None:
                # No answer within the budget: as slow as that counts against the target.
                self.pool.try_failed(self.target)
            self._fail(ERROR_TIMEOUT, "upstream total timeout")
            return
        if self.try_deadline and now >= self.try_deadline and self.state < READING:
            self.try_deadline = 0.0
            if self.target is not None:
                self.pool.try_failed(self.target)
            if not self._retry(sent=self.conn is not None, same_ok=False):
                self._fail(ERROR_TIMEOUT, "upstream per-try timeout")
            return
        self.deadline = total

    # -- what the upstream connection calls ------------------------------------------------
    def on_interim(self, status: int, reason: bytes,
                   headers: list[tuple[bytes, bytes]]) -> None:
        pass  # a 1xx is never the answer

    def on_head(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]]) -> int:
        pool = self.pool
        if pool.watch_status:
            pool.response(self.target, status)  # type: ignore[arg-type]
        else:
            self.target.failures = 0  # type: ignore[union-attr]  # an answer: not failing
        if status in pool.retry_statuses and self._retry(sent=True, same_ok=False):
            return 0
        self.state = READING
        if self.timed:
            self.deadline = self.total_deadline  # the head is in: the per-try limit is over
        self.status = status
        self.reason = reason
        self.fields = headers
        length = -1
        chunked = False
        for name, value in headers:
            lname = name.lower()
            if lname == b"content-length":
                length = int(value) if value.strip().isdigit() else -1
            elif lname == b"transfer-encoding":
                chunked = True
        no_body = self.method == b"HEAD" or status in _NO_BODY_STATUSES
        if length > self.max_body and not no_body:
            self._too_large()
            return 0
        conn = self.conn
        self.read_to_close = length < 0 and not chunked and not no_body \
            and conn is not None and not conn.frames_bodies
        if self.method == b"HEAD":
            # llhttp cannot be told "no body": it ends at the head.
            conn = self.conn
            self._complete(conn is not None and conn.keeps_alive())
        return 0  # every byte goes through the parser: a subrequest reads, never relays

    def on_body(self, data: bytes) -> None:
        if self.state != READING:
            return
        size = self.body_size = self.body_size + len(data)
        if size > self.max_body:
            self._too_large()
            return
        self.chunks.append(data)

    def on_raw(self, data: bytes | memoryview) -> None:
        self.on_body(bytes(data))  # (on_head never lets bytes past the parser)

    def on_end(self, keep_alive: bool) -> None:
        if self.state == READING:
            self._complete(keep_alive and not self.read_to_close)

    def on_trailers(self, fields: list[tuple[bytes, bytes]]) -> None:
        pass  # nothing proxyd asks for itself reads trailers

    def read_done(self) -> None:
        pass  # nothing to flush: the answer goes out whole, at the end

    def on_upgrade(self, headers: list[tuple[bytes, bytes]] | None, rest: bytes) -> None:
        self.protocol_error("upstream switched protocols on a subrequest")

    def protocol_error(self, message: str) -> None:
        self._fail(ERROR_PROTOCOL, message)

    def upstream_lost(self, conn: UpstreamConnection) -> None:
        state = self.state
        if state == DONE:
            return
        if state == READING and self.read_to_close:
            self._complete(False)  # a close-delimited body ends here
            return
        if state < READING:
            # A pooled connection the upstream closed as we reused it is a race, not a
            # failing target: the same target may take the retry.
            stale = conn.reused and self.conn is conn
            if not stale and self.target is not None:
                self.pool.try_failed(self.target)
            self.conn = None
            if self._retry(sent=True, same_ok=stale):
                return
        self.conn = None
        self._fail(ERROR_RESET, "upstream closed the connection")

    def upstream_timeout(self) -> None:
        if self.state < READING:
            if self.target is not None:
                self.pool.try_failed(self.target)
            if self._retry(sent=True, same_ok=False):
                return
        self._fail(ERROR_TIMEOUT, "upstream read timeout")

    # -- standing in for a client connection's reader (see __init__) -----------------------
    def pause_reading_for_upstream(self) -> None:
        pass  # the request was written whole; nothing more is coming to hold back

    def resume_reading_for_upstream(self) -> None:
        pass

    # -- tries and the end -----------------------------------------------------------------
    def _try(self, target: TargetPool) -> None:
        self.tries += 1
        self.target = target
        per_try = self.timeouts.per_try
        if per_try:
            self.try_deadline = target.deadlines.now + per_try
            total = self.total_deadline
            self.deadline = min(self.try_deadline, total) if total else self.try_deadline
        target.acquire(self)

    def _retry(self, *, sent: bool, same_ok: bool) -> bool:
        """Another try if this one may be repeated (the pool's retry settings and budget):
        ``sent``, only for the pool's retry methods; ``same_ok``, the same target may take
        it (a stale pooled connection)."""
        pool = self.pool
        if self.state >= READING or self.tries >= pool.retry_attempts:
            return False
        if sent and self.method not in pool.retry_methods:
            return False
        if not pool.budget.allow():
            return False
        target = pool.pick(b"", self.target)  # another target, preferably
        if target is None and same_ok:
            target = pool.pick()
        if target is None:
            return False
        pool.budget.spend()
        if pool.metrics is not None:
            pool.metrics.upstream_retries.inc((pool.name,))
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.drop()
        self.state = CONNECTING
        self._try(target)
        return True

    def _complete(self, reusable: bool) -> None:
        answer = Answer(self.status, self.reason, self.fields, b"".join(self.chunks))
        self._end(reusable)
        if not self.future.done():
            self.future.set_result(answer)

    def _too_large(self) -> None:
        """Past max_body: a failure, which still tells the head (a caller may answer with
        it); the connection, with the rest of the body unread, is closed."""
        head = Answer(self.status, self.reason, self.fields, b"")
        self._fail(ERROR_TOO_LARGE, "upstream response body too large", count=False, head=head)

    def _fail(self, kind: str, message: str, count: bool = True,
              head: Answer | None = None) -> None:
        """``count``: an upstream failure (gateway_upstream_errors_total), not a refusal or
        a limit of the caller's."""
        if self.state == DONE:
            return
        metrics = self.pool.metrics
        if count and metrics is not None:
            metrics.upstream_errors.inc((self.pool.name, kind))
        self._end(False)
        if not self.future.done():
            self.future.set_exception(SubrequestError(kind, message, head))

    def _end(self, reuse: bool) -> None:
        """The one end: the connection back to its pool (``reuse``: the response was read
        whole and the upstream keeps the connection open) or closed, the admission slot and
        the deadline given back."""
        self.state = DONE
        self.chunks = []
        conn, self.conn = self.conn, None
        if conn is not None:
            if reuse:
                conn.pool.release(conn)
            else:
                conn.drop()
        pool = self.pool
        if self.timed:
            pool.deadlines.discard(self)
        if self.admitted:
            pool.leave()
        self.timed = self.admitted = False  # (this runs once: the state is DONE now)


async def fetch(pools: Mapping[str, UpstreamPool], route: CompiledRoute, path: bytes,
                query: bytes, headers: list[tuple[bytes, bytes]], *,
                max_body: int = FETCH_MAX_BODY, timeout: float | None = None,
                ) -> tuple[int, list[tuple[bytes, bytes]], bytes] | None:
    """A GET to ``route``'s upstream outside any client exchange (a cache refresh): the
    path rewritten as the route rewrites it; Host as a client request on the route would
    send it (the client's, from ``headers``, with preserve_host; else the target's);
    ``timeout``: the whole fetch's budget (else the pool's total_timeout, if any; its
    connect and read timeouts hold either way). None when there is no answer (no target up,
    refused, a failure, a body past ``max_body``)."""
    if route.upstream is None:
        return None
    pool = pools[route.upstream]
    target = route.rewrite_path(path) if route.strip_prefix or route.rewrite else path
    if query:
        target += b"?" + query
    host = next((v for n, v in headers if n.lower() == b"host"), None) \
        if pool.preserve_host else None
    sub = Subrequest(pool, b"GET", target, headers, timeout=timeout, max_body=max_body,
                     host=host)
    try:
        answer = await sub.start()
    except SubrequestError:
        return None
    return answer.status, answer.headers, answer.body
