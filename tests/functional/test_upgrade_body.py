"""A request that asks to upgrade but is not upgraded is an ordinary request, body included.

llhttp hands the bytes after an upgrade request's head to "the new protocol", body and all. A
route that does not upgrade must still forward that body with the head (never a head without
its body), or an upstream that answers early reads the next client's request as the body.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.functional._http import Message, RawClient, RawConn, RawUpstream, get, read_body
from tests.functional.conftest import CATCH_ALL, StartProxy, Upstreams, wait_for


async def early_answering(upstreams: Upstreams) -> RawUpstream:
    """An origin that answers each request from its head alone, with the request's X-Id, and
    only then reads (and records) its body: what a fast-failing application server does."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      conn: RawConn) -> None:
        while True:
            try:
                raw = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                return
            lines = raw[:-4].decode("latin-1").split("\r\n")
            headers = [(n, v.strip()) for n, _, v in (line.partition(":") for line in lines[1:])]
            msg = Message(lines[0], headers, raw_head=raw)
            answer = (msg.header("x-id") or "none").encode()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b"
                         % (len(answer), answer))
            await writer.drain()
            await read_body(reader, msg, is_response=False)
            up.requests.append(msg)

    up = await upstreams.raw(handler)
    return up


SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: test\r\nX-Id: evil\r\n\r\n"


@pytest.mark.parametrize("connection", ["Upgrade", "keep-alive, Upgrade"])
async def test_upgrade_with_body_is_forwarded_whole(upstreams: Upstreams, proxy: StartProxy,
                                                    connection: str) -> None:
    up = await early_answering(upstreams)
    p = await proxy(CATCH_ALL, {"backend": up.url}, pool={"max_connections": 1})
    async with await RawClient.connect(p.port) as a:
        resp = await a.request(
            b"POST /a HTTP/1.1\r\nHost: test\r\nConnection: %b\r\nUpgrade: x\r\n"
            b"X-Id: a\r\nContent-Length: %d\r\n\r\n%b"
            % (connection.encode(), len(SMUGGLED), SMUGGLED))
        assert resp.status == 200 and resp.body == b"a"
    await wait_for(lambda: len(up.requests) >= 1, what="the origin read the first body")
    async with await RawClient.connect(p.port) as b:
        resp = await b.request(get("/b", extra="X-Id: b\r\n"))
        assert resp.status == 200 and resp.body == b"b"
    await wait_for(lambda: len(up.requests) >= 2, what="the second request")
    first, second = up.requests[:2]
    # The body went with its head: the origin read exactly it, and nothing was smuggled.
    assert first.target == "/a" and first.body == SMUGGLED
    assert first.header("upgrade") is None  # hop-by-hop on a route that does not upgrade
    assert second.target == "/b" and second.header("x-id") == "b"
    assert all(m.target != "/smuggled" for m in up.requests)


async def test_upgrade_with_chunked_body_then_pipelined_request(
        upstreams: Upstreams, proxy: StartProxy) -> None:
    """The body is chunked and the client pipelines another request behind it: both are
    read as HTTP, in order, on the same connection."""
    up = await early_answering(upstreams)
    p = await proxy(CATCH_ALL, {"backend": up.url})
    async with await RawClient.connect(p.port) as c:
        await c.send(
            b"POST /a HTTP/1.1\r\nHost: test\r\nConnection: Upgrade\r\nUpgrade: x\r\n"
            b"X-Id: a\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n0\r\n\r\n" + get("/next", extra="X-Id: next\r\n"))
        first = await c.response()
        second = await c.response()
    assert (first.status, first.body) == (200, b"a")
    assert (second.status, second.body) == (200, b"next")
    # Re-framed towards the origin with Content-Length or chunked; either way the 5 bytes.
    assert [m.target for m in up.requests] == ["/a", "/next"]
