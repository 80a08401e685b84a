"""The lifecycle table of docs/architecture.md, cell by cell, on real sockets.

Each cell is a state a client connection (and its exchange) is in, an event, and the outcome
the table promises. The table in the document and the cells here are the same list: a row
without a cell, or a cell without a row, fails the first test.
"""

from __future__ import annotations

import asyncio
import re
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.functional._http import Message, RawClient, RawConn, RawUpstream, get, read_body
from tests.functional.conftest import CATCH_ALL, Proxy, StartProxy, Upstreams, wait_for

DOC = Path(__file__).resolve().parents[2] / "docs" / "architecture.md"
LIMITS = {"header_timeout": "0.4s", "body_timeout": "0.4s", "send_timeout": "0.4s",
          "max_body_size": "64KiB"}
SERVER = {"keepalive_timeout": "0.4s", "drain_timeout": "5s"}


@dataclass
class World:
    proxy: Proxy
    upstream: RawUpstream
    release: asyncio.Event  # lets /wait answer
    clients: list[RawClient] = field(default_factory=list)  # closed at teardown, pass or fail

    @property
    def port(self) -> int:
        return self.proxy.port

    async def client(self) -> RawClient:
        c = await RawClient.connect(self.port)
        self.clients.append(c)
        return c

    def drain(self) -> asyncio.Task[None]:
        return asyncio.get_running_loop().create_task(self.proxy.worker.drain(5.0))

    async def upstream_eof(self, index: int = 0) -> None:
        """The proxy closed the upstream connection ``index`` (it was not pooled)."""
        await wait_for(lambda: len(self.upstream.conns) > index, what="an upstream connection")
        conn = self.upstream.conns[index]
        await asyncio.wait_for(conn.eof.wait(), 5)

    def limits(self) -> dict[str, int]:
        counters = self.proxy.pipeline.metrics.snapshot({})["counters"]
        return {k[0]: int(v) for k, v in counters.get("gateway_client_limits_total", [])}


async def reads_eof(c: RawClient) -> bytes:
    try:
        return await c.read_to_eof()
    except ConnectionResetError:
        return b"<reset>"


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


@pytest.fixture
async def world(upstreams: Upstreams, proxy: StartProxy) -> AsyncIterator[World]:
    release = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      conn: RawConn) -> None:
        while True:
            try:
                raw = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                conn.eof.set()
                return
            lines = raw[:-4].decode("latin-1").split("\r\n")
            msg = Message(lines[0], [(n, v.strip()) for n, _, v in
                                     (line.partition(":") for line in lines[1:])], raw_head=raw)
            path = msg.target
            if path == "/early":  # answers before reading the body, then closes
                writer.write(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 2\r\n"
                             b"Connection: close\r\n\r\nno")
                await writer.drain()
                while await reader.read(65536):
                    pass
                return
            try:
                await read_body(reader, msg, is_response=False)
            except asyncio.IncompleteReadError:
                conn.eof.set()  # the proxy closed with part of a body sent
                return
            up.requests.append(msg)
            if path == "/wait":
                # Until released, or until the proxy closes the connection.
                closed = asyncio.ensure_future(reader.read(1))
                released = asyncio.ensure_future(release.wait())
                done, _ = await asyncio.wait({closed, released},
                                             return_when=asyncio.FIRST_COMPLETED)
                if closed in done:
                    released.cancel()
                    conn.eof.set()
                    return
                closed.cancel()
            elif path == "/close":
                return  # closes without an answer
            elif path == "/reset":
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                return
            elif path == "/silent":
                await asyncio.sleep(10)  # longer than the read timeout
            elif path == "/cut":  # promises 10 bytes, sends 5, closes
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")
                await writer.drain()
                return
            elif path == "/big":  # more than a client that does not read can take
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (32 << 20))
                chunk = b"x" * 65536
                try:
                    for _ in range(512):
                        writer.write(chunk)
                        await writer.drain()
                except ConnectionError:
                    conn.eof.set()
                return
            writer.write(OK)
            await writer.drain()

    up = await upstreams.raw(handler)
    # Well apart from body_timeout: the two must never fire in the same sweep.
    pool = {"read_timeout": "2s"}
    p = await proxy(CATCH_ALL, {"backend": {"targets": [up.url], "pool": pool,
                                            "retries": {"attempts": 1}}},
                    limits=LIMITS, server=SERVER)
    w = World(p, up, release)
    try:
        yield w
    finally:
        for c in w.clients:
            await c.close()


Cell = Callable[[World], Awaitable[None]]
CELLS: dict[tuple[str, str], Cell] = {}


def cell(state: str, event: str) -> Callable[[Cell], Cell]:
    def register(fn: Cell) -> Cell:
        CELLS[(state, event)] = fn
        return fn
    return register


# -- accepted: connected, nothing sent yet -----------------------------------------------------

@cell("accepted", "drain")
async def _(w: World) -> None:
    c = await w.client()
    await wait_for(lambda: len(w.proxy.pipeline.connections) == 1, what="accepted")
    draining = w.drain()
    resp = await c.request(get("/"))
    assert resp.status == 200 and resp.header("Connection") == "close"
    await c.close()
    await draining


@cell("accepted", "header timeout")
async def _(w: World) -> None:
    c = await w.client()
    assert await reads_eof(c) == b""  # nobody asked anything: closed without an answer
    await c.close()


# -- head: part of a header section received ---------------------------------------------------

@cell("head", "drain")
async def _(w: World) -> None:
    c = await w.client()
    await c.send(b"GET / HTTP/1.1\r\nHo")
    await wait_for(lambda: len(w.proxy.pipeline.connections) == 1, what="accepted")
    draining = w.drain()
    resp = await c.request(b"st: t\r\n\r\n")
    assert resp.status == 200 and resp.header("Connection") == "close"
    await c.close()
    await draining


@cell("head", "header timeout")
async def _(w: World) -> None:
    c = await w.client()
    await c.send(b"GET / HTTP/1.1\r\nHo")
    assert (await reads_eof(c)).startswith(b"HTTP/1.1 408 ")
    await c.close()
    assert w.limits().get("header_timeout") == 1
    assert w.upstream.requests == []


@cell("head", "client close")
async def _(w: World) -> None:
    c = await w.client()
    await c.send(b"GET / HTTP/1.1\r\nHo")
    await c.close()
    await wait_for(lambda: not w.proxy.pipeline.connections, what="the connection to go")
    assert w.upstream.requests == []


# -- body: head forwarded, body still arriving -------------------------------------------------

@cell("body", "body timeout")
async def _(w: World) -> None:
    c = await w.client()
    await c.send(get("/wait", method="POST", extra="Content-Length: 10\r\n") + b"hello")
    assert (await reads_eof(c)).startswith(b"HTTP/1.1 408 ")
    await c.close()
    await w.upstream_eof()  # the upstream had part of a body: its connection is closed


@cell("body", "client close")
async def _(w: World) -> None:
    c = await w.client()
    await c.send(get("/wait", method="POST", extra="Content-Length: 10\r\n") + b"hello")
    await wait_for(lambda: len(w.upstream.conns) == 1, what="the upstream connection")
    await c.close()
    await w.upstream_eof()


@cell("body", "early answer")
async def _(w: World) -> None:
    c = await w.client()
    await c.send(get("/early", method="POST", extra="Content-Length: 60000\r\n"))
    for _ in range(3):  # the client keeps sending what it announced
        try:
            await c.send(b"x" * 20000)
        except ConnectionError:
            break
    answer = await reads_eof(c)
    assert answer.startswith(b"HTTP/1.1 401 ") and answer.endswith(b"no"), answer[:100]
    await c.close()


@cell("body", "limit exceeded")
async def _(w: World) -> None:
    c = await w.client()
    await c.send(get("/", method="POST", extra="Transfer-Encoding: chunked\r\n"))
    for _ in range(8):  # 8 times 16 KiB, over the 64 KiB limit: 413 while still sending
        try:
            await c.send(b"4000\r\n" + b"y" * 0x4000 + b"\r\n")
        except ConnectionError:
            break
    assert (await reads_eof(c)).startswith(b"HTTP/1.1 413 ")
    await c.close()


# -- awaiting head: the request is upstream, no response byte yet ------------------------------

@cell("awaiting head", "upstream close")
async def _(w: World) -> None:
    async with await w.client() as c:
        assert (await c.request(get("/close"))).status == 502


@cell("awaiting head", "upstream reset")
async def _(w: World) -> None:
    async with await w.client() as c:
        assert (await c.request(get("/reset"))).status == 502


@cell("awaiting head", "upstream read timeout")
async def _(w: World) -> None:
    async with await w.client() as c:
        assert (await c.request(get("/silent"))).status == 504


@cell("awaiting head", "client close")
async def _(w: World) -> None:
    c = await w.client()
    await c.send(get("/wait"))
    await wait_for(lambda: len(w.upstream.requests) == 1, what="the request upstream")
    await c.close()
    await w.upstream_eof()  # an answer nobody waits for: the connection is not reused
    await wait_for(lambda: ("all", "GET", 499) in w.proxy.pipeline.metrics.requests,
                   what="the 499")


@cell("awaiting head", "drain")
async def _(w: World) -> None:
    c = await w.client()
    await c.send(get("/wait"))
    await wait_for(lambda: len(w.upstream.requests) == 1, what="the request upstream")
    draining = w.drain()
    w.release.set()
    resp = await c.response()
    assert resp.status == 200 and resp.header("Connection") == "close"
    await c.close()
    await draining


# -- relaying: the response is streaming to the client -----------------------------------------

@cell("relaying", "upstream close")
async def _(w: World) -> None:
    c = await w.client()
    await c.send(get("/cut"))
    got = await reads_eof(c)
    assert got.startswith(b"HTTP/1.1 200 ") and got.endswith(b"hello")  # 5 of 10: truncated
    await c.close()


@cell("relaying", "client close")
async def _(w: World) -> None:
    c = await w.client()
    await c.send(get("/big"))
    await c.reader.readuntil(b"\r\n\r\n")
    await c.close()
    await w.upstream_eof()


@cell("relaying", "send timeout")
async def _(w: World) -> None:
    c = await w.client()
    c.writer.transport.set_write_buffer_limits(0)
    sock = c.writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await c.send(get("/big"))
    c.writer.transport.pause_reading()  # reads nothing: the proxy's writes stall
    await wait_for(lambda: w.limits().get("send_timeout") == 1, timeout=10,
                   what="send_timeout")
    await w.upstream_eof()
    await c.close()


# -- idle: kept alive between requests ---------------------------------------------------------

@cell("idle", "keepalive timeout")
async def _(w: World) -> None:
    c = await w.client()
    assert (await c.request(get("/"))).status == 200
    assert await reads_eof(c) == b""
    await c.close()


@cell("idle", "drain")
async def _(w: World) -> None:
    c = await w.client()
    assert (await c.request(get("/"))).status == 200
    draining = w.drain()
    resp = await c.request(get("/"))  # a request on its way as the drain began: answered
    assert resp.status == 200 and resp.header("Connection") == "close"
    assert await reads_eof(c) == b""
    await c.close()
    await draining


@cell("idle", "client half-close")
async def _(w: World) -> None:
    c = await w.client()
    assert (await c.request(get("/"))).status == 200
    c.writer.write_eof()
    assert await reads_eof(c) == b""
    await c.close()


# -- upgrade -----------------------------------------------------------------------------------

@cell("head", "upgrade with a body")
async def _(w: World) -> None:
    async with await w.client() as c:
        resp = await c.request(b"POST /u HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\n"
                               b"Upgrade: x\r\nContent-Length: 3\r\n\r\nabc")
        assert resp.status == 200
        resp = await c.request(get("/after"))  # still HTTP on the same connection
        assert resp.status == 200
    first = w.upstream.requests[0]
    assert first.body == b"abc" and first.header("upgrade") is None


# -- the table -----------------------------------------------------------------------------------

def documented_cells() -> set[tuple[str, str]]:
    text = DOC.read_text()
    section = text[text.index("### The lifecycle table"):]
    rows = re.findall(r"^\| ([a-z -]+?) \| ([a-z -]+?) \|", section, re.M)
    return {(state, event) for state, event in rows if state != "state"}


def test_the_table_and_the_cells_are_the_same_list() -> None:
    assert documented_cells() == set(CELLS)


@pytest.mark.parametrize("key", list(CELLS), ids=[f"{s}/{e}" for s, e in CELLS])
async def test_cell(world: World, key: tuple[str, str]) -> None:
    await CELLS[key](world)
    assert not [r for r in world.upstream.partial if r]  # never a head without its body
