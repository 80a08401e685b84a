"""The response cache end to end: a real upstream counting what reaches it, behind a Worker.

Every test asserts what the client got and how many requests the upstream saw. The Redis tests
run two proxies (two Workers) against one real redis-server.
"""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp import web

from proxyd.cache.redis import RedisStore
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
from tests.redis_server import RedisServer, needs_redis, redis_server  # noqa: F401

CACHE = {"type": "cache"}
Reply = Callable[[web.Request], web.Response]


class Origin:
    """An upstream whose answer a test sets (``reply``), optionally after a delay."""

    def __init__(self, reply: Reply | None = None) -> None:
        self.reply: Reply = reply or (lambda r: ok(r))
        self.delay = 0.0
        self.hits = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.hits += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        return self.reply(request)


def ok(request: web.Request, body: str = "v1", cc: str | None = "max-age=60",
       **headers: str) -> web.Response:
    fields = {k.replace("_", "-"): v for k, v in headers.items()}
    if cc is not None:
        fields["Cache-Control"] = cc
    return web.Response(text=body, headers=fields)


async def start(
    upstreams: Upstreams, proxy: StartProxy, origin: Origin,
    middleware: list[dict[str, Any]] | None = None, routes: list[dict[str, Any]] | None = None,
    **kw: Any,
) -> tuple[Proxy, AioUpstream]:
    up = await upstreams.aiohttp(origin.handle)
    p = await proxy(routes or CATCH_ALL, {"backend": up.url},
                    middleware=middleware or [CACHE], **kw)
    return p, up


async def fetch(p: Proxy, path: str = "/r", extra: str = "", method: str = "GET",
                body: bytes = b"") -> Message:
    async with await RawClient.connect(p.port) as c:
        if body:
            extra += f"Content-Length: {len(body)}\r\n"
        return await c.request(get(path, extra=extra, method=method) + body,
                               head=method == "HEAD")


def paths(up: AioUpstream) -> list[str]:
    return [f"{s.method} {s.path_qs}" for s in up.seen]


# -- hits and misses ------------------------------------------------------------------------------


async def test_hits_never_reach_the_upstream(upstreams: Upstreams, proxy: StartProxy) -> None:
    p, up = await start(upstreams, proxy, Origin())
    first = await fetch(p)
    assert first.status == 200 and first.body == b"v1"
    assert first.header("Cache-Status") == "proxyd; fwd=miss; stored"
    assert first.header("X-Cache") == "MISS"
    for _ in range(5):
        hit = await fetch(p)
        assert hit.status == 200 and hit.body == b"v1"
        assert hit.header("Cache-Status") == "proxyd; hit"
        assert hit.header("X-Cache") == "HIT"
        assert hit.header("Content-Length") == "2"
        assert hit.header("Age") is not None and int(hit.header("Age") or -1) >= 0
    assert len(up.seen) == 1
    other = await fetch(p, "/other")  # another key
    assert other.header("X-Cache") == "MISS"
    assert paths(up) == ["GET /r", "GET /other"]
    assert p.pipeline.metrics is not None


async def test_query_is_part_of_the_key_sorted(upstreams: Upstreams, proxy: StartProxy) -> None:
    p, up = await start(upstreams, proxy, Origin(),
                        [{"type": "cache", "ignore_query_params": ["utm_source"]}])
    assert (await fetch(p, "/q?b=2&a=1")).header("X-Cache") == "MISS"
    assert (await fetch(p, "/q?a=1&b=2")).header("X-Cache") == "HIT"
    assert (await fetch(p, "/q?a=1&utm_source=x&b=2")).header("X-Cache") == "HIT"
    assert (await fetch(p, "/q?a=2&b=2")).header("X-Cache") == "MISS"
    assert len(up.seen) == 2


async def test_head_is_answered_from_the_get_entry(upstreams: Upstreams,
                                                   proxy: StartProxy) -> None:
    p, up = await start(upstreams, proxy, Origin(lambda r: ok(r, "hello world")))
    await fetch(p)
    head = await fetch(p, method="HEAD")
    assert head.status == 200 and head.body == b""
    assert head.header("Content-Length") == "11"
    assert head.header("X-Cache") == "HIT"
    assert paths(up) == ["GET /r"]


async def test_age_cache_status_and_x_cache_option(upstreams: Upstreams,
                                                   proxy: StartProxy) -> None:
    origin = Origin(lambda r: ok(r, age="10"))
    p, up = await start(upstreams, proxy, origin, [{"type": "cache", "x_cache": False}])
    miss = await fetch(p)
    assert miss.header("X-Cache") is None
    assert miss.header("Cache-Status") == "proxyd; fwd=miss; stored"
    hit = await fetch(p)
    assert hit.header("X-Cache") is None
    assert hit.header("Cache-Status") == "proxyd; hit"
    assert hit.header_all("Age") == [str(int(hit.header("Age") or 0))]  # one Age, ours
    assert 10 <= int(hit.header("Age") or 0) <= 12
    assert len(up.seen) == 1


async def test_client_no_store_bypasses(upstreams: Upstreams, proxy: StartProxy) -> None:
    p, up = await start(upstreams, proxy, Origin())
    await fetch(p)
    bypass = await fetch(p, extra="Cache-Control: no-store\r\n")
    assert bypass.header("Cache-Status") == "proxyd; fwd=bypass"
    assert len(up.seen) == 2


async def test_client_no_cache_revalidates(upstreams: Upstreams, proxy: StartProxy) -> None:
    p, up = await start(upstreams, proxy, Origin())
    await fetch(p)
    forced = await fetch(p, extra="Cache-Control: no-cache\r\n")
    assert forced.header("X-Cache") == "MISS"
    assert "fwd=request" in (forced.header("Cache-Status") or "")
    assert len(up.seen) == 2


async def test_client_max_age_is_honoured(upstreams: Upstreams, proxy: StartProxy) -> None:
    origin = Origin(lambda r: ok(r, cc="max-age=60, stale-while-revalidate=60", age="10"))
    p, up = await start(upstreams, proxy, origin)
    await fetch(p)
    assert (await fetch(p, extra="Cache-Control: max-age=30\r\n")).header("X-Cache") == "HIT"
    older = await fetch(p, extra="Cache-Control: max-age=5\r\n")  # the entry is 10 s old
    assert older.header("X-Cache") == "MISS"
    assert len(up.seen) == 2


async def test_conditional_request_on_a_hit_gets_304(upstreams: Upstreams,
                                                     proxy: StartProxy) -> None:
    p, up = await start(upstreams, proxy, Origin(lambda r: ok(r, etag='"e1"')))
    await fetch(p)
    not_modified = await fetch(p, extra='If-None-Match: "e1"\r\n')
    assert not_modified.status == 304 and not_modified.body == b""
    assert not_modified.header("ETag") == '"e1"'
    changed = await fetch(p, extra='If-None-Match: "e0"\r\n')
    assert changed.status == 200 and changed.body == b"v1"
    assert len(up.seen) == 1


async def test_validators_on_a_hit_are_seen_wherever_they_stand(
    upstreams: Upstreams, proxy: StartProxy
) -> None:
    """A hit looks for If-None-Match/If-Modified-Since in the same scan as for Cache-Control:
    after a Cache-Control field, or alone as If-Modified-Since, they still get a 304."""
    modified = "Tue, 01 Jul 2025 12:00:00 GMT"
    origin = Origin(lambda r: ok(r, etag='"e1"', last_modified=modified))
    p, up = await start(upstreams, proxy, origin)
    await fetch(p)
    after_cc = await fetch(p, extra='Cache-Control: max-age=60\r\nIf-None-Match: "e1"\r\n')
    assert after_cc.status == 304 and after_cc.header("X-Cache") == "HIT"
    since = await fetch(p, extra=f"If-Modified-Since: {modified}\r\n")
    assert since.status == 304 and since.body == b""
    earlier = await fetch(p, extra="If-Modified-Since: Mon, 30 Jun 2025 12:00:00 GMT\r\n")
    assert earlier.status == 200 and earlier.body == b"v1"
    assert len(up.seen) == 1


# -- never served from the cache ------------------------------------------------------------------


async def twice(p: Proxy, extra: str = "") -> list[Message]:
    return [await fetch(p, extra=extra) for _ in range(2)]


async def test_no_store_is_never_cached(upstreams: Upstreams, proxy: StartProxy) -> None:
    p, up = await start(upstreams, proxy, Origin(lambda r: ok(r, cc="no-store, max-age=60")))
    for resp in await twice(p):
        assert resp.header("X-Cache") == "MISS"
        assert resp.header("Cache-Status") == "proxyd; fwd=miss; detail=no-store"
    assert len(up.seen) == 2


async def test_private_is_never_cached(upstreams: Upstreams, proxy: StartProxy) -> None:
    p, up = await start(upstreams, proxy, Origin(lambda r: ok(r, cc="private, max-age=60")))
    assert [r.header("X-Cache") for r in await twice(p)] == ["MISS", "MISS"]
    assert len(up.seen) == 2


async def test_set_cookie_is_never_cached_unless_opted_in(upstreams: Upstreams,
                                                          proxy: StartProxy) -> None:
    origin = Origin(lambda r: ok(r, set_cookie="session=abc"))
    routes = [route("opt-in", path_prefix="/in", middleware={"cache": {"allow_set_cookie": True}}),
              *CATCH_ALL]
    p, up = await start(upstreams, proxy, origin, routes=routes)
    for resp in [await fetch(p, "/r") for _ in range(2)]:
        assert resp.header("X-Cache") == "MISS" and resp.header("Set-Cookie") == "session=abc"
        assert "detail=set-cookie" in (resp.header("Cache-Status") or "")
    assert [r.header("X-Cache") for r in [await fetch(p, "/in") for _ in range(2)]] == [
        "MISS", "HIT"]
    assert len(up.seen) == 3


async def test_authorization_is_never_cached_unless_public(upstreams: Upstreams,
                                                           proxy: StartProxy) -> None:
    origin = Origin(lambda r: ok(r, cc="public, max-age=60" if r.path == "/pub" else "max-age=60"))
    p, up = await start(upstreams, proxy, origin)
    auth = "Authorization: Bearer t\r\n"
    assert [(await fetch(p, "/r", auth)).header("X-Cache") for _ in range(2)] == ["MISS", "MISS"]
    # "public" lets a response to a credentialed request be stored and shared.
    assert [(await fetch(p, "/pub", auth)).header("X-Cache") for _ in range(2)] == [
        "MISS", "HIT"]
    assert len(up.seen) == 3


async def test_disabled_route_and_a_status_without_freshness(upstreams: Upstreams,
                                                              proxy: StartProxy) -> None:
    def reply(request: web.Request) -> web.Response:
        if request.path == "/missing":
            return web.Response(status=404, text="no")
        return ok(request)

    routes = [route("nocache", path_prefix="/off", cache={"enabled": False}), *CATCH_ALL]
    p, up = await start(upstreams, proxy, Origin(reply), routes=routes)
    missing = [await fetch(p, "/missing") for _ in range(2)]
    assert [r.status for r in missing] == [404, 404]
    assert missing[1].header("Cache-Status") == "proxyd; fwd=miss; detail=no-freshness"
    off = [await fetch(p, "/off") for _ in range(2)]
    assert [r.header("X-Cache") for r in off] == [None, None]
    assert len(up.seen) == 4


# -- Vary -----------------------------------------------------------------------------------------


async def test_vary_variants_are_kept_apart(upstreams: Upstreams, proxy: StartProxy) -> None:
    origin = Origin(lambda r: ok(r, r.headers.get("Accept-Language", "none"),
                                 vary="Accept-Language"))
    p, up = await start(upstreams, proxy, origin)
    en, fr = "Accept-Language: en\r\n", "Accept-Language: fr\r\n"
    assert (await fetch(p, extra=en)).body == b"en"
    assert (await fetch(p, extra=fr)).body == b"fr"
    hit_en = await fetch(p, extra="Accept-Language:   en \r\n")
    assert (hit_en.body, hit_en.header("X-Cache")) == (b"en", "HIT")
    hit_fr = await fetch(p, extra=fr)
    assert (hit_fr.body, hit_fr.header("X-Cache")) == (b"fr", "HIT")
    none = await fetch(p)
    assert (none.body, none.header("X-Cache")) == (b"none", "MISS")
    assert len(up.seen) == 3


async def test_vary_star_is_never_cached(upstreams: Upstreams, proxy: StartProxy) -> None:
    p, up = await start(upstreams, proxy, Origin(lambda r: ok(r, vary="*")))
    await twice(p)
    assert len(up.seen) == 2


async def test_compression_after_cache_stores_compressed_variants_apart(
    upstreams: Upstreams, proxy: StartProxy,
) -> None:
    text = "compressible text " * 200
    origin = Origin(lambda r: ok(r, text, content_type="text/plain"))
    chain = [CACHE, {"type": "compression", "algorithms": ["gzip"]}]
    p, up = await start(upstreams, proxy, origin, chain)
    gz = "Accept-Encoding: gzip\r\n"
    first = await fetch(p, extra=gz)
    assert first.header("Content-Encoding") == "gzip"
    assert "accept-encoding" in (first.header("Vary") or "").lower()
    plain = await fetch(p)
    assert plain.header("Content-Encoding") is None and plain.header("X-Cache") == "MISS"
    hit_gz = await fetch(p, extra=gz)
    assert hit_gz.header("X-Cache") == "HIT" and hit_gz.header("Content-Encoding") == "gzip"
    assert gzip.decompress(hit_gz.body).decode() == text
    hit_plain = await fetch(p)
    assert hit_plain.header("X-Cache") == "HIT" and hit_plain.header("Content-Encoding") is None
    assert hit_plain.body.decode() == text
    assert len(up.seen) == 2


# -- stale entries --------------------------------------------------------------------------------


async def test_stale_entry_is_revalidated_and_a_304_refreshes_it(upstreams: Upstreams,
                                                                 proxy: StartProxy) -> None:
    def reply(request: web.Request) -> web.Response:
        if request.headers.get("If-None-Match") == '"v1"':
            return web.Response(status=304, headers={"ETag": '"v1"',
                                                     "Cache-Control": "max-age=60"})
        return ok(request, "body-v1", cc="max-age=0", etag='"v1"',
                  last_modified="Tue, 01 Jul 2025 12:00:00 GMT")

    p, up = await start(upstreams, proxy, Origin(reply))
    assert (await fetch(p)).body == b"body-v1"
    refreshed = await fetch(p)
    assert refreshed.status == 200 and refreshed.body == b"body-v1"
    assert refreshed.header("Cache-Status") == "proxyd; fwd=stale; fwd-status=304"
    assert refreshed.header("Cache-Control") == "max-age=60"  # the 304's fields merged in
    assert up.seen[1].header("If-None-Match") == '"v1"'
    assert up.seen[1].header("If-Modified-Since") == "Tue, 01 Jul 2025 12:00:00 GMT"
    assert up.seen[0].header("If-None-Match") is None
    hit = await fetch(p)
    assert (hit.body, hit.header("Cache-Status")) == (b"body-v1", "proxyd; hit")
    assert len(up.seen) == 2


async def test_stale_entry_replaced_when_the_upstream_changed(upstreams: Upstreams,
                                                              proxy: StartProxy) -> None:
    versions = iter(["v1", "v2"])
    origin = Origin(lambda r: ok(r, next(versions), cc="max-age=0", etag=f'"{origin.hits}"'))
    p, up = await start(upstreams, proxy, origin)
    assert (await fetch(p)).body == b"v1"
    second = await fetch(p)
    assert second.body == b"v2" and "fwd=stale; stored" in (second.header("Cache-Status") or "")
    assert up.seen[1].header("If-None-Match") == '"1"'


def stale_then_new(origin: Origin, request: web.Request) -> web.Response:
    """The first answer stale at once (served while it is revalidated), the next ones new."""
    if origin.hits == 1:
        return ok(request, "old", cc="max-age=0, stale-while-revalidate=60")
    return ok(request, "new", cc="max-age=60")


async def test_stale_while_revalidate_serves_stale_and_refreshes_once(
    upstreams: Upstreams, proxy: StartProxy,
) -> None:
    origin = Origin(lambda request: stale_then_new(origin, request))
    p, up = await start(upstreams, proxy, origin)
    assert (await fetch(p)).body == b"old"
    origin.delay = 0.3  # the background refresh is slow: more stale hits meanwhile
    stale = await asyncio.gather(*(fetch(p) for _ in range(5)))
    for resp in stale:
        assert (resp.body, resp.header("X-Cache")) == (b"old", "HIT")
        assert resp.header("Cache-Status") == "proxyd; hit; fwd=stale"
    await wait_for(lambda: len(up.seen) == 2, what="the background refresh")
    await wait_for(lambda: not p.pipeline.cache.refreshing, what="the refresh to land")
    assert len(up.seen) == 2  # exactly one background request
    fresh = await fetch(p)
    assert (fresh.body, fresh.header("Cache-Status")) == (b"new", "proxyd; hit")
    assert len(up.seen) == 2


async def test_a_background_refresh_goes_through_the_upstream_pool(
    upstreams: Upstreams, proxy: StartProxy,
) -> None:
    """The refresh is a request of the route's upstream like a client's: it rides the pool's
    keep-alive connection (one TCP connection for both), and the pool's connection count says
    so."""
    peers: list[object] = []

    def reply(request: web.Request) -> web.Response:
        peers.append(request.transport.get_extra_info("peername") if request.transport
                     else None)
        return stale_then_new(origin, request)

    origin = Origin(reply)
    p, up = await start(upstreams, proxy, origin)
    assert (await fetch(p)).body == b"old"
    assert (await fetch(p)).header("Cache-Status") == "proxyd; hit; fwd=stale"
    await wait_for(lambda: len(up.seen) == 2 and not p.pipeline.cache.refreshing,
                   what="the background refresh")
    assert len(peers) == 2 and peers[0] == peers[1]  # the same upstream connection
    target = p.pipeline.pools["backend"].targets[0]
    assert target.open == 1 and len(target.idle) == 1  # back in the pool, kept alive
    assert (await fetch(p)).body == b"new"


async def test_stale_if_error_serves_stale_on_5xx(upstreams: Upstreams,
                                                  proxy: StartProxy) -> None:
    def reply(request: web.Request) -> web.Response:
        if origin.hits == 1:
            return ok(request, "good", cc="max-age=0, stale-if-error=60")
        return web.Response(status=503, text="down")

    origin = Origin(reply)
    p, up = await start(upstreams, proxy, origin)
    assert (await fetch(p)).body == b"good"
    stale = await fetch(p)
    assert (stale.status, stale.body) == (200, b"good")
    assert stale.header("Cache-Status") == "proxyd; hit; fwd=stale; fwd-status=503"
    assert len(up.seen) == 2


async def test_stale_if_error_serves_stale_when_the_upstream_is_gone(
    upstreams: Upstreams, proxy: StartProxy,
) -> None:
    origin = Origin(lambda r: ok(r, "good", cc="max-age=0, stale-if-error=60"))
    p, up = await start(upstreams, proxy, origin)
    assert (await fetch(p)).body == b"good"
    await up.runner.cleanup()  # connections now refused
    stale = await fetch(p)
    assert (stale.status, stale.body) == (200, b"good")
    assert "fwd-status=502" in (stale.header("Cache-Status") or "")


async def test_without_stale_if_error_the_error_passes(upstreams: Upstreams,
                                                       proxy: StartProxy) -> None:
    def reply(request: web.Request) -> web.Response:
        if origin.hits == 1:
            return ok(request, "good", cc="max-age=0, stale-if-error=60, must-revalidate")
        return web.Response(status=503, text="down")

    origin = Origin(reply)
    p, _ = await start(upstreams, proxy, origin)
    await fetch(p)
    assert (await fetch(p)).status == 503  # must-revalidate forbids serving it stale


# -- coalescing -----------------------------------------------------------------------------------


async def test_concurrent_misses_make_one_upstream_request(upstreams: Upstreams,
                                                           proxy: StartProxy) -> None:
    origin = Origin(lambda r: ok(r, "shared"))
    origin.delay = 0.3
    p, up = await start(upstreams, proxy, origin)
    responses = await asyncio.gather(*(fetch(p) for _ in range(100)))
    assert all(r.status == 200 and r.body == b"shared" for r in responses)
    statuses = [r.header("Cache-Status") for r in responses]
    assert statuses.count("proxyd; fwd=miss; stored") == 1
    assert statuses.count("proxyd; hit; collapsed") == 99
    assert len(up.seen) == 1


async def test_coalesced_waiters_go_upstream_when_the_leader_is_not_stored(
    upstreams: Upstreams, proxy: StartProxy,
) -> None:
    origin = Origin(lambda r: ok(r, "private", cc="private"))
    origin.delay = 0.2
    p, up = await start(upstreams, proxy, origin)
    responses = await asyncio.gather(*(fetch(p) for _ in range(5)))
    assert all(r.status == 200 and r.body == b"private" for r in responses)
    assert len(up.seen) == 5


async def test_a_lost_leader_does_not_block_the_key(upstreams: Upstreams,
                                                    proxy: StartProxy) -> None:
    origin = Origin(lambda r: ok(r, "late"))
    origin.delay = 0.5
    p, up = await start(upstreams, proxy, origin,
                        [{"type": "cache", "coalesce_timeout": "0.2s"}])
    c = await RawClient.connect(p.port)
    await c.send(get("/r"))
    await wait_for(lambda: len(up.seen) == 1, what="the leader upstream")
    await c.close()  # the leader's client goes away before its response
    await asyncio.sleep(0.3)
    assert p.pipeline.cache.inflight == {}
    origin.delay = 0.0
    assert (await fetch(p)).status == 200


# -- invalidation ---------------------------------------------------------------------------------


async def test_unsafe_methods_invalidate(upstreams: Upstreams, proxy: StartProxy) -> None:
    def reply(request: web.Request) -> web.Response:
        if request.method == "POST":
            return web.Response(status=201, text="made",
                                headers={"Location": "/items/1",
                                         "Content-Location": "http://test/items/2"})
        if request.method == "DELETE":
            return web.Response(status=500, text="failed")
        return ok(request, f"{request.path}#{origin.hits}")

    origin = Origin(reply)
    p, up = await start(upstreams, proxy, origin)
    for path in ("/items", "/items/1", "/items/2", "/items/3"):
        await fetch(p, path)
        assert (await fetch(p, path)).header("X-Cache") == "HIT"
    assert (await fetch(p, "/items", method="POST", body=b"{}")).status == 201
    assert (await fetch(p, "/items")).header("X-Cache") == "MISS"
    assert (await fetch(p, "/items/1")).header("X-Cache") == "MISS"  # Location
    assert (await fetch(p, "/items/2")).header("X-Cache") == "MISS"  # Content-Location
    assert (await fetch(p, "/items/3")).header("X-Cache") == "HIT"
    # A failed unsafe request invalidates nothing.
    assert (await fetch(p, "/items/3", method="DELETE")).status == 500
    assert (await fetch(p, "/items/3")).header("X-Cache") == "HIT"
    assert [s.method for s in up.seen].count("GET") == 7


# -- Redis: two proxies, one cache ----------------------------------------------------------------


async def two_proxies(upstreams: Upstreams, proxy: StartProxy, origin: Origin,
                      url: str) -> tuple[Proxy, Proxy, AioUpstream]:
    up = await upstreams.aiohttp(origin.handle)
    kw: dict[str, Any] = {"middleware": [CACHE], "cache": {"backend": "redis"},
                          "redis": {"url": url}}
    a = await proxy(CATCH_ALL, {"backend": up.url}, **kw)
    b = await proxy(CATCH_ALL, {"backend": up.url}, **kw)
    return a, b, up


@needs_redis
async def test_redis_store_is_shared_by_two_proxies(
    upstreams: Upstreams, proxy: StartProxy, redis_server: RedisServer,  # noqa: F811
) -> None:
    a, b, up = await two_proxies(upstreams, proxy, Origin(lambda r: ok(r, "shared")),
                                 redis_server.url)
    assert isinstance(a.pipeline.cache.store, RedisStore)
    client = aioredis.from_url(redis_server.url)
    try:
        miss = await fetch(a)
        assert miss.header("Cache-Status") == "proxyd; fwd=miss; stored"
        key = b"proxyd:cache:http://test/r"
        await wait_for(lambda: a.pipeline.cache.store.errors == 0
                       and not a.pipeline.services.background, what="the background write")
        assert await client.exists(key) == 1
        hit = await fetch(b)
        assert (hit.status, hit.body, hit.header("X-Cache")) == (200, b"shared", "HIT")
        assert (await fetch(b)).header("X-Cache") == "HIT"  # from b's L1 now
        assert len(up.seen) == 1
        # An invalidation through b reaches a once a's L1 copy has aged out.
        assert (await fetch(b, method="POST", body=b"x")).status == 200
        await wait_for(lambda: not b.pipeline.services.background, what="the background delete")
        assert await client.exists(key) == 0
        await asyncio.sleep(1.1)
        assert (await fetch(a)).header("X-Cache") == "MISS"
    finally:
        await client.aclose()


@needs_redis
async def test_redis_lookups_coalesce_concurrent_misses(
    upstreams: Upstreams, proxy: StartProxy, redis_server: RedisServer,  # noqa: F811
) -> None:
    origin = Origin(lambda r: ok(r, "once"))
    origin.delay = 0.3
    a, b, up = await two_proxies(upstreams, proxy, origin, redis_server.url)
    responses = await asyncio.gather(*(fetch(a) for _ in range(50)))
    assert all(r.status == 200 and r.body == b"once" for r in responses)
    statuses = [r.header("Cache-Status") for r in responses]
    assert statuses.count("proxyd; fwd=miss; stored") == 1
    assert statuses.count("proxyd; hit; collapsed") == 49
    assert len(up.seen) == 1
    await wait_for(lambda: not a.pipeline.services.background, what="the background write")
    assert (await fetch(b)).header("Cache-Status") == "proxyd; hit"
    assert len(up.seen) == 1


@needs_redis
async def test_redis_stopped_means_misses_not_errors(
    upstreams: Upstreams, proxy: StartProxy, redis_server: RedisServer,  # noqa: F811
) -> None:
    a, b, up = await two_proxies(upstreams, proxy, Origin(lambda r: ok(r, "fine")),
                                 redis_server.url)
    assert (await fetch(a)).status == 200
    redis_server.stop()
    await asyncio.sleep(1.1)  # a's L1 copy ages out
    for i, p in enumerate((a, b, a, b, a, b, a, b)):
        resp = await fetch(p, f"/s{i}")  # each a miss: L1 would answer a repeat
        assert (resp.status, resp.body) == (200, b"fine")
    resp = await fetch(a, "/r")
    assert (resp.status, resp.body, resp.header("X-Cache")) == (200, b"fine", "MISS")
    for p in (a, b):
        store = p.pipeline.cache.store
        assert isinstance(store, RedisStore) and store.open  # the breaker tripped
    assert all(r.status == 200 for r in await asyncio.gather(*(fetch(b, f"/p{i}")
                                                               for i in range(20))))
    assert len(up.seen) >= 9
    redis_server.start()
    seen = len(up.seen)

    async def stored_and_hit() -> bool:
        await fetch(a, "/back")
        await asyncio.sleep(0.05)
        return (await fetch(b, "/back")).header("X-Cache") == "HIT"

    for _ in range(100):
        if await stored_and_hit():
            break
    else:
        raise AssertionError("the cache did not recover after Redis came back")
    assert len(up.seen) > seen


# -- no reference cycles --------------------------------------------------------------------------


@pytest.mark.parametrize("chunked", [False, True], ids=["buffered", "teed"])
async def test_the_store_paths_leave_no_reference_cycles(upstreams: Upstreams,
                                                         proxy: StartProxy,
                                                         chunked: bool) -> None:
    """Misses stored whole (a Content-Length) or copied while streaming (chunked), hits,
    304s, ranges, revalidations and an invalidation free their objects by reference counting
    (the exchange-level test in test_forward.py stores nothing: its origin gives no
    freshness)."""
    import gc

    async def handle(request: web.Request) -> web.StreamResponse:
        if request.method == "POST":
            return web.Response(status=201, headers={"Location": "/c0"})
        resp = web.StreamResponse(headers={"Cache-Control": "max-age=60", "ETag": '"x"'})
        if chunked:
            resp.enable_chunked_encoding()
        else:
            resp.content_length = 4
        await resp.prepare(request)
        await resp.write(b"abcd")
        await resp.write_eof()
        return resp

    up = await upstreams.aiohttp(handle)
    p = await proxy(CATCH_ALL, {"backend": up.url}, middleware=[CACHE])
    requests = [get(f"/c{i}") for i in range(10)] + [get("/c1")] * 5 + [
        get("/c2", extra='If-None-Match: "x"\r\n'), get("/c3", extra="Range: bytes=0-1\r\n"),
        get("/c4", extra="Cache-Control: no-cache\r\n"),
        get("/c0", method="POST", extra="Content-Length: 1\r\n") + b"x"]

    def ours(o: object) -> bool:
        module = type(o).__module__
        return isinstance(module, str) and module.startswith("proxyd.")

    async with await RawClient.connect(p.port) as c:
        assert (await c.request(get("/warm"))).status == 200
        gc.collect()
        before = {id(o) for o in gc.get_objects() if ours(o)}
        gc.disable()
        try:
            for raw in requests:
                assert (await c.request(raw)).status in (200, 201, 206, 304)
            gc.set_debug(gc.DEBUG_SAVEALL)
            gc.collect()
            left = sorted({type(o).__qualname__ for o in gc.garbage
                           if ours(o) and id(o) not in before})
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
    assert left == []
    assert len(up.seen) == 13  # 11 misses (one a revalidation, no-cache), /warm and the POST
