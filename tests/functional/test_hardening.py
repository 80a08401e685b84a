"""Hardening (issue 11): a raw-socket corpus of framing and limit violations, generated header
and chunked-body input, slow clients, connection and keep-alive caps, admin tokens, and TLS.

Every refused request is checked three ways: the status (or the close), that the upstream saw
nothing of it, and that the worker keeps serving afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
import uvloop
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from proxyd.config.models import GatewayConfig
from proxyd.proxy.headers import REQUEST_DROP
from proxyd.proxy.request import SPECIAL
from proxyd.sockets import listen_socket
from proxyd.worker import Worker
from tests.functional._http import (
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
    build_config,
    free_port,
    wait_for,
)

OK_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


async def recording_proxy(
    upstreams: Upstreams, proxy: StartProxy, **kw: Any
) -> tuple[Proxy, RawUpstream]:
    """A proxy in front of a raw upstream that records every request and every partial one."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      conn: RawConn) -> None:
        await serve_keepalive(up, reader, writer, conn, lambda req, _: OK_RESPONSE)

    up = await upstreams.raw(handler)
    return await proxy(CATCH_ALL, {"backend": up.url}, **kw), up


async def still_serving(p: Proxy, up: RawUpstream, path: str = "/after") -> None:
    """A normal request on a new connection is answered, and it is all the upstream got."""
    before = len(up.requests)
    async with await RawClient.connect(p.port) as c:
        resp = await c.request(get(path))
        assert resp.status == 200 and resp.body == b"ok"
    assert [r.target for r in up.requests[before:]] == [path]


async def nothing_reached(up: RawUpstream) -> None:
    await asyncio.sleep(0.05)  # an (unwanted) forwarded head would have arrived by now
    assert up.requests == [] and up.partial == []
    assert all(conn.requests == 0 for conn in up.conns)


# -- the corpus: framing ------------------------------------------------------------------------

FRAMING = [  # (id, bytes, status): each answered with that status, Connection: close, EOF
    ("cl-te-lowercase", b"POST / HTTP/1.1\r\nHost: t\r\ncontent-length: 3\r\n"
     b"transfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n", 400),
    ("cl-zero-and-te", b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    ("cl-twice-with-ows", b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n"
     b"Content-Length:  3 \r\n\r\nabc", 400),
    ("cl-empty", b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: \r\n\r\n", 400),
    ("cl-inner-space", b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 1 0\r\n\r\n0123456789",
     400),
    ("cl-decimal-point", b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 3.0\r\n\r\nabc", 400),
    ("cl-overflow", b"POST / HTTP/1.1\r\nHost: t\r\n"
     b"Content-Length: 184467440737095516160\r\n\r\nabc", 400),
    ("te-chunked-twice-one-line", b"POST / HTTP/1.1\r\nHost: t\r\n"
     b"Transfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n", 400),
    ("te-leading-comma", b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: , chunked\r\n\r\n"
     b"0\r\n\r\n", 400),
    ("te-identity", b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: identity\r\n\r\nabc",
     400),
    ("te-vertical-tab", b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: \x0bchunked\r\n\r\n"
     b"0\r\n\r\n", 400),
    ("te-chunked-suffix", b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunkedx\r\n\r\n"
     b"0\r\n\r\n", 400),
    ("te-in-http10", b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n"
     b"0\r\n\r\n", 400),
    ("te-and-cl-split-by-other", b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nHost: t\r\n"
     b"Content-Length: 3\r\n\r\n0\r\n\r\n", 400),
    ("name-space-before-colon", b"GET / HTTP/1.1\r\nHost : t\r\n\r\n", 400),
    ("name-with-space", b"GET / HTTP/1.1\r\nHost: t\r\nX Y: z\r\n\r\n", 400),
    ("name-empty", b"GET / HTTP/1.1\r\nHost: t\r\n: z\r\n\r\n", 400),
    ("name-separator-char", b"GET / HTTP/1.1\r\nHost: t\r\nX(A): z\r\n\r\n", 400),
    ("name-high-byte", b"GET / HTTP/1.1\r\nHost: t\r\nX\xe9: z\r\n\r\n", 400),
    ("line-without-colon", b"GET / HTTP/1.1\r\nHost: t\r\nJustAName\r\n\r\n", 400),
    ("bare-lf-request-line", b"GET / HTTP/1.1\nHost: t\r\n\r\n", 400),
    ("bare-lf-end-of-head", b"GET / HTTP/1.1\r\nHost: t\r\n\n", 400),
    ("bare-cr-request-line", b"GET /\r HTTP/1.1\r\nHost: t\r\n\r\n", 400),
    ("obs-fold-tab", b"GET / HTTP/1.1\r\nHost: t\r\nX-A: a\r\n\tb\r\n\r\n", 400),
    ("obs-fold-host", b"GET / HTTP/1.1\r\nHost: t\r\n evil.test\r\n\r\n", 400),
    ("nul-in-target", b"GET /a\x00b HTTP/1.1\r\nHost: t\r\n\r\n", 400),
    ("ctl-in-target", b"GET /a\x01b HTTP/1.1\r\nHost: t\r\n\r\n", 400),
    ("del-in-target", b"GET /a\x7fb HTTP/1.1\r\nHost: t\r\n\r\n", 400),
    ("esc-in-value", b"GET / HTTP/1.1\r\nHost: t\r\nX-A: \x1b[31m\r\n\r\n", 400),
    ("nul-in-host", b"GET / HTTP/1.1\r\nHost: t\x00.evil\r\n\r\n", 400),
    ("http09-with-fields", b"GET /index.html\r\nHost: t\r\n\r\n", 400),
    ("version-1-10", b"GET / HTTP/1.10\r\nHost: t\r\n\r\n", 400),
    ("version-3", b"GET / HTTP/3.0\r\nHost: t\r\n\r\n", 400),
    ("version-lowercase", b"GET / http/1.1\r\nHost: t\r\n\r\n", 400),
    ("request-line-extra-token", b"GET / HTTP/1.1 extra\r\nHost: t\r\n\r\n", 400),
    ("method-lowercase", b"get / HTTP/1.1\r\nHost: t\r\n\r\n", 400),
    ("method-unknown", b"FROB / HTTP/1.1\r\nHost: t\r\n\r\n", 400),
    ("absolute-form-userinfo", b"GET http://u@evil.test/x HTTP/1.1\r\nHost: evil.test\r\n\r\n",
     400),
    ("absolute-form-ftp", b"GET ftp://evil.test/x HTTP/1.1\r\nHost: evil.test\r\n\r\n", 400),
    ("rtsp", b"GET / RTSP/1.1\r\nHost: t\r\n\r\n", 400),
    ("rtsp-1.0", b"OPTIONS * RTSP/1.0\r\nHost: t\r\n\r\n", 400),
    ("ice", b"SOURCE /mount ICE/1.0\r\nHost: t\r\n\r\n", 400),
    ("asterisk-with-get", b"GET * HTTP/1.1\r\nHost: t\r\n\r\n", 400),
    ("authority-with-get", b"GET evil.test:80 HTTP/1.1\r\nHost: t\r\n\r\n", 400),
    ("host-twice-other-case", b"GET / HTTP/1.1\r\nHost: t\r\nhost: t\r\n\r\n", 400),
    ("no-host-post", b"POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 400),
]

CHUNKS = [  # a bad chunked body behind a good head (found after the head was routed)
    ("chunk-size-0x", b"0x3\r\nabc\r\n0\r\n\r\n"),
    ("chunk-size-negative", b"-3\r\nabc\r\n0\r\n\r\n"),
    ("chunk-size-space", b"3 \r\nabc\r\n0\r\n\r\n"),
    ("chunk-size-bare-lf", b"3\nabc\r\n0\r\n\r\n"),
    ("chunk-data-too-long", b"3\r\nabcdef\r\n0\r\n\r\n"),
    ("chunk-data-bare-lf", b"3\r\nabc\n0\r\n\r\n"),
    ("chunk-ext-empty-name", b"3;\r\nabc\r\n0\r\n\r\n"),
    ("chunk-ext-bare-lf", b"3;a\nabc\r\n0\r\n\r\n"),
    ("trailer-ctl", b"3\r\nabc\r\n0\r\nX-T: a\x01\r\n\r\n"),
    ("trailer-obs-fold", b"3\r\nabc\r\n0\r\nX-T: a\r\n b\r\n\r\n"),
    ("trailer-without-colon", b"3\r\nabc\r\n0\r\nX\r\n\r\n"),
]

LIMITS = {"max_body_size": "1KiB", "max_header_size": "1KiB", "max_uri_size": "256",
          "max_headers": 8}
OVER_LIMITS = [
    ("uri-414", b"GET /" + b"u" * 300 + b" HTTP/1.1\r\nHost: t\r\n\r\n", 414),
    ("query-414", b"GET /?" + b"q=1&" * 80 + b" HTTP/1.1\r\nHost: t\r\n\r\n", 414),
    ("header-section-431", b"GET / HTTP/1.1\r\nHost: t\r\n"
     + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 200) for i in range(6)) + b"\r\n", 431),
    ("one-huge-header-431", b"GET / HTTP/1.1\r\nHost: t\r\nX-Big: " + b"v" * 2000
     + b"\r\n\r\n", 431),
    ("too-many-headers-431", b"GET / HTTP/1.1\r\nHost: t\r\n"
     + b"".join(b"X-%d: 1\r\n" % i for i in range(9)) + b"\r\n", 431),
    ("content-length-413", b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 1025\r\n\r\n", 413),
    ("chunked-body-413", b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"400\r\n" + b"b" * 1024 + b"\r\n1\r\nb\r\n0\r\n\r\n", 413),
]


async def refused(p: Proxy, data: bytes, status: int) -> None:
    async with await RawClient.connect(p.port) as c:
        await c.send(data)
        resp = await c.response()
        assert_json_error(resp, status)
        assert resp.header("Connection") == "close"
        assert await c.read_to_eof() == b""


@pytest.mark.parametrize(("data", "status"), [(d, s) for _, d, s in FRAMING],
                         ids=[n for n, _, _ in FRAMING])
async def test_framing_corpus(
    upstreams: Upstreams, proxy: StartProxy, data: bytes, status: int
) -> None:
    p, up = await recording_proxy(upstreams, proxy)
    await refused(p, data, status)
    await nothing_reached(up)
    assert p.dispatched == 0
    await still_serving(p, up)


@pytest.mark.parametrize("body", [b for _, b in CHUNKS], ids=[n for n, _ in CHUNKS])
async def test_bad_chunked_body_corpus(
    upstreams: Upstreams, proxy: StartProxy, body: bytes
) -> None:
    p, up = await recording_proxy(upstreams, proxy)
    await still_serving(p, up, "/warm")  # a pooled connection: a routed head leaves at once
    await wait_for(lambda: len(p.target().idle) == 1, what="a pooled connection")
    head = b"POST /bad HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
    await refused(p, head + body, 400)
    await asyncio.sleep(0.05)
    assert [r.target for r in up.requests] == ["/warm"] and up.partial == []
    await still_serving(p, up)


@pytest.mark.parametrize(("data", "status"), [(d, s) for _, d, s in OVER_LIMITS],
                         ids=[n for n, _, _ in OVER_LIMITS])
async def test_limits_corpus(
    upstreams: Upstreams, proxy: StartProxy, data: bytes, status: int
) -> None:
    p, up = await recording_proxy(upstreams, proxy, limits=LIMITS)
    await refused(p, data, status)
    await asyncio.sleep(0.05)
    # A chunked body outgrows the limit only after its head was routed: the upstream may
    # have the head and part of the body, never a complete request.
    assert up.requests == []
    if status != 413:
        assert up.partial == []
    await still_serving(p, up)


async def test_limits_corpus_exactly_at_the_limits(
    upstreams: Upstreams, proxy: StartProxy
) -> None:
    p, up = await recording_proxy(upstreams, proxy, limits=LIMITS)
    async with await RawClient.connect(p.port) as c:
        target = "/" + "u" * 255
        assert (await c.request(get(target))).status == 200
        extra = "".join(f"X-{i}: 1\r\n" for i in range(7))  # + Host = 8 fields
        assert (await c.request(get("/h", extra=extra))).status == 200
        resp = await c.request(b"POST /b HTTP/1.1\r\nHost: t\r\nContent-Length: 1024\r\n\r\n"
                               + b"b" * 1024)
        assert resp.status == 200
    assert [r.target for r in up.requests] == [target, "/h", "/b"]


# -- slow headers -------------------------------------------------------------------------------


async def test_header_timeout_closes_and_upstream_sees_nothing(
    upstreams: Upstreams, proxy: StartProxy
) -> None:
    p, up = await recording_proxy(upstreams, proxy, limits={"header_timeout": "0.3s"},
                                  server={"keepalive_timeout": "30s"})
    loop = asyncio.get_running_loop()
    async with await RawClient.connect(p.port) as c:
        t0 = loop.time()
        await c.send(b"POST /slow HTTP/1.1\r\nHost: t\r\nContent-Le")
        # Answered 408 and closed; never before the timeout (a deadline may be late only).
        answer = await c.read_to_eof(timeout=3)
        assert answer.startswith(b"HTTP/1.1 408 ") and b"Connection: close" in answer
        assert loop.time() - t0 >= 0.3
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
    loop = asyncio.get_running_loop()
    slow: list[RawClient] = []
    try:
        for i in range(500):
            c = await RawClient.connect(p.port)
            slow.append(c)
            c.writer.write(b"GET /slow%d HTTP/1.1\r\nHost: t\r\nX-Slow: " % i)
        for c in slow:
            await c.writer.drain()
        started = loop.time()
        await wait_for(lambda: len(p.pipeline.connections) >= 500, what="500 connections")
        t0 = loop.time()
        async with await RawClient.connect(p.port) as c:
            resp = await c.request(get("/normal"))
        elapsed = loop.time() - t0
        assert resp.status == 200
        assert elapsed < 2.0, f"a normal request took {elapsed:.2f}s beside 500 slow clients"
        # One more byte each: dribbling does not extend the header timeout.
        for c in slow:
            c.writer.write(b"x")
        results = await asyncio.gather(*(c.read_to_eof(timeout=6) for c in slow))
        assert all(r.startswith(b"HTTP/1.1 408 ") for r in results)
        closed_after = loop.time() - started
        assert 1.0 <= closed_after < 6.0
    finally:
        for c in slow:
            await c.close()
    await wait_for(lambda: len(p.pipeline.connections) == 0, what="all closed")
    assert [r.target for r in up.requests] == ["/normal"] and up.partial == []


# -- connection cap, keep-alive cap -------------------------------------------------------------


async def test_connection_cap_answers_503_and_closes(
    upstreams: Upstreams, proxy: StartProxy
) -> None:
    p, up = await recording_proxy(upstreams, proxy, limits={"max_connections": 2})
    first, second = await RawClient.connect(p.port), await RawClient.connect(p.port)
    try:
        await wait_for(lambda: len(p.pipeline.connections) == 2, what="two connections")
        for _ in range(3):
            async with await RawClient.connect(p.port) as extra:
                await extra.send(get("/refused"))  # already sent: the 503 must survive it
                resp = await extra.response()
                err = assert_json_error(resp, 503)
                assert err["error"] == "too many connections"
                assert resp.header("Connection") == "close"
                assert resp.header("Retry-After") == "1"
                assert await extra.read_to_eof() == b""
        assert len(p.pipeline.connections) == 2  # refused ones never counted
        # The connections inside the cap are served normally.
        assert (await first.request(get("/first"))).status == 200
        await second.close()
        await wait_for(lambda: len(p.pipeline.connections) == 1, what="one connection left")
        await still_serving(p, up, "/again")
    finally:
        await first.close()
        await second.close()
    counters = p.pipeline.metrics.counters["gateway_client_limits_total"]
    assert counters[("max_connections",)] == 3.0
    assert "/refused" not in [r.target for r in up.requests]


async def test_keepalive_requests_cap(upstreams: Upstreams, proxy: StartProxy) -> None:
    p, up = await recording_proxy(upstreams, proxy, limits={"max_keepalive_requests": 3})
    async with await RawClient.connect(p.port) as c:
        for i in range(2):
            resp = await c.request(get(f"/k{i}"))
            assert resp.status == 200 and not resp.has("Connection")
        last = await c.request(get("/k2"))
        assert last.status == 200 and last.header("Connection") == "close"
        assert await c.read_to_eof() == b""
    # Pipelined past the cap: the last allowed response says close, the rest is not served.
    async with await RawClient.connect(p.port) as c:
        await c.send(b"".join(get(f"/p{i}") for i in range(5)))
        got = [await c.response() for _ in range(3)]
        assert [r.header("Connection") for r in got] == [None, None, "close"]
        assert await c.read_to_eof() == b""
    assert [r.target for r in up.requests] == ["/k0", "/k1", "/k2", "/p0", "/p1", "/p2"]


async def test_keepalive_requests_cap_on_local_answers(
    upstreams: Upstreams, proxy: StartProxy
) -> None:
    p, _ = await recording_proxy(upstreams, proxy, limits={"max_keepalive_requests": 2})
    async with await RawClient.connect(p.port) as c:
        assert not (await c.request(get("/health"))).has("Connection")
        resp = await c.request(get("/health"))
        assert resp.status == 200 and resp.header("Connection") == "close"
        assert await c.read_to_eof() == b""


# -- body timeout -------------------------------------------------------------------------------


async def test_body_timeout_before_the_upstream_answers(
    upstreams: Upstreams, proxy: StartProxy
) -> None:
    """A stalled upload: 408 and close; the upstream exchange that had part of it is ended."""
    p, up = await recording_proxy(upstreams, proxy, limits={"body_timeout": "0.3s"})
    loop = asyncio.get_running_loop()
    async with await RawClient.connect(p.port) as c:
        await c.send(b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n"
                     + b"x" * 10)
        t0 = loop.time()
        resp = await c.response(timeout=3)
        assert loop.time() - t0 >= 0.2
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
    loop = asyncio.get_running_loop()
    async with await RawClient.connect(p.port) as c:
        await c.send(b"POST /d HTTP/1.1\r\nHost: t\r\nContent-Length: 50\r\n\r\nabc")
        resp = await c.response()
        assert resp.status == 200 and resp.body == b"direct"
        assert not resp.has("Connection")
        t0 = loop.time()
        assert await c.read_to_eof(timeout=3) == b""
        assert loop.time() - t0 >= 0.2
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


# -- generated input (hypothesis) ---------------------------------------------------------------

TCHAR = b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
NAME_NOISE = b" \t:\r\n\x00\x01\x7f\x80\xff\"(),/;<=>?@[\\]{}"
VALUE_OK = bytes(range(0x20, 0x7F)) + b"\t\x80\xa0\xff"
VALUE_NOISE = b"\r\n\x00\x01\x08\x0b\x0c\x1b\x1f\x7f"
# Fields whose meaning proxyd acts on (framing, Host, forwarding, hop-by-hop): their own tests
# cover them; here a generated field must be forwarded as it is or refused.
SENSITIVE = SPECIAL | REQUEST_DROP | {b"x-request-id"}


def _bytes(alphabet: bytes, min_size: int, max_size: int) -> st.SearchStrategy[bytes]:
    return st.lists(st.sampled_from(list(alphabet)), min_size=min_size,
                    max_size=max_size).map(bytes)


names = st.one_of(_bytes(TCHAR, 1, 16), _bytes(TCHAR + NAME_NOISE, 0, 16))
values = st.one_of(_bytes(VALUE_OK, 0, 40), _bytes(VALUE_OK + VALUE_NOISE, 0, 40))


def field_line(name: bytes, value: bytes) -> tuple[bytes, bytes] | None:
    """The field ``name + b": " + value`` really is, by RFC 9112 §5 — it splits at its first
    colon — or None where the line is invalid (a CR or LF in it is a bare one: the test
    assumes away CRLF pairs, which would make several lines)."""
    real_name, _, real_value = (name + b": " + value).partition(b":")
    if not real_name or not all(c in TCHAR for c in real_name):
        return None
    if not all(c == 0x09 or 0x20 <= c != 0x7F for c in real_value):
        return None
    return real_name, real_value


def parse_chunked(data: bytes, lenient_ext: bool = False) -> tuple[bytes, int] | None:
    """A strict RFC 9112 chunked-body parser (no BWS: nothing generated here has any):
    (decoded body, bytes consumed), or None if invalid or incomplete. ``lenient_ext``
    accepts any chunk-extension text on one line (proxyd never forwards extensions)."""
    token = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
    qdtext = rb'"[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]*"'
    ext = (rb"(?:;" + token + rb"(?:=(?:" + token + rb"|" + qdtext + rb"))?)*"
           if not lenient_ext else rb"(?:;[^\r\n]*)?")
    size_line = re.compile(rb"([0-9A-Fa-f]+)(" + ext + rb")\r\n")
    field_line = re.compile(token + rb":[ \t]*[^\x00-\x08\x0a-\x1f\x7f]*?[ \t]*\r\n")
    body, pos = b"", 0
    while True:
        m = size_line.match(data, pos)
        if m is None:
            return None
        size, pos = int(m.group(1), 16), m.end()
        if size == 0:
            break
        if data[pos + size:pos + size + 2] != b"\r\n" or len(data) < pos + size + 2:
            return None
        body += data[pos:pos + size]
        pos += size + 2
    while True:  # trailer section
        if data[pos:pos + 2] == b"\r\n":
            return body, pos + 2
        m = field_line.match(data, pos)
        if m is None:
            return None
        pos = m.end()


EXTS = st.sampled_from([b"", b";a", b";a=b", b';q="x y"', b";a=1;b=2"])
CORRUPT = b"\r\n\x00;gzX:=\x7f\xff"  # no hex digit and no white space: see parse_chunked


@st.composite
def chunked_bodies(draw: st.DrawFn) -> bytes:
    chunks = draw(st.lists(st.binary(min_size=1, max_size=48), max_size=5))
    parts = []
    for chunk in chunks:
        fmt = draw(st.sampled_from([b"%x", b"%X", b"%03x"]))
        parts.append(fmt % len(chunk) + draw(EXTS) + b"\r\n" + chunk + b"\r\n")
    parts.append(draw(st.sampled_from([b"0", b"000"])) + draw(EXTS) + b"\r\n")
    if draw(st.booleans()):
        parts.append(b"X-Trailer: t\r\n")
    encoded = b"".join(parts) + b"\r\n"
    if draw(st.booleans()):  # corrupt it: one to three bytes inserted somewhere inside
        at = draw(st.integers(0, len(encoded) - 1))
        noise = draw(_bytes(CORRUPT, 1, 3))
        encoded = encoded[:at] + noise + encoded[at:]
    return encoded


@dataclass
class ThreadedProxy:
    """A worker and a recording upstream on their own uvloop thread, for hypothesis's
    synchronous tests; every exception that reaches that loop is recorded."""

    limits: dict[str, Any]
    port: int = 0
    errors: list[dict[str, Any]] = field(default_factory=list)
    upstream: RawUpstream | None = None
    worker: Worker | None = None
    _loop: asyncio.AbstractEventLoop | None = None
    _stop: asyncio.Event | None = None
    _ready: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> ThreadedProxy:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._ready.wait(10), "threaded proxy did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        assert self._thread is not None
        self._thread.join(10)

    def _run(self) -> None:
        loop = self._loop = uvloop.new_event_loop()
        loop.set_exception_handler(lambda _loop, context: self.errors.append(context))
        loop.run_until_complete(self._main())
        loop.close()

    async def _main(self) -> None:
        up = self.upstream = RawUpstream(
            lambda r, w, c: serve_keepalive(up, r, w, c, lambda req, _: OK_RESPONSE))
        await up.start()
        sock = listen_socket("127.0.0.1", 0, 128)
        self.port = sock.getsockname()[1]
        config = build_config(self.port, CATCH_ALL, {"backend": up.url}, limits=self.limits,
                              access_log={"enabled": False})
        self.worker = Worker(GatewayConfig.model_validate(config), [sock])
        await self.worker.start()
        self._stop = asyncio.Event()
        self._ready.set()
        await self._stop.wait()
        await self.worker.drain(1.0)
        await up.close()

    def exchange(self, data: bytes, timeout: float = 5.0) -> bytes:
        """Send one request (it asks for Connection: close); everything until the close."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as sock:
            sock.sendall(data)
            out = b""
            with contextlib.suppress(ConnectionResetError):
                while chunk := sock.recv(65536):
                    out += chunk
            return out


def status_of(raw: bytes) -> int | None:
    m = re.match(rb"HTTP/1\.1 (\d{3}) ", raw)
    return int(m.group(1)) if m else None


@pytest.fixture(scope="module")
def threaded() -> Iterator[ThreadedProxy]:
    with ThreadedProxy({"body_timeout": "0.5s", "header_timeout": "2s"}) as tp:
        yield tp


def test_generated_header_fields(threaded: ThreadedProxy) -> None:
    up = threaded.upstream
    assert up is not None
    counter = iter(range(10**9))
    forwarded: dict[str, bytes] = {}
    refused: list[bytes] = []

    @settings(max_examples=200, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(name=names, value=values)
    def check(name: bytes, value: bytes) -> None:
        assume(b"\r\n" not in name + b": " + value)
        real = field_line(name, value)
        assume(real is None or real[0].lower() not in SENSITIVE)
        # (A valid name with an underscore is dropped by default: tests/functional/
        # test_request_line.py.)
        assume(real is None or b"_" not in real[0])
        path = f"/h{next(counter)}"
        data = (f"GET {path} HTTP/1.1\r\nHost: t\r\n".encode() + name + b": " + value
                + b"\r\nConnection: close\r\n\r\n")
        raw = threaded.exchange(data)
        assert not threaded.errors, threaded.errors
        status = status_of(raw)
        if real is not None:
            assert status == 200, (name, value, raw[:200])
            forwarded[path] = real[1]
        else:
            assert status in (400, 431), (name, value, raw[:200])
            refused.append(name)
            assert b"Connection: close" in raw.split(b"\r\n\r\n")[0]

    check()
    time.sleep(0.1)
    got = {r.target: r for r in up.requests if r.target.startswith("/h")}
    assert set(got) == set(forwarded), "an invalid field reached the upstream (or a valid not)"
    assert len(forwarded) >= 20 and len(refused) >= 20  # both kinds were generated
    for path, value in forwarded.items():
        fields = got[path].headers
        # The generated field is forwarded as sent (modulo surrounding white space).
        sent = value.decode("latin-1").strip()  # as the recording upstream strips it
        assert any(v == sent for _, v in fields), (path, value, fields)
    assert not [p for p in up.partial if b" /h" in p]
    assert status_of(threaded.exchange(get("/alive", extra="Connection: close\r\n"))) == 200


def test_generated_chunked_bodies(threaded: ThreadedProxy) -> None:
    up = threaded.upstream
    assert up is not None
    counter = iter(range(10**9))
    expected: dict[str, bytes] = {}  # path → body, for every request that must arrive
    incomplete: set[str] = set()
    refused: list[bytes] = []

    @settings(max_examples=200, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(encoded=chunked_bodies())
    def check(encoded: bytes) -> None:
        path = f"/c{next(counter)}"
        head = (f"POST {path} HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n"
                "Connection: close\r\n\r\n").encode()
        raw = threaded.exchange(head + encoded)
        assert not threaded.errors, threaded.errors
        parsed = parse_chunked(encoded)
        status = status_of(raw)
        if parsed is not None:
            assert status == 200, (encoded, raw[:200])
            expected[path] = parsed[0]
        elif status == 200:
            # llhttp tolerates some extension syntax the RFC does not (";;a"): harmless, as
            # extensions are dropped when proxyd re-frames; the body must still be exact.
            lenient = parse_chunked(encoded, lenient_ext=True)
            assert lenient is not None, (encoded, raw[:200])
            expected[path] = lenient[0]
        elif status is None or status == 408:
            incomplete.add(path)  # waits for more body: body_timeout (408) ends it
        else:
            assert status == 400, (encoded, raw[:200])
            refused.append(encoded)

    check()
    time.sleep(0.1)
    got = {r.target: r for r in up.requests if r.target.startswith("/c")}
    assert set(got) == set(expected), "an invalid chunked body reached the upstream"
    assert len(expected) >= 20 and len(refused) >= 20  # both kinds were generated
    for path, body in expected.items():
        assert got[path].body == body, path
    # A partial request upstream only for bodies that were still incomplete (streamed, then
    # cut off by body_timeout) — never for a body proxyd found invalid.
    for partial in up.partial:
        m = re.match(rb"POST (/c\d+) ", partial)
        assert m is None or m.group(1).decode() in incomplete, partial[:100]
    assert status_of(threaded.exchange(get("/alive", extra="Connection: close\r\n"))) == 200


def test_chunked_reference_parser() -> None:
    """The oracle itself, on the cases the corpus pins down."""
    assert parse_chunked(b"3\r\nabc\r\n0\r\n\r\nGET") == (b"abc", 13)
    body = b'3;a=b;c="d e"\r\nabc\r\n00\r\nX: y\r\n\r\n'
    assert parse_chunked(body) == (b"abc", len(body))
    assert parse_chunked(b"3\r\nabc\r\n0\r\nX:") is None  # incomplete
    for _, body in CHUNKS:
        assert parse_chunked(body) is None, body


# -- TLS ----------------------------------------------------------------------------------------


@dataclass
class Certs:
    ca: trustme.CA
    cert: Path
    key: Path

    def issue(self, *names: str) -> trustme.LeafCert:
        """A new leaf for 127.0.0.1 written over the same files (a renewal)."""
        leaf = self.ca.issue_cert("127.0.0.1", "localhost", *names)
        write_atomic(self.cert, b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        write_atomic(self.key, leaf.private_key_pem.bytes())
        return leaf

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        self.ca.configure_trust(ctx)
        return ctx


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    c = Certs(trustme.CA(), tmp_path / "cert.pem", tmp_path / "key.pem")
    c.issue()
    return c


@pytest.fixture
async def tls_proxy(
    upstreams: Upstreams, certs: Certs
) -> AsyncIterator[Callable[..., Any]]:
    """``await tls_proxy(upstream_url, min_version=...)`` → (worker, port): one TLS listener."""
    workers: list[Worker] = []

    async def start(upstream_url: str, min_version: str = "1.2",
                    limits: dict[str, Any] | None = None) -> tuple[Worker, int]:
        sock = listen_socket("127.0.0.1", 0, 128)
        port = sock.getsockname()[1]
        config = build_config(port, CATCH_ALL, {"backend": upstream_url}, limits=limits,
                              access_log={"enabled": False})
        config["server"]["listen"] = [{"address": f"127.0.0.1:{port}", "tls": {
            "cert": str(certs.cert), "key": str(certs.key), "min_version": min_version}}]
        worker = Worker(GatewayConfig.model_validate(config), [sock])
        await worker.start()
        workers.append(worker)
        return worker, port

    try:
        yield start
    finally:
        for worker in workers:
            await worker.drain(1.0)


async def test_tls_listener_serves_https_with_forwarded_proto(
    upstreams: Upstreams, certs: Certs, tls_proxy: Callable[..., Any]
) -> None:
    up = await upstreams.aiohttp()
    _, port = await tls_proxy(up.url)
    async with aiohttp.ClientSession() as session, session.get(
            f"https://127.0.0.1:{port}/secure?x=1", ssl=certs.client_context()) as resp:
        assert resp.status == 200
        body = await resp.json()
    assert body["path"] == "/secure?x=1"
    assert up.seen[0].header_all("X-Forwarded-Proto") == ["https"]


async def test_plain_http_to_tls_port_fails_cleanly(
    upstreams: Upstreams, certs: Certs, tls_proxy: Callable[..., Any]
) -> None:
    up = await upstreams.aiohttp()
    _, port = await tls_proxy(up.url)
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    try:
        async with await RawClient.connect(port) as c:
            await c.send(get("/plain"))
            with contextlib.suppress(ConnectionResetError):
                got = await c.read_to_eof()
                assert not got.startswith(b"HTTP/")  # a TLS alert at most, then the close
        await asyncio.sleep(0.1)
    finally:
        loop.set_exception_handler(previous)
    assert reported == []  # the failed handshake is not an error worth a traceback
    assert up.seen == []
    # ... and the listener keeps serving TLS.
    async with aiohttp.ClientSession() as session, session.get(
            f"https://127.0.0.1:{port}/ok", ssl=certs.client_context()) as resp:
        assert resp.status == 200


async def test_tls_handshake_is_bounded_by_header_timeout(
    upstreams: Upstreams, certs: Certs, tls_proxy: Callable[..., Any]
) -> None:
    """A client that opens a TLS port and never says hello is not connected for ever."""
    up = await upstreams.aiohttp()
    _, port = await tls_proxy(up.url, limits={"header_timeout": "0.3s"})
    loop = asyncio.get_running_loop()
    async with await RawClient.connect(port) as c:
        t0 = loop.time()
        assert await c.read_to_eof(timeout=3) == b""
        assert loop.time() - t0 >= 0.2


async def test_tls_min_version(
    upstreams: Upstreams, certs: Certs, tls_proxy: Callable[..., Any]
) -> None:
    up = await upstreams.aiohttp()
    _, port = await tls_proxy(up.url, min_version="1.3")
    old = certs.client_context()
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises((ssl.SSLError, ConnectionError)):
        _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=old)
        writer.close()
    reader, writer = await asyncio.open_connection("127.0.0.1", port,
                                                   ssl=certs.client_context())
    assert writer.get_extra_info("ssl_object").version() == "TLSv1.3"
    writer.write(get("/v"))
    assert (await reader.readuntil(b"\r\n")).startswith(b"HTTP/1.1 200")
    writer.close()


# -- real proxyd processes: admin tokens, TLS certificate reload ---------------------------------


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    config_path: Path
    log_path: Path
    traffic: int
    admin: int

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """``await daemon(config_dict)`` → a running ``python -m proxyd run`` (its own group)."""
    started: list[Daemon] = []

    async def start(config: dict[str, Any], traffic: int, admin: int,
                    token: str = "") -> Daemon:
        path = tmp_path / "gateway.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        log_path = tmp_path / "proxyd.log"
        with open(log_path, "ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", "proxyd", "run", "-c", str(path)],
                                    stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        d = Daemon(proc, path, log_path, traffic, admin)
        started.append(d)
        deadline = time.monotonic() + 20
        async with aiohttp.ClientSession() as session:
            while True:
                assert proc.poll() is None, f"proxyd exited:\n{d.log()}"
                with contextlib.suppress(aiohttp.ClientError, OSError):
                    async with session.get(f"http://127.0.0.1:{admin}/health/ready") as r:
                        if r.status == 200:
                            return d
                assert time.monotonic() < deadline, f"proxyd not ready:\n{d.log()}"
                await asyncio.sleep(0.05)

    try:
        yield start
    finally:
        for d in started:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(d.proc.pid, signal.SIGTERM)
            try:
                await asyncio.to_thread(d.proc.wait, 15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(d.proc.pid, signal.SIGKILL)
                await asyncio.to_thread(d.proc.wait, 5)


def daemon_config(traffic: int, admin: int, upstream_url: str, *,
                  listen: Any = None, admin_extra: dict[str, Any] | None = None,
                  marker: str = "v1") -> dict[str, Any]:
    return {
        "server": {"listen": listen or [f"127.0.0.1:{traffic}"], "workers": 1,
                   "max_requests": 0, "max_requests_jitter": 0, "drain_timeout": "2s"},
        "admin": {"listen": f"127.0.0.1:{admin}", **(admin_extra or {})},
        "upstreams": {"backend": {"targets": [upstream_url]}},
        "routes": [{"name": "marker", "match": {"path": "/marker"},
                    "respond": {"body": marker}},
                   {"name": "all", "match": {"path_prefix": "/"}, "upstream": "backend"}],
        "access_log": {"enabled": False},
    }


async def test_admin_token_and_protected_reads(
    upstreams: Upstreams, daemon: Callable[..., Any]
) -> None:
    up = await upstreams.aiohttp()
    traffic, admin = free_port(), free_port()
    token = "tok-" + os.urandom(12).hex()
    config = daemon_config(traffic, admin, up.url,
                           admin_extra={"token": token, "protect_reads": True})
    d: Daemon = await daemon(config, traffic, admin)
    base = f"http://127.0.0.1:{admin}"
    good = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession() as s:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": token},
                        {"Authorization": f"Basic {token}"},
                        {"Authorization": f"Bearer {token}x"}):
            async with s.post(f"{base}/reload", headers=headers) as r:
                assert r.status == 401 and r.headers["WWW-Authenticate"] == "Bearer"
            async with s.delete(f"{base}/cache?prefix=/", headers=headers) as r:
                assert r.status == 401
            for path in ("/status", "/metrics"):
                async with s.get(base + path, headers=headers) as r:
                    assert r.status == 401, path
        async with s.get(f"{base}/health") as r:  # probes stay open
            assert r.status == 200
        async with s.get(f"{base}/status", headers=good) as r:
            assert r.status == 200
            text = await r.text()
            assert token not in text
            assert json.loads(text)["generation"] == 1
        async with s.get(f"{base}/metrics", headers=good) as r:
            assert r.status == 200
        async with s.post(f"{base}/reload", headers=good) as r:
            assert r.status == 200 and (await r.json())["ok"] is True
        # Reads unprotected by a reload: /status opens, /reload still needs the token.
        config["admin"]["protect_reads"] = False
        write_atomic(d.config_path, yaml.safe_dump(config).encode())
        async with s.post(f"{base}/reload", headers=good) as r:
            assert r.status == 200 and (await r.json())["generation"] == 3
        async with s.get(f"{base}/status") as r:
            assert r.status == 200 and token not in await r.text()
        async with s.post(f"{base}/reload") as r:
            assert r.status == 401
    assert token not in d.log()


async def test_tls_listener_certificate_reload_on_sighup(
    upstreams: Upstreams, certs: Certs, daemon: Callable[..., Any]
) -> None:
    up = await upstreams.aiohttp()
    traffic, admin = free_port(), free_port()
    listen = [{"address": f"127.0.0.1:{traffic}",
               "tls": {"cert": str(certs.cert), "key": str(certs.key)}}]
    d: Daemon = await daemon(daemon_config(traffic, admin, up.url, listen=listen),
                             traffic, admin)

    async def served_cert() -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", traffic,
                                                       ssl=certs.client_context())
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        writer.write(get("/fwd", extra="Connection: close\r\n"))
        assert (await reader.read()).startswith(b"HTTP/1.1 200")
        writer.close()
        return bytes(der)

    async def generation() -> int:
        async with aiohttp.ClientSession() as s, s.get(
                f"http://127.0.0.1:{admin}/status") as r:
            return int((await r.json())["generation"])

    first = await served_cert()
    assert up.seen[-1].header("X-Forwarded-Proto") == "https"
    # Plain HTTP to the TLS port: the handshake fails; no response, no traceback in the log.
    async with await RawClient.connect(traffic) as c:
        await c.send(get("/plain"))
        with contextlib.suppress(ConnectionResetError):
            assert not (await c.read_to_eof()).startswith(b"HTTP/")

    leaf = certs.issue("renewed.test")  # new files, same paths
    os.kill(d.proc.pid, signal.SIGHUP)
    deadline = time.monotonic() + 20
    while await generation() != 2:
        assert time.monotonic() < deadline, d.log()
        await asyncio.sleep(0.05)
    second = await served_cert()
    assert second != first
    assert second == ssl.PEM_cert_to_DER_cert(leaf.cert_chain_pems[0].bytes().decode())

    # A broken certificate is a failed reload: the old workers keep the renewed one.
    certs.cert.write_text("-----BEGIN CERTIFICATE-----\nnot a certificate\n")
    async with aiohttp.ClientSession() as s, s.post(f"http://127.0.0.1:{admin}/reload") as r:
        assert r.status == 422
        error = (await r.json())["error"]
    assert "server.listen[0].tls" in error and str(certs.cert) in error
    assert await generation() == 2
    assert await served_cert() == second
    log = d.log()
    assert "Traceback" not in log and "SSL handshake failed" not in log
    assert "BEGIN" not in log
