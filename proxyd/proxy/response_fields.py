"""An upstream's response fields, made fit to relay: what goes on to the client, and the framing.

Hop-by-hop fields, and those a Connection field names, are dropped (RFC 9110 §7.6.1); the
upstream's framing (Content-Length, Transfer-Encoding) is read here and re-made by the
exchange for the client. One pass over the fields: on a route without middleware the relayed
fields are rendered straight to bytes; with middleware they become a Response for the hooks.
"""

from __future__ import annotations

from typing import Final, cast

from proxyd.middleware.base import Response
from proxyd.proxy.field_rules import (
    HOP_BY_HOP,
    RESPONSE_DROP,
    RESPONSE_DROP_SHAPES,
    RESPONSE_NAMES,
    connection_tokens,
    content_length,
    lower_name,
    name_shape,
)
from proxyd.proxy.head import CRLF, render_fields

NO_BODY_STATUSES: Final = frozenset({204, 304})
# Connection options that name no other field: nothing more to drop for them.
CONNECTION_OPTIONS: Final = HOP_BY_HOP | {b"close", b""}


class ResponseFields:
    """The result of relay_fields: ``fields`` rendered (without middleware) or the pairs and
    their lowercase names (with), the upstream's Content-Length (``length`` as sent,
    ``size`` parsed, -1 without), whether its body is chunked, and the fields a Connection
    field named (None: none, the usual case)."""

    __slots__ = ("chunked", "fields", "headers", "length", "lnames", "named", "pairs", "size")

    def __init__(self, headers: list[tuple[bytes, bytes]]) -> None:
        self.headers = headers
        self.fields = b""
        self.length: bytes | None = None
        self.size = -1
        self.chunked = False
        self.named: set[bytes] | None = None
        self.pairs: list[object] = []
        self.lnames: list[bytes] = []

    def response(self, status: int, reason: bytes) -> Response:
        """The head as middleware see it: Content-Length kept for them to read."""
        named = self.named
        if named:
            drop = HOP_BY_HOP | named
            pairs = [(n, v) for n, v in self.headers if n.lower() not in drop]
            return Response(status, pairs, None, reason, upstream_length=self.size)
        # The lowercase names made here once, not again by the first hook asking.
        resp = Response(status, cast("list[tuple[bytes, bytes]]", self.pairs), None, reason,
                        self.lnames, self.size)
        if self.length is not None:
            resp.add(b"Content-Length", self.length, b"content-length")  # middleware read it
        return resp


def relay_fields(headers: list[tuple[bytes, bytes]], middleware: bool) -> ResponseFields:
    """One pass over the upstream's fields. ``middleware``: the route has a chain, which
    gets pairs (and their lowercase names) instead of rendered bytes."""
    f = ResponseFields(headers)
    named: set[bytes] | None = None
    keep: list[bytes] = []  # name, ": ", value, CRLF, ...
    # The pairs are read as objects: compiled, a pair read as tuple[bytes, bytes] and
    # appended to another list would be a new tuple (~8 allocations a response).
    pairs = f.pairs
    lnames = f.lnames
    for field in cast("list[object]", headers):
        name, value = cast("tuple[bytes, bytes]", field)
        # Without middleware only a field shaped like a dropped one needs its lowercase
        # name (RESPONSE_DROP_SHAPES): most are relayed without one.
        if middleware or RESPONSE_DROP_SHAPES[name_shape(name)]:
            lname = lower_name(name, RESPONSE_NAMES)
            if lname in RESPONSE_DROP:
                if lname == b"content-length":
                    f.length = value.strip()  # llhttp refused duplicates and non-digits
                elif lname == b"transfer-encoding":
                    # Chunked only if chunked is the final coding; any other ends at the
                    # close (RFC 9112 §6.3), as llhttp reads it: proxyd re-frames it.
                    f.chunked = value.rpartition(b",")[2].strip().lower() == b"chunked"
                elif (lname == b"connection"
                      and lower_name(value, RESPONSE_NAMES) not in CONNECTION_OPTIONS):
                    # (The usual single keep-alive or close names no field: no parsing.)
                    tokens = connection_tokens(value) - CONNECTION_OPTIONS
                    if tokens:
                        named = tokens if named is None else named | tokens
                continue
            if middleware:
                pairs.append(field)
                lnames.append(lname)
                continue
        keep.append(name)  # four appends: compiled, a tuple and a list += cost twice that
        keep.append(b": ")
        keep.append(value)
        keep.append(CRLF)
    if f.length is not None:
        f.size = content_length(f.length)  # parsed once, here
    if named:
        f.named = named
        if not middleware:
            f.fields = filtered_fields(headers, named)
    elif not middleware:
        f.fields = b"".join(keep)
    return f


def connection_named(headers: list[tuple[bytes, bytes]]) -> set[bytes]:
    """The fields named by every Connection header, however many there are."""
    named: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            named.update(t.strip().lower() for t in value.split(b","))
    return named


def filtered_fields(headers: list[tuple[bytes, bytes]], named: set[bytes] | None = None
                    ) -> bytes:
    """The fields to relay, rendered; ``named``: the Connection-named ones, if known."""
    drop = RESPONSE_DROP | (named if named is not None else connection_named(headers))
    return render_fields([(n, v) for n, v in headers if n.lower() not in drop])
