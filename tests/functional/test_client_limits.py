"""Client-side limits: URI, header and body sizes (a corpus over and at the limits), the
connection cap and the keep-alive requests cap.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.functional._http import RawClient, get
from tests.functional._recording import recording_proxy, refused, still_serving
from tests.functional.conftest import StartProxy, Upstreams, assert_json_error, wait_for

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
