"""Active health checks: run once per instance by the master, shown in /status, obeyed by every
worker (``proxyd run`` as a subprocess, two real origins)."""

from __future__ import annotations

import asyncio
import signal
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web

from tests.integration.conftest import Ports, StartProxyd, make_config, wait_until

INTERVAL = 0.2


@dataclass
class Origin:
    name: str
    port: int = 0
    healthy: bool = True
    checks: list[float] = field(default_factory=list)  # when /health was asked
    served: int = 0  # everything else
    runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


async def start_origin(name: str) -> Origin:
    origin = Origin(name)

    async def health(request: web.Request) -> web.Response:
        origin.checks.append(time.monotonic())
        return web.Response(status=200 if origin.healthy else 503, text=name)

    async def serve(request: web.Request) -> web.Response:
        origin.served += 1
        return web.Response(text=name)

    app = web.Application()
    app.router.add_get("/healthz", health)
    app.router.add_route("*", "/{tail:.*}", serve)
    origin.runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2)
    await origin.runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    origin.port = sock.getsockname()[1]
    await web.SockSite(origin.runner, sock, backlog=256).start()
    return origin


@pytest.fixture
async def origins() -> AsyncIterator[list[Origin]]:
    started = [await start_origin("a"), await start_origin("b")]
    try:
        yield started
    finally:
        for origin in started:
            assert origin.runner is not None
            await origin.runner.cleanup()


async def test_health_results_in_status_and_unhealthy_target_gets_no_traffic(
    origins: list[Origin], proxyd: StartProxyd
) -> None:
    a, b = origins
    ports = Ports()
    config = make_config(ports, a.url, workers=2)
    config["upstreams"] = {"origin": {
        "targets": [a.url, b.url],
        "health_check": {"path": "/healthz", "interval": f"{INTERVAL}s", "timeout": "1s",
                         "healthy_threshold": 2, "unhealthy_threshold": 2},
    }}
    p = await proxyd(config, ports=ports)

    async def target_states() -> dict[str, dict[str, object]] | None:
        st = await p.status()
        targets: dict[str, dict[str, object]] = st["upstreams"]["origin"]
        return targets if all(t["last_check"] for t in targets.values()) else None

    targets = await wait_until(target_states, 10, "first health results in /status")
    assert set(targets) == {a.url, b.url}
    for t in targets.values():
        assert t["healthy"] is True and t["checked"] is True and t["last_status"] == 200

    # Once per instance, not once per worker: two workers, yet one check per interval.
    await asyncio.sleep(1.0)
    t0 = time.monotonic()
    before = len(a.checks)
    await asyncio.sleep(1.0)
    rate = (len(a.checks) - before) / (time.monotonic() - t0)
    assert rate <= 1.5 / INTERVAL, f"{rate:.1f} checks/s: more than one checker?"

    async with aiohttp.ClientSession() as s:
        async def spread(n: int) -> set[str]:
            names = set()
            for _ in range(n):
                async with s.get(p.url + "/x") as r:
                    assert r.status == 200
                    names.add(await r.text())
            return names

        assert await spread(20) == {"a", "b"}

        b.healthy = False

        async def b_down() -> bool:
            st = await p.status()
            t = st["upstreams"]["origin"][b.url]
            return t["healthy"] is False and t["last_status"] == 503

        await wait_until(b_down, 10, "b unhealthy in /status")
        await asyncio.sleep(0.3)  # the health message reaches the workers
        served = b.served
        assert await spread(40) == {"a"}
        assert b.served == served, "an unhealthy target still got traffic"

        b.healthy = True

        async def b_up() -> bool:
            st = await p.status()
            return st["upstreams"]["origin"][b.url]["healthy"] is True

        await wait_until(b_up, 10, "b healthy again")
        await asyncio.sleep(0.3)
        assert await spread(20) == {"a", "b"}

    # A reload keeps checking (the new generation is told the current results at once).
    b.healthy = False
    await wait_until(b_down, 10, "b unhealthy again")
    p.signal(signal.SIGHUP)
    await p.wait_generation(2)
    await asyncio.sleep(0.3)
    async with aiohttp.ClientSession() as s:
        served = b.served
        for _ in range(20):
            async with s.get(p.url + "/x") as r:
                assert r.status == 200 and await r.text() == "a"
    assert b.served == served
