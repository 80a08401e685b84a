"""TLS termination on a listener: HTTPS served with X-Forwarded-Proto, plain HTTP refused
cleanly, the handshake bounded by header_timeout, min_version, and renewed certificates
picked up by a reload (a broken one rejected).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme

from proxyd.config.models import GatewayConfig
from proxyd.sockets import listen_socket
from proxyd.worker import Worker
from tests.functional import _daemon
from tests.functional._daemon import Daemon, daemon_config, write_atomic
from tests.functional._http import RawClient, get
from tests.functional.conftest import CATCH_ALL, Upstreams, build_config, free_port

daemon = _daemon.daemon  # the fixture: real proxyd processes


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
    async with await RawClient.connect(port) as c:
        t0 = time.monotonic()
        assert await c.read_to_eof(timeout=3) == b""
        assert time.monotonic() - t0 >= 0.2


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
