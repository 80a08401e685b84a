"""Slow clients: header_timeout (slowloris, an unfinished head), body_timeout (between body
bytes, never while proxyd waits) and send_timeout (a client that stops reading).
"""

from __future__ import annotations

import asyncio
import socket
from time import monotonic

from tests.functional._http import RawClient, RawConn, RawUpstream, get
from tests.functional._recording import OK_RESPONSE, nothing_reached, recording_proxy, still_serving
from tests.functional.conftest import CATCH_ALL, StartProxy, Upstreams, assert_json_error, wait_for

# -- slow headers -------------------------------------------------------------------------------


async def test_header_timeout_closes_and_upstream_sees_nothing(
    upstreams: Upstreams, proxy: StartProxy
) -> None:
    p, up = await recording_proxy(upstreams, proxy, limits={"header_timeout": "0.3s"},
                                  server={"keepalive_timeout": "30s"})
    async with await RawClient.connect(p.port) as c:
        t0 = monotonic()
        await c.send(b"POST /slow HTTP/1.1\r\nHost: t\r\nContent-Le")
        # Answered 408 and closed; never before the timeout (a deadline may be late only).
        answer = await c.read_to_eof(timeout=3)
        assert answer.startswith(b"HTTP/1.1 408 ") and b"Connection: close" in answer
        assert monotonic() - t0 >= 0.3
    await nothing_reached(up)
    await still_serving(p, up)


async def test_http09_request_line_alone_is_never_forwarded(
    upstreams: Upstreams, proxy: StartProxy
) -> None:
    """An HTTP/0.9 request line without fields: llhttp waits for a head that never comes;
    header_timeout answers 408 (as HTTP/1.1: 0.9 has no status line) and closes it."""
    p, up = await recording_proxy(upstreams, proxy, limits={"header_timeout": "0.3s"})
    async with await RawClient.connect(p.port) as c:
        await c.send(b"GET /index.html\r\n")
        assert (await c.read_to_eof(timeout=3)).startswith(b"HTTP/1.1 408 ")
    await nothing_reached(up)
    await still_serving(p, up)


async def test_500_slow_header_connections(upstreams: Upstreams, proxy: StartProxy) -> None:
    """Slowloris: 500 clients that never finish their heads do not delay a normal request,
    and every one of them is closed once header_timeout has passed."""
    p, up = await recording_proxy(upstreams, proxy, limits={"header_timeout": "1.5s"},
                                  server={"keepalive_timeout": "30s"})
    slow: list[RawClient] = []
    try:
        for i in range(500):
            c = await RawClient.connect(p.port)
            slow.append(c)
            c.writer.write(b"GET /slow%d HTTP/1.1\r\nHost: t\r\nX-Slow: " % i)
        for c in slow:
            await c.writer.drain()
        started = monotonic()
        await wait_for(lambda: len(p.pipeline.connections) >= 500, what="500 connections")
        t0 = monotonic()
        async with await RawClient.connect(p.port) as c:
            resp = await c.request(get("/normal"))
        elapsed = monotonic() - t0
        assert resp.status == 200
        assert elapsed < 2.0, f"a normal request took {elapsed:.2f}s beside 500 slow clients"
        # One more byte each: dribbling does not extend the header timeout.
        for c in slow:
            c.writer.write(b"x")
        results = await asyncio.gather(*(c.read_to_eof(timeout=6) for c in slow))
        assert all(r.startswith(b"HTTP/1.1 408 ") for r in results)
        closed_after = monotonic() - started
        assert 1.0 <= closed_after < 6.0
    finally:
        for c in slow:
            await c.close()
    await wait_for(lambda: len(p.pipeline.connections) == 0, what="all closed")
    assert [r.target for r in up.requests] == ["/normal"] and up.partial == []


# -- body timeout -------------------------------------------------------------------------------


async def test_body_timeout_before_the_upstream_answers(
    upstreams: Upstreams, proxy: StartProxy
) -> None:
    """A stalled upload: 408 and close; the upstream exchange that had part of it is ended."""
    p, up = await recording_proxy(upstreams, proxy, limits={"body_timeout": "0.3s"})
    async with await RawClient.connect(p.port) as c:
        await c.send(b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n"
                     + b"x" * 10)
        t0 = monotonic()
        resp = await c.response(timeout=3)
        assert monotonic() - t0 >= 0.2
        assert_json_error(resp, 408)
        assert resp.header("Connection") == "close"
        assert await c.read_to_eof() == b""
    # The upstream got the head and 10 bytes, then its connection was closed.
    await wait_for(lambda: len(up.partial) == 1, what="the upstream connection to close")
    assert up.requests == [] and up.partial[0].endswith(b"\r\n\r\n" + b"x" * 10)
    assert p.target().open == 0
    assert p.pipeline.metrics.counters["gateway_client_limits_total"][("body_timeout",)] == 1
    await still_serving(p, up)


async def test_body_timeout_is_between_bytes_not_total(
    upstreams: Upstreams, proxy: StartProxy
) -> None:
    p, up = await recording_proxy(upstreams, proxy, limits={"body_timeout": "0.4s"})
    async with await RawClient.connect(p.port) as c:
        await c.send(b"POST /dribble HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(8):  # 1.2 s in all, never 0.4 s without a byte
            await asyncio.sleep(0.15)
            await c.send(b"1\r\nx\r\n")
        resp = await c.request(b"0\r\n\r\n")
        assert resp.status == 200
        # Idle keep-alive afterwards is the keep-alive timeout's business, not body_timeout's.
        await asyncio.sleep(0.6)
        assert (await c.request(get("/next"))).status == 200
    assert [r.target for r in up.requests] == ["/dribble", "/next"]


async def test_body_timeout_does_not_count_proxyd_waiting(
    upstreams: Upstreams, proxy: StartProxy
) -> None:
    """A pipelined upload waits (reading paused) while the request before it is slow
    upstream: that wait is not the client's, and must not time its body out."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      conn: RawConn) -> None:
        while (req := await up.read_request(reader, conn)) is not None:
            if req.target == "/slow":
                await asyncio.sleep(1.0)
            writer.write(OK_RESPONSE)
            await writer.drain()

    up = await upstreams.raw(handler)
    p = await proxy(CATCH_ALL, {"backend": up.url}, limits={"body_timeout": "0.3s"})
    async with await RawClient.connect(p.port) as c:
        await c.send(get("/slow") + b"POST /up HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\n\r\nab")
        assert (await c.response(timeout=4)).status == 200
        await c.send(b"cd")
        assert (await c.response()).status == 200
    assert [r.target for r in up.requests] == ["/slow", "/up"]
    assert up.requests[1].body == b"abcd"


async def test_body_timeout_after_an_early_answer(
    upstreams: Upstreams, proxy: StartProxy
) -> None:
    """A direct response went out at once and the connection stays open while the rest of
    the body is read and dropped: a body that stops coming is cut off by body_timeout."""
    up = await upstreams.aiohttp()
    p = await proxy([{"name": "direct", "match": {"path_prefix": "/"},
                      "respond": {"body": "direct"}}],
                    {"backend": up.url}, limits={"body_timeout": "0.3s"},
                    server={"keepalive_timeout": "30s"})
    async with await RawClient.connect(p.port) as c:
        await c.send(b"POST /d HTTP/1.1\r\nHost: t\r\nContent-Length: 50\r\n\r\nabc")
        resp = await c.response()
        assert resp.status == 200 and resp.body == b"direct"
        assert not resp.has("Connection")
        t0 = monotonic()
        assert await c.read_to_eof(timeout=3) == b""
        assert monotonic() - t0 >= 0.2
    assert up.seen == []
    assert p.pipeline.metrics.counters["gateway_client_limits_total"][("body_timeout",)] == 1


# -- send timeout -------------------------------------------------------------------------------

BIG = 48 * 1024 * 1024


async def big_upstream(upstreams: Upstreams, total: int = BIG) -> RawUpstream:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      conn: RawConn) -> None:
        await up.read_request(reader, conn)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total)
        block = b"z" * 65536
        for _ in range(total // len(block)):
            writer.write(block)
            await writer.drain()
        await reader.read()

    up = await upstreams.raw(handler)
    return up


async def small_buffer_client(port: int) -> RawClient:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=65536)
    return RawClient(reader, writer)


async def test_send_timeout_disconnects_a_stalled_reader(
    upstreams: Upstreams, proxy: StartProxy
) -> None:
    up = await big_upstream(upstreams)
    p = await proxy(CATCH_ALL, {"backend": up.url}, limits={"send_timeout": "0.5s"})
    c = await small_buffer_client(p.port)
    try:
        await c.send(get("/big"))
        # The client reads nothing: buffers fill, proxyd pauses the upstream, then gives up.
        await wait_for(lambda: bool(up.conns) and up.conns[0].done.is_set(), timeout=10,
                       what="the upstream connection to be closed")
        await wait_for(lambda: not p.pipeline.connections, what="the client to be dropped")
    finally:
        await c.close()
    counters = p.pipeline.metrics.counters["gateway_client_limits_total"]
    assert counters[("send_timeout",)] == 1
    assert p.target().open == 0 and p.target().in_use == 0


async def test_send_timeout_spares_a_slow_but_steady_reader(
    upstreams: Upstreams, proxy: StartProxy
) -> None:
    total = 3 * 1024 * 1024
    up = await big_upstream(upstreams, total)
    p = await proxy(CATCH_ALL, {"backend": up.url}, limits={"send_timeout": "0.5s"})
    c = await small_buffer_client(p.port)
    try:
        await c.send(get("/big"))
        head = await c.reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        got = 0
        while got < total:  # ~64 KiB every 20 ms: paused often, never for 0.5 s
            chunk = await asyncio.wait_for(c.reader.read(65536), 5)
            assert chunk, f"cut off after {got} bytes"
            got += len(chunk)
            await asyncio.sleep(0.02)
        assert got == total
    finally:
        await c.close()
    assert p.pipeline.metrics.counters["gateway_client_limits_total"].get(
        ("send_timeout",)) is None
