"""HTTP/1.1 intermediary header rules (RFC 9110 §7.6): which fields go on, which are dropped.

Header names arrive from the parser as raw bytes; everything here works on lowercase names so a
field is classified with one set lookup. Turning a head into bytes is head.py's.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    import asyncio

# What a protocol queues for its transport: bytes, or a view of a read relayed as it came
# (UpstreamConnection._read: no copy of a large body).
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
    # Only proxyd says who a client certificate named (tls.client_cert_headers).
    b"x-client-cert-subject", b"x-client-cert-fingerprint",
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

# Field names as peers spell them → their lowercase form, one object per name: a dict
# lookup costs less than lower() and the hash a set test then makes of its new bytes object,
# and the object returned keeps its hash for every later test (the relay also looks up
# Connection's value here: keep-alive, close).
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


def content_length(value: bytes) -> int:
    """A Content-Length value as an int. Compiled, the loop over its digits costs a small
    fraction of int() (a generic call of the type); anything but digits
    (llhttp lets none through from an upstream) goes to int(), which decides as before."""
    if not value:
        return int(value)
    n = 0
    for c in value:
        if c < 48 or c > 57:  # not 0-9
            return int(value)
        n = n * 10 + (c - 48)
    return n


def write_pieces(transport: asyncio.WriteTransport, out: list[Piece]) -> None:
    """What a protocol queued during one callback, in one transport call."""
    if len(out) == 1:
        transport.write(out[0])
    elif len(out[-1]) < LARGE_WRITE:
        transport.write(b"".join(out))
    else:  # a large body after its head: no copy into one buffer (uvloop: one writev)
        transport.writelines(out)


