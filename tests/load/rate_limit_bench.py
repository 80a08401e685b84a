"""Rate limiting benchmark (not a test): the latency a limiter adds to one request.

    python tests/load/rate_limit_bench.py [--requests 3000] [--warmup 300]

Three single-worker proxyd processes run side by side in front of one aiohttp origin: no
limiter, ``rate_limit`` with the memory backend, and ``rate_limit`` with the Redis backend (a
``redis-server`` started here on a free port). The limit is far above the load, so every
request is allowed and every one pays for a check. One blocking keep-alive connection per
proxyd; requests go round-robin over the three (none, memory, redis, none, ...), so machine
noise falls on all of them alike. Reported: median and p95 per request, and each limiter's
median and p95 minus the no-limiter ones; for reference, the median round trip of PING and of
the GCRA script from this process to Redis, with the blocking client and with the limiter's own
asyncio client (the goal: the Redis backend adds about one round trip).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ORIGIN = """
import sys
from aiohttp import web
body = b"x" * 256
async def hello(request):
    return web.Response(body=body)
app = web.Application()
app.router.add_get("/{tail:.*}", hello)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
"""

MODES = ("none", "memory", "redis")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def config(mode: str, port: int, admin: int, origin: int, redis_url: str) -> dict[str, Any]:
    data: dict[str, Any] = {
        "server": {"listen": [f"127.0.0.1:{port}"], "workers": 1, "max_requests": 0,
                   # one connection carries every request
                   "limits": {"max_keepalive_requests": 0}},
        "admin": {"listen": f"127.0.0.1:{admin}"},
        "upstreams": {"origin": {"targets": [f"http://127.0.0.1:{origin}"]}},
        "routes": [{"name": "all", "match": {"path_prefix": "/"}, "upstream": "origin"}],
        "access_log": {"enabled": False},
        "redis": {"url": redis_url},
    }
    if mode != "none":
        data["middleware"] = [{"type": "rate_limit", "backend": mode, "rate": "1000000/s",
                               "burst": 1000000, "key": "client_ip"}]
    return data


class Conn:
    """A blocking HTTP/1.1 keep-alive connection: the least client overhead per request."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        self.request = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"

    def get(self) -> tuple[int, float, bytes]:
        started = time.perf_counter()
        self.sock.sendall(self.request)
        while b"\r\n\r\n" not in self.buf:
            self._read()
        head, _, rest = self.buf.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        self.buf = rest
        while len(self.buf) < length:
            self._read()
        self.buf = self.buf[length:]
        return int(head[9:12]), time.perf_counter() - started, head

    def _read(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed by proxyd")
        self.buf += chunk

    def close(self) -> None:
        self.sock.close()


def wait_port(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            sys.exit(f"{what} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                sys.exit(f"{what} did not listen on {port}")
            time.sleep(0.05)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def redis_reference(url: str, n: int) -> tuple[float, float, float]:
    """Median round trips (seconds) from this process: PING and the GCRA script with the
    blocking client, and the script through the limiter's own asyncio client (uvloop)."""
    import redis
    import uvloop

    from proxyd.middleware.rate_limit.gcra import Limit
    from proxyd.middleware.rate_limit.redis_store import GCRA_LUA, RedisLimiter

    client = redis.Redis.from_url(url)
    script = client.register_script(GCRA_LUA)
    ping, lua = [], []
    for i in range(n):
        started = time.perf_counter()
        client.ping()
        ping.append(time.perf_counter() - started)
        started = time.perf_counter()
        script(keys=[f"bench:{{ref}}:{i % 16}"], args=[1, 1_000_000_000_000])
        lua.append(time.perf_counter() - started)
    client.close()

    async def limiter_checks() -> float:
        limiter = RedisLimiter(url, [Limit(1_000_000, 1.0, 1_000_000)], 0.05)
        took = []
        try:
            for i in range(n):
                started = time.perf_counter()
                await limiter.check(f"ref{i % 16}")
                took.append(time.perf_counter() - started)
        finally:
            await limiter.close()
        return statistics.median(took)

    return statistics.median(ping), statistics.median(lua), uvloop.run(limiter_checks())


def main(args: argparse.Namespace) -> None:
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server is not installed")
    procs: list[subprocess.Popen[bytes]] = []
    conns: dict[str, Conn] = {}
    with tempfile.TemporaryDirectory(prefix="rl-bench-") as tmp:
        directory = Path(tmp)
        try:
            redis_port = free_port()
            redis_proc = subprocess.Popen(
                [binary, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", tmp],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            procs.append(redis_proc)
            wait_port(redis_port, redis_proc, "redis-server")
            redis_url = f"redis://127.0.0.1:{redis_port}/0"
            origin_port = free_port()
            origin = subprocess.Popen([sys.executable, "-c", ORIGIN, str(origin_port)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            procs.append(origin)
            wait_port(origin_port, origin, "origin")
            ports = {}
            for mode in MODES:
                ports[mode] = free_port()
                path = directory / f"{mode}.yaml"
                path.write_text(yaml.safe_dump(config(mode, ports[mode], free_port(),
                                                      origin_port, redis_url)))
                log = open(directory / f"{mode}.log", "ab")  # noqa: SIM115 - child holds it
                proc = subprocess.Popen(
                    [sys.executable, "-m", "proxyd", "run", "-c", str(path)],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
                log.close()
                procs.append(proc)
            for mode, proc in zip(MODES, procs[2:], strict=True):
                wait_port(ports[mode], proc, f"proxyd ({mode})")
            conns = {mode: Conn(ports[mode]) for mode in MODES}
            samples: dict[str, list[float]] = {mode: [] for mode in MODES}
            for i in range(args.warmup + args.requests):
                for mode in MODES:
                    status, took, head = conns[mode].get()
                    if status != 200:
                        sys.exit(f"{mode}: status {status}")
                    if i == 0 and mode != "none" and b"ratelimit-remaining" not in head.lower():
                        sys.exit(f"{mode}: no RateLimit headers; is the limiter on?")
                    if i >= args.warmup:
                        samples[mode].append(took)
            ping, lua, check = redis_reference(redis_url, args.requests)
            fallback = (directory / "redis.log").read_text(errors="replace")
            if "unavailable" in fallback:
                sys.exit("the Redis limiter fell back during the run: numbers are not Redis's")
        finally:
            for conn in conns.values():
                conn.close()
            for proc in reversed(procs):
                with contextlib.suppress(ProcessLookupError):
                    stop(proc)

    base50, base95 = statistics.median(samples["none"]), pct(samples["none"], 0.95)
    print(f"{args.requests} sequential keep-alive GETs per mode, single-worker proxyd, "
          "interleaved\n")
    print(f"{'mode':<8} {'median':>9} {'p95':>9} {'added median':>13} {'added p95':>10}")
    for mode in MODES:
        med, p95 = statistics.median(samples[mode]), pct(samples[mode], 0.95)
        print(f"{mode:<8} {med * 1e6:>7.0f}us {p95 * 1e6:>7.0f}us "
              f"{(med - base50) * 1e6:>11.0f}us {(p95 - base95) * 1e6:>8.0f}us")
    print(f"\nRedis round trips from this process (median): PING {ping * 1e6:.0f}us, "
          f"GCRA script {lua * 1e6:.0f}us (blocking redis-py), "
          f"RedisLimiter.check {check * 1e6:.0f}us (its pipelined RESP client, uvloop)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--warmup", type=int, default=300)
    main(parser.parse_args())
