"""RFC 9111 for a shared cache: what may be stored, for how long, and under which key.

Pure functions of headers and times; no I/O. Header lists are (name, value) byte pairs as the
data plane carries them.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from email.utils import parsedate_to_datetime
from urllib.parse import unquote_plus

Headers = Sequence[tuple[bytes, bytes]]


def header(headers: Headers, lname: bytes) -> bytes | None:
    for name, value in headers:
        if name.lower() == lname:
            return value
    return None


def all_values(headers: Headers, lname: bytes) -> list[bytes]:
    return [value for name, value in headers if name.lower() == lname]


def cache_control(headers: Headers) -> dict[str, str | None]:
    """Directives of every Cache-Control field, lowercase names, unquoted values."""
    directives: dict[str, str | None] = {}
    for value in all_values(headers, b"cache-control"):
        for part in value.decode("latin-1").split(","):
            name, sep, arg = part.strip().partition("=")
            if name:
                directives.setdefault(name.lower(), arg.strip().strip('"') if sep else None)
    return directives


def seconds(directives: dict[str, str | None], name: str) -> int | None:
    arg = directives.get(name)
    if arg is None:
        return None
    try:
        return max(0, int(arg))
    except ValueError:
        return 0  # an invalid delta-seconds is treated as stale (RFC 9111 §1.2.2)


def http_date(value: bytes | None) -> float | None:
    if not value:
        return None
    try:
        return parsedate_to_datetime(value.decode("latin-1")).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def storable(
    method: bytes, status: int, request_headers: Headers, response_headers: Headers,
    statuses: Iterable[int], allow_set_cookie: bool = False,
) -> tuple[bool, str]:
    """May a shared cache store this response? (yes/no, the reason when no)."""
    if method != b"GET":
        return False, "method"
    if status not in statuses:
        return False, "status"
    req_cc = cache_control(request_headers)
    if "no-store" in req_cc:
        return False, "request no-store"
    cc = cache_control(response_headers)
    if "no-store" in cc:
        return False, "no-store"
    if "private" in cc:
        return False, "private"
    if b"*" in vary_names(response_headers):
        return False, "vary *"
    if header(request_headers, b"authorization") is not None and not (
        "public" in cc or "s-maxage" in cc or "must-revalidate" in cc
    ):
        return False, "authorization"
    if header(response_headers, b"set-cookie") is not None and not allow_set_cookie:
        return False, "set-cookie"
    return True, ""


def freshness_lifetime(
    response_headers: Headers, default_ttl: float, force_ttl: float | None = None,
    response_time: float | None = None,
) -> float:
    """s-maxage > max-age > Expires - Date > the route's default (RFC 9111 §4.2.1).

    ``response_time`` stands in for a missing Date (§4.2.1; the cache's clock, now by default).
    """
    if force_ttl is not None:
        return force_ttl
    cc = cache_control(response_headers)
    if "no-cache" in cc:
        return 0.0  # storable, but must be revalidated before every use, whatever max-age says
    for name in ("s-maxage", "max-age"):
        value = seconds(cc, name)
        if value is not None:
            return float(value)
    expires = header(response_headers, b"expires")
    if expires is not None:
        expires_at = http_date(expires)
        if expires_at is None:
            return 0.0  # invalid Expires means already expired
        date = http_date(header(response_headers, b"date"))
        if date is None:
            date = response_time if response_time is not None else time.time()
        return max(0.0, expires_at - date)
    return default_ttl


def initial_age(response_headers: Headers, response_time: float) -> float:
    """Age when received: the upstream's Age header (§4.2.3).

    The apparent age from Date is left out on purpose: Date has one-second resolution and
    origin clocks drift, so with short max-age values it would mark fresh responses stale.
    """
    age_value = header(response_headers, b"age")
    return float(age_value) if age_value and age_value.isdigit() else 0.0


def vary_names(response_headers: Headers) -> tuple[bytes, ...]:
    names: set[bytes] = set()
    for value in all_values(response_headers, b"vary"):
        names |= {n.strip().lower() for n in value.split(b",") if n.strip()}
    return tuple(sorted(names))


def variant_key(names: Sequence[bytes], request_headers: Headers) -> bytes:
    """The request's values of the Vary'd fields, normalised for comparison (§4.1)."""
    parts = []
    for name in names:
        # Field lines combined, list members trimmed, inner whitespace runs made one space:
        # "gzip, br", "gzip,br" and two lines "gzip" + "br" are the same variant.
        values = [b" ".join(member.split()) for v in all_values(request_headers, name)
                  for member in v.split(b",")]
        parts.append(name + b"=" + b",".join(v for v in values if v))
    return b"\n".join(parts)


def normalize_query(query: bytes, sort: bool = True, ignore: Iterable[str] = ()) -> bytes:
    """The query as a key part: parameters sorted by name (the order of repeated ones kept),
    the ``ignore``d names dropped. Values stay as sent: re-encoding would make ``a=1+2`` and
    ``a=1%202``, or ``a`` and ``a=``, one key though an origin may tell them apart."""
    if not query:
        return b""
    parts = [p for p in query.split(b"&") if p]
    dropped = set(ignore)
    if dropped:
        parts = [p for p in parts
                 if unquote_plus(p.split(b"=", 1)[0].decode("latin-1")) not in dropped]
    if sort:
        parts.sort(key=lambda p: p.split(b"=", 1)[0])  # stable: repeated names keep order
    return b"&".join(parts)


def primary_key(scheme: bytes, host: bytes | None, path: bytes, query: bytes,
                extra: Sequence[tuple[bytes, bytes | None]] = ()) -> str:
    """GET and HEAD share it: HEAD is answered from the GET entry."""
    key = b"%s://%s%s" % (scheme, (host or b"").lower(), path)
    if query:
        key += b"?" + query
    for name, value in extra:
        key += b"\n" + name + b"=" + (value or b"")
    return key.decode("latin-1")


def request_wants_fresh(request_headers: Headers) -> tuple[bool, float | None]:
    """(must revalidate, max-age asked by the client): no-cache / max-age=0 revalidate."""
    cc = cache_control(request_headers)
    if "no-cache" in cc or header(request_headers, b"pragma") == b"no-cache":
        return True, 0.0
    max_age = seconds(cc, "max-age")
    return max_age == 0, float(max_age) if max_age is not None else None
