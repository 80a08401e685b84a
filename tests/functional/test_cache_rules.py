"""RFC 9111 and RFC 9213 through a real origin, in the memory and the Redis backend alike.

Each test stores through one proxy and asks again through ``Pair.second``: with memory that is
the same proxy; with Redis it is a second proxy (a second Worker) sharing one real
redis-server, so what it answers came through Redis. Every test counts what reached the origin.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from email.utils import formatdate
from typing import Any

import pytest
from aiohttp import web
from multidict import CIMultiDict

from tests.functional._http import Message, RawClient, get
from tests.functional.conftest import (
    CATCH_ALL,
    AioUpstream,
    Proxy,
    StartProxy,
    Upstreams,
    route,
    wait_for,
)
from tests.functional.test_cache import Origin, fetch, ok
from tests.redis_server import RedisServer, redis_server  # noqa: F401

CACHE = {"type": "cache"}


@dataclass
class Pair:
    first: Proxy
    second: Proxy
    up: AioUpstream
    origin: Origin

    async def settle(self) -> None:
        """Background writes to Redis done (nothing to wait for with memory)."""
        for p in {id(self.first): self.first, id(self.second): self.second}.values():
            await wait_for(lambda p=p: not p.pipeline.services.background, what="background writes")

    @property
    def hits(self) -> int:
        return self.origin.hits


Start = Callable[..., Any]


@pytest.fixture(params=["memory", "redis"])
async def pair(request: pytest.FixtureRequest, upstreams: Upstreams,
               proxy: StartProxy) -> AsyncIterator[Start]:
    """``await pair(origin, middleware=..., routes=..., cache=...)`` → a Pair."""
    redis_url = None
    if request.param == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        redis_url = server.url

    async def start(origin: Origin, middleware: list[dict[str, Any]] | None = None,
                    routes: list[dict[str, Any]] | None = None,
                    cache: dict[str, Any] | None = None) -> Pair:
        up = await upstreams.aiohttp(origin.handle)
        kw: dict[str, Any] = {"middleware": middleware or [CACHE], "cache": dict(cache or {})}
        if redis_url is not None:
            kw["cache"]["backend"] = "redis"
            kw["redis"] = {"url": redis_url}
        first = await proxy(routes or CATCH_ALL, {"backend": up.url}, **kw)
        second = (await proxy(routes or CATCH_ALL, {"backend": up.url}, **kw)
                  if redis_url is not None else first)
        return Pair(first, second, up, origin)

    yield start


async def again(p: Pair, path: str = "/r", extra: str = "") -> Message:
    """Ask after a miss, through the other proxy when there are two."""
    await p.settle()
    return await fetch(p.second, path, extra)


def counting(*fields: tuple[str, str], status: int = 200) -> Origin:
    """An origin answering with these fields and a body that counts its answers."""
    origin = Origin()
    origin.reply = lambda r: web.Response(status=status, text=f"v{origin.hits}",
                                          headers=CIMultiDict(fields))
    return origin


def http_date(at: float) -> str:
    return formatdate(at, usegmt=True)


# -- Age: RFC 9111 §5.1, §4.2.3 ------------------------------------------------------------------


@pytest.mark.parametrize(("age", "cached"), [
    ([("Age", "7200, 0")], False),
    ([("Age", "7200"), ("Age", "0")], False),
    ([("Age", "0, 7200")], True),
    ([("Age", "0"), ("Age", "7200")], True),
    ([("Age", "abc")], True),  # invalid: ignored
    ([("Age", "-7200")], True),
    ([("Age", "7200.0")], True),
])
async def test_rfc9111_5_1_age_counts_by_its_first_member(
        pair: Start, age: list[tuple[str, str]], cached: bool) -> None:
    p = await pair(counting(("Cache-Control", "max-age=3600"), *age))
    assert (await fetch(p.first)).body == b"v1"
    second = await again(p)
    assert (second.body == b"v1") is cached, second.header("Cache-Status")
    assert p.hits == (1 if cached else 2)


async def test_rfc9111_4_2_3_age_on_a_hit_adds_the_upstreams_age(pair: Start) -> None:
    p = await pair(counting(("Cache-Control", "max-age=3600"), ("Age", "100")))
    miss = await fetch(p.first)
    assert miss.header("Age") == "100"  # relayed as the upstream sent it
    hit = await again(p)
    assert hit.header("X-Cache") == "HIT"
    assert hit.header_all("Age") == [hit.header("Age")]
    assert 100 <= int(hit.header("Age") or 0) <= 103
    assert p.hits == 1


# -- Expires: RFC 9111 §5.3, RFC 9110 §5.6.7 ----------------------------------------------------


def future_forms() -> list[str]:
    at = time.time() + 3600
    return [
        http_date(at),
        time.strftime("%A, %d-%b-%y %H:%M:%S GMT", time.gmtime(at)),  # RFC 850
        time.strftime("%a %b %e %H:%M:%S %Y", time.gmtime(at)),  # asctime
    ]


@pytest.mark.parametrize("form", [0, 1, 2])
async def test_rfc9110_5_6_7_every_http_date_form_gives_freshness(pair: Start, form: int
                                                                  ) -> None:
    expires = future_forms()[form]
    p = await pair(counting(("Expires", expires), ("Date", http_date(time.time()))))
    await fetch(p.first)
    assert (await again(p)).header("X-Cache") == "HIT", expires
    assert p.hits == 1


@pytest.mark.parametrize("expires", [
    "Thu, 18 Aug 50 02:01:18 GMT", "Thu, 18 Aug 2050 02:01:18 UTC",
    "Thu 18 Aug 2050 02:01:18 GMT", "Thu, 18  Aug  2050 02:01:18 GMT",
    "Thu, 18-Aug-2050 02:01:18 GMT", "Thu, 18 Aug 2050 02.01.18 GMT",
    "Thu, 18 Aug 2050 2:01:18 GMT", "0", "Thu, 18 Aug 2050 02:01:18 GMT, Fri, 19 Aug 2050",
])
async def test_rfc9111_5_3_an_invalid_expires_is_already_expired(pair: Start, expires: str
                                                                 ) -> None:
    p = await pair(counting(("Expires", expires)))
    await fetch(p.first)
    assert (await again(p)).body == b"v2"
    assert p.hits == 2


async def test_rfc9111_5_3_several_expires_fields_are_already_expired(pair: Start) -> None:
    future = http_date(time.time() + 3600)
    p = await pair(counting(("Expires", future), ("Expires", future)))
    await fetch(p.first)
    assert (await again(p)).body == b"v2"


# -- invalidation: RFC 9111 §4.4 -----------------------------------------------------------------


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "M-SEARCH"])
async def test_rfc9111_4_4_every_method_not_known_safe_invalidates(pair: Start, method: str
                                                                   ) -> None:
    p = await pair(counting(("Cache-Control", "max-age=60")))
    await fetch(p.second)
    assert (await fetch(p.second)).header("X-Cache") == "HIT"
    changed = await fetch(p.second, method=method, body=b"x")
    assert changed.status == 200
    assert changed.header("Cache-Status") == "proxyd; fwd=method"
    await p.settle()
    assert (await fetch(p.second)).header("X-Cache") == "MISS"


async def test_rfc9111_4_4_safe_methods_and_errors_invalidate_nothing(pair: Start) -> None:
    origin = counting(("Cache-Control", "max-age=60"))
    fail = origin.reply
    origin.reply = lambda r: (web.Response(status=500) if r.method == "DELETE" else fail(r))
    p = await pair(origin)
    await fetch(p.second)
    for method in ("OPTIONS", "DELETE"):
        await fetch(p.second, method=method)
    await p.settle()
    assert (await fetch(p.second)).header("X-Cache") == "HIT"


async def test_rfc9111_4_4_location_and_content_location_of_the_same_origin(pair: Start
                                                                            ) -> None:
    def reply(request: web.Request) -> web.Response:
        if request.method == "POST":
            return web.Response(status=201, headers={
                "Location": "3?a=1", "Content-Location": "http://test/items/4"})
        if request.method == "PUT":
            return web.Response(status=204, headers={
                "Location": "http://other.test/items/5",
                "Content-Location": "https://test/items/6"})
        return ok(request, f"{request.path_qs}#{origin.hits}")

    origin = Origin(reply)
    p = await pair(origin)
    targets = ["/items/3?a=1", "/items/4", "/items/5", "/items/6"]
    for path in targets:
        await fetch(p.second, path)
        assert (await fetch(p.second, path)).header("X-Cache") == "HIT"
    await fetch(p.second, "/items/", method="POST", body=b"{}")
    await fetch(p.second, "/items/", method="PUT", body=b"{}")  # other origins: untouched
    await p.settle()
    assert [(await fetch(p.second, path)).header("X-Cache") for path in targets] == [
        "MISS", "MISS", "HIT", "HIT"]


# -- targeted cache control: RFC 9213 ------------------------------------------------------------


async def test_rfc9213_cdn_cache_control_governs_ahead_of_cache_control(pair: Start) -> None:
    p = await pair(counting(("Cache-Control", "no-store"), ("CDN-Cache-Control", "max-age=600")))
    miss = await fetch(p.first)
    assert miss.header("Cache-Status") == "proxyd; fwd=miss; stored"
    hit = await again(p)
    assert hit.header("X-Cache") == "HIT" and hit.body == b"v1"
    # Forwarded as they came: Cache-Control is for the clients after proxyd.
    assert hit.header("Cache-Control") == "no-store"
    assert hit.header("CDN-Cache-Control") == "max-age=600"


@pytest.mark.parametrize(("cdn", "detail"), [
    ("no-store", "detail=no-store"), ("private", "detail=private"),
    ("max-age=0", "stored"), ("no-cache", "detail=no-freshness")])
async def test_rfc9213_cdn_cache_control_refuses_what_cache_control_allows(
        pair: Start, cdn: str, detail: str) -> None:
    future = http_date(time.time() + 3600)
    p = await pair(counting(("Cache-Control", "max-age=10000"), ("Expires", future),
                            ("CDN-Cache-Control", cdn)))
    miss = await fetch(p.first)
    assert miss.header("Cache-Status") == f"proxyd; fwd=miss; {detail}"
    assert (await again(p)).body == b"v2"


async def test_rfc9213_an_invalid_targeted_field_is_ignored(pair: Start) -> None:
    p = await pair(counting(("Cache-Control", "max-age=600"),
                            ("CDN-Cache-Control", 'max-age="10"')))
    await fetch(p.first)
    assert (await again(p)).header("X-Cache") == "HIT"


async def test_rfc9213_a_configured_list_of_targeted_fields(pair: Start) -> None:
    p = await pair(counting(("CDN-Cache-Control", "no-store"),
                            ("Proxyd-Cache-Control", "max-age=600")),
                   cache={"targeted_fields": ["Proxyd-Cache-Control", "CDN-Cache-Control"]})
    await fetch(p.first)
    assert (await again(p)).header("X-Cache") == "HIT"


# -- what may be stored: RFC 9111 §3, RFC 9110 §15.1 ---------------------------------------------


@pytest.mark.parametrize("status", [203, 404, 410, 500, 503])
async def test_rfc9111_3_any_final_status_with_explicit_freshness_is_stored(
        pair: Start, status: int) -> None:
    p = await pair(counting(("Cache-Control", "max-age=60"), status=status))
    await fetch(p.first)
    hit = await again(p)
    assert (hit.status, hit.body, hit.header("X-Cache")) == (status, b"v1", "HIT")


async def test_rfc9110_15_1_heuristic_lifetime_only_for_heuristic_statuses(
        pair: Start) -> None:
    def reply(request: web.Request) -> web.Response:
        status = int(request.path.strip("/"))
        return web.Response(status=status, text=f"{status}#{origin.hits}")

    origin = Origin(reply)
    routes = [route("ttl", path_prefix="/", cache={"ttl": "60s"})]
    p = await pair(origin, routes=routes)
    for status, stored in ((200, True), (404, True), (410, True), (302, False), (500, False)):
        miss = await fetch(p.first, f"/{status}")
        assert miss.status == status
        assert ("stored" in (miss.header("Cache-Status") or "")) is stored, status
        assert ((await again(p, f"/{status}")).header("X-Cache") == "HIT") is stored


async def test_the_statuses_setting_keeps_the_seeds_choice_possible(pair: Start) -> None:
    p = await pair(counting(("Cache-Control", "max-age=60"), status=404),
                   cache={"statuses": [200, 301, 302]})
    miss = await fetch(p.first)
    assert miss.header("Cache-Status") == "proxyd; fwd=miss; detail=status"
    assert (await again(p)).body == b"v2"


# -- no invented freshness -----------------------------------------------------------------------


async def test_no_freshness_is_invented_by_default(pair: Start) -> None:
    p = await pair(counting(("Content-Type", "text/plain")))
    miss = await fetch(p.first)
    assert miss.header("Cache-Status") == "proxyd; fwd=miss; detail=no-freshness"
    assert (await again(p)).body == b"v2"


async def test_a_routes_ttl_stores_without_replaying_a_request_id(pair: Start) -> None:
    routes = [route("ttl", path_prefix="/", cache={"ttl": "60s"})]
    chain = [CACHE, {"type": "trace_id"}]  # the id is added after the cache stored
    p = await pair(counting(("Content-Type", "text/plain")), middleware=chain, routes=routes)
    miss = await fetch(p.first)
    assert miss.header("X-Request-ID") is not None
    hit = await again(p)
    assert hit.header("X-Cache") == "HIT"
    assert hit.header("X-Request-ID") is None  # not the first client's


# -- framing of a miss ---------------------------------------------------------------------------


async def test_a_miss_keeps_the_origins_content_length(pair: Start) -> None:
    p = await pair(counting(("Cache-Control", "max-age=60")))
    async with await RawClient.connect(p.first.port) as c:
        miss = await c.request(get("/r"))
    assert miss.header("Content-Length") == "2" and not miss.chunked
    assert miss.header("Transfer-Encoding") is None
    hit = await again(p)
    assert hit.header("Content-Length") == "2" and not hit.chunked


async def test_a_chunked_miss_is_stored_as_it_streams(pair: Start) -> None:
    async def chunked(request: web.Request) -> web.StreamResponse:
        origin.hits += 1
        resp = web.StreamResponse(headers={"Cache-Control": "max-age=60"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for part in (b"ab", b"cd"):
            await resp.write(part)
        await resp.write_eof()
        return resp

    origin = Origin()
    origin.handle = chunked  # type: ignore[method-assign]
    p = await pair(origin)
    miss = await fetch(p.first)
    assert miss.chunked and miss.body == b"abcd"
    assert miss.header("Cache-Status") == "proxyd; fwd=miss; stored"
    hit = await again(p)
    assert (hit.body, hit.header("Content-Length")) == (b"abcd", "4")
    assert origin.hits == 1


# -- Range: RFC 9110 §14, RFC 9111 §3.3-3.4 ------------------------------------------------------


async def test_rfc9110_14_ranges_are_served_from_a_complete_stored_response(pair: Start
                                                                            ) -> None:
    p = await pair(Origin(lambda r: ok(r, "0123456789A", etag='"v1"')))
    full = await fetch(p.first)
    assert full.body == b"0123456789A"
    cases = [
        ("Range: bytes=0-1\r\n", 206, b"01", "bytes 0-1/11"),
        ("Range: bytes=1-\r\n", 206, b"123456789A", "bytes 1-10/11"),
        ("Range: bytes=-1\r\n", 206, b"A", "bytes 10-10/11"),
        ('Range: bytes=0-1\r\nIf-Range: "v1"\r\n', 206, b"01", "bytes 0-1/11"),
        ('Range: bytes=0-1\r\nIf-Range: "v0"\r\n', 200, b"0123456789A", None),
        ("Range: bytes=0-1,3-4\r\n", 200, b"0123456789A", None),
        ("Range: bytes=20-\r\n", 416, b"", "bytes */11"),
    ]
    for extra, status, body, content_range in cases:
        resp = await again(p, extra=extra)
        assert (resp.status, resp.body, resp.header("Content-Range")) == (
            status, body, content_range), extra
        assert resp.header("X-Cache") == "HIT"
        assert resp.header("Content-Length") == str(len(body))
    assert p.hits == 1


async def test_rfc9111_3_3_a_partial_response_is_never_stored(pair: Start) -> None:
    def reply(request: web.Request) -> web.Response:
        fields = {"Cache-Control": "max-age=60"}
        if request.headers.get("Range") == "bytes=0-1":
            return web.Response(status=206, text="01",
                                headers={**fields, "Content-Range": "bytes 0-1/4"})
        return web.Response(text="0123", headers=fields)

    origin = Origin(reply)
    p = await pair(origin)
    part = await fetch(p.first, extra="Range: bytes=0-1\r\n")
    assert (part.status, part.body) == (206, b"01")
    assert part.header("Cache-Status") == "proxyd; fwd=miss; detail=partial"
    full = await again(p)
    assert (full.status, full.body, full.header("X-Cache")) == (200, b"0123", "MISS")
    ranged = await again(p, extra="Range: bytes=2-\r\n")
    assert (ranged.status, ranged.body, ranged.header("X-Cache")) == (206, b"23", "HIT")
    assert origin.hits == 2


# -- never stale where forbidden: RFC 9111 §4.2.4, §5.2.2.2, §5.2.2.8, §5.2.2.10, §5.2.1 ------

FORBIDDING = ["max-age=0, must-revalidate", "max-age=0, proxy-revalidate", "s-maxage=0",
              "max-age=0, no-cache"]


def changing(cc: str) -> Origin:
    """First "old" with ``cc``; then "new" (fresh) or, with ``fail`` set, a 503."""
    origin = Origin()
    origin.reply = lambda r: (
        web.Response(text="old", headers={"Cache-Control": cc}) if origin.hits == 1
        else web.Response(status=503, text="down") if getattr(origin, "fail", False)
        else web.Response(text="new", headers={"Cache-Control": "max-age=60"}))
    return origin


@pytest.mark.parametrize("forbid", FORBIDDING)
async def test_rfc9111_4_2_4_no_stale_while_revalidate_where_the_response_forbids(
        pair: Start, forbid: str) -> None:
    p = await pair(changing(f"{forbid}, stale-while-revalidate=60"))
    await fetch(p.first)
    second = await again(p)
    assert second.body == b"new", second.header("Cache-Status")
    assert p.hits == 2


@pytest.mark.parametrize("forbid", FORBIDDING)
async def test_rfc9111_4_2_4_no_stale_if_error_where_the_response_forbids(
        pair: Start, forbid: str) -> None:
    origin = changing(f"{forbid}, stale-if-error=60")
    p = await pair(origin)
    await fetch(p.first)
    origin.fail = True  # type: ignore[attr-defined]
    assert (await again(p)).status == 503


REQUESTS = ["Cache-Control: max-age=0\r\n", "Cache-Control: no-cache\r\n",
            "Pragma: no-cache\r\n", "Cache-Control: max-age=5\r\n",
            "Cache-Control: min-fresh=1\r\n"]


@pytest.mark.parametrize("asks", REQUESTS)
async def test_rfc9111_5_2_1_no_stale_while_revalidate_where_the_request_forbids(
        pair: Start, asks: str) -> None:
    p = await pair(changing("max-age=0, stale-while-revalidate=60"))
    await fetch(p.first)
    second = await again(p, extra=asks)
    assert second.body == b"new", second.header("Cache-Status")


@pytest.mark.parametrize("asks", REQUESTS)
async def test_rfc9111_5_2_1_no_stale_if_error_where_the_request_forbids(
        pair: Start, asks: str) -> None:
    origin = changing("max-age=0, stale-if-error=60")
    p = await pair(origin)
    await fetch(p.first)
    origin.fail = True  # type: ignore[attr-defined]
    assert (await again(p, extra=asks)).status == 503


async def test_stale_use_where_allowed_says_so(pair: Start) -> None:
    """The counterpart of the tests above: the same entries are served stale without them."""
    origin = changing("max-age=0, stale-while-revalidate=60, stale-if-error=60")
    p = await pair(origin)
    await fetch(p.first)
    origin.fail = True  # type: ignore[attr-defined]
    first = await again(p)
    assert (first.body, first.header("Cache-Status")) == (b"old", "proxyd; hit; fwd=stale")
    await wait_for(lambda: origin.hits == 2, what="the background refresh")
    stale = await fetch(p.second, extra="Cache-Control: max-stale\r\n")
    assert stale.body == b"old"


async def test_rfc9111_4_request_no_cache_does_not_follow_a_coalesced_miss(pair: Start) -> None:
    origin = counting(("Cache-Control", "max-age=60"))
    origin.delay = 0.3
    p = await pair(origin)
    led = asyncio.ensure_future(fetch(p.first))
    await wait_for(lambda: origin.hits == 1, what="the leading miss")
    forced = await fetch(p.first, extra="Cache-Control: no-cache\r\n")
    assert forced.header("Cache-Status") == "proxyd; fwd=miss; stored"
    assert origin.hits == 2  # its own request, not the leader's answer
    assert (await led).header("Cache-Status") == "proxyd; fwd=miss; stored"
