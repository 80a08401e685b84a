"""HTTP/2 heads: a stream's request fields into a Request, a response's into HTTP/2 fields.

A request's header block has been decoded by h2 and is checked here with h2's own validation
(``h2.utilities.validate_headers``: lowercase names, no connection-specific fields, TE only
"trailers", pseudo-fields first and once each), so that a malformed request is a stream error
of its own stream (RFC 9113 §8.1.1) rather than the whole connection's. What passes becomes a
Request exactly as the HTTP/1.1 parser would have made it, so routing, middleware, the cache
and the upstream see one kind of request: ``:authority`` is its Host, ``:path`` its target;
a body without a Content-Length goes to an HTTP/1.1 upstream chunked; split Cookie fields are
joined again (RFC 9113 §8.2.3).

Responses reach a stream as HTTP/1.1 field lines (downstream.py); they are split back into
pairs with lowercase names, and the connection-specific fields (RFC 9113 §8.2.2) dropped.
"""

from __future__ import annotations

import json
import urllib.parse
from typing import TYPE_CHECKING, Final

from h2.exceptions import ProtocolError
from h2.utilities import HeaderValidationFlags, validate_headers

from proxyd.proxy.head import CRLF
from proxyd.proxy.request import SPECIAL, Reject, Request, special_header

if TYPE_CHECKING:
    from proxyd.proxy.limits import ClientLimits

__all__ = ["Malformed", "connection_specific", "request_of", "response_fields", "split_answer"]

REQUEST_FLAGS: Final = HeaderValidationFlags(
    is_client=False, is_trailer=False, is_response_header=False, is_push_promise=False)
TRAILER_FLAGS: Final = HeaderValidationFlags(
    is_client=False, is_trailer=True, is_response_header=False, is_push_promise=False)

# Never sent on HTTP/2 (RFC 9113 §8.2.2): a response relayed from HTTP/1.1 loses them.
CONNECTION_SPECIFIC: Final = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade",
})


class Malformed(Exception):
    """A request that HTTP/2 forbids: its stream is reset with PROTOCOL_ERROR."""


def connection_specific(name: bytes) -> bool:
    return name in CONNECTION_SPECIFIC


def check_trailers(headers: list[tuple[bytes, bytes]]) -> None:
    try:
        for _ in validate_headers(headers, TRAILER_FLAGS):
            pass
    except ProtocolError as exc:
        raise Malformed(str(exc)) from None


def request_of(headers: list[tuple[bytes, bytes]], end_stream: bool, limits: ClientLimits
               ) -> Request:
    """The Request of a stream's header block. Raises Malformed (a stream error), or Reject
    (a limit: answered with its status, as on HTTP/1.1)."""
    try:
        for _ in validate_headers(headers, REQUEST_FLAGS):
            pass
    except ProtocolError as exc:
        raise Malformed(str(exc)) from None
    req = Request()
    method = path = authority = None
    cookies: list[bytes] = []
    size = 0
    fields = req.headers
    for name, value in headers:
        if name[:1] == b":":
            if name == b":method":
                method = value
            elif name == b":path":
                path = value
            elif name == b":authority":
                authority = value
            continue
        if name == b"cookie":
            cookies.append(value)
            continue
        if name == b"host":
            if req.host is not None:
                raise Malformed("duplicate host field")
            req.host = value
            continue
        if name.find(b"_") >= 0 and limits.underscores != "allow":
            if limits.underscores == "reject":
                raise Reject(400, "underscore in a header field name", "underscore_header")
            continue
        if name == b"grpc-timeout":
            req.grpc_timeout = grpc_timeout(value)
        size += len(name) + len(value) + 4  # as an HTTP/1.1 line: the same limit means the same
        fields.append((name, name, value))
        if name in SPECIAL:
            special_header(req, name, value)
    if cookies:
        fields.append((b"cookie", b"cookie", b"; ".join(cookies)))
    if size > limits.max_header_size:
        raise Reject(431, "request header section too large")
    if len(fields) > limits.max_headers:
        raise Reject(431, "too many request header fields")
    if method is None:
        raise Malformed("no :method")
    req.method = method
    if method == b"CONNECT":
        raise Reject(405, "CONNECT is not proxied")
    if not path:
        raise Malformed("no :path")
    if len(path) > limits.max_uri_size:
        raise Reject(414, "request URI too long")
    if not path.startswith(b"/") and not (path == b"*" and method == b"OPTIONS"):
        raise Malformed("request target must be origin-form")
    req.url = path
    if authority is not None:
        if not authority or b"@" in authority:
            raise Malformed("unusable :authority")
        if req.host is not None and req.host != authority:
            raise Malformed(":authority and host differ")
        req.host = authority
    elif req.host is None:
        raise Malformed("no :authority and no host")
    req.http11 = True  # HTTP/1.1 semantics towards the upstream: keep-alive, chunked, 1xx
    req.keep_alive = True
    length = req.content_length
    if end_stream:
        if length:
            raise Malformed("content-length and no body")
        req.body_done = True
    else:
        req.has_body = True
        if length is None:
            req.chunked = True  # an HTTP/1.1 upstream needs the body framed
        elif length > limits.max_body_size:
            raise Reject(413, "request body too large")
    req.body_limit = limits.max_body_size
    req.header_bytes = size
    return req


# grpc-timeout's units (gRPC over HTTP/2: "TimeoutValue TimeoutUnit", at most 8 digits).
_GRPC_UNITS: Final = {72: 3600.0, 77: 60.0, 83: 1.0, 109: 1e-3, 117: 1e-6, 110: 1e-9}  # HMSmun


def grpc_timeout(value: bytes) -> float:
    """Seconds; 0.0 for a value that is not one (ignored, as gRPC servers ignore it)."""
    digits, unit = value[:-1], value[-1:]
    if not digits.isdigit() or len(digits) > 8 or not unit:
        return 0.0
    return int(digits) * _GRPC_UNITS.get(unit[0], 0.0)


def is_grpc(req: Request) -> bool:
    for name, _, value in req.headers:
        if name == b"content-type":
            return value.startswith(b"application/grpc")
    return False


# What an HTTP status proxyd answered means as a gRPC status: the gRPC spec's mapping of HTTP
# statuses, except that proxyd's own timeouts are DEADLINE_EXCEEDED and its limits (rate,
# size, concurrency) RESOURCE_EXHAUSTED, as they are for a gRPC server.
GRPC_STATUS: Final = {
    400: 13, 401: 16, 403: 7, 404: 12, 405: 12, 408: 4, 413: 8, 414: 8, 417: 13, 429: 8,
    431: 8, 500: 13, 502: 14, 503: 14, 504: 4,
}
GRPC_UNKNOWN: Final = 2


def grpc_answer(status: int, fields: list[tuple[bytes, bytes]], body: bytes
                ) -> list[tuple[bytes, bytes]]:
    """A response proxyd made for a gRPC request, as a trailers-only gRPC response: HTTP 200,
    the gRPC status and message (the error and request id of the JSON body, if any)."""
    message = b""
    request_id = b""
    for name, value in fields:
        if name == b"x-request-id":
            request_id = value
    try:
        parsed = json.loads(body) if body.startswith(b"{") else None
    except ValueError:
        parsed = None
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), str):
        message = parsed["error"].encode()
    if request_id:
        message += b" (request id " + request_id + b")"
    code = GRPC_STATUS.get(status, GRPC_UNKNOWN)
    out = [(b":status", b"200"), (b"content-type", b"application/grpc"),
           (b"grpc-status", b"%d" % code),
           (b"grpc-message", urllib.parse.quote(message.strip(), safe=" ()").encode())]
    out += [(n, v) for n, v in fields if n not in _NOT_FOR_GRPC]
    return out


# Of a local answer's fields, those a trailers-only gRPC response does not carry.
_NOT_FOR_GRPC: Final = frozenset({b"content-type", b"content-length", b"grpc-status",
                                  b"grpc-message"})


def response_fields(fields: bytes) -> list[tuple[bytes, bytes]]:
    """HTTP/1.1 field lines as HTTP/2 pairs: names lowercased, connection-specific ones out."""
    out: list[tuple[bytes, bytes]] = []
    for line in fields.split(CRLF):
        name, sep, value = line.partition(b":")
        if not sep:
            continue
        lname = name.strip().lower()
        if lname in CONNECTION_SPECIFIC:
            continue
        out.append((lname, value.strip()))
    return out


def split_answer(data: bytes) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """A whole HTTP/1.1 response proxyd rendered: its status, fields and body."""
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, _, fields = head.partition(CRLF)
    return int(status_line[9:12]), response_fields(fields), body
