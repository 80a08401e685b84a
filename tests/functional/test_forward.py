"""One exchange end to end: header rules, framing, 1xx, errors, timeouts, flow control."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
from collections.abc import AsyncIterator, Callable
from time import monotonic

import pytest
from aiohttp import web

from proxyd.proxy.connection import PAUSE_UPSTREAM, ClientConnection
from proxyd.proxy.upstream import UpstreamConnection
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
    assert_json_error,
    refused_url,
    wait_for,
)

Responder = Callable[[Message, RawConn], bytes]


async def raw_proxy(
    upstreams: Upstreams, proxy: StartProxy, respond: Responder, **kw: object
) -> tuple[Proxy, RawUpstream]:
    """A raw upstream answering every request with ``respond(request, conn)`` bytes."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      conn: RawConn) -> None:
        await serve_keepalive(up, reader, writer, conn, respond)

    up = await upstreams.raw(handler)
    return await proxy(CATCH_ALL, {"backend": up.url}, **kw), up


def downstream(p: Proxy) -> ClientConnection:
    (conn,) = p.pipeline.connections
    assert isinstance(conn, ClientConnection)
    return conn


# -- header rules -------------------------------------------------------------------------------

HOP_REQUEST = (
    "Connection: keep-alive, X-Secret-Hop\r\n"
    "Keep-Alive: timeout=5\r\n"
    "X-Secret-Hop: 1\r\n"
    "Proxy-Connection: keep-alive\r\n"
    "TE: trailers\r\n"
    "Trailer: X-T\r\n"
    "Upgrade: foo/1\r\n"
    "Proxy-Authorization: Basic Zm9vOmJhcg==\r\n"
    "X-Keep: yes\r\n"
)


async def test_request_hop_by_hop_fields_are_stripped(
    upstreams: Upstreams, proxy: StartProxy
) -> None:
    up = await upstreams.aiohttp()
    p = await proxy(CATCH_ALL, {"backend": up.url})
    async with await RawClient.connect(p.port) as c:
        resp = await c.request(get("/h", extra=HOP_REQUEST))
        assert resp.status == 200
    names = {k.lower() for k, _ in up.seen[0].headers}
    for hop in ("connection", "keep-alive", "x-secret-hop", "proxy-connection", "te",
                "trailer", "upgrade", "proxy-authorization"):
        assert hop not in names, hop
    assert up.seen[0].header("X-Keep") == "yes"


async def test_upgrade_request_on_plain_route_stays_http(
    upstreams: Upstreams, proxy: StartProxy
) -> None:
    up = await upstreams.aiohttp()
    p = await proxy(CATCH_ALL, {"backend": up.url})
    async with await RawClient.connect(p.port) as c:
        await c.send(get("/ws", extra="Connection: Upgrade\r\nUpgrade: websocket\r\n") + get("/n"))
        first = await c.response()
        assert first.status == 200 and first.json()["path"] == "/ws"
        second = await c.response()
        assert second.json()["path"] == "/n"
    assert up.seen[0].header("Upgrade") is None and up.seen[0].header("Connection") is None


async def test_response_hop_by_hop_fields_are_stripped(
    upstreams: Upstreams, proxy: StartProxy
) -> None:
    response = (
        b"HTTP/1.1 200 OK\r\n"
        b"Connection: X-Hop, keep-alive\r\n"
        b"X-Hop: secret\r\n"
        b"Keep-Alive: timeout=5\r\n"
        b"Proxy-Connection: keep-alive\r\n"
        b"Trailer: X-T\r\n"
        b"Upgrade: foo/1\r\n"
        b"Proxy-Authenticate: Basic\r\n"
        b"X-Keep: yes\r\n"
        b"Content-Length: 2\r\n\r\nok"
    )
    p, _ = await raw_proxy(upstreams, proxy, lambda req, conn: response)
    async with await RawClient.connect(p.port) as c:
        resp = await c.request(get("/"))
        assert resp.status == 200 and resp.body == b"ok"
        names = {k.lower() for k, _ in resp.headers}
        assert names == {"x-keep", "content-length"}
        assert (await c.request(get("/"))).body == b"ok"  # still keep-alive


@pytest.mark.parametrize("middleware", [None, [{"type": "security_headers"}]],
                         ids=["plain", "chain"])
async def test_fields_named_by_any_connection_header_are_stripped(
    upstreams: Upstreams, proxy: StartProxy, middleware: list[dict[str, object]] | None
) -> None:
    """Several Connection header lines: the fields each of them names are all hop-by-hop
    (RFC 9110 §7.6.1), not just those of the last line."""
    response = (
        b"HTTP/1.1 200 OK\r\n"
        b"Connection: X-Secret\r\n"
        b"Connection: keep-alive\r\n"
        b"X-Secret: s3cret\r\n"
        b"X-Keep: yes\r\n"
        b"Content-Length: 2\r\n\r\nok"
    )
    p, _ = await raw_proxy(upstreams, proxy, lambda req, conn: response, middleware=middleware)
    async with await RawClient.connect(p.port) as c:
        resp = await c.request(get("/"))
        assert resp.status == 200 and resp.body == b"ok"
        assert resp.header("X-Secret") is None and resp.header("X-Keep") == "yes"


FWD_IN = (
    "X-Forwarded-For: 1.2.3.4\r\n"
    "X-Forwarded-For: 5.6.7.8\r\n"
    "X-Forwarded-Proto: https\r\n"
    "X-Forwarded-Host: evil.test\r\n"
    "Via: 1.0 fred\r\n"
)


async def test_forwarded_fields_untrusted_peer(upstreams: Upstreams, proxy: StartProxy) -> None:
    up = await upstreams.aiohttp()
    p = await proxy(CATCH_ALL, {"backend": up.url})
    async with await RawClient.connect(p.port) as c:
        assert (await c.request(get("/", host="site.test:81", extra=FWD_IN))).status == 200
        assert (await c.request(get("/", host="site.test"))).status == 200
    spoofed, plain = up.seen
    assert spoofed.header_all("X-Forwarded-For") == ["127.0.0.1"]  # replaced, not appended
    assert spoofed.header_all("X-Forwarded-Proto") == ["http"]
    assert spoofed.header_all("X-Forwarded-Host") == ["site.test:81"]
    assert spoofed.header_all("Via") == ["1.0 fred, 1.1 proxyd"]
    assert spoofed.header("Host") == "site.test:81"  # preserve_host by default
    assert plain.header_all("X-Forwarded-For") == ["127.0.0.1"]
    assert plain.header_all("Via") == ["1.1 proxyd"]


async def test_forwarded_fields_follow_each_request_on_one_connection(
    upstreams: Upstreams, proxy: StartProxy
) -> None:
    """The connection keeps its last X-Forwarded-* lines for the next request with the same
    Host: a new Host or an inbound Via must still be seen."""
    up = await upstreams.aiohttp()
    p = await proxy(CATCH_ALL, {"backend": up.url})
    async with await RawClient.connect(p.port) as c:
        for host, extra in (("a.test", ""), ("a.test", ""), ("b.test", ""),
                            ("b.test", "Via: 1.0 fred\r\n"), ("b.test", "")):
            assert (await c.request(get("/", host=host, extra=extra))).status == 200
    assert [s.header_all("X-Forwarded-Host") for s in up.seen] == [
        ["a.test"], ["a.test"], ["b.test"], ["b.test"], ["b.test"]]
    assert [s.header_all("Via") for s in up.seen] == [
        ["1.1 proxyd"], ["1.1 proxyd"], ["1.1 proxyd"], ["1.0 fred, 1.1 proxyd"], ["1.1 proxyd"]]
    assert all(s.header_all("X-Forwarded-For") == ["127.0.0.1"] for s in up.seen)


async def test_forwarded_fields_trusted_peer(upstreams: Upstreams, proxy: StartProxy) -> None:
    up = await upstreams.aiohttp()
    p = await proxy(
        CATCH_ALL, {"backend": up.url}, server={"trusted_proxies": ["127.0.0.0/8"]}
    )
    async with await RawClient.connect(p.port) as c:
        assert (await c.request(get("/", host="site.test", extra=FWD_IN))).status == 200
        # Same Host, other forwarded fields, on the same connection: never a kept copy.
        assert (await c.request(get("/", host="site.test",
                                    extra="X-Forwarded-For: 9.9.9.9\r\n"))).status == 200
    seen, second = up.seen
    assert seen.header_all("X-Forwarded-For") == ["1.2.3.4, 5.6.7.8, 127.0.0.1"]
    assert seen.header_all("X-Forwarded-Proto") == ["https"]
    assert seen.header_all("X-Forwarded-Host") == ["evil.test"]
    assert seen.header_all("Via") == ["1.0 fred, 1.1 proxyd"]
    assert second.header_all("X-Forwarded-For") == ["9.9.9.9, 127.0.0.1"]
    assert second.header_all("X-Forwarded-Host") == ["site.test"]
    assert second.header_all("Via") == ["1.1 proxyd"]


async def test_preserve_host_false_sends_target_host(
    upstreams: Upstreams, proxy: StartProxy
) -> None:
    up = await upstreams.aiohttp()
    p = await proxy(
        CATCH_ALL, {"backend": {"targets": [up.url], "preserve_host": False}}
    )
    async with await RawClient.connect(p.port) as c:
        assert (await c.request(get("/", host="site.test"))).status == 200
    assert up.seen[0].header_all("Host") == [f"127.0.0.1:{up.port}"]
    assert up.seen[0].header("X-Forwarded-Host") == "site.test"


# -- response framing ---------------------------------------------------------------------------


async def no_body_handler(request: web.Request) -> web.StreamResponse:
    if request.path == "/204":
        return web.Response(status=204)
    if request.path == "/304":
        return web.Response(status=304, headers={"ETag": '"v1"'})
    return web.Response(body=b"x" * 1000, headers={"ETag": '"v1"'})


async def test_head_with_content_length_then_reuse(
    upstreams: Upstreams, proxy: StartProxy
) -> None:
    up = await upstreams.aiohttp(no_body_handler)
    p = await proxy(CATCH_ALL, {"backend": up.url})
    async with await RawClient.connect(p.port) as c:
        resp = await c.request(get("/doc", method="HEAD"), head=True)
        assert resp.status == 200
        assert resp.header("Content-Length") == "1000"
        assert resp.header("Transfer-Encoding") is None
        # No body followed the head: the next response parses cleanly on the same connection.
        resp = await c.request(get("/doc"))
        assert resp.status == 200 and resp.body == b"x" * 1000
        resp = await c.request(get("/doc", method="HEAD"), head=True)
        assert resp.header("Content-Length") == "1000"
        resp = await c.request(get("/doc"))
        assert resp.body == b"x" * 1000
    assert [s.method for s in up.seen] == ["HEAD", "GET", "HEAD", "GET"]
    assert len({s.peer_port for s in up.seen}) == 1  # the upstream connection was reused


async def test_head_with_chunked_from_raw_upstream(
    upstreams: Upstreams, proxy: StartProxy
) -> None:
    def respond(req: Message, conn: RawConn) -> bytes:
        if req.method == "HEAD":
            return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        return b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nbody"

    p, up = await raw_proxy(upstreams, proxy, respond)
    async with await RawClient.connect(p.port) as c:
        resp = await c.request(get("/", method="HEAD"), head=True)
        assert resp.status == 200 and resp.header("Transfer-Encoding") is None
        assert (await c.request(get("/"))).body == b"body"
    assert len(up.conns) == 1 and up.conns[0].requests == 2


async def test_204_and_304_have_no_body(upstreams: Upstreams, proxy: StartProxy) -> None:
    up = await upstreams.aiohttp(no_body_handler)
    p = await proxy(CATCH_ALL, {"backend": up.url})
    async with await RawClient.connect(p.port) as c:
        for path, status in (("/204", 204), ("/304", 304), ("/204", 204)):
            resp = await c.request(get(path))
            assert resp.status == status
            assert resp.header("Transfer-Encoding") is None
        assert (await c.request(get("/doc"))).body == b"x" * 1000
        # Exact bytes: the 204 head is followed directly by the next response.
        await c.send(get("/204") + get("/304") + get("/doc"))
        assert (await c.reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 204 ")
        assert (await c.reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 304 ")
        assert (await c.response()).body == b"x" * 1000


async def test_103_relayed_before_final_response(
    upstreams: Upstreams, proxy: StartProxy
) -> None:
    read_103 = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      conn: RawConn) -> None:
        while await up.read_request(reader, conn) is not None:
            writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n")
            await writer.drain()
            await read_103.wait()  # the final response only after the client has the hint
            read_103.clear()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfinal")

    up = await upstreams.raw(handler)
    p = await proxy(CATCH_ALL, {"backend": up.url})
    async with await RawClient.connect(p.port) as c:
        for _ in range(2):
            hint = await c.request(get("/"))
            assert hint.status == 103
            assert hint.header("Link") == "</s.css>; rel=preload"
            read_103.set()
            final = await c.response()
            assert final.status == 200 and final.body == b"final"


async def test_1xx_not_relayed_to_http10_client(upstreams: Upstreams, proxy: StartProxy) -> None:
    resp_bytes = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    )
    p, _ = await raw_proxy(upstreams, proxy, lambda req, conn: resp_bytes)
    async with await RawClient.connect(p.port) as c:
        # An unsolicited 100 from the upstream is never relayed; 103 is, to HTTP/1.1 clients.
        hint = await c.request(get("/"))
        assert hint.status == 103
        final = await c.response()
        assert final.status == 200 and final.body == b"ok"
    async with await RawClient.connect(p.port) as c:
        resp = await c.request(b"GET / HTTP/1.0\r\n\r\n")
        assert resp.status == 200 and resp.body == b"ok"


async def test_close_delimited_upstream_body(upstreams: Upstreams, proxy: StartProxy) -> None:
    body = bytes(range(256)) * 400

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      conn: RawConn) -> None:
        if await up.read_request(reader, conn) is None:
            return
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n\r\n")
        for i in range(0, len(body), 10_000):
            writer.write(body[i:i + 10_000])
            await writer.drain()
        # returning closes the connection: the end of the body

    up = await upstreams.raw(handler)
    p = await proxy(CATCH_ALL, {"backend": up.url})
    async with await RawClient.connect(p.port) as c:
        for _ in range(2):  # the client connection stays usable; each needs a new upstream one
            resp = await c.request(get("/"))
            assert resp.status == 200 and resp.chunked and resp.body == body
            assert resp.header("Connection") is None
    assert len(up.conns) == 2
    async with await RawClient.connect(p.port) as c:
        resp = await c.request(b"GET / HTTP/1.0\r\n\r\n")  # HTTP/1.0: delimited by close
        assert not resp.chunked and resp.body == body
        assert resp.header("Connection") == "close"


async def test_chunked_upstream_response_relayed(
    upstreams: Upstreams, proxy: StartProxy
) -> None:
    raw = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;ext=x\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\nX-Trailer: 1\r\n\r\n"
    )
    p, up = await raw_proxy(upstreams, proxy, lambda req, conn: raw)
    async with await RawClient.connect(p.port) as c:
        for _ in range(2):
            resp = await c.request(get("/"))
            assert resp.chunked and resp.body == b"hello world"
        resp = await c.request(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        assert resp.body == b"hello world" and resp.header("Connection") == "close"
    assert len(up.conns) == 1 and up.conns[0].requests == 3


async def test_streamed_chunked_response_from_aiohttp(
    upstreams: Upstreams, proxy: StartProxy
) -> None:
    parts = [bytes([i]) * (1000 + i) for i in range(50)]

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for part in parts:
            await resp.write(part)
        await resp.write_eof()
        return resp

    up = await upstreams.aiohttp(handler)
    p = await proxy(CATCH_ALL, {"backend": up.url})
    async with await RawClient.connect(p.port) as c:
        resp = await c.request(get("/"))
        assert resp.chunked and resp.body == b"".join(parts)


async def test_upstream_connection_close_uses_new_connection(
    upstreams: Upstreams, proxy: StartProxy
) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.Response(text=request.path)
        resp.force_close()
        return resp

    up = await upstreams.aiohttp(handler)
    p = await proxy(CATCH_ALL, {"backend": up.url})
    async with await RawClient.connect(p.port) as c:
        for path in ("/1", "/2", "/3"):
            resp = await c.request(get(path))
            assert resp.status == 200 and resp.body == path.encode()
            assert resp.header("Connection") is None  # the client connection is not closed
    assert len({s.peer_port for s in up.seen}) == 3


@pytest.mark.parametrize("head", [
    b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n",
    b"Content-Length: 5\r\nContent-Length: 3\r\n",
    b"Content-Length: 5x\r\n",
    b"Transfer-Encoding: chunked\r\nX-Folded: a\r\n b\r\n",
], ids=["cl-and-te", "duplicate-cl", "bad-cl", "obs-fold"])
async def test_ambiguous_upstream_framing_is_502(
    upstreams: Upstreams, proxy: StartProxy, head: bytes
) -> None:
    bad = b"HTTP/1.1 200 OK\r\n" + head + b"\r\n5\r\nhello\r\n0\r\n\r\n"
    p, _ = await raw_proxy(upstreams, proxy, lambda req, conn: bad)
    async with await RawClient.connect(p.port) as c:
        assert_json_error(await c.request(get("/")), 502)


async def test_invalid_upstream_response_is_502(upstreams: Upstreams, proxy: StartProxy) -> None:
    p, up = await raw_proxy(upstreams, proxy, lambda req, conn: b"SPDY/9 nonsense\r\n\r\n")
    async with await RawClient.connect(p.port) as c:
        assert_json_error(await c.request(get("/")), 502)
        # The broken upstream connection is not reused: the next try opens another.
        assert_json_error(await c.request(get("/")), 502)
    assert len(up.conns) == 2


async def test_client_gone_mid_response_closes_upstream(
    upstreams: Upstreams, proxy: StartProxy
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      conn: RawConn) -> None:
        await up.read_request(reader, conn)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 1000)
        await writer.drain()
        await reader.read()  # until the proxy closes this connection

    up = await upstreams.raw(handler)
    p = await proxy(CATCH_ALL, {"backend": up.url})
    async with await RawClient.connect(p.port) as c:
        await c.send(get("/"))
        await c.reader.readuntil(b"\r\n\r\n")
    await asyncio.wait_for(up.conns[0].done.wait(), 5)
    await wait_for(lambda: p.target().open == 0 and not p.pipeline.connections,
                   what="both sides to be released")


async def pieces_upstream(upstreams: Upstreams, parts: list[bytes], extra: bytes = b""
                          ) -> tuple[RawUpstream, asyncio.Queue[None]]:
    """A raw upstream that answers each request with a 200 of Content-Length
    ``len(b"".join(parts))``, its head and first part in one write and each further part (the
    last followed by ``extra``) only when the test puts to the queue: every part reaches the
    proxy in a read of its own, after the parser has handed over the head."""
    go: asyncio.Queue[None] = asyncio.Queue()
    body = b"".join(parts)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      conn: RawConn) -> None:
        while await up.read_request(reader, conn) is not None:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body)
                         + parts[0])
            await writer.drain()
            for i, part in enumerate(parts[1:], 1):
                await go.get()
                writer.write(part + (extra if i == len(parts) - 1 else b""))
                await writer.drain()

    up = await upstreams.raw(handler)
    return up, go


async def read_pieces(c: RawClient, go: asyncio.Queue[None], parts: list[bytes]) -> bytes:
    """One response whose parts the upstream sends one at a time, each after the client has
    the previous one (so each is a read of its own on the proxy's upstream side)."""
    head = await asyncio.wait_for(c.reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200 ")
    got = b""
    for i, part in enumerate(parts):
        if i:
            go.put_nowait(None)
        got += await asyncio.wait_for(c.reader.readexactly(len(part)), 5)
    return got


# Middleware that leave the body alone: it is relayed past the parser on their routes too.
HEAD_ONLY_CHAIN = [{"type": "security_headers"}, {"type": "trace_id"}]


@pytest.mark.parametrize("chain", [None, HEAD_ONLY_CHAIN], ids=["plain", "chain"])
async def test_content_length_body_in_many_reads_is_relayed_whole_and_keeps_both_connections(
    upstreams: Upstreams, proxy: StartProxy, chain: list[dict[str, str]] | None
) -> None:
    parts = [b"a" * 100, bytes(range(256)) * 64, b"\r\n\r\nHTTP/1.1 200 OK\r\n", b"z"]
    up, go = await pieces_upstream(upstreams, parts)
    p = await proxy(CATCH_ALL, {"backend": up.url}, middleware=chain)
    async with await RawClient.connect(p.port) as c:
        for _ in range(2):
            await c.send(get("/"))
            assert await read_pieces(c, go, parts) == b"".join(parts)
        # Nothing more came after either body, and both connections are still usable.
        resp_fut = asyncio.ensure_future(c.request(get("/")))
        for _ in parts[1:]:
            go.put_nowait(None)
        resp = await asyncio.wait_for(resp_fut, 5)
        assert resp.body == b"".join(parts)
    assert len(up.conns) == 1 and up.conns[0].requests == 3  # one upstream connection, reused


@pytest.mark.parametrize("chain", [None, HEAD_ONLY_CHAIN], ids=["plain", "chain"])
async def test_bytes_past_a_content_length_body_are_not_relayed_and_retire_the_connection(
    upstreams: Upstreams, proxy: StartProxy, chain: list[dict[str, str]] | None
) -> None:
    parts = [b"0123", b"456789"]
    up, go = await pieces_upstream(upstreams, parts, extra=b"HTTP/1.1 200 OK\r\n\r\nsmuggled")
    p = await proxy(CATCH_ALL, {"backend": up.url}, middleware=chain)
    async with await RawClient.connect(p.port) as c:
        await c.send(get("/"))
        assert await read_pieces(c, go, parts) == b"0123456789"
        await wait_for(lambda: up.conns[0].eof.is_set(), what="the upstream connection closed")
        go.put_nowait(None)  # for the next connection's second part
        resp = await c.request(get("/"))  # the client connection itself is fine
        assert resp.status == 200 and resp.body == b"0123456789"
    assert len(up.conns) == 2

BIG_READ = bytes(range(256)) * 160 + b"\r\n\r\nHTTP/1.1 200 OK\r\n\r\n"  # 40 KiB and a bit


def chunk_body(body: bytes) -> bytes:
    return b"".join(b"%x\r\n%b\r\n" % (len(body[i:i + 9000]), body[i:i + 9000])
                    for i in range(0, len(body), 9000)) + b"0\r\n\r\n"


@pytest.mark.parametrize("framing", ["length", "chunked"])
@pytest.mark.parametrize("chain", [None, HEAD_ONLY_CHAIN], ids=["plain", "chain"])
async def test_a_large_response_in_one_read_is_relayed_whole_and_keeps_both_connections(
    upstreams: Upstreams, proxy: StartProxy, chain: list[dict[str, str]] | None, framing: str
) -> None:
    """Head and body in one write (one read on the proxy's side, as loopback delivers it):
    the head is parsed apart from the body (UpstreamConnection._feed_split), and the body goes
    past the parser or through it, by its framing."""
    if framing == "length":
        answer = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(BIG_READ), BIG_READ)
    else:
        answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk_body(BIG_READ)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      conn: RawConn) -> None:
        while await up.read_request(reader, conn) is not None:
            writer.write(answer)
            await writer.drain()

    up = await upstreams.raw(handler)
    p = await proxy(CATCH_ALL, {"backend": up.url}, middleware=chain)
    async with await RawClient.connect(p.port) as c:
        for _ in range(3):
            resp = await c.request(get("/"))
            assert resp.status == 200 and resp.body == BIG_READ
            assert resp.chunked == (framing == "chunked")
    assert len(up.conns) == 1 and up.conns[0].requests == 3


@pytest.mark.parametrize("chain", [None, HEAD_ONLY_CHAIN], ids=["plain", "chain"])
async def test_bytes_past_a_large_body_in_its_read_are_not_relayed_and_retire_the_connection(
    upstreams: Upstreams, proxy: StartProxy, chain: list[dict[str, str]] | None
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      conn: RawConn) -> None:
        while await up.read_request(reader, conn) is not None:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(BIG_READ) + BIG_READ
                         + b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nsmuggled")
            await writer.drain()

    up = await upstreams.raw(handler)
    p = await proxy(CATCH_ALL, {"backend": up.url}, middleware=chain)
    async with await RawClient.connect(p.port) as c:
        resp = await c.request(get("/"))
        assert resp.status == 200 and resp.body == BIG_READ
        await wait_for(lambda: up.conns[0].eof.is_set(), what="the upstream connection closed")
        resp = await c.request(get("/"))  # the client connection itself is fine
        assert resp.status == 200 and resp.body == BIG_READ
    assert len(up.conns) == 2


# -- errors and timeouts ------------------------------------------------------------------------


async def test_502_when_upstream_refuses(proxy: StartProxy) -> None:
    p = await proxy(CATCH_ALL, {"backend": refused_url()})
    async with await RawClient.connect(p.port) as c:
        err = assert_json_error(await c.request(get("/")), 502)
        assert err["error"]
        # A GET's error keeps the client connection.
        assert_json_error(await c.request(get("/", extra="X-Request-ID: r-1\r\n")), 502)


async def test_504_on_upstream_read_timeout(upstreams: Upstreams, proxy: StartProxy) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      conn: RawConn) -> None:
        await up.read_request(reader, conn)
        await reader.read()  # never answers; returns when the proxy gives up

    up = await upstreams.raw(handler)
    p = await proxy(CATCH_ALL, {"backend": up.url}, pool={"read_timeout": "0.4s"})
    async with await RawClient.connect(p.port) as c:
        t0 = monotonic()
        assert_json_error(await c.request(get("/")), 504)
        assert monotonic() - t0 >= 0.35
    await asyncio.wait_for(up.conns[0].done.wait(), 5)  # the proxy closed that connection


async def test_upstream_stall_mid_body_truncates(upstreams: Upstreams, proxy: StartProxy) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      conn: RawConn) -> None:
        await up.read_request(reader, conn)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
        await reader.read()

    up = await upstreams.raw(handler)
    p = await proxy(CATCH_ALL, {"backend": up.url}, pool={"read_timeout": "0.4s"})
    async with await RawClient.connect(p.port) as c:
        await c.send(get("/"))
        with pytest.raises(asyncio.IncompleteReadError) as info:
            await c.response()
        assert info.value.partial == b"0123456789"  # cut short, never padded or completed


@contextlib.asynccontextmanager
async def blackhole() -> AsyncIterator[int]:
    """A port whose SYNs are dropped: a listener that never accepts, its queue filled."""
    loop = asyncio.get_running_loop()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    addr = listener.getsockname()
    socks = []
    try:
        for _ in range(8):
            s = socket.socket()
            s.setblocking(False)
            socks.append(s)
            try:
                await asyncio.wait_for(loop.sock_connect(s, addr), 0.3)
            except TimeoutError:
                break  # this SYN was dropped: the accept queue is full
        else:
            pytest.skip("could not fill a listen queue to make a connect time out")
        yield addr[1]
    finally:
        for s in socks:
            s.close()
        listener.close()


async def test_504_on_upstream_connect_timeout(proxy: StartProxy) -> None:
    async with blackhole() as port:
        p = await proxy(
            CATCH_ALL, {"backend": f"http://127.0.0.1:{port}"}, pool={"connect_timeout": "0.3s"}
        )
        async with await RawClient.connect(p.port) as c:
            err = assert_json_error(await c.request(get("/")), 504)
            assert "connect" in err["error"]


async def test_upstream_answers_before_request_body_ends(
    upstreams: Upstreams, proxy: StartProxy
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      conn: RawConn) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        if b"/early" in head:
            writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 4\r\n\r\nnope")
            await writer.drain()
            await reader.read()  # until the proxy closes this connection
            return
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await reader.read()

    up = await upstreams.raw(handler)
    p = await proxy(CATCH_ALL, {"backend": up.url})
    async with await RawClient.connect(p.port) as c:
        await c.send(b"POST /early HTTP/1.1\r\nHost: t\r\nContent-Length: 100000\r\n\r\n"
                     + b"x" * 10)
        resp = await c.response()
        assert resp.status == 403 and resp.body == b"nope"
        assert resp.header("Connection") == "close"
        assert await c.read_to_eof() == b""
    await asyncio.wait_for(up.conns[0].done.wait(), 5)  # not kept for reuse
    async with await RawClient.connect(p.port) as c:
        assert (await c.request(get("/next"))).body == b"ok"
    assert len(up.conns) == 2


async def test_slow_steady_upload_is_not_a_read_timeout(
    upstreams: Upstreams, proxy: StartProxy
) -> None:
    up = await upstreams.aiohttp()
    p = await proxy(CATCH_ALL, {"backend": up.url}, pool={"read_timeout": "0.4s"})
    async with await RawClient.connect(p.port) as c:
        await c.send(b"POST /slow HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
        for i in range(8):  # 1.2 s of upload, 3x the read timeout; never 0.4 s without bytes
            await c.send(b"2\r\n%02d\r\n" % i)
            await asyncio.sleep(0.15)
        resp = await c.request(b"0\r\n\r\n")
        assert resp.status == 200
        assert resp.json()["body"] == "".join(f"{i:02d}" for i in range(8))


# -- flow control -------------------------------------------------------------------------------

BIG = 48 * 1024 * 1024
BLOCK = bytes(range(256)) * 1024  # 256 KiB


async def test_download_flow_control(upstreams: Upstreams, proxy: StartProxy) -> None:
    """A client that stops reading stops the upstream read; memory stays bounded; a stall
    longer than the upstream read timeout is the client's, not the upstream's."""
    sent = 0
    digest = hashlib.sha256()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      conn: RawConn) -> None:
        nonlocal sent
        await up.read_request(reader, conn)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % BIG)
        for i in range(BIG // len(BLOCK)):
            block = i.to_bytes(4, "big") + BLOCK[4:]
            digest.update(block)
            writer.write(block)
            sent += len(block)
            await writer.drain()
        await reader.read()

    up = await upstreams.raw(handler)
    p = await proxy(CATCH_ALL, {"backend": up.url}, pool={"read_timeout": "0.4s"})
    async with await RawClient.connect(p.port) as c:
        await c.send(get("/big"))
        await wait_for(lambda: getattr(_upstream_conn(p), "read_paused", False),
                       what="the upstream read to pause")
        ds = downstream(p)
        assert ds.transport is not None
        assert ds.transport.get_write_buffer_size() < 1024 * 1024
        assert sent < BIG
        await asyncio.sleep(1.0)  # the client stalls for 2.5x the upstream read timeout
        conn = _upstream_conn(p)
        assert conn is not None and conn.read_paused
        resp = await c.response(timeout=30)
        assert resp.status == 200 and len(resp.body) == BIG
        assert hashlib.sha256(resp.body).hexdigest() == digest.hexdigest()


def _upstream_conn(p: Proxy) -> UpstreamConnection | None:
    """The upstream connection of the one client connection's exchange, if it has one."""
    if len(p.pipeline.connections) != 1:
        return None
    ds = downstream(p)
    ex = ds.active.exchange if ds.active is not None else None
    return ex.conn if ex is not None else None


async def test_upload_flow_control(upstreams: Upstreams, proxy: StartProxy) -> None:
    """An upstream that does not read stops the client read; the proxy buffers little."""
    go = asyncio.Event()
    got = hashlib.sha256()
    received = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      conn: RawConn) -> None:
        nonlocal received
        await reader.readuntil(b"\r\n\r\n")
        await go.wait()
        while received < BIG:
            data = await reader.read(1 << 20)
            if not data:
                break
            got.update(data)
            received += len(data)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await reader.read()

    up = await upstreams.raw(handler)
    p = await proxy(CATCH_ALL, {"backend": up.url}, limits={"max_body_size": "64MiB"})
    digest = hashlib.sha256()
    written = 0
    async with await RawClient.connect(p.port) as c:

        async def upload() -> None:
            nonlocal written
            c.writer.write(b"PUT /up HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % BIG)
            for i in range(BIG // len(BLOCK)):
                block = i.to_bytes(4, "big") + BLOCK[4:]
                digest.update(block)
                c.writer.write(block)
                written += len(block)
                await c.writer.drain()

        task = asyncio.create_task(upload())
        try:
            await wait_for(lambda: bool(p.pipeline.connections)
                           and bool(downstream(p)._paused & PAUSE_UPSTREAM),
                           what="the client read to pause")
            conn = _upstream_conn(p)
            assert conn is not None and conn.transport is not None
            assert conn.transport.get_write_buffer_size() < 2 * 1024 * 1024
            assert written < BIG
            go.set()
            resp = await c.response(timeout=30)
            assert resp.status == 200 and resp.body == b"ok"
            await task
        finally:
            task.cancel()
    assert received == BIG and got.hexdigest() == digest.hexdigest()


# -- memory -------------------------------------------------------------------------------------

SEED_CHAIN = [
    {"type": "cors", "allow_origins": ["https://app.example.com"]},
    {"type": "security_headers"},
    {"type": "validation"},
    {"type": "trace_id"},
    {"type": "rate_limit", "backend": "memory", "rate": "1000/s", "burst": 1000},
    {"type": "etag"},
    {"type": "compression", "min_size": "16B"},
    {"type": "cache"},
]


@pytest.mark.parametrize("chain", [None, SEED_CHAIN, [{"type": "cache"}]],
                         ids=["plain", "chain", "cache-streamed"])
async def test_answered_requests_leave_no_reference_cycles(
    upstreams: Upstreams, proxy: StartProxy, chain: list[dict[str, object]] | None
) -> None:
    """Per-request objects are freed by reference counting as the answer goes out. Cycles
    (an exchange and its parser, a request and its exchange) would leave them to the cyclic
    collector, which then ran often enough to cost ~10% of a loaded worker's CPU."""
    import gc

    up = await upstreams.aiohttp()
    p = await proxy(CATCH_ALL, {"backend": up.url}, middleware=chain)
    requests = [get(f"/{i}", extra="Accept-Encoding: gzip\r\n") for i in range(20)]
    requests += [get("/cached")] * 5
    requests += [get("/cors", extra="Origin: https://app.example.com\r\n")]
    async with await RawClient.connect(p.port) as c:
        assert (await c.request(get("/warm"))).status == 200
        gc.collect()
        # What exists now is not made by these requests: an earlier test's pipeline (its
        # upstream pools are cyclic by design) may become unreachable during this one.
        def ours(o: object) -> bool:
            module = type(o).__module__
            return isinstance(module, str) and module.startswith("proxyd.")

        before = {id(o) for o in gc.get_objects() if ours(o)}
        gc.disable()
        try:
            for raw in requests:
                assert (await c.request(raw)).status == 200
            gc.set_debug(gc.DEBUG_SAVEALL)
            gc.collect()
            left = sorted({type(o).__qualname__ for o in gc.garbage
                           if ours(o) and id(o) not in before})
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
    assert left == []


async def test_a_body_queued_for_a_slow_client_is_not_overwritten_by_later_reads(
    upstreams: Upstreams, proxy: StartProxy
) -> None:
    """Large reads go to the client as views of the worker's read buffer
    (upstream_conn.ReadBuffer). Queued behind a client that is not reading, a view must keep
    its bytes while other responses are read: the buffer is left to it, not reused."""
    sizes = {b"a": 4 * 1024 * 1024, b"b": 96 * 1024}  # /a fills the slow client's queues

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      conn: RawConn) -> None:
        while (req := await up.read_request(reader, conn)) is not None:
            fill = req.start.split(" ")[1].encode()[1:2]  # /a → b"a" * sizes[b"a"]
            size = sizes[fill]
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + fill * size)
            await writer.drain()

    up = await upstreams.raw(handler)
    p = await proxy(CATCH_ALL, {"backend": up.url})
    loop = asyncio.get_running_loop()
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.setblocking(False)
    try:
        await loop.sock_connect(slow, ("127.0.0.1", p.port))
        await loop.sock_sendall(slow, get("/a"))
        # The proxy's writes to this client wait (it stopped reading /a's answer for them).
        await wait_for(lambda: any(isinstance(ds, ClientConnection) and ds.write_paused
                                   for ds in p.pipeline.connections),
                       what="the slow client's writes to back up")
        async with await RawClient.connect(p.port) as c:
            for _ in range(8):
                resp = await c.request(get("/b"))
                assert resp.status == 200 and resp.body == b"b" * sizes[b"b"]
        got = bytearray()
        async with asyncio.timeout(20):
            while (end := got.find(b"\r\n\r\n")) < 0 or len(got) < end + 4 + sizes[b"a"]:
                chunk = await loop.sock_recv(slow, 1 << 20)
                assert chunk, f"closed after {len(got)} bytes"
                got += chunk
        head, _, body = bytes(got).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and len(body) == sizes[b"a"]
        assert body.count(b"a") == sizes[b"a"], "bytes of another response in this one"
    finally:
        slow.close()


async def test_these_tests_run_on_the_workers_event_loop() -> None:
    """uvloop, unless PROXYD_TEST_LOOP=asyncio (conftest.pytest_asyncio_loop_factories): the
    read-buffer tests above mean the buffered-protocol path only on uvloop."""
    want = "asyncio" if os.environ.get("PROXYD_TEST_LOOP") == "asyncio" else "uvloop"
    assert type(asyncio.get_running_loop()).__module__.split(".")[0] == want
