"""SIGTERM: in-flight requests finish, then the master exits 0 within drain_timeout."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest

from tests.integration.conftest import (
    Load,
    Origin,
    Ports,
    StartProxyd,
    make_config,
    wait_until,
)

SLOW = 1.0  # seconds the origin takes for each in-flight request
DRAIN_TIMEOUT = 5.0


async def test_sigterm_finishes_in_flight_requests(
    origin: Origin, proxyd: StartProxyd, load_factory: Callable[..., Awaitable[Load]]
) -> None:
    ports = Ports()
    config = make_config(ports, origin.url, server={"drain_timeout": f"{DRAIN_TIMEOUT:g}s"})
    p = await proxyd(config, ports=ports)
    workers = [w["pid"] for w in (await p.status())["workers"]]
    keepalive = aiohttp.ClientSession()
    fresh = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))
    for session in (keepalive, fresh):
        session._retry_connection = False  # see Load: count resets, do not retry them
    try:
        # Warm the keep-alive pool so some in-flight requests ride reused connections.
        for _ in range(4):
            async with keepalive.get(p.url + "/") as r:
                assert r.status == 200
                await r.read()

        async def slow(session: aiohttp.ClientSession) -> tuple[int, str, str | None]:
            async with session.get(f"{p.url}/slow?d={SLOW:g}") as r:
                return r.status, await r.text(), r.headers.get("Connection")

        # Keep-alive POSTs through the TERM: each one sent before it must be answered.
        load = await load_factory(p.url, get_clients=0, post_clients=4)
        await load.wait_flowing()
        in_flight = [asyncio.create_task(slow(s)) for s in (keepalive, fresh) for _ in range(6)]
        await wait_until(lambda: origin.slow_started == len(in_flight), 5.0,
                         "every slow request to reach the origin")
        assert origin.slow_finished == 0
        termed = time.monotonic()
        p.signal(signal.SIGTERM)

        # New connections after TERM: refused, or served; never an in-flight casualty.
        async def late() -> str:
            try:
                async with fresh.get(p.url + "/", timeout=aiohttp.ClientTimeout(total=3)) as r:
                    body = await r.read()
                    return "served" if (r.status, body) == (200, b"hello from origin") else (
                        f"bad answer {r.status} {body[:60]!r}")
            except aiohttp.ClientConnectorError:
                return "refused"
            except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError) as exc:
                return f"reset {exc!r}"
            except TimeoutError:
                return "hung"

        await asyncio.sleep(0.1)  # the workers have stopped accepting by now
        late_results = await asyncio.gather(*(late() for _ in range(8)))
        results = await asyncio.gather(*in_flight, return_exceptions=True)
        code = await p.wait_exit(DRAIN_TIMEOUT + 5)
        exited_after = time.monotonic() - termed
        await load.stop()
    finally:
        await keepalive.close()
        await fresh.close()

    print(f"late: {late_results}; exited after {exited_after:.2f}s\n{load.report()}")
    before_term = [f for f in load.failures if f.started < termed]
    assert not before_term, load.report()
    # After TERM, a keep-alive client whose connection was closed finds the port shut.
    assert all("ClientConnectorError" in f.what for f in load.failures), load.report()
    assert all(r == (200, "slow done", "close") for r in results[:6]), results
    assert all(not isinstance(r, BaseException) and r[:2] == (200, "slow done")
               for r in results[6:]), results
    assert origin.slow_finished == len(in_flight)
    assert code == 0, p.log()
    assert exited_after < DRAIN_TIMEOUT, p.log()
    assert exited_after > SLOW * 0.5, "exited before the in-flight requests could finish"
    assert set(late_results) <= {"served", "refused"}, late_results
    for pid in [p.pid, *workers]:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", ports.traffic)


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(c) for c in f.read().split()]


def _group_empty(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


async def test_int_while_workers_start_stops_cleanly(origin: Origin, proxyd: StartProxyd) -> None:
    """^C while workers are still starting: they must not act on the master's signals."""
    ports = Ports()
    p = await proxyd(make_config(ports, origin.url), ports=ports, wait=False)
    children = await wait_until(lambda: _children(p.pid), 15.0, "the first worker fork",
                                interval=0.001)
    p.signal(signal.SIGINT)
    assert await p.wait_exit(10.0) == 0, p.log()
    log = p.log(200)
    assert "Traceback" not in log and "exception" not in log, log
    await wait_until(lambda: _group_empty(p.pid), 5.0, f"workers {children} to be gone")


async def test_quit_after_term_stops_at_once(origin: Origin, proxyd: StartProxyd) -> None:
    ports = Ports()
    p = await proxyd(make_config(ports, origin.url), ports=ports)
    async with aiohttp.ClientSession() as session:
        session._retry_connection = False
        slow = [asyncio.create_task(session.get(f"{p.url}/slow?d=20")) for _ in range(4)]
        await wait_until(lambda: origin.slow_started == len(slow), 5.0, "slow requests")
        p.signal(signal.SIGTERM)
        await wait_until(lambda: "graceful shutdown" in p.log(), 5.0, "the drain to begin")
        quit_at = time.monotonic()
        p.signal(signal.SIGQUIT)
        assert await p.wait_exit(10.0) == 0, p.log()
        assert time.monotonic() - quit_at < 5.0
        results = await asyncio.gather(*slow, return_exceptions=True)
        for r in results:
            if not isinstance(r, BaseException):
                r.release()
    # QUIT means now: the slow requests are cut, and nothing else goes wrong on the way out.
    assert all(isinstance(r, aiohttp.ClientError) for r in results), results
    log = p.log(200)
    assert "Traceback" not in log and "exception" not in log, log
    assert _group_empty(p.pid)


async def test_workers_that_cannot_start_fail_the_start_at_once(
    origin: Origin, proxyd: StartProxyd, tmp_path: Path
) -> None:
    """A config that validates but whose workers die while starting: exit 3, promptly."""
    ports = Ports()
    config = make_config(ports, origin.url)
    config["access_log"] = {"path": str(tmp_path / "missing" / "access.log")}
    p = await proxyd(config, ports=ports, wait=False)
    started = time.monotonic()
    assert await p.wait_exit(10.0) == 3, p.log()
    assert time.monotonic() - started < 5.0, "waited for READY_TIMEOUT instead of the exits"
    assert "workers failed to start" in p.log(), p.log()
    await wait_until(lambda: _group_empty(p.pid), 5.0, "every worker gone")
