"""Subrequests (proxy/subrequest.py) through a Worker's own upstream pools, against real
upstream servers on 127.0.0.1: connection reuse shared with client requests, retries and
outlier detection, the overall deadline, the body cap, and connections cut mid-body."""

from __future__ import annotations

import asyncio
from time import monotonic

import pytest

from proxyd.proxy.subrequest import (
    ERROR_TOO_LARGE,
    Answer,
    Subrequest,
    SubrequestError,
    fetch,
)
from proxyd.proxy.upstream import UpstreamPool
from proxyd.proxy.upstream_conn import ERROR_RESET, ERROR_TIMEOUT
from tests.functional._http import (
    Message,
    RawClient,
    RawConn,
    RawUpstream,
    get,
    serve_keepalive,
)
from tests.functional.conftest import (
    CATCH_ALL,
    Proxy,
    StartProxy,
    Upstreams,
    refused_url,
    route,
    wait_for,
)


def ok(body: bytes = b"hello") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nX-From: raw\r\n\r\n%b" % (len(body), body)


async def keepalive_upstream(upstreams: Upstreams, response: bytes = ok()) -> RawUpstream:
    """Answers every request on a connection with ``response`` until the proxy closes it."""
    started: list[RawUpstream] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      conn: RawConn) -> None:
        await serve_keepalive(started[0], reader, writer, conn, lambda req, c: response)

    started.append(await upstreams.raw(handler))
    return started[0]


def pool(p: Proxy) -> UpstreamPool:
    return p.pipeline.pools["backend"]


async def ask(p: Proxy, method: bytes = b"GET", body: bytes = b"",
              timeout: float | None = None, max_body: int = 64 * 1024) -> Answer:
    sub = Subrequest(pool(p), method, b"/sub", [(b"X-Asked-By", b"test")], body,
                     timeout=timeout, max_body=max_body)
    return await sub.start()


async def test_one_keepalive_connection_serves_subrequests_and_a_client_request(
        upstreams: Upstreams, proxy: StartProxy) -> None:
    upstream = await keepalive_upstream(upstreams)
    p = await proxy(CATCH_ALL, {"backend": upstream.url})
    for _ in range(2):
        answer = await ask(p)
        assert (answer.status, answer.body) == (200, b"hello")
        assert (b"X-From", b"raw") in answer.headers
    target = p.target()
    assert target.open == 1 and len(target.idle) == 1  # back in the pool, counted there
    async with await RawClient.connect(p.port) as c:
        resp = await c.request(get("/client"))
        assert resp.status == 200 and resp.body == b"hello"
    assert len(upstream.conns) == 1 and upstream.conns[0].requests == 3
    first = upstream.requests[0]
    assert first.start == "GET /sub HTTP/1.1"
    assert first.header("Host") == f"127.0.0.1:{upstream.port}"
    assert first.header("X-Asked-By") == "test"
    assert first.header("Content-Length") is None
    # A body goes with its length; the connection is still the same one.
    answer = await ask(p, method=b"POST", body=b"abc")
    assert answer.status == 200
    assert upstream.requests[-1].body == b"abc"
    assert upstream.requests[-1].header("Content-Length") == "3"
    assert len(upstream.conns) == 1


async def test_a_dead_target_is_retried_on_another_and_ejected(
        upstreams: Upstreams, proxy: StartProxy) -> None:
    live = await keepalive_upstream(upstreams)
    dead = refused_url()
    p = await proxy(CATCH_ALL, {"backend": {
        "targets": [dead, live.url],
        "outlier_detection": {"consecutive_failures": 1, "base_ejection": "30s"}}})
    for _ in range(2):  # round robin: one of the two picks the dead target first
        assert (await ask(p)).status == 200
    dead_target = p.target("backend", 0)
    assert dead_target.ejected_until > 0.0 and not dead_target.up
    counters = p.pipeline.metrics.counters
    assert counters["gateway_upstream_ejections_total"][("backend", dead)] == 1.0
    assert counters["gateway_upstream_retries_total"][("backend",)] == 1.0
    assert counters["gateway_upstream_errors_total"] == {}  # the retry answered
    assert len(live.requests) == 2


async def test_the_overall_deadline_ends_it_with_a_timeout_and_no_later(
        upstreams: Upstreams, proxy: StartProxy) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     conn: RawConn) -> None:
        await stalled.read_request(reader, conn)
        await reader.read()  # never answers; returns at the proxy's close

    stalled = await upstreams.raw(silent)
    p = await proxy(CATCH_ALL, {"backend": stalled.url})
    started = monotonic()
    with pytest.raises(SubrequestError) as failed:
        await ask(p, timeout=0.3)
    elapsed = monotonic() - started
    assert failed.value.kind == ERROR_TIMEOUT
    assert elapsed >= 0.3  # the budget ran out, no sooner
    assert elapsed < 0.3 + 1.0  # the read timeout (30 s) was not what ended it
    await wait_for(lambda: stalled.conns[0].done.is_set(), what="the connection closed")
    target = p.target()
    assert target.open == 0 and target.idle == []
    assert p.pipeline.metrics.counters["gateway_upstream_errors_total"] == {
        ("backend", "timeout"): 1.0}


async def test_a_body_past_max_body_is_an_error_and_its_connection_is_closed(
        upstreams: Upstreams, proxy: StartProxy) -> None:
    chunked = (b"HTTP/1.1 401 Unauthorized\r\nTransfer-Encoding: chunked\r\n"
               b"WWW-Authenticate: Bearer\r\n\r\n8\r\n12345678\r\n8\r\n12345678\r\n0\r\n\r\n")
    for response in (ok(b"x" * 100), chunked):  # told by its length, or found reading it
        upstream = await keepalive_upstream(upstreams, response)
        p = await proxy(CATCH_ALL, {"backend": upstream.url})
        with pytest.raises(SubrequestError) as failed:
            await ask(p, max_body=10)
        assert failed.value.kind == ERROR_TOO_LARGE
        head = failed.value.head
        assert head is not None and head.body == b""
        assert head.status in (200, 401)
        first = upstream.conns[0]
        await wait_for(first.eof.is_set, what="the connection closed")
        assert p.target().open == 0
        assert (await ask(p, max_body=1000)).status == head.status
        assert len(upstream.conns) == 2


async def test_a_connection_closed_mid_body_is_not_reused(
        upstreams: Upstreams, proxy: StartProxy) -> None:
    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                  conn: RawConn) -> None:
        await upstream.read_request(reader, conn)
        if conn.index == 0:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
            await writer.drain()
            return  # closed: 90 bytes short
        writer.write(ok())
        await writer.drain()
        await reader.read()

    upstream = await upstreams.raw(cut)
    p = await proxy(CATCH_ALL, {"backend": upstream.url})
    with pytest.raises(SubrequestError) as failed:
        await ask(p)
    assert failed.value.kind == ERROR_RESET  # not retried: the head had come
    assert len(upstream.requests) == 1
    target = p.target()
    await wait_for(lambda: target.open == 0, what="the pool to let go of the connection")
    assert target.idle == []
    assert (await ask(p)).body == b"hello"
    assert len(upstream.conns) == 2


async def test_fetch_asks_what_the_route_would_ask(
        upstreams: Upstreams, proxy: StartProxy) -> None:
    upstream = await keepalive_upstream(upstreams)
    routes = [route("api", path_prefix="/api", strip_prefix="/api")]
    p = await proxy(routes, {"backend": upstream.url})
    [compiled] = p.pipeline.router.routes
    result = await fetch(p.pipeline.pools, compiled, b"/api/items", b"page=2",
                         [(b"host", b"client.test"), (b"if-none-match", b'"v1"')])
    assert result == (200, [(b"Content-Length", b"5"), (b"X-From", b"raw")], b"hello")
    seen: Message = upstream.requests[-1]
    assert seen.start == "GET /items?page=2 HTTP/1.1"
    assert seen.header("If-None-Match") == '"v1"'
    # Host as a client request on the route sends it: the client's (preserve_host, the
    # default), else the target's.
    assert seen.header_all("Host") == ["client.test"]
    p = await proxy(routes, {"backend": {"targets": [upstream.url], "preserve_host": False}})
    [compiled] = p.pipeline.router.routes
    await fetch(p.pipeline.pools, compiled, b"/api/items", b"", [(b"host", b"client.test")])
    assert upstream.requests[-1].header_all("Host") == [f"127.0.0.1:{upstream.port}"]
    # No target up: no answer.
    dead = await proxy(routes, {"backend": refused_url()})
    [compiled] = dead.pipeline.router.routes
    assert await fetch(dead.pipeline.pools, compiled, b"/api/x", b"", []) is None
