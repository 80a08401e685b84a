"""A worker that stops answering the master (SIGSTOP here) is reported and replaced.

Its successors are kept from starting for a while (the access log's directory is taken away:
a worker that cannot open its log exits at start), so the window in which the slot has no
responsive worker lasts until the test gives the directory back, and what /status and
/health/ready say in it can be observed without racing the replacement.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp

from proxyd.master import HEARTBEAT_TIMEOUT, SUPERVISE_INTERVAL
from proxyd.worker import STATS_INTERVAL
from tests.integration.conftest import (
    Origin,
    Ports,
    Proxyd,
    StartProxyd,
    make_config,
    pids_by_slot,
    wait_until,
)

NOTICED = HEARTBEAT_TIMEOUT + SUPERVISE_INTERVAL + 10.0  # deadline, with room for a busy machine


def _worker(status: dict[str, Any], pid: int) -> dict[str, Any] | None:
    return next((w for w in status["workers"] if w["pid"] == pid), None)


async def _ready_status(p: Proxyd) -> int:
    async with p.admin_session.get(f"{p.admin_url}/health/ready") as r:
        return r.status


async def _metric(p: Proxyd, name: str) -> float | None:
    async with p.admin_session.get(f"{p.admin_url}/metrics") as r:
        for line in (await r.text()).splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return None


def _reaped(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # a zombie still answers: only the master's waitpid removes it
    except ProcessLookupError:
        return True
    return False


async def _start_blocked(origin: Origin, proxyd: StartProxyd,
                         tmp_path: Path) -> tuple[Proxyd, Path, dict[int, int]]:
    """proxyd with two workers, whose successors cannot start until the log dir is back."""
    ports = Ports()
    logs = tmp_path / "logs"
    logs.mkdir()
    config = make_config(ports, origin.url)
    config["access_log"] = {"path": str(logs / "access.log")}
    p = await proxyd(config, ports=ports)
    pids = pids_by_slot(await p.status())
    # The workers keep writing to the file they opened; a new one finds no directory.
    (logs / "access.log").unlink()
    logs.rmdir()
    return p, logs, pids


async def _wait_unresponsive(p: Proxyd, victim: int) -> None:
    async def unresponsive() -> bool:
        worker = _worker(await p.status(), victim)
        return worker is not None and worker["state"] == "unresponsive"

    await wait_until(unresponsive, NOTICED, f"worker {victim} marked unresponsive")
    # A successor was tried and could not start: the slot still has no responsive worker.
    await wait_until(lambda: "slot 0 has no responsive worker" in p.log(200), 10.0,
                     "a failed replacement to be retried")
    assert await _ready_status(p) == 503
    st = await p.status()
    assert _worker(st, victim)["state"] == "unresponsive"  # type: ignore[index]
    assert st["workers_unresponsive"] == 1
    assert await _metric(p, "gateway_worker_unresponsive_total") == 1.0


async def test_stopped_worker_is_reported_and_replaced(
    origin: Origin, proxyd: StartProxyd, tmp_path: Path
) -> None:
    p, logs, pids = await _start_blocked(origin, proxyd, tmp_path)
    victim = pids[0]
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True),
                                    timeout=aiohttp.ClientTimeout(total=60))
    session._retry_connection = False  # a reset must show, not be retried

    async def get() -> tuple[int, str]:
        async with session.get(p.url + "/") as r:
            return r.status, await r.text()

    try:
        os.kill(victim, signal.SIGSTOP)
        stopped_at = time.monotonic()
        # Connections made while it is stopped: those queued on its socket wait there, and
        # its successor must take them (the socket outlives the stopped worker).
        waiting = [asyncio.create_task(get()) for _ in range(12)]
        await _wait_unresponsive(p, victim)
        # Silence counts from its last heartbeat, which came up to one interval before the stop.
        assert time.monotonic() - stopped_at >= HEARTBEAT_TIMEOUT - STATS_INTERVAL

        logs.mkdir()  # successors can start now

        async def replaced() -> dict[str, Any] | None:
            st = await p.status()
            slot0 = pids_by_slot(st).get(0)
            return st if slot0 is not None and slot0 != victim else None

        st = await wait_until(replaced, 20.0, "a ready successor in slot 0")
        successor = pids_by_slot(st)[0]
        assert pids_by_slot(st)[1] == pids[1], "the other worker was left alone"
        await wait_until(lambda: _reaped(victim), 10.0, f"stopped worker {victim} reaped")
        assert await _ready_status(p) == 200
        assert _worker(await p.status(), victim) is None

        results = await asyncio.gather(*waiting, return_exceptions=True)
        assert all(r == (200, "hello from origin") for r in results), results
        fresh = [await get() for _ in range(20)]
        assert all(r == (200, "hello from origin") for r in fresh), fresh

        async def successor_served() -> bool:
            worker = _worker(await p.status(), successor)
            return worker is not None and worker["requests"] > 0

        await wait_until(successor_served, 10.0, f"successor {successor} to serve requests")
    finally:
        await session.close()
    log = p.log(400)
    assert f"worker {victim} (slot 0) has sent nothing for" in log, log
    assert f"killing unresponsive worker {victim}" in log, log


async def test_worker_that_answers_again_keeps_its_slot(
    origin: Origin, proxyd: StartProxyd, tmp_path: Path
) -> None:
    """Continued before a successor could start: it is ready again and nothing replaces it."""
    p, _logs, pids = await _start_blocked(origin, proxyd, tmp_path)
    victim = pids[0]
    os.kill(victim, signal.SIGSTOP)
    await _wait_unresponsive(p, victim)
    os.kill(victim, signal.SIGCONT)

    async def ready_again() -> bool:
        worker = _worker(await p.status(), victim)
        return worker is not None and worker["state"] == "ready"

    await wait_until(ready_again, 10.0, f"worker {victim} ready again")
    assert f"worker {victim} responds again" in p.log(200)
    assert await _ready_status(p) == 200
    # The replacement is called off; the successor it may have been trying is gone by then.
    await wait_until(lambda: f"worker {victim} answers again: no successor for it" in p.log(200),
                     10.0, "the replacement to be called off")
    assert _children(p.pid) == sorted(pids.values()), p.log(200)
    assert pids_by_slot(await p.status()) == pids


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return sorted(int(c) for c in f.read().split())
