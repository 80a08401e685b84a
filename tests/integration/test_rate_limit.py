"""Rate limiting with a real ``redis-server`` and real ``proxyd run`` processes.

Two instances x two workers share one limit through Redis exactly; keys isolate clients; a
Redis that stops leaves traffic flowing under the local fallback (no 5xx) and the global
limit returns with Redis; the memory backend gives each worker its share.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.integration.conftest import (
    Origin,
    Ports,
    Proxyd,
    StartProxyd,
    free_port,
    make_config,
    wait_until,
)

REDIS_SERVER = shutil.which("redis-server")
pytestmark = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed")

LIMIT = 20  # rate 20/m with burst 20: one cell per 3 s, so a test run sees no refill to speak of
UNAVAILABLE = "redis rate limiting unavailable"


# -- a real redis-server --------------------------------------------------------------------------


@dataclass
class RedisServer:
    port: int
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        assert REDIS_SERVER is not None
        log = open(self.workdir / "redis.log", "ab")  # noqa: SIM115 - the child holds it
        try:
            self.proc = subprocess.Popen(
                [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1",
                 "--save", "", "--appendonly", "no", "--dir", str(self.workdir)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )
        finally:
            log.close()
        up: bool = await wait_until(self.ping, 10.0, f"redis-server on port {self.port}")
        assert up

    async def ping(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"redis-server exited with {self.proc.returncode}")
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            writer.write(b"PING\r\n")
            return await asyncio.wait_for(reader.readline(), 2.0) == b"+PONG\r\n"
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        os.kill(proc.pid, signal.SIGTERM)
        try:
            await asyncio.to_thread(proc.wait, 10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            await asyncio.to_thread(proc.wait, 10)


@pytest.fixture
async def redis_server(tmp_path: Path) -> AsyncIterator[RedisServer]:
    server = RedisServer(free_port(), tmp_path)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def redis_client(redis_server: RedisServer) -> AsyncIterator[Any]:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis_server.url)
    try:
        yield client
    finally:
        await client.aclose()


# -- proxyd with a rate_limit entry ---------------------------------------------------------------


def limited_config(ports: Ports, origin: Origin, redis: RedisServer | None, *,
                   workers: int = 2, **options: Any) -> dict[str, Any]:
    config = make_config(ports, origin.url, workers=workers)
    entry = {"type": "rate_limit", "rate": f"{LIMIT}/m", "burst": LIMIT,
             "key": "header:X-Client", **options}
    if redis is not None:
        # Generous for a busy test machine: a slow check must not look like a Redis outage.
        entry = {"backend": "redis", "redis_timeout": "250ms", **entry}
        config["redis"] = {"url": redis.url}
    config["middleware"] = [entry]
    return config


async def start_instances(proxyd: StartProxyd, origin: Origin, redis: RedisServer | None,
                          count: int = 2, **options: Any) -> list[Proxyd]:
    instances = []
    for n in range(count):
        ports = Ports()
        instances.append(await proxyd(limited_config(ports, origin, redis, **options),
                                      ports=ports, name=f"gateway{n}"))
    return instances


async def stop_instances(instances: Sequence[Proxyd]) -> None:
    """SIGTERM by pid, and wait: a graceful stop with Redis clients open must exit 0."""
    for p in instances:
        p.signal(signal.SIGTERM)
    for p in instances:
        assert await p.wait_exit(20) == 0, p.log()


@dataclass
class Answer:
    status: int
    headers: Any
    body: bytes


async def fire(urls: Sequence[str], n: int, client: str, concurrency: int = 8
               ) -> list[Answer]:
    """``n`` GETs spread over ``urls``, each on a new connection (so over the workers too)."""
    connector = aiohttp.TCPConnector(force_close=True, limit=0)
    async with aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=15)) as session:
        session._retry_connection = False  # a silent retry would be counted twice
        gate = asyncio.Semaphore(concurrency)

        async def one(i: int) -> Answer:
            async with gate, session.get(urls[i % len(urls)] + "/",
                                         headers={"X-Client": client}) as r:
                return Answer(r.status, r.headers, await r.read())

        return list(await asyncio.gather(*(one(i) for i in range(n))))


async def keep_alive(url: str, n: int, client: str) -> list[Answer]:
    """``n`` GETs in sequence on one keep-alive connection: one worker answers them all."""
    connector = aiohttp.TCPConnector(limit=1)
    answers = []
    async with aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=15)) as session:
        session._retry_connection = False
        for _ in range(n):
            async with session.get(url + "/", headers={"X-Client": client}) as r:
                answers.append(Answer(r.status, r.headers, await r.read()))
    return answers


def statuses(answers: Sequence[Answer]) -> Counter[int]:
    return Counter(a.status for a in answers)


WHOLE = f"{LIMIT};w=60;burst={LIMIT}"  # Redis enforces the configured limit itself


def share_policy(share: int) -> str:
    """What a worker enforcing 1/share of the limit announces: the same count over a window
    share times as long, the burst split."""
    return f"{LIMIT};w={60 * share};burst={LIMIT // share}"


def check_answers(answers: Sequence[Answer], policy: str = WHOLE) -> None:
    """Only 200 and 429; a 429 is complete (Retry-After, JSON body, the RateLimit headers),
    and RateLimit-Policy says what the limiter that answered enforces."""
    assert set(statuses(answers)) <= {200, 429}, statuses(answers)
    for a in answers:
        assert a.headers.get("RateLimit-Limit") == str(LIMIT)
        assert a.headers.get("RateLimit-Policy") == policy
        assert a.headers.get("RateLimit-Remaining", "").isdigit()
        assert a.headers.get("RateLimit-Reset", "").isdigit()
        if a.status == 200:
            assert a.body == b"hello from origin"
        else:
            assert int(a.headers["Retry-After"]) >= 1
            assert a.headers["RateLimit-Remaining"] == "0"
            body = json.loads(a.body)
            assert body["error"] == "rate limit exceeded" and body["request_id"]


# -- the tests ----------------------------------------------------------------------------------


async def test_lua_script_against_real_redis(redis_server: RedisServer,
                                             redis_client: Any) -> None:
    """The script itself: burst, refusal with retry-after, atomic limits, expiring keys."""
    from proxyd.middleware.rate_limit.gcra import Limit
    from proxyd.middleware.rate_limit.redis_store import RedisLimiter

    limiter = RedisLimiter(redis_server.url, [Limit(10, 1.0, 10), Limit(3, 60.0, 3)], 0.25)
    try:
        first = await limiter.check("k")
        assert [d.allowed for d in first] == [True, True]
        assert [d.remaining for d in first] == [9, 2]
        assert 19.9 < first[1].reset <= 20.0
        for _ in range(2):
            assert all(d.allowed for d in await limiter.check("k"))
        refused = await limiter.check("k")
        assert not any(d.allowed for d in refused)
        assert 19.0 < refused[1].retry_after <= 20.0
        assert refused[0].retry_after == 0.0
        # Keys share a hash tag and expire when their bucket is full again.
        keys = sorted(k.decode() for k in await redis_client.keys("proxyd:rl:*"))
        assert keys == ["proxyd:rl:{k}:0", "proxyd:rl:{k}:1"]
        assert 0 < await redis_client.pttl("proxyd:rl:{k}:0") <= 301
        assert 59_000 < await redis_client.pttl("proxyd:rl:{k}:1") <= 60_001
        # The refusal moved nothing: the per-second limit shows three requests, not four.
        tat_fast = int(await redis_client.get("proxyd:rl:{k}:0"))
        now_s, now_us = await redis_client.time()
        assert 200_000 < tat_fast - (now_s * 1_000_000 + now_us) <= 300_000
        # NOSCRIPT (after SCRIPT FLUSH, as after a Redis restart) is handled by reloading.
        await redis_client.script_flush()
        assert all(d.allowed for d in await limiter.check("other"))
    finally:
        await limiter.close()


async def test_two_instances_share_one_limit_exactly(
    origin: Origin, proxyd: StartProxyd, redis_server: RedisServer
) -> None:
    instances = await start_instances(proxyd, origin, redis_server)
    urls = [p.url for p in instances]
    answers = await fire(urls, 3 * LIMIT, "shared")
    check_answers(answers)
    allowed = statuses(answers)[200]
    assert abs(allowed - LIMIT) <= 1, statuses(answers)
    # All four workers answered from Redis: the fallback never kicked in.
    for p in instances:
        assert UNAVAILABLE not in p.log(500), p.log()
    await stop_instances(instances)


async def test_keys_isolate_clients(
    origin: Origin, proxyd: StartProxyd, redis_server: RedisServer
) -> None:
    instances = await start_instances(proxyd, origin, redis_server, rate="5/m", burst=5)
    urls = [p.url for p in instances]
    a, b = await asyncio.gather(fire(urls, 15, "client-a", 4), fire(urls, 15, "client-b", 4))
    assert statuses(a) == {200: 5, 429: 10}
    assert statuses(b) == {200: 5, 429: 10}
    c = await fire(urls, 3, "client-c")  # a and b spent theirs; c has its own
    assert statuses(c) == {200: 3}
    await stop_instances(instances)


async def recovered(instances: Sequence[Proxyd], redis_client: Any, rounds: list[int]) -> bool:
    """One round of fresh-key probes on new connections: True when Redis saw every one."""
    rounds.append(len(rounds))
    tag = f"probe{len(rounds)}"
    per_instance = 16  # a worker missed by all 16 connections to its instance: p ~ 2e-5
    clients = [f"{tag}-{i}" for i in range(per_instance * len(instances))]
    answers = await asyncio.gather(*(
        fire([instances[i % len(instances)].url], 1, client)
        for i, client in enumerate(clients)))
    assert all(a[0].status == 200 for a in answers), [a[0].status for a in answers]
    found = [await redis_client.exists(f"proxyd:rl:{{all|{client}}}:0") for client in clients]
    return all(found)


async def test_redis_outage_falls_back_locally_and_recovers(
    origin: Origin, proxyd: StartProxyd, redis_server: RedisServer, redis_client: Any
) -> None:
    instances = await start_instances(proxyd, origin, redis_server, instances_hint=2,
                                      on_backend_error="local")
    urls = [p.url for p in instances]
    before = await fire(urls, 2 * LIMIT, "before")
    check_answers(before)
    assert abs(statuses(before)[200] - LIMIT) <= 1, statuses(before)

    await redis_server.stop()
    # One keep-alive connection stays on one worker: its local share is
    # limit / (2 workers x instances_hint 2) = 5, not the global 20, and nothing fails.
    share = LIMIT // 4
    pinned = await keep_alive(urls[0], 3 * share, "outage-pinned")
    check_answers(pinned, share_policy(4))
    assert statuses(pinned) == {200: share, 429: 2 * share}
    # Spread over all four workers: each allows its share at most.
    spread = await fire(urls, 3 * LIMIT, "outage-spread")
    check_answers(spread, share_policy(4))
    assert share <= statuses(spread)[200] <= 4 * share, statuses(spread)

    await redis_server.start()  # same port, empty: the global limit starts afresh
    rounds: list[int] = []
    started = time.monotonic()
    # The breaker's cool-down doubles per failed probe (up to 30 s); the outage was short.
    back: bool = await wait_until(lambda: recovered(instances, redis_client, rounds), 45.0,
                                  "every worker back on Redis", interval=0.25)
    assert back
    print(f"recovered after {time.monotonic() - started:.1f}s, {len(rounds)} probe rounds")

    after = await fire(urls, 3 * LIMIT, "after")
    check_answers(after)
    assert abs(statuses(after)[200] - LIMIT) <= 1, statuses(after)

    # One warning when a worker's breaker trips and one when it recovers, not one a request:
    # after Redis is back, stale pooled connections must not trip it again.
    for p in instances:
        log = p.log(2000)
        workers = {w["pid"] for w in (await p.status())["workers"]}
        for pid in workers:
            trips = log.count(f"proxyd[{pid}] WARNING {UNAVAILABLE}")
            recoveries = log.count(f"proxyd[{pid}] WARNING redis rate limiting recovered")
            assert trips == recoveries == 1, log
    await stop_instances(instances)


async def test_memory_backend_gives_each_worker_its_share(
    origin: Origin, proxyd: StartProxyd
) -> None:
    (p,) = await start_instances(proxyd, origin, None, count=1)
    share = LIMIT // 2
    pinned = await keep_alive(p.url, 3 * share, "pinned")
    check_answers(pinned, share_policy(2))
    assert statuses(pinned) == {200: share, 429: 2 * share}
    spread = await fire([p.url], 3 * LIMIT, "spread")
    check_answers(spread, share_policy(2))
    # Both workers together: at most the configured limit, at least one worker's share.
    assert share <= statuses(spread)[200] <= LIMIT, statuses(spread)
    await stop_instances([p])
