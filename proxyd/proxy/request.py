"""A request as the client side parses it: the fields the data plane and middleware read."""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from proxyd.proxy.field_rules import connection_tokens

if TYPE_CHECKING:
    from proxyd.middleware.base import Context
    from proxyd.proxy.exchange import Exchange
    from proxyd.proxy.router import CompiledRoute

from proxyd.middleware.chain import Chain

NO_CHAIN: Final = Chain([])

SPECIAL: Final = frozenset({
    b"host", b"content-length", b"transfer-encoding", b"connection", b"expect",
    b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"via", b"x-request-id",
    b"upgrade", b"sec-websocket-key", b"proxy-connection",
})


# gateway_client_limits_total{limit} of a refused request, by its status where that says it.
REFUSALS: Final = {408: "header_timeout", 413: "body_too_large", 414: "uri_too_long",
                   431: "header_too_large"}


class Reject(Exception):
    """Raised inside a parser callback: answer ``status`` and close. ``reason`` is the label
    it is counted under; by default the status's (REFUSALS), else "malformed"."""

    def __init__(self, status: int, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.reason = reason or REFUSALS.get(status, "malformed")


class Request:
    __slots__ = (
        "_id",
        "body_done",
        "body_limit",
        "body_size",
        "bytes_out",
        "chain",
        "chunked",
        "close_requested",
        "conn_tokens",
        "content_length",
        "ctx",
        "discard",
        "exchange",
        "expect",
        "grpc_timeout",
        "has_body",
        "head_bytes",
        "header_bytes",
        "headers",
        "host",
        "http11",
        "inbound_id",
        "keep_alive",
        "method",
        "observed",
        "path",
        "pending",
        "query",
        "route",
        "route_name",
        "started",
        "status",
        "upgrade",
        "upgrade_body",
        "url",
        "via",
        "ws_key",
        "ws_upstream_key",
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
        self.body_limit = 0  # server limit, narrowed by the route's chain at dispatch
        self.pending: list[bytes] = []
        self.http11 = True
        self.keep_alive = True
        self.close_requested = False
        self.expect: bytes | None = None
        self.conn_tokens: set[bytes] | None = None  # None: no Connection/Proxy-Connection
        self.xff: bytes | None = None
        self.xfp: bytes | None = None
        self.xfh: bytes | None = None
        self.via: bytes | None = None
        self.inbound_id: bytes | None = None
        self.exchange: Exchange | None = None
        # Set when the request is answered (dispatch), read by middleware and observation.
        self.path = b""
        self.query = b""
        self.route: CompiledRoute | None = None
        self.route_name = ""
        self.ctx: Context | None = None
        self.chain: Chain = NO_CHAIN
        self.started = 0.0
        self.status = 0
        self.bytes_out = 0
        self.observed = False
        self.upgrade: bytes | None = None
        # Asked to upgrade and has a body: llhttp skipped the body (it reads everything after
        # the head as the new protocol); a second parser reads it (connection.UpgradeBody).
        self.upgrade_body = False
        self.ws_key: bytes | None = None  # the client's Sec-WebSocket-Key
        self.ws_upstream_key: bytes | None = None  # ours, towards the upstream
        self.discard = False
        self.grpc_timeout = 0.0  # seconds a gRPC client gave the call (grpc-timeout); 0: none
        self._id: str | None = None


def special_header(req: Request, lname: bytes, value: bytes) -> None:
    """Fields the data plane needs from a request head, recorded as they are parsed."""
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
    elif lname == b"proxy-connection":
        # Never forwarded (hop-by-hop) and names no field, but llhttp reads its keep-alive and
        # close like Connection's: on_headers_complete must not infer the version without it.
        if req.conn_tokens is None:
            req.conn_tokens = set()
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
    elif lname == b"upgrade":
        req.upgrade = value.strip().lower()
    elif lname == b"sec-websocket-key":
        req.ws_key = value.strip()
