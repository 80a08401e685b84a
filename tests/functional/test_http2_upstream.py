"""HTTP/2 to upstreams (protocol h2c and h2): requests from HTTP/1.1 and HTTP/2 clients
multiplexed over few connections, bodies both ways, trailers, GOAWAY and REFUSED_STREAM
retried on a new connection, TLS with ALPN."""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import trustme

from proxyd.config.models import HealthCheck
from proxyd.proxy.health import probe_h2
from tests.functional._h2client import H2Client
from tests.functional._h2server import H2Origin, H2Reply, H2Request
from tests.functional.conftest import CATCH_ALL, StartProxy, wait_for


@pytest.fixture
async def origins() -> AsyncIterator[list[H2Origin]]:
    started: list[H2Origin] = []
    try:
        yield started
    finally:
        for origin in started:
            await origin.close()


async def h2_origin(origins: list[H2Origin], handler: object = None,
                    tls: ssl.SSLContext | None = None) -> H2Origin:
    origin = H2Origin(tls=tls) if handler is None else H2Origin(handler, tls)  # type: ignore[arg-type]
    origins.append(await origin.start())
    return origin


def h2c(origin: H2Origin, **extra: object) -> dict[str, object]:
    return {"targets": [origin.url], "protocol": "h2c", **extra}


async def test_http11_clients_multiplexed_over_one_h2c_connection(
        proxy: StartProxy, origins: list[H2Origin]) -> None:
    origin = await h2_origin(origins)
    p = await proxy(CATCH_ALL, {"backend": h2c(origin)})
    async with aiohttp.ClientSession() as session:
        async def one(i: int) -> None:
            async with session.get(f"{p.url}/r/{i}") as resp:
                assert resp.status == 200
                assert resp.headers["x-path"] == f"/r/{i}"
        await asyncio.gather(*(one(i) for i in range(30)))
        body = bytes(range(256)) * 2048  # 512 KiB: past the upstream's stream window
        async with session.post(f"{p.url}/upload", data=body) as resp:
            assert hashlib.sha256(await resp.read()).digest() == hashlib.sha256(body).digest()
    assert origin.connections == 1  # one worker, one connection for all of them
    seen = origin.seen[0]
    assert seen.headers[b":authority"] == b"127.0.0.1:%d" % p.port
    assert seen.headers[b":scheme"] == b"http"
    assert seen.headers[b"te"] == b"trailers"
    assert b"connection" not in seen.headers and b"x-forwarded-for" in seen.headers


async def test_h2_client_to_h2c_upstream_with_trailers(proxy: StartProxy,
                                                       origins: list[H2Origin]) -> None:
    async def with_trailers(req: H2Request) -> H2Reply:
        return H2Reply(200, [(b"content-type", b"application/grpc")], b"\x00\x00\x00\x00\x00",
                       [(b"grpc-status", b"0"), (b"grpc-message", b"ok")])

    origin = await h2_origin(origins, with_trailers)
    p = await proxy(CATCH_ALL, {"backend": h2c(origin)})
    client = await H2Client.open(p.port)
    try:
        answer = await client.get("/pkg.Service/Method", method="POST",
                                  headers=[("te", "trailers"),
                                           ("content-type", "application/grpc")])
        assert answer.status == 200
        assert bytes(answer.body) == b"\x00" * 5
        assert dict(answer.trailers) == {b"grpc-status": b"0", b"grpc-message": b"ok"}
    finally:
        await client.close()


async def test_goaway_moves_requests_to_a_new_connection(proxy: StartProxy,
                                                         origins: list[H2Origin]) -> None:
    origin = await h2_origin(origins)
    origin.goaway_after = 1
    p = await proxy(CATCH_ALL, {"backend": h2c(origin)})
    async with aiohttp.ClientSession() as session:
        for i in range(3):
            async with session.get(f"{p.url}/g/{i}") as resp:
                assert resp.status == 200, await resp.text()
    assert origin.connections == 2
    assert [r.connection for r in origin.seen] == [1, 2, 2]


async def test_refused_stream_is_retried_whatever_the_method(
        proxy: StartProxy, origins: list[H2Origin]) -> None:
    origin = await h2_origin(origins)
    origin.refuse_streams = 1
    p = await proxy(CATCH_ALL, {"backend": h2c(origin)})
    async with aiohttp.ClientSession() as session, \
            session.post(f"{p.url}/once", data=b"payload") as resp:
        assert resp.status == 200, await resp.text()
        assert await resp.read() == b"payload"
    assert len(origin.seen) == 1


async def test_a_dead_h2_upstream_is_a_502(proxy: StartProxy) -> None:
    from tests.functional.conftest import refused_url
    p = await proxy(CATCH_ALL, {"backend": {"targets": [refused_url()], "protocol": "h2c"}})
    async with aiohttp.ClientSession() as session, session.get(f"{p.url}/x") as resp:
        assert resp.status == 502
        assert (await resp.json())["request_id"] == resp.headers["X-Request-ID"]


async def test_tls_upstream_with_alpn_h2(proxy: StartProxy, origins: list[H2Origin],
                                         tmp_path: Path) -> None:
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    leaf.configure_cert(server)
    server.set_alpn_protocols(["h2"])
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    origin = await h2_origin(origins, tls=server)
    p = await proxy(CATCH_ALL, {"backend": {"targets": [origin.url], "protocol": "h2",
                                            "tls": {"ca_file": str(ca_file)}}})
    async with aiohttp.ClientSession() as session, session.get(f"{p.url}/tls") as resp:
        assert resp.status == 200
        assert resp.headers["x-path"] == "/tls"
    assert origin.seen[0].headers[b":scheme"] == b"https"


async def test_pool_gauge_counts_streams(proxy: StartProxy, origins: list[H2Origin]) -> None:
    release = asyncio.Event()

    async def slow(req: H2Request) -> H2Reply:
        await release.wait()
        return H2Reply(200, [], b"done")

    origin = await h2_origin(origins, slow)
    p = await proxy(CATCH_ALL, {"backend": h2c(origin)})
    async with aiohttp.ClientSession() as session:
        tasks = [asyncio.ensure_future(session.get(f"{p.url}/s/{i}")) for i in range(5)]
        await wait_for(lambda: len(origin.seen) == 5, what="five streams upstream")
        gauges = p.pipeline.gauges()
        key = ("backend", origin.url)
        assert gauges["gateway_upstream_target_requests_active"][key] == 5
        assert gauges["gateway_upstream_target_connections_active"][key] == 1
        release.set()
        for resp in await asyncio.gather(*tasks):
            assert resp.status == 200
            resp.release()


async def test_health_check_speaks_http2(origins: list[H2Origin]) -> None:
    async def by_path(req: H2Request) -> H2Reply:
        return H2Reply(200 if req.path == "/ok" else 503, [], b"")

    origin = await h2_origin(origins, by_path)
    ok = await probe_h2(origin.url, HealthCheck(path="/ok"), None, None)
    assert ok == (True, 200, None)
    failing = await probe_h2(origin.url, HealthCheck(path="/down"), None, None)
    assert failing == (False, 503, None)
    from tests.functional.conftest import refused_url
    dead = await probe_h2(refused_url(), HealthCheck(path="/ok"), None, None)
    assert dead[0] is False and dead[2] is not None
    assert origin.seen[0].headers[b"user-agent"] == b"proxyd-health-check"


async def test_a_second_connection_when_the_server_limit_is_reached(
        proxy: StartProxy, origins: list[H2Origin]) -> None:
    release = asyncio.Event()

    async def slow(req: H2Request) -> H2Reply:
        await release.wait()
        return H2Reply(200, [], b"done")

    origin = await h2_origin(origins, slow)
    origin.max_streams = 2  # SETTINGS_MAX_CONCURRENT_STREAMS
    p = await proxy(CATCH_ALL, {"backend": h2c(origin)})
    async with aiohttp.ClientSession() as session:
        tasks = [asyncio.ensure_future(session.get(f"{p.url}/s/{i}")) for i in range(5)]
        await wait_for(lambda: len(origin.seen) == 5, what="five streams upstream")
        assert origin.connections == 3  # 2 + 2 + 1: never more than the server allows
        assert max(sum(1 for r in origin.seen if r.connection == c) for c in (1, 2, 3)) == 2
        release.set()
        for resp in await asyncio.gather(*tasks):
            assert resp.status == 200
            resp.release()


async def test_idle_connection_is_pinged_then_closed_at_keepalive_expiry(
        proxy: StartProxy, origins: list[H2Origin]) -> None:
    origin = await h2_origin(origins)
    p = await proxy(CATCH_ALL, {"backend": h2c(origin, pool={"keepalive_expiry": "1s"})})
    async with aiohttp.ClientSession() as session, session.get(f"{p.url}/once") as resp:
        assert resp.status == 200
    await wait_for(lambda: origin.pings >= 1, timeout=10, what="a PING on the idle connection")
    await wait_for(lambda: origin.closed_connections == 1, timeout=10,
                   what="the idle connection closed")
    assert p.target().streams == 0
