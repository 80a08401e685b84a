"""The master's merged /metrics: exact across workers, reloads and recycling; flat scrape cost.

Workers count in-process and push cumulative snapshots to the master about once a second and
once more at exit; the master keeps the live snapshots and folds an exited worker's counters
into retired totals (proxyd/observe/metrics.py). These tests check that from the outside.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration._exact import Exact
from tests.integration.conftest import (
    Origin,
    Ports,
    Proxyd,
    StartProxyd,
    make_config,
    pids_by_slot,
    wait_until,
    write_config,
)
from tests.redis_server import RedisServer, needs_redis, redis_server  # noqa: F401

REQUESTS = "gateway_requests_total"
DURATION_COUNT = "gateway_request_duration_seconds_count"
ACTIVE = "gateway_active_connections"

Series = tuple[str, tuple[tuple[str, str], ...]]  # (sample name, sorted labels)


# -- scraping -------------------------------------------------------------------------------------


async def scrape(p: Proxyd) -> dict[Series, float]:
    """Every sample of the admin port's /metrics, keyed by name and labels."""
    async with p.admin_session.get(f"{p.admin_url}/metrics") as r:
        assert r.status == 200, await r.text()
        text = await r.text()
    samples: dict[Series, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def total(samples: dict[Series, float], name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


def by_label(samples: dict[Series, float], name: str, label: str) -> dict[str, float]:
    out: dict[str, float] = Counter()
    for (n, labels), v in samples.items():
        if n == name:
            out[dict(labels)[label]] += v
    return dict(out)


def is_monotonic(name: str) -> bool:
    """Counter samples and every histogram sample (buckets, count, sum) only ever grow."""
    return name.startswith("gateway_") and (
        name.endswith(("_total", "_bucket", "_count", "_sum"))
        and not name.endswith("_created")
    )


@dataclass
class Scraper:
    """Scrapes in the background and records every counter that went backwards or vanished."""

    p: Proxyd
    scrapes: int = 0
    backwards: list[str] = field(default_factory=list)
    _last: dict[Series, float] = field(default_factory=dict)
    _task: asyncio.Task[None] | None = None

    def start(self) -> Scraper:
        self._task = asyncio.create_task(self._run())
        return self

    def check(self, samples: dict[Series, float]) -> None:
        for key, old in self._last.items():
            new = samples.get(key)
            if new is None:
                self.backwards.append(f"scrape {self.scrapes}: {key} vanished (was {old})")
            elif new < old - 1e-9 * max(1.0, abs(old)):  # _sum: float additions, any order
                self.backwards.append(f"scrape {self.scrapes}: {key} {old} -> {new}")
        self._last = {k: v for k, v in samples.items() if is_monotonic(k[0])}
        self.scrapes += 1

    async def _run(self) -> None:
        while True:
            self.check(await scrape(self.p))
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.check(await scrape(self.p))  # one last comparison, after everything settled


def exits_in_log(p: Proxyd) -> int:
    """Workers that left (recycled or replaced by a reload) since the start."""
    return p.log_path.read_text(errors="replace").count(" exited (")


def recycled(p: Proxyd) -> set[int]:
    """Pids of the workers recycled for max_requests, from the master's log."""
    return {int(m) for m in re.findall(r"worker (\d+) served \d+ requests; recycling",
                                       p.log_path.read_text(errors="replace"))}


async def settled_total(p: Proxyd, expected: int, timeout: float = 6.0) -> dict[Series, float]:
    """Wait, with a deadline, for the pushes that carry the last requests."""

    async def probe() -> dict[Series, float] | None:
        samples = await scrape(p)
        return samples if total(samples, REQUESTS) >= expected else None

    try:
        return await wait_until(probe, timeout, f"{REQUESTS} to reach {expected}", interval=0.1)
    except AssertionError:
        samples = await scrape(p)
        raise AssertionError(f"{REQUESTS} = {total(samples, REQUESTS)}, expected {expected}\n"
                             f"{p.log()}") from None


# -- tests ----------------------------------------------------------------------------------------


async def test_requests_total_exact_across_reload_and_recycle(
    origin: Origin, proxyd: StartProxyd
) -> None:
    n = 3000
    ports = Ports()
    server = {"max_requests": 300, "max_requests_jitter": 0}
    p = await proxyd(make_config(ports, origin.url, server=server), ports=ports)
    first = set(pids_by_slot(await p.status()).values())
    scraper = Scraper(p).start()
    load = Exact(p.url)

    # A third of the requests, spread by the kernel over both workers: each passes
    # max_requests, and both are recycled.
    await load.run(n // 3)
    await wait_until(lambda: len(recycled(p)) >= 2, 10.0, "both workers recycled")
    # A third while a SIGHUP reload replaces both workers.
    write_config(p.config_path, make_config(ports, origin.url, server=server, marker="v2"))
    during = asyncio.create_task(load.run(n // 3))
    await asyncio.sleep(0.2)
    p.signal(signal.SIGHUP)
    await during
    st = await p.wait_generation(2)
    # The rest on the new generation, which recycles too.
    await load.run(n - 2 * (n // 3))
    assert load.ok == n and load.statuses == {200: n}, (load.statuses, load.retried)

    samples = await settled_total(p, n)
    # One more push later: still exact, nothing counted twice.
    await asyncio.sleep(1.5)
    samples = await scrape(p)
    await scraper.stop()
    st = await p.status()
    print(f"requests {n}, retried connects {len(load.retried)}, scrapes {scraper.scrapes}, "
          f"workers exited {exits_in_log(p)}")

    assert total(samples, REQUESTS) == n, p.log()
    assert total(samples, DURATION_COUNT) == n
    # Bounded labels: route names, never the path; the histogram agrees per route.
    assert by_label(samples, REQUESTS, "route") == {"marker": n / 2, "all": n / 2}
    assert by_label(samples, DURATION_COUNT, "route") == {"marker": n / 2, "all": n / 2}
    assert by_label(samples, REQUESTS, "status") == {"200": n}
    inf_buckets = {k: v for k, v in samples.items()
                   if k[0] == "gateway_request_duration_seconds_bucket"
                   and ("le", "+Inf") in k[1]}
    assert sum(inf_buckets.values()) == n
    assert not scraper.backwards, scraper.backwards[:10]
    assert scraper.scrapes > 50, "too few scrapes to have seen the reload and recycles"

    assert samples[("gateway_config_reloads_total", (("result", "ok"),))] == 1
    assert samples[("gateway_worker_restarts_total", ())] == 0
    assert st["worker_restarts"] == 0
    assert exits_in_log(p) >= 4, "two recycled workers and two reloaded ones at least"
    assert len(recycled(p) & first) == 2, "both original workers served and were recycled"
    assert not set(pids_by_slot(st).values()) & first


@needs_redis
async def test_workers_push_with_the_redis_cache_backend(
    origin: Origin, proxyd: StartProxyd, redis_server: RedisServer,  # noqa: F811
) -> None:
    """The stats push reads the cache store's size: with the Redis store too (its L1), so
    counts, retirement and the final push work whichever backend the config chose."""
    n = 200
    ports = Ports()
    config = make_config(ports, origin.url, server={"max_requests": 60,
                                                    "max_requests_jitter": 0})
    config.update(middleware=[{"type": "cache"}], cache={"backend": "redis"},
                  redis={"url": redis_server.url})
    p = await proxyd(config, ports=ports)
    first = set(pids_by_slot(await p.status()).values())
    load = Exact(p.url)
    await load.run(n)
    assert load.statuses == {200: n}, load.statuses
    samples = await settled_total(p, n)
    assert total(samples, REQUESTS) == n, p.log()

    async def pushed_sizes() -> bool:  # every live worker has pushed (a fresh one: {})
        workers = (await p.status())["workers"]
        return all(w["cache"] for w in workers) and all(
            isinstance(w["cache"]["entries"], int) and isinstance(w["cache"]["bytes"], int)
            for w in workers)

    await wait_until(pushed_sizes, 5.0, "every worker to push its cache size")
    # max_requests: the workers asked to retire at a push, and left with their final one.
    await wait_until(lambda: len(recycled(p)) >= 1, 10.0, "a worker recycled")
    assert recycled(p) <= first
    assert total(await settled_total(p, n), REQUESTS) == n


async def _keepalive(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A client connection that has had one answer and now sits idle (keep-alive)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GET /marker HTTP/1.1\r\nHost: test\r\n\r\n")
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:")))
    await reader.readexactly(length)
    return reader, writer


async def test_gauges_come_from_live_workers_only(origin: Origin, proxyd: StartProxyd) -> None:
    ports = Ports()
    p = await proxyd(make_config(ports, origin.url, server={"keepalive_timeout": "60s"}),
                     ports=ports)
    conns = [await _keepalive(p.url) for _ in range(8)]

    async def gauge_is(value: float) -> bool:
        return total(await scrape(p), ACTIVE) == value

    async def per_worker() -> dict[int, int] | None:
        st = await p.status()
        counts = {w["pid"]: w["connections"] for w in st["workers"]}
        return counts if sum(counts.values()) == len(conns) else None

    try:
        await wait_until(lambda: gauge_is(8), 5.0, f"{ACTIVE} == 8")
        counts = await wait_until(per_worker, 5.0, "/status to count the 8 connections")
        print("connections per worker", counts)
        before = total(await scrape(p), REQUESTS)

        # A crash: the dead worker's connections leave the gauge; its counters stay.
        victim = max(counts, key=lambda pid: counts[pid])
        os.kill(victim, signal.SIGKILL)
        left = 8 - counts[victim]
        await wait_until(lambda: gauge_is(left), 5.0, f"{ACTIVE} == {left} after the kill")
        assert total(await scrape(p), REQUESTS) == before, "a crash must not lose counts"

        # A reload: the old workers keep their idle connections (a request may be on its way
        # on one) until the clients leave; then they exit, and new ones on the new generation
        # are all the gauge shows.
        p.signal(signal.SIGHUP)
        await p.wait_generation(2)
        for _, writer in conns:
            writer.close()
        await wait_until(lambda: gauge_is(0), 8.0, f"{ACTIVE} == 0 after the old workers left")
        conns = [await _keepalive(p.url) for _ in range(5)]
        await wait_until(lambda: gauge_is(5), 5.0, f"{ACTIVE} == 5 on the new generation")
        samples = await scrape(p)
        assert total(samples, REQUESTS) == before + 5
        assert samples[("gateway_worker_restarts_total", ())] == 1
    finally:
        for _, writer in conns:
            writer.close()


# How many recycles the scrape-time test drives: 1,000 when that fits the time budget (about
# 45 s on a 2-core machine). max_requests alone cannot get there: a worker asks to retire at
# its once-a-second stats push, so 2 workers recycle about 2 times a second. Back-to-back
# reloads of 8 workers (with max_requests: 1, jitter 0, for the workers that live past a push)
# replace about 20 a second; every replaced worker exits and is folded the same way. On a
# busier machine it stops at the budget, and compares the first tenth of what it reached with
# all of it.
RECYCLES = 1000
RECYCLE_BUDGET = 80.0  # seconds
CHURN_WORKERS = 8


async def _quiet_scrape_time(p: Proxyd, workers: int) -> tuple[float, set[Series]]:
    """Median scrape time with no churn (every draining worker gone), and the sample count."""

    async def settled() -> bool:
        st = await p.status()
        # Only the ready workers left, and each has pushed its stats (cache is set from them):
        # until then a worker's gauges are not in the export.
        return len(st["workers"]) == workers and all(w["state"] == "ready" and w["cache"]
                                                     for w in st["workers"])

    await wait_until(settled, 30.0, "the drained workers to exit, the new ones to push",
                     interval=0.05)
    times = []
    for _ in range(40):
        started = time.perf_counter()
        samples = await scrape(p)
        times.append(time.perf_counter() - started)
    return statistics.median(times), set(samples)


@pytest.mark.timeout(240)
async def test_scrape_time_flat_after_many_recycles(origin: Origin, proxyd: StartProxyd) -> None:
    ports = Ports()
    server = {"max_requests": 1, "max_requests_jitter": 0, "drain_timeout": "3s"}
    p = await proxyd(make_config(ports, origin.url, workers=CHURN_WORKERS, server=server),
                     ports=ports)
    reload_url = f"{p.admin_url}/reload?wait=1"
    timeout = aiohttp.ClientTimeout(total=60)
    stop = asyncio.Event()
    load = Exact(p.url)

    async def churn(until: int, deadline: float) -> None:
        """Reload back to back (each replaces every worker) until ``until`` workers exited."""
        while exits_in_log(p) < until and time.monotonic() < deadline:
            async with p.admin_session.post(reload_url, timeout=timeout) as r:
                assert r.status == 200, await r.text()

    async def traffic() -> None:
        while not stop.is_set():
            await load.run(20, concurrency=2, pause=0.005)

    started = time.monotonic()
    flow = asyncio.create_task(traffic())
    try:
        await churn(RECYCLES // 10, started + RECYCLE_BUDGET)
        spent = time.monotonic() - started
        stop.set()
        await flow
        tenth = exits_in_log(p)
        base_time, base_samples = await _quiet_scrape_time(p, CHURN_WORKERS)

        stop.clear()
        flow = asyncio.create_task(traffic())
        await churn(RECYCLES, time.monotonic() + RECYCLE_BUDGET - spent)
        stop.set()
        await flow
        done = exits_in_log(p)
        end_time, end_samples = await _quiet_scrape_time(p, CHURN_WORKERS)
    finally:
        stop.set()
        with contextlib.suppress(BaseException):
            await flow
    samples = await scrape(p)
    print(f"recycles: {tenth} then {done} (target {RECYCLES}); scrape median "
          f"{base_time * 1000:.2f} ms -> {end_time * 1000:.2f} ms; samples {len(base_samples)} "
          f"-> {len(end_samples)}; requests {load.ok}, retried connects {len(load.retried)}; "
          f"max_requests recycles {p.log_path.read_text().count('recycling')}; "
          f"statuses {dict(load.statuses)}")

    assert done >= 200, f"only {done} recycles: the comparison proves little"
    assert done >= 5 * tenth
    # Nothing per worker accumulates in the export...
    assert len(end_samples) <= len(base_samples) + 10, (sorted(end_samples - base_samples),
                                                        sorted(base_samples - end_samples))
    # ... nor in the time to produce it (a generous factor: the machine is shared).
    assert end_time <= max(3 * base_time, base_time + 0.010), (base_time, end_time)
    # And the totals are still exact after all those folds.
    assert total(samples, REQUESTS) == load.ok, (total(samples, REQUESTS), load.ok)
    assert total(samples, DURATION_COUNT) == load.ok
