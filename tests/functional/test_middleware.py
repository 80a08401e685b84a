"""Middleware chains end to end: a real upstream on 127.0.0.1 behind a Worker in the test loop.

Each test asserts what the client got and what the upstream saw (or that it saw nothing). Body
transformations (etag, compression) are in test_middleware_body.py.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

from aiohttp import web

from tests.functional._http import RawClient, RawConn, get
from tests.functional.conftest import (
    CATCH_ALL,
    Proxy,
    StartProxy,
    Upstreams,
    assert_json_error,
    refused_url,
    route,
    wait_for,
)

ORIGIN = "https://app.example.com"


async def with_chain(
    upstreams: Upstreams, proxy: StartProxy, middleware: list[dict[str, Any]],
    routes: list[dict[str, Any]] | None = None, handler: Any = None, **kw: Any,
) -> tuple[Proxy, Any]:
    up = await (upstreams.aiohttp(handler) if handler else upstreams.aiohttp())
    p = await proxy(routes or CATCH_ALL, {"backend": up.url}, middleware=middleware, **kw)
    return p, up


# -- cors -----------------------------------------------------------------------------------------

CORS = {"type": "cors", "allow_origins": [ORIGIN, "https://*.example.org"],
        "allow_headers": ["X-Custom"], "allow_methods": ["GET", "PUT"],
        "expose_headers": ["X-Upstream"]}


def preflight(origin: str, method: str = "PUT", headers: str = "X-Custom") -> bytes:
    extra = f"Origin: {origin}\r\nAccess-Control-Request-Method: {method}\r\n"
    if headers:
        extra += f"Access-Control-Request-Headers: {headers}\r\n"
    return get("/things", method="OPTIONS", extra=extra)


async def test_cors_preflight_is_answered_by_the_proxy(
    upstreams: Upstreams, proxy: StartProxy
) -> None:
    p, up = await with_chain(upstreams, proxy, [CORS])
    async with await RawClient.connect(p.port) as c:
        resp = await c.request(preflight(ORIGIN))
        assert resp.status == 204, resp.start
        assert resp.header("Access-Control-Allow-Origin") == ORIGIN
        assert resp.header("Access-Control-Allow-Methods") == "GET, PUT"
        assert resp.header("Access-Control-Allow-Headers") == "X-Custom"
        assert resp.header("Access-Control-Max-Age") == "600"
        assert "Origin" in (resp.header("Vary") or "")
        assert not resp.has("Content-Length") and resp.body == b""
        # The 204 had no body: the connection is in step for the next request.
        follow = await c.request(get("/after"))
        assert follow.status == 200 and follow.json()["path"] == "/after"
    assert [s.path_qs for s in up.seen] == ["/after"]  # the preflight never reached it


async def test_cors_preflight_refusals_never_reach_the_upstream(
    upstreams: Upstreams, proxy: StartProxy
) -> None:
    p, up = await with_chain(upstreams, proxy, [CORS])
    async with await RawClient.connect(p.port) as c:
        for request in (
            preflight("https://evil.test"),  # origin
            preflight(ORIGIN, method="DELETE"),  # method
            preflight(ORIGIN, headers="X-Custom, X-Other"),  # header
        ):
            resp = await c.request(request)
            err = assert_json_error(resp, 403)
            assert err["error"].startswith("CORS ")
            assert not resp.has("Access-Control-Allow-Origin")
    assert up.seen == []


async def test_cors_simple_request_gets_allow_origin_and_vary(
    upstreams: Upstreams, proxy: StartProxy
) -> None:
    p, up = await with_chain(upstreams, proxy, [CORS])
    async with await RawClient.connect(p.port) as c:
        ok = await c.request(get("/x", extra=f"Origin: {ORIGIN}\r\n"))
        assert ok.status == 200
        assert ok.header_all("Access-Control-Allow-Origin") == [ORIGIN]
        assert ok.header("Access-Control-Expose-Headers") == "X-Upstream"
        assert ok.header("Vary") == "Origin"
        # A disallowed origin is still proxied (the browser enforces), but gets no grant.
        other = await c.request(get("/y", extra="Origin: https://evil.test\r\n"))
        assert other.status == 200
        assert not other.has("Access-Control-Allow-Origin")
        assert other.header("Vary") == "Origin"
        # A plain OPTIONS (no Access-Control-Request-Method) is not a preflight.
        plain = await c.request(get("/z", method="OPTIONS", extra=f"Origin: {ORIGIN}\r\n"))
        assert plain.status == 200 and plain.json()["method"] == "OPTIONS"
    assert [s.path_qs for s in up.seen] == ["/x", "/y", "/z"]


async def test_cors_wildcard_subdomain_pattern(upstreams: Upstreams, proxy: StartProxy) -> None:
    p, _ = await with_chain(upstreams, proxy, [CORS])
    cases = {
        "https://a.example.org": True,
        "https://deep.a.example.org": True,
        "HTTPS://A.Example.Org": True,
        "https://example.org": False,  # the pattern needs a subdomain
        "https://.example.org": False,  # an empty label is not one
        "http://a.example.org": False,  # scheme is part of the origin
        "https://evil-example.org": False,
        "https://a.example.org.evil.test": False,
        "https://a.example.org:8443": False,
    }
    async with await RawClient.connect(p.port) as c:
        for origin, allowed in cases.items():
            resp = await c.request(preflight(origin, headers=""))
            assert resp.status == (204 if allowed else 403), origin
            simple = await c.request(get("/", extra=f"Origin: {origin}\r\n"))
            got = simple.header("Access-Control-Allow-Origin")
            assert got == (origin if allowed else None), origin


# -- security headers -----------------------------------------------------------------------------

async def frame_options(request: web.Request) -> web.Response:
    return web.Response(text="framed", headers={"X-Frame-Options": "SAMEORIGIN"})


async def test_security_headers_defaults_and_upstream_values(
    upstreams: Upstreams, proxy: StartProxy
) -> None:
    routes = [
        route("override", path_prefix="/override",
              middleware={"security_headers": {"override": ["X-Frame-Options"]}}),
        *CATCH_ALL,
    ]
    p, _ = await with_chain(upstreams, proxy, [{"type": "security_headers"}], routes,
                            frame_options)
    async with await RawClient.connect(p.port) as c:
        kept = await c.request(get("/page"))
        assert not kept.has("Strict-Transport-Security")  # plain HTTP (test_security_headers)
        assert kept.header("X-Content-Type-Options") == "nosniff"
        assert kept.header("Referrer-Policy") == "strict-origin-when-cross-origin"
        assert not kept.has("Content-Security-Policy")  # no default for it
        assert kept.header_all("X-Frame-Options") == ["SAMEORIGIN"]  # the upstream's, kept
        replaced = await c.request(get("/override/page"))
        assert replaced.header_all("X-Frame-Options") == ["DENY"]
        assert replaced.header("X-Content-Type-Options") == "nosniff"


# -- validation -----------------------------------------------------------------------------------

async def test_validation_method_not_allowed(upstreams: Upstreams, proxy: StartProxy) -> None:
    p, up = await with_chain(upstreams, proxy,
                             [{"type": "validation", "methods": ["GET", "POST"]}])
    async with await RawClient.connect(p.port) as c:
        resp = await c.request(get("/thing", method="DELETE"))
        err = assert_json_error(resp, 405)
        assert err["error"] == "method not allowed"
        assert resp.header("Allow") == "GET, HEAD, POST"
        head = await c.request(get("/thing", method="HEAD"), head=True)
        assert head.status == 200
    assert [s.method for s in up.seen] == ["HEAD"]


async def test_validation_encoded_traversal_never_reaches_upstream(
    upstreams: Upstreams, proxy: StartProxy
) -> None:
    # The server resolves %2e%2e as ".." before routing and refuses %2F and %5C by default.
    # With those kept as ordinary characters, "..%2f" is no dot segment to the router, but an
    # upstream that decodes it would see one: the route's validation refuses it.
    p, up = await with_chain(upstreams, proxy, [{"type": "validation"}],
                             server={"encoded_slashes": "keep"})
    async with await RawClient.connect(p.port) as c:
        for path in ("/a/..%2fsecret", "/a/%2e%2e%5csecret", "/a/%00"):
            err = assert_json_error(await c.request(get(path)), 400)
            assert "encoded" in err["error"], path
        fine = await c.request(get("/a/%41b..c"))
        assert fine.status == 200 and fine.json()["path"] == "/a/Ab..c"
    assert [s.path_qs for s in up.seen] == ["/a/Ab..c"]


async def test_route_max_body_size_with_content_length(
    upstreams: Upstreams, proxy: StartProxy
) -> None:
    routes = [route("small", path_prefix="/small",
                    middleware={"validation": {"max_body_size": "1KiB"}}), *CATCH_ALL]
    p, up = await with_chain(upstreams, proxy, [{"type": "validation"}], routes)
    async with await RawClient.connect(p.port) as c:
        big = b"x" * 1025
        resp = await c.request(get("/small", method="POST",
                                   extra=f"Content-Length: {len(big)}\r\n"))
        assert_json_error(resp, 413)
        assert resp.header("Connection") == "close"  # the unread body cannot stay on the wire
        assert await c.read_to_eof() == b""
    async with await RawClient.connect(p.port) as c:
        ok = await c.request(get("/small", method="POST", extra="Content-Length: 1024\r\n")
                             + b"y" * 1024)
        assert ok.status == 200 and ok.json()["body_len"] == 1024
        other = await c.request(get("/other", method="POST", extra="Content-Length: 4096\r\n")
                                + b"z" * 4096)
        assert other.status == 200 and other.json()["body_len"] == 4096  # other routes: server
    assert [(s.path_qs, len(s.body or b"")) for s in up.seen] == [("/small", 1024),
                                                                  ("/other", 4096)]


async def test_route_max_body_size_for_a_growing_chunked_body(
    upstreams: Upstreams, proxy: StartProxy
) -> None:
    received = bytearray()
    head_seen = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      conn: RawConn) -> None:
        received.extend(await reader.readuntil(b"\r\n\r\n"))
        head_seen.set()
        while chunk := await reader.read(65536):
            received.extend(chunk)
        conn.eof.set()

    up = await upstreams.raw(handler)
    routes = [route("small", path_prefix="/", middleware={"validation": {"max_body_size": 1000}})]
    p = await proxy(routes, {"backend": up.url}, middleware=[{"type": "validation"}])
    async with await RawClient.connect(p.port) as c:
        await c.send(get("/up", method="POST", extra="Transfer-Encoding: chunked\r\n")
                     + b"258\r\n" + b"a" * 600 + b"\r\n")
        # The first 600 bytes stream through before the limit is known to be crossed.
        async with asyncio.timeout(5):
            await head_seen.wait()
        await wait_for(lambda: received.endswith(b"a" * 600 + b"\r\n"), what="first chunk")
        await c.send(b"258\r\n" + b"b" * 600 + b"\r\n")
        resp = await c.response()
        assert_json_error(resp, 413)
        assert await c.read_to_eof() == b""
        await wait_for(up.conns[0].eof.is_set, what="upstream connection closed")
    assert b"b" * 600 not in received and not received.endswith(b"0\r\n\r\n")


# -- trace id -------------------------------------------------------------------------------------

TRACE = {"type": "trace_id"}
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


async def test_trace_id_generated_forwarded_and_echoed(
    upstreams: Upstreams, proxy: StartProxy
) -> None:
    p, up = await with_chain(upstreams, proxy, [TRACE])
    async with await RawClient.connect(p.port) as c:
        first = await c.request(get("/a"))
        second = await c.request(get("/b"))
    ids = [first.header("X-Request-ID"), second.header("X-Request-ID")]
    assert all(ids) and ids[0] != ids[1]
    assert [s.header_all("X-Request-ID") for s in up.seen] == [[ids[0]], [ids[1]]]


async def test_trace_id_incoming_kept_unless_unsafe_or_untrusted(
    upstreams: Upstreams, proxy: StartProxy
) -> None:
    routes = [route("untrusted", path_prefix="/untrusted",
                    middleware={"trace_id": {"trust_incoming": False}}), *CATCH_ALL]
    p, up = await with_chain(upstreams, proxy, [TRACE], routes)
    async with await RawClient.connect(p.port) as c:
        kept = await c.request(get("/a", extra="X-Request-ID: client-abc-123\r\n"))
        assert kept.header_all("X-Request-ID") == ["client-abc-123"]
        unsafe = await c.request(get("/b", extra="X-Request-ID: has space\r\n"))
        untrusted = await c.request(get("/untrusted", extra="X-Request-ID: client-abc-123\r\n"))
    assert up.seen[0].header_all("X-Request-ID") == ["client-abc-123"]
    for resp, seen in ((unsafe, up.seen[1]), (untrusted, up.seen[2])):
        rid = resp.header("X-Request-ID")
        assert rid not in (None, "has space", "client-abc-123")
        assert seen.header_all("X-Request-ID") == [rid]


async def test_traceparent_keeps_trace_id_with_a_new_parent(
    upstreams: Upstreams, proxy: StartProxy
) -> None:
    p, up = await with_chain(upstreams, proxy, [TRACE])
    async with await RawClient.connect(p.port) as c:
        await c.request(get("/", extra=f"traceparent: 00-{TRACE_ID}-{PARENT}-01\r\n"))
        await c.request(get("/", extra=f"traceparent: 00-{TRACE_ID}-{PARENT}-01\r\n"))
        # A later version may carry more after the flags; proxyd speaks version 00.
        await c.request(get("/", extra=f"traceparent: 01-{TRACE_ID}-{PARENT}-00-more\r\n"))
    spans = []
    for seen, flags in zip(up.seen, ("01", "01", "00"), strict=True):
        (value,) = seen.header_all("traceparent")
        m = re.fullmatch(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})", value)
        assert m is not None, value
        assert m.group(1) == TRACE_ID and m.group(2) != PARENT and m.group(3) == flags
        spans.append(m.group(2))
    assert len(set(spans)) == 3


INVALID_TRACEPARENTS = [
    f"00-{'0' * 32}-{PARENT}-01",  # all-zero trace id
    f"00-{TRACE_ID}-{'0' * 16}-01",  # all-zero parent id
    f"00-{TRACE_ID.upper()}-{PARENT}-01",  # uppercase
    f"ff-{TRACE_ID}-{PARENT}-01",  # version ff
    f"00-{TRACE_ID}-{PARENT}-01-extra",  # version 00 has nothing after its flags
    f"00-{TRACE_ID[:-1]}-{PARENT}-01",  # short
    "garbage",
]


async def test_invalid_traceparent_restarts_the_trace(
    upstreams: Upstreams, proxy: StartProxy
) -> None:
    p, up = await with_chain(upstreams, proxy, [TRACE])
    async with await RawClient.connect(p.port) as c:
        for value in INVALID_TRACEPARENTS:
            await c.request(get("/", extra=f"traceparent: {value}\r\ntracestate: k=v\r\n"))
        # Two of them: which would be the parent? A new trace.
        await c.request(get("/", extra=f"traceparent: 00-{TRACE_ID}-{PARENT}-01\r\n"
                                       f"traceparent: 00-{TRACE_ID}-{PARENT}-01\r\n"))
    assert len(up.seen) == len(INVALID_TRACEPARENTS) + 1
    traces = set()
    for seen in up.seen:
        (value,) = seen.header_all("traceparent")
        m = re.fullmatch(r"00-([0-9a-f]{32})-([0-9a-f]{16})-01", value)
        assert m is not None and m.group(1) not in (TRACE_ID, "0" * 32), value
        assert m.group(2) != "0" * 16
        traces.add(m.group(1))
        assert seen.header_all("tracestate") == []  # it went with the invalid parent
    assert len(traces) == len(up.seen)


async def test_traces_start_at_the_edge(upstreams: Upstreams, proxy: StartProxy) -> None:
    routes = [route("quiet", path_prefix="/quiet",
                    middleware={"trace_id": {"start_traces": False}}),
              route("unsampled", path_prefix="/unsampled",
                    middleware={"trace_id": {"sampled": False}}), *CATCH_ALL]
    p, up = await with_chain(upstreams, proxy, [TRACE], routes)
    async with await RawClient.connect(p.port) as c:
        await c.request(get("/"))
        await c.request(get("/", extra="tracestate: k=v\r\n"))
        await c.request(get("/unsampled"))
        await c.request(get("/quiet", extra="tracestate: k=v\r\n"))
    fresh, orphan, unsampled, quiet = up.seen
    for seen, flags in ((fresh, "01"), (orphan, "01"), (unsampled, "00")):
        (value,) = seen.header_all("traceparent")
        assert re.fullmatch(rf"00-[0-9a-f]{{32}}-[0-9a-f]{{16}}-{flags}", value), value
    assert orphan.header_all("tracestate") == []
    # Not starting traces: the request goes on as it came.
    assert quiet.header_all("traceparent") == [] and quiet.header_all("tracestate") == ["k=v"]


async def test_request_id_in_error_bodies(upstreams: Upstreams, proxy: StartProxy) -> None:
    dead = refused_url()
    for chain in ([TRACE], [{"type": "security_headers"}]):  # with and without trace_id
        p = await proxy(CATCH_ALL, {"backend": dead}, middleware=chain)
        async with await RawClient.connect(p.port) as c:
            err = assert_json_error(await c.request(get("/")), 502)  # body id == header id
            assert err["error"].startswith("upstream connect failed")
            given = assert_json_error(
                await c.request(get("/", extra="X-Request-ID: mine-42\r\n")), 502
            )
            assert given["request_id"] == "mine-42"
    # A chain answer (validation) carries the id in the header too, even without trace_id.
    p = await proxy(CATCH_ALL, {"backend": dead},
                    middleware=[{"type": "validation", "methods": ["GET"]}])
    async with await RawClient.connect(p.port) as c:
        assert_json_error(await c.request(get("/", method="POST", extra="Content-Length: 0\r\n")),
                          405)


# -- headers --------------------------------------------------------------------------------------

async def test_headers_request_and_response_operations(
    upstreams: Upstreams, proxy: StartProxy
) -> None:
    headers = {
        "type": "headers",
        "request": {"set": {"X-Env": "prod", "X-Route": "{route}"}, "remove": ["X-Secret"],
                    "add": {"X-Added": "{method} {path}"}},
        "response": {"add": {"X-Served": "{route}/{request_id}"}, "remove": ["X-Upstream"],
                     "set": {"Server": "proxyd"}},
    }
    routes = [route("api", path_prefix="/api")]
    p, up = await with_chain(upstreams, proxy, [TRACE, headers], routes)
    async with await RawClient.connect(p.port) as c:
        resp = await c.request(get("/api/x", extra="X-Secret: s3cr3t\r\nX-Env: dev\r\n"))
    assert resp.status == 200
    seen = up.seen[0]
    assert seen.header("X-Secret") is None
    assert seen.header_all("X-Env") == ["prod"]
    assert seen.header("X-Route") == "api" and seen.header("X-Added") == "GET /api/x"
    rid = resp.header("X-Request-ID")
    assert rid and resp.header("X-Served") == f"api/{rid}"
    assert not resp.has("X-Upstream")
    assert resp.header_all("Server") == ["proxyd"]


# -- chain shape ----------------------------------------------------------------------------------

async def test_preflight_skips_later_middleware(upstreams: Upstreams, proxy: StartProxy) -> None:
    security = {"type": "security_headers"}
    after = await proxy(CATCH_ALL, {"backend": refused_url()},
                        middleware=[CORS, security])
    before = await proxy(CATCH_ALL, {"backend": refused_url()},
                         middleware=[security, CORS])
    async with await RawClient.connect(after.port) as c:
        resp = await c.request(preflight(ORIGIN))
        assert resp.status == 204 and not resp.has("X-Content-Type-Options")
    async with await RawClient.connect(before.port) as c:
        resp = await c.request(preflight(ORIGIN))
        assert resp.status == 204 and resp.header("X-Content-Type-Options") == "nosniff"
