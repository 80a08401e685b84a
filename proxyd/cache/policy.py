"""RFC 9111 for a shared cache: what may be stored, for how long, and under which key.

Pure functions of headers and times; no I/O. Header lists are (name, value) byte pairs as the
data plane carries them; field values are parsed in fields.py. Nothing here invents
freshness: a response is fresh for what its origin says (the targeted field proxyd listens
to, else s-maxage, max-age, Expires), and only a heuristically cacheable one gets the route's
configured lifetime when the origin says nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Final
from urllib.parse import unquote_plus, urljoin, urlsplit

from proxyd.cache.fields import (
    DELTA_MAX,
    Directives,
    Headers,
    all_values,
    cache_control,
    delta_seconds,
    header,
    single_date,
    targeted_directives,
)

__all__ = ["Directives", "Headers", "all_values", "cache_control", "header"]

# RFC 9110 §15.1: statuses a cache may give a heuristic lifetime (206 is never stored here:
# only complete responses are).
HEURISTIC_STATUSES: Final = frozenset({200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501})
# The final statuses RFC 9110 defines, whose caching rules proxyd follows: what
# must-understand (RFC 9111 §5.2.2.3) asks of a cache. 206 and 304 are not stored.
UNDERSTOOD_STATUSES: Final = frozenset(
    {200, 201, 202, 203, 204, 205, 300, 301, 302, 303, 305, 307, 308}
    | set(range(400, 418)) | {421, 422, 426} | set(range(500, 506)))
# RFC 9110 §9.2.1 and the registry's safe methods: any other method, unknown ones included,
# invalidates what it touches (RFC 9111 §4.4).
SAFE_METHODS: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PROPFIND", b"REPORT",
                                 b"SEARCH"})
DEFAULT_PORTS: Final = {"http": 80, "https": 443}


def response_directives(headers: Headers, targeted: Sequence[bytes] = ()
                        ) -> tuple[Directives, bool]:
    """(the directives that govern proxyd's caching of a response, whether they came from a
    targeted field). RFC 9213 §2.1: the first field of ``targeted`` (lowercase names) with a
    valid, non-empty value wins, and Cache-Control and Expires are then ignored."""
    for lname in targeted:
        values = all_values(headers, lname)
        if values:
            directives = targeted_directives(b", ".join(values))
            if directives is not None:
                return directives, True
    return cache_control(headers), False


def seconds(directives: Directives, name: str) -> int | None:
    """A delta-seconds directive: None when absent; 0 when invalid (RFC 9111 §1.2.2: an
    invalid value is stale), 2^31 at most."""
    if name not in directives:
        return None
    arg = directives[name]
    if arg is None:
        return 0
    value = delta_seconds(arg)
    if value is None:
        try:
            return min(max(0, int(arg)), DELTA_MAX)  # a sign: "-5" is 0, "+5" is 5
        except ValueError:
            return 0
    return value


def explicit_lifetime(headers: Headers, cc: Directives, targeted: bool,
                      response_time: float) -> float | None:
    """s-maxage > max-age > Expires - Date (RFC 9111 §4.2.1); None when the origin gave no
    explicit lifetime. An Expires that is not one valid HTTP-date means already expired
    (§5.3), as does more than one Expires; a missing or invalid Date counts from
    ``response_time``."""
    for name in ("s-maxage", "max-age"):
        value = seconds(cc, name)
        if value is not None:
            return float(value)
    if targeted:
        return None  # Expires is ignored with Cache-Control (RFC 9213 §2.1)
    expires = all_values(headers, b"expires")
    if not expires:
        return None
    expires_at = single_date(headers, b"expires")
    if expires_at is None:
        return 0.0
    date = single_date(headers, b"date")
    return max(0.0, expires_at - (date if date is not None else response_time))


class Verdict:
    """Whether a response may be stored, and if so for how long and how stale it may be used
    (``reason``: why not, for Cache-Status ``detail``)."""

    __slots__ = ("lifetime", "reason", "stale_if_error", "stale_while_revalidate", "store")

    def __init__(self, store: bool, reason: str = "", lifetime: float = 0.0,
                 stale_while_revalidate: float = 0.0, stale_if_error: float = 0.0) -> None:
        self.store = store
        self.reason = reason
        self.lifetime = lifetime
        self.stale_while_revalidate = stale_while_revalidate
        self.stale_if_error = stale_if_error


class Rules:
    """A route's storage rules, fixed at load."""

    __slots__ = ("allow_set_cookie", "force_ttl", "heuristic_ttl", "statuses", "targeted")

    def __init__(self, heuristic_ttl: float = 0.0, force_ttl: float | None = None,
                 statuses: Iterable[int] | None = None, targeted: Sequence[bytes] = (),
                 allow_set_cookie: bool = False) -> None:
        # The lifetime given to a heuristically cacheable response without one (0: none,
        # such a response is not stored); force_ttl replaces every lifetime.
        self.heuristic_ttl = heuristic_ttl
        self.force_ttl = force_ttl
        self.statuses = frozenset(statuses) if statuses is not None else None
        self.targeted = tuple(targeted)
        self.allow_set_cookie = allow_set_cookie


def verdict(method: bytes, status: int, request_headers: Headers, response_headers: Headers,
            rules: Rules, response_time: float) -> Verdict:
    """May a shared cache store this response (RFC 9111 §3), and its freshness (§4.2)."""
    if method != b"GET":
        return Verdict(False, "method")
    if status < 200 or status == 304 or (rules.statuses is not None
                                         and status not in rules.statuses):
        return Verdict(False, "status")
    if status == 206:
        return Verdict(False, "partial")  # only complete responses are stored
    if "no-store" in cache_control(request_headers):
        return Verdict(False, "request-no-store")
    cc, targeted = response_directives(response_headers, rules.targeted)
    if "must-understand" in cc:
        if status not in UNDERSTOOD_STATUSES:
            return Verdict(False, "must-understand")
    elif "no-store" in cc:  # (must-understand, understood, overrides no-store: §5.2.2.3)
        return Verdict(False, "no-store")
    if "private" in cc:
        return Verdict(False, "private")
    if b"*" in vary_names(response_headers):
        return Verdict(False, "vary-star")
    if header(request_headers, b"authorization") is not None and not (
        "public" in cc or "s-maxage" in cc or "must-revalidate" in cc
    ):
        return Verdict(False, "authorization")
    if not rules.allow_set_cookie and header(response_headers, b"set-cookie") is not None:
        return Verdict(False, "set-cookie")
    lifetime = explicit_lifetime(response_headers, cc, targeted, response_time)
    if lifetime is None:
        # No explicit freshness: only a heuristically cacheable status (or a public
        # response) may get one, and only where the route configured it (§4.2.2).
        if status not in HEURISTIC_STATUSES and "public" not in cc:
            return Verdict(False, "status")
        lifetime = rules.heuristic_ttl
        if lifetime <= 0.0 and rules.force_ttl is None:
            return Verdict(False, "no-freshness")
    if rules.force_ttl is not None:
        lifetime = rules.force_ttl
    elif "no-cache" in cc:
        lifetime = 0.0  # stored, but validated before every use (§5.2.2.4)
    swr, sie = stale_windows(cc)
    return Verdict(True, "", lifetime, swr, sie)


def stale_windows(cc: Directives) -> tuple[float, float]:
    """(stale-while-revalidate, stale-if-error) of RFC 5861; none where RFC 9111 forbids
    serving the response stale: must-revalidate, proxy-revalidate, s-maxage (which implies
    proxy-revalidate for a shared cache, §5.2.2.10) and no-cache (§4.2.4)."""
    if ("must-revalidate" in cc or "proxy-revalidate" in cc or "s-maxage" in cc
            or "no-cache" in cc):
        return 0.0, 0.0
    return (float(seconds(cc, "stale-while-revalidate") or 0),
            float(seconds(cc, "stale-if-error") or 0))


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


def same_origin_target(scheme: bytes, host: bytes | None, path: bytes, reference: bytes
                       ) -> tuple[bytes, bytes] | None:
    """(path, query) of a Location or Content-Location value, resolved against the request's
    URI, when it has the request's origin (scheme, host and port); None when it has another
    one, which a cache must not invalidate (RFC 9111 §4.4)."""
    if host is None:
        return None
    base = "%s://%s%s" % (scheme.decode("latin-1"), host.decode("latin-1"),  # noqa: UP031
                          path.decode("latin-1"))
    try:
        ref = reference.strip(b" \t").decode("latin-1")
        target, origin = urlsplit(urljoin(base, ref)), urlsplit(base)
        same = (target.scheme == origin.scheme and target.hostname == origin.hostname
                and _port(target.scheme, target.port) == _port(origin.scheme, origin.port))
    except ValueError:  # a port out of range, a bad IPv6 literal
        return None
    if not same:
        return None
    return (target.path or "/").encode("latin-1"), target.query.encode("latin-1")


def _port(scheme: str, port: int | None) -> int | None:
    return port if port is not None else DEFAULT_PORTS.get(scheme)


class RequestDirectives:
    """What a request's Cache-Control (and Pragma) ask of a stored response (RFC 9111
    §5.2.1): ``revalidate`` (no-cache, max-age=0), its max-age and min-fresh; and whether it
    leaves room to serve a stale response at all (``stale_ok``)."""

    __slots__ = ("max_age", "min_fresh", "revalidate", "stale_ok")

    def __init__(self, request_headers: Headers) -> None:
        cc = cache_control(request_headers)
        max_age = seconds(cc, "max-age")
        min_fresh = seconds(cc, "min-fresh")
        # Pragma counts only without Cache-Control (RFC 9111 §5.4).
        self.revalidate = "no-cache" in cc or max_age == 0 or (
            header(request_headers, b"cache-control") is None
            and header(request_headers, b"pragma") == b"no-cache")
        self.max_age = float(max_age) if max_age is not None else None
        self.min_fresh = float(min_fresh) if min_fresh is not None else None
        # A client that states max-age or min-fresh wants a fresh response (§5.2.1.1: unless
        # it also sends max-stale, which proxyd does not act on): never a stale one.
        self.stale_ok = not self.revalidate and max_age is None and min_fresh is None

    def accepts(self, age: float, lifetime: float) -> bool:
        """Whether a response this old, fresh for ``lifetime``, may answer without
        validation."""
        if self.revalidate or age >= lifetime:
            return False
        if self.max_age is not None and age > self.max_age:
            return False
        return self.min_fresh is None or lifetime - age >= self.min_fresh
