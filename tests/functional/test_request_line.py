"""What the client side accepts and refuses in a request head, and what it forwards.

Absolute-form targets (RFC 9112 §3.2.2), protocols other than HTTP on the request line, field
names with an underscore, refused requests in the access log and the metrics, and the timing
of deadlines (late, never early).
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
from aiohttp import web

from tests.functional._http import RawClient, RawConn, get
from tests.functional.conftest import (
    CATCH_ALL,
    StartProxy,
    Upstreams,
    assert_json_error,
    route,
    wait_for,
)


async def test_absolute_form_target_is_accepted_with_its_authority_as_host(
        upstreams: Upstreams, proxy: StartProxy) -> None:
    up = await upstreams.aiohttp()
    routes = [route("a", host="a.test", path_prefix="/"),
              route("b", "other", host="b.test", path_prefix="/")]
    other = await upstreams.aiohttp(name="other")
    p = await proxy(routes, {"backend": up.url, "other": other.url})
    async with await RawClient.connect(p.port) as c:
        # The Host field is ignored in favour of the target's authority.
        resp = await c.request(b"GET http://a.test/x/y?q=1 HTTP/1.1\r\nHost: b.test\r\n\r\n")
        assert resp.status == 200 and resp.header("X-Upstream") == "backend"
        resp = await c.request(b"GET HTTPS://b.test:8443 HTTP/1.1\r\nHost: a.test\r\n\r\n")
        assert resp.status == 200 and resp.header("X-Upstream") == "other"
    first, second = up.seen[0], other.seen[0]
    assert first.path_qs == "/x/y?q=1"  # forwarded in origin-form
    assert first.header("X-Forwarded-Host") == "a.test"
    assert second.path_qs == "/"
    assert second.header("X-Forwarded-Host") == "b.test:8443"


async def test_other_protocols_on_the_request_line_never_reach_the_upstream(
        upstreams: Upstreams, proxy: StartProxy) -> None:
    up = await upstreams.aiohttp()
    p = await proxy(CATCH_ALL, {"backend": up.url})
    for line in (b"GET /a RTSP/1.1", b"GET /b RTSP/1.0", b"SOURCE /c ICE/1.0"):
        async with await RawClient.connect(p.port) as c:
            resp = await c.request(line + b"\r\nHost: t\r\n\r\n")
            assert_json_error(resp, 400)
    async with await RawClient.connect(p.port) as c:
        # The same words elsewhere in a head are no reason to refuse an HTTP request.
        resp = await c.request(get("/ok", extra="User-Agent: player RTSP/1.0\r\n"))
        assert resp.status == 200
    assert [s.path_qs for s in up.seen] == ["/ok"]


@pytest.mark.parametrize("policy", ["drop", "reject", "allow", None])
async def test_header_names_with_underscores(upstreams: Upstreams, proxy: StartProxy,
                                             policy: str | None) -> None:
    up = await upstreams.aiohttp()
    server = {} if policy is None else {"headers_with_underscores": policy}
    p = await proxy(CATCH_ALL, {"backend": up.url}, server=server)
    async with await RawClient.connect(p.port) as c:
        resp = await c.request(get("/", extra="X_Forwarded_For: 10.0.0.1\r\n"
                                              "Transfer_Encoding: chunked\r\nX-Ok: 1\r\n"))
    if policy == "reject":
        assert_json_error(resp, 400)
        assert up.seen == []
        return
    assert resp.status == 200
    (seen,) = up.seen
    assert seen.header("X-Ok") == "1"
    names = {name for name, _ in seen.headers}
    if policy == "allow":
        assert {"X_Forwarded_For", "Transfer_Encoding"} <= names
    else:  # drop, the default
        assert not any("_" in name for name in names), names


async def test_refused_requests_are_logged_and_counted(
        upstreams: Upstreams, proxy: StartProxy, tmp_path: Path) -> None:
    up = await upstreams.aiohttp()
    log = tmp_path / "access.log"
    p = await proxy(CATCH_ALL, {"backend": up.url}, access_log={"path": str(log)},
                    limits={"max_body_size": "1KiB", "max_uri_size": "1KiB",
                            "max_header_size": "1KiB", "header_timeout": "0.5s"})
    bad = [
        (b"GET / HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 5000\r\n\r\n", 413),
        (b"GET /" + b"a" * 2000 + b" HTTP/1.1\r\nHost: t\r\n\r\n", 414),
        (b"GET / HTTP/1.1\r\nHost: t\r\nX-Big: " + b"b" * 2000 + b"\r\n\r\n", 431),
        (b"GET / HTTP/1.1\r\nHost: t\r\nX-Slow: ", 408),
    ]
    for data, status in bad:
        async with await RawClient.connect(p.port) as c:
            await c.send(data)
            resp = await c.response()
            assert resp.status == status
    assert p.pipeline.access_log is not None
    await wait_for(lambda: (p.pipeline.access_log.flush() or True)  # type: ignore[union-attr]
                   and len(log.read_text().splitlines()) >= len(bad), what="five log lines")
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["status"] for r in records] == [s for _, s in bad]
    assert all(r["route"] == "none" for r in records)
    snapshot = p.pipeline.metrics.snapshot({})["counters"]
    counted = {k[0]: int(v) for k, v in snapshot["gateway_client_limits_total"]}
    assert counted == {"malformed": 1, "body_too_large": 1, "uri_too_long": 1,
                       "header_too_large": 1, "header_timeout": 1}
    requests = {tuple(k): int(v) for k, v in snapshot["gateway_requests_total"]}
    assert sum(n for (r, _, _), n in requests.items() if r == "none") == len(bad)


async def test_close_delimited_response_with_unknown_coding_ends_with_a_final_chunk(
        upstreams: Upstreams, proxy: StartProxy) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      conn: RawConn) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: identity-ish\r\n\r\nall of it")
        await writer.drain()
        writer.close()

    up = await upstreams.raw(handler)
    p = await proxy(CATCH_ALL, {"backend": up.url})
    async with await RawClient.connect(p.port) as c:
        resp = await c.request(get("/"))  # reads the chunked body to its final chunk
        assert resp.status == 200 and resp.chunked and resp.body == b"all of it"
        # ...and the connection is still good for another request.
        resp = await c.request(get("/again"))
        assert resp.status == 200


async def test_total_timeout_never_fires_early(upstreams: Upstreams,
                                               proxy: StartProxy) -> None:
    async def slow(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(5)
        return web.Response(text="late")

    up = await upstreams.aiohttp(slow)
    p = await proxy([{**route("all", path_prefix="/"), "timeouts": {"total": "0.7s"}}],
                    {"backend": up.url})
    for _ in range(3):
        async with await RawClient.connect(p.port) as c:
            t0 = time.monotonic()
            resp = await c.request(get("/"))
            elapsed = time.monotonic() - t0
        assert resp.status == 504
        assert elapsed >= 0.7, elapsed


async def test_upstream_error_details_go_to_the_log_not_the_client(
        proxy: StartProxy, caplog: pytest.LogCaptureFixture) -> None:
    """An upstream whose certificate does not verify: the client gets 502 with a short reason
    and its request id; the TLS error itself is logged, with that request id."""
    import socket
    import ssl

    import trustme

    ca = trustme.CA()  # a CA proxyd does not trust
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(ctx)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(answer, sock=sock, ssl=ctx)
    try:
        p = await proxy(CATCH_ALL, {"backend": {"targets": [f"https://127.0.0.1:{port}"],
                                                "retries": {"attempts": 1}}})
        with caplog.at_level("WARNING", logger="proxyd.upstream"):
            async with await RawClient.connect(p.port) as c:
                resp = await c.request(get("/"))
        err = assert_json_error(resp, 502)
        assert err["error"] == "upstream connect failed"
        logged = [r.getMessage() for r in caplog.records if r.name == "proxyd.upstream"]
        assert any(err["request_id"] in m and "CERTIFICATE_VERIFY_FAILED" in m.upper()
                   .replace(" ", "_") for m in logged), logged
    finally:
        server.close()
        await server.wait_closed()
