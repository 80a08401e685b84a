"""The client side: keep-alive, pipelining, Expect, framing, limits, timeouts."""

from __future__ import annotations

import asyncio
import json
from time import monotonic

import pytest

from tests.functional._http import (
    RawClient,
    RawConn,
    RawUpstream,
    get,
    serve_keepalive,
)
from tests.functional.conftest import (
    CATCH_ALL,
    AioUpstream,
    Proxy,
    StartProxy,
    Upstreams,
    assert_json_error,
    route,
    wait_for,
)


async def echo_proxy(
    upstreams: Upstreams, proxy: StartProxy, **kw: object
) -> tuple[Proxy, AioUpstream]:
    up = await upstreams.aiohttp()
    return await proxy(CATCH_ALL, {"backend": up.url}, **kw), up


# -- keep-alive, pipelining, Expect, chunked request bodies -----------------------------------


async def test_keepalive_reuses_both_connections(upstreams: Upstreams, proxy: StartProxy) -> None:
    p, up = await echo_proxy(upstreams, proxy)
    async with await RawClient.connect(p.port) as c:
        for i in range(3):
            resp = await c.request(get(f"/k{i}"))
            assert resp.status == 200 and resp.json()["path"] == f"/k{i}"
            assert not resp.has("Connection")
        assert len(p.pipeline.connections) == 1
    assert [s.path_qs for s in up.seen] == ["/k0", "/k1", "/k2"]
    assert len({s.peer_port for s in up.seen}) == 1  # one pooled upstream connection


async def test_pipelined_requests_answered_in_order(
    upstreams: Upstreams, proxy: StartProxy
) -> None:
    p, up = await echo_proxy(upstreams, proxy)
    burst = (
        get("/one")
        + b"POST /two HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello"
        + b"PUT /three HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
        + get("/four", method="HEAD")
        + get("/five")
    )
    async with await RawClient.connect(p.port) as c:
        await c.send(burst)
        got = []
        for path in ("/one", "/two", "/three", "/four", "/five"):
            resp = await c.response(head=path == "/four")
            assert resp.status == 200
            assert resp.header("X-Upstream") == "backend"
            if path != "/four":
                got.append((resp.json()["path"], resp.json()["body"]))
        assert got == [("/one", ""), ("/two", "hello"), ("/three", "abcde"), ("/five", "")]
    assert [s.method for s in up.seen] == ["GET", "POST", "PUT", "HEAD", "GET"]


async def test_hundred_pipelined_requests_in_one_write(
    upstreams: Upstreams, proxy: StartProxy
) -> None:
    p, up = await echo_proxy(upstreams, proxy)
    async with await RawClient.connect(p.port) as c:
        await c.send(b"".join(get(f"/p{i}") for i in range(100)))
        paths = [(await c.response()).json()["path"] for _ in range(100)]
    assert paths == [f"/p{i}" for i in range(100)]
    assert len({s.peer_port for s in up.seen}) == 1


async def test_expect_100_continue(upstreams: Upstreams, proxy: StartProxy) -> None:
    p, up = await echo_proxy(upstreams, proxy)
    async with await RawClient.connect(p.port) as c:
        await c.send(
            b"POST /e HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 11\r\n\r\n"
        )
        interim = await c.response()
        assert interim.status == 100
        await c.send(b"hello world")
        resp = await c.response()
        assert resp.status == 200
        assert resp.json()["body"] == "hello world"
        # The connection stays usable.
        assert (await c.request(get("/after"))).json()["path"] == "/after"
    assert up.seen[0].header("Expect") is None
    assert up.seen[0].body == b"hello world"


async def test_expect_unknown_is_417(upstreams: Upstreams, proxy: StartProxy) -> None:
    p, up = await echo_proxy(upstreams, proxy)
    async with await RawClient.connect(p.port) as c:
        resp = await c.request(get("/e", extra="Expect: teapot\r\n"))
        assert_json_error(resp, 417)
    assert up.seen == []


async def test_chunked_request_body_is_reframed(upstreams: Upstreams, proxy: StartProxy) -> None:
    p, up = await echo_proxy(upstreams, proxy)
    body = b"".join(bytes([65 + i]) * (i * 37 + 1) for i in range(20))
    chunks = b"".join(
        b"%x;ext=1\r\n%s\r\n" % (len(part), part)
        for part in (body[:100], body[100:101], body[101:])
    )
    async with await RawClient.connect(p.port) as c:
        await c.send(
            b"POST /c HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
            + chunks + b"0\r\nX-Trailer: t\r\n\r\n"
        )
        resp = await c.response()
        assert resp.status == 200
        assert resp.json()["body_len"] == len(body)
        assert (await c.request(get("/next"))).status == 200
    assert up.seen[0].body == body
    assert up.seen[0].header("Transfer-Encoding") == "chunked"
    assert up.seen[0].header("Content-Length") is None


async def test_chunked_request_exact_bytes_upstream(
    upstreams: Upstreams, proxy: StartProxy
) -> None:
    """Chunk extensions and trailers are not forwarded; the upstream sees plain chunks."""
    heads: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      conn: RawConn) -> None:
        heads.append(await reader.readuntil(b"\r\n\r\n"))
        body = await reader.readuntil(b"0\r\n\r\n")
        heads.append(body)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        await reader.read()

    up = await upstreams.raw(handler)
    p = await proxy(CATCH_ALL, {"backend": up.url})
    async with await RawClient.connect(p.port) as c:
        resp = await c.request(
            b"POST /c HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5;name=value\r\nhello\r\n1\r\n!\r\n0\r\nX-Trailer: t\r\n\r\n"
        )
        assert resp.status == 200
    assert heads[1] == b"5\r\nhello\r\n1\r\n!\r\n0\r\n\r\n"


async def test_client_connection_close(upstreams: Upstreams, proxy: StartProxy) -> None:
    p, up = await echo_proxy(upstreams, proxy)
    async with await RawClient.connect(p.port) as c:
        resp = await c.request(get("/bye", extra="Connection: close\r\n"))
        assert resp.status == 200
        assert resp.header("Connection") == "close"
        assert await c.read_to_eof() == b""
    assert up.seen[0].header("Connection") is None


async def test_http10_client(upstreams: Upstreams, proxy: StartProxy) -> None:
    p, _ = await echo_proxy(upstreams, proxy)
    async with await RawClient.connect(p.port) as c:
        resp = await c.request(b"GET /ka HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        assert resp.status == 200 and resp.header("Connection") == "keep-alive"
        assert resp.start.startswith("HTTP/1.1 200")
        # Kept alive by Proxy-Connection (as llhttp reads it), still HTTP/1.0: no Host needed.
        resp = await c.request(b"GET /pk HTTP/1.0\r\nProxy-Connection: keep-alive\r\n\r\n")
        assert resp.status == 200 and resp.header("Connection") == "keep-alive"
        resp = await c.request(b"GET /plain HTTP/1.0\r\n\r\n")  # no Host needed in 1.0
        assert resp.status == 200 and resp.json()["path"] == "/plain"
        assert resp.header("Connection") == "close"
        assert await c.read_to_eof() == b""


# -- limits -------------------------------------------------------------------------------------

SMALL = {"max_body_size": "1KiB", "max_header_size": "1KiB", "max_uri_size": "512",
         "max_headers": 10}


async def test_413_content_length_over_limit(upstreams: Upstreams, proxy: StartProxy) -> None:
    p, up = await echo_proxy(upstreams, proxy, limits=SMALL)
    async with await RawClient.connect(p.port) as c:
        resp = await c.request(b"POST /big HTTP/1.1\r\nHost: t\r\nContent-Length: 1025\r\n\r\n")
        assert_json_error(resp, 413)
        assert resp.header("Connection") == "close"
        assert await c.read_to_eof() == b""
    # Exactly at the limit is fine.
    async with await RawClient.connect(p.port) as c:
        resp = await c.request(
            b"POST /ok HTTP/1.1\r\nHost: t\r\nContent-Length: 1024\r\n\r\n" + b"x" * 1024
        )
        assert resp.status == 200 and resp.json()["body_len"] == 1024
    assert [s.path_qs for s in up.seen] == ["/ok"]


async def test_413_chunked_body_growing_over_limit(
    upstreams: Upstreams, proxy: StartProxy
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      conn: RawConn) -> None:
        while await up.read_request(reader, conn) is not None:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")

    up = await upstreams.raw(handler)
    p = await proxy(CATCH_ALL, {"backend": up.url}, limits=SMALL)
    async with await RawClient.connect(p.port) as c:
        await c.send(b"POST /grow HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                     + b"258\r\n" + b"a" * 600 + b"\r\n")
        await wait_for(lambda: len(up.conns) == 1, what="the upstream connection")
        await c.send(b"258\r\n" + b"b" * 600 + b"\r\n")
        resp = await c.response()
        assert_json_error(resp, 413)
        assert resp.header("Connection") == "close"
        assert await c.read_to_eof() == b""
    await asyncio.wait_for(up.conns[0].done.wait(), 5)
    assert up.requests == []  # the upstream never got a complete request
    assert all(b"0\r\n\r\n" not in part for part in up.partial)


async def test_431_header_section_too_large(upstreams: Upstreams, proxy: StartProxy) -> None:
    p, up = await echo_proxy(upstreams, proxy, limits=SMALL)
    async with await RawClient.connect(p.port) as c:
        resp = await c.request(get("/", extra="X-Big: " + "v" * 1100 + "\r\n"))
        assert_json_error(resp, 431)
        assert await c.read_to_eof() == b""
    async with await RawClient.connect(p.port) as c:
        # Many modest fields adding up over the limit.
        extra = "".join(f"X-F{i}: {'v' * 150}\r\n" for i in range(8))
        resp = await c.request(get("/", extra=extra))
        assert_json_error(resp, 431)
    assert p.dispatched == 0 and up.seen == []


async def test_431_unterminated_huge_header_is_cut_off(
    upstreams: Upstreams, proxy: StartProxy
) -> None:
    """One endless header line must not be buffered until header_timeout (memory)."""
    p, up = await echo_proxy(upstreams, proxy, limits=SMALL)
    async with await RawClient.connect(p.port) as c:
        await c.send(b"GET / HTTP/1.1\r\nHost: t\r\nX-Endless: " + b"v" * 64 * 1024)
        resp = await c.response(timeout=3)
        assert_json_error(resp, 431)
    async with await RawClient.connect(p.port) as c:
        await c.send(b"GET / HTTP/1.1\r\nHost: t\r\nX-Endless-Name-" + b"n" * 64 * 1024)
        assert_json_error(await c.response(timeout=3), 431)
    assert p.dispatched == 0 and up.seen == []


async def test_431_too_many_headers(upstreams: Upstreams, proxy: StartProxy) -> None:
    p, up = await echo_proxy(upstreams, proxy, limits=SMALL)
    async with await RawClient.connect(p.port) as c:
        ok = "".join(f"X-F{i}: v\r\n" for i in range(9))  # Host + 9 = 10 fields: allowed
        assert (await c.request(get("/", extra=ok))).status == 200
    async with await RawClient.connect(p.port) as c:
        resp = await c.request(get("/", extra=ok + "X-F9: v\r\n"))
        assert_json_error(resp, 431)
        assert await c.read_to_eof() == b""
    assert len(up.seen) == 1


async def test_414_uri_too_long(upstreams: Upstreams, proxy: StartProxy) -> None:
    p, up = await echo_proxy(upstreams, proxy, limits=SMALL)
    async with await RawClient.connect(p.port) as c:
        resp = await c.request(get("/" + "u" * 600))
        assert_json_error(resp, 414)
        assert await c.read_to_eof() == b""
    async with await RawClient.connect(p.port) as c:
        resp = await c.request(get("/?" + "q" * 510))  # 512 bytes: at the limit
        assert resp.status == 200
    assert len(up.seen) == 1


# -- timeouts -----------------------------------------------------------------------------------


async def closed_within(c: RawClient, low: float, high: float) -> None:
    t0 = monotonic()
    await c.read_to_eof(timeout=high)
    assert monotonic() - t0 >= low


async def test_header_timeout_partial_headers(upstreams: Upstreams, proxy: StartProxy) -> None:
    p, up = await echo_proxy(
        upstreams, proxy, limits={"header_timeout": "0.3s"}, server={"keepalive_timeout": "10s"}
    )
    async with await RawClient.connect(p.port) as c:
        await c.send(b"GET / HTTP/1.1\r\nHost: t\r\n")
        await closed_within(c, 0.2, 3)
    assert up.seen == []


async def test_header_timeout_silent_connection(upstreams: Upstreams, proxy: StartProxy) -> None:
    p, _ = await echo_proxy(
        upstreams, proxy, limits={"header_timeout": "0.3s"}, server={"keepalive_timeout": "10s"}
    )
    async with await RawClient.connect(p.port) as c:
        await closed_within(c, 0.2, 3)


async def test_header_timeout_is_not_extended_by_dribbling(
    upstreams: Upstreams, proxy: StartProxy
) -> None:
    p, up = await echo_proxy(
        upstreams, proxy, limits={"header_timeout": "0.3s"}, server={"keepalive_timeout": "10s"}
    )
    async with await RawClient.connect(p.port) as c:
        await c.send(b"GET / HTTP/1.1\r\nHost: t\r\n")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 3
        with pytest.raises((ConnectionError, EOFError)):
            while loop.time() < deadline:
                await c.send(b"X")
                try:
                    async with asyncio.timeout(0.05):
                        if await c.reader.read(1) == b"":
                            raise EOFError
                except TimeoutError:
                    pass
    assert up.seen == []


async def test_idle_keepalive_timeout(upstreams: Upstreams, proxy: StartProxy) -> None:
    p, _ = await echo_proxy(upstreams, proxy, server={"keepalive_timeout": "0.3s"})
    async with await RawClient.connect(p.port) as c:
        assert (await c.request(get("/"))).status == 200
        await closed_within(c, 0.2, 3)


async def test_header_timeout_for_partial_pipelined_request(
    upstreams: Upstreams, proxy: StartProxy
) -> None:
    """A request head left unfinished behind a pipelined request still times out."""
    p, up = await echo_proxy(
        upstreams, proxy, limits={"header_timeout": "0.3s"}, server={"keepalive_timeout": "10s"}
    )
    async with await RawClient.connect(p.port) as c:
        await c.send(get("/first") + b"GET /second HTTP/1.1\r\nHost: t\r\n")
        assert (await c.response()).status == 200
        await closed_within(c, 0.0, 3)
    assert [s.path_qs for s in up.seen] == ["/first"]


# -- ambiguous framing: 400, close, and nothing reaches the upstream ---------------------------

EARLY = [  # rejected before the request is routed
    ("cl-and-te", b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
    ("te-and-cl", b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n"
     b"Content-Length: 5\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
    ("duplicate-cl-same", b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n"
     b"Content-Length: 5\r\n\r\nhello"),
    ("duplicate-cl-differ", b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n"
     b"Content-Length: 6\r\n\r\nhello!"),
    ("cl-list", b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 5, 5\r\n\r\nhello"),
    ("cl-non-numeric", b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 5a\r\n\r\nhello"),
    ("cl-negative", b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: -5\r\n\r\nhello"),
    ("cl-plus", b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: +5\r\n\r\nhello"),
    ("cl-hex", b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 0x5\r\n\r\nhello"),
    ("te-chunked-identity", b"POST / HTTP/1.1\r\nHost: t\r\n"
     b"Transfer-Encoding: chunked, identity\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
    ("te-identity-chunked", b"POST / HTTP/1.1\r\nHost: t\r\n"
     b"Transfer-Encoding: identity, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
    ("te-xchunked", b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: xchunked\r\n\r\n"
     b"5\r\nhello\r\n0\r\n\r\n"),
    ("te-space-before-colon", b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding : chunked\r\n"
     b"\r\n5\r\nhello\r\n0\r\n\r\n"),
    ("te-twice", b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
    ("te-gzip-chunked", b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip, chunked\r\n"
     b"\r\n5\r\nhello\r\n0\r\n\r\n"),
    ("bare-lf", b"GET / HTTP/1.1\nHost: t\n\n"),
    ("bare-lf-in-headers", b"GET / HTTP/1.1\r\nHost: t\nX-A: b\r\n\r\n"),
    ("bare-cr", b"GET / HTTP/1.1\r\nHost: t\rX-A: b\r\n\r\n"),
    ("obs-fold", b"GET / HTTP/1.1\r\nHost: t\r\nX-Folded: a\r\n b\r\n\r\n"),
    ("leading-whitespace-field", b"GET / HTTP/1.1\r\n Host: t\r\n\r\n"),
    ("nul-in-value", b"GET / HTTP/1.1\r\nHost: t\r\nX-A: a\x00b\r\n\r\n"),
    ("ctl-in-value", b"GET / HTTP/1.1\r\nHost: t\r\nX-A: a\x01b\r\n\r\n"),
    ("del-in-value", b"GET / HTTP/1.1\r\nHost: t\r\nX-A: a\x7fb\r\n\r\n"),
    ("ctl-in-name", b"GET / HTTP/1.1\r\nHost: t\r\nX\x01A: b\r\n\r\n"),
    ("http09", b"GET /\r\n\r\n"),
    ("http2-version", b"GET / HTTP/2.0\r\nHost: t\r\n\r\n"),
    # llhttp keeps these alive by Proxy-Connection alone: never taken for HTTP/1.1.
    ("http2-version-proxy-keep-alive",
     b"GET / HTTP/2.0\r\nHost: t\r\nProxy-Connection: keep-alive\r\n\r\n"),
    ("http2-version-keep-alive", b"GET / HTTP/2.0\r\nHost: t\r\nConnection: keep-alive\r\n\r\n"),
    ("http12-version", b"GET / HTTP/1.2\r\nHost: t\r\n\r\n"),
    ("absolute-form-no-authority", b"GET http:///x HTTP/1.1\r\nHost: evil.test\r\n\r\n"),
    ("authority-form", b"CONNECT evil.test:443 HTTP/1.1\r\nHost: evil.test:443\r\n\r\n"),
    ("duplicate-host", b"GET / HTTP/1.1\r\nHost: t\r\nHost: evil.test\r\n\r\n"),
    ("missing-host", b"GET / HTTP/1.1\r\nX-A: b\r\n\r\n"),
    ("space-in-target", b"GET /a b HTTP/1.1\r\nHost: t\r\n\r\n"),
]
LATE = [  # a body error found after the head was routed (its bytes came in the same read)
    ("invalid-chunk-size", b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"zz\r\nhello\r\n0\r\n\r\n"),
    ("chunk-size-overflow", b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"fffffffffffffffffff\r\nhello\r\n0\r\n\r\n"),
    ("chunk-without-crlf", b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"5\r\nhelloXX0\r\n\r\n"),
]


@pytest.fixture
async def framing(upstreams: Upstreams, proxy: StartProxy) -> tuple[Proxy, RawUpstream]:
    """A proxy whose upstream pool holds one warm connection, so a routed head would leave
    at once; the upstream records every byte that arrives."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      conn: RawConn) -> None:
        await serve_keepalive(
            up, reader, writer, conn,
            lambda req, _: b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        )

    up = await upstreams.raw(handler)
    p = await proxy(CATCH_ALL, {"backend": up.url})
    async with await RawClient.connect(p.port) as c:
        assert (await c.request(get("/warm"))).status == 200
    await wait_for(lambda: len(p.target().idle) == 1, what="a pooled connection")
    return p, up


async def reject_400(p: Proxy, data: bytes) -> None:
    async with await RawClient.connect(p.port) as c:
        await c.send(data)
        resp = await c.response()
        assert_json_error(resp, 400)
        assert resp.header("Connection") == "close"
        assert await c.read_to_eof() == b""


@pytest.mark.parametrize("data", [d for _, d in EARLY], ids=[n for n, _ in EARLY])
async def test_ambiguous_framing_rejected_before_routing(
    framing: tuple[Proxy, RawUpstream], data: bytes
) -> None:
    p, up = framing
    await reject_400(p, data)
    assert p.dispatched == 1  # the warm-up only: the bad request was never routed
    assert len(p.target().idle) == 1 and p.target().open == 1
    assert [r.target for r in up.requests] == ["/warm"] and up.partial == []


@pytest.mark.parametrize("data", [d for _, d in LATE], ids=[n for n, _ in LATE])
async def test_bad_chunked_body_never_reaches_upstream(
    framing: tuple[Proxy, RawUpstream], data: bytes
) -> None:
    p, up = framing
    await reject_400(p, data)
    # The head was routed onto the warm connection; it must have been dropped with it.
    await asyncio.wait_for(up.conns[0].done.wait(), 5)
    assert [r.target for r in up.requests] == ["/warm"]
    assert up.partial == []


async def test_reject_after_pipelined_good_request(
    framing: tuple[Proxy, RawUpstream],
) -> None:
    """A good request pipelined before a bad one is answered, then the connection closes."""
    p, up = framing
    async with await RawClient.connect(p.port) as c:
        await c.send(get("/good") + b"GET / HTTP/1.1\r\nHost: t\r\nHost: u\r\n\r\n")
        resp = await c.response()
        assert resp.status == 200
        # The bad request was seen before this response started: it says it is the last.
        assert resp.header("Connection") == "close"
        assert await c.read_to_eof() == b""
    assert [r.target for r in up.requests] == ["/warm", "/good"]


async def test_dot_segments_cannot_escape_a_prefix_route(
    upstreams: Upstreams, proxy: StartProxy
) -> None:
    up = await upstreams.aiohttp()
    p = await proxy([route("api", path_prefix="/api/")], {"backend": up.url})
    async with await RawClient.connect(p.port) as c:
        for target in ("/api/../admin", "/api/./../admin", "/api/..", "/api/x/../../admin"):
            resp = await c.request(get(target))
            assert_json_error(resp, 404)
        # Dot segments inside the prefix are resolved, and the upstream gets the clean path.
        resp = await c.request(get("/api/x/../y/./z?q=/../"))
        assert resp.status == 200
        assert json.loads(resp.body)["path"] == "/api/y/z?q=/../"
    assert [s.path_qs for s in up.seen] == ["/api/y/z?q=/../"]
