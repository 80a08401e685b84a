"""What an exchange needs of its client: who it is, and how a response reaches it.

An Exchange (exchange.py) is protocol-neutral. Its client is an HTTP/1.1 connection
(connection.ClientConnection) or one stream of an HTTP/2 connection (h2_stream.Http2Stream);
both are a Downstream. The exchange hands it a response's parts — ``send_head``, ``send_body``,
``send_raw``, ``end_body``, or a whole ``send_answer`` — and the downstream frames them for its
protocol; it pauses the exchange's upstream when the client is not keeping up, and is told when
the exchange is over (``exchange_ended``).

Heads reach a downstream as HTTP/1.1 field lines (``Name: value\\r\\n``): that is what the
upstream's head is re-rendered into, what middleware renders, and what HTTP/1.1 — the common
case — writes as it is. An HTTP/2 stream splits them again (h2_fields.py).

A native base class rather than a Protocol: the compiled build calls through its vtable. Its
methods are abstract: each kind of client implements every one (an HTTP/2 stream refuses
start_tunnel, as HTTP/2 never upgrades).
"""

from __future__ import annotations

from abc import abstractmethod
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import asyncio

    from proxyd.config.models import WebSocket
    from proxyd.proxy.exchange import Exchange
    from proxyd.proxy.field_rules import Piece
    from proxyd.proxy.limits import ClientLimits
    from proxyd.proxy.pipeline import Pipeline
    from proxyd.proxy.request import Request
    from proxyd.proxy.upstream import UpstreamConnection

__all__ = ["Downstream"]


class Downstream:
    # Who the client is (set by the connection; a stream copies its connection's).
    p: Pipeline
    limits: ClientLimits
    transport: asyncio.Transport | None
    client_ip: bytes
    trusted_peer: bool
    scheme: bytes  # of the listener: X-Forwarded-Proto
    cert_fields: bytes  # lines naming a verified client certificate, for upstreams
    # Per connection: the last Host and what it matched / the X-Forwarded-* lines it gave.
    forwarded_memo: tuple[bytes | None, bytes] | None
    host_memo: tuple[bytes | None, bytes | None] | None
    # The connection's state as an exchange's decisions need it.
    requests: int  # requests (or streams) this connection has carried
    close_after: bool  # the connection closes after the response in flight
    parsing: bool  # inside a read: the upstream's writes wait for its end
    write_paused: bool  # the client's socket (or stream window) is full

    # -- a response's parts -------------------------------------------------------------------
    @abstractmethod
    def send_answer(self, data: bytes) -> None:
        """A whole response proxyd rendered (HTTP/1.1 bytes, with its Content-Length)."""

    @abstractmethod
    def send_continue(self) -> None:
        """100 Continue, to a client that waits for it before sending its body."""

    @abstractmethod
    def send_interim(self, status: int, reason: bytes, fields: bytes) -> None:
        """A 1xx other than 100 (103 Early Hints); never the final response."""

    @abstractmethod
    def frames_any_length(self, req: Request) -> bool:
        """Whether a body of unknown length can be framed for this client."""

    @abstractmethod
    def send_head(self, req: Request, status: int, reason: bytes, fields: bytes,
                  length_known: bool, close: bool) -> None:
        """The final response head, framed for the client (``close``: HTTP/1.1 only)."""

    @abstractmethod
    def send_body(self, data: bytes) -> None:
        """A piece of the response body."""

    @abstractmethod
    def send_raw(self, data: Piece) -> None:
        """A piece of a body whose length the head gave, as it was read."""

    @abstractmethod
    def end_body(self) -> None:
        """The response is complete."""

    def send_trailers(self, fields: list[tuple[bytes, bytes]]) -> None:
        """The response's trailers, which end it. HTTP/1.1 clients get the end alone."""
        self.end_body()

    @abstractmethod
    def flush(self) -> None:
        """Write what was queued (or, on HTTP/2, once the read being handled is done)."""

    # -- the exchange's end and its request body -----------------------------------------------
    @abstractmethod
    def exchange_ended(self, ex: Exchange) -> None:
        """The exchange is over: record it, and go on (next request, close, forget the stream)."""

    @abstractmethod
    def start_tunnel(self, conn: UpstreamConnection, settings: WebSocket,
                     ex: Exchange, rest: bytes) -> None:
        """The upstream accepted a WebSocket upgrade: relay both ways from now on."""

    @abstractmethod
    def pause_reading_for_pending(self) -> None:
        """The request body piled up while the upstream connection is being opened."""

    @abstractmethod
    def resume_reading_for_pending(self) -> None:
        """The upstream took what was held: the request body may come again."""

    @abstractmethod
    def pause_reading_for_upstream(self) -> None:
        """The upstream's socket is full: stop taking the request body."""

    @abstractmethod
    def resume_reading_for_upstream(self) -> None:
        """The upstream's socket has room again."""
