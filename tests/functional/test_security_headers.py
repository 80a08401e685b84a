"""security_headers on real connections: Strict-Transport-Security over TLS only.

RFC 6797 §7.2: an HSTS host must not send the field over plain HTTP. A client on https is one
whose connection proxyd terminated with TLS, or one a trusted proxy in front says came over
https (X-Forwarded-Proto); every other header is the same either way.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trustme

from proxyd.config.models import GatewayConfig
from proxyd.sockets import listen_socket
from proxyd.worker import Worker
from tests.functional._http import Message, RawClient, get
from tests.functional.conftest import CATCH_ALL, StartProxy, Upstreams, build_config

HSTS = "max-age=31536000; includeSubDomains"
CHAIN = [{"type": "security_headers"}]


@pytest.fixture
async def tls_worker(
    upstreams: Upstreams, tmp_path: Path
) -> AsyncIterator[Callable[..., Awaitable[tuple[int, ssl.SSLContext]]]]:
    """``await tls_worker(upstream_url)`` → (port, client context): one TLS listener."""
    workers: list[Worker] = []

    async def start(upstream_url: str, **kw: Any) -> tuple[int, ssl.SSLContext]:
        ca = trustme.CA()
        leaf = ca.issue_cert("127.0.0.1")
        cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
        cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        key.write_bytes(leaf.private_key_pem.bytes())
        sock = listen_socket("127.0.0.1", 0, 128)
        port = sock.getsockname()[1]
        config = build_config(port, CATCH_ALL, {"backend": upstream_url}, middleware=CHAIN,
                              access_log={"enabled": False}, **kw)
        config["server"]["listen"] = [{"address": f"127.0.0.1:{port}",
                                       "tls": {"cert": str(cert), "key": str(key)}}]
        try:
            worker = Worker(GatewayConfig.model_validate(config), [sock])
            await worker.start()
        except BaseException:
            sock.close()
            raise
        workers.append(worker)
        client = ssl.create_default_context()
        ca.configure_trust(client)
        return port, client

    try:
        yield start
    finally:
        for worker in workers:
            await worker.drain(1.0)


async def over_tls(port: int, context: ssl.SSLContext, request: bytes) -> Message:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
    async with RawClient(reader, writer) as c:
        return await c.request(request)


def others(resp: Message) -> dict[str, str | None]:
    """The headers that do not depend on the scheme."""
    return {name: resp.header(name) for name in
            ("X-Content-Type-Options", "X-Frame-Options", "Referrer-Policy")}


async def test_strict_transport_security_over_tls_and_not_over_plain_http(
    upstreams: Upstreams, proxy: StartProxy, tls_worker: Callable[..., Any]
) -> None:
    up = await upstreams.aiohttp()
    plain = await proxy(CATCH_ALL, {"backend": up.url}, middleware=CHAIN)
    port, context = await tls_worker(up.url)

    async with await RawClient.connect(plain.port) as c:
        over_http = await c.request(get("/page"))
    over_https = await over_tls(port, context, get("/page"))

    assert over_http.status == over_https.status == 200
    assert not over_http.has("Strict-Transport-Security")
    assert over_https.header_all("Strict-Transport-Security") == [HSTS]
    assert others(over_http) == others(over_https) == {
        "X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY",
        "Referrer-Policy": "strict-origin-when-cross-origin"}


async def test_x_forwarded_proto_https_counts_only_from_a_trusted_proxy(
    upstreams: Upstreams, proxy: StartProxy
) -> None:
    """TLS ended at a load balancer in front: its X-Forwarded-Proto says what the client used.
    From anyone else the field proves nothing."""
    up = await upstreams.aiohttp()
    trusting = await proxy(CATCH_ALL, {"backend": up.url}, middleware=CHAIN,
                           server={"trusted_proxies": ["127.0.0.0/8"]})
    untrusting = await proxy(CATCH_ALL, {"backend": up.url}, middleware=CHAIN)
    https = "X-Forwarded-Proto: https\r\n"
    async with await RawClient.connect(trusting.port) as c:
        assert (await c.request(get("/", extra=https))).header_all(
            "Strict-Transport-Security") == [HSTS]
        assert not (await c.request(get("/", extra="X-Forwarded-Proto: http\r\n"))).has(
            "Strict-Transport-Security")
        assert not (await c.request(get("/"))).has("Strict-Transport-Security")
    async with await RawClient.connect(untrusting.port) as c:
        assert not (await c.request(get("/", extra=https))).has("Strict-Transport-Security")
