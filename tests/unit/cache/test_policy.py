"""RFC 9111 shared-cache policy: freshness arithmetic, storability, Vary and key normalisation."""

from __future__ import annotations

import pytest

from proxyd.cache import policy

H = list[tuple[bytes, bytes]]
STATUSES = (200, 301, 302)
DATE = b"Tue, 01 Jul 2025 12:00:00 GMT"


def hdrs(**fields: str) -> H:
    return [(k.replace("_", "-").encode(), v.encode()) for k, v in fields.items()]


# -- freshness ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("headers", "expected"), [
    (hdrs(cache_control="s-maxage=10, max-age=20"), 10.0),
    (hdrs(cache_control="max-age=20, s-maxage=10"), 10.0),
    (hdrs(cache_control="max-age=20", expires="Tue, 01 Jul 2025 13:00:00 GMT", date=DATE.decode()),
     20.0),
    (hdrs(expires="Tue, 01 Jul 2025 12:01:40 GMT", date=DATE.decode()), 100.0),
    (hdrs(expires="Tue, 01 Jul 2025 11:00:00 GMT", date=DATE.decode()), 0.0),  # already past
    (hdrs(expires="0", date=DATE.decode()), 0.0),  # invalid Expires: already expired
    (hdrs(expires="not a date"), 0.0),
    (hdrs(content_type="text/plain"), 300.0),  # nothing from the origin: the default
    (hdrs(cache_control="public"), 300.0),
    (hdrs(cache_control="max-age=abc"), 0.0),  # invalid delta-seconds: stale
    (hdrs(cache_control="max-age=-5"), 0.0),
    (hdrs(cache_control='max-age="30"'), 30.0),
    (hdrs(cache_control="no-cache"), 0.0),
    (hdrs(cache_control="no-cache, max-age=60"), 0.0),  # stored, but revalidated on every use
    ([(b"Cache-Control", b"public"), (b"cache-control", b"max-age=7")], 7.0),  # two field lines
])
def test_freshness_precedence(headers: H, expected: float) -> None:
    assert policy.freshness_lifetime(headers, 300.0) == expected


def test_expires_without_date_counts_from_the_response_time() -> None:
    expires_at = policy.http_date(b"Tue, 01 Jul 2025 12:05:00 GMT")
    assert expires_at is not None
    headers = hdrs(expires="Tue, 01 Jul 2025 12:05:00 GMT")
    assert policy.freshness_lifetime(headers, 300.0, response_time=expires_at - 42) == 42.0


def test_force_ttl_overrides_everything() -> None:
    for headers in (hdrs(cache_control="max-age=5"), hdrs(cache_control="no-cache"),
                    hdrs(expires="0"), hdrs()):
        assert policy.freshness_lifetime(headers, 300.0, force_ttl=60.0) == 60.0


def test_initial_age_is_the_upstream_age_header() -> None:
    assert policy.initial_age(hdrs(age="17"), 0.0) == 17.0
    assert policy.initial_age(hdrs(age="junk"), 0.0) == 0.0
    assert policy.initial_age(hdrs(), 0.0) == 0.0


# -- storability ----------------------------------------------------------------------------------

AUTH = hdrs(authorization="Bearer x")


@pytest.mark.parametrize(("method", "status", "req", "resp", "cookie_ok", "expected"), [
    (b"GET", 200, [], [], False, (True, "")),
    (b"HEAD", 200, [], [], False, (False, "method")),  # HEAD is answered from GET entries
    (b"POST", 200, [], hdrs(cache_control="max-age=60"), False, (False, "method")),
    (b"PUT", 200, [], [], False, (False, "method")),
    (b"GET", 301, [], [], False, (True, "")),
    (b"GET", 302, [], [], False, (True, "")),
    (b"GET", 404, [], [], False, (False, "status")),
    (b"GET", 500, [], [], False, (False, "status")),
    (b"GET", 206, [], [], False, (False, "status")),
    (b"GET", 200, hdrs(cache_control="no-store"), [], False, (False, "request no-store")),
    (b"GET", 200, [], hdrs(cache_control="no-store"), False, (False, "no-store")),
    (b"GET", 200, [], hdrs(cache_control="max-age=60, No-Store"), False, (False, "no-store")),
    (b"GET", 200, [], hdrs(cache_control="private"), False, (False, "private")),
    (b"GET", 200, [], hdrs(cache_control="private, max-age=60"), False, (False, "private")),
    (b"GET", 200, AUTH, [], False, (False, "authorization")),
    (b"GET", 200, AUTH, hdrs(cache_control="max-age=60"), False, (False, "authorization")),
    (b"GET", 200, AUTH, hdrs(cache_control="public"), False, (True, "")),
    (b"GET", 200, AUTH, hdrs(cache_control="s-maxage=60"), False, (True, "")),
    (b"GET", 200, AUTH, hdrs(cache_control="must-revalidate"), False, (True, "")),
    (b"GET", 200, [], hdrs(set_cookie="a=b"), False, (False, "set-cookie")),
    (b"GET", 200, [], hdrs(set_cookie="a=b"), True, (True, "")),
    (b"GET", 200, [], hdrs(vary="*"), False, (False, "vary *")),
    (b"GET", 200, [], hdrs(vary="Accept, *"), False, (False, "vary *")),
    (b"GET", 200, [], [(b"Vary", b"Accept"), (b"Vary", b"*")], False, (False, "vary *")),
    (b"GET", 200, [], hdrs(vary="Accept-Encoding"), False, (True, "")),
])
def test_storable_table(method: bytes, status: int, req: H, resp: H, cookie_ok: bool,
                        expected: tuple[bool, str]) -> None:
    assert policy.storable(method, status, req, resp, STATUSES, cookie_ok) == expected


def test_storable_follows_the_configured_statuses() -> None:
    assert policy.storable(b"GET", 404, [], [], (200, 404)) == (True, "")
    assert policy.storable(b"GET", 301, [], [], (200,)) == (False, "status")


# -- Vary -----------------------------------------------------------------------------------------


def test_vary_names_are_lowercase_sorted_and_merged() -> None:
    headers = [(b"Vary", b"Accept-Encoding, accept-language"), (b"vary", b" Origin ,")]
    assert policy.vary_names(headers) == (b"accept-encoding", b"accept-language", b"origin")
    assert policy.vary_names([]) == ()


@pytest.mark.parametrize(("a", "b"), [
    ([(b"accept-encoding", b"gzip, br")], [(b"accept-encoding", b"gzip,br")]),
    ([(b"accept-encoding", b"gzip,  br ")], [(b"accept-encoding", b" gzip , br")]),
    ([(b"accept-encoding", b"gzip"), (b"accept-encoding", b"br")],
     [(b"accept-encoding", b"gzip, br")]),
    ([(b"accept-language", b"en  US")], [(b"accept-language", b"en US")]),
])
def test_variant_key_normalises_whitespace(a: H, b: H) -> None:
    names = (b"accept-encoding", b"accept-language")
    assert policy.variant_key(names, a) == policy.variant_key(names, b)


@pytest.mark.parametrize(("a", "b"), [
    ([(b"accept-encoding", b"gzip")], [(b"accept-encoding", b"br")]),
    ([(b"accept-encoding", b"gzip, br")], [(b"accept-encoding", b"br, gzip")]),  # order counts
    ([(b"accept-encoding", b"gzip")], []),
    ([(b"accept-language", b"en")], [(b"accept-encoding", b"en")]),
])
def test_variant_key_keeps_different_values_apart(a: H, b: H) -> None:
    names = (b"accept-encoding", b"accept-language")
    assert policy.variant_key(names, a) != policy.variant_key(names, b)


def test_variant_key_ignores_fields_not_varied_on() -> None:
    names = (b"accept-encoding",)
    assert policy.variant_key(names, [(b"accept-encoding", b"gzip"), (b"cookie", b"a=1")]) == (
        policy.variant_key(names, [(b"accept-encoding", b"gzip"), (b"cookie", b"a=2")])
    )


# -- keys -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("query", "sort", "ignore", "expected"), [
    (b"", True, (), b""),
    (b"b=2&a=1", True, (), b"a=1&b=2"),
    (b"b=2&a=1", False, (), b"b=2&a=1"),
    (b"a=2&b=1&a=1", True, (), b"a=2&a=1&b=1"),  # repeated names keep their order
    (b"utm_source=x&id=3&utm_medium=y", True, ("utm_source", "utm_medium"), b"id=3"),
    (b"utm_source=x&id=3", False, ["utm_source"], b"id=3"),
    (b"utm%5Fsource=x&id=3", True, ["utm_source"], b"id=3"),  # names compared decoded
    (b"a=1+2", True, (), b"a=1+2"),  # values kept as sent
    (b"a=1%202", True, (), b"a=1%202"),
    (b"a&b=", True, (), b"a&b="),
    (b"&&a=1&", True, (), b"a=1"),
])
def test_normalize_query(query: bytes, sort: bool, ignore: tuple[str, ...],
                         expected: bytes) -> None:
    assert policy.normalize_query(query, sort, ignore) == expected


def test_normalize_query_does_not_conflate_distinct_values() -> None:
    assert policy.normalize_query(b"a=1+2") != policy.normalize_query(b"a=1%202")
    assert policy.normalize_query(b"a") != policy.normalize_query(b"a=")


def test_primary_key() -> None:
    assert policy.primary_key(b"http", b"Example.COM", b"/p", b"a=1") == "http://example.com/p?a=1"
    assert policy.primary_key(b"http", None, b"/p", b"") == "http:///p"
    with_extra = policy.primary_key(b"http", b"h", b"/p", b"", [(b"x-tenant", b"t1")])
    assert with_extra != policy.primary_key(b"http", b"h", b"/p", b"", [(b"x-tenant", b"t2")])
    assert with_extra != policy.primary_key(b"http", b"h", b"/p", b"")


# -- request directives ---------------------------------------------------------------------------


@pytest.mark.parametrize(("headers", "expected"), [
    (hdrs(), (False, None)),
    (hdrs(cache_control="no-cache"), (True, 0.0)),
    (hdrs(pragma="no-cache"), (True, 0.0)),
    (hdrs(cache_control="max-age=0"), (True, 0.0)),
    (hdrs(cache_control="max-age=30"), (False, 30.0)),
    (hdrs(cache_control="no-store"), (False, None)),  # bypass is decided elsewhere
])
def test_request_wants_fresh(headers: H, expected: tuple[bool, float | None]) -> None:
    assert policy.request_wants_fresh(headers) == expected


def test_cache_control_parsing() -> None:
    cc = policy.cache_control([(b"Cache-Control", b'Max-Age=5, no-cache="Set-Cookie", ,public'),
                               (b"cache-control", b"max-age=9")])
    assert cc == {"max-age": "5", "no-cache": "Set-Cookie", "public": None}
