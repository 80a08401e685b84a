"""RFC 9111 shared-cache policy: freshness arithmetic, storability, Vary and key normalisation."""

from __future__ import annotations

import pytest

from proxyd.cache import policy

H = list[tuple[bytes, bytes]]
DATE = b"Tue, 01 Jul 2025 12:00:00 GMT"


def hdrs(**fields: str) -> H:
    return [(k.replace("_", "-").encode(), v.encode()) for k, v in fields.items()]


# -- freshness: RFC 9111 §4.2.1 ------------------------------------------------------------------

RULES = policy.Rules(targeted=(b"cdn-cache-control",))
NOW = 1751371200.0  # DATE


def lifetime(headers: H, rules: policy.Rules = RULES, status: int = 200) -> float | None:
    """The stored lifetime, or None when the response is not stored."""
    v = policy.verdict(b"GET", status, [], headers, rules, NOW)
    return v.lifetime if v.store else None


@pytest.mark.parametrize(("headers", "expected"), [
    (hdrs(cache_control="s-maxage=10, max-age=20"), 10.0),
    (hdrs(cache_control="max-age=20, s-maxage=10"), 10.0),
    (hdrs(cache_control="max-age=20", expires="Tue, 01 Jul 2025 13:00:00 GMT", date=DATE.decode()),
     20.0),
    (hdrs(expires="Tue, 01 Jul 2025 12:01:40 GMT", date=DATE.decode()), 100.0),
    (hdrs(expires="Tue, 01 Jul 2025 11:00:00 GMT", date=DATE.decode()), 0.0),  # already past
    (hdrs(cache_control="max-age=abc"), 0.0),  # invalid delta-seconds: stale (§1.2.2)
    (hdrs(cache_control="max-age=-5"), 0.0),
    (hdrs(cache_control="max-age"), 0.0),
    (hdrs(cache_control='max-age="30"'), 30.0),
    (hdrs(cache_control="max-age=99999999999"), 2147483648.0),
    (hdrs(cache_control="no-cache, max-age=60"), 0.0),  # stored, but revalidated on every use
    ([(b"Cache-Control", b"public"), (b"cache-control", b"max-age=7")], 7.0),  # two field lines
])
def test_rfc9111_4_2_1_freshness_precedence(headers: H, expected: float) -> None:
    assert lifetime(headers) == expected


@pytest.mark.parametrize("expires", [
    "0", "not a date", "Thu, 18 Aug 50 02:01:18 GMT", "Thu, 18 Aug 2050 02:01:18 UTC",
    "Thu 18 Aug 2050 02:01:18 GMT", "Thu, 18  Aug  2050 02:01:18 GMT",
    "Thu, 18-Aug-2050 02:01:18 GMT", "Thu, 18 Aug 2050 02.01.18 GMT",
    "Thu, 18 Aug 2050 2:01:18 GMT",
])
def test_rfc9111_5_3_an_invalid_expires_means_already_expired(expires: str) -> None:
    assert lifetime(hdrs(expires=expires, date=DATE.decode())) == 0.0


def test_rfc9111_5_3_several_expires_values_mean_already_expired() -> None:
    future = (b"Expires", b"Thu, 18 Aug 2050 02:01:18 GMT")
    assert lifetime([future, (b"Date", DATE)]) is not None
    assert lifetime([future, future, (b"Date", DATE)]) == 0.0


def test_rfc9111_5_3_the_obsolete_date_forms_are_valid() -> None:
    asctime = hdrs(expires="Tue Jul  1 12:01:40 2025", date=DATE.decode())
    rfc850 = hdrs(expires="Tuesday, 01-Jul-25 12:01:40 GMT", date=DATE.decode())
    assert lifetime(asctime) == lifetime(rfc850) == 100.0


def test_rfc9111_4_2_1_expires_without_date_counts_from_the_response_time() -> None:
    headers = hdrs(expires="Tue, 01 Jul 2025 12:05:00 GMT")
    assert lifetime(headers) == 300.0


def test_rfc9111_4_2_2_no_invented_freshness_by_default() -> None:
    """Without explicit freshness nothing is stored, unless the route gives a lifetime."""
    for headers in (hdrs(content_type="text/plain"), hdrs(cache_control="public"),
                    hdrs(etag='"x"', last_modified=DATE.decode())):
        v = policy.verdict(b"GET", 200, [], headers, RULES, NOW)
        assert (v.store, v.reason) == (False, "no-freshness")
    with_ttl = policy.Rules(heuristic_ttl=300.0)
    assert lifetime(hdrs(content_type="text/plain"), with_ttl) == 300.0


@pytest.mark.parametrize("status", sorted(policy.HEURISTIC_STATUSES))
def test_rfc9110_15_1_heuristic_lifetimes_for_heuristically_cacheable_statuses(status: int
                                                                                ) -> None:
    assert lifetime([], policy.Rules(heuristic_ttl=60.0), status) == 60.0


@pytest.mark.parametrize("status", [201, 202, 302, 303, 307, 400, 403, 500, 502, 503])
def test_rfc9110_15_1_no_heuristic_lifetime_for_other_statuses(status: int) -> None:
    rules = policy.Rules(heuristic_ttl=60.0)
    v = policy.verdict(b"GET", status, [], [], rules, NOW)
    assert (v.store, v.reason) == (False, "status")
    # ... unless public (§3), or with explicit freshness (any final status, below).
    assert lifetime(hdrs(cache_control="public"), rules, status) == 60.0


@pytest.mark.parametrize("status", [200, 201, 203, 302, 307, 404, 410, 451, 500, 503, 599])
def test_rfc9111_3_any_final_status_with_explicit_freshness_is_stored(status: int) -> None:
    assert lifetime(hdrs(cache_control="max-age=60"), status=status) == 60.0


@pytest.mark.parametrize("status", [100, 101, 199, 206, 304])
def test_rfc9111_3_interim_partial_and_304_responses_are_not_stored(status: int) -> None:
    assert lifetime(hdrs(cache_control="max-age=60"), status=status) is None


def test_the_statuses_setting_restricts_what_is_stored() -> None:
    seed = policy.Rules(heuristic_ttl=300.0, statuses=[200, 301, 302])
    assert lifetime([], seed, 200) == 300.0
    assert lifetime(hdrs(cache_control="max-age=5"), seed, 302) == 5.0
    assert lifetime(hdrs(cache_control="max-age=5"), seed, 404) is None


def test_force_ttl_overrides_the_lifetime_but_not_storability() -> None:
    rules = policy.Rules(force_ttl=60.0)
    for headers in (hdrs(cache_control="max-age=5"), hdrs(cache_control="no-cache"),
                    hdrs(expires="0"), hdrs()):
        assert lifetime(headers, rules) == 60.0
    assert lifetime(hdrs(cache_control="no-store"), rules) is None
    assert lifetime(hdrs(), rules, 500) is None  # not heuristically cacheable, no freshness


# -- targeted fields: RFC 9213 -------------------------------------------------------------------


@pytest.mark.parametrize(("headers", "expected"), [
    # the targeted field wins over Cache-Control and Expires, whatever they say
    ([(b"Cache-Control", b"max-age=1"), (b"CDN-Cache-Control", b"max-age=3600")], 3600.0),
    ([(b"Cache-Control", b"max-age=3600"), (b"CDN-Cache-Control", b"max-age=1")], 1.0),
    ([(b"Cache-Control", b"no-store"), (b"CDN-Cache-Control", b"max-age=600")], 600.0),
    ([(b"CDN-Cache-Control", b"max-age=600"), (b"Expires", b"0")], 600.0),
    ([(b"CDN-Cache-Control", b"max-age=0"),
      (b"Expires", b"Thu, 18 Aug 2050 02:01:18 GMT")], 0.0),
    ([(b"CDN-Cache-Control", b"max-age=99999999999")], 2147483648.0),
    # invalid: ignored, Cache-Control governs
    ([(b"Cache-Control", b"max-age=9"), (b"CDN-Cache-Control", b"max-age =100")], 9.0),
    ([(b"Cache-Control", b"max-age=9"), (b"CDN-Cache-Control", b'max-age="100"')], 9.0),
    ([(b"Cache-Control", b"max-age=9"), (b"CDN-Cache-Control", b"")], 9.0),
    # no freshness in it: Cache-Control and Expires are still ignored
    ([(b"Cache-Control", b"max-age=9"), (b"CDN-Cache-Control", b"foo")], None),
])
def test_rfc9213_2_1_the_targeted_field_governs_proxyds_caching(headers: H,
                                                                expected: float | None) -> None:
    assert lifetime(headers) == expected


@pytest.mark.parametrize(("value", "reason"), [
    (b"no-store", "no-store"), (b"private", "private")])
def test_rfc9213_targeted_no_store_and_private(value: bytes, reason: str) -> None:
    headers = [(b"Cache-Control", b"max-age=10000"), (b"CDN-Cache-Control", value)]
    v = policy.verdict(b"GET", 200, [], headers, RULES, NOW)
    assert (v.store, v.reason) == (False, reason)


def test_rfc9213_targeted_no_cache_means_revalidate_every_time() -> None:
    headers = [(b"CDN-Cache-Control", b"no-cache, max-age=60"),
               (b"Cache-Control", b"max-age=10000")]
    assert lifetime(headers) == 0.0


def test_rfc9213_the_first_listed_field_present_and_valid_wins() -> None:
    rules = policy.Rules(targeted=(b"proxyd-cache-control", b"cdn-cache-control"))
    both = [(b"CDN-Cache-Control", b"max-age=10"), (b"Proxyd-Cache-Control", b"max-age=20")]
    assert lifetime(both, rules) == 20.0
    invalid_first = [(b"CDN-Cache-Control", b"max-age=10"),
                     (b"Proxyd-Cache-Control", b"max-age=x")]
    assert lifetime(invalid_first, rules) == 10.0
    assert lifetime(both, policy.Rules()) is None  # none listed: Cache-Control only (absent)


# -- what may not be served stale: RFC 9111 §4.2.4 -----------------------------------------------


@pytest.mark.parametrize(("cc", "expected"), [
    ("max-age=0, stale-while-revalidate=30, stale-if-error=60", (30.0, 60.0)),
    ("max-age=0, stale-while-revalidate=30, stale-if-error=60, must-revalidate", (0.0, 0.0)),
    ("max-age=0, stale-while-revalidate=30, stale-if-error=60, proxy-revalidate", (0.0, 0.0)),
    ("s-maxage=0, stale-while-revalidate=30, stale-if-error=60", (0.0, 0.0)),
    ("max-age=5, stale-while-revalidate=30, stale-if-error=60, no-cache", (0.0, 0.0)),
])
def test_rfc9111_4_2_4_stale_windows_only_where_the_response_allows(
        cc: str, expected: tuple[float, float]) -> None:
    v = policy.verdict(b"GET", 200, [], hdrs(cache_control=cc), RULES, NOW)
    assert (v.stale_while_revalidate, v.stale_if_error) == expected


# -- storability: RFC 9111 §3 --------------------------------------------------------------------

AUTH = hdrs(authorization="Bearer x")
FRESH = hdrs(cache_control="max-age=60")


@pytest.mark.parametrize(("method", "status", "req", "resp", "cookie_ok", "expected"), [
    (b"GET", 200, [], FRESH, False, (True, "")),
    (b"HEAD", 200, [], FRESH, False, (False, "method")),  # HEAD is answered from GET entries
    (b"POST", 200, [], FRESH, False, (False, "method")),
    (b"PUT", 200, [], FRESH, False, (False, "method")),
    (b"GET", 206, [], FRESH, False, (False, "partial")),
    (b"GET", 200, hdrs(cache_control="no-store"), FRESH, False, (False, "request-no-store")),
    (b"GET", 200, [], hdrs(cache_control="no-store, max-age=60"), False, (False, "no-store")),
    (b"GET", 200, [], hdrs(cache_control="max-age=60, No-Store"), False, (False, "no-store")),
    (b"GET", 200, [], hdrs(cache_control="private, max-age=60"), False, (False, "private")),
    (b"GET", 200, [], hdrs(cache_control='private="x", max-age=60'), False,
     (False, "private")),
    (b"GET", 200, AUTH, FRESH, False, (False, "authorization")),
    (b"GET", 200, AUTH, hdrs(cache_control="public, max-age=60"), False, (True, "")),
    (b"GET", 200, AUTH, hdrs(cache_control="s-maxage=60"), False, (True, "")),
    (b"GET", 200, AUTH, hdrs(cache_control="must-revalidate, max-age=60"), False, (True, "")),
    (b"GET", 200, [], [*FRESH, *hdrs(set_cookie="a=b")], False, (False, "set-cookie")),
    (b"GET", 200, [], [*FRESH, *hdrs(set_cookie="a=b")], True, (True, "")),
    (b"GET", 200, [], [*FRESH, *hdrs(vary="*")], False, (False, "vary-star")),
    (b"GET", 200, [], [*FRESH, *hdrs(vary="Accept, *")], False, (False, "vary-star")),
    (b"GET", 200, [], [*FRESH, (b"Vary", b"Accept"), (b"Vary", b"*")], False,
     (False, "vary-star")),
    (b"GET", 200, [], [*FRESH, *hdrs(vary="Accept-Encoding")], False, (True, "")),
    # must-understand: an understood status overrides no-store (§5.2.2.3)
    (b"GET", 200, [], hdrs(cache_control="must-understand, no-store, max-age=60"), False,
     (True, "")),
    (b"GET", 299, [], hdrs(cache_control="must-understand, no-store, max-age=60"), False,
     (False, "must-understand")),
])
def test_rfc9111_3_storable_table(method: bytes, status: int, req: H, resp: H, cookie_ok: bool,
                                  expected: tuple[bool, str]) -> None:
    rules = policy.Rules(allow_set_cookie=cookie_ok)
    v = policy.verdict(method, status, req, resp, rules, NOW)
    assert (v.store, v.reason) == expected


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


# -- request directives: RFC 9111 §5.2.1 ----------------------------------------------------------


@pytest.mark.parametrize(("headers", "revalidate", "stale_ok"), [
    (hdrs(), False, True),
    (hdrs(cache_control="no-cache"), True, False),
    (hdrs(pragma="no-cache"), True, False),  # Pragma counts without Cache-Control (§5.4)
    (hdrs(pragma="no-cache", cache_control="max-age=30"), False, False),
    (hdrs(cache_control="max-age=0"), True, False),
    (hdrs(cache_control="max-age=30"), False, False),  # wants it fresh: never stale
    (hdrs(cache_control="min-fresh=5"), False, False),
    (hdrs(cache_control="no-store"), False, True),  # bypass is decided elsewhere
])
def test_rfc9111_5_2_1_request_directives(headers: H, revalidate: bool, stale_ok: bool
                                         ) -> None:
    wants = policy.RequestDirectives(headers)
    assert (wants.revalidate, wants.stale_ok) == (revalidate, stale_ok)


def test_rfc9111_5_2_1_what_a_request_accepts() -> None:
    assert policy.RequestDirectives(hdrs()).accepts(10.0, 60.0)
    assert not policy.RequestDirectives(hdrs()).accepts(60.0, 60.0)
    max_age = policy.RequestDirectives(hdrs(cache_control="max-age=5"))
    assert max_age.accepts(5.0, 60.0) and not max_age.accepts(6.0, 60.0)
    min_fresh = policy.RequestDirectives(hdrs(cache_control="min-fresh=20"))
    assert min_fresh.accepts(40.0, 60.0) and not min_fresh.accepts(41.0, 60.0)
    assert not policy.RequestDirectives(hdrs(cache_control="no-cache")).accepts(0.0, 60.0)


# -- invalidation: RFC 9111 §4.4 -----------------------------------------------------------------


@pytest.mark.parametrize(("reference", "expected"), [
    (b"/items/1", (b"/items/1", b"")),
    (b"/items/1?a=1", (b"/items/1", b"a=1")),
    (b"2", (b"/items/2", b"")),  # relative to the request's URI
    (b"../x", (b"/x", b"")),
    (b"http://app.test/items/3", (b"/items/3", b"")),
    (b"HTTP://APP.test:80/items/4", (b"/items/4", b"")),
    (b"//app.test/items/5", (b"/items/5", b"")),
    (b"http://app.test", (b"/", b"")),
    (b"https://app.test/items/1", None),  # another scheme: another origin
    (b"http://app.test:8080/items/1", None),  # another port
    (b"http://other.test/items/1", None),
    (b"http://app.test:99999/", None),
])
def test_rfc9111_4_4_same_origin_location_targets(reference: bytes,
                                                  expected: tuple[bytes, bytes] | None) -> None:
    assert policy.same_origin_target(b"http", b"app.test", b"/items/", reference) == expected


def test_rfc9111_4_4_unknown_methods_are_not_safe() -> None:
    for method in (b"POST", b"PUT", b"DELETE", b"PATCH", b"M-SEARCH", b"PURGE", b"LINK"):
        assert method not in policy.SAFE_METHODS
    for method in (b"GET", b"HEAD", b"OPTIONS", b"TRACE"):
        assert method in policy.SAFE_METHODS
