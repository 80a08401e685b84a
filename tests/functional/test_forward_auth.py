"""forward_auth end to end: a Worker in the test loop, a real origin, and a real auth service
(aiohttp on 127.0.0.1) that passes, refuses, redirects, stalls, fails, or is not there at all.

Each test asserts what the client got, what the auth service was asked, and what the origin
saw (or that it saw nothing).
"""

from __future__ import annotations

import asyncio
from time import monotonic
from typing import Any

from aiohttp import web

from tests.functional._http import Message, RawClient, get
from tests.functional.conftest import (
    AioUpstream,
    Proxy,
    StartProxy,
    Upstreams,
    assert_json_error,
    refused_url,
    route,
    wait_for,
)

ROUTES = [route("api", path_prefix="/api"),
          route("public", path_prefix="/public",
                middleware={"forward_auth": {"enabled": False}})]


class AuthService:
    """Answers by the Authorization it gets: 'Bearer alice' passes (with X-User and
    X-Scope), 'Bearer expired' gets 401, 'Bearer mallory' 403, none a 302 to a login page,
    'Bearer broken' a 500; while ``gate`` is set it holds every answer until the gate opens."""

    def __init__(self) -> None:
        self.gate: asyncio.Event | None = None
        self.server: AioUpstream | None = None

    async def handler(self, request: web.Request) -> web.StreamResponse:
        if self.gate is not None:
            async with asyncio.timeout(5):
                await self.gate.wait()
        auth = request.headers.get("Authorization")
        if auth == "Bearer alice" or auth == "Bearer bob":
            return web.Response(status=204, headers={
                "X-User": auth[7:], "X-Scope": "read", "X-Internal": "not copied"})
        if auth == "Bearer expired":
            return web.Response(status=401, text="token expired", headers={
                "WWW-Authenticate": 'Bearer error="invalid_token"', "Connection": "close"})
        if auth == "Bearer mallory":
            return web.Response(status=403, text="no", headers={"X-Reason": "banned"})
        if auth == "Bearer broken":
            return web.Response(status=500)
        if auth == "Bearer huge":
            return web.Response(status=401, body=b"x" * (64 * 1024 + 1), headers={
                "WWW-Authenticate": "Bearer", "Content-Type": "text/plain"})
        return web.Response(status=302, headers={
            "Location": "https://login.test/?rd=" + request.headers["X-Forwarded-Uri"],
            "Set-Cookie": "state=1; HttpOnly"})

    async def start(self, upstreams: Upstreams) -> AuthService:
        self.server = await upstreams.aiohttp(self.handler, name="auth")
        return self

    @property
    def url(self) -> str:
        assert self.server is not None
        return self.server.url

    @property
    def calls(self) -> int:
        assert self.server is not None
        return len(self.server.seen)


async def send(p: Proxy, path: str, headers: dict[str, str] | None = None,
               method: str = "GET", body: bytes = b"") -> Message:
    extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    if body:
        extra += f"Content-Length: {len(body)}\r\n"
    async with await RawClient.connect(p.port) as c:
        return await c.request(get(path, extra=extra, method=method) + body)


def bearer(value: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {value}"}


def auth_counts(p: Proxy) -> dict[tuple[Any, ...], float]:
    return dict(p.pipeline.metrics.counters["gateway_auth_total"])


async def auth_proxy(upstreams: Upstreams, proxy: StartProxy, auth_url: str,
                     **options: Any) -> tuple[Proxy, AioUpstream]:
    origin = await upstreams.aiohttp()
    entry = {"type": "forward_auth", "upstream": "auth", "path": "/verify",
             "response_headers": ["X-User", "X-Scope"], **options}
    p = await proxy(ROUTES, {"backend": origin.url, "auth": auth_url}, middleware=[entry])
    return p, origin


async def test_a_2xx_passes_with_the_chosen_headers_and_none_of_the_clients(
        upstreams: Upstreams, proxy: StartProxy) -> None:
    auth = await AuthService().start(upstreams)
    p, origin = await auth_proxy(upstreams, proxy, auth.url)
    resp = await send(p, "/api/orders?page=2", {
        **bearer("alice"), "Cookie": "a=1", "X-User": "root", "x-scope": "admin",
        "X-Other": "kept"}, method="POST", body=b"secret body")
    assert resp.status == 200, resp.body
    seen = origin.seen[-1]
    assert seen.header_all("X-User") == ["alice"]  # the service's, never the client's
    assert seen.header_all("X-Scope") == ["read"]
    assert seen.header("X-Internal") is None  # not in response_headers
    assert seen.header("X-Other") == "kept"
    assert seen.header("Authorization") == "Bearer alice"
    assert seen.body == b"secret body"
    # The service got the credentials and where the request was going, never its body.
    [asked] = auth.server.seen if auth.server else []
    assert asked.method == "GET" and asked.path_qs == "/verify"
    assert asked.header("Authorization") == "Bearer alice"
    assert asked.header("Cookie") == "a=1"
    assert asked.header("X-Forwarded-Method") == "POST"
    assert asked.header("X-Forwarded-Uri") == "/api/orders?page=2"
    assert asked.header("X-Forwarded-Host") == "test"
    assert asked.header("X-Forwarded-Proto") == "http"
    assert asked.header("X-Forwarded-For") == "127.0.0.1"
    assert asked.header("X-Other") is None and asked.header("X-User") is None
    assert asked.header("Content-Length") is None
    # A route with the element disabled asks nobody.
    resp = await send(p, "/public/x")
    assert resp.status == 200 and auth.calls == 1
    assert auth_counts(p) == {("api", "forward_auth", "ok"): 1.0}


async def test_401_403_and_302_go_back_to_the_client_and_the_origin_sees_nothing(
        upstreams: Upstreams, proxy: StartProxy) -> None:
    auth = await AuthService().start(upstreams)
    p, origin = await auth_proxy(upstreams, proxy, auth.url)
    resp = await send(p, "/api/x", bearer("expired"))
    assert resp.status == 401 and resp.body == b"token expired"
    assert resp.header("WWW-Authenticate") == 'Bearer error="invalid_token"'
    # The service's Connection: close was about its connection to proxyd, not the client's.
    assert resp.header("Connection") != "close"
    resp = await send(p, "/api/x", bearer("mallory"))
    assert resp.status == 403 and resp.body == b"no"
    assert resp.header("X-Reason") == "banned"
    resp = await send(p, "/api/x?y=1")
    assert resp.status == 302
    assert resp.header("Location") == "https://login.test/?rd=/api/x?y=1"
    assert resp.header("Set-Cookie") == "state=1; HttpOnly"
    # A refusal too large to hold keeps its status and challenge, with our body instead.
    resp = await send(p, "/api/x", bearer("huge"))
    body = assert_json_error(resp, 401)
    assert resp.header("X-Request-ID") == body["request_id"]
    assert resp.header("WWW-Authenticate") == "Bearer"
    assert origin.seen == []
    assert auth.calls == 4
    assert auth_counts(p) == {("api", "forward_auth", "denied"): 4.0}


async def test_a_slow_service_is_refused_by_default_and_let_through_with_allow(
        upstreams: Upstreams, proxy: StartProxy) -> None:
    auth = await AuthService().start(upstreams)
    auth.gate = asyncio.Event()
    try:
        p, origin = await auth_proxy(upstreams, proxy, auth.url, timeout="200ms")
        started = monotonic()
        resp = await send(p, "/api/x", bearer("alice"))
        body = assert_json_error(resp, 503)
        assert resp.header("X-Request-ID") == body["request_id"]
        assert monotonic() - started >= 0.2  # the budget ran out, no sooner
        assert origin.seen == [] and auth.calls == 1
        assert auth_counts(p) == {("api", "forward_auth", "unavailable"): 1.0}

        p, origin = await auth_proxy(upstreams, proxy, auth.url, timeout="200ms",
                                     on_error="allow")
        resp = await send(p, "/api/x", {**bearer("alice"), "X-User": "root"})
        assert resp.status == 200, resp.body
        # Let through unauthenticated: nothing the service would have said, and nothing the
        # client claimed in its place.
        assert origin.seen[-1].header("X-User") is None
        assert auth_counts(p) == {("api", "forward_auth", "error_allowed"): 1.0}
    finally:
        auth.gate.set()


async def test_a_service_that_is_down_or_fails_gets_503(
        upstreams: Upstreams, proxy: StartProxy) -> None:
    p, origin = await auth_proxy(upstreams, proxy, refused_url())
    for _ in range(2):  # the second finds the target failed (ejected, or still refused)
        resp = await send(p, "/api/x", bearer("alice"))
        assert_json_error(resp, 503)
    assert origin.seen == []
    assert p.target("auth").failures >= 1  # reported to the auth upstream's pool

    auth = await AuthService().start(upstreams)
    p, origin = await auth_proxy(upstreams, proxy, auth.url)
    resp = await send(p, "/api/x", bearer("broken"))  # a 5xx is a failure, not an answer
    assert_json_error(resp, 503)
    assert origin.seen == []
    assert auth_counts(p) == {("api", "forward_auth", "unavailable"): 1.0}


async def test_cache_ttl_asks_once_per_credentials(
        upstreams: Upstreams, proxy: StartProxy) -> None:
    auth = await AuthService().start(upstreams)
    p, origin = await auth_proxy(upstreams, proxy, auth.url, cache_ttl="60s")
    for _ in range(2):
        resp = await send(p, "/api/x", bearer("alice"))
        assert resp.status == 200, resp.body
        assert origin.seen[-1].header_all("X-User") == ["alice"]
    assert auth.calls == 1
    resp = await send(p, "/api/x", bearer("bob"))  # other credentials: asked again
    assert resp.status == 200 and origin.seen[-1].header("X-User") == "bob"
    assert auth.calls == 2
    for _ in range(2):  # a 401 is remembered too
        resp = await send(p, "/api/x", bearer("expired"))
        assert resp.status == 401 and resp.body == b"token expired"
    assert auth.calls == 3
    for _ in range(2):  # a redirect is not: it may carry one client's login state
        assert (await send(p, "/api/x")).status == 302
    assert auth.calls == 5
    counted = auth_counts(p)
    assert counted[("api", "forward_auth", "ok")] == 3.0
    assert counted[("api", "forward_auth", "denied")] == 4.0


async def test_requests_with_the_same_credentials_share_the_subrequest_in_flight(
        upstreams: Upstreams, proxy: StartProxy) -> None:
    auth = await AuthService().start(upstreams)
    auth.gate = asyncio.Event()
    try:
        p, origin = await auth_proxy(upstreams, proxy, auth.url, cache_ttl="60s")
        async with await RawClient.connect(p.port) as c1, \
                await RawClient.connect(p.port) as c2, await RawClient.connect(p.port) as c3:
            for c, who in ((c1, "alice"), (c2, "alice"), (c3, "bob")):
                await c.send(get("/api/x", extra=f"Authorization: Bearer {who}\r\n"))
            answers = [asyncio.ensure_future(c.response()) for c in (c1, c2, c3)]
            # All three are in the chain, and the service holds its answers.
            await wait_for(lambda: p.dispatched == 3 and auth.calls == 2,
                           what="three requests waiting on two subrequests")
            auth.gate.set()
            for answer in answers:
                assert (await answer).status == 200
        assert sorted(s.header("X-User") or "" for s in origin.seen) == ["alice", "alice", "bob"]
        assert auth.calls == 2
    finally:
        auth.gate.set()


async def test_an_open_circuit_breaker_keeps_the_service_from_being_asked(
        upstreams: Upstreams, proxy: StartProxy) -> None:
    auth = await AuthService().start(upstreams)
    origin = await upstreams.aiohttp()
    entry = {"type": "forward_auth", "upstream": "auth", "path": "/verify"}
    breaker = {"error_rate": 0.5, "min_requests": 2, "window": "10s", "open_for": "30s"}
    p = await proxy(ROUTES, {"backend": origin.url,
                             "auth": {"targets": [auth.url], "circuit_breaker": breaker}},
                    middleware=[entry])
    for _ in range(2):  # two 5xx: half of the answers failed, the breaker opens
        assert (await send(p, "/api/x", bearer("broken"))).status == 503
    asked = auth.calls
    resp = await send(p, "/api/x", bearer("alice"))
    assert resp.status == 503  # on_error: deny, without a subrequest
    assert auth.calls == asked
    assert origin.seen == []


async def test_past_max_pending_subrequests_requests_get_503_at_once(
        upstreams: Upstreams, proxy: StartProxy) -> None:
    auth = await AuthService().start(upstreams)
    auth.gate = asyncio.Event()
    try:
        # on_error: allow must not let the overflow through: that is a 503 whatever it says.
        p, origin = await auth_proxy(upstreams, proxy, auth.url, max_pending=3, timeout="5s",
                                     on_error="allow")
        clients = [await RawClient.connect(p.port) for _ in range(6)]
        try:
            held = []
            for c in clients[:3]:
                await c.send(get("/api/x", extra="Authorization: Bearer alice\r\n"))
                held.append(asyncio.ensure_future(c.response()))
            await wait_for(lambda: auth.calls == 3, what="three subrequests held by the service")
            for c in clients[3:]:  # the service still holds every slot: refused at once
                await c.send(get("/api/x", extra="Authorization: Bearer bob\r\n"))
                resp = await c.response()
                body = assert_json_error(resp, 503)
                assert resp.header("Retry-After") == "1"
                assert body["error"] == "authentication busy"
            assert not any(answer.done() for answer in held)
            assert auth.calls == 3 and origin.seen == []
            auth.gate.set()
            for answer in held:
                assert (await answer).status == 200
        finally:
            for c in clients:
                await c.close()
        # The slots are free again: the route serves as before.
        resp = await send(p, "/api/x", bearer("bob"))
        assert resp.status == 200 and origin.seen[-1].header("X-User") == "bob"
        counted = auth_counts(p)
        assert counted[("api", "forward_auth", "busy")] == 3.0
        assert counted[("api", "forward_auth", "ok")] == 4.0
    finally:
        auth.gate.set()


async def test_subrequests_ride_the_auth_upstreams_keepalive_connections(
        upstreams: Upstreams, proxy: StartProxy) -> None:
    auth = await AuthService().start(upstreams)
    p, origin = await auth_proxy(upstreams, proxy, auth.url)
    for who in ("expired", "alice", "bob"):
        await send(p, "/api/x", bearer(who))
    assert len(origin.seen) == 2
    assert auth.server is not None
    expired, alice, bob = (seen.peer_port for seen in auth.server.seen)
    # The 401 said Connection: close, so its connection was not kept; the next two shared
    # one connection of the auth upstream's pool, which counts it.
    assert alice == bob != expired
    target = p.target("auth")
    assert target.open == 1 and len(target.idle) == 1
