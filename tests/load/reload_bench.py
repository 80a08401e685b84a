"""Reload benchmark (not a test): how long a reload takes, and what it costs steady traffic.

    python tests/load/reload_bench.py [--rate 1000] [--duration 10] [--workers 2]

1. Reload latency: SIGHUP → the new generation ready in /status (every slot's new worker
   ready), over ``--reloads`` reloads; min / median / max.
2. Open-loop load at a fixed rate (requests are sent on schedule whether or not earlier ones
   have answered, and latency is measured from the scheduled send time, so a stall is not
   hidden by coordinated omission), once without reloads and once with a SIGHUP every
   ``--reload-every`` seconds; p50 / p99 / p99.9 / max and errors.

Runs proxyd (``python -m proxyd run``) and an aiohttp origin (1 KiB responses) as
subprocesses on free ports on 127.0.0.1; the load generator and the reload driver run here.
On a small machine all of them share the CPUs: compare the two load runs with each other,
not with numbers from elsewhere.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import uvloop
import yaml

ORIGIN = """
import sys
from aiohttp import web
body = b"x" * 1024
async def hello(request):
    return web.Response(body=body)
app = web.Application()
app.router.add_get("/{tail:.*}", hello)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None,
            backlog=4096)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def config(port: int, admin: int, origin: int, workers: int, marker: str) -> dict[str, Any]:
    return {
        "server": {"listen": [f"127.0.0.1:{port}"], "workers": workers, "backlog": 4096,
                   "max_requests": 0, "drain_timeout": "10s"},
        "admin": {"listen": f"127.0.0.1:{admin}"},
        "upstreams": {"origin": {"targets": [f"http://127.0.0.1:{origin}"]}},
        "routes": [
            {"name": "marker", "match": {"path": "/marker"}, "respond": {"body": marker}},
            {"name": "all", "match": {"path_prefix": "/"}, "upstream": "origin"},
        ],
        "access_log": {"enabled": False},
    }


def write(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False))
    os.replace(tmp, path)


async def wait_http(session: aiohttp.ClientSession, url: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(aiohttp.ClientError, OSError):
            async with session.get(url) as r:
                if r.status == 200:
                    return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} not ready after {timeout}s")
        await asyncio.sleep(0.05)


class Proxyd:
    def __init__(self, directory: Path, workers: int) -> None:
        self.port, self.admin, self.origin_port = free_port(), free_port(), free_port()
        self.workers = workers
        self.config_path = directory / "bench.yaml"
        self.log = open(directory / "proxyd.log", "wb")  # noqa: SIM115
        self.origin = subprocess.Popen(
            [sys.executable, "-c", ORIGIN, str(self.origin_port)],
            stdout=subprocess.DEVNULL, stderr=self.log, start_new_session=True,
        )
        write(self.config_path, self.config("v1"))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "proxyd", "run", "-c", str(self.config_path)],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.generation = 1

    def config(self, marker: str) -> dict[str, Any]:
        return config(self.port, self.admin, self.origin_port, self.workers, marker)

    async def status(self, session: aiohttp.ClientSession) -> dict[str, Any]:
        async with session.get(f"http://127.0.0.1:{self.admin}/status") as r:
            data: dict[str, Any] = await r.json()
            return data

    async def reload(self, session: aiohttp.ClientSession) -> float:
        """SIGHUP, then poll /status until the next generation is ready; the seconds it took."""
        self.generation += 1
        write(self.config_path, self.config(f"v{self.generation}"))
        started = time.monotonic()
        os.kill(self.proc.pid, signal.SIGHUP)
        while True:
            st = await self.status(session)
            ready = {w["slot"] for w in st["workers"]
                     if w["generation"] == self.generation and w["state"] == "ready"}
            if st["generation"] == self.generation and len(ready) == st["worker_count"]:
                return time.monotonic() - started
            if st["last_reload"]["ok"] is False:
                raise RuntimeError(f"reload failed: {st['last_reload']['error']}")
            if time.monotonic() - started > 30:
                raise RuntimeError("reload did not finish in 30s")
            await asyncio.sleep(0.002)

    async def settled(self, session: aiohttp.ClientSession, generation: int) -> None:
        """After the signals: every one became a generation, and none failed."""
        deadline = time.monotonic() + 30
        while (st := await self.status(session))["generation"] < generation:
            if time.monotonic() > deadline:
                raise RuntimeError(f"generation {st['generation']}, expected {generation}")
            await asyncio.sleep(0.05)
        if st["generation"] != generation or st["last_reload"]["ok"] is False:
            raise RuntimeError(f"reloads went wrong: {st['generation']} {st['last_reload']}")
        self.generation = generation

    def stop(self) -> None:
        for proc in (self.proc, self.origin):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in (self.proc, self.origin):
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(15)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)  # the group: any worker left behind
            proc.wait()
        self.log.close()


@dataclass
class Run:
    name: str
    latencies: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    sent: int = 0
    elapsed: float = 0.0
    reloads: int = 0

    def pct(self, q: float) -> float:
        data = sorted(self.latencies)
        if not data:
            return float("nan")
        return data[min(len(data) - 1, int(q * len(data)))] * 1000

    def line(self) -> str:
        errors = sum(self.errors.values())
        return (f"{self.name:<22} {self.sent / self.elapsed:7.0f} req/s  "
                f"p50 {self.pct(0.50):6.2f}  p99 {self.pct(0.99):6.2f}  "
                f"p99.9 {self.pct(0.999):7.2f}  max {self.pct(1.0):7.2f} ms  "
                f"errors {errors}{' ' + str(self.errors) if errors else ''}"
                f"{f'  ({self.reloads} reloads)' if self.reloads else ''}")


async def open_loop(url: str, rate: float, duration: float, run: Run,
                    reload_every: float | None, proxyd: Proxyd,
                    admin: aiohttp.ClientSession) -> None:
    connector = aiohttp.TCPConnector(limit=1000, keepalive_timeout=30)
    async with aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=10)) as session:
        session._retry_connection = False  # count every reset; do not hide it by a retry
        pending: set[asyncio.Task[None]] = set()

        async def one(scheduled: float) -> None:
            try:
                async with session.get(url) as r:
                    await r.read()
                    if r.status != 200:
                        run.errors[str(r.status)] = run.errors.get(str(r.status), 0) + 1
                        return
                run.latencies.append(time.monotonic() - scheduled)
            except Exception as exc:
                name = type(exc).__name__
                run.errors[name] = run.errors.get(name, 0) + 1

        async def reloader() -> None:
            # Only the signal, at a fixed cadence: rewriting the file or polling /status here
            # would cost this process (the load generator) CPU during each reload, and the
            # requests it delays would be blamed on proxyd. The master reloads the same file
            # into a new generation each time; main() checks afterwards that every one landed.
            assert reload_every is not None
            began = time.monotonic()
            for tick in itertools.count(1):
                await asyncio.sleep(max(0.0, began + tick * reload_every - time.monotonic()))
                os.kill(proxyd.proc.pid, signal.SIGHUP)
                run.reloads += 1

        reloads = asyncio.create_task(reloader()) if reload_every else None
        interval = 1.0 / rate
        start = time.monotonic()
        n = 0
        while (now := time.monotonic()) - start < duration:
            # Send everything that is due: late wake-ups catch up rather than slow the rate.
            while start + n * interval <= now:
                task = asyncio.create_task(one(start + n * interval))
                pending.add(task)
                task.add_done_callback(pending.discard)
                n += 1
            await asyncio.sleep(max(0.0, start + n * interval - time.monotonic()))
        run.sent = n
        run.elapsed = time.monotonic() - start
        if reloads is not None:
            reloads.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reloads
        if pending:
            await asyncio.wait(pending)


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="proxyd-bench-") as tmp:
        proxyd = Proxyd(Path(tmp), args.workers)
        try:
            async with aiohttp.ClientSession() as admin:
                await wait_http(admin, f"http://127.0.0.1:{proxyd.origin_port}/")
                await wait_http(admin, f"http://127.0.0.1:{proxyd.admin}/health/ready")
                url = f"http://127.0.0.1:{proxyd.port}/bench"

                times = [await proxyd.reload(admin) for _ in range(args.reloads)]
                ms = sorted(t * 1000 for t in times)
                print(f"reload latency (SIGHUP → generation ready), {len(ms)} reloads, "
                      f"{args.workers} workers: min {ms[0]:.1f} ms, "
                      f"median {statistics.median(ms):.1f} ms, max {ms[-1]:.1f} ms")

                warm = Run("warm-up")
                await open_loop(url, args.rate, 2.0, warm, None, proxyd, admin)
                quiet = Run("no reloads")
                await open_loop(url, args.rate, args.duration, quiet, None, proxyd, admin)
                busy = Run(f"reload every {args.reload_every:g}s")
                before = await proxyd.status(admin)
                await open_loop(url, args.rate, args.duration, busy, args.reload_every,
                                proxyd, admin)
                await proxyd.settled(admin, before["generation"] + busy.reloads)
                print(f"open-loop GET at {args.rate:g} req/s for {args.duration:g}s "
                      f"(latency from the scheduled send time):")
                print("  " + quiet.line())
                print("  " + busy.line())
        finally:
            proxyd.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--reload-every", type=float, default=1.0)
    parser.add_argument("--reloads", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2)
    uvloop.run(main(parser.parse_args()))
