"""Pooled upstream connections: reuse, stale connections and retries, limits, expiry, balance."""

from __future__ import annotations

import asyncio
from time import monotonic

import pytest

from proxyd.proxy.lifecycle import RELAYING
from tests.functional._http import RawClient, RawConn, RawUpstream, get
from tests.functional.conftest import (
    CATCH_ALL,
    Proxy,
    StartProxy,
    Upstreams,
    assert_json_error,
    wait_for,
)

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


async def test_pool_reuses_connection_across_clients(
    upstreams: Upstreams, proxy: StartProxy
) -> None:
    up = await upstreams.aiohttp()
    p = await proxy(CATCH_ALL, {"backend": up.url})
    for i in range(3):
        async with await RawClient.connect(p.port) as c:
            assert (await c.request(get(f"/{i}"))).status == 200
    assert len({s.peer_port for s in up.seen}) == 1
    assert p.target().open == 1 and len(p.target().idle) == 1


async def test_client_connection_close_keeps_the_upstream_connection(
    upstreams: Upstreams, proxy: StartProxy
) -> None:
    """A client that closes after each request (Connection: close, HTTP/1.0, the keep-alive
    cap) must not cost an upstream connection per request: the upstream's is still good."""
    up = await upstreams.aiohttp()
    p = await proxy(CATCH_ALL, {"backend": up.url}, limits={"max_keepalive_requests": 2})
    for i in range(3):
        async with await RawClient.connect(p.port) as c:
            resp = await c.request(b"GET /%d HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n" % i)
            assert resp.status == 200 and resp.header("Connection") == "close"
    async with await RawClient.connect(p.port) as c:  # two on one, the second is the cap's
        for i in range(2):
            assert (await c.request(get(f"/cap{i}"))).status == 200
        assert await c.read_to_eof() == b""
    assert len(up.seen) == 5 and len({s.peer_port for s in up.seen}) == 1
    assert p.target().open == 1 and len(p.target().idle) == 1


async def test_answer_before_body_end_drops_the_upstream_connection(
    upstreams: Upstreams, proxy: StartProxy
) -> None:
    """An upstream that answers before the request body is in gets no more of it, so its
    connection is out of step and never reused: not even when the client sends the rest
    before the response ends."""
    body_sent = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      conn: RawConn) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        if b"/early" in head:
            writer.write(b"HTTP/1.1 413 Too Large\r\nContent-Length: 4\r\n\r\nno")
            await writer.drain()
            await body_sent.wait()
            writer.write(b"pe")  # the response ends after the request did
            await reader.read()
            return
        writer.write(OK)
        await reader.read()

    up = await upstreams.raw(handler)
    p = await proxy(CATCH_ALL, {"backend": up.url})
    async with await RawClient.connect(p.port) as c:
        await c.send(b"POST /early HTTP/1.1\r\nHost: t\r\nContent-Length: 20\r\n\r\n" + b"x" * 10)
        await wait_for(lambda: any(getattr(ds, "active", None) is not None and ds.active.status
                                   == 0 and ds.active.exchange is not None
                                   and ds.active.exchange.state == RELAYING
                                   for ds in p.pipeline.connections), what="the early head")
        await c.send(b"y" * 10)  # the rest of the body, after the head, before the end
        await wait_for(lambda: all(getattr(ds, "req", None) is None
                                   for ds in p.pipeline.connections), what="the body read")
        body_sent.set()
        resp = await c.response()
        assert resp.status == 413 and resp.body == b"nope"
        assert resp.header("Connection") == "close"
        assert await c.read_to_eof() == b""
    await asyncio.wait_for(up.conns[0].done.wait(), 5)
    assert p.target().idle == []
    async with await RawClient.connect(p.port) as c:
        assert (await c.request(get("/next"))).body == b"ok"
    assert len(up.conns) == 2


async def stale_after_first(
    upstreams: Upstreams, proxy: StartProxy, **kw: object
) -> tuple[Proxy, RawUpstream]:
    """Every upstream connection answers its first request, then closes on the next one
    without answering: the race of an upstream closing an idle connection as it is reused."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      conn: RawConn) -> None:
        req = await up.read_request(reader, conn)
        if req is None:
            return
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s"
                     % (len(req.target), req.target.encode()))
        await writer.drain()
        await up.read_request(reader, conn)  # ... and close without a word

    up = await upstreams.raw(handler)
    p = await proxy(CATCH_ALL, {"backend": up.url}, **kw)
    return p, up


@pytest.mark.parametrize("method", ["GET", "HEAD", "DELETE"])
async def test_stale_pooled_connection_retried_for_idempotent(
    upstreams: Upstreams, proxy: StartProxy, method: str
) -> None:
    p, up = await stale_after_first(upstreams, proxy)
    async with await RawClient.connect(p.port) as c:
        assert (await c.request(get("/first"))).body == b"/first"
        resp = await c.request(get("/second", method=method), head=method == "HEAD")
        assert resp.status == 200
        if method != "HEAD":
            assert resp.body == b"/second"
    assert len(up.conns) == 2
    assert up.conns[0].requests == 2 and up.conns[1].requests == 1


async def test_stale_pooled_connection_not_retried_for_post(
    upstreams: Upstreams, proxy: StartProxy
) -> None:
    p, up = await stale_after_first(upstreams, proxy)
    async with await RawClient.connect(p.port) as c:
        assert (await c.request(get("/first"))).status == 200
        resp = await c.request(b"POST /second HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n")
        assert_json_error(resp, 502)
    async with await RawClient.connect(p.port) as c:
        resp = await c.request(b"PUT /third HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc")
        assert resp.status == 200  # a fresh connection: nothing stale to retry
        resp = await c.request(b"PUT /fourth HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc")
        assert_json_error(resp, 502)  # a body once sent is not sent again
    assert len(up.conns) == 2


@pytest.mark.parametrize("attempts", [1, 2, 3])
async def test_retry_attempts_are_tries_in_total(
    upstreams: Upstreams, proxy: StartProxy, attempts: int
) -> None:
    arrived = asyncio.Event()
    first_round = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      conn: RawConn) -> None:
        nonlocal first_round
        if await up.read_request(reader, conn) is None:
            return
        first_round += 1
        if first_round == 4:
            arrived.set()
        await arrived.wait()  # hold the answers so that four connections open
        writer.write(OK)
        await writer.drain()
        await up.read_request(reader, conn)  # then every reuse finds the connection dying

    up = await upstreams.raw(handler)
    p = await proxy(
        CATCH_ALL, {"backend": {"targets": [up.url], "retries": {"attempts": attempts}}}
    )
    clients = [await RawClient.connect(p.port) for _ in range(4)]
    try:
        responses = await asyncio.gather(*(c.request(get("/warm")) for c in clients))
        assert all(r.status == 200 for r in responses)
        await wait_for(lambda: len(p.target().idle) == 4, what="four idle connections")
        assert_json_error(await clients[0].request(get("/x")), 502)
    finally:
        for c in clients:
            await c.close()
    tries = sum(1 for conn in up.conns if conn.requests == 2)
    assert tries == attempts


async def test_upstream_closing_idle_connection_is_dropped_from_pool(
    upstreams: Upstreams, proxy: StartProxy
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      conn: RawConn) -> None:
        if await up.read_request(reader, conn) is not None:
            writer.write(OK)  # keep-alive by the headers, then close anyway

    up = await upstreams.raw(handler)
    p = await proxy(CATCH_ALL, {"backend": up.url})
    async with await RawClient.connect(p.port) as c:
        assert (await c.request(get("/1"))).body == b"ok"
        await wait_for(lambda: p.target().open == 0, what="the pool to drop the closed one")
        assert (await c.request(get("/2"))).body == b"ok"
    assert len(up.conns) == 2


async def test_bytes_on_idle_connection_make_it_unusable(
    upstreams: Upstreams, proxy: StartProxy
) -> None:
    junk = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      conn: RawConn) -> None:
        while (req := await up.read_request(reader, conn)) is not None:
            writer.write(OK)
            await writer.drain()
            if conn.index == 0 and req.target == "/1":
                await junk.wait()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nevil")

    up = await upstreams.raw(handler)
    p = await proxy(CATCH_ALL, {"backend": up.url})
    async with await RawClient.connect(p.port) as c:
        assert (await c.request(get("/1"))).body == b"ok"
        await wait_for(lambda: len(p.target().idle) == 1, what="the connection to be idle")
        junk.set()
        await asyncio.wait_for(up.conns[0].done.wait(), 5)  # the proxy closed it
        assert (await c.request(get("/2"))).body == b"ok"
    assert len(up.conns) == 2


async def test_max_connections_queues_requests(upstreams: Upstreams, proxy: StartProxy) -> None:
    release = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      conn: RawConn) -> None:
        while (req := await up.read_request(reader, conn)) is not None:
            if req.target == "/a":
                await release.wait()
            writer.write(OK)
            await writer.drain()

    up = await upstreams.raw(handler)
    p = await proxy(CATCH_ALL, {"backend": up.url}, pool={"max_connections": 1})
    async with await RawClient.connect(p.port) as a, await RawClient.connect(p.port) as b:
        await a.send(get("/a"))
        await wait_for(lambda: len(up.requests) == 1, what="the first request upstream")
        await b.send(get("/b"))
        await wait_for(lambda: len(p.target().waiters) == 1, what="the second to queue")
        release.set()
        ra, rb = await asyncio.gather(a.response(), b.response())
        assert ra.body == rb.body == b"ok"
    assert len(up.conns) == 1 and up.conns[0].requests == 2


async def test_keepalive_expiry_closes_idle_connection(
    upstreams: Upstreams, proxy: StartProxy
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      conn: RawConn) -> None:
        while await up.read_request(reader, conn) is not None:
            writer.write(OK)

    up = await upstreams.raw(handler)
    p = await proxy(CATCH_ALL, {"backend": up.url}, pool={"keepalive_expiry": "0.3s"})
    async with await RawClient.connect(p.port) as c:
        assert (await c.request(get("/1"))).body == b"ok"
        t0 = monotonic()
        await asyncio.wait_for(up.conns[0].eof.wait(), 3)
        assert monotonic() - t0 >= 0.25
        assert (await c.request(get("/2"))).body == b"ok"
    assert len(up.conns) == 2


async def test_max_keepalive_zero_closes_after_each(
    upstreams: Upstreams, proxy: StartProxy
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      conn: RawConn) -> None:
        while await up.read_request(reader, conn) is not None:
            writer.write(OK)

    up = await upstreams.raw(handler)
    p = await proxy(CATCH_ALL, {"backend": up.url}, pool={"max_keepalive": 0})
    async with await RawClient.connect(p.port) as c:
        for path in ("/1", "/2"):
            assert (await c.request(get(path))).body == b"ok"
    await asyncio.wait_for(up.conns[0].eof.wait(), 3)
    assert len(up.conns) == 2


async def test_round_robin_across_targets(upstreams: Upstreams, proxy: StartProxy) -> None:
    a = await upstreams.aiohttp(name="a")
    b = await upstreams.aiohttp(name="b")
    p = await proxy(CATCH_ALL, {"backend": [a.url, b.url]})
    async with await RawClient.connect(p.port) as c:
        names = [(await c.request(get("/"))).header("X-Upstream") for _ in range(4)]
    assert names == ["a", "b", "a", "b"]
