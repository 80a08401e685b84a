"""Middleware that change response bodies, end to end: etag (buffered) and compression (streamed).

The 50 MiB case runs proxyd as its own process so its resident memory can be measured.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import re
import zlib
from pathlib import Path
from typing import Any

import aiohttp
import brotli
import pytest
from aiohttp import web

from proxyd.middleware.base import Context, Middleware, Response
from proxyd.middleware.chain import Chain
from proxyd.middleware.element_options import Options
from tests.functional._http import Message, RawClient, RawConn, _read_head, get
from tests.functional.conftest import (
    CATCH_ALL,
    Proxy,
    StartProxy,
    Upstreams,
    build_config,
    free_port,
    route,
)
from tests.functional.test_streaming import proxyd_process, rss, wait_listening

MIB = 1024 * 1024
TEXT = b"".join(b"line %d: the quick brown fox jumps over the lazy dog\n" % i
                for i in range(400))  # ~21 KiB, compressible
SMALL = b"tiny body under the minimum size"
GZIP = {"type": "compression", "algorithms": ["br", "gzip"]}


async def fixed(request: web.Request) -> web.StreamResponse:
    """Fixed bodies by path, so that repeated requests hash alike."""
    path = request.path
    headers = {"Content-Type": "text/plain; charset=utf-8"}
    if path.startswith("/small"):
        return web.Response(body=SMALL, headers=headers)
    if path.startswith("/tagged"):
        return web.Response(body=TEXT, headers={**headers, "ETag": '"v1"'})
    if path.startswith("/encoded"):
        return web.Response(body=gzip.compress(TEXT),
                            headers={**headers, "Content-Encoding": "gzip"})
    if path.startswith("/no-transform"):
        return web.Response(body=TEXT, headers={**headers, "Cache-Control": "no-transform"})
    if path.startswith("/image"):
        return web.Response(body=TEXT, headers={"Content-Type": "image/png"})
    return web.Response(body=TEXT, headers=headers)


async def fixed_proxy(upstreams: Upstreams, proxy: StartProxy, middleware: list[dict[str, Any]],
                      routes: list[dict[str, Any]] | None = None) -> Proxy:
    up = await upstreams.aiohttp(fixed)
    return await proxy(routes or CATCH_ALL, {"backend": up.url}, middleware=middleware)


def accept(coding: str) -> str:
    return f"Accept-Encoding: {coding}\r\n"


def decode(resp: Message) -> bytes:
    coding = resp.header("Content-Encoding")
    if coding == "gzip":
        return gzip.decompress(resp.body)
    if coding == "br":
        return bytes(brotli.decompress(resp.body))
    assert coding is None, coding
    return resp.body


# -- etag -----------------------------------------------------------------------------------------

async def test_etag_added_and_if_none_match_answers_304_without_body(
    upstreams: Upstreams, proxy: StartProxy
) -> None:
    p = await fixed_proxy(upstreams, proxy, [{"type": "etag", "max_size": "64KiB"}])
    async with await RawClient.connect(p.port) as c:
        first = await c.request(get("/doc"))
        etag = first.header("ETag")
        assert first.status == 200 and first.body == TEXT
        assert etag is not None and re.fullmatch(r'"[0-9a-f]{17,}"', etag), etag  # strong
        assert first.header("Content-Length") == str(len(TEXT))
        again = await c.request(get("/doc"))
        assert again.header("ETag") == etag  # same body, same tag
        # 304 and then a second request on the same connection, sent together: a body
        # after the 304 head would be read as the next response's start.
        await c.send(get("/doc", extra=f"If-None-Match: W/{etag}\r\n") + get("/small"))
        not_modified = await c.response()
        assert not_modified.status == 304
        assert not_modified.header("ETag") == etag
        assert not not_modified.has("Transfer-Encoding")
        assert not not_modified.has("Content-Type")  # describes a body that is not sent
        follow = await c.response()
        assert follow.status == 200 and follow.body == SMALL
        other = await c.request(get("/doc", extra='If-None-Match: "other", "tags"\r\n'))
        assert other.status == 200 and other.body == TEXT


async def test_etag_only_for_bodies_within_max_size(
    upstreams: Upstreams, proxy: StartProxy
) -> None:
    p = await fixed_proxy(upstreams, proxy, [{"type": "etag", "max_size": "1KiB"}])
    async with await RawClient.connect(p.port) as c:
        large = await c.request(get("/doc"))
        small = await c.request(get("/small"))
    assert large.body == TEXT and not large.has("ETag")
    assert small.body == SMALL and small.has("ETag")


async def test_upstream_etag_is_honoured(upstreams: Upstreams, proxy: StartProxy) -> None:
    p = await fixed_proxy(upstreams, proxy, [{"type": "etag"}])
    async with await RawClient.connect(p.port) as c:
        resp = await c.request(get("/tagged"))
        assert resp.header_all("ETag") == ['"v1"'] and resp.body == TEXT
        await c.send(get("/tagged", extra='If-None-Match: "v0", "v1"\r\n') + get("/small"))
        not_modified = await c.response()
        assert not_modified.status == 304 and not_modified.header("ETag") == '"v1"'
        follow = await c.response()
        assert follow.status == 200 and follow.body == SMALL


class Blank(Middleware):
    """A hook outside the registry (and, in the compiled build, outside the compiled group)
    that takes the buffered body away."""

    type = "blank"
    options_model = Options

    def on_response(self, ctx: Context, resp: Response) -> None:
        resp.body = None


async def test_a_hook_that_drops_a_buffered_body_sends_an_empty_one(
    upstreams: Upstreams, proxy: StartProxy
) -> None:
    """The relay reads the body back after the hooks, whatever it was set to: the compiled
    build must not assume it is still the bytes it handed them."""
    p = await fixed_proxy(upstreams, proxy, [{"type": "etag", "max_size": "64KiB"}])
    compiled = p.pipeline.router.routes[0]
    etag = compiled.chain.middleware[0]
    compiled.chain = Chain([Blank(Options(type="blank")), etag])  # Blank runs last, outermost
    async with await RawClient.connect(p.port) as c:
        resp = await c.request(get("/doc"))
        assert resp.status == 200 and resp.body == b""
        assert resp.header("Content-Length") == "0"
        assert resp.header("ETag") is not None  # etag saw the body before Blank took it
        again = await c.request(get("/small"))  # the connection is still in step
        assert again.status == 200 and again.body == b""


# -- compression ----------------------------------------------------------------------------------

async def test_gzip_and_brotli_round_trip(upstreams: Upstreams, proxy: StartProxy) -> None:
    p = await fixed_proxy(upstreams, proxy, [GZIP])
    async with await RawClient.connect(p.port) as c:
        for header, coding in (("gzip", "gzip"), ("br", "br"), ("gzip, deflate, br", "br"),
                               ("br;q=0.5, gzip", "gzip"), ("*", "br")):
            resp = await c.request(get("/doc", extra=accept(header)))
            assert resp.status == 200
            assert resp.header("Content-Encoding") == coding, header
            assert resp.header("Vary") == "Accept-Encoding"
            assert not resp.has("Content-Length") and resp.chunked  # streamed
            assert len(resp.body) < len(TEXT) // 4
            assert decode(resp) == TEXT


@pytest.mark.parametrize("header", ["gzip;q=0", "br;q=0, gzip;q=0", "*;q=0", "identity",
                                    "compress"])
async def test_refused_codings_get_identity(
    upstreams: Upstreams, proxy: StartProxy, header: str
) -> None:
    p = await fixed_proxy(upstreams, proxy, [GZIP])
    async with await RawClient.connect(p.port) as c:
        resp = await c.request(get("/doc", extra=accept(header)))
    assert not resp.has("Content-Encoding") and resp.body == TEXT
    assert resp.header("Content-Length") == str(len(TEXT))
    assert resp.header("Vary") == "Accept-Encoding"


async def test_bodies_left_untouched(upstreams: Upstreams, proxy: StartProxy) -> None:
    p = await fixed_proxy(upstreams, proxy, [GZIP])
    async with await RawClient.connect(p.port) as c:
        small = await c.request(get("/small", extra=accept("gzip")))
        assert small.body == SMALL and not small.has("Content-Encoding")
        assert small.header("Content-Length") == str(len(SMALL))
        encoded = await c.request(get("/encoded", extra=accept("br, gzip")))
        assert encoded.header_all("Content-Encoding") == ["gzip"]
        assert gzip.decompress(encoded.body) == TEXT  # once: not compressed a second time
        assert encoded.header("Content-Length") == str(len(encoded.body))
        kept = await c.request(get("/no-transform", extra=accept("gzip")))
        assert kept.body == TEXT and not kept.has("Content-Encoding")
        image = await c.request(get("/image", extra=accept("gzip")))
        assert image.body == TEXT and not image.has("Content-Encoding")
        assert not image.has("Vary")  # not a compressible type: no negotiation happened
        head = await c.request(get("/doc", method="HEAD", extra=accept("gzip")), head=True)
        assert head.header("Content-Encoding") == "gzip"  # the head a GET would get


async def test_route_override_disables_compression_there_only(
    upstreams: Upstreams, proxy: StartProxy
) -> None:
    routes = [route("raw", path_prefix="/raw", middleware={"compression": {"enabled": False}}),
              *CATCH_ALL]
    p = await fixed_proxy(upstreams, proxy, [GZIP], routes)
    async with await RawClient.connect(p.port) as c:
        raw = await c.request(get("/raw/doc", extra=accept("gzip")))
        compressed = await c.request(get("/doc", extra=accept("gzip")))
    assert raw.body == TEXT and not raw.has("Content-Encoding") and not raw.has("Vary")
    assert compressed.header("Content-Encoding") == "gzip" and decode(compressed) == TEXT
    assert p.pipeline.router.routes[0].chain.names == []


async def test_compression_streams_chunks_as_they_arrive(
    upstreams: Upstreams, proxy: StartProxy
) -> None:
    part1, part2 = TEXT[:8000], TEXT[8000:]
    release = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      conn: RawConn) -> None:
        while await up.read_request(reader, conn) is not None:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%b\r\n"
                         % (len(part1), part1))
            await writer.drain()
            async with asyncio.timeout(5):
                await release.wait()
            writer.write(b"%x\r\n%b\r\n0\r\n\r\n" % (len(part2), part2))
            await writer.drain()

    up = await upstreams.raw(handler)
    p = await proxy(CATCH_ALL, {"backend": up.url}, middleware=[GZIP])
    async with await RawClient.connect(p.port) as c:
        await c.send(get("/events", extra=accept("gzip")))
        async with asyncio.timeout(5):
            start, headers, _ = await _read_head(c.reader)
            head = Message(start, headers)
            assert head.header("Content-Encoding") == "gzip"
            assert head.header("Transfer-Encoding") == "chunked"
            inflate = zlib.decompressobj(31)
            out = bytearray()
            while len(out) < len(part1):  # the upstream is still waiting on `release`
                size = int((await c.reader.readuntil(b"\r\n")).strip(), 16)
                assert size > 0, "body ended early"
                out += inflate.decompress(await c.reader.readexactly(size))
                assert await c.reader.readexactly(2) == b"\r\n"
            assert bytes(out) == part1 and not release.is_set()
            release.set()
            while size := int((await c.reader.readuntil(b"\r\n")).strip(), 16):
                out += inflate.decompress(await c.reader.readexactly(size))
                assert await c.reader.readexactly(2) == b"\r\n"
            assert await c.reader.readexactly(2) == b"\r\n"
        out += inflate.flush()
        assert inflate.eof and bytes(out) == TEXT
        # Both connections stay in step after the re-chunked, compressed body.
        follow = await c.request(get("/next"))
        assert follow.body == TEXT and not follow.has("Content-Encoding")
    assert len(up.conns) == 1 and up.conns[0].requests == 2


async def test_etag_with_compression_in_either_order(
    upstreams: Upstreams, proxy: StartProxy
) -> None:
    etag = {"type": "etag"}
    # etag before compression: it hashes what is sent, so each coding has its own strong tag.
    outer = await fixed_proxy(upstreams, proxy, [etag, GZIP])
    async with await RawClient.connect(outer.port) as c:
        zipped = await c.request(get("/doc", extra=accept("gzip")))
        plain = await c.request(get("/doc"))
        tag = zipped.header("ETag")
        assert tag is not None and tag.startswith('"') and tag != plain.header("ETag")
        assert zipped.header("Content-Length") == str(len(zipped.body))  # buffered: a length
        assert decode(zipped) == TEXT and plain.body == TEXT
        await c.send(get("/doc", extra=accept("gzip") + f"If-None-Match: {tag}\r\n")
                     + get("/small"))
        assert (await c.response()).status == 304
        assert (await c.response()).body == SMALL
    # etag after compression: the tag of the identity body, weakened on the gzip one.
    inner = await fixed_proxy(upstreams, proxy, [GZIP, etag])
    async with await RawClient.connect(inner.port) as c:
        zipped = await c.request(get("/doc", extra=accept("gzip")))
        plain = await c.request(get("/doc"))
        assert zipped.header("ETag") == "W/" + (plain.header("ETag") or "")
        assert decode(zipped) == TEXT
        revalidated = await c.request(
            get("/doc", extra=accept("gzip") + f"If-None-Match: {zipped.header('ETag')}\r\n"))
        assert revalidated.status == 304


async def test_chain_order_response_hooks_run_in_reverse(
    upstreams: Upstreams, proxy: StartProxy
) -> None:
    strip = {"type": "headers", "response": {"remove": ["ETag"]}}
    etag = {"type": "etag"}
    # headers before etag: its response hook runs after etag's, and removes the new ETag.
    outer = await fixed_proxy(upstreams, proxy, [strip, etag])
    # headers after etag: it runs first, before there is an ETag to remove.
    inner = await fixed_proxy(upstreams, proxy, [etag, strip])
    async with await RawClient.connect(outer.port) as c:
        assert not (await c.request(get("/small"))).has("ETag")
    async with await RawClient.connect(inner.port) as c:
        assert (await c.request(get("/small"))).has("ETag")


# -- 50 MiB through a proxyd process --------------------------------------------------------------

TOTAL_MIB = 50
LINES = b"".join(b"%08d the quick brown fox jumps over the lazy dog\n" % i for i in range(20000))
BLOCK = (LINES * (MIB // len(LINES) + 1))[:MIB]


def text_block(i: int) -> bytes:
    return b"%08d" % i + BLOCK[8:]


async def text_source(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/plain"})
    await resp.prepare(request)  # chunked: length unknown to the proxy
    for i in range(TOTAL_MIB):
        await resp.write(text_block(i))
    await resp.write_eof()
    return resp


@pytest.mark.timeout(60)
async def test_50mib_compressed_stream_with_bounded_rss(
    upstreams: Upstreams, tmp_path: Path
) -> None:
    up = await upstreams.aiohttp(text_source)
    port = free_port()
    config = build_config(port, CATCH_ALL, {"backend": up.url},
                          middleware=[{"type": "compression", "algorithms": ["gzip"]}],
                          access_log={"enabled": False})
    want = hashlib.sha256(b"".join(text_block(i) for i in range(TOTAL_MIB))).hexdigest()
    async with proxyd_process(config, tmp_path) as proc:
        await wait_listening(proc, port, tmp_path / "proxyd.log")
        peak = rss(proc.pid)
        stop = asyncio.Event()

        async def sample() -> None:
            nonlocal peak
            while not stop.is_set():
                peak = max(peak, rss(proc.pid))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.02)

        sampler = asyncio.create_task(sample())
        try:
            async with (
                aiohttp.ClientSession(auto_decompress=False) as http,
                http.get(f"http://127.0.0.1:{port}/big",
                         headers={"Accept-Encoding": "gzip"}) as resp,
            ):
                assert resp.status == 200
                assert resp.headers["Content-Encoding"] == "gzip"
                inflate = zlib.decompressobj(31)
                h = hashlib.sha256()
                n = wire = 0
                async for chunk in resp.content.iter_any():
                    if wire == 0:
                        await asyncio.sleep(0.3)  # a slow reader: the proxy must hold off
                    wire += len(chunk)
                    data = inflate.decompress(chunk)
                    h.update(data)
                    n += len(data)
                tail = inflate.flush()
                h.update(tail)
                n += len(tail)
        finally:
            stop.set()
            await sampler
        assert proc.poll() is None, "proxyd died"
    assert inflate.eof and n == TOTAL_MIB * MIB and h.hexdigest() == want
    assert wire < n // 10  # it was compressed
    assert peak < 200 * MIB, f"proxyd RSS peaked at {peak / MIB:.0f} MiB"
    assert "Traceback" not in (tmp_path / "proxyd.log").read_text()

