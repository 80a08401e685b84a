"""PROXY protocol listeners: the client address a balancer sends is the one proxyd uses (the
X-Forwarded-For it sends, the access log); a balancer's connection without a valid header is
closed, and a header from a peer not allowed to send one is refused. Raw sockets, and a real
HAProxy with ``send-proxy-v2``."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from proxyd.proxy.proxy_protocol import header_v1, header_v2
from tests.functional._http import RawClient, get
from tests.functional.conftest import CATCH_ALL, Proxy, StartProxy, Upstreams, free_port


def listener(**proxy: Any) -> dict[str, Any]:
    # The fixture hands the worker its socket; the address here only has to parse.
    return {"listen": [{"address": "127.0.0.1:1", "proxy_protocol": True, **proxy}]}


async def start(upstreams: Upstreams, proxy: StartProxy, **kw: Any) -> tuple[Proxy, Any]:
    up = await upstreams.aiohttp()
    return await proxy(CATCH_ALL, {"backend": up.url}, server=listener(**kw)), up


@pytest.mark.parametrize("make", [header_v1, header_v2], ids=["v1", "v2"])
async def test_the_header_gives_the_client_address(upstreams: Upstreams, proxy: StartProxy,
                                                   make: Any) -> None:
    p, up = await start(upstreams, proxy, proxy_protocol_from=["127.0.0.0/8"])
    async with await RawClient.connect(p.port) as c:
        # Header and request in one write, then a second request on the same connection.
        await c.send(make("203.0.113.9", 40000, "127.0.0.1", p.port) + get("/one"))
        assert (await c.response()).status == 200
        assert (await c.request(get("/two"))).status == 200
    assert [s.header("X-Forwarded-For") for s in up.seen] == ["203.0.113.9"] * 2


async def test_header_split_over_reads(upstreams: Upstreams, proxy: StartProxy) -> None:
    p, up = await start(upstreams, proxy)
    header = header_v2("2001:db8::9", 40000, "2001:db8::1", 443)
    async with await RawClient.connect(p.port) as c:
        for i in range(0, len(header), 5):
            await c.send(header[i:i + 5])
            await asyncio.sleep(0.01)  # separate reads, the way a slow balancer sends
        assert (await c.request(get("/"))).status == 200
    assert up.seen[0].header("X-Forwarded-For") == "2001:db8::9"


@pytest.mark.parametrize("data", [get("/"), b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n\r\n"],
                         ids=["missing", "malformed"])
async def test_a_required_header_missing_or_malformed_closes(
        upstreams: Upstreams, proxy: StartProxy, data: bytes) -> None:
    p, up = await start(upstreams, proxy, proxy_protocol_from=["127.0.0.1/32"])
    async with await RawClient.connect(p.port) as c:
        await c.send(data)
        with contextlib.suppress(ConnectionResetError):
            assert await c.read_to_eof() == b""
    assert up.seen == []
    limits = dict((k[0], v) for k, v in
                  p.pipeline.metrics.snapshot({})["counters"]["gateway_client_limits_total"])
    assert limits["proxy_protocol"] == 1


async def test_a_header_from_a_peer_not_allowed_to_send_one_is_refused(
        upstreams: Upstreams, proxy: StartProxy) -> None:
    p, up = await start(upstreams, proxy, proxy_protocol_from=["10.0.0.0/8"])
    async with await RawClient.connect(p.port) as c:
        await c.send(header_v1("203.0.113.9", 1, "127.0.0.1", 2) + get("/"))
        with contextlib.suppress(ConnectionResetError):
            assert await c.read_to_eof() == b""
    async with await RawClient.connect(p.port) as c:  # plain HTTP from it is served
        assert (await c.request(get("/"))).status == 200
    assert [s.header("X-Forwarded-For") for s in up.seen] == ["127.0.0.1"]


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy is not installed")
async def test_haproxy_send_proxy_v2(upstreams: Upstreams, proxy: StartProxy,
                                     tmp_path: Path) -> None:
    p, up = await start(upstreams, proxy, proxy_protocol_from=["127.0.0.1/32"])
    front = free_port()
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(f"""
defaults
    mode tcp
    timeout connect 2s
    timeout client 10s
    timeout server 10s
frontend front
    bind 127.0.0.1:{front}
    default_backend proxyd
backend proxyd
    server p 127.0.0.1:{p.port} send-proxy-v2
""")
    haproxy = subprocess.Popen(["haproxy", "-db", "-f", str(cfg)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while True:  # until haproxy listens
            try:
                # From 127.0.0.2: the address HAProxy passes on differs from its own.
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1", front, local_addr=("127.0.0.2", 0))
                break
            except OSError:
                if loop.time() > deadline or haproxy.poll() is not None:
                    raise
                await asyncio.sleep(0.05)
        c = RawClient(reader, writer)
        async with c:
            assert (await c.request(get("/"))).status == 200
    finally:
        haproxy.terminate()
        haproxy.wait(5)
    assert up.seen[0].header("X-Forwarded-For") == "127.0.0.2"


@pytest.mark.parametrize("version", ["v1", "v2"])
async def test_sent_to_an_upstream_ahead_of_each_connection(
        upstreams: Upstreams, proxy: StartProxy, version: str) -> None:
    from proxyd.proxy.proxy_protocol import parse
    from tests.functional._http import RawConn, read_message

    got: list[tuple[str | None, str]] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      conn: RawConn) -> None:
        data = b""
        while (parsed := parse(data)) is None:
            data += await reader.read(1)
        address, length = parsed
        assert length == len(data)
        while True:
            try:
                msg = await read_message(reader, is_response=False)
            except asyncio.IncompleteReadError:
                return
            got.append((address, msg.target))
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    up = await upstreams.raw(handler)
    p = await proxy(CATCH_ALL, {"backend": {"targets": [up.url], "proxy_protocol": version}},
                    server=listener(proxy_protocol_from=["127.0.0.1/32"]))
    async with await RawClient.connect(p.port) as c:
        await c.send(header_v1("198.51.100.4", 40000, "127.0.0.1", p.port))
        assert (await c.request(get("/a"))).status == 200
        assert (await c.request(get("/b"))).status == 200
    # Each exchange had a connection of its own, announced with the client's address.
    assert got == [("198.51.100.4", "/a"), ("198.51.100.4", "/b")]
    assert len(up.conns) == 2


def tls_request(port: int, ca: Any, preface: bytes, source: str = "127.0.0.1") -> bytes:
    """A PROXY header in clear, then TLS on the same connection, then one request."""
    import socket
    import ssl

    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    with socket.create_connection(("127.0.0.1", port), timeout=10,
                                  source_address=(source, 0)) as raw:
        raw.sendall(preface)
        with ctx.wrap_socket(raw, server_hostname="localhost",
                             do_handshake_on_connect=False) as tls:
            tls.do_handshake()
            tls.sendall(get("/tls", extra="Connection: close\r\n"))
            answer = b""
            while chunk := tls.recv(65536):
                answer += chunk
    return answer


@pytest.mark.parametrize("make", [header_v1, header_v2], ids=["v1", "v2"])
async def test_on_a_tls_listener_the_header_precedes_the_handshake(
        upstreams: Upstreams, proxy: StartProxy, tmp_path: Path, make: Any) -> None:
    import trustme

    ca = trustme.CA()
    leaf = ca.issue_cert("localhost")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    up = await upstreams.aiohttp()
    tls = {"cert": str(cert), "key": str(key)}
    p = await proxy(CATCH_ALL, {"backend": up.url}, server={"listen": [
        {"address": "127.0.0.1:1", "proxy_protocol": True,
         "proxy_protocol_from": ["127.0.0.1/32"], "tls": tls}]})
    header = make("203.0.113.77", 40000, "127.0.0.1", p.port)
    answer = await asyncio.to_thread(tls_request, p.port, ca, header)
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert up.seen[-1].header("X-Forwarded-For") == "203.0.113.77"
    assert up.seen[-1].header("X-Forwarded-Proto") == "https"
    # Without its header, the balancer's connection is closed before any TLS; so is a
    # header from a peer not allowed to send one (which may speak TLS directly).
    hello = b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + b"\x00" * 32
    assert await asyncio.to_thread(raw_answer, p.port, hello, "127.0.0.1") == b""
    assert await asyncio.to_thread(raw_answer, p.port, header, "127.0.0.2") == b""
    answer = await asyncio.to_thread(tls_request, p.port, ca, b"", "127.0.0.2")
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert up.seen[-1].header("X-Forwarded-For") == "127.0.0.2"


def raw_answer(port: int, data: bytes, source: str) -> bytes:
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=10,
                                  source_address=(source, 0)) as raw:
        raw.sendall(data)
        got = b""
        try:
            while chunk := raw.recv(65536):
                got += chunk
        except ConnectionResetError:
            pass
        return got
