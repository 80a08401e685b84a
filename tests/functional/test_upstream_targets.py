"""Several real upstreams behind one worker: failover, retries, circuit breaking, timeouts,
hash balancing, health results from the master, and TLS to upstreams."""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.functional._http import Message, RawClient, RawConn, get
from tests.functional.conftest import (
    CATCH_ALL,
    StartProxy,
    Upstreams,
    assert_json_error,
    refused_url,
    route,
    wait_for,
)

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def upstream(*urls: str, **options: Any) -> dict[str, Any]:
    return {"targets": list(urls), **options}


class Server:
    """An aiohttp upstream on a fixed port that can be stopped and started again."""

    def __init__(self, name: str, port: int = 0, handler: Any = None,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.name = name
        self.port = port
        self.handler = handler
        self.ssl_context = ssl_context
        self.hits = 0
        self.runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.ssl_context else 'http'}://127.0.0.1:{self.port}"

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.hits += 1
        if self.handler is not None:
            resp: web.StreamResponse = await self.handler(request)
            return resp
        await request.read()
        return web.Response(text=self.name, headers={"X-Upstream": self.name})

    async def start(self) -> Server:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2)
        await self.runner.setup()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        self.port = sock.getsockname()[1]
        await web.SockSite(self.runner, sock, ssl_context=self.ssl_context).start()
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            runner, self.runner = self.runner, None
            await runner.cleanup()


@pytest.fixture
async def servers() -> AsyncIterator[list[Server]]:
    started: list[Server] = []
    try:
        yield started
    finally:
        for s in started:
            await s.stop()


async def start_servers(servers: list[Server], *names: str, handler: Any = None) -> list[Server]:
    out = [await Server(name, handler=handler).start() for name in names]
    servers.extend(out)
    return out


class GetLoad:
    """Closed-loop GETs from several clients; every non-200 or exception is a failure."""

    def __init__(self, url: str, clients: int = 6) -> None:
        self.url = url
        self.clients = clients
        self.ok = 0
        self.failures: list[str] = []
        self.by_upstream: Counter[str] = Counter()
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> GetLoad:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        self._session._retry_connection = False  # aiohttp would hide a reset by resending
        self._tasks = [asyncio.create_task(self._loop()) for _ in range(self.clients)]
        return self

    async def _loop(self) -> None:
        assert self._session is not None
        while not self._stop.is_set():
            try:
                async with self._session.get(self.url + "/load") as r:
                    body = await r.text()
                    if r.status == 200:
                        self.ok += 1
                        self.by_upstream[body] += 1
                    else:
                        self.failures.append(f"{r.status} {body}")
            except (aiohttp.ClientError, TimeoutError) as exc:
                self.failures.append(f"{type(exc).__name__}: {exc}")

    async def run_for(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        if self._session is not None:
            await self._session.close()


# -- failover -----------------------------------------------------------------------------------

async def test_killing_a_target_under_load_fails_no_request_and_it_returns(
    servers: list[Server], proxy: StartProxy
) -> None:
    a, b, c = await start_servers(servers, "a", "b", "c")
    p = await proxy(CATCH_ALL, {"backend": upstream(
        a.url, b.url, c.url, retries={"attempts": 3},
        outlier_detection={"consecutive_failures": 2, "base_ejection": "0.3s",
                           "max_ejection": "0.6s"},
    )})
    load = await GetLoad(p.url).start()
    try:
        await wait_for(lambda: load.by_upstream["b"] > 20, what="b to take traffic")
        await b.stop()
        served_by_b = b.hits
        await load.run_for(1.0)  # b stays dead over several ejection cool-downs
        assert b.hits == served_by_b
        assert p.pipeline.metrics.counters["gateway_upstream_retries_total"], "no retry needed?"
        ejections = p.pipeline.metrics.counters["gateway_upstream_ejections_total"]
        assert ejections.get(("backend", b.url), 0) >= 1
        await b.start()  # same port: back in rotation once its cool-down ends
        await wait_for(lambda: b.hits > served_by_b + 20, timeout=5,
                       what="b to take traffic again")
    finally:
        await load.stop()
    assert load.failures == [], load.failures[:5]
    assert load.ok > 200
    assert set(load.by_upstream) == {"a", "b", "c"}


async def test_connect_error_is_retried_on_another_target_for_any_method(
    servers: list[Server], proxy: StartProxy
) -> None:
    (live,) = await start_servers(servers, "live")
    dead = refused_url()
    p = await proxy(CATCH_ALL, {"backend": upstream(dead, live.url)})
    async with await RawClient.connect(p.port) as c:
        for i in range(4):
            # Nothing reached the dead target, so even a POST may go to the next one.
            resp = await c.request(f"POST /{i} HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\n\r\nx"
                                   .encode())
            assert resp.status == 200 and resp.body == b"live"
    assert live.hits == 4


async def test_all_targets_out_is_503_at_once_or_least_bad_in_panic_mode(
    proxy: StartProxy
) -> None:
    dead = [refused_url() for _ in range(2)]
    outlier = {"consecutive_failures": 1, "base_ejection": "30s", "max_ejection": "30s"}
    p = await proxy(CATCH_ALL, {"backend": upstream(*dead, outlier_detection=outlier)})
    async with await RawClient.connect(p.port) as c:
        err = assert_json_error(await c.request(get("/")), 502)  # both tried, both refused
        assert "connect" in err["error"]
        assert all(not t.up for t in p.pipeline.pools["backend"].targets)
        t0 = time.monotonic()
        err = assert_json_error(await c.request(get("/")), 503)
        assert err["error"] == "no healthy upstream target"
        assert time.monotonic() - t0 < 0.5
    rejected = p.pipeline.metrics.counters["gateway_upstream_rejected_total"]
    assert rejected[("backend", "unavailable")] == 1

    p = await proxy(CATCH_ALL, {"backend": upstream(*dead, outlier_detection=outlier,
                                                    panic_mode=True)})
    async with await RawClient.connect(p.port) as c:
        assert_json_error(await c.request(get("/")), 502)
        err = assert_json_error(await c.request(get("/")), 502)  # tried anyway
        assert "connect" in err["error"]


async def test_unhealthy_targets_from_the_master_get_no_traffic(
    servers: list[Server], proxy: StartProxy
) -> None:
    a, b = await start_servers(servers, "a", "b")
    p = await proxy(CATCH_ALL, {"backend": upstream(a.url, b.url)})
    p.pipeline.set_health({"backend": {b.url: False}, "unknown": {"x": False}})
    async with await RawClient.connect(p.port) as c:
        bodies = {(await c.request(get("/"))).body for _ in range(6)}
        assert bodies == {b"a"}
        p.pipeline.set_health({"backend": {a.url: False}})
        assert_json_error(await c.request(get("/")), 503)
        p.pipeline.set_health({"backend": {a.url: True, b.url: True}})
        bodies = {(await c.request(get("/"))).body for _ in range(6)}
        assert bodies == {b"a", b"b"}


# -- retries ------------------------------------------------------------------------------------

async def test_retriable_status_goes_to_another_target_without_leaking_the_first_answer(
    servers: list[Server], proxy: StartProxy
) -> None:
    async def unavailable(request: web.Request) -> web.Response:
        return web.Response(status=503, text="busy", headers={"X-From": "bad"})

    (bad,) = await start_servers(servers, "bad", handler=unavailable)
    (good,) = await start_servers(servers, "good")
    outlier = {"consecutive_failures": 2, "failure_statuses": [503]}
    p = await proxy(CATCH_ALL, {"backend": upstream(bad.url, good.url,
                                                    outlier_detection=outlier)})
    async with await RawClient.connect(p.port) as c:
        for _ in range(4):
            resp = await c.request(get("/"))
            assert resp.status == 200 and resp.body == b"good"
            assert resp.header("X-From") is None
    # Round robin went to bad first twice, then its 503s (failure_statuses) ejected it.
    assert bad.hits == 2 and good.hits == 4

    # No try left: the upstream's own answer is relayed.
    p = await proxy(CATCH_ALL, {"backend": upstream(bad.url, retries={"attempts": 3})})
    async with await RawClient.connect(p.port) as c:
        resp = await c.request(get("/"))
        assert resp.status == 503 and resp.body == b"busy"


async def test_a_post_is_never_sent_twice(upstreams: Upstreams, servers: list[Server],
                                          proxy: StartProxy) -> None:
    (good,) = await start_servers(servers, "good")

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      conn: RawConn) -> None:
        req = await hole.read_request(reader, conn)
        if req is not None and req.target == "/hang":
            await reader.read()  # never answers
        # else: close without a word, after the request arrived

    async def unavailable(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                          conn: RawConn) -> None:
        if await busy.read_request(reader, conn) is not None:
            writer.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n\r\nbusy")
            await writer.drain()

    hole = await upstreams.raw(swallow)
    busy = await upstreams.raw(unavailable)
    retries = {"attempts": 3, "per_try_timeout": "0.3s", "max_body": "1MiB"}
    # One upstream per case, so that each first try lands on its first target.
    p = await proxy(
        [route("hang", "hang", path_prefix="/hang"), route("hole", "hole", path_prefix="/h"),
         route("busy", "busy", path_prefix="/b")],
        {"hole": upstream(hole.url, good.url, retries=retries),
         "hang": upstream(hole.url, good.url, retries=retries),
         "busy": upstream(busy.url, good.url, retries=retries)},
    )
    post = "POST {} HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello"
    async with await RawClient.connect(p.port) as c:
        assert_json_error(await c.request(post.format("/h/close").encode()), 502)
    async with await RawClient.connect(p.port) as c:
        assert_json_error(await c.request(post.format("/hang").encode()), 504)
    async with await RawClient.connect(p.port) as c:
        resp = await c.request(post.format("/b").encode())
        assert resp.status == 503 and resp.body == b"busy"
    assert [m.method for m in hole.requests] == ["POST", "POST"]
    assert [m.target for m in hole.requests] == ["/h/close", "/hang"]
    assert len(busy.requests) == 1
    assert good.hits == 0


async def test_small_put_body_is_replayed_on_another_target(
    upstreams: Upstreams, proxy: StartProxy
) -> None:
    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      conn: RawConn) -> None:
        await hole.read_request(reader, conn)

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                   conn: RawConn) -> None:
        while (req := await good.read_request(reader, conn)) is not None:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(req.body), req.body))
            await writer.drain()

    hole = await upstreams.raw(swallow)
    good = await upstreams.raw(echo)
    body = b"x" * 3000
    put = b"PUT /p HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    chunked = (b"PUT /c HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
    p = await proxy(CATCH_ALL, {"backend": upstream(
        hole.url, good.url, retries={"attempts": 2, "max_body": "4KiB"})})
    async with await RawClient.connect(p.port) as c:
        resp = await c.request(put)
        assert resp.status == 200 and resp.body == body
        resp = await c.request(chunked)
        assert resp.status == 200 and resp.body == b"hello world"
    assert [m.body for m in hole.requests] == [body, b"hello world"]

    # Over max_body: sent once, never replayed.
    p = await proxy(CATCH_ALL, {"backend": upstream(
        hole.url, good.url, retries={"attempts": 2, "max_body": "1KiB"})})
    async with await RawClient.connect(p.port) as c:
        assert_json_error(await c.request(put), 502)
    assert len(hole.requests) == 3 and len(good.requests) == 2


async def test_retry_budget_limits_extra_requests(servers: list[Server],
                                                  proxy: StartProxy) -> None:
    async def unavailable(request: web.Request) -> web.Response:
        return web.Response(status=503, text="busy")

    a, b = await start_servers(servers, "a", "b", handler=unavailable)
    p = await proxy(CATCH_ALL, {"backend": upstream(
        a.url, b.url, retries={"attempts": 2, "budget": 0.25, "min_retries": 2},
        outlier_detection={"enabled": False})})
    async with await RawClient.connect(p.port) as c:
        for _ in range(20):
            assert (await c.request(get("/"))).status == 503
    retries = p.pipeline.metrics.counters["gateway_upstream_retries_total"][("backend",)]
    assert retries == 5  # 25% of 20 requests
    assert a.hits + b.hits == 25


# -- circuit breaking ---------------------------------------------------------------------------

async def test_breaker_answers_503_at_once_under_overload(
    servers: list[Server], proxy: StartProxy
) -> None:
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(text="slow")

    (up,) = await start_servers(servers, "slow", handler=slow)
    p = await proxy(CATCH_ALL, {"backend": upstream(
        up.url, circuit_breaker={"max_concurrent": 2, "max_pending": 1})})
    pool = p.pipeline.pools["backend"]
    clients = [await RawClient.connect(p.port) for _ in range(5)]
    try:
        for c in clients[:3]:
            await c.send(get("/"))
        await wait_for(lambda: pool.active == 2 and len(pool.queue) == 1, what="2 + 1 queued")
        t0 = time.monotonic()
        for c in clients[3:]:
            err = assert_json_error(await c.request(get("/")), 503)
            assert "concurrent" in err["error"]
        assert time.monotonic() - t0 < 0.5
        release.set()
        for c in clients[:3]:
            assert (await c.response()).body == b"slow"
    finally:
        for c in clients:
            await c.close()
    assert up.hits == 3
    assert pool.active == 0 and not pool.queue


async def test_breaker_trips_on_error_rate_and_closes_after_a_good_probe(
    servers: list[Server], proxy: StartProxy
) -> None:
    failing = True

    async def flaky(request: web.Request) -> web.Response:
        return web.Response(status=500 if failing else 200, text="x")

    (up,) = await start_servers(servers, "flaky", handler=flaky)
    p = await proxy(CATCH_ALL, {"backend": upstream(up.url, circuit_breaker={
        "error_rate": 0.5, "min_requests": 4, "open_for": "0.3s"})})
    async with await RawClient.connect(p.port) as c:
        for _ in range(4):
            assert (await c.request(get("/"))).status == 500
        err = assert_json_error(await c.request(get("/")), 503)
        assert "circuit breaker" in err["error"]
        assert up.hits == 4
        await asyncio.sleep(0.6)  # open_for, plus a tick of the coarse clock
        assert (await c.request(get("/"))).status == 500  # the half-open probe fails
        assert_json_error(await c.request(get("/")), 503)
        failing = False
        await asyncio.sleep(0.6)
        for _ in range(3):
            assert (await c.request(get("/"))).status == 200
    assert p.pipeline.pools["backend"].breaker.state == "closed"


# -- timeouts -----------------------------------------------------------------------------------

async def test_slow_target_trips_the_per_try_timeout(
    servers: list[Server], proxy: StartProxy
) -> None:
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(3)
        return web.Response(text="slow")

    (tortoise,) = await start_servers(servers, "tortoise", handler=slow)
    (hare,) = await start_servers(servers, "hare")
    p = await proxy(CATCH_ALL, {"backend": upstream(
        tortoise.url, hare.url, retries={"per_try_timeout": "0.25s"})})
    async with await RawClient.connect(p.port) as c:
        for _ in range(4):
            t0 = time.monotonic()
            resp = await c.request(get("/"))
            assert resp.status == 200 and resp.body == b"hare"
            assert time.monotonic() - t0 < 1.5
    assert tortoise.hits >= 1

    p = await proxy(CATCH_ALL, {"backend": upstream(
        tortoise.url, retries={"per_try_timeout": "0.25s"})})
    async with await RawClient.connect(p.port) as c:
        t0 = time.monotonic()
        err = assert_json_error(await c.request(get("/")), 504)
        assert err["error"] == "upstream per-try timeout"
        assert 0.2 <= time.monotonic() - t0 < 1.5


async def test_route_timeouts_override_the_upstream(servers: list[Server],
                                                    proxy: StartProxy) -> None:
    async def slow(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.content_length = 10
        if request.path.startswith("/trickle"):
            await resp.prepare(request)
            for _ in range(10):
                await asyncio.sleep(0.15)
                await resp.write(b"x")
            return resp
        await asyncio.sleep(2)
        return web.Response(text="late")

    (up,) = await start_servers(servers, "slow", handler=slow)
    routes = [
        {**route("quick", path_prefix="/read"), "timeouts": {"read": "0.3s"}},
        {**route("total", path_prefix="/trickle"), "timeouts": {"total": "0.6s"}},
        route("default", path_prefix="/"),
    ]
    p = await proxy(routes, {"backend": upstream(up.url, retries={"attempts": 1})})
    async with await RawClient.connect(p.port) as c:
        t0 = time.monotonic()
        err = assert_json_error(await c.request(get("/read")), 504)
        assert err["error"] == "upstream read timeout"
        assert time.monotonic() - t0 < 1.5
    async with await RawClient.connect(p.port) as c:
        await c.send(get("/trickle"))  # each byte within the read timeout, the whole too slow
        with pytest.raises(asyncio.IncompleteReadError):
            await c.response()
    async with await RawClient.connect(p.port) as c:
        assert (await c.request(get("/x"))).body == b"late"  # the pool's 30s read timeout


# -- hash balancing -----------------------------------------------------------------------------

@pytest.mark.parametrize("hash_key", ["header:X-User", "cookie:session", None])
async def test_hash_balancing_is_sticky_per_key(
    servers: list[Server], proxy: StartProxy, hash_key: str | None
) -> None:
    targets = await start_servers(servers, "a", "b", "c", "d")
    p = await proxy(CATCH_ALL, {"backend": upstream(
        *(t.url for t in targets), balance="hash", hash_key=hash_key)})
    homes: dict[str, set[bytes]] = {}
    async with await RawClient.connect(p.port) as c:
        for i in range(40):
            user = f"user-{i % 10}"
            extra = {"header:X-User": f"X-User: {user}\r\n",
                     "cookie:session": f"Cookie: a=1; session={user}; b=2\r\n",
                     None: ""}[hash_key]
            resp: Message = await c.request(get("/", extra=extra))
            assert resp.status == 200
            homes.setdefault(user, set()).add(resp.body)
    assert all(len(bodies) == 1 for bodies in homes.values()), homes
    if hash_key is None:  # client_ip: one client, one target
        assert len(set.union(*homes.values())) == 1
    else:
        assert len(set.union(*homes.values())) >= 2


# -- TLS to upstreams ---------------------------------------------------------------------------

@pytest.fixture
def ca() -> Any:
    trustme = pytest.importorskip("trustme")
    return trustme.CA()


def server_context(ca: Any, *names: str, client_ca: Any = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*names).configure_cert(ctx)
    if client_ca is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
        client_ca.configure_trust(ctx)
    return ctx


async def test_https_upstream_verified_with_the_configured_ca(
    ca: Any, servers: list[Server], proxy: StartProxy, tmp_path: Path
) -> None:
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    up = await Server("secure", ssl_context=server_context(ca, "127.0.0.1")).start()
    servers.append(up)
    p = await proxy(CATCH_ALL, {"backend": upstream(up.url, tls={"ca_file": str(ca_file)})})
    async with await RawClient.connect(p.port) as c:
        for _ in range(3):
            resp = await c.request(get("/"))
            assert resp.status == 200 and resp.body == b"secure"
    target = p.target()
    assert target.open == 1  # the TLS connection was pooled and reused

    # The system trust store does not know this CA: verification fails, nothing is sent.
    p = await proxy(CATCH_ALL, {"backend": upstream(up.url)})
    async with await RawClient.connect(p.port) as c:
        err = assert_json_error(await c.request(get("/")), 502)
        # The TLS error is the operator's (logged), not the client's.
        assert err["error"] == "upstream connect failed"
    # ... unless verification is switched off.
    p = await proxy(CATCH_ALL, {"backend": upstream(up.url, tls={"verify": False})})
    async with await RawClient.connect(p.port) as c:
        assert (await c.request(get("/"))).body == b"secure"
    assert up.hits == 4


async def test_https_upstream_sni_server_name_and_client_certificate(
    ca: Any, servers: list[Server], proxy: StartProxy, tmp_path: Path
) -> None:
    import trustme

    client_ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    client = client_ca.issue_cert("proxyd@example.com")
    cert_file = tmp_path / "client.pem"
    client.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    sni: list[str | None] = []
    ctx = server_context(ca, "backend.internal", client_ca=client_ca)
    ctx.sni_callback = lambda sock, name, _ctx: sni.append(name)  # type: ignore[assignment,misc,func-returns-value]
    up = await Server("mtls", ssl_context=ctx).start()
    servers.append(up)
    tls = {"ca_file": str(ca_file), "server_name": "backend.internal"}
    p = await proxy(CATCH_ALL, {"backend": upstream(up.url, tls={**tls,
                                                                 "client_cert": str(cert_file)})})
    async with await RawClient.connect(p.port) as c:
        assert (await c.request(get("/"))).body == b"mtls"
    assert sni == ["backend.internal"]
    p = await proxy(CATCH_ALL, {"backend": upstream(up.url, tls=tls)})  # no client cert
    async with await RawClient.connect(p.port) as c:
        assert_json_error(await c.request(get("/")), 502)
    assert up.hits == 1


# -- metrics ------------------------------------------------------------------------------------

async def test_pool_gauges_per_upstream_and_target(servers: list[Server],
                                                   proxy: StartProxy) -> None:
    a, b = await start_servers(servers, "a", "b")
    p = await proxy(CATCH_ALL, {"backend": upstream(a.url, b.url)})
    async with await RawClient.connect(p.port) as c:
        for _ in range(4):
            assert (await c.request(get("/"))).status == 200
    gauges = p.pipeline.gauges()
    assert gauges["gateway_upstream_target_connections_idle"] == {
        ("backend", a.url): 1.0, ("backend", b.url): 1.0}
    assert gauges["gateway_upstream_target_connections_active"] == {
        ("backend", a.url): 0.0, ("backend", b.url): 0.0}
    assert gauges["gateway_pool_connections_idle"] == {("backend",): 2.0}
    assert gauges["gateway_upstream_target_ejected"] == {
        ("backend", a.url): 0.0, ("backend", b.url): 0.0}
    assert gauges["gateway_upstream_circuit_open"] == {("backend",): 0.0}
