"""HTTP/1.1 intermediary header rules (RFC 9110 §7.6) and the byte strings the hot path joins.

Header names arrive from the parser as raw bytes; everything here works on lowercase names so a
field is classified with one set lookup.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable
from http import HTTPStatus
from typing import TYPE_CHECKING, Final, cast

if TYPE_CHECKING:
    import asyncio

    from proxyd.middleware.base import Response

# (index of the first field, the pairs, their lines rendered): see Response.add_block.
Block = tuple[int, list[tuple[bytes, bytes]], bytes]
# What a protocol queues for its transport: bytes, or a view of a read relayed as it came
# (ResponseRelay.feed_response: no copy of a large body).
Piece = bytes | memoryview

# Fields that describe one connection, never forwarded (RFC 9110 §7.6.1), plus the framing
# fields proxyd always writes itself (a forwarded message is re-framed, never byte-copied) and
# the forwarding fields it rewrites.
HOP_BY_HOP: Final = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
    b"transfer-encoding", b"upgrade", b"proxy-authenticate", b"proxy-authorization",
})
REQUEST_DROP: Final = HOP_BY_HOP | {
    b"content-length", b"expect", b"x-forwarded-for", b"x-forwarded-proto",
    b"x-forwarded-host", b"via",
}
RESPONSE_DROP: Final = HOP_BY_HOP | {b"content-length"}


def name_shape(name: bytes) -> int:
    """First letter (either case) and length of a field name, as an index of a shape table;
    0 for an empty name. Names of one shape may differ; names of two shapes always do."""
    return (name[0] & 31) << 5 | (len(name) & 31) if name else 0


def shape_table(names: frozenset[bytes]) -> bytes:
    table = bytearray(1024)
    table[0] = 1  # an empty name: let the exact test have it
    for name in names:
        table[name_shape(name)] = 1
    return bytes(table)


# A response field whose shape is not marked here is not dropped: on a route without
# middleware it is relayed without being lowered or looked up (most of an upstream's fields).
RESPONSE_DROP_SHAPES: Final = shape_table(RESPONSE_DROP)

VIA_TOKEN: Final = b"1.1 proxyd"
CRLF: Final = b"\r\n"
# Bytes: a last piece this large is written beside what precedes it (writev), not joined to
# it — joining copies the body once more; for small pieces one join is cheaper.
LARGE_WRITE: Final = 16 * 1024
_TOKEN_CHARS: Final = frozenset(
    b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
)

STATUS_LINES: Final[dict[int, bytes]] = {
    s.value: b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode("latin-1")) for s in HTTPStatus
}


# Status lines with the upstream's own reason phrase, made once: formatting one costs ~0.3 µs,
# and an upstream uses a handful ("200 OK" every time). Bounded: reasons are the upstream's.
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


# Field names as peers spell them → their lowercase form, one object per name: a dict
# lookup costs less than lower() and the hash a set test then makes of its new bytes object
# (~450 against ~600 instructions, compiled), and the object returned keeps its hash for
# every later test (the relay also looks up Connection's value here: keep-alive, close).
# Bounded (a peer inventing names only fills it); one table for requests and one for
# responses, so clients cannot fill the upstreams' one.
REQUEST_NAMES: Final[dict[bytes, bytes]] = {}
RESPONSE_NAMES: Final[dict[bytes, bytes]] = {}
NAMES_MAX: Final = 512


def lower_name(name: bytes, names: dict[bytes, bytes]) -> bytes:
    lname = names.get(name)
    if lname is None:
        lname = name.lower()
        # Never a name with an underscore: the client side checks those as they miss the
        # table (server.headers_with_underscores), so none may ever hit it.
        if len(names) < NAMES_MAX - 1 and lname.find(b"_") < 0:
            lname = names.setdefault(lname, lname)  # every spelling gets this one object
            names[name] = lname
    return lname


def is_token(value: bytes) -> bool:
    return bool(value) and all(c in _TOKEN_CHARS for c in value)


def connection_tokens(value: bytes) -> set[bytes]:
    """Field names listed in a Connection header: also hop-by-hop for this message."""
    return {t.strip().lower() for t in value.split(b",") if t.strip()}


class TrustedProxies:
    """Peers whose X-Forwarded-* headers are extended rather than replaced."""

    def __init__(self, cidrs: Iterable[str]) -> None:
        self._networks = [ipaddress.ip_network(c, strict=False) for c in cidrs]
        self._cache: dict[str, bool] = {}

    def __bool__(self) -> bool:
        """Whether any network is trusted (when none is, no address needs decoding)."""
        return bool(self._networks)

    def __contains__(self, ip: str) -> bool:
        if not self._networks:
            return False
        hit = self._cache.get(ip)
        if hit is None:
            try:
                addr = ipaddress.ip_address(ip)
                hit = any(addr in n for n in self._networks)
            except ValueError:
                hit = False
            if len(self._cache) < 4096:  # bounded: client IPs are attacker-chosen
                self._cache[ip] = hit
        return hit


def forwarded_fields(
    client_ip: bytes,
    trusted: bool,
    inbound_xff: bytes | None,
    inbound_proto: bytes | None,
    inbound_host: bytes | None,
    host: bytes | None,
    inbound_via: bytes | None,
    scheme: bytes = b"http",
) -> bytes:
    """X-Forwarded-For/-Proto/-Host and Via lines for the upstream request; ``scheme`` is the
    listener's (https where proxyd terminated TLS)."""
    xff = inbound_xff + b", " + client_ip if trusted and inbound_xff else client_ip
    proto = inbound_proto if trusted and inbound_proto else scheme
    fwd_host = inbound_host if trusted and inbound_host else host
    via = inbound_via + b", " + VIA_TOKEN if inbound_via else VIA_TOKEN
    parts = [b"X-Forwarded-For: ", xff, b"\r\nX-Forwarded-Proto: ", proto, b"\r\n"]
    if fwd_host:
        parts += [b"X-Forwarded-Host: ", fwd_host, b"\r\n"]
    parts += [b"Via: ", via, b"\r\n"]
    return b"".join(parts)


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


def content_length(value: bytes) -> int:
    """A Content-Length value as an int. Compiled, the loop over its digits costs ~60
    instructions where int() costs ~850 (a generic call of the type); anything but digits
    (llhttp lets none through from an upstream) goes to int(), which decides as before."""
    if not value:
        return int(value)
    n = 0
    for c in value:
        if c < 48 or c > 57:  # not 0-9
            return int(value)
        n = n * 10 + (c - 48)
    return n


def render_fields(headers: list[tuple[bytes, bytes]], blocks: list[Block] | None = None
                  ) -> bytes:
    """"Name: value\r\n" lines; parts joined once (faster than a line per field).

    The list is made at its full size, CRLFs in place: compiled, filling slots costs a third
    less than growing the list by four parts a field (0.68 vs 1.0 µs for 15 fields).
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
    index — is one piece instead of four a field (a join costs ~100 instructions a piece).
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


def write_pieces(transport: asyncio.WriteTransport, out: list[Piece]) -> None:
    """What a protocol queued during one callback, in one transport call."""
    if len(out) == 1:
        transport.write(out[0])
    elif len(out[-1]) < LARGE_WRITE:
        transport.write(b"".join(out))
    else:  # a large body after its head: no copy into one buffer (uvloop: one writev)
        transport.writelines(out)


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
