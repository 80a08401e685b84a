"""Path normalisation over real sockets: no spelling of a path reaches the upstream past a route
that answers it, and the upstream receives the form that was matched, byte for byte."""

from __future__ import annotations

import asyncio
from typing import Any

from tests.functional._http import Message, RawClient, RawConn, RawUpstream, get, serve_keepalive
from tests.functional.conftest import Proxy, StartProxy, Upstreams, assert_json_error, route

ROUTES = [
    route("private", path_prefix="/private/", respond={"status": 403, "body": "forbidden"}),
    route("all", path_prefix="/"),
]

# Dot segments spelled with escapes, which nginx resolves before matching its locations.
ENCODED_DOTS = ("/public/%2e%2e/private/x", "/public/%2E%2E/private/x",
                "/public/%2e./private/x", "/public/.%2E/private/x")


def ok(req: Message, conn: RawConn) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


async def start(upstreams: Upstreams, proxy: StartProxy, **server: Any
                ) -> tuple[Proxy, RawUpstream]:
    """The routes above, the catch-all to an upstream that records each request line."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      conn: RawConn) -> None:
        await serve_keepalive(up, reader, writer, conn, ok)

    up = await upstreams.raw(handler)
    return await proxy(ROUTES, {"backend": up.url}, server=server), up


async def test_encoded_dot_segments_cannot_skip_a_route(
    upstreams: Upstreams, proxy: StartProxy
) -> None:
    p, up = await start(upstreams, proxy)
    async with await RawClient.connect(p.port) as c:
        for target in ENCODED_DOTS:
            resp = await c.request(get(target))
            assert resp.status == 403, (target, resp.start)
            assert resp.body == b"forbidden"
        # By default an encoded slash or backslash, or a raw backslash, is refused: it has no
        # one meaning to the servers behind. The connection stays usable.
        for target in ("/public/..%2fprivate/x", "/public/..%2Fprivate/x",
                       "/public/..%5cprivate/x", "/public\\..\\private/x"):
            err = assert_json_error(await c.request(get(target)), 400)
            assert "slash" in err["error"], (target, err)
        for target in ("/public/%00/x", "/public/%zz/x", "/public/%2"):
            assert_json_error(await c.request(get(target)), 400)
        # What does reach the upstream is the matched form: unreserved escapes decoded, the
        # others uppercased, dot segments gone; the query as sent.
        resp = await c.request(get("/public/%7eme/./a/../caf%c3%a9?q=%2e%2e/%2f\\"))
        assert resp.status == 200 and resp.body == b"ok"
    assert [r.target for r in up.requests] == ["/public/~me/caf%C3%A9?q=%2e%2e/%2f\\"]


async def test_keep_forwards_encoded_slashes_as_matched(
    upstreams: Upstreams, proxy: StartProxy
) -> None:
    p, up = await start(upstreams, proxy, encoded_slashes="keep")
    async with await RawClient.connect(p.port) as c:
        for target in ENCODED_DOTS:
            resp = await c.request(get(target))
            assert resp.status == 403, (target, resp.start)
        # An encoded slash is an ordinary character of its segment: "..%2Fprivate" is not a
        # dot segment, so the path stays under /public/, and so does what the upstream gets.
        for target in ("/public/..%2fprivate/x", "/public/..%5Cprivate/x",
                       "/public\\..\\private/x", "/public/%2e%2e%2fprivate/x"):
            resp = await c.request(get(target))
            assert resp.status == 200, (target, resp.start)
        assert_json_error(await c.request(get("/public/%00")), 400)
    assert [r.target for r in up.requests] == [
        "/public/..%2Fprivate/x", "/public/..%5Cprivate/x",
        "/public%5C..%5Cprivate/x", "/public/..%2Fprivate/x",
    ]
