"""Python cost of one request on the data plane, without sockets: a profiling harness.

The benchmark (bench.py) measures what users see, but on a shared 2-core machine its numbers
move by ±20% from run to run, too much to judge a change worth a few per cent. This drives a
worker's ClientConnection and a pooled UpstreamConnection with in-memory transports, so what
it times is proxyd's own work per request (parsers, routing, middleware, relay, metrics): the
syscalls the real path adds are the same for every version of that work.

    python tests/load/hotpath.py [--scenarios plain chain mw cache] [--requests 50000] [--profile]
    python tests/load/hotpath.py --build-up        # the full chain, one element at a time

Scenarios use bench.py's configs (the full chain with the JSON access log, metrics, and the
memory rate limit; a cache hit). Prints microseconds of Python per request, best of 5 rounds.

The build-up scenarios (``--build-up`` runs them all, in this order) make bench.py's full chain
one piece at a time, so the difference between two neighbours is what that piece costs:

==============  ============================================================================
relay           the route alone: no middleware, metrics off, no access log
+metrics        relay with metrics (bench.py's plain: its config, this scenario)
+log            and the JSON access log to a file
+cors ...       and the chain's elements, one more each, in the chain's order: +cors,
                +security_headers, +validation, +trace_id, +rate_limit, +etag, +compression
                (+compression is bench.py's chain: the same config)
+gzip           the full chain with a request that carries Accept-Encoding: gzip (its 1 KiB
                body compressed; bench.py's chain_gz); the others send none, as wrk does
==============  ============================================================================

For instruction counts per piece (noise-free), run each under cachegrind for two request
counts and take the difference (docs/performance.md, "How to measure"):

    PYTHONHASHSEED=0 valgrind --tool=cachegrind --cache-sim=no python tests/load/hotpath.py \
        --scenarios +log --requests N --rounds 1        # N = 1000 and 5000; difference / 4000
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import uvloop
import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # noqa: E402

from proxyd.config.loader import load_config  # noqa: E402
from proxyd.proxy.connection import ClientConnection  # noqa: E402
from proxyd.proxy.pipeline import Pipeline  # noqa: E402
from proxyd.proxy.upstream_conn import UpstreamConnection  # noqa: E402

BODY = b"x" * 1024
RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Fri, 27 Nov 2026 05:38:24 GMT\r\n"
            b"Content-Type: text/plain\r\nContent-Length: 1024\r\n"
            b"Last-Modified: Fri, 27 Nov 2026 05:38:16 GMT\r\nConnection: keep-alive\r\n"
            b"Accept-Ranges: bytes\r\n\r\n" + BODY)
CACHEABLE = RESPONSE.replace(b"Accept-Ranges", b"Cache-Control: max-age=300\r\nAccept-Ranges")
PATHS = {"plain": b"/", "chain": b"/", "mw": b"/", "cache": b"/cacheable"}
# The full chain built up one piece at a time (see the docstring).
ELEMENTS = ("cors", "security_headers", "validation", "trace_id", "rate_limit", "etag",
            "compression")
BUILD_UP = ("relay", "+metrics", "+log", *(f"+{e}" for e in ELEMENTS), "+gzip")
PATHS.update({step: b"/" for step in BUILD_UP})


def build_up_config(step: str, tmp: Path, rate_limit: dict[str, Any] | None
                    ) -> dict[str, Any]:
    """bench.py's full chain config, cut down to the pieces up to ``step``."""
    raw = bench.proxyd_config("chain", 18999, 18998, 18997, 1, tmp, rate_limit)
    upto = len(BUILD_UP) if step == "+gzip" else BUILD_UP.index(step)
    raw["metrics"] = {"enabled": upto >= 1}
    if upto < 2:
        raw["access_log"] = {"enabled": False}
    chain = [entry for entry in raw["middleware"]
             if f"+{entry['type']}" in BUILD_UP[:upto + 1]]
    if chain:
        raw["middleware"] = chain
    else:
        del raw["middleware"]
    return raw


class Transport:
    """The parts of an asyncio transport the data plane uses; writes are counted, not sent."""

    def __init__(self, on_write: Any = None) -> None:
        self.written = 0
        self.closing = False
        self.on_write = on_write

    def write(self, data: bytes) -> None:
        self.written += len(data)
        if self.on_write is not None:
            self.on_write(data)

    def writelines(self, data: list[bytes]) -> None:
        self.write(b"".join(data))

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    abort = close

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def can_write_eof(self) -> bool:
        return False


class Driver:
    def __init__(self, scenario: str, tmp: Path) -> None:
        rate_limit, _ = bench.rate_limit_entry()
        if scenario in BUILD_UP:
            raw = build_up_config(scenario, tmp, rate_limit)
        else:
            raw = bench.proxyd_config(scenario, 18999, 18998, 18997, 1, tmp, rate_limit)
        raw["server"]["limits"] = {"max_keepalive_requests": 0}  # one client connection
        path = tmp / f"{scenario}.yaml"
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        self.config = load_config(path)
        self.scenario = scenario
        accept = b"Accept-Encoding: gzip\r\n" if scenario == "+gzip" else b""
        self.request = (b"GET " + PATHS[scenario] + b" HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"
                        b"User-Agent: wrk\r\n" + accept + b"\r\n")
        self.answer = CACHEABLE if scenario == "cache" else RESPONSE

    def setup(self, loop: asyncio.AbstractEventLoop) -> None:
        self.pipeline = p = Pipeline(self.config, loop)
        target = p.pools["origin"].targets[0]
        self.conn = conn = UpstreamConnection(target)
        self.owed = False

        def asked(data: bytes) -> None:
            self.owed = True

        conn.connection_made(Transport(asked))  # type: ignore[arg-type]
        target.open = 1
        target.idle.append(conn)
        self.ds = ds = ClientConnection(p)
        self.client = Transport()
        ds.connection_made(self.client)  # type: ignore[arg-type]

    def one(self) -> None:
        if self.ds.closed:  # max_keepalive_requests: the client opens another connection
            self.ds.connection_lost(None)
            self.ds = ClientConnection(self.pipeline)
            self.client.closing = False
            self.ds.connection_made(self.client)  # type: ignore[arg-type]
        self.ds.data_received(self.request)
        if self.owed:
            self.owed = False
            # As uvloop delivers a read to the connection (its buffered-protocol path).
            answer = self.answer
            self.conn.get_buffer(-1)[:len(answer)] = answer
            self.conn.buffer_updated(len(answer))

    def rounds(self, n: int, rounds: int) -> float:
        self.one()  # the cache scenario's miss stores the entry
        best = float("inf")
        for _ in range(rounds):
            start = time.perf_counter()
            for _ in range(n):
                self.one()
            best = min(best, time.perf_counter() - start)
        least = 64 if self.scenario == "+gzip" else 1024  # 1 KiB compresses to ~100 B
        assert self.client.written > rounds * n * least, f"{self.client.written} bytes written"
        return best / n * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenarios", nargs="+", default=["plain", "chain", "mw", "cache"],
                        choices=list(PATHS))
    parser.add_argument("--build-up", action="store_true",
                        help="the build-up scenarios, in order, instead of --scenarios")
    parser.add_argument("--requests", type=int, default=50000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="cProfile one round, top 30")
    args = parser.parse_args()
    if args.build_up:
        args.scenarios = list(BUILD_UP)
    with tempfile.TemporaryDirectory() as tmp:
        for scenario in args.scenarios:
            driver = Driver(scenario, Path(tmp))

            async def run(driver: Driver = driver) -> None:
                driver.setup(asyncio.get_running_loop())
                if args.profile:
                    driver.one()
                    prof = cProfile.Profile()
                    prof.enable()
                    for _ in range(args.requests):
                        driver.one()
                    prof.disable()
                    print(f"== {driver.scenario}")
                    pstats.Stats(prof).sort_stats("tottime").print_stats(30)
                else:
                    us = driver.rounds(args.requests, args.rounds)
                    print(f"{driver.scenario:17} {us:6.1f} µs/request (Python, no syscalls)")
                driver.pipeline.close()

            uvloop.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
