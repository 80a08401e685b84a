"""DELETE /cache on a running proxyd with two workers: the answer counts the entries removed,
with the memory backend (one store per worker) and with Redis (one store shared); and an
unsafe request invalidates in every worker's memory store, not only in the one it reached."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import web

from tests.integration.conftest import (
    Origin,
    Ports,
    Proxyd,
    StartProxyd,
    live_workers,
    make_config,
    wait_until,
)
from tests.redis_server import RedisServer, redis_server  # noqa: F401


def cached_config(ports: Ports, origin: Origin, cache: dict[str, Any] | None = None
                  ) -> dict[str, Any]:
    config = make_config(ports, origin.url, workers=2)
    config["middleware"] = [{"type": "cache"}]
    config["routes"][1]["cache"] = {"ttl": "60s"}  # the origin sends no freshness of its own
    config["cache"] = cache or {}
    return config


async def misses(p: Proxyd, query: str, n: int = 40) -> int:
    """GET / n times on new connections (each may reach either worker); the misses, which
    are the entries stored."""
    count = 0
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as s:
        for _ in range(n):
            async with s.get(f"{p.url}/{query}") as r:
                assert r.status == 200
                count += r.headers["X-Cache"] == "MISS"
    return count


async def purge(p: Proxyd, **query: str) -> dict[str, Any]:
    async with p.admin_session.delete(f"{p.admin_url}/cache", params=query) as r:
        assert r.status == 200, await r.text()
        body: dict[str, Any] = await r.json()
        return body


async def test_purge_counts_every_workers_entries(origin: Origin, proxyd: StartProxyd) -> None:
    ports = Ports()
    p = await proxyd(cached_config(ports, origin), ports=ports)
    key = f"http://127.0.0.1:{ports.traffic}/"
    stored = await misses(p, "")
    assert 1 <= stored <= 2  # one entry per worker that served it
    body = await purge(p, key=key)
    assert body == {"purged": stored, "workers": 2, "answered": 2, "deferred": False,
                    "key": key, "prefix": None}
    assert (await purge(p, key=key))["purged"] == 0  # nothing left: nothing removed
    stored = await misses(p, "?a=1") + await misses(p, "?a=2")
    assert (await purge(p, prefix=key + "?a="))["purged"] == stored
    assert (await purge(p, key=key + "nothing"))["purged"] == 0


@pytest.mark.usefixtures("redis_server")
async def test_purge_counts_what_redis_removed(origin: Origin, proxyd: StartProxyd,
                                               redis_server: RedisServer,  # noqa: F811
                                               ) -> None:
    ports = Ports()
    config = cached_config(ports, origin, {"backend": "redis"})
    config["redis"] = {"url": redis_server.url}
    p = await proxyd(config, ports=ports)
    key = f"http://127.0.0.1:{ports.traffic}/"
    client = aioredis.from_url(redis_server.url)

    async def in_redis(n: int) -> bool | None:
        # The workers write to Redis in the background, after answering.
        return True if len(await client.keys(b"proxyd:cache:*")) == n else None

    try:
        await misses(p, "")
        await misses(p, "?a=1")
        await wait_until(lambda: in_redis(2), 5.0, "two entries in Redis")
        body = await purge(p, prefix=key)
        assert (body["purged"], body["workers"], body["answered"]) == (2, 2, 2)
        assert (await purge(p, prefix=key))["purged"] == 0
        await misses(p, "")
        await wait_until(lambda: in_redis(1), 5.0, "the entry in Redis")
        assert (await purge(p, key=key))["purged"] == 1
        redis_server.stop()  # unreachable: the purge waits to be replayed, and says so
        body = await purge(p, key=key)
        assert (body["purged"], body["deferred"]) == (0, True)
    finally:
        await client.aclose()



@pytest.fixture
async def writable() -> AsyncIterator[Origin]:
    """An origin whose /item is fresh for a minute and takes a POST (201)."""
    async def item(request: web.Request) -> web.Response:
        if request.method == "POST":
            return web.Response(status=201)
        return web.Response(text="item", headers={"Cache-Control": "max-age=60"})

    app = web.Application()
    app.router.add_route("*", "/item", item)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    await web.SockSite(runner, sock).start()
    try:
        yield Origin(sock.getsockname()[1], runner)
    finally:
        await runner.cleanup()


async def test_an_unsafe_request_invalidates_in_every_workers_store(
        writable: Origin, proxyd: StartProxyd) -> None:
    ports = Ports()
    p = await proxyd(cached_config(ports, writable), ports=ports)

    async def entries() -> list[int]:
        return [w["cache"].get("entries", 0) for w in live_workers(await p.status())]

    async def both_hold_it() -> bool | None:
        await misses(p, "item", n=10)
        return True if await entries() == [1, 1] else None

    # Connections are spread over the two workers: both store /item (their stats say so).
    await wait_until(both_hold_it, 15.0, "the entry in each worker")
    async with aiohttp.ClientSession() as s, s.post(f"{p.url}/item", data=b"x") as r:
        assert r.status == 201
    # One worker answered the POST; the other dropped its copy too, through the master.
    await wait_until(lambda: _none_left(entries), 5.0, "every worker's copy invalidated")


async def _none_left(entries: Callable[[], Awaitable[list[int]]]) -> bool | None:
    return True if await entries() == [0, 0] else None
