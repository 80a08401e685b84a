"""HTTP/2 to clients: h2c by prior knowledge and h2 by ALPN, every stream an exchange (routes,
chain, upstream, local answers), request and response bodies both ways with flow control, and
the rules of RFC 9113 §8.2.2 for connection-specific fields."""

from __future__ import annotations

import asyncio
import hashlib
import json
import ssl
import subprocess
from pathlib import Path

import trustme
from aiohttp import web

from proxyd.config.models import GatewayConfig
from proxyd.sockets import listen_socket
from proxyd.worker import Worker
from tests.functional._h2client import H2Client
from tests.functional._http import RawClient
from tests.functional.conftest import (
    CATCH_ALL,
    StartProxy,
    Upstreams,
    build_config,
    route,
    wait_for,
)


async def test_prior_knowledge_get_reaches_the_upstream_as_http11(
        proxy: StartProxy, upstreams: Upstreams) -> None:
    up = await upstreams.aiohttp()
    p = await proxy(CATCH_ALL, {"backend": up.url})
    client = await H2Client.open(p.port)
    try:
        answer = await client.get("/a/b?x=1", headers=[("x-test", "yes"), ("cookie", "a=1"),
                                                        ("cookie", "b=2")])
        assert answer.status == 200
        body = json.loads(answer.body)
        assert body["path"] == "/a/b?x=1"
        seen = up.seen[-1]
        assert seen.header("x-test") == "yes"
        assert seen.header("host") == "localhost"
        assert seen.header("cookie") == "a=1; b=2"  # split cookies joined (RFC 9113 §8.2.3)
        assert seen.header("x-forwarded-proto") == "http"
        # No connection-specific field in an HTTP/2 response.
        names = {name for name, _ in answer.headers}
        assert not names & {b"connection", b"keep-alive", b"transfer-encoding"}
        assert answer.header(b"content-length") == str(len(answer.body)).encode()
    finally:
        await client.close()


async def test_many_streams_at_once_each_get_their_own_answer(
        proxy: StartProxy, upstreams: Upstreams) -> None:
    up = await upstreams.aiohttp()
    p = await proxy(CATCH_ALL, {"backend": up.url})
    client = await H2Client.open(p.port)
    try:
        sids = {client.request(f"/n/{i}"): i for i in range(50)}
        for sid, i in sids.items():
            answer = await client.response(sid)
            assert answer.status == 200
            assert json.loads(answer.body)["path"] == f"/n/{i}"
    finally:
        await client.close()


async def test_request_body_with_and_without_length(proxy: StartProxy,
                                                     upstreams: Upstreams) -> None:
    up = await upstreams.aiohttp()
    p = await proxy(CATCH_ALL, {"backend": up.url})
    client = await H2Client.open(p.port)
    body = bytes(range(256)) * 1024  # 256 KiB: more than a stream's window
    try:
        sid = client.request("/upload", "POST", body=body,
                             headers=[("content-length", str(len(body)))])
        answer = await client.response(sid)
        assert answer.status == 200
        got = json.loads(answer.body)
        assert got["body_len"] == len(body)
        assert got["body_sha256"] == hashlib.sha256(body).hexdigest()
        sid = client.request("/upload", "POST", body=body)  # no length: chunked upstream
        answer = await client.response(sid)
        got = json.loads(answer.body)
        assert got["body_sha256"] == hashlib.sha256(body).hexdigest()
        assert up.seen[-1].header("transfer-encoding") == "chunked"
    finally:
        await client.close()


async def test_large_response_respects_the_client_window(proxy: StartProxy,
                                                         upstreams: Upstreams) -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB

    async def big(request: web.Request) -> web.Response:
        return web.Response(body=payload)

    up = await upstreams.aiohttp(big)
    p = await proxy(CATCH_ALL, {"backend": up.url})
    client = await H2Client.open(p.port)
    try:
        answer = await client.get("/big")
        assert answer.status == 200
        assert bytes(answer.body) == payload
    finally:
        await client.close()


async def test_local_answers_and_errors_are_http2(proxy: StartProxy,
                                                  upstreams: Upstreams) -> None:
    p = await proxy([route("hello", path="/hello", respond={"status": 200, "body": "hi"})])
    client = await H2Client.open(p.port)
    try:
        answer = await client.get("/hello")
        assert (answer.status, bytes(answer.body)) == (200, b"hi")
        missing = await client.get("/nowhere")
        assert missing.status == 404
        err = json.loads(missing.body)
        assert err["request_id"] == missing.header(b"x-request-id").decode()  # type: ignore[union-attr]
        head = await client.get("/hello", method="HEAD")
        assert head.status == 200 and not head.body
    finally:
        await client.close()


async def test_curl_prior_knowledge(proxy: StartProxy, upstreams: Upstreams) -> None:
    up = await upstreams.aiohttp()
    p = await proxy(CATCH_ALL, {"backend": up.url})
    out = await asyncio.to_thread(
        subprocess.run,
        ["curl", "-sS", "--http2-prior-knowledge", "-o", "/dev/null",
         "-w", "%{http_version} %{http_code}", f"{p.url}/curl"],
        capture_output=True, text=True, timeout=20)
    assert out.stdout == "2 200", out.stderr


async def test_tls_alpn_negotiates_h2_and_http11_still_works(
        proxy: StartProxy, upstreams: Upstreams, tmp_path: Path) -> None:
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    cert, key, ca_file = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    ca.cert_pem.write_to_path(str(ca_file))
    up = await upstreams.aiohttp()
    sock = listen_socket("127.0.0.1", 0, 128)
    port = sock.getsockname()[1]
    config = build_config(port, CATCH_ALL, {"backend": up.url}, access_log={"enabled": False})
    config["server"]["listen"] = [{"address": f"127.0.0.1:{port}",
                                   "tls": {"cert": str(cert), "key": str(key)}}]
    worker = Worker(GatewayConfig.model_validate(config), [sock])
    await worker.start()
    try:
        ctx = ssl.create_default_context()
        ca.configure_trust(ctx)
        ctx.set_alpn_protocols(["h2", "http/1.1"])
        client = await H2Client.open(port, ctx)
        try:
            ssl_object = client.writer.get_extra_info("ssl_object")
            assert ssl_object.selected_alpn_protocol() == "h2"
            answer = await client.get("/tls")
            assert answer.status == 200
            assert up.seen[-1].header("x-forwarded-proto") == "https"
        finally:
            await client.close()
        for flag, version in (("--http2", "2"), ("--http1.1", "1.1")):
            out = await asyncio.to_thread(
                subprocess.run,
                ["curl", "-sS", flag, "--cacert", str(ca_file), "-o", "/dev/null",
                 "-w", "%{http_version} %{http_code}", f"https://localhost:{port}/curl",
                 "--resolve", f"localhost:{port}:127.0.0.1"],
                capture_output=True, text=True, timeout=20)
            assert out.stdout == f"{version} 200", out.stderr
    finally:
        await worker.drain(1.0)


async def test_http2_off_on_a_listener(upstreams: Upstreams) -> None:
    """http2: false — the preface is not taken: it is refused as HTTP/1.1 would refuse it."""
    up = await upstreams.aiohttp()
    sock = listen_socket("127.0.0.1", 0, 128)
    port = sock.getsockname()[1]
    config = build_config(port, CATCH_ALL, {"backend": up.url}, access_log={"enabled": False})
    config["server"]["listen"] = [{"address": f"127.0.0.1:{port}", "http2": False}]
    worker = Worker(GatewayConfig.model_validate(config), [sock])
    await worker.start()
    try:
        async with await RawClient.connect(port) as c:
            await c.send(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            got = await c.read_to_eof()
        assert got.startswith(b"HTTP/1.1 400"), got[:80]
        assert up.seen == []
    finally:
        await worker.drain(1.0)


async def test_preface_split_across_reads(proxy: StartProxy, upstreams: Upstreams) -> None:
    up = await upstreams.aiohttp()
    p = await proxy(CATCH_ALL, {"backend": up.url})
    reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
    client = H2Client(reader, writer, hold=True)
    start = client.conn.data_to_send()
    writer.write(start[:5])
    # The server has read those five bytes, and waits for the rest of the preface.
    await wait_for(lambda: any(getattr(c, "read", None) == start[:5]
                               for c in p.pipeline.connections), what="the first read")
    writer.write(start[5:])
    try:
        answer = await client.get("/split")
        assert answer.status == 200
    finally:
        await client.close()


async def test_chain_and_access_log_on_a_stream(proxy: StartProxy, upstreams: Upstreams,
                                                tmp_path: Path) -> None:
    up = await upstreams.aiohttp()
    log = tmp_path / "access.log"
    p = await proxy(CATCH_ALL, {"backend": up.url},
                    middleware=[{"type": "security_headers"}, {"type": "trace_id"}],
                    access_log={"path": str(log), "fields": ["protocol"]})
    client = await H2Client.open(p.port)
    try:
        answer = await client.get("/chained")
        assert answer.status == 200
        assert answer.header(b"x-content-type-options") == b"nosniff"
        rid = answer.header(b"x-request-id")
        assert rid and up.seen[-1].header("x-request-id") == rid.decode()
    finally:
        await client.close()
    p.pipeline.access_log.flush()  # type: ignore[union-attr]
    await wait_for(lambda: log.exists() and b"HTTP/2.0" in log.read_bytes(), what="the log")
    line = json.loads(log.read_bytes().splitlines()[-1])
    assert line["protocol"] == "HTTP/2.0" and line["status"] == 200


async def test_body_over_the_limit_is_413_on_its_stream(proxy: StartProxy,
                                                        upstreams: Upstreams) -> None:
    up = await upstreams.aiohttp()
    p = await proxy(CATCH_ALL, {"backend": up.url}, limits={"max_body_size": "1KiB"})
    client = await H2Client.open(p.port)
    try:
        declared = await client.response(client.request(
            "/big", "POST", body=b"x" * 2048, headers=[("content-length", "2048")]))
        assert declared.status == 413
        streamed = await client.response(client.request("/big", "POST", body=b"x" * 4096))
        assert streamed.status == 413 or streamed.reset is not None
        ok = await client.get("/after")  # the connection goes on
        assert ok.status == 200
    finally:
        await client.close()


async def test_h2load(proxy: StartProxy, upstreams: Upstreams) -> None:
    up = await upstreams.aiohttp()
    p = await proxy(CATCH_ALL, {"backend": up.url}, access_log={"enabled": False})
    out = await asyncio.to_thread(
        subprocess.run, ["h2load", "-n", "400", "-c", "4", "-m", "10", f"{p.url}/load"],
        capture_output=True, text=True, timeout=60)
    assert "400 succeeded, 0 failed, 0 errored" in out.stdout, out.stdout
    assert "status codes: 400 2xx" in out.stdout, out.stdout
