"""A proxy in front of a recording upstream, and the checks made of every refused request:
the status (or the close), that the upstream saw nothing of it, and that the worker keeps
serving afterwards.
"""

from __future__ import annotations

import asyncio
from typing import Any

from tests.functional._http import RawClient, RawConn, RawUpstream, get, serve_keepalive
from tests.functional.conftest import CATCH_ALL, Proxy, StartProxy, Upstreams, assert_json_error

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


async def refused(p: Proxy, data: bytes, status: int) -> None:
    async with await RawClient.connect(p.port) as c:
        await c.send(data)
        resp = await c.response()
        assert_json_error(resp, status)
        assert resp.header("Connection") == "close"
        assert await c.read_to_eof() == b""
