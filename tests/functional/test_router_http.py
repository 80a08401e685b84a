"""Routing over real sockets: match kinds, file order, path rewriting, direct responses, 404/405."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import pytest

from tests.functional._http import RawClient, get
from tests.functional.conftest import AioUpstream, Proxy, StartProxy, Upstreams, route

ROUTES = [
    route("host", "a", host="api.example.com"),
    route("wild", "b", host="*.wild.test"),
    route("exact", "a", path="/exact"),
    route("prefix", "b", path_prefix="/pre/"),
    route("regex", "a", path_regex=r"^/items/\d+$"),
    route("hdr", "b", path="/hdr", headers={"X-Version": "2"}),
    route("hdr-fallback", "a", path="/hdr"),
    route("post-only", "a", path="/post", methods=["POST"]),
    route("get-only", "b", path="/get", methods=["GET"]),
    route("first", "a", path_prefix="/order/"),
    route("second", "b", path_prefix="/order/x"),  # shadowed by "first": never chosen
    route("strip", "b", path_prefix="/api/", strip_prefix="/api"),
    route(
        "rewrite", "a", path_regex="^/old/",
        rewrite={"regex": "^/old/(.*)$", "replacement": "/new/$1"},
    ),
    route(
        "teapot", path="/teapot",
        respond={"status": 418, "body": "short and stout", "headers": {"X-Teapot": "yes"}},
    ),
]


@dataclass
class Gateway:
    proxy: Proxy
    a: AioUpstream
    b: AioUpstream
    http: aiohttp.ClientSession

    async def get(
        self, path: str, host: str = "test", method: str = "GET", **headers: str
    ) -> tuple[int, dict[str, str], bytes]:
        hdrs = {"Host": host, **{k.replace("_", "-"): v for k, v in headers.items()}}
        async with self.http.request(method, self.proxy.url + path, headers=hdrs) as resp:
            return resp.status, dict(resp.headers), await resp.read()

    async def upstream_of(
        self, path: str, host: str = "test", method: str = "GET", **headers: str
    ) -> tuple[str, str]:
        """(upstream name, path it received) for a request that must be proxied."""
        status, hdrs, body = await self.get(path, host, method, **headers)
        assert status == 200, (status, body)
        if method == "HEAD":
            name = hdrs["X-Upstream"]
            return name, (self.a if name == "a" else self.b).seen[-1].path_qs
        data = json.loads(body)
        return data["upstream"], data["path"]


@pytest.fixture
async def gw(upstreams: Upstreams, proxy: StartProxy) -> AsyncIterator[Gateway]:
    a = await upstreams.aiohttp(name="a")
    b = await upstreams.aiohttp(name="b")
    p = await proxy(ROUTES, {"a": a.url, "b": b.url})
    session = aiohttp.ClientSession()
    gateway = Gateway(p, a, b, session)
    yield gateway
    await session.close()


async def test_host_exact_and_wildcard(gw: Gateway) -> None:
    assert await gw.upstream_of("/anything", host="api.example.com") == ("a", "/anything")
    # Host matching ignores case and port.
    assert (await gw.upstream_of("/x", host="API.Example.COM:8080"))[0] == "a"
    assert (await gw.upstream_of("/x", host="deep.sub.wild.test"))[0] == "b"
    status, _, _ = await gw.get("/x", host="wild.test")  # the suffix needs a label before it
    assert status == 404
    status, _, _ = await gw.get("/anything", host="other.example.com")
    assert status == 404


async def test_exact_path(gw: Gateway) -> None:
    assert await gw.upstream_of("/exact") == ("a", "/exact")
    assert await gw.upstream_of("/exact?q=1&r") == ("a", "/exact?q=1&r")
    assert (await gw.get("/exact/"))[0] == 404
    assert (await gw.get("/exactly"))[0] == 404


async def test_prefix_and_regex(gw: Gateway) -> None:
    assert await gw.upstream_of("/pre/x/y") == ("b", "/pre/x/y")
    assert (await gw.get("/pre"))[0] == 404
    assert await gw.upstream_of("/items/42") == ("a", "/items/42")
    assert (await gw.get("/items/abc"))[0] == 404


async def test_header_match(gw: Gateway) -> None:
    assert (await gw.upstream_of("/hdr", X_Version="2"))[0] == "b"
    assert (await gw.upstream_of("/hdr", X_Version="3"))[0] == "a"
    assert (await gw.upstream_of("/hdr"))[0] == "a"


async def test_first_match_in_file_order(gw: Gateway) -> None:
    assert await gw.upstream_of("/order/x") == ("a", "/order/x")
    assert gw.b.seen == []


async def test_methods_and_405(gw: Gateway) -> None:
    status, _, body = await gw.get("/post", method="POST")
    assert status == 200 and b'"upstream": "a"' in body
    status, headers, body = await gw.get("/post")
    assert status == 405
    assert headers["Allow"] == "POST"
    assert headers["Content-Type"] == "application/json"
    err = json.loads(body)
    assert set(err) == {"error", "request_id"}
    assert err["request_id"] == headers["X-Request-ID"]
    # A GET route also allows HEAD; other methods get the Allow list.
    assert (await gw.upstream_of("/get"))[0] == "b"
    assert (await gw.upstream_of("/get", method="HEAD"))[0] == "b"
    status, headers, _ = await gw.get("/get", method="DELETE")
    assert status == 405 and headers["Allow"] == "GET, HEAD"
    assert [s.method for s in gw.a.seen] == ["POST"]
    assert [s.method for s in gw.b.seen] == ["GET", "HEAD"]


async def test_404_json_with_request_id(gw: Gateway) -> None:
    status, headers, body = await gw.get("/nowhere")
    assert status == 404
    assert headers["Content-Type"] == "application/json"
    err = json.loads(body)
    assert set(err) == {"error", "request_id"} and err["error"]
    assert err["request_id"] == headers["X-Request-ID"] != ""
    _, headers2, _ = await gw.get("/nowhere")
    assert headers2["X-Request-ID"] != headers["X-Request-ID"]  # unique per request
    # An inbound X-Request-ID is kept.
    status, headers, body = await gw.get("/nowhere", X_Request_ID="abc-123")
    assert headers["X-Request-ID"] == "abc-123"
    assert json.loads(body)["request_id"] == "abc-123"
    assert gw.a.seen == [] and gw.b.seen == []


async def test_strip_prefix(gw: Gateway) -> None:
    assert await gw.upstream_of("/api/users?x=1") == ("b", "/users?x=1")
    assert await gw.upstream_of("/api/") == ("b", "/")


async def test_regex_rewrite(gw: Gateway) -> None:
    assert await gw.upstream_of("/old/a/b?q=1") == ("a", "/new/a/b?q=1")


async def test_direct_respond(gw: Gateway) -> None:
    status, headers, body = await gw.get("/teapot")
    assert status == 418
    assert body == b"short and stout"
    assert headers["X-Teapot"] == "yes"
    assert headers["Content-Length"] == str(len(body))
    assert gw.a.seen == [] and gw.b.seen == []


async def test_each_request_on_a_connection_is_routed_by_its_own_host(gw: Gateway) -> None:
    """The connection remembers its last Host's matching form: a changed Host is not missed."""
    hosts = ["api.example.com", "API.example.com:81", "x.wild.test", "x.wild.test",
             "api.example.com", "other.test"]
    async with await RawClient.connect(gw.proxy.port) as c:
        got = []
        for host in hosts:
            resp = await c.request(get("/anything", host=host))
            got.append(json.loads(resp.body)["upstream"] if resp.status == 200 else resp.status)
    assert got == ["a", "a", "b", "b", "a", 404]


async def test_direct_respond_head_has_no_body(gw: Gateway) -> None:
    async with await RawClient.connect(gw.proxy.port) as c:
        resp = await c.request(get("/teapot", method="HEAD"), head=True)
        assert resp.status == 418
        assert resp.header("Content-Length") == "15"
        assert resp.header("X-Teapot") == "yes"
        # The next response on the connection starts right after the head: no body was sent.
        resp = await c.request(get("/teapot"))
        assert resp.status == 418 and resp.body == b"short and stout"
