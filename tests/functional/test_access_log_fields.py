"""What an access log line says beyond the request line: the client's User-Agent and Referer,
the protocol, the TLS version, the upstream address and tries; and the formats log tools read
(the Combined Log Format, through goaccess itself when it is installed; templates)."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import ssl
import subprocess
from pathlib import Path
from typing import Any

import pytest
import trustme

from proxyd.config.models import GatewayConfig
from proxyd.sockets import listen_socket
from proxyd.worker import Worker
from tests.functional._http import RawClient, get
from tests.functional.conftest import (
    CATCH_ALL,
    StartProxy,
    Upstreams,
    build_config,
    refused_url,
    route,
)

UA = "Mozilla/5.0 (X11; Linux x86_64) test/1.0"
REFERER = 'https://example.com/from?a="b"'


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def flushed(worker: Worker, path: Path) -> list[str]:
    assert worker.pipeline is not None and worker.pipeline.access_log is not None
    worker.pipeline.access_log.flush()
    return lines(path)


async def test_json_lines_carry_client_upstream_and_protocol_fields(
    upstreams: Upstreams, proxy: StartProxy, tmp_path: Path
) -> None:
    log = tmp_path / "access.log"
    live = await upstreams.aiohttp()
    dead = refused_url()
    p = await proxy([route("api", path_prefix="/")], {"backend": [dead, live.url]},
                    access_log={"path": str(log)})
    extra = f"User-Agent: {UA}\r\nReferer: {REFERER}\r\n"
    async with await RawClient.connect(p.port) as c:
        for _ in range(2):  # round robin: at least one of the two starts on the dead target
            assert (await c.request(get("/a", extra=extra))).status == 200
    async with await RawClient.connect(p.port) as c:
        await c.send(b"GET /b HTTP/1.0\r\nHost: test\r\n\r\n")
        assert (await c.response()).status == 200
    records = [json.loads(line) for line in flushed(p.worker, log)]
    assert len(records) == 3
    first, second, old = records
    live_addr = live.url.removeprefix("http://")
    for record in (first, second):
        assert record["user_agent"] == UA and record["referer"] == REFERER
        assert record["protocol"] == "HTTP/1.1" and record["tls_version"] is None
        assert record["upstream_addr"] == live_addr
    # Whichever target each started on, the one that began on the dead one took a second try.
    assert {first["tries"], second["tries"]} <= {1, 2} and 2 in {first["tries"], second["tries"]}
    assert old["protocol"] == "HTTP/1.0"
    assert old["user_agent"] is None and old["referer"] is None


async def test_requests_that_reach_no_upstream_have_no_address_and_no_tries(
    upstreams: Upstreams, proxy: StartProxy, tmp_path: Path
) -> None:
    log = tmp_path / "access.log"
    live = await upstreams.aiohttp()
    p = await proxy([route("api", path_prefix="/api")], {"backend": live.url},
                    access_log={"path": str(log)})
    async with await RawClient.connect(p.port) as c:
        assert (await c.request(get("/nowhere"))).status == 404
    (record,) = [json.loads(line) for line in flushed(p.worker, log)]
    assert record["upstream_addr"] is None and record["tries"] == 0


async def test_fields_can_be_left_out(
    upstreams: Upstreams, proxy: StartProxy, tmp_path: Path
) -> None:
    log = tmp_path / "access.log"
    live = await upstreams.aiohttp()
    p = await proxy(CATCH_ALL, {"backend": live.url},
                    access_log={"path": str(log), "fields": ["tries"]})
    async with await RawClient.connect(p.port) as c:
        assert (await c.request(get("/a", extra=f"User-Agent: {UA}\r\n"))).status == 200
    (record,) = [json.loads(line) for line in flushed(p.worker, log)]
    assert record["tries"] == 1
    assert not {"user_agent", "referer", "protocol", "upstream_addr", "tls_version"} & set(record)


async def test_tls_version_of_the_connection(upstreams: Upstreams, tmp_path: Path) -> None:
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    live = await upstreams.aiohttp()
    log = tmp_path / "access.log"
    sock = listen_socket("127.0.0.1", 0, 128)
    port = sock.getsockname()[1]
    config: dict[str, Any] = build_config(port, CATCH_ALL, {"backend": live.url},
                                          access_log={"path": str(log)})
    config["server"]["listen"] = [{"address": f"127.0.0.1:{port}", "tls": {
        "cert": str(cert), "key": str(key), "min_version": "1.3"}}]
    worker = Worker(GatewayConfig.model_validate(config), [sock])
    await worker.start()
    try:
        context = ssl.create_default_context()
        ca.configure_trust(context)
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
        async with RawClient(reader, writer) as c:
            assert (await c.request(get("/a"))).status == 200
        (record,) = [json.loads(line) for line in flushed(worker, log)]
    finally:
        await worker.drain(1.0)
    assert record["tls_version"] == "TLSv1.3"


# The Combined Log Format as Apache and nginx write it: nothing before, nothing after.
COMBINED = re.compile(
    r'^(?P<ip>\S+) - - \[(?P<time>\d{2}/\w{3}/\d{4}:\d{2}:\d{2}:\d{2} [+-]\d{4})\] '
    r'"(?P<method>[A-Z]+) (?P<target>\S+) (?P<protocol>HTTP/1\.[01])" (?P<status>\d{3}) '
    r'(?P<bytes>\d+) "(?P<referer>(?:[^"\\]|\\.)*)" "(?P<agent>(?:[^"\\]|\\.)*)"$'
)


async def combined_log(upstreams: Upstreams, proxy: StartProxy, log: Path) -> list[str]:
    live = await upstreams.aiohttp()
    p = await proxy(CATCH_ALL, {"backend": live.url},
                    access_log={"path": str(log), "format": "combined"})
    async with await RawClient.connect(p.port) as c:
        await c.request(get("/q?a=1&b=%22", extra=f"User-Agent: {UA}\r\nReferer: {REFERER}\r\n"))
        await c.request(get("/plain"))
        await c.request(get("/odd", extra="User-Agent: caf\xe9\r\n"))
    return flushed(p.worker, log)


async def test_combined_format_is_the_combined_log_format(
    upstreams: Upstreams, proxy: StartProxy, tmp_path: Path
) -> None:
    got = await combined_log(upstreams, proxy, tmp_path / "access.log")
    parsed = [COMBINED.match(line) for line in got]
    assert len(parsed) == 3 and all(parsed), got
    first, plain, odd = parsed
    assert first is not None and plain is not None and odd is not None
    assert first["target"] == "/q?a=1&b=%22" and first["protocol"] == "HTTP/1.1"
    assert first["agent"] == UA
    assert first["referer"] == REFERER.replace('"', '\\x22')  # escaped as nginx does
    assert plain["referer"] == "-" and plain["agent"] == "-"
    assert odd["agent"] == "caf\\xC3\\xA9"  # the UTF-8 bytes, each escaped


@pytest.mark.skipif(shutil.which("goaccess") is None,
                    reason="goaccess not installed (apt-get install goaccess)")
async def test_goaccess_reads_the_combined_format(
    upstreams: Upstreams, proxy: StartProxy, tmp_path: Path
) -> None:
    log = tmp_path / "access.log"
    assert len(await combined_log(upstreams, proxy, log)) == 3
    result = subprocess.run(
        ["goaccess", str(log), "--log-format=COMBINED", "--no-global-config", "-o", "json"],
        capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    general = json.loads(result.stdout)["general"]
    assert general["valid_requests"] == 3 and general["failed_requests"] == 0, general


async def test_template_format(
    upstreams: Upstreams, proxy: StartProxy, tmp_path: Path
) -> None:
    log = tmp_path / "access.log"
    live = await upstreams.aiohttp()
    template = ('$remote_addr "$request" $status ua=$http_user_agent fwd=$http_x_forwarded_for '
                'up=$upstream_addr tries=$upstream_tries id=$request_id ${route}x $$')
    p = await proxy(CATCH_ALL, {"backend": live.url},
                    access_log={"path": str(log), "format": "template", "template": template},
                    middleware=[{"type": "trace_id"}])
    async with await RawClient.connect(p.port) as c:
        resp = await c.request(get("/t?x=1", extra='User-Agent: a"b\r\n'))
    (line,) = flushed(p.worker, log)
    addr = live.url.removeprefix("http://")
    assert line == (f'127.0.0.1 "GET /t?x=1 HTTP/1.1" 200 ua=a\\x22b fwd=- up={addr} tries=1 '
                    f'id={resp.header("X-Request-ID")} allx $')


async def test_refused_before_any_try_is_not_an_upstream_time(
    upstreams: Upstreams, proxy: StartProxy, tmp_path: Path
) -> None:
    """A request refused at once (here: no target up; the circuit breaker and a full queue
    refuse the same way) never met the upstream: no upstream duration, in the histogram or the
    log, where it would pull the upstream's latency down exactly while it fails."""
    log = tmp_path / "access.log"
    live = await upstreams.aiohttp()
    p = await proxy(CATCH_ALL, {"backend": live.url}, access_log={"path": str(log)})
    async with await RawClient.connect(p.port) as c:
        assert (await c.request(get("/ok"))).status == 200
        p.pipeline.set_health({"backend": {live.url: False}})
        assert (await c.request(get("/refused"))).status == 503
    ok, refused = [json.loads(line) for line in flushed(p.worker, log)]
    assert ok["upstream_ms"] is not None and ok["tries"] == 1
    assert refused["upstream"] == "backend"  # which upstream refused it is still said
    assert refused["upstream_ms"] is None and refused["tries"] == 0
    assert refused["upstream_addr"] is None
    rows = p.pipeline.metrics.upstream_durations
    assert {k: int(sum(row[:-1])) for k, row in rows.items()} == {("backend",): 1}
    rejected = p.pipeline.metrics.counters["gateway_upstream_rejected_total"]
    assert rejected == {("backend", "unavailable"): 1.0}
