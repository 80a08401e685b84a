"""Access elements end to end: a Worker in the test loop, a real upstream, and for jwt_auth a
real JWKS server (aiohttp on 127.0.0.1) whose keys the tests rotate and break.

Each test asserts what the client got and what the upstream saw (or that it saw nothing).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import time
from typing import Any

import bcrypt
import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tests.functional._http import Message, RawClient, get
from tests.functional.conftest import (
    AioUpstream,
    Proxy,
    StartProxy,
    Upstreams,
    assert_json_error,
    route,
    wait_for,
)

ROUTES = [route("api", path_prefix="/api"),
          route("public", path_prefix="/public", middleware={"jwt_auth": {"enabled": False}})]


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def public_jwk(key: Any, kid: str) -> dict[str, Any]:
    algorithm = (jwt.algorithms.RSAAlgorithm if isinstance(key, rsa.RSAPrivateKey)
                 else jwt.algorithms.ECAlgorithm)
    return {**json.loads(algorithm.to_jwk(key.public_key())), "kid": kid, "use": "sig"}


def token(key: Any, kid: str, **claims: Any) -> str:
    alg = "RS256" if isinstance(key, rsa.RSAPrivateKey) else "ES256"
    payload = {"sub": "alice", "exp": int(time.time()) + 300, **claims}
    return jwt.encode(payload, key, algorithm=alg, headers={"kid": kid})


class Issuer:
    """The identity provider's JWKS endpoint: serves ``keys``, or fails, or holds its answer
    until ``gate`` opens."""

    def __init__(self) -> None:
        self.keys: list[dict[str, Any]] = []
        self.failing = False
        self.gate: asyncio.Event | None = None
        self.server: AioUpstream | None = None

    async def handler(self, request: web.Request) -> web.StreamResponse:
        if self.gate is not None:
            async with asyncio.timeout(5):
                await self.gate.wait()
        if self.failing:
            return web.Response(status=500)
        return web.json_response({"keys": self.keys})

    async def start(self, upstreams: Upstreams) -> Issuer:
        self.server = await upstreams.aiohttp(self.handler, name="idp")
        return self

    @property
    def url(self) -> str:
        assert self.server is not None
        return self.server.url + "/.well-known/jwks.json"

    @property
    def fetches(self) -> int:
        assert self.server is not None
        return len(self.server.seen)


async def send(p: Proxy, path: str, headers: dict[str, str] | None = None) -> Message:
    extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    async with await RawClient.connect(p.port) as c:
        return await c.request(get(path, extra=extra))


def bearer(value: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {value}"}


def counts(p: Proxy, name: str) -> dict[tuple[Any, ...], float]:
    return dict(p.pipeline.metrics.counters[name])


async def jwt_proxy(upstreams: Upstreams, proxy: StartProxy, issuer: Issuer,
                    **options: Any) -> tuple[Proxy, AioUpstream]:
    up = await upstreams.aiohttp()
    entry = {"type": "jwt_auth", "algorithms": ["RS256", "ES256"], "jwks_url": issuer.url,
             "claims_to_headers": {"sub": "X-User"}, **options}
    p = await proxy(ROUTES, {"backend": up.url}, middleware=[entry])
    return p, up


# -- jwt_auth --------------------------------------------------------------------------------------


async def test_jwt_keys_rotate_and_an_outage_keeps_the_last_good_ones(
        upstreams: Upstreams, proxy: StartProxy, rsa_key: rsa.RSAPrivateKey,
        ec_key: ec.EllipticCurvePrivateKey) -> None:
    issuer = await Issuer().start(upstreams)
    issuer.keys = [public_jwk(rsa_key, "a")]
    p, up = await jwt_proxy(upstreams, proxy, issuer, jwks_min_interval="0s")

    resp = await send(p, "/api/x", {**bearer(token(rsa_key, "a")), "X-User": "mallory"})
    assert resp.status == 200, resp.body
    assert up.seen[-1].header_all("X-User") == ["alice"]  # the claim, never the client's
    assert up.seen[-1].header("Authorization") == "Bearer " + token(rsa_key, "a")

    # The issuer rotates to a new key: a token naming it makes the worker fetch at once.
    issuer.keys = [public_jwk(ec_key, "b")]
    before = issuer.fetches
    resp = await send(p, "/api/x", bearer(token(ec_key, "b", sub="bob")))
    assert resp.status == 200, resp.body
    assert issuer.fetches == before + 1
    assert up.seen[-1].header("X-User") == "bob"
    # The old key is gone from the set: its tokens are refused.
    resp = await send(p, "/api/x", bearer(token(rsa_key, "a")))
    assert_json_error(resp, 401)
    assert resp.header("WWW-Authenticate") == (
        'Bearer realm="proxyd", error="invalid_token", error_description="unknown key"')

    # The issuer breaks: fetches fail, and the keys it served last stay in use.
    issuer.failing = True
    before = issuer.fetches
    resp = await send(p, "/api/x", bearer(token(ec_key, "c")))
    assert_json_error(resp, 401)
    assert issuer.fetches == before + 1
    resp = await send(p, "/api/x", bearer(token(ec_key, "b")))
    assert resp.status == 200, resp.body

    assert counts(p, "gateway_jwks_refreshes_total") == {("ok",): 3.0, ("error",): 1.0}
    auth = counts(p, "gateway_auth_total")
    assert auth[("api", "jwt_auth", "ok")] == 3.0
    assert auth[("api", "jwt_auth", "invalid")] == 2.0
    assert len(up.seen) == 3  # no refused request reached it


async def test_jwt_refusals_and_a_public_route(upstreams: Upstreams, proxy: StartProxy,
                                               rsa_key: rsa.RSAPrivateKey) -> None:
    issuer = await Issuer().start(upstreams)
    issuer.keys = [public_jwk(rsa_key, "a")]
    p, up = await jwt_proxy(upstreams, proxy, issuer, audience="orders")
    resp = await send(p, "/api/x")
    assert_json_error(resp, 401)
    assert resp.header("WWW-Authenticate") == 'Bearer realm="proxyd"'
    resp = await send(p, "/api/x", bearer(token(rsa_key, "a", exp=int(time.time()) - 3600,
                                                 aud="orders")))
    assert_json_error(resp, 401)
    assert 'error_description="token expired"' in (resp.header("WWW-Authenticate") or "")
    resp = await send(p, "/api/x", bearer(token(rsa_key, "a", aud="billing")))
    assert 'error_description="wrong audience"' in (resp.header("WWW-Authenticate") or "")
    assert up.seen == []
    # The public route skips jwt_auth: no token needed, and none is asked for.
    resp = await send(p, "/public/x")
    assert resp.status == 200 and not resp.has("WWW-Authenticate")
    assert [s.path_qs for s in up.seen] == ["/public/x"]
    auth = counts(p, "gateway_auth_total")
    assert auth == {("api", "jwt_auth", "missing"): 1.0, ("api", "jwt_auth", "expired"): 1.0,
                    ("api", "jwt_auth", "invalid"): 1.0}


async def test_jwt_requests_wait_for_the_first_fetch_only(
        upstreams: Upstreams, proxy: StartProxy, rsa_key: rsa.RSAPrivateKey) -> None:
    issuer = await Issuer().start(upstreams)
    issuer.keys = [public_jwk(rsa_key, "a")]
    issuer.gate = asyncio.Event()
    p, _ = await jwt_proxy(upstreams, proxy, issuer)
    await wait_for(lambda: issuer.fetches == 1, what="the worker's first JWKS fetch")
    # Several requests on keep-alive connections, all waiting on the one fetch in flight.
    async with await RawClient.connect(p.port) as c1, await RawClient.connect(p.port) as c2:
        for c in (c1, c2):
            await c.send(get("/api/x", extra=f"Authorization: Bearer {token(rsa_key, 'a')}\r\n"))
        answers = [asyncio.ensure_future(c.response()) for c in (c1, c2)]
        await asyncio.sleep(0)
        assert not any(a.done() for a in answers)  # no key yet: nothing could answer them
        issuer.gate.set()
        for answer in answers:
            assert (await answer).status == 200
        # The connections go on: the next request is answered from the cache.
        resp = await c1.request(get("/api/y", extra=f"Authorization: Bearer "
                                                    f"{token(rsa_key, 'a')}\r\n"))
        assert resp.status == 200
    assert issuer.fetches == 1


async def test_jwt_without_any_key_answers_503(upstreams: Upstreams, proxy: StartProxy,
                                               rsa_key: rsa.RSAPrivateKey) -> None:
    issuer = await Issuer().start(upstreams)
    issuer.failing = True
    p, up = await jwt_proxy(upstreams, proxy, issuer, jwks_min_interval="1h")
    await wait_for(lambda: counts(p, "gateway_jwks_refreshes_total").get(("error",)) == 1.0,
                   what="the failed first fetch")
    resp = await send(p, "/api/x", bearer(token(rsa_key, "a")))
    assert_json_error(resp, 503)
    assert resp.header("Retry-After") == "5"
    assert up.seen == []


async def test_jwt_keys_refreshed_in_the_background(
        upstreams: Upstreams, proxy: StartProxy, rsa_key: rsa.RSAPrivateKey,
        ec_key: ec.EllipticCurvePrivateKey) -> None:
    issuer = await Issuer().start(upstreams)
    issuer.keys = [public_jwk(rsa_key, "a")]
    # A kid it lacks does not make it fetch (min_interval): only the refresh brings key b.
    p, _ = await jwt_proxy(upstreams, proxy, issuer, jwks_refresh="1s", jwks_min_interval="1h")
    await wait_for(lambda: issuer.fetches == 1, what="the first fetch")
    issuer.keys = [public_jwk(rsa_key, "a"), public_jwk(ec_key, "b")]
    resp = await send(p, "/api/x", bearer(token(ec_key, "b")))
    assert_json_error(resp, 401)
    await wait_for(lambda: issuer.fetches >= 2, timeout=10, what="the refresh")
    await wait_for(lambda: counts(p, "gateway_jwks_refreshes_total").get(("ok",)) == 2.0,
                   what="the refresh's keys in use")
    resp = await send(p, "/api/x", bearer(token(ec_key, "b")))
    assert resp.status == 200, resp.body


async def test_one_jwks_fetch_per_worker_for_all_routes(
        upstreams: Upstreams, proxy: StartProxy, rsa_key: rsa.RSAPrivateKey) -> None:
    issuer = await Issuer().start(upstreams)
    issuer.keys = [public_jwk(rsa_key, "a")]
    up = await upstreams.aiohttp()
    routes = [route(f"r{i}", path_prefix=f"/r{i}") for i in range(5)]
    p = await proxy(routes, {"backend": up.url}, middleware=[
        {"type": "jwt_auth", "algorithms": ["RS256"], "jwks_url": issuer.url}])
    for i in range(5):
        assert (await send(p, f"/r{i}/x", bearer(token(rsa_key, "a")))).status == 200
    assert issuer.fetches == 1


# -- basic_auth ------------------------------------------------------------------------------------

ALICE = bcrypt.hashpw(b"wonderland", bcrypt.gensalt(4)).decode()


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


async def test_basic_auth(upstreams: Upstreams, proxy: StartProxy) -> None:
    up = await upstreams.aiohttp()
    p = await proxy([route("admin", path_prefix="/")], {"backend": up.url}, middleware=[
        {"type": "basic_auth", "realm": "ops", "users": {"alice": ALICE},
         "consumer_header": "X-User"}])
    async with await RawClient.connect(p.port) as c:
        for _ in range(2):  # checked in a thread, then from the cache; one connection
            creds = "".join(f"{k}: {v}\r\n" for k, v in basic("alice", "wonderland").items())
            resp = await c.request(get("/x", extra=creds + "X-User: root\r\n"))
            assert resp.status == 200, resp.body
        wrong = "".join(f"{k}: {v}\r\n" for k, v in basic("alice", "queen").items())
        resp = await c.request(get("/x", extra=wrong))
        assert_json_error(resp, 401)
        assert resp.header("WWW-Authenticate") == 'Basic realm="ops", charset="UTF-8"'
    assert len(up.seen) == 2
    for seen in up.seen:  # the password stays here; the user name is ours to say
        assert seen.header("Authorization") is None
        assert seen.header_all("X-User") == ["alice"]
    assert counts(p, "gateway_auth_total") == {("admin", "basic_auth", "ok"): 2.0,
                                               ("admin", "basic_auth", "invalid"): 1.0}


# -- api_key, with rate_limit keyed on its names ---------------------------------------------------


def sha256(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


async def test_api_key_names_the_consumer_that_rate_limit_counts(
        upstreams: Upstreams, proxy: StartProxy) -> None:
    up = await upstreams.aiohttp()
    p = await proxy([route("api", path_prefix="/")], {"backend": up.url}, middleware=[
        {"type": "api_key", "keys": {"ci": sha256("k-ci"), "mobile": sha256("k-mobile")},
         "consumer_header": "X-Consumer"},
        {"type": "rate_limit", "rate": "1/m", "burst": 1, "key": "consumer"}])
    assert (await send(p, "/a", {"X-API-Key": "k-ci"})).status == 200
    assert_json_error(await send(p, "/b", {"X-API-Key": "k-ci"}), 429)  # ci's one is used
    assert (await send(p, "/c", {"X-API-Key": "k-mobile"})).status == 200  # its own bucket
    resp = await send(p, "/d", {"X-API-Key": "k-nope"})
    assert_json_error(resp, 401)
    assert resp.header("WWW-Authenticate") == 'ApiKey realm="proxyd"'
    assert [(s.path_qs, s.header("X-Consumer"), s.header("X-API-Key")) for s in up.seen] == [
        ("/a", "ci", None), ("/c", "mobile", None)]


# -- ip_access -------------------------------------------------------------------------------------


async def test_ip_access_behind_a_trusted_proxy(upstreams: Upstreams, proxy: StartProxy) -> None:
    up = await upstreams.aiohttp()
    routes = [route("api", path_prefix="/api"),
              route("open", path_prefix="/open", middleware={"ip_access": {"enabled": False}})]
    p = await proxy(routes, {"backend": up.url},
                    middleware=[{"type": "ip_access", "deny": ["198.51.100.0/24"]}],
                    server={"trusted_proxies": ["127.0.0.1/32"]})
    resp = await send(p, "/api/x", {"X-Forwarded-For": "198.51.100.7"})
    assert_json_error(resp, 403)
    assert (await send(p, "/api/x", {"X-Forwarded-For": "203.0.113.1"})).status == 200
    assert (await send(p, "/open/x", {"X-Forwarded-For": "198.51.100.7"})).status == 200
    assert [s.path_qs for s in up.seen] == ["/api/x", "/open/x"]


async def test_ip_access_allow_list_without_trusted_proxies(
        upstreams: Upstreams, proxy: StartProxy) -> None:
    up = await upstreams.aiohttp()
    p = await proxy([route("api", path_prefix="/")], {"backend": up.url},
                    middleware=[{"type": "ip_access", "allow": ["10.0.0.0/8"]}])
    # The peer is 127.0.0.1; what the client writes in X-Forwarded-For does not count.
    assert_json_error(await send(p, "/x", {"X-Forwarded-For": "10.0.0.1"}), 403)
    assert up.seen == []
    assert counts(p, "gateway_auth_total") == {("api", "ip_access", "denied"): 1.0}


async def test_ip_access_reads_the_address_a_proxy_protocol_header_gives(
        upstreams: Upstreams, proxy: StartProxy) -> None:
    from proxyd.proxy.proxy_protocol import header_v2

    up = await upstreams.aiohttp()
    # The fixture hands the worker its socket; the listener's address here only has to parse.
    listen = [{"address": "127.0.0.1:1", "proxy_protocol": True,
               "proxy_protocol_from": ["127.0.0.0/8"]}]
    p = await proxy([route("api", path_prefix="/")], {"backend": up.url},
                    middleware=[{"type": "ip_access", "deny": ["198.51.100.0/24"]}],
                    server={"listen": listen})
    for client, status in (("198.51.100.7", 403), ("203.0.113.9", 200)):
        async with await RawClient.connect(p.port) as c:
            await c.send(header_v2(client, 40000, "127.0.0.1", p.port) + get("/x"))
            assert (await c.response()).status == status
    assert [s.header("X-Forwarded-For") for s in up.seen] == ["203.0.113.9"]
