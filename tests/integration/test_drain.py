"""A reload drops nothing: a draining worker serves every connection that has begun a request,
or was accepted and has sent nothing yet, to the end of that request; connections queued on a
socket are never reset, not even on a socket the reload retires.

Real proxyd processes, real signals; the busy-machine case runs with a CPU hog on every core.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator

import pytest

from tests.integration.conftest import (
    Load,
    Origin,
    Ports,
    Proxyd,
    StartProxyd,
    make_config,
    wait_until,
    write_config,
)


async def open_conn(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def answer(reader: asyncio.StreamReader) -> tuple[str, dict[str, str], bytes]:
    async with asyncio.timeout(10):
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        lines = head.split("\r\n")
        fields = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])
                  if k}
        body = await reader.readexactly(int(fields.get("content-length", "0")))
    return lines[0], fields, body


async def worker_connections(p: Proxyd, at_least: int) -> None:
    async def probe() -> bool:
        st = await p.status()
        return sum(w["connections"] for w in st["workers"]) >= at_least

    await wait_until(probe, 10.0, f"{at_least} connections accepted by the worker")


async def reload_to(p: Proxyd, ports: Ports, origin: Origin, generation: int,
                    workers: int = 2) -> None:
    write_config(p.config_path,
                 make_config(ports, origin.url, workers=workers, marker=f"v{generation}"))
    p.signal(signal.SIGHUP)


async def test_reload_serves_connections_that_had_not_finished_a_request(
        origin: Origin, proxyd: StartProxyd) -> None:
    """Five connections that sent nothing and five that sent half a header section, then a
    reload; the requests are finished 1.5 s later: all ten are answered by the old worker,
    with Connection: close."""
    ports = Ports()
    p = await proxyd(make_config(ports, origin.url, workers=1), ports=ports)
    silent = [await open_conn(ports.traffic) for _ in range(5)]
    halves = [await open_conn(ports.traffic) for _ in range(5)]
    for _, writer in halves:
        writer.write(b"GET /marker HTTP/1.1\r\nHost: te")
        await writer.drain()
    await worker_connections(p, 10)

    hup = time.monotonic()
    await reload_to(p, ports, origin, 2, workers=1)
    await p.wait_generation(2)
    await asyncio.sleep(max(0.0, hup + 1.5 - time.monotonic()))  # the clients' own delay
    for _, writer in silent:
        writer.write(b"GET /marker HTTP/1.1\r\nHost: test\r\n\r\n")
    for _, writer in halves:
        writer.write(b"st\r\n\r\n")
    results = [await answer(reader) for reader, _ in silent + halves]
    for _, writer in silent + halves:
        writer.close()
    assert [(start, body) for start, _, body in results] == [("HTTP/1.1 200 OK", b"v1")] * 10
    assert all(fields.get("connection") == "close" for _, fields, _ in results)


@pytest.fixture
def cpu_hogs() -> Iterator[list[subprocess.Popen[bytes]]]:
    """A busy loop on every core, as on a loaded machine; stopped by pid."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
            for _ in range(os.cpu_count() or 2)]
    try:
        yield hogs
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


class SlowClients:
    """Requests whose head arrives in two parts 1.2 s apart, each on a new connection."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.ok = 0
        self.failures: list[str] = []
        self.stop = False

    async def run(self) -> None:
        while not self.stop:
            try:
                reader, writer = await open_conn(self.port)
                try:
                    writer.write(b"GET / HTTP/1.1\r\nHost: te")
                    await writer.drain()
                    await asyncio.sleep(1.2)  # the client's own pace
                    writer.write(b"st\r\n\r\n")
                    start, _, body = await answer(reader)
                finally:
                    writer.close()
                if start != "HTTP/1.1 200 OK" or body != b"hello from origin":
                    self.failures.append(f"{start} {body[:60]!r}")
                else:
                    self.ok += 1
            except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
                self.failures.append(repr(exc))


ROUNDS = 10
RELOADS_PER_ROUND = 3


@pytest.mark.timeout(600)
async def test_reloads_on_a_busy_machine_drop_nothing(
        origin: Origin, proxyd: StartProxyd, load_factory: Callable[..., Awaitable[Load]],
        cpu_hogs: list[subprocess.Popen[bytes]]) -> None:
    """Ten rounds of SIGHUPs 0.8 s apart under load (new connections, keep-alive POSTs with
    checked echoes, keep-alive clients that pause), every core busy: no request fails."""
    ports = Ports()
    p = await proxyd(make_config(ports, origin.url), ports=ports)
    load = await load_factory(p.url, get_clients=3, post_clients=3, idle_clients=2)
    await load.wait_flowing(100, timeout=30)
    # Slow clients, as on a busy network or machine: each connects, sends half a head, and
    # finishes it 1.2 s later, on a new connection every time.
    slow = SlowClients(ports.traffic)
    slow_tasks = [asyncio.create_task(slow.run()) for _ in range(6)]
    generation = 1
    try:
        for _ in range(ROUNDS):
            before, slow_before = load.ok, slow.ok
            for _ in range(RELOADS_PER_ROUND):
                generation += 1
                await reload_to(p, ports, origin, generation)
                await asyncio.sleep(0.8)  # the pace of the SIGHUPs, not a wait for a result
            await p.wait_generation(generation, timeout=60)
            await wait_until(lambda b=before: load.ok > b + 20, 30.0, "traffic flowing")
            await wait_until(lambda b=slow_before: slow.ok > b + 6, 30.0, "slow clients served")
            assert not load.failures, load.report()
            assert not slow.failures, slow.failures[:10]
    finally:
        slow.stop = True
        await asyncio.gather(*slow_tasks)
    await load.stop()
    print(load.report(), f"slow clients: {slow.ok} ok")
    assert not load.failures, load.report()
    assert not slow.failures, slow.failures[:10]
    st = await p.status()
    assert st["reloads"] == {"ok": ROUNDS * RELOADS_PER_ROUND, "failed": 0}


async def test_reload_that_retires_sockets_resets_nothing(
        origin: Origin, proxyd: StartProxyd,
        load_factory: Callable[..., Awaitable[Load]]) -> None:
    """From 2 workers to 1 and back: the second slot's socket is retired each time, and the
    connections queued on it are served, not reset."""
    ports = Ports()
    p = await proxyd(make_config(ports, origin.url), ports=ports)
    load = await load_factory(p.url, get_clients=6, post_clients=2)
    await load.wait_flowing(100)
    for generation in range(2, 8):
        await reload_to(p, ports, origin, generation, workers=1 if generation % 2 == 0 else 2)
        await p.wait_generation(generation)
        await load.wait_flowing(50)
    await load.stop()
    assert not load.failures, load.report()
