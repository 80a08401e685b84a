"""Every HTTP/1.1 message head proxyd writes, as bytes: one module for the wire format.

Status lines, field lines (with the pre-rendered blocks middleware add), the final response
head the relay writes for an upstream's response, the heads of responses proxyd makes itself
(errors, local answers), the head of a request towards an upstream, and the 101 that answers
a WebSocket handshake. Which fields go where is decided elsewhere (field_rules.py: the
intermediary rules); here they only become bytes. Built for the hot path: parts are joined
once, and status lines are made once per status and reason.
"""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import TYPE_CHECKING, Final, cast

if TYPE_CHECKING:
    from proxyd.middleware.base import Response

# (index of the first field, the pairs, their lines rendered): see Response.add_block.
Block = tuple[int, list[tuple[bytes, bytes]], bytes]

CRLF: Final = b"\r\n"
REQUEST_VERSION: Final = b" HTTP/1.1\r\n"  # proxyd speaks HTTP/1.1 to every upstream

STATUS_LINES: Final[dict[int, bytes]] = {
    s.value: b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode("latin-1")) for s in HTTPStatus
}


# Status lines with the upstream's own reason phrase, made once: formatting one costs far more
# than the lookup, and an upstream uses a handful ("200 OK" every time). Bounded: reasons are
# the upstream's.
_REASON_LINES: Final[dict[tuple[int, bytes], bytes]] = {}
REASON_LINES_MAX: Final = 256


def status_line(status: int, reason: bytes | None = None) -> bytes:
    if reason:
        line = _REASON_LINES.get((status, reason))
        if line is None:
            line = b"HTTP/1.1 %d %s\r\n" % (status, reason)
            if len(_REASON_LINES) < REASON_LINES_MAX:
                _REASON_LINES[(status, reason)] = line
        return line
    return STATUS_LINES.get(status) or b"HTTP/1.1 %d Unknown\r\n" % status



def response_head(status: int, reason: bytes, fields: bytes, framing: bytes) -> bytes:
    """The head of a relayed response: ``fields`` rendered, ``framing`` the Transfer-Encoding
    and Connection lines the client needs."""
    return status_line(status, reason) + fields + framing + CRLF


# The framing and Connection lines of a relayed response head, at index
# chunked * 4 + close * 2 + http11 (a tuple read by an int: no key to build per response).
_FRAMING: Final[tuple[bytes, ...]] = tuple(
    (b"Transfer-Encoding: chunked\r\n" if chunked else b"")
    + (b"Connection: close\r\n" if close else b"" if http11 else b"Connection: keep-alive\r\n")
    for chunked in (False, True) for close in (False, True) for http11 in (False, True)
)


def framing(chunked: bool, close: bool, http11: bool) -> bytes:
    """The lines that say how a response body is framed and whether the connection stays:
    Transfer-Encoding when chunked; Connection: close, or keep-alive for an HTTP/1.0 client
    that keeps it."""
    return _FRAMING[(4 if chunked else 0) + (2 if close else 0) + (1 if http11 else 0)]


def request_start(method: bytes, target: bytes) -> list[bytes]:
    """The first pieces of a request head towards an upstream; field lines are appended to
    the list, which upstream_head joins with the Host line (known only once a target is)."""
    return [method, b" ", target, REQUEST_VERSION]


def upstream_head(head_without_host: bytes, host_line: bytes) -> bytes:
    return head_without_host + host_line + CRLF


def switching_protocols(accept: bytes, fields: list[tuple[bytes, bytes]]) -> bytes:
    """A 101 answering a client's WebSocket handshake; ``fields``: the upstream's
    subprotocol and extension choices."""
    lines = [b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
             b"Connection: Upgrade\r\nSec-WebSocket-Accept: ", accept, CRLF]
    for name, value in fields:
        lines += (name, b": ", value, CRLF)
    lines.append(CRLF)
    return b"".join(lines)


def fixed_head(status: int, fields: list[tuple[bytes, bytes]], length: int) -> bytes:
    """A configured direct response's head up to its Connection line (made at load)."""
    return status_line(status) + render_fields(fields) + b"Content-Length: %d\r\n" % length


def render_fields(headers: list[tuple[bytes, bytes]], blocks: list[Block] | None = None
                  ) -> bytes:
    """"Name: value\r\n" lines; parts joined once (faster than a line per field).

    The list is made at its full size, CRLFs in place: compiled, filling slots costs a third
    less than growing the list by four parts a field.
    ``blocks``: runs of fields appended with their lines rendered already (Response.add_block).
    """
    if blocks is not None:
        return _render_with_blocks(headers, blocks)
    parts = [CRLF] * (4 * len(headers))
    i = 0
    for name, value in headers:
        parts[i] = name
        parts[i + 1] = b": "
        parts[i + 2] = value
        i += 4
    return b"".join(parts)


def _render_with_blocks(headers: list[tuple[bytes, bytes]], blocks: list[Block]) -> bytes:
    """Each block still in place — the very pair objects it was made of, in order, at its
    index — is one piece instead of four a field (a join pays for every piece).
    A block that fields removed before it have moved, or a field of it changed, is rendered
    field by field like the rest: correct either way, only slower."""
    # Two passes with the same test: the blocks in place, to size the list; then the filling.
    covered = used = at = 0
    for start, fields, _ in blocks:
        if start >= at and _in_place(cast("list[object]", headers), start,
                                     cast("list[object]", fields)):
            covered += len(fields)
            used += 1
            at = start + len(fields)
    if not used:
        return render_fields(headers)
    parts = [CRLF] * (4 * (len(headers) - covered) + used)  # as render_fields makes it
    i = k = at = 0
    for start, fields, lines in blocks:
        if start >= at and _in_place(cast("list[object]", headers), start,
                                     cast("list[object]", fields)):
            k = _fill(headers, i, start, parts, k)
            parts[k] = lines
            k += 1
            i = at = start + len(fields)
    _fill(headers, i, len(headers), parts, k)
    return b"".join(parts)


def _fill(headers: list[tuple[bytes, bytes]], i: int, stop: int, parts: list[bytes], k: int
          ) -> int:
    """Fields i..stop into parts from k on (CRLFs already there); returns the next k."""
    while i < stop:
        name, value = headers[i]
        parts[k] = name
        parts[k + 1] = b": "
        parts[k + 2] = value
        k += 4
        i += 1
    return k


def _in_place(headers: list[object], start: int, fields: list[object]) -> bool:
    # Typed as objects: compiled, a pair read as tuple[bytes, bytes] would be unpacked and
    # boxed again into a new tuple, never identical to the block's.
    if start + len(fields) > len(headers):
        return False
    for i, field in enumerate(fields):  # noqa: SIM110  (all(genexpr) costs more, compiled)
        if headers[start + i] is not field:
            return False
    return True


def error_body(status: int, message: str, request_id: str) -> bytes:
    return json.dumps({"error": message, "request_id": request_id}).encode()


def error_response(
    status: int, message: str, request_id: str, *, close: bool, head_only: bool = False,
    extra: bytes = b"",
) -> bytes:
    """A complete JSON error response; ``extra`` is preformatted header lines."""
    body = error_body(status, message, request_id)
    head = b"".join((
        status_line(status),
        b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body),
        b"X-Request-ID: ", request_id.encode(), CRLF,
        b"Connection: close\r\n" if close else b"",
        extra,
        CRLF,
    ))
    return head if head_only else head + body


def body_length(response: bytes) -> int:
    """Bytes after the head of a complete response made here (bytes_out of an error)."""
    return len(response) - response.index(b"\r\n\r\n") - 4


def parse_fields(fields: bytes) -> list[tuple[bytes, bytes]]:
    """Preformatted "Name: value\\r\\n" lines back into pairs (for the rare error paths)."""
    pairs = []
    for line in fields.split(CRLF):
        name, sep, value = line.partition(b":")
        if sep:
            pairs.append((name.strip(), value.strip()))
    return pairs


def render_response(resp: Response, *, close: bool, head: bool) -> tuple[bytes, int]:
    """A complete local response: (bytes, body length sent)."""
    body = resp.body or b""
    no_body = resp.status in (204, 304) or resp.status < 200
    lines = [status_line(resp.status, resp.reason or None)]
    headers = resp.headers
    rendered = resp.rendered
    if rendered is not None:  # a cache hit's stored fields (never a Content-Length among them)
        lines.append(rendered[0])
        headers = headers[rendered[1]:]
    for name, value in headers:
        if name.lower() != b"content-length":
            lines += (name, b": ", value, CRLF)
    if not no_body:
        lines.append(b"Content-Length: %d\r\n" % len(body))
    if close:
        lines.append(b"Connection: close\r\n")
    lines.append(CRLF)
    if head or no_body:
        return b"".join(lines), 0
    lines.append(body)
    return b"".join(lines), len(body)
