"""One HTTP/2 stream: the client side of one Exchange.

The exchange hands a stream what it hands an HTTP/1.1 connection (downstream.py); the stream
turns it into HEADERS and DATA frames through its connection's h2 state machine
(h2_connection.py), within the stream's and the connection's send windows. What does not fit
waits on the stream, and the exchange's upstream stops being read until the client opens its
window again: a client that stops reading stops the upstream read, and what a stream holds is
bounded by one upstream read beyond its window.

The request body flows the same way in the other direction: DATA is acknowledged (its window
given back) only once the bytes went on to the upstream, or into the bounded buffer that holds
them while the upstream connection is being opened.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Final

from h2.errors import ErrorCodes
from h2.exceptions import ProtocolError, StreamClosedError

from proxyd.proxy.downstream import Downstream
from proxyd.proxy.exchange import Exchange
from proxyd.proxy.h2_fields import grpc_answer, is_grpc, response_fields, split_answer
from proxyd.proxy.h2_state import send_within_windows
from proxyd.proxy.request import Reject

if TYPE_CHECKING:
    from proxyd.config.models import WebSocket
    from proxyd.proxy.field_rules import Piece
    from proxyd.proxy.h2_connection import Http2Connection
    from proxyd.proxy.request import Request
    from proxyd.proxy.upstream import UpstreamConnection

__all__ = ["Http2Stream"]

# Why the request body is not being taken: the upstream's socket is full, or the body piled up
# before the upstream connection was open. Its DATA is acknowledged once none is left.
HOLD_UPSTREAM: Final = 1
HOLD_PENDING: Final = 2
PROTOCOL_HTTP2: Final = 20  # the access log's "protocol": HTTP/2.0


class Http2Stream(Downstream):
    def __init__(self, conn: Http2Connection, stream_id: int, req: Request) -> None:
        self.conn = conn
        self.stream_id = stream_id
        self.req = req
        self.p = conn.p
        self.limits = conn.limits
        self.transport = conn.transport
        self.client_ip = conn.client_ip
        self.trusted_peer = conn.trusted_peer
        self.scheme = conn.scheme
        self.cert_fields = conn.cert_fields
        self.forwarded_memo = conn.forwarded_memo
        self.host_memo = conn.host_memo
        self.requests = conn.opened
        self.close_after = False
        self.parsing = conn.parsing  # set by the connection around each read
        self.write_paused = False
        self.exchange: Exchange | None = None
        self.head_sent = False
        self.head: list[tuple[bytes, bytes]] | None = None  # the final head, held (send_head)
        self.out: list[bytes] = []  # DATA waiting for window
        self.out_size = 0
        self.end_pending = False  # END_STREAM follows what waits
        self.trailers: list[tuple[bytes, bytes]] | None = None  # ... with these, if any
        self.ended = False  # the response is complete (END_STREAM sent, or reset)
        self.hold = 0  # HOLD_* reasons not to acknowledge request DATA yet
        self.unacked = 0  # request DATA bytes received, not yet acknowledged
        self.remote_done = False  # the client's END_STREAM (or reset)
        self.grpc = is_grpc(req)

    # -- the request --------------------------------------------------------------------------
    def start(self) -> None:
        self.remote_done = self.req.body_done
        self.p.requests += 1
        ex = self.exchange = Exchange(self, self.req)
        ex.dispatch()

    def data(self, data: bytes, flow_length: int) -> None:
        """Request DATA: to the exchange (which sends it on or keeps it), acknowledged now or
        once nothing holds it back."""
        req = self.req
        req.body_size += len(data)
        if self.hold:
            self.unacked += flow_length
        else:
            self.conn.acknowledge(self.stream_id, flow_length)
        if req.body_size > req.body_limit:
            self.refuse(Reject(413, "request body too large"))
            return
        ex = req.exchange
        if data and ex is not None and not req.discard:
            ex.body(data)

    def body_ended(self) -> None:
        self.remote_done = True
        req = self.req
        if req.body_done:
            return
        req.body_done = True
        ex = req.exchange
        if ex is not None:
            ex.body_end()

    def refuse(self, refusal: Reject) -> None:
        """A limit broken mid-body: the exchange's error (or a response cut short)."""
        self.p.metrics.client_limits.inc((refusal.reason,))
        ex = self.req.exchange
        if ex is not None:
            ex.fail(refusal.status, refusal.message)
        elif not self.ended:
            self.reset(ErrorCodes.CANCEL)

    def reset_by_client(self) -> None:
        """RST_STREAM from the client: the exchange ends as 499."""
        self.remote_done = True
        self.ended = True
        self.out.clear()
        ex = self.req.exchange
        if ex is not None:
            ex.client_gone()

    # -- Downstream: the response ---------------------------------------------------------------
    def _headers(self, headers: list[tuple[bytes, bytes]], end: bool) -> None:
        if self.ended:
            return
        try:
            self.conn.h2.send_headers(self.stream_id, headers, end_stream=end)
        except (ProtocolError, StreamClosedError):
            self.ended = True  # the client reset it meanwhile
            return
        if end:
            self.ended = True

    def send_answer(self, data: bytes) -> None:
        status, fields, body = split_answer(data)
        self.head_sent = True
        if self.grpc and status != 200:
            # A gRPC client reads its call's outcome in grpc-status, not in an HTTP status
            # or a JSON body: proxyd's own answers (errors, limits, refusals) say it there.
            self._headers(grpc_answer(status, fields, body), True)
            return
        headers = [(b":status", b"%d" % status), *fields]
        if body:
            self._headers(headers, False)
            self.send_body(body)
            self.end_body()
        else:
            self._headers(headers, True)

    def send_continue(self) -> None:
        self._headers([(b":status", b"100")], False)

    def send_interim(self, status: int, reason: bytes, fields: bytes) -> None:
        self._headers([(b":status", b"%d" % status), *response_fields(fields)], False)

    def frames_any_length(self, req: Request) -> bool:
        return True  # DATA frames, then END_STREAM

    def send_head(self, req: Request, status: int, reason: bytes, fields: bytes,
                  length_known: bool, close: bool) -> None:
        # Held until the body's first bytes, its end or the flush of this read: a response
        # whose end comes with its head leaves as one HEADERS frame with END_STREAM — which
        # is what a gRPC trailers-only response must stay.
        self.head_sent = True
        self.head = [(b":status", b"%d" % status), *response_fields(fields)]

    def _head_out(self, end: bool) -> bool:
        """Send a held head; True when it carried the end of the response."""
        head, self.head = self.head, None
        if head is None:
            return False
        self._headers(head, end)
        return end

    def send_body(self, data: bytes) -> None:
        if self.head is not None:
            self._head_out(False)
        if self.ended or not data:
            return
        if self.out:
            self.out.append(data)
            self.out_size += len(data)
            return
        self._send(data)

    def send_raw(self, data: Piece) -> None:
        self.send_body(bytes(data))

    def end_body(self) -> None:
        if self._head_out(True) or self.ended:
            return
        if self.out:
            self.end_pending = True
            return
        with contextlib.suppress(ProtocolError, StreamClosedError):
            self.conn.h2.end_stream(self.stream_id)
        self.ended = True

    def send_trailers(self, fields: list[tuple[bytes, bytes]]) -> None:
        if self.head is not None:
            self._head_out(False)
        if self.ended:
            return
        if self.out:
            self.trailers = fields  # after what waits for the window
            self.end_pending = True
            return
        self._headers(fields, True)

    def _send(self, data: bytes) -> None:
        """As much of ``data`` as the windows let through; the rest waits (and the upstream
        pauses) until the client opens them."""
        at = send_within_windows(self.conn.h2, self.stream_id, data)
        if at < 0:
            self.ended = True  # reset meanwhile
            self.out.clear()
            return
        if at < len(data):
            rest = data[at:]
            self.out.append(rest)
            self.out_size += len(rest)
            self.conn.blocked(self)
            if not self.write_paused:
                self.write_paused = True
                if self.exchange is not None:
                    self.exchange.pause_upstream()

    def window_opened(self) -> None:
        """The client opened this stream's window (or the connection's): what waits goes."""
        out = self.out
        if not out:
            return
        waiting = b"".join(out)
        out.clear()
        self.out_size = 0
        self._send(waiting)
        if out:
            return
        if self.end_pending:
            self.end_pending = False
            trailers, self.trailers = self.trailers, None
            if trailers is not None:
                self._headers(trailers, True)
            else:
                self.end_body()
        if self.write_paused and not self.conn.write_paused:
            self.write_paused = False
            if self.exchange is not None:
                self.exchange.resume_upstream()
        self.conn.unblocked(self)
        self.conn.stream_done(self)

    def flush(self) -> None:
        if self.head is not None:
            self._head_out(False)
        if not self.conn.parsing:
            self.conn.flush_soon()

    def reset(self, code: int) -> None:
        if not self.ended or self.out:
            self.ended = True
            self.out.clear()
            with contextlib.suppress(ProtocolError, StreamClosedError):
                self.conn.h2.reset_stream(self.stream_id, code)
        self.remote_done = True

    # -- Downstream: the exchange's end ---------------------------------------------------------
    def exchange_ended(self, ex: Exchange) -> None:
        req = ex.req
        conn = self.conn
        self.p.observe(req, self.client_ip, ex, conn.tls_version, PROTOCOL_HTTP2)
        req.exchange = None
        self.exchange = None
        conn.forwarded_memo = self.forwarded_memo
        conn.host_memo = self.host_memo
        if not self.ended and not self.end_pending:
            # Ended without its end (the upstream failed mid-body, a timeout): the client
            # must see the response cut short, not complete.
            self.reset(ErrorCodes.INTERNAL_ERROR)
        conn.stream_done(self)
        if not conn.parsing:
            conn.flush_soon()

    def start_tunnel(self, conn: UpstreamConnection, settings: WebSocket, ex: Exchange,
                     rest: bytes) -> None:
        raise AssertionError("an HTTP/2 request never upgrades (Upgrade is forbidden on it)")

    # -- Downstream: holding the request body ---------------------------------------------------
    def _hold(self, reason: int) -> None:
        self.hold |= reason

    def _release(self, reason: int) -> None:
        if self.hold & reason:
            self.hold &= ~reason
            if not self.hold and self.unacked:
                unacked, self.unacked = self.unacked, 0
                self.conn.acknowledge(self.stream_id, unacked)
                if not self.conn.parsing:
                    self.conn.flush_soon()

    def pause_reading_for_pending(self) -> None:
        self._hold(HOLD_PENDING)

    def resume_reading_for_pending(self) -> None:
        self._release(HOLD_PENDING)

    def pause_reading_for_upstream(self) -> None:
        self._hold(HOLD_UPSTREAM)

    def resume_reading_for_upstream(self) -> None:
        self._release(HOLD_UPSTREAM)
