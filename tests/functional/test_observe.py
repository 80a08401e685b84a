"""Observation end to end: one access-log line and one metrics count per answered request."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from pathlib import Path
from typing import Any

from aiohttp import web

from tests.functional._http import Message, RawClient, _read_head, get
from tests.functional.conftest import (
    Proxy,
    StartProxy,
    Upstreams,
    free_port,
    refused_url,
    route,
    wait_for,
)

TEXT = b"observed body\n" * 100
PART = b"p" * 5000


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


async def observed_proxy(upstreams: Upstreams, proxy: StartProxy, log: Path,
                         **access_log: Any) -> tuple[Proxy, asyncio.Event]:
    release = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        if request.path != "/api/slow":
            await request.read()
            return web.Response(body=TEXT, content_type="text/plain")
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        await resp.prepare(request)  # chunked, so etag does not buffer it
        await resp.write(PART)
        async with asyncio.timeout(5):
            await release.wait()
        with contextlib.suppress(ConnectionError):
            await resp.write(PART)
        return resp

    up = await upstreams.aiohttp(handler)
    routes = [
        route("api", path_prefix="/api"),
        route("dead", "dead", path_prefix="/dead"),
        route("upload", path_prefix="/upload",
              middleware={"validation": {"max_body_size": 1000}}),
    ]
    p = await proxy(
        routes, {"backend": up.url, "dead": refused_url()},
        middleware=[{"type": "trace_id"}, {"type": "validation"}, {"type": "etag"}],
        access_log={"path": str(log), **access_log},
    )
    return p, release


async def test_access_log_and_metrics_one_record_per_request(
    upstreams: Upstreams, proxy: StartProxy, tmp_path: Path
) -> None:
    log = tmp_path / "access.log"
    p, release = await observed_proxy(upstreams, proxy, log)
    seen: list[tuple[Message, dict[str, Any]]] = []  # (what the client got, expected record)

    async with await RawClient.connect(p.port) as c:
        ok = await c.request(get("/api/doc?x=1"))
        seen.append((ok, {"status": 200, "bytes_out": len(TEXT), "route": "api",
                          "upstream": "backend", "path": "/api/doc", "query": "x=1"}))
        etag = ok.header("ETag")
        assert etag is not None
        cached = await c.request(get("/api/doc", extra=f"If-None-Match: {etag}\r\n"))
        assert cached.status == 304
        seen.append((cached, {"status": 304, "bytes_out": 0, "route": "api",
                              "upstream": "backend"}))
        missing = await c.request(get("/nowhere"))
        seen.append((missing, {"status": 404, "bytes_out": len(missing.body), "route": "none",
                               "upstream": ""}))
        refused = await c.request(get("/dead/x"))
        assert refused.status == 502
        seen.append((refused, {"status": 502, "bytes_out": len(refused.body), "route": "dead",
                               "upstream": "dead"}))

    # A client that leaves mid-response: 499, with the bytes it was sent.
    c = await RawClient.connect(p.port)
    await c.send(get("/api/slow"))
    async with asyncio.timeout(5):
        start, headers, _ = await _read_head(c.reader)
        got = 0
        while got < len(PART):
            size = int((await c.reader.readuntil(b"\r\n")).strip(), 16)
            got += len(await c.reader.readexactly(size + 2)) - 2
    await c.close()
    # In the worker the status is kept as an int (labels are made at snapshot).
    await wait_for(lambda: ("api", "GET", 499) in p.pipeline.metrics.requests, what="499")
    release.set()
    seen.append((Message(start, headers), {"status": 499, "bytes_out": len(PART),
                                           "route": "api", "upstream": "backend"}))

    # A chunked upload that grows over the route's limit while it streams: 413.
    async with await RawClient.connect(p.port) as c:
        await c.send(get("/upload", method="POST", extra="Transfer-Encoding: chunked\r\n")
                     + b"258\r\n" + b"a" * 600 + b"\r\n" + b"258\r\n" + b"b" * 600 + b"\r\n")
        too_big = await c.response()
        assert too_big.status == 413
        seen.append((too_big, {"status": 413, "bytes_out": len(too_big.body),
                               "route": "upload", "method": "POST", "upstream": "backend"}))

    assert p.pipeline.access_log is not None
    p.pipeline.access_log.flush()
    records = [json.loads(line) for line in lines(log)]
    assert len(records) == len(seen), records
    for record, (resp, want) in zip(records, seen, strict=True):
        assert record["request_id"] == resp.header("X-Request-ID"), (record, resp.start)
        for key, value in {"method": "GET", **want}.items():
            assert record[key] == value, (key, record, want)
        assert record["client_ip"] == "127.0.0.1" and record["host"] == "test"
        assert record["duration_ms"] >= 0
        assert (record["upstream_ms"] is None) == (want["upstream"] == "")
    assert len({r["request_id"] for r in records}) == len(records)

    snapshot = p.pipeline.metrics.snapshot({})["counters"]["gateway_requests_total"]
    requests = {tuple(k): int(v) for k, v in snapshot}
    assert requests == {
        ("api", "GET", "200"): 1, ("api", "GET", "304"): 1, ("none", "GET", "404"): 1,
        ("dead", "GET", "502"): 1, ("api", "GET", "499"): 1, ("upload", "POST", "413"): 1,
    }
    durations = p.pipeline.metrics.durations
    assert {k: int(row[-2] + sum(row[:-2])) for k, row in durations.items()} == {
        ("api", "GET"): 3, ("none", "GET"): 1, ("dead", "GET"): 1, ("upload", "POST"): 1,
    }
    # The upstream histogram: one observation per request that got an upstream time.
    timed: dict[str, int] = {}
    for record in records:
        if record["upstream_ms"] is not None:
            timed[record["upstream"]] = timed.get(record["upstream"], 0) + 1
    assert timed
    upstream_rows = p.pipeline.metrics.upstream_durations
    assert {k[0]: int(sum(row[:-1])) for k, row in upstream_rows.items()} == timed


async def test_metrics_disabled_and_no_access_log_record_nothing_per_request(
    upstreams: Upstreams, proxy: StartProxy
) -> None:
    """metrics.enabled: false counts nothing in the worker (not even the upstream
    histogram); with the access log off too, a request is not observed at all."""
    async def fine(request: web.Request) -> web.Response:
        return web.Response(text="fine")

    up = await upstreams.aiohttp(fine)
    p = await proxy([route("api", path_prefix="/")], {"backend": up.url},
                    access_log={"enabled": False}, metrics={"enabled": False})
    async with await RawClient.connect(p.port) as c:
        for _ in range(3):
            assert (await c.request(get("/x"))).status == 200
    metrics = p.pipeline.metrics
    assert not p.pipeline.observer.observing
    assert not metrics.requests and not metrics.durations and not metrics.upstream_durations


async def test_access_log_ids_on_routes_without_middleware(
    upstreams: Upstreams, proxy: StartProxy, tmp_path: Path
) -> None:
    """Without trace_id a proxied 200 carries no id: the log makes one from the worker's
    counter at its flush. An error's logged id is the one its X-Request-ID showed."""
    log = tmp_path / "access.log"
    up = await upstreams.aiohttp()
    p = await proxy(
        [route("api", path_prefix="/api"), route("dead", "dead", path_prefix="/dead")],
        {"backend": up.url, "dead": refused_url()},
        access_log={"path": str(log)},
    )
    async with await RawClient.connect(p.port) as c:
        answers = [await c.request(get(path))
                   for path in ("/api/a", "/nowhere", "/api/b", "/dead/x", "/api/c")]
    assert [a.status for a in answers] == [200, 404, 200, 502, 200]
    assert answers[0].header("X-Request-ID") is None
    assert p.pipeline.access_log is not None
    p.pipeline.access_log.flush()
    ids = [json.loads(line)["request_id"] for line in lines(log)]
    assert len(ids) == 5 and len(set(ids)) == 5, ids
    assert all(re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]+", i) for i in ids), ids
    assert ids[1] == answers[1].header("X-Request-ID")
    assert ids[3] == answers[3].header("X-Request-ID")


async def test_access_log_flushes_on_its_own(
    upstreams: Upstreams, proxy: StartProxy, tmp_path: Path
) -> None:
    log = tmp_path / "access.log"
    p, _ = await observed_proxy(upstreams, proxy, log)
    async with await RawClient.connect(p.port) as c:
        resp = await c.request(get("/api/a"))
    # No explicit flush: the batch timer writes it (about 0.1 s).
    await wait_for(lambda: len(lines(log)) == 1, timeout=2.0, what="access log line")
    assert json.loads(lines(log)[0])["request_id"] == resp.header("X-Request-ID")


COMBINED = re.compile(
    r'^(?P<ip>\S+) (?P<ident>\S+) (?P<user>\S+) \[(?P<time>\d{2}/\w{3}/\d{4}:\d{2}:\d{2}:\d{2} '
    r'[+-]\d{4})\] "(?P<method>[A-Z]+) (?P<target>\S+) HTTP/1\.[01]" (?P<status>\d{3}) '
    r'(?P<bytes>\d+|-) "(?P<referer>[^"]*)" "(?P<agent>[^"]*)"$'
)


async def test_combined_format_parses(
    upstreams: Upstreams, proxy: StartProxy, tmp_path: Path
) -> None:
    log = tmp_path / "access.log"
    p, _ = await observed_proxy(upstreams, proxy, log, format="combined")
    async with await RawClient.connect(p.port) as c:
        ok = await c.request(get("/api/q?a=1&b=%22"))
        missing = await c.request(get("/nowhere"))
    assert p.pipeline.access_log is not None
    p.pipeline.access_log.flush()
    parsed = [COMBINED.match(line) for line in lines(log)]
    assert len(parsed) == 2 and all(parsed), lines(log)
    for m, resp in zip(parsed, (ok, missing), strict=True):
        assert m is not None
        assert m["ip"] == "127.0.0.1" and m["status"] == str(resp.status)
        assert m["bytes"] == str(len(resp.body))
    assert parsed[0] is not None and parsed[0]["target"] == "/api/q?a=1&b=%22"


async def test_each_redis_user_has_its_own_gauge(
    upstreams: Upstreams, proxy: StartProxy
) -> None:
    """The cache's Redis unreachable: its gauge says so, the rate limiter's does not."""
    up = await upstreams.aiohttp()
    p = await proxy([route("api", path_prefix="/")], {"backend": up.url},
                    middleware=[{"type": "cache"}], cache={"backend": "redis"},
                    redis={"url": f"redis://127.0.0.1:{free_port()}/0"})
    gauges = p.pipeline.gauges
    assert gauges()["gateway_cache_redis_unavailable"] == {(): 0.0}
    async with await RawClient.connect(p.port) as c:
        for i in range(5):  # misses, each one a failed lookup: the breaker opens
            assert (await c.request(get(f"/a{i}"))).status == 200
    await wait_for(lambda: gauges()["gateway_cache_redis_unavailable"] == {(): 1.0},
                   what="the cache's gauge")
    assert gauges()["gateway_rate_limit_redis_fallback_active"] == {(): 0.0}
