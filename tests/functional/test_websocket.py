"""WebSocket relay end to end: an aiohttp client, proxyd, and an aiohttp WebSocket upstream."""

from __future__ import annotations

import asyncio
import base64
import os
import struct
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType, web

from proxyd.proxy.websocket import accept_key
from tests.functional._http import RawConn, RawUpstream
from tests.functional.conftest import AioUpstream, Proxy, StartProxy, Upstreams, wait_for

CLIENT_KEY = b"dGhlIHNhbXBsZSBub25jZQ=="


@dataclass
class WsState:
    """What the upstream's WebSocket handler saw."""

    closes: list[int | None] = field(default_factory=list)  # close code per ended socket
    keys: list[str] = field(default_factory=list)  # Sec-WebSocket-Key as received
    protocols: list[str] = field(default_factory=list)  # Sec-WebSocket-Protocol as received
    received: list[str | bytes] = field(default_factory=list)


def ws_app(state: WsState) -> Any:
    """Echo upstream. Query: refuse=N (answer status N), plain=1 (200, no upgrade),
    delay=s (before answering the handshake), hello=1 (a message right after the 101).
    Text commands: "close CODE", "big N" (send N bytes)."""

    async def handler(request: web.Request) -> web.StreamResponse:
        q = request.query
        if request.headers.get("Upgrade", "").lower() != "websocket" or "plain" in q:
            return web.Response(text=f"plain {request.path_qs}")
        state.keys.append(request.headers.get("Sec-WebSocket-Key", ""))
        state.protocols.append(request.headers.get("Sec-WebSocket-Protocol", ""))
        if "delay" in q:
            await asyncio.sleep(float(q["delay"]))
        if "refuse" in q:
            return web.Response(status=int(q["refuse"]), text="refused by upstream")
        ws = web.WebSocketResponse(protocols=("b",), max_msg_size=0)
        await ws.prepare(request)
        if "hello" in q:
            await ws.send_str("hello")
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                state.received.append(msg.data)
                if msg.data.startswith("close "):
                    await ws.close(code=int(msg.data.split()[1]), message=b"bye now")
                    break
                if msg.data.startswith("big "):
                    await ws.send_str("x" * int(msg.data.split()[1]))
                else:
                    await ws.send_str(msg.data)
            elif msg.type == WSMsgType.BINARY:
                state.received.append(msg.data)
                await ws.send_bytes(msg.data)
        state.closes.append(ws.close_code)
        return ws

    return handler


async def ws_proxy(upstreams: Upstreams, proxy: StartProxy, websocket: Any = True,
                   **kw: Any) -> tuple[Proxy, AioUpstream, WsState]:
    state = WsState()
    up = await upstreams.aiohttp(ws_app(state))
    routes = [
        {"name": "plain", "match": {"path_prefix": "/plain"}, "upstream": "backend"},
        {"name": "ws", "match": {"path_prefix": "/"}, "upstream": "backend",
         "websocket": websocket},
    ]
    p = await proxy(routes, {"backend": up.url}, access_log={"enabled": False}, **kw)
    return p, up, state


@pytest.fixture
async def session() -> Any:
    async with aiohttp.ClientSession() as s:
        yield s


async def receive(ws: aiohttp.ClientWebSocketResponse, timeout: float = 5.0) -> aiohttp.WSMessage:
    return await asyncio.wait_for(ws.receive(), timeout)


# -- echo ---------------------------------------------------------------------------------------


async def test_text_and_binary_echo(upstreams: Upstreams, proxy: StartProxy,
                                    session: aiohttp.ClientSession) -> None:
    p, _, state = await ws_proxy(upstreams, proxy)
    async with session.ws_connect(p.url + "/chat") as ws:
        for text in ("hello", "ünïcode ✓", "x" * 200, ""):
            await ws.send_str(text)
            msg = await receive(ws)
            assert (msg.type, msg.data) == (WSMsgType.TEXT, text)
        big = os.urandom(1 << 20)
        await ws.send_bytes(big)
        msg = await receive(ws)
        assert msg.type == WSMsgType.BINARY and msg.data == big
        assert len(p.pipeline.tunnels) == 1
    await wait_for(lambda: not p.pipeline.tunnels, what="the relay to end")
    assert state.closes == [1000]


async def test_fresh_key_towards_upstream_and_accept_for_client(
    upstreams: Upstreams, proxy: StartProxy
) -> None:
    p, _, state = await ws_proxy(upstreams, proxy)
    reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
    writer.write(handshake("/k"))
    status, headers = await read_head(reader)
    assert status == 101
    assert headers["sec-websocket-accept"] == accept_key(CLIENT_KEY).decode()
    assert headers["upgrade"].lower() == "websocket"
    (key,) = state.keys
    assert key and key != CLIENT_KEY.decode()  # regenerated, not copied
    assert len(base64.b64decode(key)) == 16
    writer.close()


async def test_ping_gets_upstream_pong(upstreams: Upstreams, proxy: StartProxy,
                                       session: aiohttp.ClientSession) -> None:
    p, _, _ = await ws_proxy(upstreams, proxy)
    async with session.ws_connect(p.url + "/", autoping=False) as ws:
        await ws.ping(b"are you there")
        msg = await receive(ws)
        assert (msg.type, msg.data) == (WSMsgType.PONG, b"are you there")
        await ws.send_str("still relaying")
        assert (await receive(ws)).data == "still relaying"


# -- closing --------------------------------------------------------------------------------------


async def test_client_close_code_reaches_upstream(upstreams: Upstreams, proxy: StartProxy,
                                                  session: aiohttp.ClientSession) -> None:
    p, _, state = await ws_proxy(upstreams, proxy)
    ws = await session.ws_connect(p.url + "/")
    await ws.send_str("one")
    await receive(ws)
    await ws.close(code=4001, message=b"client leaving")
    assert ws.close_code == 1000  # aiohttp's upstream answers any close with 1000
    await wait_for(lambda: state.closes == [4001], what="upstream to see 4001")
    await wait_for(lambda: not p.pipeline.tunnels, what="the relay to end")


async def test_upstream_close_code_and_reason_reach_client(
    upstreams: Upstreams, proxy: StartProxy, session: aiohttp.ClientSession
) -> None:
    p, _, state = await ws_proxy(upstreams, proxy)
    async with session.ws_connect(p.url + "/") as ws:
        await ws.send_str("close 4000")
        msg = await receive(ws)
        assert msg.type == WSMsgType.CLOSE
        assert (msg.data, msg.extra) == (4000, "bye now")
    await wait_for(lambda: len(state.closes) == 1, what="upstream handler to end")
    await wait_for(lambda: not p.pipeline.tunnels, what="the relay to end")
    closes = p.pipeline.metrics.counters["gateway_websocket_closes_total"]
    assert closes == {("4000",): 1.0}  # the code of the side that closed first


async def test_metrics_after_relay_ends(upstreams: Upstreams, proxy: StartProxy,
                                        session: aiohttp.ClientSession) -> None:
    p, _, _ = await ws_proxy(upstreams, proxy)
    async with session.ws_connect(p.url + "/") as ws:
        assert p.pipeline.gauges()["gateway_websocket_connections_active"] == {(): 1.0}
        for i in range(3):
            await ws.send_str(f"m{i}")
            await receive(ws)
        await ws.send_bytes(b"\0" * 1000)
        await receive(ws)
        await ws.close(code=4001)
    await wait_for(lambda: not p.pipeline.tunnels, what="the relay to end")
    counters = p.pipeline.metrics.counters
    assert counters["gateway_websocket_messages_total"] == {("up",): 4.0, ("down",): 4.0}
    up = counters["gateway_websocket_bytes_total"][("up",)]
    down = counters["gateway_websocket_bytes_total"][("down",)]
    # Payloads (1006 bytes) plus headers; the client's frames carry a 4-byte mask each.
    assert 1006 + 4 * 2 + 4 < down < up < 1100
    assert counters["gateway_websocket_closes_total"] == {("4001",): 1.0}
    assert counters["gateway_requests_total"][("ws", "GET", 101)] == 1.0  # int in the worker
    assert p.pipeline.gauges()["gateway_websocket_connections_active"] == {(): 0.0}


# -- handshake ------------------------------------------------------------------------------------


async def test_subprotocol_negotiated_by_upstream(upstreams: Upstreams, proxy: StartProxy,
                                                  session: aiohttp.ClientSession) -> None:
    p, _, state = await ws_proxy(upstreams, proxy)
    async with session.ws_connect(p.url + "/", protocols=("a", "b")) as ws:
        assert ws.protocol == "b"
        await ws.send_str("ok")
        assert (await receive(ws)).data == "ok"
    assert [s.replace(" ", "") for s in state.protocols] == ["a,b"]


@pytest.mark.parametrize("query", ["?refuse=403", "?refuse=401", "?plain=1"])
async def test_upstream_refusing_upgrade_status_reaches_client(
    upstreams: Upstreams, proxy: StartProxy, session: aiohttp.ClientSession, query: str
) -> None:
    p, _, _ = await ws_proxy(upstreams, proxy)
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await session.ws_connect(p.url + "/" + query)
    assert info.value.status == (200 if "plain" in query else int(query.split("=")[1]))
    assert not p.pipeline.tunnels


async def test_refused_upgrade_closes_connection(upstreams: Upstreams,
                                                 proxy: StartProxy) -> None:
    """Bytes after a refused upgrade may be frames, not HTTP: the connection must end."""
    p, _, _ = await ws_proxy(upstreams, proxy)
    reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
    writer.write(handshake("/?refuse=403") + client_frame(1, b"not http"))
    status, headers = await read_head(reader)
    assert status == 403
    assert headers.get("connection", "").lower() == "close"
    body = await asyncio.wait_for(reader.read(), 5)  # then EOF
    assert body == b"refused by upstream"
    writer.close()


async def test_upgrade_on_plain_route_is_plain_http(upstreams: Upstreams, proxy: StartProxy,
                                                    session: aiohttp.ClientSession) -> None:
    p, _, state = await ws_proxy(upstreams, proxy)
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await session.ws_connect(p.url + "/plain/x")
    assert info.value.status == 200  # the hop-by-hop Upgrade was not forwarded
    assert not state.keys


async def test_non_upgrade_request_on_websocket_route(upstreams: Upstreams, proxy: StartProxy,
                                                      session: aiohttp.ClientSession) -> None:
    p, _, _ = await ws_proxy(upstreams, proxy)
    for _ in range(2):  # keep-alive works as on any route
        async with session.get(p.url + "/page?q=1") as r:
            assert r.status == 200
            assert await r.text() == "plain /page?q=1"
    assert not p.pipeline.tunnels


async def test_wrong_accept_from_upstream_is_502(upstreams: Upstreams, proxy: StartProxy,
                                                 session: aiohttp.ClientSession) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      conn: RawConn) -> None:
        await up.read_request(reader, conn)
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                     b"Connection: Upgrade\r\nSec-WebSocket-Accept: "
                     + accept_key(CLIENT_KEY) + b"\r\n\r\n")  # the client's, not ours
        await writer.drain()
        await reader.read()

    up: RawUpstream = await upstreams.raw(handler)
    route = {"name": "ws", "match": {"path_prefix": "/"}, "upstream": "backend",
             "websocket": True}
    p = await proxy([route], {"backend": up.url}, access_log={"enabled": False})
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await session.ws_connect(p.url + "/")
    assert info.value.status == 502
    (req,) = up.requests
    assert req.header("Sec-WebSocket-Key") != CLIENT_KEY.decode()


async def test_frames_sent_before_the_101_are_not_lost(upstreams: Upstreams,
                                                       proxy: StartProxy) -> None:
    p, _, state = await ws_proxy(upstreams, proxy)
    reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
    # The first frame in the same write as the handshake, the second while the upstream
    # still sits on its answer.
    writer.write(handshake("/?delay=0.3") + client_frame(1, b"early-1"))
    await asyncio.sleep(0.1)
    writer.write(client_frame(1, b"early-2") + client_frame(2, b"\x00" * 70000))
    status, _ = await read_head(reader)
    assert status == 101
    assert await read_frame(reader) == (1, b"early-1")
    assert await read_frame(reader) == (1, b"early-2")
    assert await read_frame(reader) == (2, b"\x00" * 70000)
    writer.write(client_frame(8, struct.pack("!H", 1000)))
    assert await read_frame(reader) == (8, struct.pack("!H", 1000))
    writer.close()
    await wait_for(lambda: state.closes == [1000], what="upstream handler to end")


async def test_upstream_frames_right_after_101(upstreams: Upstreams, proxy: StartProxy,
                                               session: aiohttp.ClientSession) -> None:
    p, _, _ = await ws_proxy(upstreams, proxy)
    async with session.ws_connect(p.url + "/?hello=1") as ws:
        assert (await receive(ws)).data == "hello"


# -- limits ---------------------------------------------------------------------------------------


async def test_max_message_size_from_client_closes_1009(
    upstreams: Upstreams, proxy: StartProxy, session: aiohttp.ClientSession
) -> None:
    p, _, state = await ws_proxy(upstreams, proxy, {"max_message_size": "1KiB"})
    async with session.ws_connect(p.url + "/") as ws:
        await ws.send_str("x" * 1024)  # at the limit: relayed
        assert len((await receive(ws)).data) == 1024
        await ws.send_str("y" * 1025)
        msg = await receive(ws)
        assert (msg.type, msg.data) == (WSMsgType.CLOSE, 1009)
    await wait_for(lambda: state.closes == [1009], what="upstream to see 1009")
    assert all("y" not in m for m in state.received)  # the oversized message never arrived
    await wait_for(lambda: not p.pipeline.tunnels, what="the relay to end")
    closes = p.pipeline.metrics.counters["gateway_websocket_closes_total"]
    assert closes == {("1009",): 1.0}


async def test_max_message_size_from_upstream_closes_1009(
    upstreams: Upstreams, proxy: StartProxy, session: aiohttp.ClientSession
) -> None:
    p, _, state = await ws_proxy(upstreams, proxy, {"max_message_size": "1KiB"})
    async with session.ws_connect(p.url + "/") as ws:
        await ws.send_str("big 5000")
        msg = await receive(ws)
        assert (msg.type, msg.data) == (WSMsgType.CLOSE, 1009)
    await wait_for(lambda: state.closes == [1009], what="upstream to see 1009")


async def test_fragmented_message_over_the_limit_closes_1009(
    upstreams: Upstreams, proxy: StartProxy
) -> None:
    p, _, _ = await ws_proxy(upstreams, proxy, {"max_message_size": "1KiB"})
    reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
    writer.write(handshake("/"))
    assert (await read_head(reader))[0] == 101
    writer.write(client_frame(1, b"a" * 600, fin=False))
    await asyncio.sleep(0.05)
    writer.write(client_frame(0, b"b" * 600))
    assert await read_frame(reader) == (8, struct.pack("!H", 1009))
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()


async def test_idle_timeout_closes_the_relay(upstreams: Upstreams, proxy: StartProxy,
                                             session: aiohttp.ClientSession) -> None:
    p, _, state = await ws_proxy(upstreams, proxy, {"idle_timeout": "0.6s"})
    loop = asyncio.get_running_loop()
    async with session.ws_connect(p.url + "/") as ws:
        for i in range(5):  # traffic keeps it open past the idle timeout
            await asyncio.sleep(0.3)
            await ws.send_str(f"tick {i}")
            assert (await receive(ws)).data == f"tick {i}"
        quiet = loop.time()
        msg = await receive(ws)
        waited = loop.time() - quiet
        assert (msg.type, msg.data) == (WSMsgType.CLOSE, 1001)
        assert 0.5 < waited < 2.0
    await wait_for(lambda: state.closes == [1001], what="upstream to see 1001")


async def test_backpressure_does_not_arm_the_upstream_read_timeout(
    upstreams: Upstreams, proxy: StartProxy, session: aiohttp.ClientSession
) -> None:
    """A relay is not an exchange: the pool's read_timeout must not end a quiet relay."""
    p, _, _ = await ws_proxy(upstreams, proxy, pool={"read_timeout": "0.2s"})
    async with session.ws_connect(p.url + "/") as ws:
        (tunnel,) = p.pipeline.tunnels
        tunnel.ds.pause_writing()  # the client's socket buffer filled up, then drained
        tunnel.ds.resume_writing()
        await asyncio.sleep(0.8)
        await ws.send_str("still here")
        assert (await receive(ws)).data == "still here"


async def test_large_messages_both_ways_under_flow_control(
    upstreams: Upstreams, proxy: StartProxy, session: aiohttp.ClientSession
) -> None:
    p, _, _ = await ws_proxy(upstreams, proxy)
    async with session.ws_connect(p.url + "/", max_msg_size=8 << 20) as ws:
        payloads = [os.urandom(1 << 20) for _ in range(8)]
        for data in payloads:  # all sent before any echo is read
            await ws.send_bytes(data)
        for data in payloads:
            msg = await receive(ws)
            assert msg.data == data


# -- drain ----------------------------------------------------------------------------------------


async def test_drain_on_reload_close_sends_1001_at_once(
    upstreams: Upstreams, proxy: StartProxy, session: aiohttp.ClientSession
) -> None:
    p, _, state = await ws_proxy(upstreams, proxy, {"on_reload": "close"},
                                 server={"drain_timeout": "5s"})
    loop = asyncio.get_running_loop()
    async with session.ws_connect(p.url + "/") as ws:
        await ws.send_str("before")
        await receive(ws)
        started = loop.time()
        drain = asyncio.create_task(p.worker.drain())
        msg = await receive(ws)
        assert (msg.type, msg.data) == (WSMsgType.CLOSE, 1001)
        assert loop.time() - started < 1.0
    await asyncio.wait_for(drain, 3)  # the worker's last connection ended: drain is over
    assert loop.time() - started < 2.0
    await wait_for(lambda: state.closes == [1001], what="upstream to see 1001")
    closes = p.pipeline.metrics.counters["gateway_websocket_closes_total"]
    assert closes == {("1001",): 1.0}


async def test_drain_on_reload_keep_waits_for_drain_timeout(
    upstreams: Upstreams, proxy: StartProxy, session: aiohttp.ClientSession
) -> None:
    p, _, state = await ws_proxy(upstreams, proxy, {"on_reload": "keep"},
                                 server={"drain_timeout": "1.5s"})
    loop = asyncio.get_running_loop()
    async with session.ws_connect(p.url + "/") as ws:
        started = loop.time()
        drain = asyncio.create_task(p.worker.drain())
        for i in range(3):
            await asyncio.sleep(0.3)
            await ws.send_str(f"during drain {i}")  # the relay goes on
            assert (await receive(ws)).data == f"during drain {i}"
        msg = await receive(ws)
        assert (msg.type, msg.data) == (WSMsgType.CLOSE, 1001)
        assert 1.4 < loop.time() - started < 3.0
    await asyncio.wait_for(drain, 3)
    await wait_for(lambda: state.closes == [1001], what="upstream to see 1001")


async def test_drain_keep_relay_ending_early_lets_worker_exit(
    upstreams: Upstreams, proxy: StartProxy, session: aiohttp.ClientSession
) -> None:
    p, _, _ = await ws_proxy(upstreams, proxy, server={"drain_timeout": "10s"})
    loop = asyncio.get_running_loop()
    ws = await session.ws_connect(p.url + "/")
    drain = asyncio.create_task(p.worker.drain())
    await asyncio.sleep(0.2)
    assert not drain.done()
    started = loop.time()
    await ws.close(code=1000)
    await asyncio.wait_for(drain, 3)
    assert loop.time() - started < 1.0


# -- raw helpers ----------------------------------------------------------------------------------


def handshake(path: str, extra: str = "") -> bytes:
    return (f"GET {path} HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {CLIENT_KEY.decode()}\r\n"
            f"Sec-WebSocket-Version: 13\r\n{extra}\r\n").encode()


def client_frame(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    """A masked frame, as a client sends it."""
    n = len(payload)
    head = bytes([(0x80 if fin else 0) | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 1 << 16:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", n)
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


async def read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    lines = raw.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One unmasked frame from the proxy (server → client)."""
    b0, b1 = await asyncio.wait_for(reader.readexactly(2), 5)
    assert not b1 & 0x80, "server frames are not masked"
    n = b1 & 0x7F
    if n == 126:
        n = struct.unpack("!H", await reader.readexactly(2))[0]
    elif n == 127:
        n = struct.unpack("!Q", await reader.readexactly(8))[0]
    return b0 & 0x0F, await asyncio.wait_for(reader.readexactly(n), 5)
