"""Cost of one Redis rate-limit check in the client (not a test): a microbenchmark.

    python tests/load/redis_limiter_bench.py [--checks 20000] [--rounds 5] [--concurrency 64]

Pin it (``taskset -c 0 python ...``: redis-server inherits the CPU) for figures that hold
still on a shared machine; docs/performance.md has the runs and the cachegrind recipe.

Starts a ``redis-server`` on a free port and, on uvloop, runs ``--checks`` GCRA checks per
round, two ways: one at a time (each waits for its reply: the wall time is mostly the round
trip) and ``--concurrency`` at a time (the way a loaded worker asks: checks share the
connection's writes and reads, so the client's own CPU per check is what limits). For each it
reports µs of wall time and µs of this process's CPU per check (Redis's CPU is not counted),
the median of the rounds.

Clients: ``limiter`` is proxyd's ``RedisLimiter.request`` (a callback per check, as the
middleware calls it); ``redis-py`` is redis-py's asyncio client (hiredis parser when
installed) running the same script with EVALSHA, one Task per check, since the middleware
runs in protocol callbacks and would need one to await it.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import uvloop

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from redis_server import RedisServer  # noqa: E402

from proxyd.middleware.rate_limit.gcra import Limit  # noqa: E402
from proxyd.middleware.rate_limit.redis_store import GCRA_LUA, RedisLimiter  # noqa: E402

LIMIT = Limit(1_000_000_000, 1.0, 1_000_000_000)  # never denies: every check does the work
KEYS = 64

Check = Callable[[int], Awaitable[Any]]


async def limiter_client(url: str) -> tuple[Check, Callable[[], Awaitable[None]]]:
    limiter = RedisLimiter(url, [LIMIT], 1.0)
    loop = asyncio.get_running_loop()

    def check(i: int) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = loop.create_future()

        def done(result: Any) -> None:
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)

        limiter.request(f"bench{i % KEYS}", done)
        return future

    return check, limiter.close


async def redispy_client(url: str) -> tuple[Check, Callable[[], Awaitable[None]]]:
    import redis.asyncio as aioredis

    client = aioredis.from_url(url, socket_timeout=1.0, max_connections=256)
    sha = await client.script_load(GCRA_LUA)
    args = [max(1, round(LIMIT.interval * 1e6)), max(1, round(LIMIT.tolerance * 1e6))]
    loop = asyncio.get_running_loop()

    def check(i: int) -> asyncio.Task[Any]:
        return loop.create_task(client.evalsha(sha, 1, f"proxyd:rl:{{bench{i % KEYS}}}:0",
                                               *args))

    return check, client.aclose


CLIENTS = {"limiter": limiter_client, "redis-py": redispy_client}


async def run(check: Check, checks: int, concurrency: int) -> tuple[float, float]:
    """(wall µs, CPU µs) per check."""
    started, cpu = time.perf_counter(), time.process_time()
    if concurrency == 1:
        for i in range(checks):
            await check(i)
    else:
        for start in range(0, checks, concurrency):
            await asyncio.gather(*[check(i) for i in range(start, start + concurrency)])
    return ((time.perf_counter() - started) / checks * 1e6,
            (time.process_time() - cpu) / checks * 1e6)


async def bench(name: str, url: str, args: argparse.Namespace) -> None:
    check, close = await CLIENTS[name](url)
    try:
        await run(check, 1000, args.concurrency)  # connect, load the script, warm up
        for concurrency in (1, args.concurrency):
            walls, cpus = [], []
            for _ in range(args.rounds):
                wall, cpu = await run(check, args.checks, concurrency)
                walls.append(wall)
                cpus.append(cpu)
            print(f"{name:<9} {concurrency:>4} in flight: {statistics.median(walls):7.1f} µs "
                  f"wall, {statistics.median(cpus):7.1f} µs CPU per check  (rounds: wall "
                  + " ".join(f"{w:.1f}" for w in walls) + "; cpu "
                  + " ".join(f"{c:.1f}" for c in cpus) + ")")
    finally:
        await close()


def main(args: argparse.Namespace) -> None:
    if shutil.which("redis-server") is None:
        sys.exit("redis-server is not installed")
    try:
        import hiredis
        parser = f"hiredis {hiredis.__version__}"
    except ImportError:
        parser = "no hiredis"
    print(f"{args.checks} checks a round, median of {args.rounds} rounds, uvloop, {parser}")
    with tempfile.TemporaryDirectory(prefix="rl-client-bench-") as tmp:
        server = RedisServer(Path(tmp))
        server.start()
        try:
            for name in args.clients:
                uvloop.run(bench(name, server.url, args))
        finally:
            server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checks", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--clients", nargs="+", choices=list(CLIENTS),
                        default=list(CLIENTS))
    main(parser.parse_args())
